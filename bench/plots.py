"""Draw the benchmarks' results as PNG files: one per axis, throughput beside p99 latency (and the
end-to-end load steps: :func:`draw_e2e`).

``python -m bench --axes ...`` calls :func:`draw_all` once it has measured; this draws them again
from the JSON alone, without measuring (e.g. after changing the look)::

    python -m bench.plots docs/img/bench/scaling.json [--out-dir DIR]

Each point is the median over its rounds, with a bar from the lowest to the highest round when
there were several. This project is drawn in one colour, solid on asyncio's loop and dashed on
uvloop; each peer in a colour of its own. Uses matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # after the backend is chosen
from matplotlib.axes import Axes
from matplotlib.ticker import NullLocator

COLOURS = {"ours": "tab:red", "redis": "tab:blue", "redis-pubsub": "tab:green", "inmemory": "tab:gray"}
MARKERS = {"ours": "o", "redis": "s", "redis-pubsub": "^", "inmemory": "D"}
LINE_STYLES = {"asyncio": "-", "uvloop": "--"}
FIGURE_SIZE = (12.5, 5.2)
DPI = 110
UNITS = ((1024 * 1024, "MiB"), (1024, "KiB"))


def file_name(axis_name: str) -> str:
    return f"scaling-{axis_name}.png"


def bytes_label(value: int) -> str:
    """100 B, 1 KiB, 10 KiB, 1 MiB."""
    for factor, unit in UNITS:
        if value >= factor and value % factor == 0:
            return f"{value // factor} {unit}"
    return f"{value} B"


def tick_label(axis_name: str, value: int) -> str:
    return bytes_label(value) if axis_name == "size" else f"{value:,}"


def draw_curve(panel: Axes, series: dict[str, Any], key: str, scale: float, label: str) -> None:
    """One series on one panel: medians joined by a line, bars from the lowest to the highest round."""
    xs, medians, below, above = [], [], [], []
    for point in series["points"]:
        values = [run[key] * scale for run in point["runs"] if isinstance(run.get(key), (int, float))]
        if values:
            middle = statistics.median(values)
            xs.append(point["x"])
            medians.append(middle)
            below.append(middle - min(values))
            above.append(max(values) - middle)
    layer, loop = series["layer"], series["loop"]
    style: dict[str, Any] = {"color": COLOURS.get(layer, "tab:purple"), "marker": MARKERS.get(layer, "v")}
    style |= {"linestyle": LINE_STYLES.get(loop, ":"), "capsize": 3, "markersize": 5, "linewidth": 1.6}
    if xs:
        panel.errorbar(xs, medians, yerr=[below, above], label=label, **style)


def series_label(axis_name: str, series: dict[str, Any]) -> str:
    """The legend's name of a series, with the points where every round failed."""
    label = f"{series['layer_label']} {series['version']}, {series['loop']}"
    failed = [point["x"] for point in series["points"] if point["errors"] and point["throughput"] is None]
    if failed:
        label += f" (failed at {', '.join(tick_label(axis_name, x) for x in failed)})"
    return label


def style_panel(panel: Axes, axis: dict[str, Any], y_label: str) -> None:
    points = [point["x"] for point in axis["series"][0]["points"]] if axis["series"] else []
    if axis["log_x"]:
        panel.set_xscale("log")
    panel.set_yscale("log")
    panel.set_xticks(points, [tick_label(axis["name"], x) for x in points])
    panel.xaxis.set_minor_locator(NullLocator())  # the points are the ticks
    panel.set_xlabel(axis["x_label"])
    panel.set_ylabel(y_label)
    panel.grid(True, which="both", alpha=0.3)


def rounds_note(document: dict[str, Any], axis: dict[str, Any]) -> str:
    rounds = document["sweep"]["rounds"]
    note = f"median of {rounds} round{'s' if rounds > 1 else ''}, bars: lowest to highest"
    if axis["single_round_from"] is not None and rounds > 1:
        note += f"; {axis['single_round_from']:,} and more: 1 round"
    return note


def draw_axis(document: dict[str, Any], axis: dict[str, Any], path: Path) -> Path:
    """The PNG of one axis: throughput (left) and p99 latency (right), both on log scales."""
    figure, (left, right) = plt.subplots(1, 2, figsize=FIGURE_SIZE)
    for series in axis["series"]:
        label = series_label(axis["name"], series)
        draw_curve(left, series, axis["throughput_key"], 1.0, label)
        draw_curve(right, series, "p99_us", 1e-3, label)
    style_panel(left, axis, f"throughput ({axis['throughput_label']}, log)")
    style_panel(right, axis, "p99 one-way latency (ms, log)")
    left.set_title("Throughput (higher is better)", fontsize=10)
    right.set_title("p99 latency, one message at a time (lower is better)", fontsize=10)
    quick = ", quick mode" if document["sweep"]["quick"] else ""
    figure.suptitle(f"{axis['title']}: {axis['what']}", fontsize=12)
    note = f"{document['machine']}; RabbitMQ and Redis on the same machine; "
    note += f"{rounds_note(document, axis)}{quick}"
    figure.text(0.5, 0.905, note, ha="center", fontsize=8.5, color="dimgray")
    handles, labels = left.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=8.5, frameon=False)
    figure.tight_layout(rect=(0, 0.1, 1, 0.9))
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


def draw_all(document: dict[str, Any], out_dir: Path) -> list[Path]:
    """One PNG per axis of the document, in ``out_dir``; their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [draw_axis(document, axis, out_dir / file_name(axis["name"])) for axis in document["axes"]]


def draw_e2e(results: list[dict[str, Any]], path: Path, knee_p99_ms: float) -> Path:
    """The load steps as a PNG: p99 latency and total CPU per delivered message against the rate,
    a line per layer and loop (medians over rounds)."""
    from bench.e2e import BASELINE, median, total_cpu

    figure, (latency, cpu) = plt.subplots(1, 2, figsize=(12.5, 5), dpi=110)
    runs = [r for r in results if r["mode"] == "load"]
    colours = {"channels_rabbitmq": "tab:red", BASELINE: "tab:green", "Redis core": "tab:blue"}
    for name in dict.fromkeys(r["layer"] for r in runs):
        colour = colours.get(name, "tab:gray")
        for loop, style in (("uvloop", "-"), ("asyncio", "--")):
            mine = [r for r in runs if r["layer"] == name and r["loop"] == loop]
            rates = sorted({r["rate"] for r in mine})
            if not rates:
                continue
            cells = [[r for r in mine if r["rate"] == rate] for rate in rates]
            for panel, read in ((latency, lambda r: r["p99_ms"]), (cpu, total_cpu)):
                medians = [median([read(r) for r in cell]) for cell in cells]
                panel.plot(rates, medians, style, color=colour, label=f"{name} ({loop})")
    latency.axhline(knee_p99_ms, color="gray", linewidth=0.8)
    latency.set(yscale="log", xlabel="messages per second", ylabel="p99 latency, ms (log)")
    cpu.set(xlabel="messages per second", ylabel="CPU µs per delivered message (servers + broker)")
    for panel in (latency, cpu):
        panel.grid(alpha=0.3)
    latency.legend(fontsize="small")
    figure.suptitle("A websocket chat on two uvicorn servers (python -m bench e2e)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__)
    parser.add_argument("results", type=Path, help="the JSON file written by python -m bench --axes")
    parser.add_argument("--out-dir", type=Path, help="where the PNG files go (default: beside the JSON)")
    args = parser.parse_args(argv)
    document = json.loads(args.results.read_text(encoding="utf-8"))
    for path in draw_all(document, args.out_dir or args.results.parent):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
