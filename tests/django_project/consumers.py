"""Websocket consumers that relay group messages, and ones that echo through their own channel."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from asgiref.sync import async_to_sync
from channels.consumer import AsyncConsumer
from channels.generic.websocket import AsyncWebsocketConsumer, WebsocketConsumer
from django.conf import settings

BROADCAST_GROUP = "broadcast"


def relayed(event: dict[str, Any], consumer: str) -> str:
    """The text frame a client gets for a ``broadcast.message`` event."""
    return json.dumps(
        {
            "text": event["text"],
            "via": event.get("via"),
            "server": settings.TEST_SERVER_NAME,
            "consumer": consumer,
        }
    )


class AsyncBroadcastConsumer(AsyncWebsocketConsumer):
    """Joins the broadcast group on connect; forwards its messages to the socket."""

    groups = [BROADCAST_GROUP]

    async def broadcast_message(self, event: dict[str, Any]) -> None:
        await self.send(text_data=relayed(event, "async"))


class SyncBroadcastConsumer(WebsocketConsumer):
    """The same in a sync consumer: its handlers run in a thread, layer calls hop back to the loop."""

    groups = [BROADCAST_GROUP]

    def broadcast_message(self, event: dict[str, Any]) -> None:
        self.send(text_data=relayed(event, "sync"))


class AsyncEchoConsumer(AsyncWebsocketConsumer):
    """Sends each text frame to its own channel through the layer; the socket gets it back."""

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        await self.channel_layer.send(self.channel_name, {"type": "echo.message", "text": text_data})

    async def echo_message(self, event: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps({"echo": event["text"], "server": settings.TEST_SERVER_NAME}))


class SyncEchoConsumer(WebsocketConsumer):
    """The same in a sync consumer."""

    def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        async_to_sync(self.channel_layer.send)(self.channel_name, {"type": "echo.message", "text": text_data})

    def echo_message(self, event: dict[str, Any]) -> None:
        self.send(text_data=json.dumps({"echo": event["text"], "server": settings.TEST_SERVER_NAME}))


#: The normal channel the workers read, and where they report each job they handled.
JOBS_CHANNEL = "thumbnails"
RESULTS_CHANNEL = "thumbnail-results"


class ThumbnailWorker(AsyncConsumer):
    """Run by ``manage.py runworker thumbnails``: handles one job at a time and reports it."""

    async def thumbnail_make(self, message: dict[str, Any]) -> None:
        await asyncio.sleep(message.get("seconds", 0))
        await self.channel_layer.send(
            RESULTS_CHANNEL,
            {
                "type": "thumbnail.done",
                "id": message["id"],
                "worker": settings.TEST_SERVER_NAME,
                "handled_at": time.time(),  # wall clock: the same for every process on the machine
            },
        )
