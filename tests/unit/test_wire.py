"""The message format: msgpack bodies and the asgi_channel header."""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import msgpack
import pytest
from channels.exceptions import MessageTooLarge
from pamqp import header as pamqp_header

from channels_rabbitmq.amqp import frames
from channels_rabbitmq.wire import CHANNEL_HEADER, NO_PROPERTIES, channel_properties
from channels_rabbitmq.wire.serializers import MalformedMessage, decode_message, encode_message

MAX = 1 << 20


def round_trip(message: dict) -> dict:
    return decode_message(encode_message(message, MAX))


@pytest.mark.parametrize(
    "value",
    [
        "text",
        "",
        "ünïcödé ✓ 🎉",
        b"\x00\xff\x80 raw bytes",
        b"",
        0,
        1,
        -1,
        2**63 - 1,
        -(2**63),
        2**64 - 1,
        1.5,
        -0.0,
        1e308,
        math.inf,
        True,
        False,
        None,
        [1, "two", b"three", None],
        [],
        {"nested": {"deeper": {"list": [1, {"x": b"y"}]}}},
        {},
    ],
    ids=repr,
)
def test_every_msgpack_type_round_trips_with_its_type(value):
    decoded = round_trip({"value": value})
    assert decoded == {"value": value}
    assert type(decoded["value"]) is type(value)


def test_bytes_stay_bytes_and_str_stays_str():
    decoded = round_trip({"text": "abc", "bytes": b"abc"})
    assert type(decoded["text"]) is str
    assert type(decoded["bytes"]) is bytes
    assert decoded["bytes"] == b"abc"


def test_nan_round_trips():
    assert math.isnan(round_trip({"x": math.nan})["x"])


def test_tuples_come_back_as_lists():
    assert round_trip({"t": (1, (2, 3)), "e": ()}) == {"t": [1, [2, 3]], "e": []}


def test_non_string_keys_round_trip():
    assert round_trip({1: "one", "nested": {2: b"two"}}) == {1: "one", "nested": {2: b"two"}}


def test_dict_subclasses_are_accepted():
    assert round_trip(OrderedDict(type="x", n=1)) == {"type": "x", "n": 1}


def test_no_key_is_added_to_the_message():
    message = {"type": "chat.message", "text": "hi"}
    assert msgpack.unpackb(encode_message(message, MAX), raw=False) == message


def test_encoding_is_plain_msgpack_with_bin_type():
    message = {"type": "x", "b": b"\x01", "s": "s"}
    assert encode_message(message, MAX) == msgpack.packb(message, use_bin_type=True)


def test_encode_does_not_change_the_message():
    message = {"t": (1, 2), "n": {"a": [1]}}
    encode_message(message, MAX)
    assert message == {"t": (1, 2), "n": {"a": [1]}}


@pytest.mark.parametrize("message", [None, "text", b"bytes", ["list"], ("tuple",), 42])
def test_non_dict_message_raises_type_error(message):
    with pytest.raises(TypeError, match="must be a dict"):
        encode_message(message, MAX)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({1, 2}, "set"),
        (frozenset(), "frozenset"),
        (object(), "object"),
        (2**64, "out of range"),
        (-(2**63) - 1, "out of range"),
        (1j, "complex"),
    ],
    ids=["set", "frozenset", "object", "int-too-large", "int-too-small", "complex"],
)
def test_unencodable_values_raise_type_error_naming_the_problem(value, problem):
    with pytest.raises(TypeError, match=problem) as caught:
        encode_message({"type": "x", "nested": [{"value": value}]}, MAX)
    assert "msgpack" in str(caught.value)
    assert not isinstance(caught.value, MessageTooLarge)


def test_deeply_nested_message_raises_type_error():
    message: dict = {}
    inner = message
    for _ in range(10_000):
        inner["x"] = {}
        inner = inner["x"]
    with pytest.raises(TypeError):
        encode_message(message, 1 << 30)


@pytest.mark.parametrize(
    "bad",
    [{"a": "x" * 1000, "b": {1, 2}}, {"a": [b"y" * 1000, 2**70]}, {"a": {"b": {"c": object()}}}],
    ids=["set-after-string", "int-after-bytes", "deep-object"],
)
def test_a_failed_encode_does_not_corrupt_the_next_encode(bad):
    good = {"type": "after", "n": 1}
    expected = msgpack.packb(good, use_bin_type=True)
    with pytest.raises(TypeError):
        encode_message(bad, MAX)
    assert encode_message(good, MAX) == expected
    with pytest.raises(TypeError):
        encode_message(bad, MAX)
    with pytest.raises(MessageTooLarge):
        encode_message({"big": "x" * 100}, 10)
    assert encode_message(good, MAX) == expected
    assert decode_message(encode_message(good, MAX)) == good


def test_message_of_exactly_max_size_is_accepted_and_one_byte_more_is_too_large():
    message = {"x": "y" * 100}
    size = len(msgpack.packb(message, use_bin_type=True))
    assert len(encode_message(message, size)) == size
    with pytest.raises(MessageTooLarge) as caught:
        encode_message(message, size - 1)
    assert str(size) in str(caught.value)
    assert str(size - 1) in str(caught.value)


def test_encode_works_from_several_threads():
    results: list[bytes] = []
    errors: list[BaseException] = []

    def work(number: int) -> None:
        try:
            for _ in range(200):
                assert decode_message(encode_message({"n": number, "s": "x" * number}, MAX)) == {
                    "n": number,
                    "s": "x" * number,
                }
            results.append(encode_message({"n": number}, MAX))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(results) == sorted(msgpack.packb({"n": number}) for number in range(4))


# decode_message -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",  # a byte msgpack never uses
        b"\x81\xa1a",  # map cut short
        msgpack.packb({"a": 1}) + b"trailing",
        b"\xff" * 10,
        b"not msgpack at all, just some text that is long enough",
    ],
    ids=["empty", "reserved-byte", "truncated", "trailing-data", "ff-bytes", "text"],
)
def test_decode_of_garbage_raises_malformed_message(body):
    with pytest.raises(MalformedMessage):
        decode_message(body)


@pytest.mark.parametrize("value", [[1, 2], "text", b"bytes", 42, None, 1.5, True])
def test_decode_of_non_map_msgpack_raises_malformed_message_naming_the_type(value):
    with pytest.raises(MalformedMessage, match="not a map"):
        decode_message(msgpack.packb(value, use_bin_type=True))


def test_malformed_message_is_a_value_error():
    assert issubclass(MalformedMessage, ValueError)


def test_decode_reads_bodies_from_other_msgpack_clients():
    body = msgpack.packb({"type": "x", "n": [1, 2]}, use_bin_type=True)
    assert decode_message(body) == {"type": "x", "n": [1, 2]}
    assert decode_message(memoryview(body)) == {"type": "x", "n": [1, 2]}


# decode_message: limits and ext types ---------------------------------------------------------


def test_decode_refuses_a_body_over_max_size_unread():
    body = msgpack.packb({"text": "x" * 200}, use_bin_type=True)
    assert decode_message(body, len(body)) == {"text": "x" * 200}
    with pytest.raises(MalformedMessage, match="too large"):
        decode_message(body, len(body) - 1)
    with pytest.raises(MalformedMessage, match="too large"):
        decode_message(b"\xc1" * 100, 10)  # refused before any decoding: garbage is not even read


@pytest.mark.parametrize(
    "body",
    [
        b"\x81\xa1a\xdb\xff\xff\xff\xff",  # str of 4 GiB - 1
        b"\x81\xa1a\xc6\xff\xff\xff\xff",  # bin of 4 GiB - 1
        b"\x81\xa1a\xdd\xff\xff\xff\xff",  # array of 4 G elements
        b"\xdf\xff\xff\xff\xff",  # map of 4 G entries
    ],
    ids=["str", "bin", "array", "map"],
)
def test_decode_refuses_lengths_the_body_cannot_hold(body):
    with pytest.raises(MalformedMessage):
        decode_message(body, 1 << 20)
    with pytest.raises(MalformedMessage):
        decode_message(body)


@pytest.mark.parametrize(
    "value",
    [
        msgpack.ExtType(5, b"data"),
        msgpack.ExtType(0, b""),
        msgpack.Timestamp(1_700_000_000, 5),  # ext -1: 8 bytes
        msgpack.Timestamp(1_700_000_000),  # ext -1: 4 bytes
        msgpack.Timestamp(2**40, 1),  # ext -1: 12 bytes
    ],
    ids=["ext-5", "ext-empty", "timestamp-64", "timestamp-32", "timestamp-96"],
)
@pytest.mark.parametrize("max_size", [None, MAX])
def test_decode_refuses_ext_types_and_timestamps_anywhere_in_the_message(value, max_size):
    for message in ({"v": value}, {"outer": [1, {"inner": value}]}):
        body = msgpack.packb(message, use_bin_type=True)
        with pytest.raises(MalformedMessage):
            decode_message(body, max_size)


@pytest.mark.parametrize("ext", [b"\xd7\xfe" + b"8 bytes!", b"\xc7\x00\xff", b"\xd6\xff\x00\x00\x00\x01"])
def test_decode_refuses_reserved_negative_ext_types(ext):
    with pytest.raises(MalformedMessage):
        decode_message(b"\x81\xa1v" + ext, MAX)


def test_decode_with_max_size_reads_every_plain_type():
    message = {"s": "é" * 10, "b": b"\x00" * 10, "l": [1, -2.5, None, True], "m": {"k": {"n": 1}}, 1: "int"}
    body = msgpack.packb(message, use_bin_type=True)
    assert decode_message(body, len(body)) == message


# channel_properties ---------------------------------------------------------------------------


@pytest.mark.parametrize("channel", ["channels.AbCdEf012345!XyZ987654321", "q!a", "a" * 99 + "!" + "b" * 99])
def test_channel_properties_decode_with_pamqp_to_the_asgi_channel_header(channel):
    properties = channel_properties(channel)
    content_header = pamqp_header.ContentHeader()
    content_header.unmarshal(b"\x00" * 12 + properties)
    assert content_header.properties.headers == {CHANNEL_HEADER: channel}
    assert content_header.properties.content_type is None


def test_channel_properties_match_the_frame_codec():
    channel = "channels.q!abc"
    assert channel_properties(channel) == frames.encode_string_headers({"asgi_channel": channel})
    assert frames.decode_headers(memoryview(channel_properties(channel))) == {"asgi_channel": channel}


def test_no_properties_decode_to_no_headers():
    assert frames.decode_headers(memoryview(NO_PROPERTIES)) is None
