"""Run the scenarios for every layer in interleaved rounds, and make the Markdown tables.

The pieces that ``python -m bench`` puts together, usable from code too:

- :func:`choose_layers`: the layers that can be measured here, and why the others cannot;
- :func:`plan`: every (round, scenario, layer) run, in the order they are run;
- :func:`run_one`: one run, as a subprocess of ``scenarios.py`` in the layer's own interpreter;
- :class:`Results` and :func:`report`: the medians per cell, as Markdown tables of the figures
  per layer and of this project's figures divided by each peer's.

Layers measured:

  InMemoryChannelLayer       channels (one shared instance), always
  RedisChannelLayer          channels_redis.core, at the Redis URL, if installed and Redis answers
  RedisPubSubChannelLayer    channels_redis.pubsub, likewise
  this project               channels_rabbitmq.core, at the AMQP URL, from this interpreter
  channels_rabbitmq (PyPI)   the released package, from another virtualenv's python (it has the
                             same import name as this project), when one is given
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import scenarios
from channels_rabbitmq import __version__
from channels_rabbitmq.config import parse_amqp_url

SCENARIO_SCRIPT = Path(scenarios.__file__).resolve()
SCENARIO_NAMES: tuple[str, ...] = tuple(scenarios.SCENARIOS)
QUICK_N = {"p2p": 2000, "many": 2000, "fanout": 10, "rtt": 200, "sync": 30, "storm": 1000}
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"
DEFAULT_TIMEOUT = 120.0
# A scenario run gets --timeout inside the subprocess; the subprocess itself is killed this much later.
KILL_GRACE = 60.0
CHECK_TIMEOUT = 60.0
BROKER_PROBE_TIMEOUT = 3.0
WAIT_TICK = 0.5
OURS = "ours"
OLD_RELEASE = "rabbitmq-old"
RABBITMQ_CLASS = "channels_rabbitmq.core.RabbitmqChannelLayer"
OLD_PYTHON_ENV = "OLD_CHANNELS_RABBITMQ_PYTHON"
DEFAULT_LOOP = scenarios.LOOPS[0]


@dataclass(frozen=True)
class Settings:
    """What to measure, how often, and where the brokers are."""

    rounds: int = 1
    scenarios: tuple[str, ...] = SCENARIO_NAMES
    quick: bool = False
    old_python: str = ""
    timeout: float = DEFAULT_TIMEOUT
    amqp_url: str = DEFAULT_AMQP_URL
    redis_url: str = DEFAULT_REDIS_URL
    loops: tuple[str, ...] = (DEFAULT_LOOP,)


@dataclass
class LayerSpec:
    """One layer to measure, and the interpreter to measure it with."""

    key: str
    label: str
    cls: str
    config: dict[str, Any]
    python: str
    shared_instance: bool = False
    version: str = ""


@dataclass(frozen=True)
class Skipped:
    """A layer that is not measured, and why."""

    label: str
    reason: str

    def __str__(self) -> str:
        return f"skipped {self.label}: {self.reason}"


@dataclass(frozen=True)
class Run:
    """One subprocess: one layer in one scenario on one event loop, in one round."""

    round_no: int
    scenario: str
    layer: LayerSpec
    loop: str = DEFAULT_LOOP

    def describe(self, rounds: int) -> str:
        return f"round {self.round_no}/{rounds}, {self.scenario}, {self.layer.label}, {self.loop}"


@dataclass
class Cell:
    """The results of one (layer, scenario) over the rounds."""

    runs: list[dict[str, Any]] = field(default_factory=list)

    def ok(self) -> list[dict[str, Any]]:
        return [run for run in self.runs if "error" not in run]

    def median(self, key: str) -> float | None:
        values = [run[key] for run in self.ok() if isinstance(run.get(key), (int, float))]
        return statistics.median(values) if values else None

    def errors(self) -> list[str]:
        return [str(run["error"]) for run in self.runs if "error" in run]


class Results:
    """Every result so far, by (layer key, scenario, event loop)."""

    def __init__(self) -> None:
        self.cells: dict[tuple[str, str, str], Cell] = {}

    def add(self, run: Run, result: dict[str, Any]) -> None:
        self.cells.setdefault((run.layer.key, run.scenario, run.loop), Cell()).runs.append(result)

    def cell(self, layer_key: str, scenario: str, loop: str = DEFAULT_LOOP) -> Cell:
        return self.cells.get((layer_key, scenario, loop), Cell())

    def count(self) -> int:
        return sum(len(cell.runs) for cell in self.cells.values())


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
    Column("fanout deliveries/s", "fanout", "deliveries_per_s", True),
    Column("rtt p50 µs", "rtt", "p50_us", False),
    Column("rtt p99 µs", "rtt", "p99_us", False),
    Column("sync calls/s", "sync", "calls_per_s", True),
    Column("storm s", "storm", "seconds", False),
    Column("storm join p99 ms", "storm", "p99_ms", False),
)


# Brokers ----------------------------------------------------------------------------------------


def without_password(url: str) -> str:
    """The URL with its password, if any, shown as ``***``.

    The credentials end at the last "@" (a password may hold "/", "#", "?", ":" and "@",
    as the layer's own URL parser allows), and the password starts after their first ":".
    """
    scheme, separator, rest = url.partition("://")
    credentials, at, location = rest.rpartition("@")
    if not separator or not at or ":" not in credentials:
        return url
    username = credentials.partition(":")[0]
    return f"{scheme}://{username}:***@{location}"


def short_reason(error: BaseException) -> str:
    return scenarios.short_reason(error)


def rabbitmq_problem(url: str) -> str | None:
    """Why nothing can be measured on RabbitMQ at ``url`` (no TCP listener there), or None."""
    try:
        address = parse_amqp_url(url)
    except ValueError as error:  # its message masks the password
        return f"not a usable AMQP URL: {error}"
    try:
        with socket.create_connection((address.host, address.port), BROKER_PROBE_TIMEOUT):
            pass
    except OSError as error:
        return f"no RabbitMQ at {address} ({short_reason(error)})"
    return None


def redis_problem(url: str) -> str | None:
    """Why channels_redis cannot be measured here: not installed, or no Redis answers; or None."""
    if importlib.util.find_spec("channels_redis") is None:
        return "not installed: pip install channels-redis"
    try:
        import redis  # channels_redis's own client library
    except ImportError as error:
        return f"channels_redis is installed but not its client library: {short_reason(error)}"
    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=BROKER_PROBE_TIMEOUT, socket_timeout=BROKER_PROBE_TIMEOUT
        )
    except ValueError as error:
        return f"bad Redis URL {without_password(url)}: {short_reason(error)}"
    try:
        client.ping()
    except Exception as error:
        return f"no Redis at {without_password(url)} ({short_reason(error)})"
    finally:
        client.close()
    return None


# Layers -----------------------------------------------------------------------------------------


def candidate_layers(settings: Settings) -> tuple[list[LayerSpec], list[Skipped]]:
    """The layers worth checking, peers first and this project last but one; and the peers left out."""
    amqp = {"host": settings.amqp_url, "remote_capacity": 100000, "local_capacity": 10000}
    layers = [
        LayerSpec(
            "inmemory",
            "InMemoryChannelLayer",
            "channels.layers.InMemoryChannelLayer",
            {"capacity": 100000},
            sys.executable,
            shared_instance=True,
        )
    ]
    skipped: list[Skipped] = []
    redis_reason = redis_problem(settings.redis_url)
    redis_layers = [
        LayerSpec(
            "redis",
            "RedisChannelLayer",
            "channels_redis.core.RedisChannelLayer",
            {"hosts": [settings.redis_url], "capacity": 100000},
            sys.executable,
        ),
        LayerSpec(
            "redis-pubsub",
            "RedisPubSubChannelLayer",
            "channels_redis.pubsub.RedisPubSubChannelLayer",
            {"hosts": [settings.redis_url]},
            sys.executable,
        ),
    ]
    if redis_reason is None:
        layers += redis_layers
    else:
        skipped += [Skipped(spec.label, redis_reason) for spec in redis_layers]
    # Like the other layers' capacity: per channel here (the old release has no such key).
    ours = {**amqp, "capacity": 100000}
    layers.append(LayerSpec(OURS, "channels_rabbitmq (this project)", RABBITMQ_CLASS, ours, sys.executable))
    old_label = "channels_rabbitmq (PyPI)"
    if settings.old_python:
        layers.append(LayerSpec(OLD_RELEASE, old_label, RABBITMQ_CLASS, amqp, settings.old_python))
    else:
        skipped.append(Skipped(old_label, f"not asked for: --old-python PYTHON or {OLD_PYTHON_ENV}"))
    return layers, skipped


def check_layer(spec: LayerSpec) -> str | None:
    """Import the layer's class in its interpreter and note its version; say why it cannot run, or None."""
    if not Path(spec.python).exists():
        return f"python {spec.python} not found"
    command = [spec.python, str(SCENARIO_SCRIPT), "--layer", spec.cls, "--check"]
    try:
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"import check timed out after {CHECK_TIMEOUT:g} s"
    except OSError as error:
        return f"cannot run {spec.python}: {short_reason(error)}"
    line = last_json_line(done.stdout)
    if line is None:
        return f"import check failed: {last_line(done.stderr) or f'exit status {done.returncode}'}"
    if "error" in line:
        return f"not importable with {spec.python}: {line['error']}"
    spec.version = str(line.get("version", ""))
    if spec.key == OLD_RELEASE and spec.version == __version__:
        return f"{spec.python} has this project ({__version__}), not a PyPI release"
    return None


def choose_layers(settings: Settings) -> tuple[list[LayerSpec], list[Skipped]]:
    """The layers that will be measured (with their versions), and the ones skipped with the reason."""
    candidates, skipped = candidate_layers(settings)
    layers: list[LayerSpec] = []
    for spec in candidates:
        problem = check_layer(spec)
        if problem is None:
            layers.append(spec)
        else:
            skipped.append(Skipped(spec.label, problem))
    for spec in layers:
        if spec.key == OLD_RELEASE and spec.version:
            spec.label = f"channels_rabbitmq {spec.version} (PyPI)"
    return layers, skipped


# Running ----------------------------------------------------------------------------------------


def plan(layers: list[LayerSpec], settings: Settings) -> list[Run]:
    """Every run, rounds interleaved: each round runs each scenario on each loop for each layer in turn."""
    return [
        Run(round_no, scenario, spec, loop)
        for round_no in range(1, settings.rounds + 1)
        for scenario in settings.scenarios
        for loop in settings.loops
        for spec in layers
    ]


def scenario_command(run: Run, settings: Settings) -> list[str]:
    spec = run.layer
    command = [
        spec.python,
        str(SCENARIO_SCRIPT),
        "--layer",
        spec.cls,
        "--scenario",
        run.scenario,
        "--label",
        spec.label,
        "--timeout",
        str(settings.timeout),
        "--loop",
        run.loop,
    ]
    if spec.shared_instance:
        command.append("--shared-instance")
    if settings.quick:
        command += ["--n", str(QUICK_N[run.scenario])]
    return command


def run_one(run: Run, settings: Settings, while_waiting: Callable[[], None] | None = None) -> dict[str, Any]:
    """One scenarios.py subprocess; its JSON line, or an "error" entry if it gave none.

    ``while_waiting`` is called about twice a second while the subprocess runs (to redraw a
    progress bar).
    """
    base = {"layer": run.layer.label, "scenario": run.scenario, "loop": run.loop, "round": run.round_no}
    command = scenario_command(run, settings)
    return run_command(command, run.layer.config, base, settings.timeout + KILL_GRACE, while_waiting)


def run_command(
    command: list[str],
    config: dict[str, Any],
    base: dict[str, Any],
    kill_after: float,
    while_waiting: Callable[[], None] | None = None,
    cwd: Path | None = None,
) -> dict[str, Any]:
    """Run a measuring subprocess with the layer's config in its environment; ``base`` and its
    last JSON line, or ``base`` and an "error" if it gave none (killed after ``kill_after`` s)."""
    deadline = time.monotonic() + kill_after
    process = subprocess.Popen(
        command,
        cwd=cwd,
        # The layer's config holds the broker's password: in the environment, not on the command line.
        env=config_environment(config),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while True:
            try:
                stdout, stderr = process.communicate(timeout=WAIT_TICK)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    process.kill()
                    stdout, _ = process.communicate()
                    line = last_json_line(stdout)
                    if line is None:
                        return {**base, "error": f"subprocess killed after {kill_after:g} s"}
                    return {**base, **line}
                if while_waiting is not None:
                    while_waiting()
    finally:
        if process.poll() is None:  # interrupted (Ctrl-C): leave no benchmark running
            process.kill()
            process.communicate()
    line = last_json_line(stdout)
    if line is None:
        reason = last_line(stderr) or f"exit status {process.returncode}, no output"
        return {**base, "error": f"no result: {reason}"}
    return {**base, **line}


def config_environment(config: dict[str, Any]) -> dict[str, str]:
    """This environment, plus the layer's config for a measuring subprocess to read."""
    return {**os.environ, scenarios.CONFIG_VARIABLE: json.dumps(config)}


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def last_json_line(text: str) -> dict[str, Any] | None:
    """The last stdout line that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def summary(result: dict[str, Any]) -> str:
    """The figures of one result, in one short line."""
    if "error" in result:
        return f"error: {result['error']}"
    keys = dict.fromkeys(column.key for column in COLUMNS if column.key in result)
    shown = [f"{key}={result[key]}" for key in keys]
    if "seconds" in result:
        shown.append(f"({result['seconds']} s)")
    return " ".join(shown)


# Tables -----------------------------------------------------------------------------------------


def fmt_number(value: float | None) -> str:
    return "n/a" if value is None else f"{round(value):,}"


def fmt_ratio(ours: float | None, peer: float | None) -> str:
    if ours is None or peer is None or peer == 0:
        return "n/a"
    return f"{ours / peer:.2f}x"


def columns_for(scenario_names: tuple[str, ...]) -> list[Column]:
    return [column for column in COLUMNS if column.scenario in scenario_names]


def results_table(
    layers: list[LayerSpec], results: Results, scenario_names: tuple[str, ...], loop: str, notes: list[str]
) -> list[str]:
    """Markdown lines of the figures table on one loop; the error notes it refers to go to ``notes``."""
    columns = columns_for(scenario_names)
    lines = [
        "| Layer | version | " + " | ".join(column.title for column in columns) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    for spec in layers:
        row = [spec.label, spec.version or "?"]
        for column in columns:
            cell = results.cell(spec.key, column.scenario, loop)
            value = cell.median(column.key)
            errors = cell.errors()
            text = fmt_number(value)
            if errors:
                note = f"{spec.label}, {column.scenario}, {loop}: {errors[0]}"
                if len(errors) > 1:
                    note += f" ({len(errors)} of {len(cell.runs)} rounds failed)"
                if note not in notes:
                    notes.append(note)
                marker = f"[{notes.index(note) + 1}]"
                text = f"error {marker}" if value is None else f"{text} {marker}"
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    return lines


def ratio_table(
    layers: list[LayerSpec], results: Results, scenario_names: tuple[str, ...], loop: str
) -> list[str]:
    """Markdown lines of this project's figures divided by each peer's, both on one loop."""
    columns = columns_for(scenario_names)
    titles = [f"{column.title} ({'↑' if column.higher_is_better else '↓'} better)" for column in columns]
    lines = [
        "| this project ÷ peer | " + " | ".join(titles) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for spec in layers:
        if spec.key == OURS:
            continue
        ratios = [
            fmt_ratio(
                results.cell(OURS, column.scenario, loop).median(column.key),
                results.cell(spec.key, column.scenario, loop).median(column.key),
            )
            for column in columns
        ]
        lines.append("| " + " | ".join([f"vs {spec.label}", *ratios]) + " |")
    return lines


def report(
    layers: list[LayerSpec],
    results: Results,
    settings: Settings,
    elapsed: float,
    skipped: list[Skipped],
) -> list[str]:
    """The Markdown report: per event loop the figures and the ratios, then the error notes and skips."""
    mode = "quick (small N)" if settings.quick else "full N"
    lines: list[str] = []
    errors: list[str] = []
    notes = [str(skip) for skip in skipped]
    ours_measured = any(spec.key == OURS for spec in layers)
    for loop in settings.loops:
        lines += [
            f"## Channel layers side by side on {loop} ({settings.rounds} round(s), median per cell, "
            f"{mode}, {elapsed:.0f} s in all)",
            "",
            *results_table(layers, results, settings.scenarios, loop, errors),
            "",
        ]
        if ours_measured:
            lines += [f"## This project ÷ peer on {loop} (ratio of medians)", ""]
            lines += [*ratio_table(layers, results, settings.scenarios, loop), ""]
    if not ours_measured:
        notes.append("no ratio table: this project's layer was not measured")
    lines += [f"[{number}] {error}" for number, error in enumerate(errors, 1)]
    lines += [f"- {note}" for note in notes]
    return lines
