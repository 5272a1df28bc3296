"""``new_channel(prefix)`` against the real broker: the names start with the prefix and work everywhere."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from channels_rabbitmq.core import RabbitmqChannelLayer
from channels_rabbitmq.link.channel_plan import PUBLISH_CHANNEL
from channels_rabbitmq.wire import channel_properties
from tests.conftest import Broker, LayerFactory, link_of

pytestmark = pytest.mark.usefixtures("loop_kind")  # each test on asyncio's loop and on uvloop


async def receive(layer: RabbitmqChannelLayer, channel: str, timeout: float = 5) -> dict:
    return await asyncio.wait_for(layer.receive(channel), timeout)


@pytest.mark.parametrize(
    ("prefix", "start"),
    [("specific.", "specific."), ("specific", "specific."), ("ws.chat-v2_", "ws.chat-v2_."), ("", "")],
)
async def test_names_start_with_the_prefix_then_this_process_s_queue(
    make_layer: LayerFactory, prefix: str, start: str
) -> None:
    layer = make_layer()
    name = await layer.new_channel(prefix)
    assert name.startswith(prefix)
    assert name.startswith(f"{start}{link_of(layer).queue_name}!")
    layer.require_valid_channel_name(name)


async def test_the_default_prefix_is_channels_own(make_layer: LayerFactory) -> None:
    layer = make_layer()
    assert (await layer.new_channel()).startswith(f"specific.{link_of(layer).queue_name}!")


async def test_prefixed_channels_are_sent_to_and_grouped_from_another_layer(make_layer: LayerFactory) -> None:
    receiver, sender = make_layer(), make_layer()
    direct = await receiver.new_channel("websocket.")
    member = await receiver.new_channel("room-member")
    plain = await receiver.new_channel("")
    await receiver.group_add("room", member)
    for channel in (direct, member, plain):
        await sender.send(channel, {"type": "direct", "to": channel})
    await sender.group_send("room", {"type": "group"})
    assert await receive(receiver, direct) == {"type": "direct", "to": direct}
    assert await receive(receiver, member) == {"type": "direct", "to": member}
    assert await receive(receiver, member) == {"type": "group"}
    assert await receive(receiver, plain) == {"type": "direct", "to": plain}
    await receiver.group_discard("room", member)
    await sender.group_send("room", {"type": "gone"})
    await sender.send(member, {"type": "after"})
    assert await receive(receiver, member) == {"type": "after"}


async def test_two_processes_with_prefixes_talk_both_ways(make_layer: LayerFactory) -> None:
    one, two = make_layer(), make_layer()
    one_channel, two_channel = await one.new_channel("alpha."), await two.new_channel("beta.")
    await one.send(two_channel, {"type": "ping", "reply_to": one_channel})
    ping = await receive(two, two_channel)
    await two.send(ping["reply_to"], {"type": "pong"})
    assert await receive(one, one_channel) == {"type": "pong"}


async def test_a_prefixed_channel_of_another_process_is_received_only_by_its_owner_and_joins_groups(
    make_layer: LayerFactory, broker: Broker
) -> None:
    layer, other = make_layer(), make_layer()
    foreign = await other.new_channel("specific.")
    own = await layer.new_channel("specific.")
    # The same queue name after a prefix that is not ours is still that queue's channel.
    assert foreign.partition("!")[0][-21:] == link_of(other).queue_name
    with pytest.raises(ValueError, match="new_channel"):
        await layer.receive(foreign)
    await layer.group_add("room", foreign)  # another process's: that process binds (test_remote_groups)
    assert (link_of(other).queue_name, "room") in broker.bindings()
    await layer.group_add("room", own)  # its own, prefixed, is fine


async def test_a_name_with_a_prefix_the_owner_did_not_choose_reaches_the_owner(
    make_layer: LayerFactory,
) -> None:
    """The queue is found by position: a name made elsewhere with any prefix routes to that queue."""
    receiver, sender = make_layer(), make_layer()
    await receiver.new_channel()
    invented = f"some.other.prefix.{link_of(receiver).queue_name}!invented"
    await sender.send(invented, {"type": "m"})
    assert await receive(receiver, invented) == {"type": "m"}


async def test_another_amqp_client_reaches_a_prefixed_channel_as_the_wire_format_says(
    make_layer: LayerFactory, broker: Broker
) -> None:
    receiver, producer = make_layer(), make_layer()
    channel = await receiver.new_channel("specific.")
    await producer.new_channel()
    connection = await link_of(producer).publishing.connected()
    routing_key = channel.partition("!")[0][-21:]  # as the pika example in docs/design/wire-format.md does
    body = msgpack.packb({"type": "from.elsewhere"}, use_bin_type=True)
    assert await connection.publish(
        PUBLISH_CHANNEL, b"", routing_key.encode(), channel_properties(channel), body
    )
    assert await receive(receiver, channel) == {"type": "from.elsewhere"}


async def test_sync_code_sends_to_a_prefixed_channel(make_layer: LayerFactory) -> None:
    """From a thread with ``async_to_sync``, through the layer's I/O thread link."""
    from asgiref.sync import async_to_sync

    receiver, sender = make_layer(), make_layer()
    channel = await receiver.new_channel("celery.")
    await asyncio.to_thread(async_to_sync(sender.send), channel, {"type": "from.a.thread"})
    assert await receive(receiver, channel) == {"type": "from.a.thread"}


@pytest.mark.parametrize(
    ("prefix", "error"), [("x" * 65, ValueError), ("no spaces", ValueError), (None, TypeError)]
)
async def test_a_prefix_that_makes_an_invalid_name_raises_at_the_call(
    make_layer: LayerFactory, broker: Broker, prefix: object, error: type[Exception]
) -> None:
    layer = make_layer()
    with pytest.raises(error, match="prefix"):
        await layer.new_channel(prefix)  # type: ignore[arg-type]
    assert layer._links.all() == []  # refused before connecting
    name = await layer.new_channel("x" * 64)  # the longest that fits
    assert len(name) == 99
    layer.require_valid_channel_name(name)
