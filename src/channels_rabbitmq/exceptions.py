"""The errors this layer raises beyond Channels' own.

Channels' exceptions keep their meaning: ``ChannelFull`` when the broker refuses a
``send()`` for capacity, ``MessageTooLarge`` for a message over ``max_message_size``,
``StopConsumer`` from ``receive()`` after ``close()``, ``TypeError`` for bad names and
messages. Everything about the broker maps to the tree below: no raw frame error,
``OSError`` or ``ssl.SSLError`` leaks out of the layer. Decide by type and fields; the
messages are for people and may change.

    RabbitmqLayerError
      BrokerConnectionError           no usable connection (catch this for all of them)
        BrokerUnreachableError        no TCP connection: errno, reason
        BrokerTimeoutError            no answer in time: operation, timeout
        BrokerTLSError                the TLS handshake failed: reason, verify_code, verify_message
        BrokerLoginRefusedError       wrong username or password: reply_code, reply_text
        BrokerVhostRefusedError       no such vhost, or not allowed: virtual_host, reply_code, reply_text
        BrokerAccessRefusedError      set-up refused, e.g. no permission: request, reply_code, reply_text
        BrokerProtocolError           the peer does not speak AMQP 0-9-1 as we do
        BrokerConnectionLostError     the connection ended: reply_code, reply_text, during_handshake
        BrokerBlockedError            a resource alarm outlasted connection_wait: reason
      BrokerRefusedError              one request refused (bind, purge): request, reply_code, reply_text
      RequestNotEncodableError        one request AMQP cannot carry (also a ValueError): request, reason
      TooManyChannelsError            more normal channels read at once than AMQP channels: channel_max
      ChannelLayerClosedError         the layer was closed

Every :class:`BrokerConnectionError` has ``url`` (the broker's URL without its password)
and ``address`` (``"ip:port"`` tried), each None when not known.
"""

from __future__ import annotations

from .amqp.errors import ReplyCode

__all__ = [
    "BrokerAccessRefusedError",
    "BrokerBlockedError",
    "BrokerConnectionError",
    "BrokerConnectionLostError",
    "BrokerLoginRefusedError",
    "BrokerProtocolError",
    "BrokerRefusedError",
    "BrokerTLSError",
    "BrokerTimeoutError",
    "BrokerUnreachableError",
    "BrokerVhostRefusedError",
    "ChannelLayerClosedError",
    "RabbitmqLayerError",
    "ReplyCode",
    "RequestNotEncodableError",
    "TooManyChannelsError",
]


class RabbitmqLayerError(Exception):
    """Base class of the errors specific to this layer."""


class BrokerConnectionError(RabbitmqLayerError, ConnectionError):
    """The broker could not be reached, refused the connection, or the connection was lost.

    The message names the cause and never the password. ``attempts`` holds each node's
    error when several addresses were tried (this error is the most telling of them).
    """

    def __init__(self, message: str, *, url: str | None = None, address: str | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.address = address
        self.attempts: tuple[BrokerConnectionError, ...] = ()

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class BrokerUnreachableError(BrokerConnectionError):
    """No TCP connection to the broker: ``errno`` (e.g. ``errno.ECONNREFUSED``; None when the
    host name did not resolve or the cause is unknown) and ``reason`` in the system's words."""

    def __init__(
        self,
        message: str,
        *,
        errno: int | None,
        reason: str,
        url: str | None = None,
        address: str | None = None,
    ) -> None:
        super().__init__(message, url=url, address=address)
        self.errno = errno
        self.reason = reason


class BrokerTimeoutError(BrokerConnectionError):
    """``operation`` got no answer within ``timeout`` seconds: ``"connect"`` (TCP, TLS and the
    AMQP handshake), ``"set-up"``, ``"reconnect"`` (an outage outlasted ``connection_wait``),
    ``"publish"``, ``"bind"``, ``"unbind"``, ``"purge"``, ``"flush"`` (also: another process did not
    answer a flush() in time), ``"group_add"`` and ``"group_discard"`` (the process that owns the
    channel did not answer), or a layer call made from another event loop."""

    def __init__(
        self,
        message: str,
        *,
        operation: str,
        timeout: float,
        url: str | None = None,
        address: str | None = None,
    ) -> None:
        super().__init__(message, url=url, address=address)
        self.operation = operation
        self.timeout = timeout


class BrokerTLSError(BrokerConnectionError):
    """The TLS handshake failed.

    ``reason`` is OpenSSL's code (``"CERTIFICATE_VERIFY_FAILED"``,
    ``"TLSV13_ALERT_CERTIFICATE_REQUIRED"``, ``"WRONG_VERSION_NUMBER"``, ...) or None;
    ``verify_code`` and ``verify_message`` are set when the broker's certificate was not
    accepted (``verify_code`` 10: expired, 62: issued for another host name, 20: unknown CA).
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str | None,
        verify_code: int | None = None,
        verify_message: str | None = None,
        url: str | None = None,
        address: str | None = None,
    ) -> None:
        super().__init__(message, url=url, address=address)
        self.reason = reason
        self.verify_code = verify_code
        self.verify_message = verify_message


class _BrokerReply(BrokerConnectionError):
    def __init__(
        self,
        message: str,
        *,
        reply_code: ReplyCode | int,
        reply_text: str,
        url: str | None = None,
        address: str | None = None,
    ) -> None:
        super().__init__(message, url=url, address=address)
        self.reply_code = reply_code
        self.reply_text = reply_text


class BrokerLoginRefusedError(_BrokerReply):
    """RabbitMQ refused the username or password (``reply_code`` 403 ACCESS_REFUSED)."""


class BrokerVhostRefusedError(_BrokerReply):
    """RabbitMQ refused ``virtual_host``: it does not exist, or the user has no permission on
    it (``reply_code`` 530 NOT_ALLOWED for both)."""

    def __init__(
        self,
        message: str,
        *,
        virtual_host: str,
        reply_code: ReplyCode | int,
        reply_text: str,
        url: str | None = None,
        address: str | None = None,
    ) -> None:
        super().__init__(message, reply_code=reply_code, reply_text=reply_text, url=url, address=address)
        self.virtual_host = virtual_host


class BrokerAccessRefusedError(_BrokerReply):
    """RabbitMQ refused ``request`` (e.g. ``"Queue.Declare"``) while the layer set a connection
    up; usually 403 ACCESS_REFUSED: the user lacks configure, write or read permission."""

    def __init__(
        self,
        message: str,
        *,
        request: str,
        reply_code: ReplyCode | int,
        reply_text: str,
        url: str | None = None,
        address: str | None = None,
    ) -> None:
        super().__init__(message, reply_code=reply_code, reply_text=reply_text, url=url, address=address)
        self.request = request


class BrokerProtocolError(BrokerConnectionError):
    """The peer sent bytes that are not AMQP 0-9-1, or that this client cannot go on from
    (is it a RabbitMQ port?)."""


class BrokerConnectionLostError(BrokerConnectionError):
    """The connection ended: a socket error, missed heartbeats, or the broker closed it.

    ``reply_code`` and ``reply_text`` are the broker's when it closed the connection (e.g.
    320 CONNECTION_FORCED from ``rabbitmqctl close_connection``), else None.
    ``during_handshake`` is True when the peer hung up before the AMQP handshake finished.
    """

    def __init__(
        self,
        message: str,
        *,
        reply_code: ReplyCode | int | None = None,
        reply_text: str | None = None,
        during_handshake: bool = False,
        url: str | None = None,
        address: str | None = None,
    ) -> None:
        super().__init__(message, url=url, address=address)
        self.reply_code = reply_code
        self.reply_text = reply_text
        self.during_handshake = during_handshake


class BrokerBlockedError(BrokerConnectionError):
    """RabbitMQ blocks publishing (a memory or disk alarm) and did not lift it within ``connection_wait``.

    ``reason`` is the broker's own words (for example ``"low on memory"``). Receiving goes on
    during an alarm; only publishing waits.
    """

    def __init__(
        self, message: str, *, reason: str, url: str | None = None, address: str | None = None
    ) -> None:
        super().__init__(message, url=url, address=address)
        self.reason = reason


class BrokerRefusedError(RabbitmqLayerError):
    """The broker refused one request (``request``: a binding, an unbinding, a purge).

    ``reply_code`` (a :class:`ReplyCode` when AMQP defines it) and ``reply_text`` are the
    broker's own, e.g. 403 ACCESS_REFUSED when the user lacks a permission.
    """

    def __init__(self, reply_code: ReplyCode | int, reply_text: str, request: str = "") -> None:
        self.reply_code = reply_code
        self.reply_text = reply_text
        self.request = request
        where = f" to {request}" if request else ""
        super().__init__(f"RabbitMQ refused the request{where}: {int(reply_code)} {reply_text}")


class RequestNotEncodableError(RabbitmqLayerError, ValueError):
    """``request`` cannot be encoded as AMQP 0-9-1 (``reason``: a name over 255 bytes, say). The
    layer checks names at each call (``TypeError``), so this marks input that slipped past
    those checks; it fails that call alone, and nothing of it reached the broker."""

    def __init__(self, request: str, reason: str) -> None:
        self.request = request
        self.reason = reason
        super().__init__(f"cannot encode {request} for RabbitMQ: {reason}")


class TooManyChannelsError(RabbitmqLayerError):
    """A ``receive()`` on a normal channel needs an AMQP channel of its own while it waits, and
    every channel number up to the connection's ``channel_max`` is in use by other normal
    channels waiting at that moment. That call fails; the others, and the connection, go on."""

    def __init__(self, message: str, *, channel_max: int) -> None:
        super().__init__(message)
        self.channel_max = channel_max


class ChannelLayerClosedError(RabbitmqLayerError, RuntimeError):
    """The layer was closed with ``close()``; build a new one to go on."""
