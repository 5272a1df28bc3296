"""The server-processes axis: group_send from one process to members in 1 to 4 other processes.

:func:`measure` (called by ``python -m bench.scaling``) starts --processes receiver processes and
one sender process, all ``python -m bench.scaling_fanout`` with a --role, each with one layer
instance; it steers them by lines on their stdin and reads JSON lines on their stdout:

  receiver  ``--members`` channels in the group, a receive() waiting on each; prints
            {"ready"}, then {"warm"} once every member got the warm-up message, then
            {"drained", "last"} once every member got the --n-th timed message (n comes on
            stdin), then {"probe": k} as each probe reaches every member, and at the end
            {"latencies_us": [...]}: the one-way latency of every probe delivery
  sender    prints {"ready"}; on "warm" sends the warm-up group message; on "go" sends group
            messages from --window senders for --seconds and prints {"start", "sent"}; on
            "probe" sends one probe (stamped with its send time); on "done" ends

Throughput is deliveries_per_s = sent * members * processes / (last arrival in any receiver -
first send). Latency: one probe at a time, each sent once every receiver has it; p50_us and
p99_us over every delivery of every probe. Stamps are time.monotonic(), one clock for every
process of the machine (CLOCK_MONOTONIC on Linux).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import compare, scaling_probes, scenarios
from bench.scaling_probes import PROBE, TIMED, WARM, Collector, now
from bench.scenarios import LayerPool

REPOSITORY = Path(__file__).resolve().parents[1]
LINE_LIMIT = 1 << 24  # the receivers' last line holds every latency sample
STDERR_TAIL = 5


class FanoutError(Exception):
    """A process of the measurement failed, or answered something unexpected."""


# The parent: one measurement -------------------------------------------------------------------


@dataclass(frozen=True)
class Fanout:
    """One point of the axis: how many receiver processes, members in each, and how long."""

    processes: int
    members: int
    seconds: float
    latency_n: int
    timeout: float
    #: At most this many deliveries in the throughput phase: the sender stops before its time
    #: box when the receivers would need much longer to take it all.
    max_deliveries: int = 60_000


class Child:
    """One receiver or sender process: lines to its stdin, JSON lines from its stdout."""

    def __init__(self, role: str, process: asyncio.subprocess.Process) -> None:
        self.role = role
        self.process = process
        self.stderr_tail: list[str] = []
        self._stderr_reader = asyncio.ensure_future(self._read_stderr())

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            self.stderr_tail = [*self.stderr_tail, raw.decode(errors="replace").rstrip()][-STDERR_TAIL:]

    async def tell(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{line}\n".encode())
        await self.process.stdin.drain()

    async def expect(self, key: str) -> dict[str, Any]:
        """The next JSON line, which must have ``key``; its "error" raises FanoutError."""
        assert self.process.stdout is not None
        raw = await self.process.stdout.readline()
        if not raw:
            await self.process.wait()
            reason = (
                compare.last_line("\n".join(self.stderr_tail)) or f"exit status {self.process.returncode}"
            )
            raise FanoutError(f"the {self.role} ended early: {reason}")
        line = json.loads(raw)
        if not isinstance(line, dict) or "error" in line or key not in line:
            shown = line.get("error", line) if isinstance(line, dict) else line
            raise FanoutError(f"the {self.role} said {shown} (expected {key!r})")
        return line

    async def end(self) -> None:
        """Wait for the process to exit, killing it if it has not."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        await self._stderr_reader


async def start_child(spec: compare.LayerSpec, role: str, options: list[str]) -> Child:
    process = await asyncio.create_subprocess_exec(
        spec.python,
        "-m",
        "bench.scaling_fanout",
        "--role",
        role,
        *options,
        cwd=REPOSITORY,
        env=compare.config_environment(spec.config),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=LINE_LIMIT,
    )
    return Child(role, process)


def measure(spec: compare.LayerSpec, loop: str, point: Fanout) -> dict[str, Any]:
    """One measurement of the axis; its figures, or an "error" entry."""
    try:
        return asyncio.run(asyncio.wait_for(steer(spec, loop, point), point.timeout + compare.KILL_GRACE))
    except asyncio.TimeoutError:
        return {"error": f"timeout after {point.timeout + compare.KILL_GRACE:g} s"}
    except (FanoutError, OSError, ValueError) as error:
        return {"error": scenarios.short_reason(error)}


async def steer(spec: compare.LayerSpec, loop: str, point: Fanout) -> dict[str, Any]:
    """Start the processes, take them through warm-up, throughput and latency, and collect."""
    options = [
        *("--layer", spec.cls, "--label", spec.label, "--loop", loop, "--timeout", str(point.timeout)),
        *("--group", scenarios.unique_group("fanout"), "--latency-n", str(point.latency_n)),
        *("--seconds", str(point.seconds)),
    ]
    children: list[Child] = []
    try:
        for _ in range(point.processes):
            children.append(await start_child(spec, "receiver", [*options, "--members", str(point.members)]))
        receivers = list(children)
        max_n = max(1, point.max_deliveries // (point.members * point.processes))
        sender = await start_child(spec, "sender", [*options, "--max-n", str(max_n)])
        children.append(sender)
        for child in children:
            await child.expect("ready")
        await sender.tell("warm")
        for receiver in receivers:
            await receiver.expect("warm")
        await sender.tell("go")
        started = await sender.expect("sent")
        for receiver in receivers:
            await receiver.tell(str(started["sent"]))
        last = max([float((await receiver.expect("drained"))["last"]) for receiver in receivers])
        for _ in range(point.latency_n):
            await sender.tell("probe")
            for receiver in receivers:
                await receiver.expect("probe")
        await sender.tell("done")
        latencies: list[float] = []
        for receiver in receivers:
            latencies += [us / 1e6 for us in (await receiver.expect("latencies_us"))["latencies_us"]]
        await sender.expect("done")
    finally:
        for child in children:
            await child.end()
    seconds = last - float(started["start"])
    deliveries = int(started["sent"]) * point.members * point.processes
    return {
        "deliveries_per_s": scenarios.per_second(deliveries, seconds),
        "seconds": round(seconds, 3),
        "n": int(started["sent"]),
        "members": point.members,
        "processes": point.processes,
        **scaling_probes.latency_figures(latencies),
    }


# The child processes ----------------------------------------------------------------------------


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def next_command() -> str:
    """The next line the parent writes on stdin ("" at its end)."""
    line: str = await asyncio.to_thread(sys.stdin.readline)
    return line.strip()


async def expect_command(expected: str) -> None:
    command = await next_command()
    if command != expected:
        raise FanoutError(f"expected {expected!r} on stdin, got {command!r}")


async def run_receiver(args: argparse.Namespace, pool: LayerPool) -> dict[str, Any]:
    layer = pool.make()
    await scenarios.touch_groups(layer)
    members: list[str] = [""] * args.members

    async def join(k: int) -> None:
        members[k] = await layer.new_channel()
        await layer.group_add(args.group, members[k])

    await scenarios.windowed(args.members, scaling_probes.SETUP_WINDOW, join)
    collector = Collector(layer, members)
    emit(ready=True)
    await collector.until(WARM, args.members)
    emit(warm=True)
    sent = int(await next_command())
    await collector.until(TIMED, sent * args.members)
    emit(drained=True, last=collector.last_arrival)
    for k in range(1, args.latency_n + 1):
        await collector.until(PROBE, k * args.members)
        emit(probe=k)

    async def leave(k: int) -> None:  # memberships in Redis outlive the instance
        await layer.group_discard(args.group, members[k])

    await scenarios.windowed(args.members, scaling_probes.SETUP_WINDOW, leave)
    return {"latencies_us": [round(seconds * 1e6) for seconds in collector.latencies]}


async def run_sender(args: argparse.Namespace, pool: LayerPool) -> dict[str, Any]:
    layer = pool.make()
    await scenarios.touch_groups(layer)
    payload = "x" * scaling_probes.DEFAULT_SIZE
    emit(ready=True)
    await expect_command("warm")
    await layer.group_send(args.group, {"type": WARM})
    await expect_command("go")
    start = now()

    async def send(i: int) -> None:
        await layer.group_send(args.group, scenarios.message(i, payload))

    sent = await scaling_probes.time_boxed(args.seconds, args.window, send, args.max_n)
    emit(start=start, sent=sent)
    while (command := await next_command()) == "probe":
        await layer.group_send(args.group, scaling_probes.probe_message(payload))
    if command != "done":
        raise FanoutError(f"expected 'probe' or 'done' on stdin, got {command!r}")
    return {"done": True}


ROLES: dict[str, Callable[[argparse.Namespace, LayerPool], Awaitable[dict[str, Any]]]] = {
    "receiver": run_receiver,
    "sender": run_sender,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scaling_fanout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    scaling_probes.add_layer_arguments(parser)
    parser.add_argument("--role", choices=sorted(ROLES), required=True)
    parser.add_argument("--group", required=True, help="the group name, the same in every process")
    parser.add_argument("--members", type=int, default=100, help="receiver: channels in the group")
    parser.add_argument("--latency-n", type=int, default=scaling_probes.DEFAULT_LATENCY_N)
    parser.add_argument("--seconds", type=float, default=scaling_probes.DEFAULT_SECONDS)
    parser.add_argument("--window", type=int, default=scaling_probes.DEFAULT_WINDOW)
    parser.add_argument("--max-n", type=int, default=scaling_probes.MAX_MESSAGES, help="sender: at most")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        scenarios.use_loop(args.loop)
        config = scaling_probes.layer_config()
    except (ImportError, ValueError) as error:
        emit(error=scenarios.short_reason(error))
        return 1
    measured = scenarios.guarded(
        args.layer, config, args.shared_instance, lambda pool: ROLES[args.role](args, pool), args.timeout
    )
    result = scaling_probes.run_and_abandon(measured)
    emit(**result)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # As scenarios.py: a layer thread that does not end must not keep the process alive.
    os._exit(code)
