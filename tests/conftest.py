"""Fixtures shared by the suite: a private vhost on the real broker for each test run.

The integration tests talk to RabbitMQ at ``AMQP_URL`` (default: the local broker,
guest/guest). Each run gets its own vhost, made and deleted with ``rabbitmqctl``, so
the run leaves no queue, exchange or binding behind.

An async test that uses the ``loop_kind`` fixture (most integration modules ask for it
with ``pytestmark``) runs twice, on asyncio's own loop and on uvloop: its id ends with
``[asyncio]`` or ``[uvloop]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import secrets
import shutil
import subprocess
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
import uvloop
from pytest_asyncio import is_async_test

from channels_rabbitmq.amqp.connection import AmqpConnection
from channels_rabbitmq.amqp.opening import connect as amqp_connect
from channels_rabbitmq.amqp.protocol import Credentials
from channels_rabbitmq.core import RabbitmqChannelLayer
from channels_rabbitmq.link import BrokerLink
from testbed.brokers.nodes import Distribution
from testbed.faults.proxy import FaultProxy

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
#: How early a timer may fire by ``time.monotonic()``: uvloop's, up to about 0.5 ms. A lower bound on
#: how long a call waited takes this off.
TIMERS_EARLY = 0.005


# No exception of the layer's own tasks left for asyncio to report --------------------------------

#: What asyncio logs about an exception nobody retrieved, or a task still failing at shutdown.
UNRETRIEVED = ("never retrieved", "unhandled exception during asyncio.run() shutdown")


class _AsyncioErrors(logging.Handler):
    """Keeps asyncio's reports of exceptions nobody retrieved, for the test that made them."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if any(text in record.getMessage() for text in UNRETRIEVED):
            self.records.append(record)


_asyncio_errors = _AsyncioErrors()
logging.getLogger("asyncio").addHandler(_asyncio_errors)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "no_unretrieved_errors: fail the test when asyncio reports an exception nobody retrieved "
        "(a future or task of the layer) or a task failing at shutdown, during it or its teardown",
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    """After the whole teardown (the test's loop closed, garbage collected), the tests marked
    ``no_unretrieved_errors`` fail on any such report made since they began."""
    yield
    if item.get_closest_marker("no_unretrieved_errors") is None:
        return
    gc.collect()
    found = [record.getMessage().splitlines()[0] for record in _asyncio_errors.records]
    _asyncio_errors.records.clear()
    if found:
        pytest.fail(f"asyncio reported exceptions nobody retrieved: {found}", pytrace=False)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _asyncio_errors.records.clear()


# Two event loops: asyncio's own and uvloop (uvicorn's choice when it is installed) -------------

LOOP_KINDS = ("asyncio", "uvloop")
LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.SelectorEventLoop,  # explicit: not whatever the policy of the moment makes
    "uvloop": uvloop.new_event_loop,
}


def loop_kind_of(loop: asyncio.AbstractEventLoop) -> str:
    """ "uvloop" or "asyncio": which implementation ``loop`` is."""
    return "uvloop" if isinstance(loop, uvloop.Loop) else "asyncio"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """pytest-asyncio's hook: both loops for tests that use ``loop_kind``, asyncio's for the rest."""
    if "loop_kind" in getattr(item, "fixturenames", ()):
        return LOOP_FACTORIES
    return {"asyncio": LOOP_FACTORIES["asyncio"]}


@contextlib.contextmanager
def new_loops_of_kind(kind: str) -> Iterator[None]:
    """Meanwhile, the loops that ``asyncio.run()``, ``async_to_sync`` and the layer's I/O thread
    make are of ``kind``: they come from the event loop policy, the only hook they have."""
    if kind == "asyncio":
        yield
        return
    with warnings.catch_warnings():  # policies are deprecated from Python 3.14 on, not gone
        warnings.simplefilter("ignore", DeprecationWarning)
        previous = asyncio.get_event_loop_policy()
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            asyncio.set_event_loop_policy(previous)


@pytest.fixture
async def loop_kind(request: pytest.FixtureRequest) -> AsyncIterator[str | None]:
    """The loop this async test runs on, "asyncio" or "uvloop", as its id says; checked.

    Loops made meanwhile in threads (``asyncio.run()``, ``async_to_sync``, the layer's
    I/O thread) are of the same kind. A sync test gets None (it has no loop): to run on
    both, it parametrizes ``loop_kind`` itself and uses :func:`new_loops_of_kind`.
    """
    if not is_async_test(request.node):
        yield None
        return
    factories = request.node.callspec.params.values()
    [kind] = [kind for kind, factory in LOOP_FACTORIES.items() if any(f is factory for f in factories)]
    assert kind in request.node.callspec.id.split("-"), f"{request.node.name} runs on {kind}"
    running = asyncio.get_running_loop()
    assert loop_kind_of(running) == kind, f"the {kind} variant runs on {type(running)}"
    with new_loops_of_kind(kind):
        yield kind


def rabbitmqctl(*args: str) -> str:
    """Run rabbitmqctl quietly and return its output: the broker's own (``RABBITMQ_ROOT``'s, for a
    4.x broker run by ``scripts/rabbitmq4``; ``RABBITMQ_NODENAME`` names the node)."""
    argv = Distribution.from_environment().argv("rabbitmqctl", "-q", *args)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


class Broker:
    """What the tests may ask the broker about: the run's vhost and its contents."""

    def __init__(self, url: str, vhost: str) -> None:
        self.url = url
        self.vhost = vhost

    def url_for(
        self, *, username: str | None = None, password: str | None = None, vhost: str | None = None
    ) -> str:
        parts = urlsplit(self.url)
        user = username if username is not None else parts.username or "guest"
        secret = password if password is not None else parts.password or "guest"
        netloc = f"{quote(user, safe='')}:{quote(secret, safe='')}@{parts.hostname}:{parts.port or 5672}"
        path = "/" + quote(vhost if vhost is not None else self.vhost, safe="")
        return urlunsplit((parts.scheme, netloc, path, "", ""))

    def _list(self, what: str, *columns: str) -> list[dict[str, Any]]:
        return json.loads(rabbitmqctl(what, "-p", self.vhost, *columns, "--formatter", "json") or "[]")

    def queues(self) -> list[dict[str, Any]]:
        return self._list("list_queues", "name", "arguments", "messages", "exclusive")

    def queue(self, name: str) -> dict[str, Any]:
        for queue in self.queues():
            if queue["name"] == name:
                return queue
        raise LookupError(name)

    def bindings(self, exchange: str = "groups", *, control: bool = False) -> set[tuple[str, str]]:
        """(queue, routing key) of every binding of ``exchange``: the groups' (``control``: and the
        ones every queue has to hear flush(), whose keys start with "!", which no group's can)."""
        return {
            (row["destination_name"], row["routing_key"])
            for row in self._list("list_bindings", "source_name", "destination_name", "routing_key")
            if row["source_name"] == exchange and (control or not row["routing_key"].startswith("!"))
        }

    def connection_count(self) -> int:
        rows = json.loads(rabbitmqctl("list_connections", "vhost", "--formatter", "json") or "[]")
        return sum(1 for row in rows if row["vhost"] == self.vhost)


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """A vhost of its own on the real broker for this test run; deleted afterwards."""
    if shutil.which("rabbitmqctl") is None and not Distribution.from_environment().is_chroot:
        pytest.fail("rabbitmqctl is needed to isolate the tests in a vhost of their own")
    base = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
    username = urlsplit(base).username or "guest"
    vhost = f"channels_rabbitmq_test_{secrets.token_hex(4)}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, username, ".*", ".*", ".*")
    broker = Broker(base, vhost)
    broker.url = broker.url_for()
    try:
        yield broker
    finally:
        rabbitmqctl("delete_vhost", vhost)


LayerFactory = Callable[..., RabbitmqChannelLayer]


def link_of(layer: RabbitmqChannelLayer) -> BrokerLink:
    """The layer's link for the running loop (made by its first new_channel() on this loop)."""
    return layer._links.of_loop(asyncio.get_running_loop())


@pytest.fixture
async def make_layer(broker: Broker) -> AsyncIterator[LayerFactory]:
    """Build layers on the run's vhost (CONFIG as keyword arguments); all are closed afterwards."""
    layers: list[RabbitmqChannelLayer] = []

    def make(**config: Any) -> RabbitmqChannelLayer:
        config.setdefault("host", broker.url)
        layer = RabbitmqChannelLayer(**config)
        layers.append(layer)
        return layer

    yield make
    for layer in layers:
        await layer.close()


async def amqp_client(
    port: int, vhost: str, *, on_lost: Callable[..., None] | None = None, description: str = "the test broker"
) -> AmqpConnection:
    """A bare AMQP connection of the project's client (guest/guest on 127.0.0.1:``port``), for tests
    that speak AMQP without the layer: its caller closes it."""
    return await amqp_connect(
        "127.0.0.1",
        port,
        Credentials("guest", "guest"),
        vhost,
        ssl_context=None,
        timeout=10,
        heartbeat=60,
        client_properties={},
        description=description,
        on_delivery=None,
        on_deliveries_done=lambda: None,
        on_lost=on_lost or (lambda *_: None),
    )


async def eventually(
    condition: Callable[[], bool], what: str, timeout: float = 15, poll: float = 0.01
) -> None:
    """Wait until ``condition()`` holds; fail after ``timeout`` seconds, naming ``what`` was awaited."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"still waiting after {timeout:g}s for {what}")
        await asyncio.sleep(poll)


@pytest.fixture
async def proxy(broker: Broker) -> AsyncIterator[FaultProxy]:
    """A fault-injecting TCP proxy in front of the run's broker; it must have seen no error of its own."""
    address = urlsplit(broker.url)
    async with FaultProxy(address.hostname or "127.0.0.1", address.port or 5672) as proxy:
        yield proxy
    assert not proxy.errors
