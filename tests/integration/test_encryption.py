"""Optional encryption of message bodies, against the real broker."""

from __future__ import annotations

import asyncio
import logging

import pytest

from channels_rabbitmq.encryption import generate_key
from tests.conftest import Broker, LayerFactory

pytestmark = pytest.mark.usefixtures("loop_kind")  # each async test on asyncio's loop and on uvloop


async def test_encrypted_messages_round_trip_and_are_opaque_on_the_wire(
    make_layer: LayerFactory, broker: Broker
) -> None:
    key = generate_key()
    sender, receiver = make_layer(encryption_keys=[key]), make_layer(encryption_keys=[key])
    channel = await receiver.new_channel()
    await receiver.group_add("secret", channel)
    await sender.send(channel, {"type": "m", "text": "attack at dawn", "raw": b"\x00\x01"})
    await sender.group_send("secret", {"type": "g", "text": "attack at dawn"})
    assert await asyncio.wait_for(receiver.receive(channel), 5) == {
        "type": "m",
        "text": "attack at dawn",
        "raw": b"\x00\x01",
    }
    assert await asyncio.wait_for(receiver.receive(channel), 5) == {"type": "g", "text": "attack at dawn"}


async def test_keys_rotate_first_encrypts_any_decrypts(make_layer: LayerFactory) -> None:
    old, new = generate_key(), generate_key()
    sender_on_old_key = make_layer(encryption_keys=[old])
    receiver_knowing_both = make_layer(encryption_keys=[new, old])
    channel = await receiver_knowing_both.new_channel()
    await sender_on_old_key.send(channel, {"type": "old"})
    assert await asyncio.wait_for(receiver_knowing_both.receive(channel), 5) == {"type": "old"}


async def test_a_wrong_key_is_a_logged_drop_not_a_crash(
    make_layer: LayerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    key = generate_key()
    receiver = make_layer(encryption_keys=[key])
    stranger = make_layer(encryption_keys=[generate_key()])
    friend = make_layer(encryption_keys=[key])
    plain = make_layer()
    channel = await receiver.new_channel()
    with caplog.at_level(logging.WARNING, logger="channels_rabbitmq"):
        await stranger.send(channel, {"type": "wrong key"})
        await plain.send(channel, {"type": "not encrypted"})
        await friend.send(channel, {"type": "right key"})
        assert await asyncio.wait_for(receiver.receive(channel), 5) == {"type": "right key"}
    assert any("decrypt" in record.getMessage() for record in caplog.records)


def test_encryption_keys_are_checked_at_construction() -> None:
    from channels_rabbitmq.core import RabbitmqChannelLayer

    with pytest.raises(ValueError, match="encryption_keys"):
        RabbitmqChannelLayer(encryption_keys=["not a key"])
    with pytest.raises(ValueError, match="encryption_keys"):
        RabbitmqChannelLayer(encryption_keys=[])
    with pytest.raises(TypeError, match="encryption_keys"):
        RabbitmqChannelLayer(encryption_keys=generate_key())  # type: ignore[arg-type]
    key = generate_key()
    layer = RabbitmqChannelLayer(encryption_keys=[key])
    assert key not in repr(layer.config)
