"""``manage.py rabbitmq_check``: the deployment check of ``python -m channels_rabbitmq check``
for a layer of this project's settings: same steps, output and exit status."""

from __future__ import annotations

import argparse
import io
import sys
from typing import Any, TextIO, cast

from django.conf import settings
from django.core.management.base import BaseCommand

from .... import deployment_check as check


class Command(BaseCommand):  # type: ignore[misc]  # Django ships no types
    help = (
        "Connect to RabbitMQ with a channel layer of CHANNEL_LAYERS and say in plain words what "
        "works and what is wrong (python -m channels_rabbitmq check --settings ...). Exit status: "
        "0 when every check passed, 1 when a problem was found."
    )
    requires_system_checks: list[str] = []  # a broken CONFIG is what this command explains

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--alias", default="default", help="which entry of CHANNEL_LAYERS to check (default: %(default)s)"
        )
        parser.add_argument(
            "--timeout",
            type=check.positive_seconds,
            default=check.DEFAULT_TIMEOUT,
            metavar="SECONDS",
            help="how long to wait for each answer (default: %(default)g)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        arguments = argparse.Namespace(
            urls=[],
            settings=settings.SETTINGS_MODULE,
            alias=options["alias"],
            cafile=None,
            certfile=None,
            keyfile=None,
            timeout=options["timeout"],
        )
        status = check.run(arguments, out=cast(TextIO, _Verbatim(self.stdout)))
        if status:
            sys.exit(status)


class _Verbatim(io.TextIOBase):
    """Django's command output, written as given (it would add a newline to each ``write``)."""

    def __init__(self, wrapper: Any) -> None:
        self._wrapper = wrapper

    def write(self, text: str) -> int:
        self._wrapper.write(text, ending="")
        return len(text)

    def flush(self) -> None:
        self._wrapper.flush()
