"""The wire format of control messages (group calls for another process's channel, flush()): no broker."""

from __future__ import annotations

import pytest
from channels.layers import BaseChannelLayer

from channels_rabbitmq.amqp import frames
from channels_rabbitmq.wire import (
    CHANNEL_HEADER,
    CONTROL_HEADER,
    FLUSH_ROUTING_KEY,
    control_destination,
    control_properties,
)

layer = BaseChannelLayer()


@pytest.mark.parametrize("operation", ["group_add", "group_discard", "flush", "reply"])
def test_control_properties_are_one_string_header_naming_the_operation(operation: str) -> None:
    headers = frames.decode_headers(memoryview(control_properties(operation)))
    assert headers == {CONTROL_HEADER: operation}
    assert CHANNEL_HEADER not in headers  # never taken for a channel's message


def test_no_group_can_have_the_flush_routing_key() -> None:
    with pytest.raises(TypeError):
        layer.require_valid_group_name(FLUSH_ROUTING_KEY)


@pytest.mark.parametrize(
    ("operation", "routing_key"),
    [("group_add", "channels.AbCdEf012345"), ("flush", FLUSH_ROUTING_KEY), ("reply", "channels.x")],
)
def test_a_control_body_is_sealed_for_what_no_channel_or_group_is_named(
    operation: str, routing_key: str
) -> None:
    destination = control_destination(operation, routing_key)
    with pytest.raises(TypeError):
        layer.require_valid_channel_name(destination)
    with pytest.raises(TypeError):
        layer.require_valid_group_name(destination)
