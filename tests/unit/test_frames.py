"""The hand-written frame codec, checked against pamqp (an independent AMQP 0-9-1 codec)."""

from __future__ import annotations

import struct

import pytest
from pamqp import body as pamqp_body
from pamqp import commands
from pamqp import frame as pamqp_frame
from pamqp import header as pamqp_header
from pamqp import heartbeat as pamqp_heartbeat

from channels_rabbitmq.amqp import frames
from channels_rabbitmq.wire import NO_PROPERTIES, channel_properties


def unmarshal_all(data: bytes) -> list[tuple[int, object]]:
    """Split bytes into (channel, pamqp frame) pairs, failing on any trailing garbage."""
    result = []
    while data:
        consumed, channel, value = pamqp_frame.unmarshal(data)
        assert consumed > 0
        result.append((channel, value))
        data = data[consumed:]
    return result


def frame_sizes(data: bytes) -> list[int]:
    """The total size (head, payload, end) of each frame in ``data``."""
    sizes = []
    offset = 0
    while offset < len(data):
        (size,) = struct.unpack_from(">I", data, offset + 3)
        assert data[offset + 7 + size] == frames.FRAME_END
        sizes.append(8 + size)
        offset += 8 + size
    return sizes


def properties_bytes(properties: commands.Basic.Properties) -> bytes:
    """Encoded basic properties (flags first), as pamqp writes them in a content header."""
    return properties.marshal()


# encode_publish -------------------------------------------------------------------------------


def test_publish_decodes_with_pamqp_to_same_exchange_routing_key_headers_and_body():
    data = frames.encode_publish(
        5, b"groups", b"room-1", frames.encode_string_headers({"asgi_channel": "q!abc"}), b"hello", 131072
    )
    decoded = unmarshal_all(data)
    assert [type(value) for _, value in decoded] == [
        commands.Basic.Publish,
        pamqp_header.ContentHeader,
        pamqp_body.ContentBody,
    ]
    assert {channel for channel, _ in decoded} == {5}
    publish, header, body = (value for _, value in decoded)
    assert publish.exchange == "groups"
    assert publish.routing_key == "room-1"
    assert publish.mandatory is False
    assert publish.immediate is False
    assert header.class_id == frames.BASIC_CLASS
    assert header.body_size == 5
    assert header.properties.headers == {"asgi_channel": "q!abc"}
    assert body.value == b"hello"


def test_publish_with_no_properties_has_no_headers():
    data = frames.encode_publish(1, b"", b"queue", NO_PROPERTIES, b"x", 131072)
    (_, publish), (_, header), (_, body) = unmarshal_all(data)
    assert publish.exchange == ""
    assert publish.routing_key == "queue"
    assert header.properties.headers is None
    assert header.properties.content_type is None
    assert body.value == b"x"


def test_publish_with_channel_properties_carries_the_asgi_channel_header():
    channel = "channels.abcdefABCDEF!0123456789ab"
    data = frames.encode_publish(1, b"", b"channels.abcdefABCDEF", channel_properties(channel), b"{}", 131072)
    (_, _publish), (_, header), _ = unmarshal_all(data)
    assert header.properties.headers == {"asgi_channel": channel}


def test_publish_accepts_255_byte_exchange_and_routing_key():
    exchange = b"e" * 255
    routing_key = b"r" * 255
    (_, publish), _, _ = unmarshal_all(
        frames.encode_publish(1, exchange, routing_key, NO_PROPERTIES, b"b", 131072)
    )
    assert publish.exchange == exchange.decode()
    assert publish.routing_key == routing_key.decode()


def test_publish_of_empty_body_has_no_body_frame():
    decoded = unmarshal_all(frames.encode_publish(1, b"", b"q", NO_PROPERTIES, b"", 131072))
    assert [type(value) for _, value in decoded] == [commands.Basic.Publish, pamqp_header.ContentHeader]
    assert decoded[1][1].body_size == 0


@pytest.mark.parametrize("frame_max", [4096, 10000, 131072])
@pytest.mark.parametrize("extra", [-1, 0, 1, 4096, 300_000])
def test_publish_splits_bodies_larger_than_frame_max_into_frames_that_concatenate_to_the_body(
    frame_max, extra
):
    chunk = frame_max - frames.FRAME_OVERHEAD
    size = max(1, chunk + extra)
    payload = bytes(i % 251 for i in range(size))
    data = frames.encode_publish(3, b"", b"q", NO_PROPERTIES, payload, frame_max)
    decoded = unmarshal_all(data)
    bodies = [value for _, value in decoded[2:]]
    assert all(isinstance(value, pamqp_body.ContentBody) for value in bodies)
    assert b"".join(value.value for value in bodies) == payload
    assert decoded[1][1].body_size == size
    assert len(bodies) == -(-size // chunk)  # ceil
    assert all(size <= frame_max for size in frame_sizes(data)[2:])
    assert all(len(value.value) == chunk for value in bodies[:-1])


def test_publish_body_exactly_frame_max_payload_is_one_frame():
    payload = b"a" * (4096 - frames.FRAME_OVERHEAD)
    decoded = unmarshal_all(frames.encode_publish(1, b"", b"q", NO_PROPERTIES, payload, 4096))
    assert len(decoded) == 3
    assert frame_sizes(frames.encode_publish(1, b"", b"q", NO_PROPERTIES, payload, 4096))[2] == 4096


def test_publish_accepts_memoryview_and_bytearray_bodies():
    payload = bytes(range(256)) * 40
    for body in (bytearray(payload), memoryview(payload)):
        data = frames.encode_publish(1, b"", b"q", NO_PROPERTIES, body, 4096)
        assert b"".join(value.value for _, value in unmarshal_all(data)[2:]) == payload


# encode_ack / encode_method / heartbeat -------------------------------------------------------


@pytest.mark.parametrize("multiple", [False, True])
@pytest.mark.parametrize("tag", [1, 255, 2**32 + 7, 2**63 - 1])  # pamqp reads the tag as signed
def test_ack_decodes_with_pamqp_as_basic_ack_with_tag_and_multiple(tag, multiple):
    ((channel, ack),) = unmarshal_all(frames.encode_ack(7, tag, multiple))
    assert channel == 7
    assert isinstance(ack, commands.Basic.Ack)
    assert ack.delivery_tag == tag
    assert ack.multiple is multiple


def test_ack_encodes_the_largest_delivery_tag_as_unsigned_64_bits():
    data = frames.encode_ack(1, 2**64 - 1, False)
    assert data[11:19] == b"\xff" * 8
    assert frames.decode_confirm(memoryview(data)[11:-1]) == (2**64 - 1, False)


def test_ack_is_byte_identical_to_pamqp():
    assert frames.encode_ack(2, 42, True) == pamqp_frame.marshal(commands.Basic.Ack(42, True), 2)
    assert frames.encode_ack(2, 42, False) == pamqp_frame.marshal(commands.Basic.Ack(42, False), 2)


def test_publish_is_byte_identical_to_pamqp():
    properties = commands.Basic.Properties(headers={"asgi_channel": "q!x", "k": "v"})
    expected = (
        pamqp_frame.marshal(commands.Basic.Publish(exchange="ex", routing_key="rk"), 9)
        + pamqp_frame.marshal(pamqp_header.ContentHeader(0, 3, properties), 9)
        + pamqp_frame.marshal(pamqp_body.ContentBody(b"abc"), 9)
    )
    encoded = frames.encode_publish(
        9, b"ex", b"rk", frames.encode_string_headers({"asgi_channel": "q!x", "k": "v"}), b"abc", 131072
    )
    assert encoded == expected


def test_encode_method_round_trips_through_pamqp():
    method = commands.Queue.Declare(queue="channels.x", exclusive=True, auto_delete=True)
    ((channel, decoded),) = unmarshal_all(frames.encode_method(3, method))
    assert channel == 3
    assert isinstance(decoded, commands.Queue.Declare)
    assert decoded.queue == "channels.x"
    assert decoded.exclusive is True


def test_heartbeat_frame_decodes_as_heartbeat_on_channel_zero():
    ((channel, value),) = unmarshal_all(frames.HEARTBEAT_FRAME)
    assert channel == 0
    assert isinstance(value, pamqp_heartbeat.Heartbeat)


def test_protocol_header_is_amqp_0_9_1():
    assert frames.PROTOCOL_HEADER == b"AMQP\x00\x00\x09\x01"


# Frame heads and method indexes -----------------------------------------------------------------


def test_decode_frame_head_reads_every_frame_the_encoders_write():
    data = frames.encode_publish(7, b"ex", b"rk", NO_PROPERTIES, b"z" * 5000, 4096)
    data += frames.encode_ack(7, 3, False) + frames.HEARTBEAT_FRAME
    heads = []
    offset = 0
    while offset < len(data):
        frame_type, channel, size = frames.decode_frame_head(data, offset)
        heads.append((frame_type, channel))
        offset += frames.FRAME_HEAD_SIZE + size
        assert data[offset] == frames.FRAME_END
        offset += 1
    assert heads == [
        (frames.FRAME_METHOD, 7),
        (frames.FRAME_HEADER, 7),
        (frames.FRAME_BODY, 7),
        (frames.FRAME_BODY, 7),
        (frames.FRAME_METHOD, 7),
        (frames.FRAME_HEARTBEAT, 0),
    ]


@pytest.mark.parametrize(("method", "index"), [
    (commands.Basic.Deliver("c", 1, False, "", "q"), frames.BASIC_DELIVER_INDEX),
    (commands.Basic.Ack(1, False), frames.BASIC_ACK_INDEX),
    (commands.Basic.Nack(1, False, True), frames.BASIC_NACK_INDEX),
    (commands.Basic.Publish(0, "", "q"), frames.BASIC_PUBLISH_INDEX),
])  # fmt: skip
def test_method_indexes_are_pamqps_and_decode_method_index_reads_them(method, index):
    assert index == method.index
    data = pamqp_frame.marshal(method, 1)
    assert frames.decode_method_index(data, frames.FRAME_HEAD_SIZE) == (index,)
    assert frames.decode_method_index(method_payload(method)) == (index,)


def test_our_publish_and_ack_frames_carry_their_method_index():
    publish = frames.encode_publish_method(1, b"", b"q")
    ack = frames.encode_ack(1, 5, True)
    assert frames.decode_method_index(publish, frames.FRAME_HEAD_SIZE) == (frames.BASIC_PUBLISH_INDEX,)
    assert frames.decode_method_index(ack, frames.FRAME_HEAD_SIZE) == (frames.BASIC_ACK_INDEX,)


# Headers ----------------------------------------------------------------------------------------


def test_string_headers_decode_with_pamqp_to_the_same_table():
    headers = {"asgi_channel": "q!abc", "empty": "", "unicode": "héllo ✓", "k" * 200: "v" * 1000}
    encoded = frames.encode_string_headers(headers)
    content_header = pamqp_header.ContentHeader()
    content_header.unmarshal(b"\x00" * 12 + encoded)
    assert content_header.properties.headers == headers


@pytest.mark.parametrize(("key", "value"), [
    ("asgi_channel", "channels.q!abc"),
    ("asgi_channel", ""),
    ("ünï", "héllo ✓" * 100),
    ("k" * 255, "v" * 70_000),
])  # fmt: skip
def test_one_string_header_is_the_same_bytes_as_a_table_of_one(key, value):
    encoded = frames.encode_string_header(key, value)
    assert encoded == frames.encode_string_headers({key: value})
    content_header = pamqp_header.ContentHeader()
    content_header.unmarshal(b"\x00" * 12 + encoded)
    assert content_header.properties.headers == {key: value}
    assert frames.decode_headers(memoryview(encoded)) == {key: value}


def test_empty_string_headers_table_decodes_to_empty_dict():
    encoded = frames.encode_string_headers({})
    assert frames.decode_headers(memoryview(encoded)) == {}


def test_decode_headers_of_no_properties_is_none():
    assert frames.decode_headers(memoryview(NO_PROPERTIES)) is None
    assert frames.decode_headers(memoryview(b"")) is None


def test_decode_headers_reads_our_own_string_table():
    headers = {"asgi_channel": "q!abc", "other": "välue"}
    assert frames.decode_headers(memoryview(frames.encode_string_headers(headers))) == headers


def test_decode_headers_reads_pamqp_tables_with_non_string_values():
    headers = {"asgi_channel": "q!abc", "count": 3, "flag": True, "nested": {"a": "b"}}
    encoded = properties_bytes(commands.Basic.Properties(headers=headers))
    assert frames.decode_headers(memoryview(encoded)) == headers


def test_decode_headers_reads_signed_integers_of_every_width():
    # Built by hand: pamqp 3.x (the newest on Python 3.10) cannot encode -128..-1 as "b".
    entries = [
        b"\x01b" + b"b" + struct.pack(">b", -1),
        b"\x01s" + b"s" + struct.pack(">h", -300),
        b"\x01I" + b"I" + struct.pack(">i", -70_000),
        b"\x01l" + b"l" + struct.pack(">q", -(2**40)),
    ]
    table = b"".join(entries)
    encoded = struct.pack(">HI", frames.HEADERS_FLAG, len(table)) + table
    assert frames.decode_headers(memoryview(encoded)) == {"b": -1, "s": -300, "I": -70_000, "l": -(2**40)}


def test_decode_headers_reads_headers_next_to_other_properties():
    encoded = properties_bytes(
        commands.Basic.Properties(content_type="application/msgpack", headers={"asgi_channel": "q!x"})
    )
    assert frames.decode_headers(memoryview(encoded)) == {"asgi_channel": "q!x"}


def test_decode_headers_of_properties_without_headers_is_none():
    encoded = properties_bytes(commands.Basic.Properties(content_type="text/plain", delivery_mode=2))
    assert frames.decode_headers(memoryview(encoded)) is None


def test_decode_string_table_returns_none_for_non_string_values():
    encoded = properties_bytes(commands.Basic.Properties(headers={"n": 1}))
    assert frames.decode_string_table(encoded, 2, len(encoded)) is None


def test_decode_string_table_rejects_a_table_overrunning_its_limit():
    encoded = frames.encode_string_headers({"asgi_channel": "q!abc"})
    with pytest.raises(frames.FrameError):
        frames.decode_string_table(encoded, 2, len(encoded) - 1)


def test_decode_string_table_rejects_an_entry_overrunning_its_table():
    # table of 7 bytes whose one entry claims a 9-byte value
    table = b"\x01aS" + struct.pack(">I", 9)
    encoded = struct.pack(">HI", frames.HEADERS_FLAG, len(table)) + table + b"x" * 9
    with pytest.raises(frames.FrameError):
        frames.decode_string_table(encoded, 2, len(encoded))


def test_frame_error_is_a_value_error():
    assert issubclass(frames.FrameError, ValueError)


# Decoding per-message methods ------------------------------------------------------------------


def method_payload(method: object) -> memoryview:
    data = pamqp_frame.marshal(method, 1)
    return memoryview(data)[7:-1]


@pytest.mark.parametrize("redelivered", [False, True])
def test_decode_deliver_matches_pamqp_arguments(redelivered):
    method = commands.Basic.Deliver("ctag-1", 2**40 + 3, redelivered, "groups", "room")
    deliver = frames.decode_deliver(method_payload(method)[4:])
    assert deliver == frames.Deliver("ctag-1", 2**40 + 3, redelivered, "groups", "room")


@pytest.mark.parametrize(("method", "expected"), [
    (commands.Basic.Ack(9, True), (9, True)),
    (commands.Basic.Ack(10, False), (10, False)),
    (commands.Basic.Nack(11, True, True), (11, True)),
    (commands.Basic.Nack(12, False, False), (12, False)),
])  # fmt: skip
def test_decode_confirm_reads_tag_and_multiple_of_ack_and_nack(method, expected):
    assert frames.decode_confirm(method_payload(method)[4:]) == expected


def test_decode_method_parses_any_pamqp_method():
    method = frames.decode_method(method_payload(commands.Channel.Close(404, "NOT_FOUND - no queue", 50, 10)))
    assert isinstance(method, commands.Channel.Close)
    assert (method.reply_code, method.reply_text, method.class_id, method.method_id) == (
        404,
        "NOT_FOUND - no queue",
        50,
        10,
    )


def test_decode_method_of_unknown_method_raises_frame_error_naming_it():
    with pytest.raises(frames.FrameError, match=r"99\.98"):
        frames.decode_method(memoryview(struct.pack(">HH", 99, 98)))


def test_decode_method_of_truncated_arguments_raises_frame_error():
    payload = bytes(method_payload(commands.Channel.Close(404, "NOT_FOUND", 50, 10)))
    with pytest.raises(frames.FrameError):
        frames.decode_method(memoryview(payload[:7]))


def test_decode_content_header_reads_body_size_and_properties():
    header = pamqp_header.ContentHeader(0, 123456, commands.Basic.Properties(headers={"a": "b"}))
    body_size, properties = frames.decode_content_header(memoryview(pamqp_frame.marshal(header, 1))[7:-1])
    assert body_size == 123456
    assert frames.decode_headers(properties) == {"a": "b"}


def test_decode_content_header_of_another_class_raises_frame_error():
    with pytest.raises(frames.FrameError, match="class 50"):
        frames.decode_content_header(memoryview(struct.pack(">HHQH", 50, 0, 1, 0)))


# decode_deliver -------------------------------------------------------------------------------


def deliver_arguments(exchange: bytes, routing_key: bytes, tag: int = 9) -> memoryview:
    return memoryview(
        b"\x04ctag"
        + struct.pack(">QB", tag, 1)
        + bytes((len(exchange),))
        + exchange
        + bytes((len(routing_key),))
        + routing_key
    )


def test_decode_deliver_reads_utf8_names():
    deliver = frames.decode_deliver(deliver_arguments("grøups".encode(), b"room"))
    assert deliver == frames.Deliver("ctag", 9, True, "grøups", "room")
    assert deliver.error is None


@pytest.mark.parametrize(("exchange", "routing_key"), [(b"\xff", b"room"), (b"groups", b"r\xc3")])
def test_decode_deliver_of_non_utf8_names_keeps_the_tag_and_sets_an_error(exchange, routing_key):
    deliver = frames.decode_deliver(deliver_arguments(exchange, routing_key, tag=2**40))
    assert deliver.delivery_tag == 2**40
    assert deliver.error is not None
    assert "UTF-8" in deliver.error


def test_decode_deliver_of_a_routing_key_overrunning_the_frame_raises_frame_error():
    arguments = bytes(deliver_arguments(b"groups", b"room"))[:-2]
    with pytest.raises(frames.FrameError):
        frames.decode_deliver(memoryview(arguments))


# decode_whole_delivery: the fast path ---------------------------------------------------------


def pamqp_delivery(
    body: bytes,
    properties: commands.Basic.Properties | None = None,
    *,
    channel: int = 2,
    frame_max: int = 131072,
    header_channel: int | None = None,
) -> bytes:
    """basic.deliver, content header and body frames as a broker sends them, written by pamqp."""
    parts = [
        pamqp_frame.marshal(commands.Basic.Deliver("ctag.1", 2**40 + 1, True, "groups", "röom-1"), channel),
        pamqp_frame.marshal(
            pamqp_header.ContentHeader(0, len(body), properties or commands.Basic.Properties()),
            channel if header_channel is None else header_channel,
        ),
    ]
    chunk = frame_max - frames.FRAME_OVERHEAD
    parts += [
        pamqp_frame.marshal(pamqp_body.ContentBody(body[start : start + chunk]), channel)
        for start in range(0, len(body), chunk)
    ]
    return b"".join(parts)


def read_whole(data: bytes, offset: int = 0, *, channel: int = 2, max_body_size: int = 2**64):
    method_end = offset + frames.FRAME_HEAD_SIZE + frames.decode_frame_head(data, offset)[2]
    return frames.decode_whole_delivery(data, offset, method_end, channel, max_body_size)


def read_frame_by_frame(data: bytes) -> tuple:
    """The same fields as the fast path's (but the offset), read with the per-frame decoders."""
    payloads = []
    offset = 0
    while offset < len(data):
        _, _, size = frames.decode_frame_head(data, offset)
        payloads.append(
            memoryview(data)[offset + frames.FRAME_HEAD_SIZE : offset + frames.FRAME_HEAD_SIZE + size]
        )
        offset += frames.FRAME_HEAD_SIZE + size + 1
    deliver = frames.decode_deliver(payloads[0][frames.METHOD_INDEX_SIZE :])
    body_size, properties = frames.decode_content_header(payloads[1])
    body = b"".join(payloads[2:])
    assert len(body) == body_size
    headers = frames.decode_headers(properties)
    return deliver.delivery_tag, deliver.exchange, deliver.routing_key, headers, body, deliver.redelivered


PLAIN_DELIVERIES = {
    "no-properties": (b"hello", None),
    "asgi-channel": (b"hello", commands.Basic.Properties(headers={"asgi_channel": "q!abc"})),
    "string-headers": (b"x" * 300, commands.Basic.Properties(headers={"asgi_channel": "q!é", "k": "✓"})),
    "empty-body": (b"", commands.Basic.Properties(headers={"asgi_channel": "q!abc"})),
    "empty-body-no-properties": (b"", None),
    "one-full-frame": (b"f" * (4096 - frames.FRAME_OVERHEAD), None),
}


@pytest.mark.parametrize(("body", "properties"), PLAIN_DELIVERIES.values(), ids=PLAIN_DELIVERIES.keys())
def test_fast_path_reads_a_plain_delivery_as_the_per_frame_decoders_do(body, properties):
    data = pamqp_delivery(body, properties, frame_max=4096)
    whole = read_whole(data)
    assert whole == (len(data), *read_frame_by_frame(data))
    assert whole[1:] == (2**40 + 1, "groups", "röom-1", properties and properties.headers, body, True)
    assert type(whole[5]) is bytes


def test_fast_path_reads_a_delivery_in_the_middle_of_a_buffer_and_says_where_it_ends():
    first = pamqp_delivery(b"first")
    second = pamqp_delivery(b"second", commands.Basic.Properties(headers={"asgi_channel": "q!x"}))
    data = first + second + frames.HEARTBEAT_FRAME
    assert read_whole(data)[0] == len(first)
    whole = read_whole(data, len(first))
    assert whole[0] == len(first) + len(second)
    assert whole[4:6] == ({"asgi_channel": "q!x"}, b"second")


NOT_FAST = {
    "content-type": pamqp_delivery(b"b", commands.Basic.Properties(content_type="text/plain")),
    "non-string-header": pamqp_delivery(b"b", commands.Basic.Properties(headers={"n": 1})),
    "headers-and-more": pamqp_delivery(b"b", commands.Basic.Properties(headers={"a": "b"}, delivery_mode=2)),
    "body-in-two-frames": pamqp_delivery(b"z" * 5000, frame_max=4096),
    "header-on-another-channel": pamqp_delivery(b"b", header_channel=4),
}


@pytest.mark.parametrize("data", NOT_FAST.values(), ids=NOT_FAST.keys())
def test_fast_path_leaves_other_deliveries_to_the_per_frame_decoders(data):
    assert read_whole(data) is None


def test_fast_path_leaves_a_body_over_max_body_size_to_the_per_frame_decoders():
    data = pamqp_delivery(b"12345")
    assert read_whole(data, max_body_size=4) is None
    assert read_whole(data, max_body_size=5) is not None


def test_fast_path_leaves_a_delivery_whose_frames_are_not_all_there_yet():
    data = pamqp_delivery(b"body", commands.Basic.Properties(headers={"asgi_channel": "q!abc"}))
    method_end = frames.FRAME_HEAD_SIZE + frames.decode_frame_head(data, 0)[2]
    for cut in range(method_end + 1, len(data)):
        assert read_whole(data[:cut]) is None, f"cut at {cut}"
    assert read_whole(data) is not None


def raw_deliver(exchange: bytes, routing_key: bytes) -> bytes:
    """A basic.deliver frame with any bytes for names (pamqp writes only str)."""
    arguments = (
        struct.pack(">I", frames.BASIC_DELIVER_INDEX)
        + b"\x01c"
        + struct.pack(">QB", 5, 0)
        + bytes((len(exchange),))
        + exchange
        + bytes((len(routing_key),))
        + routing_key
    )
    return struct.pack(">BHI", frames.FRAME_METHOD, 2, len(arguments)) + arguments + frames.FRAME_END_BYTE


def content_frames(body: bytes) -> bytes:
    """The content header and body frames of a delivery, without its method frame."""
    data = pamqp_delivery(body)
    return data[frames.FRAME_HEAD_SIZE + frames.decode_frame_head(data, 0)[2] + 1 :]


def test_fast_path_leaves_names_that_are_not_utf8_to_the_per_frame_decoders():
    rest = content_frames(b"b")
    for exchange, routing_key in [(b"\xff", b"q"), (b"", b"q\xc3")]:
        method = raw_deliver(exchange, routing_key)
        assert read_whole(method + rest) is None
        assert frames.decode_deliver(memoryview(method)[11:-1]).error is not None
    assert read_whole(raw_deliver(b"", b"q") + rest)[1:3] == (5, "")


def test_fast_path_of_a_routing_key_overrunning_its_frame_raises_frame_error():
    method = raw_deliver(b"ex", b"room")
    method = method[:-6] + b"\x09" + method[-5:]  # the routing key's size claims 9 bytes of 4
    with pytest.raises(frames.FrameError, match="overrun"):
        read_whole(method + content_frames(b"b"))
