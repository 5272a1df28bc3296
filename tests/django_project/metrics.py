"""``/metrics``: the project's channel layers in Prometheus' text format, read at each scrape."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, make_asgi_app

from channels_rabbitmq.prometheus import register_channel_layers

registry = CollectorRegistry()  # the project's own: no process or platform metrics
register_channel_layers(registry=registry)
metrics_app = make_asgi_app(registry=registry)
