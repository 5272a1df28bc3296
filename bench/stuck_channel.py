"""Does one channel nobody reads slow the other channels of its process? Latency under steady load.

A *receiver* layer (one process's link) has three channels:

- ``stuck``: nobody reads it; it is given a capacity of --stuck-capacity (20,000) through
  ``channel_capacity`` and filled with --backlog (10,000) messages before the measurement,
  then kept full by --stuck-rate more messages a second;
- ``dead``: a member of the busy group ``room`` that never reads (a consumer whose handler
  raised): it fills to ``capacity`` (100) and then drops the group's messages;
- ``live``: read all the time; it is a member of ``room`` too.

A *sender* layer sends to ``live`` at --rate messages a second (1,000), each stamped
with its send time, and to ``room`` at --group-rate (200), for --seconds. The live channel's
delivery latency (send call to receive) is reported as p50 / p99 / max, with the drops
counted by reason. Prints a Markdown table and one JSON line. Example::

    .venv/bin/python bench/stuck_channel.py --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

from channels_rabbitmq.core import RabbitmqChannelLayer

# Run by its path: the project's root (for testbed.measure) goes last on the path.
sys.path.append(str(Path(__file__).resolve().parent.parent))
from testbed.measure import percentile


async def measure(args: argparse.Namespace) -> dict[str, object]:
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    receiver = RabbitmqChannelLayer(
        host=url, channel_capacity={"*!stuck.*": args.stuck_capacity}, remote_capacity=1000
    )
    sender = RabbitmqChannelLayer(host=url, remote_capacity=1000)
    try:
        first = await receiver.new_channel()
        queue = first.partition("!")[0]
        stuck, dead, live = f"{queue}!stuck.one", await receiver.new_channel(), await receiver.new_channel()
        await receiver.group_add("room", dead)
        await receiver.group_add("room", live)
        await sender.send(live, {"type": "warm", "at": time.monotonic()})
        await receiver.receive(live)
        for start in range(0, args.backlog, 500):
            await asyncio.gather(
                *(sender.send(stuck, {"type": "fill", "i": i}) for i in range(start, start + 500))
            )
        link = next(iter(receiver._links.all()))
        await asyncio.sleep(1)
        backlog_held = link.router.held_by(stuck)

        latencies: list[float] = []
        group_latencies: list[float] = []
        stop_at = time.monotonic() + args.seconds

        async def read_live() -> None:
            while True:
                message = await receiver.receive(live)
                (group_latencies if message["type"] == "group" else latencies).append(
                    time.monotonic() - message["at"]
                )

        async def paced(rate: float, send: object) -> int:
            sent = 0
            interval = 1 / rate
            next_at = time.monotonic()
            while next_at < stop_at:
                await send(sent)  # type: ignore[operator]
                sent += 1
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            return sent

        reader = asyncio.ensure_future(read_live())
        sent = await asyncio.gather(
            paced(args.rate, lambda i: sender.send(live, {"type": "direct", "i": i, "at": time.monotonic()})),
            paced(
                args.group_rate,
                lambda i: sender.group_send("room", {"type": "group", "i": i, "at": time.monotonic()}),
            ),
            paced(args.stuck_rate, lambda i: sender.send(stuck, {"type": "more", "i": i})),
        )
        await asyncio.sleep(1)
        reader.cancel()
        ordered = sorted(latencies)

        def milliseconds(values: list[float], fraction: float) -> float:
            return percentile(values, fraction) * 1000 if values else float("nan")

        return {
            "seconds": args.seconds,
            "rate": args.rate,
            "group_rate": args.group_rate,
            "stuck_held_at_start": backlog_held,
            "stuck_held_at_end": link.router.held_by(stuck),
            "dead_held_at_end": link.router.held_by(dead),
            "live_sent": sent[0],
            "live_received": len(latencies),
            "group_received": len(group_latencies),
            "p50_ms": round(milliseconds(ordered, 0.50), 2),
            "p99_ms": round(milliseconds(ordered, 0.99), 2),
            "max_ms": round(ordered[-1] * 1000, 2) if ordered else None,
            "group_p99_ms": round(milliseconds(sorted(group_latencies), 0.99), 2),
            "mean_ms": round(statistics.fmean(ordered) * 1000, 2) if ordered else None,
            "dropped": dict(link.dropped),
        }
    finally:
        await receiver.close()
        await sender.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rate", type=float, default=1000, help="sends a second to the live channel")
    parser.add_argument("--group-rate", type=float, default=200, help="group sends a second to the room")
    parser.add_argument("--stuck-rate", type=float, default=100, help="sends a second to the stuck channel")
    parser.add_argument("--backlog", type=int, default=10_000, help="unread messages in the stuck channel")
    parser.add_argument("--stuck-capacity", type=int, default=20_000)
    args = parser.parse_args()
    result = asyncio.run(measure(args))
    print("| what | value |\n|---|---|")
    for key, value in result.items():
        print(f"| {key} | {value} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
