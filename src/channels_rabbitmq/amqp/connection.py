"""A thin asyncio layer over :class:`~.protocol.AmqpProtocol`: it moves bytes and resolves futures.

- Writes are coalesced: whatever a loop iteration queues goes out in one ``write()``.
- Requests and publish confirms are kept per channel by :mod:`.channels`; no lock is
  held while waiting for either.
- On asyncio's own loops, bytes are read into one buffer per connection
  (:class:`BufferedAmqpConnection`, a buffered protocol): asyncio would otherwise allocate 256 KiB
  for every read, about 14 µs each here, however few bytes came. uvloop reads into a buffer of its
  own already, and gets the plain protocol.
- Deliveries go straight to a callback from :meth:`AmqpConnection.data_received`: no task per
  message.
- Heartbeats are sent when the connection is otherwise quiet, and a broker that stays
  silent for two intervals is taken as gone.
- Publishing pauses while the broker blocks the connection (``connection.blocked``, a
  resource alarm) or the transport's write buffer is over its high-water mark:
  :attr:`AmqpConnection.can_publish` says so, and :meth:`wait_until_publishable` waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from pamqp import commands
from pamqp.base import Frame

from . import protocol as amqp
from .channels import ChannelRequests, PublishConfirms, PublishOutcome
from .errors import (
    ChannelsExhausted,
    ConnectionFailed,
    ConnectionLost,
    LoginRefused,
    ProtocolError,
    ProtocolViolation,
    ReplyCode,
    TlsFailed,
    VhostRefused,
)
from .flow import CoalescingWriter, Heartbeats, PublishGate, tune_transport
from .protocol import AmqpProtocol

logger = logging.getLogger(__name__)

DeliveryHandler = Callable[[amqp.Delivery | amqp.UndecodableDelivery], None]
LostHandler = Callable[["AmqpConnection", ConnectionFailed], None]
BlockedHandler = Callable[["AmqpConnection", str | None], None]


@runtime_checkable
class StreamTransport(Protocol):
    """What this module uses of a transport: asyncio's and uvloop's both have it, with no
    common base class beyond ``asyncio.BaseTransport`` (uvloop's do not subclass asyncio.Transport)."""

    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...
    def is_closing(self) -> bool: ...
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...
    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...
    def get_write_buffer_size(self) -> int: ...


#: Bytes one read may take from the socket (asyncio's own default for a plain protocol).
READ_BUFFER_SIZE = 256 * 1024


class AmqpConnection(asyncio.Protocol):
    """One open AMQP connection. Open it with :func:`.opening.connect`."""

    def __init__(
        self,
        machine: AmqpProtocol,
        description: str,
        *,
        host: str | None = None,
        port: int | None = None,
        on_delivery: DeliveryHandler | None,
        on_deliveries_done: Callable[[], None],
        on_lost: LostHandler,
        on_blocked: BlockedHandler | None = None,
    ) -> None:
        self.machine = machine
        self.description = description  # the broker, as the owner names it (no password)
        self.host = host  # the address connected to
        self.port = port
        self._loop = asyncio.get_running_loop()
        self._on_delivery = on_delivery
        self._on_deliveries_done = on_deliveries_done
        self._on_lost = on_lost
        self._on_blocked = on_blocked
        #: Told the channel id when the broker cancels a consumer on a channel that is not
        #: essential (its queue was deleted, say); on an essential channel the connection ends.
        self.on_consumer_cancelled: Callable[[int], None] | None = None
        self._transport: StreamTransport | None = None
        self._opened: asyncio.Future[amqp.ConnectionOpened] = self._loop.create_future()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._requests = ChannelRequests(self._loop, self._send_method)
        self._confirms = PublishConfirms()
        self._error: ConnectionFailed | None = None  # why the connection ended, once it has
        self._closing = False
        self._lost_reported = False
        self._last_received = self._loop.time()
        self._heartbeats = Heartbeats(self._loop, self._send_heartbeat, self._missed_heartbeats)
        self._writer = CoalescingWriter(self._loop, machine.take_outgoing, self._write)
        self._gate = PublishGate()
        self._allocated_channels: set[int] = set()  # see allocate_channel_id()

    # asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # By behaviour, not class: uvloop's transports do not subclass asyncio.Transport.
        if not isinstance(transport, StreamTransport):
            error = self._lost(
                f"the event loop gave a {type(transport).__name__} for {self.description}, "
                "which cannot write or abort: not a stream transport",
            )
            self._error = error
            transport.close()
            return
        self._transport = transport
        tune_transport(transport)
        self._flush()

    def data_received(self, data: bytes) -> None:
        """Bytes from the broker: parse them, then hand on what they complete."""
        self._last_received = self._loop.time()
        try:
            events = self.machine.receive_data(data)
        except ProtocolError as error:
            logger.error("AMQP protocol error from %s: %s; dropping the connection", self.description, error)
            self._fail(
                ProtocolViolation(f"AMQP protocol error from {self.description}: {error}", **self._peer())
            )
            return
        delivered = False
        for event in events:
            if type(event) is amqp.Delivery or type(event) is amqp.UndecodableDelivery:
                if self._on_delivery is None:
                    continue
                delivered = True
                try:
                    self._on_delivery(event)
                except Exception:
                    logger.exception("dropped a delivery that could not be routed")
            else:
                try:
                    if type(event) is amqp.PublishConfirmed:
                        self._confirms.on_confirm(event)
                    else:
                        self._on_event(event)
                except Exception:  # a bug of ours must not escape into the loop, nor cost other calls
                    logger.exception(
                        "error while handling %s from %s", type(event).__name__, self.description
                    )
        if delivered:
            self._on_deliveries_done()
        if self.machine.has_outgoing:
            self._schedule_flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._heartbeats.stop()
        if self._error is None:
            self._error = _ending(exc, closing=self._closing, opened=self._opened.done(), **self._peer())
        error = self._error
        if not self._opened.done():
            self._opened.set_exception(error)
            self._opened.exception()  # retrieved: connect() re-raises it
        self._fail_pending(error)
        if not self._closed.done():
            self._closed.set_result(None)
        self._gate.release()  # waiters wake up and find the connection gone
        self._report_lost(error)

    def pause_writing(self) -> None:
        self._gate.set_buffer_full(True)

    def resume_writing(self) -> None:
        self._gate.set_buffer_full(False)

    # Requests -----------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._transport is not None and self._error is None and not self._closing

    @property
    def can_publish(self) -> bool:
        """Open, not blocked by the broker, and the write buffer below its high-water mark."""
        return self._gate.is_open and self.is_open

    @property
    def blocked_reason(self) -> str | None:
        """Why the broker blocks this connection's publishes (a resource alarm), or None."""
        return self._gate.blocked_reason

    async def wait_until_publishable(self) -> None:
        """Wait until publishing may go on, or the connection has ended (check :attr:`is_open`)."""
        await self._gate.wait()

    def fail_unconfirmed(self, error: BaseException) -> None:
        """Give up on every publish still waiting for its confirm (the broker may still take it)."""
        self._confirms.fail_all(error)

    @property
    def channel_max(self) -> int:
        """The highest AMQP channel number this connection may use (negotiated at the handshake)."""
        return self.machine.channel_max

    def allocate_channel_id(self, first: int) -> int:
        """The lowest channel number from ``first`` up that :meth:`allocate_channel_id` has not
        handed out (or that was released since). Raises :class:`ChannelsExhausted` when none is
        left below ``channel_max``. Numbers below ``first`` are the caller's to manage."""
        allocated = self._allocated_channels
        for channel_id in range(first, self.channel_max + 1):
            if channel_id not in allocated:
                allocated.add(channel_id)
                return channel_id
        raise ChannelsExhausted(first, self.channel_max)

    def release_channel_id(self, channel_id: int) -> None:
        """Hand a channel number back, once its channel is closed (``channel.close-ok``)."""
        self._allocated_channels.discard(channel_id)

    def pending_requests(self, channel_id: int) -> int:
        """How many requests on the channel wait for their reply (or to be sent)."""
        return self._requests.pending(channel_id)

    def call(self, channel_id: int, method: Frame) -> asyncio.Future[Frame]:
        """Send a request on a channel; the future gets the reply or a broker error."""
        if not self.is_open:
            future: asyncio.Future[Frame] = self._loop.create_future()
            future.set_exception(self._error or self._not_connected())
            return future
        return self._requests.call(channel_id, method)

    async def open_channel(self, channel_id: int, setup: list[Frame], *, essential: bool = False) -> None:
        """Open a channel and run ``setup`` on it.

        When the broker closes the channel, it is reopened and set up the same way; or,
        for an ``essential`` channel (publishing, consuming), the whole connection is
        dropped, so that its owner reconnects with every counter and tag fresh.
        """
        self._requests.configure(channel_id, setup, essential=essential)
        for method in [commands.Channel.Open(), *setup]:
            future = self.call(channel_id, method)
            future.add_done_callback(_retrieve)  # the last one is awaited; the others fail with it
        await future
        if any(isinstance(method, commands.Confirm.Select) for method in setup):
            self._confirms.enable(channel_id)

    def publish(
        self, channel_id: int, exchange: bytes, routing_key: bytes, properties: bytes, body: bytes
    ) -> asyncio.Future[bool]:
        """Publish on a confirming channel; the future is True (ack) or False (nack)."""
        return self._publish(channel_id, exchange, routing_key, properties, body)[1]

    def publish_mandatory(
        self, channel_id: int, exchange: bytes, routing_key: bytes, properties: bytes, body: bytes
    ) -> asyncio.Future[PublishOutcome]:
        """Publish a ``mandatory`` message on a confirming channel: the future says whether a queue
        took it (``ACCEPTED``), refused it (``REFUSED``), or none could (``RETURNED``).

        Not for the per-message path: returns are matched by exchange, routing key and body,
        so identical mandatory messages to one destination are matched oldest first.
        """
        tag, confirmed = self._publish(channel_id, exchange, routing_key, properties, body, mandatory=True)
        destination = (exchange.decode(), routing_key.decode(), body)
        return self._confirms.outcome(channel_id, tag, destination, confirmed)

    def _publish(
        self,
        channel_id: int,
        exchange: bytes,
        routing_key: bytes,
        properties: bytes,
        body: bytes,
        mandatory: bool = False,
    ) -> tuple[int, asyncio.Future[bool]]:
        if not self.is_open:
            raise self._error or self._not_connected()
        unconfirmed = self._confirms.waiting_on(channel_id)
        if unconfirmed is None:
            raise self._lost(f"AMQP channel {channel_id} is not (yet) in confirm mode")
        tag = self.machine.publish(channel_id, exchange, routing_key, properties, body, mandatory=mandatory)
        future: asyncio.Future[bool] = self._loop.create_future()
        unconfirmed[tag] = future
        self._writer.published(len(body))
        return tag, future

    def ack(self, channel_id: int, delivery_tag: int, *, now: bool = False) -> None:
        """Acknowledge every delivery on the channel up to ``delivery_tag``.

        ``now`` writes it at once rather than with the loop iteration's other writes.
        """
        if self.is_open:
            self.machine.ack(channel_id, delivery_tag, multiple=True)
            if now:
                self._flush()
            else:
                self._schedule_flush()

    def reject(self, channel_id: int, delivery_tag: int) -> None:
        """Give one delivery back to its queue (``basic.reject`` with requeue), at once."""
        if self.is_open:
            self.machine.send_method(
                channel_id, commands.Basic.Reject(delivery_tag=delivery_tag, requeue=True)
            )
            self._flush()

    async def close(self, timeout: float = 2.0) -> None:
        """Close gracefully (connection.close, then wait for close-ok), or abort after ``timeout``."""
        if self._transport is None:
            return
        self._closing = True
        self.machine.close()
        self._flush()
        try:
            await asyncio.wait_for(asyncio.shield(self._closed), timeout)
        except asyncio.TimeoutError:
            self.abort()

    # Internals -----------------------------------------------------------------------------

    def _send_method(self, channel_id: int, method: Frame) -> None:
        self.machine.send_method(channel_id, method)
        self._schedule_flush()

    def quiet_for(self, channel_id: int | None = None) -> float:
        """Seconds since the broker last showed progress: on ``channel_id``, the last request sent
        or reply received there; otherwise anything received at all."""
        if channel_id is None:
            return self._loop.time() - self._last_received
        progress = self._requests.last_progress(channel_id)
        return self._loop.time() - (self._last_received if progress is None else progress)

    def _schedule_flush(self) -> None:
        self._writer.schedule()

    def _flush(self) -> None:
        self._writer.write_now()

    def _write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)
            self._heartbeats.sent_since_tick = True

    def _on_event(self, event: amqp.Event) -> None:
        if isinstance(event, amqp.MethodReceived):
            self._on_method(event)
        elif isinstance(event, amqp.ConnectionOpened):
            self._heartbeats.start(event.heartbeat)
            if not self._opened.done():
                self._opened.set_result(event)
        elif isinstance(event, amqp.ChannelClosed):
            self._on_channel_closed(event)
        elif isinstance(event, amqp.ConnectionClosed):
            if not event.by_us:
                self._error = _close_error(event, opened=self._opened.done(), **self._peer())
                logger.debug("%s", self._error)  # the owner reports it, once
                self._report_lost(self._error)
            self._flush()
            if self._transport is not None:
                self._transport.close()
        elif isinstance(event, amqp.MessageReturned):
            if not self._confirms.on_return(event):
                logger.debug("%s returned a message not published as mandatory: %s", self.description, event)
        elif isinstance(event, amqp.ConnectionBlocked | amqp.ConnectionUnblocked):
            reason = (
                (event.reason or "a resource alarm") if isinstance(event, amqp.ConnectionBlocked) else None
            )
            self._gate.set_blocked(reason)
            if self._on_blocked is not None:
                self._on_blocked(self, reason)

    def _on_method(self, event: amqp.MethodReceived) -> None:
        method = event.method
        if isinstance(method, commands.Basic.Cancel):
            if event.channel_id in self._requests.essential:
                self._fail(self._lost(f"RabbitMQ cancelled our consumer on {self.description}"))
            elif self.on_consumer_cancelled is not None:
                self.on_consumer_cancelled(event.channel_id)
            else:  # a consumer its owner can do without (its queue was deleted, say)
                logger.debug("%s cancelled consumer %r", self.description, method.consumer_tag)
            return
        if isinstance(method, commands.Channel.Flow):
            self._send_method(event.channel_id, commands.Channel.FlowOk(method.active))
            return
        self._requests.on_reply(event.channel_id, method)

    def _on_channel_closed(self, event: amqp.ChannelClosed) -> None:
        self._requests.on_channel_closed(event)
        self._confirms.fail_channel(
            event.channel_id,
            self._lost(
                "RabbitMQ closed the publishing channel before confirming "
                f"({event.reply_code} {event.reply_text})",
                reply_code=event.reply_code,
                reply_text=event.reply_text,
            ),
        )
        if self._closing or self._error is not None:
            return
        if event.channel_id in self._requests.essential:
            self._fail(
                self._lost(
                    f"RabbitMQ closed AMQP channel {event.channel_id} on {self.description}: "
                    f"{event.reply_code} {event.reply_text}",
                    reply_code=event.reply_code,
                    reply_text=event.reply_text,
                )
            )
            return
        self._requests.reopen(event.channel_id)

    def _peer(self) -> dict[str, Any]:
        """The fields every connection error of this connection carries."""
        return {"peer": self.description, "host": self.host, "port": self.port}

    def _lost(self, message: str, **fields: Any) -> ConnectionLost:
        return ConnectionLost(message, **self._peer(), **fields)

    def _not_connected(self) -> ConnectionLost:
        return self._lost(f"not connected to {self.description}")

    def _send_heartbeat(self) -> None:
        if self._transport is not None:
            self.machine.heartbeat_frame()
            self._flush()

    def _missed_heartbeats(self, interval: int) -> bool:
        """Fail the connection if the broker said nothing for two intervals; True when it did."""
        if self._transport is not None and self._loop.time() - self._last_received > 2 * interval:
            self._fail(self._lost(f"{self.description} missed heartbeats: nothing heard for {2 * interval}s"))
            return True
        return self._transport is None

    def _fail(self, error: ConnectionFailed) -> None:
        """End the connection now because of ``error``."""
        if self._error is None:
            self._error = error
        self._report_lost(self._error)
        self.abort()

    def _report_lost(self, error: ConnectionFailed) -> None:
        """Tell the owner, once, as soon as an open connection is known to be over (not for our
        own close, nor for a connection that never finished its handshake)."""
        opened = self._opened.done() and not self._opened.cancelled() and self._opened.exception() is None
        if opened and not self._closing and not self._lost_reported:
            self._lost_reported = True
            self._on_lost(self, error)

    def drop(self, reason: str) -> None:
        """End the connection now, as lost because of ``reason`` (its owner is told, and reconnects)."""
        self._fail(self._lost(f"{self.description}: {reason}"))

    def abort(self) -> None:
        """Drop the connection at once (no closing handshake)."""
        if self._transport is not None:
            self._transport.abort()

    def abandon(self) -> None:
        """Close the socket of a connection whose event loop is closed: no callback of it can run
        any more, so :meth:`abort` cannot finish there. From any thread.

        uvloop closes its sockets with the loop; asyncio's selector loop leaves them open (the
        broker would keep the connection, its queue and its consumers), so the socket is shut
        down and closed here, and detached from its transport, which would otherwise close it
        again when collected.
        """
        transport = self._transport
        if transport is None or not self._loop.is_closed():
            return  # a running or stopped loop can still close it: abort() is for that
        self._transport = None
        raw = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None) or transport
        sock = getattr(raw, "_sock", None)  # where asyncio's selector transports keep it
        if isinstance(sock, socket.socket):
            setattr(raw, "_sock", None)  # noqa: B010 (a private attribute of asyncio, set on purpose)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def shut_down_socket(self) -> None:
        """End the connection for the broker at once, from any thread, while this connection's
        event loop is stopped: the socket is shut down both ways, but not closed. Its descriptor
        stays open and registered with the loop, so nothing of the loop is disturbed; when the loop
        runs again, it reads the end, and the loss is reported as any other."""
        transport = self._transport
        if transport is None:
            return
        raw = transport.get_extra_info("socket")
        if raw is None:
            return
        with contextlib.suppress(OSError, ValueError):
            duplicate = socket.socket(fileno=os.dup(raw.fileno()))
            try:
                duplicate.shutdown(socket.SHUT_RDWR)
            finally:
                duplicate.close()

    def _fail_pending(self, error: ConnectionFailed) -> None:
        self._requests.fail_all(error)
        if self._confirms.any_pending():
            self._confirms.fail_all(
                self._lost(
                    f"{error}; the broker had not confirmed the message: "
                    "it may or may not have been delivered",
                    reply_code=getattr(error, "reply_code", None),
                    reply_text=getattr(error, "reply_text", None),
                )
            )


class BufferedAmqpConnection(AmqpConnection, asyncio.BufferedProtocol):
    """An :class:`AmqpConnection` that the loop reads into one buffer of its own (asyncio's
    loops; see the module's docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Anonymous memory: a page costs nothing until a read reaches it (a bytearray would be
        # written through when made, 256 KiB of resident memory per connection).
        self._read_buffer = memoryview(mmap.mmap(-1, READ_BUFFER_SIZE))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._read_buffer[:nbytes].tobytes())


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark an outcome as seen, so that a failure nobody awaits is not reported as never retrieved."""
    if not future.cancelled():
        future.exception()


def _code_and_name(code: int) -> str:
    """``"403 ACCESS_REFUSED"``, or the bare number for a code AMQP does not define."""
    try:
        return f"{code} {ReplyCode(code).name}"
    except ValueError:
        return str(code)


def _ending(
    exc: Exception | None, *, closing: bool, opened: bool, peer: str, host: str | None, port: int | None
) -> ConnectionFailed:
    """Why the transport ended, when nothing said so before."""
    if closing:
        return ConnectionLost(f"the connection to {peer} was closed", peer=peer, host=host, port=port)
    if isinstance(exc, ssl.SSLError) and not opened:
        # TLS 1.3: the client's side of the handshake ends before the broker checks the
        # client's certificate, so its refusal (an alert) arrives here, not in connect().
        return TlsFailed(
            f"TLS handshake with {peer} failed: {exc}", peer=peer, host=host, port=port, reason=exc.reason
        )
    reason = f": {exc}" if exc else ""
    what = "was lost" if opened else "was closed during the handshake"
    return ConnectionLost(
        f"the connection to {peer} {what}{reason}",
        peer=peer,
        host=host,
        port=port,
        during_handshake=not opened,
    )


def _close_error(
    event: amqp.ConnectionClosed, *, opened: bool, peer: str, host: str | None, port: int | None
) -> ConnectionFailed:
    """Why the broker closed the connection: before it opened, a 403 is the login and a 530 the vhost."""
    code = _code_and_name(event.reply_code)
    if not opened:
        if event.reply_code == ReplyCode.ACCESS_REFUSED:
            return LoginRefused(
                f"RabbitMQ refused the login of {peer}: wrong username or password ({code})",
                peer=peer,
                host=host,
                port=port,
                reply_code=event.reply_code,
                reply_text=event.reply_text,
            )
        if event.reply_code == ReplyCode.NOT_ALLOWED:
            return VhostRefused(
                f"RabbitMQ refused the vhost of {peer}: it does not exist "
                f"or the user may not use it ({event.reply_text})",
                peer=peer,
                host=host,
                port=port,
                reply_code=event.reply_code,
                reply_text=event.reply_text,
            )
    return ConnectionLost(
        f"RabbitMQ closed the connection to {peer}: {event.reply_text}",
        peer=peer,
        host=host,
        port=port,
        reply_code=event.reply_code,
        reply_text=event.reply_text,
        during_handshake=not opened,
    )
