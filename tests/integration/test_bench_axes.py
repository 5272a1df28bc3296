"""``python -m bench --axes all --quick`` (make bench-plots, small) against the real RabbitMQ and Redis.

One quick sweep, on asyncio's loop only to stay within about a minute, is shared by the tests: its
JSON must hold every axis, every measured layer and every point, with figures, and each axis must
be drawn as a PNG file; ``python -m bench.plots`` must draw them again from the JSON alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Broker

REPOSITORY = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIN_PNG_BYTES = 20_000  # two panels of curves, axes and a legend; an empty figure is far smaller
QUICK_POINTS = {"size": [100, 10240], "groups": [1, 100], "channels": [10, 100], "servers": [1, 2]}
THIS_PROJECT = "channels_rabbitmq (this project)"
IN_MEMORY = "InMemoryChannelLayer"
REDIS_LAYERS = ("RedisChannelLayer", "RedisPubSubChannelLayer")

# The shared sweep runs in the first test's time.
pytestmark = pytest.mark.timeout(200)


@dataclass(frozen=True)
class Sweep:
    returncode: int
    stdout: str
    stderr: str
    out_dir: Path
    document: dict[str, Any]


@pytest.fixture(scope="module")
def quick_sweep(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    out_dir = tmp_path_factory.mktemp("scaling")
    results = out_dir / "scaling.json"
    done = subprocess.run(
        [
            *(
                sys.executable,
                "-m",
                "bench",
                "--axes",
                "all",
                "--quick",
                "--rounds",
                "1",
                "--loops",
                "asyncio",
            ),
            *("--out", str(results), "--amqp-url", broker.url),
        ],
        cwd=REPOSITORY,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    document = json.loads(results.read_text()) if results.exists() else {}
    return Sweep(done.returncode, done.stdout, done.stderr, out_dir, document)


def series_by_layer(axis: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {series["layer_label"]: series for series in axis["series"]}


def test_the_json_has_every_axis_layer_and_point_with_figures(quick_sweep: Sweep) -> None:
    assert quick_sweep.returncode == 0, quick_sweep.stderr
    axes = {axis["name"]: axis for axis in quick_sweep.document["axes"]}
    assert list(axes) == list(QUICK_POINTS)
    redis_measured = all(f"skipped {layer}" not in quick_sweep.stderr for layer in REDIS_LAYERS)
    for name, axis in axes.items():
        layers = series_by_layer(axis)
        expected = {THIS_PROJECT, *(REDIS_LAYERS if redis_measured else ())}
        if name == "size":  # the in-memory layer is the reference there only
            expected.add(IN_MEMORY)
        assert set(layers) == expected, name
        for label, series in layers.items():
            assert series["loop"] == "asyncio"
            assert [point["x"] for point in series["points"]] == QUICK_POINTS[name]
            for point in series["points"]:
                where = f"{name}={point['x']}, {label}"
                assert point["errors"] == [], where
                assert point["throughput"] > 0, where
                assert 0 < point["p50_us"] <= point["p99_us"], where
                (only_run,) = point["runs"]
                assert only_run[axis["throughput_key"]] == point["throughput"], where


def test_the_figures_mean_what_they_say(quick_sweep: Sweep) -> None:
    """Counts behind the figures: each run sent messages and timed every latency probe."""
    for axis in quick_sweep.document["axes"]:
        for series in axis["series"]:
            for point in series["points"]:
                (only_run,) = point["runs"]
                assert only_run["n"] >= 1
                if axis["name"] == "servers":
                    # Every probe is timed in every member of every receiver process.
                    assert only_run["latency_n"] == 20 * 10 * point["x"]
                    assert only_run["processes"] == point["x"]
                else:
                    assert only_run["latency_n"] == 20
                if axis["name"] == "channels" and series["layer"] == "ours":
                    assert only_run["setup_s"] > 0


def test_each_axis_is_drawn_as_a_png(quick_sweep: Sweep) -> None:
    for name in QUICK_POINTS:
        path = quick_sweep.out_dir / f"scaling-{name}.png"
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC), path
        assert len(data) > MIN_PNG_BYTES, (path, len(data))
        assert f"wrote {path}" in quick_sweep.stdout


def test_the_plots_are_drawn_again_from_the_json_alone(quick_sweep: Sweep, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "bench.plots", str(quick_sweep.out_dir / "scaling.json")),
            *("--out-dir", str(tmp_path)),
        ],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for name in QUICK_POINTS:
        redrawn = (tmp_path / f"scaling-{name}.png").read_bytes()
        assert redrawn.startswith(PNG_MAGIC)
        assert len(redrawn) > MIN_PNG_BYTES


def test_the_summary_tables_name_every_series(quick_sweep: Sweep) -> None:
    for axis in quick_sweep.document["axes"]:
        assert f"### {axis['title']}: " in quick_sweep.stdout
        for series in axis["series"]:
            assert f"| {series['label']} | " in quick_sweep.stdout
