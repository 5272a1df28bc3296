"""Names that users control (a room from a URL): each is refused at the call or works end to end.

Channels' own check counts characters and lets ``\\d`` match any Unicode digit, so ``"chat_"``
and 94 fullwidth zeros passes it at 99 characters but is 287 bytes in UTF-8, more than an AMQP
routing key holds. Such a name must raise ``TypeError`` at the call, record nothing, and
cost no other call: before the fix, the bind stuck at the head of the connection's requests,
the connection was dropped after ``connect_timeout``, and every reconnection died again.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import pytest
from channels.layers import BaseChannelLayer
from pamqp import commands

from channels_rabbitmq.amqp.errors import RequestNotEncodable
from channels_rabbitmq.names import MAX_NAME_BYTES
from tests.conftest import Broker, LayerFactory, amqp_client, link_of

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.usefixtures("loop_kind"),
    pytest.mark.no_unretrieved_errors,
]

RECEIVE_TIMEOUT = 10.0
FULLWIDTH_ZERO = "\uff10"  # fullwidth zero: a Unicode digit, 3 bytes in UTF-8
ARABIC_THREE = "\u0663"  # Arabic-Indic three: a Unicode digit, 2 bytes in UTF-8
HOSTILE_ROOM = "chat_" + FULLWIDTH_ZERO * 94  # 99 characters, 287 bytes

# Group names a URL may carry: (name, accepted by this layer).
GROUP_NAMES = [
    pytest.param(HOSTILE_ROOM, False, id="99-characters-287-bytes"),
    pytest.param(FULLWIDTH_ZERO * 85, True, id="255-bytes"),
    pytest.param(FULLWIDTH_ZERO * 85 + "0", False, id="256-bytes"),
    pytest.param("room_" + ARABIC_THREE * 94, True, id="99-characters-193-bytes"),
    pytest.param("room\n", False, id="trailing-newline"),
    pytest.param("cafe\u0301", False, id="combining-character"),
    pytest.param("r" * 100, False, id="100-characters"),
    pytest.param("r" * 99, True, id="99-ascii-characters"),
]


async def test_a_group_name_over_255_bytes_raises_type_error_and_the_process_goes_on_receiving(
    make_layer: LayerFactory,
) -> None:
    layer = make_layer(connect_timeout=2.0)
    channel = await layer.new_channel()
    assert BaseChannelLayer().require_valid_group_name(HOSTILE_ROOM)  # Channels' own check lets it by
    for call in (layer.group_add(HOSTILE_ROOM, channel), layer.group_discard(HOSTILE_ROOM, channel)):
        with pytest.raises(TypeError, match=f"at most {MAX_NAME_BYTES}"):
            await call
    with pytest.raises(TypeError, match=f"at most {MAX_NAME_BYTES}"):
        await layer.group_send(HOSTILE_ROOM, {"type": "chat"})
    assert not link_of(layer).router.has_members(HOSTILE_ROOM)  # nothing was recorded

    # Every other call goes on, on the same connection, past connect_timeout.
    consuming = link_of(layer).consuming.connection
    await layer.group_add("chat_ok", channel)
    await layer.group_send("chat_ok", {"type": "chat", "n": 1})
    assert await asyncio.wait_for(layer.receive(channel), RECEIVE_TIMEOUT) == {"type": "chat", "n": 1}
    await layer.send(channel, {"type": "direct"})
    assert await asyncio.wait_for(layer.receive(channel), RECEIVE_TIMEOUT) == {"type": "direct"}
    assert link_of(layer).consuming.connection is consuming
    stats = layer.stats()
    assert stats.state == "up"
    assert stats.reconnections == 0


@pytest.mark.parametrize(("group", "accepted"), GROUP_NAMES)
async def test_each_group_name_from_a_url_is_refused_at_the_call_or_works_end_to_end(
    make_layer: LayerFactory, group: str, accepted: bool
) -> None:
    layer = make_layer()
    channel = await layer.new_channel()
    if not accepted:
        with pytest.raises(TypeError):
            await layer.group_add(group, channel)
        with pytest.raises(TypeError):
            await layer.group_send(group, {"type": "chat"})
        assert not link_of(layer).router.has_members(group)
        return
    await layer.group_add(group, channel)
    await layer.group_send(group, {"type": "chat", "group": group})
    assert await asyncio.wait_for(layer.receive(channel), RECEIVE_TIMEOUT) == {"type": "chat", "group": group}


@pytest.mark.parametrize(
    ("name", "accepted"),
    [
        pytest.param("j" * 99, True, id="99-ascii-characters"),
        pytest.param("jobs\n", False, id="trailing-newline"),
        pytest.param("jobs_" + ARABIC_THREE * 3, False, id="unicode-digits-in-a-queue-name"),
        pytest.param("jobs_" + FULLWIDTH_ZERO * 94, False, id="99-characters-287-bytes"),
    ],
)
async def test_a_normal_channel_name_must_be_an_ascii_queue_name(
    make_layer: LayerFactory, name: str, accepted: bool
) -> None:
    layer = make_layer()
    assert layer.config.normal_channel_prefix == "channels.normal."  # 16 bytes
    if not accepted:
        with pytest.raises(TypeError):
            await layer.send(name, {"type": "job"})
        with pytest.raises(TypeError):
            await layer.receive(name)
        return
    await layer.send(name, {"type": "job"})
    assert await asyncio.wait_for(layer.receive(name), RECEIVE_TIMEOUT) == {"type": "job"}


async def test_a_process_channel_name_over_255_bytes_raises_type_error(make_layer: LayerFactory) -> None:
    layer = make_layer()
    channel = await layer.new_channel()
    hostile = FULLWIDTH_ZERO * 90 + "!x"
    with pytest.raises(TypeError, match=f"at most {MAX_NAME_BYTES}"):
        await layer.send(hostile, {"type": "x"})
    with pytest.raises(TypeError):
        await layer.send(channel + "\n", {"type": "x"})
    with pytest.raises(TypeError):
        await layer.group_add("room", hostile)
    await layer.send(channel, {"type": "still"})
    assert await asyncio.wait_for(layer.receive(channel), RECEIVE_TIMEOUT) == {"type": "still"}


async def test_a_request_that_cannot_be_encoded_fails_alone_and_the_next_one_is_answered(
    broker: Broker,
) -> None:
    """The AMQP client itself: an unencodable request never blocks its channel nor the connection."""
    lost: list[object] = []
    port = urlsplit(broker.url).port or 5672
    connection = await amqp_client(port, broker.vhost, on_lost=lambda _connection, error: lost.append(error))
    try:
        await connection.open_channel(3, [])
        declared = connection.call(3, commands.Queue.Declare(queue="", exclusive=True))
        bad = connection.call(
            3, commands.Queue.Bind(queue="q", exchange="amq.direct", routing_key=HOSTILE_ROOM)
        )
        after = connection.call(3, commands.Queue.Declare(queue="", exclusive=True))
        queue = (await asyncio.wait_for(declared, RECEIVE_TIMEOUT)).queue
        with pytest.raises(RequestNotEncodable) as raised:
            await bad
        assert raised.value.request == "Queue.Bind"
        assert isinstance(raised.value, ValueError)
        assert (await asyncio.wait_for(after, RECEIVE_TIMEOUT)).queue != queue
        bind = commands.Queue.Bind(queue=queue, exchange="amq.direct", routing_key="fine")
        await asyncio.wait_for(connection.call(3, bind), RECEIVE_TIMEOUT)
        assert connection.is_open
        assert not lost
    finally:
        await connection.close()
