"""Each way of failing to connect raises its own error type, with fields set, against the real broker.

Callers (the ``check`` command included) decide by type and fields, never by message: these
tests pin the type and the fields for each failure a deployment meets. Every one of them
is still a :class:`BrokerConnectionError`, so ``except BrokerConnectionError`` catches them all.
"""

from __future__ import annotations

import asyncio
import errno
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from urllib.parse import urlsplit

import pytest

from channels_rabbitmq.core import RabbitmqChannelLayer
from channels_rabbitmq.exceptions import (
    BrokerAccessRefusedError,
    BrokerConnectionError,
    BrokerConnectionLostError,
    BrokerLoginRefusedError,
    BrokerProtocolError,
    BrokerTimeoutError,
    BrokerUnreachableError,
    BrokerVhostRefusedError,
    ReplyCode,
)
from tests.conftest import Broker, LayerFactory, rabbitmqctl

pytestmark = [pytest.mark.usefixtures("loop_kind"), pytest.mark.no_unretrieved_errors]  # on both loops

SECRET = "Err0r-types:S3cret"


async def connect_error(layer: RabbitmqChannelLayer) -> BrokerConnectionError:
    """The error that the first call of ``layer`` raises; its text never shows the password."""
    with pytest.raises(BrokerConnectionError) as caught:
        await layer.new_channel()
    error = caught.value
    for text in (str(error), repr(error), str(error.url)):
        assert SECRET not in text
    return error


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def fake_server() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    """Start local TCP servers that are not RabbitMQ; returns each one's port."""
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> int:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
def user(broker: Broker) -> Iterator[str]:
    """A user of the run's vhost with the password ``SECRET``; each test sets its permissions."""
    name = f"channels_rabbitmq_types_{secrets.token_hex(3)}"
    rabbitmqctl("add_user", name, SECRET)
    try:
        yield name
    finally:
        rabbitmqctl("delete_user", name)


async def test_a_wrong_password_is_a_refused_login(broker: Broker, make_layer: LayerFactory) -> None:
    layer = make_layer(host=broker.url_for(password=SECRET), connect_timeout=5)
    error = await connect_error(layer)
    assert type(error) is BrokerLoginRefusedError
    assert error.reply_code == ReplyCode.ACCESS_REFUSED
    assert isinstance(error.reply_code, ReplyCode)
    assert error.reply_text.startswith("ACCESS_REFUSED")
    assert error.url == f"amqp://guest@127.0.0.1:{broker_port(broker)}/{broker.vhost}"
    assert error.address == f"127.0.0.1:{broker_port(broker)}"


async def test_an_unknown_vhost_is_a_refused_vhost(broker: Broker, make_layer: LayerFactory) -> None:
    layer = make_layer(host=broker.url_for(vhost="no-such-vhost"), connect_timeout=5)
    error = await connect_error(layer)
    assert type(error) is BrokerVhostRefusedError
    assert error.virtual_host == "no-such-vhost"
    assert error.reply_code == ReplyCode.NOT_ALLOWED
    assert error.address == f"127.0.0.1:{broker_port(broker)}"


async def test_a_vhost_the_user_may_not_use_is_a_refused_vhost_too(
    broker: Broker, make_layer: LayerFactory, user: str
) -> None:
    layer = make_layer(host=broker.url_for(username=user, password=SECRET), connect_timeout=5)
    error = await connect_error(layer)  # no permissions at all on the vhost
    assert type(error) is BrokerVhostRefusedError
    assert error.virtual_host == broker.vhost
    assert error.reply_code == ReplyCode.NOT_ALLOWED


async def test_a_closed_port_is_unreachable_with_its_errno(make_layer: LayerFactory) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    layer = make_layer(host=f"amqp://guest:{SECRET}@127.0.0.1:{port}/%2F", connect_timeout=5)
    error = await connect_error(layer)
    assert type(error) is BrokerUnreachableError
    assert error.errno == errno.ECONNREFUSED
    assert error.reason
    assert error.address == f"127.0.0.1:{port}"
    assert error.url == f"amqp://guest@127.0.0.1:{port}/%2F"


async def test_a_server_that_answers_http_is_a_protocol_error(
    make_layer: LayerFactory, fake_server: Callable[[Handler], Awaitable[int]]
) -> None:
    async def answer_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(8)  # the AMQP protocol header
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await reader.read()
        writer.close()

    port = await fake_server(answer_http)
    layer = make_layer(host=f"amqp://guest:{SECRET}@127.0.0.1:{port}/%2F", connect_timeout=5)
    error = await connect_error(layer)
    assert type(error) is BrokerProtocolError
    assert error.address == f"127.0.0.1:{port}"


async def test_a_server_that_hangs_up_is_a_connection_lost_during_the_handshake(
    make_layer: LayerFactory, fake_server: Callable[[Handler], Awaitable[int]]
) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(8)
        writer.close()

    port = await fake_server(hang_up)
    layer = make_layer(host=f"amqp://guest:{SECRET}@127.0.0.1:{port}/%2F", connect_timeout=5)
    error = await connect_error(layer)
    assert type(error) is BrokerConnectionLostError
    assert error.during_handshake is True
    assert error.reply_code is None
    assert error.address == f"127.0.0.1:{port}"


async def test_a_silent_server_is_a_connect_timeout(
    make_layer: LayerFactory, fake_server: Callable[[Handler], Awaitable[int]]
) -> None:
    async def say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up
        writer.close()

    port = await fake_server(say_nothing)
    layer = make_layer(host=f"amqp://guest:{SECRET}@127.0.0.1:{port}/%2F", connect_timeout=0.5)
    error = await connect_error(layer)
    assert type(error) is BrokerTimeoutError
    assert error.operation == "connect"
    assert 0 < error.timeout <= 0.5
    assert error.address == f"127.0.0.1:{port}"


@pytest.mark.parametrize(
    ("configure", "request_refused"),
    [("", "Exchange.Declare"), ("^groups$", "Queue.Declare")],
    ids=["no-configure", "configure-on-the-exchange-only"],
)
async def test_a_missing_permission_is_a_refused_request_named_with_its_code(
    broker: Broker, make_layer: LayerFactory, user: str, configure: str, request_refused: str
) -> None:
    rabbitmqctl("set_permissions", "-p", broker.vhost, user, configure, ".*", ".*")
    layer = make_layer(host=broker.url_for(username=user, password=SECRET), connect_timeout=5)
    error = await connect_error(layer)
    assert type(error) is BrokerAccessRefusedError
    assert error.request == request_refused
    assert error.reply_code == ReplyCode.ACCESS_REFUSED
    assert error.reply_text.startswith("ACCESS_REFUSED")
    assert error.address == f"127.0.0.1:{broker_port(broker)}"
    assert error.url == f"amqp://{user}@127.0.0.1:{broker_port(broker)}/{broker.vhost}"


def broker_port(broker: Broker) -> int:
    """The test broker's port: 5672, or a private node's (scripts/with-broker, scripts/rabbitmq4)."""
    return urlsplit(broker.url).port or 5672
