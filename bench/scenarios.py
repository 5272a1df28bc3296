"""Measure one Django Channels layer in one scenario and print one JSON line.

The layer is named by the import path of its class and built as ``cls(**config)``,
so any layer that follows the Channels layer API can be measured, from any
virtualenv that has it installed. This file is run by its path, often by another
virtualenv's python (the PyPI channels_rabbitmq has this project's import name), so
it imports nothing from channels_rabbitmq but the layer class named by --layer.
``python -m bench`` runs it once per (layer, scenario, round)::

    python bench/scenarios.py --scenario p2p \\
        --layer channels_rabbitmq.core.RabbitmqChannelLayer \\
        --config '{"host": "amqp://guest:guest@127.0.0.1:5672/%2F"}'

(``bench`` passes the config in $CHANNELS_RABBITMQ_BENCH_CONFIG rather than --config,
so that a password never shows in the process list.)

Scenarios (N is --n; the default depends on the scenario):

  p2p     a sender and a receiver instance (two connections, one process); N
          messages to one channel of the receiver, at most --window sends in
          flight. Reports msgs_per_s.
  many    as p2p, but N messages spread round-robin over --channels channels of
          the receiver. Reports msgs_per_s.
  fanout  --servers receiver instances, each with --members channels in one
          group; the sender awaits N group_sends one after the other. Reports
          deliveries_per_s = N * members * servers / seconds.
  rtt     ping-pong between two instances, N round trips. Reports p50_us and
          p99_us (nearest rank) and mean_us.
  sync    N calls of ``async_to_sync(layer.group_send)(group, message)`` from a
          plain thread (no running loop there), while a receiver instance on the
          main loop holds one member of the group and counts what it receives.
          Reports calls_per_s and received; a layer that cannot be used from
          another event loop reports "error" instead.
  storm   a connect storm, as after a deploy: N websockets connect to one server
          process at once, and each makes a channel and joins a group of its own
          (``user-<i>``). Reports seconds (until every group_add has returned),
          p50_ms and p99_ms of one group_add, and that a group_send to the last
          group arrives.

Every instance is warmed up before timing (group_add + group_discard on each,
then one send + receive) and closed at the end. In-memory layers need
--shared-instance: one object then plays every role. A failure or a timeout
gives a JSON line with an "error" key, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.metadata
import inspect
import json
import os
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

# Run by its path, from any virtualenv: the project's root (for testbed.measure, which needs only
# the standard library) goes last on the path, after whatever that virtualenv has installed.
sys.path.append(str(Path(__file__).resolve().parent.parent))
from testbed.measure import percentile

T = TypeVar("T")

#: Where the layer's config (JSON) may come from instead of --config: an environment variable
#: keeps a broker password out of the process list.
CONFIG_VARIABLE = "CHANNELS_RABBITMQ_BENCH_CONFIG"
LOOPS = ("asyncio", "uvloop")
DEFAULT_N = {"p2p": 20000, "many": 20000, "fanout": 50, "rtt": 2000, "sync": 300, "storm": 10000}
WARM_GROUP = "bench.warm"
WARM_TIMEOUT = 30.0
CLOSE_TIMEOUT = 10.0
SYNC_DRAIN_TIMEOUT = 10.0

Layer = Any  # any object following the Channels layer API


@dataclass(frozen=True)
class Options:
    """What to measure and how much of it."""

    layer: str
    config: dict[str, Any]
    scenario: str
    n: int
    window: int
    size: int
    channels: int
    members: int
    servers: int
    timeout: float
    shared_instance: bool


# Layers -----------------------------------------------------------------------------------------


def load_class(path: str) -> type:
    """Import ``package.module.Class``."""
    module_name, _, class_name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"--layer must be a dotted path to a class, not {path!r}")
    layer_class: type = getattr(importlib.import_module(module_name), class_name)
    return layer_class


def package_version(path: str) -> str:
    """Version of the distribution that provides the layer class, or "" if unknown."""
    top = path.split(".", 1)[0]
    with contextlib.suppress(Exception):
        for dist in importlib.metadata.packages_distributions().get(top, []):
            return importlib.metadata.version(dist)
    return str(getattr(sys.modules.get(top), "__version__", ""))


class LayerPool:
    """Builds the layer instances of one scenario and closes each of them once."""

    def __init__(self, layer: str, config: dict[str, Any], shared_instance: bool) -> None:
        self._cls = load_class(layer)
        self._config = config
        self._shared = shared_instance
        self.instances: list[Layer] = []

    def make(self) -> Layer:
        """A new instance, or the one shared instance with --shared-instance."""
        if self._shared and self.instances:
            return self.instances[0]
        layer = self._cls(**self._config)
        self.instances.append(layer)
        return layer

    async def close_all(self) -> None:
        """``close()`` each instance, else ``close_pools()`` (channels_redis); errors are ignored."""
        for layer in self.instances:
            close = getattr(layer, "close", None) or getattr(layer, "close_pools", None)
            if close is None:
                continue
            with contextlib.suppress(Exception):
                result = close()
                if inspect.isawaitable(result):
                    await asyncio.wait_for(result, CLOSE_TIMEOUT)


def distinct(layers: list[Layer]) -> list[Layer]:
    """The layers without repeats (one shared instance may play several roles)."""
    seen: dict[int, Layer] = {}
    for layer in layers:
        seen.setdefault(id(layer), layer)
    return list(seen.values())


def unique_group(scenario: str) -> str:
    """A group name no earlier run left members or bindings in."""
    return f"bench.{scenario}.{os.getpid()}.{secrets.token_hex(4)}"


def message(i: int, payload: str) -> dict[str, Any]:
    """The benchmark message: {"type": "m", "i": i, "p": payload}."""
    return {"type": "m", "i": i, "p": payload}


async def touch_groups(layer: Layer) -> None:
    """group_add + group_discard on a fresh channel: connects layers that connect lazily."""
    own = await layer.new_channel()
    await layer.group_add(WARM_GROUP, own)
    await layer.group_discard(WARM_GROUP, own)


async def warm_up(layers: list[Layer], pairs: list[tuple[Layer, Layer, str]]) -> None:
    """Touch every instance's groups, then one send + receive per (sender, receiver, channel)."""
    for layer in distinct(layers):
        await touch_groups(layer)
    for sender, receiver, channel in pairs:
        await sender.send(channel, {"type": "warm"})
        await asyncio.wait_for(receiver.receive(channel), WARM_TIMEOUT)


async def send_windowed(sender: Layer, targets: list[str], n: int, window: int, payload: str) -> None:
    """Send n messages round-robin over targets with at most ``window`` sends in flight.

    Each message is its own task, gated by a semaphore, like a server where every request
    sends on its own: the same method as the reference harness in shared/bench beside this
    repository, so the figures compare with the peer figures published there.
    """

    async def send_one(i: int) -> None:
        await sender.send(targets[i % len(targets)], message(i, payload))

    await windowed(n, window, send_one)


async def windowed(n: int, window: int, call: Callable[[int], Awaitable[None]]) -> None:
    """``call(i)`` for i in range(n), each its own task, at most ``window`` of them running."""
    gate = asyncio.Semaphore(window)

    async def gated(i: int) -> None:
        async with gate:
            await call(i)

    await asyncio.gather(*(gated(i) for i in range(n)))


async def receive_n(layer: Layer, channel: str, n: int) -> None:
    """Receive n messages on one channel."""
    for _ in range(n):
        await layer.receive(channel)


def per_second(count: int, seconds: float) -> int:
    return round(count / seconds) if seconds > 0 else 0


# Scenarios --------------------------------------------------------------------------------------


async def scenario_p2p(opts: Options, pool: LayerPool) -> dict[str, Any]:
    """N messages from one instance to one channel of another."""
    sender, receiver = pool.make(), pool.make()
    channel = await receiver.new_channel()
    await warm_up([sender, receiver], [(sender, receiver, channel)])
    payload = "x" * opts.size
    start = time.perf_counter()
    await asyncio.gather(
        receive_n(receiver, channel, opts.n),
        send_windowed(sender, [channel], opts.n, opts.window, payload),
    )
    seconds = time.perf_counter() - start
    return {"msgs_per_s": per_second(opts.n, seconds), "seconds": round(seconds, 3), "n": opts.n}


async def scenario_many(opts: Options, pool: LayerPool) -> dict[str, Any]:
    """N messages spread over many channels of the receiver."""
    sender, receiver = pool.make(), pool.make()
    channels = [await receiver.new_channel() for _ in range(opts.channels)]
    await warm_up([sender, receiver], [(sender, receiver, channels[0])])
    each = opts.n // len(channels)
    total = each * len(channels)
    payload = "x" * opts.size
    start = time.perf_counter()
    await asyncio.gather(
        *(receive_n(receiver, channel, each) for channel in channels),
        send_windowed(sender, channels, total, opts.window, payload),
    )
    seconds = time.perf_counter() - start
    return {
        "msgs_per_s": per_second(total, seconds),
        "seconds": round(seconds, 3),
        "n": total,
        "channels": len(channels),
    }


async def scenario_fanout(opts: Options, pool: LayerPool) -> dict[str, Any]:
    """N sequential group_sends to members on several receiver instances."""
    sender = pool.make()
    receivers = [pool.make() for _ in range(opts.servers)]
    group = unique_group("fanout")
    members: list[tuple[Layer, str]] = []
    for receiver in receivers:
        for _ in range(opts.members):
            channel = await receiver.new_channel()
            await receiver.group_add(group, channel)
            members.append((receiver, channel))
    firsts = {id(receiver): (sender, receiver, channel) for receiver, channel in reversed(members)}
    await warm_up([sender, *receivers], list(firsts.values()))
    # One group message that every member gets: the bindings are in place before timing.
    await sender.group_send(group, {"type": "warm"})
    await asyncio.wait_for(asyncio.gather(*(r.receive(c) for r, c in members)), WARM_TIMEOUT)
    payload = "x" * opts.size

    async def send_all() -> None:
        for i in range(opts.n):
            await sender.group_send(group, message(i, payload))

    start = time.perf_counter()
    await asyncio.gather(send_all(), *(receive_n(r, c, opts.n) for r, c in members))
    seconds = time.perf_counter() - start
    deliveries = opts.n * len(members)
    return {
        "deliveries_per_s": per_second(deliveries, seconds),
        "group_sends_per_s": per_second(opts.n, seconds),
        "seconds": round(seconds, 3),
        "n": opts.n,
        "members": len(members),
    }


async def scenario_rtt(opts: Options, pool: LayerPool) -> dict[str, Any]:
    """Ping-pong between two instances; latency of each round trip."""
    ping_layer, pong_layer = pool.make(), pool.make()
    ping_channel = await ping_layer.new_channel()
    pong_channel = await pong_layer.new_channel()
    await warm_up(
        [ping_layer, pong_layer],
        [(ping_layer, pong_layer, pong_channel), (pong_layer, ping_layer, ping_channel)],
    )
    samples: list[float] = []

    async def pong() -> None:
        for i in range(opts.n):
            await pong_layer.receive(pong_channel)
            await pong_layer.send(ping_channel, {"type": "pong", "i": i})

    async def ping() -> None:
        for i in range(opts.n):
            sent = time.perf_counter()
            await ping_layer.send(pong_channel, {"type": "ping", "i": i})
            await ping_layer.receive(ping_channel)
            samples.append(time.perf_counter() - sent)

    start = time.perf_counter()
    await asyncio.gather(pong(), ping())
    seconds = time.perf_counter() - start
    samples.sort()
    return {
        "p50_us": round(percentile(samples, 0.5) * 1e6),
        "p99_us": round(percentile(samples, 0.99) * 1e6),
        "mean_us": round(statistics.fmean(samples) * 1e6),
        "seconds": round(seconds, 3),
        "n": opts.n,
    }


def in_thread(func: Callable[[], T]) -> asyncio.Future[T]:
    """Run func in a daemon thread; a future on the running loop gets its outcome.

    A daemon thread, not the loop's default executor: a call stuck in a layer must not
    keep asyncio.run() (which joins the default executor) from returning.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            outcome(value)

    def target() -> None:
        value: Any
        try:
            value = func()
        except BaseException as error:
            outcome: Callable[[Any], None] = future.set_exception
            value = error
        else:
            outcome = future.set_result
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, outcome, value)

    threading.Thread(target=target, name="bench-sync-caller", daemon=True).start()
    return future


class SyncCallError(Exception):
    """A layer call made through async_to_sync failed."""


async def scenario_sync(opts: Options, pool: LayerPool) -> dict[str, Any]:
    """async_to_sync(group_send) from a plain thread to a member held on the main loop."""
    from asgiref.sync import async_to_sync

    receiver = pool.make()
    sender = pool.make()
    group = unique_group("sync")
    member = await receiver.new_channel()
    await touch_groups(receiver)
    await receiver.group_add(group, member)
    payload = "x" * opts.size
    done = 0  # calls that returned, for the error report

    def call(what: str, func: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        try:
            return async_to_sync(func)(*args)
        except Exception as error:
            raise SyncCallError(f"{what}: {short_reason(error)}") from error

    def warm_sender() -> None:
        # The sender is only ever used from the thread, as sync Django code would use it.
        if sender is not receiver:
            # One loop for the three calls: some layers keep channels per event loop.
            async def touch() -> None:
                own = await sender.new_channel()
                await sender.group_add(WARM_GROUP, own)
                await sender.group_discard(WARM_GROUP, own)

            call("warm-up group_add/group_discard", touch)
        call("warm-up group_send", sender.group_send, group, {"type": "warm"})

    def timed_calls() -> float:
        nonlocal done
        start = time.perf_counter()
        for i in range(opts.n):
            call(f"timed group_send #{i + 1}", sender.group_send, group, message(i, payload))
            done += 1
        return time.perf_counter() - start

    try:
        await in_thread(warm_sender)
    except SyncCallError as error:
        return {"error": str(error), "n": opts.n}
    await asyncio.wait_for(receiver.receive(member), WARM_TIMEOUT)

    received = 0

    async def count() -> None:
        nonlocal received
        while received < opts.n:
            got = await receiver.receive(member)
            if got.get("type") == "m":
                received += 1

    counter = asyncio.ensure_future(count())
    try:
        seconds = await in_thread(timed_calls)
    except SyncCallError as error:
        counter.cancel()
        return {"error": str(error), "n": opts.n, "calls_ok": done}
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(counter), SYNC_DRAIN_TIMEOUT)
    counter.cancel()
    result: dict[str, Any] = {
        "calls_per_s": per_second(opts.n, seconds),
        "seconds": round(seconds, 3),
        "n": opts.n,
        "received": received,
    }
    if received != opts.n:
        result["error"] = f"only {received} of {opts.n} group messages delivered"
    return result


async def scenario_storm(opts: Options, pool: LayerPool) -> dict[str, Any]:
    """N concurrent connects, each a new channel joining a group of its own."""
    server, sender = pool.make(), pool.make()
    first = await server.new_channel()
    await warm_up(distinct([server, sender]), [(sender, server, first)])
    prefix = unique_group("storm")
    latencies: list[float] = []
    channels: dict[int, str] = {}

    async def connect(i: int) -> None:
        channel = channels[i] = await server.new_channel()
        started = time.perf_counter()
        await server.group_add(f"{prefix}.{i}", channel)
        latencies.append(time.perf_counter() - started)

    start = time.perf_counter()
    await asyncio.gather(*(connect(i) for i in range(opts.n)))
    seconds = time.perf_counter() - start
    last = opts.n - 1
    await sender.group_send(f"{prefix}.{last}", message(last, "x"))
    await asyncio.wait_for(server.receive(channels[last]), WARM_TIMEOUT)
    latencies.sort()
    return {
        "seconds": round(seconds, 3),
        "p50_ms": round(percentile(latencies, 0.5) * 1e3, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1e3, 2),
        "n": opts.n,
    }


SCENARIOS: dict[str, Callable[[Options, LayerPool], Awaitable[dict[str, Any]]]] = {
    "p2p": scenario_p2p,
    "many": scenario_many,
    "fanout": scenario_fanout,
    "rtt": scenario_rtt,
    "sync": scenario_sync,
    "storm": scenario_storm,
}


# Running ----------------------------------------------------------------------------------------


def short_reason(error: BaseException) -> str:
    """``Type: first line of the message``, at most 200 characters."""
    text = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
    return reason if len(reason) <= 200 else reason[:197] + "..."


async def run(opts: Options) -> dict[str, Any]:
    """Run one scenario under the timeout; any failure becomes an "error" entry."""
    return await guarded(
        opts.layer,
        opts.config,
        opts.shared_instance,
        lambda pool: SCENARIOS[opts.scenario](opts, pool),
        opts.timeout,
    )


async def guarded(
    layer: str,
    config: dict[str, Any],
    shared_instance: bool,
    body: Callable[[LayerPool], Awaitable[dict[str, Any]]],
    timeout: float,
) -> dict[str, Any]:
    """``body(pool)`` under a timeout, every instance closed after; a failure becomes an "error" entry."""
    try:
        pool = LayerPool(layer, config, shared_instance)
    except Exception as error:
        return {"error": f"cannot build the layer: {short_reason(error)}"}
    try:
        return await asyncio.wait_for(body(pool), timeout)
    except asyncio.TimeoutError:
        return {"error": f"timeout after {timeout:g} s"}
    except Exception as error:
        return {"error": short_reason(error)}
    finally:
        await pool.close_all()


def parse_args(argv: list[str] | None) -> tuple[Options, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layer", required=True, help="import path of the layer class")
    parser.add_argument(
        "--config",
        default=os.environ.get(CONFIG_VARIABLE, "{}"),
        help=f"constructor keyword arguments, as JSON (default: ${CONFIG_VARIABLE}, which keeps a "
        "password off the command line, else {})",
    )
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), help="required unless --check")
    parser.add_argument("--n", type=int, help="messages / group_sends / round trips / calls")
    parser.add_argument("--window", type=int, default=50, help="p2p, many: sends in flight")
    parser.add_argument("--size", type=int, default=100, help="payload characters")
    parser.add_argument("--channels", type=int, default=100, help="many: receiver channels")
    parser.add_argument("--members", type=int, default=500, help="fanout: group members per receiver")
    parser.add_argument("--servers", type=int, default=2, help="fanout: receiver instances")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for the whole scenario")
    parser.add_argument("--shared-instance", action="store_true", help="one instance for every role")
    parser.add_argument("--label", default="", help="name of the layer in the output")
    parser.add_argument(
        "--loop",
        choices=LOOPS,
        default="asyncio",
        help="the event loop: asyncio's own, or uvloop (as uvicorn runs when it is installed)",
    )
    parser.add_argument("--check", action="store_true", help="only import the layer class, print its version")
    args = parser.parse_args(argv)
    if not args.check and args.scenario is None:
        parser.error("--scenario is required")
    config = json.loads(args.config)
    if not isinstance(config, dict):
        parser.error("--config must be a JSON object")
    scenario = args.scenario or "p2p"
    opts = Options(
        layer=args.layer,
        config=config,
        scenario=scenario,
        n=args.n if args.n is not None else DEFAULT_N[scenario],
        window=args.window,
        size=args.size,
        channels=args.channels,
        members=args.members,
        servers=args.servers,
        timeout=args.timeout,
        shared_instance=args.shared_instance,
    )
    return opts, args


def use_loop(name: str) -> None:
    """Make every new event loop of this process one of ``name``'s, as a server would.

    A policy, not one loop: async_to_sync() makes loops of its own in plain threads, and under
    uvicorn with uvloop installed those are uvloop's too.
    """
    if name == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: list[str] | None = None) -> int:
    opts, args = parse_args(argv)
    out: dict[str, Any] = {"layer": args.label or opts.layer, "class": opts.layer}
    if args.check:
        try:
            load_class(opts.layer)
        except Exception as error:
            out["error"] = short_reason(error)
        out["version"] = package_version(opts.layer)
        print(json.dumps(out), flush=True)
        return 0 if "error" not in out else 1
    out["scenario"] = opts.scenario
    out["loop"] = args.loop
    try:
        use_loop(args.loop)
    except ImportError as error:
        out["error"] = f"{args.loop} is not installed: {short_reason(error)}"
        print(json.dumps(out), flush=True)
        return 1
    out.update(asyncio.run(run(opts)))
    out["version"] = package_version(opts.layer)
    out["python"] = sys.version.split()[0]
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    # Run by its path, this file's folder comes first on sys.path: its sibling modules
    # must not shadow anything the layer imports.
    script_folder = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != script_folder]
    code = main()
    sys.stderr.flush()
    # os._exit: a layer call stuck in an async_to_sync worker thread (joined at normal
    # interpreter exit) must not keep the process alive after the result is printed.
    os._exit(code)
