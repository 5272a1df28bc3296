"""What a link declares and binds on the broker: the groups exchange, its queue, group bindings.

- Each connection declares the groups exchange (a ``group_send()`` before any consumer
  declared it must not fail).
- The consuming connection declares the link's exclusive queue, binds every group that
  has local members, starts consuming and proves with a probe that it receives.
- Group calls change bindings through :meth:`Topology.sync_binding`: one task per group
  makes the binding match whether the group has local members.
- :meth:`Topology.request` bounds every request by the broker's progress.

- For control messages (:mod:`.control`), the consuming connection also binds the queue
  to hear ``flush()`` and answers the roll call.

AMQP channels on each connection: 1 publishes (confirm mode), 2 consumes, 3 runs
declarations, so a refused request never disturbs publishing or consuming; 4 holds the roll
call's consumer; 5 to 36 bind and unbind groups, in parallel; normal channels' consumers take
the numbers after those (:mod:`.normal`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import string
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
from pamqp import commands
from pamqp.base import Frame

from ..amqp.connection import AmqpConnection
from ..amqp.errors import AmqpError, ChannelRefused, ReplyCode
from ..config import LayerConfig
from ..exceptions import (
    BrokerConnectionError,
    BrokerConnectionLostError,
    BrokerRefusedError,
    BrokerTimeoutError,
    ChannelLayerClosedError,
    RequestNotEncodableError,
)
from ..routing import LocalRouter
from ..wire import FLUSH_ROUTING_KEY, channel_properties
from .errors import layer_error

logger = logging.getLogger(__name__)

PUBLISH_CHANNEL = 1
CONSUME_CHANNEL = 2
CONTROL_CHANNEL = 3
ROLL_CALL_CHANNEL = 4
#: The channels that bind and unbind groups, in parallel (see Topology._binding_channel). 32: with
#: 10,000 new groups at once, a 3-node Khepri cluster bound them in 20.1 s over one channel, 10.1 s
#: over 5, 5.6 s over 16 and 4.4 s over 32 (RabbitMQ 3.10, one node, over one channel: 5.5 s).
BINDING_CHANNELS = tuple(range(5, 37))

#: The roll call: a queue that never holds a message, which every link consumes from, so that
#: its consumer count is the number of links that hear flush() (see control.py). It is shared, so
#: it cannot be exclusive, and RabbitMQ 4.3 refuses transient shared queues: it is a quorum queue,
#: which is durable, survives the loss of a cluster node, and expires a minute after its last link.
ROLL_CALL_ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "quorum",
    "x-max-length": 0,
    "x-overflow": "reject-publish",
    "x-expires": 60_000,
}
#: Its name, for a groups exchange. Until this release it was ``channels.links:<exchange>``, a transient
#: classic queue: a new name, since a queue's type cannot change under its name.
ROLL_CALL_QUEUE = "channels.roll-call:{exchange}"

#: How long a consuming connection's set-up waits to join the roll call before going on without it.
ROLL_CALL_JOIN_WAIT = 2.0
PROBE_CHECK_INTERVAL = 0.05  # how often a waiting probe looks for an alarm or a lost connection
PROBE_BODY = msgpack.packb({"type": "channels_rabbitmq.probe"})  # dropped unread, whatever the serializer
QUEUE_LOCKED_RETRIES = 50  # 5 s for the broker to delete our previous connection's queue

_ALPHABET = string.ascii_letters + string.digits


def random_name(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


class Topology:
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
        #: The roll call's queue: one per groups exchange (a flush() reaches one exchange's links).
        self.roll_call = ROLL_CALL_QUEUE.format(exchange=config.groups_exchange)
        self._bound: set[str] = set()  # groups bound on the current consuming connection
        self._syncing: dict[str, asyncio.Task[None]] = {}  # see sync_binding()
        self._roll_call_joins: set[asyncio.Task[None]] = set()
        self._binding_connection: AmqpConnection | None = None  # see _binding_channel()
        self._binding_channels_open: list[int] = []
        # A consuming connection past its queue declaration, not yet installed: bindings go there.
        self.setting_up: AmqpConnection | None = None

    @property
    def bound(self) -> frozenset[str]:
        return frozenset(self._bound)

    # Setting connections up -----------------------------------------------------------------

    async def declare_groups_exchange(self, connection: AmqpConnection) -> None:
        await connection.open_channel(CONTROL_CHANNEL, [])
        try:
            await connection.call(
                CONTROL_CHANNEL,
                commands.Exchange.Declare(exchange=self._groups_exchange, exchange_type="direct"),
            )
        except ChannelRefused as error:
            if error.reply_code != ReplyCode.PRECONDITION_FAILED:
                raise
            # Declared elsewhere with other flags (durable, say): use it as it is.
            await connection.call(
                CONTROL_CHANNEL, commands.Exchange.Declare(exchange=self._groups_exchange, passive=True)
            )

    async def set_up_publishing(self, connection: AmqpConnection) -> None:
        """The exchange, then confirm mode on the publishing channel."""
        await self.declare_groups_exchange(connection)
        await connection.open_channel(PUBLISH_CHANNEL, [commands.Confirm.Select()], essential=True)

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
            declare = commands.Queue.Declare(queue=self.queue_name, exclusive=True, arguments=arguments)
            for attempt in range(QUEUE_LOCKED_RETRIES):
                try:
                    await connection.call(CONTROL_CHANNEL, declare)
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
            await connection.open_channel(
                CONSUME_CHANNEL,
                [
                    commands.Basic.Qos(prefetch_count=config.prefetch_count),
                    commands.Basic.Consume(queue=self.queue_name, consumer_tag="channels", exclusive=True),
                ],
                essential=True,
            )
            await self._probe(connection, arrival)
        except BaseException:
            if self.setting_up is connection:
                self.setting_up = None
            raise

    async def _hear_control(self, connection: AmqpConnection) -> None:
        """Bind the queue to hear flush(), and answer the roll call. A refusal (a permission) costs
        only that, and a warning: flush() from other processes does not reach this link.

        The roll call is a quorum queue: without a majority of its nodes it does not answer. So
        the set-up waits for it at most :data:`ROLL_CALL_JOIN_WAIT`, then goes on while the join
        completes (or not) in the background; it never costs the connection.
        """
        bind = commands.Queue.Bind(
            queue=self.queue_name, exchange=self._groups_exchange, routing_key=FLUSH_ROUTING_KEY
        )
        try:
            await self.request(connection, bind, "bind")
        except BrokerRefusedError as error:
            self._warn_deaf(error)
            return
        joining = self.loop.create_task(self._join_roll_call(connection))
        self._roll_call_joins.add(joining)
        joining.add_done_callback(self._roll_call_joins.discard)
        await asyncio.wait((joining,), timeout=min(ROLL_CALL_JOIN_WAIT, self.config.connect_timeout))

    async def _join_roll_call(self, connection: AmqpConnection) -> None:
        declare = commands.Queue.Declare(queue=self.roll_call, durable=True, arguments=ROLL_CALL_ARGUMENTS)
        consume = commands.Basic.Consume(queue=self.roll_call, consumer_tag="roll-call", no_ack=True)
        try:
            await self._roll_call_request(connection, commands.Channel.Open(), "open")
            await self._roll_call_request(connection, declare, "declare")
            await self._roll_call_request(connection, consume, "consume")
        except (BrokerRefusedError, BrokerTimeoutError) as error:
            self._warn_deaf(error)
        except (BrokerConnectionError, ChannelLayerClosedError):
            pass  # the connection's owner handles its loss

    async def _roll_call_request(self, connection: AmqpConnection, method: Frame, operation: str) -> Frame:
        """A request about the roll call, bounded by ``connect_timeout`` but never dropping the
        connection (a roll call without a majority of its nodes may not answer)."""
        reply = connection.call(ROLL_CALL_CHANNEL, method)
        reply.add_done_callback(retrieve)
        limit = self.config.connect_timeout
        done, _ = await asyncio.wait((reply,), timeout=limit)
        if not done:
            raise BrokerTimeoutError(
                f"{connection.description} did not answer the roll call's {operation} within "
                f"connect_timeout={limit:g}s",
                operation=operation,
                timeout=limit,
                url=self.config.description,
            )
        try:
            return reply.result()
        except AmqpError as error:
            raise layer_error(error, self.config.description) from None

    def _warn_deaf(self, error: BaseException) -> None:
        logger.warning(
            "could not bind queue %s to hear flush() or join its roll call (queue %s): %s; "
            "flush() from other processes may not wait for this one",
            self.queue_name,
            self.roll_call,
            error,
        )

    async def count_links(self, connection: AmqpConnection) -> int:
        """How many links answer the roll call (of every process, this one included)."""
        declare = commands.Queue.Declare(queue=self.roll_call, passive=True)
        try:
            # On the roll call's own channel: a broker that does not answer it holds up no binding.
            reply = await self._roll_call_request(connection, declare, "flush")
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

    def connection_lost(self) -> None:
        self._bound.clear()  # the bindings went with the queue

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
                method: commands.Queue.Bind | commands.Queue.Unbind = (
                    commands.Queue.Bind if wanted else commands.Queue.Unbind
                )(queue=self.queue_name, exchange=self._groups_exchange, routing_key=group)
                try:
                    channel_id = self._binding_channel(connection)
                    await self.request(connection, method, "bind" if wanted else "unbind", channel_id)
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

    def _binding_channel(self, connection: AmqpConnection) -> int:
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
        for channel_id in opened:
            if not connection.pending_requests(channel_id):
                return channel_id
        if len(opened) < len(BINDING_CHANNELS):
            channel_id = BINDING_CHANNELS[len(opened)]
            opened.append(channel_id)
            connection.call(channel_id, commands.Channel.Open()).add_done_callback(retrieve)
            return channel_id
        return min(opened, key=connection.pending_requests)

    # Requests -------------------------------------------------------------------------------

    async def request(
        self, connection: AmqpConnection, method: Frame, operation: str, channel_id: int = CONTROL_CHANNEL
    ) -> Frame:
        """One request; the connection is dropped if its channel makes no progress for ``connect_timeout``.

        Requests on a channel go one at a time: a request queued behind many others waits
        as long as the ones ahead of it are being answered. Raises the layer's errors.
        """
        limit = self.config.connect_timeout
        reply = connection.call(channel_id, method)
        reply.add_done_callback(retrieve)  # seen even when nobody waits any more
        while True:
            done, _ = await asyncio.wait(
                (reply,), timeout=max(0.01, limit - connection.quiet_for(channel_id))
            )
            if done:
                try:
                    return reply.result()
                except AmqpError as error:
                    raise layer_error(error, self.config.description) from None
            if connection.quiet_for(channel_id) >= limit:
                # A connection that leaves a request unanswered this long is not usable: the
                # reconnection sets everything up again.
                connection.abort()
                raise BrokerTimeoutError(
                    f"{connection.description} did not answer {operation} within connect_timeout={limit:g}s",
                    operation=operation,
                    timeout=limit,
                    url=self.config.description,
                )

    async def purge(self, connection: AmqpConnection) -> None:
        """Empty the queue, and let deliveries already on their way arrive first.

        A request on the consuming channel is answered after the deliveries ahead of it
        (one channel's frames keep their order).
        """
        await self.request(connection, commands.Queue.Purge(queue=self.queue_name), "purge")
        qos = commands.Basic.Qos(prefetch_count=self.config.prefetch_count)
        await self.request(connection, qos, "flush", CONSUME_CHANNEL)

    def close(self) -> None:
        self.closed = True
        for task in [*self._syncing.values(), *self._roll_call_joins]:
            task.cancel()


def retrieve(future: asyncio.Future[Any]) -> None:
    """Mark an outcome nobody waits for as seen (no "exception was never retrieved")."""
    if not future.cancelled():
        future.exception()


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("could not change a group binding: %s", future.exception())
