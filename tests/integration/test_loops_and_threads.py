"""One layer object used from many event loops and threads at once, against the real broker.

Django calls the layer from the ASGI server's loop, from ``async_to_sync`` inside
``sync_to_async`` threads (which hops back to the server's loop), and from Celery tasks,
management commands and plain threads, where each ``async_to_sync`` call runs on a
brand-new loop. The warnings filter of the suite turns ``ResourceWarning`` and
unraisable exceptions into errors; the tests below also fail on asyncio error logs
("Task was destroyed but it is pending", "Event loop is closed").

Each test runs on asyncio's loop and on uvloop; in the uvloop variant, the loops made in
threads (``asyncio.run()``, ``async_to_sync``, the layer's I/O thread) are uvloop's too.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator

import pytest
from asgiref.sync import async_to_sync, sync_to_async

from channels_rabbitmq.core import RabbitmqChannelLayer
from tests.conftest import LOOP_KINDS, Broker, LayerFactory, loop_kind_of, new_loops_of_kind

pytestmark = pytest.mark.usefixtures("loop_kind")  # sync tests parametrize it themselves


@pytest.fixture(autouse=True)
def no_asyncio_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail on what asyncio logs when tasks, transports or loops are left behind."""
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        yield
    complaints = [
        r.getMessage() for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.WARNING
    ]
    assert not complaints


def layer_threads() -> list[str]:
    """The layer's own threads still alive (its I/O thread is named after the broker)."""
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("channels_rabbitmq")]


def run_threads(count: int, target: object) -> list[BaseException]:
    """Run ``target(index)`` in ``count`` plain threads; return what they raised."""
    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            target(index)  # type: ignore[operator]
        except BaseException as error:  # reported by the test
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    stuck = [thread.name for thread in threads if thread.is_alive()]
    errors += [TimeoutError(f"{name} still running after 60s") for name in stuck]
    return errors


async def wait_for_threads(count: int, target: object) -> list[BaseException]:
    """Like :func:`run_threads`, but keeps this loop running while the threads work."""
    done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        errors.extend(run_threads(count, target))
        done.set()

    runner = threading.Thread(target=run)
    runner.start()
    while not done.is_set():
        await asyncio.sleep(0.01)
    runner.join()
    return errors


async def test_plain_threads_share_one_long_lived_connection(
    make_layer: LayerFactory, broker: Broker
) -> None:
    layer = make_layer()
    member = await layer.new_channel()
    await layer.group_add("news", member)
    peak_connections = 0

    def sender(index: int) -> None:
        nonlocal peak_connections
        for n in range(50):
            async_to_sync(layer.group_send)("news", {"type": "news", "thread": index, "n": n})
            if n == 25:
                peak_connections = max(peak_connections, broker.connection_count())

    received: list[tuple[int, int]] = []

    async def receive_all() -> None:
        for _ in range(200):
            message = await asyncio.wait_for(layer.receive(member), 30)
            received.append((message["thread"], message["n"]))

    receiving = asyncio.ensure_future(receive_all())
    assert await wait_for_threads(4, sender) == []
    await receiving
    assert sorted(received) == [(t, n) for t in range(4) for n in range(50)]
    for index in range(4):  # each thread's messages in its own order
        assert [n for t, n in received if t == index] == list(range(50))
    # This loop's link (consuming, publishing, roll call) and the I/O thread's shared link, which only
    # publishes: no connection per call.
    assert 1 <= peak_connections <= 4
    assert broker.connection_count() <= 4
    await layer.close()
    assert broker.connection_count() == 0
    assert not layer_threads()


async def test_async_to_sync_inside_sync_to_async_uses_the_server_loop(
    make_layer: LayerFactory, broker: Broker
) -> None:
    layer = make_layer()
    member = await layer.new_channel()
    await layer.group_add("room", member)

    def view() -> None:  # what a sync Django view does under an ASGI server
        async_to_sync(layer.group_send)("room", {"type": "from.view"})
        async_to_sync(layer.send)(member, {"type": "direct.from.view"})

    await sync_to_async(view)()
    assert await asyncio.wait_for(layer.receive(member), 5) == {"type": "from.view"}
    assert await asyncio.wait_for(layer.receive(member), 5) == {"type": "direct.from.view"}
    assert broker.connection_count() == 3  # no I/O thread: one link's consuming, publishing, roll call


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_asyncio_run_loops_that_end_clean_up_after_themselves(broker: Broker, loop_kind: str) -> None:
    layer = RabbitmqChannelLayer(host=broker.url)

    async def round_trip(n: int) -> None:
        assert loop_kind_of(asyncio.get_running_loop()) == loop_kind
        channel = await layer.new_channel()
        await layer.group_add("loop", channel)
        await layer.send(channel, {"type": "m", "n": n})
        assert await asyncio.wait_for(layer.receive(channel), 5) == {"type": "m", "n": n}
        pending = asyncio.ensure_future(layer.receive(channel))  # left waiting as the loop ends
        await asyncio.sleep(0)
        assert not pending.done()

    with new_loops_of_kind(loop_kind):
        for n in range(5):
            asyncio.run(round_trip(n))
            assert broker.connection_count() == 0  # the loop's link closed with the loop
        asyncio.run(layer.close())


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_async_to_sync_from_the_main_thread_without_a_loop(broker: Broker, loop_kind: str) -> None:
    """A management command or a Celery task: no running loop, one call after another."""
    layer = RabbitmqChannelLayer(host=broker.url)
    with new_loops_of_kind(loop_kind):
        channel = async_to_sync(layer.new_channel)()
        async_to_sync(layer.group_add)("tasks", channel)
        for n in range(20):
            async_to_sync(layer.group_send)("tasks", {"type": "task", "n": n})
        received = [async_to_sync(layer.receive)(channel)["n"] for _ in range(20)]
        assert received == list(range(20))
        assert broker.connection_count() == 3  # one link: consuming, publishing, and the roll call
        assert layer._links._io_thread is not None
        assert loop_kind_of(layer._links._io_thread.loop) == loop_kind
        async_to_sync(layer.close)()
    assert broker.connection_count() == 0
    assert not layer_threads()


async def test_a_channel_made_on_one_loop_receives_from_another(make_layer: LayerFactory) -> None:
    layer = make_layer()
    channel = await layer.new_channel()
    got: list[dict] = []

    def reader(_index: int) -> None:
        got.append(async_to_sync(layer.receive)(channel))

    reading = asyncio.ensure_future(wait_for_threads(1, reader))
    await asyncio.sleep(0.2)
    await layer.send(channel, {"type": "across"})
    assert await reading == []
    assert got == [{"type": "across"}]


async def test_a_cancelled_receive_from_another_loop_loses_nothing(make_layer: LayerFactory) -> None:
    layer = make_layer()
    channel = await layer.new_channel()
    total = 100

    def reader(_index: int) -> None:
        async def read_with_cancellations() -> list[int]:
            numbers: list[int] = []
            attempts = 0
            deadline = time.monotonic() + 20
            while len(numbers) < total:
                missing = sorted(set(range(total)) - set(numbers))
                assert time.monotonic() < deadline, f"still missing after 20 s: {missing}"
                task = asyncio.ensure_future(layer.receive(channel))
                # From 0.5 to 10 ms: some cancels come before the message crosses the loops,
                # some after. uvloop's timers count whole milliseconds: with 0.5 ms always, no
                # receive would ever finish there.
                attempts += 1
                await asyncio.sleep(0.0005 * (1 + attempts % 20))
                task.cancel()
                try:
                    numbers.append((await task)["n"])
                except asyncio.CancelledError:
                    pass
            return numbers

        assert async_to_sync(read_with_cancellations)() == list(range(total))

    reading = asyncio.ensure_future(wait_for_threads(1, reader))
    for n in range(total):
        await layer.send(channel, {"type": "m", "n": n})
        if n % 10 == 0:
            await asyncio.sleep(0.001)
    assert await reading == []


async def test_no_message_is_delivered_twice_across_loops(make_layer: LayerFactory) -> None:
    layer = make_layer()
    on_this_loop = await layer.new_channel()
    await layer.group_add("everyone", on_this_loop)
    received_in_thread: list[dict] = []

    def thread_member(_index: int) -> None:
        async def join_and_read() -> None:
            channel = await layer.new_channel()  # made on the I/O thread's shared link
            await layer.group_add("everyone", channel)
            ready.set()
            for _ in range(3):
                received_in_thread.append(await asyncio.wait_for(layer.receive(channel), 10))
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(layer.receive(channel), 0.5)

        async_to_sync(join_and_read)()

    ready = threading.Event()
    reading = asyncio.ensure_future(wait_for_threads(1, thread_member))
    while not ready.is_set():
        await asyncio.sleep(0.01)
    for n in range(3):
        await layer.group_send("everyone", {"type": "m", "n": n})
    assert [(await asyncio.wait_for(layer.receive(on_this_loop), 5))["n"] for _ in range(3)] == [0, 1, 2]
    assert await reading == []
    assert [message["n"] for message in received_in_thread] == [0, 1, 2]
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(on_this_loop), 0.3)


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_close_from_a_plain_thread_closes_everything(broker: Broker, loop_kind: str) -> None:
    layer = RabbitmqChannelLayer(host=broker.url)

    def use_then_close(_index: int) -> None:
        async_to_sync(layer.group_send)("anyone", {"type": "m"})
        async_to_sync(layer.close)()

    with new_loops_of_kind(loop_kind):
        assert run_threads(1, use_then_close) == []
    deadline = time.monotonic() + 5
    while broker.connection_count() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert broker.connection_count() == 0
    assert not layer_threads()


async def test_every_loop_of_a_variant_is_of_its_kind(
    make_layer: LayerFactory, loop_kind: str, request: pytest.FixtureRequest
) -> None:
    """The [uvloop] variants really run on uvloop: this test's loop, the loops that
    async_to_sync makes in plain threads, and the layer's I/O thread; [asyncio] on asyncio's."""
    assert request.node.name.endswith(f"[{loop_kind}]")
    assert loop_kind_of(asyncio.get_running_loop()) == loop_kind
    layer = make_layer()
    kinds: list[str] = []

    async def in_a_thread() -> None:
        kinds.append(loop_kind_of(asyncio.get_running_loop()))
        await layer.group_send("nobody", {"type": "m"})  # through the I/O thread's shared link

    assert await wait_for_threads(1, lambda _index: async_to_sync(in_a_thread)()) == []
    assert kinds == [loop_kind]
    assert layer._links._io_thread is not None
    assert loop_kind_of(layer._links._io_thread.loop) == loop_kind
