"""A closed or stopped event loop, here or in another process, must not break flush() (issue 21).

Sync code, commands and tests make a loop, use the layer in it, and close it or leave it stopped;
Channels' testing guide and most fixtures then call ``flush()`` between tests.

- The link of a closed loop is forgotten, and its sockets closed, the next time the layer is used
  from any loop.
- A link whose loop is stopped cannot answer: it leaves the roll call (its own process takes its
  roll call's connection down at once; in another process, RabbitMQ drops that connection when its
  one-second heartbeats stop), so no flush() waits for it."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from channels_rabbitmq.core import RabbitmqChannelLayer
from channels_rabbitmq.link.roll_call import LEASE_HEARTBEAT
from channels_rabbitmq.wire import queue_of
from tests.conftest import (
    LOOP_FACTORIES,
    LOOP_KINDS,
    TIMERS_EARLY,
    Broker,
    LayerFactory,
    link_of,
    new_loops_of_kind,
)

pytestmark = pytest.mark.timeout(60)

CONNECT_TIMEOUT = 5.0  # flush() would wait this long for a link that never answers


def close(loop: asyncio.AbstractEventLoop) -> None:
    """``loop.close()`` as sync code does it, with the layer's connections still open. Python shows
    no ResourceWarning by default; uvloop warns about each open handle while closing, and these tests
    turn warnings into errors, which would leave its loop half closed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        loop.close()


def queue_names(broker: Broker) -> set[str]:
    return {queue["name"] for queue in broker.queues()}


def wait_for(condition: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout:g}s for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_flush_after_the_loop_of_a_link_was_closed_forgets_that_link(kind: str, broker: Broker) -> None:
    layer = RabbitmqChannelLayer(host=broker.url, connect_timeout=CONNECT_TIMEOUT)
    with new_loops_of_kind(kind):
        loop = LOOP_FACTORIES[kind]()
        channel = loop.run_until_complete(layer.new_channel())
        old_queue = queue_of(channel)
        assert old_queue in queue_names(broker)
        close(loop)  # as sync code, a command or a test does
        try:
            started = time.monotonic()
            asyncio.run(layer.flush())  # raised ChannelLayerClosedError, for ever
            asyncio.run(layer.flush())
            took = time.monotonic() - started
            assert took < CONNECT_TIMEOUT - TIMERS_EARLY, f"flush() waited {took:.2f}s for the dead link"
            assert old_queue not in {link.queue for link in layer.stats().links}
            wait_for(lambda: old_queue not in queue_names(broker), "the closed loop's queue to go")

            async def use() -> None:  # the layer goes on working from a new loop
                receiver = await layer.new_channel()
                await layer.send(receiver, {"type": "after"})
                assert await asyncio.wait_for(layer.receive(receiver), 10) == {"type": "after"}

            asyncio.run(use())
        finally:
            asyncio.run(layer.close())


@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_another_layer_flush_does_not_wait_for_a_link_whose_loop_was_closed(
    kind: str, broker: Broker
) -> None:
    """Once the layer with the closed loop is used again (here: its flush()), another layer's flush()
    no longer counts that link: the roll call is counted again while replies are missing."""
    stale = RabbitmqChannelLayer(host=broker.url, connect_timeout=CONNECT_TIMEOUT)
    other = RabbitmqChannelLayer(host=broker.url, connect_timeout=CONNECT_TIMEOUT)
    with new_loops_of_kind(kind):
        loop = LOOP_FACTORIES[kind]()
        loop.run_until_complete(stale.new_channel())
        close(loop)
        try:

            async def both() -> float:
                await other.new_channel()
                flushing = asyncio.ensure_future(other.flush())  # counts the dead link, at first
                await stale.flush()  # forgets it and closes its sockets
                started = time.monotonic()
                await flushing
                return time.monotonic() - started

            waited = asyncio.run(both())
            assert waited < CONNECT_TIMEOUT - TIMERS_EARLY, f"the other flush() waited {waited:.2f}s"
        finally:
            asyncio.run(stale.close())
            asyncio.run(other.close())


@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_close_after_the_loop_of_a_link_was_closed_closes_its_connections(kind: str, broker: Broker) -> None:
    layer = RabbitmqChannelLayer(host=broker.url)
    with new_loops_of_kind(kind):
        loop = LOOP_FACTORIES[kind]()
        old_queue = queue_of(loop.run_until_complete(layer.new_channel()))
        close(loop)
        asyncio.run(layer.close())
    wait_for(lambda: old_queue not in queue_names(broker), "the closed loop's queue to go")


# Stopped, not closed ---------------------------------------------------------------------------

#: A flush() that had to wait for RabbitMQ to notice missed heartbeats would take at least two of
#: them; one that found the stopped link gone from the roll call takes a fraction of one.
STEPPED_OUT_WITHIN = 2 * LEASE_HEARTBEAT - TIMERS_EARLY


def own_exchange() -> str:
    """A groups exchange, and so a roll call, of the test's own: other tests' links on the run's
    vhost are not counted."""
    return f"roll-call-test-{secrets.token_hex(4)}"


@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_flush_after_the_loop_of_a_link_was_stopped_skips_it_at_once_and_it_works_when_its_loop_runs(
    kind: str, broker: Broker
) -> None:
    layer = RabbitmqChannelLayer(
        host=broker.url, connect_timeout=CONNECT_TIMEOUT, groups_exchange=own_exchange()
    )
    with new_loops_of_kind(kind):
        loop = LOOP_FACTORIES[kind]()
        try:
            channel = loop.run_until_complete(layer.new_channel())
            loop.run_until_complete(layer.send(channel, {"type": "before"}))
            # The loop is stopped, not closed: as sync code that ran it and left it does.

            async def flush() -> tuple[float, int]:
                await layer.new_channel()  # this loop's own link, to count the roll call with
                started = time.monotonic()
                await layer.flush()  # raised ChannelLayerClosedError: "the event loop ... is not running"
                took = time.monotonic() - started
                return took, await link_of(layer).count_links()

            took, counted = asyncio.run(flush())
            assert took < STEPPED_OUT_WITHIN, f"flush() waited {took:.2f}s for the stopped link"
            assert counted == 1  # the new loop's link; the stopped one left the roll call

            async def use_again() -> dict[str, object]:
                # Its loop runs again: the link was left as it was, and joins the roll call again
                # (asyncio.run()'s closed loop is forgotten now that the layer is used).
                await layer.new_channel()
                message = await asyncio.wait_for(layer.receive(channel), 10)
                link = link_of(layer)
                deadline = time.monotonic() + 15
                while await link.count_links() != 1 or not link.roll_call.attending:
                    assert time.monotonic() < deadline, "the stopped link did not join the roll call again"
                    await asyncio.sleep(0.05)
                return message

            assert loop.run_until_complete(use_again()) == {"type": "before"}
        finally:
            loop.run_until_complete(layer.close())
            loop.close()


#: A process that uses the layer on a loop, then leaves the loop stopped until its stdin closes.
STOPPED_PROCESS = textwrap.dedent(
    """
    import asyncio, sys
    import uvloop
    from channels_rabbitmq.core import RabbitmqChannelLayer

    url, kind, exchange = sys.argv[1:]
    layer = RabbitmqChannelLayer(host=url, groups_exchange=exchange)
    loop = uvloop.new_event_loop() if kind == "uvloop" else asyncio.SelectorEventLoop()
    channel = loop.run_until_complete(layer.new_channel())
    loop.run_until_complete(layer.group_add("room", channel))
    print("stopped", flush=True)
    sys.stdin.read()
    """
)


@pytest.fixture
def exchange() -> str:
    return own_exchange()


@pytest.fixture
def stopped_process(broker: Broker, loop_kind: str, exchange: str) -> Iterator[subprocess.Popen[str]]:
    """Another process whose layer's loop is stopped, not closed, with a channel in a group."""
    root = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(
        [sys.executable, "-c", STOPPED_PROCESS, broker.url, loop_kind, exchange],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "stopped"
        yield process
    finally:
        assert process.stdin is not None
        assert process.stdout is not None
        process.stdin.close()
        process.wait(timeout=30)
        process.stdout.close()


async def test_flush_does_not_wait_for_another_process_whose_loop_is_stopped(
    loop_kind: str, make_layer: LayerFactory, exchange: str, stopped_process: subprocess.Popen[str]
) -> None:
    connect_timeout = 10.0  # what flush() waited for the stopped link before raising BrokerTimeoutError
    flusher = make_layer(connect_timeout=connect_timeout, groups_exchange=exchange)
    await flusher.new_channel()
    started = time.monotonic()
    await flusher.flush()  # the stopped link is still counted: RabbitMQ drops it after missed heartbeats
    took = time.monotonic() - started
    print(f"flush() with another process's loop stopped ({loop_kind}): {took:.2f}s")
    assert took < connect_timeout / 2, f"flush() waited {took:.2f}s for the stopped process"
    assert stopped_process.poll() is None  # alive all along: its loop is stopped, not its process
    assert await link_of(flusher).count_links() == 1
    started = time.monotonic()
    await flusher.flush()
    assert time.monotonic() - started < STEPPED_OUT_WITHIN


# A test suite as users write it -------------------------------------------------------------

#: Sync tests in the styles of Channels' testing guide and of sync code (``async_to_sync``, a loop
#: left stopped, ``asyncio.run()``), then async tests, with a fixture that flushes after every test
#: under one second.
SUITE_CONFTEST = textwrap.dedent(
    """
    import asyncio, os
    import pytest, uvloop
    from channels_rabbitmq.core import RabbitmqChannelLayer

    if os.environ["LOOP_KIND"] == "uvloop":
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    LAYER = RabbitmqChannelLayer(
        host=os.environ["AMQP_URL"], connect_timeout=10, groups_exchange=os.environ["GROUPS_EXCHANGE"]
    )

    @pytest.fixture
    def layer():
        yield LAYER
        asyncio.run(asyncio.wait_for(LAYER.flush(), 1))
    """
)
SUITE_TESTS = textwrap.dedent(
    """
    import asyncio, os
    import uvloop
    from asgiref.sync import async_to_sync

    def test_1_sync_through_async_to_sync(layer):
        channel = async_to_sync(layer.new_channel)()
        async_to_sync(layer.send)(channel, {"type": "hello"})
        assert async_to_sync(layer.receive)(channel) == {"type": "hello"}

    def test_2_sync_on_a_loop_left_stopped(layer):
        loop = asyncio.new_event_loop()
        channel = loop.run_until_complete(layer.new_channel())
        loop.run_until_complete(layer.group_add("room", channel))
        loop.run_until_complete(layer.group_send("room", {"type": "hello"}))
        assert loop.run_until_complete(layer.receive(channel)) == {"type": "hello"}
        loop.run_until_complete(layer.group_send("room", {"type": "left.unread"}))

    def test_3_sync_through_asyncio_run(layer):
        async def use():
            channel = await layer.new_channel()
            await layer.send(channel, {"type": "hello"})
            assert await layer.receive(channel) == {"type": "hello"}
            await layer.send(channel, {"type": "left.unread"})
        asyncio.run(use())

    async def test_4_async(layer):
        loop = asyncio.get_running_loop()
        assert isinstance(loop, uvloop.Loop) == (os.environ["LOOP_KIND"] == "uvloop")
        channel = await layer.new_channel()
        await layer.group_add("room", channel)
        await layer.group_send("room", {"type": "hello"})
        assert await asyncio.wait_for(layer.receive(channel), 5) == {"type": "hello"}

    async def test_5_async_after_flushes(layer):
        channel = await layer.new_channel()
        await layer.send(channel, {"type": "fresh"})
        assert await asyncio.wait_for(layer.receive(channel), 5) == {"type": "fresh"}
    """
)


@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_a_suite_of_sync_then_async_tests_flushing_after_each_passes(
    kind: str, broker: Broker, tmp_path: Path
) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\n")
    (tmp_path / "conftest.py").write_text(SUITE_CONFTEST)
    (tmp_path / "test_suite.py").write_text(SUITE_TESTS)
    root = Path(__file__).resolve().parents[2]
    environment = {
        **os.environ,
        "AMQP_URL": broker.url,
        "LOOP_KIND": kind,
        "GROUPS_EXCHANGE": own_exchange(),
        "PYTHONPATH": str(root),
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", str(tmp_path)],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 passed" in result.stdout, result.stdout
