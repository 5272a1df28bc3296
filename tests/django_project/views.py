"""Plain sync Django views; under an ASGI server they run in a ``sync_to_async`` thread."""

from __future__ import annotations

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.http import HttpRequest, JsonResponse

from .consumers import BROADCAST_GROUP


def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"server": settings.TEST_SERVER_NAME})


def notify(request: HttpRequest) -> JsonResponse:
    """Send ``?text=`` to the broadcast group, from sync code (``async_to_sync``)."""
    text = request.GET.get("text", "")
    async_to_sync(get_channel_layer().group_send)(
        BROADCAST_GROUP, {"type": "broadcast.message", "text": text, "via": settings.TEST_SERVER_NAME}
    )
    return JsonResponse({"sent": text, "via": settings.TEST_SERVER_NAME})
