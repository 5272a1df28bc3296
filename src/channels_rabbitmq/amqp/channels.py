"""What a connection keeps per AMQP channel: its requests and its unconfirmed publishes.

- :class:`ChannelRequests`: requests on a channel go one at a time, in order, each
  resolving its own future with the reply; a request the broker refuses (it closes the
  channel) fails alone, and the channel is reopened and set up again for the next ones.
- :class:`PublishConfirms`: one future per publish on a confirming channel, resolved by the
  broker's ``basic.ack`` (True) or ``basic.nack`` (False), ``multiple`` included; and the
  ``mandatory`` publishes that may come back unrouted (``basic.return``), matched to their
  publish by exchange, routing key and body, since a return carries no publish tag.

Neither does I/O: the connection sends what they ask for and feeds them the broker's events.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from pamqp import commands
from pamqp.base import Frame

from . import protocol as amqp
from .errors import ChannelRefused, RequestNotEncodable

logger = logging.getLogger(__name__)


class PublishOutcome(enum.Enum):
    """What became of a ``mandatory`` publish."""

    ACCEPTED = "accepted"  # routed to at least one queue, and confirmed (basic.ack)
    REFUSED = "refused"  # basic.nack: a queue refused it (full, with reject-publish)
    RETURNED = "returned"  # no queue took it (basic.return, then basic.ack)


#: How a returned message is matched to its publish: (exchange, routing key, body).
ReturnKey = tuple[str, str, bytes]


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
            self._send_head(channel_id)
        return future

    def configure(self, channel_id: int, setup: list[Frame], *, essential: bool) -> None:
        """Remember how a channel is set up, to set it up again after the broker closes it."""
        self._setup[channel_id] = setup
        if essential:
            self.essential.add(channel_id)

    def pending(self, channel_id: int) -> int:
        """How many requests of the channel are sent or waiting to be."""
        queue = self._queues.get(channel_id)
        return len(queue) if queue else 0

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
        self._send_head(channel_id)

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
        self._send_head(channel_id)

    def fail_all(self, error: BaseException) -> None:
        for queue in self._queues.values():
            for _method, future in queue:
                if not future.done():
                    future.set_exception(error)
            queue.clear()

    def _send_head(self, channel_id: int) -> None:
        """Send the channel's first queued request. One that cannot be encoded fails alone (its
        future gets :class:`RequestNotEncodable`) and the next one goes instead: a bad request
        never holds up the ones behind it."""
        queue = self._queues.get(channel_id)
        while queue:
            method, future = queue[0]
            try:
                self._send_method(channel_id, method)
            except RequestNotEncodable as error:
                queue.popleft()
                if not future.done():
                    future.set_exception(error)
                continue
            self._progress[channel_id] = self._loop.time()
            return


class PublishConfirms:
    """The publishes awaiting the broker's confirm, per confirming channel, by delivery tag."""

    def __init__(self) -> None:
        self._pending: dict[int, OrderedDict[int, asyncio.Future[bool]]] = {}
        # Mandatory publishes not confirmed yet, per channel: their tags by return key, oldest
        # first; and the tags of those that came back.
        self._may_return: dict[int, dict[ReturnKey, deque[int]]] = {}
        self._returned: dict[int, set[int]] = {}

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

    def outcome(
        self, channel_id: int, tag: int, key: ReturnKey, confirmed: asyncio.Future[bool]
    ) -> asyncio.Future[PublishOutcome]:
        """The outcome of a ``mandatory`` publish whose confirm is ``confirmed``: it may come back
        (``basic.return``) before that confirm."""
        self._may_return.setdefault(channel_id, {}).setdefault(key, deque()).append(tag)
        outcome: asyncio.Future[PublishOutcome] = confirmed.get_loop().create_future()

        def settle(confirmed: asyncio.Future[bool]) -> None:
            returned = self._settle_mandatory(channel_id, tag, key)
            if confirmed.cancelled():
                outcome.cancel()
                return
            error = confirmed.exception()  # retrieved, whether anyone still waits or not
            if outcome.done():
                return
            if error is not None:
                outcome.set_exception(error)
            elif returned:
                outcome.set_result(PublishOutcome.RETURNED)
            else:
                outcome.set_result(PublishOutcome.ACCEPTED if confirmed.result() else PublishOutcome.REFUSED)

        confirmed.add_done_callback(settle)
        return outcome

    def on_return(self, event: amqp.MessageReturned) -> bool:
        """Mark the publish that came back (the oldest one of that key); False when none matches.

        RabbitMQ returns a message before it confirms it, so the mark is there when the
        confirm resolves the publish."""
        by_key = self._may_return.get(event.channel_id)
        key = (event.exchange, event.routing_key, event.body)
        tags = by_key.get(key) if by_key else None
        if not tags or by_key is None:
            return False
        tag = tags.popleft()
        if not tags:
            del by_key[key]
        self._returned.setdefault(event.channel_id, set()).add(tag)
        return True

    def _settle_mandatory(self, channel_id: int, tag: int, key: ReturnKey) -> bool:
        """Forget a ``mandatory`` publish that was confirmed; True when it had come back."""
        returned = self._returned.get(channel_id)
        if returned and tag in returned:
            returned.discard(tag)
            return True
        by_key = self._may_return.get(channel_id)
        tags = by_key.get(key) if by_key else None
        if tags and by_key is not None:
            if tag in tags:
                tags.remove(tag)
            if not tags:
                del by_key[key]
        return False

    def fail_channel(self, channel_id: int, error: BaseException) -> None:
        self._may_return.pop(channel_id, None)
        self._returned.pop(channel_id, None)
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
