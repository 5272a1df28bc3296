"""``python -m bench e2e``: a chat served by real ASGI servers, with real websocket clients.

What a user who picks a channel layer measures: two uvicorn processes serve
:mod:`bench.e2e_app` (a Channels ``AsyncWebsocketConsumer`` that joins its room's group and
broadcasts each frame with ``group_send``), and this process runs the browsers: --clients
websockets in rooms of --room-size, each room spread over both servers.

- **Load** (the default mode): messages at each rate of --rates for --seconds, each from a random
  client, stamped with its send time. Per step: the share of the expected deliveries (a message
  reaches every member of its room, its sender included) that arrived, latency p50 and p99, and
  the CPU seconds of the servers and of the broker (``/proc``) per delivered message. The *knee*
  is the highest rate with everything delivered and p99 under :data:`KNEE_P99_MS` ms.
- **Connect storm** (--storm N): N clients connect at once, each to a room of its own (a group
  of its own); then each sends one message and waits for it to come back. Reported: the time
  until every client was accepted, and the echo's p50 and p99.

Layers: this one at --amqp-url, and channels_redis's RedisPubSub and Redis core at --redis-url
(skipped, with the reason, when they cannot run). Each layer runs on each loop of --loops
(uvicorn's ``--loop``: uvloop, as ``uvicorn[standard]`` runs, and asyncio); rounds are
interleaved, and the tables give medians over them, then this layer's figures against
RedisPubSub's. The clients always run on uvloop when it is installed.

    python -m bench e2e --rounds 3
    python -m bench e2e --storm 500 --loops uvloop
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from bench import layers as peers
from bench.run import fmt_ratio
from testbed.brokers.nodes import free_ports
from testbed.measure import percentile

PROJECT = Path(__file__).resolve().parent.parent
#: Where the servers' output goes.
LOG_DIR = PROJECT / "artifacts" / "bench-e2e"
KNEE_P99_MS = 50.0
#: How long after a step's last send its deliveries may still arrive (seconds).
DRAIN = 3.0
SERVER_START_TIMEOUT = 30.0
LOOPS = ("uvloop", "asyncio")
BASELINE = "RedisPubSub"


@dataclass(frozen=True)
class Layer:
    name: str
    backend: str
    config: dict[str, Any]
    broker_port: int


def layers(amqp_url: str, redis_url: str) -> tuple[list[Layer], list[str]]:
    """The layers that can run here, and a line for each one that cannot."""
    found, skipped = [], []
    if (problem := peers.rabbitmq_problem(amqp_url)) is None:
        found.append(
            Layer("channels_rabbitmq", peers.RABBITMQ_CLASS, {"host": amqp_url}, peers.amqp_port(amqp_url))
        )
    else:
        skipped.append(f"channels_rabbitmq: {problem}")
    if (problem := peers.redis_problem(redis_url)) is None:
        port, hosts = urlsplit(redis_url).port or 6379, {"hosts": [redis_url]}
        found.append(Layer(BASELINE, "channels_redis.pubsub.RedisPubSubChannelLayer", hosts, port))
        found.append(Layer("Redis core", "channels_redis.core.RedisChannelLayer", hosts, port))
    else:
        skipped.append(f"channels_redis: {problem}")
    return found, skipped


# Servers -----------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def servers(layer: Layer, loop: str, count: int = 2) -> AsyncIterator[list[tuple[int, int]]]:
    """``count`` uvicorn processes serving the chat with ``layer``: (port, pid) of each; their
    output goes to LOG_DIR (a shutdown's messages stay out of the tables)."""
    env = {**os.environ, "BENCH_E2E_LAYER": json.dumps({"backend": layer.backend, "config": layer.config})}
    started: list[tuple[int, subprocess.Popen[bytes]]] = []
    try:
        for port in free_ports(count):
            command = [sys.executable, "-m", "uvicorn", "bench.e2e_app:application", "--port", str(port)]
            command += ["--loop", loop, "--ws", "websockets", "--log-level", "warning", "--no-access-log"]
            with (LOG_DIR / f"{layer.name}-{loop}-{port}.log").open("wb") as log:
                server = subprocess.Popen(command, cwd=PROJECT, env=env, stdout=log, stderr=log)  # noqa: ASYNC220
            started.append((port, server))
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        for port, process in started:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"the {layer.name} server exited ({process.returncode}); see {LOG_DIR}"
                    )
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the {layer.name} server did not listen within {SERVER_START_TIMEOUT:g}s"
                    )
                await asyncio.sleep(0.05)
        yield [(port, process.pid) for port, process in started]
    finally:
        for _, process in started:
            process.terminate()
        for _, process in started:
            try:
                await asyncio.to_thread(process.wait, 10)
            except subprocess.TimeoutExpired:
                process.kill()


# Clients -----------------------------------------------------------------------------------------


async def read(connection: Any, by_step: dict[int, list[float]]) -> None:
    """Note the latency of every frame a client gets (``"<step> <send time>"``), by step."""
    with contextlib.suppress(Exception):  # the connection closes at the end
        async for text in connection:
            arrived, (step, _, sent) = time.monotonic(), str(text).partition(" ")
            by_step.setdefault(int(step), []).append(arrived - float(sent))


def milliseconds(values: list[float], fraction: float) -> float | None:
    return percentile(sorted(values), fraction) * 1000 if values else None


async def connect(port: int, room: str) -> Any:
    from websockets.asyncio.client import connect as websocket_connect

    return await websocket_connect(f"ws://127.0.0.1:{port}/{room}", open_timeout=60, max_queue=None)


async def wait_for(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def cpu_now(processes: Sequence[psutil.Process | None]) -> float:
    """User and system CPU seconds of these processes so far (0 for one that cannot be read)."""
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error, AttributeError):
            times = process.cpu_times()  # type: ignore[union-attr]
            total += times.user + times.system
    return total


async def load(layer: Layer, loop: str, args: argparse.Namespace, round_: int) -> list[dict[str, Any]]:
    """One round of the load steps for one layer on one loop: a result per rate."""
    rng, results = random.Random(round_), []
    broker = [process for process in [peers.broker_process(layer.broker_port)] if process is not None]
    async with servers(layer, loop) as running:
        ports, server_processes = [port for port, _ in running], [psutil.Process(pid) for _, pid in running]
        rooms = args.clients // args.room_size
        members = [(index % rooms, ports[(index // rooms) % len(ports)]) for index in range(args.clients)]
        clients = [(await connect(port, str(room)), room) for room, port in members]
        size = Counter(room for _, room in clients)
        by_step: dict[int, list[float]] = {}
        readers = [asyncio.ensure_future(read(connection, by_step)) for connection, _ in clients]
        try:
            # Warm-up (step 0): one message per room, until each member had it (the groups are bound).
            for room in range(rooms):
                await next(connection for connection, its in clients if its == room).send(
                    f"0 {time.monotonic()}"
                )
            if not await wait_for(lambda: len(by_step.get(0, ())) >= args.clients, 30):
                raise RuntimeError(f"{layer.name}: the warm-up messages did not all arrive")
            for step, rate in enumerate(args.rates, start=1):
                expected, total = 0, int(rate * args.seconds)
                cpu = cpu_now(server_processes), cpu_now(broker), time.process_time()
                started = time.monotonic()
                for sent in range(total):
                    if (delay := started + sent / rate - time.monotonic()) > 0:
                        await asyncio.sleep(delay)
                    connection, room = rng.choice(clients)
                    await connection.send(f"{step} {time.monotonic():.6f}")
                    expected += size[room]
                offered_for = time.monotonic() - started
                await wait_for(lambda: len(by_step.get(step, ())) >= expected, DRAIN)  # noqa: B023
                latencies = by_step.get(step, [])
                arrived, delivered = len(latencies), max(len(latencies), 1)  # delivered: never 0 (a divisor)
                servers_cpu, broker_cpu = cpu_now(server_processes) - cpu[0], cpu_now(broker) - cpu[1]
                result = {"mode": "load", "layer": layer.name, "loop": loop, "round": round_, "rate": rate}
                result |= {"offered_rate": total / offered_for, "expected": expected, "delivered": arrived}
                result |= {"share": arrived / expected if expected else 1.0}
                result |= {"p50_ms": milliseconds(latencies, 0.5), "p99_ms": milliseconds(latencies, 0.99)}
                result |= {"servers_cpu_us": servers_cpu / delivered * 1e6}
                result |= {"broker_cpu_us": broker_cpu / delivered * 1e6 if broker else None}
                # The clients share the machine: when they are near a core, the rate is theirs.
                result |= {"clients_cpu_share": (time.process_time() - cpu[2]) / (time.monotonic() - started)}
                results.append(result)
                print(brief(result), file=sys.stderr, flush=True)
        finally:
            for connection, _ in clients:
                await connection.close()
            await asyncio.gather(*readers, return_exceptions=True)
    return results


async def storm(layer: Layer, loop: str, args: argparse.Namespace, round_: int) -> dict[str, Any]:
    """N clients connecting at once, each joining a group of its own, then one echo each."""
    async with servers(layer, loop) as running:
        ports = [port for port, _ in running]
        started = time.monotonic()

        async def one(index: int) -> tuple[float, float | None]:
            connection = await connect(ports[index % len(ports)], f"storm-{round_}-{index}")
            accepted = time.monotonic() - started
            try:
                sent = time.monotonic()
                await connection.send(f"0 {sent:.6f}")
                await asyncio.wait_for(connection.recv(), 30)
                return accepted, time.monotonic() - sent
            except (TimeoutError, asyncio.TimeoutError):
                return accepted, None
            finally:
                await connection.close()

        outcomes = await asyncio.gather(*(one(index) for index in range(args.storm)), return_exceptions=True)
    accepted = sorted(outcome[0] for outcome in outcomes if isinstance(outcome, tuple))
    # A client the server refused (it closed the websocket: its consumer's connect() raised).
    refused = Counter(type(outcome).__name__ for outcome in outcomes if isinstance(outcome, BaseException))
    echoes = [outcome[1] for outcome in outcomes if isinstance(outcome, tuple) and outcome[1]]
    result = {"mode": "storm", "layer": layer.name, "loop": loop, "round": round_, "clients": args.storm}
    result |= {"connected": len(accepted), "refused": dict(refused), "echoed": len(echoes)}
    result |= {"all_accepted_s": accepted[-1] if accepted else None}
    result |= {"echo_p50_ms": milliseconds(echoes, 0.5), "echo_p99_ms": milliseconds(echoes, 0.99)}
    if refused:
        print(
            f"{layer.name} on {loop}: refused {dict(refused)}; see the servers' logs in {LOG_DIR}",
            file=sys.stderr,
        )
    print(brief(result), file=sys.stderr, flush=True)
    return result


# Figures -----------------------------------------------------------------------------------------


def brief(result: dict[str, Any]) -> str:
    head = f"round {result['round']} {result['layer']} on {result['loop']}:"
    if result["mode"] == "storm":
        return (
            f"{head} storm of {result['clients']}: {result['connected']} connected, "
            f"{result['echoed']} echoed, all accepted in {fmt(result['all_accepted_s'], 2)}s, "
            f"echo p99 {fmt(result['echo_p99_ms'])} ms"
        )
    return (
        f"{head} {result['rate']}/s: {result['share']:.1%} delivered, p50 {fmt(result['p50_ms'])} ms, "
        f"p99 {fmt(result['p99_ms'])} ms, cpu {fmt(total_cpu(result))} µs/msg"
    )


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def total_cpu(result: dict[str, Any]) -> float | None:
    broker = result["broker_cpu_us"]
    return None if broker is None else result["servers_cpu_us"] + broker


def median(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def knee(results: Sequence[dict[str, Any]]) -> float | None:
    """The highest rate of one round with everything delivered and p99 under KNEE_P99_MS."""
    complete = [r for r in results if r["share"] >= 1.0 and r["p99_ms"] is not None]
    return max((r["rate"] for r in complete if r["p99_ms"] < KNEE_P99_MS), default=None)


#: A column of a table after the layer's name: (heading, what of a result, digits).
Column = tuple[str, Callable[[dict[str, Any]], float | None], int]
#: A table's rows: the values of its key columns, and the results of every round.
Cells = dict[tuple[str, ...], list[dict[str, Any]]]
LOAD_COLUMNS: tuple[Column, ...] = (
    ("delivered %", lambda r: r["share"] * 100, 2),
    ("p50 ms", lambda r: r["p50_ms"], 1),
    ("p99 ms", lambda r: r["p99_ms"], 1),
    ("servers µs/msg", lambda r: r["servers_cpu_us"], 0),
    ("broker µs/msg", lambda r: r["broker_cpu_us"], 0),
    ("total µs/msg", total_cpu, 0),
    ("clients' core %", lambda r: r["clients_cpu_share"] * 100 if "clients_cpu_share" in r else None, 0),
)
STORM_COLUMNS: tuple[Column, ...] = (
    ("connected", lambda r: r["connected"], 0),
    ("echoed", lambda r: r["echoed"], 0),
    ("all accepted s", lambda r: r["all_accepted_s"], 2),
    ("echo p50 ms", lambda r: r["echo_p50_ms"], 1),
    ("echo p99 ms", lambda r: r["echo_p99_ms"], 1),
)


def table(heading: str, keys: list[str], cells: Cells, columns: Sequence[Column]) -> list[str]:
    """A Markdown table: a row per cell (its key's values first), the medians over its rounds."""
    names = [*keys, *(name for name, _, _ in columns)]
    lines = [heading, "", f"| {' | '.join(names)} |", "|" + "---|" * len(keys) + "---:|" * len(columns)]
    for key, runs in cells.items():
        figures = [fmt(median([read(run) for run in runs]), digits) for _, read, digits in columns]
        lines.append(f"| {' | '.join([*key, *figures])} |")
    return [*lines, ""]


def tables(results: list[dict[str, Any]], loops: Sequence[str]) -> list[str]:
    lines: list[str] = []
    names = list(dict.fromkeys(r["layer"] for r in results))
    for loop in loops:
        load_runs = [r for r in results if r["mode"] == "load" and r["loop"] == loop]
        if load_runs:
            cells: Cells = {}
            for r in sorted(load_runs, key=lambda r: (names.index(r["layer"]), r["rate"])):
                cells.setdefault((r["layer"], f"{r['rate']:,}"), []).append(r)
            heading = f"### Load, servers on {loop} (medians over rounds)"
            lines += table(heading, ["layer", "msgs/s"], cells, LOAD_COLUMNS)
            knees: dict[str, float | None] = {}
            for name in names:
                runs = [r for r in load_runs if r["layer"] == name]
                rounds = sorted({r["round"] for r in runs})
                knees[name] = median([knee([r for r in runs if r["round"] == n]) for n in rounds])
            lines += [
                f"Knee (highest rate, all delivered, p99 < {KNEE_P99_MS:g} ms): "
                + ", ".join(f"{name} {fmt(value, 0)}/s" for name, value in knees.items()),
                "",
                *ratios(load_runs, knees),
            ]
        storm_runs = [r for r in results if r["mode"] == "storm" and r["loop"] == loop]
        if storm_runs:
            cells = {}
            for r in storm_runs:
                cells.setdefault((r["layer"], f"{r['clients']:,}"), []).append(r)
            heading = f"### Connect storm, servers on {loop} (medians over rounds)"
            lines += table(heading, ["layer", "clients"], cells, STORM_COLUMNS)
    return lines


def ratios(runs: list[dict[str, Any]], knees: dict[str, float | None]) -> list[str]:
    """This layer against RedisPubSub: knee, CPU per message at each rate, p99 at half the knee."""
    ours, peer = "channels_rabbitmq", BASELINE
    if ours not in knees or peer not in knees:
        return []
    lines = [f"This layer / {peer}:", ""]
    our_knee, peer_knee = knees[ours], knees[peer]
    if our_knee and peer_knee:
        lines.append(f"- knee: {fmt_ratio(our_knee, peer_knee)}")
    for rate in sorted({r["rate"] for r in runs}):
        mine = median([total_cpu(r) for r in runs if r["layer"] == ours and r["rate"] == rate])
        theirs = median([total_cpu(r) for r in runs if r["layer"] == peer and r["rate"] == rate])
        if mine and theirs:
            lines.append(f"- total CPU per delivered message at {rate:,}/s: {fmt_ratio(mine, theirs)}")
    if peer_knee:
        half = min({r["rate"] for r in runs}, key=lambda rate: abs(rate - peer_knee / 2))
        mine = median([r["p99_ms"] for r in runs if r["layer"] == ours and r["rate"] == half])
        theirs = median([r["p99_ms"] for r in runs if r["layer"] == peer and r["rate"] == half])
        if mine and theirs:
            lines.append(f"- p99 at {half:,}/s (about half {peer}'s knee): {fmt_ratio(mine, theirs)}")
    return [*lines, ""]


# Command line ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench e2e", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    # fmt: off
    add("--rounds", type=int, default=1, metavar="N")
    add("--rates", type=int, nargs="+", default=[250, 500, 750, 1000], metavar="MSGS_PER_S")
    add("--seconds", type=float, default=10.0, help="length of each load step (default: 10)")
    add("--clients", type=int, default=80, help="websocket clients (default: 80)")
    add("--room-size", type=int, default=4, help="clients per room (default: 4)")
    add("--storm", type=int, default=0, metavar="N", help="a connect storm of N clients instead")
    add("--loops", nargs="+", choices=LOOPS, default=list(LOOPS))
    add("--layers", nargs="+", metavar="NAME", help="a subset of the layers, by name")
    add("--plot", type=Path, metavar="PNG", help="also draw the load steps into this PNG file")
    add("--from-json", type=Path, metavar="FILE", help="do not measure: report (and plot) a --json-out file")
    add("--json-out", type=Path, metavar="FILE", help="also write every result to FILE, one JSON line each")
    add("--amqp-url", default=os.environ.get("AMQP_URL", peers.DEFAULT_AMQP_URL), metavar="URL")
    add("--redis-url", default=os.environ.get("REDIS_URL", peers.DEFAULT_REDIS_URL), metavar="URL")
    # fmt: on
    return parser


async def run(args: argparse.Namespace) -> int:
    found, skipped = layers(args.amqp_url, args.redis_url)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    if args.layers:
        found = [layer for layer in found if layer.name in args.layers]
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    results: list[dict[str, Any]] = []
    if args.from_json:
        found = []
        results = [json.loads(line) for line in args.from_json.read_text().splitlines()]
        args.loops = list(dict.fromkeys(r["loop"] for r in results))
    for round_ in range(1, args.rounds + 1):
        for loop in args.loops:
            for layer in found:
                if args.storm:
                    results.append(await storm(layer, loop, args, round_))
                else:
                    results += await load(layer, loop, args, round_)
    if args.json_out:
        args.json_out.write_text("".join(json.dumps(result) + "\n" for result in results))
    print("\n".join(tables(results, args.loops)))
    if args.plot:
        from bench import plots  # matplotlib, only when drawing

        print(f"Plot: {plots.draw_e2e(results, args.plot, KNEE_P99_MS)}")
    command = " ".join(["python -m bench e2e", *sys.argv[2:]])
    print(f"Command: {command}; {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvloop

        return uvloop.run(run(args))
    except ImportError:
        return asyncio.run(run(args))
