"""What a process holds stays bounded: channels nobody reads, groups joined and left by the thousand."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

from channels_rabbitmq.core import RabbitmqChannelLayer
from channels_rabbitmq.routing import LocalRouter
from tests.conftest import Broker, LayerFactory, link_of

CHANNELS = 10_000
ROUNDS = 3
LOCAL_CAPACITY = 200
PREFETCH_COUNT = 10
EXPIRY = 1.0
SEND_WINDOW = 200
GROUPS = 10_000
GROUP_CHUNK = 500


async def send_rounds(sender: RabbitmqChannelLayer, targets: list[str], rounds: int, pause: float) -> None:
    """One message to each target per round, SEND_WINDOW sends in flight; ``pause`` between rounds,
    so that every round meets a router that expiry has emptied and fills it again."""

    async def worker(work: Iterator[str], round_number: int) -> None:
        for target in work:
            await sender.send(target, {"type": "unread", "round": round_number})

    for round_number in range(rounds):
        work = iter(targets)
        await asyncio.gather(*(worker(work, round_number) for _ in range(SEND_WINDOW)))
        if round_number + 1 < rounds:
            await asyncio.sleep(pause)


async def test_channels_nobody_reads_hold_at_most_capacity_and_are_freed_after_expiry(
    make_layer: LayerFactory, broker: Broker
) -> None:
    receiver = make_layer(
        expiry=EXPIRY,
        local_capacity=LOCAL_CAPACITY,
        remote_capacity=1_000_000,
        prefetch_count=PREFETCH_COUNT,
    )
    sender = make_layer()
    channels = [await receiver.new_channel() for _ in range(CHANNELS)]
    await sender.new_channel()
    link = link_of(receiver)
    router: LocalRouter = link.router

    # Sample held at every delivery, and the inboxes on every loop turn of a sampler.
    peak = {"held": 0, "inboxes": 0, "deliveries": 0}
    deliver = router.deliver

    def counting_deliver(channel: str, message: dict, now: float) -> None:
        deliver(channel, message, now)
        peak["deliveries"] += 1
        peak["held"] = max(peak["held"], router.held)

    router.deliver = counting_deliver
    sampling = True

    async def sample() -> None:
        while sampling:
            peak["held"] = max(peak["held"], router.held)
            peak["inboxes"] = max(peak["inboxes"], router.inbox_count)
            await asyncio.sleep(0.005)

    sampler = asyncio.ensure_future(sample())
    started = time.monotonic()
    try:
        await send_rounds(sender, channels, ROUNDS, pause=EXPIRY)
        sent_in = time.monotonic() - started
        # Everything RabbitMQ still has expires there (x-message-ttl) or here (expiry).
        deadline = time.monotonic() + 20
        while (router.held or router.inbox_count) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    finally:
        sampling = False
        await sampler
        router.deliver = deliver
    bound = LOCAL_CAPACITY + PREFETCH_COUNT
    assert peak["deliveries"] > 2 * LOCAL_CAPACITY, peak  # the bound was reached and tested
    assert peak["held"] >= LOCAL_CAPACITY, peak
    assert peak["held"] <= bound, f"held reached {peak['held']} > {bound} (sent in {sent_in:.1f}s)"
    assert peak["inboxes"] <= bound, peak
    assert router.held == 0
    assert router.inbox_count == 0
    assert list(router._inboxes) == []
    # The link still receives: a message for a channel that reads now arrives.
    await sender.send(channels[0], {"type": "read"})
    assert await asyncio.wait_for(receiver.receive(channels[0]), 10) == {"type": "read"}
    assert router.held == 0
    assert router.inbox_count == 0


async def test_ten_thousand_groups_joined_and_left_leave_no_binding_and_no_residue(
    make_layer: LayerFactory, broker: Broker
) -> None:
    layer = make_layer()
    channel = await layer.new_channel()
    link = link_of(layer)
    queue = link.queue_name
    groups = [f"many.{number}" for number in range(GROUPS)]
    started = time.monotonic()
    for start in range(0, GROUPS, GROUP_CHUNK):
        chunk = groups[start : start + GROUP_CHUNK]
        await asyncio.gather(*(layer.group_add(group, channel) for group in chunk))
        assert all(channel in link.router._groups.get(group, ()) for group in chunk)
        if start == 0:  # the bindings are really made (rabbitmqctl is slow: once)
            bound = {key for name, key in broker.bindings() if name == queue}
            assert bound == set(chunk)
        await asyncio.gather(*(layer.group_discard(group, channel) for group in chunk))
    elapsed = time.monotonic() - started
    print(f"{GROUPS} group_add + group_discard in {elapsed:.1f}s")
    assert {key for name, key in broker.bindings() if name == queue} == set()
    assert list(link.router.groups) == []
    assert link.router._groups == {}
    assert len(link.router._membership_expiry) == 0
    assert link.topology._syncing == {}
    assert link.router.inbox_count == 0
    assert link.router.held == 0
    # The queue is still bound and unbound as usual afterwards.
    await layer.group_add("many.after", channel)
    await layer.group_send("many.after", {"type": "after"})
    assert await asyncio.wait_for(layer.receive(channel), 10) == {"type": "after"}
    await layer.group_discard("many.after", channel)
    assert link.topology._syncing == {}
    assert list(link.router.groups) == []
