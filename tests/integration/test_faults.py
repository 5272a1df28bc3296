"""Network faults between the layer and the real broker, made by a TCP proxy (testbed/faults/proxy.py).

Each test names the behaviour it proves. The layers under test reach RabbitMQ through
the proxy; their peers (the other end of a send or a group) connect directly, so that
a fault hits one side only. Every wait polls a condition with a deadline, and times
that matter (detection of a stall, waits during an outage) are measured and bounded
generously: the machine is small and shared.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from channels_rabbitmq.core import RabbitmqChannelLayer
from channels_rabbitmq.exceptions import BrokerConnectionError
from testbed.faults.proxy import FaultProxy
from tests.conftest import Broker, LayerFactory, eventually, link_of, rabbitmqctl

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.usefixtures("loop_kind"),
    pytest.mark.no_unretrieved_errors,
]

#: Small delays keep reconnections (and so the tests) fast.
FAST = {"connect_timeout": 3, "reconnect_delay_min": 0.05, "reconnect_delay_max": 0.5, "connection_wait": 5}


@pytest.fixture
async def layers(proxy: FaultProxy, make_layer: LayerFactory, broker: Broker) -> AsyncIterator[LayerFactory]:
    """Layers through the proxy (``proxied=False``: straight to the broker); closed before the proxy."""
    made: list[RabbitmqChannelLayer] = []

    def make(*, proxied: bool = True, **config: Any) -> RabbitmqChannelLayer:
        config = {**FAST, **config}
        config["host"] = proxy.url(broker.url) if proxied else broker.url
        layer = make_layer(**config)
        made.append(layer)
        return layer

    yield make
    for layer in made:
        await layer.close()


async def receive(layer: RabbitmqChannelLayer, channel: str, timeout: float = 5) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), timeout)


async def assert_nothing_arrives(layer: RabbitmqChannelLayer, channel: str, wait: float = 0.3) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(channel), wait)


async def reconnected(layer: RabbitmqChannelLayer, proxy: FaultProxy, connections_before: int) -> None:
    """Wait until the layer's link is up again on a new connection through the proxy."""
    link = link_of(layer)
    await eventually(
        lambda: proxy.accepted > connections_before and link.is_connected, "the layer to reconnect"
    )


def now() -> float:
    return asyncio.get_running_loop().time()


# Cuts ---------------------------------------------------------------------------------------------


async def burst(
    sender: RabbitmqChannelLayer,
    receiver: RabbitmqChannelLayer,
    channel: str,
    proxy: FaultProxy,
    *,
    name: str,
    stall_first: bool,
) -> tuple[int, float]:
    """Send a burst through the proxy, cut it in the middle; check what arrived.

    Return how many sends raised, and the time from the cut to the end marker's arrival.
    """
    outcome: dict[int, BaseException | None] = {}

    async def send(index: int) -> None:
        try:
            await sender.send(channel, {"type": "burst", "round": name, "i": index})
        except BrokerConnectionError as error:
            outcome[index] = error
        else:
            outcome[index] = None

    tasks: list[asyncio.Task[None]] = []
    connections_before = proxy.accepted
    if stall_first:
        # Every publish is written into a blackhole: none can be confirmed before the cut.
        proxy.stall()
        tasks = [asyncio.create_task(send(index)) for index in range(200)]
        await asyncio.sleep(0.1)
        assert not any(task.done() for task in tasks)
        cut_at = now()
        proxy.cut()
    else:
        # Waves of concurrent sends; the cut falls once a third of them were confirmed.
        cut_at = 0.0
        for wave in range(12):
            tasks += [asyncio.create_task(send(wave * 25 + index)) for index in range(25)]
            await asyncio.sleep(0.005)
            if not cut_at and sum(value is None for value in outcome.values()) >= 100:
                cut_at = now()
                assert proxy.cut() >= 1
        if not cut_at:
            await eventually(lambda: len(outcome) >= 100, "a hundred sends to finish", poll=0)
            cut_at = now()
            proxy.cut()
    await asyncio.gather(*tasks)
    await reconnected(sender, proxy, connections_before)
    await sender.send(channel, {"type": "end", "round": name})
    received: list[int] = []
    while True:
        message = await receive(receiver, channel)
        if message["type"] == "end":
            assert message["round"] == name
            break
        assert message["round"] == name
        received.append(message["i"])
    recovered_in = now() - cut_at
    confirmed = {index for index, error in outcome.items() if error is None}
    failed = set(outcome) - confirmed
    assert len(received) == len(set(received)), "a message arrived twice"
    assert confirmed <= set(received), f"confirmed but lost: {sorted(confirmed - set(received))}"
    assert set(received) <= set(outcome)
    return len(failed), recovered_in


async def test_a_cut_during_a_burst_loses_no_confirmed_message_and_lost_confirms_raise(
    layers: LayerFactory, proxy: FaultProxy
) -> None:
    sender = layers()
    receiver = layers(proxied=False, remote_capacity=5000, local_capacity=5000, capacity=5000)
    await sender.new_channel()  # this loop's own link, through the proxy
    channel = await receiver.new_channel()
    failures = {}
    for name, stall_first in [("cut.1", False), ("cut.2", False), ("stall.then.cut", True)]:
        failures[name], recovered_in = await burst(
            sender, receiver, channel, proxy, name=name, stall_first=stall_first
        )
        print(f"{name}: {failures[name]} send(s) raised; cut -> messages flow again in {recovered_in:.2f}s")
    assert failures["stall.then.cut"] == 200  # none of them could have been confirmed
    await assert_nothing_arrives(receiver, channel)
    await sender.send(channel, {"type": "after"})
    assert await receive(receiver, channel) == {"type": "after"}


async def test_a_send_whose_confirm_is_lost_in_a_cut_raises_at_once(
    layers: LayerFactory, proxy: FaultProxy
) -> None:
    sender, receiver = layers(), layers(proxied=False)
    await sender.new_channel()
    channel = await receiver.new_channel()
    await sender.send(channel, {"type": "warm-up"})  # the publishing connection is open
    assert await receive(receiver, channel) == {"type": "warm-up"}
    proxy.stall()
    sending = asyncio.create_task(sender.send(channel, {"type": "lost"}))
    await asyncio.sleep(0.2)
    assert not sending.done()  # written, not confirmed
    cut_at = now()
    proxy.cut()
    with pytest.raises(BrokerConnectionError, match="had not confirmed"):
        await sending
    assert now() - cut_at < 2  # at once: no wait for a reconnection
    await sender.send(channel, {"type": "after"})  # waits for the reconnection
    assert await receive(receiver, channel) == {"type": "after"}


async def test_a_cut_while_receiving_keeps_the_receive_waiting_and_restores_queue_and_groups(
    layers: LayerFactory, proxy: FaultProxy, broker: Broker
) -> None:
    receiver, sender = layers(), layers(proxied=False)
    channel = await receiver.new_channel()
    member = await receiver.new_channel()
    await receiver.group_add("room", member)
    link = link_of(receiver)
    pending = asyncio.create_task(receiver.receive(channel))
    await asyncio.sleep(0.05)
    connections_before = proxy.accepted
    proxy.refuse()  # a longer outage: a few reconnection attempts fail
    cut_at = now()
    proxy.cut()
    await eventually(lambda: proxy.refused >= 3, "reconnection attempts")
    assert not link.is_connected
    assert not pending.done()  # still waiting, no error
    proxy.accept()
    await reconnected(receiver, proxy, connections_before)
    assert not pending.done()
    await sender.send(channel, {"type": "after.cut"})
    assert await asyncio.wait_for(pending, 5) == {"type": "after.cut"}
    await sender.group_send("room", {"type": "group.after.cut"})
    assert await receive(receiver, member) == {"type": "group.after.cut"}
    print(f"cut -> messages flow again in {now() - cut_at:.2f}s (with {proxy.refused} refused attempts)")
    # The same queue, bound again; a channel name stays valid across reconnections.
    assert (link.queue_name, "room") in await asyncio.to_thread(broker.bindings)
    assert channel.startswith(f"specific.{link.queue_name}!")


async def test_a_cut_during_group_adds_leaves_every_added_member_reachable(
    layers: LayerFactory, proxy: FaultProxy
) -> None:
    receiver, sender = layers(), layers(proxied=False)
    channels = [await receiver.new_channel() for _ in range(90)]
    memberships = [(f"g{index % 60}", channel) for index, channel in enumerate(channels)]
    connections_before = proxy.accepted
    # Binds go over up to 32 AMQP channels at once: with each round trip slowed, 60 of them take
    # two waves at least, and the cut lands between them.
    proxy.slow(0.02)
    adding = [asyncio.create_task(receiver.group_add(group, channel)) for group, channel in memberships[:60]]
    await eventually(lambda: sum(task.done() for task in adding) >= 5, "some group_adds", poll=0)
    assert not all(task.done() for task in adding)
    proxy.cut()
    proxy.slow(0)
    # More while the link is down, and after it is back.
    adding += [
        asyncio.create_task(receiver.group_add(group, channel)) for group, channel in memberships[60:75]
    ]
    outcomes = await asyncio.gather(*adding, return_exceptions=True)
    assert all(outcome is None or isinstance(outcome, BrokerConnectionError) for outcome in outcomes)
    added = [
        membership for membership, outcome in zip(memberships[:75], outcomes, strict=True) if outcome is None
    ]
    await reconnected(receiver, proxy, connections_before)
    for group, channel in memberships[75:]:
        await receiver.group_add(group, channel)
        added.append((group, channel))
    for group in sorted({group for group, _ in added}):
        await sender.group_send(group, {"type": "hello", "group": group})
    for group, channel in added:
        assert await receive(receiver, channel) == {"type": "hello", "group": group}
    await asyncio.gather(*(assert_nothing_arrives(receiver, channel) for channel in channels))
    print(f"{len(added)} of {len(memberships)} group_adds returned normally; all reached")


async def test_a_group_add_while_the_reconnection_sets_up_is_bound_too(
    layers: LayerFactory, proxy: FaultProxy
) -> None:
    receiver, sender = layers(connect_timeout=10), layers(proxied=False)
    first = await receiver.new_channel()
    await receiver.group_add("before", first)
    link = link_of(receiver)
    connections_before = proxy.accepted
    proxy.slow(0.03)  # every round trip takes 60ms or more: the reconnection takes a second or so
    proxy.cut()
    added = [("before", first)]
    deadline = now() + 20
    while not (proxy.accepted > connections_before and link.is_connected):
        assert now() < deadline, "the layer did not reconnect"
        channel = await receiver.new_channel()
        group = f"during.{len(added)}"
        await receiver.group_add(group, channel)  # returns at once: the link is down
        added.append((group, channel))
        await asyncio.sleep(0.02)
    proxy.slow(0)
    for group, _channel in added:
        await sender.group_send(group, {"type": "hello", "group": group})
    received = await asyncio.gather(
        *(receive(receiver, channel, timeout=3) for _group, channel in added), return_exceptions=True
    )
    missed = [
        group
        for (group, _channel), message in zip(added, received, strict=True)
        if isinstance(message, Exception)
    ]
    assert not missed, (
        f"{len(missed)} of {len(added)} members never got their group's message: {missed[:5]}..."
    )


# Stalls -------------------------------------------------------------------------------------------


async def test_a_stalled_connection_is_noticed_by_heartbeats_and_replaced(
    layers: LayerFactory, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    receiver, sender = layers(heartbeat=1), layers(proxied=False)
    channel = await receiver.new_channel()
    member = await receiver.new_channel()
    await receiver.group_add("room", member)
    link = link_of(receiver)
    connections_before = proxy.accepted
    replaced_before = (link.consuming.reconnections, link.publishing.reconnections)
    stalled_at = now()
    with caplog.at_level(logging.WARNING, logger="channels_rabbitmq"):
        proxy.stall()  # only this connection: the reconnection goes through a fresh one
        await eventually(lambda: not link.is_connected, "the stall to be noticed", timeout=10)
        detected_in = now() - stalled_at
        # the warning follows once the aborted transport reports the loss (a loop iteration later)
        await eventually(lambda: bool(warnings_of(caplog)), "the outage warning", timeout=5)
    # Two heartbeat intervals of silence; the last frame heard came at most an interval before the stall.
    assert 1 <= detected_in < 6
    assert "missed heartbeats" in warnings_of(caplog)[0]
    await reconnected(receiver, proxy, connections_before)
    # Both connections were stalled; each notices on its own heartbeat, one maybe a moment after the
    # other has been replaced. Until the consuming one is, a send reaches the old queue, which goes
    # with its connection: wait for both.
    await eventually(
        lambda: (
            link.consuming.reconnections > replaced_before[0]
            and link.publishing.reconnections > replaced_before[1]
            and link.is_connected
        ),
        "both connections replaced",
        timeout=10,
    )
    await sender.send(channel, {"type": "after.stall"})
    assert await receive(receiver, channel) == {"type": "after.stall"}
    await sender.group_send("room", {"type": "group.after.stall"})
    assert await receive(receiver, member) == {"type": "group.after.stall"}
    flowing_in = now() - stalled_at
    print(f"stall detected in {detected_in:.2f}s; messages flow again after {flowing_in:.2f}s")
    assert flowing_in < 15
    proxy.resume()  # the old connections learn they are over and go
    # The new connections are left: consume, publish, roll call.
    await eventually(lambda: proxy.active == 3, "the stalled connections to close")


async def test_a_slow_network_delivers_everything_in_order(layers: LayerFactory, proxy: FaultProxy) -> None:
    proxy.slow(0.02)
    sender = layers()
    receiver = layers(remote_capacity=1000, local_capacity=1000, capacity=1000)
    channel = await receiver.new_channel()
    member = await receiver.new_channel()
    await receiver.group_add("room", member)
    await sender.new_channel()
    for index in range(20):
        await sender.send(channel, {"type": "m", "i": index})
    await asyncio.gather(*(sender.send(channel, {"type": "m", "i": index}) for index in range(20, 150)))
    for index in range(10):
        await sender.group_send("room", {"type": "g", "i": index})
    assert [(await receive(receiver, channel))["i"] for _ in range(150)] == list(range(150))
    assert [(await receive(receiver, member))["i"] for _ in range(10)] == list(range(10))
    # Two layers' three connections (consume, publish, roll call): nothing timed out and reconnected.
    assert proxy.accepted == 6


# Outages ------------------------------------------------------------------------------------------


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("channels_rabbitmq") and record.levelno >= logging.WARNING
    ]


def infos_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("channels_rabbitmq") and record.levelno == logging.INFO
    ]


async def test_during_an_outage_sends_wait_connection_wait_then_raise_and_work_again_after(
    layers: LayerFactory, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    wait = 1.5
    layer = layers(connection_wait=wait, reconnect_delay_max=0.3)
    receiver = layers(proxied=False)
    channel = await receiver.new_channel()
    member = await receiver.new_channel()
    await receiver.group_add("room", member)
    await layer.new_channel()
    link = link_of(layer)
    with caplog.at_level(logging.DEBUG, logger="channels_rabbitmq"):
        proxy.refuse()
        proxy.cut()
        await eventually(lambda: not link.is_connected, "the cut to be noticed")
        for attempt in (
            lambda: layer.send(channel, {"type": "lost"}),
            lambda: layer.group_send("room", {"type": "lost"}),
        ):
            started = now()
            with pytest.raises(BrokerConnectionError, match="unreachable for connection_wait"):
                await attempt()
            waited = now() - started
            print(f"raised after {waited:.2f}s (connection_wait={wait:g})")
            assert wait - 0.05 <= waited < wait + 1.5
        assert proxy.refused >= 3
        proxy.accept()
        await layer.send(channel, {"type": "back"})  # no action from the caller
        await layer.group_send("room", {"type": "group.back"})
    assert await receive(receiver, channel) == {"type": "back"}
    assert await receive(receiver, member) == {"type": "group.back"}
    await eventually(lambda: link.is_connected, "the consuming connection to be back too")
    # One warning for the outage, one info line on recovery; each failed retry is a debug line.
    warned = warnings_of(caplog)
    assert len(warned) == 1, warned
    assert "reconnecting" in warned[0]
    recovered = infos_of(caplog)
    assert len(recovered) == 1, recovered
    assert recovered[0].startswith("reconnected to")
    retries = [record for record in caplog.records if "reconnecting failed" in record.getMessage()]
    assert len(retries) >= 3
    assert all(record.levelno == logging.DEBUG for record in retries)
    assert not any(record.exc_info for record in caplog.records)


async def in_set_up(layer: RabbitmqChannelLayer) -> None:
    """Wait until the link's consuming (re)connection is past the AMQP handshake and setting up."""
    link = link_of(layer)
    await eventually(lambda: link.inbound.arrival is not None, "the link to set a connection up")


async def test_reconnections_lost_while_setting_up_are_debug_lines_not_warnings(
    layers: LayerFactory, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    layer = layers(connect_timeout=5)
    channel = await layer.new_channel()
    with caplog.at_level(logging.DEBUG, logger="channels_rabbitmq"):
        proxy.slow(0.02)  # room to cut each reconnection in the middle of its set-up
        for _ in range(3):
            accepted = proxy.accepted
            proxy.cut()  # the first cut begins the outage; the next ones end attempts half set up
            await eventually(lambda before=accepted: proxy.accepted > before, "a reconnection attempt")
            await in_set_up(layer)
        proxy.slow(0)
        # The publishing connection may be back before the queue is declared again: a message
        # sent to ourselves before that would find no queue (see "What is lost, and when").
        await eventually(lambda: link_of(layer).is_connected, "the link to be set up again")
        await layer.send(channel, {"type": "back"})
        assert await receive(layer, channel) == {"type": "back"}
    assert len(warnings_of(caplog)) == 1, warnings_of(caplog)  # one outage
    assert len(infos_of(caplog)) == 1, infos_of(caplog)  # one recovery


async def test_a_cut_while_first_setting_up_raises_once_and_leaves_one_connection(
    layers: LayerFactory, proxy: FaultProxy
) -> None:
    layer = layers(connect_timeout=2)
    proxy.slow(0.02)
    connecting = asyncio.create_task(layer.new_channel())
    await eventually(lambda: bool(layer._links.all()), "the layer to make its link")
    await in_set_up(layer)
    proxy.cut()
    with pytest.raises(BrokerConnectionError):
        await connecting
    proxy.slow(0)
    channel = await layer.new_channel()  # the network is back: the caller tries again
    accepted = proxy.accepted
    await asyncio.sleep(3)  # longer than an attempt (connect_timeout) and its backoff
    assert (proxy.active, proxy.accepted) == (3, accepted), "a fourth connection is being made"
    await layer.send(channel, {"type": "m"})
    assert await receive(layer, channel) == {"type": "m"}


def close_all_connections(broker: Broker) -> None:
    rabbitmqctl("close_all_connections", "--vhost", broker.vhost, "--limit", "1000", "test")


async def test_the_broker_closing_every_connection_is_survived(
    layers: LayerFactory, proxy: FaultProxy, broker: Broker
) -> None:
    layer = layers()
    channel = await layer.new_channel()
    member = await layer.new_channel()
    await layer.group_add("room", member)
    connections_before = proxy.accepted
    closed_at = now()
    await asyncio.to_thread(close_all_connections, broker)
    await reconnected(layer, proxy, connections_before)
    await layer.send(channel, {"type": "direct"})
    await layer.group_send("room", {"type": "group"})
    assert await receive(layer, channel) == {"type": "direct"}
    assert await receive(layer, member) == {"type": "group"}
    print(f"close_all_connections -> messages flow again in {now() - closed_at:.2f}s")


async def test_the_broker_closing_every_connection_logs_one_warning_and_one_info_line_on_recovery(
    layers: LayerFactory, proxy: FaultProxy, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    layer = layers()
    channel = await layer.new_channel()
    connections_before = proxy.accepted
    with caplog.at_level(logging.DEBUG, logger="channels_rabbitmq"):
        await asyncio.to_thread(close_all_connections, broker)
        await reconnected(layer, proxy, connections_before)
        await layer.send(channel, {"type": "direct"})
        assert await receive(layer, channel) == {"type": "direct"}
    warned = warnings_of(caplog)
    assert not any(record.exc_info for record in caplog.records)
    # One outage, or two when the broker closed the second connection only after the first was
    # back (rabbitmqctl closes them one by one): a warning and an info line each, in turn.
    recovered = infos_of(caplog)
    assert len(warned) == len(recovered) in (1, 2), (warned, recovered)
    assert all("reconnecting" in line for line in warned)
    assert all(line.startswith("reconnected to") for line in recovered)
    lines = [
        record.levelno
        for record in caplog.records
        if record.name.startswith("channels_rabbitmq") and record.levelno >= logging.INFO
    ]
    assert lines == [logging.WARNING, logging.INFO] * len(warned)


def delete_queue_record_under_its_consumer(broker: Broker, queue: str) -> None:
    """What RabbitMQ does when a cluster node fails and the survivors delete its queues' records while
    clients declare them again under the same names (rabbitmq/rabbitmq-server#6271, #9798, #12949):
    the queue's record and bindings go, its process and consumer stay, and nobody is told. Messages to
    it are then unroutable. (``internal_delete`` takes the queue's name on 3.x, its record on 4.x.)"""
    vhost, name = broker.vhost.replace('"', ""), queue.replace('"', "")
    rabbitmqctl(
        "eval",
        f'Name = rabbit_misc:r(<<"{vhost}">>, queue, <<"{name}">>), '
        "{ok, Q} = rabbit_amqqueue:lookup(Name), "
        'try rabbit_amqqueue:internal_delete(Name, <<"test">>) '
        'catch _:_ -> rabbit_amqqueue:internal_delete(Q, <<"test">>) end.',
    )
    assert queue not in {row["name"] for row in broker.queues()}, "the queue's record is still there"


async def test_a_queue_deleted_under_its_consumer_after_a_reconnection_is_noticed_and_set_up_again(
    make_layer: LayerFactory, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    layer = make_layer(connect_timeout=2)
    channel = await layer.new_channel()
    link = link_of(layer)
    await asyncio.to_thread(close_all_connections, broker)
    await eventually(
        lambda: link.consuming.reconnections == 1 and link.is_connected, "the first reconnection"
    )
    with caplog.at_level(logging.WARNING, logger="channels_rabbitmq"):
        await asyncio.to_thread(delete_queue_record_under_its_consumer, broker, link.queue_name)
        # Deaf now: a send is accepted and routed nowhere. The probes after the reconnection notice.
        await eventually(
            lambda: link.consuming.reconnections == 2 and link.is_connected, "the deaf queue's repair"
        )
    assert any("stopped receiving after a reconnection" in message for message in warnings_of(caplog))
    await layer.send(channel, {"type": "heard"})
    assert await receive(layer, channel) == {"type": "heard"}
