"""Normal channels: names without ``!``, each a shared queue that every process may read.

A normal channel ``thumbnails`` is the queue ``<normal_channel_prefix>thumbnails`` (durable,
``classic`` or ``quorum``, removed by RabbitMQ after ``normal_channel_idle_expiry`` unused).
Senders declare it before their first publish; receivers are competing consumers, so each
message goes to exactly one ``receive()``.

A process takes a message off the queue only while a ``receive()`` waits for it: each
channel it receives on has an AMQP channel of its own with ``basic.qos`` prefetch 1, and a
consumer exists only while a ``receive()`` waits. A message is acknowledged when the
``receive()`` returns it; one that arrives for a ``receive()`` cancelled meanwhile is
given back to the queue (``basic.reject`` with requeue). A process that stopped receiving
holds nothing another worker could handle.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from channels.exceptions import StopConsumer

from ..amqp.channel import AmqpChannel
from ..amqp.connection import AmqpConnection
from ..amqp.protocol import Delivery, UndecodableDelivery
from ..config import LayerConfig
from ..exceptions import BrokerConnectionError, TooManyChannelsError
from ..logs import RateLimitedLogger
from ..routing import EMPTY, LocalRouter
from ..stats import DROPPED_UNDECODABLE
from ..wire import CHANNEL_HEADER, CONTROL_HEADER
from ..wire.codec import MessageCodec
from ..wire.serializers import MalformedMessage
from .channel_plan import CONTROL_CHANNEL, FIRST_NORMAL_CHANNEL_ID, channel
from .errors import translated
from .part import LinkPart
from .topology import retrieve

logger = logging.getLogger(__name__)

#: The first AMQP channel number normal channels' consumers may take on the consuming connection
#: (the ones below are the link's own; see :mod:`.topology`). Each waiting receive()'s channel takes
#: one, from the connection, up to its channel_max, and gives it back once nobody waits.

#: What a receive() is handed: the message, its delivery tag, and the connection and AMQP channel
#: it came on (where it is acknowledged or given back).
Taken = tuple[dict[str, Any], int, AmqpConnection, int]


@dataclass
class _Receiver:
    """This process's reading of one normal channel."""

    name: str
    queue: str
    waiters: deque[asyncio.Future[Taken]] = field(default_factory=deque)
    channel_id: int | None = None  # its AMQP channel while it has one
    opened_on: AmqpConnection | None = None  # the consuming connection that channel is open on
    consuming_on: AmqpConnection | None = None  # ... and where its consumer runs
    held: int = 0  # deliveries handed to a receive() and not yet acknowledged or given back
    syncing: asyncio.Task[None] | None = None


class NormalChannels(LinkPart):
    """The normal channels one link sends to and receives from."""

    def __init__(
        self,
        config: LayerConfig,
        loop: asyncio.AbstractEventLoop,
        *,
        router: LocalRouter,
        codec: MessageCodec,
        consuming_connection: Callable[[], AmqpConnection | None],
        publishing_connection: Callable[[], Awaitable[AmqpConnection]],
        dropped: Counter[str],
    ) -> None:
        self.config = config
        self.loop = loop
        self.router = router
        self.codec = codec
        self._consuming_connection = consuming_connection
        self._publishing_connection = publishing_connection
        self._receivers: dict[str, _Receiver] = {}
        self._by_channel_id: dict[int, _Receiver] = {}
        self._declared: dict[str, float] = {}  # queue -> when this link last declared it (monotonic)
        self._declaring: dict[str, asyncio.Task[None]] = {}
        self._bindings: set[tuple[str, str]] = set()  # (group, channel) bound by this link
        self._refresh_after = config.normal_channel_idle_expiry / 4
        self._groups_exchange = config.groups_exchange
        self._dropped = dropped
        self._dropped_log = RateLimitedLogger(logger)
        self.closed = False

    @property
    def channel_count(self) -> int:
        """Normal channels this link declared or receives from; ``layer.stats()`` reports it."""
        return len(set(self._declared) | {receiver.queue for receiver in list(self._receivers.values())})

    def queue_of(self, name: str) -> str:
        return f"{self.config.normal_channel_prefix}{name}"

    # Declaring --------------------------------------------------------------------------------

    def _on(self, connection: AmqpConnection, number: int) -> AmqpChannel:
        return channel(connection, number, self.config)

    def _queue_arguments(self, name: str) -> dict[str, Any]:
        config = self.config
        return {
            "x-queue-type": config.normal_channel_queue_type,
            "x-max-length": config.capacity_of(name),
            "x-overflow": "reject-publish",
            "x-message-ttl": int(config.expiry * 1000),
            "x-expires": int(config.normal_channel_idle_expiry * 1000),
        }

    async def declared(self, name: str) -> str:
        """The channel's queue name, once declared by this link within the last quarter of
        ``normal_channel_idle_expiry``: a queue is declared again that often while in use, so that
        RabbitMQ never removes a queue that may still hold a live message."""
        queue = self.queue_of(name)
        declared_at = self._declared.get(queue)
        if declared_at is not None and time.monotonic() - declared_at < self._refresh_after:
            return queue
        declaring = self._declaring.get(queue)
        if declaring is None or declaring.done():
            # A task of its own: a caller cancelled meanwhile cancels neither the declaration nor
            # the other callers waiting for it.
            declaring = self._declaring[queue] = self.loop.create_task(self._declare(queue, name))
            declaring.add_done_callback(retrieve)
        await asyncio.shield(declaring)
        return queue

    async def _declare(self, queue: str, name: str) -> None:
        try:
            publisher = await self._publishing_connection()
            with translated(self.config.description):
                control = self._on(publisher, CONTROL_CHANNEL)
                await control.declare_queue(queue, durable=True, arguments=self._queue_arguments(name))
            self._declared[queue] = time.monotonic()
        finally:
            if self._declaring.get(queue) is asyncio.current_task():
                del self._declaring[queue]

    # Groups -----------------------------------------------------------------------------------

    async def group_add(self, group: str, name: str) -> None:
        """Bind the channel's queue to the group: the group's messages reach it once."""
        queue = await self.declared(name)
        publisher = await self._publishing_connection()
        with translated(self.config.description):
            await self._on(publisher, CONTROL_CHANNEL).bind(queue, self._groups_exchange, group)
        self._bindings.add((group, name))

    async def group_discard(self, group: str, name: str) -> None:
        publisher = await self._publishing_connection()
        with translated(self.config.description):
            await self._on(publisher, CONTROL_CHANNEL).unbind(
                self.queue_of(name), self._groups_exchange, group
            )
        self._bindings.discard((group, name))

    # Receiving --------------------------------------------------------------------------------

    async def receive(self, name: str) -> dict[str, Any]:
        """The next message of the channel, taken off its queue for this call (acknowledged)."""
        message, settle = await self.receive_unsettled(name)
        settle(True)
        return message

    async def receive_unsettled(self, name: str) -> tuple[dict[str, Any], Callable[[bool], None]]:
        """The next message of the channel and how to settle it: ``settle(True)`` acknowledges it
        (taken), ``settle(False)`` gives it back to the queue, for any process to read. A receive()
        on another loop hands the message over before it is taken: a cancellation then gives it
        back to RabbitMQ, never to this process's memory alone.

        A message left in this process's inbox (by an older version's hand-over) comes first; it
        goes back there if not taken.
        """
        message = self.router.take(name, time.monotonic())
        if message is not EMPTY:
            return message, functools.partial(self._settle_from_inbox, name, message)
        if self.closed:
            raise StopConsumer()
        receiver = self._receiver(name)
        waiter: asyncio.Future[Taken] = self.loop.create_future()
        receiver.waiters.append(waiter)
        self._sync(receiver)
        try:
            message, delivery_tag, connection, channel_id = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                _message, delivery_tag, connection, channel_id = waiter.result()
                self._settle(receiver, connection, channel_id, delivery_tag, False)  # back to the queue
            else:
                _discard(receiver.waiters, waiter)
                self._sync(receiver)
            raise
        return message, functools.partial(self._settle, receiver, connection, channel_id, delivery_tag)

    def _settle(
        self, receiver: _Receiver, connection: AmqpConnection, channel_id: int, delivery_tag: int, taken: bool
    ) -> None:
        if taken:
            connection.ack(channel_id, delivery_tag, now=True)
        else:
            connection.reject(channel_id, delivery_tag)
        receiver.held -= 1
        self._sync(receiver)

    def _settle_from_inbox(self, name: str, message: dict[str, Any], taken: bool) -> None:
        if not taken:
            self.router.put_back(name, message, time.monotonic())

    def _receiver(self, name: str) -> _Receiver:
        receiver = self._receivers.get(name)
        if receiver is None:
            receiver = self._receivers[name] = _Receiver(name, self.queue_of(name))
        return receiver

    def _sync(self, receiver: _Receiver) -> None:
        """Have one task make the consumer match whether a receive() waits."""
        if receiver.syncing is None or receiver.syncing.done():
            receiver.syncing = self.loop.create_task(self._reconcile(receiver))
            receiver.syncing.add_done_callback(self._log_failure)

    async def _reconcile(self, receiver: _Receiver) -> None:
        """Consume while a receive() waits; then cancel the consumer, close the AMQP channel once
        what it delivered is settled (its number goes back to the connection), and forget the
        channel's reader: a process that reads 1,000 normal channels over its life holds only those
        it reads now."""
        while not self.closed:
            connection = self._consuming_connection()
            if connection is None or not connection.is_open:
                return  # the reconnection calls resume()
            wanted = any(not waiter.done() for waiter in receiver.waiters)
            try:
                if wanted and receiver.consuming_on is not connection:
                    await self._consume(connection, receiver)
                elif not wanted and receiver.consuming_on is connection:
                    receiver.consuming_on = None  # deliveries from here on go back to the queue
                    with translated(self.config.description):
                        await self._on(connection, self._channel_of(receiver)).cancel(receiver.name)
                elif not wanted and not receiver.held and receiver.opened_on is connection:
                    await self._close_channel(connection, receiver)
                else:
                    if not wanted and not receiver.held and receiver.opened_on is None:
                        self._forget(receiver)
                    return
            except BrokerConnectionError:
                continue  # that connection is gone (or going): the reconnection resumes
            except TooManyChannelsError as error:
                self._fail_waiters(receiver, error)  # those receive() calls alone
                return
            except Exception as error:  # refused: other queue arguments elsewhere, say
                self._fail_waiters(receiver, error)
                raise

    async def _consume(self, connection: AmqpConnection, receiver: _Receiver) -> None:
        await self.declared(receiver.name)
        if receiver.opened_on is not connection:
            with translated(self.config.description):
                reader = AmqpChannel.allocate(
                    connection, FIRST_NORMAL_CHANNEL_ID, stall_limit=self.config.connect_timeout
                )
            receiver.channel_id = reader.number
            self._by_channel_id[reader.number] = receiver
            connection.on_consumer_cancelled = self._consumer_cancelled
            with translated(self.config.description):
                await reader.open(prefetch_count=1)
            receiver.opened_on = connection
        with translated(self.config.description):
            await self._on(connection, self._channel_of(receiver)).consume(receiver.queue, receiver.name)
        receiver.consuming_on = connection

    async def _close_channel(self, connection: AmqpConnection, receiver: _Receiver) -> None:
        reader = self._on(connection, self._channel_of(receiver))
        with translated(self.config.description):
            await reader.close("nobody waits")
        receiver.opened_on = None
        receiver.channel_id = None
        if self._by_channel_id.get(reader.number) is receiver:
            del self._by_channel_id[reader.number]
        reader.release()

    def _forget(self, receiver: _Receiver) -> None:
        if self._receivers.get(receiver.name) is receiver:
            del self._receivers[receiver.name]

    @staticmethod
    def _channel_of(receiver: _Receiver) -> int:
        assert receiver.channel_id is not None, "a consumer's AMQP channel is open"
        return receiver.channel_id

    def _fail_waiters(self, receiver: _Receiver, error: Exception) -> None:
        """A refused declaration or consumer fails the waiting receives rather than leaving them
        waiting for ever."""
        while receiver.waiters:
            waiter = receiver.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def _consumer_cancelled(self, channel_id: int) -> None:
        """RabbitMQ cancelled a consumer (its queue was deleted): declare it again and consume."""
        receiver = self._by_channel_id.get(channel_id)
        if receiver is not None:
            receiver.consuming_on = None
            self._declared.pop(receiver.queue, None)
            self._sync(receiver)

    def consuming_up(self, connection: AmqpConnection) -> None:
        """A new consuming connection is up: consume again where a receive() waits (on new AMQP
        channels: the old numbers went with the old connection); forget the others."""
        self._by_channel_id.clear()
        for receiver in list(self._receivers.values()):
            receiver.opened_on = receiver.consuming_on = None
            receiver.channel_id = None
            self._sync(receiver)

    def on_delivery(self, delivery: Delivery | UndecodableDelivery, connection: AmqpConnection) -> None:
        """A delivery on one of our normal channels' AMQP channels."""
        receiver = self._by_channel_id.get(delivery.channel_id)
        if receiver is None:
            return
        if isinstance(delivery, UndecodableDelivery):
            self._drop(connection, receiver, delivery.channel_id, delivery.delivery_tag, delivery.reason)
            return
        # Only what the layer sends a normal channel: a send() (default exchange, its queue) or a
        # group_send() (the groups exchange), without the layer's headers (RabbitMQ may add its own,
        # such as a quorum queue's x-delivery-count). Anything else, such as a control reply another
        # client on the vhost steered here, is dropped, never handed to a receive().
        from_a_group = delivery.exchange == self._groups_exchange
        headers = delivery.headers or {}
        if (
            CONTROL_HEADER in headers
            or CHANNEL_HEADER in headers
            or not (from_a_group or (delivery.exchange, delivery.routing_key) == ("", receiver.queue))
        ):
            reason = (
                f"not a message for the normal channel {receiver.name!r} (exchange {delivery.exchange!r})"
            )
            self._drop(connection, receiver, delivery.channel_id, delivery.delivery_tag, reason)
            return
        # A group's message is sealed for the group; a send() for the channel.
        destination = delivery.routing_key if from_a_group else receiver.name
        try:
            message, _body = self.codec.decode(delivery.body, destination)
        except MalformedMessage as error:
            self._drop(connection, receiver, delivery.channel_id, delivery.delivery_tag, str(error))
            return
        while receiver.waiters:
            waiter = receiver.waiters.popleft()
            if not waiter.done():
                waiter.set_result((message, delivery.delivery_tag, connection, delivery.channel_id))
                receiver.held += 1
                return
        connection.reject(delivery.channel_id, delivery.delivery_tag)  # nobody waits any more

    def _drop(
        self, connection: AmqpConnection, receiver: _Receiver, channel_id: int, delivery_tag: int, reason: str
    ) -> None:
        self._dropped[DROPPED_UNDECODABLE] += 1
        self._dropped_log.warning(
            "dropped a message of normal channel %s from the wire: %s", receiver.name, reason
        )
        connection.ack(channel_id, delivery_tag, now=True)

    # Flush and close --------------------------------------------------------------------------

    async def flush(self) -> None:
        """Empty every normal channel's queue this link used, and undo its group bindings."""
        queues = set(self._declared) | {receiver.queue for receiver in self._receivers.values()}
        if not queues and not self._bindings:
            return
        publisher = await self._publishing_connection()
        for group, name in list(self._bindings):
            await self.group_discard(group, name)
        for queue in sorted(queues):
            with translated(self.config.description):
                await self._on(publisher, CONTROL_CHANNEL).purge(queue)

    def close(self) -> None:
        """Waiting receives raise ``StopConsumer``; the connection's end gives back what is unacked."""
        self.closed = True
        for receiver in self._receivers.values():
            if receiver.syncing is not None:
                receiver.syncing.cancel()
            while receiver.waiters:
                waiter = receiver.waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(StopConsumer())

    @staticmethod
    def _log_failure(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.warning("could not start or stop reading a normal channel: %s", task.exception())


def _discard(waiters: deque[Any], waiter: Any) -> None:
    try:
        waiters.remove(waiter)
    except ValueError:
        pass
