"""AMQP 0-9-1 frames: the per-message ones by hand, everything else through pamqp.

A message costs three frames each way (a method, a content header, one or more bodies).
pamqp handles every frame correctly but spends tens of microseconds on each; the
frames a message needs are encoded and parsed here with ``struct``, and everything
else (handshake, declarations, errors) goes through pamqp.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Any

from pamqp import commands
from pamqp import frame as pamqp_frame
from pamqp import header as pamqp_header

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_HEARTBEAT = 8
FRAME_END = 0xCE
FRAME_END_BYTE = b"\xce"
FRAME_OVERHEAD = 8  # type (1) + channel (2) + size (4) + frame end (1)
FRAME_MIN_SIZE = 4096  # the smallest frame_max a peer may set (AMQP 0-9-1, 4.2.3)

BASIC_CLASS = 60
BASIC_PUBLISH = 40
BASIC_DELIVER = 60
BASIC_ACK = 80
BASIC_NACK = 120

HEADERS_FLAG = 0x2000  # the "headers" bit of the basic property flags

_frame_head = struct.Struct(">BHI")
_publish_start = struct.Struct(">BHIHHH")  # frame head + class, method, reserved ticket
_content_header = struct.Struct(">BHIHHQ")  # frame head + class, weight, body size
_body_head = struct.Struct(">BHI")
_ack = struct.Struct(">BHIHHQB")  # a whole basic.ack frame but its end byte
_delivery_tag = struct.Struct(">Q")
_uint32 = struct.Struct(">I")
_uint16 = struct.Struct(">H")

HEARTBEAT_FRAME = _frame_head.pack(FRAME_HEARTBEAT, 0, 0) + FRAME_END_BYTE


class FrameError(ValueError):
    """The peer sent bytes that are not valid AMQP 0-9-1 framing."""


def encode_publish(
    channel_id: int,
    exchange: bytes,
    routing_key: bytes,
    properties: bytes,
    body: bytes,
    frame_max: int,
) -> bytes:
    """Return the frames of one ``basic.publish``: method, content header, body.

    ``properties`` is the encoded property flags and values (``b"\\x00\\x00"`` for none);
    ``exchange`` and ``routing_key`` are at most 255 bytes each.
    """
    parts: list[bytes | memoryview] = [
        encode_publish_method(channel_id, exchange, routing_key),
        _content_header.pack(FRAME_HEADER, channel_id, 12 + len(properties), BASIC_CLASS, 0, len(body)),
        properties,
        FRAME_END_BYTE,
    ]
    chunk = frame_max - FRAME_OVERHEAD
    if len(body) <= chunk:
        if body:
            parts += (_body_head.pack(FRAME_BODY, channel_id, len(body)), body, FRAME_END_BYTE)
    else:
        view = memoryview(body)
        for start in range(0, len(body), chunk):
            piece = view[start : start + chunk]
            parts += (_body_head.pack(FRAME_BODY, channel_id, len(piece)), piece, FRAME_END_BYTE)
    return b"".join(parts)


@functools.lru_cache(maxsize=4096)
def encode_publish_method(channel_id: int, exchange: bytes, routing_key: bytes) -> bytes:
    """The ``basic.publish`` method frame (mandatory and immediate off); the same for every
    message to one destination, so it is made once."""
    method_size = 9 + len(exchange) + len(routing_key)  # ids, ticket, 2 lengths, bits
    return b"".join(
        (
            _publish_start.pack(FRAME_METHOD, channel_id, method_size, BASIC_CLASS, BASIC_PUBLISH, 0),
            bytes((len(exchange),)),
            exchange,
            bytes((len(routing_key),)),
            routing_key,
            b"\x00\xce",
        )
    )


def encode_ack(channel_id: int, delivery_tag: int, multiple: bool) -> bytes:
    """Return one ``basic.ack`` frame."""
    return (
        _ack.pack(FRAME_METHOD, channel_id, 13, BASIC_CLASS, BASIC_ACK, delivery_tag, multiple)
        + FRAME_END_BYTE
    )


def encode_method(channel_id: int, method: Any) -> bytes:
    """Return the frame of any pamqp method (not on the per-message path)."""
    return pamqp_frame.marshal(method, channel_id)


def encode_string_headers(headers: dict[str, str]) -> bytes:
    """Encode basic properties that hold only a ``headers`` table of strings."""
    entries: list[bytes] = []
    for key, value in headers.items():
        raw_key = key.encode()
        raw_value = value.encode()
        entries += (bytes((len(raw_key),)), raw_key, b"S", _uint32.pack(len(raw_value)), raw_value)
    table = b"".join(entries)
    return _uint16.pack(HEADERS_FLAG) + _uint32.pack(len(table)) + table


def decode_headers(properties: memoryview) -> dict[str, Any] | None:
    """Return the ``headers`` table of encoded basic properties (flags first), or None.

    Tables of plain strings (what this project publishes) are parsed here; any other
    property layout goes through pamqp.
    """
    flags = _uint16.unpack_from(properties)[0] if len(properties) >= 2 else 0
    if flags == 0:
        return None
    if flags == HEADERS_FLAG:
        table = decode_string_table(properties, 2, len(properties))
        if table is not None:
            return table
    content_header = pamqp_header.ContentHeader()
    content_header.unmarshal(b"\x00" * 12 + bytes(properties))
    return content_header.properties.headers


def decode_string_table(data: bytes | memoryview, offset: int, limit: int) -> dict[str, Any] | None:
    """Parse a field table of string values at ``offset``; None when it holds anything else."""
    (size,) = _uint32.unpack_from(data, offset)
    offset += 4
    end = offset + size
    if end > limit:
        raise FrameError("field table overruns its content header")
    table: dict[str, Any] = {}
    while offset < end:
        key_end = offset + 1 + data[offset]
        key = str(data[offset + 1 : key_end], "utf-8", "replace")
        if data[key_end] != 0x53:  # "S": anything but a long string takes the slow path
            return None
        (value_size,) = _uint32.unpack_from(data, key_end + 1)
        offset = key_end + 5 + value_size
        if offset > end:
            raise FrameError("field table entry overruns its table")
        table[key] = str(data[key_end + 5 : offset], "utf-8", "replace")
    return table


@dataclass(slots=True)
class Deliver:
    """The arguments of a ``basic.deliver`` method; ``error`` says why they cannot be used."""

    consumer_tag: str
    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str
    error: str | None = None


def decode_deliver(payload: memoryview) -> Deliver:
    """Parse the arguments of ``basic.deliver`` (the payload after class and method ids).

    An exchange name or routing key that is not UTF-8 sets ``error`` rather than raising:
    the delivery tag is still good, so the message can be acknowledged and dropped.
    """
    tag_size = payload[0]
    consumer_tag = str(payload[1 : 1 + tag_size], "utf-8", "replace")
    offset = 1 + tag_size
    (delivery_tag,) = _delivery_tag.unpack_from(payload, offset)
    redelivered = bool(payload[offset + 8] & 1)
    offset += 9
    exchange_size = payload[offset]
    raw_exchange = bytes(payload[offset + 1 : offset + 1 + exchange_size])
    offset += 1 + exchange_size
    key_size = payload[offset]
    raw_routing_key = bytes(payload[offset + 1 : offset + 1 + key_size])
    if offset + 1 + key_size > len(payload):
        raise FrameError("basic.deliver arguments overrun their frame")
    error = None
    try:
        exchange = raw_exchange.decode()
        routing_key = raw_routing_key.decode()
    except UnicodeDecodeError:
        exchange = raw_exchange.decode("utf-8", "replace")
        routing_key = raw_routing_key.decode("utf-8", "replace")
        error = "its exchange name or routing key is not UTF-8"
    return Deliver(consumer_tag, delivery_tag, redelivered, exchange, routing_key, error)


def decode_confirm(payload: memoryview) -> tuple[int, bool]:
    """Parse ``basic.ack`` / ``basic.nack`` arguments: (delivery tag, multiple)."""
    (delivery_tag,) = _delivery_tag.unpack_from(payload)
    return delivery_tag, bool(payload[8] & 1)


def decode_method(payload: memoryview) -> Any:
    """Parse any method frame payload with pamqp."""
    frame = bytes(payload)
    (method_index,) = _uint32.unpack_from(frame)
    try:
        method = commands.INDEX_MAPPING[method_index]()
    except KeyError:
        raise FrameError(f"unknown AMQP method {method_index >> 16}.{method_index & 0xFFFF}") from None
    try:
        method.unmarshal(frame[4:])
    except Exception as error:  # pamqp raises many kinds on hostile arguments
        raise FrameError(f"malformed {method.name}: {type(error).__name__}: {error}") from None
    return method


def decode_content_header(payload: memoryview) -> tuple[int, memoryview]:
    """Parse a content header payload: (body size, encoded properties)."""
    class_id, _weight, body_size = struct.unpack_from(">HHQ", payload)
    if class_id != BASIC_CLASS:
        raise FrameError(f"content header of class {class_id}")
    return body_size, payload[12:]
