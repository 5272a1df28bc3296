"""Control messages: group calls for another process's channel, and ``flush()`` for every process.

A process's queue is exclusive: no other connection may bind it (RabbitMQ answers
RESOURCE_LOCKED), and only that process knows its channels' memberships. So a
``group_add()`` or ``group_discard()`` for another process's channel travels there:

- the request is published to the owner's queue (default exchange, routing key = the part
  of the channel name before ``!``) as ``mandatory``: when that queue is gone (its process
  ended), RabbitMQ returns the message and the call returns at once, without error;
- the owner's link knows it by its ``asgi_control`` header, makes the group call as its own
  (the binding first) and replies to the requester's queue; the call returns with the reply,
  or raises :class:`BrokerTimeoutError` when none came within ``connect_timeout``.

``flush()`` is broadcast on the groups exchange with the routing key ``!flush``, which every
link's queue is bound with: each link flushes, then replies. The requester knows how many
replies to wait for from the *roll call*: every link consumes from one shared queue that
never holds a message, whose consumer count RabbitMQ gives on a passive declaration.

Bodies are msgpack maps, sealed like messages when ``encryption_keys`` is set (for
:func:`~channels_rabbitmq.wire.control_destination`), so that nobody without the keys can
make a process join or leave a group, or flush. A request is performed once by each link: a
replayed body is dropped, and so are the copies of a ``flush()`` that its requester publishes
again while replies are missing (see :meth:`Control.flush`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgpack
from channels.exceptions import ChannelFull

from ..amqp.channels import PublishOutcome
from ..amqp.connection import AmqpConnection
from ..amqp.errors import reply_code
from ..amqp.protocol import Delivery
from ..config import LayerConfig
from ..exceptions import (
    BrokerConnectionLostError,
    BrokerRefusedError,
    BrokerTimeoutError,
    ChannelLayerClosedError,
    RabbitmqLayerError,
)
from ..names import is_normal_channel, is_valid_channel_name, is_valid_group_name
from ..wire import (
    CONTROL_HEADER,
    FLUSH_ROUTING_KEY,
    control_destination,
    control_properties,
    is_layer_queue,
    queue_of,
)
from ..wire.codec import MessageCodec
from ..wire.encryption import CLOCK_SKEW_ALLOWANCE, acceptance_span
from ..wire.serializers import MalformedMessage
from .channel_plan import PUBLISH_CHANNEL
from .errors import translated
from .part import LinkPart
from .topology import random_name, retrieve

logger = logging.getLogger(__name__)

OP_GROUP_ADD = "group_add"
OP_GROUP_DISCARD = "group_discard"
OP_FLUSH = "flush"
OP_REPLY = "reply"

#: Requests from other processes one link works on at once; more are dropped (and time out there).
MAX_PERFORMING = 10_000
#: Request ids remembered against replays (with ``encryption_keys``); the oldest go first.
MAX_REMEMBERED = 100_000
#: While a flush() misses replies, how often it counts the roll call again (seconds).
RECOUNT_EVERY = 0.25
#: A request's id: what _Request makes (random_name(16)).
_REQUEST_ID = re.compile(r"[A-Za-z0-9]{16}")
#: The fields of each control message, required and optional: nothing else is accepted.
_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    OP_FLUSH: (frozenset({"id", "reply_to"}), frozenset()),
    OP_GROUP_ADD: (frozenset({"id", "reply_to", "group", "channel"}), frozenset()),
    OP_GROUP_DISCARD: (frozenset({"id", "reply_to", "group", "channel"}), frozenset()),
    OP_REPLY: (frozenset({"id", "queue"}), frozenset({"refused"})),
}


class ControlledLink(Protocol):
    """What the control messages need of a :class:`~.link.BrokerLink`."""

    queue_name: str

    async def group_add(self, group: str, channel: str) -> None: ...
    async def group_discard(self, group: str, channel: str) -> None: ...
    async def flush(self) -> None: ...
    async def publish(self, exchange: bytes, routing_key: bytes, properties: bytes, body: bytes) -> bool: ...
    async def control_ready(self) -> AmqpConnection: ...
    async def count_links(self) -> int: ...


class _Request:
    """A request of ours waiting for its replies (one per link that performs it)."""

    __slots__ = ("answered", "expected", "id", "replies")

    def __init__(self, loop: asyncio.AbstractEventLoop, expected: int) -> None:
        self.id = random_name(16)
        self.expected = expected
        self.replies: dict[str, dict[str, Any]] = {}  # by the replying link's queue
        self.answered: asyncio.Future[None] = loop.create_future()
        self.answered.add_done_callback(retrieve)
        if expected <= 0:
            self.answered.set_result(None)

    def add(self, reply: dict[str, Any]) -> None:
        self.replies[reply["queue"]] = reply
        if len(self.replies) >= self.expected and not self.answered.done():
            self.answered.set_result(None)


class Control(LinkPart):
    """One link's control messages: the requests it makes, and those it performs for others."""

    def __init__(
        self, config: LayerConfig, loop: asyncio.AbstractEventLoop, link: ControlledLink, codec: MessageCodec
    ) -> None:
        self.config = config
        self.loop = loop
        self._link = link
        self._codec = codec
        self._queue_name = link.queue_name
        self._requests: dict[str, _Request] = {}
        self._performing: set[asyncio.Task[Any]] = set()
        # Request ids performed lately (id -> when): a request is performed once, whether the
        # copy is a flush() published again while it misses replies, or a sealed request replayed.
        self._performed: OrderedDict[str, float] = OrderedDict()
        # A sealed request opens for acceptance_span() after it first arrives (its stamp may be a
        # minute ahead of our clock): its id is remembered that long, so a replay finds it.
        # Unsealed, a flush() publishes copies for at most connect_timeout.
        self._replay_window = max(acceptance_span(config.expiry), config.connect_timeout) + 1
        # ... and one sealed before this link started cannot be for it (it was not bound then, the
        # sender's clock allowed a minute behind): a replay captured elsewhere, refused.
        self._started = time.time()

    # Asking other links ------------------------------------------------------------------------

    async def group_add(self, group: str, channel: str) -> None:
        """Have the link that owns ``channel`` add it to ``group``; see :meth:`_group_call`."""
        await self._group_call(OP_GROUP_ADD, group, channel)

    async def group_discard(self, group: str, channel: str) -> None:
        """Have the link that owns ``channel`` remove it from ``group``; see :meth:`_group_call`."""
        await self._group_call(OP_GROUP_DISCARD, group, channel)

    async def _group_call(self, operation: str, group: str, channel: str) -> None:
        """Returns once the owner made the call (bound or unbound), or at once when its queue is
        gone; raises :class:`BrokerTimeoutError` when it did not answer within ``connect_timeout``,
        ``ChannelFull`` when its queue refused the request, :class:`BrokerRefusedError` when the
        broker refused the owner's bind."""
        publisher = await self._link.control_ready()
        deadline = self.loop.time() + self.config.connect_timeout
        owner = queue_of(channel)
        request = self._start(1)
        try:
            fields = {"group": group, "channel": channel}
            outcome = self._publish(publisher, request, operation, b"", owner, fields)
            if not await self._answered(operation, request, outcome, deadline):
                return  # no such queue: its process is gone, and nothing can reach the channel anyway
        finally:
            self._finish(request)
        refused = next(iter(request.replies.values())).get("refused")
        if refused is not None:
            code, text, what = refused
            raise BrokerRefusedError(reply_code(code), text, what)

    async def flush(self) -> None:
        """Have every link (of every process) flush; returns once each one counted by the roll
        call has replied, or raises :class:`BrokerTimeoutError` after ``connect_timeout``.

        The roll call is counted again every :data:`RECOUNT_EVERY` seconds while replies are
        missing: a link that went away meanwhile (its process ended, its event loop was closed)
        is not waited for. Each time, the request is published again, under the same id: a link
        that joined the roll call after the first one was routed is counted, and hears it then
        (links that have performed it already ignore the copy)."""
        publisher = await self._link.control_ready()
        deadline = self.loop.time() + self.config.connect_timeout
        expected = await self._link.count_links()
        request = self._start(expected)
        exchange = self.config.groups_exchange.encode()

        def publish() -> asyncio.Future[PublishOutcome]:
            return self._publish(publisher, request, OP_FLUSH, exchange, FLUSH_ROUTING_KEY, {})

        outcome = publish()
        recounting = self.loop.create_task(self._recount(request, publish))
        try:
            if not await self._answered(OP_FLUSH, request, outcome, deadline, broadcast=True):
                return  # no queue is bound for it: there is no link to flush
            if request.answered.done():
                return
            # Some did not answer: fine if they have gone since the roll call.
            if await self._link.count_links() <= len(request.replies):
                return
        finally:
            recounting.cancel()
            self._finish(request)
        raise BrokerTimeoutError(
            f"flush(): {len(request.replies)} of {expected} channel layer queues flushed and answered "
            f"within connect_timeout={self.config.connect_timeout:g}s; the others may be stuck",
            operation=OP_FLUSH,
            timeout=self.config.connect_timeout,
            url=self.config.description,
        )

    async def _recount(self, request: _Request, publish_again: Callable[[], object]) -> None:
        """While ``request`` misses replies, count the roll call again now and then; once no more
        links answer it than have replied, the request is answered. Otherwise it is published
        again: one of the links counted may have joined after the request was routed (a link
        binds ``!flush`` before it joins), and can hear only a later copy."""
        while not request.answered.done():
            await asyncio.sleep(RECOUNT_EVERY)
            try:
                still_there = await self._link.count_links()
                if request.answered.done():
                    return
                if still_there <= len(request.replies):
                    request.answered.set_result(None)
                    return
                publish_again()
            except Exception:  # the wait for replies reports the connection's trouble
                return

    def _start(self, expected: int) -> _Request:
        request = _Request(self.loop, expected)
        self._requests[request.id] = request
        return request

    def _finish(self, request: _Request) -> None:
        self._requests.pop(request.id, None)

    def _publish(
        self,
        publisher: AmqpConnection,
        request: _Request,
        operation: str,
        exchange: bytes,
        routing_key: str,
        fields: dict[str, Any],
    ) -> asyncio.Future[PublishOutcome]:
        body = self._seal(operation, routing_key, {"id": request.id, "reply_to": self._queue_name, **fields})
        with translated(self.config.description):
            outcome = publisher.publish_mandatory(
                PUBLISH_CHANNEL, exchange, routing_key.encode(), control_properties(operation), body
            )
        outcome.add_done_callback(retrieve)
        return outcome

    async def _answered(
        self,
        operation: str,
        request: _Request,
        outcome: asyncio.Future[PublishOutcome],
        deadline: float,
        broadcast: bool = False,
    ) -> bool:
        """Wait for the broker's confirm and the replies; False when the request came back (no
        queue took it).

        Raises when the connection was lost, when the broker refused the request (its queue is
        full: ``ChannelFull``), and when the replies do not come before ``deadline``. For a
        ``broadcast``, missing replies and a refusal (some queue is full) are the caller's to
        judge: True once the broker has confirmed it, or the deadline has passed.
        """
        pending: set[asyncio.Future[Any]] = {outcome, request.answered}
        while pending:
            remaining = deadline - self.loop.time()
            done: set[asyncio.Future[Any]] = set()
            if remaining > 0:
                done, pending = await asyncio.wait(
                    pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
            if not done:
                if broadcast and outcome.done():
                    return True
                raise BrokerTimeoutError(
                    f"no answer to {operation} within connect_timeout={self.config.connect_timeout:g}s: "
                    "the process it was for is stuck or not consuming (the call may still be made)",
                    operation=operation,
                    timeout=self.config.connect_timeout,
                    url=self.config.description,
                )
            if request.answered in done:
                request.answered.result()  # raises when the connection was lost, or the layer closed
            if outcome in done:
                with translated(self.config.description):
                    result = outcome.result()
                if result is PublishOutcome.RETURNED:
                    return False
                if result is PublishOutcome.REFUSED and not broadcast:
                    raise ChannelFull(
                        f"RabbitMQ refused the {operation} request (basic.nack): the queue it was sent "
                        "to is at remote_capacity"
                    )
        return True

    # Performing for other links ---------------------------------------------------------------------

    def on_message(self, delivery: Delivery) -> None:
        """A control message delivered to this link (from ``data_received``: nothing waits here).

        Raises :class:`MalformedMessage` for one to drop: unsealed, not for this link, or
        not a request this layer makes.
        """
        headers = delivery.headers or {}
        operation = headers.get(CONTROL_HEADER)
        if operation not in _FIELDS:
            raise MalformedMessage(f"unknown control operation {operation!r}")
        # Where the layer's own protocol sends each one: flush() to every link through the groups
        # exchange; group calls and replies to one link's queue through the default exchange.
        came_by = (delivery.exchange, delivery.routing_key)
        if came_by != (
            (self.config.groups_exchange, FLUSH_ROUTING_KEY)
            if operation == OP_FLUSH
            else ("", self._queue_name)
        ):
            raise MalformedMessage(f"{operation} control message by an unexpected route {came_by!r}")
        fields, _body = self._codec.decode(
            delivery.body, control_destination(operation, delivery.routing_key)
        )
        required, optional = _FIELDS[operation]
        if not required <= fields.keys() <= required | optional:
            raise MalformedMessage(f"{operation} control message with other fields than the layer's")
        request_id, queue = fields["id"], fields["reply_to" if operation != OP_REPLY else "queue"]
        # Replies go to a link's own queue, never to a normal channel's or any other name.
        if type(request_id) is not str or not _REQUEST_ID.fullmatch(request_id) or not is_layer_queue(queue):
            raise MalformedMessage(f"{operation} control message without a valid id and queue")
        if operation == OP_REPLY:
            refused = fields.get("refused")
            if refused is not None and (
                type(refused) is not list or list(map(type, refused)) != [int, str, str]
            ):
                raise MalformedMessage("reply control message with a malformed refusal")
            request = self._requests.get(request_id)
            if request is not None:
                request.add(fields)
            return
        action: Callable[[], Awaitable[None]]
        if operation == OP_FLUSH:
            if queue == self._queue_name:
                if self._first_time(request_id):  # not for its copies
                    self._reply(request_id, queue, {})  # our own flush() has flushed this link already
                return
            action = self._link.flush
        else:
            group, channel = fields.get("group"), fields.get("channel")
            # As strict as the public API's arguments (names.py): the sender may be anyone on the vhost.
            if not is_valid_group_name(group):
                raise MalformedMessage(f"{operation} control message with no valid group name")
            if (
                not is_valid_channel_name(channel)
                or is_normal_channel(channel)
                or queue_of(channel) != self._link.queue_name
            ):
                raise MalformedMessage(f"{operation} control message for a channel of another queue")
            method = self._link.group_add if operation == OP_GROUP_ADD else self._link.group_discard
            action = functools.partial(method, group, channel)
        cipher = self._codec.cipher
        if cipher is not None and cipher.sealed_at(delivery.body) < self._started - CLOCK_SKEW_ALLOWANCE:
            raise MalformedMessage(f"{operation} control message sealed before this link started: a replay")
        if not self._first_time(request_id):
            if operation == OP_FLUSH:
                return  # a copy of a flush() we performed: its requester publishes it again while it waits
            raise MalformedMessage(f"{operation} control message performed before: dropped as a replay")
        if len(self._performing) >= MAX_PERFORMING:
            raise MalformedMessage(f"{operation} control message over {MAX_PERFORMING} at work at once")
        task = self.loop.create_task(self._perform(operation, action, request_id, queue))
        self._performing.add(task)
        task.add_done_callback(self._performing.discard)

    def _first_time(self, request_id: str) -> bool:
        now = time.monotonic()
        performed = self._performed
        while performed and (
            len(performed) >= MAX_REMEMBERED or next(iter(performed.values())) < now - self._replay_window
        ):
            performed.popitem(last=False)
        if request_id in performed:
            return False
        performed[request_id] = now
        return True

    async def _perform(
        self, operation: str, action: Callable[[], Awaitable[None]], request_id: str, reply_to: str
    ) -> None:
        outcome: dict[str, Any] = {}
        try:
            await action()
        except BrokerRefusedError as error:
            outcome["refused"] = [int(error.reply_code), error.reply_text, error.request]
        except ChannelLayerClosedError:
            return  # closing: the queue goes, and the requester hears nothing
        except RabbitmqLayerError as error:
            logger.warning("could not perform %s for another process: %s", operation, error)
            return  # it times out there
        self._reply(request_id, reply_to, outcome)

    def _reply(self, request_id: str, reply_to: str, outcome: dict[str, Any]) -> None:
        body = self._seal(OP_REPLY, reply_to, {"id": request_id, "queue": self._queue_name, **outcome})
        sending = self.loop.create_task(
            self._link.publish(b"", reply_to.encode(), control_properties(OP_REPLY), body)
        )
        self._performing.add(sending)
        sending.add_done_callback(self._replied)

    def _replied(self, sending: asyncio.Task[bool]) -> None:
        self._performing.discard(sending)
        if not sending.cancelled() and sending.exception() is not None:
            logger.debug("could not reply to a control message: %s", sending.exception())

    def _seal(self, operation: str, routing_key: str, fields: dict[str, Any]) -> bytes:
        body: bytes = msgpack.packb(fields, use_bin_type=True)
        return self._codec.seal(body, control_destination(operation, routing_key))

    # The link's connections ---------------------------------------------------------------------------

    def consuming_down(self) -> None:
        """The consuming connection ended, and our queue with it: replies to it are lost."""
        self._fail_requests(
            BrokerConnectionLostError(
                "the connection was lost while waiting for another process's answer: "
                "the call may or may not have been made"
            )
        )

    def close(self) -> None:
        for task in list(self._performing):
            task.cancel()
        self._fail_requests(ChannelLayerClosedError("the channel layer was closed during the call"))

    def _fail_requests(self, error: BaseException) -> None:
        for request in self._requests.values():
            if not request.answered.done():
                request.answered.set_exception(error)
