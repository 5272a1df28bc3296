"""Opening one AMQP connection the way the layer does: TLS, heartbeat, client properties.

Public by design: the broker link and the ``check`` command both use it, so that
``check`` connects exactly as the layer would. Errors are the layer's
(:class:`~channels_rabbitmq.exceptions.BrokerConnectionError` subclasses).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import __version__
from ..amqp.connection import AmqpConnection, DeliveryHandler
from ..amqp.errors import ConnectionFailed
from ..amqp.opening import connect as amqp_connect
from ..amqp.protocol import Credentials
from ..config import BrokerAddress, LayerConfig
from .errors import connection_error

__all__ = ["describe_target", "distinct_ips", "open_connection"]


def distinct_ips(infos: list[tuple[Any, ...]]) -> list[str]:
    """The addresses of a ``getaddrinfo()`` answer, each once, in the resolver's order."""
    ips: list[str] = []
    for *_, sockaddr in infos:
        if sockaddr[0] not in ips:
            ips.append(sockaddr[0])
    return ips


def describe_target(address: BrokerAddress, ip: str) -> str:
    """The broker address for messages (no password), with the IP when the URL names a host."""
    return str(address) if ip == address.host else f"{address} ({ip})"


def _ignore_deliveries_done() -> None:
    pass


async def open_connection(
    address: BrokerAddress,
    ip: str,
    config: LayerConfig,
    *,
    timeout: float,
    connection_name: str,
    on_delivery: DeliveryHandler | None = None,
    on_deliveries_done: Callable[[], None] = _ignore_deliveries_done,
    on_lost: Callable[[AmqpConnection, ConnectionFailed], None],
    on_blocked: Callable[[AmqpConnection, str | None], None] | None = None,
) -> AmqpConnection:
    """An AMQP connection to one address of a broker, as the layer opens it (TLS, heartbeat, properties).

    ``connection_name`` is what RabbitMQ's tools show for it. ``on_blocked`` hears of
    ``connection.blocked`` (with the broker's reason) and ``connection.unblocked`` (None).
    Raises a :class:`~channels_rabbitmq.exceptions.BrokerConnectionError` subclass; ``on_lost``
    gets the AMQP client's error (map it with :func:`.errors.connection_error`).
    """
    try:
        return await amqp_connect(
            ip,
            address.port,
            Credentials(address.username, address.password),
            address.virtual_host,
            ssl_context=config.ssl_context,
            server_hostname=address.host,
            timeout=timeout,
            heartbeat=config.heartbeat,
            client_properties={
                "product": "channels_rabbitmq",
                "version": __version__,
                "connection_name": connection_name,
                "capabilities": {
                    "publisher_confirms": True,
                    "basic.nack": True,
                    "consumer_cancel_notify": True,
                    "connection.blocked": True,
                    "authentication_failure_close": True,  # a wrong password gets a 403, not a bare hang-up
                },
            },
            description=describe_target(address, ip),
            on_delivery=on_delivery,
            on_deliveries_done=on_deliveries_done,
            on_lost=on_lost,
            on_blocked=on_blocked,
            max_body_size=config.max_message_size,  # the layer never sends more: a bigger body is foreign
        )
    except ConnectionFailed as error:
        raise connection_error(error, str(address), address.virtual_host) from None
