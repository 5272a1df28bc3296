"""One soak server process: a layer, its channels and groups, and a report of every receipt.

Started by :mod:`soak.run`. The layer's CONFIG comes as JSON in the ``SOAK_LAYER_CONFIG``
environment variable (it holds the broker URLs, so the password stays off the command
line), the plan as one JSON line on stdin::

    {"channels": [{"groups": ["soak-a"], "mode": "normal"}, ...],
     "probe_group": "soak-probe", "slow_delay": 0.5}

``mode`` is ``normal`` (reads as fast as it can), ``slow`` (sleeps ``slow_delay`` after
each message) or ``dead`` (never reads). The process then writes lines to stdout:

    ready <JSON list of the channel names, in the plan's order> <probe channel>
    r <message id> <channel index> <monotonic receive time>
    p <probe id> <monotonic receive time>
    x <channel index> <exception type name>   (a receive() that raised)
    down <monotonic time>                     (the consuming connection is lost: the queue is gone)
    up <monotonic time>                       (... and set up again)

It stops, closing its layer, when stdin ends (the orchestrator closed it, or died).
Only the layer's public API is used.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from typing import Any

from channels.exceptions import StopConsumer

from channels_rabbitmq.core import RabbitmqChannelLayer

FLUSH_EVERY = 0.1  # seconds between writes of the buffered report lines
WATCH_EVERY = 0.01  # seconds between looks at the consuming connection's state (a reconnection takes 0.1 s+)

logger = logging.getLogger("soak.server")


class Report:
    """Report lines, buffered and written to stdout every FLUSH_EVERY seconds."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)

    def flush(self) -> None:
        if self.lines:
            text, self.lines = "".join(f"{line}\n" for line in self.lines), []
            sys.stdout.write(text)
            sys.stdout.flush()

    async def flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            self.flush()


async def read_line(reader: asyncio.StreamReader) -> bytes:
    return await reader.readline()


async def receive_forever(
    layer: RabbitmqChannelLayer, channel: str, index: int, report: Report, delay: float
) -> None:
    """Receive on one channel and report each message; ``delay`` after each one for the slow channel."""
    while True:
        try:
            message = await layer.receive(channel)
        except StopConsumer:
            return
        except Exception as error:  # reported, then go on: the orchestrator counts these
            report.add(f"x {index} {type(error).__name__}")
            await asyncio.sleep(0.5)
            continue
        report.add(f"r {message['id']} {index} {time.monotonic():.6f}")
        if delay:
            await asyncio.sleep(delay)


async def receive_probes(layer: RabbitmqChannelLayer, channel: str, report: Report) -> None:
    while True:
        try:
            message = await layer.receive(channel)
        except StopConsumer:
            return
        except Exception as error:
            report.add(f"x -1 {type(error).__name__}")
            await asyncio.sleep(0.5)
            continue
        report.add(f"p {message['id']} {time.monotonic():.6f}")


async def watch_consuming(layer: RabbitmqChannelLayer, report: Report) -> None:
    """Report when the consuming connection goes down and comes back: the ledger's evidence that
    messages waiting in this process's queue went with it."""
    down = False
    while True:
        await asyncio.sleep(WATCH_EVERY)
        links = layer.stats().links
        is_up = bool(links) and all(link.consume_state == "up" for link in links)
        if is_up == down:
            down = not is_up
            report.add(f"{'down' if down else 'up'} {time.monotonic():.6f}")


async def serve(config: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    plan = json.loads(await read_line(stdin))
    layer = RabbitmqChannelLayer(**config)
    report = Report()
    tasks: list[asyncio.Task[None]] = []
    try:
        names = [await layer.new_channel() for _ in plan["channels"]]
        probe = await layer.new_channel()
        await layer.group_add(plan["probe_group"], probe)
        for name, channel in zip(names, plan["channels"], strict=True):
            for group in channel["groups"]:
                await layer.group_add(group, name)
        for index, (name, channel) in enumerate(zip(names, plan["channels"], strict=True)):
            if channel["mode"] == "dead":
                continue
            delay = plan["slow_delay"] if channel["mode"] == "slow" else 0.0
            tasks.append(asyncio.ensure_future(receive_forever(layer, name, index, report, delay)))
        tasks.append(asyncio.ensure_future(receive_probes(layer, probe, report)))
        tasks.append(asyncio.ensure_future(report.flush_forever()))
        tasks.append(asyncio.ensure_future(watch_consuming(layer, report)))
        report.add(f"ready {json.dumps(names, separators=(',', ':'))} {probe}")
        report.flush()
        while await read_line(stdin):  # until stdin ends
            pass
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        report.flush()
        await layer.close()


def main() -> None:
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s server pid {os.getpid()} %(name)s %(levelname)s %(message)s",
    )
    asyncio.run(serve(json.loads(os.environ["SOAK_LAYER_CONFIG"])))


if __name__ == "__main__":
    main()
