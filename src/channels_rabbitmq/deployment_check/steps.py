"""Steps 2 to 5, against the broker: connect, permissions, the layer's round trips, latency.

Each step reports one line ("ok", "FAIL" with hints, or "skip" when an earlier step
failed) and decides what failed by the error's type and fields (:mod:`.explain`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, NoReturn, TypeVar

from ..amqp.channel import AmqpChannel
from ..amqp.connection import AmqpConnection
from ..amqp.errors import AmqpError
from ..config import BrokerAddress, LayerConfig
from ..core import RabbitmqChannelLayer
from ..exceptions import BrokerConnectionError, BrokerRefusedError, BrokerUnreachableError, ReplyCode
from ..link.channel_plan import CONTROL_CHANNEL, FIRST_NORMAL_CHANNEL_ID, PUBLISH_CHANNEL, ROLL_CALL_CHANNEL
from ..link.connector import distinct_ips, open_connection
from ..link.errors import layer_error, translated
from ..link.topology import random_name
from ..wire import NO_PROPERTIES, queue_of
from .explain import explain_connection_error, is_access_refused, permissions_needed, plain_reason
from .report import Report

T = TypeVar("T")

TEST_QUEUE_PREFIX = "channels.check."  # matches the layer's own "channels.*" permissions
LATENCY_ROUND_TRIPS = 20
SLOW_ROUND_TRIP_MS = 50.0


async def check_broker(layer: RabbitmqChannelLayer, timeout: float, report: Report) -> None:
    """Connect to each broker and check the permissions there, then the layer itself if any passed."""
    config = layer.config
    usable = 0
    try:
        for address in config.addresses:
            connection = await connect(address, config, report)
            if connection is None:
                report.skip(f"permissions on {address}", "not connected")
                continue
            try:
                if await check_permissions(connection, address, config, timeout, report):
                    usable += 1
                await check_versions_and_settings(connection, address, config, timeout, report)
            finally:
                await connection.close()
        if usable:
            await check_layer(layer, timeout, report)
        else:
            reason = "no broker passed the checks above"
            report.skip("layer", reason)
            report.skip("latency", reason)
    finally:
        try:
            await asyncio.wait_for(layer.close(), timeout)
        except Exception as error:
            report.fail(f"closing the layer: {type(error).__name__}: {error}")


# Step 2: connect ---------------------------------------------------------------------------------


async def connect(address: BrokerAddress, config: LayerConfig, report: Report) -> AmqpConnection | None:
    """Open an AMQP connection to one broker, trying each address its name resolves to."""
    what = f"connect to {address}"
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + config.connect_timeout
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM), config.connect_timeout
        )
    except asyncio.TimeoutError:
        report.fail(
            f"{what}: looking up the host name {address.host!r} took over {config.connect_timeout:g}s",
            "hint: this machine's DNS does not answer; check /etc/resolv.conf",
        )
        return None
    except OSError as error:
        report.fail(
            f"{what}: the host name {address.host!r} does not resolve ({plain_reason(error)})",
            "hint: check the spelling of the host name, and that this machine's DNS or /etc/hosts knows it",
        )
        return None
    ips = distinct_ips(infos)
    errors: list[BrokerConnectionError] = []
    for index, ip in enumerate(ips):
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            with muted(AmqpConnection.__module__):  # its errors are reported below, explained
                connection = await open_connection(
                    address,
                    ip,
                    config,
                    timeout=remaining / (len(ips) - index),
                    connection_name="channels_rabbitmq check",
                    on_delivery=_ignore,
                    on_deliveries_done=_ignore,
                    on_lost=_ignore,
                )
        except BrokerConnectionError as error:
            errors.append(error)
            continue
        elapsed_ms = (loop.time() - started) * 1000
        over_tls = " over TLS" if address.uses_tls else ""
        report.ok(
            f"{what}: {describe_server(connection.machine.server_properties)}; "
            f"login and vhost {address.virtual_host!r} accepted{over_tls} in {elapsed_ms:.0f} ms"
        )
        return connection
    if not errors:
        report.fail(
            f"{what}: timed out: no connection within connect_timeout={config.connect_timeout:g}s",
            "hint: the broker is slow to answer or unreachable; raise --timeout (or connect_timeout) "
            "if the network is just slow",
        )
        return None
    # Explain the failure of an address where something answered, rather than a refusal by another.
    answered = [error for error in errors if not _refused_tcp(error)]
    summary, hints = explain_connection_error((answered or errors)[-1], address, config)
    report.fail(f"{what}: {summary}", *(str(error) for error in errors), *hints)
    return None


def _refused_tcp(error: BrokerConnectionError) -> bool:
    return isinstance(error, BrokerUnreachableError) and error.errno == errno.ECONNREFUSED


@contextlib.contextmanager
def muted(logger_name: str) -> Iterator[None]:
    """Silence a logger for a while: what it would log, this command reports in plain words."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _ignore(*_args: Any) -> None:
    pass


def describe_server(properties: dict[str, Any]) -> str:
    """The broker as its ``connection.start`` names it: product, version, platform, cluster."""

    def text(key: str) -> str:
        value = properties.get(key)
        return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")

    server = " ".join(part for part in (text("product"), text("version")) if part) or "an unnamed broker"
    if text("platform"):
        server += f" on {text('platform')}"
    if text("cluster_name"):
        server += f", cluster {text('cluster_name')}"
    return server


# Step 3: permissions -----------------------------------------------------------------------------


class Refused(Exception):
    """One request of the permissions check was refused or failed."""


async def check_permissions(
    connection: AmqpConnection, address: BrokerAddress, config: LayerConfig, timeout: float, report: Report
) -> bool:
    """Do what the layer does with a queue and the groups exchange; report the first refusal.

    The requests go in an order where each one needs a single permission not proven by
    the ones before it, so a 403 ACCESS_REFUSED names the permission that is missing.
    """
    what = f"permissions on {address}"
    queue = f"{TEST_QUEUE_PREFIX}{random_name(12)}"
    exchange = config.groups_exchange
    on_queue = "queues named channels.*"
    on_exchange = f"the exchange {exchange!r}"

    control = AmqpChannel(connection, CONTROL_CHANNEL, stall_limit=timeout)
    publishing = AmqpChannel(connection, PUBLISH_CHANNEL, stall_limit=timeout)

    async def request(call: Awaitable[Any]) -> Any:
        """One request, its failure as the layer's error (the AMQP client raises its own)."""
        with translated(str(address), address.virtual_host):
            return await asyncio.wait_for(call, timeout)

    async def declare_exchange() -> None:
        try:
            await request(control.declare_exchange(exchange, "direct"))
        except BrokerRefusedError as error:
            if error.reply_code != ReplyCode.PRECONDITION_FAILED:
                raise
            # Declared elsewhere with other flags: the layer uses it as it is, and so do we.
            await request(control.declare_exchange(exchange, passive=True))

    async def change_bindings() -> None:
        # A binding needs write on the queue and read on the exchange. Unbinding from an exchange
        # named like the queue (there is none: nothing changes) needs write on the queue and read
        # on the queue's own name, which the purge before proved: only write on the queue is left.
        try:
            await request(control.unbind(queue, queue, queue))
        except BrokerRefusedError as error:
            if error.reply_code != ReplyCode.NOT_FOUND:  # some versions answer so for a missing exchange
                raise

    async def publish() -> None:
        try:
            accepted = await asyncio.wait_for(
                publishing.publish(b"", queue.encode(), NO_PROPERTIES, b"check"), timeout
            )
        except AmqpError as error:
            # A refused publish closes the channel, which is then reopened: let that finish
            # so that closing the connection cuts nothing short.
            if connection.is_open:
                with contextlib.suppress(BrokerConnectionError, BrokerRefusedError, asyncio.TimeoutError):
                    await request(publishing.confirm_select())
            raise layer_error(error, str(address), address.virtual_host) from None
        if not accepted:
            raise Refused("RabbitMQ refused the message (basic.nack)")

    # What to do, how, and the one permission it needs that the steps before have not proven:
    # (kind, on what), or None for the unbinding, whose permissions the binding proved.
    steps: list[tuple[str, Callable[[], Awaitable[Any]], tuple[str, str] | None]] = [
        (f"declare the queue {queue}", lambda: request(control.declare_queue(queue, exclusive=True)),
         ("configure", on_queue)),
        (f"declare {on_exchange}", declare_exchange, ("configure", on_exchange)),
        ("purge the queue", lambda: request(control.purge(queue)), ("read", on_queue)),
        ("change the queue's bindings", change_bindings, ("write", on_queue)),
        (f"bind the queue to {on_exchange}",
         lambda: request(control.bind(queue, exchange, queue)),
         ("read", on_exchange)),
        ("publish to the queue", publish, ("write", "the default exchange (amq.default)")),
        (f"unbind the queue from {on_exchange}",
         lambda: request(control.unbind(queue, exchange, queue)), None),
        ("delete the queue", lambda: request(control.delete_queue(queue)), ("configure", on_queue)),
    ]  # fmt: skip
    try:
        await asyncio.wait_for(control.open(), timeout)
        await asyncio.wait_for(publishing.open(confirm=True), timeout)
    except (AmqpError, asyncio.TimeoutError) as error:
        report.fail(f"{what}: cannot open an AMQP channel: {error or 'timed out'}")
        return False
    for doing, step, permission in steps:
        try:
            await step()
        except asyncio.TimeoutError:
            report.fail(f"{what}: no answer within {timeout:g}s to: {doing}")
            return False
        except (BrokerRefusedError, BrokerConnectionError, Refused) as error:
            if permission is None or not is_access_refused(error):
                report.fail(f"{what}: could not {doing}: {error}")
                return False
            kind, resource = permission
            report.fail(
                f"{what}: RabbitMQ refused to {doing}: the user {address.username!r} lacks the "
                f"{kind} permission on {resource}",
                str(error),
                *permissions_needed(address, exchange),
            )
            return False
    report.ok(f"{what}: declared, bound, published to, purged and deleted {queue}; declared {on_exchange}")
    return True


# Step 3b: what the broker's version and settings mean for this layer, and for an upgrade ---------

#: The queue an older version of this layer used for flush()'s roll call: transient and shared, the
#: kind RabbitMQ 4.3 denies (a node that holds one refuses to start once the denial is configured).
OLD_ROLL_CALL_QUEUE = "channels.links:{exchange}"
#: RabbitMQ 4.0 and later refuse messages over this by default (``max_message_size``); 3.x: 128 MiB.
RABBITMQ_4_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
#: Fewer normal-channel readers than this at once would be few for a worker (see TooManyChannelsError).
FEW_READERS = 100


def broker_version(properties: dict[str, Any]) -> tuple[int, ...]:
    """The broker's version from its ``connection.start`` properties, as numbers; () if unknown."""
    value = properties.get("version")
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")
    numbers = []
    for part in text.split("."):
        digits = "".join(character for character in part if character.isdigit())
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)


async def check_versions_and_settings(
    connection: AmqpConnection, address: BrokerAddress, config: LayerConfig, timeout: float, report: Report
) -> None:
    """Say which RabbitMQ this is and what matters about it: what this deployment holds that
    RabbitMQ 4.3 denies, and the layer's settings that the broker does not match."""
    what = f"versions and settings on {address}"
    properties = connection.machine.server_properties
    version = broker_version(properties)
    shown = ".".join(map(str, version)) or "an unknown version"
    notes: list[str] = []
    warnings: list[str] = []
    if version and version < (4,):
        notes.append(
            f"RabbitMQ {shown}: this layer also runs on 4.x as 4.3 runs by default (Khepri, transient "
            "shared queues and global QoS denied); see the Supported RabbitMQ page before upgrading"
        )
    if await _queue_exists(connection, OLD_ROLL_CALL_QUEUE.format(exchange=config.groups_exchange), timeout):
        old = OLD_ROLL_CALL_QUEUE.format(exchange=config.groups_exchange)
        warnings.append(
            f"the queue {old!r} is a transient shared queue left by an older version of this layer; "
            "RabbitMQ 4.3 denies such queues, and a node that holds one refuses to start once the denial is "
            "configured: once no process of that version runs, delete it "
            f"(rabbitmqctl delete_queue -p {address.virtual_host} '{old}')"
        )
    if version >= (4,) and config.max_message_size > RABBITMQ_4_MAX_MESSAGE_SIZE:
        warnings.append(
            f"max_message_size={config.max_message_size} is over RabbitMQ 4's default limit of 16 MiB: "
            "larger messages are refused by the broker unless its own max_message_size is raised in "
            "rabbitmq.conf"
        )
    readers = connection.channel_max - FIRST_NORMAL_CHANNEL_ID + 1
    if readers < FEW_READERS:
        warnings.append(
            f"the broker's channel_max is {connection.channel_max}: at most {max(readers, 0)} receive() "
            "calls may wait on distinct normal channels at once per process (TooManyChannelsError "
            "past that); raise channel_max in rabbitmq.conf"
        )
    heartbeat = connection.machine.heartbeat
    if heartbeat != config.heartbeat:
        notes.append(
            f"the broker negotiated a heartbeat of {heartbeat}s (the layer asks for {config.heartbeat}s): "
            "a lost peer is noticed after about twice that"
        )
    if warnings:
        report.warn(f"{what}: RabbitMQ {shown}", *warnings, *notes)
    else:
        report.ok(f"{what}: RabbitMQ {shown}; nothing here that RabbitMQ 4.3 denies", *notes)


async def _queue_exists(connection: AmqpConnection, queue: str, timeout: float) -> bool:
    """A passive declaration on a channel of its own (a 404 closes that channel, and only it): the
    roll call's, which the check uses for nothing else."""
    lookup = AmqpChannel(connection, ROLL_CALL_CHANNEL, stall_limit=timeout)
    try:
        await asyncio.wait_for(lookup.open(), timeout)
        await asyncio.wait_for(lookup.declare_queue(queue, passive=True), timeout)
    except (AmqpError, asyncio.TimeoutError):
        return False
    return True


# Steps 4 and 5: through the layer ----------------------------------------------------------------


class StepFailed(Exception):
    """A step of the layer check failed; the message says what, ``hints`` what to do."""

    def __init__(self, message: str, *hints: str) -> None:
        super().__init__(message)
        self.hints = hints


async def within(timeout: float, doing: str, call: Awaitable[T], layer: RabbitmqChannelLayer) -> T:
    """Await one layer call, turning every failure into a :class:`StepFailed` in plain words."""
    try:
        return await asyncio.wait_for(call, timeout)
    except asyncio.TimeoutError:
        raise StepFailed(f"{doing}: no result within {timeout:g}s") from None
    except (BrokerConnectionError, BrokerRefusedError) as error:
        hints: list[str] = []
        if is_access_refused(error):
            hints = permissions_needed(layer.config.address, layer.config.groups_exchange)
        raise StepFailed(f"{doing}: {error}", *hints) from None
    except Exception as error:
        raise StepFailed(f"{doing}: {type(error).__name__}: {error}") from None


def _unexpected(doing: str, got: object, wanted: object) -> NoReturn:
    raise StepFailed(f"{doing}: received {got!r}, expected {wanted!r}")


async def check_layer(layer: RabbitmqChannelLayer, timeout: float, report: Report) -> None:
    """Steps 4 and 5 through the layer itself: new_channel(), a group and a direct round trip, latency."""
    config = layer.config
    started = time.perf_counter()
    try:
        channel = await within(config.connect_timeout + timeout, "new_channel()", layer.new_channel(), layer)
    except StepFailed as failed:
        report.fail(f"layer: {failed}", *failed.hints)
        for what in ("layer: group round trip", "layer: direct round trip", "latency"):
            report.skip(what, "the layer did not connect")
        return
    report.ok(
        f"layer: new_channel() connected in {(time.perf_counter() - started) * 1000:.0f} ms "
        f"(queue {queue_of(channel)})"
    )

    group = f"channels_rabbitmq.check.{random_name(12)}"
    message = {"type": "check.group", "token": random_name(12)}
    started = time.perf_counter()
    try:
        await within(timeout, f"group_add({group!r})", layer.group_add(group, channel), layer)
        await within(timeout, "group_send()", layer.group_send(group, message), layer)
        try:
            received = await within(timeout, "receive() of the group message", layer.receive(channel), layer)
        except StepFailed as failed:
            raise StepFailed(
                str(failed),
                "hint: RabbitMQ took the message but did not route it back through the exchange "
                f"{config.groups_exchange!r}; it must be a direct exchange "
                "(rabbitmqctl list_exchanges -p VHOST name type)",
            ) from None
        if received != message:
            _unexpected("receive() of the group message", received, message)
        await within(timeout, "group_discard()", layer.group_discard(group, channel), layer)
    except StepFailed as failed:
        report.fail(f"layer: group round trip: {failed}", *failed.hints)
    else:
        elapsed_ms = (time.perf_counter() - started) * 1000
        report.ok(
            f"layer: group round trip: group_add, group_send, receive, group_discard in {elapsed_ms:.0f} ms"
        )

    started = time.perf_counter()
    try:
        direct = await within(timeout, "new_channel()", layer.new_channel(), layer)
        message = {"type": "check.direct", "token": random_name(12)}
        await within(timeout, "send()", layer.send(direct, message), layer)
        received = await within(timeout, "receive()", layer.receive(direct), layer)
        if received != message:
            _unexpected("receive()", received, message)
    except StepFailed as failed:
        report.fail(f"layer: direct round trip: {failed}", *failed.hints)
        report.skip("latency", "the direct round trip failed")
        return
    elapsed_ms = (time.perf_counter() - started) * 1000
    report.ok(f"layer: direct round trip: send, receive in {elapsed_ms:.0f} ms")

    durations: list[float] = []
    try:
        for number in range(LATENCY_ROUND_TRIPS):
            ping: dict[str, Any] = {"type": "check.ping", "number": number}
            started = time.perf_counter()
            await within(timeout, "send()", layer.send(direct, ping), layer)
            received = await within(timeout, "receive()", layer.receive(direct), layer)
            if received != ping:
                _unexpected("receive()", received, ping)
            durations.append((time.perf_counter() - started) * 1000)
    except StepFailed as failed:
        report.fail(f"latency: round trip {len(durations) + 1}: {failed}", *failed.hints)
        return
    median = statistics.median(durations)
    notes = []
    if median > SLOW_ROUND_TRIP_MS:
        notes.append(
            f"note: over {SLOW_ROUND_TRIP_MS:g} ms per round trip; every send() waits for RabbitMQ's "
            "confirm, so a distant or busy broker slows every message"
        )
    report.ok(
        f"latency: {LATENCY_ROUND_TRIPS} send -> receive round trips: "
        f"median {median:.1f} ms, max {max(durations):.1f} ms",
        *notes,
    )
