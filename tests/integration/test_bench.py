"""``python -m bench`` (the repository's benchmark) against the real RabbitMQ (and Redis, when there is one).

One quick run of two scenarios is shared by most tests: it measures this project and every peer
it can, and is asked for an old release at a python that does not exist, which must be skipped
with the reason while the run goes on.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import pty
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import pytest

from bench.layers import SCENARIO_SCRIPT
from bench.run import ProgressBar
from tests.conftest import Broker

# python -m bench runs from the repository's root, as make bench runs it.
REPOSITORY = Path(__file__).resolve().parents[2]

THIS_PROJECT = "channels_rabbitmq (this project)"
IN_MEMORY = "InMemoryChannelLayer"
MISSING_PYTHON = "/nonexistent/python"
NUMBER = re.compile(r"^\d[\d,]*$")
RATIO = re.compile(r"^\d+\.\d\dx$")
PROGRESS_LINE = re.compile(r"^\[(\d+)/(\d+) \d+:\d\d\] round 1/1, (p2p|rtt), (.+), (asyncio|uvloop): (.+)$")
LOOPS = ("asyncio", "uvloop")


@dataclass(frozen=True)
class BenchRun:
    returncode: int
    stdout: str
    stderr: str
    json_lines: list[dict[str, object]]


def bench_command(*options: str) -> list[str]:
    return [sys.executable, "-m", "bench", *options]


def interruptible(command: list[str]) -> list[str]:
    """``command`` run with Ctrl-C's default action, even when this process ignores SIGINT.

    A program started in the background by a non-interactive shell (as CI may start the suite)
    inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler; the action set
    here survives the exec.
    """
    reset = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", reset, *command]


def bench_environment() -> dict[str, str]:
    """This environment without the variable that would add the old release on its own."""
    return {key: value for key, value in os.environ.items() if key != "OLD_CHANNELS_RABBITMQ_PYTHON"}


def free_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def markdown_table(text: str, first_title: str) -> list[dict[str, str]]:
    """The rows of the Markdown table whose first column is titled ``first_title``, by column title."""
    lines = text.splitlines()
    starts = [index for index, line in enumerate(lines) if line.startswith(f"| {first_title} |")]
    assert starts, f"no table headed {first_title!r} in:\n{text}"
    titles = [cell.strip() for cell in lines[starts[0]].strip("|").split("|")]
    rows = []
    for line in lines[starts[0] + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(titles, (cell.strip() for cell in line.strip("|").split("|")), strict=True)))
    return rows


def row_of(rows: list[dict[str, str]], first_column: str, name: str) -> dict[str, str]:
    found = [row for row in rows if row[first_column] == name]
    assert len(found) == 1, f"expected one row {name!r}, got {rows}"
    return found[0]


@pytest.fixture(scope="module")
def quick_run(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> BenchRun:
    json_out = tmp_path_factory.mktemp("bench") / "results.jsonl"
    done = subprocess.run(
        bench_command(
            "--quick",
            "--scenarios",
            "p2p",
            "rtt",
            "--loops",
            *LOOPS,
            "--amqp-url",
            broker.url,
            "--old-python",
            MISSING_PYTHON,
            "--json-out",
            str(json_out),
        ),
        cwd=REPOSITORY,
        env=bench_environment(),
        stdin=subprocess.DEVNULL,
        capture_output=True,  # bytes: text mode would turn a "\r" of a progress bar into "\n"
        timeout=150,
        check=False,
    )
    lines = json_out.read_text().splitlines() if json_out.exists() else []
    return BenchRun(
        done.returncode, done.stdout.decode(), done.stderr.decode(), [json.loads(line) for line in lines]
    )


def test_bench_succeeds_with_figures_for_this_project_and_the_in_memory_layer(quick_run: BenchRun) -> None:
    assert quick_run.returncode == 0, quick_run.stderr
    rows = markdown_table(quick_run.stdout, "Layer")
    for layer in (THIS_PROJECT, IN_MEMORY):
        row = row_of(rows, "Layer", layer)
        for column in ("p2p msgs/s", "rtt p50 µs", "rtt p99 µs"):
            assert NUMBER.match(row[column]), f"{layer}, {column}: {row[column]!r}"
    assert "many msgs/s" not in rows[0], "a scenario that was not asked for has a column"


def test_bench_prints_the_ratio_of_this_project_to_each_measured_peer(quick_run: BenchRun) -> None:
    measured = [row["Layer"] for row in markdown_table(quick_run.stdout, "Layer")]
    ratios = markdown_table(quick_run.stdout, "this project ÷ peer")
    assert [row["this project ÷ peer"] for row in ratios] == [
        f"vs {layer}" for layer in measured if layer != THIS_PROJECT
    ]
    in_memory = row_of(ratios, "this project ÷ peer", f"vs {IN_MEMORY}")
    for column in ("p2p msgs/s (↑ better)", "rtt p50 µs (↓ better)", "rtt p99 µs (↓ better)"):
        assert RATIO.match(in_memory[column]), f"{column}: {in_memory[column]!r}"


def test_redis_layers_are_measured_or_skipped_with_the_reason(quick_run: BenchRun) -> None:
    measured = {row["Layer"] for row in markdown_table(quick_run.stdout, "Layer")}
    for layer in ("RedisChannelLayer", "RedisPubSubChannelLayer"):
        skip_notes = re.findall(rf"^- skipped {layer}: (.+)$", quick_run.stdout, re.MULTILINE)
        if layer in measured:
            assert not skip_notes
        else:
            assert skip_notes, f"{layer} is neither in the table nor skipped"
            assert skip_notes[0].startswith(("not installed: pip install channels-redis", "no Redis at"))


def test_an_old_python_that_does_not_exist_is_skipped_with_the_reason(quick_run: BenchRun) -> None:
    reason = f"skipped channels_rabbitmq (PyPI): python {MISSING_PYTHON} not found"
    assert f"- {reason}" in quick_run.stdout.splitlines()
    assert f"bench: {reason}" in quick_run.stderr.splitlines()
    assert "PyPI" not in " ".join(row["Layer"] for row in markdown_table(quick_run.stdout, "Layer"))
    assert quick_run.returncode == 0


def test_progress_is_a_plain_line_per_finished_run_when_stderr_is_not_a_terminal(
    quick_run: BenchRun,
) -> None:
    layers = [row["Layer"] for row in markdown_table(quick_run.stdout, "Layer")]
    progress = [match for line in quick_run.stderr.split("\n") if (match := PROGRESS_LINE.match(line))]
    total = 2 * len(LOOPS) * len(layers)
    assert [int(match[1]) for match in progress] == list(range(1, total + 1)), quick_run.stderr
    assert {int(match[2]) for match in progress} == {total}
    assert [(match[3], match[4], match[5]) for match in progress] == [
        (scenario, layer, loop) for scenario in ("p2p", "rtt") for loop in LOOPS for layer in layers
    ]
    assert f"done: {total}/{total} runs in " in quick_run.stderr
    assert "\r" not in quick_run.stderr


def test_the_report_names_the_machine_and_the_command_that_reproduces_the_run(quick_run: BenchRun) -> None:
    machine = [line for line in quick_run.stdout.splitlines() if line.startswith("Machine: ")]
    assert len(machine) == 1
    assert f"{os.cpu_count()} CPUs" in machine[0]
    assert f"Python {platform.python_version()}" in machine[0]
    reproduce = re.findall(r"^Reproduce: `(.+)`$", quick_run.stdout, re.MULTILINE)
    assert len(reproduce) == 1
    assert " -m bench --rounds 1 --scenarios p2p rtt --quick " in reproduce[0]
    assert f"--old-python {MISSING_PYTHON}" in reproduce[0]
    assert "--amqp-url 'amqp://guest:***@" in reproduce[0], "the password must not be shown"


def test_json_out_has_every_result(quick_run: BenchRun) -> None:
    layers = [row["Layer"] for row in markdown_table(quick_run.stdout, "Layer")]
    assert [(line["scenario"], line["loop"], line["layer"]) for line in quick_run.json_lines] == [
        (scenario, loop, layer) for scenario in ("p2p", "rtt") for loop in LOOPS for layer in layers
    ]
    ours = [line for line in quick_run.json_lines if line["layer"] == THIS_PROJECT]
    assert [line.get("error") for line in ours] == [None] * 4
    assert {(line["scenario"], line["loop"]): line["n"] for line in ours} == {
        ("p2p", "asyncio"): 2000,
        ("p2p", "uvloop"): 2000,
        ("rtt", "asyncio"): 200,
        ("rtt", "uvloop"): 200,
    }


def test_each_loop_has_its_own_figures_and_ratios(quick_run: BenchRun) -> None:
    headings = [line for line in quick_run.stdout.splitlines() if line.startswith("## ")]
    assert [heading.split(" on ")[1].split(" ")[0] for heading in headings] == [
        loop for loop in LOOPS for _ in ("figures", "ratios", "CPU")
    ]
    for loop in LOOPS:
        ours = [
            line
            for line in quick_run.json_lines
            if line["layer"] == THIS_PROJECT and line["loop"] == loop and line["scenario"] == "p2p"
        ]
        section = quick_run.stdout.split(f"## Channel layers side by side on {loop} ")[1]
        row = row_of(markdown_table(section, "Layer"), "Layer", THIS_PROJECT)
        assert row["p2p msgs/s"] == f"{ours[0]['msgs_per_s']:,}"
        # The CPU of the timed phase: this process's and RabbitMQ's (the process on the AMQP port,
        # whose pid only root sees when another user runs the broker, as a system service does).
        assert ours[0]["cpu_us"] > 0
        broker_seen = "broker_cpu_us" in ours[0]
        assert broker_seen or os.geteuid() != 0
        section = quick_run.stdout.split(f"## CPU on {loop} ")[1]
        row = row_of(markdown_table(section, "Layer"), "Layer", THIS_PROJECT)
        expected = f"{round(ours[0]['cpu_us']):,}"
        if broker_seen:
            expected += f" + {round(ours[0]['broker_cpu_us']):,}"
        assert row["p2p (per message)"] == expected


def test_help_names_the_layers_and_the_options() -> None:
    done = subprocess.run(
        bench_command("--help"), cwd=REPOSITORY, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    for text in ("RedisPubSubChannelLayer", "InMemoryChannelLayer", "pip install channels-redis"):
        assert text in done.stdout
    for option in (
        "--rounds",
        "--scenarios",
        "--loops",
        "--quick",
        "--old-python",
        "--timeout",
        "--json-out",
        "--axes",
    ):
        assert option in done.stdout
    for option in ("--amqp-url", "--redis-url", "OLD_CHANNELS_RABBITMQ_PYTHON", "AMQP_URL", "REDIS_URL"):
        assert option in done.stdout


def test_the_installed_package_has_no_bench_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "channels_rabbitmq", "bench", "--help"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "invalid choice" in done.stderr


def test_an_unknown_scenario_is_refused_with_the_choices() -> None:
    done = subprocess.run(
        bench_command("--scenarios", "p2p,warp"),
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "unknown scenario warp; choose from p2p, many, groups, fanout, rtt, sync, storm" in done.stderr


def test_without_rabbitmq_the_bench_stops_at_once_and_hides_the_password() -> None:
    port = free_port()
    started = time.monotonic()
    done = subprocess.run(
        # A password with "#" and "/", which the layer accepts unencoded: it must not cut the URL short.
        bench_command("--quick", "--amqp-url", f"amqp://guest:hush#hu/sh@127.0.0.1:{port}/%2F"),
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    assert f"no RabbitMQ at amqp://guest@127.0.0.1:{port}/%2F" in done.stderr
    for part in ("hush#hu/sh", "hush%23hu", "hush"):
        assert part not in done.stdout + done.stderr
    assert time.monotonic() - started < 10


def children_mentioning(parent: int, text: str) -> list[int]:
    """Ids of the child processes of ``parent`` whose environment contains ``text`` (cheap to poll)."""
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return []
    found = []
    for child in children:
        try:
            if text.encode() in Path(f"/proc/{child}/environ").read_bytes():
                found.append(int(child))
        except OSError:
            continue
    return found


def scenario_processes_mentioning(text: str) -> list[int]:
    """Ids of the running scenarios.py processes whose environment (the layer's config) contains ``text``.

    The config, which holds the broker URL and so its password, is passed in the environment;
    the test checks that it is not on the command line, which every local user can read.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command_line = (entry / "cmdline").read_bytes()
            environment = (entry / "environ").read_bytes()
        except OSError:
            continue
        if str(SCENARIO_SCRIPT).encode() in command_line and text.encode() in environment:
            assert text.encode() not in command_line, "the layer's config is on the command line"
            found.append(int(entry.name))
    return found


def test_ctrl_c_stops_the_running_scenario_and_prints_what_was_measured(broker: Broker) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}"
    command = interruptible(
        bench_command(
            "--scenarios", "p2p", "--loops", "asyncio", "--amqp-url", broker.url, "--redis-url", dead_redis
        )
    )
    with subprocess.Popen(
        command,
        cwd=REPOSITORY,
        env=bench_environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as bench:
        try:
            # The in-memory layer runs first; then this project's, with the run's vhost in its config.
            # Its subprocess is frozen as soon as it is seen, so that it cannot finish before the
            # Ctrl-C lands, however slow the machine (the bench kills it with SIGKILL).
            deadline = time.monotonic() + 30
            while not (running := children_mentioning(bench.pid, broker.vhost)):
                assert bench.poll() is None, bench.communicate()
                assert time.monotonic() < deadline, "this project's scenario never started"
                time.sleep(0.005)
            # Frozen once the bench is surely past starting it (its Popen() returns at the child's
            # exec), long before the run can end (interpreter start, connecting, warm-up, 20,000 sends).
            time.sleep(0.2)
            os.kill(running[0], signal.SIGSTOP)
            bench.send_signal(signal.SIGINT)
            stdout, stderr = bench.communicate(timeout=30)
        finally:
            if bench.poll() is None:
                bench.kill()
                bench.communicate()
    assert bench.returncode == 130, stderr
    assert scenario_processes_mentioning(broker.vhost) == []
    assert "interrupted: 1/2 runs in " in stderr
    assert f"bench: skipped RedisChannelLayer: no Redis at {dead_redis} (" in stderr
    rows = markdown_table(stdout, "Layer")
    assert NUMBER.match(row_of(rows, "Layer", IN_MEMORY)["p2p msgs/s"])
    assert row_of(rows, "Layer", THIS_PROJECT)["p2p msgs/s"] == "n/a"
    assert "- interrupted: 1 of 2 runs done" in stdout.splitlines()


@pytest.fixture
def terminal() -> Iterator[tuple[TextIO, int]]:
    """A pseudo-terminal 40 columns wide: (the program's stream, the end that reads what it shows)."""
    reader, program_end = pty.openpty()
    fcntl.ioctl(program_end, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 40, 0, 0))
    os.set_blocking(reader, False)
    try:
        with os.fdopen(program_end, "w", encoding="utf-8") as stream:
            yield stream, reader
    finally:
        os.close(reader)


def shown_so_far(reader: int) -> str:
    """What the terminal got, with its "\r\n" for each "\n" turned back into "\n"."""
    chunks = []
    while True:
        try:
            chunk = os.read(reader, 65536)
        except OSError:  # BlockingIOError: nothing more for now
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode().replace("\r\n", "\n")


def on_screen(shown: str) -> list[str]:
    """The lines a terminal keeps: on each, every "\r" goes back to the first column and writes over."""
    screen = []
    for line in shown.split("\n"):
        visible = ""
        for part in line.split("\r"):
            visible = part + visible[len(part) :]
        screen.append(visible.rstrip())
    return screen


def test_progress_bar_redraws_one_line_in_place_on_a_terminal(terminal: tuple[TextIO, int]) -> None:
    stream, reader = terminal
    bar = ProgressBar(4, stream)
    bar.start("round 1/1, p2p, a layer whose name is longer than the terminal")
    bar.redraw()
    bar.finish("round 1/1, p2p, that layer: msgs_per_s=1 (0.1 s)")
    bar.close()
    shown = shown_so_far(reader)
    drawn = [part for part in shown.replace("\n", "\r").split("\r") if re.match(r"^\[[#-]{24}\] ", part)]
    # Cut to the 40 columns (less the last one), and padded so a shorter bar hides a longer one.
    assert [len(part) for part in drawn] == [39, 39, 39]
    assert [part.rstrip() for part in drawn] == [
        "[------------------------] 0/4 0:00 rou",
        "[------------------------] 0/4 0:00 rou",
        "[######------------------] 1/4 0:00",
    ]
    # The finished run and the last line stay, with nothing of the bar left on them.
    assert on_screen(shown) == [
        "[1/4 0:00] round 1/1, p2p, that layer: msgs_per_s=1 (0.1 s)",
        "done: 1/4 runs in 0:00",
        "",
    ]
