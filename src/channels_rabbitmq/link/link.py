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
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from types import MappingProxyType
from typing import Any

from channels.exceptions import StopConsumer

from ..amqp.connection import AmqpConnection
from ..amqp.errors import AmqpError
from ..codec import MessageCodec
from ..config import LayerConfig
from ..exceptions import (
    BrokerBlockedError,
    BrokerConnectionError,
    BrokerRefusedError,
    BrokerTimeoutError,
    RequestNotEncodableError,
)
from ..names import is_normal_channel
from ..routing import EMPTY, LocalRouter
from ..stats import CONFIRM_BUCKETS, DROP_REASONS, ConfirmLatency, LinkStats, worst_state
from ..wire import LOCAL_PART_LENGTH, NO_PROPERTIES, QUEUE_PREFIX
from .channel_plan import PUBLISH_CHANNEL
from .control import Control
from .counters import LinkCounters, reported_state
from .errors import layer_error, translated
from .inbound import Inbound
from .normal import NormalChannels
from .notice import ReconnectNotice
from .roll_call import RollCall
from .supervisor import ConnectionSupervisor
from .topology import Topology, random_name

logger = logging.getLogger(__name__)


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
        self.inbound = Inbound(
            config,
            loop,
            queue_name=queue_name,
            router=router,
            codec=codec,
            consuming_connection=lambda: self.consuming.connection or self.topology.setting_up,
            on_group_emptied=self.topology.sync_binding_in_background,
            on_normal_delivery=self.normal.on_delivery,
            dropped=dropped,
        )
        #: Group calls for other links' channels, flush() for every link, and theirs for ours.
        self.control = self.inbound.control = Control(config, loop, self, codec)
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
        self.publishing = ConnectionSupervisor(
            config,
            role="publish",
            connection_name=f"channels_rabbitmq {queue_name} publishing",
            set_up=self._set_up_publishing,
            on_up=lambda connection: self._connection_back("publish", connection),
            on_down=lambda error: self._connection_down("publish", error),
            on_blocked=self._on_blocked,
        )
        #: What ``layer.stats()`` reports of this link (see :mod:`.counters`).
        self.counters = LinkCounters()
        self.loop_watcher: Any = None  # see loops.Links._close_with_loop
        #: Per channel, the last receive() carried here from another loop (they take turns).
        self.bridged_receives: dict[str, asyncio.Future[None]] = {}
        self._channel_prefix = queue_name + "!"
        self._outage: dict[str, float] = {}  # role -> when its connection was lost
        self._consumed_before = False  # a consuming connection was up: the next one is a new queue
        self.notice = ReconnectNotice(
            config.reconnect_notice_type,
            queue_name=queue_name,
            router=router,
            loop=loop,
            window=config.expiry,
        )
        self._blocked_timer: asyncio.TimerHandle | None = None
        self._receiving = False  # a receive() found the consuming connection made once
        # Publishes waiting for the connection to take them, and their turns: see _publish_when_possible.
        self._publishes_held = 0
        self._held_publishes = asyncio.Lock()
        #: close() was called: receive() raises StopConsumer, the layer looks for the link again.
        self.closed = False

    @property
    def dropped(self) -> Counter[str]:
        """Deliveries dropped, by reason (``inbound.DROPPED_*``)."""
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
        return self.consuming.is_up and not self._outage

    # The layer's operations -----------------------------------------------------------------

    async def connect_first(self) -> None:
        """The first connection of a link that receives: both connections, so that a send
        made during a later outage waits for recovery like every other call."""
        await all_or_none(self.consuming.connected(), self.publishing.connected())

    async def new_channel(self, start: str = "") -> str:
        """A new channel name: ``start`` (a checked prefix, see :func:`..wire.channel_name_start`),
        the queue, ``!``, random characters."""
        if not self.consuming.ever_connected:
            await self.connect_first()  # the queue must exist before anyone sends to the channel
        channel = f"{start}{self._channel_prefix}{random_name(LOCAL_PART_LENGTH)}"
        self.notice.channel_made(channel)
        return channel

    async def receive(self, channel: str, *, counted: bool = True) -> dict[str, Any]:
        """The channel's next message; ``counted``: as delivered (else the caller counts it)."""
        if is_normal_channel(channel):
            if not self.consuming.ever_connected:
                await self.connect_first()
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
        if not self._receiving:
            if not self.consuming.ever_connected:
                await self.connect_first()
            self._receiving = True  # connected once: from now on, outages are waited out below
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
        if not self.consuming.ever_connected:
            await self.connect_first()
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
        if not self.consuming.ever_connected:
            await self.connect_first()
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
        if not self.consuming.ever_connected:
            await self.connect_first()
        _consuming, publisher = await all_or_none(self.consuming.connected(), self.publishable())
        assert isinstance(publisher, AmqpConnection)
        return publisher

    async def count_links(self) -> int:
        """The roll call: how many links, in every process, hear a flush()."""
        return await self.topology.count_links(await self.consuming.connected())

    async def publish(self, exchange: bytes, routing_key: bytes, properties: bytes, body: bytes) -> bool:
        """Publish and wait for the broker's confirm: True when accepted, False when refused."""
        counters = self.counters
        counters.published += 1
        started = time.monotonic()
        try:
            connection = self.publishing.connection
            if connection is not None and connection.can_publish and not self._publishes_held:
                accepted = await connection.publish(PUBLISH_CHANNEL, exchange, routing_key, properties, body)
            else:
                accepted = await self._publish_when_possible(exchange, routing_key, properties, body)
        except AmqpError as error:
            counters.publish_failed += 1
            raise layer_error(error, self.config.description) from None
        except BaseException:  # no connection in time, or the caller was cancelled
            counters.publish_failed += 1
            raise
        counters.confirm(accepted, time.monotonic() - started)
        return accepted

    async def _publish_when_possible(
        self, exchange: bytes, routing_key: bytes, properties: bytes, body: bytes
    ) -> bool:
        """Publish once the connection may, in turn: publishes that had to wait are written in the
        order they were made, and no later one overtakes them meanwhile (one sender's messages to a
        channel stay in order across a connect, a block or a full write buffer). Each waits at most
        ``connection_wait`` from its call, its turn included: a hundred sends held by an alarm all
        fail after ``connection_wait``, not one after the other."""
        deadline = self.loop.time() + self.config.connection_wait
        self._publishes_held += 1
        try:
            try:  # asyncio.Lock wakes its waiters first come, first served
                await asyncio.wait_for(self._held_publishes.acquire(), max(0.0, deadline - self.loop.time()))
            except asyncio.TimeoutError:
                raise not_publishable(self.publishing.connection, self.config) from None
            try:
                connection = await wait_until_publishable(self.publishing, self.config, self.loop, deadline)
                confirmed = connection.publish(PUBLISH_CHANNEL, exchange, routing_key, properties, body)
            finally:
                self._held_publishes.release()
        finally:
            self._publishes_held -= 1
        return await confirmed

    async def publishable(self) -> AmqpConnection:
        """The publishing connection once it may publish: connect, or wait out a block or a full
        write buffer, at most ``connection_wait``."""
        return await wait_until_publishable(self.publishing, self.config, self.loop)

    async def close(self) -> None:
        """Stop consuming and close both connections; waiting receives raise StopConsumer. Idempotent."""
        self.closed = True
        self.control.close()
        self.router.close(StopConsumer)
        self.inbound.stop_housekeeping()
        self.notice.close_window()
        if self._blocked_timer is not None:
            self._blocked_timer.cancel()
        self.topology.close()
        self.normal.close()
        await asyncio.gather(self.consuming.close(), self.publishing.close(), self.roll_call.close())

    def abandon(self) -> None:
        """This link's event loop is closed: nothing of it can run any more. Mark it closed and
        close its sockets from here, so that RabbitMQ drops its queue and its roll-call consumer
        (a flush() elsewhere then stops counting it)."""
        self.closed = True
        for supervisor in (self.consuming, self.publishing):
            if supervisor.connection is not None:
                supervisor.connection.abandon()
        self.roll_call.abandon()

    # Connections coming and going -------------------------------------------------------------

    async def _set_up_publishing(self, connection: AmqpConnection) -> None:
        await self.topology.set_up_publishing(connection)

    async def _set_up_consuming(self, connection: AmqpConnection) -> None:
        self.inbound.new_connection()
        arrival = self.inbound.arrival = self.loop.create_future()
        try:
            await self.topology.set_up_consuming(connection, arrival)
        finally:
            self.inbound.arrival = None

    def _on_consuming_up(self, connection: AmqpConnection) -> None:
        self.topology.setting_up = None
        self.normal.resume()
        self.inbound.start_housekeeping()
        self.inbound.ack()  # what arrived while we were still setting up
        self._connection_back("consume", connection)
        if self._consumed_before:  # a new queue: the exclusive one went with the lost connection
            self.notice.queue_recovered()
        self._consumed_before = True

    def _on_consuming_down(self, error: BrokerConnectionError) -> None:
        self.topology.connection_lost()
        self.control.connection_lost()
        self.inbound.stop_housekeeping()
        self._connection_down("consume", error)

    def _connection_down(self, role: str, error: BrokerConnectionError) -> None:
        """One warning per outage, however many of the link's connections it took."""
        if not self._outage:
            logger.warning("%s; reconnecting", error)
            self.counters.outage_began()
        self._outage.setdefault(role, time.monotonic())

    def _connection_back(self, role: str, connection: AmqpConnection) -> None:
        """One info line once every connection the outage took is back."""
        lost_at = self._outage.pop(role, None)
        if lost_at is not None and not self._outage:
            lasted = self.counters.outage_ended()
            logger.info("reconnected to %s after %.1fs", connection.description, lasted)

    def _on_blocked(self, connection: AmqpConnection, reason: str | None) -> None:
        """The broker blocked (``reason``) or unblocked (None) the publishing connection."""
        if self._blocked_timer is not None:
            self._blocked_timer.cancel()
            self._blocked_timer = None
        if reason is None:
            logger.info("RabbitMQ unblocked publishing on %s", connection.description)
            return
        logger.warning(
            "RabbitMQ blocked publishing on %s (%s); receiving goes on, sends wait up to connection_wait=%gs",
            connection.description,
            reason,
            self.config.connection_wait,
        )
        # Publishes already written wait for their confirms no longer than new ones may wait.
        self._blocked_timer = self.loop.call_later(
            self.config.connection_wait,
            connection.fail_unconfirmed,
            BrokerBlockedError(
                f"RabbitMQ blocked publishing ({reason}) for connection_wait="
                f"{self.config.connection_wait:g}s before confirming the message: "
                "it may or may not be delivered once the alarm clears",
                reason=reason,
                url=self.config.description,
            ),
        )


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


async def wait_until_publishable(
    publishing: ConnectionSupervisor,
    config: LayerConfig,
    loop: asyncio.AbstractEventLoop,
    deadline: float | None = None,
) -> AmqpConnection:
    """The publishing connection once it may publish: connect, or wait out a block or a full
    write buffer, until ``deadline`` (the loop's clock; default: ``connection_wait`` from now)."""
    if deadline is None:
        deadline = loop.time() + config.connection_wait
    connection = await publishing.connected()
    while not connection.can_publish:
        if not connection.is_open:
            connection = await publishing.connected()
            continue
        remaining = deadline - loop.time()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            await asyncio.wait_for(connection.wait_until_publishable(), remaining)
        except asyncio.TimeoutError:
            raise not_publishable(connection, config) from None
    return connection


def not_publishable(connection: AmqpConnection | None, config: LayerConfig) -> BrokerConnectionError:
    """The error of a publish that waited ``connection_wait`` for ``connection`` in vain."""
    wait = config.connection_wait
    reason = connection.blocked_reason if connection is not None else None
    if reason is not None and connection is not None:
        return BrokerBlockedError(
            f"RabbitMQ has blocked publishing on {connection.description} ({reason}) "
            f"for connection_wait={wait:g}s: the message was not sent",
            reason=reason,
            url=config.description,
        )
    where = connection.description if connection is not None else config.description
    return BrokerTimeoutError(
        f"{where} read none of our writes for connection_wait={wait:g}s: the message was not sent",
        operation="publish",
        timeout=wait,
        url=config.description,
    )
