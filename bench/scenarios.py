"""Measure one channel layer in one scenario and print one JSON line.

The layer is named by the import path of its class and built as ``cls(**config)`` (config as JSON
in $CHANNELS_RABBITMQ_BENCH_CONFIG, which keeps a password out of the process list, or --config).
This file runs by its path, often under another virtualenv's python (the PyPI channels_rabbitmq
has this project's import name), so it imports only the standard library, asgiref and the layer.
``python -m bench`` runs it once per (round, scenario, point, layer, loop)::

    python bench/scenarios.py --layer channels_rabbitmq.core.RabbitmqChannelLayer --scenario p2p

Scenarios (see :mod:`bench.run`): p2p, many, groups and fanout have a throughput phase, then
--probes latency probes; rtt, sync and storm are timed calls.

Throughput: N messages (--n) from --window concurrent sends, each its own task, as in a server;
with --seconds the sends stop at that time box too. The figure runs from the first send to the
last arrival. Probes go one at a time, each once the previous one arrived everywhere: the
one-way latency from the send call to the return of receive() (p50_us, p99_us, nearest rank).
Every instance is warmed up first (a group_add and group_discard, then one message through the
scenario's own path). A failure or a timeout gives an "error" key, never a traceback. The timed
phase's CPU per unit of work (delivery, round trip, call or channel) comes as cpu_us, this process's
(every thread), and broker_cpu_us, that of the process --broker-pid names (/proc, on Linux).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.metadata
import json
import math
import os
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

# Run by its path, from any virtualenv: the project's root (for testbed.measure, which needs only
# the standard library) goes last on the path, after whatever that virtualenv has installed.
sys.path.append(str(Path(__file__).resolve().parent.parent))
from testbed.measure import percentile

Layer = Any  # any object following the Channels layer API

CONFIG_VARIABLE = "CHANNELS_RABBITMQ_BENCH_CONFIG"
LOOPS = ("asyncio", "uvloop")
SCENARIOS = ("p2p", "many", "groups", "fanout", "rtt", "sync", "storm")
DEFAULT_N = dict(p2p=20000, many=20000, groups=20000, fanout=50, rtt=2000, sync=300, storm=10000)
#: Sends in flight; fanout's group_sends go one after the other unless told otherwise.
DEFAULT_WINDOW = {"fanout": 1}
WARM_GROUP = "bench.warm"
WARM_TIMEOUT = 30.0
CLOSE_TIMEOUT = 10.0
#: Concurrent calls while setting up channels and memberships (channels_redis pools 100 connections).
SETUP_WINDOW = 50
#: Seconds without any arrival after which the messages still awaited count as lost.
IDLE_LIMIT = 10.0
#: Message types: timed messages, latency probes, the warm-up.
TIMED, PROBE, WARM = "m", "probe", "warm"
#: The receive() loops, and the loop itself, are never cancelled nor closed (cancelling 50,000
#: receive() calls takes channels_redis 20 s): kept from the garbage collector until os._exit.
KEPT_UNTIL_EXIT: list[object] = []
SCRIPT = str(Path(__file__).resolve())


#: What to measure, as parsed by :func:`parse_args` (its config parsed as JSON, N and window filled in).
Options = argparse.Namespace
Send = Callable[[dict[str, Any]], Awaitable[None]]  # sends one message of a scenario


def now() -> float:
    """The stamp messages carry: CLOCK_MONOTONIC on Linux, one clock for every process of the machine."""
    return time.monotonic()


def short_reason(error: BaseException) -> str:
    """``Type: first line of the message``, at most 200 characters."""
    text = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
    return reason if len(reason) <= 200 else reason[:197] + "..."


def per_second(count: int, seconds: float) -> int:
    return round(count / seconds) if seconds > 0 else 0


def unique_group(scenario: str) -> str:
    """A group name no earlier run left members or bindings in."""
    return f"bench.{scenario}.{os.getpid()}.{secrets.token_hex(4)}"


def message(kind: str, i: int, payload: str) -> dict[str, Any]:
    """A message of the scenario; a probe carries its send time in "t"."""
    body: dict[str, Any] = {"type": kind, "i": i, "p": payload}
    if kind == PROBE:
        body["t"] = now()
    return body


def cpu_now(broker_pid: int | None) -> tuple[float, float | None]:
    """CPU seconds so far of this process (every thread) and of the broker's (from /proc), if known."""
    broker = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        if broker_pid:  # utime and stime: the 12th and 13th fields after the command's ")"
            fields = Path(f"/proc/{broker_pid}/stat").read_text().rsplit(")", 1)[1].split()
            broker = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return time.process_time(), broker


def cpu_figures(start: tuple[float, float | None], broker_pid: int | None, units: int) -> dict[str, Any]:
    """µs of CPU per unit of work since ``start`` (:func:`cpu_now`): this process's and the broker's."""
    end, units = cpu_now(broker_pid), max(units, 1)
    figures = {"cpu_us": round((end[0] - start[0]) / units * 1e6, 1)}
    if start[1] is not None and end[1] is not None:
        figures["broker_cpu_us"] = round((end[1] - start[1]) / units * 1e6, 1)
    return figures


def latency_figures(latencies: list[float]) -> dict[str, Any]:
    """p50_us and p99_us (nearest rank) of latencies in seconds, and how many there were."""
    ordered = sorted(latencies)
    if not ordered:
        return {}
    p50, p99 = percentile(ordered, 0.5), percentile(ordered, 0.99)
    return {"p50_us": round(p50 * 1e6), "p99_us": round(p99 * 1e6), "latency_n": len(ordered)}


# Layers -----------------------------------------------------------------------------------------


def load_class(path: str) -> type:
    """Import ``package.module.Class``."""
    module_name, _, class_name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"--layer must be a dotted path to a class, not {path!r}")
    return cast(type, getattr(importlib.import_module(module_name), class_name))


def package_version(path: str) -> str:
    """Version of the distribution that provides the layer class, or "" if unknown."""
    top = path.split(".", 1)[0]
    with contextlib.suppress(Exception):
        for dist in importlib.metadata.packages_distributions().get(top, []):
            return importlib.metadata.version(dist)
    return str(getattr(sys.modules.get(top), "__version__", ""))


class LayerPool:
    """Builds the instances of one scenario (one shared instance for in-memory layers); closes each once."""

    def __init__(self, opts: Options) -> None:
        self._cls, self._config, self._shared = load_class(opts.layer), opts.config, opts.shared_instance
        self.instances: list[Layer] = []

    def make(self) -> Layer:
        if not (self._shared and self.instances):
            self.instances.append(self._cls(**self._config))
        return self.instances[-1]

    async def warm(self) -> None:
        """group_add + group_discard on a fresh channel of each instance: connects lazy layers."""
        for layer in self.instances:
            own = await layer.new_channel()
            await layer.group_add(WARM_GROUP, own)
            await layer.group_discard(WARM_GROUP, own)

    async def close_all(self) -> None:
        """``close()`` each instance, else ``close_pools()`` (channels_redis); errors are ignored."""
        for layer in self.instances:
            close = getattr(layer, "close", None) or getattr(layer, "close_pools", None)
            with contextlib.suppress(Exception):
                result = close() if close is not None else None
                if asyncio.iscoroutine(result):
                    await asyncio.wait_for(result, CLOSE_TIMEOUT)


async def windowed(
    n: int, window: int, call: Callable[[int], Awaitable[None]], seconds: float | None = None
) -> int:
    """``call(i)`` for i = 0, 1, ..., each its own task, at most ``window`` running, until ``n`` were
    started or ``seconds`` passed; how many were started. The first failure raises, once all ended."""
    deadline = None if seconds is None else now() + seconds
    started = 0
    if window == 1:  # one after another in this task, as a sender awaits its calls in turn
        while started < n and (deadline is None or now() < deadline):
            await call(started)
            started += 1
        return started
    gate, running, failures = asyncio.Semaphore(window), set[asyncio.Future[None]](), []

    async def one(i: int) -> None:
        try:
            await call(i)
        except Exception as error:
            failures.append(error)
        finally:
            gate.release()

    while started < n and (deadline is None or now() < deadline) and not failures:
        await gate.acquire()
        task = asyncio.ensure_future(one(started))
        running.add(task)
        task.add_done_callback(running.discard)
        started += 1
    await asyncio.gather(*running)
    if failures:
        raise failures[0]
    return started


# Arrivals: what reached the receiving channels ----------------------------------------------------


class MessagesLost(Exception):
    """Messages sent never arrived: the layer dropped them."""


class Collector:
    """A receive() loop on each (layer, channel), counting every message that arrives (the phases
    come one after the other: the warm-up, the throughput, the probes), timing the probes ("t")."""

    def __init__(self, receivers: list[tuple[Layer, str]]) -> None:
        self.arrived = 0
        self.last_arrival = 0.0  # when the count waited for was reached
        self.probe_latencies: list[float] = []
        self._wanted = math.inf
        self._reached = asyncio.Event()
        self._failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Retrieved at once: a failure once the measurement is over (the instance closed) is none.
        self._failure.add_done_callback(lambda failure: failure.exception())
        KEPT_UNTIL_EXIT.append([asyncio.ensure_future(self._receive_loop(*pair)) for pair in receivers])

    async def _receive_loop(self, layer: Layer, channel: str) -> None:
        # As little as can be per message: the harness' own cost is part of every layer's figures.
        try:
            while True:
                got = await layer.receive(channel)
                self.arrived += 1
                if "t" in got:
                    self.probe_latencies.append(time.monotonic() - got["t"])
                if self.arrived >= self._wanted:
                    self.last_arrival = time.monotonic()
                    self._reached.set()
        except Exception as error:
            if not self._failure.done():
                self._failure.set_exception(error)

    async def until(self, count: int) -> None:
        """Wait until ``count`` messages arrived in all. Raises MessagesLost when nothing arrives for
        IDLE_LIMIT seconds meanwhile (RedisPubSubChannelLayer drops messages under load)."""
        if self.arrived >= count:  # all arrived already (a layer without I/O): they did just now
            self.last_arrival = time.monotonic()
            return
        self._reached.clear()
        self._wanted = count
        waiter = asyncio.ensure_future(self._reached.wait())
        try:
            while not waiter.done() and not self._failure.done():
                seen = self.arrived
                either: set[asyncio.Future[Any]] = {waiter, self._failure}
                await asyncio.wait(either, timeout=IDLE_LIMIT, return_when=asyncio.FIRST_COMPLETED)
                if not waiter.done() and not self._failure.done() and self.arrived == seen:
                    raise MessagesLost(f"{seen} of {count} messages arrived, then none for {IDLE_LIMIT:g} s")
        finally:
            waiter.cancel()
            self._wanted = math.inf
        if self._failure.done():
            self._failure.result()  # raises the receive loop's error

    async def latencies(self) -> list[float]:
        return self.probe_latencies


class ReceiverProcesses:
    """Receivers in processes of their own (``--role receiver``), steered by lines on their stdin:
    ``until COUNT`` answers ``{"last": t}`` once the process counts COUNT, ``latencies``
    answers ``{"latencies": [...]}``."""

    def __init__(self, processes: list[asyncio.subprocess.Process]) -> None:
        self.processes = processes
        self.last_arrival = 0.0

    @classmethod
    async def start(cls, opts: Options, group: str) -> ReceiverProcesses:
        command = [sys.executable, SCRIPT, "--role", "receiver", "--layer", opts.layer]
        command += ["--group", group, "--members", str(opts.members), "--loop", opts.loop]
        env, pipe = {**os.environ, CONFIG_VARIABLE: json.dumps(opts.config)}, asyncio.subprocess.PIPE
        spawned = [
            await asyncio.create_subprocess_exec(*command, env=env, stdin=pipe, stdout=pipe, limit=1 << 24)
            for _ in range(opts.receivers)
        ]
        KEPT_UNTIL_EXIT.append(spawned)
        receivers = cls(spawned)
        await receivers._ask_all("")  # each says {"ready": ...} once its members are in the group
        return receivers

    async def _ask(self, process: asyncio.subprocess.Process, line: str) -> dict[str, Any]:
        assert process.stdin is not None
        assert process.stdout is not None
        if line:
            process.stdin.write(f"{line}\n".encode())
            await process.stdin.drain()
        raw = await process.stdout.readline()
        answer = json.loads(raw) if raw else {"error": f"a receiver process ended ({await process.wait()})"}
        if "error" in answer:
            raise RuntimeError(f"receiver process: {answer['error']}")
        return dict(answer)

    async def _ask_all(self, line: str) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self._ask(process, line) for process in self.processes)))

    async def until(self, count: int) -> None:
        answers = await self._ask_all(f"until {count // len(self.processes)}")
        self.last_arrival = max(answer["last"] for answer in answers)

    async def latencies(self) -> list[float]:
        return [latency for answer in await self._ask_all("latencies") for latency in answer["latencies"]]


async def serve_as_receiver(opts: Options, group: str) -> None:
    """``--role receiver``: --members channels in ``group``, answering :class:`ReceiverProcesses`."""
    pool = LayerPool(opts)
    layer = pool.make()
    await pool.warm()
    members = [await layer.new_channel() for _ in range(opts.members)]
    for channel in members:
        await layer.group_add(group, channel)
    collector = Collector([(layer, channel) for channel in members])
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )

    def say(**answer: Any) -> None:
        print(json.dumps(answer), flush=True)

    say(ready=len(members))
    while words := (await reader.readline()).decode().split():
        try:
            if words[0] == "until":
                await collector.until(int(words[1]))
                say(last=collector.last_arrival)
            else:
                say(latencies=collector.probe_latencies)
        except Exception as error:
            say(error=short_reason(error))
    await pool.close_all()


# Scenarios --------------------------------------------------------------------------------------


async def flow(
    opts: Options, send: Send, arrivals: Collector | ReceiverProcesses, copies: int
) -> dict[str, Any]:
    """The throughput phase, then the probes. ``send`` sends one message; each arrives ``copies`` times."""
    payload = "x" * opts.size
    await send(message(WARM, 0, payload))
    await arrivals.until(copies)
    start, cpu = now(), cpu_now(opts.broker_pid)
    sent = await windowed(opts.n, opts.window, lambda i: send(message(TIMED, i, payload)), opts.seconds)
    await arrivals.until(copies + sent * copies)
    seconds, cpu_used = arrivals.last_arrival - start, cpu_figures(cpu, opts.broker_pid, sent * copies)
    for k in range(opts.probes):
        await send(message(PROBE, k, payload))
        await arrivals.until(copies + (sent + k + 1) * copies)
    rates = {"msgs_per_s": per_second(sent, seconds), "deliveries_per_s": per_second(sent * copies, seconds)}
    figures = {**rates, "seconds": round(seconds, 3), "n": sent, **cpu_used}
    return {**figures, **latency_figures(await arrivals.latencies())}


async def setup(count: int, call: Callable[[int], Awaitable[None]]) -> float:
    """``call(i)`` for each i in range(count), SETUP_WINDOW at a time; the seconds it took."""
    started = now()
    await windowed(count, SETUP_WINDOW, call)
    return round(now() - started, 6)


async def scenario_p2p(opts: Options, pool: LayerPool) -> dict[str, Any]:
    return await scenario_many(Options(**{**vars(opts), "channels": 1}), pool)


async def scenario_many(opts: Options, pool: LayerPool) -> dict[str, Any]:
    sender, receiver = pool.make(), pool.make()
    await pool.warm()
    channels = [""] * opts.channels

    async def make(i: int) -> None:
        channels[i] = await receiver.new_channel()

    setup_s = await setup(opts.channels, make)
    turn = iter(range(1 << 62))

    async def send(body: dict[str, Any]) -> None:
        await sender.send(channels[next(turn) % len(channels)], body)

    collector = Collector([(receiver, channel) for channel in channels])
    return {**await flow(opts, send, collector, 1), "setup_s": setup_s}


async def scenario_groups(opts: Options, pool: LayerPool) -> dict[str, Any]:
    sender, receiver = pool.make(), pool.make()
    await pool.warm()
    member = await receiver.new_channel()
    groups = [f"{unique_group('groups')}.{k}" for k in range(opts.groups)]
    setup_s = await setup(opts.groups, lambda k: receiver.group_add(groups[k], member))

    async def send(body: dict[str, Any]) -> None:
        await sender.group_send(groups[-1], body)

    figures = await flow(opts, send, Collector([(receiver, member)]), 1)
    if opts.discard_groups:  # memberships kept in Redis would outlive the run
        await setup(opts.groups, lambda k: receiver.group_discard(groups[k], member))
    return {**figures, "setup_s": setup_s}


async def scenario_fanout(opts: Options, pool: LayerPool) -> dict[str, Any]:
    sender, group = pool.make(), unique_group("fanout")
    arrivals: Collector | ReceiverProcesses
    if opts.processes:
        await pool.warm()
        arrivals = await ReceiverProcesses.start(opts, group)
    else:
        receivers = [pool.make() for _ in range(opts.receivers)]
        await pool.warm()
        members = [
            (receiver, await receiver.new_channel()) for receiver in receivers for _ in range(opts.members)
        ]
        for receiver, channel in members:
            await receiver.group_add(group, channel)
        arrivals = Collector(members)

    async def send(body: dict[str, Any]) -> None:
        await sender.group_send(group, body)

    copies = opts.members * opts.receivers
    figures = await flow(opts, send, arrivals, copies)
    figures.update(group_sends_per_s=figures["msgs_per_s"], members=copies, receivers=opts.receivers)
    return {**figures, "processes": opts.receivers if opts.processes else 0}


async def scenario_rtt(opts: Options, pool: LayerPool) -> dict[str, Any]:
    ping_layer, pong_layer = pool.make(), pool.make()
    await pool.warm()
    ping_channel, pong_channel = await ping_layer.new_channel(), await pong_layer.new_channel()
    samples: list[float] = []

    async def pong(rounds: int) -> None:
        for i in range(rounds):
            await pong_layer.receive(pong_channel)
            await pong_layer.send(ping_channel, {"type": "pong", "i": i})

    async def ping(rounds: int) -> None:
        for i in range(rounds):
            sent = time.perf_counter()
            await ping_layer.send(pong_channel, {"type": "ping", "i": i})
            await ping_layer.receive(ping_channel)
            samples.append(time.perf_counter() - sent)

    await asyncio.wait_for(asyncio.gather(pong(1), ping(1)), WARM_TIMEOUT)
    samples.clear()
    start, cpu = time.perf_counter(), cpu_now(opts.broker_pid)
    await asyncio.gather(pong(opts.n), ping(opts.n))
    seconds = time.perf_counter() - start
    figures = {"mean_us": round(statistics.fmean(samples) * 1e6), "seconds": round(seconds, 3), "n": opts.n}
    figures.update(cpu_figures(cpu, opts.broker_pid, opts.n))
    return {**latency_figures(samples), **figures}


class SyncCallError(Exception):
    """A layer call made through async_to_sync failed."""


async def scenario_sync(opts: Options, pool: LayerPool) -> dict[str, Any]:
    from asgiref.sync import async_to_sync

    receiver = pool.make()
    await pool.warm()
    sender = pool.make()  # used from the thread only, as sync Django code would use it
    group, member = unique_group("sync"), await receiver.new_channel()
    await receiver.group_add(group, member)
    payload, done = "x" * opts.size, 0

    def call(what: str, func: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        try:
            return async_to_sync(func)(*args)
        except Exception as error:
            raise SyncCallError(f"{what}: {short_reason(error)}") from error

    def warm_sender() -> None:
        if sender is not receiver:
            # One loop for the three calls: some layers keep their connections per event loop.
            async def touch() -> None:
                own = await sender.new_channel()
                await sender.group_add(WARM_GROUP, own)
                await sender.group_discard(WARM_GROUP, own)

            call("warm-up group_add/group_discard", touch)
        call("warm-up group_send", sender.group_send, group, {"type": WARM})

    def timed_calls() -> float:
        nonlocal done
        start = time.perf_counter()
        for i in range(opts.n):
            call(f"timed group_send #{i + 1}", sender.group_send, group, message(TIMED, i, payload))
            done += 1
        return time.perf_counter() - start

    try:
        await asyncio.to_thread(warm_sender)  # this process ends with os._exit: never joined
        await asyncio.wait_for(receiver.receive(member), WARM_TIMEOUT)
        collector, cpu = Collector([(receiver, member)]), cpu_now(opts.broker_pid)
        seconds = await asyncio.to_thread(timed_calls)
    except SyncCallError as error:
        return {"error": str(error), "n": opts.n, "calls_ok": done}
    with contextlib.suppress(MessagesLost):
        await collector.until(opts.n)
    received = collector.arrived
    result: dict[str, Any] = {"calls_per_s": per_second(opts.n, seconds), "seconds": round(seconds, 3)}
    result.update(n=opts.n, received=received, **cpu_figures(cpu, opts.broker_pid, opts.n))
    if received != opts.n:
        result["error"] = f"only {received} of {opts.n} group messages delivered"
    return result


async def scenario_storm(opts: Options, pool: LayerPool) -> dict[str, Any]:
    server, sender = pool.make(), pool.make()
    await pool.warm()
    prefix, channels = unique_group("storm"), [""] * opts.n
    latencies: list[float] = []

    async def connect(i: int) -> None:
        channels[i] = await server.new_channel()
        started = time.perf_counter()
        await server.group_add(f"{prefix}.{i}", channels[i])
        latencies.append(time.perf_counter() - started)

    start, cpu = time.perf_counter(), cpu_now(opts.broker_pid)
    await asyncio.gather(*(connect(i) for i in range(opts.n)))
    seconds, cpu_used = time.perf_counter() - start, cpu_figures(cpu, opts.broker_pid, opts.n)
    await sender.group_send(f"{prefix}.{opts.n - 1}", message(TIMED, opts.n - 1, "x"))
    await asyncio.wait_for(server.receive(channels[-1]), WARM_TIMEOUT)
    latencies.sort()
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    figures = {"seconds": round(seconds, 3), "p50_ms": round(p50 * 1e3, 2), "p99_ms": round(p99 * 1e3, 2)}
    return {**figures, "n": opts.n, **cpu_used}


RUNS: dict[str, Callable[[Options, LayerPool], Awaitable[dict[str, Any]]]] = {
    "p2p": scenario_p2p,
    "many": scenario_many,
    "groups": scenario_groups,
    "fanout": scenario_fanout,
    "rtt": scenario_rtt,
    "sync": scenario_sync,
    "storm": scenario_storm,
}


# Running ----------------------------------------------------------------------------------------


async def measure(opts: Options) -> dict[str, Any]:
    """One scenario under the timeout, every instance closed after; a failure becomes an "error"."""
    try:
        pool = LayerPool(opts)
    except Exception as error:
        return {"error": f"cannot build the layer: {short_reason(error)}"}
    try:
        return await asyncio.wait_for(RUNS[opts.scenario](opts, pool), opts.timeout)
    except asyncio.TimeoutError:
        return {"error": f"timeout after {opts.timeout:g} s"}
    except Exception as error:
        return {"error": short_reason(error)}
    finally:
        await pool.close_all()


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    # fmt: off
    add("--layer", required=True, help="import path of the layer class")
    add("--config", default=os.environ.get(CONFIG_VARIABLE, "{}"), help="constructor kwargs (JSON)")
    add("--scenario", choices=SCENARIOS, default="p2p")
    add("--n", type=int, help="messages, round trips, calls, connects (default: per scenario)")
    add("--window", type=int, help="sends in flight (default: 50; fanout 1)")
    add("--seconds", type=float, help="a time box for the throughput phase")
    add("--probes", type=int, default=0, help="latency probes after the throughput phase")
    sizes = {"size": 100, "channels": 100, "groups": 100, "members": 500, "receivers": 2}
    for name, default in sizes.items():
        add(f"--{name}", type=int, default=default)
    add("--processes", action="store_true", help="fanout: each receiver a process of its own")
    add("--discard-groups", action="store_true", help="groups: leave the groups at the end")
    add("--shared-instance", action="store_true", help="one instance for every role")
    add("--timeout", type=float, default=120.0, help="seconds for the whole scenario")
    add("--label", default="", help="name of the layer in the output")
    add("--loop", choices=LOOPS, default="asyncio", help="asyncio's own loop, or uvloop")
    add("--broker-pid", type=int, help="the broker's process, for its CPU per unit of work (Linux)")
    add("--check", action="store_true", help="only import the layer class, print its version")
    add("--role", choices=("receiver",), help=argparse.SUPPRESS)
    add("--group", help=argparse.SUPPRESS)
    # fmt: on
    opts = parser.parse_args(argv)
    opts.n = DEFAULT_N[opts.scenario] if opts.n is None else opts.n
    opts.window = opts.window or DEFAULT_WINDOW.get(opts.scenario, 50)
    return opts


def use_loop(name: str) -> None:
    """Every new event loop of this process one of ``name``'s, as under a server: a policy, since
    async_to_sync() makes loops of its own in plain threads."""
    if name == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_and_keep(body: Awaitable[Any]) -> Any:
    """Run on a new loop that is never closed (asyncio.run() would cancel every receive() left)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    KEPT_UNTIL_EXIT.append(loop)
    return loop.run_until_complete(body)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    out: dict[str, Any] = {"layer": opts.label or opts.layer, "class": opts.layer}
    try:
        if opts.check:
            load_class(opts.layer)
        else:
            out.update(scenario=opts.scenario, loop=opts.loop)
            opts.config = json.loads(opts.config)
            if not isinstance(opts.config, dict):
                raise ValueError("the config must be a JSON object")
            use_loop(opts.loop)
            if opts.role == "receiver":
                run_and_keep(serve_as_receiver(opts, opts.group))
                return 0
            out.update(run_and_keep(measure(opts)))
            out["python"] = sys.version.split()[0]
    except Exception as error:  # the layer or uvloop cannot be imported, a bad config
        out["error"] = short_reason(error)
    out["version"] = package_version(opts.layer)
    print(json.dumps(out), flush=True)
    return 1 if "error" in out else 0


if __name__ == "__main__":
    # Run by its path, this file's folder comes first on sys.path: its siblings must not shadow
    # anything the layer imports.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != here]
    code = main()
    sys.stderr.flush()
    # os._exit: a call stuck in an async_to_sync thread, or the receive() loops left waiting, must
    # not keep the process alive after the result is printed.
    os._exit(code)
