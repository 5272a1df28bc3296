"""The ASGI application: Django for HTTP (but ``/metrics``, Prometheus'), the consumers for websockets."""

from __future__ import annotations

import os
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_project.settings")
django_asgi_app = get_asgi_application()  # sets Django up before the consumers are imported

from channels.routing import ChannelNameRouter, ProtocolTypeRouter, URLRouter  # noqa: E402

from .consumers import JOBS_CHANNEL, ThumbnailWorker  # noqa: E402
from .metrics import metrics_app  # noqa: E402
from .routing import websocket_urlpatterns  # noqa: E402


async def http(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``/metrics`` to Prometheus' app, the rest to Django."""
    app = metrics_app if scope["path"] == "/metrics" else django_asgi_app
    await app(scope, receive, send)


application = ProtocolTypeRouter(
    {
        "http": http,
        "websocket": URLRouter(websocket_urlpatterns),
        # manage.py runworker thumbnails
        "channel": ChannelNameRouter({JOBS_CHANNEL: ThumbnailWorker.as_asgi()}),
    }
)
