"""``RabbitmqChannelLayer``: the Django Channels layer API on RabbitMQ.

Each layer instance (one per server process) owns one exclusive RabbitMQ queue. A
channel name is ``<queue>!<local part>``: ``send()`` publishes to that queue and the
owning process routes the message to the channel's inbox. A group is a routing key on
one direct exchange: the process binds its queue when the group's first local member
joins and unbinds when the last leaves; ``group_send()`` is one publish that each
process fans out to its local members.

The methods below read like the Channels spec; the mechanisms live in
:mod:`.broker` (connection, queue, consumer), :mod:`.routing` (inboxes, groups,
expiry, capacity) and :mod:`.wire` (the message format).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import string
import time
from typing import Any

from channels.exceptions import ChannelFull, StopConsumer
from channels.layers import BaseChannelLayer

from .broker import BrokerLink
from .config import DEFAULT_HOST, LayerConfig
from .logs import RateLimitedLogger
from .routing import EMPTY, LocalRouter
from .wire import NO_PROPERTIES, channel_properties, encode_message

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_SIZE = 4 * 1024 * 1024

_ALPHABET = string.ascii_letters + string.digits


def _random_name(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


class RabbitmqChannelLayer(BaseChannelLayer):
    """A channel layer that routes through RabbitMQ. See the README for every CONFIG key."""

    extensions = ["groups", "flush"]

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        *,
        expiry: float = 60,
        group_expiry: float = 86400,
        local_capacity: int = 100,
        remote_capacity: int = 100,
        prefetch_count: int = 10,
        groups_exchange: str = "groups",
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float = 10,
        heartbeat: int = 60,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.config = LayerConfig.build(
            host=host,
            expiry=expiry,
            group_expiry=group_expiry,
            local_capacity=local_capacity,
            remote_capacity=remote_capacity,
            prefetch_count=prefetch_count,
            groups_exchange=groups_exchange,
            ssl_context=ssl_context,
            connect_timeout=connect_timeout,
            heartbeat=heartbeat,
            max_message_size=max_message_size,
        )
        super().__init__(expiry=int(expiry), capacity=remote_capacity)
        self.group_expiry = group_expiry
        #: This process's queue; every channel from new_channel() starts with it.
        self.queue_name = f"channels.{_random_name(12)}"
        self._channel_prefix = self.queue_name + "!"
        self._router = LocalRouter(capacity=local_capacity, expiry=expiry, group_expiry=group_expiry)
        self._link = BrokerLink(self.config, self.queue_name, self._router)
        self._groups_exchange = groups_exchange.encode()
        self._group_changes: dict[str, asyncio.Future[None]] = {}
        self._full_group_log = RateLimitedLogger(logger)

    def __repr__(self) -> str:
        return f"<RabbitmqChannelLayer {self.config.address} queue={self.queue_name}>"

    # Channels -----------------------------------------------------------------------------------

    async def new_channel(self, prefix: str = "specific.") -> str:
        """Return a new channel name that this process receives on.

        The name is ``<queue>!<random>``; ``prefix`` is not used. The first call connects,
        so that messages sent to the channel have a queue to go to.
        """
        await self._link.connection()
        return f"{self._channel_prefix}{_random_name(12)}"

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """Send a message to a channel; returns once RabbitMQ has accepted it.

        Raises ``ChannelFull`` when the channel's process already has
        ``remote_capacity`` messages waiting in RabbitMQ.
        """
        self.require_valid_channel_name(channel)
        queue, bang, _local = channel.partition("!")
        if not bang:
            raise NotImplementedError(
                f"cannot send to {channel!r}: normal channels (names without '!') are not supported yet"
            )
        body = encode_message(message, self.config.max_message_size)
        accepted = await self._link.publish(b"", queue.encode(), channel_properties(channel), body)
        if not accepted:
            raise ChannelFull(f"RabbitMQ refused the message: queue {queue} is at remote_capacity")

    async def receive(self, channel: str) -> dict[str, Any]:
        """Return the next message for a channel of this process, waiting for one if needed.

        A cancelled ``receive()`` loses nothing. After ``close()`` it raises ``StopConsumer``.
        """
        self.require_valid_channel_name(channel)
        if not channel.startswith(self._channel_prefix):
            raise ValueError(
                f"cannot receive on {channel!r}: only channels from this layer's new_channel() "
                f"(starting with {self._channel_prefix!r}) can be received here"
            )
        if not self._link.is_connected:
            if self._link.is_closed:
                raise StopConsumer()
            await self._link.connection()
        router = self._router
        message = router.take(channel, time.monotonic())
        if message is not EMPTY:
            return message
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        router.add_waiter(channel, waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                router.put_back(channel, waiter.result(), time.monotonic())
            else:
                router.remove_waiter(channel, waiter)
            raise

    # Groups ---------------------------------------------------------------------------------------

    async def group_add(self, group: str, channel: str) -> None:
        """Add a channel of this process to a group (again: refreshes ``group_expiry``)."""
        self.require_valid_group_name(group)
        self._require_own_channel(channel, "group_add")
        await self._link.connection()
        if self._router.add_membership(group, channel, time.monotonic()):
            try:
                await self._change_binding(group, self._link.bind)
            except BaseException:
                if self._router.discard_membership(group, channel):
                    pass  # never bound: nothing to undo on the broker
                raise
        else:
            pending = self._group_changes.get(group)
            if pending is not None:  # another group_add is still binding this group
                await asyncio.shield(pending)

    async def group_discard(self, group: str, channel: str) -> None:
        """Remove a channel from a group; no error if it was not a member."""
        self.require_valid_group_name(group)
        self._require_own_channel(channel, "group_discard")
        if self._router.discard_membership(group, channel):
            await self._change_binding(group, self._link.unbind)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        """Send a message to every member of a group, in every process. Never raises ``ChannelFull``."""
        self.require_valid_group_name(group)
        body = encode_message(message, self.config.max_message_size)
        accepted = await self._link.publish(self._groups_exchange, group.encode(), NO_PROPERTIES, body)
        if not accepted:
            self._full_group_log.warning(
                "group_send to %r: a member process's queue is at remote_capacity; "
                "its members miss the message",
                group,
            )

    async def _change_binding(self, group: str, change: Any) -> None:
        """Bind or unbind; later group calls for the same group wait for it."""
        future = asyncio.ensure_future(change(group))
        self._group_changes[group] = future
        try:
            await asyncio.shield(future)
        finally:
            if self._group_changes.get(group) is future:
                del self._group_changes[group]

    def _require_own_channel(self, channel: str, operation: str) -> None:
        self.require_valid_channel_name(channel)
        if not channel.startswith(self._channel_prefix):
            raise ValueError(
                f"{operation}: {channel!r} is not a channel of this process; "
                "groups take channels from this layer's new_channel()"
            )

    # Flush and close ----------------------------------------------------------------------------

    async def flush(self) -> None:
        """Empty this layer instance: buffered messages, its queue, its memberships and bindings.

        Other processes' queues and memberships are untouched: RabbitMQ has no global
        view of them, and each process flushes its own.
        """
        groups = self._router.flush()
        if self._link.is_closed:
            return
        await self._link.purge()
        self._router.flush()  # what RabbitMQ had already handed over before the purge
        await asyncio.gather(*(self._link.unbind(group) for group in groups))

    async def close(self) -> None:
        """Stop consuming and close the connection; ``receive()`` then raises ``StopConsumer``."""
        self._router.close(StopConsumer)
        await self._link.close()
