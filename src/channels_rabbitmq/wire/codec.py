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

from typing import Any, Protocol

from channels.exceptions import MessageTooLarge

from .serializers import MessageSerializer


class CodecSettings(Protocol):
    """What the codec reads of the layer's config (:class:`~channels_rabbitmq.config.LayerConfig`)."""

    @property
    def max_message_size(self) -> int: ...
    @property
    def expiry(self) -> float: ...
    @property
    def serializer(self) -> MessageSerializer: ...
    @property
    def encryption_keys(self) -> tuple[bytes, ...]: ...


class MessageCodec:
    """Encodes messages into bodies and decodes bodies into messages, as the config says."""

    def __init__(self, config: CodecSettings) -> None:
        self.max_size = config.max_message_size
        self.expiry = config.expiry
        self._encode = config.serializer.encode
        #: A body (decrypted) into its message: ``decode_body(body, max_size=None)``.
        self.decode_body = config.serializer.decode
        self.cipher = None
        if config.encryption_keys:
            from .encryption import BodyCipher  # imported only when used: it needs cryptography

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
        """The message in a body from the wire, and its serialized form; raises
        :class:`.serializers.MalformedMessage`."""
        if self.cipher is not None:
            body = self.cipher.open(body, destination, self.expiry)
        return self.decode_body(body, self.max_size), body
