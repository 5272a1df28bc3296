"""One soak server process (started by :mod:`soak.run`): a layer, its channels and groups, and a report
of every receipt. Its CONFIG comes as JSON in ``SOAK_LAYER_CONFIG`` (the broker URLs stay off the
command line), its plan as one JSON line on stdin::

    {"channels": [{"groups": ["soak-1"], "mode": "normal"}, ...],
     "probe_group": "soak-probe", "slow_delay": 0.5}

A channel's ``mode`` is ``normal``, ``slow`` (sleeps ``slow_delay`` after each message) or ``dead``
(never reads). It reports on stdout, times from ``time.monotonic()``::

    ready <JSON list of the channel names, in the plan's order>
    r <message id> <channel> <time>, p <probe id> <probe channel> <time>   (a message, a probe)
    x <channel> <exception type name>   (a receive() raised)
    down <time>, up <time>    (the consuming connection was lost: its queue with it; set up again)

and stops, closing its layer, when stdin ends. Only the layer's public API is used.
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


async def flush_forever() -> None:
    """The report lines are printed to stdout, a pipe, so block-buffered: flushed every FLUSH_EVERY s."""
    while True:
        await asyncio.sleep(FLUSH_EVERY)
        sys.stdout.flush()


async def receive(layer: RabbitmqChannelLayer, channel: str, delay: float, kind: str = "r") -> None:
    """Report each message of a channel (``kind`` p: the probe channel), ``delay`` after each one."""
    while True:
        try:
            message = await layer.receive(channel)
        except StopConsumer:
            return
        except Exception as error:  # reported, then go on: the orchestrator counts these
            print(f"x {channel} {type(error).__name__}")
            await asyncio.sleep(0.5)
            continue
        print(f"{kind} {message['id']} {channel} {time.monotonic():.6f}")
        if delay:
            await asyncio.sleep(delay)


async def watch_consuming(layer: RabbitmqChannelLayer) -> None:
    """Report when the consuming connection goes down (the queue goes, with what waited in it) and back."""
    down = False
    while True:
        await asyncio.sleep(WATCH_EVERY)
        links = layer.stats().links
        if down == (bool(links) and all(link.consume_state == "up" for link in links)):
            down = not down
            print(f"{'down' if down else 'up'} {time.monotonic():.6f}")


async def serve(config: dict[str, Any]) -> None:
    plan = json.loads(sys.stdin.readline())
    layer = RabbitmqChannelLayer(**config)
    tasks: list[asyncio.Task[None]] = []
    try:
        names = [await layer.new_channel() for _ in plan["channels"]]
        probe = await layer.new_channel()
        await layer.group_add(plan["probe_group"], probe)
        for name, channel in zip(names, plan["channels"], strict=True):
            for group in channel["groups"]:
                await layer.group_add(group, name)
        for name, channel in zip(names, plan["channels"], strict=True):
            delay = plan["slow_delay"] if channel["mode"] == "slow" else 0.0
            if channel["mode"] != "dead":
                tasks.append(asyncio.ensure_future(receive(layer, name, delay)))
        tasks.append(asyncio.ensure_future(receive(layer, probe, 0.0, "p")))
        tasks.append(asyncio.ensure_future(flush_forever()))
        tasks.append(asyncio.ensure_future(watch_consuming(layer)))
        print(f"ready {json.dumps(names, separators=(',', ':'))}", flush=True)
        await asyncio.to_thread(sys.stdin.read)  # until stdin ends
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        sys.stdout.flush()
        await layer.close()


if __name__ == "__main__":
    log_format = f"%(asctime)s server pid {os.getpid()} %(name)s %(levelname)s %(message)s"
    logging.basicConfig(level=logging.WARNING, format=log_format)
    asyncio.run(serve(json.loads(os.environ["SOAK_LAYER_CONFIG"])))
