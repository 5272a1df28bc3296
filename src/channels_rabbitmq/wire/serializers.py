"""Serializers: how a message dict becomes a body, before encryption and ``max_message_size``.

The CONFIG key ``serializer`` names one:

- ``"msgpack"`` (the default): :func:`encode_message` and :func:`decode_message`;
- ``"json"``: strict JSON in UTF-8 (no NaN or infinity; no bytes);
- the dotted path of an object (a module, a class, an instance) with ``dumps(message) -> bytes``
  and ``loads(body) -> message``, imported when the layer is built.

Every serializer is held to the same rules: a message that is not a dict, or that ``dumps``
cannot encode, raises ``TypeError`` at the call; a body larger than ``max_message_size``
raises ``MessageTooLarge``; a body from the wire that ``loads`` refuses in any way, or that
is not a dict, raises :class:`MalformedMessage` and is dropped.
"""

from __future__ import annotations

import importlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
from channels.exceptions import MessageTooLarge

Message = dict[str, Any]

_packers = threading.local()  # a msgpack Packer is not thread-safe: one per thread


class MalformedMessage(ValueError):
    """A body from the wire that is not a dict in the layer's serializer (or does not open)."""


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


class Decode(Protocol):
    """``decode(body, max_size)``: the message, or ``MalformedMessage``; ``max_size`` None: unchecked."""

    def __call__(self, body: bytes, max_size: int | None = None, /) -> Message: ...


@dataclass(frozen=True)
class MessageSerializer:
    """A serializer as the codec uses it: each function applies the rules above."""

    #: As written in CONFIG: "msgpack", "json" or a dotted path.
    name: str
    #: ``encode(message, max_size)``: the body, or ``TypeError`` / ``MessageTooLarge``.
    encode: Callable[[Any, int], bytes]
    #: ``decode(body, max_size=None)``: the message, or ``MalformedMessage``.
    decode: Decode

    def __repr__(self) -> str:
        return f"<MessageSerializer {self.name}>"


MSGPACK = MessageSerializer("msgpack", encode_message, decode_message)


class JsonSerializer:
    """Strict JSON in UTF-8: dict keys become strings and tuples lists, as JSON has it."""

    @staticmethod
    def dumps(message: Message) -> bytes:
        text = json.dumps(message, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode()

    @staticmethod
    def loads(body: bytes) -> Any:
        return json.loads(body)


def wrap(name: str, serializer: Any) -> MessageSerializer:
    """A :class:`MessageSerializer` that holds an object with ``dumps``/``loads`` to the rules."""
    dumps: Callable[[Message], Any] = serializer.dumps
    loads: Callable[[bytes], Any] = serializer.loads

    def encode(message: Any, max_size: int) -> bytes:
        if not isinstance(message, dict):
            raise TypeError(f"a message must be a dict, got {type(message).__name__}")
        try:
            body = dumps(message)
        except (TypeError, ValueError, OverflowError, RecursionError) as error:
            raise TypeError(f"message cannot be encoded with serializer {name}: {error}") from None
        if isinstance(body, bytearray | memoryview):
            body = bytes(body)
        elif type(body) is not bytes:
            raise TypeError(f"serializer {name}: dumps() returned {type(body).__name__}, not bytes")
        if len(body) > max_size:
            raise MessageTooLarge(f"message is {len(body)} bytes encoded; max_message_size is {max_size}")
        return body

    def decode(body: bytes, max_size: int | None = None) -> Message:
        if max_size is not None and len(body) > max_size:
            raise MalformedMessage(
                f"body is too large: {len(body)} bytes, over max_message_size ({max_size})"
            )
        try:
            message = loads(body)
        except Exception as error:  # a hostile body may make loads() raise anything
            raise MalformedMessage(f"body is not {name}: {type(error).__name__}") from None
        if type(message) is not dict:
            raise MalformedMessage(f"body is {name} {type(message).__name__}, not a dict")
        return message

    return MessageSerializer(name, encode, decode)


JSON = wrap("json", JsonSerializer)


def load_serializer(value: object) -> MessageSerializer:
    """The serializer that CONFIG's ``serializer`` names; a dotted path is imported now.

    Raises ``TypeError`` when ``value`` is not a string or the object has no callable
    ``dumps`` and ``loads``, and ``ValueError`` when the path cannot be imported.
    """
    if not isinstance(value, str):
        raise TypeError(f"serializer must be 'msgpack', 'json' or a dotted path, got {type(value).__name__}")
    if value == "msgpack":
        return MSGPACK
    if value == "json":
        return JSON
    target = _import(value)
    missing = [method for method in ("dumps", "loads") if not callable(getattr(target, method, None))]
    if missing:
        raise TypeError(
            f"serializer {value!r} has no callable {' or '.join(missing)}: it must have "
            "dumps(message) -> bytes and loads(bytes) -> message"
        )
    return wrap(value, target)


def _import(path: str) -> object:
    """``package.module.attribute``, or a module named by the whole path."""
    if not all(part.isidentifier() for part in path.split(".")):
        raise ValueError(
            f"serializer must be 'msgpack', 'json' or the dotted path of an object with dumps and "
            f"loads, got {path!r}"
        )
    module_name, _, attribute = path.rpartition(".")
    try:
        if module_name:
            module = importlib.import_module(module_name)
            if hasattr(module, attribute):
                return getattr(module, attribute)
        return importlib.import_module(path)
    except ImportError as error:
        raise ValueError(
            f"serializer must be 'msgpack', 'json' or the dotted path of an object with dumps and "
            f"loads; {path!r} cannot be imported: {error}"
        ) from error
