"""The chat websocket: one group per room; every socket of the room, on any server, gets each line."""

from __future__ import annotations

import json
from typing import Any

from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from .rooms import chat_event, group_name, is_valid_room


class ChatConsumer(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        room = self.scope["url_route"]["kwargs"]["room"]
        if not is_valid_room(room):
            await self.close(code=4000)
            return
        self.group = group_name(room)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.send_json({"joined": room, "server": settings.CHAT_SERVER_NAME})

    async def disconnect(self, code: int) -> None:
        if hasattr(self, "group"):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            data = json.loads(text_data or "")
            message = data["message"]
            name = data.get("name", "")
        except (ValueError, TypeError, KeyError):
            await self.send_json({"error": 'send JSON like {"message": "<text>"}'})
            return
        if not isinstance(message, str) or not isinstance(name, str) or not message.strip():
            await self.send_json({"error": "message (and name) must be non-empty text"})
            return
        await self.channel_layer.group_send(self.group, chat_event(message, name))

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send_json(
            {
                "message": event["message"],
                "name": event["name"],
                "sent_via": event["sent_via"],
                "relayed_by": settings.CHAT_SERVER_NAME,
            }
        )

    async def send_json(self, content: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(content))
