"""``make soak``: several server processes, steady traffic, random faults, an end-to-end ledger.

A private 3-node RabbitMQ cluster (testbed.brokers.nodes), each node behind a fault proxy
(testbed.faults.proxy); ``--servers`` processes (:mod:`soak.server`) with ``--channels`` channels in
``--groups`` groups (in the busy one, a slow and a dead channel); a driver sending ``--rate`` direct
and group sends a second; one fault at a time, seeded by ``--seed`` (proxy cut or stall, rabbitmqctl
close_all_connections, kill -9 and restart of a node, memory alarm), each followed by probes until
messages flow to every process again. Then the ledger (:mod:`soak.ledger`): Markdown tables, printed
and written with the logs to ``--out``; exit status 1 when a must-be-zero row is not zero. Only the
layer's public API is used. See docs/operations/soak.md.

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
from argparse import RawDescriptionHelpFormatter
from asyncio.subprocess import PIPE
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from channels.exceptions import ChannelFull

from channels_rabbitmq.core import RabbitmqChannelLayer
from channels_rabbitmq.exceptions import BrokerConnectionError
from soak.ledger import DIRECT, GROUP, FaultWindow, Ledger, ProcessMemory, faults_table, summary_table
from testbed.brokers.nodes import NodeError, Nodes
from testbed.faults.proxy import FaultProxy
from testbed.measure import resident_kib

PROJECT = Path(__file__).resolve().parent.parent
SERVER = (sys.executable, "-m", "soak.server")
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
# Every layer's CONFIG (servers and driver) but host and connection_wait; --config adds to it.
LAYER_CONFIG: dict[str, Any] = {"heartbeat": 10, "reconnect_delay_min": 0.1, "reconnect_delay_max": 2}


def say(text: str) -> None:
    print(f"soak: {text}", file=sys.stderr, flush=True)


def make_plan(servers: int, channels: int, groups: int) -> list[list[dict[str, Any]]]:
    """Each server's channels, dealt round-robin into groups; the busy group's first slow, its last dead."""
    names = [BUSY_GROUP, *(f"soak-{number}" for number in range(1, groups))]
    plan: list[list[dict[str, Any]]] = [[] for _ in range(servers)]
    for number in range(servers * channels):
        plan[number // channels].append({"groups": [names[number % groups]], "mode": "normal"})
    busy = [channel for server_plan in plan for channel in server_plan if BUSY_GROUP in channel["groups"]]
    busy[0]["mode"], busy[-1]["mode"] = "slow", "dead"
    return plan


@dataclass
class Server:
    """One soak.server subprocess and what it told us."""

    number: int
    process: asyncio.subprocess.Process
    channels: list[dict[str, Any]]  # its plan's channels, each with its "name" once it is ready
    names: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None
    down_since: float | None = None  # its consuming connection is down since then

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


class Soak:
    """Traffic, faults and bookkeeping of one run."""

    ledger: Ledger  # once the servers have named their channels

    def __init__(self, options: argparse.Namespace, nodes: Nodes) -> None:
        self.options, self.nodes = options, nodes
        self.servers: list[Server] = []
        self.proxies: list[FaultProxy] = []
        self.probes_sent: dict[int, float] = {}  # probe id -> when
        self.probes_seen: dict[int, dict[int, float]] = {}  # probe id -> server number -> when
        self.last_receipt = time.monotonic()

    async def start_server(self, number: int, hosts: list[str], channels: list[dict[str, Any]]) -> Server:
        """Start a soak.server, give it its plan, and wait for its channels' names."""
        config = json.dumps({**self.options.layer_config, "host": hosts})
        env = {**os.environ, "SOAK_LAYER_CONFIG": config, "PYTHONPATH": str(PROJECT)}
        # A session of its own: Ctrl-C reaches the orchestrator only, which stops the servers.
        with (self.options.out / f"server-{number}.log").open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *SERVER, stdin=PIPE, stdout=PIPE, stderr=log, env=env, start_new_session=True, limit=1 << 20
            )
        server = Server(number, process, channels)
        self.servers.append(server)  # to be stopped, whatever happens next
        plan = {"channels": channels, "probe_group": PROBE_GROUP, "slow_delay": self.options.slow_delay}
        assert process.stdin is not None
        assert process.stdout is not None
        process.stdin.write(json.dumps(plan).encode() + b"\n")
        line = (await process.stdout.readline()).decode()
        if not line.startswith("ready "):
            raise RuntimeError(f"server {number} did not start (exit {process.returncode}); see its log")
        server.names = json.loads(line.split()[1])
        for channel, name in zip(channels, server.names, strict=True):
            channel["name"] = name
        return server

    async def read(self, server: Server) -> None:
        """A server's report, line by line (see soak.server)."""
        assert server.process.stdout is not None
        async for line in server.process.stdout:
            kind, *fields = line.decode().split()
            if kind == "r":
                self.ledger.received(int(fields[0]), fields[1], float(fields[2]))
                if fields[1] not in self.ledger.slow_channels:  # the slow one reads its backlog for long
                    self.last_receipt = time.monotonic()
            elif kind == "p":
                self.probes_seen.setdefault(int(fields[0]), {})[server.number] = float(fields[2])
            elif kind == "x":
                self.ledger.receive_failed(fields[0], fields[1])
            elif kind == "down":
                server.down_since = float(fields[0])
            elif kind == "up" and server.down_since is not None:
                self.ledger.outage(server.names, server.down_since, float(fields[0]))
                server.down_since = None
        if server.down_since is not None:  # still down at the end: its queue is gone for good
            self.ledger.outage(server.names, server.down_since, None)

    async def flowing_since(self, layer: RabbitmqChannelLayer, since: float, timeout: float) -> float | None:
        """When a probe sent after ``since`` had reached every server; None if none did in time."""
        deadline = time.monotonic() + timeout
        sending: list[asyncio.Future[Any]] = []
        last_sent = float("-inf")
        try:
            while time.monotonic() < deadline:
                for probe_id, sent_at in self.probes_sent.items():
                    seen = self.probes_seen.get(probe_id, {})
                    if sent_at >= since and len(seen) == len(self.servers):
                        return max(seen.values())
                if time.monotonic() - last_sent >= PROBE_EVERY:  # a failed probe is just not seen
                    last_sent = self.probes_sent[len(self.probes_sent) + 1] = time.monotonic()
                    message = {"type": "soak.probe", "id": len(self.probes_sent)}
                    probe = asyncio.wait_for(layer.group_send(PROBE_GROUP, message), self.options.send_bound)
                    sending.append(asyncio.gather(probe, return_exceptions=True))
                await asyncio.sleep(0.05)
            return None
        finally:
            for task in sending:
                task.cancel()

    async def drive(self, layer: RabbitmqChannelLayer, stop_at: float) -> None:
        """Send ``--rate`` messages a second until ``stop_at``; record each outcome in the ledger."""
        ledger, options, pick = self.ledger, self.options, random.Random(self.options.seed + 1)
        channels = [name for server in self.servers for name in server.names]
        others = [group for group in sorted(ledger.memberships) if group != BUSY_GROUP]
        in_flight: set[asyncio.Task[None]] = set()
        refused_before = layer.stats().refused

        def answered_at() -> float:
            """Now, the publishes refused meanwhile in the ledger first (they come before the answer)."""
            now = time.monotonic()
            ledger.refused(now, layer.stats().refused - refused_before - len(ledger.refusals))
            return now

        async def send_one(message_id: int, call: Awaitable[None]) -> None:
            try:
                await asyncio.wait_for(call, options.send_bound)
            except TimeoutError:
                text = "message %d: the send neither returned nor raised within %gs"
                logging.getLogger("soak").error(text, message_id, options.send_bound)
            except Exception as error:
                documented, error_type = isinstance(error, DOCUMENTED_SEND_ERRORS), type(error).__name__
                ledger.raised(message_id, error_type, str(error), documented=documented, at=answered_at())
            else:
                ledger.returned(message_id, at=answered_at())

        message_id, next_at = 0, time.monotonic()
        while time.monotonic() < stop_at:
            message_id += 1
            if pick.random() < options.group_share:
                kind, target = GROUP, BUSY_GROUP if pick.random() < 0.5 or not others else pick.choice(others)
            else:
                kind, target = DIRECT, pick.choice(channels)
            if len(in_flight) >= options.max_in_flight:
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            sent_at = time.monotonic()
            ledger.sent(message_id, kind, target, sent_at)
            message = {"type": "soak.message", "id": message_id, "sent_at": sent_at}
            call = layer.send(target, message) if kind == DIRECT else layer.group_send(target, message)
            in_flight.add(task := asyncio.ensure_future(send_one(message_id, call)))
            task.add_done_callback(in_flight.discard)
            next_at = max(next_at + 1 / options.rate, time.monotonic() - 1)  # no burst after a stall
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await asyncio.gather(*in_flight)

    async def chaos(self, layer: RabbitmqChannelLayer, run_start: float, stop_at: float) -> None:
        """Faults, one at a time with quiet periods between, until shortly before ``stop_at``, in rounds
        that have every kind once in a random order; after each, probes until messages flow again."""
        options, pick = self.options, random.Random(self.options.seed)
        if not options.faults:
            return
        await asyncio.sleep(options.warmup)
        deck: list[str] = []
        while True:
            quiet = pick.uniform(options.quiet_min, options.quiet_max)
            await asyncio.sleep(max(0.0, min(quiet, stop_at - time.monotonic())))
            room = stop_at - time.monotonic() - END_ROOM
            deck = deck or pick.sample(options.faults, len(options.faults))
            kind = next((kind for kind in deck if FAULT_LENGTH[kind] <= room), None)
            if kind is None:
                return
            deck.remove(kind)
            index = pick.randrange(len(self.nodes.nodes))
            stall_seconds = pick.uniform(*STALL_SECONDS)
            target = f"node {index + 1}" + (" (its proxy)" if kind in ("cut", "stall") else "")
            started = time.monotonic()
            say(f"{started - run_start:6.1f}s  {kind} on {target}")
            node, proxy = self.nodes[index], self.proxies[index]
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
            else:  # memory_alarm
                await asyncio.to_thread(node.ctl, "set_vm_memory_high_watermark", "0.000001")
                try:
                    await asyncio.sleep(ALARM_SECONDS)
                finally:
                    await asyncio.to_thread(node.ctl, "set_vm_memory_high_watermark", "0.4")
            ended = time.monotonic()
            recovered = await self.flowing_since(layer, ended, options.recovery_timeout)
            self.ledger.fault(FaultWindow(kind, target, started, ended, recovered, options.recovery_timeout))
            if recovered is None:
                say(f"{'':9}not flowing to every server {options.recovery_timeout:g}s after the fault")
            else:
                say(f"{'':9}over after {ended - started:.1f}s, flowing again {recovered - ended:.1f}s later")

    async def run(self) -> int:
        """Proxies, servers, the driver's layer, traffic and faults, the final wait; then the report."""
        task, options = asyncio.current_task(), self.options
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # then exit status 143
        plan = make_plan(options.servers, options.channels, options.groups)
        async with contextlib.AsyncExitStack() as stack:
            for node in self.nodes:
                self.proxies.append(await stack.enter_async_context(FaultProxy("127.0.0.1", node.port)))
            urls = [proxy.url(node.url()) for proxy, node in zip(self.proxies, self.nodes, strict=True)]
            hosts = [urls[start % len(urls) :] + urls[: start % len(urls)] for start in range(len(plan) + 1)]
            stack.push_async_callback(lambda: asyncio.gather(*(server.stop() for server in self.servers)))
            starting = [self.start_server(number, hosts[number], plan[number]) for number in range(len(plan))]
            self.servers = list(await asyncio.wait_for(asyncio.gather(*starting), 120))  # in number order
            named = [channel for server in self.servers for channel in server.channels]
            groups = {group for channel in named for group in channel["groups"]}
            memberships = {group: {c["name"] for c in named if group in c["groups"]} for group in groups}
            slow, dead = ([c["name"] for c in named if c["mode"] == mode] for mode in ("slow", "dead"))
            self.ledger = Ledger(memberships, slow_channels=slow, dead_channels=dead, margin=options.margin)
            for server in self.servers:
                server.reader = asyncio.ensure_future(self.read(server))
            layer = RabbitmqChannelLayer(host=hosts[len(plan)], **options.layer_config)
            stack.push_async_callback(layer.close)
            if await self.flowing_since(layer, time.monotonic(), 60) is None:
                raise RuntimeError("probes did not reach every server before the start")
            memory_start = [resident_kib(server.process.pid) for server in self.servers]
            run_start = time.monotonic()
            stop_at = run_start + options.seconds
            faults = ", ".join(options.faults)
            say(f"sending for {options.seconds:g}s (seed {options.seed}); faults: {faults}")
            chaos = asyncio.ensure_future(self.chaos(layer, run_start, stop_at))
            drive = asyncio.ensure_future(self.drive(layer, stop_at))
            try:
                await asyncio.wait({chaos, drive}, return_when=asyncio.FIRST_EXCEPTION)
                if chaos.done():
                    chaos.result()  # a fault that could not be injected or undone ends the run
                await drive
                say("sends finished; waiting for the fault in progress, if any, and the last deliveries")
                await chaos  # it starts no new fault now, and returns once the last one is over
                deadline = time.monotonic() + DRAIN_MAX  # until no delivery for DRAIN_QUIET seconds
                for _ in range(int(DRAIN_MAX / 0.2) + 1):
                    if time.monotonic() > deadline or time.monotonic() - self.last_receipt > DRAIN_QUIET:
                        break
                    await asyncio.sleep(0.2)
            finally:
                for job in (chaos, drive):
                    job.cancel()
                await asyncio.gather(chaos, drive, return_exceptions=True)
            seconds = time.monotonic() - run_start
            memory = [
                ProcessMemory(f"server {server.number}", start, resident_kib(server.process.pid))
                for server, start in zip(self.servers, memory_start, strict=True)
            ]
            died = [
                f"server {server.number} exited during the run (status {server.process.returncode})"
                for server in self.servers
                if server.process.returncode is not None
            ]
        return self.report(memory, died, seconds, run_start)

    def report(self, memory: list[ProcessMemory], died: list[str], seconds: float, run_start: float) -> int:
        """Print the tables and write them to report.md; 1 when a must-be-zero row is not zero."""
        options, ledger = self.options, self.ledger
        summary = ledger.summarize()
        lost_by_process: dict[str, int] = {}  # lost outside any fault, to channels of each server
        for server in self.servers:
            special = " and ".join(c["mode"] for c in server.channels if c["mode"] != "normal")
            label = f"server {server.number}" + (f" (the {special} channel's process)" if special else "")
            lost_by_process[label] = sum(summary.lost_outside_by_channel[name] for name in server.names)
        heading = (
            f"Soak: {options.seconds:g} s of sends (seed {options.seed}), {options.servers} server "
            f"processes, {options.servers * options.channels} channels in {options.groups} groups, "
            f"{options.rate:g} sends/s ({options.group_share:.0%} group sends), 3-node cluster behind "
            f"fault proxies; {len(ledger.faults)} faults; run {seconds:.0f} s including the final wait."
        )
        if json.loads(options.config):
            heading += f" Extra CONFIG: `{options.config}`."
        table = summary_table(
            summary,
            memory=memory,
            error_examples=ledger.error_examples,
            receive_errors=ledger.receive_errors,
            lost_outside_by_process=lost_by_process,
        )
        text = "\n\n".join([heading, table, faults_table(ledger.faults, run_start)])
        print(text)
        (options.out / "report.md").write_text(text + "\n")
        failures = summary.failures + died
        say(f"FAILED: {'; '.join(failures)}" if failures else "every must-be-zero row is zero")
        return 1 if failures else 0


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    add, kinds = parser.add_argument, ", ".join(FAULT_KINDS)
    add("--seconds", type=float, default=300, help="how long to send (default 300)")
    add("--seed", type=int, default=random.randrange(1_000_000), help="the faults' and traffic's random seed")
    add("--servers", type=int, default=3, help="server processes (default 3)")
    add("--channels", type=int, default=50, help="channels per server (default 50)")
    add("--groups", type=int, default=6, help="groups; the first one is the busy one (default 6)")
    add("--rate", type=float, default=50, help="sends per second (default 50)")
    add("--group-share", type=float, default=0.2, help="share of group sends (default 0.2)")
    add("--slow-delay", type=float, default=0.5, help="the slow channel's pause per message")
    add("--faults", default=",".join(FAULT_KINDS), help=f"comma-separated, among {kinds}; or none")
    add("--warmup", type=float, default=10, help="seconds before the first fault")
    add("--quiet-min", type=float, default=5, help="least quiet time between faults")
    add("--quiet-max", type=float, default=15, help="most quiet time between faults")
    add("--margin", type=float, default=2, help="seconds added before and after fault windows")
    add("--recovery-timeout", type=float, default=60, help="longest wait for flow after a fault")
    add("--connection-wait", type=float, default=10, help="the layers' connection_wait")
    add("--config", default="{}", help="more CONFIG keys for every layer, as JSON")
    add("--max-in-flight", type=int, default=2000, help="sends awaiting an answer, at most")
    add("--out", type=Path, default=None, help="folder for logs and report.md")
    options = parser.parse_args(argv)
    options.faults = [] if options.faults == "none" else options.faults.split(",")
    if unknown := set(options.faults) - set(FAULT_KINDS):
        parser.error(f"unknown fault(s): {', '.join(sorted(unknown))}")
    if options.servers < 1 or options.channels < 2 or options.groups < 1 or options.rate <= 0:
        parser.error("need at least 1 server, 2 channels per server, 1 group and a positive rate")
    try:
        config = json.loads(options.config)
    except json.JSONDecodeError as error:
        parser.error(f"--config is not JSON: {error}")
    if not isinstance(config, dict):
        parser.error("--config must be a JSON object of CONFIG keys")
    options.layer_config = {**LAYER_CONFIG, "connection_wait": options.connection_wait, **config}
    # The longest a send may take: connection_wait, then connecting (connect_timeout), then a confirm.
    options.send_bound = options.connection_wait + config.get("connect_timeout", 10) + 30
    options.out = options.out or PROJECT / "artifacts" / "soak" / time.strftime("%Y%m%d-%H%M%S")
    return options


@contextlib.contextmanager
def start_cluster(attempts: int = 2) -> Iterator[Nodes]:
    """A 3-node cluster, stopped and deleted on exit; a second try when the first fails (a node's port
    can be taken between ``stop_app`` and ``start_app`` while the cluster forms: eaddrinuse)."""
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
            say(f"cluster up in {(nodes.started_seconds or 0) + (nodes.clustered_seconds or 0):.1f}s")
            yield nodes
            return


def main(argv: list[str] | None = None) -> int:
    options = parse_arguments(argv)
    options.out.mkdir(parents=True, exist_ok=True)
    log, log_format = options.out / "orchestrator.log", "%(asctime)s %(name)s %(levelname)s %(message)s"
    logging.basicConfig(filename=log, level=logging.WARNING, format=log_format)
    say(f"logs and report in {options.out}")
    try:
        with start_cluster() as nodes:
            return asyncio.run(Soak(options, nodes).run())
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
