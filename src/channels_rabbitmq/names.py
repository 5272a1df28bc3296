"""What the layer accepts as a group or channel name: Channels' rule, and what RabbitMQ can carry.

Channels accepts names of fewer than 100 characters made of ASCII letters, ``\\d``, ``-``,
``_`` and ``.`` (and ``!`` plus ``\\w`` characters in a channel name). Two gaps in that rule
matter once a name becomes an AMQP routing key or queue name, which holds at most 255 *bytes*:

- ``\\d`` and ``\\w`` match any Unicode digit or letter, so a name of 99 characters can be
  297 bytes in UTF-8: ``"chat_"`` and 94 fullwidth zeros (``"\\uff10"``) is 287. Such a name is
  refused here, at the call, before anything is recorded: it could never be bound or published.
- A normal channel's name (no ``!``) names a queue (``normal_channel_prefix`` + name), and
  queue names are ASCII: its digits must be ASCII ones.
- Channels' pattern ends in ``$``, which also matches before a final newline: ``"room\\n"``
  passes it. This layer refuses it, so that ``"room"`` and ``"room\\n"`` are never two groups.

The same checks apply to the names inside control messages from other processes
(:mod:`.link.control`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeGuard

from channels.layers import BaseChannelLayer

#: An AMQP short string (routing key, queue name, exchange name) holds at most this many bytes.
MAX_NAME_BYTES = 255

_CHANNELS_RULE = BaseChannelLayer()  # Channels' own checks, with no configuration


def is_normal_channel(name: str) -> bool:
    """A normal channel (``runworker``'s ``thumbnails``): any process may receive it, from a queue
    of its own. Every other channel name holds ``!`` and belongs to one process (its queue's name
    comes before the ``!``). The one place that tells the two kinds apart."""
    return "!" not in name


def require_valid_group_name(name: object) -> str:
    """Return ``name`` if it is a valid group name, else raise ``TypeError`` saying why."""
    _CHANNELS_RULE.require_valid_group_name(name)
    assert isinstance(name, str)  # Channels' check refuses anything else
    _require_carried("Group", name, name, 0)
    return name


def require_valid_channel_name(name: object, *, normal_prefix: str = "", receive: bool = False) -> str:
    """Return ``name`` if it is a valid channel name, else raise ``TypeError`` saying why.

    A normal channel (no ``!``) becomes the queue ``normal_prefix + name``, which must fit
    too. A process channel's name is carried whole in a header: it must fit a routing key
    as well, since its queue part is one.
    """
    _CHANNELS_RULE.require_valid_channel_name(name, receive=receive)
    assert isinstance(name, str)
    if not is_normal_channel(name):
        _require_carried("Channel", name, name, 0)
        return name
    if not name.isascii():
        raise TypeError(
            f"Normal channel name {name!r} is not ASCII: it names a RabbitMQ queue, and queue names "
            "are ASCII letters, digits, '-', '_' and '.'"
        )
    _require_carried("Channel", name, normal_prefix + name, len(normal_prefix.encode()))
    return name


def is_valid_group_name(name: object) -> TypeGuard[str]:
    return _passes(require_valid_group_name, name)


def is_valid_channel_name(name: object) -> TypeGuard[str]:
    return _passes(require_valid_channel_name, name)


def _passes(check: Callable[[object], str], name: object) -> bool:
    try:
        check(name)
    except TypeError:
        return False
    return True


def _require_carried(kind: str, name: str, on_the_wire: str, prefix_bytes: int) -> None:
    if name.endswith("\n"):
        raise TypeError(
            f"{kind} name {name!r} ends with a newline: names end with their last allowed character"
        )
    size = len(on_the_wire.encode())
    if size > MAX_NAME_BYTES:
        limit = MAX_NAME_BYTES - prefix_bytes
        where = f" after normal_channel_prefix's {prefix_bytes} bytes" if prefix_bytes else ""
        raise TypeError(
            f"{kind} name {name!r} is {size - prefix_bytes} bytes in UTF-8: RabbitMQ carries at most "
            f"{limit}{where} (an AMQP routing key or queue name holds {MAX_NAME_BYTES} bytes)"
        )
