"""The boundary between the AMQP client and the layer: its errors become the layer's.

Everything the link raises to :mod:`channels_rabbitmq.core` is a
:mod:`channels_rabbitmq.exceptions` error, with the broker's URL (never its password)
and the address tried.
"""

from __future__ import annotations

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


def layer_error(error: amqp.AmqpError, url: str | None = None, virtual_host: str = "") -> RabbitmqLayerError:
    """The layer's error for an error of the AMQP client (``url``: the broker's, without password)."""
    if isinstance(error, amqp.ChannelRefused):
        return BrokerRefusedError(amqp.reply_code(error.reply_code), error.reply_text, error.request)
    if isinstance(error, amqp.RequestNotEncodable):
        return RequestNotEncodableError(error.request, error.reason)
    if isinstance(error, amqp.ChannelsExhausted):
        return TooManyChannelsError(
            f"{error}: too many normal channels are read at once on this connection",
            channel_max=error.channel_max,
        )
    if not isinstance(error, amqp.ConnectionFailed):  # a ProtocolError outside a connection
        return BrokerProtocolError(str(error), url=url)
    return connection_error(error, url, virtual_host)


def connection_error(
    error: amqp.ConnectionFailed, url: str | None = None, virtual_host: str = ""
) -> BrokerConnectionError:
    """The layer's :class:`BrokerConnectionError` subclass for a failed or lost connection."""
    message = str(error)
    address = None if error.host is None else _address(error.host, error.port)
    mapped: BrokerConnectionError
    if isinstance(error, amqp.Unreachable):
        mapped = BrokerUnreachableError(
            message, errno=error.errno, reason=error.reason, url=url, address=address
        )
    elif isinstance(error, amqp.HandshakeTimeout):
        mapped = BrokerTimeoutError(
            message, operation="connect", timeout=error.timeout, url=url, address=address
        )
    elif isinstance(error, amqp.TlsFailed):
        mapped = BrokerTLSError(
            message,
            reason=error.reason,
            verify_code=error.verify_code,
            verify_message=error.verify_message,
            url=url,
            address=address,
        )
    elif isinstance(error, amqp.LoginRefused):
        mapped = BrokerLoginRefusedError(
            message,
            reply_code=amqp.reply_code(error.reply_code),
            reply_text=error.reply_text,
            url=url,
            address=address,
        )
    elif isinstance(error, amqp.VhostRefused):
        mapped = BrokerVhostRefusedError(
            message,
            virtual_host=virtual_host,
            reply_code=amqp.reply_code(error.reply_code),
            reply_text=error.reply_text,
            url=url,
            address=address,
        )
    elif isinstance(error, amqp.ProtocolViolation):
        mapped = BrokerProtocolError(message, url=url, address=address)
    elif isinstance(error, amqp.ConnectionLost):
        mapped = BrokerConnectionLostError(
            message,
            reply_code=None if error.reply_code is None else amqp.reply_code(error.reply_code),
            reply_text=error.reply_text,
            during_handshake=error.during_handshake,
            url=url,
            address=address,
        )
    else:
        mapped = BrokerConnectionError(message, url=url, address=address)
    return mapped


def _address(host: str, port: int | None) -> str:
    host = f"[{host}]" if ":" in host else host
    return host if port is None else f"{host}:{port}"
