"""Compare this project's channel layer with its peers, side by side, on this machine.

Runs ``layerbench.py`` in a fresh subprocess for every (layer, scenario), in
interleaved rounds, and prints Markdown tables: the median figures per layer,
then this project's figures divided by each peer's. Layers measured:

  InMemoryChannelLayer       channels (one shared instance)
  RedisChannelLayer          channels_redis.core, at REDIS_URL
  RedisPubSubChannelLayer    channels_redis.pubsub, at REDIS_URL
  this project               channels_rabbitmq.core, at AMQP_URL, from this interpreter
  channels_rabbitmq (PyPI)   the released package; it has the same import name as this
                             project, so it runs from another virtualenv's python:
                             --old-python or OLD_CHANNELS_RABBITMQ_PYTHON

A layer whose package cannot be imported is skipped with a note. Example::

    .venv/bin/python bench/compare.py --rounds 3 --old-python /tmp/peers/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LAYERBENCH = HERE / "layerbench.py"
SCENARIOS = ("p2p", "many", "fanout", "rtt", "sync")
QUICK_N = {"p2p": 2000, "many": 2000, "fanout": 10, "rtt": 200, "sync": 30}
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"
OURS = "ours"


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
)


def build_layers(args: argparse.Namespace) -> list[LayerSpec]:
    """The layers of the comparison, peers first and this project last but one."""
    amqp = {"host": args.amqp_url, "remote_capacity": 100000, "local_capacity": 10000}
    layers = [
        LayerSpec(
            "inmemory",
            "InMemoryChannelLayer",
            "channels.layers.InMemoryChannelLayer",
            {"capacity": 100000},
            sys.executable,
            shared_instance=True,
        ),
        LayerSpec(
            "redis",
            "RedisChannelLayer",
            "channels_redis.core.RedisChannelLayer",
            {"hosts": [args.redis_url], "capacity": 100000},
            sys.executable,
        ),
        LayerSpec(
            "redis-pubsub",
            "RedisPubSubChannelLayer",
            "channels_redis.pubsub.RedisPubSubChannelLayer",
            {"hosts": [args.redis_url]},
            sys.executable,
        ),
        LayerSpec(
            OURS,
            "channels_rabbitmq (this project)",
            "channels_rabbitmq.core.RabbitmqChannelLayer",
            amqp,
            sys.executable,
        ),
    ]
    if args.old_python:
        layers.append(
            LayerSpec(
                "rabbitmq-old",
                "channels_rabbitmq (PyPI)",
                "channels_rabbitmq.core.RabbitmqChannelLayer",
                amqp,
                args.old_python,
            )
        )
    return layers


def check_layer(spec: LayerSpec) -> str | None:
    """Import the layer's class in its interpreter; return why it cannot be measured, or None."""
    if not Path(spec.python).exists():
        return f"python {spec.python} not found"
    command = [spec.python, str(LAYERBENCH), "--layer", spec.cls, "--check"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return "import check timed out"
    line = last_json_line(done.stdout)
    if line is None:
        return f"import check failed: {last_line(done.stderr) or f'exit status {done.returncode}'}"
    if "error" in line:
        return f"not importable with {spec.python}: {line['error']}"
    spec.version = str(line.get("version", ""))
    return None


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


def run_one(spec: LayerSpec, scenario: str, args: argparse.Namespace) -> dict[str, Any]:
    """One layerbench.py subprocess; its JSON line, or an "error" entry if it gave none."""
    command = [
        spec.python,
        str(LAYERBENCH),
        "--layer",
        spec.cls,
        "--config",
        json.dumps(spec.config),
        "--scenario",
        scenario,
        "--label",
        spec.label,
        "--timeout",
        str(args.timeout),
    ]
    if spec.shared_instance:
        command.append("--shared-instance")
    if args.quick:
        command += ["--n", str(QUICK_N[scenario])]
    base = {"layer": spec.label, "scenario": scenario}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout + 60, check=False)
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout or ""
        line = last_json_line(stdout)
        return line or {**base, "error": f"subprocess killed after {args.timeout + 60:g} s"}
    line = last_json_line(done.stdout)
    if line is None:
        reason = last_line(done.stderr) or f"exit status {done.returncode}, no output"
        return {**base, "error": f"no result: {reason}"}
    return line


def summary(result: dict[str, Any]) -> str:
    """A short progress line for stderr."""
    if "error" in result:
        return f"error: {result['error']}"
    keys = dict.fromkeys(column.key for column in COLUMNS if column.key in result)
    shown = [f"{key}={result[key]}" for key in keys]
    return " ".join(shown) + f" ({result.get('seconds', '?')} s)"


def fmt_number(value: float | None) -> str:
    return "n/a" if value is None else f"{round(value):,}"


def fmt_ratio(ours: float | None, peer: float | None) -> str:
    if ours is None or peer is None or peer == 0:
        return "n/a"
    return f"{ours / peer:.2f}x"


def results_table(
    layers: list[LayerSpec], cells: dict[tuple[str, str], Cell], scenarios: list[str]
) -> tuple[list[str], list[str]]:
    """Markdown lines of the figures table, and the error notes it refers to."""
    columns = [column for column in COLUMNS if column.scenario in scenarios]
    lines = [
        "| Layer | version | " + " | ".join(column.title for column in columns) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    notes: list[str] = []
    for spec in layers:
        row = [spec.label, spec.version or "?"]
        for column in columns:
            cell = cells.get((spec.key, column.scenario), Cell())
            value = cell.median(column.key)
            errors = cell.errors()
            text = fmt_number(value)
            if errors:
                note = f"{spec.label}, {column.scenario}: {errors[0]}"
                if len(errors) > 1:
                    note += f" ({len(errors)} of {len(cell.runs)} rounds failed)"
                if note not in notes:
                    notes.append(note)
                marker = f"[{notes.index(note) + 1}]"
                text = f"error {marker}" if value is None else f"{text} {marker}"
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    return lines, notes


def ratio_table(
    layers: list[LayerSpec], cells: dict[tuple[str, str], Cell], scenarios: list[str]
) -> list[str]:
    """Markdown lines of this project's figures divided by each peer's."""
    columns = [column for column in COLUMNS if column.scenario in scenarios]
    titles = [f"{column.title} ({'↑' if column.higher_is_better else '↓'} better)" for column in columns]
    lines = [
        "| this project ÷ peer | " + " | ".join(titles) + " |",
        "|---|" + "---:|" * len(columns),
    ]

    def median_of(key: str) -> Callable[[Column], float | None]:
        return lambda column: cells.get((key, column.scenario), Cell()).median(column.key)

    ours = median_of(OURS)
    for spec in layers:
        if spec.key == OURS:
            continue
        peer = median_of(spec.key)
        row = [f"vs {spec.label}"] + [fmt_ratio(ours(column), peer(column)) for column in columns]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def parse_scenarios(values: list[str]) -> list[str]:
    names = [name for value in values for name in value.replace(",", " ").split()]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    return [name for name in SCENARIOS if name in names]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; each cell is the median")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), help="e.g. p2p,rtt or p2p rtt")
    parser.add_argument("--quick", action="store_true", help="small N everywhere, for a smoke run")
    parser.add_argument(
        "--old-python",
        default=os.environ.get("OLD_CHANNELS_RABBITMQ_PYTHON", ""),
        help="python of a virtualenv with the PyPI channels_rabbitmq (env OLD_CHANNELS_RABBITMQ_PYTHON)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per scenario run")
    parser.add_argument("--json-out", type=Path, help="also write every result as a JSON line here")
    args = parser.parse_args(argv)
    args.scenarios = parse_scenarios(args.scenarios)
    args.amqp_url = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
    args.redis_url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    notes: list[str] = []
    layers: list[LayerSpec] = []
    for spec in build_layers(args):
        problem = check_layer(spec)
        if problem is None:
            layers.append(spec)
        else:
            notes.append(f"skipped {spec.label}: {problem}")
            print(f"skipping {spec.label}: {problem}", file=sys.stderr)
    if not args.old_python:
        notes.append("skipped channels_rabbitmq (PyPI): no --old-python / OLD_CHANNELS_RABBITMQ_PYTHON")
    for spec in layers:
        if spec.key == "rabbitmq-old" and spec.version:
            spec.label = f"channels_rabbitmq {spec.version} (PyPI)"

    cells: dict[tuple[str, str], Cell] = {}
    out = args.json_out.open("w") if args.json_out else None
    started = time.monotonic()
    try:
        for round_no in range(1, args.rounds + 1):
            for scenario in args.scenarios:
                for spec in layers:
                    result = run_one(spec, scenario, args)
                    result["round"] = round_no
                    cells.setdefault((spec.key, scenario), Cell()).runs.append(result)
                    print(
                        f"[round {round_no}/{args.rounds}] {scenario:6} {spec.label}: {summary(result)}",
                        file=sys.stderr,
                        flush=True,
                    )
                    if out is not None:
                        out.write(json.dumps(result) + "\n")
                        out.flush()
    finally:
        if out is not None:
            out.close()
    elapsed = time.monotonic() - started

    figures, errors = results_table(layers, cells, args.scenarios)
    mode = "quick (small N)" if args.quick else "full N"
    print(
        f"## Channel layers side by side ({args.rounds} round(s), median per cell, {mode}, "
        f"{elapsed:.0f} s, Python {sys.version.split()[0]})"
    )
    print()
    print("\n".join(figures))
    print()
    if any(spec.key == OURS for spec in layers):
        print("## This project ÷ peer (ratio of medians)")
        print()
        print("\n".join(ratio_table(layers, cells, args.scenarios)))
        print()
    else:
        notes.append("no ratio table: this project's layer was not measured")
    for number, error in enumerate(errors, 1):
        print(f"[{number}] {error}")
    for note in notes:
        print(f"- {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
