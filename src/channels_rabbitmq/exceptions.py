"""The errors this layer raises beyond Channels' own.

Channels' exceptions keep their meaning: ``ChannelFull`` when the broker refuses a
``send()`` for capacity, ``MessageTooLarge`` for a message over ``max_message_size``,
``StopConsumer`` from ``receive()`` after ``close()``, ``TypeError`` for bad names and
messages. Everything about the broker connection maps to the small tree below: no raw
frame error, ``OSError`` or ``ssl.SSLError`` leaks out of the layer.
"""

from __future__ import annotations


class RabbitmqLayerError(Exception):
    """Base class of the errors specific to this layer."""


class BrokerConnectionError(RabbitmqLayerError, ConnectionError):
    """The broker could not be reached, refused the connection, or the connection was lost.

    The message names the cause (address, refused login, unknown vhost, TLS failure,
    timeout, lost connection) and never the password.
    """


class BrokerBlockedError(BrokerConnectionError):
    """RabbitMQ blocks publishing (a memory or disk alarm) and did not lift it within ``connection_wait``.

    ``reason`` is the broker's own words (for example ``"low on memory"``). Receiving goes on
    during an alarm; only publishing waits.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class BrokerTimeoutError(BrokerConnectionError):
    """A request to the broker (``operation``) got no answer within ``timeout`` seconds."""

    def __init__(self, message: str, *, operation: str, timeout: float) -> None:
        super().__init__(message)
        self.operation = operation
        self.timeout = timeout


class BrokerRefusedError(RabbitmqLayerError):
    """The broker refused one request (a declaration, a binding, a purge).

    ``reply_code`` and ``reply_text`` are the broker's own, e.g. 403 ACCESS_REFUSED
    when the user lacks a permission.
    """

    def __init__(self, reply_code: int, reply_text: str, request: str = "") -> None:
        self.reply_code = reply_code
        self.reply_text = reply_text
        self.request = request
        where = f" to {request}" if request else ""
        super().__init__(f"RabbitMQ refused the request{where}: {reply_code} {reply_text}")


class ChannelLayerClosedError(RabbitmqLayerError, RuntimeError):
    """The layer was closed with ``close()``; build a new one to go on."""
