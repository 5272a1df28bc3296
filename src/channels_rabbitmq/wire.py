"""The wire format: how a message finds its target through RabbitMQ (the body is :mod:`.codec`'s).

- ``send(channel)`` publishes to the default exchange with routing key = the queue name
  (the part of the channel name before ``!``) and the full channel name in the
  ``asgi_channel`` header (a long string).
- ``group_send(group)`` publishes to the groups exchange (``groups`` by default, direct)
  with routing key = the group name and no header: any AMQP client can publish to a
  group by doing the same.
- A control message (a group call for another process's channel, a reply, flush()) has an
  ``asgi_control`` header naming its operation and no ``asgi_channel`` header.
"""

from __future__ import annotations

from .amqp.frames import encode_string_header

CHANNEL_HEADER = "asgi_channel"
NO_PROPERTIES = b"\x00\x00"


def channel_properties(channel: str) -> bytes:
    """The basic properties of a ``send()``: a headers table naming the target channel."""
    return encode_string_header(CHANNEL_HEADER, channel)


# Control messages: group calls for another process's channel, and flush() (see link/control.py) --

#: The header that marks a control message; its value is the operation. A control message never
#: has an ``asgi_channel`` header, so it is never taken for a channel's message.
CONTROL_HEADER = "asgi_control"
#: The routing key, on the groups exchange, that every process's queue is bound with to hear
#: flush(): no group can have it, since group names never contain "!".
FLUSH_ROUTING_KEY = "!flush"


def control_properties(operation: str) -> bytes:
    """The basic properties of a control message: a headers table naming the operation."""
    return encode_string_header(CONTROL_HEADER, operation)


def control_destination(operation: str, routing_key: str) -> str:
    """What a control body is sealed for (with ``encryption_keys``): never a channel or a group
    name, which have no ":", so no captured message body can pass for a control one."""
    return f"{operation}:{routing_key}"
