"""Normal channels (names without '!') against the real broker: one shared queue per name,
each message to exactly one receive(), taken off the queue only while a receive() waits."""

from __future__ import annotations

import asyncio
import json
import secrets
import time

import pytest
from channels.exceptions import ChannelFull, StopConsumer

from channels_rabbitmq.core import RabbitmqChannelLayer
from tests.conftest import Broker, LayerFactory, link_of, rabbitmqctl

pytestmark = pytest.mark.usefixtures("loop_kind")  # each test on asyncio's loop and on uvloop

NAMES = (
    "thumbnails",
    "jobs",
    "work",
    "tasks",
    "racy",
    "small",
    "brief",
    "classic-jobs",
    "quorum-jobs",
    "mail",
    "thumbs",
    "flushed",
    "closing",
    "survivor",
)


@pytest.fixture
def names() -> dict[str, str]:
    """Channel names of this test alone: the queues outlive a test (and the other loop's run)."""
    suffix = secrets.token_hex(4)
    return {name: f"{name}-{suffix}" for name in NAMES}


async def receive(layer: RabbitmqChannelLayer, channel: str, timeout: float = 5) -> dict:
    return await asyncio.wait_for(layer.receive(channel), timeout)


async def assert_nothing_arrives(layer: RabbitmqChannelLayer, channel: str, wait: float = 0.5) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(channel), wait)


def queue_facts(broker: Broker, name: str) -> dict:
    rows = json.loads(
        rabbitmqctl(
            "list_queues",
            "-p",
            broker.vhost,
            "name",
            "type",
            "durable",
            "arguments",
            "messages",
            "messages_ready",
            "consumers",
            "--formatter",
            "json",
        )
        or "[]"
    )
    for row in rows:
        if row["name"] == name:
            return row
    raise LookupError(name)


async def test_a_message_sent_to_a_normal_channel_reaches_a_receiver_of_another_process(
    names: dict[str, str],
    make_layer: LayerFactory,
) -> None:
    sender, worker = make_layer(), make_layer()
    await sender.send(names["thumbnails"], {"type": "thumbnail.make", "id": 1, "raw": b"\x00\xff"})
    assert await receive(worker, names["thumbnails"]) == {
        "type": "thumbnail.make",
        "id": 1,
        "raw": b"\x00\xff",
    }


async def test_each_message_goes_to_exactly_one_of_the_competing_receivers(
    names: dict[str, str], make_layer: LayerFactory
) -> None:
    sender, first, second = (make_layer(capacity=1000) for _ in range(3))  # the same queue arguments
    got: dict[str, list[int]] = {"first": [], "second": []}

    async def work(name: str, layer: RabbitmqChannelLayer) -> None:
        while True:
            message = await layer.receive(names["jobs"])
            got[name].append(message["i"])
            await asyncio.sleep(0.002)  # some work, so that both take turns

    workers = [asyncio.ensure_future(work("first", first)), asyncio.ensure_future(work("second", second))]
    try:
        for i in range(200):
            await sender.send(names["jobs"], {"type": "job", "i": i})
        for _ in range(200):
            if len(got["first"]) + len(got["second"]) == 200:
                break
            await asyncio.sleep(0.05)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    everything = got["first"] + got["second"]
    assert sorted(everything) == list(range(200))  # none lost, none twice
    assert got["first"], "both workers must be used"
    assert got["second"], "both workers must be used"


async def test_a_process_that_stopped_receiving_holds_nothing_another_could_handle(
    names: dict[str, str], make_layer: LayerFactory, broker: Broker
) -> None:
    sender, idle, busy = make_layer(), make_layer(), make_layer()
    await sender.send(names["work"], {"type": "job", "i": 0})
    assert (await receive(idle, names["work"]))["i"] == 0  # idle received once, then stopped receiving
    for i in range(1, 11):
        await sender.send(names["work"], {"type": "job", "i": i})
    await asyncio.sleep(0.3)
    facts = queue_facts(broker, f"channels.normal.{names['work']}")
    assert (facts["messages_ready"], facts["consumers"]) == (10, 0)  # all still there, for anyone
    assert [(await receive(busy, names["work"]))["i"] for _ in range(10)] == list(range(1, 11))


async def test_a_receive_cancelled_while_waiting_loses_nothing(
    names: dict[str, str], make_layer: LayerFactory
) -> None:
    sender, first, second = make_layer(), make_layer(), make_layer()
    await assert_nothing_arrives(first, names["tasks"], wait=0.3)  # cancelled by the timeout
    await sender.send(names["tasks"], {"type": "job", "i": 1})
    assert (await receive(second, names["tasks"]))["i"] == 1


async def test_receives_cancelled_at_any_moment_lose_and_duplicate_nothing(
    names: dict[str, str], make_layer: LayerFactory
) -> None:
    sender, receiver = make_layer(), make_layer()
    seen: list[int] = []
    sending = asyncio.ensure_future(
        asyncio.gather(*(sender.send(names["racy"], {"type": "job", "i": i}) for i in range(100)))
    )
    for attempt in range(300):
        try:
            message = await asyncio.wait_for(receiver.receive(names["racy"]), 0.001 * (attempt % 7))
        except asyncio.TimeoutError:
            continue
        seen.append(message["i"])
    await sending
    while len(seen) < 100:
        seen.append((await receive(receiver, names["racy"]))["i"])
    assert sorted(seen) == list(range(100))
    await assert_nothing_arrives(receiver, names["racy"], wait=0.3)


async def test_a_full_normal_channel_raises_channel_full(
    names: dict[str, str], make_layer: LayerFactory
) -> None:
    sender = make_layer(channel_capacity={"small-*": 5})
    for i in range(5):
        await sender.send(names["small"], {"type": "job", "i": i})
    with pytest.raises(ChannelFull, match=names["small"]):
        await sender.send(names["small"], {"type": "job", "i": 5})


async def test_messages_expire_in_the_queue_after_expiry(
    names: dict[str, str], make_layer: LayerFactory
) -> None:
    sender, worker = (
        make_layer(expiry=0.5, normal_channel_idle_expiry=2),
        make_layer(expiry=0.5, normal_channel_idle_expiry=2),
    )
    await sender.send(names["brief"], {"type": "job"})
    await asyncio.sleep(1)
    await assert_nothing_arrives(worker, names["brief"], wait=0.5)


async def test_the_queue_is_durable_expires_when_idle_and_has_the_configured_type(
    names: dict[str, str], make_layer: LayerFactory, broker: Broker
) -> None:
    classic, quorum = make_layer(), make_layer(normal_channel_queue_type="quorum")
    await classic.send(names["classic-jobs"], {"type": "job"})
    await quorum.send(names["quorum-jobs"], {"type": "job"})
    facts = queue_facts(broker, f"channels.normal.{names['classic-jobs']}")
    assert (facts["type"], facts["durable"]) == ("classic", True)
    arguments = facts["arguments"]
    if isinstance(arguments, list):  # rabbitmqctl's JSON: [[key, value], ...] (or with a type)
        arguments = {item[0]: item[-1] for item in arguments}
    assert arguments["x-expires"] == 3_600_000
    assert arguments["x-message-ttl"] == 60_000
    assert arguments["x-max-length"] == 100
    assert arguments["x-overflow"] == "reject-publish"
    assert queue_facts(broker, f"channels.normal.{names['quorum-jobs']}")["type"] == "quorum"
    assert (await receive(quorum, names["quorum-jobs"])) == {"type": "job"}


async def test_the_prefix_of_normal_channel_queues_is_configurable(
    names: dict[str, str], make_layer: LayerFactory, broker: Broker
) -> None:
    layer = make_layer(normal_channel_prefix="myapp.")
    await layer.send(names["mail"], {"type": "job"})
    assert queue_facts(broker, f"myapp.{names['mail']}")["messages"] == 1


async def test_a_normal_channel_in_a_group_gets_each_group_message_once(
    names: dict[str, str], make_layer: LayerFactory, broker: Broker
) -> None:
    sender, first, second = make_layer(), make_layer(), make_layer()
    await first.group_add("all-workers", names["thumbs"])
    assert (f"channels.normal.{names['thumbs']}", "all-workers") in broker.bindings()
    await sender.group_send("all-workers", {"type": "job", "i": 1})
    results = await asyncio.gather(
        asyncio.wait_for(first.receive(names["thumbs"]), 1),
        asyncio.wait_for(second.receive(names["thumbs"]), 1),
        return_exceptions=True,
    )
    delivered = [result for result in results if isinstance(result, dict)]
    assert delivered == [{"type": "job", "i": 1}]
    await second.group_discard("all-workers", names["thumbs"])
    assert (f"channels.normal.{names['thumbs']}", "all-workers") not in broker.bindings()


async def test_flush_empties_the_normal_channel_queues_this_layer_used(
    names: dict[str, str], make_layer: LayerFactory, broker: Broker
) -> None:
    layer, worker = make_layer(), make_layer()
    for i in range(3):
        await layer.send(names["flushed"], {"type": "job", "i": i})
    await layer.group_add("room", names["flushed"])
    await layer.flush()
    assert queue_facts(broker, f"channels.normal.{names['flushed']}")["messages"] == 0
    assert (f"channels.normal.{names['flushed']}", "room") not in broker.bindings()
    await assert_nothing_arrives(worker, names["flushed"])


async def test_close_ends_a_waiting_receive_of_a_normal_channel_with_stop_consumer(
    names: dict[str, str],
    make_layer: LayerFactory,
) -> None:
    layer = make_layer()
    waiting = asyncio.ensure_future(layer.receive(names["closing"]))
    await asyncio.sleep(0.3)
    await layer.close()
    with pytest.raises(StopConsumer):
        await asyncio.wait_for(waiting, 5)


async def test_a_waiting_receive_gets_messages_sent_after_the_connections_were_closed(
    names: dict[str, str], make_layer: LayerFactory, broker: Broker
) -> None:
    sender, worker = make_layer(), make_layer(reconnect_delay_min=0.05, reconnect_delay_max=0.2)
    waiting = asyncio.ensure_future(worker.receive(names["survivor"]))
    await asyncio.sleep(0.3)
    rabbitmqctl("close_all_connections", "-p", broker.vhost, "test: normal channels")
    await asyncio.sleep(1)
    for _ in range(50):
        try:
            await sender.send(names["survivor"], {"type": "job"})
            break
        except Exception:
            await asyncio.sleep(0.1)
    assert await asyncio.wait_for(waiting, 10) == {"type": "job"}


async def test_an_unused_queue_is_removed_after_the_idle_expiry(
    names: dict[str, str], make_layer: LayerFactory, broker: Broker
) -> None:
    layer = make_layer(expiry=1, normal_channel_idle_expiry=4)
    await layer.send(names["brief"], {"type": "job"})
    queue = f"channels.normal.{names['brief']}"
    sent_at = time.monotonic()
    queue_facts(broker, queue)  # there (rabbitmqctl answers within the 4 s: the queue is declared)
    await asyncio.sleep(max(0.0, sent_at + 2 - time.monotonic()))
    try:
        queue_facts(broker, queue)  # still there half way through its idle time
    except LookupError:
        # rabbitmqctl can take seconds on a loaded machine: gone is wrong only if it looked early.
        assert time.monotonic() - sent_at >= 4, "the queue was removed before its idle expiry"
    while True:  # then RabbitMQ removes it (its message expired long before)
        try:
            queue_facts(broker, queue)
        except LookupError:
            break
        assert time.monotonic() - sent_at < 15, "the idle queue was never removed"
        await asyncio.sleep(0.25)
    assert time.monotonic() - sent_at >= 3.5


async def test_a_queue_a_sender_keeps_using_is_never_removed_with_a_live_message_in_it(
    names: dict[str, str], make_layer: LayerFactory, broker: Broker
) -> None:
    sender, worker = (
        make_layer(expiry=1, normal_channel_idle_expiry=2),
        make_layer(expiry=1, normal_channel_idle_expiry=2),
    )
    for i in range(10):  # 4 s of sends, twice the idle expiry: the sender declares it again meanwhile
        await sender.send(names["work"], {"type": "job", "i": i})
        await asyncio.sleep(0.4)
    assert (await receive(worker, names["work"]))["i"] >= 7  # the latest ones are still there


async def test_a_send_cancelled_while_its_queue_is_declared_leaves_the_other_sends_unharmed(
    names: dict[str, str], make_layer: LayerFactory
) -> None:
    sender, worker = make_layer(), make_layer()
    await sender.new_channel()  # this loop's own link: the sends run right here
    declaring = link_of(sender).normal._declaring
    first = asyncio.ensure_future(sender.send(names["racy"], {"type": "job", "i": 1}))
    second = asyncio.ensure_future(sender.send(names["racy"], {"type": "job", "i": 2}))
    for _ in range(1000):
        if declaring:  # both wait for the one declaration
            break
        await asyncio.sleep(0)
    assert declaring
    first.cancel()
    await asyncio.wait_for(second, 5)  # not cancelled with the first
    assert (await receive(worker, names["racy"]))["i"] == 2
    await sender.send(names["racy"], {"type": "job", "i": 3})
    assert (await receive(worker, names["racy"]))["i"] == 3
