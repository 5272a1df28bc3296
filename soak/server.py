"""One soak server process, started by :mod:`soak.run`: a layer (only its public API is used), its
channels and groups, and a report of every receipt. CONFIG and plan come as JSON in ``SOAK_SERVER`` (the
broker URLs stay off the command line): ``{"config": {...}, "channels": [[group, mode], ...],
"probe_group": ..., "slow_delay": 0.5}``, a mode being ``normal``, ``slow`` (sleeps ``slow_delay`` after
each message) or ``dead`` (never reads). It stops, closing its layer, when stdin ends, and reports on
stdout, times from ``time.monotonic()``::

    ready <JSON list of the channel names, in the plan's order>
    r <message id> <channel> <time> (p: a probe), x <channel> <exception type> (a receive() raised)
    down <time>, up <time>    (the consuming connection was lost: its queue with it; set up again)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from typing import Any

from channels_rabbitmq.core import RabbitmqChannelLayer

WATCH_EVERY = 0.01  # seconds between looks at the consuming connection's state (a reconnection takes 0.1 s+)


async def receive(layer: RabbitmqChannelLayer, channel: str, delay: float, kind: str = "r") -> None:
    """Report each message of a channel (``kind`` p: the probe channel), ``delay`` after each one."""
    while True:
        try:
            message = await layer.receive(channel)
        except Exception as error:  # reported, then go on: the orchestrator counts these
            print(f"x {channel} {type(error).__name__}")
            await asyncio.sleep(0.5)
            continue
        print(f"{kind} {message['id']} {channel} {time.monotonic():.6f}")
        await asyncio.sleep(delay)


async def serve(plan: dict[str, Any]) -> None:
    """Make the channels, read them and say ready; then, until stdin ends, report when the consuming
    connection goes down (its queue goes, with what waited in it) and back up, and write the report out
    (stdout is a pipe, so block-buffered) with each look."""
    layer = RabbitmqChannelLayer(**plan["config"])
    tasks: list[asyncio.Future[Any]] = []
    try:
        names = [await layer.new_channel() for _ in plan["channels"]]
        probe = await layer.new_channel()
        await layer.group_add(plan["probe_group"], probe)
        tasks.append(asyncio.ensure_future(receive(layer, probe, 0.0, "p")))
        for name, (group, mode) in zip(names, plan["channels"], strict=True):
            await layer.group_add(group, name)
            if mode != "dead":
                delay = plan["slow_delay"] if mode == "slow" else 0.0
                tasks.append(asyncio.ensure_future(receive(layer, name, delay)))
        print(f"ready {json.dumps(names, separators=(',', ':'))}", flush=True)
        tasks.append(stdin := asyncio.ensure_future(asyncio.to_thread(sys.stdin.read)))
        down = False
        while not stdin.done():
            await asyncio.sleep(WATCH_EVERY)
            links = layer.stats().links
            if down == (bool(links) and all(link.consume_state == "up" for link in links)):
                down = not down
                print(f"{'down' if down else 'up'} {time.monotonic():.6f}")
            sys.stdout.flush()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        sys.stdout.flush()
        await layer.close()


if __name__ == "__main__":
    log_format = f"%(asctime)s server pid {os.getpid()} %(name)s %(levelname)s %(message)s"
    logging.basicConfig(level=logging.WARNING, format=log_format)
    asyncio.run(serve(json.loads(os.environ["SOAK_SERVER"])))
