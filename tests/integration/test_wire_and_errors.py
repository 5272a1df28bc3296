"""Hostile bytes from the wire and bad connection settings, against the real broker."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import msgpack
import pytest

from channels_rabbitmq.amqp.connection import AmqpConnection, BufferedAmqpConnection
from channels_rabbitmq.core import RabbitmqChannelLayer
from channels_rabbitmq.exceptions import BrokerConnectionError
from channels_rabbitmq.link.channel_plan import PUBLISH_CHANNEL
from channels_rabbitmq.wire import NO_PROPERTIES, channel_properties
from tests.conftest import Broker, LayerFactory, link_of, loop_kind_of

pytestmark = pytest.mark.usefixtures("loop_kind")  # each async test on asyncio's loop and on uvloop


async def test_undecodable_and_malformed_bodies_are_dropped_and_delivery_goes_on(
    make_layer: LayerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    receiver, producer = make_layer(), make_layer()
    channel = await receiver.new_channel()
    await receiver.group_add("room", channel)
    await producer.new_channel()
    connection = await link_of(producer).publishing.connected()
    queue = link_of(receiver).queue_name.encode()
    hostile = [
        (b"", queue, channel_properties(channel), b"\xc1 not msgpack"),
        (b"", queue, channel_properties(channel), msgpack.packb([1, 2, 3])),  # not a map
        (b"", queue, channel_properties(channel), msgpack.packb({"a": 1}) + b"extra"),
        (b"", queue, channel_properties(channel), b""),
        (b"", queue, NO_PROPERTIES, msgpack.packb({"type": "no target"})),
        (b"", queue, channel_properties("channels.other!x"), msgpack.packb({"type": "wrong queue"})),
        (b"groups", b"room", NO_PROPERTIES, b"\xff\xff"),
    ]
    with caplog.at_level(logging.WARNING, logger="channels_rabbitmq"):
        for exchange, routing_key, properties, body in hostile:
            assert await connection.publish(PUBLISH_CHANNEL, exchange, routing_key, properties, body)
        await producer.send(channel, {"type": "good"})
        await producer.group_send("room", {"type": "good.group"})
        assert await asyncio.wait_for(receiver.receive(channel), 5) == {"type": "good"}
        assert await asyncio.wait_for(receiver.receive(channel), 5) == {"type": "good.group"}
    dropped = [
        record for record in caplog.records if "dropped a message from the wire" in record.getMessage()
    ]
    assert 1 <= len(dropped) <= 2  # logged, and rate-limited


async def test_asyncio_loops_read_into_a_buffer_of_the_connection_and_uvloop_into_its_own(
    make_layer: LayerFactory,
) -> None:
    layer = make_layer()
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "m", "body": "x" * 70_000})  # larger than one frame
    assert (await layer.receive(channel))["body"] == "x" * 70_000
    connection = link_of(layer).publisher.supervisor.connection
    assert isinstance(connection, AmqpConnection)
    buffered = isinstance(connection, asyncio.BufferedProtocol)
    assert buffered == (loop_kind_of(asyncio.get_running_loop()) == "asyncio")
    assert buffered == isinstance(connection, BufferedAmqpConnection)


async def test_wrong_password_raises_a_clear_error_without_the_password(broker: Broker) -> None:
    secret = "s3cret-Passw0rd"
    layer = RabbitmqChannelLayer(host=broker.url_for(password=secret), connect_timeout=5)
    with pytest.raises(BrokerConnectionError) as caught:
        await layer.new_channel()
    assert "password" in str(caught.value)
    assert secret not in str(caught.value)
    assert secret not in repr(layer)
    await layer.close()


async def test_unknown_vhost_raises_a_clear_error(broker: Broker) -> None:
    layer = RabbitmqChannelLayer(host=broker.url_for(vhost="no-such-vhost"), connect_timeout=5)
    with pytest.raises(BrokerConnectionError, match="vhost"):
        await layer.send("channels.elsewhere!x", {"type": "m"})
    await layer.close()


async def test_nothing_listening_raises_at_once() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    layer = RabbitmqChannelLayer(host=f"amqp://guest:guest@127.0.0.1:{port}/%2F", connect_timeout=5)
    started = time.monotonic()
    with pytest.raises(BrokerConnectionError, match="cannot connect"):
        await layer.new_channel()
    assert time.monotonic() - started < 4  # connect_timeout=5: refused at once
    await layer.close()


async def test_a_silent_server_raises_within_connect_timeout() -> None:
    handlers_done = asyncio.Event()

    async def say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up
        writer.close()
        await writer.wait_closed()
        handlers_done.set()

    server = await asyncio.start_server(say_nothing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    layer = RabbitmqChannelLayer(host=f"amqp://guest:guest@127.0.0.1:{port}/%2F", connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(BrokerConnectionError, match="connect_timeout"):
        await layer.new_channel()
    assert time.monotonic() - started < 3  # connect_timeout=0.5
    await layer.close()
    await asyncio.wait_for(handlers_done.wait(), 5)
    server.close()
    await server.wait_closed()


async def test_missing_permissions_raise_a_clear_error(broker: Broker) -> None:
    from tests.conftest import rabbitmqctl

    user, secret = "channels_rabbitmq_test_noperm", "n0-Perm-pw"
    rabbitmqctl("add_user", user, secret)
    try:
        rabbitmqctl(
            "set_permissions", "-p", broker.vhost, user, "", "", ""
        )  # may open the vhost, nothing else
        layer = RabbitmqChannelLayer(host=broker.url_for(username=user, password=secret), connect_timeout=5)
        with pytest.raises(BrokerConnectionError, match="ACCESS_REFUSED") as caught:
            await layer.new_channel()
        assert "permissions" in str(caught.value)
        assert secret not in str(caught.value)
        await layer.close()
    finally:
        rabbitmqctl("delete_user", user)
