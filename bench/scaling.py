"""Scaling curves: throughput and p99 latency of this layer and its peers along four axes.

Run from the repository's root: python -m bench.scaling [options], or make bench-plots, which
also starts a private RabbitMQ when none answers at $AMQP_URL. The results go to a JSON file
(default docs/img/bench/scaling.json) and are drawn as one PNG per axis beside it
(bench.plots; python -m bench.plots FILE.json draws them again without measuring).

Axes (points; --quick measures two of them, with shorter phases):

  size      payload of 100 B to 1 MiB, from one instance to one channel of another
  groups    1 to 10,000 groups the receiving channel is a member of; group_send to one of them
  channels  10 to 50,000 channels on the receiver, a receive() waiting on each
  servers   1 to 4 receiver processes with 100 members each in one group; group_send from a
            sender process: deliveries/s

InMemoryChannelLayer is measured on the size axis only: it goes over all its channels and groups
on every call, so that 10,000 of them take it minutes, and it cannot reach another process.

Every point is a throughput phase (a time box of 0.7 s, then the drain) and a latency phase
(probes one at a time: the one-way latency from the send call to the return of receive(), whose
p99 is plotted); see bench/scaling_probes.py and bench/scaling_fanout.py. Each point runs in
fresh processes.

This layer is measured on each event loop of --loops (asyncio's own and uvloop: two curves),
its peers (InMemoryChannelLayer, RedisChannelLayer, RedisPubSubChannelLayer, as for python -m
bench) on asyncio's. Rounds are interleaved and each point is their median, the plots show the
spread as bars from the lowest to the highest round; the points that take long to set up (10,000
groups or channels and more) are measured in one round only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import compare, plots, run, scaling_fanout, scenarios

REPOSITORY = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPOSITORY / "docs" / "img" / "bench" / "scaling.json"
PROBE_MODULE = "bench.scaling_probes"
#: Layers whose group memberships outlive the instance (kept in Redis): the probe discards them.
MEMBERSHIPS_OUTLIVE_INSTANCE = {"redis"}
#: InMemoryChannelLayer goes over every channel and group on every call (its expiry), so 10,000
#: of them take it minutes; and it cannot reach another process. It is the size axis' reference.
SIZE_AXIS_ONLY = {"inmemory"}


@dataclass(frozen=True)
class Axis:
    """One scaling axis: its points, and how its plot is labelled."""

    name: str
    title: str
    x_label: str
    points: tuple[int, ...]
    quick_points: tuple[int, ...]
    throughput_key: str
    throughput_label: str
    log_x: bool
    #: Points from this one on are measured in one round only (their setup takes long).
    single_round_from: int | None
    what: str


AXES = (
    Axis(
        "size",
        "Message size",
        "payload per message",
        (100, 1024, 10 * 1024, 100 * 1024, 1024 * 1024),
        (100, 10 * 1024),
        "msgs_per_s",
        "messages/s",
        True,
        None,
        "one sender instance to one channel of a receiver instance, 50 sends in flight",
    ),
    Axis(
        "groups",
        "Groups per process",
        "groups the receiving channel is a member of",
        (1, 10, 100, 1000, 10000),
        (1, 100),
        "msgs_per_s",
        "group messages/s",
        True,
        10000,
        "group_send of 100 B to one of the groups, 50 in flight",
    ),
    Axis(
        "channels",
        "Channels per process",
        "channels on the receiver, a receive() waiting on each",
        (10, 100, 1000, 10000, 50000),
        (10, 100),
        "msgs_per_s",
        "messages/s",
        True,
        10000,
        "100 B messages to channels picked at random, 50 sends in flight",
    ),
    Axis(
        "servers",
        "Server processes (fan-out)",
        "receiver processes, 100 group members each",
        (1, 2, 3, 4),
        (1, 2),
        "deliveries_per_s",
        "deliveries/s",
        False,
        None,
        "group_send of 100 B from a sender process, 50 in flight",
    ),
)
AXIS_NAMES = tuple(axis.name for axis in AXES)


@dataclass(frozen=True)
class Sweep:
    """How much to measure."""

    rounds: int
    axes: tuple[str, ...]
    loops: tuple[str, ...]
    quick: bool
    seconds: float
    latency_n: int
    fanout_members: int
    fanout_latency_n: int
    timeout: float


@dataclass(frozen=True)
class Series:
    """One curve: a layer on an event loop."""

    layer: compare.LayerSpec
    loop: str

    @property
    def label(self) -> str:
        return f"{self.layer.label}, {self.loop}"


@dataclass(frozen=True)
class Job:
    """One measurement: a series at a point of an axis, in one round."""

    round_no: int
    axis: Axis
    x: int
    series: Series

    def describe(self) -> str:
        return f"round {self.round_no}, {self.axis.name}={self.x:,}, {self.series.label}"


def sweep_from(args: argparse.Namespace) -> Sweep:
    quick = bool(args.quick)
    return Sweep(
        rounds=args.rounds,
        axes=tuple(name for name in AXIS_NAMES if name in args.axes),
        loops=tuple(loop for loop in scenarios.LOOPS if loop in args.loops),
        quick=quick,
        seconds=0.2 if quick else 0.7,
        latency_n=20 if quick else 200,
        fanout_members=10 if quick else 100,
        fanout_latency_n=10 if quick else 100,
        timeout=args.timeout,
    )


def points_of(axis: Axis, sweep: Sweep) -> tuple[int, ...]:
    return axis.quick_points if sweep.quick else axis.points


def rounds_at(axis: Axis, x: int, sweep: Sweep) -> int:
    heavy = axis.single_round_from is not None and x >= axis.single_round_from
    return 1 if heavy else sweep.rounds


def series_for(layers: list[compare.LayerSpec], axis: Axis, sweep: Sweep) -> list[Series]:
    """This project on every loop asked for, the peers on asyncio's (when asked for)."""
    chosen: list[Series] = []
    for spec in layers:
        if axis.name != "size" and spec.key in SIZE_AXIS_ONLY:
            continue
        loops = sweep.loops if spec.key == compare.OURS else sweep.loops[:1]
        chosen += [Series(spec, loop) for loop in loops]
    return chosen


def plan(layers: list[compare.LayerSpec], sweep: Sweep) -> list[Job]:
    """Every measurement, rounds interleaved."""
    return [
        Job(round_no, axis, x, series)
        for round_no in range(1, sweep.rounds + 1)
        for axis in AXES
        if axis.name in sweep.axes
        for x in points_of(axis, sweep)
        if round_no <= rounds_at(axis, x, sweep)
        for series in series_for(layers, axis, sweep)
    ]


def probe_command(job: Job, sweep: Sweep) -> list[str]:
    spec = job.series.layer
    command = [
        *(spec.python, "-m", PROBE_MODULE, "--layer", spec.cls, "--label", spec.label),
        *("--loop", job.series.loop, "--axis", job.axis.name, "--x", str(job.x)),
        *("--seconds", str(sweep.seconds), "--latency-n", str(sweep.latency_n)),
        *("--timeout", str(sweep.timeout)),
    ]
    if spec.shared_instance:
        command.append("--shared-instance")
    if spec.key in MEMBERSHIPS_OUTLIVE_INSTANCE:
        command.append("--discard-groups")
    return command


def measure(job: Job, sweep: Sweep, progress: run.ProgressBar) -> dict[str, Any]:
    """One measurement, in fresh processes; its figures or an "error" entry."""
    base = {"axis": job.axis.name, "x": job.x, "layer": job.series.layer.label, "loop": job.series.loop}
    base["round"] = job.round_no
    if job.axis.name == "servers":
        point = scaling_fanout.Fanout(
            job.x, sweep.fanout_members, sweep.seconds, sweep.fanout_latency_n, sweep.timeout
        )
        return {**base, **scaling_fanout.measure(job.series.layer, job.series.loop, point)}
    kill_after = sweep.timeout + compare.KILL_GRACE
    return compare.run_command(
        probe_command(job, sweep), job.series.layer.config, base, kill_after, progress.redraw, REPOSITORY
    )


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [run[key] for run in runs if "error" not in run and isinstance(run.get(key), (int, float))]
    return statistics.median(values) if values else None


def results_document(
    layers: list[compare.LayerSpec],
    sweep: Sweep,
    runs: list[tuple[Job, dict[str, Any]]],
    elapsed: float,
    command: str,
) -> dict[str, Any]:
    """The JSON document: the settings, the machine, and per axis per series per point the runs
    and their medians."""
    axes: list[dict[str, Any]] = []
    for axis in AXES:
        if axis.name not in sweep.axes:
            continue
        all_series = []
        for series in series_for(layers, axis, sweep):
            points = []
            for x in points_of(axis, sweep):
                mine = [result for job, result in runs if (job.axis, job.x, job.series) == (axis, x, series)]
                points.append(
                    {
                        "x": x,
                        "throughput": median_of(mine, axis.throughput_key),
                        "p50_us": median_of(mine, "p50_us"),
                        "p99_us": median_of(mine, "p99_us"),
                        "errors": [str(result["error"]) for result in mine if "error" in result],
                        "runs": mine,
                    }
                )
            all_series.append(
                {
                    "label": series.label,
                    "layer_label": series.layer.label,
                    "layer": series.layer.key,
                    "version": series.layer.version,
                    "loop": series.loop,
                    "points": points,
                }
            )
        fields = asdict(axis)
        axes.append({**fields, "series": all_series})
    return {
        "machine": run.machine_facts().removeprefix("Machine: "),
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed),
        "command": command,
        "sweep": asdict(sweep),
        "axes": axes,
    }


def summary_tables(document: dict[str, Any]) -> list[str]:
    """Markdown: per axis, the median throughput and p99 of every series at every point."""
    lines: list[str] = []
    for axis in document["axes"]:
        xs = [point["x"] for point in axis["series"][0]["points"]] if axis["series"] else []
        lines += [
            f"### {axis['title']}: {axis['throughput_label']} / p99 µs",
            "",
            "| series | " + " | ".join(f"{x:,}" for x in xs) + " |",
            "|---|" + "---:|" * len(xs),
        ]
        for series in axis["series"]:
            cells = [
                "error"
                if point["throughput"] is None
                else f"{point['throughput']:,.0f} / {point['p99_us']:,.0f}"
                for point in series["points"]
            ]
            lines.append(f"| {series['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scaling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=run.positive_int, default=3, metavar="N", help="rounds (default: 3)")
    parser.add_argument("--axes", nargs="+", choices=AXIS_NAMES, default=list(AXIS_NAMES), metavar="AXIS")
    parser.add_argument("--loops", nargs="+", choices=scenarios.LOOPS, default=list(scenarios.LOOPS))
    parser.add_argument("--quick", action="store_true", help="two points per axis, short phases")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="FILE.json", help="the results")
    parser.add_argument("--no-plots", action="store_true", help="write the JSON only")
    parser.add_argument("--timeout", type=run.positive_float, default=compare.DEFAULT_TIMEOUT)
    parser.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", compare.DEFAULT_AMQP_URL))
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", compare.DEFAULT_REDIS_URL))
    return parser


def reproduce_command(args: argparse.Namespace) -> str:
    words = ["python", "-m", "bench.scaling", "--rounds", str(args.rounds)]
    if args.quick:
        words.append("--quick")
    if list(args.axes) != list(AXIS_NAMES):
        words += ["--axes", *args.axes]
    if list(args.loops) != list(scenarios.LOOPS):
        words += ["--loops", *args.loops]
    return " ".join(words)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sweep = sweep_from(args)
    problem = compare.rabbitmq_problem(args.amqp_url)
    if problem is not None:
        print(f"bench.scaling: {problem}; start it, or point --amqp-url at one", file=sys.stderr)
        return 1
    settings = compare.Settings(amqp_url=args.amqp_url, redis_url=args.redis_url)
    layers, skipped = compare.choose_layers(settings)
    for skip in skipped:
        print(f"bench.scaling: {skip}", file=sys.stderr)
    jobs = plan(layers, sweep)
    progress = run.ProgressBar(len(jobs), sys.stderr)
    runs: list[tuple[Job, dict[str, Any]]] = []
    interrupted = False
    try:
        for job in jobs:
            progress.start(job.describe())
            result = measure(job, sweep, progress)
            runs.append((job, result))
            progress.finish(f"{job.describe()}: {brief(job.axis, result)}")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        progress.close(interrupted)
    document = results_document(layers, sweep, runs, progress.elapsed(), reproduce_command(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    written = [args.out] if args.no_plots else [args.out, *plots.draw_all(document, args.out.parent)]
    print("\n".join(summary_tables(document)))
    print("\n".join(f"wrote {path}" for path in written))
    print(f"{len(runs)} measurements in {run.format_elapsed(progress.elapsed())}; {run.machine_facts()}")
    return run.INTERRUPTED_EXIT_STATUS if interrupted else 0


def brief(axis: Axis, result: dict[str, Any]) -> str:
    if "error" in result:
        return f"error: {result['error']}"
    return f"{result.get(axis.throughput_key)} {axis.throughput_label}, p99 {result.get('p99_us')} µs"


if __name__ == "__main__":
    sys.exit(main())
