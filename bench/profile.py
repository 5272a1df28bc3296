"""Where the time goes per message: this layer in one scenario, sampled by py-spy, by stage.

    python -m bench.profile                       # p2p, rtt, fanout and sync, on asyncio and uvloop
    python -m bench.profile --scenarios p2p --loops uvloop --n 50000

Each (scenario, loop) runs ``scenarios.py`` once under ``py-spy record --gil``: only the thread
holding the GIL is sampled, so a sample is CPU time spent in Python (C code called from Python,
msgpack's or the socket's, counts for the Python frame that called it). Each sample's stack is
read from its innermost frame outwards, and the first frame that a rule below recognises names
the stage. Samples of the start (imports) are left out. The broker's own CPU time is read from
/proc for the process listening on the AMQP port, when it runs on this machine.

The table gives, per stage, its share of the samples and microseconds per message (samples times
the sampling interval, divided by the messages: deliveries for fanout, calls for sync, one way of
a round trip for rtt counts as one message each way).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import compare, scenarios
from channels_rabbitmq.config import parse_amqp_url

#: Stages in the order of a message's path, then the rest.
STAGES = (
    "encode",
    "frame",
    "write",
    "confirm",
    "read",
    "parse",
    "route",
    "ack",
    "wake-up",
    "layer calls",
    "harness",
    "other",
)

#: (stage, path fragment, function names or None for any): the first rule that matches a frame wins.
RULES: tuple[tuple[str, str, frozenset[str] | None], ...] = (
    ("encode", "channels_rabbitmq/codec.py", frozenset({"encode", "encode_message", "seal"})),
    ("encode", "channels_rabbitmq/serializers.py", None),
    ("encode", "channels_rabbitmq/encryption.py", None),
    ("parse", "channels_rabbitmq/codec.py", None),
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
MESSAGES_PER_RESULT = {
    "p2p": lambda result: result["n"],
    "many": lambda result: result["n"],
    "fanout": lambda result: result["n"] * result["members"],
    "rtt": lambda result: 2 * result["n"],
    "sync": lambda result: result["n"],
}
PROFILE_N = {"p2p": 50_000, "many": 50_000, "fanout": 200, "rtt": 5_000, "sync": 1_000}


@dataclass(frozen=True)
class Frame:
    function: str
    path: str


def parse_frame(text: str) -> Frame:
    """py-spy's ``function (path:line)``."""
    function, _, rest = text.partition(" (")
    return Frame(function, rest.rpartition(":")[0])


def stage_of(stack: Sequence[Frame]) -> str | None:
    """The stage of one sample (innermost frame last), or None for the start of the program."""
    if any(marker in frame.path for frame in stack for marker in START_MARKERS):
        return None
    for frame in reversed(stack):
        name = frame.function.rpartition(".")[2]  # py-spy names a method Class.method
        for stage, fragment, functions in RULES:
            if fragment in frame.path and (functions is None or name in functions):
                return stage
    return "other"


def stage_samples(raw: str) -> Counter[str]:
    """Samples per stage from py-spy's raw output (``frame;frame;... count`` per line)."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not stack_text or not count.isdigit():
            continue
        stack = [parse_frame(part) for part in stack_text.split(";")]
        # py-spy starts each stack with the thread's name when it can: not a frame.
        stack = [frame for frame in stack if frame.path]
        stage = stage_of(stack)
        if stage is not None:
            counts[stage] += int(count)
    return counts


def broker_pid(port: int) -> int | None:
    """The process listening on ``port`` on this machine (the broker), if we may see it."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                inodes.add(fields[9])
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd).removeprefix("socket:[").removesuffix("]") in inodes:
                    return int(entry.name)
        except OSError:
            continue
    return None


def cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Profile:
    scenario: str
    loop: str
    result: dict[str, object]
    samples: Counter[str]
    rate: int
    broker_cpu: float | None

    def messages(self) -> int:
        return int(MESSAGES_PER_RESULT[self.scenario](self.result))

    def micros_per_message(self, samples: int) -> float:
        return samples / self.rate / self.messages() * 1e6


def profile_one(scenario: str, loop: str, n: int, rate: int, amqp_url: str, py_spy: str) -> Profile:
    config = {"host": amqp_url, "remote_capacity": 100000, "local_capacity": 10000, "capacity": 100000}
    pid = broker_pid(parse_amqp_url(amqp_url).port)
    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / "samples.txt"
        command = [
            py_spy,
            "record",
            "--gil",
            "--nonblocking",
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--output",
            str(raw),
            "--",
            sys.executable,
            str(compare.SCENARIO_SCRIPT),
            "--layer",
            compare.RABBITMQ_CLASS,
            "--scenario",
            scenario,
            "--loop",
            loop,
            "--n",
            str(n),
        ]
        before = cpu_seconds(pid)
        done = subprocess.run(
            command,
            env={**os.environ, scenarios.CONFIG_VARIABLE: json.dumps(config)},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        after = cpu_seconds(pid)
        result = compare.last_json_line(done.stdout)
        if result is None or "error" in result or not raw.exists():
            reason = result.get("error") if result else compare.last_line(done.stderr)
            raise RuntimeError(f"{scenario} on {loop}: {reason}")
        samples = stage_samples(raw.read_text())
    broker = None if before is None or after is None else after - before
    return Profile(scenario, loop, result, samples, rate, broker)


def table(profiles: list[Profile]) -> list[str]:
    """One Markdown table: a column per (scenario, loop), µs per message per stage."""
    titles = [f"{profile.scenario} {profile.loop}" for profile in profiles]
    lines = [
        "| µs per message | " + " | ".join(titles) + " |",
        "|---|" + "---:|" * len(profiles),
    ]
    for stage in STAGES:
        cells = [
            f"{profile.micros_per_message(profile.samples[stage]):.1f} "
            f"({100 * profile.samples[stage] / max(1, sum(profile.samples.values())):.0f}%)"
            for profile in profiles
        ]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    totals = [f"**{profile.micros_per_message(sum(profile.samples.values())):.1f}**" for profile in profiles]
    lines.append("| **Python, in all** | " + " | ".join(totals) + " |")
    broker = [
        "n/a" if profile.broker_cpu is None else f"{profile.broker_cpu / profile.messages() * 1e6:.1f}"
        for profile in profiles
    ]
    lines.append("| broker CPU (whole run) | " + " | ".join(broker) + " |")
    wall = [wall_figure(profile) for profile in profiles]
    lines.append("| the run's own figure | " + " | ".join(wall) + " |")
    return lines


def wall_figure(profile: Profile) -> str:
    for key, unit in (
        ("msgs_per_s", "msgs/s"),
        ("deliveries_per_s", "deliveries/s"),
        ("calls_per_s", "calls/s"),
    ):
        if key in profile.result:
            return f"{profile.result[key]:,} {unit}"
    return f"p50 {profile.result.get('p50_us')} µs"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--scenarios", nargs="+", choices=list(PROFILE_N), default=["p2p", "rtt", "fanout", "sync"]
    )
    parser.add_argument("--loops", nargs="+", choices=scenarios.LOOPS, default=list(scenarios.LOOPS))
    parser.add_argument("--n", type=int, help="messages per run (default: per scenario, large)")
    parser.add_argument("--rate", type=int, default=1000, help="samples per second (default: 1000)")
    parser.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", compare.DEFAULT_AMQP_URL))
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        print("bench.profile: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 1
    profiles = []
    for scenario in args.scenarios:
        for loop in args.loops:
            print(f"bench.profile: {scenario} on {loop}...", file=sys.stderr, flush=True)
            n = args.n or PROFILE_N[scenario]
            profiles.append(profile_one(scenario, loop, n, args.rate, args.amqp_url, py_spy))
    print("\n".join(table(profiles)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
