"""Where :func:`generate_key` is documented (``channels_rabbitmq.encryption.generate_key()``): the
cipher itself is :mod:`.wire.encryption`, beside the rest of what a body is on the wire."""

from .wire.encryption import generate_key

__all__ = ["generate_key"]
