"""The AMQP client's errors: what went wrong, in fields, for whoever uses the client.

This package knows nothing of the channel layer; the layer maps these errors to its own
public ones where it calls the client (:mod:`channels_rabbitmq.link.errors`).

    AmqpError
      ConnectionFailed          the connection could not be opened, or it is over
        Unreachable             no TCP connection (refused, no route, DNS)
        HandshakeTimeout        no AMQP answer within the time allowed
        TlsFailed               the TLS handshake failed (certificate, version, ...)
        LoginRefused            the broker refused the credentials
        VhostRefused            the broker refused the virtual host
        ProtocolViolation       the peer sent bytes that are not AMQP 0-9-1
        ConnectionLost          an open connection ended (socket error, closed by the broker,
                                missed heartbeats, consumer cancelled)
      ChannelRefused            the broker closed a channel in answer to one request
      ChannelsExhausted         every channel number the connection may use is taken
      RequestNotEncodable       a request or publish that AMQP cannot carry (a name over 255
                                bytes, say): it fails alone, and nothing of it is sent
      ProtocolError             the sans-I/O protocol's own: bytes it cannot go on from
"""

from __future__ import annotations

import enum


class ReplyCode(enum.IntEnum):
    """The reply codes of AMQP 0-9-1 (``connection.close`` and ``channel.close``)."""

    REPLY_SUCCESS = 200
    CONTENT_TOO_LARGE = 311
    NO_ROUTE = 312
    NO_CONSUMERS = 313
    CONNECTION_FORCED = 320
    INVALID_PATH = 402
    ACCESS_REFUSED = 403
    NOT_FOUND = 404
    RESOURCE_LOCKED = 405
    PRECONDITION_FAILED = 406
    FRAME_ERROR = 501
    SYNTAX_ERROR = 502
    COMMAND_INVALID = 503
    CHANNEL_ERROR = 504
    UNEXPECTED_FRAME = 505
    RESOURCE_ERROR = 506
    NOT_ALLOWED = 530
    NOT_IMPLEMENTED = 540
    INTERNAL_ERROR = 541


def reply_code(code: int) -> ReplyCode | int:
    """``code`` as a :class:`ReplyCode` when AMQP defines it, else the bare number."""
    try:
        return ReplyCode(code)
    except ValueError:
        return code


class AmqpError(Exception):
    """Base class of the client's errors."""


class ProtocolError(AmqpError):
    """The broker broke the protocol, or refused the handshake in a way we cannot go on from
    (raised by the sans-I/O :class:`~.protocol.AmqpProtocol`, which knows no peer)."""


class ConnectionFailed(AmqpError):
    """The connection could not be opened, or it is over. ``peer`` names the broker as the
    connection's owner described it; ``host`` and ``port`` are the address tried."""

    def __init__(self, message: str, *, peer: str, host: str | None = None, port: int | None = None) -> None:
        super().__init__(message)
        self.peer = peer
        self.host = host
        self.port = port


class Unreachable(ConnectionFailed):
    """No TCP connection: ``errno`` is the system's (None when unknown), ``reason`` its words."""

    def __init__(
        self,
        message: str,
        *,
        peer: str,
        host: str | None = None,
        port: int | None = None,
        errno: int | None,
        reason: str,
    ) -> None:
        super().__init__(message, peer=peer, host=host, port=port)
        self.errno = errno
        self.reason = reason


class HandshakeTimeout(ConnectionFailed):
    """The connection, TLS or AMQP handshake did not finish within ``timeout`` seconds."""

    def __init__(
        self, message: str, *, peer: str, host: str | None = None, port: int | None = None, timeout: float
    ) -> None:
        super().__init__(message, peer=peer, host=host, port=port)
        self.timeout = timeout


class TlsFailed(ConnectionFailed):
    """The TLS handshake failed.

    ``reason`` is OpenSSL's reason code (``"CERTIFICATE_VERIFY_FAILED"``,
    ``"TLSV13_ALERT_CERTIFICATE_REQUIRED"``, ``"WRONG_VERSION_NUMBER"``, ...), or None;
    ``verify_code`` and ``verify_message`` are the X.509 verification result when the
    broker's certificate was refused (``verify_code`` 10: expired, 62: wrong host name).
    """

    def __init__(
        self,
        message: str,
        *,
        peer: str,
        host: str | None = None,
        port: int | None = None,
        reason: str | None,
        verify_code: int | None = None,
        verify_message: str | None = None,
    ) -> None:
        super().__init__(message, peer=peer, host=host, port=port)
        self.reason = reason
        self.verify_code = verify_code
        self.verify_message = verify_message


class _Refusal(ConnectionFailed):
    def __init__(
        self,
        message: str,
        *,
        peer: str,
        host: str | None = None,
        port: int | None = None,
        reply_code: int,
        reply_text: str,
    ) -> None:
        super().__init__(message, peer=peer, host=host, port=port)
        self.reply_code = reply_code
        self.reply_text = reply_text


class LoginRefused(_Refusal):
    """The broker refused the username or password (``reply_code`` 403 ACCESS_REFUSED)."""


class VhostRefused(_Refusal):
    """The broker refused the virtual host: it does not exist, or the user may not use it
    (``reply_code`` 530 NOT_ALLOWED; RabbitMQ gives both cases the same code)."""


class ProtocolViolation(ConnectionFailed):
    """The peer sent bytes that are not AMQP 0-9-1, or a method out of place."""


class ConnectionLost(ConnectionFailed):
    """An open connection (or one in its handshake: ``during_handshake``) ended.

    ``reply_code`` and ``reply_text`` are the broker's when it closed the connection
    (``connection.close``, e.g. 320 CONNECTION_FORCED), else None.
    """

    def __init__(
        self,
        message: str,
        *,
        peer: str,
        host: str | None = None,
        port: int | None = None,
        reply_code: int | None = None,
        reply_text: str | None = None,
        during_handshake: bool = False,
    ) -> None:
        super().__init__(message, peer=peer, host=host, port=port)
        self.reply_code = reply_code
        self.reply_text = reply_text
        self.during_handshake = during_handshake


class ChannelRefused(AmqpError):
    """The broker closed a channel in answer to ``request`` (a pamqp method name, e.g.
    ``"Queue.Declare"``): ``reply_code`` (403 ACCESS_REFUSED, 404 NOT_FOUND, 405
    RESOURCE_LOCKED, 406 PRECONDITION_FAILED, ...) and ``reply_text`` are its own."""

    def __init__(self, reply_code: int, reply_text: str, request: str = "") -> None:
        self.reply_code = reply_code
        self.reply_text = reply_text
        self.request = request
        where = f" to {request}" if request else ""
        super().__init__(f"RabbitMQ refused the request{where}: {reply_code} {reply_text}")


class RequestNotEncodable(AmqpError, ValueError):
    """``request`` (a pamqp method name, or ``"Basic.Publish"``) cannot be encoded as AMQP 0-9-1:
    ``reason`` says why (a short string over 255 bytes, say). Nothing of it was sent, and the
    connection goes on with the requests after it."""

    def __init__(self, request: str, reason: str) -> None:
        self.request = request
        self.reason = reason
        super().__init__(f"cannot encode {request}: {reason}")


class ChannelsExhausted(AmqpError):
    """Every AMQP channel number from ``first`` to the negotiated ``channel_max`` is in use: no
    new channel can be opened on this connection until one is closed."""

    def __init__(self, first: int, channel_max: int) -> None:
        self.first = first
        self.channel_max = channel_max
        super().__init__(
            f"every AMQP channel from {first} to the connection's channel_max ({channel_max}) is in use"
        )


class RequestStalled(AmqpError):
    """A request (``operation``: "bind", "declare", ...) got no reply, and its channel showed no
    progress, for ``timeout`` seconds. ``dropped``: the connection was aborted for it."""

    def __init__(self, operation: str, timeout: float, peer: str, *, dropped: bool) -> None:
        self.operation = operation
        self.timeout = timeout
        self.peer = peer
        self.dropped = dropped
        super().__init__(f"{peer} did not answer {operation} for {timeout:g}s")
