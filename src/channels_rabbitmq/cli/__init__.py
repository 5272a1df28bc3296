"""The command-line tool: ``python -m channels_rabbitmq <command>``.

- ``check``: connect to a broker (a URL, or the layer of Django's settings) and say in
  plain words what works and what is wrong.

Each command lives in a package of its own (``check``: :mod:`..deployment_check`, which the
Django app's ``manage.py rabbitmq_check`` runs too) with an ``add_arguments(parser)`` and a
``run(args) -> int`` (the exit status). The benchmarks are not a command of the installed
package: they live in the repository's ``bench/`` (``make bench``, or ``python -m bench``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .. import __version__, deployment_check

COMMANDS = {"check": deployment_check}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m channels_rabbitmq",
        description="Tools for the channels_rabbitmq channel layer.",
    )
    parser.add_argument("--version", action="version", version=f"channels_rabbitmq {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        doc = (module.__doc__ or "").strip()
        summary = doc.splitlines()[0] if doc else name
        command = commands.add_parser(
            name, help=summary, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status: int = COMMANDS[args.command].run(args)
    return status
