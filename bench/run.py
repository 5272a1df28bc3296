"""Measure this layer beside its peers on this machine: a progress bar, then Markdown tables.

Run from the repository's root: python -m bench [options], or make bench, which also starts a
private RabbitMQ when none answers at $AMQP_URL.

Layers compared, each in a fresh subprocess per (round, scenario, layer):

  channels_rabbitmq (this project)  at --amqp-url, from this interpreter
  InMemoryChannelLayer              always (channels is a dependency); no I/O, one shared instance
  RedisChannelLayer                 when channels_redis is installed (pip install channels-redis, or
  RedisPubSubChannelLayer           this project's "bench" extra) and a Redis answers at --redis-url
  channels_rabbitmq (PyPI)          with --old-python: the python of a virtualenv that holds the
                                    released package (it has this project's import name, so it
                                    needs a virtualenv of its own)

A peer that cannot be measured is skipped, with one line saying why. Both RabbitMQ layers run
with remote_capacity=100000 and local_capacity=10000 (and this project with capacity=100000, like
the other layers), so the timed sends never hit ChannelFull nor a full channel.

Scenarios (default sizes in brackets; --quick makes every N 5 to 10 times smaller):

  p2p     N messages [20,000] from one instance to one channel of another, 50 sends in flight
  many    the same, spread round-robin over 100 channels of the receiver
  fanout  N group_send() [50] one after another, to 500 members on each of 2 receiver instances
  rtt     ping-pong between two instances, N round trips [2,000]: median and p99 latency
  sync    N async_to_sync(group_send) calls [300] from a plain thread

Every layer runs every scenario on each event loop of --loops: asyncio's own and uvloop (which
uvicorn uses when it is installed), and the tables come once per loop.

Rounds are interleaved, and each cell of the tables is the median over the rounds. The progress
goes to stderr (a bar redrawn in place on a terminal, else one line per finished run); the
tables go to stdout, in Markdown: the figures per layer, then this project's figures divided by
each peer's, then the machine and the command line that reproduces the run.

Examples:

  python -m bench                          # one round, full sizes
  python -m bench --quick --scenarios p2p rtt
  python -m bench --rounds 3 > bench.md
  python3 -m venv /tmp/peers && /tmp/peers/bin/pip install channels-rabbitmq==4.0.1
  python -m bench --rounds 3 --old-python /tmp/peers/bin/python
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from bench import compare, scenarios

INTERRUPTED_EXIT_STATUS = 130
BAR_WIDTH = 24
DEFAULT_TERMINAL_WIDTH = 80


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m bench``, with this module's docstring as the help's description."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the benchmark; the exit status (1: no broker, 130: Ctrl-C).
    ``python -m bench e2e ...`` runs the end-to-end scenario instead (:mod:`bench.e2e`)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["e2e"]:
        from bench import e2e

        return e2e.main(arguments[1:])
    return run(build_parser().parse_args(arguments))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        metavar="N",
        help="interleaved rounds; each cell is the median over them (default: 1)",
    )
    parser.add_argument(
        "--scenarios",
        nargs="+",
        type=scenario_names,
        default=[list(compare.SCENARIO_NAMES)],
        metavar="NAME",
        help=f"a subset of {', '.join(compare.SCENARIO_NAMES)}, as 'p2p rtt' or 'p2p,rtt' (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes everywhere, for a smoke run")
    parser.add_argument(
        "--old-python",
        default=os.environ.get(compare.OLD_PYTHON_ENV, ""),
        metavar="PYTHON",
        help="python of a virtualenv holding the PyPI channels_rabbitmq, to measure it too "
        f"(default: ${compare.OLD_PYTHON_ENV}, else left out)",
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=compare.DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"limit of one scenario run (default: {compare.DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--loops",
        nargs="+",
        choices=scenarios.LOOPS,
        default=list(scenarios.LOOPS),
        metavar="LOOP",
        help=f"event loops to measure every layer on, of {', '.join(scenarios.LOOPS)} (default: both)",
    )
    parser.add_argument(
        "--json-out", type=Path, metavar="FILE", help="also write every result to FILE, one JSON line each"
    )
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("AMQP_URL", compare.DEFAULT_AMQP_URL),
        metavar="URL",
        help="the RabbitMQ of both RabbitMQ layers "
        f"(default: $AMQP_URL, else {percent_escaped(compare.DEFAULT_AMQP_URL)})",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", compare.DEFAULT_REDIS_URL),
        metavar="URL",
        help="the Redis of the channels_redis layers "
        f"(default: $REDIS_URL, else {percent_escaped(compare.DEFAULT_REDIS_URL)})",
    )


def percent_escaped(text: str) -> str:
    """Text for an argparse help string, which is %-formatted."""
    return text.replace("%", "%%")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def scenario_names(text: str) -> list[str]:
    """One --scenarios word, which may hold several names separated by commas."""
    names = [name for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in compare.SCENARIO_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown scenario {', '.join(unknown)}; choose from {', '.join(compare.SCENARIO_NAMES)}"
        )
    return names


def settings_from(args: argparse.Namespace) -> compare.Settings:
    asked = {name for names in args.scenarios for name in names}
    return compare.Settings(
        rounds=args.rounds,
        # The order of the tables, whatever the order on the command line.
        scenarios=tuple(name for name in compare.SCENARIO_NAMES if name in asked),
        quick=args.quick,
        old_python=args.old_python,
        timeout=args.timeout,
        amqp_url=args.amqp_url,
        redis_url=args.redis_url,
        loops=tuple(loop for loop in scenarios.LOOPS if loop in args.loops),
    )


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    progress_stream = sys.stderr
    problem = compare.rabbitmq_problem(settings.amqp_url)
    if problem is not None:
        print(f"bench: {problem}; start it, or point --amqp-url at one", file=progress_stream)
        return 1
    print("bench: checking which layers can be measured here...", file=progress_stream, flush=True)
    layers, skipped = compare.choose_layers(settings)
    for skip in skipped:
        print(f"bench: {skip}", file=progress_stream)
    measured = ", ".join(
        spec.label if spec.version and spec.version in spec.label else f"{spec.label} {spec.version or '?'}"
        for spec in layers
    )
    print(f"bench: measuring {measured}", file=progress_stream, flush=True)

    runs = compare.plan(layers, settings)
    results = compare.Results()
    progress = ProgressBar(len(runs), progress_stream)
    interrupted = False
    with json_lines(args.json_out) as json_out:
        try:
            for bench_run in runs:
                what = bench_run.describe(settings.rounds)
                progress.start(what)
                result = compare.run_one(bench_run, settings, while_waiting=progress.redraw)
                results.add(bench_run, result)
                progress.finish(f"{what}: {compare.summary(result)}")
                if json_out is not None:
                    json_out.write(json.dumps(result) + "\n")
                    json_out.flush()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            progress.close(interrupted)

    lines = compare.report(layers, results, settings, progress.elapsed(), skipped)
    if interrupted:
        lines.append(f"- interrupted: {results.count()} of {len(runs)} runs done")
    lines += ["", machine_facts(), "", f"Reproduce: `{reproduce_command(settings)}`"]
    print("\n".join(lines), flush=True)
    return INTERRUPTED_EXIT_STATUS if interrupted else 0


@contextlib.contextmanager
def json_lines(path: Path | None) -> Iterator[TextIO | None]:
    if path is None:
        yield None
        return
    with path.open("w", encoding="utf-8") as stream:
        yield stream


def machine_facts() -> str:
    return (
        f"Machine: {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()} ({platform.python_implementation()})"
    )


def reproduce_command(settings: compare.Settings) -> str:
    """The command line of this run, with every setting spelled out (passwords hidden)."""
    words = [shown_path(sys.executable), "-m", "bench", "--rounds", str(settings.rounds)]
    if settings.scenarios != compare.SCENARIO_NAMES:
        words += ["--scenarios", *settings.scenarios]
    if settings.quick:
        words.append("--quick")
    if settings.loops != scenarios.LOOPS:
        words += ["--loops", *settings.loops]
    if settings.timeout != compare.DEFAULT_TIMEOUT:
        words += ["--timeout", f"{settings.timeout:g}"]
    if settings.old_python:
        words += ["--old-python", settings.old_python]
    if settings.amqp_url != compare.DEFAULT_AMQP_URL:
        words += ["--amqp-url", compare.without_password(settings.amqp_url)]
    if settings.redis_url != compare.DEFAULT_REDIS_URL:
        words += ["--redis-url", compare.without_password(settings.redis_url)]
    return shlex.join(words)


def shown_path(path: str) -> str:
    """The path relative to the working folder when it is below it, else as it is."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive
        return path
    return path if relative.startswith("..") else relative


def format_elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def terminal_width(stream: TextIO) -> int:
    """Columns of the terminal behind the stream; a terminal that does not say counts as 80."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        columns = 0
    return columns or DEFAULT_TERMINAL_WIDTH


class ProgressBar:
    """Progress of the runs: one line redrawn in place on a terminal, else a plain line per run.

    Each finished run gets a line of its own in both cases (its figures, or its error); on a
    terminal the bar stays under them, with the count, the elapsed time and the run going on.
    """

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.done = 0
        self.stream = stream
        self.live = stream.isatty()
        self.running = ""
        self._started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def start(self, what: str) -> None:
        self.running = what
        self.redraw()

    def redraw(self) -> None:
        """Draw the bar again (on a terminal; elsewhere it is not drawn)."""
        if not self.live:
            return
        filled = BAR_WIDTH * self.done // self.total if self.total else BAR_WIDTH
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        line = f"[{bar}] {self.done}/{self.total} {format_elapsed(self.elapsed())} {self.running}"
        self._overwrite(line)

    def finish(self, outcome: str) -> None:
        """A run ended: its line, then the bar again."""
        self.done += 1
        self.running = ""
        self._write_line(f"[{self.done}/{self.total} {format_elapsed(self.elapsed())}] {outcome}")
        self.redraw()

    def close(self, interrupted: bool = False) -> None:
        """The last line: how many runs were done, in how long."""
        state = "interrupted" if interrupted else "done"
        self._write_line(f"{state}: {self.done}/{self.total} runs in {format_elapsed(self.elapsed())}")

    def _overwrite(self, line: str) -> None:
        width = terminal_width(self.stream) - 1  # never the last column: some terminals wrap there
        self.stream.write("\r" + line[:width].ljust(width))
        self.stream.flush()

    def _write_line(self, line: str) -> None:
        if self.live:
            self._overwrite("")
            self.stream.write("\r")
        self.stream.write(line + "\n")
        self.stream.flush()


if __name__ == "__main__":
    sys.exit(main())
