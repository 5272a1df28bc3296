"""The Prometheus export, scraped over HTTP from a running server.

A uvicorn process serves tests/django_project, whose ``/metrics`` is prometheus_client's
ASGI app with :func:`channels_rabbitmq.prometheus.register_channel_layers`. Websocket
clients join a group, a sync view group_sends to it, and the metrics scraped before and
after (parsed with ``prometheus_client.parser``) must have moved by exactly that traffic.
Runs with the server on asyncio's loop and on uvloop.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from channels_rabbitmq.prometheus import ChannelLayerCollector
from channels_rabbitmq.stats import CONFIRM_BUCKETS, DROP_REASONS
from tests.conftest import LOOP_KINDS, Broker, LayerFactory
from tests.integration.test_django import (
    RECEIVE_TIMEOUT,
    UvicornServer,
    notify,
    receive_json,
    websocket_clients,
)

pytestmark = pytest.mark.timeout(120)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, sorted labels); and each family's type."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples, types


def scrape(server: UvicornServer) -> tuple[Samples, dict[str, str]]:
    with urllib.request.urlopen(f"{server.http}/metrics", timeout=RECEIVE_TIMEOUT) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(response.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted({"layer": "default", **labels}.items()))]


@pytest.fixture(scope="module", params=LOOP_KINDS)
def server(request: pytest.FixtureRequest, broker: Broker) -> Iterator[UvicornServer]:
    served = UvicornServer("metrics", broker.url, request.param)
    try:
        served.wait_until_ready()
        yield served
    finally:
        _code, output = served.stop()
    assert "Traceback" not in output, output


async def test_metrics_move_with_the_traffic_of_a_running_server(server: UvicornServer) -> None:
    before, types = await asyncio.to_thread(scrape, server)
    assert types["channels_rabbitmq_messages_published"] == "counter"
    assert types["channels_rabbitmq_publish_confirm_seconds"] == "histogram"
    assert types["channels_rabbitmq_connection_up"] == "gauge"
    for reason in DROP_REASONS:
        assert value(before, "channels_rabbitmq_messages_dropped_total", reason=reason) == 0

    async with websocket_clients({"metrics": server}) as clients:  # an async and a sync consumer
        await asyncio.sleep(0.2)  # their group_add() calls run after the handshake
        for index in range(3):
            await notify(server, f"metrics {index}")
            for client in clients.values():
                assert (await receive_json(client))["text"] == f"metrics {index}"
        # Each consumer waits in receive() again, once it has handled the last message.
        deadline = time.monotonic() + 10
        during, _ = await asyncio.to_thread(scrape, server)
        while value(during, "channels_rabbitmq_inboxes") < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            during, _ = await asyncio.to_thread(scrape, server)
        assert value(during, "channels_rabbitmq_groups") == 1
        assert value(during, "channels_rabbitmq_inboxes") >= 2

    def moved(name: str, **labels: str) -> float:
        return value(during, name, **labels) - value(before, name, **labels)

    # Three group_sends (from the sync view), each received once by the server's link and
    # handed to both consumers.
    assert moved("channels_rabbitmq_messages_published_total") == 3
    assert moved("channels_rabbitmq_messages_confirmed_total") == 3
    assert moved("channels_rabbitmq_messages_refused_total") == 0
    assert moved("channels_rabbitmq_messages_received_total") == 3
    assert moved("channels_rabbitmq_messages_delivered_total") == 6
    assert moved("channels_rabbitmq_publish_confirm_seconds_count") == 3
    assert moved("channels_rabbitmq_publish_confirm_seconds_bucket", le="+Inf") == 3
    assert moved("channels_rabbitmq_publish_confirm_seconds_sum") > 0
    buckets = [
        value(during, "channels_rabbitmq_publish_confirm_seconds_bucket", le=str(bound))
        for bound in CONFIRM_BUCKETS
    ]
    assert buckets == sorted(buckets)  # cumulative
    assert value(during, "channels_rabbitmq_connection_up") == 1
    assert value(during, "channels_rabbitmq_connection_state", state="up") == 1
    assert value(during, "channels_rabbitmq_connection_state", state="recovering") == 0
    # One link: asgiref runs the view's async_to_sync call on the server's loop, whose link it uses.
    assert value(during, "channels_rabbitmq_links") == 1
    assert value(during, "channels_rabbitmq_connections_opened_total") == 2
    assert value(during, "channels_rabbitmq_reconnections_total") == 0
    assert value(during, "channels_rabbitmq_outage_seconds_total") == 0
    assert value(during, "channels_rabbitmq_messages_held") == 0
    for reason in DROP_REASONS:
        assert moved("channels_rabbitmq_messages_dropped_total", reason=reason) == 0
    server.assert_no_errors()


async def test_a_collector_exports_several_layers_by_name(make_layer: LayerFactory) -> None:
    one, two = make_layer(), make_layer()
    registry = CollectorRegistry()
    registry.register(ChannelLayerCollector({"one": one, "two": two}))
    channel = await one.new_channel()
    await two.send(channel, {"type": "m"})
    assert await asyncio.wait_for(one.receive(channel), 10) == {"type": "m"}
    samples, _ = parse(generate_latest(registry).decode())
    published = {
        dict(labels)["layer"]: count
        for (name, labels), count in samples.items()
        if name == "channels_rabbitmq_messages_published_total"
    }
    assert published == {"one": 0, "two": 1}
    assert samples["channels_rabbitmq_messages_delivered_total", (("layer", "one"),)] == 1
    assert samples["channels_rabbitmq_connection_up", (("layer", "one"),)] == 1
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(ChannelLayerCollector({"three": one}))  # describe() names its metrics
