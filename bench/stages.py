"""Where the time goes per message (``python -m bench --profile``): py-spy's samples, by stage.

Each run of this project's layer goes under ``py-spy record --gil``: only the thread holding the
GIL is sampled, so a sample is CPU time spent in Python (C code called from Python, msgpack's or
the socket's, counts for the Python frame that called it). A sample's stack is read from its
innermost frame outwards; the first frame that a rule below recognises names the stage. Samples
of the start (imports) are left out. The broker's CPU time comes from the process listening on
the AMQP port, when it runs on this machine and may be seen (psutil).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

#: Stages in the order of a message's path, then the rest.
STAGES = (
    *("encode", "frame", "write", "confirm", "read", "parse", "route", "ack", "wake-up"),
    *("layer calls", "harness", "other"),
)
#: (stage, path fragment, function names or None for any): the first rule that matches a frame wins.
RULES: tuple[tuple[str, str, frozenset[str] | None], ...] = (
    ("encode", "channels_rabbitmq/wire/codec.py", frozenset({"encode", "encode_message", "seal"})),
    ("encode", "channels_rabbitmq/wire/serializers.py", None),
    ("encode", "channels_rabbitmq/wire/encryption.py", None),
    ("parse", "channels_rabbitmq/wire/", None),
    ("ack", "channels_rabbitmq/link/inbound.py", frozenset({"ack", "_ack_now"})),
    ("ack", "channels_rabbitmq/amqp/protocol.py", frozenset({"ack"})),
    ("frame", "channels_rabbitmq/amqp/protocol.py", frozenset({"publish"})),
    ("frame", "channels_rabbitmq/amqp/frames.py", frozenset({"encode_publish", "encode_ack"})),
    ("parse", "channels_rabbitmq/amqp/frames.py", None),
    ("parse", "channels_rabbitmq/amqp/protocol.py", None),
    ("confirm", "channels_rabbitmq/amqp/channels.py", None),
    ("write", "channels_rabbitmq/amqp/flow.py", None),
    ("write", "asyncio/selector_events.py", frozenset({"write", "_write_ready", "_write_send"})),
    ("read", "asyncio/selector_events.py", None),
    ("read", "channels_rabbitmq/amqp/connection.py", frozenset({"data_received"})),
    ("write", "channels_rabbitmq/amqp/connection.py", frozenset({"_write"})),
    ("route", "channels_rabbitmq/link/inbound.py", None),
    ("route", "channels_rabbitmq/routing.py", None),
    ("layer calls", "channels_rabbitmq/", None),
    ("harness", "bench/scenarios.py", None),
    ("harness", "asgiref/", None),
    ("harness", "concurrent/futures/", None),
    ("harness", "threading.py", None),
    ("wake-up", "asyncio/", None),
    ("wake-up", "uvloop/", None),
    ("wake-up", "selectors.py", None),
    ("wake-up", "contextvars", None),
)
START_MARKERS = ("<frozen importlib._bootstrap", "importlib/__init__.py")


def command(rate: int, output: str) -> list[str]:
    """What goes before a run's command line to sample it (py-spy of this virtualenv, else of the PATH)."""
    beside = Path(sys.executable).with_name("py-spy")
    py_spy = str(beside) if beside.exists() else shutil.which("py-spy") or "py-spy"
    return [
        py_spy,
        "record",
        "--gil",
        "--nonblocking",
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--output",
        output,
        "--",
    ]


def stage_of(stack: list[tuple[str, str]]) -> str | None:
    """The stage of one sample, (function, path) innermost last; None for the start of the program."""
    if any(marker in path for _, path in stack for marker in START_MARKERS):
        return None
    for function, path in reversed(stack):
        name = function.rpartition(".")[2]  # py-spy names a method Class.method
        for stage, fragment, functions in RULES:
            if fragment in path and (functions is None or name in functions):
                return stage
    return "other"


def stage_samples(raw: str) -> dict[str, int]:
    """Samples per stage from py-spy's raw output (``function (path:line);... count`` per line)."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack_text, _, count = line.rpartition(" ")
        if stack_text and count.isdigit():
            frames = [part.partition(" (") for part in stack_text.split(";")]
            # py-spy starts each stack with the thread's name when it can: not a frame.
            stack = [(function, rest.rpartition(":")[0]) for function, _, rest in frames if rest]
            if (stage := stage_of(stack)) is not None:
                counts[stage] += int(count)
    return dict(counts)


def broker_process(port: int) -> psutil.Process | None:
    """The process listening on ``port`` on this machine (the broker), if it may be seen."""
    with contextlib.suppress(psutil.Error):
        for connection in psutil.net_connections("tcp"):
            address = connection.laddr
            if (
                connection.status == psutil.CONN_LISTEN
                and address
                and address.port == port
                and connection.pid
            ):
                return psutil.Process(connection.pid)
    return None


def cpu_seconds(process: psutil.Process | None) -> float | None:
    """User and system CPU seconds of a process so far, or None."""
    with contextlib.suppress(psutil.Error, AttributeError):
        times = process.cpu_times()  # type: ignore[union-attr]
        return float(times.user + times.system)
    return None


def messages(result: dict[str, Any]) -> int:
    """The messages of a run: deliveries for fanout, one each way of a round trip, calls, joins."""
    scenario, n = result["scenario"], int(result.get("n", 0))
    return n * int(result.get("members", 1)) if scenario == "fanout" else 2 * n if scenario == "rtt" else n


def table(results: list[dict[str, Any]]) -> list[str]:
    """A Markdown table: a column per profiled run, µs per message per stage (and share)."""
    runs = [result for result in results if "stages" in result and messages(result)]
    if not runs:
        return []
    lines = ["| µs per message | " + " | ".join(f"{r['scenario']} {r['loop']}" for r in runs) + " |"]
    lines.append("|---|" + "---:|" * len(runs))
    for stage in (*STAGES, "Python, in all"):
        cells = []
        for run in runs:
            total = sum(run["stages"].values())
            samples = total if stage not in STAGES else run["stages"].get(stage, 0)
            micros = samples / run["sample_rate"] / messages(run) * 1e6
            cells.append(f"{micros:.1f} ({100 * samples / max(1, total):.0f}%)")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    broker = [
        f"{run['broker_cpu_s'] / messages(run) * 1e6:.1f}" if run.get("broker_cpu_s") else "n/a"
        for run in runs
    ]
    return [*lines, "| broker CPU µs per message | " + " | ".join(broker) + " |", ""]
