"""What a link declares and binds on the broker: the groups exchange, its queue, group bindings.

- Each connection declares the groups exchange (a ``group_send()`` before any consumer
  declared it must not fail).
- The consuming connection declares the link's exclusive queue, binds every group that
  has local members, starts consuming and proves with a probe that it receives.
- Group calls change bindings through :meth:`Topology.sync_binding`: one task per group
  makes the binding match whether the group has local members.
- Every request is bounded by the broker's progress (:class:`~..amqp.channel.AmqpChannel`).

- For control messages (:mod:`.control`), the consuming connection also binds the queue
  to hear ``flush()``; then the link attends the roll call (:mod:`.roll_call`).

Which AMQP channel does what: :mod:`.channel_plan`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import string
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack

from ..amqp.channel import AmqpChannel
from ..amqp.connection import AmqpConnection
from ..amqp.errors import AmqpError, ChannelRefused, ReplyCode
from ..config import LayerConfig
from ..exceptions import (
    BrokerConnectionError,
    BrokerConnectionLostError,
    BrokerRefusedError,
    ChannelLayerClosedError,
    RequestNotEncodableError,
)
from ..routing import LocalRouter
from ..wire import FLUSH_ROUTING_KEY, channel_properties
from .channel_plan import (
    BINDING_CHANNELS,
    CONSUME_CHANNEL,
    CONTROL_CHANNEL,
    PUBLISH_CHANNEL,
    ROLL_CALL_CHANNEL,
    channel,
)
from .errors import translated
from .part import LinkPart
from .roll_call import RollCall

logger = logging.getLogger(__name__)

PROBE_CHECK_INTERVAL = 0.05  # how often a waiting probe looks for an alarm or a lost connection
PROBE_BODY = msgpack.packb({"type": "channels_rabbitmq.probe"})  # dropped unread, whatever the serializer
QUEUE_LOCKED_RETRIES = 50  # 5 s for the broker to delete our previous connection's queue
#: After a consuming connection replaced a lost one, the queue is probed again this many seconds
#: after it came up (each a probe that must come back within connect_timeout, or the connection is
#: dropped and set up again). When a cluster node fails, the survivors delete the records of its
#: queues while the clients declare them again elsewhere, under the same names: RabbitMQ can then
#: delete the new queue's record with the old one's, and its consumer is never told
#: (rabbitmq/rabbitmq-server#6271, #9798, #12949). The process would be deaf for good.
REPROBE_AFTER_RECOVERY = (1.0, 5.0, 20.0)

_ALPHABET = string.ascii_letters + string.digits


def random_name(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


class Topology(LinkPart):
    """The exchange, queue and group bindings of one link, and the probe of a new consumer."""

    def __init__(
        self,
        config: LayerConfig,
        loop: asyncio.AbstractEventLoop,
        *,
        queue_name: str,
        router: LocalRouter,
        consuming_connection: Callable[[], AmqpConnection | None],
        publishing_connection: Callable[[], Awaitable[AmqpConnection]],
        seal: Callable[[bytes, str], bytes],
        roll_call: RollCall,
        expect_delivery: Callable[[], asyncio.Future[None]],
    ) -> None:
        self.config = config
        self.loop = loop
        self.queue_name = queue_name
        self.router = router
        self.closed = False
        self._consuming_connection = consuming_connection
        self._publishing_connection = publishing_connection
        self._seal = seal
        self._groups_exchange = config.groups_exchange
        #: This link's place in flush()'s roll call.
        self.roll_call = roll_call
        self._expect_delivery = expect_delivery
        self._consumed_before = False
        self._reprobing: asyncio.Task[None] | None = None
        self._bound: set[str] = set()  # groups bound on the current consuming connection
        self._syncing: dict[str, asyncio.Task[None]] = {}  # see sync_binding()
        self._binding_connection: AmqpConnection | None = None  # see _binding_channel()
        self._binding_channels_open: list[AmqpChannel] = []
        # A consuming connection past its queue declaration, not yet installed: bindings go there.
        self.setting_up: AmqpConnection | None = None

    @property
    def bound(self) -> frozenset[str]:
        return frozenset(self._bound)

    # Setting connections up -----------------------------------------------------------------

    def _on(self, connection: AmqpConnection, number: int) -> AmqpChannel:
        return channel(connection, number, self.config)

    async def declare_groups_exchange(self, connection: AmqpConnection) -> None:
        control = self._on(connection, CONTROL_CHANNEL)
        await control.open()
        try:
            await control.declare_exchange(self._groups_exchange, "direct")
        except ChannelRefused as error:
            if error.reply_code != ReplyCode.PRECONDITION_FAILED:
                raise
            # Declared elsewhere with other flags (durable, say): use it as it is.
            await control.declare_exchange(self._groups_exchange, passive=True)

    async def set_up_publishing(self, connection: AmqpConnection) -> None:
        """The exchange, then confirm mode on the publishing channel."""
        await self.declare_groups_exchange(connection)
        await self._on(connection, PUBLISH_CHANNEL).open(confirm=True, essential=True)

    async def set_up_consuming(self, connection: AmqpConnection, arrival: asyncio.Future[None]) -> None:
        """Declare the exchange and queue, bind the groups with members, consume; then probe.

        ``arrival`` is resolved by the first delivery on the new connection.
        """
        config = self.config
        try:
            await self.declare_groups_exchange(connection)
            arguments: dict[str, Any] = {
                "x-max-length": config.remote_capacity,
                "x-max-length-bytes": config.remote_capacity_bytes,
                "x-overflow": "reject-publish",
                "x-message-ttl": int(config.expiry * 1000),
            }
            control = self._on(connection, CONTROL_CHANNEL)
            for attempt in range(QUEUE_LOCKED_RETRIES):
                try:
                    await control.declare_queue(self.queue_name, exclusive=True, arguments=arguments)
                    break
                except ChannelRefused as error:
                    # The exclusive queue of our previous connection is still being deleted.
                    last = attempt == QUEUE_LOCKED_RETRIES - 1
                    if error.reply_code != ReplyCode.RESOURCE_LOCKED or last:
                        raise
                    await asyncio.sleep(0.1)
            await self._hear_control(connection)
            # From here on, group calls bind and unbind on this connection themselves, so the
            # groups bound below plus theirs are every group with members.
            self.setting_up = connection
            self._bound = set()
            binds = [asyncio.shield(self.sync_binding(group)) for group in list(self.router.groups)]
            for outcome in await asyncio.gather(*binds, return_exceptions=True):
                # A refused bind already dropped its group's members (and said so); anything
                # else means this connection cannot be set up.
                if isinstance(outcome, BaseException) and not isinstance(
                    outcome, BrokerRefusedError | RequestNotEncodableError
                ):
                    raise outcome
            consume = self._on(connection, CONSUME_CHANNEL)
            await consume.open(prefetch_count=config.prefetch_count, essential=True)
            await consume.consume(self.queue_name, "channels", exclusive=True)
            await self._probe(connection, arrival)
        except BaseException:
            if self.setting_up is connection:
                self.setting_up = None
            self.roll_call.leave()  # a link that is not consuming cannot answer a flush()
            raise

    async def _hear_control(self, connection: AmqpConnection) -> None:
        """Bind the queue to hear flush(), then attend the roll call (:mod:`.roll_call`). A refused
        binding (a permission) costs only that, and a warning: flush() from other processes does
        not reach this link.

        In that order: a link counted before it hears flush() would hold every flush() up. A join
        that takes longer than :data:`.roll_call.JOIN_WAIT` goes on in the background, and the
        link's first call waits for it (:meth:`.roll_call.RollCall.joined`)."""
        # Where flush() counts the roll call: reopened by the connection when the broker closes it
        # (a count that finds no roll call is refused NOT_FOUND).
        await self._on(connection, ROLL_CALL_CHANNEL).open()
        try:
            with translated(self.config.description):
                await self._on(connection, CONTROL_CHANNEL).bind(
                    self.queue_name, self._groups_exchange, FLUSH_ROUTING_KEY
                )
        except BrokerRefusedError as error:
            logger.warning(
                "could not bind queue %s to hear flush(): %s; flush() from other processes does not "
                "reach this one",
                self.queue_name,
                error,
            )
            return
        await self.roll_call.attend()

    async def count_links(self, connection: AmqpConnection) -> int:
        """How many links answer the roll call (of every process, this one included)."""
        try:
            # On the roll call's own channel: a broker that does not answer it holds up no binding.
            with translated(self.config.description):
                reply = await self._on(connection, ROLL_CALL_CHANNEL).declare_queue(
                    self.roll_call.queue, passive=True, abort_when_stalled=False
                )
        except BrokerRefusedError as error:
            if error.reply_code != ReplyCode.NOT_FOUND:
                raise
            return 0  # nobody declared it lately
        return int(getattr(reply, "consumer_count", 0) or 0)

    async def _probe(self, connection: AmqpConnection, arrival: asyncio.Future[None]) -> None:
        """Never "open but deaf": a message to ourselves must come back before we say we are up.

        The probe goes out on the publishing connection: the consuming one never publishes,
        so a resource alarm, which stops RabbitMQ reading from connections that publish,
        never stops its acknowledgements. While the broker blocks publishing, the probe
        cannot travel, and consuming starts without it.
        """
        try:
            publisher = await self._publishing_connection()
        except BrokerConnectionError:
            return  # the publishing side reports its own trouble; consuming works without it
        if not publisher.can_publish or self.router.is_full:
            # Blocked (an alarm) or its buffer full: it would not come back now. With the
            # router full, deliveries wait for room: the probe could wait behind them.
            return
        confirm = self._send_probe(publisher)
        while not arrival.done():
            if not connection.is_open:
                raise BrokerConnectionLostError(
                    f"the connection to {connection.description} was lost while checking that it receives"
                )
            if publisher.blocked_reason is not None:
                return  # an alarm began: the probe waits in the broker, and is dropped on arrival
            confirmed = confirm.done() and not confirm.cancelled() and confirm.exception() is None
            if confirmed and not confirm.result():
                raise BrokerConnectionError(f"{connection.description} refused the probe message")
            await asyncio.wait((arrival,), timeout=PROBE_CHECK_INTERVAL)

    def _send_probe(self, publisher: AmqpConnection) -> asyncio.Future[bool]:
        """Publish a probe to our own queue; the future is the broker's confirm."""
        probe = f"{self.queue_name}!probe.{random_name(12)}"
        try:
            confirm = publisher.publish(
                PUBLISH_CHANNEL,
                b"",
                self.queue_name.encode(),
                channel_properties(probe),
                self._seal(PROBE_BODY, probe),
            )
        except AmqpError:
            raise BrokerConnectionLostError(
                f"the connection to {publisher.description} was lost while checking that we receive"
            ) from None
        confirm.add_done_callback(retrieve)
        return confirm

    def consuming_up(self, connection: AmqpConnection) -> None:
        self.setting_up = None  # installed: group calls use it as the consuming connection now
        if self._consumed_before:
            self._reprobing = self.loop.create_task(self._reprobe(connection))
            self._reprobing.add_done_callback(retrieve)
        self._consumed_before = True

    async def _reprobe(self, connection: AmqpConnection) -> None:
        """Probe the queue again after a recovery (see :data:`REPROBE_AFTER_RECOVERY`). When RabbitMQ
        accepted a probe (its confirm came) but nothing was delivered within ``connect_timeout``,
        the queue no longer routes to us: drop the consuming connection, which is set up again. A
        probe the broker did not confirm says nothing of the queue, and is not held against it."""
        waited = 0.0
        for after in REPROBE_AFTER_RECOVERY:
            await asyncio.sleep(after - waited)
            waited = after
            try:
                publisher = await self._publishing_connection()
            except BrokerConnectionError:
                continue  # the publishing side reports its own trouble
            if not connection.is_open or self.closed:
                return
            if not publisher.can_publish or self.router.is_full:
                continue  # blocked, or deliveries wait for room: a probe would prove nothing now
            arrival = self._expect_delivery()
            confirm = self._send_probe(publisher)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(arrival), self.config.connect_timeout)
            accepted = (
                confirm.done()
                and not confirm.cancelled()
                and confirm.exception() is None
                and confirm.result()
            )
            if arrival.done() or not accepted:
                continue
            if connection.is_open and not self.closed:
                logger.warning(
                    "queue %s stopped receiving after a reconnection: a probe RabbitMQ accepted was not "
                    "delivered within connect_timeout=%gs; setting the queue up again",
                    self.queue_name,
                    self.config.connect_timeout,
                )
                connection.drop("the queue stopped receiving: a probe it accepted was not delivered")
            return

    def consuming_down(self) -> None:
        self._bound.clear()  # the bindings went with the queue
        if self._reprobing is not None:
            self._reprobing.cancel()

    # Group bindings -------------------------------------------------------------------------

    def sync_binding(self, group: str) -> asyncio.Task[None]:
        """Make the queue's binding to ``group`` match whether the group has local members.

        One task per group at a time does every bind and unbind of that group, checking
        again after each one, so concurrent and cancelled group calls and flush() always
        leave a binding exactly when there is a member.
        """
        task = self._syncing.get(group)
        if task is None or task.done():
            task = self._syncing[group] = self.loop.create_task(self._reconcile_binding(group))
        return task

    def sync_binding_in_background(self, group: str) -> None:
        self.sync_binding(group).add_done_callback(_log_failure)

    async def binding_settled(self, group: str) -> None:
        """Wait for the group's binding to match its membership; a cancelled wait leaves it going."""
        task = self.sync_binding(group)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                raise  # our caller was cancelled; the binding task goes on
            if self.closed:
                raise ChannelLayerClosedError("the channel layer was closed during the group call") from None
            # A connection's set-up that gave up took the task with it: an outage.
            raise BrokerConnectionLostError(f"the connection was lost while binding {group!r}") from None

    def _current(self) -> AmqpConnection | None:
        return self.setting_up or self._consuming_connection()

    async def _reconcile_binding(self, group: str) -> None:
        try:
            while True:
                connection = self._current()
                if connection is None or not connection.is_open:
                    return  # no queue: the next connection binds every group with members
                wanted = self.router.has_members(group)
                if wanted == (group in self._bound):
                    return
                try:
                    binding = self._binding_channel(connection)
                    with translated(self.config.description):
                        if wanted:
                            await binding.bind(self.queue_name, self._groups_exchange, group)
                        else:
                            await binding.unbind(self.queue_name, self._groups_exchange, group)
                except BrokerConnectionError:
                    if self._current() is connection:
                        raise
                    continue  # that connection is gone; the loop looks at the next one
                except BrokerRefusedError as error:
                    if error.reply_code != ReplyCode.NOT_FOUND:
                        self._drop_members(group, wanted, error)
                        raise
                    # Our queue or the exchange is gone under us (on a Khepri cluster, the deletion of
                    # the queue of a connection lost with its node can land after our declaration):
                    # not the members' fault. The connection sets everything up again, binds included.
                    connection.abort()
                    raise BrokerConnectionLostError(
                        f"{connection.description}: the queue or exchange to bind {group!r} is gone "
                        f"({error.reply_text}); setting the connection up again"
                    ) from None
                except RequestNotEncodableError as error:
                    self._drop_members(group, wanted, error)
                    raise
                if wanted:
                    self._bound.add(group)
                else:
                    self._bound.discard(group)
        finally:
            if self._syncing.get(group) is asyncio.current_task():
                del self._syncing[group]

    def _drop_members(self, group: str, wanted: bool, error: Exception) -> None:
        """A bind refused for good: a member without a binding would wait for messages that never come."""
        if wanted:
            dropped = self.router.discard_group(group)
            logger.warning(
                "could not bind group %r (%s): %d local member(s) left it", group, error, len(dropped)
            )

    def _binding_channel(self, connection: AmqpConnection) -> AmqpChannel:
        """The AMQP channel for the next bind or unbind. A channel answers its requests one at a
        time, and RabbitMQ applies each bind before the next (with Khepri, a Raft command that
        waits for a majority of nodes), so binds of different groups spread over up to
        :data:`BINDING_CHANNELS` channels: an idle one when there is one, else a new one, else the
        least busy. A link that binds now and then keeps one; a connect storm gets them all.
        (One group's binds stay in order: one task per group makes them.)"""
        if connection is not self._binding_connection:
            self._binding_connection = connection
            self._binding_channels_open = []
        opened = self._binding_channels_open
        for binding in opened:
            if not binding.pending_requests:
                return binding
        if len(opened) < len(BINDING_CHANNELS):
            binding = self._on(connection, BINDING_CHANNELS[len(opened)])
            opened.append(binding)
            binding.open_soon()
            return binding
        return min(opened, key=lambda binding: binding.pending_requests)

    async def purge(self, connection: AmqpConnection) -> None:
        """Empty the queue, and let deliveries already on their way arrive first.

        A request on the consuming channel is answered after the deliveries ahead of it
        (one channel's frames keep their order).
        """
        with translated(self.config.description):
            await self._on(connection, CONTROL_CHANNEL).purge(self.queue_name)
            consume = self._on(connection, CONSUME_CHANNEL)
            await consume.set_prefetch(self.config.prefetch_count, operation="flush")

    def close(self) -> None:
        self.closed = True
        for task in self._syncing.values():
            task.cancel()
        if self._reprobing is not None:
            self._reprobing.cancel()


def retrieve(future: asyncio.Future[Any]) -> None:
    """Mark an outcome nobody waits for as seen (no "exception was never retrieved")."""
    if not future.cancelled():
        future.exception()


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("could not change a group binding: %s", future.exception())
