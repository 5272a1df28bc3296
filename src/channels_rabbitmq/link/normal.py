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
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from channels.exceptions import StopConsumer
from pamqp import commands

from ..amqp.connection import AmqpConnection
from ..amqp.protocol import Delivery, UndecodableDelivery
from ..codec import MalformedMessage, MessageCodec
from ..config import LayerConfig
from ..exceptions import BrokerConnectionError
from ..logs import RateLimitedLogger
from ..routing import EMPTY, LocalRouter
from .inbound import DROPPED_UNDECODABLE
from .topology import CONTROL_CHANNEL, retrieve

logger = logging.getLogger(__name__)

#: The first AMQP channel number used for normal channels on the consuming connection
#: (1 to 3 are the link's own; see :mod:`.topology`).
FIRST_NORMAL_CHANNEL_ID = 10

Request = Callable[[AmqpConnection, Any, str, int], Awaitable[Any]]


@dataclass
class _Receiver:
    """This process's reading of one normal channel."""

    name: str
    queue: str
    channel_id: int
    waiters: deque[asyncio.Future[tuple[dict[str, Any], int, AmqpConnection]]] = field(default_factory=deque)
    opened_on: AmqpConnection | None = None  # the consuming connection its AMQP channel is open on
    consuming_on: AmqpConnection | None = None  # ... and where its consumer runs
    syncing: asyncio.Task[None] | None = None


class NormalChannels:
    """The normal channels one link sends to and receives from."""

    def __init__(
        self,
        config: LayerConfig,
        loop: asyncio.AbstractEventLoop,
        *,
        router: LocalRouter,
        codec: MessageCodec,
        request: Request,
        consuming_connection: Callable[[], AmqpConnection | None],
        publishing_connection: Callable[[], Awaitable[AmqpConnection]],
        dropped: Counter[str],
    ) -> None:
        self.config = config
        self.loop = loop
        self.router = router
        self.codec = codec
        self._request = request
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

    def _declare_method(self, queue: str, name: str) -> commands.Queue.Declare:
        config = self.config
        arguments: dict[str, Any] = {
            "x-queue-type": config.normal_channel_queue_type,
            "x-max-length": config.capacity_of(name),
            "x-overflow": "reject-publish",
            "x-message-ttl": int(config.expiry * 1000),
            "x-expires": int(config.normal_channel_idle_expiry * 1000),
        }
        return commands.Queue.Declare(queue=queue, durable=True, arguments=arguments)

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
            await self._request(publisher, self._declare_method(queue, name), "declare", CONTROL_CHANNEL)
            self._declared[queue] = time.monotonic()
        finally:
            if self._declaring.get(queue) is asyncio.current_task():
                del self._declaring[queue]

    # Groups -----------------------------------------------------------------------------------

    async def group_add(self, group: str, name: str) -> None:
        """Bind the channel's queue to the group: the group's messages reach it once."""
        queue = await self.declared(name)
        publisher = await self._publishing_connection()
        bind = commands.Queue.Bind(queue=queue, exchange=self._groups_exchange, routing_key=group)
        await self._request(publisher, bind, "bind", CONTROL_CHANNEL)
        self._bindings.add((group, name))

    async def group_discard(self, group: str, name: str) -> None:
        publisher = await self._publishing_connection()
        unbind = commands.Queue.Unbind(
            queue=self.queue_of(name), exchange=self._groups_exchange, routing_key=group
        )
        await self._request(publisher, unbind, "unbind", CONTROL_CHANNEL)
        self._bindings.discard((group, name))

    # Receiving --------------------------------------------------------------------------------

    async def receive(self, name: str) -> dict[str, Any]:
        """The next message of the channel: from this process's inbox (one given back by a
        cancelled receive on another loop), else taken off the queue for this call."""
        message = self.router.take(name, time.monotonic())
        if message is not EMPTY:
            return message
        if self.closed:
            raise StopConsumer()
        receiver = self._receiver(name)
        waiter: asyncio.Future[tuple[dict[str, Any], int, AmqpConnection]] = self.loop.create_future()
        receiver.waiters.append(waiter)
        self._sync(receiver)
        try:
            message, delivery_tag, connection = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                _message, delivery_tag, connection = waiter.result()
                connection.reject(receiver.channel_id, delivery_tag)  # back to the queue
            else:
                _discard(receiver.waiters, waiter)
            self._sync(receiver)
            raise
        connection.ack(receiver.channel_id, delivery_tag, now=True)
        self._sync(receiver)
        return message

    def _receiver(self, name: str) -> _Receiver:
        receiver = self._receivers.get(name)
        if receiver is None:
            channel_id = FIRST_NORMAL_CHANNEL_ID + len(self._receivers)
            receiver = _Receiver(name, self.queue_of(name), channel_id)
            self._receivers[name] = receiver
            self._by_channel_id[channel_id] = receiver
        return receiver

    def _sync(self, receiver: _Receiver) -> None:
        """Have one task make the consumer match whether a receive() waits."""
        if receiver.syncing is None or receiver.syncing.done():
            receiver.syncing = self.loop.create_task(self._reconcile(receiver))
            receiver.syncing.add_done_callback(self._log_failure)

    async def _reconcile(self, receiver: _Receiver) -> None:
        while not self.closed:
            connection = self._consuming_connection()
            if connection is None or not connection.is_open:
                return  # the reconnection calls resume()
            wanted = any(not waiter.done() for waiter in receiver.waiters)
            if wanted == (receiver.consuming_on is connection):
                return
            try:
                if wanted:
                    await self._consume(connection, receiver)
                else:
                    receiver.consuming_on = None  # deliveries from here on go back to the queue
                    cancel = commands.Basic.Cancel(consumer_tag=receiver.name)
                    await self._request(connection, cancel, "cancel", receiver.channel_id)
            except BrokerConnectionError:
                continue  # that connection is gone (or going): the reconnection resumes
            except Exception as error:  # refused: other queue arguments elsewhere, say
                self._fail_waiters(receiver, error)
                raise

    async def _consume(self, connection: AmqpConnection, receiver: _Receiver) -> None:
        await self.declared(receiver.name)
        if receiver.opened_on is not connection:
            connection.on_consumer_cancelled = self._consumer_cancelled
            await connection.open_channel(receiver.channel_id, [commands.Basic.Qos(prefetch_count=1)])
            receiver.opened_on = connection
        consume = commands.Basic.Consume(queue=receiver.queue, consumer_tag=receiver.name)
        await self._request(connection, consume, "consume", receiver.channel_id)
        receiver.consuming_on = connection

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

    def resume(self) -> None:
        """A new consuming connection is up: consume again where a receive() waits."""
        for receiver in self._receivers.values():
            receiver.opened_on = receiver.consuming_on = None
            if receiver.waiters:
                self._sync(receiver)

    def on_delivery(self, delivery: Delivery | UndecodableDelivery, connection: AmqpConnection) -> None:
        """A delivery on one of our normal channels' AMQP channels."""
        receiver = self._by_channel_id.get(delivery.channel_id)
        if receiver is None:
            return
        if isinstance(delivery, UndecodableDelivery):
            self._drop(connection, receiver, delivery.delivery_tag, delivery.reason)
            return
        # A group's message is sealed for the group; a send() for the channel.
        destination = delivery.routing_key if delivery.exchange == self._groups_exchange else receiver.name
        try:
            message, _body = self.codec.decode(delivery.body, destination)
        except MalformedMessage as error:
            self._drop(connection, receiver, delivery.delivery_tag, str(error))
            return
        while receiver.waiters:
            waiter = receiver.waiters.popleft()
            if not waiter.done():
                waiter.set_result((message, delivery.delivery_tag, connection))
                return
        connection.reject(delivery.channel_id, delivery.delivery_tag)  # nobody waits any more

    def _drop(self, connection: AmqpConnection, receiver: _Receiver, delivery_tag: int, reason: str) -> None:
        self._dropped[DROPPED_UNDECODABLE] += 1
        self._dropped_log.warning(
            "dropped a message of normal channel %s from the wire: %s", receiver.name, reason
        )
        connection.ack(receiver.channel_id, delivery_tag, now=True)

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
            await self._request(publisher, commands.Queue.Purge(queue=queue), "purge", CONTROL_CHANNEL)

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
