"""Resident memory of a process whose 10,000 channels never read while a sender keeps sending.

For each configuration, a fresh *receiver* process builds one RabbitmqChannelLayer
(``host`` plus the configuration), makes --channels channels and never reads them;
a *sender* process then sends one message to each channel, round after round, for
--seconds (``ChannelFull`` refusals are counted, not fatal). The receiver samples its
own RSS (VmRSS from /proc/self/status), ``router.held`` and ``router.inbox_count``
every --interval seconds while the sender runs and for --settle seconds after it
stops, then reports:

  baseline   RSS once the channels exist, before the first message
  peak       the highest RSS sampled (and ru_maxrss, the kernel's own peak)
  end        RSS after the settle time
  held       the most deliveries the router ever held, and how many at the end
  inboxes    the most inboxes at once, and how many at the end

What keeps it bounded: the router holds at most ``local_capacity`` deliveries (plus
up to ``prefetch_count`` in flight) and stops acknowledging beyond that; RabbitMQ keeps
at most ``remote_capacity`` more and refuses the rest; both drop what nobody read
within ``expiry``. The default configurations are the layer's defaults (expiry 60 s)
and expiry 5 s, where the expiry sweep is seen within the run. Prints a Markdown
table, then one JSON line. Example::

    .venv/bin/python bench/memory.py --seconds 30
    .venv/bin/python bench/memory.py --seconds 10 --config '{"local_capacity": 1000}'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run by its path: the project's root (for testbed.measure) goes last on the path.
sys.path.append(str(Path(__file__).resolve().parent.parent))
from testbed.measure import resident_kib

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_CONFIGS = ["{}", '{"expiry": 5}']
SENDER_WINDOW = 100
CLOSE_TIMEOUT = 10.0

HERE = Path(__file__).resolve()


# Measuring ---------------------------------------------------------------------------------------


def rss_kib() -> int:
    """This process's resident set size in KiB (VmRSS), or its peak where /proc is missing."""
    current = resident_kib()
    return max_rss_kib() if current is None else current


def max_rss_kib() -> int:
    """The kernel's peak RSS of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


# The sender process ------------------------------------------------------------------------------


async def send_for(host: str, targets: list[str], seconds: float) -> dict[str, Any]:
    """One message to each target, round after round, until ``seconds`` have passed."""
    from channels.exceptions import ChannelFull

    from channels_rabbitmq.core import RabbitmqChannelLayer

    layer = RabbitmqChannelLayer(host=host)
    counts = {"sent": 0, "refused": 0, "rounds": 0}
    deadline = time.monotonic() + seconds
    payload = "x" * 100

    async def worker(work: Any, round_number: int) -> None:
        for index in work:
            if time.monotonic() >= deadline:
                return
            try:
                await layer.send(targets[index], {"type": "unread", "round": round_number, "p": payload})
                counts["sent"] += 1
            except ChannelFull:
                counts["refused"] += 1

    try:
        while time.monotonic() < deadline:
            work = iter(range(len(targets)))
            await asyncio.gather(*(worker(work, counts["rounds"]) for _ in range(SENDER_WINDOW)))
            counts["rounds"] += 1
    finally:
        await asyncio.wait_for(layer.close(), CLOSE_TIMEOUT)
    return counts


def run_sender(args: argparse.Namespace) -> int:
    targets = Path(args.targets).read_text().split()
    print(json.dumps(asyncio.run(send_for(args.host, targets, args.seconds))), flush=True)
    return 0


# The receiver process (the one measured) ---------------------------------------------------------


async def receive_nothing(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    from channels_rabbitmq.core import RabbitmqChannelLayer

    layer = RabbitmqChannelLayer(host=args.host, **config)
    try:
        channels = [await layer.new_channel() for _ in range(args.channels)]
        link = layer._links.of_loop(asyncio.get_running_loop())
        assert link is not None  # new_channel() made it
        router = link.router
        delivered = 0
        deliver = router.deliver

        def counting_deliver(channel: str, message: dict[str, Any], now: float) -> None:
            nonlocal delivered
            delivered += 1
            deliver(channel, message, now)

        router.deliver = counting_deliver  # type: ignore[method-assign]
        baseline = rss_kib()
        peak = {"rss": baseline, "held": 0, "inboxes": 0}

        def sample() -> None:
            peak["rss"] = max(peak["rss"], rss_kib())
            peak["held"] = max(peak["held"], router.held)
            peak["inboxes"] = max(peak["inboxes"], router.inbox_count)

        with tempfile.NamedTemporaryFile("w", suffix=".channels", delete=False) as targets:
            targets.write("\n".join(channels))
        try:
            sender = await asyncio.create_subprocess_exec(
                sys.executable,
                str(HERE),
                "--role",
                "sender",
                "--host",
                args.host,
                "--targets",
                targets.name,
                "--seconds",
                str(args.seconds),
                stdout=asyncio.subprocess.PIPE,
            )
            waiting = asyncio.ensure_future(sender.communicate())
            while not waiting.done():
                sample()
                await asyncio.wait([waiting], timeout=args.interval)
            sender_out, _ = waiting.result()
        finally:
            os.unlink(targets.name)
        held_after_sending, inboxes_after_sending = router.held, router.inbox_count
        settle_until = time.monotonic() + args.settle
        while time.monotonic() < settle_until:
            sample()
            await asyncio.sleep(args.interval)
        sample()
        try:
            sent = json.loads(sender_out.decode().strip().splitlines()[-1])
        except (IndexError, ValueError):
            sent = {"error": f"the sender printed no result (exit code {sender.returncode})"}
        return {
            "config": config,
            "channels": args.channels,
            "seconds": args.seconds,
            "settle": args.settle,
            "local_capacity": layer.config.local_capacity,
            "prefetch_count": layer.config.prefetch_count,
            "expiry": layer.config.expiry,
            "sender": sent,
            "delivered": delivered,
            "baseline_rss_kib": baseline,
            "peak_rss_kib": peak["rss"],
            "max_rss_kib": max_rss_kib(),
            "end_rss_kib": rss_kib(),
            "max_held": peak["held"],
            "held_after_sending": held_after_sending,
            "end_held": router.held,
            "max_inboxes": peak["inboxes"],
            "inboxes_after_sending": inboxes_after_sending,
            "end_inboxes": router.inbox_count,
        }
    finally:
        await asyncio.wait_for(layer.close(), CLOSE_TIMEOUT)


def run_receiver(args: argparse.Namespace) -> int:
    config = json.loads(args.config[0])
    try:
        result = asyncio.run(receive_nothing(args, config))
    except Exception as error:
        result = {"config": config, "error": f"{type(error).__name__}: {error}"}
    print(json.dumps(result), flush=True)
    return 0 if "error" not in result else 1


# The orchestrator --------------------------------------------------------------------------------


def measure(args: argparse.Namespace, config: str) -> dict[str, Any]:
    """Run one configuration in a fresh receiver process (RSS never shrinks back in Python)."""
    command = [
        sys.executable,
        str(HERE),
        "--role",
        "receiver",
        "--host",
        args.host,
        "--config",
        config,
        "--channels",
        str(args.channels),
        "--seconds",
        str(args.seconds),
        "--settle",
        str(args.settle),
        "--interval",
        str(args.interval),
    ]
    timeout = args.seconds + args.settle + 120
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"config": json.loads(config), "error": f"timeout after {timeout:g} s"}
    lines = done.stdout.strip().splitlines()
    if not lines:
        return {"config": json.loads(config), "error": done.stderr.strip()[-300:] or "no output"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| config | sent | refused | delivered | baseline RSS MiB | peak RSS MiB | end RSS MiB "
        "| held max / after sending / end | inboxes max / after sending / end |"
    )
    rows = [head, "|" + " --- |" * 9]
    for result in results:
        config = json.dumps(result["config"])
        if "error" in result:
            rows.append(f"| `{config}` | error: {result['error']} |" + " |" * 7)
            continue
        sender = result["sender"]
        rows.append(
            f"| `{config}` (expiry {result['expiry']:g}s, local_capacity {result['local_capacity']}) "
            f"| {sender.get('sent', '?')} | {sender.get('refused', '?')} | {result['delivered']} "
            f"| {mib(result['baseline_rss_kib'])} | {mib(result['peak_rss_kib'])} "
            f"| {mib(result['end_rss_kib'])} "
            f"| {result['max_held']} / {result['held_after_sending']} / {result['end_held']} "
            f"| {result['max_inboxes']} / {result['inboxes_after_sending']} / {result['end_inboxes']} |"
        )
    return "\n".join(rows)


def run_all(args: argparse.Namespace) -> int:
    results = [measure(args, config) for config in args.config or DEFAULT_CONFIGS]
    print(
        f"{args.channels} channels that never read; a sender for {args.seconds:g}s, "
        f"then {args.settle:g}s to settle (RSS sampled every {args.interval:g}s)\n"
    )
    print(table(results))
    print()
    summary = {"bench": "memory", "python": sys.version.split()[0], "results": results}
    print(json.dumps(summary), flush=True)
    return 0 if all("error" not in result for result in results) else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default=os.environ.get("AMQP_URL", DEFAULT_AMQP_URL), help="AMQP URL")
    parser.add_argument(
        "--config",
        action="append",
        help="receiver layer keyword arguments as JSON; repeat for several (default: {} and expiry 5)",
    )
    parser.add_argument("--channels", type=int, default=10_000, help="channels that never read")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the sender sends")
    parser.add_argument("--settle", type=float, default=7.0, help="seconds measured after the sender stops")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between samples")
    parser.add_argument(
        "--role", choices=["all", "receiver", "sender"], default="all", help=argparse.SUPPRESS
    )
    parser.add_argument("--targets", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "sender":
        return run_sender(args)
    if args.role == "receiver":
        return run_receiver(args)
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
