"""The wire format: what the layer's messages are on RabbitMQ.

This package is everything a message is on the wire, with no I/O and nothing of the layer's
connections: here (``wire``), how a message finds its target (names, routing keys, headers);
:mod:`.codec`, what its body is, through :mod:`.serializers` and :mod:`.encryption`.

- A process-specific channel name is ``<prefix><queue>!<local part>``: the ``prefix`` given to
  ``new_channel()`` (empty, or ending with ``.``), then the queue of the process that made it
  (``channels.`` and 12 letters or digits), ``!``, and a local part.
- ``send(channel)`` publishes to the default exchange with routing key = the queue name
  (:func:`queue_of`) and the full channel name in the ``asgi_channel`` header (a long string).
- ``group_send(group)`` publishes to the groups exchange (``groups`` by default, direct)
  with routing key = the group name and no header: any AMQP client can publish to a
  group by doing the same.
- A control message (a group call for another process's channel, a reply, flush()) has an
  ``asgi_control`` header naming its operation and no ``asgi_channel`` header.
"""

from __future__ import annotations

import re

from ..amqp.frames import encode_string_header

CHANNEL_HEADER = "asgi_channel"
NO_PROPERTIES = b"\x00\x00"

#: Every process queue's name starts with this, then 12 random letters and digits.
QUEUE_PREFIX = "channels."
QUEUE_NAME_LENGTH = len(QUEUE_PREFIX) + 12
#: The random part of a channel name after the ``!``.
LOCAL_PART_LENGTH = 12
#: The longest start of a channel name (the prefix and its ``.``): names have at most 99
#: characters, Channels' limit.
MAX_PREFIX_LENGTH = 99 - QUEUE_NAME_LENGTH - 1 - LOCAL_PART_LENGTH

_PREFIX = re.compile(r"[a-zA-Z0-9\-_.]*")
_LAYER_QUEUE = re.compile(rf"{re.escape(QUEUE_PREFIX)}[A-Za-z0-9]{{{QUEUE_NAME_LENGTH - len(QUEUE_PREFIX)}}}")


def is_layer_queue(name: object) -> bool:
    """``name`` has the shape of a link's exclusive queue (``channels.`` and 12 letters or digits):
    never a normal channel's queue, the roll call or any other name on the vhost."""
    return isinstance(name, str) and _LAYER_QUEUE.fullmatch(name) is not None


def channel_name_start(prefix: object) -> str:
    """What the names of ``new_channel(prefix)`` start with: ``prefix``, then ``.`` unless it ends
    with one (as channels_redis does); nothing for ``""``.

    Raises ``TypeError`` for a prefix that is not a string, and ``ValueError`` for one that
    would make invalid names: characters other than letters, digits, ``-``, ``_`` and ``.``,
    or too long for a name of at most 99 characters.
    """
    if not isinstance(prefix, str):
        raise TypeError(f"new_channel() prefix must be a string, got {type(prefix).__name__}")
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(
            f"new_channel() prefix may only hold ASCII letters, digits, '-', '_' and '.': got {prefix!r}"
        )
    start = prefix if not prefix or prefix.endswith(".") else prefix + "."
    if len(start) > MAX_PREFIX_LENGTH:
        raise ValueError(
            f"new_channel() prefix is {len(prefix)} characters: at most {MAX_PREFIX_LENGTH - 1} "
            f"({MAX_PREFIX_LENGTH} ending with '.'), so that channel names stay under 100 characters"
        )
    return start


def queue_of(channel: str) -> str:
    """The queue that receives a process-specific channel: where ``send()`` publishes.

    It is the :data:`QUEUE_NAME_LENGTH` characters just before the ``!`` when they start with
    :data:`QUEUE_PREFIX` and follow a ``.`` (a ``new_channel()`` prefix) or nothing. Any
    other name's queue is the whole part before the ``!`` (the form before prefixes existed).
    """
    head = channel.partition("!")[0]
    start = len(head) - QUEUE_NAME_LENGTH
    if start > 0 and head[start - 1] == "." and head.startswith(QUEUE_PREFIX, start):
        return head[start:]
    return head


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
