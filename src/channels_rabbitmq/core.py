"""``RabbitmqChannelLayer``: the Django Channels layer API on RabbitMQ.

Each server process owns one exclusive RabbitMQ queue. A channel name is
``<prefix><queue>!<local part>``: ``send()`` publishes to that queue (:func:`.wire.queue_of`)
and the owning process routes the message to the channel's inbox. A group is a routing
key on one direct exchange: a queue is bound when the group's first local member joins
and unbound when the last leaves; ``group_send()`` is one publish that each process fans
out to its local members.

The methods below read like the Channels spec. Beneath them: :mod:`.loops` (which link
serves which event loop, and calls between loops), :mod:`.link` (a queue and its
connections), :mod:`.routing` (inboxes and groups), :mod:`.wire.codec` (message bodies) and
:mod:`.wire` (where a message goes).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import weakref
from typing import Any

from channels.exceptions import ChannelFull, StopConsumer
from channels.layers import BaseChannelLayer

from .config import DEFAULT_HOST, LayerConfig
from .link import BrokerLink
from .logs import RateLimitedLogger
from .loops import Links
from .names import is_normal_channel, require_valid_channel_name, require_valid_group_name
from .stats import LayerStats
from .wire import NO_PROPERTIES, channel_name_start, channel_properties, queue_of
from .wire.codec import MessageCodec

logger = logging.getLogger(__name__)

# Checked names remembered, per layer; forgotten all at once when full. Above the 50,000 channels a process
# may serve (the scaling curves): a smaller cache was cleared again and again, and every call re-checked.
NAME_CACHE_SIZE = 100_000
_UNCHECKED = (b"", b"")  # a send target not yet looked at (None is a normal channel's)


class RabbitmqChannelLayer(BaseChannelLayer):  # type: ignore[misc]  # channels ships no types
    """A channel layer that routes through RabbitMQ. See docs/configuration.md for every CONFIG key."""

    extensions = ["groups", "flush"]

    def __init__(self, host: str | list[str] = DEFAULT_HOST, **config: Any) -> None:
        """Check the CONFIG (``LayerConfig.build``: unknown keys refused, defaults applied); no I/O."""
        self.config = LayerConfig.build(host=host, **config)
        self._codec = MessageCodec(self.config)
        super().__init__(expiry=self.config.expiry, capacity=self.config.capacity)
        self.channel_capacity = list(self.config.channel_capacity)  # Channels' compiled form
        self.group_expiry = self.config.group_expiry
        self._groups_exchange = self.config.groups_exchange.encode()
        self._full_group_log = RateLimitedLogger(logger)
        self._links = Links(self.config, self._codec)
        # Names already checked (the check is pure): the process channels received on, with the
        # link that receives each (looked at again once it is closed); send targets.
        self._receivers: dict[str, BrokerLink] = {}
        self._send_targets: dict[str, tuple[bytes, bytes] | None] = {}  # None: a normal channel
        # A forked child forgets the parent's links at once, so that even the sends' fast path,
        # which checks nothing, never writes to the parent's sockets.
        os.register_at_fork(after_in_child=functools.partial(_forget_links_in_child, weakref.ref(self)))

    def __repr__(self) -> str:
        return f"<RabbitmqChannelLayer {self.config.description}>"

    # Names --------------------------------------------------------------------------------------

    def require_valid_channel_name(self, name: object, receive: bool = False) -> bool:
        """Channels' rule, no final newline, and what RabbitMQ can carry: at most 255 bytes in UTF-8
        (a normal channel's, after ``normal_channel_prefix``). Raises ``TypeError`` (see :mod:`.names`)."""
        require_valid_channel_name(name, normal_prefix=self.config.normal_channel_prefix, receive=receive)
        return True

    def require_valid_group_name(self, name: object) -> bool:
        """Channels' rule, no final newline, at most 255 bytes in UTF-8. Raises ``TypeError``."""
        require_valid_group_name(name)
        return True

    # Channels -----------------------------------------------------------------------------------

    async def new_channel(self, prefix: str = "specific.") -> str:
        """Return a new channel name that this process receives on.

        The name is ``<prefix><queue>!<random>``: ``prefix``, a ``.`` unless it ends with one,
        this process's queue, so that any process can send to it. A prefix that would make
        an invalid name raises ``ValueError`` (``TypeError`` if it is not a string). The first
        call on a loop connects, so that messages sent to the channel have a queue to go to.
        """
        start = channel_name_start(prefix)
        link = await self._links.for_this_loop(receiving=True)
        return await self._links.call(link, link.new_channel, start)

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """Send a message to a channel; returns once RabbitMQ has accepted it.

        A process channel (``<queue>!<name>``) goes to the process that made it. Raises
        ``ChannelFull`` when that process is overwhelmed: it holds ``local_capacity``
        messages and ``remote_capacity`` more wait in RabbitMQ. A channel that holds its own
        ``capacity`` drops what comes next instead (nobody is blocked). A normal channel
        (no ``!``) goes to its shared queue, read by whichever process receives first;
        ``ChannelFull`` when that queue holds its ``capacity``. Raises ``BrokerBlockedError``
        when RabbitMQ blocks publishing for ``connection_wait``.
        """
        target = self._send_targets.get(channel, _UNCHECKED)
        if target is _UNCHECKED:
            target = self._send_target(channel)
        body = self._codec.encode(message, channel)
        if target is None:
            any_link = await self._links.for_this_loop()
            if not await self._links.call(any_link, any_link.send_to_normal, channel, body):
                raise ChannelFull(
                    f"RabbitMQ refused the message (basic.nack): normal channel {channel!r} is full"
                )
            return
        routing_key, properties = target
        link = self._links.of_loop(asyncio.get_running_loop())
        if link is not None:  # the fast path: this loop's own link, straight to its publisher
            accepted = await link.publisher.publish(b"", routing_key, properties, body)
        else:
            link = await self._links.for_this_loop()
            publish = link.publisher.publish
            accepted = await self._links.call(link, publish, b"", routing_key, properties, body)
        if not accepted:
            raise ChannelFull(
                f"RabbitMQ refused the message (basic.nack): queue {routing_key.decode()} is at "
                "remote_capacity, or, rarely, its node is failing"
            )

    def _send_target(self, channel: str) -> tuple[bytes, bytes] | None:
        """Check a channel name once; remember where its messages go: (routing key, properties)
        for a process channel, None for a normal channel."""
        self.require_valid_channel_name(channel)
        if len(self._send_targets) >= NAME_CACHE_SIZE:
            self._send_targets.clear()
        if is_normal_channel(channel):
            self._send_targets[channel] = None  # a normal channel
            return None
        target = self._send_targets[channel] = (queue_of(channel).encode(), channel_properties(channel))
        return target

    async def receive(self, channel: str) -> dict[str, Any]:
        """Return the next message for a channel, waiting for one if needed.

        A process channel is received by the process that made it. A normal channel (no
        ``!``) is received by any process: each message goes to one ``receive()``, and a
        process takes a message off its queue only while a ``receive()`` waits for it. A
        cancelled ``receive()`` loses nothing. After ``close()``, or once the event loop that
        made the channel has ended, it raises ``StopConsumer``.
        """
        link = self._receivers.get(channel)
        if link is None or link.closed or self._links.closed:
            link = await self._receiver_of(channel)
        if link.loop is asyncio.get_running_loop():
            return await link.receive(channel)  # the fast path: no extra coroutine per message
        return await self._links.receive(link, channel)

    async def _receiver_of(self, channel: str) -> BrokerLink:
        """The link that receives ``channel`` (checked); a process channel's is remembered."""
        self.require_valid_channel_name(channel)
        if self._links.closed:
            raise StopConsumer()
        if is_normal_channel(channel):  # a normal channel: any process may receive it, this loop's link does
            return await self._links.for_this_loop(receiving=True)
        link = self._links.owner(channel, "receive on")
        if len(self._receivers) >= NAME_CACHE_SIZE:
            self._receivers.clear()
        self._receivers[channel] = link
        return link

    # Groups ---------------------------------------------------------------------------------------

    async def group_add(self, group: str, channel: str) -> None:
        """Add a channel to a group (again: refreshes ``group_expiry``).

        A normal channel's queue is bound to the group, from any process. For another process's
        channel, that process does it: the call returns once it has
        bound, at once if it is gone, and raises ``BrokerTimeoutError`` if it does not answer
        within ``connect_timeout``.
        """
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        if is_normal_channel(channel):  # a normal channel: any process binds its queue
            any_link = await self._links.for_this_loop()
            await self._links.call(any_link, any_link.group_add, group, channel)
            return
        owner = self._links.local_owner(channel)
        if owner is not None:
            await self._links.call(owner, owner.group_add, group, channel)
        else:  # another process's channel: that process makes the call, and answers
            asking = await self._links.for_this_loop()
            await self._links.call(asking, asking.control.group_add, group, channel)

    async def group_discard(self, group: str, channel: str) -> None:
        """Remove a channel from a group; no error if it was not a member. Any process's channel,
        as for ``group_add()``."""
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        if is_normal_channel(channel):
            any_link = await self._links.for_this_loop()
            await self._links.call(any_link, any_link.group_discard, group, channel)
            return
        owner = self._links.local_owner(channel)
        if owner is not None:
            await self._links.call(owner, owner.group_discard, group, channel)
        else:
            asking = await self._links.for_this_loop()
            await self._links.call(asking, asking.control.group_discard, group, channel)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        """Send a message to every member of a group, in every process. Never raises ``ChannelFull``."""
        self.require_valid_group_name(group)
        body = self._codec.encode(message, group)
        link = self._links.of_loop(asyncio.get_running_loop())
        exchange = self._groups_exchange
        if link is not None:  # the fast path: this loop's own link, straight to its publisher
            accepted = await link.publisher.publish(exchange, group.encode(), NO_PROPERTIES, body)
        else:
            link = await self._links.for_this_loop()
            accepted = await self._links.call(
                link, link.publisher.publish, exchange, group.encode(), NO_PROPERTIES, body
            )
        if not accepted:
            self._full_group_log.warning(
                "group_send to %r: RabbitMQ refused it for a member process's queue (at remote_capacity, "
                "or its node failing); "
                "its members miss the message",
                group,
            )

    # What the layer is doing -------------------------------------------------------------------

    def stats(self) -> LayerStats:
        """A snapshot of what the layer has done and holds: messages published, confirmed,
        refused, delivered and dropped (by reason), memory held, groups, connection state,
        reconnections and outages, confirm latency. Summed over the layer's links (one per
        event loop); each link's own is in ``links``. Call it from any thread or loop: it reads
        counters kept in memory, does no I/O and never waits for a loop. See docs/operations/metrics.md.
        """
        return self._links.stats()

    # Flush and close ----------------------------------------------------------------------------

    async def flush(self) -> None:
        """Empty the layer in every process: buffered messages, queues, memberships and bindings.

        This layer's own queues first; then every other process's link flushes and answers,
        and the call returns once every link in the roll call has (within ``connect_timeout``).
        Only links whose event loop runs are in the roll call: links that go away meanwhile are
        not waited for, one whose loop stopped is dropped from it within about 3 s (at once in
        this process, where it is left as it is), and this layer's links whose event loop is
        closed are forgotten first. See docs/guarantees/across-processes.md.
        """
        if self._links.closed:
            return
        for link in self._links.all():
            await self._links.flush_if_running(link)
        link = await self._links.for_this_loop()
        await self._links.call(link, link.control.flush)

    async def close(self) -> None:
        """Close every connection and the I/O thread; ``receive()`` then raises ``StopConsumer``.

        Works from any loop or thread (through ``async_to_sync``); idempotent. Takes at
        most a few seconds per link, even with the broker gone or a link's loop stopped.
        """
        await self._links.close()


def _forget_links_in_child(layer_ref: weakref.ref[RabbitmqChannelLayer]) -> None:
    layer = layer_ref()
    if layer is not None:
        layer._receivers = {}
        layer._links.check_fork()
