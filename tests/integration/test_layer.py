"""The Channels layer API against the real broker: messages, names, groups, capacity, expiry."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from channels.exceptions import ChannelFull, MessageTooLarge, StopConsumer

from channels_rabbitmq.core import RabbitmqChannelLayer
from tests.conftest import Broker, LayerFactory, eventually, link_of

pytestmark = pytest.mark.usefixtures("loop_kind")  # each test on asyncio's loop and on uvloop


async def receive(layer: RabbitmqChannelLayer, channel: str, timeout: float = 5) -> dict:
    return await asyncio.wait_for(layer.receive(channel), timeout)


async def assert_nothing_arrives(layer: RabbitmqChannelLayer, channel: str, wait: float = 0.5) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(channel), wait)


# Messages ---------------------------------------------------------------------------------------


async def test_send_carries_every_msgpack_type_and_keeps_bytes(make_layer: LayerFactory) -> None:
    sender, receiver = make_layer(), make_layer()
    channel = await receiver.new_channel()
    message = {
        "type": "all.types",
        "text": "héllo ✓",
        "bytes": b"\x00\xff\x80binary",
        "int": -(2**63),
        "big": 2**64 - 1,
        "float": 1.5e300,
        "true": True,
        "none": None,
        "list": [1, "two", b"3", [4.0]],
        "dict": {"nested": {"deeper": [None]}},
        "tuple": (1, 2),
    }
    await sender.send(channel, message)
    received = await receive(receiver, channel)
    assert received == {**message, "tuple": [1, 2]}
    assert type(received["bytes"]) is bytes


async def test_messages_from_one_sender_arrive_in_order(make_layer: LayerFactory) -> None:
    sender, receiver = make_layer(), make_layer(remote_capacity=1000, capacity=1000)
    channel = await receiver.new_channel()
    await asyncio.gather(*(sender.send(channel, {"type": "m", "i": i}) for i in range(300)))
    assert [(await receive(receiver, channel))["i"] for _ in range(300)] == list(range(300))


async def test_a_process_that_only_receives_gets_what_is_sent_to_it(make_layer: LayerFactory) -> None:
    receiver = make_layer()
    channel = await receiver.new_channel()  # connects: the queue exists before anyone sends
    sender = make_layer()
    await sender.send(channel, {"type": "first"})
    await asyncio.sleep(0.2)  # the message waits for the first receive()
    assert await receive(receiver, channel) == {"type": "first"}


async def test_a_layer_sends_to_its_own_channels(make_layer: LayerFactory) -> None:
    layer = make_layer()
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "self"})
    assert await receive(layer, channel) == {"type": "self"}


async def test_new_channel_names_are_unique_and_of_this_process(make_layer: LayerFactory) -> None:
    layer = make_layer()
    names = {await layer.new_channel() for _ in range(1000)}
    assert len(names) == 1000
    assert all(name.startswith("specific." + link_of(layer).queue_name + "!") for name in names)
    assert all(len(name) < 100 for name in names)


async def test_one_megabyte_message_round_trips(make_layer: LayerFactory) -> None:
    sender, receiver = make_layer(), make_layer()
    channel = await receiver.new_channel()
    payload = bytes(range(256)) * 4096  # 1 MiB
    await sender.send(channel, {"type": "big", "payload": payload})
    assert (await receive(receiver, channel))["payload"] == payload


# Bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "has space", "x" * 100, "bad!!bang", "ünïcode", 42, None])
async def test_bad_channel_names_raise_type_error_and_send_nothing(
    make_layer: LayerFactory, name: object
) -> None:
    sender, receiver = make_layer(), make_layer()
    channel = await receiver.new_channel()
    with pytest.raises(TypeError):
        await sender.send(name, {"type": "m"})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await receiver.receive(name)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await receiver.group_add("group", name)  # type: ignore[arg-type]
    await sender.send(channel, {"type": "after"})
    assert await receive(receiver, channel) == {"type": "after"}


@pytest.mark.parametrize("name", ["", "has space", "x" * 100, "bang!", 7])
async def test_bad_group_names_raise_type_error(make_layer: LayerFactory, name: object) -> None:
    layer = make_layer()
    channel = await layer.new_channel()
    with pytest.raises(TypeError):
        await layer.group_add(name, channel)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await layer.group_discard(name, channel)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await layer.group_send(name, {"type": "m"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("message", "complaint"),
    [
        (["not", "a", "dict"], "must be a dict"),
        ("text", "must be a dict"),
        ({"type": "m", "value": {1, 2}}, "msgpack"),
        ({"type": "m", "value": object()}, "msgpack"),
        ({"type": "m", "value": 2**64}, "msgpack"),
    ],
)
async def test_bad_messages_raise_type_error_and_send_nothing(
    make_layer: LayerFactory, message: object, complaint: str
) -> None:
    sender, receiver = make_layer(), make_layer()
    channel = await receiver.new_channel()
    with pytest.raises(TypeError, match=complaint):
        await sender.send(channel, message)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=complaint):
        await sender.group_send("group", message)  # type: ignore[arg-type]
    await sender.send(channel, {"type": "after"})
    assert await receive(receiver, channel) == {"type": "after"}


async def test_message_over_the_size_limit_raises_before_reaching_the_broker(
    make_layer: LayerFactory, broker: Broker
) -> None:
    sender, receiver = make_layer(max_message_size=1000), make_layer()
    channel = await receiver.new_channel()
    with pytest.raises(MessageTooLarge):
        await sender.send(channel, {"type": "m", "payload": b"x" * 1000})
    with pytest.raises(MessageTooLarge):
        await sender.group_send("group", {"type": "m", "payload": b"x" * 1000})
    await sender.send(channel, {"type": "small"})
    assert await receive(receiver, channel) == {"type": "small"}


async def test_receive_refuses_channels_of_other_processes(make_layer: LayerFactory) -> None:
    layer, other = make_layer(), make_layer()
    foreign = await other.new_channel()
    with pytest.raises(ValueError, match="new_channel"):
        await layer.receive(foreign)


# Groups -----------------------------------------------------------------------------------------


async def test_group_send_reaches_every_member_in_every_process_once(make_layer: LayerFactory) -> None:
    sender, first, second = make_layer(), make_layer(), make_layer()
    members = [(first, await first.new_channel()) for _ in range(3)]
    members += [(second, await second.new_channel()) for _ in range(2)]
    for layer, channel in members:
        await layer.group_add("room", channel)
        await layer.group_add("room", channel)  # idempotent
    await sender.group_send("room", {"type": "hello"})
    for layer, channel in members:
        assert await receive(layer, channel) == {"type": "hello"}
    for layer, channel in members:
        await assert_nothing_arrives(layer, channel, 0.2)


async def test_group_members_each_get_their_own_copy(make_layer: LayerFactory) -> None:
    sender, receiver = make_layer(), make_layer()
    one, two = await receiver.new_channel(), await receiver.new_channel()
    await receiver.group_add("room", one)
    await receiver.group_add("room", two)
    await sender.group_send("room", {"type": "m", "items": [1]})
    first = await receive(receiver, one)
    first["items"].append("changed")
    assert await receive(receiver, two) == {"type": "m", "items": [1]}


async def test_queue_is_bound_on_first_member_and_unbound_on_last(
    make_layer: LayerFactory, broker: Broker
) -> None:
    layer = make_layer()
    one, two = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("room", one)
    await layer.group_add("room", two)
    assert (link_of(layer).queue_name, "room") in broker.bindings()
    await layer.group_discard("room", one)
    assert (link_of(layer).queue_name, "room") in broker.bindings()
    await layer.group_discard("room", two)
    await layer.group_discard("room", two)  # not a member any more: no error
    await layer.group_discard("never-joined", one)
    assert (link_of(layer).queue_name, "room") not in broker.bindings()


async def test_discarded_member_gets_no_more_group_messages(make_layer: LayerFactory) -> None:
    sender, receiver = make_layer(), make_layer()
    stays, leaves = await receiver.new_channel(), await receiver.new_channel()
    await receiver.group_add("room", stays)
    await receiver.group_add("room", leaves)
    await receiver.group_discard("room", leaves)
    await sender.group_send("room", {"type": "m"})
    assert await receive(receiver, stays) == {"type": "m"}
    await assert_nothing_arrives(receiver, leaves, 0.3)


async def test_concurrent_group_adds_all_wait_for_the_binding(make_layer: LayerFactory) -> None:
    sender, receiver = make_layer(), make_layer()
    channels = [await receiver.new_channel() for _ in range(20)]
    await asyncio.gather(*(receiver.group_add("crowd", channel) for channel in channels))
    await sender.group_send("crowd", {"type": "m"})
    for channel in channels:
        assert await receive(receiver, channel) == {"type": "m"}


async def test_group_membership_expires_after_group_expiry(make_layer: LayerFactory, broker: Broker) -> None:
    sender, receiver = make_layer(), make_layer(group_expiry=1)
    channel = await receiver.new_channel()
    await receiver.group_add("short", channel)
    await asyncio.sleep(2.5)
    assert (link_of(receiver).queue_name, "short") not in broker.bindings()
    await sender.group_send("short", {"type": "m"})
    await assert_nothing_arrives(receiver, channel, 0.3)


async def test_group_add_again_refreshes_group_expiry(make_layer: LayerFactory) -> None:
    sender, receiver = make_layer(), make_layer(group_expiry=2)
    channel = await receiver.new_channel()
    await receiver.group_add("kept", channel)
    for _ in range(3):
        await asyncio.sleep(1)
        await receiver.group_add("kept", channel)
    await sender.group_send("kept", {"type": "m"})
    assert await receive(receiver, channel) == {"type": "m"}


async def test_another_amqp_producer_can_publish_to_a_group(make_layer: LayerFactory, broker: Broker) -> None:
    """The documented wire format: msgpack body, groups exchange, routing key = group."""
    import msgpack

    from channels_rabbitmq.link.channel_plan import PUBLISH_CHANNEL

    receiver, producer = make_layer(), make_layer()
    channel = await receiver.new_channel()
    await receiver.group_add("room", channel)
    await producer.new_channel()
    connection = await link_of(producer).publishing.connected()
    body = msgpack.packb({"type": "from.elsewhere", "n": 1})
    assert await connection.publish(PUBLISH_CHANNEL, b"groups", b"room", b"\x00\x00", body)
    assert await receive(receiver, channel) == {"type": "from.elsewhere", "n": 1}


# Capacity -------------------------------------------------------------------------------------


async def test_queue_is_declared_with_capacity_and_ttl(make_layer: LayerFactory, broker: Broker) -> None:
    layer = make_layer(remote_capacity=7, remote_capacity_bytes=5_000_000, expiry=30)
    await layer.new_channel()
    queue = broker.queue(link_of(layer).queue_name)
    assert queue["exclusive"] is True
    arguments = {name: value for name, _type, value in queue["arguments"]}
    assert arguments.pop("x-queue-type", "classic") == "classic"  # 4.x lists the type it chose
    assert arguments == {
        "x-max-length": 7,
        "x-max-length-bytes": 5_000_000,
        "x-overflow": "reject-publish",
        "x-message-ttl": 30000,
    }


async def test_send_raises_channel_full_when_the_receiver_is_at_remote_capacity(
    make_layer: LayerFactory,
) -> None:
    sender = make_layer()
    receiver = make_layer(remote_capacity=5, local_capacity=1, prefetch_count=1)
    channel = await receiver.new_channel()
    accepted = 0

    async def send_until_full() -> None:
        nonlocal accepted
        for i in range(1, 50):
            await sender.send(channel, {"type": "m", "i": i})
            accepted = i

    with pytest.raises(ChannelFull):
        await send_until_full()
    # local (1) + prefetched (1) + remote_capacity (5), give or take the one in flight
    assert 5 <= accepted <= 8
    # every send that returned was accepted: all of them are delivered, in order
    received = [(await receive(receiver, channel))["i"] for _ in range(accepted)]
    assert received == list(range(1, accepted + 1))


async def test_group_send_never_raises_channel_full_but_warns(
    make_layer: LayerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    sender = make_layer()
    receiver = make_layer(remote_capacity=2, local_capacity=1, prefetch_count=1)
    channel = await receiver.new_channel()
    await receiver.group_add("busy", channel)
    with caplog.at_level(logging.WARNING, logger="channels_rabbitmq"):
        for i in range(20):
            await sender.group_send("busy", {"type": "m", "i": i})
    warnings = [
        r for r in caplog.records if "'busy'" in r.getMessage() and "remote_capacity" in r.getMessage()
    ]
    assert len(warnings) == 1  # rate-limited


async def test_local_capacity_bounds_what_the_process_holds(make_layer: LayerFactory, broker: Broker) -> None:
    sender = make_layer()
    receiver = make_layer(local_capacity=3, prefetch_count=2, remote_capacity=1000)
    channel = await receiver.new_channel()
    for i in range(50):
        await sender.send(channel, {"type": "m", "i": i})
    # The process takes what it may hold, and the rest waits in RabbitMQ: wait for that split.
    await eventually(lambda: link_of(receiver).router.held >= 3, "the process to fill its local capacity")
    await eventually(
        lambda: broker.queue(link_of(receiver).queue_name)["messages"] >= 50 - 5,
        "the rest to wait in RabbitMQ",
    )
    assert link_of(receiver).router.held <= 3 + 2
    assert [(await receive(receiver, channel))["i"] for _ in range(50)] == list(range(50))


# Expiry -----------------------------------------------------------------------------------------


async def test_messages_not_read_within_expiry_are_dropped(make_layer: LayerFactory) -> None:
    sender, receiver = make_layer(), make_layer(expiry=1)
    channel = await receiver.new_channel()
    await sender.send(channel, {"type": "old"})
    await asyncio.sleep(2.5)
    await sender.send(channel, {"type": "new"})
    assert await receive(receiver, channel) == {"type": "new"}


async def test_buffers_of_channels_nobody_reads_are_freed(make_layer: LayerFactory) -> None:
    sender, receiver = make_layer(), make_layer(expiry=1, local_capacity=10_000)
    channels = [await receiver.new_channel() for _ in range(500)]
    for channel in channels:
        await sender.send(channel, {"type": "unread"})
    await eventually(lambda: link_of(receiver).router.inbox_count > 0, "the unread messages to arrive")
    await eventually(lambda: link_of(receiver).router.inbox_count == 0, "the expired inboxes to be freed")
    assert link_of(receiver).router.held == 0


# Flush, close, cancellation ---------------------------------------------------------------------


async def test_flush_empties_buffers_queue_and_groups(make_layer: LayerFactory, broker: Broker) -> None:
    sender, receiver = make_layer(), make_layer(local_capacity=2, prefetch_count=1)
    channel = await receiver.new_channel()
    await receiver.group_add("room", channel)
    for i in range(10):
        await sender.send(channel, {"type": "m", "i": i})
    await asyncio.sleep(0.3)
    assert "flush" in receiver.extensions
    await receiver.flush()
    assert broker.queue(link_of(receiver).queue_name)["messages"] == 0
    assert (link_of(receiver).queue_name, "room") not in broker.bindings()
    await sender.group_send("room", {"type": "group"})
    await sender.send(channel, {"type": "after"})
    assert await receive(receiver, channel) == {"type": "after"}


async def test_close_makes_pending_and_later_receives_raise_stop_consumer(
    make_layer: LayerFactory, broker: Broker
) -> None:
    layer = make_layer()
    channel = await layer.new_channel()
    queue_name = link_of(layer).queue_name
    pending = asyncio.ensure_future(layer.receive(channel))
    await asyncio.sleep(0.1)
    await layer.close()
    with pytest.raises(StopConsumer):
        await pending
    with pytest.raises(StopConsumer):
        await layer.receive(channel)
    await layer.close()  # idempotent
    assert all(queue["name"] != queue_name for queue in broker.queues())


async def test_cancelled_receive_loses_nothing(make_layer: LayerFactory) -> None:
    sender, receiver = make_layer(), make_layer()
    channel = await receiver.new_channel()
    total = 300
    received: list[int] = []

    async def send_all() -> None:
        for i in range(total):
            await sender.send(channel, {"type": "m", "i": i})
            if i % 7 == 0:
                await asyncio.sleep(0)

    sending = asyncio.ensure_future(send_all())
    deadline = time.monotonic() + 60  # a lost message fails the test instead of spinning for ever
    while len(received) < total:
        assert time.monotonic() < deadline, (
            f"{len(received)} of {total} received after 60 s; the sender is "
            f"{'done' if sending.done() else 'still sending'}; stats: {receiver.stats()}"
        )
        task = asyncio.ensure_future(receiver.receive(channel))
        await asyncio.sleep(0)  # give it a chance to get a message, then cancel it mid-way
        task.cancel()
        try:
            received.append((await task)["i"])
        except asyncio.CancelledError:
            pass
        if sending.done() and not len(received) % 50:
            await asyncio.sleep(0.01)
    await sending
    assert received == list(range(total))
    await assert_nothing_arrives(receiver, channel, 0.2)


async def test_nothing_is_left_on_the_broker_after_close(make_layer: LayerFactory, broker: Broker) -> None:
    layer = make_layer()
    channel = await layer.new_channel()
    await layer.group_add("room", channel)
    queue_name = link_of(layer).queue_name
    await layer.close()
    assert all(queue["name"] != queue_name for queue in broker.queues())
    assert not {binding for binding in broker.bindings() if binding[0] == queue_name}
