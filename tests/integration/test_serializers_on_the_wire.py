"""The ``serializer`` key against the real broker: JSON and a dotted path, sends and groups, encryption."""

from __future__ import annotations

import asyncio
import json

import pytest

from channels_rabbitmq.core import RabbitmqChannelLayer
from channels_rabbitmq.encryption import generate_key  # where users find it
from channels_rabbitmq.link.channel_plan import PUBLISH_CHANNEL
from channels_rabbitmq.stats import DROPPED_UNDECODABLE
from channels_rabbitmq.wire import NO_PROPERTIES, channel_properties
from tests.conftest import Broker, LayerFactory, link_of, rabbitmqctl
from tests.unit.test_serializers import Reversed

pytestmark = pytest.mark.usefixtures("loop_kind")  # each test on asyncio's loop and on uvloop

CUSTOM = "tests.unit.test_serializers.Reversed"


async def receive(layer: RabbitmqChannelLayer, channel: str, timeout: float = 5) -> dict:
    return await asyncio.wait_for(layer.receive(channel), timeout)


@pytest.mark.parametrize("serializer", ["json", CUSTOM])
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
async def test_send_and_group_send_round_trip(
    make_layer: LayerFactory, serializer: str, encrypted: bool
) -> None:
    keys = [generate_key()] if encrypted else None
    sender = make_layer(serializer=serializer, encryption_keys=keys)
    receiver = make_layer(serializer=serializer, encryption_keys=keys)
    channel, one, two = [await receiver.new_channel() for _ in range(3)]
    await receiver.group_add("room", one)
    await receiver.group_add("room", two)
    message = {"type": "chat.message", "text": "héllo ✓", "n": [1, 2.5, None, True], "nested": {"a": {}}}
    await sender.send(channel, message)
    await sender.group_send("room", message)
    assert await receive(receiver, channel) == message
    first, second = await receive(receiver, one), await receive(receiver, two)
    assert first == second == message
    first["text"] = "changed"
    assert second["text"] == "héllo ✓"  # each member its own copy, decoded with the serializer
    assert not link_of(receiver).dropped


async def test_json_refuses_bytes_at_the_call_and_sends_nothing(make_layer: LayerFactory) -> None:
    sender, receiver = make_layer(serializer="json"), make_layer(serializer="json")
    channel = await receiver.new_channel()
    await receiver.group_add("room", channel)
    with pytest.raises(TypeError, match="json"):
        await sender.send(channel, {"type": "m", "raw": b"\x00"})
    with pytest.raises(TypeError, match="json"):
        await sender.group_send("room", {"type": "m", "raw": b"\x00"})
    await sender.send(channel, {"type": "after"})
    assert await receive(receiver, channel) == {"type": "after"}


async def test_a_body_in_another_serializer_is_dropped_as_undecodable(make_layer: LayerFactory) -> None:
    json_receiver, msgpack_sender = make_layer(serializer="json"), make_layer()
    channel = await json_receiver.new_channel()
    await msgpack_sender.send(channel, {"type": "msgpack"})
    await make_layer(serializer="json").send(channel, {"type": "json"})
    assert await receive(json_receiver, channel) == {"type": "json"}
    assert link_of(json_receiver).dropped[DROPPED_UNDECODABLE] == 1


async def test_another_amqp_client_publishes_json_to_a_channel_and_a_group(make_layer: LayerFactory) -> None:
    receiver, producer = make_layer(serializer="json"), make_layer()
    channel = await receiver.new_channel()
    await receiver.group_add("room", channel)
    await producer.new_channel()
    connection = await link_of(producer).publishing.connected()
    queue = channel.partition("!")[0][-21:].encode()
    direct, group = json.dumps({"type": "direct"}).encode(), json.dumps({"type": "group"}).encode()
    assert await connection.publish(PUBLISH_CHANNEL, b"", queue, channel_properties(channel), direct)
    assert await connection.publish(PUBLISH_CHANNEL, b"groups", b"room", NO_PROPERTIES, group)
    not_an_object = b"[1, 2]"
    assert await connection.publish(PUBLISH_CHANNEL, b"groups", b"room", NO_PROPERTIES, not_an_object)
    assert await receive(receiver, channel) == {"type": "direct"}
    assert await receive(receiver, channel) == {"type": "group"}
    await asyncio.sleep(0.2)
    assert link_of(receiver).dropped[DROPPED_UNDECODABLE] == 1


async def test_a_custom_serializer_s_bytes_are_what_travels(make_layer: LayerFactory, broker: Broker) -> None:
    receiver, producer = make_layer(serializer=CUSTOM), make_layer()
    channel = await receiver.new_channel()
    await producer.new_channel()
    connection = await link_of(producer).publishing.connected()
    queue = channel.partition("!")[0][-21:].encode()
    body = Reversed.dumps({"type": "reversed"})
    assert await connection.publish(PUBLISH_CHANNEL, b"", queue, channel_properties(channel), body)
    assert await receive(receiver, channel) == {"type": "reversed"}


@pytest.mark.parametrize("serializer", ["json", CUSTOM])
async def test_the_connection_probe_is_not_decoded_with_the_serializer(
    make_layer: LayerFactory, broker: Broker, serializer: str
) -> None:
    """Each consuming connection proves it receives with a probe to itself (msgpack, dropped unread):
    a layer of another serializer comes up without counting it as undecodable, after reconnecting too."""
    layer = make_layer(serializer=serializer, reconnect_delay_min=0.05, reconnect_delay_max=0.2)
    channel = await layer.new_channel()
    link = link_of(layer)
    assert link.is_connected
    await asyncio.to_thread(
        rabbitmqctl, "close_all_connections", "--vhost", broker.vhost, "--limit", "1000", "t"
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while not (link.consuming.reconnections and link.is_connected):
        assert loop.time() < deadline, "the layer did not reconnect"
        await asyncio.sleep(0.02)
    await layer.send(channel, {"type": "after"})
    assert await receive(layer, channel) == {"type": "after"}
    assert not link.dropped, link.dropped
