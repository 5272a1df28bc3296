"""Broker resource alarms, raised for real on a private node (``set_vm_memory_high_watermark``).

During a memory alarm RabbitMQ stops reading from every connection that publishes. The
layer consumes and acknowledges on a connection that never publishes, so it keeps
receiving what is queued for it; publishes wait at most ``connection_wait`` and then
raise :class:`BrokerBlockedError`; group calls and ``flush()`` finish.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from channels_rabbitmq.amqp.flow import WRITE_BUFFER_HIGH
from channels_rabbitmq.core import RabbitmqChannelLayer
from channels_rabbitmq.exceptions import BrokerBlockedError
from testbed.brokers.nodes import Node, NodeError, Nodes, unavailable_reason
from tests.conftest import link_of

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("loop_kind")]  # on asyncio and uvloop

WAIT = 1.5  # connection_wait of the layers under test


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.fail(f"cannot run an extra RabbitMQ node: {reason}")
    with Nodes("alarm") as nodes:
        node = nodes.add()
        try:
            nodes.start()
        except NodeError as error:
            pytest.fail(f"the alarm test node did not come up: {error}", pytrace=False)
        yield node


@pytest.fixture
async def layers(node: Node) -> AsyncIterator[Callable[..., RabbitmqChannelLayer]]:
    made: list[RabbitmqChannelLayer] = []

    def make(**config: Any) -> RabbitmqChannelLayer:
        layer = RabbitmqChannelLayer(host=node.url(), connection_wait=WAIT, connect_timeout=5, **config)
        made.append(layer)
        return layer

    yield make
    try:
        await asyncio.to_thread(clear_alarm, node)
    finally:
        for layer in made:
            await layer.close()


def alarms(node: Node) -> str:
    return node.ctl("eval", "rabbit_alarm:get_alarms().").strip()


def raise_alarm(node: Node) -> None:
    node.ctl("set_vm_memory_high_watermark", "0.000001")
    deadline = time.monotonic() + 30
    while alarms(node) == "[]":
        assert time.monotonic() < deadline, "the memory alarm did not go off"
        time.sleep(0.1)


def clear_alarm(node: Node) -> None:
    node.ctl("set_vm_memory_high_watermark", "0.4")
    deadline = time.monotonic() + 30
    while alarms(node) != "[]":
        assert time.monotonic() < deadline, "the memory alarm did not clear"
        time.sleep(0.1)


async def receive(layer: RabbitmqChannelLayer, channel: str, timeout: float = 10) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), timeout)


async def test_during_an_alarm_the_backlog_is_received_and_acknowledged(
    layers: Callable[..., RabbitmqChannelLayer], node: Node
) -> None:
    # The receiver holds at most 20 messages in memory and has 10 in flight: the other 270 of
    # the backlog wait in its queue, and only acknowledgements that reach the broker bring them.
    receiver = layers(local_capacity=20, prefetch_count=10, capacity=1000, remote_capacity=1000)
    sender = layers()
    channel = await receiver.new_channel()
    await asyncio.gather(*(sender.send(channel, {"type": "backlog", "i": i}) for i in range(300)))
    await asyncio.to_thread(raise_alarm, node)
    received = [(await receive(receiver, channel))["i"] for _ in range(300)]
    assert received == list(range(300))
    assert link_of(receiver).consuming.connection.blocked_reason is None


async def test_during_an_alarm_sends_raise_blocked_after_connection_wait_and_work_after_it(
    layers: Callable[..., RabbitmqChannelLayer], node: Node
) -> None:
    receiver, sender = layers(), layers()
    channel = await receiver.new_channel()
    await sender.send(channel, {"type": "before"})
    assert await receive(receiver, channel) == {"type": "before"}
    await asyncio.to_thread(raise_alarm, node)
    for attempt in range(3):
        started = time.monotonic()
        message = {"type": "blocked", "attempt": attempt}
        call = sender.group_send("room", message) if attempt % 2 else sender.send(channel, message)
        with pytest.raises(BrokerBlockedError) as raised:
            await call
        waited = time.monotonic() - started
        print(f"attempt {attempt}: raised after {waited:.2f}s (connection_wait={WAIT:g})")
        assert WAIT - 0.05 <= waited < WAIT + 1.5
        assert raised.value.reason == "low on memory"
    # The first send during the alarm was written before the broker said it blocks us: it may
    # still arrive once the alarm clears. The others were never written.
    await asyncio.to_thread(clear_alarm, node)
    await sender.send(channel, {"type": "after"})
    arrived = [await receive(receiver, channel), await receive(receiver, channel)]
    if arrived[0]["type"] == "blocked":
        assert arrived[0]["attempt"] == 0
        arrived.pop(0)
    assert arrived[0] == {"type": "after"}


async def test_during_an_alarm_group_calls_and_flush_finish_and_deliveries_go_on(
    layers: Callable[..., RabbitmqChannelLayer], node: Node
) -> None:
    receiver, sender = layers(), layers()
    channel = await receiver.new_channel()
    await receiver.group_add("before", channel)
    await sender.send(channel, {"type": "warm"})
    assert await receive(receiver, channel) == {"type": "warm"}
    await asyncio.to_thread(raise_alarm, node)
    with pytest.raises(BrokerBlockedError):
        await sender.send(channel, {"type": "lost"})  # the sender is blocked now
    started = time.monotonic()
    await asyncio.wait_for(receiver.group_add("during", channel), WAIT)
    await asyncio.wait_for(receiver.group_discard("before", channel), WAIT)
    print(f"group_add and group_discard during the alarm: {time.monotonic() - started:.3f}s")
    # What needs a publish waits connection_wait, then says so: a group call for another process's
    # channel, and flush() telling the other processes (after it emptied this one).
    for call in (sender.group_add("other", channel), receiver.flush()):
        started = time.monotonic()
        with pytest.raises(BrokerBlockedError):
            await asyncio.wait_for(call, WAIT + 2)
        assert WAIT - 0.05 <= time.monotonic() - started < WAIT + 1.5
    assert not link_of(receiver).router.has_members("during")
    # A process that connects during the alarm starts consuming (its probe cannot travel).
    late = layers()
    late_channel = await asyncio.wait_for(late.new_channel(), 5)
    await asyncio.to_thread(clear_alarm, node)
    await sender.send(late_channel, {"type": "to.late"})
    assert await receive(late, late_channel) == {"type": "to.late"}


async def test_while_blocked_the_write_buffer_stays_bounded(
    layers: Callable[..., RabbitmqChannelLayer], node: Node
) -> None:
    receiver, sender = layers(max_message_size=256 * 1024), layers(max_message_size=256 * 1024)
    channel = await receiver.new_channel()
    await sender.new_channel()  # this loop's own link, whose connection the test watches
    await sender.send(channel, {"type": "warm"})
    await receive(receiver, channel)
    await asyncio.to_thread(raise_alarm, node)
    connection = link_of(sender).publishing.connection
    assert connection is not None
    transport = connection._transport
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            if connection._transport is not None:
                peak = max(peak, transport.get_write_buffer_size())
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    body = {"type": "big", "data": b"x" * (200 * 1024)}
    started = time.monotonic()
    outcomes = await asyncio.gather(*(sender.send(channel, body) for _ in range(100)), return_exceptions=True)
    elapsed = time.monotonic() - started
    watcher.cancel()
    assert all(isinstance(outcome, BrokerBlockedError) for outcome in outcomes), outcomes[:3]
    # Each waited connection_wait from its own call, not its turn after the others' (it was 100 x WAIT).
    assert elapsed < WAIT + 5.0
    print(f"peak write buffer while blocked: {peak} bytes for 100 sends of 200 KiB")
    # The high-water mark, plus what one loop iteration may hand over past it (half of it), plus
    # one message.
    assert peak <= WRITE_BUFFER_HIGH * 3 // 2 + 256 * 1024
