"""Fixtures shared by the suite: a private vhost on the real broker for each test run.

The integration tests talk to RabbitMQ at ``AMQP_URL`` (default: the local broker,
guest/guest). Each run gets its own vhost, made and deleted with ``rabbitmqctl``, so
the run leaves no queue, exchange or binding behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

from channels_rabbitmq.broker import BrokerLink
from channels_rabbitmq.core import RabbitmqChannelLayer

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def rabbitmqctl(*args: str) -> str:
    """Run rabbitmqctl quietly and return its output."""
    result = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=False
    )
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

    def bindings(self, exchange: str = "groups") -> set[tuple[str, str]]:
        """(queue, routing key) of every binding of ``exchange``."""
        return {
            (row["destination_name"], row["routing_key"])
            for row in self._list("list_bindings", "source_name", "destination_name", "routing_key")
            if row["source_name"] == exchange
        }

    def connection_count(self) -> int:
        rows = json.loads(rabbitmqctl("list_connections", "vhost", "--formatter", "json") or "[]")
        return sum(1 for row in rows if row["vhost"] == self.vhost)


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """A vhost of its own on the real broker for this test run; deleted afterwards."""
    if shutil.which("rabbitmqctl") is None:
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
    return layer._loop_links[asyncio.get_running_loop()]


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
