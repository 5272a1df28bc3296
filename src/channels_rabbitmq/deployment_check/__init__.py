"""Connect to RabbitMQ and say in plain words what works and what is wrong.

Give one or more AMQP URLs (the nodes of a cluster), or let the command read the
channel layer from your Django settings:

  python -m channels_rabbitmq check amqp://user:password@rabbitmq.example.com:5672/asgi
  python -m channels_rabbitmq check amqps://user:password@rmq1/asgi amqps://user:password@rmq2/asgi \\
      --cafile ca.pem
  python -m channels_rabbitmq check --settings mysite.settings
  DJANGO_SETTINGS_MODULE=mysite.settings python -m channels_rabbitmq check

With settings, CHANNEL_LAYERS[ALIAS] must use channels_rabbitmq.core.RabbitmqChannelLayer;
its CONFIG is used as it is (host, ssl_context, groups_exchange, connect_timeout...).
The current directory is importable, as with manage.py.

Each step prints one line when it is done: "ok", "FAIL" (with what to do about it), or
"skip" when an earlier step failed:

  settings      the broker(s), user, vhost and TLS that will be used
  connect       for each broker: host name, TCP, TLS, AMQP login and vhost; the
                broker's version and how long connecting took
  permissions   for each broker: declare an exclusive test queue channels.check.<random>
                and the groups exchange, bind, publish, purge, unbind, delete; a
                refusal names the permission the user lacks
  layer         through RabbitmqChannelLayer itself: new_channel(); a group round
                trip (group_add, group_send, receive, group_discard); a direct
                round trip (send, receive)
  latency       20 send -> receive round trips on one channel: median and max

The last line is "all checks passed" or how many problems were found.

Exit status: 0 when every check passed, 1 when a problem was found, 2 when there is
nothing to check (no URL and no settings) or the arguments contradict each other.

The password is never printed, whatever fails.
"""

# This docstring is the command's --help. The package: settings.py (step 1, the layer to check),
# steps.py (steps 2 to 5, against the broker), explain.py (errors in plain words, decided by
# type and fields), report.py (the output, with every secret hidden).

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import TextIO

from .report import RedactingFormatter, Report
from .settings import layer_from_django_settings, layer_from_urls
from .steps import check_broker

DEFAULT_TIMEOUT = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments, on the ``check`` sub-parser."""
    parser.add_argument(
        "urls",
        nargs="*",
        metavar="URL",
        help="amqp:// or amqps:// URL of a broker; several for the nodes of a cluster "
        "(default: the layer of the Django settings)",
    )
    parser.add_argument(
        "--settings",
        metavar="MODULE",
        help="Django settings module to read CHANNEL_LAYERS from (default: $DJANGO_SETTINGS_MODULE)",
    )
    parser.add_argument(
        "--alias",
        default="default",
        help="which entry of CHANNEL_LAYERS to check (default: %(default)s)",
    )
    parser.add_argument("--cafile", metavar="FILE", help="CA certificate(s) to verify the broker with (PEM)")
    parser.add_argument("--certfile", metavar="FILE", help="client certificate, for brokers that ask for one")
    parser.add_argument("--keyfile", metavar="FILE", help="the client certificate's private key")
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="how long to wait for each answer (default: %(default)g); with URLs, also the "
        "connect timeout (with settings, the CONFIG's connect_timeout is used)",
    )


def positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    return value


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run every step in turn, printing one line each to ``out`` (stdout); the exit status
    (0, 1 or 2, see above)."""
    settings_module = args.settings or os.environ.get("DJANGO_SETTINGS_MODULE")
    if args.urls and args.settings:
        print("check: give either URLs or --settings, not both", file=sys.stderr)
        return 2
    tls_options = [f"--{name}" for name in ("cafile", "certfile", "keyfile") if getattr(args, name)]
    if not args.urls and tls_options:
        print(
            f"check: {', '.join(tls_options)} apply to amqps:// URLs given on the command line; "
            "with settings, the CONFIG's ssl_context is used",
            file=sys.stderr,
        )
        return 2
    if not args.urls and not settings_module:
        print(
            "check: nothing to check. Give the broker's URL:\n"
            "  python -m channels_rabbitmq check amqp://user:password@host:5672/vhost\n"
            "or your Django settings, whose CHANNEL_LAYERS names the layer:\n"
            "  python -m channels_rabbitmq check --settings mysite.settings\n"
            "  (or set DJANGO_SETTINGS_MODULE)",
            file=sys.stderr,
        )
        return 2
    report = Report(out if out is not None else sys.stdout)
    log_handler = logging.StreamHandler(sys.stderr)
    log_handler.setFormatter(RedactingFormatter(report))
    log_handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(log_handler)
    try:
        if args.urls:
            layer = layer_from_urls(args, report)
        else:
            assert settings_module is not None
            layer = layer_from_django_settings(settings_module, args.alias, report)
        if layer is None:
            report.skip("connect, permissions, layer, latency", "the settings are not usable")
        else:
            asyncio.run(check_broker(layer, args.timeout, report))
    except KeyboardInterrupt:
        report.fail("interrupted")
    except Exception as error:  # no traceback: its lines could quote the settings
        report.fail(f"unexpected error: {type(error).__name__}: {error}")
    finally:
        root.removeHandler(log_handler)
    return report.finish()
