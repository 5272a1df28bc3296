"""What a connection keeps per AMQP channel: its requests and its unconfirmed publishes.

- :class:`ChannelRequests`: requests on a channel go one at a time, in order, each
  resolving its own future with the reply; a request the broker refuses (it closes the
  channel) fails alone, and the channel is reopened and set up again for the next ones.
- :class:`PublishConfirms`: one future per publish on a confirming channel, resolved by the
  broker's ``basic.ack`` (True) or ``basic.nack`` (False), ``multiple`` included.

Neither does I/O: the connection sends what they ask for and feeds them the broker's events.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from pamqp import commands
from pamqp.base import Frame

from . import protocol as amqp
from .errors import ChannelRefused

logger = logging.getLogger(__name__)


class ChannelRequests:
    """The requests of every channel of one connection, and how to set each channel up again."""

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Callable[[int, Frame], None]) -> None:
        self._loop = loop
        self._send_method = send
        self._queues: dict[int, deque[tuple[Frame, asyncio.Future[Frame]]]] = {}
        self._setup: dict[int, list[Frame]] = {}
        self._progress: dict[int, float] = {}  # channel -> last request sent or reply received
        #: Channels whose loss ends the connection (publishing, consuming): see ``configure``.
        self.essential: set[int] = set()

    def call(self, channel_id: int, method: Frame) -> asyncio.Future[Frame]:
        """Queue a request; it is sent once the ones ahead of it on its channel are answered."""
        future: asyncio.Future[Frame] = self._loop.create_future()
        queue = self._queues.setdefault(channel_id, deque())
        queue.append((method, future))
        if len(queue) == 1:
            self._send(channel_id, method)
        return future

    def configure(self, channel_id: int, setup: list[Frame], *, essential: bool) -> None:
        """Remember how a channel is set up, to set it up again after the broker closes it."""
        self._setup[channel_id] = setup
        if essential:
            self.essential.add(channel_id)

    def last_progress(self, channel_id: int) -> float | None:
        """When a request was last sent or answered on the channel (the loop's clock), or None."""
        return self._progress.get(channel_id)

    def on_reply(self, channel_id: int, method: Frame) -> None:
        queue = self._queues.get(channel_id)
        if not queue:
            logger.debug("unexpected %s on channel %d", method.name, channel_id)
            return
        _request, future = queue.popleft()
        self._progress[channel_id] = self._loop.time()
        if not future.done():
            future.set_result(method)
        if queue:
            self._send(channel_id, queue[0][0])

    def on_channel_closed(self, event: amqp.ChannelClosed) -> None:
        """The request being answered fails with the broker's reason; the rest wait."""
        queue = self._queues.get(event.channel_id)
        if queue:
            method, future = queue.popleft()
            if not future.done():
                future.set_exception(ChannelRefused(event.reply_code, event.reply_text, method.name))

    def reopen(self, channel_id: int) -> None:
        """Open the channel again, set it up, then go on with the requests still queued."""
        queue = self._queues.setdefault(channel_id, deque())
        for method in reversed([commands.Channel.Open(), *self._setup.get(channel_id, [])]):
            future = self._loop.create_future()
            future.add_done_callback(_log_failed_reopen)
            queue.appendleft((method, future))
        self._send(channel_id, queue[0][0])

    def fail_all(self, error: BaseException) -> None:
        for queue in self._queues.values():
            for _method, future in queue:
                if not future.done():
                    future.set_exception(error)
            queue.clear()

    def _send(self, channel_id: int, method: Frame) -> None:
        self._progress[channel_id] = self._loop.time()
        self._send_method(channel_id, method)


class PublishConfirms:
    """The publishes awaiting the broker's confirm, per confirming channel, by delivery tag."""

    def __init__(self) -> None:
        self._pending: dict[int, OrderedDict[int, asyncio.Future[bool]]] = {}

    def enable(self, channel_id: int) -> None:
        self._pending.setdefault(channel_id, OrderedDict())

    def waiting_on(self, channel_id: int) -> OrderedDict[int, asyncio.Future[bool]] | None:
        """The channel's publishes by tag (add to it), or None when the channel does not confirm."""
        return self._pending.get(channel_id)

    def on_confirm(self, event: amqp.PublishConfirmed) -> None:
        pending = self._pending.get(event.channel_id)
        if not pending:
            return
        if event.multiple:
            while pending:
                tag = next(iter(pending))
                if tag > event.delivery_tag:
                    break
                future = pending.pop(tag)
                if not future.done():
                    future.set_result(event.accepted)
        else:
            waiting = pending.pop(event.delivery_tag, None)
            if waiting is not None and not waiting.done():
                waiting.set_result(event.accepted)

    def fail_channel(self, channel_id: int, error: BaseException) -> None:
        pending = self._pending.get(channel_id)
        if pending:
            for future in pending.values():
                if not future.done():
                    future.set_exception(error)
            pending.clear()

    def fail_all(self, error: BaseException) -> None:
        for channel_id in self._pending:
            self.fail_channel(channel_id, error)

    def any_pending(self) -> bool:
        return any(self._pending.values())


def _log_failed_reopen(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("could not reopen an AMQP channel: %s", future.exception())
