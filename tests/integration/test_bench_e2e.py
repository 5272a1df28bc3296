"""``python -m bench e2e``: real uvicorn servers and websocket clients, against the real RabbitMQ.

A small run of each mode, on both loops, for this layer only (the peers' runs are the same code
with another backend): every expected delivery arrives, and the tables and the JSON lines carry
each figure the scenario promises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Broker

REPOSITORY = Path(__file__).resolve().parents[2]
LOOPS = ("asyncio", "uvloop")

pytestmark = pytest.mark.timeout(180)


def run_e2e(broker: Broker, json_out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "bench", "e2e", "--layers", "channels_rabbitmq", "--loops", *LOOPS]
    return subprocess.run(
        [*command, "--json-out", str(json_out), *options],
        cwd=REPOSITORY,
        env={**os.environ, "AMQP_URL": broker.url},
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )


def test_load_steps_deliver_everything_and_report_latency_cpu_and_the_knee(
    broker: Broker, tmp_path: Path
) -> None:
    json_out = tmp_path / "e2e.jsonl"
    png = tmp_path / "e2e.png"
    done = run_e2e(
        broker, json_out, "--rates", "40", "80", "--seconds", "1", "--clients", "8", "--plot", str(png)
    )
    assert done.returncode == 0, done.stderr
    assert png.read_bytes().startswith(b"\x89PNG")
    results = [json.loads(line) for line in json_out.read_text().splitlines()]
    assert [(r["loop"], r["rate"]) for r in results] == [(loop, rate) for loop in LOOPS for rate in (40, 80)]
    for result in results:
        assert result["expected"] == result["delivered"] > 0  # rooms of 4: each message reaches 4 clients
        assert result["share"] == 1.0
        assert 0 < result["p50_ms"] <= result["p99_ms"]
        assert result["servers_cpu_us"] > 0
        assert result["broker_cpu_us"] is not None  # the broker's process was found and read
    for loop in LOOPS:
        assert f"### Load, servers on {loop}" in done.stdout
    assert "| channels_rabbitmq | 80 | 100.00 |" in done.stdout
    assert "Knee (highest rate, all delivered, p99 < 50 ms): channels_rabbitmq " in done.stdout
    # The same tables again from the JSON lines alone, without measuring.
    again = subprocess.run(
        [sys.executable, "-m", "bench", "e2e", "--from-json", str(json_out)],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert again.stdout.split("Command:")[0] == done.stdout.split("Plot:")[0]


def test_a_connect_storm_accepts_and_echoes_every_client(broker: Broker, tmp_path: Path) -> None:
    json_out = tmp_path / "storm.jsonl"
    done = run_e2e(broker, json_out, "--storm", "40")
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in json_out.read_text().splitlines()]
    assert [r["loop"] for r in results] == list(LOOPS)
    for result in results:
        assert result["connected"] == result["echoed"] == 40
        assert 0 < result["echo_p50_ms"] <= result["echo_p99_ms"]
    assert "### Connect storm, servers on uvloop" in done.stdout
