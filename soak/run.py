"""``make soak``: several server processes, steady traffic, random faults, an end-to-end ledger.

What runs:

- a private 3-node RabbitMQ cluster (``testbed/brokers/nodes.py``), each node behind a
  ``testbed/faults/proxy.py`` FaultProxy; every layer's ``host`` is the list of the three
  proxy URLs, rotated so that the processes start on different nodes;
- ``--servers`` server processes (:mod:`soak.server`), each with ``--channels`` channels
  spread over ``--groups`` groups (each group has members in every process), one probe
  channel, and, among them, one slow channel and one dead channel, both in the busy group;
- a driver (here, with a layer of its own) sending ``--rate`` messages a second, direct
  sends to any channel and group sends (half of them to the busy group), each with an id;
- a chaos loop (seeded by ``--seed``): one fault at a time, quiet periods between them:
  proxy cut, proxy stall, ``rabbitmqctl close_all_connections``, kill -9 of a node's VM
  and restart, memory alarm. After each fault it sends probes (a group send to every
  server's probe channel) until one arrives everywhere: that is "flowing again".

Then it waits for the last deliveries, adds everything up (:mod:`soak.ledger`), prints
Markdown tables and exits 1 when a must-be-zero row is not zero. Logs and the tables go
to ``--out`` (``artifacts/soak/<time>``). Only the layer's public API is used.

    .venv/bin/python -m soak.run --seconds 60 --seed 7
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from channels.exceptions import ChannelFull

from channels_rabbitmq.core import RabbitmqChannelLayer
from channels_rabbitmq.exceptions import BrokerConnectionError
from soak.ledger import DIRECT, GROUP, FaultWindow, Ledger
from soak.report import ProcessMemory, faults_table, summary_table
from testbed.brokers.nodes import Node, NodeError, Nodes
from testbed.faults.proxy import FaultProxy
from testbed.measure import resident_kib

PROJECT = Path(__file__).resolve().parent.parent
PROBE_GROUP = "soak-probe"
BUSY_GROUP = "soak-busy"
FAULT_KINDS = ("cut", "stall", "close_all_connections", "kill_node", "memory_alarm")
# Rough upper bounds of each fault's length, so that none starts too close to the end.
FAULT_LENGTH = {"cut": 1, "stall": 6, "close_all_connections": 5, "kill_node": 30, "memory_alarm": 15}
END_ROOM = 15  # seconds left after the last fault's end, to see the layer recover before sends stop
ALARM_SECONDS = 10
STALL_SECONDS = (3.0, 6.0)
PROBE_EVERY = 0.25  # seconds between probes while waiting for the layer to recover
DRAIN_QUIET = 3.0  # the end: stop waiting once no message arrived for this long...
DRAIN_MAX = 30.0  # ...or after this long
DOCUMENTED_SEND_ERRORS = (ChannelFull, BrokerConnectionError)

logger = logging.getLogger("soak")


def say(text: str) -> None:
    print(f"soak: {text}", file=sys.stderr, flush=True)


def layer_config(hosts: list[str], options: argparse.Namespace) -> dict[str, Any]:
    """The CONFIG of every layer in the run (servers and driver): the one place to change it.

    Per-channel capacity (a ``capacity`` key, when the layer has it) goes here too; the slow
    channel's drops beyond it are counted apart in the ledger, not as lost.
    """
    config: dict[str, Any] = {
        "host": hosts,
        "heartbeat": 10,
        "connection_wait": options.connection_wait,
        "reconnect_delay_min": 0.1,
        "reconnect_delay_max": 2,
    }
    config.update(json.loads(options.config))
    return config


# The plan: which channel is in which group -----------------------------------------------------


@dataclass(frozen=True)
class ChannelPlan:
    server: int
    index: int
    groups: tuple[str, ...]
    mode: str  # normal, slow or dead


def make_plan(servers: int, channels: int, groups: int) -> list[list[ChannelPlan]]:
    """Channels of each server, dealt round-robin into groups so that every group spans processes.

    Group 0 is the busy group; the slow channel is server 0's first member of it, the dead
    channel the first member of it in the last server (another channel of server 0 when alone).
    """
    names = [BUSY_GROUP, *(f"soak-{number}" for number in range(1, groups))]
    plan = [
        [
            ChannelPlan(server, index, (names[(server * channels + index) % groups],), "normal")
            for index in range(channels)
        ]
        for server in range(servers)
    ]
    busy = [channel for server_plan in plan for channel in server_plan if BUSY_GROUP in channel.groups]
    slow = busy[0]
    dead = next(channel for channel in reversed(busy) if channel != slow)
    for special, mode in ((slow, "slow"), (dead, "dead")):
        plan[special.server][special.index] = ChannelPlan(special.server, special.index, special.groups, mode)
    return plan


# Server processes ----------------------------------------------------------------------------


@dataclass
class Server:
    """One soak.server subprocess and what it told us."""

    number: int
    process: asyncio.subprocess.Process
    names: list[str] = field(default_factory=list)
    probe: str = ""
    reader: asyncio.Task[None] | None = None
    down_since: float | None = None  # its consuming connection is down since then

    @classmethod
    async def start(
        cls, number: int, config: dict[str, Any], plan: list[ChannelPlan], slow_delay: float, log: Path
    ) -> Server:
        env = {**os.environ, "SOAK_LAYER_CONFIG": json.dumps(config), "PYTHONPATH": str(PROJECT)}
        with log.open("ab") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "soak.server",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env=env,
                cwd=PROJECT,
                start_new_session=True,  # Ctrl-C reaches the orchestrator only; it stops the servers
                limit=1 << 20,
            )
        server = cls(number, process)
        assert process.stdin is not None
        process.stdin.write(
            json.dumps(
                {
                    "channels": [{"groups": list(channel.groups), "mode": channel.mode} for channel in plan],
                    "probe_group": PROBE_GROUP,
                    "slow_delay": slow_delay,
                }
            ).encode()
            + b"\n"
        )
        await process.stdin.drain()
        return server

    async def wait_ready(self) -> None:
        assert self.process.stdout is not None
        line = (await self.process.stdout.readline()).decode()
        if not line.startswith("ready "):
            raise RuntimeError(
                f"server {self.number} did not start (exit {self.process.returncode}); see its log"
            )
        _, names, self.probe = line.split()
        self.names = json.loads(names)

    def listen(self, on_line: Callable[[Server, str], None]) -> None:
        async def read() -> None:
            assert self.process.stdout is not None
            async for line in self.process.stdout:
                on_line(self, line.decode())

        self.reader = asyncio.ensure_future(read())

    def resident_kib(self) -> int | None:
        return resident_kib(self.process.pid)

    async def stop(self, timeout: float = 30) -> None:
        """Close stdin (the server closes its layer and exits); kill it if it takes too long."""
        if self.process.returncode is None and self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            say(f"server {self.number} did not stop within {timeout:g}s: killing it")
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        if self.reader is not None:
            await asyncio.gather(self.reader, return_exceptions=True)


# The run -------------------------------------------------------------------------------------


class Soak:
    """Traffic, faults and bookkeeping of one run."""

    def __init__(self, options: argparse.Namespace, nodes: Nodes, out: Path) -> None:
        self.options = options
        self.nodes = nodes
        self.out = out
        self.fault_random = random.Random(options.seed)
        self.traffic_random = random.Random(options.seed + 1)
        self.servers: list[Server] = []
        self.proxies: list[FaultProxy] = []
        self.ledger: Ledger | None = None
        self.probes_sent: dict[int, float] = {}
        self.probes_seen: dict[int, dict[int, float]] = {}
        self.next_probe = 0
        self.last_receipt = time.monotonic()

    # Reports from the servers --------------------------------------------------------------------

    def on_line(self, server: Server, line: str) -> None:
        kind, *fields = line.split()
        if kind == "r" and self.ledger is not None:
            message_id, index, received_at = int(fields[0]), int(fields[1]), float(fields[2])
            channel = server.names[index]
            self.ledger.received(message_id, channel, received_at)
            if channel not in self.ledger.slow_channels:  # the slow one reads its backlog for long
                self.last_receipt = time.monotonic()
        elif kind == "p":
            self.probes_seen.setdefault(int(fields[0]), {})[server.number] = float(fields[1])
        elif kind == "x" and self.ledger is not None:
            channel = server.probe if fields[0] == "-1" else server.names[int(fields[0])]
            self.ledger.receive_failed(channel, fields[1])
        elif kind == "down":
            server.down_since = float(fields[0])
        elif kind == "up" and server.down_since is not None:
            if self.ledger is not None:
                self.ledger.outage(server.names, server.down_since, float(fields[0]))
            server.down_since = None

    # Probes: are messages flowing to every server? -----------------------------------------------

    async def flowing_since(self, layer: RabbitmqChannelLayer, since: float, timeout: float) -> float | None:
        """When a probe sent after ``since`` had reached every server; None if none did in time."""
        deadline = time.monotonic() + timeout
        sending: set[asyncio.Task[None]] = set()
        last_sent = float("-inf")
        try:
            while time.monotonic() < deadline:
                for probe_id, sent_at in self.probes_sent.items():
                    seen = self.probes_seen.get(probe_id, {})
                    if sent_at >= since and len(seen) == len(self.servers):
                        return max(seen.values())
                if time.monotonic() - last_sent >= PROBE_EVERY:
                    last_sent = time.monotonic()
                    task = asyncio.ensure_future(self.send_probe(layer))
                    sending.add(task)
                    task.add_done_callback(sending.discard)
                await asyncio.sleep(0.05)
            return None
        finally:
            for task in sending:
                task.cancel()

    async def send_probe(self, layer: RabbitmqChannelLayer) -> None:
        self.next_probe += 1
        probe_id = self.next_probe
        self.probes_sent[probe_id] = time.monotonic()
        with contextlib.suppress(Exception):  # a failed probe is just not seen; the next one is sent
            await asyncio.wait_for(
                layer.group_send(PROBE_GROUP, {"type": "soak.probe", "id": probe_id}), self.options.send_bound
            )

    # Traffic ----------------------------------------------------------------------------------

    async def drive(self, layer: RabbitmqChannelLayer, stop_at: float) -> None:
        """Send ``--rate`` messages a second until ``stop_at``; record each outcome in the ledger."""
        assert self.ledger is not None
        ledger = self.ledger
        options = self.options
        channels = [name for server in self.servers for name in server.names]
        groups = sorted(ledger.memberships)
        others = [group for group in groups if group != BUSY_GROUP]
        in_flight = asyncio.Semaphore(options.max_in_flight)
        tasks: set[asyncio.Task[None]] = set()
        refused = layer.stats().refused

        def answered_at() -> float:
            """Now, with any publishes refused since the last answer reported to the ledger first:
            a refusal that took a group send's message is seen before that send returns."""
            nonlocal refused
            now, total = time.monotonic(), layer.stats().refused
            if total > refused:
                ledger.refused(now, total - refused)
                refused = total
            return now

        async def send_one(message_id: int, call: Awaitable[None]) -> None:
            try:
                await asyncio.wait_for(call, options.send_bound)
            except TimeoutError:
                logger.error(
                    "message %d: the send neither returned nor raised within %gs",
                    message_id,
                    options.send_bound,
                )
            except Exception as error:
                documented = isinstance(error, DOCUMENTED_SEND_ERRORS)
                ledger.raised(
                    message_id, type(error).__name__, str(error), documented=documented, at=answered_at()
                )
            else:
                ledger.returned(message_id, at=answered_at())
            finally:
                in_flight.release()

        message_id = 0
        next_at = time.monotonic()
        while time.monotonic() < stop_at:
            message_id += 1
            if self.traffic_random.random() < options.group_share:
                use_busy = self.traffic_random.random() < 0.5 or not others
                kind, target = GROUP, BUSY_GROUP if use_busy else self.traffic_random.choice(others)
            else:
                kind, target = DIRECT, self.traffic_random.choice(channels)
            await in_flight.acquire()
            sent_at = time.monotonic()
            ledger.sent(message_id, kind, target, sent_at)
            message = {"type": "soak.message", "id": message_id, "sent_at": sent_at}
            call = layer.send(target, message) if kind == DIRECT else layer.group_send(target, message)
            task = asyncio.ensure_future(send_one(message_id, call))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at = max(next_at + 1 / options.rate, time.monotonic() - 1)  # no burst after a stall
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if tasks:
            await asyncio.gather(*tasks)

    # Faults -----------------------------------------------------------------------------------

    async def chaos(self, layer: RabbitmqChannelLayer, run_start: float, stop_at: float) -> None:
        """One fault at a time, quiet periods between them, until shortly before ``stop_at``.

        The kinds come in rounds: each round has every kind once, in a random order.
        """
        assert self.ledger is not None
        options = self.options
        kinds = options.faults
        if not kinds:
            return
        await asyncio.sleep(options.warmup)
        deck: list[str] = []
        while True:
            quiet = self.fault_random.uniform(options.quiet_min, options.quiet_max)
            await asyncio.sleep(max(0.0, min(quiet, stop_at - time.monotonic())))
            room = stop_at - time.monotonic() - END_ROOM
            if not deck:  # every kind once per round, in a random order
                deck = self.fault_random.sample(kinds, len(kinds))
            kind = next((kind for kind in deck if FAULT_LENGTH[kind] <= room), None)
            if kind is None:
                return
            deck.remove(kind)
            node_index = self.fault_random.randrange(len(self.nodes.nodes))
            stall_seconds = self.fault_random.uniform(*STALL_SECONDS)
            node = self.nodes[node_index]
            target = f"node {node_index + 1}" + (" (its proxy)" if kind in ("cut", "stall") else "")
            started = time.monotonic()
            say(f"{started - run_start:6.1f}s  {kind} on {target}")
            await self.inject(kind, node, self.proxies[node_index], stall_seconds)
            ended = time.monotonic()
            recovered = await self.flowing_since(layer, ended, options.recovery_timeout)
            window = FaultWindow(kind, target, started, ended, recovered, options.recovery_timeout)
            self.ledger.fault(window)
            if recovered is None:
                say(f"{'':9}not flowing to every server {options.recovery_timeout:g}s after the fault")
            else:
                say(f"{'':9}over after {ended - started:.1f}s, flowing again {recovered - ended:.1f}s later")

    async def inject(self, kind: str, node: Node, proxy: FaultProxy, stall_seconds: float) -> None:
        if kind == "cut":
            proxy.cut()
        elif kind == "stall":
            proxy.stall()
            try:
                await asyncio.sleep(stall_seconds)
            finally:
                proxy.resume()
        elif kind == "close_all_connections":
            await asyncio.to_thread(node.ctl, "close_all_connections", "soak chaos")
        elif kind == "kill_node":
            pid = node.pid
            if pid is None:
                raise NodeError(f"{node.name} has no pid to kill")
            os.kill(pid, signal.SIGKILL)
            for _ in range(200):  # its Erlang VM exits at once; 10 s at most
                if not node.is_running:
                    break
                await asyncio.sleep(0.05)
            await asyncio.to_thread(node.start)
        elif kind == "memory_alarm":
            await asyncio.to_thread(node.ctl, "set_vm_memory_high_watermark", "0.000001")
            try:
                await asyncio.sleep(ALARM_SECONDS)
            finally:
                await asyncio.to_thread(node.ctl, "set_vm_memory_high_watermark", "0.4")
        else:
            raise ValueError(f"unknown fault {kind!r}")

    # Everything together -----------------------------------------------------------------------

    async def run(self) -> int:
        options = self.options
        plan = make_plan(options.servers, options.channels, options.groups)
        async with contextlib.AsyncExitStack() as stack:
            for node in self.nodes:
                self.proxies.append(await stack.enter_async_context(FaultProxy("127.0.0.1", node.port)))
            urls = [proxy.url(node.url()) for proxy, node in zip(self.proxies, self.nodes, strict=True)]

            def rotated(start: int) -> list[str]:
                return urls[start % len(urls) :] + urls[: start % len(urls)]

            stack.push_async_callback(self.stop_servers)
            for number, server_plan in enumerate(plan):
                config = layer_config(rotated(number), options)
                log = self.out / f"server-{number}.log"
                self.servers.append(await Server.start(number, config, server_plan, options.slow_delay, log))
            await asyncio.wait_for(asyncio.gather(*(server.wait_ready() for server in self.servers)), 120)
            for server in self.servers:
                server.listen(self.on_line)
            memberships: dict[str, set[str]] = {}
            slow: list[str] = []
            dead: list[str] = []
            for server, server_plan in zip(self.servers, plan, strict=True):
                for channel, name in zip(server_plan, server.names, strict=True):
                    for group in channel.groups:
                        memberships.setdefault(group, set()).add(name)
                    if channel.mode == "slow":
                        slow.append(name)
                    elif channel.mode == "dead":
                        dead.append(name)
            self.ledger = Ledger(memberships, slow_channels=slow, dead_channels=dead, margin=options.margin)

            layer = RabbitmqChannelLayer(**layer_config(rotated(len(plan)), options))
            stack.push_async_callback(layer.close)
            if await self.flowing_since(layer, time.monotonic(), 60) is None:
                raise RuntimeError("probes did not reach every server before the start")
            memory_start = {server.number: server.resident_kib() for server in self.servers}

            run_start = time.monotonic()
            stop_at = run_start + options.seconds
            say(
                f"sending for {options.seconds:g}s (seed {options.seed}); faults: {', '.join(options.faults)}"
            )
            chaos = asyncio.ensure_future(self.chaos(layer, run_start, stop_at))
            drive = asyncio.ensure_future(self.drive(layer, stop_at))
            try:
                await asyncio.wait({chaos, drive}, return_when=asyncio.FIRST_EXCEPTION)
                if chaos.done():
                    chaos.result()  # a fault that could not be injected or undone ends the run
                await drive
                say("sends finished; waiting for the fault in progress, if any, and the last deliveries")
                await chaos  # it starts no new fault now, and returns once the last one is over
                await self.drain()
            finally:
                for task in (chaos, drive):
                    task.cancel()
                await asyncio.gather(chaos, drive, return_exceptions=True)
            run_end = time.monotonic()
            memory_end = {server.number: server.resident_kib() for server in self.servers}
            died = [
                f"server {server.number} exited during the run (status {server.process.returncode})"
                for server in self.servers
                if server.process.returncode is not None
            ]

        for server in self.servers:  # still down at the end: its queue is gone for good
            if server.down_since is not None:
                self.ledger.outage(server.names, server.down_since, None)
        summary = self.ledger.summarize()
        memory = [
            ProcessMemory(f"server {server.number}", memory_start[server.number], memory_end[server.number])
            for server in self.servers
        ]
        text = self.render(summary, memory, run_start, run_end, plan)
        print(text)
        (self.out / "report.md").write_text(text + "\n")
        failures = summary.failures + died
        if failures:
            say("FAILED: " + "; ".join(failures))
            for process, count in self.by_process(summary.lost_outside_by_channel).items():
                if count:
                    say(f"  lost outside any fault: {count} to channels of {process}")
            return 1
        say("every must-be-zero row is zero")
        return 0

    async def drain(self) -> None:
        """Wait until no delivery arrived for DRAIN_QUIET seconds (DRAIN_MAX at most)."""
        deadline = time.monotonic() + DRAIN_MAX
        for _ in range(int(DRAIN_MAX / 0.2) + 1):
            if time.monotonic() > deadline or time.monotonic() - self.last_receipt > DRAIN_QUIET:
                return
            await asyncio.sleep(0.2)

    async def stop_servers(self) -> None:
        await asyncio.gather(*(server.stop() for server in self.servers))

    def by_process(self, counts: Counter[str]) -> dict[str, int]:
        """Counts per channel added up per server process, named with its slow or dead channel."""
        assert self.ledger is not None
        totals: Counter[str] = Counter()
        for server in self.servers:
            label = f"server {server.number}"
            special = [
                kind
                for kind, names in (("slow", self.ledger.slow_channels), ("dead", self.ledger.dead_channels))
                if names.intersection(server.names)
            ]
            if special:
                label += f" (the {' and '.join(special)} channel's process)"
            totals[label] += sum(counts[name] for name in server.names)
        return dict(totals)

    def render(
        self, summary: Any, memory: list[ProcessMemory], run_start: float, run_end: float, plan: Any
    ) -> str:
        assert self.ledger is not None
        options = self.options
        channels = sum(len(server_plan) for server_plan in plan)
        heading = (
            f"Soak: {options.seconds:g} s of sends (seed {options.seed}), "
            f"{options.servers} server processes, "
            f"{channels} channels in {options.groups} groups, {options.rate:g} sends/s "
            f"({options.group_share:.0%} group sends), 3-node cluster behind fault proxies; "
            f"{len(self.ledger.faults)} faults; run {run_end - run_start:.0f} s including the final wait."
        )
        if json.loads(options.config):
            heading += f" Extra CONFIG: `{options.config}`."

        return "\n\n".join(
            [
                heading,
                summary_table(
                    summary,
                    memory=memory,
                    error_examples=self.ledger.error_examples,
                    receive_errors=dict(self.ledger.receive_errors),
                    lost_outside_by_process=self.by_process(summary.lost_outside_by_channel),
                ),
                faults_table(self.ledger.faults, run_start),
            ]
        )


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=300, help="how long to send (default 300)")
    parser.add_argument("--seed", type=int, default=None, help="the faults' and traffic's random seed")
    parser.add_argument("--servers", type=int, default=3, help="server processes (default 3)")
    parser.add_argument("--channels", type=int, default=50, help="channels per server (default 50)")
    parser.add_argument(
        "--groups", type=int, default=6, help="groups; the first one is the busy one (default 6)"
    )
    parser.add_argument("--rate", type=float, default=50, help="sends per second (default 50)")
    parser.add_argument("--group-share", type=float, default=0.2, help="share of group sends (default 0.2)")
    parser.add_argument("--slow-delay", type=float, default=0.5, help="the slow channel's pause per message")
    parser.add_argument(
        "--faults",
        default=",".join(FAULT_KINDS),
        help=f"comma-separated, among {', '.join(FAULT_KINDS)}; or none",
    )
    parser.add_argument("--warmup", type=float, default=10, help="seconds before the first fault")
    parser.add_argument("--quiet-min", type=float, default=5, help="least quiet time between faults")
    parser.add_argument("--quiet-max", type=float, default=15, help="most quiet time between faults")
    parser.add_argument(
        "--margin", type=float, default=2, help="seconds added before and after fault windows"
    )
    parser.add_argument(
        "--recovery-timeout", type=float, default=60, help="longest wait for flow after a fault"
    )
    parser.add_argument("--connection-wait", type=float, default=10, help="the layers' connection_wait")
    parser.add_argument("--config", default="{}", help="more CONFIG keys for every layer, as JSON")
    parser.add_argument("--max-in-flight", type=int, default=2000, help="sends awaiting an answer, at most")
    parser.add_argument("--out", type=Path, default=None, help="folder for logs and report.md")
    options = parser.parse_args(argv)
    if options.seed is None:
        options.seed = random.randrange(1_000_000)
    options.faults = [] if options.faults == "none" else options.faults.split(",")
    unknown = set(options.faults) - set(FAULT_KINDS)
    if unknown:
        parser.error(f"unknown fault(s): {', '.join(sorted(unknown))}")
    if options.servers < 1 or options.channels < 2 or options.groups < 1 or options.rate <= 0:
        parser.error("need at least 1 server, 2 channels per server, 1 group and a positive rate")
    try:
        config = json.loads(options.config)
    except json.JSONDecodeError as error:
        parser.error(f"--config is not JSON: {error}")
    if not isinstance(config, dict):
        parser.error("--config must be a JSON object of CONFIG keys")
    # The longest a send may take: connection_wait, then connecting (connect_timeout), then a confirm.
    options.send_bound = options.connection_wait + config.get("connect_timeout", 10) + 30
    options.out = options.out or PROJECT / "artifacts" / "soak" / time.strftime("%Y%m%d-%H%M%S")
    return options


async def main_async(options: argparse.Namespace, nodes: Nodes, out: Path) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await Soak(options, nodes, out).run()


@contextlib.contextmanager
def start_cluster(attempts: int = 2) -> Iterator[Nodes]:
    """A 3-node cluster, stopped and deleted on exit; a second try when the first fails.

    A node's port can be taken by another program between ``stop_app`` and ``start_app``
    while the cluster forms (eaddrinuse): a fresh set of nodes on other ports then works.
    """
    for attempt in range(1, attempts + 1):
        with Nodes("soak") as nodes:
            for _ in range(3):
                nodes.add()
            say("starting a 3-node RabbitMQ cluster")
            try:
                nodes.start()
                nodes.cluster()
            except NodeError as error:
                if attempt == attempts:
                    raise
                say(f"the cluster did not form ({str(error).splitlines()[0][:200]}); trying again")
                continue
            say(f"cluster up in {nodes.started_seconds + nodes.clustered_seconds:.1f}s")
            yield nodes
            return


def main(argv: list[str] | None = None) -> int:
    options = parse_arguments(argv)
    out: Path = options.out
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=out / "orchestrator.log",
        level=logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    say(f"logs and report in {out}")
    try:
        with start_cluster() as nodes:
            return asyncio.run(main_async(options, nodes, out))
    except KeyboardInterrupt:
        say("interrupted; everything was stopped")
        return 130
    except asyncio.CancelledError:
        say("terminated; everything was stopped")
        return 143
    except NodeError as error:
        say(f"a broker node failed: {error}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
