"""The wire format: how a message finds its target through RabbitMQ (the body is :mod:`.codec`'s).

- ``send(channel)`` publishes to the default exchange with routing key = the queue name
  (the part of the channel name before ``!``) and the full channel name in the
  ``asgi_channel`` header (a long string).
- ``group_send(group)`` publishes to the groups exchange (``groups`` by default, direct)
  with routing key = the group name and no header: any AMQP client can publish to a
  group by doing the same.
"""

from __future__ import annotations

from .amqp.frames import encode_string_header

CHANNEL_HEADER = "asgi_channel"
NO_PROPERTIES = b"\x00\x00"


def channel_properties(channel: str) -> bytes:
    """The basic properties of a ``send()``: a headers table naming the target channel."""
    return encode_string_header(CHANNEL_HEADER, channel)
