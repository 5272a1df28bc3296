"""Optional encryption of message bodies, for brokers shared with parties you do not trust.

With ``encryption_keys`` set, every body is sealed with Fernet (AES-128-CBC with an
HMAC-SHA256, from the ``cryptography`` package: ``pip install channels_rabbitmq[encryption]``).
The first key encrypts; every key is tried to decrypt, so keys can be rotated: add the
new key in front, deploy everywhere, then drop the old one. A body no key opens is
logged and dropped like any other undecodable message.
"""

from __future__ import annotations

from .wire import MalformedMessage


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

    def seal(self, body: bytes) -> bytes:
        return self._fernet.encrypt(body)

    def open(self, token: bytes) -> bytes:
        try:
            return self._fernet.decrypt(token)
        except self._invalid_token:
            raise MalformedMessage("body could not be decrypted with any of encryption_keys") from None
