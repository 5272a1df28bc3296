"""Flow control and liveness of one connection: how writes go out, when publishes may be
written, and whether the broker is still there.

- :class:`CoalescingWriter`: whatever a loop iteration queues goes out in one ``write()``;
  the first publish of an iteration goes out at once (latency), and a large batch is
  handed over before it grows past half the transport's high-water mark.
- :class:`PublishGate`: closed while the broker blocks the connection
  (``connection.blocked``, a resource alarm) or the transport's write buffer is over its
  high-water mark; other frames (acks, requests) are never held back.
- :class:`Heartbeats`: a heartbeat frame goes out when nothing else was written for half
  an interval; a broker silent for two intervals is taken as gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Any

#: Bytes the transport may buffer before publishing pauses (a bound on memory while the
#: broker reads slowly or not at all); writes of other frames are not held back.
WRITE_BUFFER_HIGH = 1024 * 1024


def tune_transport(transport: Any) -> None:
    """The write buffer's high-water mark, and TCP_NODELAY (best effort)."""
    transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
    sock = transport.get_extra_info("socket")  # uvloop gives a stand-in with the same methods
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        # Both loops already set it. uvloop's stand-in raises ValueError, not OSError, once its
        # transport is closed.
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class CoalescingWriter:
    """Takes the protocol's outgoing bytes and writes them, once per loop iteration."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, take: Callable[[], bytes], write: Callable[[bytes], None]
    ) -> None:
        self._loop = loop
        self._take = take
        self._write = write
        self._scheduled = False
        self._held_back = 0  # bytes of publishes queued this loop iteration, not yet written

    def schedule(self) -> None:
        """Write at the end of this loop iteration, with whatever else it queues."""
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.write_now)

    def write_now(self) -> None:
        self._scheduled = False
        self._write_queued()

    def published(self, size: int) -> None:
        """A publish of ``size`` body bytes was queued."""
        if not self._scheduled:
            # The first publish of a loop iteration goes out at once (latency); the rest of
            # the iteration's publishes go out together in the write scheduled here (throughput).
            self._write_queued()
            self._scheduled = True
            self._loop.call_soon(self.write_now)
        else:
            self._held_back += size
            if self._held_back > WRITE_BUFFER_HIGH // 2:
                # Hand a large batch to the transport now: past its high-water mark it pauses
                # us (the publish gate closes) before the next publish of this iteration.
                self._write_queued()

    def _write_queued(self) -> None:
        self._held_back = 0
        data = self._take()
        if data:
            self._write(data)


class PublishGate:
    """Whether publishes may be written: not while the broker blocks the connection (a
    resource alarm), nor while the transport's buffer is over its high-water mark."""

    def __init__(self) -> None:
        self.blocked_reason: str | None = None
        self._buffer_full = False
        self._open = asyncio.Event()
        self._open.set()

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    def set_blocked(self, reason: str | None) -> None:
        self.blocked_reason = reason
        self._update()

    def set_buffer_full(self, full: bool) -> None:
        self._buffer_full = full
        self._update()

    def release(self) -> None:
        """Wake every waiter for good: the connection is over."""
        self._open.set()

    async def wait(self) -> None:
        await self._open.wait()

    def _update(self) -> None:
        if self.blocked_reason is None and not self._buffer_full:
            self._open.set()
        else:
            self._open.clear()


class Heartbeats:
    """A heartbeat goes out when nothing else was written for half an interval; a broker that
    said nothing for two intervals is taken as gone (``missed`` decides, and says so)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        send: Callable[[], None],
        missed: Callable[[int], bool],
    ) -> None:
        self._loop = loop
        self._send = send
        self._missed = missed
        self._timer: asyncio.TimerHandle | None = None
        self.sent_since_tick = False

    def start(self, interval: int) -> None:
        if interval > 0:
            self._timer = self._loop.call_later(interval / 2, self._tick, interval)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _tick(self, interval: int) -> None:
        if self._missed(interval):
            return
        if not self.sent_since_tick:
            self._send()
        self.sent_since_tick = False
        self._timer = self._loop.call_later(interval / 2, self._tick, interval)
