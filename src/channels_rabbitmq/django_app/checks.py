"""Django system checks for the layer's CONFIG, without I/O: ``manage.py check`` runs them.

Registered by the Django app's ``ready()`` (``"channels_rabbitmq"`` in ``INSTALLED_APPS``).
For each ``CHANNEL_LAYERS`` entry whose ``BACKEND`` is this layer, the CONFIG goes through
the same checks as the layer's constructor
(:meth:`channels_rabbitmq.config.LayerConfig.build`), and each problem becomes a check
message with a stable id; ``manage.py check --deploy`` adds warnings about what is fine on
a laptop but not in production. No message quotes a password. Whether the broker answers
is ``manage.py rabbitmq_check``'s job.

Ids (see docs/operations/metrics.md):

- ``channels_rabbitmq.E001``: CONFIG is not a dict;
- ``channels_rabbitmq.E002``: an unknown CONFIG key (the hint names the closest known one);
- ``channels_rabbitmq.E003``: a CONFIG value of the wrong type;
- ``channels_rabbitmq.E004``: a CONFIG value that is out of range or contradicts another;
- ``channels_rabbitmq.W001``: the ``guest`` user on a broker that is not on this machine;
- ``channels_rabbitmq.W002`` (deploy): no ``host``: the default, a broker on localhost;
- ``channels_rabbitmq.W003`` (deploy): ``amqp://`` to another machine: no encryption;
- ``channels_rabbitmq.W004`` (deploy): an ``ssl_context`` that does not verify the broker.
"""

from __future__ import annotations

import difflib
import ipaddress
import ssl
from collections.abc import Iterator, Mapping
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, register
from django.core.checks import Warning as CheckWarning

from ..backend import is_this_layer
from ..config import BrokerAddress, LayerConfig

TAG = "channels_rabbitmq"
CONFIG_HINT = "every CONFIG key is described in the documentation's Configuration page"


def check_channel_layers(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Errors in the CONFIG of every layer of ours, and the warnings that hold everywhere."""
    messages: list[CheckMessage] = []
    for where, config in _layer_configs():
        built, problems = _build(where, config)
        messages += problems
        if built is not None:
            messages += _guest_on_remote_hosts(where, built)
    return messages


def check_channel_layers_for_deployment(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """``check --deploy``: what is fine during development only."""
    messages: list[CheckMessage] = []
    for where, config in _layer_configs():
        built, _problems = _build(where, config)  # reported by check_channel_layers
        if built is None:
            continue
        if isinstance(config, Mapping) and "host" not in config:
            messages.append(
                CheckWarning(
                    f"no host set: the layer connects to the default broker, {built.address}",
                    hint="set CONFIG['host'] to your broker's amqps:// URL",
                    obj=where,
                    id="channels_rabbitmq.W002",
                )
            )
        messages += _unencrypted(where, built)
    return messages


register(check_channel_layers, TAG)
register(check_channel_layers_for_deployment, TAG, deploy=True)


def _layer_configs() -> Iterator[tuple[str, object]]:
    """(where, CONFIG) of each ``CHANNEL_LAYERS`` entry that is this layer."""
    layers = getattr(settings, "CHANNEL_LAYERS", None)
    if not isinstance(layers, Mapping):
        return  # Channels reports that itself
    for alias, entry in layers.items():
        if isinstance(entry, Mapping) and is_this_layer(entry.get("BACKEND")):
            config = entry.get("CONFIG")
            yield f"CHANNEL_LAYERS[{alias!r}]", {} if config is None else config


def _build(where: str, config: object) -> tuple[LayerConfig | None, list[CheckMessage]]:
    """The checked config (None when refused) and the errors, as the layer's constructor sees them."""
    if not isinstance(config, Mapping):
        return None, [
            Error(
                f"CONFIG is a {type(config).__name__}, not a dict",
                hint="CONFIG holds the layer's keyword arguments, e.g. {'host': 'amqps://user:...@host/vhost'}",
                obj=where,
                id="channels_rabbitmq.E001",
            )
        ]
    known = LayerConfig.DEFAULTS
    problems: list[CheckMessage] = []
    for key in config:
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1) if isinstance(key, str) else []
        problems.append(
            Error(
                f"unknown CONFIG key {key!r}: the layer refuses to start",
                hint=f"did you mean {close[0]!r}?" if close else f"the keys are: {', '.join(sorted(known))}",
                obj=where,
                id="channels_rabbitmq.E002",
            )
        )
    try:
        built = LayerConfig.build(**{key: value for key, value in config.items() if key in known})
    except TypeError as error:  # its messages name the key and never quote a password
        # Django prints obj (the alias) before the message: the message need not name it again.
        problems.append(Error(str(error), hint=CONFIG_HINT, obj=where, id="channels_rabbitmq.E003"))
        return None, problems
    except ValueError as error:
        problems.append(Error(str(error), hint=CONFIG_HINT, obj=where, id="channels_rabbitmq.E004"))
        return None, problems
    return (built if not problems else None), problems


def _is_this_machine(address: BrokerAddress) -> bool:
    if address.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.host).is_loopback
    except ValueError:
        return False  # a host name


def _guest_on_remote_hosts(where: str, config: LayerConfig) -> list[CheckMessage]:
    return [
        CheckWarning(
            f"connects to {address} as 'guest': RabbitMQ lets guest log in from its own machine only",
            hint="create a user for the application (rabbitmqctl add_user) and put it in the host URL",
            obj=where,
            id="channels_rabbitmq.W001",
        )
        for address in config.addresses
        if address.username == "guest" and not _is_this_machine(address)
    ]


def _unencrypted(where: str, config: LayerConfig) -> list[CheckMessage]:
    messages: list[CheckMessage] = [
        CheckWarning(
            f"connects to {address} without TLS: the password and every message cross the network in clear",
            hint="use an amqps:// URL and an ssl_context (ssl.create_default_context(cafile=...))",
            obj=where,
            id="channels_rabbitmq.W003",
        )
        for address in config.addresses
        if not address.uses_tls and not _is_this_machine(address)
    ]
    context = config.ssl_context
    if context is not None and (context.verify_mode == ssl.CERT_NONE or not context.check_hostname):
        unchecked = "certificate" if context.verify_mode == ssl.CERT_NONE else "host name"
        messages.append(
            CheckWarning(
                f"its ssl_context does not verify the broker's {unchecked}: anyone on the path "
                "can pose as the broker",
                hint="use ssl.create_default_context(cafile=...), which verifies both",
                obj=where,
                id="channels_rabbitmq.W004",
            )
        )
    return messages
