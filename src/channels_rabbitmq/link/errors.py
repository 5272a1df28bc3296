"""The boundary between the AMQP client and the layer: its errors become the layer's.

Everything the link raises to :mod:`channels_rabbitmq.core` is a
:mod:`channels_rabbitmq.exceptions` error, with the broker's URL (never its password)
and the address tried. The client's error classes are translated here and nowhere else:
:data:`TRANSLATIONS` holds one entry per class, :func:`layer_error` looks an error up by
its class (the most specific entry wins), and :func:`translated` wraps a call whose client
errors must reach the caller as the layer's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..amqp import errors as amqp
from ..exceptions import (
    BrokerConnectionError,
    BrokerConnectionLostError,
    BrokerLoginRefusedError,
    BrokerProtocolError,
    BrokerRefusedError,
    BrokerTimeoutError,
    BrokerTLSError,
    BrokerUnreachableError,
    BrokerVhostRefusedError,
    RabbitmqLayerError,
    RequestNotEncodableError,
    TooManyChannelsError,
)


@dataclass(frozen=True)
class Where:
    """What the layer knows of the broker that the client's error does not say."""

    url: str | None  # the broker's URL (or URLs), without password
    virtual_host: str = ""

    def address_of(self, error: amqp.ConnectionFailed) -> str | None:
        if error.host is None:
            return None
        host = f"[{error.host}]" if ":" in error.host else error.host
        return host if error.port is None else f"{host}:{error.port}"


def _connection_fields(error: Any, where: Where) -> dict[str, Any]:
    return {"url": where.url, "address": where.address_of(error)}


def _reply(error: Any) -> dict[str, Any]:
    return {"reply_code": amqp.reply_code(error.reply_code), "reply_text": error.reply_text}


Translation = Callable[[Any, Where], RabbitmqLayerError]

#: Every error class of the AMQP client, and the layer error it becomes. A test walks every
#: class of ``amqp.errors`` through this table: a new client error needs its entry here.
TRANSLATIONS: dict[type[amqp.AmqpError], Translation] = {
    amqp.AmqpError: lambda error, where: BrokerProtocolError(str(error), url=where.url),
    amqp.ProtocolError: lambda error, where: BrokerProtocolError(str(error), url=where.url),
    amqp.ChannelRefused: lambda error, _where: BrokerRefusedError(
        amqp.reply_code(error.reply_code), error.reply_text, error.request
    ),
    amqp.RequestNotEncodable: lambda error, _where: RequestNotEncodableError(error.request, error.reason),
    amqp.RequestStalled: lambda error, where: BrokerTimeoutError(
        f"{error.peer} did not answer {error.operation} within connect_timeout={error.timeout:g}s"
        + (": the connection is dropped and set up again" if error.dropped else ""),
        operation=error.operation,
        timeout=error.timeout,
        url=where.url,
    ),
    amqp.ChannelsExhausted: lambda error, _where: TooManyChannelsError(
        f"{error}: too many normal channels are read at once on this connection",
        channel_max=error.channel_max,
    ),
    amqp.ConnectionFailed: lambda error, where: BrokerConnectionError(
        str(error), **_connection_fields(error, where)
    ),
    amqp.Unreachable: lambda error, where: BrokerUnreachableError(
        str(error), errno=error.errno, reason=error.reason, **_connection_fields(error, where)
    ),
    amqp.HandshakeTimeout: lambda error, where: BrokerTimeoutError(
        str(error), operation="connect", timeout=error.timeout, **_connection_fields(error, where)
    ),
    amqp.TlsFailed: lambda error, where: BrokerTLSError(
        str(error),
        reason=error.reason,
        verify_code=error.verify_code,
        verify_message=error.verify_message,
        **_connection_fields(error, where),
    ),
    amqp.LoginRefused: lambda error, where: BrokerLoginRefusedError(
        str(error), **_reply(error), **_connection_fields(error, where)
    ),
    amqp.VhostRefused: lambda error, where: BrokerVhostRefusedError(
        str(error), virtual_host=where.virtual_host, **_reply(error), **_connection_fields(error, where)
    ),
    amqp.ProtocolViolation: lambda error, where: BrokerProtocolError(
        str(error), **_connection_fields(error, where)
    ),
    amqp.ConnectionLost: lambda error, where: BrokerConnectionLostError(
        str(error),
        reply_code=None if error.reply_code is None else amqp.reply_code(error.reply_code),
        reply_text=error.reply_text,
        during_handshake=error.during_handshake,
        **_connection_fields(error, where),
    ),
}


def layer_error(error: amqp.AmqpError, url: str | None = None, virtual_host: str = "") -> RabbitmqLayerError:
    """The layer's error for an error of the AMQP client (``url``: the broker's, without password)."""
    where = Where(url, virtual_host)
    for cls in type(error).__mro__:
        translate = TRANSLATIONS.get(cls)
        if translate is not None:
            return translate(error, where)
    raise TypeError(f"not an error of the AMQP client: {error!r}")  # pragma: no cover (AmqpError has one)


def connection_error(
    error: amqp.ConnectionFailed, url: str | None = None, virtual_host: str = ""
) -> BrokerConnectionError:
    """The layer's :class:`BrokerConnectionError` subclass for a failed or lost connection."""
    mapped = layer_error(error, url, virtual_host)
    assert isinstance(mapped, BrokerConnectionError)
    return mapped


@contextmanager
def translated(url: str | None, virtual_host: str = "") -> Iterator[None]:
    """Raise the client's errors from the block as the layer's (the client's error is not chained:
    the layer's names everything a caller needs)."""
    try:
        yield
    except amqp.AmqpError as error:
        raise layer_error(error, url, virtual_host) from None
