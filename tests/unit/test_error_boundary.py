"""The one boundary between the AMQP client's errors and the layer's (link/errors.py): every
class of ``amqp.errors`` has its entry, and what comes out is a layer error with the facts."""

from __future__ import annotations

import inspect

import pytest

from channels_rabbitmq import exceptions
from channels_rabbitmq.amqp import errors as amqp
from channels_rabbitmq.exceptions import (
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
    ReplyCode,
    RequestNotEncodableError,
    TooManyChannelsError,
)
from channels_rabbitmq.link.errors import TRANSLATIONS, connection_error, layer_error, translated

URL = "amqp://app@rmq.example:5672/asgi"
PEER = {"peer": "rmq.example", "host": "10.0.0.7", "port": 5672}

# One example of every client error, and the layer error (type, fields) it must become.
EXAMPLES: dict[type[amqp.AmqpError], tuple[amqp.AmqpError, type[RabbitmqLayerError], dict[str, object]]] = {
    amqp.AmqpError: (amqp.AmqpError("odd"), BrokerProtocolError, {"url": URL}),
    amqp.ProtocolError: (amqp.ProtocolError("bad frame end"), BrokerProtocolError, {"url": URL}),
    amqp.ChannelRefused: (
        amqp.ChannelRefused(403, "ACCESS_REFUSED - no write", "Queue.Bind"),
        BrokerRefusedError,
        {
            "reply_code": ReplyCode.ACCESS_REFUSED,
            "reply_text": "ACCESS_REFUSED - no write",
            "request": "Queue.Bind",
        },
    ),
    amqp.RequestNotEncodable: (
        amqp.RequestNotEncodable("Queue.Bind", "routing key over 255 bytes"),
        RequestNotEncodableError,
        {"request": "Queue.Bind", "reason": "routing key over 255 bytes"},
    ),
    amqp.RequestStalled: (
        amqp.RequestStalled("bind", 10.0, "amqp://app@rmq.example:5672/asgi", dropped=True),
        BrokerTimeoutError,
        {"operation": "bind", "timeout": 10.0, "url": URL},
    ),
    amqp.ChannelsExhausted: (amqp.ChannelsExhausted(37, 2047), TooManyChannelsError, {"channel_max": 2047}),
    amqp.ConnectionFailed: (
        amqp.ConnectionFailed("gone", **PEER),
        BrokerConnectionError,
        {"url": URL, "address": "10.0.0.7:5672"},
    ),
    amqp.Unreachable: (
        amqp.Unreachable("refused", **PEER, errno=111, reason="Connection refused"),
        BrokerUnreachableError,
        {"errno": 111, "reason": "Connection refused", "url": URL, "address": "10.0.0.7:5672"},
    ),
    amqp.HandshakeTimeout: (
        amqp.HandshakeTimeout("slow", **PEER, timeout=10.0),
        BrokerTimeoutError,
        {"operation": "connect", "timeout": 10.0, "address": "10.0.0.7:5672"},
    ),
    amqp.TlsFailed: (
        amqp.TlsFailed(
            "tls",
            **PEER,
            reason="CERTIFICATE_VERIFY_FAILED",
            verify_code=62,
            verify_message="Hostname mismatch",
        ),
        BrokerTLSError,
        {"reason": "CERTIFICATE_VERIFY_FAILED", "verify_code": 62, "verify_message": "Hostname mismatch"},
    ),
    amqp.LoginRefused: (
        amqp.LoginRefused("login", **PEER, reply_code=403, reply_text="ACCESS_REFUSED - Login was refused"),
        BrokerLoginRefusedError,
        {"reply_code": ReplyCode.ACCESS_REFUSED, "reply_text": "ACCESS_REFUSED - Login was refused"},
    ),
    amqp.VhostRefused: (
        amqp.VhostRefused("vhost", **PEER, reply_code=530, reply_text="NOT_ALLOWED - vhost asgi not found"),
        BrokerVhostRefusedError,
        {"virtual_host": "asgi", "reply_code": ReplyCode.NOT_ALLOWED},
    ),
    amqp.ProtocolViolation: (
        amqp.ProtocolViolation("not AMQP", **PEER),
        BrokerProtocolError,
        {"address": "10.0.0.7:5672"},
    ),
    amqp.ConnectionLost: (
        amqp.ConnectionLost(
            "closed", **PEER, reply_code=320, reply_text="CONNECTION_FORCED", during_handshake=True
        ),
        BrokerConnectionLostError,
        {
            "reply_code": ReplyCode.CONNECTION_FORCED,
            "reply_text": "CONNECTION_FORCED",
            "during_handshake": True,
        },
    ),
}


def client_error_classes() -> set[type[amqp.AmqpError]]:
    return {
        value
        for value in vars(amqp).values()
        if inspect.isclass(value)
        and issubclass(value, amqp.AmqpError)
        and value.__module__ == amqp.__name__
        and not value.__name__.startswith("_")  # a private base, never raised itself
    }


def test_every_client_error_class_has_its_own_translation_and_an_example_here() -> None:
    classes = client_error_classes()
    assert classes == set(TRANSLATIONS), "each class of amqp.errors needs its entry in TRANSLATIONS"
    assert classes == set(EXAMPLES)


@pytest.mark.parametrize(
    "client_class", sorted(EXAMPLES, key=lambda cls: cls.__name__), ids=lambda c: c.__name__
)
def test_a_client_error_becomes_the_layer_error_with_its_facts(client_class: type[amqp.AmqpError]) -> None:
    error, layer_class, fields = EXAMPLES[client_class]
    assert type(error) is client_class
    mapped = layer_error(error, URL, "asgi")
    assert type(mapped) is layer_class
    assert type(mapped).__module__ == exceptions.__name__  # never the client's own class
    assert not isinstance(mapped, amqp.AmqpError)
    for name, value in fields.items():
        assert getattr(mapped, name) == value, name
    assert str(mapped)


def test_connection_errors_are_broker_connection_errors() -> None:
    for client_class, (error, _layer_class, _fields) in EXAMPLES.items():
        if issubclass(client_class, amqp.ConnectionFailed):
            assert isinstance(connection_error(error, URL), BrokerConnectionError)


def test_an_ipv6_address_is_bracketed() -> None:
    error = amqp.Unreachable("refused", peer="x", host="::1", port=5672, errno=111, reason="refused")
    assert layer_error(error, URL).address == "[::1]:5672"  # type: ignore[attr-defined]


def test_translated_raises_the_layer_error_unchained_and_lets_others_through() -> None:
    with pytest.raises(BrokerRefusedError) as raised, translated(URL):
        raise amqp.ChannelRefused(404, "NOT_FOUND - no queue", "Queue.Bind")
    assert raised.value.__cause__ is None
    assert raised.value.__suppress_context__
    with pytest.raises(KeyError), translated(URL):
        raise KeyError("not the client's")
