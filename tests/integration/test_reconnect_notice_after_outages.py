"""``reconnect_notice_type`` against the real broker: one notice per live channel per lost queue.

Outages are made by RabbitMQ itself (``rabbitmqctl close_all_connections`` on the run's vhost,
which drops both connections of every link, or ``close_connection`` for one connection).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from channels_rabbitmq.config import LayerConfig
from channels_rabbitmq.core import RabbitmqChannelLayer
from channels_rabbitmq.link import BrokerLink
from channels_rabbitmq.wire.codec import MessageCodec
from tests.conftest import Broker, LayerFactory, link_of, rabbitmqctl

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("loop_kind")]  # on asyncio and uvloop

NOTICE = "channel_layer.reconnected"
FAST = {"reconnect_delay_min": 0.05, "reconnect_delay_max": 0.2, "connect_timeout": 3}


async def receive(layer: RabbitmqChannelLayer, channel: str, timeout: float = 5) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), timeout)


async def assert_nothing_arrives(layer: RabbitmqChannelLayer, channel: str, wait: float = 0.3) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(channel), wait)


async def outage(broker: Broker, *links: BrokerLink) -> None:
    """Close every connection of the vhost; return once each link consumes again on a new queue."""
    before = [link.consuming.reconnections for link in links]
    await asyncio.to_thread(
        rabbitmqctl, "close_all_connections", "--vhost", broker.vhost, "--limit", "1000", "t"
    )
    await until(
        lambda: all(
            link.consuming.reconnections > count and link.is_connected
            for link, count in zip(links, before, strict=True)
        ),
        "the links to reconnect",
    )


async def until(condition: Any, what: str, timeout: float = 15) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"still waiting after {timeout:g}s for {what}"
        await asyncio.sleep(0.02)


async def test_every_live_channel_gets_one_notice_per_outage(
    make_layer: LayerFactory, broker: Broker
) -> None:
    layer = make_layer(reconnect_notice_type=NOTICE, **FAST)
    waiting, buffered, member, idle = [await layer.new_channel() for _ in range(4)]
    await layer.group_add("room", member)
    link = link_of(layer)
    for number in range(2):  # two outages: one notice each
        await layer.send(buffered, {"type": "before", "n": number})
        await until(lambda: link.router.held == 1, "the message to arrive")
        pending = asyncio.create_task(layer.receive(waiting))
        await asyncio.sleep(0.05)
        await outage(broker, link)
        assert await asyncio.wait_for(pending, 5) == {"type": NOTICE}
        assert await receive(layer, member) == {"type": NOTICE}
        assert await receive(layer, buffered) == {"type": "before", "n": number}  # it keeps its place
        assert await receive(layer, buffered) == {"type": NOTICE}
        # Exactly one each, though both of the link's connections dropped.
        for channel in (waiting, member, buffered):
            await assert_nothing_arrives(layer, channel)
    # A channel with no receive waiting at either recovery is told at its next receive(), once.
    assert await receive(layer, idle) == {"type": NOTICE}
    await assert_nothing_arrives(layer, idle)


async def test_a_consumer_busy_at_the_recovery_is_told_at_its_next_receive(
    make_layer: LayerFactory, broker: Broker
) -> None:
    layer = make_layer(reconnect_notice_type=NOTICE, **FAST)
    busy = await layer.new_channel()
    await layer.send(busy, {"type": "work"})
    assert await receive(layer, busy) == {"type": "work"}  # being handled: no receive() waits now
    link = link_of(layer)
    assert busy not in link.router.channels()
    await outage(broker, link)
    made_after = await layer.new_channel()
    await layer.send(busy, {"type": "sent.after"})
    await until(lambda: link.router.held == 1, "the message to arrive before the next receive()")
    assert await receive(layer, busy) == {"type": NOTICE}  # first: what is buffered came later
    assert await receive(layer, busy) == {"type": "sent.after"}
    await assert_nothing_arrives(layer, busy)
    await assert_nothing_arrives(layer, made_after)  # made after the recovery: it missed nothing


async def test_a_channel_first_seen_after_the_window_is_not_told(
    make_layer: LayerFactory, broker: Broker
) -> None:
    layer = make_layer(reconnect_notice_type=NOTICE, expiry=1, **FAST)
    quiet = await layer.new_channel()
    await outage(broker, link_of(layer))
    await asyncio.sleep(1.3)  # the window is expiry long
    await assert_nothing_arrives(layer, quiet)


async def test_no_notice_when_it_is_off(make_layer: LayerFactory, broker: Broker) -> None:
    layer = make_layer(**FAST)
    waiting, member = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("room", member)
    pending = asyncio.create_task(layer.receive(waiting))
    await asyncio.sleep(0.05)
    await outage(broker, link_of(layer))
    await asyncio.sleep(0.3)
    assert not pending.done()
    await assert_nothing_arrives(layer, member)
    await layer.send(waiting, {"type": "after"})
    assert await asyncio.wait_for(pending, 5) == {"type": "after"}


async def test_no_notice_on_the_first_connection_even_for_a_channel_already_waiting(broker: Broker) -> None:
    """A queue declared for the first time lost nothing. Through the layer, no channel exists before
    its link's first connection; a link driven directly can have one waiting already."""
    config = LayerConfig.build(host=broker.url, reconnect_notice_type=NOTICE, **FAST)
    loop = asyncio.get_running_loop()
    link = BrokerLink(config, loop, MessageCodec(config))
    waiter: asyncio.Future[dict[str, Any]] = loop.create_future()
    link.router.add_waiter(f"{link.queue_name}!early", waiter)
    try:
        await link.connect_first()
        await asyncio.sleep(0.3)
        assert not waiter.done()
        await outage(broker, link)  # the counterpart: a lost queue is told
        assert await asyncio.wait_for(waiter, 5) == {"type": NOTICE}
    finally:
        await link.close()


def close_connection_named(broker: Broker, name: str) -> None:
    """Have RabbitMQ close the one connection of the run's vhost whose client named it ``name``.

    The pid is read from the text output: the JSON one is in a form close_connection refuses.
    """
    output = rabbitmqctl("list_connections", "pid", "vhost", "client_properties", "--no-table-headers")
    named = f'{{"connection_name","{name}"}}'
    [pid] = [
        line.split("\t")[0]
        for line in output.splitlines()
        if line.split("\t")[1:2] == [broker.vhost] and named in line
    ]
    rabbitmqctl("close_connection", pid, "test: this connection only")


async def test_no_notice_when_only_the_publishing_connection_dropped(
    make_layer: LayerFactory, broker: Broker
) -> None:
    layer = make_layer(reconnect_notice_type=NOTICE, **FAST)
    channel = await layer.new_channel()
    link = link_of(layer)
    pending = asyncio.create_task(layer.receive(channel))
    await asyncio.to_thread(close_connection_named, broker, f"channels_rabbitmq {link.queue_name} publishing")
    await until(
        lambda: link.publishing.reconnections == 1 and link.is_connected, "the publisher to come back"
    )
    await asyncio.sleep(0.3)
    assert not pending.done()  # the queue was never lost: nothing to say
    assert link.consuming.reconnections == 0
    await layer.send(channel, {"type": "after"})
    assert await asyncio.wait_for(pending, 5) == {"type": "after"}


async def test_only_the_consuming_connection_dropping_sends_the_notice(
    make_layer: LayerFactory, broker: Broker
) -> None:
    layer = make_layer(reconnect_notice_type=NOTICE, **FAST)
    channel = await layer.new_channel()
    link = link_of(layer)
    pending = asyncio.create_task(layer.receive(channel))
    await asyncio.to_thread(close_connection_named, broker, f"channels_rabbitmq {link.queue_name}")
    assert await asyncio.wait_for(pending, 10) == {"type": NOTICE}
    assert link.publishing.reconnections == 0
    await assert_nothing_arrives(layer, channel)


async def test_notices_go_to_the_channels_of_each_link_of_the_layer_that_lost_its_queue(
    make_layer: LayerFactory, broker: Broker
) -> None:
    """Two layers on the same broker: each sends its own notices once, to its own channels."""
    one = make_layer(reconnect_notice_type=NOTICE, **FAST)
    two = make_layer(reconnect_notice_type="other.notice", **FAST)
    first, second = await one.new_channel(), await two.new_channel()
    waits = asyncio.create_task(one.receive(first)), asyncio.create_task(two.receive(second))
    await asyncio.sleep(0.05)
    await outage(broker, link_of(one), link_of(two))
    assert [await asyncio.wait_for(wait, 5) for wait in waits] == [{"type": NOTICE}, {"type": "other.notice"}]
    await assert_nothing_arrives(one, first)
    await assert_nothing_arrives(two, second)
