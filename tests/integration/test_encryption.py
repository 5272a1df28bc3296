"""Optional encryption of message bodies, against the real broker."""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
import time

import msgpack
import pytest

from channels_rabbitmq.stats import DROPPED_UNDECODABLE
from channels_rabbitmq.wire import (
    FLUSH_ROUTING_KEY,
    NO_PROPERTIES,
    channel_properties,
    control_destination,
    control_properties,
)
from channels_rabbitmq.wire.encryption import (
    CLOCK_SKEW_ALLOWANCE,
    FUTURE_STAMP_LIMIT,
    acceptance_span,
    generate_key,
)
from tests.conftest import Broker, LayerFactory, eventually, link_of

GROUPS = b"groups"  # the default groups exchange

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


# Each sealed body is bound to its destination and to its age ---------------------------------------


async def test_a_body_sealed_for_one_channel_and_republished_to_another_channel_or_group_is_dropped(
    make_layer: LayerFactory,
) -> None:
    key = generate_key()
    sender, receiver = make_layer(encryption_keys=[key]), make_layer(encryption_keys=[key])
    target, other = await receiver.new_channel(), await receiver.new_channel()
    await receiver.group_add("room", other)
    await receiver.group_add("lobby", other)
    link = link_of(receiver)
    queue = link.queue_name.encode()
    # The very bodies the sender publishes for `target` and for the group "room".
    for_target = sender._codec.encode({"type": "for target"}, target)
    for_room = sender._codec.encode({"type": "for room"}, "room")
    # Captured and republished elsewhere: to another channel, to a group, to another group.
    assert await link.publish(b"", queue, channel_properties(other), for_target)
    assert await link.publish(GROUPS, b"room", NO_PROPERTIES, for_target)
    assert await link.publish(GROUPS, b"lobby", NO_PROPERTIES, for_room)
    # Republished to where they were sealed for, the same raw way: delivered.
    assert await link.publish(b"", queue, channel_properties(target), for_target)
    assert await link.publish(GROUPS, b"room", NO_PROPERTIES, for_room)
    await sender.send(other, {"type": "genuine"})
    assert await asyncio.wait_for(receiver.receive(target), 5) == {"type": "for target"}
    assert await asyncio.wait_for(receiver.receive(other), 5) == {"type": "for room"}
    assert await asyncio.wait_for(receiver.receive(other), 5) == {"type": "genuine"}
    assert link.dropped == {DROPPED_UNDECODABLE: 3}


def sealed_at(key: str, destination: str, message: dict, when: float) -> bytes:
    """A body as the layer seals it (see docs/design/wire-format.md), stamped at ``when``."""
    from cryptography.fernet import Fernet

    target = destination.encode()
    plaintext = struct.pack(">H", len(target)) + target + msgpack.packb(message, use_bin_type=True)
    return Fernet(key.encode()).encrypt_at_time(plaintext, int(when))


async def test_a_body_sealed_longer_ago_than_expiry_plus_clock_skew_is_dropped(
    make_layer: LayerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    key = generate_key()
    expiry = 10
    receiver = make_layer(encryption_keys=[key], expiry=expiry)
    channel = await receiver.new_channel()
    link = link_of(receiver)
    queue, properties = link.queue_name.encode(), channel_properties(channel)
    now = time.time()
    too_old = now - expiry - CLOCK_SKEW_ALLOWANCE - 5
    recent_enough = now - expiry - CLOCK_SKEW_ALLOWANCE + 20  # a sender whose clock is behind
    from_the_future = now + 120  # beyond what Fernet allows for clock skew
    with caplog.at_level(logging.WARNING, logger="channels_rabbitmq"):
        stamps = [("old", too_old), ("future", from_the_future), ("ok", recent_enough), ("now", now)]
        for name, when in stamps:
            assert await link.publish(b"", queue, properties, sealed_at(key, channel, {"n": name}, when))
        assert await asyncio.wait_for(receiver.receive(channel), 5) == {"n": "ok"}
        assert await asyncio.wait_for(receiver.receive(channel), 5) == {"n": "now"}
    assert link.dropped == {DROPPED_UNDECODABLE: 2}
    assert any("older than expiry" in record.getMessage() for record in caplog.records)


async def test_a_sealed_body_with_a_truncated_destination_is_dropped(make_layer: LayerFactory) -> None:
    from cryptography.fernet import Fernet

    key = generate_key()
    receiver = make_layer(encryption_keys=[key])
    channel = await receiver.new_channel()
    link = link_of(receiver)
    queue, properties = link.queue_name.encode(), channel_properties(channel)
    for plaintext in (b"", b"\x00", b"\xff\xff" + channel.encode() + msgpack.packb({"n": 1})):
        assert await link.publish(b"", queue, properties, Fernet(key.encode()).encrypt(plaintext))
    await receiver.send(channel, {"n": "after"})
    assert await asyncio.wait_for(receiver.receive(channel), 5) == {"n": "after"}
    assert link.dropped == {DROPPED_UNDECODABLE: 3}


async def test_a_sealed_flush_captured_before_a_process_started_is_not_replayed_to_it(
    make_layer: LayerFactory,
) -> None:
    """Each process remembers the request ids it performed; one that started later never saw the
    original. A control request sealed before the receiving link started (a minute allowed for a
    sender whose clock is behind) cannot have been for it: it is dropped as a replay."""
    key = generate_key()
    receiver, sender = make_layer(encryption_keys=[key]), make_layer(encryption_keys=[key])
    channel = await receiver.new_channel()
    await sender.new_channel()
    link = link_of(receiver)
    started = time.time()  # the receiver's link started just before
    destination = control_destination("flush", FLUSH_ROUTING_KEY)
    exchange = receiver.config.groups_exchange.encode()
    publish = link_of(sender).publish

    async def flush_stamped(when: float) -> None:
        fields = {"id": secrets.token_hex(8), "reply_to": link_of(sender).queue_name}
        body = sealed_at(key, destination, fields, when)
        assert await publish(exchange, FLUSH_ROUTING_KEY.encode(), control_properties("flush"), body)

    await sender.send(channel, {"type": "kept"})
    await asyncio.wait_for(eventually(lambda: link.router.held == 1, "the message buffered"), 10)
    # Captured 90 s before this process started (Fernet alone would still open it: expiry + 60 s).
    await flush_stamped(started - CLOCK_SKEW_ALLOWANCE - 30)
    await asyncio.wait_for(eventually(lambda: link.dropped[DROPPED_UNDECODABLE] == 1, "the drop"), 10)
    assert link.router.held == 1  # not flushed
    # A sender whose clock is 30 s behind: its fresh request is performed.
    await flush_stamped(time.time() - 30)
    await asyncio.wait_for(eventually(lambda: link.router.held == 0, "the flush"), 10)


def test_a_request_id_is_remembered_as_long_as_its_sealed_body_opens() -> None:
    """The replay memory against Fernet's own rules: a body stamped as far ahead of the receiver's
    clock as Fernet allows still opens acceptance_span() after its arrival, and no later."""
    from cryptography.fernet import Fernet, InvalidToken

    expiry = 60
    key = Fernet.generate_key()
    arrival = 1_000_000.0
    token = Fernet(key).encrypt_at_time(b"x", int(arrival + FUTURE_STAMP_LIMIT))
    ttl = expiry + CLOCK_SKEW_ALLOWANCE  # what BodyCipher.open allows
    span = acceptance_span(expiry)
    assert Fernet(key).decrypt_at_time(token, ttl, int(arrival + span)) == b"x"
    with pytest.raises(InvalidToken):
        Fernet(key).decrypt_at_time(token, ttl, int(arrival + span + 1))
