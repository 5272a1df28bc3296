"""Opening an AMQP connection: TCP, TLS and the AMQP handshake, each failure typed.

Every way opening can fail becomes one :class:`~.errors.ConnectionFailed` subclass with its
fields (an unreachable address, a timeout, TLS, a refused login or vhost, a peer that
does not speak AMQP), so that callers decide by type, never by message text.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

from .connection import AmqpConnection, BlockedHandler, BufferedAmqpConnection, DeliveryHandler, LostHandler
from .errors import ConnectionFailed, HandshakeTimeout, TlsFailed, Unreachable
from .protocol import AmqpProtocol, Credentials


async def connect(
    host: str,
    port: int,
    credentials: Credentials,
    virtual_host: str,
    *,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None = None,
    timeout: float,
    heartbeat: int,
    client_properties: dict[str, Any],
    description: str,
    on_delivery: DeliveryHandler | None,
    on_deliveries_done: Callable[[], None],
    on_lost: LostHandler,
    on_blocked: BlockedHandler | None = None,
    max_body_size: int | None = None,
) -> AmqpConnection:
    """Connect, authenticate and open the vhost, or raise :class:`~.errors.ConnectionFailed`.

    Deliveries with a body over ``max_body_size`` bytes are skipped unread and handed
    to ``on_delivery`` as an :class:`~.protocol.UndecodableDelivery` marked too large.
    """
    machine = AmqpProtocol(
        credentials,
        virtual_host,
        heartbeat=heartbeat,
        client_properties=client_properties,
        max_body_size=max_body_size,
    )
    loop = asyncio.get_running_loop()
    # asyncio's own loops (not uvloop's) allocate per read unless the protocol gives a buffer.
    buffered = isinstance(loop, asyncio.BaseEventLoop)
    connection = (BufferedAmqpConnection if buffered else AmqpConnection)(
        machine,
        description,
        host=host,
        port=port,
        on_delivery=on_delivery,
        on_deliveries_done=on_deliveries_done,
        on_lost=on_lost,
        on_blocked=on_blocked,
    )

    async def open_and_handshake() -> None:
        await loop.create_connection(
            lambda: connection,
            host,
            port,
            ssl=ssl_context,
            server_hostname=(server_hostname or host) if ssl_context is not None else None,
        )
        await connection._opened

    try:
        await asyncio.wait_for(open_and_handshake(), timeout)
    except asyncio.TimeoutError:
        connection.abort()
        raise HandshakeTimeout(
            f"no AMQP answer from {description} within connect_timeout={timeout:g}s",
            peer=description,
            host=host,
            port=port,
            timeout=timeout,
        ) from None
    except ssl.SSLCertVerificationError as error:
        raise TlsFailed(
            f"TLS: the certificate of {description} was not accepted: {error.verify_message}",
            peer=description,
            host=host,
            port=port,
            reason=error.reason,
            verify_code=error.verify_code,
            verify_message=error.verify_message,
        ) from None
    except ssl.SSLError as error:
        raise TlsFailed(
            f"TLS handshake with {description} failed: {error.reason}",
            peer=description,
            host=host,
            port=port,
            reason=error.reason,
        ) from None
    except ConnectionFailed:
        connection.abort()
        raise
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise Unreachable(
            f"cannot connect to {description}: {reason}",
            peer=description,
            host=host,
            port=port,
            errno=error.errno,
            reason=reason,
        ) from None
    except BaseException:
        connection.abort()
        raise
    return connection
