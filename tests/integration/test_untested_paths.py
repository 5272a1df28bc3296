"""The paths no test walked before (issue 18): each reproduced through the public API on a real broker.

- A process reads normal channels over its life without running out of AMQP channels, and more
  readers waiting at once than the broker allows get a typed error, never a lost connection.
- A cut while a normal channel's consumer opens its AMQP channel is waited out like any other.
- A connection lost just after its set-up is replaced, not kept as "up" for ever.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from channels_rabbitmq.exceptions import TooManyChannelsError
from channels_rabbitmq.link.channel_plan import FIRST_NORMAL_CHANNEL_ID
from testbed.brokers.nodes import NodeError, Nodes, unavailable_reason
from testbed.faults.proxy import FaultProxy
from tests.conftest import Broker, LayerFactory, eventually, link_of

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.usefixtures("loop_kind"),
    pytest.mark.no_unretrieved_errors,
]

RECEIVE_TIMEOUT = 10.0
FAST_RECONNECT = {"reconnect_delay_min": 0.05, "reconnect_delay_max": 0.2, "connect_timeout": 5.0}
NORMAL_CHANNELS_OVER_A_LIFE = 1000


async def receive(layer: Any, channel: str) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), RECEIVE_TIMEOUT)


async def test_a_process_reads_a_thousand_normal_channels_over_its_life_and_loses_nothing(
    make_layer: LayerFactory,
) -> None:
    """Each normal channel's reader takes an AMQP channel while it waits and gives it back after:
    before, the 62nd name took the consuming connection (and the process's queue) down."""
    layer, sender = make_layer(), make_layer()
    process_channel = await layer.new_channel()
    for n in range(NORMAL_CHANNELS_OVER_A_LIFE):
        name = f"lifetime-jobs-{n}"
        await sender.send(name, {"type": "job", "n": n})
        assert await receive(layer, name) == {"type": "job", "n": n}
        if n % 25 == 0:  # confirmed process-channel messages, which a lost queue would take with it
            await sender.send(process_channel, {"type": "direct", "n": n})
    for n in range(0, NORMAL_CHANNELS_OVER_A_LIFE, 25):
        assert await receive(layer, process_channel) == {
            "type": "direct",
            "n": n,
        }
    stats = layer.stats()
    assert (stats.reconnections, stats.state) == (0, "up")


async def test_more_normal_channels_waiting_at_once_than_amqp_channels_get_a_typed_error(
    loop_kind: str,
) -> None:
    """On a broker whose channel_max is 64, 28 channel numbers are left for readers: 40 readers
    waiting at once get 12 TooManyChannelsError, the 28 others their jobs, and the connection and
    the process's queue stay."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.fail(f"cannot run an extra RabbitMQ node: {reason}")
    with Nodes("channel-max") as nodes:
        node = nodes.add(settings={"channel_max": "64"})
        try:
            await asyncio.to_thread(nodes.start)
        except NodeError as error:
            pytest.fail(f"the node did not start: {error}", pytrace=False)
        from channels_rabbitmq.core import RabbitmqChannelLayer

        layer, sender = RabbitmqChannelLayer(host=node.url()), RabbitmqChannelLayer(host=node.url())
        try:
            process_channel = await layer.new_channel()
            room = 64 - FIRST_NORMAL_CHANNEL_ID + 1
            readers = [asyncio.ensure_future(layer.receive(f"crowded-{n}")) for n in range(room + 12)]
            await eventually(lambda: sum(reader.done() for reader in readers) == 12, "12 readers to fail")
            failed = [reader for reader in readers if reader.done()]
            assert all(isinstance(reader.exception(), TooManyChannelsError) for reader in failed)
            assert failed[0].exception().channel_max == 64  # type: ignore[union-attr]
            for n in range(room + 12):
                await sender.send(f"crowded-{n}", {"type": "job", "n": n})
            waiting = [reader for reader in readers if reader not in failed]
            done = await asyncio.wait_for(asyncio.gather(*waiting), RECEIVE_TIMEOUT)
            assert len(done) == room
            await sender.send(process_channel, {"type": "direct"})
            assert await receive(layer, process_channel) == {"type": "direct"}
            # The numbers came back: the channels that failed are read now.
            for reader in failed:
                n = readers.index(reader)
                assert await receive(layer, f"crowded-{n}") == {
                    "type": "job",
                    "n": n,
                }
            assert layer.stats().reconnections == 0
        finally:
            await layer.close()
            await sender.close()


async def test_a_cut_while_a_normal_channel_opens_its_amqp_channel_is_waited_out(
    broker: Broker, proxy: FaultProxy, make_layer: LayerFactory
) -> None:
    layer = make_layer(host=proxy.url(broker.url), **FAST_RECONNECT)
    sender = make_layer()
    await layer.new_channel()  # both connections up: the next Channel.OpenOk is the reader's
    proxy.after_method("Channel.OpenOk", "cut")
    reading = asyncio.ensure_future(layer.receive("cut-while-opening"))
    await eventually(lambda: proxy.triggered == 1, "the cut after the reader's channel.open-ok")
    await sender.send("cut-while-opening", {"type": "job"})
    assert await asyncio.wait_for(reading, RECEIVE_TIMEOUT) == {"type": "job"}
    assert layer.stats().reconnections >= 1


async def test_a_connection_lost_just_after_its_set_up_is_replaced(
    broker: Broker, proxy: FaultProxy, make_layer: LayerFactory
) -> None:
    """The broker closes the publishing connection right after confirm.select-ok: that connection
    must not be installed as "up" for ever."""
    layer = make_layer(host=proxy.url(broker.url), **FAST_RECONNECT)
    channel = await layer.new_channel()
    proxy.after_method("Confirm.SelectOk", "close")
    proxy.cut()
    await eventually(lambda: proxy.triggered == 1, "the close after confirm.select-ok")
    await eventually(lambda: layer.stats().state == "up", "the layer to be up again")
    await layer.send(channel, {"type": "after"})
    assert await receive(layer, channel) == {"type": "after"}
    publishing = link_of(layer).publishing
    assert publishing.is_up
    assert publishing.reconnections >= 1


async def test_a_normal_channel_job_handed_to_a_cancelled_receive_on_another_loop_goes_back_to_the_queue(
    make_layer: LayerFactory,
) -> None:
    """receive() from a thread with a loop of its own (the layer's link is another loop's), cancelled
    around the hand-over: the job is either returned by that receive(), or back in its queue for any
    other process. Before, it was acknowledged first and then kept in that link's memory alone."""
    layer, sender, other_process = make_layer(), make_layer(), make_layer()
    await layer.new_channel()  # this loop's link: the thread's receive() is carried to it
    rounds, taken, given_back = 200, 0, 0
    for n in range(rounds):
        await sender.send("handed-jobs", {"type": "job", "n": n})
        delay = (n % 20) * 0.0002

        def receive_in_a_thread(delay: float = delay) -> dict[str, Any] | None:
            async def receive_then_cancel() -> dict[str, Any] | None:
                reading = asyncio.ensure_future(layer.receive("handed-jobs"))
                await asyncio.sleep(delay)
                reading.cancel()
                try:
                    return await reading
                except asyncio.CancelledError:
                    return None

            return asyncio.run(receive_then_cancel())

        got = await asyncio.to_thread(receive_in_a_thread)
        if got is not None:
            assert got == {"type": "job", "n": n}
            taken += 1
            continue
        assert await receive(other_process, "handed-jobs") == {"type": "job", "n": n}
        given_back += 1
    print(f"\n{taken} taken by the cancelled receive(), {given_back} back in the queue")
    assert taken + given_back == rounds
