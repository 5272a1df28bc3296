"""Group calls for another process's channel, and flush() across processes, against the real broker.

Two layer instances are two processes' worth: each has its own exclusive queue and
connections. One test runs a real second OS process. Each test uses a groups exchange of
its own, so that the roll call (how many links a flush() waits for) counts this test's links.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import msgpack
import pytest
from asgiref.sync import async_to_sync
from channels.exceptions import ChannelFull

from channels_rabbitmq.amqp.channels import PublishOutcome
from channels_rabbitmq.core import RabbitmqChannelLayer
from channels_rabbitmq.encryption import generate_key  # where users find it
from channels_rabbitmq.exceptions import BrokerRefusedError, BrokerTimeoutError, ReplyCode
from channels_rabbitmq.link.channel_plan import PUBLISH_CHANNEL
from channels_rabbitmq.stats import DROPPED_UNDECODABLE
from channels_rabbitmq.wire import FLUSH_ROUTING_KEY, control_properties
from testbed.faults.proxy import FaultProxy
from tests.conftest import TIMERS_EARLY, Broker, LayerFactory, eventually, link_of, rabbitmqctl

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("loop_kind")]  # on asyncio and uvloop


@pytest.fixture
def exchange() -> str:
    return f"groups.{secrets.token_hex(4)}"


@pytest.fixture
def layers(make_layer: LayerFactory, exchange: str) -> LayerFactory:
    """Layers on this test's own groups exchange."""

    def make(**config: Any) -> RabbitmqChannelLayer:
        return make_layer(groups_exchange=exchange, **config)

    return make


@pytest.fixture
async def proxy(broker: Broker) -> AsyncIterator[FaultProxy]:
    address = urlsplit(broker.url)
    async with FaultProxy(address.hostname or "127.0.0.1", address.port or 5672) as proxy:
        yield proxy
        proxy.resume()


async def receive(layer: RabbitmqChannelLayer, channel: str, timeout: float = 5) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), timeout)


async def assert_nothing_arrives(layer: RabbitmqChannelLayer, channel: str, wait: float = 0.3) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(channel), wait)


def bound_groups(broker: Broker, exchange: str, queue: str, control: bool = False) -> set[str]:
    return {key for name, key in broker.bindings(exchange, control=control) if name == queue}


def is_msgpack_map(body: bytes) -> bool:
    try:
        return isinstance(msgpack.unpackb(body), dict)
    except Exception:
        return False


# group_add() and group_discard() for another process's channel --------------------------------------


async def test_group_add_from_another_layer_binds_the_owner_and_a_group_send_from_a_third_reaches_it(
    layers: LayerFactory, broker: Broker, exchange: str
) -> None:
    owner, requester, sender = layers(), layers(), layers()
    channel = await owner.new_channel()
    rooms = [f"room.{number}" for number in range(10)]
    for room in rooms:
        await requester.group_add(room, channel)
        # When group_add() returns, the owner has bound (the broker said bind-ok): no wait, no retry.
        assert room in link_of(owner).topology.bound
        assert link_of(owner).router.has_members(room)
    assert bound_groups(broker, exchange, link_of(owner).queue_name) == set(rooms)
    for room in rooms:
        await sender.group_send(room, {"type": "hello", "room": room})
    for room in rooms:
        assert await receive(owner, channel) == {"type": "hello", "room": room}


async def test_group_discard_from_another_layer_unbinds_the_owner(
    layers: LayerFactory, broker: Broker, exchange: str
) -> None:
    owner, requester, sender = layers(), layers(), layers()
    stays, leaves = await owner.new_channel(), await owner.new_channel()
    await owner.group_add("room", stays)
    await requester.group_add("room", leaves)
    await requester.group_discard("room", leaves)
    await sender.group_send("room", {"type": "after"})
    assert await receive(owner, stays) == {"type": "after"}
    await assert_nothing_arrives(owner, leaves)
    await requester.group_discard("room", stays)
    assert "room" not in link_of(owner).topology.bound  # unbound before the answer
    assert "room" not in bound_groups(broker, exchange, link_of(owner).queue_name)
    await requester.group_discard("never-joined", stays)  # not a member: no error


async def test_group_calls_for_a_channel_whose_process_is_gone_return_at_once_without_error(
    layers: LayerFactory,
) -> None:
    owner, requester = layers(), layers(connect_timeout=5)
    channel = await owner.new_channel()
    await requester.group_add("warm", channel)  # the requester is connected: time only the calls
    await owner.close()  # its queue goes with its connection
    started = time.monotonic()
    await requester.group_add("room", channel)
    await requester.group_discard("room", channel)
    elapsed = time.monotonic() - started
    print(f"group_add + group_discard for a gone process's channel: {elapsed * 1000:.1f} ms")
    assert elapsed < 3  # not connect_timeout (5 s): RabbitMQ returned the requests at once


async def test_group_add_for_a_stuck_owner_raises_broker_timeout_error_within_connect_timeout(
    proxy: FaultProxy, layers: LayerFactory, broker: Broker, exchange: str
) -> None:
    owner = layers(host=proxy.url(broker.url))
    requester = layers(connect_timeout=1)
    channel = await owner.new_channel()
    await requester.group_add("warm", channel)
    proxy.stall()  # the owner's connections hear nothing, yet its queue stays
    started = time.monotonic()
    with pytest.raises(BrokerTimeoutError) as raised:
        await requester.group_add("room", channel)
    elapsed = time.monotonic() - started
    print(f"stuck owner: BrokerTimeoutError after {elapsed:.2f}s (connect_timeout=1)")
    assert raised.value.operation == "group_add"
    assert raised.value.timeout == 1
    assert 1 - TIMERS_EARLY <= elapsed < 4  # connect_timeout=1; uvloop fires timers up to 0.5 ms early
    # As documented, the call may still be made: the owner does it once it reads the request.
    proxy.resume()
    queue = link_of(owner).queue_name
    await eventually(lambda: link_of(owner).router.has_members("room"), "the late group_add")
    await eventually(lambda: "room" in bound_groups(broker, exchange, queue), "the late binding")


async def send_or_error(sender: RabbitmqChannelLayer, channel: str, number: int) -> Exception | None:
    try:
        await sender.send(channel, {"type": "fill", "n": number})
    except ChannelFull as error:
        return error
    return None


async def test_group_add_for_an_overwhelmed_owner_raises_channel_full(layers: LayerFactory) -> None:
    # The owner holds local_capacity messages, stops acknowledging, and its queue fills up.
    owner, sender = layers(local_capacity=1, prefetch_count=1, remote_capacity=1, capacity=10), layers()
    requester = layers(connect_timeout=2)
    channel = await owner.new_channel()
    outcomes = [await send_or_error(sender, channel, number) for number in range(10)]
    assert isinstance(outcomes[-1], ChannelFull), outcomes
    started = time.monotonic()
    with pytest.raises(ChannelFull):
        await requester.group_add("room", channel)
    assert time.monotonic() - started < 1  # refused at once, not timed out


@pytest.fixture
def reader_of_queues_only(broker: Broker) -> Iterator[str]:
    """The URL of a user who may not read the groups exchange, so binds to it are refused."""
    name, password = f"channels_rabbitmq_remote_{secrets.token_hex(3)}", secrets.token_hex(8)
    rabbitmqctl("add_user", name, password)
    rabbitmqctl("set_permissions", "-p", broker.vhost, name, ".*", ".*", r"^channels\..*$")
    try:
        yield broker.url_for(username=name, password=password)
    finally:
        rabbitmqctl("delete_user", name)


async def test_a_bind_refused_to_the_owner_raises_broker_refused_error_for_the_requester(
    layers: LayerFactory, reader_of_queues_only: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="channels_rabbitmq"):
        owner = layers(host=reader_of_queues_only)
        channel = await owner.new_channel()  # connects: without hearing flush(), which it says
    assert [record.name for record in caplog.records] == ["channels_rabbitmq.link.topology"]
    requester = layers()
    with pytest.raises(BrokerRefusedError) as raised:
        await requester.group_add("room", channel)
    assert raised.value.reply_code == ReplyCode.ACCESS_REFUSED
    assert raised.value.request == "Queue.Bind"
    assert not link_of(owner).router.has_members("room")  # a refused bind leaves no member


async def test_group_add_from_sync_code_goes_through_the_io_threads_link(layers: LayerFactory) -> None:
    owner, requester = layers(), layers()
    channel = await owner.new_channel()
    await asyncio.to_thread(async_to_sync(requester.group_add), "room", channel)
    await asyncio.to_thread(async_to_sync(requester.group_send), "room", {"type": "from.sync"})
    assert await receive(owner, channel) == {"type": "from.sync"}


# A real second OS process ------------------------------------------------------------------------------

CHILD = """
import asyncio, sys
from channels_rabbitmq.core import RabbitmqChannelLayer

async def main():
    layer = RabbitmqChannelLayer(host=sys.argv[1], groups_exchange=sys.argv[2])
    channel = await layer.new_channel()
    print(channel, flush=True)
    while True:
        message = await asyncio.wait_for(layer.receive(channel), 30)
        print(message["type"], flush=True)
        if message["type"] == "stop":
            break
    await layer.close()

asyncio.run(main())
"""


async def test_group_calls_reach_a_channel_of_another_os_process(
    layers: LayerFactory, broker: Broker, exchange: str
) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, broker.url, exchange, stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None

    async def line() -> str:
        return (await asyncio.wait_for(child.stdout.readline(), 20)).decode().strip()  # type: ignore[union-attr]

    try:
        channel = await line()
        requester = layers()
        await requester.group_add("room", channel)
        await requester.group_send("room", {"type": "hello"})
        assert await line() == "hello"
        await requester.group_discard("room", channel)
        await requester.group_send("room", {"type": "after.discard"})
        await requester.send(channel, {"type": "stop"})  # after the group message, on the same queue
        assert await line() == "stop"
        assert await asyncio.wait_for(child.wait(), 20) == 0
        started = time.monotonic()
        await requester.group_add("room", channel)  # its process has ended
        assert time.monotonic() - started < 5  # not connect_timeout
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


# Encryption ------------------------------------------------------------------------------------------


async def test_with_encryption_control_messages_are_sealed_and_a_replay_is_dropped(
    layers: LayerFactory, broker: Broker, exchange: str
) -> None:
    key = generate_key()
    owner, requester = layers(encryption_keys=[key]), layers(encryption_keys=[key])
    channel = await owner.new_channel()
    await requester.new_channel()  # the requester's own link on this loop, which the test watches
    publisher = link_of(requester).publishing.connection
    assert publisher is not None
    sent: list[tuple[bytes, bytes, bytes]] = []
    publish_mandatory = publisher.publish_mandatory

    def spy(channel_id: int, exchange: bytes, routing_key: bytes, properties: bytes, body: bytes) -> Any:
        sent.append((routing_key, properties, body))
        return publish_mandatory(channel_id, exchange, routing_key, properties, body)

    publisher.publish_mandatory = spy  # type: ignore[method-assign]
    await requester.group_add("secret", channel)
    [(routing_key, properties, body)] = sent
    assert routing_key == link_of(owner).queue_name.encode()
    assert b"secret" not in body
    assert channel.encode() not in body
    assert not is_msgpack_map(body)  # a Fernet token
    # Replayed by someone who captured it, after the membership ended: dropped, nothing bound.
    await requester.group_discard("secret", channel)
    dropped = link_of(owner).dropped[DROPPED_UNDECODABLE]
    await publisher.publish(PUBLISH_CHANNEL, b"", routing_key, properties, body)
    await eventually(lambda: link_of(owner).dropped[DROPPED_UNDECODABLE] == dropped + 1, "the replay dropped")
    assert not link_of(owner).router.has_members("secret")
    assert "secret" not in bound_groups(broker, exchange, link_of(owner).queue_name)


async def test_without_the_keys_a_group_add_is_dropped_and_times_out(
    layers: LayerFactory, broker: Broker, exchange: str
) -> None:
    owner = layers(encryption_keys=[generate_key()])
    stranger = layers(connect_timeout=1)
    channel = await owner.new_channel()
    dropped = link_of(owner).dropped[DROPPED_UNDECODABLE]
    with pytest.raises(BrokerTimeoutError):
        await stranger.group_add("intruders", channel)
    assert link_of(owner).dropped[DROPPED_UNDECODABLE] == dropped + 1
    assert not link_of(owner).router.has_members("intruders")
    assert "intruders" not in bound_groups(broker, exchange, link_of(owner).queue_name)


async def test_a_forged_control_message_is_dropped_and_the_link_goes_on(layers: LayerFactory) -> None:
    owner, forger = layers(), layers()
    channel = await owner.new_channel()
    await forger.new_channel()
    publisher = link_of(forger).publishing.connection
    assert publisher is not None
    queue = link_of(owner).queue_name.encode()
    forged = [
        (control_properties("group_add"), b"\xc1 not msgpack"),
        (control_properties("group_add"), msgpack.packb({"id": "x", "reply_to": "q", "group": "g"})),
        (
            control_properties("group_add"),
            msgpack.packb({"id": "y", "reply_to": "q", "group": "g", "channel": "other!x"}),
        ),
        (control_properties("shutdown"), msgpack.packb({"id": "z", "reply_to": "q"})),
    ]
    dropped = link_of(owner).dropped[DROPPED_UNDECODABLE]
    for properties, body in forged:
        await publisher.publish(PUBLISH_CHANNEL, b"", queue, properties, body)
    await eventually(
        lambda: link_of(owner).dropped[DROPPED_UNDECODABLE] == dropped + len(forged), "the drops"
    )
    assert list(link_of(owner).router.groups) == []
    await forger.send(channel, {"type": "still.works"})
    assert await receive(owner, channel) == {"type": "still.works"}


# flush() across processes ----------------------------------------------------------------------------


async def test_flush_from_one_layer_empties_another_layers_buffers_memberships_and_bindings(
    layers: LayerFactory, broker: Broker, exchange: str
) -> None:
    reader, sender, flusher = layers(), layers(), layers()
    channel = await reader.new_channel()
    await reader.group_add("room", channel)
    for number in range(3):
        await sender.send(channel, {"type": "before", "n": number})
    link = link_of(reader)
    await eventually(lambda: link.router.held == 3, "the messages buffered")
    await flusher.flush()
    # flush() returned: the other process has flushed already (it answered), unbinding included.
    assert link.router.held == 0
    assert not link.router.has_members("room")
    assert link.topology.bound == frozenset()
    assert bound_groups(broker, exchange, link.queue_name) == set()
    assert bound_groups(broker, exchange, link.queue_name, control=True) == {FLUSH_ROUTING_KEY}
    # What was delivered is acknowledged within ACK_DELAY: then the queue holds nothing at all.
    await eventually(lambda: link.inbound.unacknowledged == 0, "the deliveries acknowledged")
    assert broker.queue(link.queue_name)["messages"] == 0
    await sender.group_send("room", {"type": "group.after"})
    await sender.send(channel, {"type": "after"})
    assert await receive(reader, channel) == {"type": "after"}


async def test_flush_waits_for_every_link_of_the_roll_call(layers: LayerFactory) -> None:
    readers = [layers() for _ in range(3)]
    channels = [await reader.new_channel() for reader in readers]
    flusher = layers()
    for reader, channel in zip(readers, channels, strict=True):
        await reader.group_add("room", channel)
    await flusher.new_channel()
    assert await link_of(flusher).count_links() == 4
    await flusher.flush()
    assert not any(link_of(reader).router.has_members("room") for reader in readers)
    assert all(link_of(reader).topology.bound == frozenset() for reader in readers)
    await readers[0].close()
    await flusher.flush()  # one fewer to wait for
    assert await link_of(flusher).count_links() == 3


async def test_flush_hears_a_link_that_joined_the_roll_call_after_its_request_was_routed(
    proxy: FaultProxy, layers: LayerFactory, broker: Broker
) -> None:
    """The roll call gives counts, not names. A flush() counted a link that then went away without
    answering, and meanwhile another link joined: the count stays, and the newcomer never saw the
    request, which was routed before it bound ``!flush``. It hears the copy published again."""
    leaving = layers(host=proxy.url(broker.url))
    await leaving.new_channel()
    flusher = layers(connect_timeout=10)
    await flusher.new_channel()
    assert await link_of(flusher).count_links() == 2
    proxy.stall()  # the leaving link hears nothing from now on, and answers nothing
    started = time.monotonic()
    flushing = asyncio.ensure_future(flusher.flush())
    leaving_queue = link_of(leaving).queue_name
    while (await asyncio.to_thread(broker.queue, leaving_queue))["messages"] == 0:
        assert not flushing.done()
        assert time.monotonic() - started < 10, "the flush request did not reach the leaving link's queue"
    newcomer = layers()  # joins after the request was routed
    channel = await newcomer.new_channel()
    proxy.refuse()
    proxy.cut()  # the leaving link's connections end: RabbitMQ drops its consumer of the roll call
    await flushing
    took = time.monotonic() - started
    print(f"flush() with a link that left and one that joined meanwhile: {took:.2f}s")
    assert took < 10 - TIMERS_EARLY  # before the fix: BrokerTimeoutError after connect_timeout
    assert link_of(newcomer).dropped[DROPPED_UNDECODABLE] == 0  # the copies were not taken for replays
    assert link_of(flusher).dropped[DROPPED_UNDECODABLE] == 0
    await flusher.send(channel, {"type": "after"})
    assert await receive(newcomer, channel) == {"type": "after"}


async def test_a_link_performs_a_flush_once_however_many_copies_of_it_arrive(layers: LayerFactory) -> None:
    """flush() publishes its request again while it misses replies: copies reach links that have
    performed it, maybe after the flush() returned and new messages came. They flush nothing."""
    reader, requester = layers(), layers()
    channel = await reader.new_channel()
    await requester.new_channel()
    publisher = link_of(requester).publishing.connection
    assert publisher is not None
    sent: list[tuple[int, bytes, bytes, bytes, bytes]] = []
    publish_mandatory = publisher.publish_mandatory

    def spy(channel_id: int, exchange: bytes, routing_key: bytes, properties: bytes, body: bytes) -> Any:
        sent.append((channel_id, exchange, routing_key, properties, body))
        return publish_mandatory(channel_id, exchange, routing_key, properties, body)

    publisher.publish_mandatory = spy  # type: ignore[method-assign]
    await requester.send(channel, {"type": "before"})
    await eventually(lambda: link_of(reader).router.held == 1, "the message buffered")
    await requester.flush()  # the reader answered: it has flushed
    assert link_of(reader).router.held == 0
    [flush_request] = sent
    await requester.send(channel, {"type": "kept"})
    assert await publisher.publish_mandatory(*flush_request) is PublishOutcome.ACCEPTED  # a late copy
    await requester.send(channel, {"type": "last"})
    assert await receive(reader, channel) == {"type": "kept"}
    assert await receive(reader, channel) == {"type": "last"}
    assert link_of(reader).dropped[DROPPED_UNDECODABLE] == 0


async def test_flush_with_a_stuck_process_raises_broker_timeout_error_within_connect_timeout(
    proxy: FaultProxy, layers: LayerFactory, broker: Broker
) -> None:
    stuck = layers(host=proxy.url(broker.url))
    await stuck.new_channel()
    flusher = layers(connect_timeout=1)
    await flusher.flush()
    proxy.stall()
    started = time.monotonic()
    with pytest.raises(BrokerTimeoutError) as raised:
        await flusher.flush()
    elapsed = time.monotonic() - started
    print(f"flush() with a stuck process: BrokerTimeoutError after {elapsed:.2f}s (connect_timeout=1)")
    assert raised.value.operation == "flush"
    assert 1 - TIMERS_EARLY <= elapsed < 4  # connect_timeout=1


async def test_the_roll_call_deleted_under_the_links_leaves_them_connected_and_comes_back(
    layers: LayerFactory, broker: Broker
) -> None:
    layer = layers()
    channel = await layer.new_channel()
    link = link_of(layer)
    connection = link.consuming.connection
    roll_call_connection = link.roll_call.connection
    assert await link.count_links() == 1
    # As when the node holding it fails: RabbitMQ cancels its consumers (basic.cancel). The roll
    # call's own connection is replaced, and declares the queue again; the link's are not touched.
    await asyncio.to_thread(rabbitmqctl, "delete_queue", "-p", broker.vhost, link.roll_call.queue)
    await eventually(
        lambda: link.roll_call.connection not in (None, roll_call_connection), "a new roll call connection"
    )
    assert await link.count_links() == 1
    assert link.consuming.connection is connection
    assert connection is not None
    assert connection.is_open
    assert link.consuming.reconnections == 0
    await layer.flush()
    await layer.send(channel, {"type": "still.here"})
    assert await receive(layer, channel) == {"type": "still.here"}


async def test_flush_alone_on_the_broker_returns_at_once(layers: LayerFactory) -> None:
    layer = layers()
    started = time.monotonic()
    await layer.flush()  # connects, flushes itself, hears from nobody else
    await layer.flush()
    print(f"two flush() calls with no other process: {(time.monotonic() - started) * 1000:.0f} ms")
    assert time.monotonic() - started < 5


# Control messages from another client on the vhost (without encryption_keys) -----------------------


def request_id() -> str:
    return secrets.token_hex(8)  # 16 letters and digits, as the layer's own


async def test_a_flush_whose_reply_is_steered_to_a_normal_queue_is_dropped_everywhere(
    layers: LayerFactory, exchange: str
) -> None:
    """A writer on the groups exchange asks every process to flush and to answer into a normal
    channel's queue (one it may not write to itself): nobody flushes, nothing reaches the worker."""
    reader, forger, worker = layers(), layers(), layers()
    channel = await reader.new_channel()
    await forger.new_channel()  # a link of its own on this loop
    await forger.send(channel, {"type": "kept"})
    await eventually(lambda: link_of(reader).router.held == 1, "the message buffered")
    jobs = f"jobs-{request_id()}"
    await worker.send(jobs, {"type": "job", "n": 1})  # the normal channel's queue exists
    publisher = link_of(forger).publishing.connection
    assert publisher is not None
    dropped = link_of(reader).dropped[DROPPED_UNDECODABLE]
    for reply_to in (f"channels.normal.{jobs}", "channels.roll-call:" + exchange, "anything"):
        body = msgpack.packb({"id": request_id(), "reply_to": reply_to})
        await publisher.publish(
            PUBLISH_CHANNEL, exchange.encode(), FLUSH_ROUTING_KEY.encode(), control_properties("flush"), body
        )
    await eventually(lambda: link_of(reader).dropped[DROPPED_UNDECODABLE] == dropped + 3, "the drops")
    assert link_of(reader).router.held == 1  # not flushed
    assert await receive(worker, jobs) == {"type": "job", "n": 1}  # no reply before the job
    assert await receive(reader, channel) == {"type": "kept"}


async def test_a_group_call_by_the_flush_route_or_with_extra_fields_is_dropped(
    layers: LayerFactory, exchange: str
) -> None:
    owner, forger = layers(), layers()
    channel = await owner.new_channel()
    await forger.new_channel()
    publisher = link_of(forger).publishing.connection
    assert publisher is not None
    reply_to = link_of(forger).queue_name
    valid = {"id": request_id(), "reply_to": reply_to, "group": "room", "channel": channel}
    dropped = link_of(owner).dropped[DROPPED_UNDECODABLE]
    # Over the flush route, to every process: a group call goes to one link's queue only.
    await publisher.publish(
        PUBLISH_CHANNEL,
        exchange.encode(),
        FLUSH_ROUTING_KEY.encode(),
        control_properties("group_add"),
        msgpack.packb(valid),
    )
    # The right route, with a megabyte more: held for group_expiry, it would grow the process.
    padded = {**valid, "id": request_id(), "padding": "x" * 1_000_000}
    queue = link_of(owner).queue_name.encode()
    await publisher.publish(
        PUBLISH_CHANNEL, b"", queue, control_properties("group_add"), msgpack.packb(padded)
    )
    await eventually(lambda: link_of(owner).dropped[DROPPED_UNDECODABLE] == dropped + 2, "the drops")
    assert not link_of(owner).router.has_members("room")
    await forger.group_add("room", channel)  # the layer's own call still works
    assert link_of(owner).router.has_members("room")


async def test_a_normal_channel_hands_its_receive_only_messages_sent_to_it(layers: LayerFactory) -> None:
    """A message with the layer's control header, or published to the normal channel's queue by
    another route, is dropped (and counted), never handed to a worker's receive()."""
    worker, forger = layers(), layers()
    await forger.new_channel()  # a link of its own on this loop
    jobs = f"jobs-{request_id()}"
    await forger.send(jobs, {"type": "job", "n": 0})
    assert await receive(worker, jobs) == {"type": "job", "n": 0}
    publisher = link_of(forger).publishing.connection
    assert publisher is not None
    queue = f"{worker.config.normal_channel_prefix}{jobs}".encode()
    reply = msgpack.packb({"id": request_id(), "queue": link_of(forger).queue_name})
    await publisher.publish(PUBLISH_CHANNEL, b"", queue, control_properties("reply"), reply)
    await forger.send(jobs, {"type": "job", "n": 1})
    assert await receive(worker, jobs) == {"type": "job", "n": 1}
    assert link_of(worker).dropped[DROPPED_UNDECODABLE] >= 1
