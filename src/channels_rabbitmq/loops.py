"""Which link serves which event loop, and how calls travel between loops.

One layer object serves every event loop and thread of the process:

- a loop running in the main thread that makes channels (the ASGI server's, where
  consumers live) gets a :class:`~.link.BrokerLink` of its own: its connections and
  queue, used directly; when that loop shuts down, its link is closed with it;
- every other caller (``async_to_sync`` in Celery tasks, management commands and
  plain threads, each call on a new short-lived loop; scripts that only send) uses
  one shared link on the layer's own I/O thread (:class:`IOThread`);
- a channel is received by the link that made it; ``receive()`` and group calls for
  it from another loop are carried to that link's loop, each within a bound.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from channels.exceptions import StopConsumer

from .config import LayerConfig
from .exceptions import BrokerTimeoutError, ChannelLayerClosedError
from .link import BrokerLink
from .names import is_normal_channel
from .stats import LayerStats, LinkStats, layer_stats, retire
from .wire import queue_of
from .wire.codec import MessageCodec

logger = logging.getLogger(__name__)

#: How often a wait that spans two event loops checks that the other loop still runs.
LOOP_CHECK_INTERVAL = 0.5

T = TypeVar("T")


class Links:
    """The links of one layer: one per receiving main-thread loop, one on the I/O thread."""

    def __init__(self, config: LayerConfig, codec: MessageCodec) -> None:
        self.config = config
        self.codec = codec
        self.closed = False
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._by_loop: dict[asyncio.AbstractEventLoop, BrokerLink] = {}  # main-thread loops
        self._by_queue: dict[str, BrokerLink] = {}  # every live link, by queue name
        self._io_thread: IOThread | None = None
        self._shared: BrokerLink | None = None
        self._retired: LinkStats | None = None  # the counters of links gone with their loop

    def check_fork(self) -> None:
        """In a forked child, forget the parent's links: their loops and sockets are not ours."""
        if self._pid != os.getpid():
            self._lock = threading.Lock()  # the parent may have held it while forking
            self._reset()

    # Finding a link -------------------------------------------------------------------------

    def of_loop(self, loop: asyncio.AbstractEventLoop) -> BrokerLink | None:
        """The link of ``loop`` when it has one of its own (the fast path: no check at all)."""
        return self._by_loop.get(loop)

    def all(self) -> list[BrokerLink]:
        self.check_fork()
        self.forget_closed_loops()
        return list(self._by_queue.values())

    def forget_closed_loops(self) -> None:
        """Forget the links whose event loop was closed (sync code, a command or a test that made
        a loop, used the layer in it, and closed it), and close their sockets: nothing else can."""
        with self._lock:
            dead = [link for link in self._by_queue.values() if link.loop.is_closed()]
            for link in dead:
                if self._by_loop.get(link.loop) is link:
                    del self._by_loop[link.loop]
                del self._by_queue[link.queue_name]
                self._retired = retire(self._retired, link.stats())
        for link in dead:
            link.abandon()

    def owner(self, channel: str, operation: str) -> BrokerLink:
        """The link that receives ``channel``; ``ValueError`` when no link of ours does."""
        self.check_fork()
        if self.closed:
            raise ChannelLayerClosedError("the channel layer is closed")
        link = self._by_queue.get(queue_of(channel))
        if link is None:
            raise ValueError(
                f"cannot {operation} {channel!r}: it is not a channel of this process "
                "(only names from this layer's new_channel() are), or the event loop that "
                "made it has ended"
            )
        return link

    def local_owner(self, channel: str) -> BrokerLink | None:
        """The link of ours that receives ``channel``; None for another process's channel (or
        another layer's, or one whose event loop has ended)."""
        self.check_fork()
        if self.closed:
            raise ChannelLayerClosedError("the channel layer is closed")
        return self._by_queue.get(queue_of(channel))

    async def for_this_loop(self, receiving: bool = False) -> BrokerLink:
        """This loop's own link, or the I/O thread's shared link.

        A loop of the main thread gets a link of its own when it makes a channel
        (``receiving``): that is the ASGI server's loop, where consumers live. Loops that
        only send, and loops of other threads, share the I/O thread's link, so that a
        script or task calling ``asyncio.run()`` or ``async_to_sync`` again and again
        does not open a connection per call.
        """
        self.check_fork()
        if self.closed:
            raise ChannelLayerClosedError("the channel layer is closed")
        self.forget_closed_loops()
        loop = asyncio.get_running_loop()
        link = self._by_loop.get(loop)
        if link is not None:
            return link
        if not receiving or threading.current_thread() is not threading.main_thread():
            return self._shared_link()
        link = BrokerLink(self.config, loop, self.codec)
        with self._lock:
            if self.closed:
                raise ChannelLayerClosedError("the channel layer is closed")
            self._by_loop[loop] = link
            self._by_queue[link.queue_name] = link
        watcher = self._close_with_loop(link)
        link.loop_watcher = watcher  # the loop keeps async generators by weak reference
        await watcher.__anext__()
        return link

    async def _close_with_loop(self, link: BrokerLink) -> AsyncIterator[None]:
        """An async generator the loop finalizes at shutdown (``shutdown_asyncgens()``):
        the link's connections close while the loop can still run them."""
        try:
            yield
        finally:
            with self._lock:
                self._by_loop.pop(link.loop, None)
                if self._by_queue.pop(link.queue_name, None) is not None:
                    self._retired = retire(self._retired, link.stats())
            await link.close()

    def _shared_link(self) -> BrokerLink:
        with self._lock:
            if self.closed:  # close() may have run in another thread since our last check
                raise ChannelLayerClosedError("the channel layer is closed")
            if self._shared is None:
                self._io_thread = IOThread(name=f"channels_rabbitmq {self.config.address}")
                link = BrokerLink(self.config, self._io_thread.loop, self.codec)
                self._shared = link
                self._by_queue[link.queue_name] = link
            return self._shared

    def stats(self) -> LayerStats:
        """A snapshot of every link, summed (see :mod:`.stats`); from any thread, no I/O.

        The lock (held elsewhere only for in-memory bookkeeping, never across I/O) makes a
        link that is being retired count once, live or retired, so no counter goes back."""
        self.check_fork()
        with self._lock:
            links = tuple(link.stats() for link in self._by_queue.values())
            retired, closed = self._retired, self.closed
        return layer_stats(links, retired, closed=closed)

    # Calling across loops -------------------------------------------------------------------

    async def call(self, link: BrokerLink, method: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``method(*args)`` on the link's loop, from whichever loop we are on.

        Bounded: a call that needs the broker waits at most ``connection_wait`` for a
        connection and ``connect_timeout`` for an answer; a loop that is not running, or
        stops, ends the wait with :class:`ChannelLayerClosedError` rather than a hang.
        """
        if link.loop is asyncio.get_running_loop():
            return await method(*args)
        if not link.loop.is_running():
            raise ChannelLayerClosedError(f"the event loop of {link.queue_name} is not running")
        coroutine = _call(method, *args)
        try:
            call = asyncio.run_coroutine_threadsafe(coroutine, link.loop)
        except RuntimeError:
            coroutine.close()  # never started: no "coroutine was never awaited"
            raise ChannelLayerClosedError(f"the event loop of {link.queue_name} is closed") from None
        bound = self.config.connection_wait + 2 * self.config.connect_timeout + LOOP_CHECK_INTERVAL
        deadline = time.monotonic() + bound
        outcome = asyncio.wrap_future(call)
        try:
            finished = await _done_while_running(outcome, link.loop, deadline)
        except asyncio.CancelledError:
            call.cancel()
            raise
        if not finished:
            call.cancel()
            if not link.loop.is_running():
                raise ChannelLayerClosedError(f"the event loop of {link.queue_name} stopped")
            raise BrokerTimeoutError(
                f"the call on the event loop of {link.queue_name} did not finish within {bound:g}s",
                operation=getattr(method, "__name__", "call"),
                timeout=bound,
            )
        if outcome.cancelled():  # cancelled over there: its loop is shutting down, or close()
            raise ChannelLayerClosedError(f"the event loop of {link.queue_name} is shutting down")
        return outcome.result()

    async def receive(self, link: BrokerLink, channel: str) -> dict[str, Any]:
        """``link.receive(channel)`` from any loop; a cancelled receive loses nothing."""
        caller = asyncio.get_running_loop()
        if link.loop is caller:
            return await link.receive(channel)
        # The channel's loop receives it for us; we watch that loop, which may end meanwhile.
        result: asyncio.Future[tuple[dict[str, Any], Handoff]] = caller.create_future()
        if not link.loop.is_running():
            raise StopConsumer()
        bridged = _receive_for(link, channel, caller, result)
        try:
            task = asyncio.run_coroutine_threadsafe(bridged, link.loop)
        except RuntimeError:
            bridged.close()  # never started: no "coroutine was never awaited"
            raise StopConsumer() from None  # the channel's loop is closed
        try:
            if not await _done_while_running(result, link.loop):
                result.cancel()
                task.cancel()
                raise StopConsumer()
        except asyncio.CancelledError:
            if result.done() and not result.cancelled() and result.exception() is None:
                result.result()[1].give_back()  # handed over just now: it is read next
            else:
                result.cancel()
                task.cancel()
            raise
        message, handoff = result.result()
        handoff.taken()
        return message

    async def flush_if_running(self, link: BrokerLink) -> None:
        """``link.flush()`` on its loop, unless that loop is stopped: then nothing of the link can run,
        and it is left as it is; it also steps out of the roll call, so that no flush() (this one
        included) waits for it until its loop runs again (see :mod:`.link.roll_call`)."""
        if link.loop is not asyncio.get_running_loop() and not link.loop.is_running():
            link.roll_call.step_out()
            return
        try:
            await self.call(link, link.flush)
        except ChannelLayerClosedError:
            if link.loop.is_running() or self.closed:
                raise
            # Its loop stopped (or closed) while flushing: as if it had been stopped before.
            link.roll_call.step_out()

    # Closing --------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close every link and the I/O thread; a few seconds per link at most."""
        self.check_fork()
        with self._lock:
            self.closed = True
            links = list(self._by_queue.values())
            for link in links:
                self._retired = retire(self._retired, link.stats())
            self._by_queue.clear()
            self._by_loop.clear()
            io_thread, self._io_thread = self._io_thread, None
            self._shared = None
        for link in links:
            if link.loop.is_closed():
                link.abandon()  # nothing can run there: its sockets are closed from here
                continue
            if not link.loop.is_running() and link.loop is not asyncio.get_running_loop():
                continue  # nothing can run there now; its connections die with the loop or the process
            try:
                await self.call(link, link.close)
            except (RuntimeError, ChannelLayerClosedError, asyncio.TimeoutError):
                pass  # its loop stopped meanwhile
        if io_thread is not None:
            await io_thread.stop()


# Receiving for another loop ---------------------------------------------------------------------


async def _receive_for(
    link: BrokerLink, channel: str, caller: asyncio.AbstractEventLoop, result: asyncio.Future[Any]
) -> None:
    """Receive on the link's loop on behalf of a ``receive()`` running on ``caller``.

    ``result`` (on ``caller``) gets ``(message, handoff)``; the caller then says
    ``handoff.taken()``, or ``handoff.give_back()`` if it was cancelled, and the message
    goes back to the front of the inbox. If that receive() is gone, or its loop, the
    message goes back too. Such receives of one channel take their turns: the next one
    starts only once the previous message was taken or is back in the inbox, so a
    cancelled receive never lets a later message overtake an earlier one.
    """
    in_turn = link.bridged_receives
    previous = in_turn.get(channel)
    settled: asyncio.Future[None] = link.loop.create_future()
    in_turn[channel] = settled

    def finish() -> None:
        if not settled.done():
            settled.set_result(None)
        if in_turn.get(channel) is settled:
            del in_turn[channel]

    settle_normal: Callable[[bool], None] | None = None  # a normal channel's: ack, or back to its queue
    try:
        if previous is not None:
            await asyncio.shield(previous)
        if not is_normal_channel(channel):
            message = await link.receive(channel, counted=False)  # delivered once the caller takes it
        else:
            message, settle_normal = await link.receive_normal_unsettled(channel)
    except asyncio.CancelledError:
        # The caller gave up (its result is cancelled already), or this loop is shutting
        # down: then the caller must not wait for ever.
        call_soon_on(caller, _settle_exception, result, StopConsumer())
        if previous is not None and not previous.done():
            previous.add_done_callback(lambda _: finish())  # the next one still waits its turn
        else:
            finish()
        raise
    except BaseException as error:
        call_soon_on(caller, _settle_exception, result, error)
        finish()
        return

    def put_back_and_finish() -> None:
        if not settled.done() and not handoff.is_taken:
            if settle_normal is not None:
                settle_normal(False)  # back to the queue, for any process
            else:
                link.router.put_back(channel, message, time.monotonic())
        finish()

    def delivered_and_finish() -> None:
        if settle_normal is not None:
            settle_normal(True)  # acknowledged only now that the caller has it
        else:
            link.counters.delivered += 1
        finish()

    handoff = Handoff(link.loop, delivered_and_finish, put_back_and_finish)

    def settle() -> None:  # on the caller's loop
        if result.done():  # that receive() was cancelled meanwhile
            handoff.give_back()
        else:
            result.set_result((message, handoff))

    def watch_caller() -> None:  # a loop closed with our callback pending never runs it
        if settled.done():
            return
        if caller.is_closed() or not caller.is_running():
            put_back_and_finish()
        else:
            link.loop.call_later(LOOP_CHECK_INTERVAL, watch_caller)

    if call_soon_on(caller, settle):
        link.loop.call_later(LOOP_CHECK_INTERVAL, watch_caller)
    else:
        put_back_and_finish()


class Handoff:
    """What the receiving loop says about a message handed over from the channel's loop.

    ``is_taken`` is set at once, from the receiving thread, so that the channel's loop never
    puts back a message that was taken while its "taken" callback was still on its way.
    """

    __slots__ = ("_give_back", "_loop", "_taken", "is_taken")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, taken: Callable[[], None], give_back: Callable[[], None]
    ) -> None:
        self._loop = loop
        self._taken = taken
        self._give_back = give_back
        self.is_taken = False

    def taken(self) -> None:
        self.is_taken = True
        call_soon_on(self._loop, self._taken)

    def give_back(self) -> None:
        if not call_soon_on(self._loop, self._give_back):
            logger.warning("a message handed to a cancelled receive() was lost: its channel's loop is closed")


def call_soon_on(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> bool:
    """Run ``callback`` on ``loop`` from any thread; False when that loop is closed."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        return False
    return True


def _settle_exception(result: asyncio.Future[Any], error: BaseException) -> None:
    if not result.done():
        result.set_exception(error)


async def _done_while_running(
    future: asyncio.Future[Any], loop: asyncio.AbstractEventLoop, deadline: float = float("inf")
) -> bool:
    """Wait for ``future``, made on another ``loop``; False once that loop stops running, or past
    ``deadline`` (``time.monotonic()``). It is checked every ``LOOP_CHECK_INTERVAL``."""
    while True:
        done, _ = await asyncio.wait((future,), timeout=LOOP_CHECK_INTERVAL)
        if done:
            return True
        if not loop.is_running() or time.monotonic() > deadline:
            return False


async def _call(method: Callable[..., Awaitable[T]], *args: Any) -> T:
    return await method(*args)


# The I/O thread -----------------------------------------------------------------------------------


#: How long building the I/O thread waits for its loop to run.
IO_THREAD_START_WAIT = 10.0


class IOThread:
    """An event loop running forever in a daemon thread, until :meth:`stop`.

    ``async_to_sync(layer.group_send)(...)`` from a Celery task, a management command or
    any plain thread runs on a brand-new event loop that asgiref closes after the call: a
    connection made there would die with it. Such callers share one link on this loop.
    The loop comes from the event loop policy: asyncio's own, or uvloop's.
    """

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._stopped: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._running = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        # Running before anyone calls into it: a call made meanwhile would find a loop "not running"
        # (and a thread that never starts running is a broken process, not a wait worth bounding).
        self._running.wait(IO_THREAD_START_WAIT)

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        loop.call_soon(self._running.set)
        try:
            loop.run_forever()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())  # getaddrinfo's threads
        finally:
            asyncio.set_event_loop(None)
            loop.close()
            self._stopped.set_result(None)

    async def stop(self) -> None:
        """Stop the loop (its tasks are cancelled) and wait for the thread to end."""
        if not self._stopped.done():
            try:
                self.loop.call_soon_threadsafe(self.loop.stop)
            except RuntimeError:
                pass  # already closed
            await asyncio.wrap_future(self._stopped)
        self._thread.join(timeout=5)
