"""The broker link: the layer's operations for one event loop, on one queue.

A link has three connections, each kept up by a :class:`~.supervisor.ConnectionSupervisor`:

- the *consuming* connection declares the groups exchange and the link's exclusive
  queue, binds the groups that have local members, consumes and acknowledges
  (:mod:`.topology`, :mod:`.inbound`); it never publishes, so a broker resource alarm,
  which stops RabbitMQ reading from connections that publish, never stops delivery;
- the *publishing* connection carries ``send()`` and ``group_send()`` with publisher
  confirms. While the broker blocks it, publishes wait at most ``connection_wait``;
- the *roll call's* connection holds the link's place in ``flush()``'s roll call while the
  consuming connection hears ``flush()``; its short heartbeat is a lease (:mod:`.roll_call`).

Each connects on first need. When one drops, it is replaced in the background; a new
consuming connection re-declares the queue under the same name and re-binds every group
that still has local members; with ``reconnect_notice_type``, every local channel is then
told that messages may have been lost (:mod:`.notice`). Every method runs on the link's loop
(:mod:`..loops` carries calls from other loops here) and raises only the layer's errors.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from types import MappingProxyType
from typing import Any

from channels.exceptions import StopConsumer

from ..amqp.connection import AmqpConnection
from ..config import LayerConfig
from ..exceptions import (
    BrokerConnectionError,
    BrokerRefusedError,
    RequestNotEncodableError,
)
from ..names import is_normal_channel
from ..routing import EMPTY, LocalRouter
from ..stats import CONFIRM_BUCKETS, DROP_REASONS, ConfirmLatency, LinkStats, worst_state
from ..wire import LOCAL_PART_LENGTH, NO_PROPERTIES, QUEUE_PREFIX
from ..wire.codec import MessageCodec
from .control import Control
from .counters import LinkCounters, reported_state
from .errors import translated
from .inbound import Inbound
from .normal import NormalChannels
from .notice import ReconnectNotice
from .part import LinkPart
from .publisher import Publisher
from .roll_call import RollCall
from .supervisor import ConnectionSupervisor
from .topology import Topology, random_name

logger = logging.getLogger(__name__)


class LinkState(enum.Enum):
    """Where a link is in its life. What its connections are doing at a moment (connecting, up,
    recovering) is its supervisors' (``stats()``: ``consume_state``, ``publish_state``)."""

    #: No call has needed its queue yet: the first that does sets it up (:meth:`BrokerLink.connect_first`).
    NEW = "new"
    #: Set up once: a later outage is waited out, and recovered from in the background.
    OPEN = "open"
    #: ``close()`` was called.
    CLOSED = "closed"
    #: Its event loop was closed: its sockets were closed from another loop.
    ABANDONED = "abandoned"


class BrokerLink:
    """One event loop's queue, consumer, publisher, inboxes and group bindings."""

    def __init__(self, config: LayerConfig, loop: asyncio.AbstractEventLoop, codec: MessageCodec) -> None:
        self.config = config
        self.loop = loop
        #: The queue of this link; every channel it receives on has it just before the ``!``.
        self.queue_name = queue_name = f"{QUEUE_PREFIX}{random_name(12)}"
        self.router = router = LocalRouter(
            capacity=config.local_capacity,
            expiry=config.expiry,
            group_expiry=config.group_expiry,
            channel_capacity=config.capacity_of if config.channel_capacity else config.capacity,
            decode=codec.decode_body,
        )
        #: This link's place in flush()'s roll call, on a connection of its own (see :mod:`.roll_call`).
        self.roll_call = RollCall(config, queue_name=queue_name)
        self.topology = Topology(
            config,
            loop,
            queue_name=queue_name,
            router=router,
            consuming_connection=lambda: self.consuming.connection,
            publishing_connection=lambda: self.publishing.connected(),
            seal=codec.seal,
            roll_call=self.roll_call,
            expect_delivery=lambda: self.inbound.expect_delivery(),
        )
        dropped: Counter[str] = Counter()
        self.normal = NormalChannels(
            config,
            loop,
            router=router,
            codec=codec,
            consuming_connection=lambda: self.consuming.connection,
            publishing_connection=lambda: self.publishing.connected(),
            dropped=dropped,
        )
        #: Group calls for other links' channels, flush() for every link, and theirs for ours.
        self.control = Control(config, loop, self, codec)
        self.inbound = Inbound(
            config,
            loop,
            queue_name=queue_name,
            router=router,
            codec=codec,
            control=self.control,
            consuming_connection=lambda: self.consuming.connection or self.topology.setting_up,
            on_group_emptied=self.topology.sync_binding_in_background,
            on_normal_delivery=self.normal.on_delivery,
            dropped=dropped,
        )
        self.consuming = ConnectionSupervisor(
            config,
            role="consume",
            connection_name=f"channels_rabbitmq {queue_name}",
            set_up=self._set_up_consuming,
            on_delivery=self.inbound.on_delivery,
            on_deliveries_done=self.inbound.ack,
            on_up=self._on_consuming_up,
            on_down=self._on_consuming_down,
        )
        #: What ``layer.stats()`` reports of this link (see :mod:`.counters`).
        self.counters = LinkCounters()
        self.publisher = Publisher(
            config,
            loop,
            queue_name=queue_name,
            counters=self.counters,
            set_up=self.topology.set_up_publishing,
            on_up=lambda connection: self._connection_back("publish", connection),
            on_down=lambda error: self._connection_down("publish", error),
        )
        #: The publishing connection's supervisor.
        self.publishing = self.publisher.supervisor
        self.loop_watcher: Any = None  # see loops.Links._close_with_loop
        #: Per channel, the last receive() carried here from another loop (they take turns).
        self.bridged_receives: dict[str, asyncio.Future[None]] = {}
        self._channel_prefix = queue_name + "!"
        self.notice = ReconnectNotice(
            config.reconnect_notice_type,
            queue_name=queue_name,
            router=router,
            loop=loop,
            window=config.expiry,
        )
        #: What the link drives through the lifecycle of :mod:`.part`, in this order.
        self._parts: tuple[LinkPart, ...] = (
            self.topology,
            self.inbound,
            self.normal,
            self.control,
            self.notice,
            self.roll_call,
            self.publisher,
        )
        self.state = LinkState.NEW

    @property
    def closed(self) -> bool:
        """close() was called, or the link's loop is closed: receive() raises StopConsumer, and
        the layer makes a new link for its next call on that loop."""
        return self.state is LinkState.CLOSED or self.state is LinkState.ABANDONED

    @property
    def dropped(self) -> Counter[str]:
        """Deliveries dropped, by reason (``stats.DROPPED_*``)."""
        return self.inbound.dropped

    def stats(self) -> LinkStats:
        """A snapshot of this link, as ``layer.stats()`` reports it; safe from any thread, no I/O."""
        counters = self.counters
        started = counters.outage_started
        current_outage = max(0.0, time.monotonic() - started) if started is not None else 0.0
        dropped = dict(self.inbound.dropped)  # one C call: never "changed size during iteration"
        consume_state = reported_state(self.consuming)
        publish_state = reported_state(self.publishing)
        states = [state for state in (consume_state, publish_state) if state != "idle"]
        return LinkStats(
            queue=self.queue_name,
            state="closed" if self.closed else worst_state(states),
            consume_state=consume_state,
            publish_state=publish_state,
            published=counters.published,
            confirmed=counters.confirmed,
            refused=counters.refused,
            publish_failed=counters.publish_failed,
            received=self.inbound.received,
            delivered=counters.delivered,
            dropped=MappingProxyType({reason: dropped.get(reason, 0) for reason in DROP_REASONS}),
            held=self.router.held,
            inboxes=self.router.inbox_count,
            groups=self.router.group_count,
            normal_channels=self.normal.channel_count,
            connections=self.consuming.connections + self.publishing.connections,
            reconnections=self.consuming.reconnections + self.publishing.reconnections,
            outage_seconds=counters.outage_seconds + current_outage,
            current_outage_seconds=current_outage,
            confirm_latency=ConfirmLatency(
                CONFIRM_BUCKETS, tuple(counters.confirm_counts), counters.confirm_seconds
            ),
        )

    @property
    def is_connected(self) -> bool:
        """The queue is consumed and no connection of the link is being recovered."""
        return self.consuming.is_up and not self.counters.in_outage

    # The layer's operations -----------------------------------------------------------------

    async def connect_first(self) -> None:
        """The first connection of a link that receives: both connections, so that a send
        made during a later outage waits for recovery like every other call; then the roll call,
        so that a flush() anywhere counts this link once its first call returns (its join is
        waited for at most ``connect_timeout``, and its failure costs only that: see
        :meth:`.roll_call.RollCall.joined`)."""
        await all_or_none(self.consuming.connected(), self.publishing.connected())
        await self.roll_call.joined()
        if self.state is LinkState.NEW:
            self.state = LinkState.OPEN

    async def _opened(self) -> None:
        """The first call that needs the queue sets the link up; later ones find it open (and
        wait out an outage in their own way)."""
        if self.state is LinkState.NEW:
            if self.consuming.ever_connected:  # by another call, still in its connect_first()
                self.state = LinkState.OPEN
            else:
                await self.connect_first()

    async def new_channel(self, start: str = "") -> str:
        """A new channel name: ``start`` (a checked prefix, see :func:`..wire.channel_name_start`),
        the queue, ``!``, random characters."""
        await self._opened()  # the queue must exist before anyone sends to the channel
        channel = f"{start}{self._channel_prefix}{random_name(LOCAL_PART_LENGTH)}"
        self.notice.channel_made(channel)
        return channel

    async def receive(self, channel: str, *, counted: bool = True) -> dict[str, Any]:
        """The channel's next message; ``counted``: as delivered (else the caller counts it)."""
        if is_normal_channel(channel):
            await self._opened()
            message = await self.normal.receive(channel)
            self.counters.delivered += counted
            return message
        router = self.router
        if self.notice.window_open:
            self.notice.before_receive(channel)
        message = router.take(channel, time.monotonic())
        if message is not EMPTY:
            self.counters.delivered += counted
            return message
        if self.closed:
            raise StopConsumer()
        if self.state is LinkState.NEW:
            await self._opened()  # from then on, outages are waited out below
        # During an outage, keep waiting: the reconnection re-declares the queue.
        waiter: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        router.add_waiter(channel, waiter)
        try:
            message = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                router.put_back(channel, waiter.result(), time.monotonic())
            else:
                router.remove_waiter(channel, waiter)
            raise
        self.counters.delivered += counted
        return message

    async def receive_normal_unsettled(self, channel: str) -> tuple[dict[str, Any], Callable[[bool], None]]:
        """A normal channel's next message for a receive() on another loop, and how to settle it
        once that receive() took it (True) or gave it up (False: back to the queue)."""
        await self._opened()
        message, settle = await self.normal.receive_unsettled(channel)

        def settled(taken: bool) -> None:
            settle(taken)
            self.counters.delivered += taken

        return message, settled

    async def group_add(self, group: str, channel: str) -> None:
        """Add a membership and bind; returns once bound (or once an outage will bind it)."""
        if is_normal_channel(channel):
            await self.normal.group_add(group, channel)
            return
        await self._opened()
        self.router.add_membership(group, channel, time.monotonic())
        try:
            await self.topology.binding_settled(group)
        except (BrokerRefusedError, RequestNotEncodableError):
            if self.router.discard_membership(group, channel):
                self.topology.sync_binding_in_background(group)
            raise
        except BrokerConnectionError:
            pass  # lost mid-way: the reconnection binds every group that has members

    async def group_discard(self, group: str, channel: str) -> None:
        if is_normal_channel(channel):
            await self.normal.group_discard(group, channel)
            return
        if self.router.discard_membership(group, channel):
            try:
                await self.topology.binding_settled(group)
            except BrokerConnectionError:
                pass  # lost mid-way: the binding went with the queue

    async def flush(self) -> None:
        """Drop every buffered message and membership, unbind, purge the queue."""
        groups = set(self.router.flush()) | self.topology.bound
        # Unbinding starts now, before any await: whatever happens to this call, no binding
        # is left without a member.
        unbinding = [self.topology.sync_binding(group) for group in groups]
        connection = self.consuming.connection
        if not self.closed and connection is not None and connection.is_open:
            await self.topology.purge(connection)
            self.router.flush()  # and what was on its way
        for outcome in await asyncio.gather(
            *(asyncio.shield(task) for task in unbinding), return_exceptions=True
        ):
            if isinstance(outcome, BaseException) and not isinstance(outcome, BrokerConnectionError):
                raise outcome  # a lost connection took the bindings with the queue
        if not self.closed:
            await self.normal.flush()

    async def send_to_normal(self, name: str, body: bytes) -> bool:
        """Publish to a normal channel's queue, declared first; True once the broker confirmed it."""
        with translated(self.config.description):
            queue = await self.normal.declared(name)
        return await self.publish(b"", queue.encode(), NO_PROPERTIES, body)

    async def control_ready(self) -> AmqpConnection:
        """The publishing connection, once it may publish and the queue is consumed (control
        messages are answered there). Waits at most ``connection_wait`` (first: ``connect_timeout``)."""
        await self._opened()
        _consuming, publisher = await all_or_none(self.consuming.connected(), self.publishable())
        assert isinstance(publisher, AmqpConnection)
        return publisher

    async def count_links(self) -> int:
        """The roll call: how many links, in every process, hear a flush()."""
        return await self.topology.count_links(await self.consuming.connected())

    async def publish(self, exchange: bytes, routing_key: bytes, properties: bytes, body: bytes) -> bool:
        """Publish and wait for the broker's confirm: True when accepted, False when refused."""
        return await self.publisher.publish(exchange, routing_key, properties, body)

    async def publishable(self) -> AmqpConnection:
        """The publishing connection once it may publish, at most ``connection_wait``."""
        return await self.publisher.publishable()

    async def close(self) -> None:
        """Stop consuming and close both connections; waiting receives raise StopConsumer. Idempotent."""
        self.state = LinkState.CLOSED
        self.router.close(StopConsumer)
        for part in self._parts:
            part.close()
        await asyncio.gather(self.consuming.close(), self.publishing.close(), self.roll_call.left())

    def abandon(self) -> None:
        """This link's event loop is closed: nothing of it can run any more. Mark it closed and
        close its sockets from here, so that RabbitMQ drops its queue and its roll-call consumer
        (a flush() elsewhere then stops counting it)."""
        self.state = LinkState.ABANDONED
        for supervisor in (self.consuming, self.publishing):
            if supervisor.connection is not None:
                supervisor.connection.abandon()
        self.roll_call.abandon()

    # Connections coming and going -------------------------------------------------------------

    async def _set_up_consuming(self, connection: AmqpConnection) -> None:
        arrival = self.inbound.new_connection()
        try:
            await self.topology.set_up_consuming(connection, arrival)
        finally:
            self.inbound.set_up_ended()

    def _on_consuming_up(self, connection: AmqpConnection) -> None:
        self._connection_back("consume", connection)
        for part in self._parts:
            part.consuming_up(connection)

    def _on_consuming_down(self, error: BrokerConnectionError) -> None:
        for part in self._parts:
            part.consuming_down()
        self._connection_down("consume", error)

    def _connection_down(self, role: str, error: BrokerConnectionError) -> None:
        """One warning per outage, however many of the link's connections it took."""
        if self.counters.connection_lost(role):
            logger.warning("%s; reconnecting", error)

    def _connection_back(self, role: str, connection: AmqpConnection) -> None:
        """One info line once every connection the outage took is back."""
        lasted = self.counters.connection_back(role)
        if lasted is not None:
            logger.info("reconnected to %s after %.1fs", connection.description, lasted)


async def all_or_none(*awaitables: Awaitable[Any]) -> list[Any]:
    """``asyncio.gather``, except that when one fails the others are cancelled and their outcomes
    retrieved: nothing is left running, or logged as never retrieved, after the caller has its error."""
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
