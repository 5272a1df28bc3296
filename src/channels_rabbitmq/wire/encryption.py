"""Optional encryption of message bodies, for brokers shared with parties you do not trust.

With ``encryption_keys`` set, every body is sealed with Fernet (AES-128-CBC with an
HMAC-SHA256, from the ``cryptography`` package: ``pip install channels_rabbitmq[encryption]``).
The first key encrypts; every key is tried to decrypt, so keys can be rotated: add the
new key in front, deploy everywhere, then drop the old one. A body no key opens is
logged and dropped like any other undecodable message.

Fernet has no associated data, so the destination goes inside the sealed plaintext: two
bytes of length (big-endian), the destination in UTF-8, then the serialized body. A
``send()`` is bound to the full channel name, a ``group_send()`` to the group name; a
body captured on its way to one and republished to another is dropped. A body is also
dropped when its Fernet timestamp is older than ``expiry`` plus :data:`CLOCK_SKEW_ALLOWANCE`,
so that a captured body cannot be replayed after the message it was would have expired.
Control requests are also remembered by id for :func:`acceptance_span`, and refused when
sealed before the receiving link started (see :mod:`.link.control`).
"""

from __future__ import annotations

import math
import struct

from .serializers import MalformedMessage

#: Seconds added to ``expiry`` before a sealed body counts as too old: the clocks of the
#: sending and receiving hosts may differ by that much (Fernet itself refuses bodies
#: stamped more than 60 s in the future).
CLOCK_SKEW_ALLOWANCE = 60
#: Fernet refuses bodies stamped more than this far in the future (cryptography's own limit).
FUTURE_STAMP_LIMIT = 60

_destination_size = struct.Struct(">H")


def acceptance_span(expiry: float) -> float:
    """How long after its first arrival a sealed body may still open: it is stamped at most
    :data:`FUTURE_STAMP_LIMIT` s ahead of the receiver's clock, and opens until ``expiry`` plus
    :data:`CLOCK_SKEW_ALLOWANCE` after its stamp. A request id remembered this long (and a second
    more) cannot be replayed to the same process."""
    return FUTURE_STAMP_LIMIT + math.ceil(expiry) + CLOCK_SKEW_ALLOWANCE


def generate_key() -> str:
    """A new random key, to put in ``encryption_keys``."""
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


class BodyCipher:
    """Seals and opens message bodies with a list of keys (the first one seals)."""

    def __init__(self, keys: tuple[bytes, ...]) -> None:
        try:
            from cryptography.fernet import Fernet, InvalidToken, MultiFernet
        except ImportError:
            raise ImportError(
                "encryption_keys needs the cryptography package: pip install 'channels_rabbitmq[encryption]'"
            ) from None
        self._fernet = MultiFernet([Fernet(key) for key in keys])
        self._invalid_token = InvalidToken

    def seal(self, body: bytes, destination: str) -> bytes:
        """Encrypt ``body`` bound to ``destination`` (the channel or group it is sent to)."""
        target = destination.encode()
        return self._fernet.encrypt(_destination_size.pack(len(target)) + target + body)

    def open(self, token: bytes, destination: str, max_age: float) -> bytes:
        """Decrypt a body received for ``destination``, sealed at most ``max_age`` seconds ago
        (plus :data:`CLOCK_SKEW_ALLOWANCE`); raise :class:`MalformedMessage` otherwise."""
        try:
            plaintext = self._fernet.decrypt(token, ttl=math.ceil(max_age) + CLOCK_SKEW_ALLOWANCE)
        except self._invalid_token:
            raise MalformedMessage(self._why_not(token, max_age)) from None
        if len(plaintext) < 2:
            raise MalformedMessage("decrypted body names no destination")
        (size,) = _destination_size.unpack_from(plaintext)
        if plaintext[2 : 2 + size] != destination.encode():
            raise MalformedMessage(
                f"decrypted body was sealed for another destination than {destination!r}: "
                "dropped as a possible replay"
            )
        return plaintext[2 + size :]

    def sealed_at(self, token: bytes) -> float:
        """When a body that opened was sealed, by the sender's clock (seconds since the epoch)."""
        return float(self._fernet.extract_timestamp(token))

    def _why_not(self, token: bytes, max_age: float) -> str:
        """Tell an authentic but old body from one no key opens (only on the failure path)."""
        try:
            self._fernet.extract_timestamp(token)
        except self._invalid_token:
            return "body could not be decrypted with any of encryption_keys"
        return (
            f"encrypted body is older than expiry={max_age:g}s (+{CLOCK_SKEW_ALLOWANCE}s for clock skew), "
            "or stamped in the future: dropped as a possible replay"
        )
