"""Django views. ``notify`` is a plain sync view: under an ASGI server it runs in a
``sync_to_async`` thread. ``health`` is async, to see the server's event loop."""

from __future__ import annotations

import asyncio

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.http import HttpRequest, JsonResponse

from .consumers import BROADCAST_GROUP, JOBS_CHANNEL


async def health(request: HttpRequest) -> JsonResponse:
    """The server's name and its event loop's implementation ("asyncio" or "uvloop")."""
    loop_module = type(asyncio.get_running_loop()).__module__
    return JsonResponse({"server": settings.TEST_SERVER_NAME, "loop": loop_module.partition(".")[0]})


def notify(request: HttpRequest) -> JsonResponse:
    """Send ``?text=`` to the broadcast group, from sync code (``async_to_sync``)."""
    text = request.GET.get("text", "")
    async_to_sync(get_channel_layer().group_send)(
        BROADCAST_GROUP, {"type": "broadcast.message", "text": text, "via": settings.TEST_SERVER_NAME}
    )
    return JsonResponse({"sent": text, "via": settings.TEST_SERVER_NAME})


def enqueue(request: HttpRequest) -> JsonResponse:
    """Send jobs ``?first=`` to ``?last=`` (each taking ``?seconds=``) to the workers' normal channel."""
    first, last = int(request.GET["first"]), int(request.GET["last"])
    seconds = float(request.GET.get("seconds", "0"))
    send = async_to_sync(get_channel_layer().send)
    for job in range(first, last + 1):
        send(JOBS_CHANNEL, {"type": "thumbnail.make", "id": job, "seconds": seconds})
    return JsonResponse({"sent": last - first + 1})
