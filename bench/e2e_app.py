"""The chat that ``python -m bench e2e`` serves: a Channels websocket consumer, as a user writes one.

Run by uvicorn (``uvicorn bench.e2e_app:application``), two processes at a time. The channel
layer comes from the ``BENCH_E2E_LAYER`` environment variable, as JSON: ``{"backend": "<dotted
path>", "config": {...}}`` (it holds the broker URL, so the password stays off the command line).

A websocket at ``/<room>`` joins the group ``room-<room>`` on connecting, and each text frame it
sends is broadcast to the room with ``group_send``, the sender included, as Channels' chat
tutorial does.
"""

from __future__ import annotations

import json
import os
from typing import Any

import django
from django.conf import settings

layer = json.loads(os.environ["BENCH_E2E_LAYER"])
settings.configure(
    CHANNEL_LAYERS={"default": {"BACKEND": layer["backend"], "CONFIG": layer["config"]}},
    INSTALLED_APPS=["channels"],
    USE_TZ=True,
)
django.setup()

from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402  (needs the settings)
from channels.routing import ProtocolTypeRouter  # noqa: E402


class ChatConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]  # channels has no type hints
    """One chat member: joins its room's group, broadcasts what it is sent."""

    room: str

    async def connect(self) -> None:
        self.room = "room-" + self.scope["path"].strip("/")
        await self.channel_layer.group_add(self.room, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(self.room, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        await self.channel_layer.group_send(self.room, {"type": "chat.message", "text": text_data})

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send(text_data=event["text"])


application = ProtocolTypeRouter({"websocket": ChatConsumer.as_asgi()})
