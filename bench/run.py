"""Measure this layer beside its peers on this machine: a progress bar, then Markdown tables.

Run from the repository's root: python -m bench [options] (make bench; make bench-plots runs
--axes all; both start a private RabbitMQ when none answers at $AMQP_URL).

Layers: this project at --amqp-url; InMemoryChannelLayer; RedisChannelLayer and
RedisPubSubChannelLayer when channels_redis is installed (pip install channels-redis, or this
project's "bench" extra) and a Redis answers at --redis-url; channels_rabbitmq (PyPI) with
--old-python, the python of a virtualenv that holds the released package (it has this project's
import name). A layer that
cannot be measured is skipped, with one line saying why. Each run is a fresh subprocess of
bench/scenarios.py, in the layer's own interpreter.

Scenarios (default sizes in brackets; --quick makes every N 5 to 10 times smaller):

  p2p     N messages [20,000] from one instance to one channel of another, 50 sends in flight
  many    the same, spread round-robin over 100 channels of the receiver
  groups  the same as group_send to one of the 100 groups that the receiving channel is in
  fanout  N group_send() [50] one after another, to 500 members on each of 2 receiver instances
  rtt     ping-pong between two instances, N round trips [2,000]: median and p99 latency
  sync    N async_to_sync(group_send) calls [300] from a plain thread
  storm   N [10,000] new channels at once, each joining a group of its own

Axes (--axes; scaling curves, drawn as PNG files beside --out): each point is a scenario with
one parameter set, a throughput phase in a time box of 0.7 s, then 200 latency probes one at a
time (their p99 is plotted); --quick measures two points with shorter phases.

  size      p2p, payload of 100 B to 1 MiB
  groups    groups: 1 to 10,000 groups the receiving channel is a member of
  channels  many: 10 to 50,000 channels on the receiver
  servers   fanout: 1 to 4 receiver processes with 100 members each, 50 sends in flight

Every layer runs every scenario on each loop of --loops (asyncio's own and uvloop, which uvicorn
uses when it is installed); on the axes, the peers run on the first loop only, and
InMemoryChannelLayer on the size axis only (it cannot reach another process, and goes over all
its groups and channels on every call). Rounds are interleaved; each figure is the median over
the rounds (the points of 10,000 groups or channels and more are measured once). Progress goes to
stderr; the tables to stdout, in Markdown, with the machine and the command that reproduces the
run. A third table per loop gives the CPU per unit of work of the timed phase: the benchmark
process's, then its broker's (the process listening on the broker's port, when it may be seen).
``python -m bench e2e`` runs the end-to-end chat instead (bench/e2e.py).

Examples:

  python -m bench --quick --scenarios p2p rtt
  python -m bench --rounds 3 > bench.md
  python -m bench --axes all --rounds 3               # docs/img/bench/scaling.json and PNGs
  python3 -m venv /tmp/peers && /tmp/peers/bin/pip install channels-rabbitmq==4.0.1
  python -m bench --rounds 3 --old-python /tmp/peers/bin/python
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from bench import layers
from bench.layers import OURS, LayerSpec
from bench.scenarios import LOOPS, SCENARIOS

REPOSITORY = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPOSITORY / "docs" / "img" / "bench" / "scaling.json"
QUICK_N = {"p2p": 2000, "many": 2000, "groups": 2000, "fanout": 10, "rtt": 200, "sync": 30, "storm": 1000}
DEFAULT_TIMEOUT = 120.0
KILL_GRACE = 60.0  # a run gets --timeout inside; its subprocess is killed this much later
WAIT_TICK = 0.5
INTERRUPTED_EXIT_STATUS = 130
BAR_WIDTH = 24
#: At most this many messages in one time-boxed throughput phase, and deliveries on the servers axis.
MAX_MESSAGES, MAX_DELIVERIES = 500_000, 60_000


@dataclass(frozen=True)
class Column:
    """A column of the tables: which scenario, which JSON key, and which way is better."""

    title: str
    scenario: str
    key: str
    higher_is_better: bool


COLUMNS = (
    Column("p2p msgs/s", "p2p", "msgs_per_s", True),
    Column("many msgs/s", "many", "msgs_per_s", True),
    Column("groups msgs/s", "groups", "msgs_per_s", True),
    Column("fanout deliveries/s", "fanout", "deliveries_per_s", True),
    Column("rtt p50 µs", "rtt", "p50_us", False),
    Column("rtt p99 µs", "rtt", "p99_us", False),
    Column("sync calls/s", "sync", "calls_per_s", True),
    Column("storm s", "storm", "seconds", False),
    Column("storm join p99 ms", "storm", "p99_ms", False),
)


@dataclass(frozen=True)
class Axis:
    """A scaling axis: a scenario whose one parameter goes through the points."""

    name: str
    title: str
    x_label: str
    scenario: str
    parameter: str
    points: tuple[int, ...]
    quick_points: tuple[int, ...]
    throughput_key: str
    throughput_label: str
    log_x: bool
    single_round_from: int | None  # points from this one on: one round (their setup takes long)
    what: str


AXES = (
    Axis("size", "Message size", "payload per message", "p2p", "size", (100, 1024, 10240, 102400, 1048576),
         (100, 10240), "msgs_per_s", "messages/s", True, None,
         "one sender instance to one channel of a receiver instance, 50 sends in flight"),
    Axis("groups", "Groups per process", "groups the receiving channel is a member of", "groups", "groups",
         (1, 10, 100, 1000, 10000), (1, 100), "msgs_per_s", "group messages/s", True, 10000,
         "group_send of 100 B to one of the groups, 50 in flight"),
    Axis("channels", "Channels per process", "channels on the receiver, a receive() waiting on each", "many",
         "channels", (10, 100, 1000, 10000, 50000), (10, 100), "msgs_per_s", "messages/s", True, 10000,
         "100 B messages to the channels in turn, 50 sends in flight"),
    Axis("servers", "Server processes (fan-out)", "receiver processes, 100 group members each", "fanout",
         "receivers", (1, 2, 3, 4), (1, 2), "deliveries_per_s", "deliveries/s", False, None,
         "group_send of 100 B from a sender process, 50 in flight"),
)  # fmt: skip
AXIS_NAMES = tuple(axis.name for axis in AXES)


#: What to measure, how often, where the brokers are: the options, as :func:`parse` returns them.
Settings = argparse.Namespace


@dataclass(frozen=True)
class Job:
    """One subprocess: a layer on a loop in a scenario (at a point of an axis), in one round."""

    round_no: int
    scenario: str
    layer: LayerSpec
    loop: str
    axis: Axis | None = None
    x: int = 0

    def describe(self, rounds: int) -> str:
        what = self.scenario if self.axis is None else f"{self.axis.name}={self.x:,}"
        return f"round {self.round_no}/{rounds}, {what}, {self.layer.label}, {self.loop}"

    def options(self, settings: Settings) -> list[str]:
        """The scenario's options: its size, or the axis' point and phases."""
        if self.axis is None:
            return ["--n", str(QUICK_N[self.scenario])] if settings.quick else []
        n, extra = MAX_MESSAGES, []
        if self.axis.name == "servers":
            members = 10 if settings.quick else 100
            n = MAX_DELIVERIES // (members * self.x)
            extra = ["--processes", "--members", str(members), "--window", "50"]
        if self.axis.name == "groups" and self.layer.key == "redis":  # its memberships outlive the run
            extra.append("--discard-groups")
        phases = (
            ["--seconds", "0.2", "--probes", "20"]
            if settings.quick
            else ["--seconds", "0.7", "--probes", "200"]
        )
        return [*phases, "--n", str(n), f"--{self.axis.parameter}", str(self.x), *extra]

    def run(self, settings: Settings, while_waiting: Callable[[], None]) -> dict[str, Any]:
        """The subprocess' JSON line, or an "error" if it gave none (killed after the timeout)."""
        command = [self.layer.python, str(layers.SCENARIO_SCRIPT), "--layer", self.layer.cls]
        command += ["--scenario", self.scenario, "--label", self.layer.label, "--loop", self.loop]
        command += ["--timeout", str(settings.timeout), *self.options(settings)]
        if self.layer.shared_instance:
            command.append("--shared-instance")
        if broker := layers.broker_process(self.layer.broker_port):
            command += ["--broker-pid", str(broker.pid)]
        base = dict(layer=self.layer.label, scenario=self.scenario, loop=self.loop, round=self.round_no)
        if self.axis is not None:
            base.update(axis=self.axis.name, x=self.x)
        return {**base, **self._spawn(command, settings, while_waiting)}

    def _spawn(
        self, command: list[str], settings: Settings, while_waiting: Callable[[], None]
    ) -> dict[str, Any]:
        deadline = time.monotonic() + settings.timeout + KILL_GRACE
        env, pipe = layers.config_environment(self.layer.config), subprocess.PIPE
        process = subprocess.Popen(
            command, cwd=REPOSITORY, env=env, stdin=subprocess.DEVNULL, stdout=pipe, stderr=pipe, text=True
        )
        try:
            while True:
                try:
                    stdout, stderr = process.communicate(timeout=WAIT_TICK)
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        process.kill()
                        stdout, stderr = process.communicate()
                        stderr = f"subprocess killed after {settings.timeout + KILL_GRACE:g} s"
                        break
                    while_waiting()
        finally:
            if process.poll() is None:  # interrupted (Ctrl-C): leave no benchmark running
                process.kill()
                process.communicate()
        line = layers.last_json_line(stdout)
        if line is None:
            reason = layers.last_line(stderr) or f"exit status {process.returncode}, no output"
            return {"error": f"no result: {reason}"}
        return line


def series_of(spec: LayerSpec, axis: Axis | None, settings: Settings) -> tuple[str, ...]:
    """The loops a layer runs on: every one asked for, but for the peers on an axis (the first)."""
    loops: tuple[str, ...] = settings.loops
    if axis is None or spec.key == OURS:
        return loops
    return () if axis.name != "size" and spec.key == "inmemory" else loops[:1]


def plan(specs: list[LayerSpec], settings: Settings) -> list[Job]:
    """Every run, rounds interleaved: each round runs everything once, layer after layer."""
    jobs = []
    for round_no in range(1, settings.rounds + 1):
        if not settings.axes:
            jobs += [
                Job(round_no, scenario, spec, loop)
                for scenario in settings.scenarios
                for loop in settings.loops
                for spec in specs
            ]
        for axis in (axis for axis in AXES if axis.name in settings.axes):
            for x in axis.quick_points if settings.quick else axis.points:
                if round_no > 1 and axis.single_round_from is not None and x >= axis.single_round_from:
                    continue
                jobs += [
                    Job(round_no, axis.scenario, spec, loop, axis, x)
                    for spec in specs
                    for loop in series_of(spec, axis, settings)
                ]
    return jobs


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [run[key] for run in runs if "error" not in run and isinstance(run.get(key), (int, float))]
    return statistics.median(values) if values else None


def fmt_number(value: float | None) -> str:
    return "n/a" if value is None else f"{round(value):,}"


def fmt_ratio(ours: float | None, peer: float | None) -> str:
    return "n/a" if ours is None or not peer else f"{ours / peer:.2f}x"


def summary(result: dict[str, Any]) -> str:
    """The figures of one result, in one short line."""
    if "error" in result:
        return f"error: {result['error']}"
    scenario = result.get("scenario")
    keys = dict.fromkeys(
        column.key for column in COLUMNS if column.scenario == scenario and column.key in result
    )
    return " ".join([f"{key}={result[key]}" for key in keys] + [f"({result.get('seconds')} s)"])


# Tables -----------------------------------------------------------------------------------------


class Results:
    """Every result so far, by (layer key, scenario, loop), the axes' by (axis, x, layer key, loop)."""

    def __init__(self) -> None:
        self.runs: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        self.count = 0

    def add(self, job: Job, result: dict[str, Any]) -> None:
        key = (
            (job.layer.key, job.scenario, job.loop)
            if job.axis is None
            else (job.axis, job.x, job.layer.key, job.loop)
        )
        self.runs.setdefault(key, []).append(result)
        self.count += 1

    def of(self, *key: Any) -> list[dict[str, Any]]:
        return self.runs.get(key, [])


def scenario_tables(
    specs: list[LayerSpec], results: Results, settings: Settings, loop: str, notes: list[str]
) -> tuple[list[str], list[str]]:
    """Markdown lines of the figures on one loop, and of the ratios; error notes go to ``notes``."""
    columns = [column for column in COLUMNS if column.scenario in settings.scenarios]
    figures = ["| Layer | version | " + " | ".join(column.title for column in columns) + " |"]
    figures.append("|---|---|" + "---:|" * len(columns))
    for spec in specs:
        row = [spec.label, spec.version or "?"]
        for column in columns:
            runs = results.of(spec.key, column.scenario, loop)
            value, errors = median(runs, column.key), [str(run["error"]) for run in runs if "error" in run]
            text = fmt_number(value)
            if errors:
                note = f"{spec.label}, {column.scenario}, {loop}: {errors[0]}"
                if len(errors) > 1:
                    note += f" ({len(errors)} of {len(runs)} rounds failed)"
                notes += [note] if note not in notes else []
                marker = f"[{notes.index(note) + 1}]"
                text = f"error {marker}" if value is None else f"{text} {marker}"
            row.append(text)
        figures.append("| " + " | ".join(row) + " |")
    titles = [f"{column.title} ({'↑' if column.higher_is_better else '↓'} better)" for column in columns]
    ratios = ["| this project ÷ peer | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(columns)]
    ours = [median(results.of(OURS, column.scenario, loop), column.key) for column in columns]
    for spec in specs:
        if spec.key != OURS:
            theirs = [median(results.of(spec.key, column.scenario, loop), column.key) for column in columns]
            cells = [fmt_ratio(mine, peer) for mine, peer in zip(ours, theirs, strict=True)]
            ratios.append("| " + " | ".join([f"vs {spec.label}", *cells]) + " |")
    return figures, ratios


#: What one unit of work is in each scenario, for the CPU table.
CPU_UNITS = {"p2p": "message", "many": "message", "groups": "message", "fanout": "delivery"}
CPU_UNITS.update(rtt="round trip", sync="call", storm="channel")


def cpu_table(specs: list[LayerSpec], results: Results, settings: Settings, loop: str) -> list[str]:
    """Markdown lines: per layer and scenario, µs of CPU per unit of work, the benchmark process's
    (sender and receivers) and then its broker's, over the timed phase."""
    scenarios = [scenario for scenario in SCENARIOS if scenario in settings.scenarios]
    lines = ["| Layer | " + " | ".join(f"{name} (per {CPU_UNITS[name]})" for name in scenarios) + " |"]
    lines.append("|---|" + "---:|" * len(scenarios))
    for spec in specs:
        cells = []
        for scenario in scenarios:
            runs = results.of(spec.key, scenario, loop)
            process, broker = median(runs, "cpu_us"), median(runs, "broker_cpu_us")
            cells.append(fmt_number(process) + ("" if broker is None else f" + {fmt_number(broker)}"))
        lines.append("| " + " | ".join([spec.label, *cells]) + " |")
    return lines


def report(specs: list[LayerSpec], results: Results, settings: Settings, elapsed: float) -> list[str]:
    """Per loop the figures and the ratios, then the error notes."""
    mode = "quick (small N)" if settings.quick else "full N"
    lines: list[str] = []
    notes: list[str] = []
    ours_measured = any(spec.key == OURS for spec in specs)
    for loop in settings.loops:
        figures, ratios = scenario_tables(specs, results, settings, loop, notes)
        title = f"## Channel layers side by side on {loop} ({settings.rounds} round(s), median per cell, "
        lines += [f"{title}{mode}, {elapsed:.0f} s in all)", "", *figures, ""]
        if ours_measured:
            lines += [f"## This project ÷ peer on {loop} (ratio of medians)", "", *ratios, ""]
        cpu = cpu_table(specs, results, settings, loop)
        lines += [f"## CPU on {loop} (µs per unit of work: the benchmark process + its broker)", "", *cpu, ""]
    if not ours_measured:
        lines.append("- no ratio table: this project's layer was not measured")
    return lines + [f"[{number}] {note}" for number, note in enumerate(notes, 1)]


def axes_document(
    specs: list[LayerSpec], results: Results, settings: Settings, elapsed: float
) -> dict[str, Any]:
    """The axes' JSON: per axis per series (a layer on a loop) per point, the runs and their medians."""
    document_axes = []
    for axis in (axis for axis in AXES if axis.name in settings.axes):
        all_series = []
        for spec in specs:
            for loop in series_of(spec, axis, settings):
                points: list[dict[str, Any]] = []
                for x in axis.quick_points if settings.quick else axis.points:
                    runs = results.of(axis, x, spec.key, loop)
                    points.append({"x": x, "throughput": median(runs, axis.throughput_key)})
                    points[-1].update(p50_us=median(runs, "p50_us"), p99_us=median(runs, "p99_us"))
                    points[-1].update(errors=[run["error"] for run in runs if "error" in run], runs=runs)
                series = {"label": f"{spec.label}, {loop}", "layer_label": spec.label, "layer": spec.key}
                all_series.append({**series, "version": spec.version, "loop": loop, "points": points})
        document_axes.append({**asdict(axis), "series": all_series})
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {
        "machine": machine_facts().removeprefix("Machine: "),
        "measured_at": when,
        "elapsed_s": round(elapsed),
        "command": reproduce_command(settings),
        "sweep": {"rounds": settings.rounds, "quick": settings.quick, "loops": list(settings.loops)},
        "axes": document_axes,
    }


def axes_tables(document: dict[str, Any]) -> list[str]:
    """Markdown: per axis, the median throughput and p99 of every series at every point."""
    lines: list[str] = []
    for axis in document["axes"]:
        xs = [point["x"] for point in axis["series"][0]["points"]] if axis["series"] else []
        lines += [f"### {axis['title']}: {axis['throughput_label']} / p99 µs", ""]
        lines += ["| series | " + " | ".join(f"{x:,}" for x in xs) + " |", "|---|" + "---:|" * len(xs)]
        for series in axis["series"]:
            cells = [
                "error"
                if point["throughput"] is None
                else f"{point['throughput']:,.0f} / {point['p99_us'] or 0:,.0f}"
                for point in series["points"]
            ]
            lines.append(f"| {series['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


# Command line -----------------------------------------------------------------------------------


def positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
        return value

    return parse


def names(choices: tuple[str, ...], what: str) -> Callable[[str], list[str]]:
    """One word of a list option, which may hold several names separated by commas ("all": every one)."""

    def parse(text: str) -> list[str]:
        found = list(choices) if text == "all" else [name for name in text.split(",") if name.strip()]
        if unknown := [name for name in found if name not in choices]:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(unknown)}; choose from {', '.join(choices)}"
            )
        return found

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m bench``, with this module's docstring as the help's description."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add, amqp, redis = parser.add_argument, layers.DEFAULT_AMQP_URL, layers.DEFAULT_REDIS_URL
    # fmt: off
    add("--rounds", type=positive(int), default=1, metavar="N",
        help="interleaved rounds; each figure is the median over them (default: 1)")
    add("--scenarios", nargs="+", type=names(SCENARIOS, "scenario"), default=[SCENARIOS], metavar="NAME",
        help=f"a subset of {', '.join(SCENARIOS)}, as 'p2p rtt' or 'p2p,rtt' (default: all)")
    add("--axes", nargs="+", type=names(AXIS_NAMES, "axis"), default=[], metavar="AXIS",
        help=f"scaling curves instead, along {', '.join(AXIS_NAMES)} (or all)")
    add("--quick", action="store_true", help="small sizes everywhere, for a smoke run")
    add("--old-python", default=os.environ.get(layers.OLD_PYTHON_ENV, ""), metavar="PYTHON",
        help="python of a virtualenv holding the PyPI channels_rabbitmq, to measure it too "
        f"(default: ${layers.OLD_PYTHON_ENV}, else left out)")
    add("--timeout", type=positive(float), default=DEFAULT_TIMEOUT, metavar="SECONDS",
        help=f"limit of one run (default: {DEFAULT_TIMEOUT:g})")
    add("--loops", nargs="+", choices=LOOPS, default=list(LOOPS), metavar="LOOP",
        help=f"event loops, of {', '.join(LOOPS)} (default: both)")
    add("--json-out", type=Path, metavar="FILE", help="also write every result to FILE, one JSON line each")
    add("--out", type=Path, default=DEFAULT_OUT, metavar="FILE.json",
        help="--axes: the results, and the PNG files beside them")
    add("--no-plots", action="store_true", help="--axes: write the JSON only")
    add("--amqp-url", default=os.environ.get("AMQP_URL", amqp), metavar="URL",
        help=f"the RabbitMQ of both RabbitMQ layers (default: $AMQP_URL, else {amqp.replace('%', '%%')})")
    add("--redis-url", default=os.environ.get("REDIS_URL", redis), metavar="URL",
        help=f"the Redis of the channels_redis layers (default: $REDIS_URL, else {redis})")
    # fmt: on
    return parser


def parse(arguments: Sequence[str]) -> Settings:
    """The options, with the scenarios, axes and loops asked for in the tables' order."""
    settings = build_parser().parse_args(arguments)
    for name, choices in (("scenarios", SCENARIOS), ("axes", AXIS_NAMES), ("loops", LOOPS)):
        asked = {
            word for words in getattr(settings, name) for word in ([words] if name == "loops" else words)
        }
        setattr(settings, name, tuple(choice for choice in choices if choice in asked))
    return settings


def machine_facts() -> str:
    return (
        f"Machine: {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()} ({platform.python_implementation()})"
    )


def reproduce_command(settings: Settings) -> str:
    """The command line of this run, with every setting spelled out (passwords hidden)."""
    python = os.path.relpath(sys.executable)
    python = sys.executable if python.startswith("..") else python
    words = [python, "-m", "bench", "--rounds", str(settings.rounds)]
    if settings.axes:
        words += ["--axes", *settings.axes]
    elif settings.scenarios != SCENARIOS:
        words += ["--scenarios", *settings.scenarios]
    words += ["--quick"] if settings.quick else []
    words += ["--loops", *settings.loops] if settings.loops != LOOPS else []
    words += ["--timeout", f"{settings.timeout:g}"] if settings.timeout != DEFAULT_TIMEOUT else []
    words += ["--old-python", settings.old_python] if settings.old_python else []
    if settings.amqp_url != layers.DEFAULT_AMQP_URL:
        words += ["--amqp-url", layers.without_password(settings.amqp_url)]
    if settings.redis_url != layers.DEFAULT_REDIS_URL:
        words += ["--redis-url", layers.without_password(settings.redis_url)]
    return shlex.join(words)


def format_elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressBar:
    """One line redrawn in place on a terminal (else not drawn), and a line per finished run."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.done, self.stream, self.running, self.live = total, 0, stream, "", stream.isatty()
        self._started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def start(self, what: str) -> None:
        self.running = what
        self.redraw()

    def redraw(self) -> None:
        if self.live:
            filled = BAR_WIDTH * self.done // self.total if self.total else BAR_WIDTH
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            line = f"[{bar}] {self.done}/{self.total} {format_elapsed(self.elapsed())} {self.running}"
            self._overwrite(line)

    def finish(self, outcome: str) -> None:
        self.done, self.running = self.done + 1, ""
        self._write_line(f"[{self.done}/{self.total} {format_elapsed(self.elapsed())}] {outcome}")
        self.redraw()

    def close(self, interrupted: bool = False) -> None:
        state = "interrupted" if interrupted else "done"
        self._write_line(f"{state}: {self.done}/{self.total} runs in {format_elapsed(self.elapsed())}")

    def _overwrite(self, line: str) -> None:
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns or 80
        except (OSError, ValueError):
            columns = 80
        width = columns - 1  # never the last column: some terminals wrap there
        self.stream.write("\r" + line[:width].ljust(width))
        self.stream.flush()

    def _write_line(self, line: str) -> None:
        if self.live:
            self._overwrite("")
            self.stream.write("\r")
        self.stream.write(line + "\n")
        self.stream.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and measure; the exit status (1: no broker, 130: Ctrl-C).
    ``python -m bench e2e ...`` runs the end-to-end chat instead (:mod:`bench.e2e`)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["e2e"]:
        from bench import e2e

        return e2e.main(arguments[1:])
    settings = parse(arguments)
    say = sys.stderr
    if (problem := layers.rabbitmq_problem(settings.amqp_url)) is not None:
        print(f"bench: {problem}; start it, or point --amqp-url at one", file=say)
        return 1
    print("bench: checking which layers can be measured here...", file=say, flush=True)
    specs, skipped = layers.choose(settings.amqp_url, settings.redis_url, settings.old_python)
    for skip in skipped:
        print(f"bench: {skip}", file=say)
    measured = [
        spec.label if spec.version in spec.label else f"{spec.label} {spec.version or '?'}" for spec in specs
    ]
    print(f"bench: measuring {', '.join(measured)}", file=say, flush=True)
    jobs, results = plan(specs, settings), Results()
    progress, interrupted = ProgressBar(len(jobs), say), False
    json_out = settings.json_out.open("w", encoding="utf-8") if settings.json_out else None
    try:
        for job in jobs:
            progress.start(what := job.describe(settings.rounds))
            result = job.run(settings, progress.redraw)
            results.add(job, result)
            progress.finish(f"{what}: {summary(result)}")
            if json_out is not None:
                json_out.write(json.dumps(result) + "\n")
                json_out.flush()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        progress.close(interrupted)
        if json_out is not None:
            json_out.close()
    lines = (write_axes if settings.axes else report)(specs, results, settings, progress.elapsed())
    lines += [f"- {skip}" for skip in skipped]
    if interrupted:
        lines.append(f"- interrupted: {results.count} of {len(jobs)} runs done")
    lines += ["", machine_facts(), "", f"Reproduce: `{reproduce_command(settings)}`"]
    print("\n".join(lines), flush=True)
    return INTERRUPTED_EXIT_STATUS if interrupted else 0


def write_axes(specs: list[LayerSpec], results: Results, settings: Settings, elapsed: float) -> list[str]:
    """The axes' JSON document at --out and their PNG files beside it; the summary tables."""
    document, out = axes_document(specs, results, settings, elapsed), settings.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    written = [out]
    if not settings.no_plots:
        from bench import plots  # matplotlib, only when drawing

        written += plots.draw_all(document, out.parent)
    return [*axes_tables(document), *(f"wrote {path}" for path in written)]
