"""``group_expiry=None`` against the real broker: memberships stay while housekeeping runs."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import Broker, LayerFactory, link_of

pytestmark = pytest.mark.usefixtures("loop_kind")  # each test on asyncio's loop and on uvloop


async def test_memberships_stay_bound_while_messages_expire_around_them(
    make_layer: LayerFactory, broker: Broker
) -> None:
    # expiry=0.2: housekeeping runs every 0.05 s, expiring messages all along.
    sender, receiver = make_layer(), make_layer(expiry=0.2, group_expiry=None)
    member, unread = await receiver.new_channel(), await receiver.new_channel()
    await receiver.group_add("forever", member)
    await sender.send(unread, {"type": "expires"})
    await asyncio.sleep(1.5)
    link = link_of(receiver)
    assert link.dropped["expired"] == 1  # housekeeping ran
    assert (link.queue_name, "forever") in await asyncio.to_thread(broker.bindings)
    await sender.group_send("forever", {"type": "still.a.member"})
    assert await asyncio.wait_for(receiver.receive(member), 5) == {"type": "still.a.member"}
    await receiver.group_discard("forever", member)  # and it can still leave
    assert (link.queue_name, "forever") not in await asyncio.to_thread(broker.bindings)
