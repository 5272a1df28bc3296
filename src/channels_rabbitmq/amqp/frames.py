"""AMQP 0-9-1 frames: the per-message ones by hand, everything else through pamqp.

A message costs three frames each way (a method, a content header, one or more bodies).
pamqp handles every frame correctly but spends tens of microseconds on each; the
frames a message needs are encoded and parsed here with ``struct``, and everything
else (handshake, declarations, errors) goes through pamqp. Every byte layout lives here,
the fast path that reads a whole delivery at once included, so that nothing else packs
or unpacks frames.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Any

from pamqp import commands
from pamqp import frame as pamqp_frame
from pamqp import header as pamqp_header

from .errors import RequestNotEncodable

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_HEARTBEAT = 8
FRAME_TYPES = (FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT)
FRAME_END = 0xCE
FRAME_END_BYTE = b"\xce"
FRAME_MIN_SIZE = 4096  # the smallest frame_max a peer may set (AMQP 0-9-1, 4.2.3)

BASIC_CLASS = 60
BASIC_PUBLISH = 40
BASIC_RETURN = 50
BASIC_DELIVER = 60
BASIC_ACK = 80
BASIC_NACK = 120

# A method frame's payload starts with its index: class id << 16 | method id.
BASIC_PUBLISH_INDEX = BASIC_CLASS << 16 | BASIC_PUBLISH
BASIC_DELIVER_INDEX = BASIC_CLASS << 16 | BASIC_DELIVER
BASIC_ACK_INDEX = BASIC_CLASS << 16 | BASIC_ACK
BASIC_NACK_INDEX = BASIC_CLASS << 16 | BASIC_NACK

HEADERS_FLAG = 0x2000  # the "headers" bit of the basic property flags
LONG_STRING = 0x53  # "S": the field type of a long string in a field table

# Every byte layout of the frames read and written here, each written once (network order). The
# structs are made of them, several layouts in one where one call per frame keeps a message fast.
_FRAME_HEAD = "BHI"  # frame type, channel, payload size
_METHOD_INDEX = "I"
_TICKET = "H"  # reserved, 0 (basic.publish)
_TAG_AND_BITS = "QB"  # delivery tag, then the bits: redelivered (deliver) or multiple (ack, nack)
_CONTENT_HEADER = "HHQ"  # class id, weight (0), body size
_PROPERTY_FLAGS = "H"
_LONG = "I"  # the size of a long string or of a field table

_frame_head = struct.Struct(">" + _FRAME_HEAD)
_method_index = struct.Struct(">" + _METHOD_INDEX)
_publish_head = struct.Struct(">" + _FRAME_HEAD + _METHOD_INDEX + _TICKET)
_ack = struct.Struct(">" + _FRAME_HEAD + _METHOD_INDEX + _TAG_AND_BITS)  # all but the frame end
_tag_and_bits = struct.Struct(">" + _TAG_AND_BITS)
_content_header = struct.Struct(">" + _CONTENT_HEADER)
_content_frame_head = struct.Struct(">" + _FRAME_HEAD + _CONTENT_HEADER)
_content_frame_head_and_flags = struct.Struct(">" + _FRAME_HEAD + _CONTENT_HEADER + _PROPERTY_FLAGS)
_property_flags = struct.Struct(">" + _PROPERTY_FLAGS)
_headers_head = struct.Struct(">" + _PROPERTY_FLAGS + _LONG)  # flags, then the table's size
_long = struct.Struct(">" + _LONG)

# Sizes as plain ints: reading a struct's size costs an attribute lookup on the per-message path.
FRAME_HEAD_SIZE = _frame_head.size
METHOD_INDEX_SIZE = _method_index.size
_METHOD_ARGUMENTS = FRAME_HEAD_SIZE + METHOD_INDEX_SIZE  # where a method's arguments start in its frame
_TAG_AND_BITS_SIZE = _tag_and_bits.size
_CONTENT_HEADER_SIZE = _content_header.size
_CONTENT_FRAME_HEAD_AND_FLAGS_SIZE = _content_frame_head_and_flags.size
_PROPERTY_FLAGS_SIZE = _property_flags.size
_LONG_SIZE = _long.size
_ACK_SIZE = _ack.size - FRAME_HEAD_SIZE
FRAME_OVERHEAD = FRAME_HEAD_SIZE + len(FRAME_END_BYTE)  # what a frame adds to its payload
_LONG_STRING_BYTE = bytes((LONG_STRING,))

# Per frame, so the structs' own methods rather than functions around them:
#: ``decode_frame_head(data, offset)``: (frame type, channel, payload size) of the frame at ``offset``.
decode_frame_head = _frame_head.unpack_from
#: ``decode_method_index(data, offset=0)``: (method index,) of the method payload at ``offset``.
decode_method_index = _method_index.unpack_from

HEARTBEAT_FRAME = _frame_head.pack(FRAME_HEARTBEAT, 0, 0) + FRAME_END_BYTE


class FrameError(ValueError):
    """The peer sent bytes that are not valid AMQP 0-9-1 framing."""


# Encoding ----------------------------------------------------------------------------------------


def encode_publish(
    channel_id: int,
    exchange: bytes,
    routing_key: bytes,
    properties: bytes,
    body: bytes,
    frame_max: int,
    mandatory: bool = False,
) -> bytes:
    """Return the frames of one ``basic.publish``: method, content header, body.

    ``properties`` is the encoded property flags and values (``b"\\x00\\x00"`` for none);
    ``exchange`` and ``routing_key`` are at most 255 bytes each. A ``mandatory`` message that
    no queue takes comes back as a ``basic.return``.
    """
    parts: list[bytes | memoryview] = [
        encode_publish_method(channel_id, exchange, routing_key, mandatory),
        _content_frame_head.pack(
            FRAME_HEADER, channel_id, _CONTENT_HEADER_SIZE + len(properties), BASIC_CLASS, 0, len(body)
        ),
        properties,
        FRAME_END_BYTE,
    ]
    chunk = frame_max - FRAME_OVERHEAD
    if len(body) <= chunk:
        if body:
            parts += (_frame_head.pack(FRAME_BODY, channel_id, len(body)), body, FRAME_END_BYTE)
    else:
        view = memoryview(body)
        for start in range(0, len(body), chunk):
            piece = view[start : start + chunk]
            parts += (_frame_head.pack(FRAME_BODY, channel_id, len(piece)), piece, FRAME_END_BYTE)
    return b"".join(parts)


@functools.lru_cache(maxsize=4096)
def encode_publish_method(
    channel_id: int, exchange: bytes, routing_key: bytes, mandatory: bool = False
) -> bytes:
    """The ``basic.publish`` method frame (immediate off); the same for every message to one
    destination, so it is made once."""
    if len(exchange) > 255 or len(routing_key) > 255:
        raise RequestNotEncodable(
            "Basic.Publish", f"exchange or routing key over 255 bytes ({len(exchange)}, {len(routing_key)})"
        )
    # index and ticket, two short strings, one octet of bits
    method_size = _publish_head.size - FRAME_HEAD_SIZE + 1 + len(exchange) + 1 + len(routing_key) + 1
    return b"".join(
        (
            _publish_head.pack(FRAME_METHOD, channel_id, method_size, BASIC_PUBLISH_INDEX, 0),
            bytes((len(exchange),)),
            exchange,
            bytes((len(routing_key),)),
            routing_key,
            b"\x01" if mandatory else b"\x00",  # the bits: mandatory, then immediate
            FRAME_END_BYTE,
        )
    )


def encode_ack(channel_id: int, delivery_tag: int, multiple: bool) -> bytes:
    """Return one ``basic.ack`` frame."""
    return (
        _ack.pack(FRAME_METHOD, channel_id, _ACK_SIZE, BASIC_ACK_INDEX, delivery_tag, multiple)
        + FRAME_END_BYTE
    )


def encode_method(channel_id: int, method: Any) -> bytes:
    """Return the frame of any pamqp method (not on the per-message path)."""
    return pamqp_frame.marshal(method, channel_id)


def encode_string_header(key: str, value: str) -> bytes:
    """Encode basic properties that hold only a ``headers`` table of one string: what a
    ``send()`` publishes, without the dict and the loop of :func:`encode_string_headers`."""
    entry = _string_entry(key, value)
    return _headers_head.pack(HEADERS_FLAG, len(entry)) + entry


def encode_string_headers(headers: dict[str, str]) -> bytes:
    """Encode basic properties that hold only a ``headers`` table of strings."""
    table = b"".join([_string_entry(key, value) for key, value in headers.items()])
    return _headers_head.pack(HEADERS_FLAG, len(table)) + table


def _string_entry(key: str, value: str) -> bytes:
    """One field table entry: a short string key, the long string type, a long string value."""
    raw_value = value.encode()
    return _entry_key(key) + _long.pack(len(raw_value)) + raw_value


@functools.lru_cache(maxsize=64)
def _entry_key(key: str) -> bytes:
    """The start of an entry, the same for every value of a header (``asgi_channel``)."""
    raw_key = key.encode()
    return bytes((len(raw_key),)) + raw_key + _LONG_STRING_BYTE


# Decoding ----------------------------------------------------------------------------------------


def decode_headers(properties: memoryview) -> dict[str, Any] | None:
    """Return the ``headers`` table of encoded basic properties (flags first), or None.

    Tables of plain strings (what this project publishes) are parsed here; any other
    property layout goes through pamqp.
    """
    flags = _property_flags.unpack_from(properties)[0] if len(properties) >= _PROPERTY_FLAGS_SIZE else 0
    if flags == 0:
        return None
    if flags == HEADERS_FLAG:
        table = decode_string_table(properties, _PROPERTY_FLAGS_SIZE, len(properties))
        if table is not None:
            return table
    content_header = pamqp_header.ContentHeader()
    content_header.unmarshal(bytes(_CONTENT_HEADER_SIZE) + bytes(properties))
    return content_header.properties.headers


def decode_string_table(data: bytes | memoryview, offset: int, limit: int) -> dict[str, Any] | None:
    """Parse a field table of string values at ``offset``; None when it holds anything else."""
    (size,) = _long.unpack_from(data, offset)
    offset += _LONG_SIZE
    end = offset + size
    if end > limit:
        raise FrameError("field table overruns its content header")
    table: dict[str, Any] = {}
    while offset < end:
        key_end = offset + 1 + data[offset]
        key = str(data[offset + 1 : key_end], "utf-8", "replace")
        if data[key_end] != LONG_STRING:  # anything but a long string takes the slow path
            return None
        value_start = key_end + 1 + _LONG_SIZE  # after the field type and the value's size
        (value_size,) = _long.unpack_from(data, key_end + 1)
        offset = value_start + value_size
        if offset > end:
            raise FrameError("field table entry overruns its table")
        table[key] = str(data[value_start:offset], "utf-8", "replace")
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
    tag_end = 1 + payload[0]
    consumer_tag = str(payload[1:tag_end], "utf-8", "replace")
    # the same steps as decode_whole_delivery's (a shared function costs that path 6-8%)
    delivery_tag, bits = _tag_and_bits.unpack_from(payload, tag_end)
    exchange_start = tag_end + _TAG_AND_BITS_SIZE + 1
    exchange_end = exchange_start + payload[exchange_start - 1]
    routing_key_end = exchange_end + 1 + payload[exchange_end]
    if routing_key_end > len(payload):
        raise FrameError("basic.deliver arguments overrun their frame")
    raw_exchange = payload[exchange_start:exchange_end]
    raw_routing_key = payload[exchange_end + 1 : routing_key_end]
    error = None
    try:
        exchange = str(raw_exchange, "utf-8")
        routing_key = str(raw_routing_key, "utf-8")
    except UnicodeDecodeError:
        exchange = str(raw_exchange, "utf-8", "replace")
        routing_key = str(raw_routing_key, "utf-8", "replace")
        error = "its exchange name or routing key is not UTF-8"
    return Deliver(consumer_tag, delivery_tag, (bits & 1) == 1, exchange, routing_key, error)


def decode_confirm(payload: memoryview) -> tuple[int, bool]:
    """Parse ``basic.ack`` / ``basic.nack`` arguments: (delivery tag, multiple)."""
    delivery_tag, bits = _tag_and_bits.unpack_from(payload)
    return delivery_tag, (bits & 1) == 1


def decode_method(payload: memoryview) -> Any:
    """Parse any method frame payload with pamqp."""
    frame = bytes(payload)
    (method_index,) = _method_index.unpack_from(frame)
    try:
        method = commands.INDEX_MAPPING[method_index]()
    except KeyError:
        raise FrameError(f"unknown AMQP method {method_index >> 16}.{method_index & 0xFFFF}") from None
    try:
        method.unmarshal(frame[METHOD_INDEX_SIZE:])
    except Exception as error:  # pamqp raises many kinds on hostile arguments
        raise FrameError(f"malformed {method.name}: {type(error).__name__}: {error}") from None
    return method


def decode_content_header(payload: memoryview) -> tuple[int, memoryview]:
    """Parse a content header payload: (body size, encoded properties)."""
    class_id, _weight, body_size = _content_header.unpack_from(payload)
    if class_id != BASIC_CLASS:
        raise FrameError(f"content header of class {class_id}")
    return body_size, payload[_CONTENT_HEADER_SIZE:]


#: What :func:`decode_whole_delivery` reads: (offset after the delivery, delivery tag, exchange,
#: routing key, headers, body, redelivered).
WholeDelivery = tuple[int, int, str, str, dict[str, Any] | None, bytes, bool]


def decode_whole_delivery(
    data: bytes, offset: int, method_end: int, channel_id: int, max_body_size: int
) -> WholeDelivery | None:
    """The fast path: read a delivery whose three frames are all in ``data``, in one go.

    ``offset`` is where its ``basic.deliver`` frame starts, ``method_end`` where that frame's
    end byte is. None leaves the delivery to the frame-by-frame decoders (and the checks
    they make): names that are not UTF-8, properties other than a table of strings, a body
    over ``max_body_size`` or in several frames, frames not all in ``data`` yet.
    """
    end = len(data)
    arguments = offset + _METHOD_ARGUMENTS
    tag_end = arguments + 1 + data[arguments]  # after the consumer tag
    delivery_tag, bits = _tag_and_bits.unpack_from(data, tag_end)
    exchange_start = tag_end + _TAG_AND_BITS_SIZE + 1
    exchange_end = exchange_start + data[exchange_start - 1]
    routing_key_end = exchange_end + 1 + data[exchange_end]
    if routing_key_end > method_end:
        raise FrameError("basic.deliver arguments overrun their frame")
    try:
        exchange = data[exchange_start:exchange_end].decode()
        routing_key = data[exchange_end + 1 : routing_key_end].decode()
    except UnicodeDecodeError:
        return None
    header = method_end + 1
    if end - header < _CONTENT_FRAME_HEAD_AND_FLAGS_SIZE:
        return None
    frame_type, header_channel, size, class_id, _weight, body_size, flags = (
        _content_frame_head_and_flags.unpack_from(data, header)
    )
    header_end: int = header + FRAME_HEAD_SIZE + size
    if frame_type != FRAME_HEADER or header_channel != channel_id or header_end >= end:
        return None
    if data[header_end] != FRAME_END or class_id != BASIC_CLASS or body_size > max_body_size:
        return None
    if flags == 0:
        headers = None
    elif flags == HEADERS_FLAG:
        try:
            headers = decode_string_table(data, header + _CONTENT_FRAME_HEAD_AND_FLAGS_SIZE, header_end)
        except (ValueError, IndexError, struct.error):
            return None
        if headers is None:
            return None
    else:
        return None
    if body_size == 0:
        return header_end + 1, delivery_tag, exchange, routing_key, headers, b"", (bits & 1) == 1
    body_start = header_end + 1
    if end - body_start < FRAME_HEAD_SIZE:
        return None
    frame_type, body_channel, size = _frame_head.unpack_from(data, body_start)
    body_end: int = body_start + FRAME_HEAD_SIZE + size
    if frame_type != FRAME_BODY or body_channel != channel_id or size != body_size:
        return None
    if body_end >= end or data[body_end] != FRAME_END:
        return None
    body = data[body_start + FRAME_HEAD_SIZE : body_end]
    return body_end + 1, delivery_tag, exchange, routing_key, headers, body, (bits & 1) == 1
