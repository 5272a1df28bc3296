"""Rooms and their messages: names, limits, and the event each group carries."""

from __future__ import annotations

import re
from typing import Any

from django.conf import settings

MAX_MESSAGE_LENGTH = 2000
MAX_NAME_LENGTH = 40
_ROOM_NAME = re.compile(r"^[A-Za-z0-9_-]{1,50}$")


def is_valid_room(room: str) -> bool:
    """Room names become group names: letters, digits, '-' and '_' only (a group name rule)."""
    return bool(_ROOM_NAME.match(room))


def group_name(room: str) -> str:
    return f"chat-{room}"


def chat_event(message: str, name: str) -> dict[str, Any]:
    """The group message for one chat line, stamped with the server it was sent through."""
    return {
        "type": "chat.message",
        "message": message[:MAX_MESSAGE_LENGTH],
        "name": (name or "anonymous")[:MAX_NAME_LENGTH],
        "sent_via": settings.CHAT_SERVER_NAME,
    }
