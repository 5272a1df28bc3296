"""Step 1, the settings: the layer to check, from URLs on the command line or Django's settings.

Each function reports what is wrong with the settings in plain words and returns None,
rather than raising: the steps after it are then skipped.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys

from ..backend import LAYER_BACKEND, is_this_layer
from ..config import LayerConfig, parse_amqp_url
from ..core import RabbitmqChannelLayer
from .explain import plain_reason
from .report import Report, passwords_in

TLS_FILES_HELP = (
    "--cafile, --certfile and --keyfile build the TLS context for amqps:// URLs given on the "
    "command line; with --settings, the CONFIG's ssl_context is used"
)


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
            f"cannot read the CA file {cafile}: {plain_reason(error)}", "--cafile takes PEM certificates"
        ) from None
    if certfile:
        try:
            # A passphrase-protected key fails here rather than prompting on the terminal.
            context.load_cert_chain(certfile, keyfile, password="")
        except (OSError, ssl.SSLError) as error:
            raise SettingsError(
                f"cannot load the client certificate {certfile}"
                + (f" with the key {keyfile}" if keyfile else "")
                + f": {plain_reason(error)}",
                "--certfile and --keyfile take PEM files (the key without a passphrase); without "
                "--keyfile the key must be in the certificate file",
            ) from None
    return context


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
    if not is_this_layer(backend):
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


def describe_ssl_context(context: ssl.SSLContext) -> str:
    """What a settings' TLS context checks and trusts: a context that checks nothing shows here."""
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
    """The first line: what will be checked, each broker with its user, vhost and TLS (no password)."""
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
