"""Every call ends, and no cancellation, fork or race leaves the layer inconsistent.

- A call for a channel whose event loop is not running, or stops, ends at once with a
  clear error (``StopConsumer`` for ``receive()``, ``ChannelLayerClosedError`` otherwise).
- A cancelled ``group_add()``/``group_discard()``, or one racing ``flush()``, leaves the
  queue bound to a group exactly when the group has a local member.
- In a forked child every call uses the child's own connections and none hangs.
- ``close()`` racing calls from other threads: those calls end with
  ``ChannelLayerClosedError`` (never a bare ``CancelledError``), and no I/O thread starts
  after ``close()`` returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator

import pytest
from asgiref.sync import async_to_sync
from channels.exceptions import StopConsumer

from channels_rabbitmq.core import RabbitmqChannelLayer
from channels_rabbitmq.exceptions import ChannelLayerClosedError
from tests.conftest import LOOP_KINDS, Broker, LayerFactory, link_of, new_loops_of_kind

# Async tests run on asyncio's loop and on uvloop; sync tests parametrize the kind themselves.
pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("loop_kind")]


def layer_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("channels_rabbitmq")]


def in_thread(target: object) -> tuple[threading.Thread, dict[str, object]]:
    """Start ``target()`` in a plain thread; the dict gets its "result" or "error" and "seconds"."""
    outcome: dict[str, object] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            outcome["result"] = target()  # type: ignore[operator]
        except BaseException as error:  # reported by the test
            outcome["error"] = error
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


@pytest.fixture(params=LOOP_KINDS)
def own_loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    """A main-thread event loop of each kind that the test runs and stops by hand; the loops
    made meanwhile in threads are of the same kind."""
    with new_loops_of_kind(request.param):
        loop = asyncio.new_event_loop()
        yield loop
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


# Loops that do not run -------------------------------------------------------------------------


def test_calls_for_a_channel_whose_loop_is_not_running_end_at_once(
    broker: Broker, own_loop: asyncio.AbstractEventLoop
) -> None:
    layer = RabbitmqChannelLayer(host=broker.url, connection_wait=5, connect_timeout=5)
    channel = own_loop.run_until_complete(layer.new_channel())  # the loop then stops running
    receiving, received = in_thread(lambda: async_to_sync(layer.receive)(channel))
    adding, added = in_thread(lambda: async_to_sync(layer.group_add)("room", channel))
    receiving.join(10)
    adding.join(10)
    assert isinstance(received.get("error"), StopConsumer), received
    assert isinstance(added.get("error"), ChannelLayerClosedError), added
    assert received["seconds"] < 4  # type: ignore[operator]  # not connection_wait (5 s)
    assert added["seconds"] < 4  # type: ignore[operator]
    own_loop.run_until_complete(layer.close())


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_a_receive_from_another_thread_ends_when_the_channel_loop_shuts_down(
    broker: Broker, loop_kind: str
) -> None:
    with new_loops_of_kind(loop_kind):
        check_receive_ends_when_the_channel_loop_shuts_down(broker)


def check_receive_ends_when_the_channel_loop_shuts_down(broker: Broker) -> None:
    layer = RabbitmqChannelLayer(host=broker.url)
    outcome: dict[str, object] = {}

    async def serve() -> None:
        channel = await layer.new_channel()
        reader, outcome_of_reader = in_thread(lambda: async_to_sync(layer.receive)(channel))
        outcome["reader"] = (reader, outcome_of_reader)
        await asyncio.sleep(0.5)  # the reader waits on this loop's link; then the loop ends

    asyncio.run(serve())
    shut_down_at = time.monotonic()
    reader, result = outcome["reader"]  # type: ignore[misc]
    reader.join(10)
    assert not reader.is_alive(), "receive() from another thread never returned"
    assert isinstance(result.get("error"), StopConsumer), result
    print(f"the waiting receive() ended {time.monotonic() - shut_down_at:.2f}s after the loop shut down")
    async_to_sync(layer.close)()


# Cancelled group calls ------------------------------------------------------------------------


async def bound_when_member(layer: RabbitmqChannelLayer, broker: Broker, group: str) -> tuple[bool, bool]:
    """(the queue is bound to ``group`` on the broker, ``group`` has a local member), once settled."""
    link = link_of(layer)
    for _ in range(100):  # let a binding change still in flight finish
        if group not in link.topology._syncing:
            break
        await asyncio.sleep(0.02)
    bound = (link.queue_name, group) in await asyncio.to_thread(broker.bindings)
    return bound, link.router.has_members(group)


@pytest.mark.parametrize("delay", [0, 0.0005, 0.001, 0.003, 0.01])
async def test_a_cancelled_group_add_leaves_a_binding_only_with_a_member(
    make_layer: LayerFactory, broker: Broker, delay: float
) -> None:
    layer = make_layer()
    channel = await layer.new_channel()
    for attempt in range(5):
        group = f"cancelled-add-{attempt}"
        adding = asyncio.ensure_future(layer.group_add(group, channel))
        await asyncio.sleep(delay)
        adding.cancel()
        bound, member = await bound_when_member(layer, broker, group)
        assert bound == member, f"attempt {attempt}: bound={bound}, member={member}"
        discarding = asyncio.ensure_future(layer.group_discard(group, channel))
        await asyncio.sleep(delay)
        discarding.cancel()
        bound, member = await bound_when_member(layer, broker, group)
        assert bound == member, f"attempt {attempt} (discard): bound={bound}, member={member}"


async def test_flush_racing_group_add_leaves_a_binding_only_with_a_member(
    make_layer: LayerFactory, broker: Broker
) -> None:
    layer = make_layer()
    channel = await layer.new_channel()
    for attempt in range(5):
        group = f"flushed-{attempt}"
        adding = asyncio.ensure_future(layer.group_add(group, channel))
        await asyncio.sleep(0.001 * attempt)
        await layer.flush()
        await adding
        bound, member = await bound_when_member(layer, broker, group)
        assert bound == member, f"attempt {attempt}: bound={bound}, member={member}"


async def test_a_group_send_after_a_cancelled_group_add_reaches_the_member_it_left(
    make_layer: LayerFactory,
) -> None:
    layer, sender = make_layer(), make_layer()
    channel = await layer.new_channel()
    adding = asyncio.ensure_future(layer.group_add("kept", channel))
    await asyncio.sleep(0)
    adding.cancel()
    await asyncio.sleep(0.2)
    if link_of(layer).router.has_members("kept"):  # the membership stayed, so must its binding
        await sender.group_send("kept", {"type": "m"})
        assert await asyncio.wait_for(layer.receive(channel), 5) == {"type": "m"}


# Fork ---------------------------------------------------------------------------------------------


async def test_in_a_forked_child_no_call_targets_the_parent_and_none_hangs(
    make_layer: LayerFactory,
) -> None:
    layer = make_layer()
    channel = await layer.new_channel()
    await layer.group_add("room", channel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads (Python 3.12+)
        pid = os.fork()
    if pid == 0:  # the child: exit 0 only if every call ended as it should
        code = 1
        try:
            signal.alarm(20)  # a hang kills the child: the parent sees SIGALRM

            async def child() -> None:
                with pytest.raises(ValueError, match="not a channel of this process"):
                    await layer.receive(channel)
                # Group calls for the parent's channel, and flush(), reach the parent's link as
                # for any other process: through the broker, never through the parent's sockets.
                await layer.group_add("room", channel)
                await layer.flush()
                mine = await layer.new_channel()  # its own connections and queue
                await layer.send(mine, {"type": "child"})
                assert await asyncio.wait_for(layer.receive(mine), 5) == {"type": "child"}
                await layer.close()

            asyncio.run(child())
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 (WNOHANG: it never blocks)
        if done:
            break
        assert time.monotonic() < deadline, "the forked child hangs"
        await asyncio.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
    # The child's flush() reached the parent (a real second process) before it returned; the
    # parent's link goes on undisturbed.
    assert not link_of(layer).router.has_members("room")
    await layer.group_add("room", channel)
    await layer.group_send("room", {"type": "parent"})
    assert await asyncio.wait_for(layer.receive(channel), 5) == {"type": "parent"}


# close() racing other threads ----------------------------------------------------------------------


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_close_racing_sends_from_threads_ends_them_cleanly_and_starts_no_thread(
    broker: Broker, loop_kind: str
) -> None:
    with new_loops_of_kind(loop_kind):
        check_close_racing_sends(broker)


def check_close_racing_sends(broker: Broker) -> None:
    for _ in range(3):
        layer = RabbitmqChannelLayer(host=broker.url)
        errors: list[BaseException] = []
        stop = threading.Event()

        def keep_sending(
            layer: RabbitmqChannelLayer = layer,
            errors: list[BaseException] = errors,
            stop: threading.Event = stop,
        ) -> None:
            while not stop.is_set():
                try:
                    async_to_sync(layer.group_send)("nobody", {"type": "m"})
                except BaseException as raised:  # what the race gives: checked below
                    errors.append(raised)
                    return

        senders = [threading.Thread(target=keep_sending) for _ in range(3)]
        for sender in senders:
            sender.start()
        time.sleep(0.3)
        async_to_sync(layer.close)()
        closed_at = time.monotonic()
        for sender in senders:
            sender.join(10)
        stop.set()
        assert all(not sender.is_alive() for sender in senders)
        assert errors, "sends after close() must fail"
        assert all(isinstance(error, ChannelLayerClosedError) for error in errors), errors
        time.sleep(0.3)
        assert not layer_threads(), (
            f"{layer_threads()} alive {time.monotonic() - closed_at:.1f}s after close()"
        )


def test_a_forked_child_forgets_the_parent_links_at_once_and_sends_on_its_own(
    broker: Broker, own_loop: asyncio.AbstractEventLoop
) -> None:
    layer = RabbitmqChannelLayer(host=broker.url)
    channel = own_loop.run_until_complete(layer.new_channel())  # the parent's link, on own_loop
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads (Python 3.12+)
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(20)
            # Even before any call checks the process id, the parent's links are gone: no fast
            # path can reach the parent's sockets. (Running the parent's loop object here would
            # share its epoll instance with the parent: asyncio does not support that.)
            assert not layer._links.all()
            assert not layer._links.all()
            asyncio.run(layer.send(channel, {"type": "from.child"}))
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        assert time.monotonic() < deadline, "the forked child hangs"
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0

    async def parent_goes_on() -> None:
        assert await asyncio.wait_for(layer.receive(channel), 5) == {"type": "from.child"}
        await asyncio.wait_for(layer.send(channel, {"type": "from.parent"}), 5)  # its tags intact
        assert await asyncio.wait_for(layer.receive(channel), 5) == {"type": "from.parent"}
        await layer.close()

    own_loop.run_until_complete(parent_goes_on())


# Group bindings through reconnections and flush ------------------------------------------------------


async def settled_bindings(layer: RabbitmqChannelLayer, broker: Broker) -> tuple[set[str], set[str]]:
    """(groups the queue is bound to on the broker, groups with a local member), once settled."""
    link = link_of(layer)
    for _ in range(500):
        if not link.topology._syncing and link.is_connected:
            break
        await asyncio.sleep(0.02)
    bound = {key for name, key in await asyncio.to_thread(broker.bindings) if name == link.queue_name}
    return bound, set(link.router.groups)


async def test_a_link_with_thousands_of_groups_recovers_though_binding_them_takes_longer_than_connect_timeout(
    make_layer: LayerFactory, broker: Broker
) -> None:
    # 3,000 binds, one after another on one channel, take several times connect_timeout.
    layer = make_layer(connect_timeout=2, reconnect_delay_max=0.2)
    channel = await layer.new_channel()
    groups = [f"many.{number}" for number in range(3000)]
    await asyncio.gather(*(layer.group_add(group, channel) for group in groups))  # queued on one channel
    link = link_of(layer)
    assert link.consuming.reconnections == 0, "a busy control channel is not a dead connection"
    started = time.monotonic()
    link.consuming.connection.abort()
    await asyncio.sleep(0.1)
    # Joining groups again while the recovery binds them: never a CancelledError.
    await asyncio.gather(*(layer.group_add(group, channel) for group in groups[:200]))
    bound, members = await settled_bindings(layer, broker)
    print(f"3000 groups bound again {time.monotonic() - started:.1f}s after the connection was lost")
    assert link.consuming.reconnections >= 1
    assert bound == members == set(groups)


async def test_a_cancelled_flush_leaves_no_binding_without_a_member(
    make_layer: LayerFactory, broker: Broker
) -> None:
    layer = make_layer()
    channel = await layer.new_channel()
    for delay in (0, 0.0005, 0.002):
        await layer.group_add("a", channel)
        await layer.group_add("b", channel)
        flushing = asyncio.ensure_future(layer.flush())
        await asyncio.sleep(delay)
        flushing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flushing
        bound, members = await settled_bindings(layer, broker)
        assert bound == members, f"cancelled after {delay}s: bound {bound}, members {members}"


async def test_flush_during_a_reconnection_leaves_no_binding_without_a_member(
    make_layer: LayerFactory, broker: Broker
) -> None:
    layer = make_layer(reconnect_delay_min=0.01, reconnect_delay_max=0.05)
    channel = await layer.new_channel()
    await layer.group_add("room", channel)
    link = link_of(layer)
    link.consuming.connection.abort()
    await asyncio.sleep(0)
    for _ in range(200):  # flush at some point of the recovery's set-up
        await layer.flush()
        if link.topology.setting_up is not None or link.is_connected:
            break
        await asyncio.sleep(0.005)
    bound, members = await settled_bindings(layer, broker)
    assert bound == members == set()
