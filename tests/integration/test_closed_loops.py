"""A closed event loop, here or in another layer, must not break flush() (issue 21).

Sync code, commands and tests make a loop, use the layer in it, and close it; Channels' testing
guide and most fixtures then call ``flush()`` between tests. The link of a closed loop is
forgotten, and its sockets closed, the next time the layer is used from any loop."""

from __future__ import annotations

import asyncio
import time
import warnings

import pytest

from channels_rabbitmq.core import RabbitmqChannelLayer
from channels_rabbitmq.wire import queue_of
from tests.conftest import LOOP_FACTORIES, LOOP_KINDS, TIMERS_EARLY, Broker, new_loops_of_kind

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
