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

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import re
import shlex
import socket
import ssl
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, NoReturn, TextIO, TypeVar
from urllib.parse import quote, unquote

from pamqp import commands

from ..amqp.connection import AmqpConnection
from ..config import BrokerAddress, LayerConfig, parse_amqp_url
from ..core import RabbitmqChannelLayer
from ..exceptions import BrokerConnectionError, BrokerRefusedError
from ..link.connector import distinct_ips, open_connection
from ..link.topology import random_name
from ..wire import NO_PROPERTIES

T = TypeVar("T")

LAYER_BACKEND = "channels_rabbitmq.core.RabbitmqChannelLayer"
DEFAULT_TIMEOUT = 10.0
TEST_QUEUE_PREFIX = "channels.check."  # matches the layer's own "channels.*" permissions
LATENCY_ROUND_TRIPS = 20
SLOW_ROUND_TRIP_MS = 50.0

OK = "ok    "
FAIL = "FAIL  "
SKIP = "skip  "
MORE = "      "  # the lines that belong to the one above

CONTROL_CHANNEL = 1
PUBLISH_CHANNEL = 2

TLS_FILES_HELP = (
    "--cafile, --certfile and --keyfile build the TLS context for amqps:// URLs given on the "
    "command line; with --settings, the CONFIG's ssl_context is used"
)


# Arguments -----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="how long to wait for each answer (default: %(default)g); with URLs, also the "
        "connect timeout (with settings, the CONFIG's connect_timeout is used)",
    )


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    return value


# Output --------------------------------------------------------------------------------------------


class Report:
    """Prints one line per step, counts the problems, and hides every known secret.

    Nothing here formats a password in the first place; hiding is the safety net for
    text that comes from elsewhere (exception messages, logs).
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.problems = 0
        self._secrets: set[str] = set()

    def hide(self, secrets: Iterable[str]) -> None:
        self._secrets.update(secrets)

    def redact(self, text: str) -> str:
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, "****")
        return text

    def ok(self, what: str, *details: str) -> None:
        self._write(OK, what, details)

    def fail(self, what: str, *hints: str) -> None:
        self.problems += 1
        self._write(FAIL, what, hints)

    def skip(self, what: str, reason: str) -> None:
        self._write(SKIP, f"{what}: {reason}", ())

    def finish(self) -> int:
        if self.problems:
            plural = "" if self.problems == 1 else "s"
            self._print(f"{self.problems} problem{plural} found")
            return 1
        self._print("all checks passed")
        return 0

    def _write(self, prefix: str, what: str, more: Iterable[str]) -> None:
        self._print(prefix + what)
        for line in more:
            self._print(MORE + line)

    def _print(self, line: str) -> None:
        print(self.redact(line), file=self.out, flush=True)


class RedactingFormatter(logging.Formatter):
    """Log lines (the layer's warnings, asyncio's errors) pass through the report's hiding too."""

    def __init__(self, report: Report) -> None:
        super().__init__(MORE + "log: %(levelname)s %(name)s: %(message)s")
        self.report = report

    def format(self, record: logging.LogRecord) -> str:
        return self.report.redact(super().format(record))


def passwords_in(url: object) -> set[str]:
    """The password of an AMQP URL in every spelling it may show up in (raw, decoded, encoded).

    The password is taken after the first ":" of the credentials, which end at the last
    "@", as :func:`~channels_rabbitmq.config.parse_amqp_url` does. The default
    ``guest``, a password equal to the user name (printed anyway) and very short ones
    (hiding them would garble every line) are left alone.
    """
    if not isinstance(url, str):
        return set()
    _scheme, separator, rest = url.partition("://")
    userinfo, at, _location = rest.rpartition("@")
    if not separator or not at or ":" not in userinfo:
        return set()
    username, _, raw = userinfo.partition(":")
    spellings = {raw, unquote(raw), quote(unquote(raw), safe="")}
    return {
        secret
        for secret in spellings
        if len(secret) >= 4 and secret != "guest" and secret not in (username, unquote(username))
    }


# The command ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
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
    report = Report(sys.stdout)
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


# Step 1: the settings ------------------------------------------------------------------------------


def layer_from_urls(args: argparse.Namespace, report: Report) -> RabbitmqChannelLayer | None:
    """The layer for the URLs of the command line, or None (reported) when they are not usable."""
    for url in args.urls:
        report.hide(passwords_in(url))
    try:
        addresses = [parse_amqp_url(url) for url in args.urls]
    except ValueError as error:
        report.fail(f"settings: {error}", "the form is amqp://user:password@host:port/vhost (or amqps://)")
        return None
    tls_files = [name for name in ("cafile", "certfile", "keyfile") if getattr(args, name)]
    uses_tls = any(address.uses_tls for address in addresses)
    if tls_files and not uses_tls:
        options = ", ".join(f"--{name}" for name in tls_files)
        report.fail(f"settings: {options} given, but no URL is amqps://", TLS_FILES_HELP)
        return None
    ssl_context = None
    tls = "TLS off"
    if uses_tls:
        try:
            ssl_context = build_ssl_context(args.cafile, args.certfile, args.keyfile)
        except SettingsError as error:
            report.fail(f"settings: {error}", *error.hints)
            return None
        tls = f"TLS on, CA file {args.cafile}" if args.cafile else "TLS on, the system's CA certificates"
        if args.certfile:
            tls += f", client certificate {args.certfile}"
    host: str | list[str] = args.urls[0] if len(args.urls) == 1 else list(args.urls)
    try:
        layer = RabbitmqChannelLayer(host, ssl_context=ssl_context, connect_timeout=args.timeout)
    except (TypeError, ValueError) as error:
        report.fail(f"settings: {error}")
        return None
    report_settings(report, "the command line", layer.config, tls)
    return layer


class SettingsError(Exception):
    """Settings that cannot be used; ``hints`` say what to do."""

    def __init__(self, message: str, *hints: str) -> None:
        super().__init__(message)
        self.hints = hints


def build_ssl_context(cafile: str | None, certfile: str | None, keyfile: str | None) -> ssl.SSLContext:
    """A context that verifies the broker (against ``cafile``, or the system's CAs)."""
    if keyfile and not certfile:
        raise SettingsError(
            "--keyfile given without --certfile", "give the client certificate with --certfile"
        )
    try:
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as error:
        raise SettingsError(
            f"cannot read the CA file {cafile}: {_reason(error)}", "--cafile takes PEM certificates"
        ) from None
    if certfile:
        try:
            # A passphrase-protected key fails here rather than prompting on the terminal.
            context.load_cert_chain(certfile, keyfile, password="")
        except (OSError, ssl.SSLError) as error:
            raise SettingsError(
                f"cannot load the client certificate {certfile}"
                + (f" with the key {keyfile}" if keyfile else "")
                + f": {_reason(error)}",
                "--certfile and --keyfile take PEM files (the key without a passphrase); without "
                "--keyfile the key must be in the certificate file",
            ) from None
    return context


def _reason(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def layer_from_django_settings(module: str, alias: str, report: Report) -> RabbitmqChannelLayer | None:
    """The layer of ``CHANNEL_LAYERS[alias]`` in a Django settings module, or None (reported)."""
    where = f"CHANNEL_LAYERS[{alias!r}] in {module}"
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as manage.py, run from the project's directory
    os.environ["DJANGO_SETTINGS_MODULE"] = module
    try:
        from django.conf import settings

        layers = settings.CHANNEL_LAYERS
    except ModuleNotFoundError as error:
        report.fail(
            f"settings: cannot import the settings module {module}: {error}",
            "run the command from your project's directory (where manage.py is), "
            "or add that directory to PYTHONPATH",
        )
        return None
    except AttributeError:
        report.fail(
            f"settings: {module} has no CHANNEL_LAYERS", "Channels reads the layer from CHANNEL_LAYERS"
        )
        return None
    except Exception as error:
        report.fail(f"settings: the settings module {module} fails to load: {type(error).__name__}: {error}")
        return None
    if not isinstance(layers, dict) or alias not in layers:
        names = ", ".join(repr(name) for name in layers) if isinstance(layers, dict) else ""
        report.fail(
            f"settings: CHANNEL_LAYERS in {module} has no layer {alias!r}",
            f"its layers: {names}; choose one with --alias" if names else "CHANNEL_LAYERS names no layer",
        )
        return None
    entry = layers[alias]
    backend = entry.get("BACKEND") if isinstance(entry, dict) else None
    if not _is_this_layer(backend):
        report.fail(
            f"settings: {where} uses {backend or 'no BACKEND'}, not {LAYER_BACKEND}",
            "this command checks channels_rabbitmq layers only",
        )
        return None
    config = entry.get("CONFIG") or {}
    if not isinstance(config, dict):
        report.fail(f"settings: the CONFIG of {where} is a {type(config).__name__}, not a dict")
        return None
    hosts = config.get("host")
    for url in hosts if isinstance(hosts, list | tuple) else [hosts]:
        report.hide(passwords_in(url))
    keys = config.get("encryption_keys")
    if isinstance(keys, list | tuple):
        report.hide(str(key.decode() if isinstance(key, bytes) else key) for key in keys)
    try:
        layer = RabbitmqChannelLayer(**config)
    except (TypeError, ValueError) as error:
        report.fail(f"settings: the layer refuses the CONFIG of {where}: {error}")
        return None
    context = layer.config.ssl_context
    tls = describe_ssl_context(context) if context is not None else "TLS off"
    report_settings(report, where, layer.config, tls)
    return layer


def _is_this_layer(backend: object) -> bool:
    """True for this layer's class, under its own path or another that names it or a subclass."""
    if backend == LAYER_BACKEND:
        return True
    if not isinstance(backend, str) or "." not in backend:
        return False
    module_name, _, class_name = backend.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except Exception:
        return False
    return isinstance(found, type) and issubclass(found, RabbitmqChannelLayer)


def describe_ssl_context(context: ssl.SSLContext) -> str:
    if context.verify_mode == ssl.CERT_NONE:
        checks = "does NOT verify the broker's certificate"
    elif not context.check_hostname:
        checks = "verifies the broker's certificate but NOT its host name"
    else:
        checks = "verifies the broker's certificate and host name"
    authorities = [  # type: ignore[str-unpack]  # typeshed types the certificate's RDNs loosely
        value
        for certificate in context.get_ca_certs()
        for rdn in certificate.get("subject", ())
        for key, value in rdn
        if key == "commonName"
    ]
    if not authorities:
        trusted = "the system's CA certificates"
    elif len(authorities) <= 3:
        trusted = "CA " + ", ".join(authorities)
    else:
        trusted = f"{len(authorities)} CA certificates"
    return f"TLS on (ssl_context from the settings: {checks}; trusts {trusted})"


def report_settings(report: Report, source: str, config: LayerConfig, tls: str) -> None:
    count = len(config.addresses)
    brokers = f"{count} broker{'s' if count > 1 else ''}"
    report.ok(
        f"settings from {source}: {brokers}, groups exchange {config.groups_exchange!r}, "
        f"connect timeout {config.connect_timeout:g}s",
        *(
            f"{address}  user {address.username!r}, password ****, vhost {address.virtual_host!r}, "
            + (tls if address.uses_tls else "TLS off")
            for address in config.addresses
        ),
    )


# Steps 2 to 5: the broker --------------------------------------------------------------------------


async def check_broker(layer: RabbitmqChannelLayer, timeout: float, report: Report) -> None:
    config = layer.config
    usable = 0
    try:
        for address in config.addresses:
            connection = await connect(address, config, report)
            if connection is None:
                report.skip(f"permissions on {address}", "not connected")
                continue
            try:
                if await check_permissions(connection, address, config, timeout, report):
                    usable += 1
            finally:
                await connection.close()
        if usable:
            await check_layer(layer, timeout, report)
        else:
            reason = "no broker passed the checks above"
            report.skip("layer", reason)
            report.skip("latency", reason)
    finally:
        try:
            await asyncio.wait_for(layer.close(), timeout)
        except Exception as error:
            report.fail(f"closing the layer: {type(error).__name__}: {error}")


# Step 2: connect -------------------------------------------------------------------------------------


async def connect(address: BrokerAddress, config: LayerConfig, report: Report) -> AmqpConnection | None:
    """Open an AMQP connection to one broker, trying each address its name resolves to."""
    what = f"connect to {address}"
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + config.connect_timeout
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM), config.connect_timeout
        )
    except asyncio.TimeoutError:
        report.fail(
            f"{what}: looking up the host name {address.host!r} took over {config.connect_timeout:g}s",
            "hint: this machine's DNS does not answer; check /etc/resolv.conf",
        )
        return None
    except OSError as error:
        report.fail(
            f"{what}: the host name {address.host!r} does not resolve ({_reason(error)})",
            "hint: check the spelling of the host name, and that this machine's DNS or /etc/hosts knows it",
        )
        return None
    ips = distinct_ips(infos)
    errors: list[BrokerConnectionError] = []
    for index, ip in enumerate(ips):
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            with muted(AmqpConnection.__module__):  # its errors are reported below, explained
                connection = await open_connection(
                    address,
                    ip,
                    config,
                    timeout=remaining / (len(ips) - index),
                    connection_name="channels_rabbitmq check",
                    on_delivery=_ignore,
                    on_deliveries_done=_ignore,
                    on_lost=_ignore,
                )
        except BrokerConnectionError as error:
            errors.append(error)
            continue
        elapsed_ms = (loop.time() - started) * 1000
        over_tls = " over TLS" if address.uses_tls else ""
        report.ok(
            f"{what}: {describe_server(connection.machine.server_properties)}; "
            f"login and vhost {address.virtual_host!r} accepted{over_tls} in {elapsed_ms:.0f} ms"
        )
        return connection
    if not errors:
        report.fail(
            f"{what}: timed out: no connection within connect_timeout={config.connect_timeout:g}s",
            "hint: the broker is slow to answer or unreachable; raise --timeout (or connect_timeout) "
            "if the network is just slow",
        )
        return None
    # Explain the failure of an address where something answered, rather than a refusal by another.
    answered = [error for error in errors if not isinstance(error.__context__, ConnectionRefusedError)]
    summary, hints = explain_connection_error((answered or errors)[-1], address, config)
    report.fail(f"{what}: {summary}", *(str(error) for error in errors), *hints)
    return None


@contextlib.contextmanager
def muted(logger_name: str) -> Iterator[None]:
    """Silence a logger for a while: what it would log, this command reports in plain words."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _ignore(*_args: Any) -> None:
    pass


def describe_server(properties: dict[str, Any]) -> str:
    def text(key: str) -> str:
        value = properties.get(key)
        return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")

    server = " ".join(part for part in (text("product"), text("version")) if part) or "an unnamed broker"
    if text("platform"):
        server += f" on {text('platform')}"
    if text("cluster_name"):
        server += f", cluster {text('cluster_name')}"
    return server


def explain_connection_error(
    error: BrokerConnectionError, address: BrokerAddress, config: LayerConfig
) -> tuple[str, list[str]]:
    """What went wrong, in plain words, and the hint lines that say what to do about it.

    The layer's messages already name the cause; the OS or TLS error they were raised
    from (kept as ``__context__``) tells the cases apart exactly.
    """
    message = str(error)
    upper = message.upper()
    cause = error.__context__
    where = f"{address.host}:{address.port}"
    if isinstance(cause, ssl.SSLCertVerificationError):
        reason = (cause.verify_message or "").lower()
        if "mismatch" in reason:
            return f"TLS: the broker's certificate does not name the host {address.host!r}", [
                "hint: connect with a name the certificate was issued for, or give the broker a "
                f"certificate that names {address.host}"
            ]
        if "expired" in reason:
            return "TLS: the broker's certificate has expired", ["hint: renew the broker's certificate"]
        return "TLS: the broker's certificate is not trusted", [
            "hint: give the CA certificate that signed it: --cafile, or "
            "ssl.create_default_context(cafile=...) in the settings"
        ]
    if "CERTIFICATE_REQUIRED" in upper or "CERTIFICATE REQUIRED" in upper:
        return "TLS: the broker requires a client certificate", [
            "hint: give one: --certfile and --keyfile, or context.load_cert_chain(certfile, keyfile) "
            "in the settings"
        ]
    if "UNKNOWN_CA" in upper or "UNKNOWN CA" in upper or "BAD_CERTIFICATE" in upper:
        return "TLS: the broker does not accept the client certificate", [
            "hint: use a client certificate signed by a CA the broker trusts (its ssl_options.cacertfile)"
        ]
    if "WRONG_VERSION_NUMBER" in upper or "RECORD_LAYER_FAILURE" in upper:
        return f"TLS: {where} does not speak TLS", [
            "hint: use amqp:// for this port, or the broker's TLS port (5671 by default)"
        ]
    if isinstance(cause, ssl.SSLError) or message.startswith("TLS"):
        return "TLS: the handshake failed", [
            "hint: the broker may require a client certificate (--certfile, --keyfile) or share no "
            "TLS version with this client; the broker's log says which"
        ]
    if "refused the login" in message:
        hint = (
            "hint: check the user name and password of the URL (write a '%' in the password as %25); "
            "on the broker: rabbitmqctl list_users, rabbitmqctl authenticate_user USER PASSWORD"
        )
        if address.username == "guest" and address.host not in ("localhost", "127.0.0.1", "::1"):
            hint += "; the user 'guest' may only log in from the broker's own machine (loopback_users)"
        return "login refused: wrong user name or password, or no such user", [hint]
    if "refused the vhost" in message:
        if "not found" in message:
            return f"the vhost {address.virtual_host!r} does not exist", [
                f"hint: create it (rabbitmqctl add_vhost {shlex.quote(address.virtual_host)}), or fix the "
                "URL's path: it is the vhost, URL-encoded (/%2F is the vhost '/')"
            ]
        return (
            f"the user {address.username!r} may not use the vhost {address.virtual_host!r}",
            permissions_needed(address, config.groups_exchange),
        )
    if isinstance(cause, ConnectionRefusedError):
        return f"nothing is listening at {where}", [
            "hint: is RabbitMQ running there, and is the port right? (5672 for amqp://, 5671 for amqps://)"
        ]
    if "within connect_timeout" in message or isinstance(cause, TimeoutError):
        return f"timed out: no answer within {config.connect_timeout:g}s", [
            "hint: a firewall may drop the packets, the host may be down, or what listens there is not "
            "RabbitMQ; raise --timeout (or connect_timeout) if the network is just slow"
        ]
    if "AMQP protocol error" in message or "closed during the handshake" in message:
        return f"what answers at {where} is not an AMQP 0-9-1 broker, or hung up", [
            "hint: if this is a TLS port, use amqps://; otherwise the broker's log says why"
        ]
    if isinstance(cause, OSError):
        return f"cannot connect to {where}: {_reason(cause)}", ["hint: check the network route and firewalls"]
    return "cannot connect", []


def permissions_needed(address: BrokerAddress, exchange: str) -> list[str]:
    """The hint for missing permissions: what the layer needs, and the command that grants it."""
    names = f"{re.escape(exchange)}|channels\\..*"
    configure = f"^({names})$"
    write = f"^({re.escape(exchange)}|amq\\.default|channels\\..*)$"
    command = " ".join(
        shlex.quote(part)
        for part in (
            "rabbitmqctl",
            "set_permissions",
            "-p",
            address.virtual_host,
            address.username,
            configure,
            write,
            configure,
        )
    )
    return [
        f"hint: on vhost {address.virtual_host!r} the layer needs configure on the exchange {exchange!r} "
        "and on queues named channels.*, write on them and on amq.default, read on them; "
        "this grants exactly that:",
        f"  {command}",
    ]


# Step 3: permissions ---------------------------------------------------------------------------------


class Refused(Exception):
    """One request of the permissions check was refused or failed."""


async def check_permissions(
    connection: AmqpConnection, address: BrokerAddress, config: LayerConfig, timeout: float, report: Report
) -> bool:
    """Do what the layer does with a queue and the groups exchange; report the first refusal.

    Each request needs one permission, so a refusal names the permission that is missing.
    """
    what = f"permissions on {address}"
    queue = f"{TEST_QUEUE_PREFIX}{random_name(12)}"
    exchange = config.groups_exchange
    on_queue = "queues named channels.*"
    on_exchange = f"the exchange {exchange!r}"

    async def request(method: Any) -> Any:
        return await asyncio.wait_for(connection.call(CONTROL_CHANNEL, method), timeout)

    async def declare_exchange() -> None:
        try:
            await request(commands.Exchange.Declare(exchange=exchange, exchange_type="direct"))
        except BrokerRefusedError as error:
            if error.reply_code != 406:
                raise
            # Declared elsewhere with other flags: the layer uses it as it is, and so do we.
            await request(commands.Exchange.Declare(exchange=exchange, passive=True))

    async def publish() -> None:
        try:
            accepted = await asyncio.wait_for(
                connection.publish(PUBLISH_CHANNEL, b"", queue.encode(), NO_PROPERTIES, b"check"), timeout
            )
        except BrokerConnectionError:
            # A refused publish closes the channel, which is then reopened: let that finish
            # (confirm.select again is a no-op) so that closing the connection cuts nothing short.
            if connection.is_open:
                try:
                    await asyncio.wait_for(
                        connection.call(PUBLISH_CHANNEL, commands.Confirm.Select()), timeout
                    )
                except (BrokerConnectionError, BrokerRefusedError, asyncio.TimeoutError):
                    pass
            raise
        if not accepted:
            raise Refused("RabbitMQ refused the message (basic.nack)")

    # What to do, how, and the permission it needs: (kind, on what); None for a binding,
    # which needs write on the queue and read on the exchange (RabbitMQ names the one refused).
    steps: list[tuple[str, Callable[[], Awaitable[Any]], tuple[str, str] | None]] = [
        (f"declare the queue {queue}", lambda: request(commands.Queue.Declare(queue=queue, exclusive=True)),
         ("configure", on_queue)),
        (f"declare {on_exchange}", declare_exchange, ("configure", on_exchange)),
        (f"bind the queue to {on_exchange}",
         lambda: request(commands.Queue.Bind(queue=queue, exchange=exchange, routing_key=queue)), None),
        ("publish to the queue", publish, ("write", "the default exchange (amq.default)")),
        ("purge the queue", lambda: request(commands.Queue.Purge(queue=queue)), ("read", on_queue)),
        (f"unbind the queue from {on_exchange}",
         lambda: request(commands.Queue.Unbind(queue=queue, exchange=exchange, routing_key=queue)), None),
        ("delete the queue", lambda: request(commands.Queue.Delete(queue=queue)), ("configure", on_queue)),
    ]  # fmt: skip
    try:
        await asyncio.wait_for(connection.open_channel(CONTROL_CHANNEL, []), timeout)
        await asyncio.wait_for(connection.open_channel(PUBLISH_CHANNEL, [commands.Confirm.Select()]), timeout)
    except (BrokerConnectionError, BrokerRefusedError, asyncio.TimeoutError) as error:
        report.fail(f"{what}: cannot open an AMQP channel: {error or 'timed out'}")
        return False
    for doing, step, permission in steps:
        try:
            await step()
        except asyncio.TimeoutError:
            report.fail(f"{what}: no answer within {timeout:g}s to: {doing}")
            return False
        except (BrokerRefusedError, BrokerConnectionError, Refused) as error:
            text = str(error)
            if "ACCESS_REFUSED" not in text:
                report.fail(f"{what}: could not {doing}: {text}")
                return False
            if permission is None:
                refused_exchange = f"exchange '{exchange}'" in text
                permission = ("read", on_exchange) if refused_exchange else ("write", on_queue)
            kind, resource = permission
            report.fail(
                f"{what}: RabbitMQ refused to {doing}: the user {address.username!r} lacks the "
                f"{kind} permission on {resource}",
                text,
                *permissions_needed(address, exchange),
            )
            return False
    report.ok(f"{what}: declared, bound, published to, purged and deleted {queue}; declared {on_exchange}")
    return True


# Steps 4 and 5: through the layer ----------------------------------------------------------------


class StepFailed(Exception):
    """A step of the layer check failed; the message says what, ``hints`` what to do."""

    def __init__(self, message: str, *hints: str) -> None:
        super().__init__(message)
        self.hints = hints


async def within(timeout: float, doing: str, call: Awaitable[T], layer: RabbitmqChannelLayer) -> T:
    """Await one layer call, turning every failure into a :class:`StepFailed` in plain words."""
    try:
        return await asyncio.wait_for(call, timeout)
    except asyncio.TimeoutError:
        raise StepFailed(f"{doing}: no result within {timeout:g}s") from None
    except (BrokerConnectionError, BrokerRefusedError) as error:
        hints: list[str] = []
        if "ACCESS_REFUSED" in str(error):
            hints = permissions_needed(layer.config.address, layer.config.groups_exchange)
        raise StepFailed(f"{doing}: {error}", *hints) from None
    except Exception as error:
        raise StepFailed(f"{doing}: {type(error).__name__}: {error}") from None


def _unexpected(doing: str, got: object, wanted: object) -> NoReturn:
    raise StepFailed(f"{doing}: received {got!r}, expected {wanted!r}")


async def check_layer(layer: RabbitmqChannelLayer, timeout: float, report: Report) -> None:
    config = layer.config
    started = time.perf_counter()
    try:
        channel = await within(config.connect_timeout + timeout, "new_channel()", layer.new_channel(), layer)
    except StepFailed as failed:
        report.fail(f"layer: {failed}", *failed.hints)
        for what in ("layer: group round trip", "layer: direct round trip", "latency"):
            report.skip(what, "the layer did not connect")
        return
    report.ok(
        f"layer: new_channel() connected in {(time.perf_counter() - started) * 1000:.0f} ms "
        f"(queue {channel.partition('!')[0]})"
    )

    group = f"channels_rabbitmq.check.{random_name(12)}"
    message = {"type": "check.group", "token": random_name(12)}
    started = time.perf_counter()
    try:
        await within(timeout, f"group_add({group!r})", layer.group_add(group, channel), layer)
        await within(timeout, "group_send()", layer.group_send(group, message), layer)
        try:
            received = await within(timeout, "receive() of the group message", layer.receive(channel), layer)
        except StepFailed as failed:
            raise StepFailed(
                str(failed),
                "hint: RabbitMQ took the message but did not route it back through the exchange "
                f"{config.groups_exchange!r}; it must be a direct exchange "
                "(rabbitmqctl list_exchanges -p VHOST name type)",
            ) from None
        if received != message:
            _unexpected("receive() of the group message", received, message)
        await within(timeout, "group_discard()", layer.group_discard(group, channel), layer)
    except StepFailed as failed:
        report.fail(f"layer: group round trip: {failed}", *failed.hints)
    else:
        elapsed_ms = (time.perf_counter() - started) * 1000
        report.ok(
            f"layer: group round trip: group_add, group_send, receive, group_discard in {elapsed_ms:.0f} ms"
        )

    started = time.perf_counter()
    try:
        direct = await within(timeout, "new_channel()", layer.new_channel(), layer)
        message = {"type": "check.direct", "token": random_name(12)}
        await within(timeout, "send()", layer.send(direct, message), layer)
        received = await within(timeout, "receive()", layer.receive(direct), layer)
        if received != message:
            _unexpected("receive()", received, message)
    except StepFailed as failed:
        report.fail(f"layer: direct round trip: {failed}", *failed.hints)
        report.skip("latency", "the direct round trip failed")
        return
    elapsed_ms = (time.perf_counter() - started) * 1000
    report.ok(f"layer: direct round trip: send, receive in {elapsed_ms:.0f} ms")

    durations: list[float] = []
    try:
        for number in range(LATENCY_ROUND_TRIPS):
            ping: dict[str, Any] = {"type": "check.ping", "number": number}
            started = time.perf_counter()
            await within(timeout, "send()", layer.send(direct, ping), layer)
            received = await within(timeout, "receive()", layer.receive(direct), layer)
            if received != ping:
                _unexpected("receive()", received, ping)
            durations.append((time.perf_counter() - started) * 1000)
    except StepFailed as failed:
        report.fail(f"latency: round trip {len(durations) + 1}: {failed}", *failed.hints)
        return
    median = statistics.median(durations)
    notes = []
    if median > SLOW_ROUND_TRIP_MS:
        notes.append(
            f"note: over {SLOW_ROUND_TRIP_MS:g} ms per round trip; every send() waits for RabbitMQ's "
            "confirm, so a distant or busy broker slows every message"
        )
    report.ok(
        f"latency: {LATENCY_ROUND_TRIPS} send -> receive round trips: "
        f"median {median:.1f} ms, max {max(durations):.1f} ms",
        *notes,
    )
