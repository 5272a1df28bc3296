from __future__ import annotations

from django.urls import path

from . import consumers

websocket_urlpatterns = [
    path("ws/async/", consumers.AsyncBroadcastConsumer.as_asgi()),
    path("ws/sync/", consumers.SyncBroadcastConsumer.as_asgi()),
    path("ws/echo/async/", consumers.AsyncEchoConsumer.as_asgi()),
    path("ws/echo/sync/", consumers.SyncEchoConsumer.as_asgi()),
]
