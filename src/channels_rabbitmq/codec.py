"""The message body: serialized, then optional encryption, within ``max_message_size``.

- The body is the message dict packed with msgpack (``use_bin_type``: bytes stay bytes,
  str stays str), or encoded by the ``serializer`` of the config (:mod:`.serializers`).
  No key is added to the message.
- With ``encryption_keys``, the packed body is sealed for its destination (the channel of a
  ``send()``, the group of a ``group_send()``): see :mod:`.encryption`.
- ``max_message_size`` bounds the body as it travels (after encryption): larger messages
  raise ``MessageTooLarge`` before anything is sent, larger bodies from the wire are dropped.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import msgpack
from channels.exceptions import MessageTooLarge

if TYPE_CHECKING:  # config imports the serializers, which import this module
    from .config import LayerConfig

_packers = threading.local()  # a msgpack Packer is not thread-safe: one per thread


class MessageCodec:
    """Encodes messages into bodies and decodes bodies into messages, as the config says."""

    def __init__(self, config: LayerConfig) -> None:
        self.max_size = config.max_message_size
        self.expiry = config.expiry
        self._encode = config.serializer.encode
        #: A body (decrypted) into its message: ``decode_body(body, max_size=None)``.
        self.decode_body = config.serializer.decode
        self.cipher = None
        if config.encryption_keys:
            from .encryption import BodyCipher  # it needs this module's MalformedMessage

            self.cipher = BodyCipher(config.encryption_keys)

    def encode(self, message: dict[str, Any], destination: str) -> bytes:
        """The body to publish to ``destination`` (a channel or group name); raises ``TypeError``
        (not a dict, not encodable) or ``MessageTooLarge``."""
        body = self._encode(message, self.max_size)
        if self.cipher is not None:
            body = self.cipher.seal(body, destination)
            if len(body) > self.max_size:
                raise MessageTooLarge(
                    f"message is {len(body)} bytes encrypted; max_message_size is {self.max_size}"
                )
        return body

    def seal(self, body: bytes, destination: str) -> bytes:
        """``body`` (already serialized) as it travels to ``destination``."""
        return body if self.cipher is None else self.cipher.seal(body, destination)

    def decode(self, body: bytes, destination: str) -> tuple[dict[str, Any], bytes]:
        """The message in a body from the wire, and its serialized form; raises :class:`MalformedMessage`."""
        if self.cipher is not None:
            body = self.cipher.open(body, destination, self.expiry)
        return self.decode_body(body, self.max_size), body


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
