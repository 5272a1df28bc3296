"""``RabbitmqChannelLayer``: the Django Channels layer API on RabbitMQ.

Each server process owns one exclusive RabbitMQ queue. A channel name is
``<queue>!<local part>``: ``send()`` publishes to that queue and the owning process
routes the message to the channel's inbox. A group is a routing key on one direct
exchange: a queue is bound when the group's first local member joins and unbound when
the last leaves; ``group_send()`` is one publish that each process fans out to its
local members.

One layer object serves every event loop and thread of the process:

- a loop running in the main thread that makes channels (the ASGI server's, where
  consumers live) gets a :class:`~.broker.BrokerLink` of its own: its connection and
  queue, used directly; when that loop shuts down, its link is closed with it;
- every other caller (``async_to_sync`` in Celery tasks, management commands and
  plain threads, each call on a new short-lived loop; scripts that only send) uses
  one shared link on the layer's own I/O thread (:mod:`.background`);
- a channel is received by the link that made it; ``receive()`` and group calls for
  it from another loop are carried to that link's loop.

The methods below read like the Channels spec; the mechanisms live in
:mod:`.broker`, :mod:`.routing` and :mod:`.wire`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from channels.exceptions import ChannelFull, MessageTooLarge, StopConsumer
from channels.layers import BaseChannelLayer

from .background import BackgroundLoop
from .broker import LOOP_CHECK_INTERVAL, BrokerLink, Handoff
from .config import DEFAULT_HOST, LayerConfig
from .encryption import BodyCipher
from .exceptions import BrokerTimeoutError, ChannelLayerClosedError
from .logs import RateLimitedLogger
from .wire import NO_PROPERTIES, channel_properties, encode_message

logger = logging.getLogger(__name__)

NAME_CACHE_SIZE = 10_000  # checked names remembered, per layer; forgotten all at once when full

T = TypeVar("T")


class RabbitmqChannelLayer(BaseChannelLayer):  # type: ignore[misc]  # channels ships no types
    """A channel layer that routes through RabbitMQ. See the README for every CONFIG key."""

    extensions = ["groups", "flush"]

    def __init__(self, host: str | list[str] = DEFAULT_HOST, **config: Any) -> None:
        """Check the CONFIG (``LayerConfig.build``: unknown keys refused, defaults applied); no I/O."""
        self.config = LayerConfig.build(host=host, **config)
        self._cipher = BodyCipher(self.config.encryption_keys) if self.config.encryption_keys else None
        super().__init__(expiry=self.config.expiry, capacity=self.config.capacity)
        self.channel_capacity = list(self.config.channel_capacity)  # Channels' compiled form
        self.group_expiry = self.config.group_expiry
        self._groups_exchange = self.config.groups_exchange.encode()
        self._full_group_log = RateLimitedLogger(logger)
        self._closed = False
        self._lock = threading.Lock()
        # Names already checked (the check is pure): channels received on; send targets.
        self._valid_channels: set[str] = set()
        self._send_targets: dict[str, tuple[bytes, bytes]] = {}
        self._reset()
        # A forked child forgets the parent's links at once, so that even the sends' fast path,
        # which checks nothing, never writes to the parent's sockets.
        os.register_at_fork(after_in_child=functools.partial(_forget_links_in_child, weakref.ref(self)))

    def _reset(self) -> None:
        """Forget every link (at construction, and in a child process after fork)."""
        self._pid = os.getpid()
        self._loop_links: dict[asyncio.AbstractEventLoop, BrokerLink] = {}  # main-thread loops
        self._links_by_queue: dict[str, BrokerLink] = {}  # every live link, by queue name
        self._background: BackgroundLoop | None = None
        self._background_link: BrokerLink | None = None

    def __repr__(self) -> str:
        return f"<RabbitmqChannelLayer {self.config.description}>"

    def _encode(self, message: dict[str, Any], destination: str) -> bytes:
        """The body to publish: msgpack, sealed for ``destination`` (channel or group) when
        ``encryption_keys`` are set; size-checked."""
        limit = self.config.max_message_size
        body = encode_message(message, limit)
        if self._cipher is not None:
            body = self._cipher.seal(body, destination)
            if len(body) > limit:
                raise MessageTooLarge(f"message is {len(body)} bytes encrypted; max_message_size is {limit}")
        return body

    # Channels -----------------------------------------------------------------------------------

    async def new_channel(self, prefix: str = "specific.") -> str:
        """Return a new channel name that this process receives on.

        The name is ``<queue>!<random>``; ``prefix`` is not used. The first call on a
        loop connects, so that messages sent to the channel have a queue to go to.
        """
        link = await self._link_for_this_loop(receiving=True)
        return await self._on(link, link.new_channel)

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """Send a message to a channel; returns once RabbitMQ has accepted it.

        Raises ``ChannelFull`` when the channel's process is overwhelmed: it holds
        ``local_capacity`` messages and ``remote_capacity`` more wait in RabbitMQ. A channel
        that holds its own ``capacity`` drops what comes next instead (nobody is blocked).
        Raises ``BrokerBlockedError`` when RabbitMQ blocks publishing for ``connection_wait``.
        """
        target = self._send_targets.get(channel)
        if target is None:
            target = self._send_target(channel)
        routing_key, properties = target
        body = self._encode(message, channel)
        link = self._loop_links.get(asyncio.get_running_loop())
        if link is not None:  # the fast path: this loop's own link
            accepted = await link.publish(b"", routing_key, properties, body)
        else:
            link = await self._link_for_this_loop()
            accepted = await self._on(link, link.publish, b"", routing_key, properties, body)
        if not accepted:
            raise ChannelFull(
                f"RabbitMQ refused the message (basic.nack): queue {routing_key.decode()} is at "
                "remote_capacity, or, rarely, its node is failing"
            )

    def _send_target(self, channel: str) -> tuple[bytes, bytes]:
        """Check a channel name once; remember where its messages go (routing key, properties)."""
        self.require_valid_channel_name(channel)
        queue, bang, _local = channel.partition("!")
        if not bang:
            raise NotImplementedError(
                f"cannot send to {channel!r}: normal channels (names without '!') are not supported yet"
            )
        if len(self._send_targets) >= NAME_CACHE_SIZE:
            self._send_targets.clear()
        target = self._send_targets[channel] = (queue.encode(), channel_properties(channel))
        return target

    async def receive(self, channel: str) -> dict[str, Any]:
        """Return the next message for a channel of this process, waiting for one if needed.

        A cancelled ``receive()`` loses nothing. After ``close()``, or once the event loop
        that made the channel has ended, it raises ``StopConsumer``.
        """
        if channel not in self._valid_channels:
            self.require_valid_channel_name(channel)
            if len(self._valid_channels) >= NAME_CACHE_SIZE:
                self._valid_channels.clear()
            self._valid_channels.add(channel)
        link = self._owner(channel, "receive on")
        caller = asyncio.get_running_loop()
        if link.loop is caller:
            return await link.receive(channel)
        # The channel's loop receives it for us; we watch that loop, which may end meanwhile.
        result: asyncio.Future[tuple[dict[str, Any], Handoff]] = caller.create_future()
        if not link.loop.is_running():
            raise StopConsumer()
        bridged = link.receive_for(channel, caller, result)
        try:
            task = asyncio.run_coroutine_threadsafe(bridged, link.loop)
        except RuntimeError:
            bridged.close()  # never started: no "coroutine was never awaited"
            raise StopConsumer() from None  # the channel's loop is closed
        try:
            if not await _done_while_running(result, link.loop):
                result.cancel()
                task.cancel()
                raise StopConsumer()
        except asyncio.CancelledError:
            if result.done() and not result.cancelled() and result.exception() is None:
                result.result()[1].give_back()  # handed over just now: it is read next
            else:
                result.cancel()
                task.cancel()
            raise
        message, handoff = result.result()
        handoff.taken()
        return message

    # Groups ---------------------------------------------------------------------------------------

    async def group_add(self, group: str, channel: str) -> None:
        """Add a channel of this process to a group (again: refreshes ``group_expiry``)."""
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        link = self._owner(channel, "group_add")
        await self._on(link, link.group_add, group, channel)

    async def group_discard(self, group: str, channel: str) -> None:
        """Remove a channel from a group; no error if it was not a member."""
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        link = self._owner(channel, "group_discard")
        await self._on(link, link.group_discard, group, channel)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        """Send a message to every member of a group, in every process. Never raises ``ChannelFull``."""
        self.require_valid_group_name(group)
        body = self._encode(message, group)
        link = self._loop_links.get(asyncio.get_running_loop())
        if link is not None:
            accepted = await link.publish(self._groups_exchange, group.encode(), NO_PROPERTIES, body)
        else:
            link = await self._link_for_this_loop()
            accepted = await self._on(
                link, link.publish, self._groups_exchange, group.encode(), NO_PROPERTIES, body
            )
        if not accepted:
            self._full_group_log.warning(
                "group_send to %r: RabbitMQ refused it for a member process's queue (at remote_capacity, "
                "or its node failing); "
                "its members miss the message",
                group,
            )

    # Flush and close ----------------------------------------------------------------------------

    async def flush(self) -> None:
        """Empty this layer: buffered messages, its queues, its memberships and bindings.

        Other processes' queues and memberships are untouched: RabbitMQ has no global
        view of them, and each process flushes its own.
        """
        self._check_fork()
        for link in list(self._links_by_queue.values()):
            await self._on(link, link.flush)

    async def close(self) -> None:
        """Close every connection and the I/O thread; ``receive()`` then raises ``StopConsumer``.

        Works from any loop or thread (through ``async_to_sync``); idempotent. Takes at
        most a few seconds per link, even with the broker gone or a link's loop stopped.
        """
        self._check_fork()
        with self._lock:
            self._closed = True
            links = list(self._links_by_queue.values())
            self._links_by_queue.clear()
            self._loop_links.clear()
            background, self._background = self._background, None
            self._background_link = None
        for link in links:
            if not link.loop.is_running() and link.loop is not asyncio.get_running_loop():
                continue  # nothing can run there; its connections die with the loop or the process
            try:
                await self._on(link, link.close)
            except (RuntimeError, ChannelLayerClosedError, asyncio.TimeoutError):
                pass  # its loop stopped meanwhile
        if background is not None:
            await background.stop()

    # Which link serves whom ----------------------------------------------------------------------

    def _check_fork(self) -> None:
        """In a forked child, forget the parent's links: their loops and sockets are not ours."""
        if self._pid != os.getpid():
            self._lock = threading.Lock()  # the parent may have held it while forking
            self._reset()

    def _owner(self, channel: str, operation: str) -> BrokerLink:
        """The link that receives ``channel``."""
        self._check_fork()
        if self._closed:
            if operation == "receive on":
                raise StopConsumer()
            raise ChannelLayerClosedError("the channel layer is closed")
        link = self._links_by_queue.get(channel.partition("!")[0])
        if link is None:
            raise ValueError(
                f"cannot {operation} {channel!r}: it is not a channel of this process "
                "(only names from this layer's new_channel() are), or the event loop that "
                "made it has ended"
            )
        return link

    async def _link_for_this_loop(self, receiving: bool = False) -> BrokerLink:
        """This loop's own link, or the I/O thread's shared link.

        A loop of the main thread gets a link of its own when it makes a channel
        (``receiving``): that is the ASGI server's loop, where consumers live. Loops that
        only send, and loops of other threads, share the I/O thread's link, so that a
        script or task calling ``asyncio.run()`` or ``async_to_sync`` again and again
        does not open a connection per call.
        """
        self._check_fork()
        if self._closed:
            raise ChannelLayerClosedError("the channel layer is closed")
        loop = asyncio.get_running_loop()
        link = self._loop_links.get(loop)
        if link is not None:
            return link
        if not receiving or threading.current_thread() is not threading.main_thread():
            return self._shared_link()
        link = BrokerLink(self.config, loop)
        with self._lock:
            if self._closed:
                raise ChannelLayerClosedError("the channel layer is closed")
            self._loop_links[loop] = link
            self._links_by_queue[link.queue_name] = link
        watcher = self._close_with_loop(link)
        link.loop_watcher = watcher  # the loop keeps async generators by weak reference
        await watcher.__anext__()
        return link

    async def _close_with_loop(self, link: BrokerLink) -> AsyncIterator[None]:
        """An async generator the loop finalizes at shutdown (``shutdown_asyncgens()``):
        the link's connection closes while the loop can still run it."""
        try:
            yield
        finally:
            with self._lock:
                self._loop_links.pop(link.loop, None)
                self._links_by_queue.pop(link.queue_name, None)
            await link.close()

    def _shared_link(self) -> BrokerLink:
        with self._lock:
            if self._closed:  # close() may have run in another thread since our last check
                raise ChannelLayerClosedError("the channel layer is closed")
            if self._background_link is None:
                self._background = BackgroundLoop(name=f"channels_rabbitmq {self.config.address}")
                link = BrokerLink(self.config, self._background.loop)
                self._background_link = link
                self._links_by_queue[link.queue_name] = link
            return self._background_link

    async def _on(self, link: BrokerLink, method: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``method(*args)`` on the link's loop, from whichever loop we are on.

        Bounded: a call that needs the broker waits at most ``connection_wait`` for a
        connection and ``connect_timeout`` for an answer; a loop that is not running, or
        stops, ends the wait with :class:`ChannelLayerClosedError` rather than a hang.
        """
        if link.loop is asyncio.get_running_loop():
            return await method(*args)
        if not link.loop.is_running():
            raise ChannelLayerClosedError(f"the event loop of {link.queue_name} is not running")
        coroutine = _call(method, *args)
        try:
            call = asyncio.run_coroutine_threadsafe(coroutine, link.loop)
        except RuntimeError:
            coroutine.close()  # never started: no "coroutine was never awaited"
            raise ChannelLayerClosedError(f"the event loop of {link.queue_name} is closed") from None
        bound = self.config.connection_wait + 2 * self.config.connect_timeout + LOOP_CHECK_INTERVAL
        deadline = time.monotonic() + bound
        outcome = asyncio.wrap_future(call)
        try:
            finished = await _done_while_running(outcome, link.loop, deadline)
        except asyncio.CancelledError:
            call.cancel()
            raise
        if not finished:
            call.cancel()
            if not link.loop.is_running():
                raise ChannelLayerClosedError(f"the event loop of {link.queue_name} stopped")
            raise BrokerTimeoutError(
                f"the call on the event loop of {link.queue_name} did not finish within {bound:g}s",
                operation=getattr(method, "__name__", "call"),
                timeout=bound,
            )
        if outcome.cancelled():  # cancelled over there: its loop is shutting down, or close()
            raise ChannelLayerClosedError(f"the event loop of {link.queue_name} is shutting down")
        return outcome.result()


async def _done_while_running(
    future: asyncio.Future[Any], loop: asyncio.AbstractEventLoop, deadline: float = float("inf")
) -> bool:
    """Wait for ``future``, made on another ``loop``; False once that loop stops running, or past
    ``deadline`` (``time.monotonic()``). It is checked every ``LOOP_CHECK_INTERVAL``."""
    while True:
        done, _ = await asyncio.wait((future,), timeout=LOOP_CHECK_INTERVAL)
        if done:
            return True
        if not loop.is_running() or time.monotonic() > deadline:
            return False


def _forget_links_in_child(layer_ref: weakref.ref[RabbitmqChannelLayer]) -> None:
    layer = layer_ref()
    if layer is not None:
        layer._check_fork()


async def _call(method: Callable[..., Awaitable[T]], *args: Any) -> T:
    return await method(*args)
