"""``group_expiry=None``: memberships never expire, and nothing about them is timed."""

from __future__ import annotations

import asyncio

import pytest

from channels_rabbitmq.config import LayerConfig
from channels_rabbitmq.core import RabbitmqChannelLayer
from channels_rabbitmq.link import BrokerLink
from channels_rabbitmq.routing import LocalRouter
from channels_rabbitmq.wire.codec import MessageCodec

FAR_FUTURE = 10.0**12  # about 30,000 years of monotonic clock


def test_the_config_accepts_none_and_keeps_the_default_of_a_day():
    assert LayerConfig.build(group_expiry=None).group_expiry is None
    assert LayerConfig.build().group_expiry == 86400.0
    assert RabbitmqChannelLayer(group_expiry=None).group_expiry is None  # Channels' attribute too


@pytest.mark.parametrize(("value", "error"), [("never", TypeError), (False, TypeError), (0, ValueError)])
def test_other_values_are_still_refused_naming_the_key(value, error):
    with pytest.raises(error, match="group_expiry"):
        LayerConfig.build(group_expiry=value)


def test_a_membership_without_expiry_survives_any_time_and_keeps_receiving():
    router = LocalRouter(capacity=10, expiry=1, group_expiry=None)
    assert router.add_membership("room", "q!a", 0)
    assert router.expire_memberships(FAR_FUTURE) == []
    assert router.expire_messages(FAR_FUTURE) == 0
    assert router.deliver_to_group("room", {"type": "m"}, b"", FAR_FUTURE) == 1
    assert router.take("q!a", FAR_FUTURE) == {"type": "m"}


def test_without_expiry_nothing_about_memberships_is_timed():
    router = LocalRouter(capacity=10, expiry=1, group_expiry=None)
    for number in range(1000):
        router.add_membership(f"group-{number % 10}", f"q!{number}", float(number))
    assert len(router._membership_expiry) == 0
    assert router.discard_membership("group-0", "q!0") is False  # other members are left
    assert router.discard_group("group-1") == sorted(f"q!{n}" for n in range(1, 1000, 10))
    router.flush()
    assert list(router.groups) == []


def test_with_an_expiry_the_same_memberships_expire():
    """The counterpart: what ``None`` turns off."""
    router = LocalRouter(capacity=10, expiry=1, group_expiry=5)
    router.add_membership("room", "q!a", 0)
    assert router.expire_memberships(FAR_FUTURE) == ["room"]


@pytest.mark.parametrize(
    ("expiry", "group_expiry", "interval"),
    [(60, None, 1.0), (2, None, 0.5), (60, 2, 0.5), (60, 86400, 1.0)],
)
async def test_housekeeping_runs_as_often_as_expiry_needs_without_group_expiry(
    expiry, group_expiry, interval
):
    config = LayerConfig.build(expiry=expiry, group_expiry=group_expiry)
    loop = asyncio.get_running_loop()
    link = BrokerLink(config, loop, MessageCodec(config))
    link.inbound.start_housekeeping()
    try:
        handle = link.inbound._housekeeping
        assert handle is not None
        assert handle.when() - loop.time() == pytest.approx(interval, abs=0.05)
    finally:
        link.inbound.stop_housekeeping()
