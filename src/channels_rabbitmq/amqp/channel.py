"""One AMQP channel of a connection, as an object: its number and the requests made on it.

The layer never builds an AMQP method itself: it asks an :class:`AmqpChannel` to declare,
bind, purge, consume... and gets the broker's reply, or one of the client's errors
(:mod:`.errors`). Each request is bounded by the broker's progress on its channel, not by a
fixed time: requests on one channel are answered one at a time, so one queued behind many
others waits as long as those ahead of it are being answered; only a channel that shows no
progress for ``stall_limit`` seconds fails the request (:class:`~.errors.RequestStalled`), and,
unless told otherwise, drops the connection (one that leaves a request unanswered that long is
not usable; its owner sets everything up again).

Channel numbers: the caller names fixed ones (the layer's own channels), or takes one from the
connection's pool within the negotiated ``channel_max`` (:meth:`AmqpChannel.allocate`) and
gives it back once the channel is closed (:meth:`AmqpChannel.release`).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from pamqp import commands
from pamqp.base import Frame

from .errors import RequestStalled

if TYPE_CHECKING:
    from .channels import PublishOutcome
    from .connection import AmqpConnection

#: Requests on a channel whose broker shows no progress for this long fail (seconds).
DEFAULT_STALL_LIMIT = 10.0


class AmqpChannel:
    """Channel ``number`` of ``connection``; requests fail after ``stall_limit`` seconds without progress."""

    def __init__(self, connection: AmqpConnection, number: int, *, stall_limit: float = DEFAULT_STALL_LIMIT):
        self.connection = connection
        self.number = number
        self.stall_limit = stall_limit

    @classmethod
    def allocate(cls, connection: AmqpConnection, first: int, *, stall_limit: float) -> AmqpChannel:
        """A channel whose number comes from the connection's pool (``first`` up to ``channel_max``);
        raises :class:`~.errors.ChannelsExhausted` when every number is in use."""
        return cls(connection, connection.allocate_channel_id(first), stall_limit=stall_limit)

    def release(self) -> None:
        """Give the number back to the connection's pool (once the channel is closed)."""
        self.connection.release_channel_id(self.number)

    def __repr__(self) -> str:
        return f"<AmqpChannel {self.number} of {self.connection.description}>"

    # Opening --------------------------------------------------------------------------------

    async def open(
        self, *, prefetch_count: int | None = None, confirm: bool = False, essential: bool = False
    ) -> None:
        """Open the channel: ``basic.qos`` with ``prefetch_count`` (per consumer), or confirm mode.

        The connection reopens it the same way when the broker closes it; an ``essential`` one
        (publishing, consuming) drops the whole connection instead.
        """
        setup: list[Frame] = []
        if prefetch_count is not None:
            setup.append(commands.Basic.Qos(prefetch_count=prefetch_count))
        if confirm:
            setup.append(commands.Confirm.Select())
        await self.connection.open_channel(self.number, setup, essential=essential)

    def open_soon(self) -> None:
        """Ask for the channel to open without waiting: requests sent after it queue behind it."""
        self.connection.call(self.number, commands.Channel.Open()).add_done_callback(_retrieve)

    async def open_unmanaged(self, *, abort_when_stalled: bool = True) -> None:
        """``channel.open`` alone: when the broker closes this channel, it stays closed until this
        is called again (for a channel whose requests may be refused, and retried later)."""
        await self._ask(commands.Channel.Open(), "open", abort_when_stalled=abort_when_stalled)

    async def close(self, reason: str) -> None:
        """Close the channel (``channel.close`` with 200 and ``reason``), and wait for ``close-ok``."""
        await self._ask(
            commands.Channel.Close(reply_code=200, reply_text=reason, class_id=0, method_id=0), "close"
        )

    # Requests -------------------------------------------------------------------------------

    async def declare_exchange(self, name: str, kind: str = "direct", *, passive: bool = False) -> None:
        """A non-durable exchange of ``kind``; ``passive``: only check that it exists."""
        method = (
            commands.Exchange.Declare(exchange=name, passive=True)
            if passive
            else commands.Exchange.Declare(exchange=name, exchange_type=kind)
        )
        await self._ask(method, "declare")

    async def declare_queue(
        self,
        name: str,
        *,
        durable: bool = False,
        exclusive: bool = False,
        passive: bool = False,
        arguments: dict[str, Any] | None = None,
        abort_when_stalled: bool = True,
    ) -> commands.Queue.DeclareOk:
        """Declare a queue (``passive``: only look it up); the reply counts its messages and consumers."""
        method = (
            commands.Queue.Declare(queue=name, passive=True)
            if passive
            else commands.Queue.Declare(queue=name, durable=durable, exclusive=exclusive, arguments=arguments)
        )
        reply = await self._ask(method, "declare", abort_when_stalled=abort_when_stalled)
        assert isinstance(reply, commands.Queue.DeclareOk)
        return reply

    async def delete_queue(self, name: str) -> None:
        await self._ask(commands.Queue.Delete(queue=name), "delete")

    async def bind(self, queue: str, exchange: str, routing_key: str) -> None:
        await self._ask(commands.Queue.Bind(queue=queue, exchange=exchange, routing_key=routing_key), "bind")

    async def unbind(self, queue: str, exchange: str, routing_key: str) -> None:
        await self._ask(
            commands.Queue.Unbind(queue=queue, exchange=exchange, routing_key=routing_key), "unbind"
        )

    async def purge(self, queue: str, *, operation: str = "purge") -> None:
        await self._ask(commands.Queue.Purge(queue=queue), operation)

    async def confirm_select(self) -> None:
        """``confirm.select`` (a no-op on a channel already in confirm mode): answered once every
        request queued before it on this channel is, a reopening included."""
        await self._ask(commands.Confirm.Select(), "confirm")

    async def set_prefetch(self, prefetch_count: int, *, operation: str = "qos") -> None:
        """``basic.qos`` again. Answered after the deliveries already on their way on this channel
        (one channel's frames keep their order): waiting for it lets those arrive first."""
        await self._ask(commands.Basic.Qos(prefetch_count=prefetch_count), operation)

    async def consume(
        self,
        queue: str,
        consumer_tag: str,
        *,
        exclusive: bool = False,
        no_ack: bool = False,
        abort_when_stalled: bool = True,
    ) -> None:
        method = commands.Basic.Consume(
            queue=queue, consumer_tag=consumer_tag, exclusive=exclusive, no_ack=no_ack
        )
        await self._ask(method, "consume", abort_when_stalled=abort_when_stalled)

    async def cancel(self, consumer_tag: str) -> None:
        await self._ask(commands.Basic.Cancel(consumer_tag=consumer_tag), "cancel")

    # Messages -------------------------------------------------------------------------------

    def publish(
        self, exchange: bytes, routing_key: bytes, properties: bytes, body: bytes
    ) -> asyncio.Future[bool]:
        """Publish on this confirming channel; the future is True (ack) or False (nack)."""
        return self.connection.publish(self.number, exchange, routing_key, properties, body)

    def publish_mandatory(
        self, exchange: bytes, routing_key: bytes, properties: bytes, body: bytes
    ) -> asyncio.Future[PublishOutcome]:
        """Publish a ``mandatory`` message: accepted, refused, or returned (no queue took it)."""
        return self.connection.publish_mandatory(self.number, exchange, routing_key, properties, body)

    def ack(self, delivery_tag: int, *, now: bool = False) -> None:
        """Acknowledge every delivery on this channel up to ``delivery_tag``."""
        self.connection.ack(self.number, delivery_tag, now=now)

    def reject(self, delivery_tag: int) -> None:
        """Give one delivery back to its queue."""
        self.connection.reject(self.number, delivery_tag)

    # Progress -------------------------------------------------------------------------------

    @property
    def pending_requests(self) -> int:
        """Requests sent on this channel (or queued to be) that wait for their reply."""
        return self.connection.pending_requests(self.number)

    async def _ask(self, method: Frame, operation: str, *, abort_when_stalled: bool = True) -> Frame:
        """Send ``method`` and wait for its reply while the channel makes progress."""
        connection, limit = self.connection, self.stall_limit
        reply = connection.call(self.number, method)
        reply.add_done_callback(_retrieve)  # seen even when nobody waits any more
        while True:
            quiet = connection.quiet_for(self.number)
            done, _ = await asyncio.wait((reply,), timeout=max(0.01, limit - quiet))
            if done:
                return reply.result()
            if connection.quiet_for(self.number) >= limit:
                if abort_when_stalled:
                    connection.abort()
                raise RequestStalled(operation, limit, connection.description, dropped=abort_when_stalled)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark an outcome nobody waits for as seen (no "exception was never retrieved")."""
    if not future.cancelled():
        future.exception()
