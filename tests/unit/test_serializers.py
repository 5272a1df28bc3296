"""The ``serializer`` key: msgpack, JSON or a dotted path, held to the same rules; encryption after it."""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from channels.exceptions import MessageTooLarge

from channels_rabbitmq.config import LayerConfig
from channels_rabbitmq.core import RabbitmqChannelLayer
from channels_rabbitmq.encryption import generate_key  # where users find it
from channels_rabbitmq.routing import LocalRouter
from channels_rabbitmq.wire.codec import MessageCodec
from channels_rabbitmq.wire.serializers import JSON, MSGPACK, MalformedMessage, load_serializer

MAX = 1 << 20


class Reversed:
    """A serializer for the tests: JSON with its bytes reversed (nothing else decodes it)."""

    @staticmethod
    def dumps(message: dict[str, Any]) -> bytes:
        return json.dumps(message).encode()[::-1]

    @staticmethod
    def loads(body: bytes) -> Any:
        return json.loads(body[::-1])


@pytest.fixture
def custom_module() -> Iterator[str]:
    """A module ``serializer_for_tests`` with several serializer-shaped objects in it."""
    module = types.ModuleType("serializer_for_tests")
    module.Reversed = Reversed
    module.instance = Reversed()
    module.dumps_only = types.SimpleNamespace(dumps=Reversed.dumps)
    module.not_callable = types.SimpleNamespace(dumps=1, loads=2)
    module.returns_text = types.SimpleNamespace(dumps=json.dumps, loads=json.loads)
    module.dumps = Reversed.dumps  # the module itself is one
    module.loads = Reversed.loads
    sys.modules["serializer_for_tests"] = module
    yield "serializer_for_tests"
    del sys.modules["serializer_for_tests"]


# Choosing one ---------------------------------------------------------------------------------


def test_msgpack_is_the_default():
    assert LayerConfig.build().serializer is MSGPACK
    assert LayerConfig.DEFAULTS["serializer"] == "msgpack"


def test_json_and_msgpack_are_named():
    assert LayerConfig.build(serializer="json").serializer is JSON
    assert LayerConfig.build(serializer="msgpack").serializer is MSGPACK


@pytest.mark.parametrize("attribute", ["Reversed", "instance"])
def test_a_dotted_path_is_imported_at_construction(custom_module, attribute):
    serializer = LayerConfig.build(serializer=f"{custom_module}.{attribute}").serializer
    assert serializer.name == f"{custom_module}.{attribute}"
    body = serializer.encode({"type": "m"}, MAX)
    assert body == Reversed.dumps({"type": "m"})
    assert serializer.decode(body, MAX) == {"type": "m"}


def test_a_module_with_dumps_and_loads_is_a_serializer(custom_module):
    serializer = load_serializer(custom_module)
    assert serializer.decode(serializer.encode({"n": 1}, MAX), None) == {"n": 1}


@pytest.mark.parametrize(
    ("value", "error", "says"),
    [
        (None, TypeError, "serializer must be"),
        (b"json", TypeError, "serializer must be"),
        ("", ValueError, "serializer must be"),
        ("not a path", ValueError, "serializer must be"),
        ("no_such_module_anywhere.Serializer", ValueError, "cannot be imported"),
        ("serializer_for_tests.missing", ValueError, "cannot be imported"),
        ("serializer_for_tests.dumps_only", TypeError, "no callable loads"),
        ("serializer_for_tests.not_callable", TypeError, "no callable dumps or loads"),
    ],
)
def test_a_serializer_that_cannot_be_used_is_refused_at_construction(custom_module, value, error, says):
    with pytest.raises(error, match=says):
        LayerConfig.build(serializer=value)
    with pytest.raises(error, match=says):
        RabbitmqChannelLayer(serializer=value)


# JSON -------------------------------------------------------------------------------------------


def test_json_bodies_are_compact_utf8_json():
    body = JSON.encode({"type": "chat.message", "text": "héllo ✓", "n": [1, 2.5, None, True]}, MAX)
    assert body == '{"type":"chat.message","text":"héllo ✓","n":[1,2.5,null,true]}'.encode()


def test_json_round_trips_with_json_conversions():
    message = {"type": "m", "tuple": (1, 2), 1: "int key", "nested": {"a": [{}]}}
    assert JSON.decode(JSON.encode(message, MAX), MAX) == {
        "type": "m",
        "tuple": [1, 2],
        "1": "int key",
        "nested": {"a": [{}]},
    }


@pytest.mark.parametrize(
    "value",
    [b"bytes", {1, 2}, object(), float("nan"), float("inf")],
    ids=["bytes", "set", "object", "nan", "inf"],
)
def test_a_message_json_cannot_carry_raises_type_error(value):
    with pytest.raises(TypeError, match="json"):
        JSON.encode({"type": "m", "value": value}, MAX)


@pytest.mark.parametrize("message", [[1], "text", None, ("type", "m")])
def test_a_message_that_is_not_a_dict_raises_type_error(message):
    for serializer in (JSON, load_serializer("tests.unit.test_serializers.Reversed")):
        with pytest.raises(TypeError, match="must be a dict"):
            serializer.encode(message, MAX)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'"text"',
        b"null",
        b'{"a": "\xff"}',
        b"[" * 100_000,
        msgpack.packb({"a": 1}),
    ],
    ids=["empty", "text", "array", "string", "null", "bad utf8", "too deep", "msgpack"],
)
def test_json_decode_refuses_what_is_not_a_json_object(body):
    with pytest.raises(MalformedMessage):
        JSON.decode(body, MAX)


def test_json_size_is_checked_on_the_encoded_body():
    text = "x" * 100
    size = len(JSON.encode({"t": text}, MAX))
    assert JSON.encode({"t": text}, size)
    with pytest.raises(MessageTooLarge):
        JSON.encode({"t": text}, size - 1)
    with pytest.raises(MalformedMessage, match="too large"):
        JSON.decode(JSON.encode({"t": text}, size), size - 1)


# A custom serializer ----------------------------------------------------------------------------


def test_a_custom_serializer_that_returns_text_raises_type_error_at_the_call(custom_module):
    serializer = load_serializer(f"{custom_module}.returns_text")
    with pytest.raises(TypeError, match="returned str, not bytes"):
        serializer.encode({"type": "m"}, MAX)


def test_a_custom_serializer_whose_dumps_fails_raises_type_error(custom_module):
    serializer = load_serializer(f"{custom_module}.Reversed")
    with pytest.raises(TypeError, match="cannot be encoded"):
        serializer.encode({"type": "m", "bytes": b"x"}, MAX)


@pytest.mark.parametrize("body", [b"", b"garbage", b"]1[", b"\x00" * 10])
def test_anything_a_custom_loads_raises_drops_the_body(custom_module, body):
    serializer = load_serializer(f"{custom_module}.Reversed")
    with pytest.raises(MalformedMessage):
        serializer.decode(body, MAX)


def test_a_custom_loads_that_returns_no_dict_drops_the_body(custom_module):
    serializer = load_serializer(f"{custom_module}.Reversed")
    with pytest.raises(MalformedMessage, match="not a dict"):
        serializer.decode(b"]3,2,1[", MAX)


# The codec and the router use it --------------------------------------------------------------


@pytest.mark.parametrize("name", ["msgpack", "json", "tests.unit.test_serializers.Reversed"])
@pytest.mark.parametrize("encrypted", [False, True])
def test_the_codec_serializes_then_encrypts(name, encrypted):
    config = LayerConfig.build(serializer=name, encryption_keys=[generate_key()] if encrypted else None)
    codec = MessageCodec(config)
    message = {"type": "m", "text": "héllo"}
    body = codec.encode(message, "room")
    serialized = config.serializer.encode(message, MAX)
    assert (body == serialized) is not encrypted
    assert codec.decode(body, "room") == (message, serialized)


def test_max_message_size_applies_after_encryption_whatever_the_serializer():
    config = LayerConfig.build(serializer="json", encryption_keys=[generate_key()], max_message_size=120)
    codec = MessageCodec(config)
    assert len(JSON.encode({"t": "x" * 40}, MAX)) < 120
    with pytest.raises(MessageTooLarge, match="encrypted"):
        codec.encode({"t": "x" * 40}, "room")


def test_a_codec_refuses_bodies_of_another_serializer():
    json_codec = MessageCodec(LayerConfig.build(serializer="json"))
    msgpack_codec = MessageCodec(LayerConfig.build())
    with pytest.raises(MalformedMessage):
        json_codec.decode(msgpack_codec.encode({"type": "m"}, "room"), "room")
    with pytest.raises(MalformedMessage):
        msgpack_codec.decode(json_codec.encode({"type": "m"}, "room"), "room")


def test_group_copies_are_decoded_with_the_router_s_serializer():
    router = LocalRouter(capacity=10, expiry=60, group_expiry=None, decode=JSON.decode)
    for channel in ("q!a", "q!b", "q!c"):
        router.add_membership("room", channel, 0)
    message = {"type": "m", "n": [1]}
    router.deliver_to_group("room", JSON.decode(JSON.encode(message, MAX), MAX), JSON.encode(message, MAX), 0)
    copies = [router.take(channel, 1) for channel in ("q!a", "q!b", "q!c")]
    assert copies == [message] * 3
    assert len({id(copy) for copy in copies}) == 3  # each its own
