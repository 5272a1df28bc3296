"""The layer under real Django: uvicorn servers with websocket clients, and Channels' test communicator.

Two uvicorn processes serve tests/django_project on the run's vhost. A plain sync view
(``/notify``) group_sends through ``async_to_sync`` from Django's ``sync_to_async``
thread; websocket clients on both servers, on async and sync consumers, must each get
the message exactly once. The communicator tests run the same consumers in this process.

Everything runs on both event loops: the servers with ``--loop asyncio`` and with
``--loop uvloop`` (what uvicorn picks when uvloop is installed), the communicator tests
on this process's loop of either kind. Ids end with ``[asyncio]`` or ``[uvloop]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import pytest
from asgiref.sync import async_to_sync
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from channels_rabbitmq.core import RabbitmqChannelLayer
from tests.conftest import LOOP_KINDS, Broker

REPO = Path(__file__).resolve().parents[2]
SETTINGS_MODULE = "tests.django_project.settings"
START_TIMEOUT = 20.0
RECEIVE_TIMEOUT = 5.0
QUIET_PERIOD = 0.3


# Two uvicorn servers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str, timeout: float = RECEIVE_TIMEOUT) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


class UvicornServer:
    """One ``uvicorn`` process serving the test project, its output kept in a file."""

    def __init__(self, name: str, broker_url: str, loop: str) -> None:
        self.name = name
        self.loop = loop
        self.port = free_port()
        self.log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        self.final_output = ""
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
            "CHANNELS_RABBITMQ_TEST_URL": broker_url,
            "SERVER_NAME": name,
            "PYTHONUNBUFFERED": "1",
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "tests.django_project.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--lifespan",
                "off",
                "--loop",
                loop,
            ],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def fail_if_dead(self) -> None:
        code = self.process.poll()
        if code is not None:
            pytest.fail(f"uvicorn server {self.name!r} exited with code {code}:\n{self.output()}")

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            self.fail_if_dead()
            try:
                answer = get_json(f"{self.http}/health", timeout=1)
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"uvicorn server {self.name!r} did not answer HTTP within {START_TIMEOUT:g}s:\n"
                        f"{self.output()}"
                    )
                time.sleep(0.1)
                continue
            assert answer == {"server": self.name, "loop": self.loop}  # uvicorn ran the loop asked for
            return

    def assert_no_errors(self) -> None:
        """Alive, and nothing went wrong in it (an exception in a consumer or view is logged)."""
        self.fail_if_dead()
        output = self.output()
        assert "Traceback" not in output, f"uvicorn server {self.name!r} logged an error:\n{output}"

    def stop(self) -> tuple[int, str]:
        """Terminate it (graceful shutdown), wait for it; its exit code and output. Idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self.log.closed:
            self.final_output = self.output()
            self.log.close()
        return self.process.returncode, self.final_output


@pytest.fixture(scope="module", params=LOOP_KINDS)
def server_loop(request: pytest.FixtureRequest) -> str:
    """The event loop of the uvicorn servers: the tests using them run once with each."""
    return request.param


@pytest.fixture(scope="module")
def connections_before_servers(broker: Broker, server_loop: str) -> int:
    """How many connections the run's vhost had before the servers started."""
    return broker.connection_count()


@pytest.fixture(scope="module")
def uvicorn_servers(
    broker: Broker, server_loop: str, connections_before_servers: int
) -> Iterator[dict[str, UvicornServer]]:
    """Servers "one" and "two", both on the run's vhost and on ``server_loop``; stopped afterwards."""
    servers: dict[str, UvicornServer] = {}
    try:
        for name in ("one", "two"):
            servers[name] = UvicornServer(name, broker.url, server_loop)
        for server in servers.values():
            server.wait_until_ready()
        yield servers
    finally:
        already_dead = {name: server.process.poll() for name, server in servers.items()}
        results = {name: server.stop() for name, server in servers.items()}
    problems = []
    for name, (code, output) in results.items():
        if already_dead[name] is not None:
            problems.append(f"server {name!r} had died (exit code {already_dead[name]}):\n{output}")
        elif code not in (0, -signal.SIGTERM) or "Traceback" in output:
            # uvicorn re-raises the SIGTERM it handled once it has shut down gracefully.
            problems.append(f"server {name!r} shut down badly (exit code {code}):\n{output}")
    if problems:
        pytest.fail("\n\n".join(problems))


@contextlib.asynccontextmanager
async def websocket_clients(
    servers: dict[str, UvicornServer], paths: tuple[str, ...] = ("/ws/async/", "/ws/sync/")
) -> AsyncIterator[dict[tuple[str, str], ClientConnection]]:
    """One open websocket per (server, path); all closed on exit."""
    async with contextlib.AsyncExitStack() as stack:
        clients = {}
        for name, server in servers.items():
            for path in paths:
                clients[name, path] = await stack.enter_async_context(
                    connect(server.ws + path, open_timeout=RECEIVE_TIMEOUT, close_timeout=RECEIVE_TIMEOUT)
                )
        yield clients


async def receive_json(client: ClientConnection) -> Any:
    return json.loads(await asyncio.wait_for(client.recv(), RECEIVE_TIMEOUT))


async def anything_more(client: ClientConnection) -> str | bytes | None:
    """What else the client gets within QUIET_PERIOD; None when it stays quiet."""
    try:
        return await asyncio.wait_for(client.recv(), QUIET_PERIOD)
    except asyncio.TimeoutError:
        return None


async def assert_all_quiet(clients: dict[tuple[str, str], ClientConnection]) -> None:
    extra = await asyncio.gather(*(anything_more(client) for client in clients.values()))
    duplicates = {key: message for key, message in zip(clients, extra, strict=True) if message is not None}
    assert not duplicates, f"messages received more than once: {duplicates}"


CONSUMER_OF_PATH = {"/ws/async/": "async", "/ws/sync/": "sync"}


async def assert_everyone_got(
    clients: dict[tuple[str, str], ClientConnection], text: str, via: str | None
) -> None:
    received = await asyncio.gather(*(receive_json(client) for client in clients.values()))
    for (server, path), message in zip(clients, received, strict=True):
        assert message == {"text": text, "via": via, "server": server, "consumer": CONSUMER_OF_PATH[path]}
    await assert_all_quiet(clients)


async def notify(server: UvicornServer, text: str) -> None:
    answer = await asyncio.to_thread(get_json, f"{server.http}/notify?text={quote(text)}")
    assert answer == {"sent": text, "via": server.name}


async def test_notify_view_reaches_every_websocket_on_both_servers(
    uvicorn_servers: dict[str, UvicornServer],
) -> None:
    async with websocket_clients(uvicorn_servers) as clients:
        for sender in ("one", "two"):
            text = f"hello from {sender} {secrets.token_hex(4)}"
            await notify(uvicorn_servers[sender], text)
            await assert_everyone_got(clients, text, via=sender)
    for server in uvicorn_servers.values():
        server.assert_no_errors()


async def test_many_notifications_arrive_once_each_and_in_order(
    uvicorn_servers: dict[str, UvicornServer],
) -> None:
    texts = [f"burst {i} {secrets.token_hex(2)}" for i in range(10)]
    async with websocket_clients(uvicorn_servers) as clients:
        for text in texts:
            await notify(uvicorn_servers["one"], text)
        for client in clients.values():
            received = [(await receive_json(client))["text"] for _ in texts]
            assert received == texts
        await assert_all_quiet(clients)
    for server in uvicorn_servers.values():
        server.assert_no_errors()


async def test_each_server_uses_one_link_of_three_connections(
    uvicorn_servers: dict[str, UvicornServer], broker: Broker, connections_before_servers: int
) -> None:
    """Consumers, and sync views through async_to_sync, all use the server loop's own link."""
    async with websocket_clients(uvicorn_servers) as clients:
        for sender in ("one", "two"):
            text = f"counting connections {sender}"
            await notify(uvicorn_servers[sender], text)
            await assert_everyone_got(clients, text, via=sender)
        # One publishes, one consumes, one answers flush()'s roll call.
        expected = connections_before_servers + 3 * len(uvicorn_servers)
        deadline = time.monotonic() + RECEIVE_TIMEOUT
        while (count := await asyncio.to_thread(broker.connection_count)) != expected:
            assert time.monotonic() < deadline, f"{count} connections in the vhost, expected {expected}"
            await asyncio.sleep(0.2)


async def test_group_send_from_a_plain_thread_reaches_both_servers(
    uvicorn_servers: dict[str, UvicornServer], broker: Broker
) -> None:
    """async_to_sync outside any server (a Celery task, a management command): the I/O-thread link."""
    layer = RabbitmqChannelLayer(host=broker.url)
    text = f"from a worker thread {secrets.token_hex(4)}"
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            async_to_sync(layer.group_send)("broadcast", {"type": "broadcast.message", "text": text})
        except BaseException as error:
            errors.append(error)

    try:
        async with websocket_clients(uvicorn_servers) as clients:
            thread = threading.Thread(target=worker)
            thread.start()
            await asyncio.to_thread(thread.join, RECEIVE_TIMEOUT)
            assert not thread.is_alive()
            assert not errors
            await assert_everyone_got(clients, text, via=None)
    finally:
        await layer.close()
    for server in uvicorn_servers.values():
        server.assert_no_errors()


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_echo_through_the_consumers_own_channel(
    uvicorn_servers: dict[str, UvicornServer], kind: str
) -> None:
    async with websocket_clients(uvicorn_servers, paths=(f"/ws/echo/{kind}/",)) as clients:
        for (server, _path), client in clients.items():
            for i in range(3):
                await client.send(f"ping {i}")
                assert await receive_json(client) == {"echo": f"ping {i}", "server": server}
        await assert_all_quiet(clients)
    for server in uvicorn_servers.values():
        server.assert_no_errors()


async def test_server_shuts_down_cleanly_with_websockets_open(broker: Broker, server_loop: str) -> None:
    """SIGTERM with consumers waiting on the layer: their sockets close, the link closes with the loop."""
    server = UvicornServer("three", broker.url, server_loop)
    try:
        await asyncio.to_thread(server.wait_until_ready)
        paths = ("/ws/async/", "/ws/sync/", "/ws/echo/async/", "/ws/echo/sync/")
        async with websocket_clients({"three": server}, paths=paths) as clients:
            await notify(server, "before shutdown")
            for (_name, path), client in clients.items():
                if path in CONSUMER_OF_PATH:
                    assert (await receive_json(client))["text"] == "before shutdown"
            code, output = await asyncio.to_thread(server.stop)
            assert code in (0, -signal.SIGTERM), output
            assert "Traceback" not in output, output
            assert "Finished server process" in output, output
            for client in clients.values():
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(client.recv(), RECEIVE_TIMEOUT)
                assert client.close_code == 1012  # "service restart": uvicorn closing them
    finally:
        server.stop()


# WebsocketCommunicator in this process ------------------------------------------------------------


@pytest.fixture
async def django_channel_layer(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, loop_kind: str
) -> AsyncIterator[Any]:
    """Django set up with the test project, its default channel layer fresh on the run's vhost;
    the tests using it run on asyncio's loop and on uvloop (``loop_kind``)."""
    import django
    from django.apps import apps
    from django.test import override_settings

    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", SETTINGS_MODULE)
    monkeypatch.setenv("CHANNELS_RABBITMQ_TEST_URL", broker.url)
    if not apps.ready:
        django.setup()
    from channels.layers import channel_layers, get_channel_layer

    layers = {
        "default": {"BACKEND": "channels_rabbitmq.core.RabbitmqChannelLayer", "CONFIG": {"host": broker.url}}
    }
    with override_settings(CHANNEL_LAYERS=layers):
        channel_layers.backends.clear()
        layer = get_channel_layer()
        try:
            assert isinstance(layer, RabbitmqChannelLayer)
            assert layer.config.address.virtual_host == broker.vhost
            yield layer
        finally:
            await layer.close()
            channel_layers.backends.clear()


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_communicator_receives_group_messages(django_channel_layer: Any, kind: str) -> None:
    from channels.testing import WebsocketCommunicator

    from tests.django_project.consumers import AsyncBroadcastConsumer, SyncBroadcastConsumer

    consumer = AsyncBroadcastConsumer if kind == "async" else SyncBroadcastConsumer
    communicator = WebsocketCommunicator(consumer.as_asgi(), f"/ws/{kind}/")
    connected, _subprotocol = await communicator.connect(timeout=RECEIVE_TIMEOUT)
    assert connected
    try:
        for i in range(3):
            text = f"communicator {kind} {i}"
            await django_channel_layer.group_send(
                "broadcast", {"type": "broadcast.message", "text": text, "via": "test"}
            )
            assert await communicator.receive_json_from(timeout=RECEIVE_TIMEOUT) == {
                "text": text,
                "via": "test",
                "server": "in-process",
                "consumer": kind,
            }
        assert await communicator.receive_nothing(timeout=QUIET_PERIOD)
    finally:
        await communicator.disconnect(timeout=RECEIVE_TIMEOUT)


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_communicator_two_consumers_share_one_group(django_channel_layer: Any, kind: str) -> None:
    """Two members in one process: one publish, fanned out locally to both, once each."""
    from channels.testing import WebsocketCommunicator

    from tests.django_project.consumers import AsyncBroadcastConsumer, SyncBroadcastConsumer

    consumer = AsyncBroadcastConsumer if kind == "async" else SyncBroadcastConsumer
    communicators = [WebsocketCommunicator(consumer.as_asgi(), f"/ws/{kind}/") for _ in range(2)]
    for communicator in communicators:
        connected, _subprotocol = await communicator.connect(timeout=RECEIVE_TIMEOUT)
        assert connected
    try:
        await django_channel_layer.group_send("broadcast", {"type": "broadcast.message", "text": "both"})
        for communicator in communicators:
            message = await communicator.receive_json_from(timeout=RECEIVE_TIMEOUT)
            assert message["text"] == "both"
            assert await communicator.receive_nothing(timeout=QUIET_PERIOD)
        # The first one leaves: the other still gets the group's messages.
        await communicators[0].disconnect(timeout=RECEIVE_TIMEOUT)
        await django_channel_layer.group_send("broadcast", {"type": "broadcast.message", "text": "one left"})
        message = await communicators[1].receive_json_from(timeout=RECEIVE_TIMEOUT)
        assert message["text"] == "one left"
    finally:
        await communicators[1].disconnect(timeout=RECEIVE_TIMEOUT)


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_communicator_echo_through_own_channel(django_channel_layer: Any, kind: str) -> None:
    from channels.testing import WebsocketCommunicator

    from tests.django_project.consumers import AsyncEchoConsumer, SyncEchoConsumer

    consumer = AsyncEchoConsumer if kind == "async" else SyncEchoConsumer
    communicator = WebsocketCommunicator(consumer.as_asgi(), f"/ws/echo/{kind}/")
    connected, _subprotocol = await communicator.connect(timeout=RECEIVE_TIMEOUT)
    assert connected
    try:
        await communicator.send_to(text_data="marco")
        assert await communicator.receive_json_from(timeout=RECEIVE_TIMEOUT) == {
            "echo": "marco",
            "server": "in-process",
        }
    finally:
        await communicator.disconnect(timeout=RECEIVE_TIMEOUT)
