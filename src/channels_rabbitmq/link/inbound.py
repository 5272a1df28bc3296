"""The inbound side of a link: deliveries into the router, acknowledgements, expiry.

Every delivery of the consuming connection comes here straight from ``data_received``
(no task per message): it is decoded, checked and handed to the
:class:`~channels_rabbitmq.routing.LocalRouter`. Deliveries are acknowledged in batches
once they are in memory, unless the router is full: then RabbitMQ keeps the rest until
room is made. A timer expires buffered messages and group memberships.

The queue is exclusive: it goes with its connection, so an ack protects nothing and only
paces delivery (RabbitMQ sends at most ``prefetch_count`` unacknowledged messages). So an ack
is written at once when half of the window awaits one, and otherwise at most
:data:`ACK_DELAY` later, covering everything that arrived meanwhile: under steady traffic
that spreads messages out (a chat, at a thousand messages a second), one ack per delivery
cost RabbitMQ a quarter of its CPU per message (``python -m bench e2e``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from ..amqp.connection import AmqpConnection
from ..amqp.protocol import Delivery, UndecodableDelivery
from ..config import LayerConfig
from ..logs import RateLimitedLogger
from ..names import is_normal_channel
from ..routing import LocalRouter
from ..stats import DROPPED_CHANNEL_FULL, DROPPED_EXPIRED, DROPPED_TOO_LARGE, DROPPED_UNDECODABLE
from ..wire import CHANNEL_HEADER, CONTROL_HEADER, queue_of
from ..wire.codec import MessageCodec
from ..wire.serializers import MalformedMessage
from .channel_plan import CONSUME_CHANNEL
from .control import Control
from .part import LinkPart

logger = logging.getLogger(__name__)

#: How long an ack may wait for more deliveries to cover (seconds), below half the prefetch window.
ACK_DELAY = 0.05


class Inbound(LinkPart):
    """Deliveries to the router, the ack window and expiry housekeeping of one link's queue."""

    def __init__(
        self,
        config: LayerConfig,
        loop: asyncio.AbstractEventLoop,
        *,
        queue_name: str,
        router: LocalRouter,
        codec: MessageCodec,
        control: Control,
        consuming_connection: Callable[[], AmqpConnection | None],
        on_group_emptied: Callable[[str], None],
        on_normal_delivery: Callable[[Delivery | UndecodableDelivery, AmqpConnection], None],
        dropped: Counter[str],
    ) -> None:
        self.config = config
        self.loop = loop
        self.queue_name = queue_name
        self.router = router
        self.codec = codec
        #: Deliveries dropped, by reason (``DROPPED_*``), shared with the link's normal channels.
        self.dropped = dropped
        #: Messages from RabbitMQ for channels and groups (not the layer's control messages or probes).
        self.received = 0
        #: Set while a new consuming connection proves that it receives: any delivery does.
        self.arrival: asyncio.Future[None] | None = None
        self._next_delivery: asyncio.Future[None] | None = None  # see expect_delivery()
        self._consuming_connection = consuming_connection
        self._on_group_emptied = on_group_emptied
        self._on_normal_delivery = on_normal_delivery
        self._groups_exchange = config.groups_exchange
        self.probe_prefix = queue_name + "!probe."  # never a channel's: their local parts have no dot
        #: Where control messages go (group calls for our channels from other processes, flush()).
        self._control = control
        self._last_delivery_tag = 0
        self._acked_delivery_tag = 0
        self._ack_timer: asyncio.TimerHandle | None = None
        self._housekeeping: asyncio.TimerHandle | None = None
        self._dropped_log = RateLimitedLogger(logger)
        self._expired_log = RateLimitedLogger(logger)
        self._full_log = RateLimitedLogger(logger)
        router.on_room = self.ack
        router.on_channel_full = self._on_channel_full

    def new_connection(self) -> asyncio.Future[None]:
        """A new consuming connection is being set up: its delivery tags start again. The future
        returned is resolved by its first delivery (see :meth:`set_up_ended`)."""
        self._cancel_ack_timer()  # the tags it would ack were the old connection's
        self._last_delivery_tag = self._acked_delivery_tag = 0
        self.arrival = self.loop.create_future()
        return self.arrival

    def expect_delivery(self) -> asyncio.Future[None]:
        """A future resolved by the next delivery on the link's queue (a probe's, or any other)."""
        if self._next_delivery is None or self._next_delivery.done():
            self._next_delivery = self.loop.create_future()
        return self._next_delivery

    def set_up_ended(self) -> None:
        """The new consuming connection is set up, or failed to be: no delivery is awaited now."""
        self.arrival = None

    def consuming_up(self, connection: AmqpConnection) -> None:
        self.start_housekeeping()
        self.ack()  # what arrived while the connection was being set up

    def consuming_down(self) -> None:
        self.stop_housekeeping()
        self._cancel_ack_timer()

    def close(self) -> None:
        self.stop_housekeeping()
        self._cancel_ack_timer()

    # Deliveries -----------------------------------------------------------------------------

    def on_delivery(self, delivery: Delivery | UndecodableDelivery) -> None:
        if delivery.channel_id != CONSUME_CHANNEL:  # a normal channel's: see .normal
            self.received += 1
            connection = self._consuming_connection()
            if connection is not None:
                self._on_normal_delivery(delivery, connection)
            return
        self._last_delivery_tag = delivery.delivery_tag
        arrival = self.arrival
        if arrival is not None and not arrival.done():
            arrival.set_result(None)
        waiting = self._next_delivery
        if waiting is not None and not waiting.done():
            waiting.set_result(None)
        if isinstance(delivery, UndecodableDelivery):
            self.received += 1
            self.dropped[DROPPED_TOO_LARGE if delivery.too_large else DROPPED_UNDECODABLE] += 1
            self._dropped_log.warning("dropped a message from the wire: %s", delivery.reason)
            return
        # Where it was sent: the group (routing key on the groups exchange) or the channel.
        to_group = delivery.exchange == self._groups_exchange
        destination: Any
        headers = delivery.headers
        if to_group:
            destination = delivery.routing_key
            if headers is not None and CONTROL_HEADER in headers:  # group_send() sends no headers
                self._on_control(delivery)
                return
        else:
            destination = headers.get(CHANNEL_HEADER) if headers else None
            if (
                type(destination) is not str
                or is_normal_channel(destination)
                or queue_of(destination) != self.queue_name
            ):
                if headers and CONTROL_HEADER in headers:
                    self._on_control(delivery)
                    return
                self.received += 1
                self.dropped[DROPPED_UNDECODABLE] += 1
                self._dropped_log.warning(
                    "dropped a message from the wire: no %s header naming a channel of queue %s",
                    CHANNEL_HEADER,
                    self.queue_name,
                )
                return
            if destination.startswith(self.probe_prefix):  # ours, or a late one from an alarm
                return  # dropped unread: its body need not be in the configured serializer
        self.received += 1
        try:
            message, body = self.codec.decode(delivery.body, destination)
        except MalformedMessage as error:
            self.dropped[DROPPED_UNDECODABLE] += 1
            self._dropped_log.warning("dropped a message from the wire: %s", error)
            return
        now = time.monotonic()
        if to_group:
            self.router.deliver_to_group(destination, message, body, now)
            return
        self.router.deliver(destination, message, now)

    def _on_control(self, delivery: Delivery) -> None:
        try:
            self._control.on_message(delivery)
        except MalformedMessage as error:
            self.dropped[DROPPED_UNDECODABLE] += 1
            self._dropped_log.warning("dropped a control message from the wire: %s", error)

    def _on_channel_full(self, channel: str, group: str | None) -> None:
        self.dropped[DROPPED_CHANNEL_FULL] += 1
        capacity = self.config.capacity_of(channel)
        if group is None:
            self._full_log.warning(
                "dropped a message for %s: the channel holds %d unread message(s), its capacity",
                channel,
                capacity,
            )
        else:
            self._full_log.warning(
                "dropped a message of group %r for member %s: the channel holds %d unread message(s), "
                "its capacity",
                group,
                channel,
                capacity,
            )

    @property
    def unacknowledged(self) -> int:
        """Deliveries of the consuming connection not acknowledged yet."""
        return self._last_delivery_tag - self._acked_delivery_tag

    def ack(self) -> None:
        """Acknowledge what arrived, unless the router is full (then RabbitMQ keeps the rest):
        at once when half of the prefetch window awaits an ack, else within :data:`ACK_DELAY`."""
        unacked = self.unacknowledged
        if unacked <= 0 or self.router.is_full:
            return
        # RabbitMQ sends no more than prefetch_count unacknowledged messages: once half of them
        # await an ack, write it at once, or delivery stalls.
        if unacked * 2 >= self.config.prefetch_count:
            self._ack_now()
        elif self._ack_timer is None:
            self._ack_timer = self.loop.call_later(ACK_DELAY, self._ack_now)

    def _ack_now(self) -> None:
        self._cancel_ack_timer()
        tag = self._last_delivery_tag
        if tag > self._acked_delivery_tag and not self.router.is_full:
            connection = self._consuming_connection()
            if connection is not None:
                connection.ack(CONSUME_CHANNEL, tag, now=True)
                self._acked_delivery_tag = tag

    def _cancel_ack_timer(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None

    # Expiry ---------------------------------------------------------------------------------

    def start_housekeeping(self) -> None:
        self.stop_housekeeping()
        interval = min(1.0, self.config.expiry / 4)
        if self.config.group_expiry is not None:  # None: memberships are not timed
            interval = min(interval, self.config.group_expiry / 4)
        self._housekeeping = self.loop.call_later(interval, self._housekeep, interval)

    def stop_housekeeping(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            self._housekeeping = None

    def _housekeep(self, interval: float) -> None:
        """Expire buffered messages and memberships; have groups that lost every member unbound."""
        now = time.monotonic()
        dropped = self.router.expire_messages(now)
        if dropped:
            self.dropped[DROPPED_EXPIRED] += dropped
            self._expired_log.warning(
                "dropped %d message(s) nobody read within expiry=%gs", dropped, self.config.expiry
            )
        for group in self.router.expire_memberships(now):
            self._on_group_emptied(group)
        self._housekeeping = self.loop.call_later(interval, self._housekeep, interval)
