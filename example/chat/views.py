"""The page, and a plain sync view that posts to a room through ``async_to_sync``."""

from __future__ import annotations

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET, require_POST

from .rooms import MAX_MESSAGE_LENGTH, chat_event, group_name, is_valid_room


@require_GET
def index(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "chat/index.html",
        {"server": settings.CHAT_SERVER_NAME, "max_length": MAX_MESSAGE_LENGTH},
    )


@require_POST
def post_message(request: HttpRequest, room: str) -> JsonResponse:
    """Sync code (Django runs it in a thread) sending to a group, as a Celery task or a view would."""
    message = request.POST.get("message", "")
    if not is_valid_room(room) or not message.strip():
        return JsonResponse({"error": "a valid room and a non-empty message are needed"}, status=400)
    event = chat_event(message, request.POST.get("name", "") + " (sync view)")
    async_to_sync(get_channel_layer().group_send)(group_name(room), event)
    return JsonResponse({"posted": True, "via": settings.CHAT_SERVER_NAME})
