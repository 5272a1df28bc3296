"""The reconnect notice without a broker: its CONFIG key, and which channels count as alive."""

from __future__ import annotations

import asyncio

import pytest

from channels_rabbitmq.config import LayerConfig
from channels_rabbitmq.routing import LocalRouter


def test_the_notice_is_off_by_default():
    assert LayerConfig.DEFAULTS["reconnect_notice_type"] is None
    assert LayerConfig.build().reconnect_notice_type is None


def test_a_message_type_turns_it_on():
    config = LayerConfig.build(reconnect_notice_type="channel_layer.reconnected")
    assert config.reconnect_notice_type == "channel_layer.reconnected"


@pytest.mark.parametrize(
    ("value", "error"),
    [(True, TypeError), (1, TypeError), (b"x", TypeError), ("", ValueError), ("_private", ValueError)],
)
def test_a_value_that_is_no_message_type_is_refused_naming_the_key(value, error):
    with pytest.raises(error, match="reconnect_notice_type"):
        LayerConfig.build(reconnect_notice_type=value)


async def test_channels_alive_are_those_with_an_inbox_a_waiter_or_a_membership():
    router = LocalRouter(capacity=10, expiry=60, group_expiry=None)
    router.deliver("q!buffered", {"type": "m"}, 0)
    waiter: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
    router.add_waiter("q!waiting", waiter)
    router.add_membership("room", "q!member", 0)
    router.add_membership("room", "q!buffered", 0)
    router.add_membership("other", "q!member", 0)
    router.deliver("q!read", {"type": "m"}, 0)
    router.take("q!read", 1)  # read: its inbox is gone, nothing is known of it
    assert router.channels() == {"q!buffered", "q!waiting", "q!member"}
    router.discard_group("room")
    router.discard_group("other")
    router.remove_waiter("q!waiting", waiter)
    assert router.channels() == {"q!buffered"}
