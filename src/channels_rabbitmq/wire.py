"""The wire format: how a message and its target travel through RabbitMQ.

- The body is the message dict packed with msgpack (``use_bin_type``: bytes stay bytes,
  str stays str). No key is added to the message.
- ``send(channel)`` publishes to the default exchange with routing key = the queue name
  (the part of the channel name before ``!``) and the full channel name in the
  ``asgi_channel`` header (a long string).
- ``group_send(group)`` publishes to the groups exchange (``groups`` by default, direct)
  with routing key = the group name and no header: any AMQP client can publish to a
  group by doing the same.
"""

from __future__ import annotations

import threading
from typing import Any

import msgpack
from channels.exceptions import MessageTooLarge

from .amqp.frames import encode_string_header

CHANNEL_HEADER = "asgi_channel"
NO_PROPERTIES = b"\x00\x00"

_packers = threading.local()  # a msgpack Packer is not thread-safe: one per thread


class MalformedMessage(ValueError):
    """A body from the wire that is not a msgpack-encoded dict."""


def encode_message(message: Any, max_size: int) -> bytes:
    """Pack a message, or raise ``TypeError`` (not a dict, not encodable) or ``MessageTooLarge``."""
    if type(message) is not dict and not isinstance(message, dict):
        raise TypeError(f"a message must be a dict, got {type(message).__name__}")
    try:
        pack = _packers.pack
    except AttributeError:
        pack = _packers.pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
    try:
        body: bytes = pack(message)
    except (TypeError, ValueError, OverflowError) as error:
        raise TypeError(f"message cannot be encoded with msgpack: {error}") from None
    if len(body) > max_size:
        raise MessageTooLarge(f"message is {len(body)} bytes encoded; max_message_size is {max_size}")
    return body


def _refuse_ext_type(code: int, data: bytes) -> Any:
    raise MalformedMessage(f"body holds a msgpack ext type ({code}); messages carry none")


def decode_message(body: bytes, max_size: int | None = None) -> dict[str, Any]:
    """Unpack a body from the wire, or raise :class:`MalformedMessage`.

    A body over ``max_size`` bytes is refused unread; no string, bytes, array or map may
    claim more than ``max_size`` (msgpack also bounds them by the body's length). Ext types,
    timestamps included, are refused: nothing this layer sends has them, and they would
    reach consumers as objects no JSON-like message holds. Group copies decoded again from
    a body already checked may leave ``max_size`` out.
    """
    if max_size is None:
        max_size = len(body)
    elif len(body) > max_size:
        raise MalformedMessage(f"body is too large: {len(body)} bytes, over max_message_size ({max_size})")
    try:
        message = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=False,
            ext_hook=_refuse_ext_type,
            max_ext_len=0,  # timestamps (ext -1) skip ext_hook: a length limit refuses them too
            max_str_len=max_size,
            max_bin_len=max_size,
            max_array_len=max_size,
            max_map_len=max_size // 2,  # a map entry takes two bytes at least
        )
    except MalformedMessage:
        raise
    except Exception as error:  # msgpack raises many kinds on hostile input
        raise MalformedMessage(f"body is not msgpack: {type(error).__name__}: {error}") from None
    if type(message) is not dict:
        raise MalformedMessage(f"body is msgpack {type(message).__name__}, not a map")
    return message


def channel_properties(channel: str) -> bytes:
    """The basic properties of a ``send()``: a headers table naming the target channel."""
    return encode_string_header(CHANNEL_HEADER, channel)
