"""``layer.stats()`` against the real broker: every counter moves when, and only when, it should."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest
from channels.exceptions import ChannelFull

from channels_rabbitmq.core import RabbitmqChannelLayer
from channels_rabbitmq.stats import DROP_REASONS, LayerStats
from tests.conftest import LayerFactory, eventually

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("loop_kind")]  # on asyncio and uvloop


async def receive(layer: RabbitmqChannelLayer, channel: str) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), 10)


def drops(stats: LayerStats) -> dict[str, int]:
    return {reason: count for reason, count in stats.dropped.items() if count}


async def test_a_new_layer_has_no_link_and_counts_nothing(make_layer: LayerFactory) -> None:
    stats = make_layer().stats()
    assert (stats.state, stats.links, stats.published, stats.connections) == ("idle", (), 0, 0)
    assert dict(stats.dropped) == dict.fromkeys(DROP_REASONS, 0)


async def test_sends_group_sends_and_receives_are_counted_on_both_sides(make_layer: LayerFactory) -> None:
    receiver, sender = make_layer(), make_layer()
    channel, member, other = [await receiver.new_channel() for _ in range(3)]
    await receiver.group_add("room", member)
    await receiver.group_add("room", other)
    before = receiver.stats()
    assert (before.state, before.groups, before.connections, before.reconnections) == ("up", 1, 2, 0)
    [link] = before.links
    assert channel.partition("!")[0].endswith(link.queue)
    assert (link.consume_state, link.publish_state) == ("up", "up")

    for index in range(3):
        await sender.send(channel, {"type": "direct", "i": index})
    for index in range(2):
        await sender.group_send("room", {"type": "group", "i": index})
    sent = sender.stats()  # a layer that only sends: its link is on the layer's I/O thread
    assert (sent.published, sent.confirmed, sent.refused, sent.publish_failed) == (5, 5, 0, 0)
    assert sent.confirm_latency.count == 5
    assert sent.confirm_latency.sum > 0
    assert (sent.received, sent.delivered, sent.groups) == (0, 0, 0)

    # Nobody reads yet: three direct messages and two group messages (each held once) wait.
    await eventually(lambda: receiver.stats().received == 5, "the five deliveries")
    held = receiver.stats()
    assert (held.held, held.inboxes, held.delivered) == (5, 3, 0)
    assert [(await receive(receiver, channel))["i"] for _ in range(3)] == [0, 1, 2]
    for each in (member, other):
        assert [(await receive(receiver, each))["i"] for _ in range(2)] == [0, 1]
    after = receiver.stats()
    assert (after.received, after.delivered, after.held, after.inboxes) == (5, 7, 0, 0)
    assert (after.published, after.confirmed) == (0, 0)
    assert drops(after) == {}


async def test_a_send_refused_by_a_full_queue_is_counted_as_refused(make_layer: LayerFactory) -> None:
    receiver = make_layer(local_capacity=20, prefetch_count=10, remote_capacity=30, capacity=1000)
    sender = make_layer()
    channel = await receiver.new_channel()
    sent = 0
    refused = False
    while not refused and sent < 200:
        try:
            await sender.send(channel, {"i": sent})
        except ChannelFull:
            refused = True
        else:
            sent += 1
    assert refused, "the queue never filled"
    stats = sender.stats()
    assert (stats.published, stats.confirmed, stats.refused) == (sent + 1, sent, 1)
    assert stats.confirm_latency.count == sent + 1
    # local_capacity (20) reached, and what was in flight then (prefetch_count, 10); the rest waits
    # in RabbitMQ, unacknowledged.
    await eventually(lambda: receiver.stats().held >= 20, "the receiver's memory to fill")
    assert 20 <= receiver.stats().held <= 30


async def test_drops_are_counted_by_reason_and_their_warnings_are_rate_limited(
    make_layer: LayerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    full = make_layer(capacity=2)
    small = make_layer(max_message_size=200)
    strict = make_layer(serializer="json")
    sender = make_layer()
    full_channel, small_channel, strict_channel = (
        await full.new_channel(),
        await small.new_channel(),
        await strict.new_channel(),
    )
    with caplog.at_level(logging.WARNING, logger="channels_rabbitmq"):
        for index in range(10):
            await sender.send(full_channel, {"i": index})
        for _ in range(3):
            await sender.send(small_channel, {"text": "x" * 1000})
            await sender.send(strict_channel, {"type": "msgpack, not json"})
        await eventually(lambda: full.stats().dropped["channel_full"] == 8, "8 drops at the full channel")
        await eventually(lambda: small.stats().dropped["too_large"] == 3, "3 drops of large messages")
        await eventually(lambda: strict.stats().dropped["undecodable"] == 3, "3 undecodable drops")
    assert drops(full.stats()) == {"channel_full": 8}
    assert full.stats().held == 2
    assert drops(small.stats()) == {"too_large": 3}
    assert drops(strict.stats()) == {"undecodable": 3}
    assert all(layer.stats().received == count for layer, count in ((full, 10), (small, 3), (strict, 3)))
    warned = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    # One line per kind of drop per link (10 s apart at most), however many were dropped.
    assert len([line for line in warned if line.startswith(f"dropped a message for {full_channel}")]) == 1
    assert len([line for line in warned if "max_message_size" in line]) == 1, warned
    assert len([line for line in warned if "dropped a message from the wire" in line]) == 2, warned


async def test_messages_nobody_reads_are_counted_as_expired(make_layer: LayerFactory) -> None:
    receiver, sender = make_layer(expiry=0.3), make_layer()
    channel = await receiver.new_channel()
    for index in range(4):
        await sender.send(channel, {"i": index})
    await eventually(lambda: receiver.stats().dropped["expired"] == 4, "the messages to expire")
    stats = receiver.stats()
    assert (stats.received, stats.held, stats.inboxes, stats.delivered) == (4, 0, 0, 0)


async def test_normal_channels_are_counted(make_layer: LayerFactory) -> None:
    worker, client = make_layer(), make_layer()
    await client.send("jobs", {"type": "job"})
    assert await receive(worker, "jobs") == {"type": "job"}
    assert (client.stats().normal_channels, client.stats().published) == (1, 1)
    stats = worker.stats()
    assert (stats.normal_channels, stats.received, stats.delivered) == (1, 1, 1)


async def test_a_receive_from_another_thread_counts_once(make_layer: LayerFactory) -> None:
    receiver, sender = make_layer(), make_layer()
    channel = await receiver.new_channel()
    await sender.send(channel, {"type": "across"})
    # Carried over to the channel's loop and back (loops.Links.receive): delivered once.
    message = await asyncio.to_thread(asyncio.run, receiver.receive(channel))
    assert message == {"type": "across"}
    assert receiver.stats().delivered == 1


async def test_stats_from_another_thread_while_messages_flow(make_layer: LayerFactory) -> None:
    receiver = make_layer()
    channel = await receiver.new_channel()
    seen: list[LayerStats] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def watch() -> None:
        try:
            while not stop.is_set():
                stats = receiver.stats()
                stats.as_dict()
                seen.append(stats)
        except BaseException as error:
            errors.append(error)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for index in range(300):
            await receiver.send(channel, {"i": index})
            assert (await receive(receiver, channel))["i"] == index
    finally:
        stop.set()
        watcher.join(10)
    assert not errors
    assert len(seen) > 10
    for counter in ("published", "confirmed", "received", "delivered"):
        values = [getattr(stats, counter) for stats in seen]
        assert values == sorted(values), f"{counter} went back"
    final = receiver.stats()
    assert (final.published, final.confirmed, final.received, final.delivered) == (300, 300, 300, 300)


async def test_close_keeps_the_counters_and_says_closed(make_layer: LayerFactory) -> None:
    layer = make_layer()
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "m"})
    await receive(layer, channel)
    await layer.close()
    stats = layer.stats()
    assert (stats.state, stats.links, stats.published, stats.delivered, stats.connections) == (
        "closed",
        (),
        1,
        1,
        2,
    )
