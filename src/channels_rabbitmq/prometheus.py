"""Prometheus metrics of channel layers, read from ``layer.stats()`` at scrape time.

Needs ``prometheus_client`` (``pip install channels_rabbitmq[prometheus]``). Nothing is
counted per message here: a scrape calls ``stats()`` on each layer (no I/O, no loop involved) and
turns the snapshot into metrics, one series per layer with the label ``layer``.

With Django, in settings or an app's ``ready()``::

    from channels_rabbitmq.prometheus import register_channel_layers
    register_channel_layers()  # every CHANNEL_LAYERS alias that is a RabbitmqChannelLayer

and serve ``prometheus_client``'s ``/metrics`` (``make_asgi_app()``, ``start_http_server()``).
Without Django: ``REGISTRY.register(ChannelLayerCollector({"default": layer}))``.
See docs/operations/metrics.md for every metric.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client.core import (
    REGISTRY,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from .stats import COUNTS, DROP_REASONS, STATES, LayerStats

if TYPE_CHECKING:
    from .core import RabbitmqChannelLayer

PREFIX = "channels_rabbitmq_"

Layers = Mapping[str, "RabbitmqChannelLayer"]


class ChannelLayerCollector(Collector):
    """Reads ``stats()`` of each layer at every scrape; the label ``layer`` is its name.

    ``layers`` maps names to layers, or is a function returning such a map (read at each
    scrape: layers made later are included).
    """

    def __init__(self, layers: Layers | Callable[[], Layers]) -> None:
        self._layers = layers

    def describe(self) -> Iterable[Metric]:
        """The metric families, without samples: the registry refuses a name registered twice."""
        return list(_families([]))

    def collect(self) -> Iterable[Metric]:
        layers = self._layers() if callable(self._layers) else self._layers
        return list(_families([(name, layer.stats()) for name, layer in layers.items()]))


def _families(snapshots: list[tuple[str, LayerStats]]) -> Iterator[Metric]:
    """Every metric family, with one series per layer (and per reason or state)."""
    for count in COUNTS:
        family = CounterMetricFamily if count.kind == "counter" else GaugeMetricFamily
        metric = family(PREFIX + count.metric, count.help, labels=["layer"])
        for layer, stats in snapshots:
            metric.add_metric([layer], getattr(stats, count.field))
        yield metric
    dropped = CounterMetricFamily(
        PREFIX + "messages_dropped_total",
        "Messages from RabbitMQ dropped, by reason: channel_full (its channel held its capacity), "
        "expired (unread within expiry), too_large (over max_message_size), undecodable.",
        labels=["layer", "reason"],
    )
    for layer, stats in snapshots:
        for reason in DROP_REASONS:
            dropped.add_metric([layer, reason], stats.dropped[reason])
    yield dropped
    links = GaugeMetricFamily(
        PREFIX + "links", "Broker links: one per event loop that receives.", labels=["layer"]
    )
    up = GaugeMetricFamily(
        PREFIX + "connection_up", "1 when every link of the layer is connected, else 0.", labels=["layer"]
    )
    state = GaugeMetricFamily(
        PREFIX + "connection_state",
        "The layer's connection state (1 for the current one): idle, connecting, up, recovering, closed.",
        labels=["layer", "state"],
    )
    for layer, stats in snapshots:
        links.add_metric([layer], len(stats.links))
        up.add_metric([layer], 1 if stats.is_up else 0)
        for each in STATES:
            state.add_metric([layer, each], 1 if stats.state == each else 0)
    yield links
    yield up
    yield state
    latency = HistogramMetricFamily(
        PREFIX + "publish_confirm_seconds",
        "Seconds from publishing a message to RabbitMQ's confirm (accepted or refused).",
        labels=["layer"],
    )
    for layer, stats in snapshots:
        histogram = stats.confirm_latency
        latency.add_metric(
            [layer],
            [(_bound(bound), count) for bound, count in histogram.cumulative()],
            histogram.sum,
        )
    yield latency


def _bound(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


def django_channel_layers(aliases: Iterable[str] | None = None) -> Layers:
    """The layers of Django's ``CHANNEL_LAYERS`` that are ours (``aliases``: only those), by alias.

    They come from Channels' ``channel_layers``: the same objects the consumers use (made
    now if not yet, which does no I/O)."""
    from channels.layers import channel_layers
    from django.conf import settings

    from .core import RabbitmqChannelLayer

    wanted = list(aliases) if aliases is not None else list(getattr(settings, "CHANNEL_LAYERS", {}))
    found = {}
    for alias in wanted:
        layer = channel_layers[alias]
        if isinstance(layer, RabbitmqChannelLayer):
            found[alias] = layer
    return found


def register_channel_layers(
    aliases: Iterable[str] | None = None, registry: CollectorRegistry = REGISTRY
) -> ChannelLayerCollector:
    """Export Django's channel layers (each a label ``layer`` = its alias) to ``registry``.

    The layers are looked up at each scrape, so call this once at start-up, before or after
    the first use of a layer. Returns the collector (``registry.unregister()`` takes it).
    """
    chosen = list(aliases) if aliases is not None else None
    collector = ChannelLayerCollector(lambda: django_channel_layers(chosen))
    registry.register(collector)
    return collector
