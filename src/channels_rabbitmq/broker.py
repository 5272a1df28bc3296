"""The broker link: one event loop's queue, its consumer, its publisher and its inboxes.

A link has two connections, each kept up by a :class:`~.supervisor.ConnectionSupervisor`:

- the *consuming* connection declares the groups exchange and the link's exclusive
  queue, binds the groups that have local members, consumes, and acknowledges; it never
  publishes, so a broker resource alarm, which stops RabbitMQ reading from connections
  that publish, never stops delivery;
- the *publishing* connection carries ``send()`` and ``group_send()`` with publisher
  confirms. While the broker blocks it, publishes wait at most ``connection_wait``.

Each connects on first need. When one drops, it is replaced in the background; a new
consuming connection re-declares the queue under the same name and re-binds every group
that still has local members.

AMQP channels on each connection: 1 publishes (confirm mode), 2 consumes, 3 runs
declarations and bindings, so a refused request never disturbs publishing or consuming.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import string
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
from channels.exceptions import StopConsumer
from pamqp import commands

from .amqp.connection import AmqpConnection
from .amqp.protocol import Delivery, UndecodableDelivery
from .config import LayerConfig
from .connector import describe_target, distinct_ips, open_connection
from .encryption import BodyCipher
from .exceptions import (
    BrokerBlockedError,
    BrokerConnectionError,
    BrokerRefusedError,
    BrokerTimeoutError,
    ChannelLayerClosedError,
)
from .logs import RateLimitedLogger
from .routing import EMPTY, LocalRouter
from .supervisor import ConnectionSupervisor
from .wire import CHANNEL_HEADER, MalformedMessage, channel_properties, decode_message

__all__ = ["BrokerLink", "describe_target", "distinct_ips", "open_connection", "random_name"]

logger = logging.getLogger(__name__)

PUBLISH_CHANNEL = 1
CONSUME_CHANNEL = 2
CONTROL_CHANNEL = 3

_ALPHABET = string.ascii_letters + string.digits

RESOURCE_LOCKED = 405
PRECONDITION_FAILED = 406
PROBE_CHECK_INTERVAL = 0.05  # how often a waiting probe looks for an alarm or a lost connection
#: How often a wait that spans two event loops checks that the other loop still runs.
LOOP_CHECK_INTERVAL = 0.5
PROBE_BODY = msgpack.packb({"type": "channels_rabbitmq.probe"})

# Why a delivery was dropped (the keys of BrokerLink.dropped).
DROPPED_CHANNEL_FULL = "channel_full"  # its channel already held its capacity of unread messages
DROPPED_EXPIRED = "expired"  # nobody read it within expiry
DROPPED_TOO_LARGE = "too_large"  # a body over max_message_size, skipped unread
DROPPED_UNDECODABLE = "undecodable"  # unreadable, not for a channel of ours, or not opened


class BrokerLink:
    """One event loop's queue, consumer, publisher, inboxes and group bindings.

    Every method runs on ``loop``; :mod:`.core` sends calls from other loops here.
    """

    def __init__(self, config: LayerConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        #: The queue of this link; every channel it receives on starts with it and ``!``.
        self.queue_name = f"channels.{random_name(12)}"
        self.router = router = LocalRouter(
            capacity=config.local_capacity,
            expiry=config.expiry,
            group_expiry=config.group_expiry,
            channel_capacity=config.capacity_of if config.channel_capacity else config.capacity,
        )
        router.on_room = self._ack_deliveries
        router.on_channel_full = self._on_channel_full
        #: Deliveries dropped, by reason (``DROPPED_*``).
        self.dropped: Counter[str] = Counter()
        self.consuming = ConnectionSupervisor(
            config,
            role="consume",
            connection_name=f"channels_rabbitmq {self.queue_name}",
            set_up=self._set_up_consuming,
            on_delivery=self._on_delivery,
            on_deliveries_done=self._ack_deliveries,
            on_up=self._on_consuming_up,
            on_down=self._on_consuming_down,
        )
        self.publishing = ConnectionSupervisor(
            config,
            role="publish",
            connection_name=f"channels_rabbitmq {self.queue_name} publishing",
            set_up=self._set_up_publishing,
            on_up=lambda connection: self._connection_back("publish", connection),
            on_down=lambda error: self._connection_down("publish", error),
            on_blocked=self._on_blocked,
        )
        self._outage: dict[str, float] = {}  # role -> when its connection was lost
        self._bound: set[str] = set()  # groups bound on the current consuming connection
        self._syncing: dict[str, asyncio.Task[None]] = {}  # see _sync_binding()
        self._bridged: dict[str, asyncio.Future[None]] = {}  # see receive_for()
        self._probe: tuple[str, asyncio.Future[None]] | None = None
        # A consuming connection past its queue declaration, not yet installed: bindings go there.
        self._setting_up: AmqpConnection | None = None
        self._cipher = BodyCipher(config.encryption_keys) if config.encryption_keys else None
        self.loop_watcher: Any = None  # see core.RabbitmqChannelLayer._close_with_loop
        self._housekeeping: asyncio.TimerHandle | None = None
        self._blocked_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._groups_exchange = config.groups_exchange
        self._channel_prefix = self.queue_name + "!"
        self._probe_prefix = self._channel_prefix + "probe."  # never a channel's: those have no dot
        self._last_delivery_tag = 0
        self._acked_delivery_tag = 0
        self._dropped_log = RateLimitedLogger(logger)
        self._expired_log = RateLimitedLogger(logger)
        self._full_log = RateLimitedLogger(logger)

    # Setting connections up -----------------------------------------------------------------

    async def _declare_groups_exchange(self, connection: AmqpConnection) -> None:
        await connection.open_channel(CONTROL_CHANNEL, [])
        try:
            await connection.call(
                CONTROL_CHANNEL,
                commands.Exchange.Declare(exchange=self._groups_exchange, exchange_type="direct"),
            )
        except BrokerRefusedError as error:
            if error.reply_code != PRECONDITION_FAILED:
                raise
            # Declared elsewhere with other flags (durable, say): use it as it is.
            await connection.call(
                CONTROL_CHANNEL, commands.Exchange.Declare(exchange=self._groups_exchange, passive=True)
            )

    async def _set_up_publishing(self, connection: AmqpConnection) -> None:
        """The exchange (a group_send() before any consumer declared it must not fail), confirms."""
        await self._declare_groups_exchange(connection)
        await connection.open_channel(PUBLISH_CHANNEL, [commands.Confirm.Select()], essential=True)

    async def _set_up_consuming(self, connection: AmqpConnection) -> None:
        """Declare the exchange and queue, bind the groups with members, start consuming."""
        config = self.config
        self._last_delivery_tag = self._acked_delivery_tag = 0
        try:
            await self._declare_groups_exchange(connection)
            arguments: dict[str, Any] = {
                "x-max-length": config.remote_capacity,
                "x-overflow": "reject-publish",
                "x-message-ttl": int(config.expiry * 1000),
            }
            declare = commands.Queue.Declare(queue=self.queue_name, exclusive=True, arguments=arguments)
            for attempt in range(50):
                try:
                    await connection.call(CONTROL_CHANNEL, declare)
                    break
                except BrokerRefusedError as error:
                    # The exclusive queue of our previous connection is still being deleted.
                    if error.reply_code != RESOURCE_LOCKED or attempt == 49:
                        raise
                    await asyncio.sleep(0.1)
            # From here on, group calls bind and unbind on this connection themselves, so the
            # groups bound below plus theirs are every group with members.
            self._setting_up = connection
            self._bound = set()
            binds = [asyncio.shield(self._sync_binding(group)) for group in list(self.router.groups)]
            for outcome in await asyncio.gather(*binds, return_exceptions=True):
                # A refused bind already dropped its group's members (and said so); anything
                # else means this connection cannot be set up.
                if isinstance(outcome, BaseException) and not isinstance(outcome, BrokerRefusedError):
                    raise outcome
            await connection.open_channel(
                CONSUME_CHANNEL,
                [
                    commands.Basic.Qos(prefetch_count=config.prefetch_count),
                    commands.Basic.Consume(queue=self.queue_name, consumer_tag="channels", exclusive=True),
                ],
                essential=True,
            )
            await self._probe_on(connection)
        except BaseException:
            if self._setting_up is connection:
                self._setting_up = None
            raise
        finally:
            self._probe = None

    async def _probe_on(self, connection: AmqpConnection) -> None:
        """Never "open but deaf": a message to ourselves must come back before we say we are up.

        The probe goes out on the publishing connection: the consuming one never publishes,
        so a resource alarm, which stops RabbitMQ reading from connections that publish,
        never stops its acknowledgements. While the broker blocks publishing, the probe
        cannot travel, and consuming starts without it.
        """
        try:
            publisher = await self.publishing.connected()
        except BrokerConnectionError:
            return  # the publishing side reports its own trouble; consuming works without it
        probe = f"{self._probe_prefix}{random_name(12)}"
        arrived: asyncio.Future[None] = self.loop.create_future()
        self._probe = (probe, arrived)
        if not publisher.can_publish or self.router.is_full:
            # Blocked (an alarm) or its buffer full: it would not come back now. With the
            # router full, deliveries wait for room: the probe could wait behind them.
            return
        try:
            confirm = publisher.publish(
                PUBLISH_CHANNEL,
                b"",
                self.queue_name.encode(),
                channel_properties(probe),
                self._cipher.seal(PROBE_BODY, probe) if self._cipher is not None else PROBE_BODY,
            )
        except BrokerConnectionError:
            raise BrokerConnectionError(
                f"the connection to {publisher.description} was lost while checking that we receive"
            ) from None
        confirm.add_done_callback(_retrieve)
        while not arrived.done():
            if not connection.is_open:
                raise BrokerConnectionError(
                    f"the connection to {connection.description} was lost while checking that it receives"
                )
            if publisher.blocked_reason is not None:
                return  # an alarm began: the probe waits in the broker, and is dropped on arrival
            confirmed = confirm.done() and not confirm.cancelled() and confirm.exception() is None
            if confirmed and not confirm.result():
                raise BrokerConnectionError(f"{connection.description} refused the probe message")
            await asyncio.wait((arrived,), timeout=PROBE_CHECK_INTERVAL)

    def _on_consuming_up(self, connection: AmqpConnection) -> None:
        self._setting_up = None
        self._schedule_housekeeping()
        self._ack_deliveries()  # what arrived while we were still setting up
        self._connection_back("consume", connection)

    def _on_consuming_down(self, error: BrokerConnectionError) -> None:
        self._bound.clear()  # the bindings went with the queue
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        self._connection_down("consume", error)

    def _connection_down(self, role: str, error: BrokerConnectionError) -> None:
        """One warning per outage, however many of the link's connections it took."""
        if not self._outage:
            logger.warning("%s; reconnecting", error)
        self._outage.setdefault(role, time.monotonic())

    def _connection_back(self, role: str, connection: AmqpConnection) -> None:
        lost_at = self._outage.pop(role, None)
        if lost_at is not None and not self._outage:
            logger.warning(
                "reconnected to %s after %.1fs", connection.description, time.monotonic() - lost_at
            )

    @property
    def is_connected(self) -> bool:
        """The queue is consumed and no connection of the link is being recovered."""
        return self.consuming.is_up and not self._outage

    def _on_blocked(self, connection: AmqpConnection, reason: str | None) -> None:
        """The broker blocked (``reason``) or unblocked (None) the publishing connection."""
        if self._blocked_timer is not None:
            self._blocked_timer.cancel()
            self._blocked_timer = None
        if reason is None:
            logger.warning("RabbitMQ unblocked publishing on %s", connection.description)
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
            ),
        )

    # Deliveries -----------------------------------------------------------------------------

    def _on_delivery(self, delivery: Delivery | UndecodableDelivery) -> None:
        self._last_delivery_tag = delivery.delivery_tag
        probe = self._probe
        if probe is not None and not probe[1].done():
            probe[1].set_result(None)  # any delivery proves the new connection receives
        if isinstance(delivery, UndecodableDelivery):
            self.dropped[DROPPED_TOO_LARGE if delivery.too_large else DROPPED_UNDECODABLE] += 1
            self._dropped_log.warning("dropped a message from the wire: %s", delivery.reason)
            return
        # Where it was sent: the group (routing key on the groups exchange) or the channel.
        to_group = delivery.exchange == self._groups_exchange
        destination: Any
        if to_group:
            destination = delivery.routing_key
        else:
            headers = delivery.headers
            destination = headers.get(CHANNEL_HEADER) if headers else None
            if type(destination) is not str or not destination.startswith(self._channel_prefix):
                self.dropped[DROPPED_UNDECODABLE] += 1
                self._dropped_log.warning(
                    "dropped a message from the wire: no %s header naming a channel of queue %s",
                    CHANNEL_HEADER,
                    self.queue_name,
                )
                return
        body = delivery.body
        try:
            if self._cipher is not None:
                body = self._cipher.open(body, destination, self.config.expiry)
            message = decode_message(body, self.config.max_message_size)
        except MalformedMessage as error:
            self.dropped[DROPPED_UNDECODABLE] += 1
            self._dropped_log.warning("dropped a message from the wire: %s", error)
            return
        now = time.monotonic()
        if to_group:
            self.router.deliver_to_group(destination, message, body, now)
            return
        if destination.startswith(self._probe_prefix):  # ours, or a late one from an alarm
            return
        self.router.deliver(destination, message, now)

    def _on_channel_full(self, channel: str, group: str | None) -> None:
        self.dropped[DROPPED_CHANNEL_FULL] += 1
        capacity = self.config.capacity_of(channel)
        if group is None:
            self._full_log.warning(
                "dropped a message for %s: the channel holds %d unread message(s), its capacity",
                channel,
                capacity,
            )
        else:
            self._full_log.warning(
                "dropped a message of group %r for member %s: the channel holds %d unread message(s), "
                "its capacity",
                group,
                channel,
                capacity,
            )

    def _ack_deliveries(self) -> None:
        """Acknowledge what arrived, unless the router is full (then RabbitMQ keeps the rest)."""
        tag = self._last_delivery_tag
        if tag > self._acked_delivery_tag and not self.router.is_full:
            connection = self.consuming.connection or self._setting_up
            if connection is not None:
                # RabbitMQ sends no more than prefetch_count unacknowledged messages: once
                # half of them await an ack, write it at once, or delivery stalls; below
                # that, it goes out with the iteration's other writes.
                unacked = tag - self._acked_delivery_tag
                connection.ack(CONSUME_CHANNEL, tag, now=unacked * 2 >= self.config.prefetch_count)
                self._acked_delivery_tag = tag

    def _schedule_housekeeping(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        interval = min(1.0, self.config.expiry / 4, self.config.group_expiry / 4)
        self._housekeeping = self.loop.call_later(interval, self._housekeep, interval)

    def _housekeep(self, interval: float) -> None:
        """Expire buffered messages and memberships; unbind groups that lost every member."""
        now = time.monotonic()
        dropped = self.router.expire_messages(now)
        if dropped:
            self.dropped[DROPPED_EXPIRED] += dropped
            self._expired_log.warning(
                "dropped %d message(s) nobody read within expiry=%gs", dropped, self.config.expiry
            )
        for group in self.router.expire_memberships(now):
            self._sync_binding(group).add_done_callback(_log_failure)
        if self.consuming.is_up and not self._closed:
            self._housekeeping = self.loop.call_later(interval, self._housekeep, interval)

    # The layer's operations, on this link's loop ------------------------------------------------

    async def connect_first(self) -> None:
        """The first connection of a link that receives: both connections, so that a send
        made during a later outage waits for recovery like every other call."""
        await asyncio.gather(self.consuming.connected(), self.publishing.connected())

    async def new_channel(self) -> str:
        if not self.consuming.ever_connected:
            await self.connect_first()  # the queue must exist before anyone sends to the channel
        return f"{self._channel_prefix}{random_name(12)}"

    async def receive(self, channel: str) -> dict[str, Any]:
        router = self.router
        message = router.take(channel, time.monotonic())
        if message is not EMPTY:
            return message
        if self._closed:
            raise StopConsumer()
        if not self.consuming.ever_connected:
            await self.connect_first()
        # During an outage, keep waiting: the reconnection re-declares the queue.
        waiter: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        router.add_waiter(channel, waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                router.put_back(channel, waiter.result(), time.monotonic())
            else:
                router.remove_waiter(channel, waiter)
            raise

    async def receive_for(
        self, channel: str, caller: asyncio.AbstractEventLoop, result: asyncio.Future[Any]
    ) -> None:
        """Receive here on behalf of a ``receive()`` running on another loop.

        ``result`` (on ``caller``) gets ``(message, handoff)``; the caller then says
        ``handoff.taken()``, or ``handoff.give_back()`` if it was cancelled, and the message
        goes back to the front of the inbox. If that receive() is gone, or its loop, the
        message goes back too. Such receives of one channel take their turns: the next one
        starts only once the previous message was taken or is back in the inbox, so a
        cancelled receive never lets a later message overtake an earlier one.
        """
        previous = self._bridged.get(channel)
        settled: asyncio.Future[None] = self.loop.create_future()
        self._bridged[channel] = settled

        def finish() -> None:
            if not settled.done():
                settled.set_result(None)
            if self._bridged.get(channel) is settled:
                del self._bridged[channel]

        try:
            if previous is not None:
                await asyncio.shield(previous)
            message = await self.receive(channel)
        except asyncio.CancelledError:
            # The caller gave up (its result is cancelled already), or this loop is shutting
            # down: then the caller must not wait for ever.
            _call_on(caller, _settle_exception, result, StopConsumer())
            if previous is not None and not previous.done():
                previous.add_done_callback(lambda _: finish())  # the next one still waits its turn
            else:
                finish()
            raise
        except BaseException as error:
            _call_on(caller, _settle_exception, result, error)
            finish()
            return

        def put_back_and_finish() -> None:
            if not settled.done() and not handoff.is_taken:
                self.router.put_back(channel, message, time.monotonic())
            finish()

        handoff = Handoff(self.loop, finish, put_back_and_finish)

        def settle() -> None:  # on the caller's loop
            if result.done():  # that receive() was cancelled meanwhile
                handoff.give_back()
            else:
                result.set_result((message, handoff))

        def watch_caller() -> None:  # a loop closed with our callback pending never runs it
            if settled.done():
                return
            if caller.is_closed() or not caller.is_running():
                put_back_and_finish()
            else:
                self.loop.call_later(LOOP_CHECK_INTERVAL, watch_caller)

        if _call_on(caller, settle):
            self.loop.call_later(LOOP_CHECK_INTERVAL, watch_caller)
        else:
            put_back_and_finish()

    async def group_add(self, group: str, channel: str) -> None:
        """Add a membership and bind; returns once bound (or once an outage will bind it)."""
        if not self.consuming.ever_connected:
            await self.connect_first()
        self.router.add_membership(group, channel, time.monotonic())
        try:
            await self._binding_settled(group)
        except BrokerRefusedError:
            if self.router.discard_membership(group, channel):
                self._sync_binding(group).add_done_callback(_log_failure)
            raise
        except BrokerConnectionError:
            pass  # lost mid-way: the reconnection binds every group that has members

    async def group_discard(self, group: str, channel: str) -> None:
        if self.router.discard_membership(group, channel):
            try:
                await self._binding_settled(group)
            except BrokerConnectionError:
                pass  # lost mid-way: the binding went with the queue

    async def _binding_settled(self, group: str) -> None:
        """Wait for the group's binding to match its membership; a cancelled wait leaves it going."""
        task = self._sync_binding(group)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                raise  # our caller was cancelled; the binding task goes on
            if self._closed:
                raise ChannelLayerClosedError("the channel layer was closed during the group call") from None
            # A connection's set-up that gave up took the task with it: an outage.
            raise BrokerConnectionError(f"the connection was lost while binding {group!r}") from None

    def _sync_binding(self, group: str) -> asyncio.Task[None]:
        """Make the queue's binding to ``group`` match whether the group has local members.

        One task per group at a time does every bind and unbind of that group, checking
        again after each one, so concurrent and cancelled group calls and flush() always
        leave a binding exactly when there is a member.
        """
        task = self._syncing.get(group)
        if task is None or task.done():
            task = self._syncing[group] = self.loop.create_task(self._reconcile_binding(group))
        return task

    async def _reconcile_binding(self, group: str) -> None:
        try:
            while True:
                connection = self._setting_up or self.consuming.connection
                if connection is None or not connection.is_open:
                    return  # no queue: the next connection binds every group with members
                wanted = self.router.has_members(group)
                if wanted == (group in self._bound):
                    return
                method: Any = (commands.Queue.Bind if wanted else commands.Queue.Unbind)(
                    queue=self.queue_name, exchange=self._groups_exchange, routing_key=group
                )
                try:
                    await self._request(connection, method, "bind" if wanted else "unbind")
                except BrokerConnectionError:
                    if (self._setting_up or self.consuming.connection) is connection:
                        raise
                    continue  # that connection is gone; the loop looks at the next one
                except BrokerRefusedError as error:
                    if wanted:  # a member without a binding would wait for messages that never come
                        dropped = self.router.discard_group(group)
                        logger.warning(
                            "RabbitMQ refused to bind group %r (%s %s): %d local member(s) left it",
                            group,
                            error.reply_code,
                            error.reply_text,
                            len(dropped),
                        )
                    raise
                if wanted:
                    self._bound.add(group)
                else:
                    self._bound.discard(group)
        finally:
            if self._syncing.get(group) is asyncio.current_task():
                del self._syncing[group]

    async def _request(
        self, connection: AmqpConnection, method: Any, operation: str, channel_id: int = CONTROL_CHANNEL
    ) -> Any:
        """One request; the connection is dropped if its channel makes no progress for ``connect_timeout``.

        Requests on a channel go one at a time: a request queued behind many others waits
        as long as the ones ahead of it are being answered.
        """
        limit = self.config.connect_timeout
        reply = connection.call(channel_id, method)
        reply.add_done_callback(_retrieve)  # seen even when nobody waits any more
        while True:
            done, _ = await asyncio.wait(
                (reply,), timeout=max(0.01, limit - connection.quiet_for(channel_id))
            )
            if done:
                return reply.result()
            if connection.quiet_for(channel_id) >= limit:
                # A connection that leaves a request unanswered this long is not usable: the
                # reconnection sets everything up again.
                connection.abort()
                raise BrokerTimeoutError(
                    f"{connection.description} did not answer {operation} within connect_timeout={limit:g}s",
                    operation=operation,
                    timeout=limit,
                )

    async def flush(self) -> None:
        """Drop every buffered message and membership, unbind, purge the queue."""
        groups = set(self.router.flush()) | self._bound
        # Unbinding starts now, before any await: whatever happens to this call, no binding
        # is left without a member.
        unbinding = [self._sync_binding(group) for group in groups]
        connection = self.consuming.connection
        if not self._closed and connection is not None and connection.is_open:
            await self._request(connection, commands.Queue.Purge(queue=self.queue_name), "purge")
            # Deliveries already on their way were not purged. A request on the consuming
            # channel is answered after them (one channel's frames keep their order): then
            # drop them too.
            qos = commands.Basic.Qos(prefetch_count=self.config.prefetch_count)
            await self._request(connection, qos, "flush", CONSUME_CHANNEL)
            self.router.flush()
        for outcome in await asyncio.gather(
            *(asyncio.shield(task) for task in unbinding), return_exceptions=True
        ):
            if isinstance(outcome, BaseException) and not isinstance(outcome, BrokerConnectionError):
                raise outcome  # a lost connection took the bindings with the queue

    # Publishing -----------------------------------------------------------------------------

    def publish(self, exchange: bytes, routing_key: bytes, properties: bytes, body: bytes) -> Awaitable[bool]:
        """Publish; await the result for the broker's confirm: True when accepted, False when refused."""
        connection = self.publishing.connection
        if connection is not None and connection.can_publish:
            return connection.publish(PUBLISH_CHANNEL, exchange, routing_key, properties, body)
        return self._publish_when_possible(exchange, routing_key, properties, body)

    async def _publish_when_possible(
        self, exchange: bytes, routing_key: bytes, properties: bytes, body: bytes
    ) -> bool:
        """Connect, or wait out a block or a full write buffer, at most ``connection_wait``."""
        wait = self.config.connection_wait
        deadline = self.loop.time() + wait
        connection = await self.publishing.connected()
        while not connection.can_publish:
            if not connection.is_open:
                connection = await self.publishing.connected()
                continue
            remaining = deadline - self.loop.time()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(connection.wait_until_publishable(), remaining)
            except asyncio.TimeoutError:
                reason = connection.blocked_reason
                if reason is not None:
                    raise BrokerBlockedError(
                        f"RabbitMQ has blocked publishing on {connection.description} ({reason}) "
                        f"for connection_wait={wait:g}s: the message was not sent",
                        reason=reason,
                    ) from None
                raise BrokerTimeoutError(
                    f"{connection.description} read none of our writes for connection_wait={wait:g}s: "
                    "the message was not sent",
                    operation="publish",
                    timeout=wait,
                ) from None
        return await connection.publish(PUBLISH_CHANNEL, exchange, routing_key, properties, body)

    # Closing --------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop consuming and close both connections; waiting receives raise StopConsumer. Idempotent."""
        self._closed = True
        self.router.close(StopConsumer)
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        if self._blocked_timer is not None:
            self._blocked_timer.cancel()
        for task in list(self._syncing.values()):
            task.cancel()
        await asyncio.gather(self.consuming.close(), self.publishing.close())


def random_name(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def _call_on(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> bool:
    """Run ``callback`` on ``loop`` from any thread; False when that loop is closed."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        return False
    return True


class Handoff:
    """What the receiving loop says about a message handed over from the channel's loop.

    ``is_taken`` is set at once, from the receiving thread, so that the channel's loop never
    puts back a message that was taken while its "taken" callback was still on its way.
    """

    __slots__ = ("_give_back", "_loop", "_taken", "is_taken")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, taken: Callable[[], None], give_back: Callable[[], None]
    ) -> None:
        self._loop = loop
        self._taken = taken
        self._give_back = give_back
        self.is_taken = False

    def taken(self) -> None:
        self.is_taken = True
        _call_on(self._loop, self._taken)

    def give_back(self) -> None:
        if not _call_on(self._loop, self._give_back):
            logger.warning("a message handed to a cancelled receive() was lost: its channel's loop is closed")


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark an outcome nobody waits for as seen (no "exception was never retrieved")."""
    if not future.cancelled():
        future.exception()


def _settle_exception(result: asyncio.Future[Any], error: BaseException) -> None:
    if not result.done():
        result.set_exception(error)


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("could not change a group binding: %s", future.exception())
