"""A thin asyncio layer over :class:`~.protocol.AmqpProtocol`: it moves bytes and resolves futures.

- Writes are coalesced: whatever a loop iteration queues goes out in one ``write()``.
- Requests on a channel are sent one at a time, in order, each resolving its own future;
  a refused request fails alone and the channel is reopened for the next ones.
- Publishes on a confirming channel get one future each, resolved by the broker's
  ``basic.ack``/``basic.nack`` (``multiple`` included); no lock is held while waiting.
- Deliveries go straight to a callback from ``data_received``: no task per message.
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
import socket
import ssl
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from pamqp import commands

from . import protocol as amqp
from .errors import (
    ChannelRefused,
    ConnectionFailed,
    ConnectionLost,
    HandshakeTimeout,
    LoginRefused,
    ProtocolError,
    ProtocolViolation,
    ReplyCode,
    TlsFailed,
    Unreachable,
    VhostRefused,
)
from .protocol import AmqpProtocol, Credentials

logger = logging.getLogger(__name__)

DeliveryHandler = Callable[[amqp.Delivery | amqp.UndecodableDelivery], None]

#: Bytes the transport may buffer before publishing pauses (a bound on memory while the
#: broker reads slowly or not at all); writes of other frames are not held back.
WRITE_BUFFER_HIGH = 1024 * 1024


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


class AmqpConnection(asyncio.Protocol):
    """One open AMQP connection. Build it with :meth:`connect`."""

    def __init__(
        self,
        machine: AmqpProtocol,
        description: str,
        *,
        host: str | None = None,
        port: int | None = None,
        on_delivery: DeliveryHandler | None,
        on_deliveries_done: Callable[[], None],
        on_lost: Callable[[AmqpConnection, ConnectionFailed], None],
        on_blocked: Callable[[AmqpConnection, str | None], None] | None = None,
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
        self._transport: StreamTransport | None = None
        self._opened: asyncio.Future[amqp.ConnectionOpened] = self._loop.create_future()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._flush_scheduled = False
        self._calls: dict[int, deque[tuple[Any, asyncio.Future[Any]]]] = {}
        self._channel_setup: dict[int, list[Any]] = {}
        self._essential_channels: set[int] = set()
        self._unconfirmed: dict[int, OrderedDict[int, asyncio.Future[bool]]] = {}
        self._error: ConnectionFailed | None = None  # why the connection ended, once it has
        self._closing = False
        self._lost_reported = False
        self._last_received = self._loop.time()
        self._sent_since_tick = False
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        #: Why the broker blocks this connection's publishes (a resource alarm), or None.
        self.blocked_reason: str | None = None
        self._writing_paused = False  # the transport's buffer is over its high-water mark
        self._held_back = 0  # bytes of publishes queued this loop iteration, not yet written
        self._progress: dict[int, float] = {}  # channel -> last request sent or reply received
        self._publishable = asyncio.Event()
        self._publishable.set()

    # Opening --------------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        credentials: Credentials,
        virtual_host: str,
        *,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None = None,
        timeout: float,
        heartbeat: int,
        client_properties: dict[str, Any],
        description: str,
        on_delivery: DeliveryHandler | None,
        on_deliveries_done: Callable[[], None],
        on_lost: Callable[[AmqpConnection, ConnectionFailed], None],
        on_blocked: Callable[[AmqpConnection, str | None], None] | None = None,
        max_body_size: int | None = None,
    ) -> AmqpConnection:
        """Connect, authenticate and open the vhost, or raise :class:`~.errors.ConnectionFailed`.

        Deliveries with a body over ``max_body_size`` bytes are skipped unread and handed
        to ``on_delivery`` as an :class:`~.protocol.UndecodableDelivery` marked too large.
        """
        machine = AmqpProtocol(
            credentials,
            virtual_host,
            heartbeat=heartbeat,
            client_properties=client_properties,
            max_body_size=max_body_size,
        )
        loop = asyncio.get_running_loop()
        connection = cls(
            machine,
            description,
            host=host,
            port=port,
            on_delivery=on_delivery,
            on_deliveries_done=on_deliveries_done,
            on_lost=on_lost,
            on_blocked=on_blocked,
        )

        async def open_and_handshake() -> None:
            await loop.create_connection(
                lambda: connection,
                host,
                port,
                ssl=ssl_context,
                server_hostname=(server_hostname or host) if ssl_context is not None else None,
            )
            await connection._opened

        try:
            await asyncio.wait_for(open_and_handshake(), timeout)
        except asyncio.TimeoutError:
            connection.abort()
            raise HandshakeTimeout(
                f"no AMQP answer from {description} within connect_timeout={timeout:g}s",
                peer=description,
                host=host,
                port=port,
                timeout=timeout,
            ) from None
        except ssl.SSLCertVerificationError as error:
            raise TlsFailed(
                f"TLS: the certificate of {description} was not accepted: {error.verify_message}",
                peer=description,
                host=host,
                port=port,
                reason=error.reason,
                verify_code=error.verify_code,
                verify_message=error.verify_message,
            ) from None
        except ssl.SSLError as error:
            raise TlsFailed(
                f"TLS handshake with {description} failed: {error.reason}",
                peer=description,
                host=host,
                port=port,
                reason=error.reason,
            ) from None
        except ConnectionFailed:
            connection.abort()
            raise
        except OSError as error:
            reason = error.strerror or str(error) or type(error).__name__
            raise Unreachable(
                f"cannot connect to {description}: {reason}",
                peer=description,
                host=host,
                port=port,
                errno=error.errno,
                reason=reason,
            ) from None
        except BaseException:
            connection.abort()
            raise
        return connection

    # asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # By behaviour, not class: uvloop's transports do not subclass asyncio.Transport.
        if not isinstance(transport, StreamTransport):
            error = ConnectionLost(
                f"the event loop gave a {type(transport).__name__} for {self.description}, "
                "which cannot write or abort: not a stream transport",
                **self._peer(),
            )
            self._error = error
            transport.close()
            return
        self._transport = transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        sock = transport.get_extra_info("socket")  # uvloop gives a stand-in with the same methods
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Best effort: both loops already set it. uvloop's stand-in raises ValueError, not
            # OSError, once its transport is closed.
            with contextlib.suppress(OSError, ValueError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._flush()

    def data_received(self, data: bytes) -> None:
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
            elif type(event) is amqp.PublishConfirmed:
                self._on_confirm(event)
            else:
                self._on_event(event)
        if delivered:
            self._on_deliveries_done()
        if self.machine.has_outgoing:
            self._schedule_flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
        if self._error is None:
            if self._closing:
                self._error = ConnectionLost(
                    f"the connection to {self.description} was closed", **self._peer()
                )
            elif isinstance(exc, ssl.SSLError) and not self._opened.done():
                # TLS 1.3: the client's side of the handshake ends before the broker checks the
                # client's certificate, so its refusal (an alert) arrives here, not in connect().
                self._error = TlsFailed(
                    f"TLS handshake with {self.description} failed: {exc}", **self._peer(), reason=exc.reason
                )
            else:
                reason = f": {exc}" if exc else ""
                opened = self._opened.done()
                what = "was lost" if opened else "was closed during the handshake"
                self._error = ConnectionLost(
                    f"the connection to {self.description} {what}{reason}",
                    **self._peer(),
                    during_handshake=not opened,
                )
        error = self._error
        if not self._opened.done():
            self._opened.set_exception(error)
            self._opened.exception()  # retrieved: connect() re-raises it
        self._fail_pending(error)
        if not self._closed.done():
            self._closed.set_result(None)
        self._publishable.set()  # waiters wake up and find the connection gone
        self._report_lost(error)

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._publishable.clear()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.blocked_reason is None:
            self._publishable.set()

    # Requests -----------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._transport is not None and self._error is None and not self._closing

    @property
    def can_publish(self) -> bool:
        """Open, not blocked by the broker, and the write buffer below its high-water mark."""
        return self._publishable.is_set() and self.is_open

    async def wait_until_publishable(self) -> None:
        """Wait until publishing may go on, or the connection has ended (check :attr:`is_open`)."""
        await self._publishable.wait()

    def fail_unconfirmed(self, error: BaseException) -> None:
        """Give up on every publish still waiting for its confirm (the broker may still take it)."""
        for pending in self._unconfirmed.values():
            for future in pending.values():
                if not future.done():
                    future.set_exception(error)
            pending.clear()

    def call(self, channel_id: int, method: Any) -> asyncio.Future[Any]:
        """Send a request on a channel; the future gets the reply or a broker error."""
        future: asyncio.Future[Any] = self._loop.create_future()
        if not self.is_open:
            future.set_exception(self._error or self._not_connected())
            return future
        queue = self._calls.setdefault(channel_id, deque())
        queue.append((method, future))
        if len(queue) == 1:
            self._send_request(channel_id, method)
        return future

    async def open_channel(self, channel_id: int, setup: list[Any], *, essential: bool = False) -> None:
        """Open a channel and run ``setup`` on it.

        When the broker closes the channel, it is reopened and set up the same way; or,
        for an ``essential`` channel (publishing, consuming), the whole connection is
        dropped, so that its owner reconnects with every counter and tag fresh.
        """
        if essential:
            self._essential_channels.add(channel_id)
        self._channel_setup[channel_id] = setup
        for method in [commands.Channel.Open(), *setup]:
            future = self.call(channel_id, method)
        await future
        if any(isinstance(method, commands.Confirm.Select) for method in setup):
            self._unconfirmed.setdefault(channel_id, OrderedDict())

    def publish(
        self, channel_id: int, exchange: bytes, routing_key: bytes, properties: bytes, body: bytes
    ) -> asyncio.Future[bool]:
        """Publish on a confirming channel; the future is True (ack) or False (nack)."""
        if not self.is_open:
            raise self._error or self._not_connected()
        unconfirmed = self._unconfirmed.get(channel_id)
        if unconfirmed is None:
            raise ConnectionLost(f"AMQP channel {channel_id} is not (yet) in confirm mode", **self._peer())
        tag = self.machine.publish(channel_id, exchange, routing_key, properties, body)
        future: asyncio.Future[bool] = self._loop.create_future()
        unconfirmed[tag] = future
        if not self._flush_scheduled:
            # The first publish of a loop iteration goes out at once (latency); the rest of
            # the iteration's publishes go out together in the flush scheduled here (throughput).
            self._flush()
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        else:
            self._held_back += len(body)
            if self._held_back > WRITE_BUFFER_HIGH // 2:
                # Hand a large batch to the transport now: past its high-water mark it pauses
                # us (can_publish turns False) before the next publish of this iteration.
                self._write_outgoing()
        return future

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

    def _send_request(self, channel_id: int, method: Any) -> None:
        self._progress[channel_id] = self._loop.time()
        self.machine.send_method(channel_id, method)
        self._schedule_flush()

    def quiet_for(self, channel_id: int | None = None) -> float:
        """Seconds since the broker last showed progress: on ``channel_id``, the last request sent
        or reply received there; otherwise anything received at all."""
        if channel_id is None:
            return self._loop.time() - self._last_received
        return self._loop.time() - self._progress.get(channel_id, self._last_received)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._write_outgoing()

    def _write_outgoing(self) -> None:
        self._held_back = 0
        data = self.machine.take_outgoing()
        if data and self._transport is not None:
            self._transport.write(data)
            self._sent_since_tick = True

    def _on_confirm(self, event: amqp.PublishConfirmed) -> None:
        pending = self._unconfirmed.get(event.channel_id)
        if not pending:
            return
        if event.multiple:
            while pending:
                tag = next(iter(pending))
                if tag > event.delivery_tag:
                    break
                future = pending.pop(tag)
                if not future.done():
                    future.set_result(event.accepted)
        else:
            waiting = pending.pop(event.delivery_tag, None) if event.delivery_tag in pending else None
            if waiting is not None and not waiting.done():
                waiting.set_result(event.accepted)

    def _on_event(self, event: amqp.Event) -> None:
        if isinstance(event, amqp.MethodReceived):
            self._on_method(event)
        elif isinstance(event, amqp.ConnectionOpened):
            self._start_heartbeats(event.heartbeat)
            if not self._opened.done():
                self._opened.set_result(event)
        elif isinstance(event, amqp.ChannelClosed):
            self._on_channel_closed(event)
        elif isinstance(event, amqp.ConnectionClosed):
            if not event.by_us:
                self._error = self._describe_close(event)
                logger.debug("%s", self._error)  # the owner reports it, once
                self._report_lost(self._error)
            self._flush()
            if self._transport is not None:
                self._transport.close()
        elif isinstance(event, amqp.ConnectionBlocked):
            self.blocked_reason = event.reason or "a resource alarm"
            self._publishable.clear()
            if self._on_blocked is not None:
                self._on_blocked(self, self.blocked_reason)
        elif isinstance(event, amqp.ConnectionUnblocked):
            self.blocked_reason = None
            if not self._writing_paused:
                self._publishable.set()
            if self._on_blocked is not None:
                self._on_blocked(self, None)

    def _on_method(self, event: amqp.MethodReceived) -> None:
        method = event.method
        if isinstance(method, commands.Basic.Cancel):
            self._fail(
                ConnectionLost(f"RabbitMQ cancelled our consumer on {self.description}", **self._peer())
            )
            return
        if isinstance(method, commands.Channel.Flow):
            self._send_request(event.channel_id, commands.Channel.FlowOk(method.active))
            return
        if isinstance(method, commands.Basic.Return):
            return
        queue = self._calls.get(event.channel_id)
        if not queue:
            logger.debug("unexpected %s on channel %d", method.name, event.channel_id)
            return
        _request, future = queue.popleft()
        self._progress[event.channel_id] = self._loop.time()
        if not future.done():
            future.set_result(method)
        if queue:
            self._send_request(event.channel_id, queue[0][0])

    def _on_channel_closed(self, event: amqp.ChannelClosed) -> None:
        queue = self._calls.get(event.channel_id, deque())
        request = queue.popleft() if queue else None
        request_name = request[0].name if request is not None else ""
        error = ChannelRefused(event.reply_code, event.reply_text, request_name)
        if request is not None and not request[1].done():
            request[1].set_exception(error)
        pending = self._unconfirmed.get(event.channel_id)
        if pending:
            lost = ConnectionLost(
                "RabbitMQ closed the publishing channel before confirming "
                f"({event.reply_code} {event.reply_text})",
                **self._peer(),
                reply_code=event.reply_code,
                reply_text=event.reply_text,
            )
            for future in pending.values():
                if not future.done():
                    future.set_exception(lost)
            pending.clear()
        if self._closing or self._error is not None:
            return
        if event.channel_id in self._essential_channels:
            self._fail(
                ConnectionLost(
                    f"RabbitMQ closed AMQP channel {event.channel_id} on {self.description}: "
                    f"{event.reply_code} {event.reply_text}",
                    **self._peer(),
                    reply_code=event.reply_code,
                    reply_text=event.reply_text,
                )
            )
            return
        # Reopen the channel, set it up again, then go on with the requests still queued.
        reopen = [commands.Channel.Open(), *self._channel_setup.get(event.channel_id, [])]
        for method in reversed(reopen):
            future = self._loop.create_future()
            future.add_done_callback(_log_failed_reopen)
            queue.appendleft((method, future))
        self._calls[event.channel_id] = queue
        self._send_request(event.channel_id, queue[0][0])

    def _describe_close(self, event: amqp.ConnectionClosed) -> ConnectionFailed:
        code = _code_and_name(event.reply_code)
        if not self._opened.done():
            if event.reply_code == ReplyCode.ACCESS_REFUSED:
                return LoginRefused(
                    f"RabbitMQ refused the login of {self.description}: wrong username or password ({code})",
                    **self._peer(),
                    reply_code=event.reply_code,
                    reply_text=event.reply_text,
                )
            if event.reply_code == ReplyCode.NOT_ALLOWED:
                return VhostRefused(
                    f"RabbitMQ refused the vhost of {self.description}: it does not exist "
                    f"or the user may not use it ({event.reply_text})",
                    **self._peer(),
                    reply_code=event.reply_code,
                    reply_text=event.reply_text,
                )
        return ConnectionLost(
            f"RabbitMQ closed the connection to {self.description}: {event.reply_text}",
            **self._peer(),
            reply_code=event.reply_code,
            reply_text=event.reply_text,
            during_handshake=not self._opened.done(),
        )

    def _peer(self) -> dict[str, Any]:
        """The fields every connection error of this connection carries."""
        return {"peer": self.description, "host": self.host, "port": self.port}

    def _not_connected(self) -> ConnectionLost:
        return ConnectionLost(f"not connected to {self.description}", **self._peer())

    def _start_heartbeats(self, interval: int) -> None:
        if interval > 0:
            self._heartbeat_timer = self._loop.call_later(interval / 2, self._heartbeat_tick, interval)

    def _heartbeat_tick(self, interval: int) -> None:
        if self._transport is None:
            return
        if self._loop.time() - self._last_received > 2 * interval:
            self._fail(
                ConnectionLost(
                    f"{self.description} missed heartbeats: nothing heard for {2 * interval}s", **self._peer()
                )
            )
            return
        if not self._sent_since_tick:
            self.machine.heartbeat_frame()
            self._flush()
        self._sent_since_tick = False
        self._heartbeat_timer = self._loop.call_later(interval / 2, self._heartbeat_tick, interval)

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

    def abort(self) -> None:
        """Drop the connection at once (no closing handshake)."""
        if self._transport is not None:
            self._transport.abort()

    def _fail_pending(self, error: ConnectionFailed) -> None:
        for queue in self._calls.values():
            for _method, future in queue:
                if not future.done():
                    future.set_exception(error)
            queue.clear()
        for pending in self._unconfirmed.values():
            if pending:
                lost = ConnectionLost(
                    f"{error}; the broker had not confirmed the message: "
                    "it may or may not have been delivered",
                    **self._peer(),
                    reply_code=getattr(error, "reply_code", None),
                    reply_text=getattr(error, "reply_text", None),
                )
                for future in pending.values():
                    if not future.done():
                        future.set_exception(lost)
                pending.clear()


def _log_failed_reopen(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("could not reopen an AMQP channel: %s", future.exception())


def _code_and_name(code: int) -> str:
    """``"403 ACCESS_REFUSED"``, or the bare number for a code AMQP does not define."""
    try:
        return f"{code} {ReplyCode(code).name}"
    except ValueError:
        return str(code)
