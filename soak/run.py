"""``make soak``: a private 3-node RabbitMQ cluster behind fault proxies; ``--servers`` processes
(soak.server) with ``--channels`` channels each in ``--groups`` groups (the busy one has a slow and a dead
channel); ``--rate`` direct and group sends a second; one seeded fault at a time (proxy cut or stall,
close_all_connections, kill -9 and restart of a node, memory alarm), then probes until messages flow to
every process again. Then the ledger's tables (soak.ledger), printed and written with the logs to ``--out``;
exit status 1 when a must-be-zero row is not. Uses only the layer's public API. See docs/operations/soak.md.

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
from pathlib import Path
from typing import Any, NamedTuple

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
# The fault kinds, with rough upper bounds of their lengths so that none starts too close to the end.
FAULT_LENGTH = {"cut": 1, "stall": 6, "close_all_connections": 5, "kill_node": 30, "memory_alarm": 15}
FAULT_KINDS = tuple(FAULT_LENGTH)
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


class Server(NamedTuple):  # a soak.server subprocess, and its channels' names once it is ready
    number: int
    process: asyncio.subprocess.Process
    names: list[str]

    async def stop(self, timeout: float = 30) -> None:
        """Close stdin (the server closes its layer and exits); kill it if it takes too long."""
        if self.process.returncode is None and self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except asyncio.TimeoutError:  # not TimeoutError before Python 3.11
            say(f"server {self.number} did not stop within {timeout:g}s: killing it")
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


class Soak:
    """Traffic, faults and bookkeeping of one run (its ``ledger`` once the servers named their channels)."""

    def __init__(self, options: argparse.Namespace, nodes: Nodes) -> None:
        self.options, self.nodes = options, nodes
        # Each channel's group (dealt round-robin) and mode, server after server: the busy group's first
        # channel is slow, its last dead.
        count, groups = options.servers * options.channels, options.groups
        self.plan = [(f"soak-{n % groups}" if n % groups else BUSY_GROUP, "normal") for n in range(count)]
        self.plan[0], self.plan[(count - 1) // groups * groups] = (BUSY_GROUP, "slow"), (BUSY_GROUP, "dead")
        self.channels: dict[str, tuple[str, str]] = {}  # name -> (group, mode), once its server is ready
        self.servers: list[Server] = []
        self.proxies: list[FaultProxy] = []
        self.probes: list[dict[int, float]] = []  # by probe id: who saw it when, by server number
        self.last_receipt = time.monotonic()

    async def start_server(self, number: int, hosts: list[str]) -> Server:
        """Start a soak.server with its part of the plan, and wait for its channels' names."""
        channels = self.plan[number * self.options.channels : (number + 1) * self.options.channels]
        plan = {"channels": channels, "probe_group": PROBE_GROUP, "slow_delay": self.options.slow_delay}
        setup = json.dumps({"config": {**self.options.layer_config, "host": hosts}, **plan})
        env = {**os.environ, "SOAK_SERVER": setup, "PYTHONPATH": str(PROJECT)}
        # A session of its own: Ctrl-C reaches the orchestrator only, which stops the servers.
        with (self.options.out / f"server-{number}.log").open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *SERVER, stdin=PIPE, stdout=PIPE, stderr=log, env=env, start_new_session=True, limit=1 << 20
            )
        server = Server(number, process, [])
        self.servers.append(server)  # to be stopped, whatever happens next
        assert process.stdout is not None
        line = (await process.stdout.readline()).decode()
        if not line.startswith("ready "):
            raise RuntimeError(f"server {number} did not start (exit {process.returncode}); see its log")
        server.names.extend(json.loads(line.split()[1]))
        self.channels.update(zip(server.names, channels, strict=True))
        return server

    async def read(self, server: Server) -> None:
        """A server's report, line by line (see soak.server)."""
        assert server.process.stdout is not None
        down_since: float | None = None  # its consuming connection is down since then
        async for line in server.process.stdout:
            kind, *fields = line.decode().split()
            if kind == "r":
                self.ledger.received(int(fields[0]), fields[1], float(fields[2]))
                if fields[1] not in self.ledger.slow_channels:  # the slow one reads its backlog for long
                    self.last_receipt = time.monotonic()
            elif kind == "p":
                self.probes[int(fields[0])][server.number] = float(fields[2])
            elif kind == "x":
                self.ledger.receive_failed(fields[0], fields[1])
            elif kind == "down":
                down_since = float(fields[0])
            elif kind == "up" and down_since is not None:
                self.ledger.outage(server.names, down_since, float(fields[0]))
                down_since = None
        if down_since is not None:  # still down at the end: its queue is gone for good
            self.ledger.outage(server.names, down_since, None)

    async def flowing_again(self, layer: RabbitmqChannelLayer, timeout: float) -> float | None:
        """When a probe sent from now on first reached every server; None if none did within ``timeout``."""
        first, deadline = len(self.probes), time.monotonic() + timeout
        sending: list[asyncio.Future[Any]] = []
        try:
            while time.monotonic() < deadline:  # a probe every PROBE_EVERY s; one that fails is just not seen
                self.probes.append({})
                probe = layer.group_send(PROBE_GROUP, {"type": "soak.probe", "id": len(self.probes) - 1})
                probe = asyncio.wait_for(probe, self.options.send_bound)
                sending.append(asyncio.gather(probe, return_exceptions=True))
                await asyncio.sleep(PROBE_EVERY)
                if reached := [max(p.values()) for p in self.probes[first:] if len(p) == len(self.servers)]:
                    return min(reached)
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
            except asyncio.TimeoutError:  # not TimeoutError before Python 3.11
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
            ledger.sent(message_id, kind, target, sent_at := time.monotonic())
            message = {"type": "soak.message", "id": message_id, "sent_at": sent_at}
            call = layer.send(target, message) if kind == DIRECT else layer.group_send(target, message)
            in_flight.add(task := asyncio.ensure_future(send_one(message_id, call)))
            task.add_done_callback(in_flight.discard)
            next_at = max(next_at + 1 / options.rate, time.monotonic() - 1)  # no burst after a stall
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await asyncio.gather(*in_flight)
        say("sends finished; waiting for the fault in progress, if any, and the last deliveries")

    async def chaos(self, layer: RabbitmqChannelLayer, run_start: float, stop_at: float) -> None:
        """Faults, one at a time with quiet periods between, until shortly before ``stop_at``, in rounds
        that have every kind once in a random order; after each, probes until messages flow again."""
        options, pick, deck = self.options, random.Random(self.options.seed), list[str]()
        if not options.faults:
            return
        await asyncio.sleep(options.warmup)
        while True:
            quiet = pick.uniform(options.quiet_min, options.quiet_max)
            await asyncio.sleep(max(0.0, min(quiet, stop_at - time.monotonic())))
            room = stop_at - time.monotonic() - END_ROOM
            deck = deck or pick.sample(options.faults, len(options.faults))
            kind = next((kind for kind in deck if FAULT_LENGTH[kind] <= room), None)
            if kind is None:
                return
            deck.remove(kind)
            index, stall_seconds = pick.randrange(len(self.nodes.nodes)), pick.uniform(*STALL_SECONDS)
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
                if (pid := node.pid) is None:
                    raise NodeError(f"{node.name} has no pid to kill")
                os.kill(pid, signal.SIGKILL)
                await asyncio.to_thread(node.terminate)  # returns once its Erlang VM is gone
                await asyncio.to_thread(node.start)
            else:  # memory_alarm
                await asyncio.to_thread(node.ctl, "set_vm_memory_high_watermark", "0.000001")
                try:
                    await asyncio.sleep(ALARM_SECONDS)
                finally:
                    await asyncio.to_thread(node.ctl, "set_vm_memory_high_watermark", "0.4")
            ended, waited = time.monotonic(), options.recovery_timeout
            recovered = await self.flowing_again(layer, waited)
            self.ledger.fault(FaultWindow(kind, target, started, ended, recovered, waited))
            again = "not flowing" if recovered is None else f"flowing again {recovered - ended:.1f}s later"
            say(f"{'':9}over after {ended - started:.1f}s, {again}")

    async def run(self) -> int:
        """Proxies, servers, the driver's layer, traffic and faults, the final wait; then the report."""
        task, options = asyncio.current_task(), self.options
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # then exit status 143
        async with contextlib.AsyncExitStack() as stack:
            for node in self.nodes:
                self.proxies.append(await stack.enter_async_context(FaultProxy("127.0.0.1", node.port)))
            urls = [proxy.url(node.url()) for proxy, node in zip(self.proxies, self.nodes, strict=True)]
            hosts = [urls[n % len(urls) :] + urls[: n % len(urls)] for n in range(options.servers + 1)]
            stack.push_async_callback(lambda: asyncio.gather(*(server.stop() for server in self.servers)))
            starting = [self.start_server(number, hosts[number]) for number in range(options.servers)]
            self.servers = list(await asyncio.wait_for(asyncio.gather(*starting), 120))  # in number order
            groups = {g: [n for n, (group, _) in self.channels.items() if group == g] for g, _ in self.plan}
            slow, dead = ([n for n, c in self.channels.items() if c[1] == mode] for mode in ("slow", "dead"))
            self.ledger = Ledger(groups, slow_channels=slow, dead_channels=dead, margin=options.margin)
            readers = [asyncio.ensure_future(self.read(server)) for server in self.servers]
            layer = RabbitmqChannelLayer(host=hosts[-1], **options.layer_config)
            stack.push_async_callback(layer.close)
            if await self.flowing_again(layer, 60) is None:
                raise RuntimeError("probes did not reach every server before the start")
            memory_start = [resident_kib(server.process.pid) for server in self.servers]
            run_start = time.monotonic()
            stop_at = run_start + options.seconds
            say(f"sending for {options.seconds:g}s, seed {options.seed}, faults: {', '.join(options.faults)}")
            chaos = asyncio.ensure_future(self.chaos(layer, run_start, stop_at))
            drive = asyncio.ensure_future(self.drive(layer, stop_at))
            for job in (chaos, drive):  # a fault that could not be injected or undone ends the run
                stack.callback(job.cancel)
            await asyncio.gather(chaos, drive)  # chaos starts no fault after the sends
            for _ in range(int(DRAIN_MAX / 0.2)):  # the last deliveries: until none for DRAIN_QUIET s
                if time.monotonic() - self.last_receipt > DRAIN_QUIET:
                    break
                await asyncio.sleep(0.2)
            seconds = time.monotonic() - run_start
            memory: list[ProcessMemory] = []
            died: list[str] = []  # the servers that exited during the run
            for server, kib in zip(self.servers, memory_start, strict=True):
                memory.append(ProcessMemory(f"server {server.number}", kib, resident_kib(server.process.pid)))
                if (status := server.process.returncode) is not None:
                    died.append(f"server {server.number} exited during the run (status {status})")
        await asyncio.gather(*readers)  # the servers have exited: their last lines are in
        # The report: the tables, printed and written to report.md; 1 when a must-be-zero row is not zero.
        ledger, summary = self.ledger, self.ledger.summarize()
        lost: dict[str, int] = {}  # lost outside any fault, to channels of each server
        for server in self.servers:
            special = " and ".join(m for n in server.names if (m := self.channels[n][1]) != "normal")
            label = f"server {server.number}" + (f" (the {special} channel's process)" if special else "")
            lost[label] = sum(summary.lost_outside_by_channel[name] for name in server.names)
        heading = (
            f"Soak: {options.seconds:g} s of sends (seed {options.seed}), {options.servers} server "
            f"processes, {options.servers * options.channels} channels in {options.groups} groups, "
            f"{options.rate:g} sends/s ({options.group_share:.0%} group sends), 3-node cluster behind "
            f"fault proxies; {len(ledger.faults)} faults; run {seconds:.0f} s including the final wait."
        )
        if json.loads(options.config):
            heading += f" Extra CONFIG: `{options.config}`."
        examples, errors = ledger.error_examples, ledger.receive_errors
        table = summary_table(
            summary, memory=memory, error_examples=examples, receive_errors=errors, lost_by_process=lost
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
    """A 3-node cluster, deleted on exit; tried again if it does not form (eaddrinuse during clustering)."""
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
    except (KeyboardInterrupt, asyncio.CancelledError) as stop:  # Ctrl-C; SIGTERM (see Soak.run)
        interrupted = isinstance(stop, KeyboardInterrupt)
        say(f"{'interrupted' if interrupted else 'terminated'}; everything was stopped")
        return 130 if interrupted else 143
    except NodeError as error:
        say(f"a broker node failed: {error}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
