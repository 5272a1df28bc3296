"""The broker link: this layer's one connection, its exclusive queue and its consumer.

The link connects on first need (a new channel, a receive, a send, a group call),
declares the groups exchange and the process's exclusive queue, consumes from it and
hands every delivery to the :class:`~.routing.LocalRouter`. When the connection drops,
it reconnects in the background with capped exponential backoff and jitter,
re-declares the queue under the same name, re-binds every group that still has local
members and consumes again.

AMQP channels: 1 publishes (confirm mode), 2 consumes, 3 runs declarations and
bindings, so a refused request never disturbs publishing or consuming.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import secrets
import socket
import string
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
from channels.exceptions import StopConsumer
from pamqp import commands

from . import __version__
from .amqp.connection import AmqpConnection, DeliveryHandler
from .amqp.protocol import Credentials, Delivery, UndecodableDelivery
from .config import BrokerAddress, LayerConfig
from .encryption import BodyCipher
from .exceptions import BrokerConnectionError, BrokerRefusedError, ChannelLayerClosedError
from .logs import RateLimitedLogger
from .routing import EMPTY, LocalRouter
from .wire import CHANNEL_HEADER, MalformedMessage, channel_properties, decode_message

logger = logging.getLogger(__name__)

PUBLISH_CHANNEL = 1
CONSUME_CHANNEL = 2
CONTROL_CHANNEL = 3

_ALPHABET = string.ascii_letters + string.digits

RESOURCE_LOCKED = 405
PROBE_BODY = msgpack.packb({"type": "channels_rabbitmq.probe"})

# Why a delivery was dropped: the keys of BrokerLink.dropped.
DROPPED_TOO_LARGE = "too_large"  # a body over max_message_size, skipped unread
DROPPED_UNDECODABLE = "undecodable"  # unreadable, not for a channel of ours, or not opened


class BrokerLink:
    """One event loop's connection, exclusive queue, consumer, inboxes and group bindings.

    Every method runs on ``loop``; :mod:`.core` sends calls from other loops here.
    """

    def __init__(self, config: LayerConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        #: The queue of this link; every channel it receives on starts with it and ``!``.
        self.queue_name = f"channels.{random_name(12)}"
        self.router = router = LocalRouter(
            capacity=config.local_capacity, expiry=config.expiry, group_expiry=config.group_expiry
        )
        self._group_changes: dict[str, asyncio.Future[None]] = {}
        self._bridged: dict[str, asyncio.Future[None]] = {}  # see receive_for()
        self._ever_connected = False
        self._up = asyncio.Event()  # set while connected
        self._last_error: BrokerConnectionError | None = None
        self._probe: tuple[str, asyncio.Future[None]] | None = None
        # A connection past its queue declaration, not yet installed: group calls bind on it.
        self._setting_up: AmqpConnection | None = None
        self._cipher = BodyCipher(config.encryption_keys) if config.encryption_keys else None
        self.loop_watcher: Any = None  # see core.RabbitmqChannelLayer._close_with_loop
        self._connection: AmqpConnection | None = None
        self._connecting: asyncio.Future[AmqpConnection] | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._housekeeping: asyncio.TimerHandle | None = None
        self._closed = False
        self._groups_exchange = config.groups_exchange
        self._channel_prefix = self.queue_name + "!"
        self._last_delivery_tag = 0
        self._acked_delivery_tag = 0
        self._dropped_log = RateLimitedLogger(logger)
        #: Deliveries dropped since the link was made, by reason (the ``DROPPED_*`` names).
        self.dropped: collections.Counter[str] = collections.Counter()
        self._expired_log = RateLimitedLogger(logger)
        router.on_room = self._ack_deliveries

    # Connection -----------------------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        return self._closed

    async def connection(self) -> AmqpConnection:
        """The open connection.

        The first time, connect now and raise at once if that fails (a wrong URL,
        password or vhost must not make callers wait). After an outage began, wait for
        the background reconnection at most ``connection_wait`` seconds, then raise
        :class:`BrokerConnectionError`.
        """
        connection = self._connection
        if connection is not None and connection.is_open:
            return connection
        if self._closed:
            raise ChannelLayerClosedError("the channel layer is closed")
        if not self._ever_connected:
            if self._connecting is None:
                self._connecting = asyncio.ensure_future(self._connect_first())
                self._connecting.add_done_callback(self._connect_done)
            return await asyncio.shield(self._connecting)
        self._start_reconnecting()
        wait = self.config.connection_wait
        try:
            await asyncio.wait_for(self._up.wait(), wait)
        except asyncio.TimeoutError:
            raise BrokerConnectionError(
                f"RabbitMQ ({self.config.description}) has been unreachable for connection_wait={wait:g}s: "
                f"{self._last_error}"
            ) from None
        connection = self._connection
        if connection is None or not connection.is_open:
            raise self._last_error or BrokerConnectionError("the connection was lost again")
        return connection

    @property
    def is_connected(self) -> bool:
        connection = self._connection
        return connection is not None and connection.is_open

    def _connect_done(self, future: asyncio.Future[AmqpConnection]) -> None:
        self._connecting = None
        if not future.cancelled():
            future.exception()  # retrieved here; callers got it through shield()

    async def _connect_first(self) -> AmqpConnection:
        connection = await self._connect_any()
        self._install(connection)
        return connection

    def _install(self, connection: AmqpConnection) -> None:
        self._connection = connection
        self._ever_connected = True
        self._last_error = None
        self._up.set()
        self._schedule_housekeeping()
        self._ack_deliveries()  # what arrived while we were still setting up

    async def _connect_any(self) -> AmqpConnection:
        """Connect to the first node that answers: each URL in order, each of its addresses in turn.

        Reconnections start at a random node, which spreads the processes of a cluster's
        failed node over the others. The whole attempt takes at most ``connect_timeout``.
        """
        loop = asyncio.get_running_loop()
        addresses = list(self.config.addresses)
        if self._ever_connected and len(addresses) > 1:
            start = random.randrange(len(addresses))
            addresses = addresses[start:] + addresses[:start]
        deadline = loop.time() + self.config.connect_timeout
        targets: list[tuple[BrokerAddress, str]] = []
        errors: list[str] = []
        for address in addresses:
            try:
                infos = await asyncio.wait_for(
                    loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM),
                    max(0.001, deadline - loop.time()),
                )
            except (OSError, asyncio.TimeoutError) as error:
                errors.append(f"cannot resolve {address.host} ({address}): {error or 'timed out'}")
                continue
            targets += [(address, ip) for ip in distinct_ips(infos)]
        for index, (address, ip) in enumerate(targets):
            remaining = deadline - loop.time()
            if remaining <= 0:
                errors.append(f"connect_timeout={self.config.connect_timeout:g}s ran out")
                break
            if self._closed:
                raise ChannelLayerClosedError("the channel layer was closed while connecting")
            try:
                return await self._connect(address, ip, remaining / (len(targets) - index))
            except BrokerConnectionError as error:
                errors.append(str(error))
        if len(errors) == 1:
            raise BrokerConnectionError(errors[0])
        raise BrokerConnectionError("could not connect to any broker: " + "; ".join(errors))

    async def _connect(self, address: BrokerAddress, ip: str, timeout: float) -> AmqpConnection:
        """Connect to one node and set the link up there (queue, bindings, consumer, probe)."""
        config = self.config
        started = time.monotonic()
        described = describe_target(address, ip)
        connection = await open_connection(
            address,
            ip,
            config,
            timeout=timeout,
            connection_name=f"channels_rabbitmq {self.queue_name}",
            on_delivery=self._on_delivery,
            on_deliveries_done=self._ack_deliveries,
            on_lost=self._on_lost,
        )
        remaining = max(0.1, timeout - (time.monotonic() - started))
        try:
            await asyncio.wait_for(self._set_up(connection), remaining)
        except BaseException as error:
            self._probe = None
            self._setting_up = None
            await connection.close()
            if isinstance(error, asyncio.TimeoutError):
                raise BrokerConnectionError(
                    f"{described} did not finish setting up the queue within connect_timeout="
                    f"{config.connect_timeout:g}s"
                ) from None
            if isinstance(error, BrokerRefusedError):
                raise BrokerConnectionError(
                    f"{described}: RabbitMQ refused {error.request} while setting up: "
                    f"{error.reply_code} {error.reply_text} (the user needs configure, write and read "
                    "permissions on the vhost)"
                ) from None
            raise
        self._setting_up = None
        if self._closed:
            await connection.close()
            raise ChannelLayerClosedError("the channel layer was closed while connecting")
        return connection

    async def _set_up(self, connection: AmqpConnection) -> None:
        """Declare the exchange and queue, bind the groups with members, start consuming."""
        config = self.config
        self._last_delivery_tag = self._acked_delivery_tag = 0
        await connection.open_channel(CONTROL_CHANNEL, [])
        try:
            await connection.call(
                CONTROL_CHANNEL,
                commands.Exchange.Declare(exchange=self._groups_exchange, exchange_type="direct"),
            )
        except BrokerRefusedError as error:
            if error.reply_code != 406:
                raise
            # Declared elsewhere with other flags (durable, say): use it as it is.
            await connection.call(
                CONTROL_CHANNEL, commands.Exchange.Declare(exchange=self._groups_exchange, passive=True)
            )
        arguments = {
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
        # From here on, group_add() and group_discard() bind and unbind on this connection
        # themselves, so the groups bound below plus theirs are every group with members.
        self._setting_up = connection
        await asyncio.gather(*(self._bind_on(connection, group) for group in list(self.router.groups)))
        await connection.open_channel(PUBLISH_CHANNEL, [commands.Confirm.Select()], essential=True)
        await connection.open_channel(
            CONSUME_CHANNEL,
            [
                commands.Basic.Qos(prefetch_count=config.prefetch_count),
                commands.Basic.Consume(queue=self.queue_name, consumer_tag="channels", exclusive=True),
            ],
            essential=True,
        )
        # Never "open but deaf": a message to ourselves must come back before we say we are up.
        probe = f"{self._channel_prefix}probe.{random_name(12)}"
        self._probe = (probe, asyncio.get_running_loop().create_future())
        try:
            accepted = await connection.publish(
                PUBLISH_CHANNEL,
                b"",
                self.queue_name.encode(),
                channel_properties(probe),
                self._cipher.seal(PROBE_BODY, probe) if self._cipher is not None else PROBE_BODY,
            )
        except BrokerConnectionError:
            raise BrokerConnectionError(
                f"the connection to {connection.description} was lost while checking that it receives"
            ) from None
        if not accepted:
            raise BrokerConnectionError(f"{connection.description} refused the probe message")
        await self._probe[1]
        self._probe = None

    def _on_lost(self, connection: AmqpConnection, error: BrokerConnectionError) -> None:
        if connection is not self._connection:
            return  # an attempt still setting up: it fails by itself, and its caller reports it
        self._connection = None
        self._up.clear()
        self._last_error = error
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        if self._closed:
            return
        logger.warning("%s; reconnecting", error)  # one warning per outage
        self._start_reconnecting()

    def _start_reconnecting(self) -> None:
        if not self._closed and (self._reconnecting is None or self._reconnecting.done()):
            self._reconnecting = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        """Reconnect in the background: capped exponential backoff with jitter."""
        delay = self.config.reconnect_delay_min
        started = time.monotonic()
        while not self._closed:
            try:
                connection = await self._connect_any()
            except ChannelLayerClosedError:
                return
            except BrokerConnectionError as error:
                self._last_error = error
                logger.debug("reconnecting failed: %s", error)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.config.reconnect_delay_max)
                continue
            self._install(connection)
            logger.warning(
                "reconnected to %s after %.1fs", connection.description, time.monotonic() - started
            )
            return

    # Deliveries -----------------------------------------------------------------------------

    def _on_delivery(self, delivery: Delivery | UndecodableDelivery) -> None:
        self._last_delivery_tag = delivery.delivery_tag
        if type(delivery) is UndecodableDelivery:
            self.dropped[DROPPED_TOO_LARGE if delivery.too_large else DROPPED_UNDECODABLE] += 1
            self._dropped_log.warning("dropped a message from the wire: %s", delivery.reason)
            return
        # Where it was sent: the group (routing key on the groups exchange) or the channel.
        to_group = delivery.exchange == self._groups_exchange
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
        if self._probe is not None and destination == self._probe[0]:
            if not self._probe[1].done():
                self._probe[1].set_result(None)
            return
        self.router.deliver(destination, message, now)

    def _ack_deliveries(self) -> None:
        """Acknowledge what arrived, unless the router is full (then RabbitMQ keeps the rest)."""
        tag = self._last_delivery_tag
        if tag > self._acked_delivery_tag and not self.router.is_full:
            connection = self._connection
            if connection is not None:
                # RabbitMQ sends no more than prefetch_count unacknowledged messages: once
                # half of them await an ack, write it at once, or delivery stalls; below
                # that, it goes out with the iteration's other writes.
                unacked = tag - self._acked_delivery_tag
                connection.ack(CONSUME_CHANNEL, tag, now=unacked * 2 >= self.config.prefetch_count)
                self._acked_delivery_tag = tag

    def _schedule_housekeeping(self) -> None:
        interval = min(1.0, self.config.expiry / 4, self.config.group_expiry / 4)
        loop = asyncio.get_running_loop()
        self._housekeeping = loop.call_later(interval, self._housekeep, interval)

    def _housekeep(self, interval: float) -> None:
        """Expire buffered messages and memberships; unbind groups that lost every member."""
        now = time.monotonic()
        dropped = self.router.expire_messages(now)
        if dropped:
            self._expired_log.warning(
                "dropped %d message(s) nobody read within expiry=%gs", dropped, self.config.expiry
            )
        for group in self.router.expire_memberships(now):
            future = asyncio.ensure_future(self.unbind(group))
            future.add_done_callback(_log_failure)
        if self._connection is not None and not self._closed:
            self._housekeeping = asyncio.get_running_loop().call_later(interval, self._housekeep, interval)

    # The layer's operations, on this link's loop ------------------------------------------------

    async def new_channel(self) -> str:
        if not self._ever_connected:
            await self.connection()  # the queue must exist before anyone sends to the channel
        return f"{self._channel_prefix}{random_name(12)}"

    async def receive(self, channel: str) -> dict[str, Any]:
        router = self.router
        message = router.take(channel, time.monotonic())
        if message is not EMPTY:
            return message
        if self._closed:
            raise StopConsumer()
        if not self._ever_connected:
            await self.connection()
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

        The message travels to ``result`` on ``caller``; if that receive() was cancelled
        meanwhile, or its loop is gone, the message is put back for the next receive().
        Such receives of one channel take their turns: the next one starts only once the
        previous message has reached its caller or is back in the inbox, so that a
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
            finish()
            raise
        except BaseException as error:
            _call_on(caller, _settle_exception, result, error)
            finish()
            return

        def put_back_and_finish() -> None:
            self._put_back(channel, message)
            finish()

        def settle() -> None:  # on the caller's loop
            if result.done():  # that receive() was cancelled meanwhile
                _call_on(self.loop, put_back_and_finish)
            else:
                result.set_result(message)
                _call_on(self.loop, finish)

        def watch_caller() -> None:  # a loop closed with our callback pending never runs it
            if settled.done():
                return
            if caller.is_closed():
                put_back_and_finish()
            else:
                self.loop.call_later(0.5, watch_caller)

        if _call_on(caller, settle):
            self.loop.call_later(0.5, watch_caller)
        else:
            put_back_and_finish()

    async def group_add(self, group: str, channel: str) -> None:
        if not self._ever_connected:
            await self.connection()
        if self.router.add_membership(group, channel, time.monotonic()):
            connection = self._connection if self.is_connected else self._setting_up
            if connection is None or not connection.is_open:
                return  # an outage: the reconnection binds every group that has members
            try:
                await self._change_binding(group, lambda group: self._bind_on(connection, group))
            except BrokerConnectionError:
                pass  # lost mid-way: the reconnection binds every group that has members
            except BaseException:
                self.router.discard_membership(group, channel)
                raise
        else:
            pending = self._group_changes.get(group)
            if pending is not None:  # another group_add is still binding this group
                try:
                    await asyncio.shield(pending)
                except BrokerConnectionError:
                    pass
                except BaseException:
                    self.router.discard_membership(group, channel)
                    raise

    async def group_discard(self, group: str, channel: str) -> None:
        if self.router.discard_membership(group, channel):
            connection = self._connection if self.is_connected else self._setting_up
            if connection is None or not connection.is_open:
                return  # the binding went with the connection
            await self._change_binding(group, lambda group: self._unbind_on(connection, group))

    async def _change_binding(self, group: str, change: Any) -> None:
        """Bind or unbind; later group calls for the same group wait for it."""
        future = asyncio.ensure_future(change(group))
        self._group_changes[group] = future
        try:
            await asyncio.shield(future)
        finally:
            if self._group_changes.get(group) is future:
                del self._group_changes[group]

    async def flush(self) -> None:
        groups = self.router.flush()
        if self._closed or not self.is_connected:
            return  # no queue to purge; the bindings went with the connection
        await self.purge()
        # Deliveries already on their way were not purged. A request on the consuming channel
        # is answered after them (one channel's frames keep their order): then drop them too.
        connection = self._connection
        if connection is not None and connection.is_open:
            await connection.call(
                CONSUME_CHANNEL, commands.Basic.Qos(prefetch_count=self.config.prefetch_count)
            )
        self.router.flush()
        await asyncio.gather(*(self.unbind(group) for group in groups))

    # Requests -------------------------------------------------------------------------------

    def publish(self, exchange: bytes, routing_key: bytes, properties: bytes, body: bytes) -> Awaitable[bool]:
        """Publish; await the result for the broker's confirm: True when accepted, False when refused."""
        connection = self._connection
        if connection is not None and connection.is_open:
            return connection.publish(PUBLISH_CHANNEL, exchange, routing_key, properties, body)
        return self._publish_when_connected(exchange, routing_key, properties, body)

    async def _publish_when_connected(
        self, exchange: bytes, routing_key: bytes, properties: bytes, body: bytes
    ) -> bool:
        connection = await self.connection()
        return await connection.publish(PUBLISH_CHANNEL, exchange, routing_key, properties, body)

    async def _bind_on(self, connection: AmqpConnection, group: str) -> None:
        await connection.call(
            CONTROL_CHANNEL,
            commands.Queue.Bind(queue=self.queue_name, exchange=self._groups_exchange, routing_key=group),
        )

    async def _unbind_on(self, connection: AmqpConnection, group: str) -> None:
        await connection.call(
            CONTROL_CHANNEL,
            commands.Queue.Unbind(queue=self.queue_name, exchange=self._groups_exchange, routing_key=group),
        )

    async def unbind(self, group: str) -> None:
        connection = self._connection
        if connection is None or not connection.is_open:
            return  # the binding went with the connection
        await connection.call(
            CONTROL_CHANNEL,
            commands.Queue.Unbind(queue=self.queue_name, exchange=self._groups_exchange, routing_key=group),
        )

    async def purge(self) -> None:
        connection = await self.connection()
        await connection.call(CONTROL_CHANNEL, commands.Queue.Purge(queue=self.queue_name))

    async def close(self) -> None:
        """Stop consuming and close the connection; waiting receives raise StopConsumer. Idempotent."""
        self._closed = True
        self.router.close(StopConsumer)
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        if self._reconnecting is not None and not self._reconnecting.done():
            self._reconnecting.cancel()
        connecting = self._connecting
        if connecting is not None:
            try:
                await asyncio.shield(connecting)
            except BaseException:
                pass
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()


def distinct_ips(infos: list[tuple[Any, ...]]) -> list[str]:
    """The addresses of a ``getaddrinfo()`` answer, each once, in the resolver's order."""
    ips: list[str] = []
    for *_, sockaddr in infos:
        if sockaddr[0] not in ips:
            ips.append(sockaddr[0])
    return ips


def describe_target(address: BrokerAddress, ip: str) -> str:
    """The broker address for messages (no password), with the IP when the URL names a host."""
    return str(address) if ip == address.host else f"{address} ({ip})"


async def open_connection(
    address: BrokerAddress,
    ip: str,
    config: LayerConfig,
    *,
    timeout: float,
    connection_name: str,
    on_delivery: DeliveryHandler,
    on_deliveries_done: Callable[[], None],
    on_lost: Callable[[AmqpConnection, BrokerConnectionError], None],
) -> AmqpConnection:
    """An AMQP connection to one address of a broker, as the layer opens it (TLS, heartbeat, properties).

    ``connection_name`` is what RabbitMQ's tools show for it. Raises BrokerConnectionError.
    """
    return await AmqpConnection.connect(
        ip,
        address.port,
        Credentials(address.username, address.password),
        address.virtual_host,
        ssl_context=config.ssl_context,
        server_hostname=address.host,
        timeout=timeout,
        heartbeat=config.heartbeat,
        client_properties={
            "product": "channels_rabbitmq",
            "version": __version__,
            "connection_name": connection_name,
            "capabilities": {
                "publisher_confirms": True,
                "basic.nack": True,
                "consumer_cancel_notify": True,
                "connection.blocked": True,
                "authentication_failure_close": True,  # a wrong password gets a 403, not a bare hang-up
            },
        },
        description=describe_target(address, ip),
        on_delivery=on_delivery,
        on_deliveries_done=on_deliveries_done,
        on_lost=on_lost,
        max_body_size=config.max_message_size,  # the layer never sends more: a bigger body is foreign
    )


def random_name(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def _call_on(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> bool:
    """Run ``callback`` on ``loop`` from any thread; False when that loop is closed."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        return False
    return True


def _settle_exception(result: asyncio.Future[Any], error: BaseException) -> None:
    if not result.done():
        result.set_exception(error)


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("could not change a group binding: %s", future.exception())
