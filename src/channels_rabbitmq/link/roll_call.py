"""The roll call: how a ``flush()`` knows how many links must answer it.

Every link that hears ``flush()`` consumes from one shared queue that never holds a message, so
that the queue's consumer count (which RabbitMQ gives on a passive declaration) is the number of
links to wait for (see :mod:`.control`).

A link answers the roll call only while its event loop runs. Its consumer is held on a
connection of its own, with a heartbeat of :data:`LEASE_HEARTBEAT` second: a link whose loop
stops (sync code that made a loop, used the layer and left it; a process stopped in a debugger)
writes no heartbeat, and RabbitMQ closes that connection within about three seconds, so no
``flush()`` anywhere waits for it any longer. The link's consuming connection keeps its own,
longer ``heartbeat``: a loop that pauses for a few seconds loses no message, only its place in
the roll call until its loop runs again and the roll call's connection is replaced.

The link attends while its consuming connection is up and bound to hear ``flush()``, and leaves
when that connection is lost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from typing import Any

from ..amqp.connection import AmqpConnection
from ..config import LayerConfig
from ..exceptions import (
    BrokerAccessRefusedError,
    BrokerConnectionError,
    BrokerTimeoutError,
    ChannelLayerClosedError,
)
from .channel_plan import ROLL_CALL_CHANNEL, channel
from .errors import translated
from .part import LinkPart
from .supervisor import ConnectionSupervisor

logger = logging.getLogger(__name__)

#: The roll call's queue: a queue that never holds a message. It is shared, so it cannot be
#: exclusive, and RabbitMQ 4.3 refuses transient shared queues: it is a quorum queue, which is
#: durable, survives the loss of a cluster node, and expires a minute after its last link.
ROLL_CALL_ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "quorum",
    "x-max-length": 0,
    "x-overflow": "reject-publish",
    "x-expires": 60_000,
}
#: Its name, for a groups exchange. Until 5.0 it was ``channels.links:<exchange>``, a transient
#: classic queue: a new name, since a queue's type cannot change under its name.
ROLL_CALL_QUEUE = "channels.roll-call:{exchange}"
#: The heartbeat of the roll call's connection (seconds): RabbitMQ closes the connection of a
#: link whose loop stopped after two to three of them (measured on 3.10: 3.2 s).
LEASE_HEARTBEAT = 1
#: How long a consuming connection's set-up waits to join the roll call before going on without it.
JOIN_WAIT = 2.0


class RollCall(LinkPart):
    """One link's place in the roll call: a consumer of the roll call's queue, on a connection of
    its own whose short heartbeat is the lease."""

    def __init__(self, config: LayerConfig, *, queue_name: str) -> None:
        self.config = config
        self.queue_name = queue_name
        #: The roll call's queue: one per groups exchange (a flush() reaches one exchange's links).
        self.queue = ROLL_CALL_QUEUE.format(exchange=config.groups_exchange)
        self._lease_config = dataclasses.replace(config, heartbeat=LEASE_HEARTBEAT)
        self._presence: ConnectionSupervisor | None = None
        self._joining: asyncio.Task[None] | None = None
        #: Roll-call connections being closed (by the tasks that close them).
        self._leaving: dict[asyncio.Task[None], AmqpConnection | None] = {}

    @property
    def attending(self) -> bool:
        """Our consumer is on the roll call now (the broker counts this link)."""
        return self._presence is not None and self._presence.is_up

    @property
    def connection(self) -> AmqpConnection | None:
        """The roll call's connection, while it is up."""
        return self._presence.connection if self._presence is not None else None

    async def attend(self) -> None:
        """Answer the roll call from now on: connect and consume, waiting at most
        :data:`JOIN_WAIT` (a roll call without a majority of its nodes does not answer), then
        going on in the background (see :meth:`_join`). Once in, a lost roll-call connection is
        replaced by itself."""
        if self._presence is None:
            self._presence = ConnectionSupervisor(
                self._lease_config,
                role="roll call",
                connection_name=f"channels_rabbitmq {self.queue_name} roll call",
                set_up=self._set_up,
            )
            self._joining = asyncio.ensure_future(self._join(self._presence))
        joining = self._joining
        if joining is not None and not joining.done():
            await asyncio.wait((joining,), timeout=min(JOIN_WAIT, self.config.connect_timeout))

    async def joined(self) -> None:
        """Once a join in progress has ended (joined or given up), or ``connect_timeout`` has passed.

        The consuming connection's set-up waits for the join only :data:`JOIN_WAIT`; a link's first
        call waits for the rest here. Seen on a 3-node RabbitMQ 4.0 cluster: the roll call's
        connection, opened while the consuming one was being set up, now and then took 5 s to be
        accepted (cause not found yet)."""
        joining = self._joining
        if joining is not None and not joining.done():
            await asyncio.wait((joining,), timeout=self.config.connect_timeout)

    def leave(self) -> None:
        """Stop answering (the consuming connection is gone: this link hears no flush() now)."""
        presence, self._presence = self._presence, None
        joining, self._joining = self._joining, None
        if joining is not None:
            joining.cancel()
        if presence is not None:
            closing = asyncio.ensure_future(presence.close())
            self._leaving[closing] = presence.connection
            closing.add_done_callback(self._left)

    def _left(self, closing: asyncio.Task[None]) -> None:
        del self._leaving[closing]

    def consuming_down(self) -> None:
        self.leave()  # this link hears no flush() until its next consuming connection

    def close(self) -> None:
        self.leave()

    async def left(self) -> None:
        """Once the roll call's connections being closed are closed."""
        if self._leaving:
            await asyncio.gather(*self._leaving, return_exceptions=True)

    def abandon(self) -> None:
        """The link's loop is closed: close the roll call's socket from here (and the socket of one
        it was leaving, whose closing cannot finish there now)."""
        presence = self._presence
        for connection in (presence.connection if presence else None, *self._leaving.values()):
            if connection is not None:
                connection.abandon()

    def step_out(self) -> None:
        """The link's loop is stopped (not closed): end the roll call's connection from here, so
        that no flush() waits for this link while it cannot answer. When the loop runs again, the
        connection is replaced and the link counted again. From any thread."""
        presence = self._presence
        if presence is not None and presence.connection is not None:
            presence.connection.shut_down_socket()

    async def _join(self, presence: ConnectionSupervisor) -> None:
        """Connect and consume; until that works, try again with the link's reconnection backoff.
        A refusal (a permission) is not tried again; it and a roll call that does not answer are
        said once, as a warning: meanwhile flush() from other processes does not wait for this link."""
        delay = self.config.reconnect_delay_min
        warned = False
        while True:
            try:
                await presence.connected()
                return
            except ChannelLayerClosedError:
                return  # left before it joined
            except BrokerConnectionError as error:
                refused = isinstance(error, BrokerAccessRefusedError)
                if (refused or isinstance(error, BrokerTimeoutError)) and not warned:
                    logger.warning(
                        "could not join the roll call (queue %s) for queue %s: %s; flush() from other "
                        "processes does not wait for this one%s",
                        self.queue,
                        self.queue_name,
                        error,
                        "" if refused else " until it joins",
                    )
                    warned = True
                else:
                    logger.debug("joining the roll call failed: %s", error)
                if refused:
                    return
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.config.reconnect_delay_max)

    async def _set_up(self, connection: AmqpConnection) -> None:
        # Essential: when RabbitMQ cancels the consumer (the queue was deleted), the connection is
        # replaced and the queue declared again.
        roll_call = channel(connection, ROLL_CALL_CHANNEL, self.config)
        with translated(self.config.description):
            await roll_call.open(essential=True)
            await roll_call.declare_queue(self.queue, durable=True, arguments=ROLL_CALL_ARGUMENTS)
            await roll_call.consume(self.queue, "roll-call", no_ack=True)
