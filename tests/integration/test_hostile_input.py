"""Hostile messages published straight to a live layer's queue, and to a group it is in.

Hypothesis makes batches of raw publishes (any bytes, msgpack values that are not
messages, maps with non-string keys, deep nesting, extension types; properties with no
target, a target of the wrong type, unreadable header tables). After each batch a good
``send()`` and a good ``group_send()`` must still arrive, behind exactly the hostile
bodies that are maps addressed to the channel. One layer pair serves every example: a
sync test drives its own event loop, so the checks after the last example (rate-limited
warnings, no reconnection, no error in the loop) see the whole run.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pamqp import commands
from pamqp import header as pamqp_header

from channels_rabbitmq.amqp.frames import HEADERS_FLAG, encode_string_headers
from channels_rabbitmq.amqp.opening import connect as amqp_connect
from channels_rabbitmq.amqp.protocol import Credentials
from channels_rabbitmq.core import RabbitmqChannelLayer
from channels_rabbitmq.link import BrokerLink
from channels_rabbitmq.link.channel_plan import PUBLISH_CHANNEL
from channels_rabbitmq.stats import DROPPED_TOO_LARGE, DROPPED_UNDECODABLE
from channels_rabbitmq.wire import NO_PROPERTIES, channel_properties
from channels_rabbitmq.wire.serializers import MalformedMessage, decode_message
from tests.conftest import Broker, link_of
from tests.unit.test_properties import HOSTILE_BODIES, encode_table, nested_table

GROUP = "hostile.room"
GROUPS_EXCHANGE = b"groups"
RECEIVE_TIMEOUT = 10.0
DROPPED = "dropped a message from the wire"


# What a hostile publish is made of ---------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where the properties say the message goes, once the channel name is known."""

    properties: bytes
    reaches_channel: bool  # a readable asgi_channel header naming exactly the channel
    readable: bool = True  # False: the receiver cannot parse the header table at all


Recipe = Callable[[str], Target]


@dataclass(frozen=True)
class Publish:
    route: str  # "direct" (default exchange, routing key = the queue) or "group"
    recipe_name: str
    recipe: Recipe
    body: bytes

    def __repr__(self) -> str:
        body = repr(self.body[:40]) + ("..." if len(self.body) > 40 else "")
        return f"Publish({self.route}, {self.recipe_name}, {body})"


def pamqp_properties(properties: commands.Basic.Properties) -> bytes:
    """Encoded basic properties (flags first), as pamqp writes them."""
    return pamqp_header.ContentHeader(0, 0, properties).marshal()[12:]


def raw_headers(entries: list[tuple[bytes, str, Any]]) -> bytes:
    return struct.pack(">H", HEADERS_FLAG) + encode_table(entries)


# Header values of every type but a string; pamqp writes bytearray as a byte array ("x").
non_string_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False, width=32)
    | st.binary(max_size=12).map(bytearray)
    | st.decimals(min_value=0, max_value=10_000, places=2)
    | st.datetimes(min_value=datetime.datetime(1970, 1, 2), max_value=datetime.datetime(2100, 1, 1)).map(
        lambda moment: moment.replace(tzinfo=datetime.timezone.utc)
    ),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


def recipe_strategies() -> st.SearchStrategy[tuple[str, Recipe]]:
    text = st.text(st.characters(codec="utf-8"), max_size=30)

    def string_header(value: str, prefixed: bool) -> tuple[str, Recipe]:
        def build(channel: str) -> Target:
            target = f"{channel.partition('!')[0]}!{value}" if prefixed else value
            return Target(encode_string_headers({"asgi_channel": target}), target == channel)

        return (f"string header {'<queue>!' if prefixed else ''}{value!r}", build)

    def other_key(key: str) -> tuple[str, Recipe]:
        return (
            f"the channel under key {key!r}",
            lambda channel: Target(encode_string_headers({key: channel}), key == "asgi_channel"),
        )

    def non_string(value: Any) -> tuple[str, Recipe]:
        blob = pamqp_properties(commands.Basic.Properties(headers={"asgi_channel": value}))
        return (f"asgi_channel of type {type(value).__name__}", lambda channel: Target(blob, False))

    def with_extras(extras: dict[str, Any]) -> tuple[str, Recipe]:
        def build(channel: str) -> Target:
            headers = {**extras, "asgi_channel": channel}
            return Target(pamqp_properties(commands.Basic.Properties(headers=headers)), True)

        return (f"the channel beside {sorted(extras)}", build)

    fixed: list[tuple[str, Recipe]] = [
        ("no properties", lambda channel: Target(NO_PROPERTIES, False)),
        ("the channel", lambda channel: Target(channel_properties(channel), True)),
        (
            "the channel and other properties",
            lambda channel: Target(
                pamqp_properties(
                    commands.Basic.Properties(
                        content_type="text/plain",
                        delivery_mode=2,
                        message_id="m",
                        timestamp=datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc),
                        headers={"asgi_channel": channel},
                    )
                ),
                True,
            ),
        ),
        (
            "an invalid UTF-8 channel",
            lambda channel: Target(
                raw_headers([(b"asgi_channel", "S", channel.encode() + b"\xff\xfe")]), False
            ),
        ),
        (
            "the channel as a byte array",
            lambda channel: Target(raw_headers([(b"asgi_channel", "x", channel.encode())]), False),
        ),
        (
            "a wrong channel, then the channel under the same key",
            lambda channel: Target(
                raw_headers([(b"asgi_channel", "S", b"nowhere!x"), (b"asgi_channel", "S", channel.encode())]),
                True,
            ),
        ),
        (
            "an invalid UTF-8 key beside the channel",
            lambda channel: Target(
                raw_headers([(b"\xff\xfe", "I", 5), (b"asgi_channel", "S", channel.encode())]), False, False
            ),
        ),
        (
            "a timestamp past year 9999 beside the channel",
            lambda channel: Target(
                raw_headers([(b"t", "T", 2**64 - 1), (b"asgi_channel", "S", channel.encode())]), False, False
            ),
        ),
        (
            "tables nested 2000 deep",
            lambda channel: Target(struct.pack(">H", HEADERS_FLAG) + nested_table("F", 2000), False, False),
        ),
        (
            "arrays nested 2000 deep",
            lambda channel: Target(struct.pack(">H", HEADERS_FLAG) + nested_table("A", 2000), False, False),
        ),
    ]
    return st.one_of(
        st.sampled_from(fixed),
        st.builds(string_header, text, st.booleans()),
        st.builds(other_key, st.text("abcasgi_chnel", min_size=1, max_size=14)),
        st.builds(non_string, non_string_values),
        st.builds(
            with_extras,
            st.dictionaries(st.text("xyz-", min_size=1, max_size=5), non_string_values, max_size=3),
        ),
    )


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


junk_keys = (
    st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.booleans()
    | st.none()
    | st.floats(allow_nan=False)
)
junk_values = st.recursive(
    junk_keys | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(junk_keys, children, max_size=4),
    max_leaves=12,
)
bodies = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(HOSTILE_BODIES),
    junk_values.map(pack),  # any value, mostly not a map
    st.dictionaries(junk_keys, junk_values, min_size=1, max_size=5).map(pack),  # maps with non-string keys
    st.dictionaries(st.text(max_size=8), junk_values, max_size=4).map(pack),  # maps of junk
    # {"t": a timestamp extension (type -1) of any length and content: valid or not}
    st.binary(max_size=13).map(lambda data: b"\x81\xa1t\xc7" + bytes([len(data)]) + b"\xff" + data),
)


@st.composite
def publishes(draw: st.DrawFn) -> Publish:
    name, recipe = draw(recipe_strategies())
    return Publish(draw(st.sampled_from(["direct", "group"])), name, recipe, draw(bodies))


def decoded(body: bytes) -> dict[Any, Any] | None:
    try:
        return decode_message(body)
    except MalformedMessage:
        return None


def same(received: Any, expected: Any) -> bool:
    """Equal, or packing to the same bytes (a NaN in random bytes is not equal to itself)."""
    return received == expected or pack(received) == pack(expected)


# The layer pair and one batch --------------------------------------------------------------------


@dataclass
class Pair:
    receiver: RabbitmqChannelLayer
    producer: RabbitmqChannelLayer
    channel: str
    link: BrokerLink  # the receiver's
    producer_link: BrokerLink


async def make_pair(url: str) -> Pair:
    # A large local_capacity: hostile messages addressed to channels nobody reads stay held
    # until expiry, and must not fill the router and stall the channel under test.
    receiver = RabbitmqChannelLayer(host=url, local_capacity=10_000)
    producer = RabbitmqChannelLayer(host=url)
    channel = await receiver.new_channel()
    await receiver.group_add(GROUP, channel)
    await producer.new_channel()
    loop = asyncio.get_running_loop()
    return Pair(receiver, producer, channel, receiver._links.of_loop(loop), producer._links.of_loop(loop))


@dataclass
class Tally:
    publishes: int = 0
    malformed: int = 0
    unreadable: int = 0
    delivered_junk: int = 0


async def check_batch(pair: Pair, batch: list[Publish], tally: Tally) -> None:
    connection = await pair.producer_link.publishing.connected()
    queue = pair.link.queue_name.encode()
    expected: list[Any] = []
    for publish in batch:
        target = publish.recipe(pair.channel)
        if publish.route == "group":
            exchange, routing_key, reaches = GROUPS_EXCHANGE, GROUP.encode(), target.readable
        else:
            exchange, routing_key, reaches = b"", queue, target.readable and target.reaches_channel
        accepted = await connection.publish(
            PUBLISH_CHANNEL, exchange, routing_key, target.properties, publish.body
        )
        assert accepted, f"RabbitMQ refused {publish!r}"
        message = decoded(publish.body)
        tally.publishes += 1
        tally.malformed += message is None
        tally.unreadable += not target.readable
        if reaches and message is not None:
            expected.append(message)
    token = secrets.token_hex(8)
    good, good_group = {"type": "good", "token": token}, {"type": "good.group", "token": token}
    await pair.producer.send(pair.channel, good)
    await pair.producer.group_send(GROUP, good_group)
    expected += [good, good_group]
    received = []
    while len(received) < len(expected):
        received.append(await asyncio.wait_for(pair.receiver.receive(pair.channel), RECEIVE_TIMEOUT))
    tally.delivered_junk += len(expected) - 2
    assert len(received) == len(expected)
    for got, want in zip(received, expected, strict=True):
        assert same(got, want), f"received {got!r}, expected {want!r}"


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def matching(self, text: str) -> list[logging.LogRecord]:
        return [record for record in self.records if text in record.getMessage()]


def test_hostile_publishes_are_dropped_or_delivered_and_the_layer_goes_on(broker: Broker) -> None:
    loop = asyncio.new_event_loop()
    loop_errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    records = Records()
    package_logger = logging.getLogger("channels_rabbitmq")
    package_logger.addHandler(records)
    tally = Tally()
    pair: Pair | None = None
    try:
        pair = loop.run_until_complete(make_pair(broker.url))
        receiver_connection = pair.link.consuming.connection
        producer_connection = pair.producer_link.publishing.connection
        started = time.monotonic()

        @settings(
            max_examples=50,
            deadline=None,
            database=None,
            derandomize=True,  # the same examples every run: the tallies below are stable
            phases=[Phase.explicit, Phase.generate],  # no shrinking: the broker's state carries over
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(st.lists(publishes(), min_size=1, max_size=8))
        def one_batch(batch: list[Publish]) -> None:
            assert pair is not None
            loop.run_until_complete(asyncio.wait_for(check_batch(pair, batch, tally), 60))

        one_batch()
        elapsed = time.monotonic() - started

        # Every hostile body was dropped or delivered; nothing broke the connections.
        assert pair.link.consuming.connection is receiver_connection
        assert receiver_connection.is_open
        assert pair.producer_link.publishing.connection is producer_connection
        assert producer_connection.is_open
        assert tally.malformed >= 5, tally  # the examples did hold each kind of hostile input
        assert tally.unreadable >= 3, tally
        assert tally.delivered_junk >= 5, tally
        dropped = records.matching(DROPPED)
        assert dropped, "no warning about the dropped messages"
        # Rate-limited: one warning per 10 s, however many bad messages.
        assert len(dropped) <= 2 + elapsed // 10
        assert len(dropped) < tally.malformed
        assert not records.matching("could not be routed")  # nothing raised out of _on_delivery
        assert not records.matching("AMQP protocol error")
        assert not records.matching("reconnecting")
        assert loop_errors == []
    finally:
        package_logger.removeHandler(records)
        if pair is not None:
            loop.run_until_complete(pair.receiver.close())
            loop.run_until_complete(pair.producer.close())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


# A peer that never finishes the handshake ----------------------------------------------------------


async def test_cancelling_connect_during_the_handshake_leaves_no_error_in_the_loop() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    greeted = asyncio.Event()

    async def say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(8)  # the protocol header; never answered
        greeted.set()
        await reader.read()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(say_nothing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connecting = asyncio.ensure_future(
        amqp_connect(
            "127.0.0.1",
            port,
            Credentials("guest", "guest"),
            "/",
            ssl_context=None,
            timeout=10,
            heartbeat=60,
            client_properties={},
            description="a silent peer",
            on_delivery=lambda delivery: None,
            on_deliveries_done=lambda: None,
            on_lost=lambda error: None,
        )
    )
    try:
        await asyncio.wait_for(greeted.wait(), 5)
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting
        for _ in range(20):  # let the aborted transport call connection_lost()
            await asyncio.sleep(0.01)
    finally:
        server.close()
        await server.wait_closed()
        loop.set_exception_handler(None)
    assert [context.get("message") for context in errors] == []


# Bodies over max_message_size, ext types: dropped unread and counted --------------------------------

LIMIT = 10_000  # the receiver's max_message_size


def message_of_size(kind: str, size: int) -> dict[str, Any]:
    """A message that packs to exactly ``size`` bytes (between 1 and 64 KiB)."""
    overhead = len(pack({"type": kind, "x": b"x" * 1000})) - 1000
    message = {"type": kind, "x": b"x" * (size - overhead)}
    assert len(pack(message)) == size
    return message


async def test_bodies_over_max_message_size_are_dropped_unread_counted_and_the_next_message_arrives(
    make_layer: Callable[..., RabbitmqChannelLayer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver = make_layer(max_message_size=LIMIT)
    outsider = make_layer()  # publishes raw bodies straight to the receiver's queue and group
    channel = await receiver.new_channel()
    await receiver.group_add(GROUP, channel)
    await outsider.new_channel()
    link, outsider_link = link_of(receiver), link_of(outsider)
    queue, properties = link.queue_name.encode(), channel_properties(channel)
    # One body fits in a single frame, one spans several (frame_max is 128 KiB), one is just over.
    oversized = [pack({"type": "big", "x": b"x" * size}) for size in (LIMIT * 2, 400_000)]
    just_over = pack(message_of_size("big", LIMIT + 1))
    with caplog.at_level(logging.WARNING, logger="channels_rabbitmq"):
        for body in [*oversized, just_over]:
            assert await outsider_link.publish(b"", queue, properties, body)
            assert await outsider_link.publish(GROUPS_EXCHANGE, GROUP.encode(), NO_PROPERTIES, body)
        at_limit = message_of_size("at.limit", LIMIT)
        await outsider.send(channel, at_limit)
        await outsider.group_send(GROUP, {"type": "after", "n": 2})
        assert await asyncio.wait_for(receiver.receive(channel), RECEIVE_TIMEOUT) == at_limit
        assert await asyncio.wait_for(receiver.receive(channel), RECEIVE_TIMEOUT) == {"type": "after", "n": 2}
    assert link.dropped == {DROPPED_TOO_LARGE: 6}
    assert any("too large" in record.getMessage() for record in caplog.records)
    assert link.is_connected
    assert not [record for record in caplog.records if "reconnecting" in record.getMessage()]


@pytest.mark.parametrize(
    "value",
    [msgpack.ExtType(3, b"abc"), msgpack.Timestamp(1_700_000_000, 1)],
    ids=["ext", "timestamp"],
)
async def test_bodies_with_ext_types_are_dropped_and_counted_as_undecodable(
    make_layer: Callable[..., RabbitmqChannelLayer], value: Any
) -> None:
    receiver = make_layer()
    channel = await receiver.new_channel()
    await receiver.group_add(GROUP, channel)
    link = link_of(receiver)
    body = pack({"type": "ext", "value": value})
    assert await link.publish(b"", link.queue_name.encode(), channel_properties(channel), body)
    assert await link.publish(GROUPS_EXCHANGE, GROUP.encode(), NO_PROPERTIES, body)
    await receiver.send(channel, {"type": "after"})
    assert await asyncio.wait_for(receiver.receive(channel), RECEIVE_TIMEOUT) == {"type": "after"}
    assert link.dropped == {DROPPED_UNDECODABLE: 2}


async def test_a_delivery_not_for_a_channel_of_the_queue_is_counted_as_undecodable(
    make_layer: Callable[..., RabbitmqChannelLayer],
) -> None:
    receiver = make_layer()
    channel = await receiver.new_channel()
    link = link_of(receiver)
    queue = link.queue_name.encode()
    assert await link.publish(b"", queue, NO_PROPERTIES, pack({"type": "no header"}))
    assert await link.publish(b"", queue, channel_properties("elsewhere!x"), pack({"type": "not ours"}))
    await receiver.send(channel, {"type": "after"})
    assert await asyncio.wait_for(receiver.receive(channel), RECEIVE_TIMEOUT) == {"type": "after"}
    assert link.dropped == {DROPPED_UNDECODABLE: 2}
