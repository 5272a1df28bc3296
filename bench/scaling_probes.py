"""Measure one layer at one point of a scaling axis (message size, groups, channels); print one JSON line.

``python -m bench.scaling`` runs this as ``python -m bench.scaling_probes`` from the repository's
root, in a fresh subprocess per (layer, event loop, axis, point, round); the layer's config comes
in $CHANNELS_RABBITMQ_BENCH_CONFIG, as for scenarios.py. A sender instance and a receiver instance
(two connections, one process) go through two phases:

- throughput: --window senders in flight for --seconds, then the receiver drains what they sent:
  msgs_per_s = messages sent / (last arrival - first send). A time box rather than a count, so
  that a slow layer costs no more time than a fast one.
- latency: --latency-n probe messages one at a time, each sent once the previous one arrived;
  the one-way latency of each runs from the send() / group_send() call to the return of the
  receive() that gets it: p50_us and p99_us (nearest rank), without load.

Axes (--x is the point):

  size      payload of x characters, to one channel of the receiver
  groups    the receiver's one channel is a member of x groups (added concurrently, and
            discarded at the end with --discard-groups, for layers whose memberships outlive
            the instance); every message is a group_send to the last group added
  channels  the receiver has x channels with a receive() waiting on each; each message goes
            to one of them picked at random (seeded), so at most one per channel when x is big

setup_s is the time to make the channels and memberships (not part of the figures).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bench import scenarios
from bench.scenarios import Layer, LayerPool
from testbed.measure import percentile

AXES = ("size", "groups", "channels")
DEFAULT_SIZE = 100
DEFAULT_SECONDS = 1.0
DEFAULT_LATENCY_N = 200
DEFAULT_WINDOW = 50
#: Concurrent group_add / new_channel / group_discard calls while setting up (channels_redis
#: has a pool of 100 connections).
SETUP_WINDOW = 50
#: At most this many messages in one throughput phase, whatever the time box.
MAX_MESSAGES = 500_000
RANDOM_SEED = 12345
#: Seconds without any arrival after which the messages still awaited count as lost.
IDLE_LIMIT = 10.0
#: Message types: timed messages, latency probes, and the one warm-up message per channel.
TIMED, PROBE, WARM = "m", "probe", "warm"


#: The loop and the receive() loops of a probe, which are never cancelled nor closed: kept from
#: the garbage collector (which would log every pending task it destroys) until os._exit.
KEPT_UNTIL_EXIT: list[object] = []


def now() -> float:
    """The stamp messages carry: CLOCK_MONOTONIC on Linux, one clock for every process of the machine."""
    return time.monotonic()


class MessagesLost(Exception):
    """Messages sent never arrived: the layer dropped them."""


class Collector:
    """A receive() loop on each of the receiver's channels: counts arrivals by type, times the probes.

    A probe message carries its send time in "t"; its latency is taken when its receive()
    returns. One waiter at a time may wait for a count of a type (``until``); a receive loop
    that fails makes that wait raise. The loops are never cancelled: the process ends with
    them waiting (see :func:`main`).
    """

    def __init__(self, layer: Layer, channels: list[str]) -> None:
        self.layer = layer
        self.counts: dict[str, int] = {TIMED: 0, PROBE: 0, WARM: 0}
        self.last_arrival = 0.0
        self.latencies: list[float] = []
        self._wanted: tuple[str, int] | None = None
        self._reached = asyncio.Event()
        self._failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Retrieved at once: a failure once the measurement is over (the instance closed) is none.
        self._failure.add_done_callback(lambda failure: failure.exception())
        self._tasks = [asyncio.ensure_future(self._receive_loop(channel)) for channel in channels]
        KEPT_UNTIL_EXIT.append(self._tasks)

    async def _receive_loop(self, channel: str) -> None:
        try:
            while True:
                got = await self.layer.receive(channel)
                arrived = now()
                kind = str(got.get("type"))
                if kind == PROBE:
                    self.latencies.append(arrived - float(got["t"]))
                self.counts[kind] = self.counts.get(kind, 0) + 1
                self.last_arrival = arrived
                if self._wanted is not None and self.counts.get(self._wanted[0], 0) >= self._wanted[1]:
                    self._reached.set()
        except Exception as error:
            if not self._failure.done():
                self._failure.set_exception(error)

    async def until(self, kind: str, count: int) -> None:
        """Wait until ``count`` messages of ``kind`` have arrived in all (since the start).

        Raises MessagesLost when nothing at all arrives for IDLE_LIMIT seconds meanwhile: a
        layer that drops messages (RedisPubSubChannelLayer under load) would be waited for
        until the timeout, and say less.
        """
        if self.counts.get(kind, 0) >= count:
            return
        self._wanted = (kind, count)
        self._reached.clear()
        waiter: asyncio.Future[Any] = asyncio.ensure_future(self._reached.wait())
        try:
            while not waiter.done() and not self._failure.done():
                seen = self.last_arrival
                await asyncio.wait(
                    {waiter, self._failure}, timeout=IDLE_LIMIT, return_when=asyncio.FIRST_COMPLETED
                )
                if not waiter.done() and not self._failure.done() and self.last_arrival == seen:
                    raise MessagesLost(
                        f"{self.counts.get(kind, 0)} of {count} {kind!r} messages arrived, "
                        f"then none for {IDLE_LIMIT:g} s"
                    )
        finally:
            waiter.cancel()
            self._wanted = None
        if self._failure.done():
            self._failure.result()  # raises the receive loop's error


def latency_figures(latencies: list[float]) -> dict[str, Any]:
    """p50_us and p99_us (nearest rank) of latencies in seconds."""
    ordered = sorted(latencies)
    if not ordered:
        return {"latency_n": 0}
    return {
        "p50_us": round(percentile(ordered, 0.5) * 1e6),
        "p99_us": round(percentile(ordered, 0.99) * 1e6),
        "latency_n": len(ordered),
    }


async def time_boxed(
    seconds: float, window: int, send: Callable[[int], Awaitable[None]], limit: int = MAX_MESSAGES
) -> int:
    """``send(i)`` for i = 0, 1, ... from ``window`` concurrent senders until ``seconds`` have
    passed or ``limit`` were sent; how many were sent."""
    deadline = now() + seconds
    sent = 0

    async def sender() -> None:
        nonlocal sent
        while sent < limit and now() < deadline:
            i = sent
            sent += 1
            await send(i)

    await asyncio.gather(*(sender() for _ in range(window)))
    return sent


@dataclass(frozen=True)
class Probe:
    """What to measure: which axis at which point, for how long."""

    axis: str
    x: int
    seconds: float
    latency_n: int
    window: int
    discard_groups: bool = False


def probe_message(payload: str) -> dict[str, Any]:
    return {"type": PROBE, "t": now(), "p": payload}


async def two_phases(
    probe: Probe,
    collector: Collector,
    send: Callable[[dict[str, Any], int], Awaitable[None]],
    payload: str,
) -> dict[str, Any]:
    """The throughput phase, then the latency phase; ``send(message, i)`` sends the i-th message."""
    await send({"type": WARM}, 0)
    await collector.until(WARM, 1)
    start = now()
    sent = await time_boxed(probe.seconds, probe.window, lambda i: send(scenarios.message(i, payload), i))
    await collector.until(TIMED, sent)
    seconds = collector.last_arrival - start
    for k in range(probe.latency_n):
        await send(probe_message(payload), k)
        await collector.until(PROBE, k + 1)
    return {
        "msgs_per_s": scenarios.per_second(sent, seconds),
        "seconds": round(seconds, 3),
        "n": sent,
        **latency_figures(collector.latencies),
    }


async def windowed_setup(count: int, call: Callable[[int], Awaitable[None]]) -> float:
    """``call(i)`` for i in range(count), SETUP_WINDOW at a time; the seconds it took."""
    started = now()
    await scenarios.windowed(count, SETUP_WINDOW, call)
    return round(now() - started, 6)  # 10 channels take well under a millisecond


async def probe_size(probe: Probe, pool: LayerPool) -> dict[str, Any]:
    """Messages of x characters of payload to one channel."""
    sender, receiver = pool.make(), pool.make()
    channel = await receiver.new_channel()
    for layer in scenarios.distinct([sender, receiver]):
        await scenarios.touch_groups(layer)
    collector = Collector(receiver, [channel])

    async def send(message: dict[str, Any], _: int) -> None:
        await sender.send(channel, message)

    return {**await two_phases(probe, collector, send, "x" * probe.x), "setup_s": 0.0}


async def probe_groups(probe: Probe, pool: LayerPool) -> dict[str, Any]:
    """group_send to one of the x groups that the receiver's one channel is a member of."""
    sender, receiver = pool.make(), pool.make()
    member = await receiver.new_channel()
    for layer in scenarios.distinct([sender, receiver]):
        await scenarios.touch_groups(layer)
    prefix = scenarios.unique_group("groups")
    groups = [f"{prefix}.{k}" for k in range(probe.x)]

    async def add(k: int) -> None:
        await receiver.group_add(groups[k], member)

    async def discard(k: int) -> None:
        await receiver.group_discard(groups[k], member)

    setup_s = await windowed_setup(probe.x, add)
    collector = Collector(receiver, [member])

    async def send(message: dict[str, Any], _: int) -> None:
        await sender.group_send(groups[-1], message)

    figures = await two_phases(probe, collector, send, "x" * DEFAULT_SIZE)
    if probe.discard_groups:
        await windowed_setup(probe.x, discard)
    return {**figures, "setup_s": setup_s}


async def probe_channels(probe: Probe, pool: LayerPool) -> dict[str, Any]:
    """Messages to channels picked at random among the receiver's x channels, each with a receive()."""
    sender, receiver = pool.make(), pool.make()
    for layer in scenarios.distinct([sender, receiver]):
        await scenarios.touch_groups(layer)
    channels: list[str] = [""] * probe.x

    async def make(k: int) -> None:
        channels[k] = await receiver.new_channel()

    setup_s = await windowed_setup(probe.x, make)
    picks = random.Random(RANDOM_SEED)
    collector = Collector(receiver, channels)

    async def send(message: dict[str, Any], _: int) -> None:
        await sender.send(channels[picks.randrange(len(channels))], message)

    return {**await two_phases(probe, collector, send, "x" * DEFAULT_SIZE), "setup_s": setup_s}


PROBES: dict[str, Callable[[Probe, LayerPool], Awaitable[dict[str, Any]]]] = {
    "size": probe_size,
    "groups": probe_groups,
    "channels": probe_channels,
}


def add_layer_arguments(parser: argparse.ArgumentParser) -> None:
    """The options saying which layer to build, on which loop (shared with bench.scaling_fanout)."""
    parser.add_argument("--layer", required=True, help="import path of the layer class")
    parser.add_argument("--label", default="", help="name of the layer in the output")
    parser.add_argument("--loop", choices=scenarios.LOOPS, default="asyncio", help="the event loop")
    parser.add_argument("--shared-instance", action="store_true", help="one instance for every role")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for the whole probe")


def layer_config() -> dict[str, Any]:
    """The layer's constructor arguments, from $CHANNELS_RABBITMQ_BENCH_CONFIG (JSON)."""
    config = json.loads(os.environ.get(scenarios.CONFIG_VARIABLE, "{}"))
    if not isinstance(config, dict):
        raise ValueError(f"${scenarios.CONFIG_VARIABLE} must hold a JSON object")
    return config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scaling_probes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_layer_arguments(parser)
    parser.add_argument("--axis", choices=AXES, required=True)
    parser.add_argument("--x", type=int, required=True, help="the point on the axis")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="throughput time box")
    parser.add_argument("--latency-n", type=int, default=DEFAULT_LATENCY_N, help="latency probes")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="sends in flight")
    parser.add_argument("--discard-groups", action="store_true", help="groups: discard the memberships")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: dict[str, Any] = {
        "layer": args.label or args.layer,
        "axis": args.axis,
        "x": args.x,
        "loop": args.loop,
    }
    probe = Probe(args.axis, args.x, args.seconds, args.latency_n, args.window, args.discard_groups)
    try:
        scenarios.use_loop(args.loop)
        config = layer_config()
    except (ImportError, ValueError) as error:
        out["error"] = scenarios.short_reason(error)
    else:
        measured = scenarios.guarded(
            args.layer,
            config,
            args.shared_instance,
            lambda pool: PROBES[probe.axis](probe, pool),
            args.timeout,
        )
        out.update(run_and_abandon(measured))
    out["version"] = scenarios.package_version(args.layer)
    print(json.dumps(out), flush=True)
    return 1 if "error" in out else 0


def run_and_abandon(measured: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """Run the probe on a new loop (of the policy's kind) that is then left as it is, not closed.

    asyncio.run() would cancel every task left, the receive() loops of the channels axis among
    them: cancelling 50,000 receive() calls takes channels_redis 20 s and more, for nothing
    measured. The instances are closed by then, and the process ends right after (os._exit).
    """
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    KEPT_UNTIL_EXIT.append(loop)
    return loop.run_until_complete(measured)


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    # As scenarios.py: a layer thread that does not end must not keep the process alive.
    os._exit(code)
