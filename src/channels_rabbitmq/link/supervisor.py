"""One AMQP connection that is always there: connect, set up, lose, reconnect.

A :class:`ConnectionSupervisor` owns one connection of a broker link (the one that
consumes, or the one that publishes) and its whole life, in one place:

    IDLE --connected()--> CONNECTING --set up--> UP --lost--> RECOVERING --set up--> UP
      CONNECTING --fails--> IDLE (the caller gets the error)        any --close()--> CLOSED

The first connection is made on demand and its failure goes straight to the caller (a
wrong URL, password or vhost must not make anyone wait). After it, a lost connection is
replaced in the background with capped exponential backoff and jitter; callers wait at
most ``connection_wait`` for it. Each new connection is handed to the owner's
``set_up`` before it is installed.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..amqp.connection import AmqpConnection, DeliveryHandler
from ..amqp.errors import ChannelRefused, ConnectionFailed
from ..config import BrokerAddress, LayerConfig
from ..exceptions import (
    BrokerAccessRefusedError,
    BrokerConnectionError,
    BrokerConnectionLostError,
    BrokerRefusedError,
    BrokerTimeoutError,
    BrokerUnreachableError,
    ChannelLayerClosedError,
)
from .connector import describe_target, distinct_ips, open_connection
from .errors import connection_error

logger = logging.getLogger(__name__)


class State(enum.Enum):
    IDLE = "idle"  # never connected (or the first attempt failed)
    CONNECTING = "connecting"  # the first connection is being made
    UP = "up"
    RECOVERING = "recovering"  # lost after being up; reconnecting in the background
    CLOSED = "closed"


SetUp = Callable[[AmqpConnection], Awaitable[None]]


class ConnectionSupervisor:
    """One role's connection (``role``: "consume" or "publish") of one broker link."""

    def __init__(
        self,
        config: LayerConfig,
        *,
        role: str,
        connection_name: str,
        set_up: SetUp,
        on_delivery: DeliveryHandler | None = None,
        on_deliveries_done: Callable[[], None] | None = None,
        on_up: Callable[[AmqpConnection], None] | None = None,
        on_down: Callable[[BrokerConnectionError], None] | None = None,
        on_blocked: Callable[[AmqpConnection, str | None], None] | None = None,
    ) -> None:
        self.config = config
        self.role = role
        self.state = State.IDLE
        self.connection: AmqpConnection | None = None  # the installed connection, while UP
        self.address: BrokerAddress | None = None  # the URL it was opened from
        self.last_error: BrokerConnectionError | None = None
        self.connections = 0  # opened and set up, the first one included
        self.reconnections = 0
        self._connection_name = connection_name
        self._set_up = set_up
        self._on_delivery = on_delivery
        self._on_deliveries_done = on_deliveries_done
        self._on_up = on_up
        self._on_down = on_down
        self._on_blocked = on_blocked
        self._up = asyncio.Event()
        self._first: asyncio.Future[AmqpConnection] | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._attempt: AmqpConnection | None = None  # a connection being set up

    # What callers use ---------------------------------------------------------------------

    @property
    def is_up(self) -> bool:
        connection = self.connection
        return connection is not None and connection.is_open

    @property
    def ever_connected(self) -> bool:
        return self.state in (State.UP, State.RECOVERING) or self.reconnections > 0

    async def connected(self) -> AmqpConnection:
        """The open connection, connecting first if needed.

        The first time, connect now and raise at once if that fails. After an outage
        began, wait for the background reconnection at most ``connection_wait`` seconds,
        then raise :class:`BrokerConnectionError`.
        """
        connection = self.connection
        if connection is not None and connection.is_open:
            return connection
        if self.state is State.CLOSED:
            raise ChannelLayerClosedError("the channel layer is closed")
        if self.state in (State.IDLE, State.CONNECTING):
            first = self._first
            if first is None:
                self.state = State.CONNECTING
                first = self._first = asyncio.ensure_future(self._connect_first())
                first.add_done_callback(self._first_done)
            try:
                return await asyncio.shield(first)
            except asyncio.CancelledError:
                if self.state is State.CLOSED and first.cancelled():
                    raise ChannelLayerClosedError("the channel layer was closed while connecting") from None
                raise
        self._recover()
        wait = self.config.connection_wait
        try:
            await asyncio.wait_for(self._up.wait(), wait)
        except asyncio.TimeoutError:
            raise BrokerTimeoutError(
                f"RabbitMQ ({self.config.description}) has been unreachable for connection_wait={wait:g}s: "
                f"{self.last_error}",
                operation="reconnect",
                timeout=wait,
                url=self.config.description,
            ) from None
        connection = self.connection
        if connection is None or not connection.is_open:
            raise self.last_error or BrokerConnectionLostError("the connection was lost again")
        return connection

    async def close(self) -> None:
        """Stop reconnecting and close the connection (at most a few seconds). Idempotent."""
        self.state = State.CLOSED
        self._up.clear()
        if self._recovery is not None and not self._recovery.done():
            self._recovery.cancel()
        first = self._first
        if first is not None and not first.done():
            first.cancel()
        attempt = self._attempt
        if attempt is not None:
            attempt.abort()
        connection, self.connection = self.connection, None
        if connection is not None:
            await connection.close()

    # Connecting -----------------------------------------------------------------------------

    def _first_done(self, future: asyncio.Future[AmqpConnection]) -> None:
        self._first = None
        failed = future.cancelled() or future.exception() is not None
        if failed and self.state is State.CONNECTING:
            self.state = State.IDLE  # the next call tries again, and reports its own error

    async def _connect_first(self) -> AmqpConnection:
        connection, address = await self._connect_any()
        self._install(connection, address)
        return connection

    def _install(self, connection: AmqpConnection, address: BrokerAddress) -> None:
        """Make ``connection`` the one in use; from now on its loss starts a recovery."""
        if self.state is State.CLOSED:
            connection.abort()
            raise ChannelLayerClosedError("the channel layer was closed while connecting")
        if (
            not connection.is_open
        ):  # checked by _connect(); nothing awaited since, but never install a dead one
            raise BrokerConnectionLostError(f"the connection to {address} was lost before it was installed")
        self.connection = connection
        self.address = address
        self.state = State.UP
        self.connections += 1
        self.last_error = None
        self._up.set()
        if self._on_up is not None:
            self._on_up(connection)

    async def _connect_any(self) -> tuple[AmqpConnection, BrokerAddress]:
        """Connect to the first node that answers: each URL in order, each of its addresses in turn.

        Reconnections start at a random node, which spreads the processes of a cluster's
        failed node over the others. The whole attempt takes at most ``connect_timeout``.
        """
        loop = asyncio.get_running_loop()
        addresses = list(self.config.addresses)
        if self.state is State.RECOVERING and len(addresses) > 1:
            start = random.randrange(len(addresses))
            addresses = addresses[start:] + addresses[:start]
        deadline = loop.time() + self.config.connect_timeout
        targets: list[tuple[BrokerAddress, str]] = []
        errors: list[BrokerConnectionError] = []
        for address in addresses:
            try:
                infos = await asyncio.wait_for(
                    loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM),
                    max(0.001, deadline - loop.time()),
                )
            except (OSError, asyncio.TimeoutError) as error:
                reason = str(error) or "timed out"
                errors.append(
                    BrokerUnreachableError(
                        f"cannot resolve {address.host} ({address}): {reason}",
                        errno=None,
                        reason=reason,
                        url=str(address),
                    )
                )
                continue
            targets += [(address, ip) for ip in distinct_ips(infos)]
        for index, (address, ip) in enumerate(targets):
            remaining = deadline - loop.time()
            if remaining <= 0:
                timeout = self.config.connect_timeout
                errors.append(
                    BrokerTimeoutError(
                        f"connect_timeout={timeout:g}s ran out", operation="connect", timeout=timeout
                    )
                )
                break
            if self.state is State.CLOSED:
                raise ChannelLayerClosedError("the channel layer was closed while connecting")
            try:
                connection = await self._connect(address, ip, remaining / (len(targets) - index))
            except BrokerConnectionError as error:
                errors.append(error)
                continue
            return connection, address
        raise _most_telling(errors)

    async def _connect(self, address: BrokerAddress, ip: str, timeout: float) -> AmqpConnection:
        """Connect to one node and let the owner set the connection up there."""
        described = describe_target(address, ip)
        connection = await open_connection(
            address,
            ip,
            self.config,
            timeout=timeout,
            connection_name=self._connection_name,
            on_delivery=self._on_delivery,
            on_deliveries_done=self._on_deliveries_done or _nothing,
            on_lost=self._on_lost,
            on_blocked=self._on_blocked,
        )
        self._attempt = connection
        try:
            await self._set_up_while_progressing(connection)
        except BaseException as error:
            await connection.close()
            url = str(address)
            if isinstance(error, asyncio.TimeoutError):
                timeout = self.config.connect_timeout
                raise BrokerTimeoutError(
                    f"{described} stopped answering while setting up: nothing heard for connect_timeout="
                    f"{timeout:g}s",
                    operation="set-up",
                    timeout=timeout,
                    url=url,
                    address=f"{ip}:{address.port}",
                ) from None
            if isinstance(error, BrokerRefusedError | ChannelRefused):
                raise BrokerAccessRefusedError(
                    f"{described}: RabbitMQ refused {error.request} while setting up: "
                    f"{int(error.reply_code)} {error.reply_text} (the user needs configure, write and read "
                    "permissions on the vhost)",
                    request=error.request,
                    reply_code=error.reply_code,
                    reply_text=error.reply_text,
                    url=url,
                    address=f"{ip}:{address.port}",
                ) from None
            if isinstance(error, ConnectionFailed):
                raise connection_error(error, url, address.virtual_host) from None
            raise
        finally:
            self._attempt = None
        if self.state is State.CLOSED:
            await connection.close()
            raise ChannelLayerClosedError("the channel layer was closed while connecting")
        if not connection.is_open:
            # Lost between its last set-up reply and now: its loss was reported while it was
            # only an attempt, so nobody would replace it once installed.
            raise BrokerConnectionLostError(
                f"the connection to {described} was lost just after its set-up",
                url=str(address),
                address=f"{ip}:{address.port}",
            )
        return connection

    async def _set_up_while_progressing(self, connection: AmqpConnection) -> None:
        """Run the owner's set-up; give up once the broker has said nothing for ``connect_timeout``.

        Progress, not a total: binding thousands of groups again may take longer than
        ``connect_timeout``, and must not fail while the broker keeps answering.
        """
        limit = self.config.connect_timeout
        setting_up = asyncio.ensure_future(self._set_up(connection))
        setting_up.add_done_callback(_retrieve)  # a failure here is raised below, or moot once we are gone
        try:
            while True:
                quiet = connection.quiet_for()
                done, _ = await asyncio.wait((setting_up,), timeout=max(0.01, limit - quiet))
                if done:
                    return setting_up.result()
                if connection.quiet_for() >= limit:
                    raise asyncio.TimeoutError
        finally:
            if not setting_up.done():
                setting_up.cancel()
                await asyncio.gather(setting_up, return_exceptions=True)

    # Losing and recovering ------------------------------------------------------------------

    def _on_lost(self, connection: AmqpConnection, lost: ConnectionFailed) -> None:
        if connection is not self.connection:
            return  # an attempt still setting up: it fails by itself, and its caller reports it
        address = self.address
        error = connection_error(lost, str(address) if address else None)
        self.connection = None
        self._up.clear()
        self.last_error = error
        if self.state is State.CLOSED:
            return
        self.state = State.RECOVERING
        logger.debug("%s connection lost: %s", self.role, error)
        if self._on_down is not None:
            self._on_down(error)  # the owner logs the outage, once for all its connections
        self._recover()

    def _recover(self) -> None:
        if self.state is State.RECOVERING and (self._recovery is None or self._recovery.done()):
            self._recovery = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        """Reconnect in the background: capped exponential backoff with jitter."""
        delay = self.config.reconnect_delay_min
        started = time.monotonic()
        while self.state is State.RECOVERING:
            try:
                connection, address = await self._connect_any()
            except ChannelLayerClosedError:
                return
            except BrokerConnectionError as error:
                self.last_error = error
                logger.debug("reconnecting failed: %s", error)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.config.reconnect_delay_max)
                continue
            try:
                self._install(connection, address)
            except ChannelLayerClosedError:
                return
            except BrokerConnectionError as error:
                self.last_error = error
                continue
            self.reconnections += 1
            logger.debug(
                "%s connection back to %s after %.1fs",
                self.role,
                connection.description,
                time.monotonic() - started,
            )
            return


def _nothing() -> None:
    pass


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _most_telling(errors: list[BrokerConnectionError]) -> BrokerConnectionError:
    """One error for a failed attempt at every address: a broker's answer (a refused login, a
    TLS failure) says more than an address that did not answer. ``attempts`` keeps them all."""
    if not errors:
        return BrokerUnreachableError("no address to connect to", errno=None, reason="no address")
    if len(errors) == 1:
        return errors[0]
    silent = (BrokerUnreachableError, BrokerTimeoutError)
    answered = [error for error in errors if not isinstance(error, silent)]
    chosen = answered[0] if answered else errors[-1]  # made by this attempt: ours to amend
    chosen.args = ("could not connect to any broker: " + "; ".join(str(error) for error in errors),)
    chosen.attempts = tuple(errors)
    return chosen
