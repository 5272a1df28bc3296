"""The publishing side of a broker link: its connection, and every publish with its confirm.

The publishing connection carries ``send()``, ``group_send()`` and the layer's control messages in
confirm mode. It never consumes: during a resource alarm RabbitMQ stops reading from it, while the
consuming connection goes on. A publish is written at once when the connection may take it;
otherwise it waits its turn (publishes that had to wait are written in the order they were made) at
most ``connection_wait``. While the broker blocks the connection, publishes already written wait for
their confirms no longer than new ones may wait.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from ..amqp.connection import AmqpConnection
from ..amqp.errors import AmqpError
from ..config import LayerConfig
from ..exceptions import BrokerBlockedError, BrokerConnectionError, BrokerTimeoutError
from .channel_plan import PUBLISH_CHANNEL
from .counters import LinkCounters
from .errors import layer_error
from .part import LinkPart
from .supervisor import ConnectionSupervisor

logger = logging.getLogger(__name__)


class Publisher(LinkPart):
    """One link's publishing connection (:attr:`supervisor`) and its publishes."""

    def __init__(
        self,
        config: LayerConfig,
        loop: asyncio.AbstractEventLoop,
        *,
        queue_name: str,
        counters: LinkCounters,
        set_up: Callable[[AmqpConnection], Awaitable[None]],
        on_up: Callable[[AmqpConnection], None],
        on_down: Callable[[BrokerConnectionError], None],
    ) -> None:
        self.config = config
        self.loop = loop
        self._counters = counters
        self.supervisor = ConnectionSupervisor(
            config,
            role="publish",
            connection_name=f"channels_rabbitmq {queue_name} publishing",
            set_up=set_up,
            on_up=on_up,
            on_down=on_down,
            on_blocked=self._on_blocked,
        )
        self._blocked_timer: asyncio.TimerHandle | None = None
        # Publishes waiting for the connection to take them, and their turns: see _publish_when_possible.
        self._publishes_held = 0
        self._held_publishes = asyncio.Lock()

    async def publish(self, exchange: bytes, routing_key: bytes, properties: bytes, body: bytes) -> bool:
        """Publish and wait for the broker's confirm: True when accepted, False when refused."""
        counters = self._counters
        counters.published += 1
        started = time.monotonic()
        try:
            connection = self.supervisor.connection
            if connection is not None and connection.can_publish and not self._publishes_held:
                accepted = await connection.publish(PUBLISH_CHANNEL, exchange, routing_key, properties, body)
            else:
                accepted = await self._publish_when_possible(exchange, routing_key, properties, body)
        except AmqpError as error:
            counters.publish_failed += 1
            raise layer_error(error, self.config.description) from None
        except BaseException:  # no connection in time, or the caller was cancelled
            counters.publish_failed += 1
            raise
        counters.confirm(accepted, time.monotonic() - started)
        return accepted

    async def _publish_when_possible(
        self, exchange: bytes, routing_key: bytes, properties: bytes, body: bytes
    ) -> bool:
        """Publish once the connection may, in turn: publishes that had to wait are written in the
        order they were made, and no later one overtakes them meanwhile (one sender's messages to a
        channel stay in order across a connect, a block or a full write buffer). Each waits at most
        ``connection_wait`` from its call, its turn included: a hundred sends held by an alarm all
        fail after ``connection_wait``, not one after the other."""
        deadline = self.loop.time() + self.config.connection_wait
        self._publishes_held += 1
        try:
            try:  # asyncio.Lock wakes its waiters first come, first served
                await asyncio.wait_for(self._held_publishes.acquire(), max(0.0, deadline - self.loop.time()))
            except asyncio.TimeoutError:
                raise not_publishable(self.supervisor.connection, self.config) from None
            try:
                connection = await wait_until_publishable(self.supervisor, self.config, self.loop, deadline)
                confirmed = connection.publish(PUBLISH_CHANNEL, exchange, routing_key, properties, body)
            finally:
                self._held_publishes.release()
        finally:
            self._publishes_held -= 1
        return await confirmed

    async def publishable(self) -> AmqpConnection:
        """The publishing connection once it may publish: connect, or wait out a block or a full
        write buffer, at most ``connection_wait``."""
        return await wait_until_publishable(self.supervisor, self.config, self.loop)

    def close(self) -> None:
        if self._blocked_timer is not None:
            self._blocked_timer.cancel()
            self._blocked_timer = None

    def _on_blocked(self, connection: AmqpConnection, reason: str | None) -> None:
        """The broker blocked (``reason``) or unblocked (None) the publishing connection."""
        if self._blocked_timer is not None:
            self._blocked_timer.cancel()
            self._blocked_timer = None
        if reason is None:
            logger.info("RabbitMQ unblocked publishing on %s", connection.description)
            return
        logger.warning(
            "RabbitMQ blocked publishing on %s (%s); receiving goes on, sends wait up to connection_wait=%gs",
            connection.description,
            reason,
            self.config.connection_wait,
        )
        # Publishes already written wait for their confirms no longer than new ones may wait.
        self._blocked_timer = self.loop.call_later(
            self.config.connection_wait,
            connection.fail_unconfirmed,
            BrokerBlockedError(
                f"RabbitMQ blocked publishing ({reason}) for connection_wait="
                f"{self.config.connection_wait:g}s before confirming the message: "
                "it may or may not be delivered once the alarm clears",
                reason=reason,
                url=self.config.description,
            ),
        )


async def wait_until_publishable(
    publishing: ConnectionSupervisor,
    config: LayerConfig,
    loop: asyncio.AbstractEventLoop,
    deadline: float | None = None,
) -> AmqpConnection:
    """The publishing connection once it may publish: connect, or wait out a block or a full
    write buffer, until ``deadline`` (the loop's clock; default: ``connection_wait`` from now)."""
    if deadline is None:
        deadline = loop.time() + config.connection_wait
    connection = await publishing.connected()
    while not connection.can_publish:
        if not connection.is_open:
            connection = await publishing.connected()
            continue
        remaining = deadline - loop.time()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            await asyncio.wait_for(connection.wait_until_publishable(), remaining)
        except asyncio.TimeoutError:
            raise not_publishable(connection, config) from None
    return connection


def not_publishable(connection: AmqpConnection | None, config: LayerConfig) -> BrokerConnectionError:
    """The error of a publish that waited ``connection_wait`` for ``connection`` in vain."""
    wait = config.connection_wait
    reason = connection.blocked_reason if connection is not None else None
    if reason is not None and connection is not None:
        return BrokerBlockedError(
            f"RabbitMQ has blocked publishing on {connection.description} ({reason}) "
            f"for connection_wait={wait:g}s: the message was not sent",
            reason=reason,
            url=config.description,
        )
    where = connection.description if connection is not None else config.description
    return BrokerTimeoutError(
        f"{where} read none of our writes for connection_wait={wait:g}s: the message was not sent",
        operation="publish",
        timeout=wait,
        url=config.description,
    )
