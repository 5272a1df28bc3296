"""The reconnect notice (``reconnect_notice_type``): after a link's queue was lost and declared
again, each of its channels is told once that messages sent to it meanwhile may have been lost.

- At the recovery, every channel known to be alive (buffered messages, a waiting ``receive()``,
  a group membership) gets ``{"type": reconnect_notice_type}`` in its inbox at once.
- A consumer that was handling a message at that moment had no ``receive()`` waiting. For
  ``expiry`` seconds after the recovery (the *window*), a channel of the queue that was not told
  yet is told at its next ``receive()``, before what arrived for it since, unless it was made
  after the recovery: it missed nothing.
- A later outage starts over: one notice per channel per lost queue.
"""

from __future__ import annotations

import asyncio
import time

from ..amqp.connection import AmqpConnection
from ..routing import LocalRouter
from ..wire import queue_of
from .part import LinkPart


class ReconnectNotice(LinkPart):
    """The notices of one link's channels; off when ``notice_type`` is None."""

    def __init__(
        self,
        notice_type: str | None,
        *,
        queue_name: str,
        router: LocalRouter,
        loop: asyncio.AbstractEventLoop,
        window: float,
    ) -> None:
        self.notice_type = notice_type
        self._queue_name = queue_name
        self._router = router
        self._loop = loop
        self._window = window
        #: While the window is open: the channels told, or made since the recovery.
        self._settled: set[str] | None = None
        self._window_end: asyncio.TimerHandle | None = None
        #: ``receive()`` checks this attribute alone, outside the window.
        self.window_open = False
        self._consumed_before = False  # a consuming connection was up: the next one is a new queue

    def consuming_up(self, connection: AmqpConnection) -> None:
        if self._consumed_before:  # a new queue: the exclusive one went with the lost connection
            self.queue_recovered()
        self._consumed_before = True

    def close(self) -> None:
        self.close_window()

    def queue_recovered(self) -> None:
        """The queue is consumed again after it was lost: tell every channel known to be alive."""
        if self.notice_type is None:
            return
        settled: set[str] = set()
        now = time.monotonic()
        for channel in self._router.channels():
            if queue_of(channel) == self._queue_name:  # not a normal channel's waiting receive
                self._router.deliver(channel, {"type": self.notice_type}, now)
                settled.add(channel)
        self._settled = settled
        self.window_open = True
        if self._window_end is not None:
            self._window_end.cancel()
        self._window_end = self._loop.call_later(self._window, self.close_window)

    def before_receive(self, channel: str) -> None:
        """A ``receive()`` during the window: a channel not told yet is told now, first."""
        settled = self._settled
        if settled is None or channel in settled:
            return
        settled.add(channel)
        if self.notice_type is not None and queue_of(channel) == self._queue_name:
            # In front of what its inbox holds: all of that came after the recovery.
            self._router.put_back(channel, {"type": self.notice_type}, time.monotonic())

    def channel_made(self, channel: str) -> None:
        """A channel made after the recovery missed nothing."""
        if self._settled is not None:
            self._settled.add(channel)

    def close_window(self) -> None:
        self._settled = None
        self.window_open = False
        if self._window_end is not None:
            self._window_end.cancel()
            self._window_end = None
