"""The AMQP 0-9-1 connection as a state machine with no I/O.

Bytes from the socket go into :meth:`AmqpProtocol.receive_data`, which returns events;
calls such as :meth:`AmqpProtocol.publish` queue bytes that :meth:`take_outgoing` hands
to whoever owns the socket. No clock, no event loop, no socket: every edge case is a
plain unit test on bytes.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Any

from pamqp import commands

from . import frames
from .errors import ProtocolError, RequestNotEncodable
from .frames import (
    BASIC_ACK_INDEX,
    BASIC_DELIVER_INDEX,
    BASIC_NACK_INDEX,
    FRAME_HEAD_SIZE,
    METHOD_INDEX_SIZE,
    decode_frame_head,
    decode_method_index,
    decode_whole_delivery,
)

# Events ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class ConnectionOpened:
    """The handshake is done: the connection can open channels."""

    frame_max: int
    channel_max: int
    heartbeat: int
    server_properties: dict[str, Any]


@dataclass(slots=True)
class MethodReceived:
    """A method other than a delivery or a confirm: usually the reply to a request."""

    channel_id: int
    method: Any


@dataclass(slots=True)
class Delivery:
    """A whole message handed to one of our consumers."""

    channel_id: int
    delivery_tag: int
    exchange: str
    routing_key: str
    headers: dict[str, Any] | None
    body: bytes
    redelivered: bool = False


@dataclass(slots=True)
class UndecodableDelivery:
    """A delivery that cannot be handed on; its body was skipped, never buffered.

    It still has to be acknowledged like the others. ``too_large`` tells a body over
    ``max_body_size`` from an unreadable delivery (bad properties, a non-UTF-8 exchange
    name or routing key); ``reason`` says what it was in words.
    """

    channel_id: int
    delivery_tag: int
    reason: str
    too_large: bool = False


@dataclass(slots=True)
class MessageReturned:
    """The broker gave back a ``mandatory`` message that no queue took (``basic.return``).

    With publisher confirms, the return comes before the message's ``basic.ack``. ``error``
    says why the content could not be read (its body is then empty).
    """

    channel_id: int
    reply_code: int
    reply_text: str
    exchange: str
    routing_key: str
    headers: dict[str, Any] | None
    body: bytes
    error: str | None = None


@dataclass(slots=True)
class PublishConfirmed:
    """The broker acked (``accepted``) or nacked publishes up to ``delivery_tag``."""

    channel_id: int
    delivery_tag: int
    multiple: bool
    accepted: bool


@dataclass(slots=True)
class ChannelClosed:
    """The broker closed a channel (a refused request); close-ok is already queued."""

    channel_id: int
    reply_code: int
    reply_text: str
    class_id: int = 0
    method_id: int = 0


@dataclass(slots=True)
class ConnectionClosed:
    """The broker closed the connection (or acknowledged our close)."""

    reply_code: int
    reply_text: str
    by_us: bool = False


@dataclass(slots=True)
class ConnectionBlocked:
    """The broker stopped reading our publishes (a resource alarm); ``reason`` says why."""

    reason: str


@dataclass(slots=True)
class ConnectionUnblocked:
    """The broker reads our publishes again."""


Event = (
    ConnectionOpened
    | MethodReceived
    | Delivery
    | UndecodableDelivery
    | MessageReturned
    | PublishConfirmed
    | ChannelClosed
    | ConnectionClosed
    | ConnectionBlocked
    | ConnectionUnblocked
)


class State(enum.Enum):
    AWAIT_START = "await connection.start"
    AWAIT_TUNE = "await connection.tune"
    AWAIT_OPEN_OK = "await connection.open-ok"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass
class _IncomingContent:
    """A delivery, or a returned message, whose header or body frames are still arriving."""

    deliver: frames.Deliver | commands.Basic.Return
    body_size: int = -1
    headers: dict[str, Any] | None = None
    parts: list[bytes] = field(default_factory=list)
    received: int = 0
    error: str | None = None  # set: the body frames are counted, not kept
    too_large: bool = False


@dataclass
class Credentials:
    username: str
    password: str = field(repr=False)

    def plain_response(self) -> str:
        return f"\0{self.username}\0{self.password}"


class AmqpProtocol:
    """One AMQP connection's state: handshake, channels, content assembly, publish tags."""

    def __init__(
        self,
        credentials: Credentials,
        virtual_host: str,
        *,
        heartbeat: int = 60,
        frame_max: int = 131072,
        channel_max: int = 2047,
        client_properties: dict[str, Any] | None = None,
        max_body_size: int | None = None,
    ) -> None:
        self.credentials = credentials
        #: Bodies larger than this are skipped frame by frame and reported as too large.
        self.max_body_size = max_body_size if max_body_size is not None else 2**64
        self.virtual_host = virtual_host
        self.wanted_heartbeat = heartbeat
        self.wanted_frame_max = frame_max
        self.wanted_channel_max = channel_max
        self.client_properties = client_properties or {}
        self.state = State.AWAIT_START
        self.frame_max = 4096  # the spec's minimum, until tuned
        self.heartbeat = 0
        self.channel_max = channel_max
        self.server_properties: dict[str, Any] = {}
        self._leftover = b""  # the start of a frame whose end has not arrived
        self._outgoing: list[bytes] = [frames.PROTOCOL_HEADER]
        self._incoming: dict[int, _IncomingContent] = {}
        self._next_publish_tag: dict[int, int] = {}  # channels in confirm mode

    # Output -----------------------------------------------------------------------------------

    def take_outgoing(self) -> bytes:
        """Return (and forget) the bytes queued for the broker."""
        if not self._outgoing:
            return b""
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        return data

    @property
    def has_outgoing(self) -> bool:
        return bool(self._outgoing)

    def send_method(self, channel_id: int, method: Any) -> None:
        """Queue any method (pamqp object); replies come back as :class:`MethodReceived`.

        Raises :class:`RequestNotEncodable` for a method AMQP cannot carry; nothing is queued then.
        """
        try:
            frame = frames.encode_method(channel_id, method)
        except (TypeError, ValueError, struct.error) as error:
            raise RequestNotEncodable(getattr(method, "name", type(method).__name__), str(error)) from None
        if isinstance(method, commands.Confirm.Select):
            self._next_publish_tag[channel_id] = 1
        elif isinstance(method, commands.Channel.Open):
            self._next_publish_tag.pop(channel_id, None)
            self._incoming.pop(channel_id, None)
        self._outgoing.append(frame)

    def publish(
        self,
        channel_id: int,
        exchange: bytes,
        routing_key: bytes,
        properties: bytes,
        body: bytes,
        mandatory: bool = False,
    ) -> int:
        """Queue one message; return its publish tag (0 unless the channel confirms).

        A ``mandatory`` message that no queue takes comes back as :class:`MessageReturned`.
        """
        self._outgoing.append(
            frames.encode_publish(
                channel_id, exchange, routing_key, properties, body, self.frame_max, mandatory
            )
        )
        tag = self._next_publish_tag.get(channel_id, 0)
        if tag:
            self._next_publish_tag[channel_id] = tag + 1
        return tag

    def ack(self, channel_id: int, delivery_tag: int, multiple: bool = True) -> None:
        """Queue a ``basic.ack`` for one delivery or (``multiple``) all up to it."""
        self._outgoing.append(frames.encode_ack(channel_id, delivery_tag, multiple))

    def heartbeat_frame(self) -> None:
        self._outgoing.append(frames.HEARTBEAT_FRAME)

    def close(self, reply_code: int = 200, reply_text: str = "closed by client") -> None:
        """Start a graceful close; :class:`ConnectionClosed` with ``by_us`` follows."""
        if self.state in (State.CLOSING, State.CLOSED):
            return
        if self.state is not State.OPEN:
            self.state = State.CLOSED
            return
        self.state = State.CLOSING
        self._outgoing.append(
            frames.encode_method(0, commands.Connection.Close(reply_code, reply_text, 0, 0))
        )

    # Input ------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Consume bytes from the broker; return the events they complete."""
        if self._leftover:
            data = self._leftover + data
        events: list[Event] = []
        view = memoryview(data)
        offset = 0
        end = len(data)
        try:
            while end - offset >= FRAME_HEAD_SIZE:
                frame_type, channel_id, size = decode_frame_head(view, offset)
                payload_start = offset + FRAME_HEAD_SIZE
                frame_end = payload_start + size
                if frame_end >= end:
                    if frame_type not in frames.FRAME_TYPES or size > max(self.frame_max, 131072) * 2:
                        raise ProtocolError(f"bad frame head: type {frame_type}, size {size}")
                    break
                if view[frame_end] != frames.FRAME_END:
                    raise ProtocolError("frame does not end with 0xCE")
                if frame_type == frames.FRAME_METHOD:
                    if size < METHOD_INDEX_SIZE:
                        raise ProtocolError(f"method frame of {size} bytes")
                    if decode_method_index(data, payload_start)[0] == BASIC_DELIVER_INDEX:
                        # the fast path: the delivery's frames read at once when they are all here
                        whole = decode_whole_delivery(data, offset, frame_end, channel_id, self.max_body_size)
                        if whole is not None:
                            offset, tag, exchange, routing_key, headers, body, redelivered = whole
                            events.append(
                                Delivery(channel_id, tag, exchange, routing_key, headers, body, redelivered)
                            )
                            continue
                payload = view[payload_start:frame_end]
                offset = frame_end + 1
                if frame_type == frames.FRAME_METHOD:
                    self._on_method(channel_id, payload, events)
                elif frame_type == frames.FRAME_HEADER:
                    self._on_content_header(channel_id, payload, events)
                elif frame_type == frames.FRAME_BODY:
                    self._on_body(channel_id, payload, events)
                elif frame_type != frames.FRAME_HEARTBEAT:
                    raise ProtocolError(f"unknown frame type {frame_type}")
        except ProtocolError:
            raise
        except frames.FrameError as error:  # the codec's own words
            raise ProtocolError(str(error)) from None
        except Exception as error:  # whatever the peer's bytes make a decoder raise
            raise ProtocolError(f"truncated or malformed frame: {type(error).__name__}: {error}") from None
        finally:
            self._leftover = data[offset:] if offset < end else b""
        return events

    def _on_method(self, channel_id: int, payload: memoryview, events: list[Event]) -> None:
        (index,) = decode_method_index(payload)
        if index == BASIC_DELIVER_INDEX:
            deliver = frames.decode_deliver(payload[METHOD_INDEX_SIZE:])
            self._incoming[channel_id] = _IncomingContent(deliver, error=deliver.error)
            return
        if index in (BASIC_ACK_INDEX, BASIC_NACK_INDEX):
            tag, multiple = frames.decode_confirm(payload[METHOD_INDEX_SIZE:])
            events.append(PublishConfirmed(channel_id, tag, multiple, index == BASIC_ACK_INDEX))
            return
        method = frames.decode_method(payload)
        if channel_id == 0:
            self._on_connection_method(method, events)
        elif isinstance(method, commands.Basic.Return):  # its content header and body follow
            self._incoming[channel_id] = _IncomingContent(method)
        elif isinstance(method, commands.Channel.Close):
            self._next_publish_tag.pop(channel_id, None)
            self._incoming.pop(channel_id, None)
            self._outgoing.append(frames.encode_method(channel_id, commands.Channel.CloseOk()))
            events.append(
                ChannelClosed(
                    channel_id,
                    method.reply_code or 0,
                    method.reply_text or "",
                    method.class_id or 0,
                    method.method_id or 0,
                )
            )
        else:
            events.append(MethodReceived(channel_id, method))

    def _on_connection_method(self, method: Any, events: list[Event]) -> None:
        if isinstance(method, commands.Connection.Start):
            if self.state is not State.AWAIT_START:
                raise ProtocolError("unexpected connection.start")
            self.server_properties = dict(method.server_properties or {})
            mechanisms = (method.mechanisms or "").split()
            if "PLAIN" not in mechanisms:
                raise ProtocolError(f"broker offers no PLAIN authentication (offers: {method.mechanisms})")
            self._outgoing.append(
                frames.encode_method(
                    0,
                    commands.Connection.StartOk(
                        client_properties=self.client_properties,
                        mechanism="PLAIN",
                        response=self.credentials.plain_response(),
                        locale="en_US",
                    ),
                )
            )
            self.state = State.AWAIT_TUNE
        elif isinstance(method, commands.Connection.Tune):
            if self.state is not State.AWAIT_TUNE:
                raise ProtocolError("unexpected connection.tune")
            if 0 < method.frame_max < frames.FRAME_MIN_SIZE:
                raise ProtocolError(
                    f"broker proposed frame_max={method.frame_max} in connection.tune, below the "
                    f"protocol's minimum of {frames.FRAME_MIN_SIZE} bytes"
                )
            self.channel_max = _negotiate(self.wanted_channel_max, method.channel_max)
            self.frame_max = _negotiate(self.wanted_frame_max, method.frame_max)
            self.heartbeat = (
                _negotiate(self.wanted_heartbeat, method.heartbeat) if self.wanted_heartbeat else 0
            )
            self._outgoing.append(
                frames.encode_method(
                    0, commands.Connection.TuneOk(self.channel_max, self.frame_max, self.heartbeat)
                )
            )
            self._outgoing.append(frames.encode_method(0, commands.Connection.Open(self.virtual_host)))
            self.state = State.AWAIT_OPEN_OK
        elif isinstance(method, commands.Connection.OpenOk):
            self.state = State.OPEN
            events.append(
                ConnectionOpened(self.frame_max, self.channel_max, self.heartbeat, self.server_properties)
            )
        elif isinstance(method, commands.Connection.Close):
            if self.state is not State.CLOSED:
                self._outgoing.append(frames.encode_method(0, commands.Connection.CloseOk()))
            self.state = State.CLOSED
            events.append(ConnectionClosed(method.reply_code or 0, method.reply_text or ""))
        elif isinstance(method, commands.Connection.CloseOk):
            self.state = State.CLOSED
            events.append(ConnectionClosed(200, "closed by client", by_us=True))
        elif isinstance(method, commands.Connection.Blocked):
            events.append(ConnectionBlocked(method.reason))
        elif isinstance(method, commands.Connection.Unblocked):
            events.append(ConnectionUnblocked())
        elif isinstance(method, commands.Connection.Secure):
            raise ProtocolError("broker asked for a SASL challenge; only PLAIN is supported")
        else:
            events.append(MethodReceived(0, method))

    def _on_content_header(self, channel_id: int, payload: memoryview, events: list[Event]) -> None:
        content = self._incoming.get(channel_id)
        if content is None or content.body_size >= 0:
            raise ProtocolError(f"content header without a delivery on channel {channel_id}")
        try:
            content.body_size, properties = frames.decode_content_header(payload)
            if content.body_size > self.max_body_size:
                content.error = (
                    f"its body is too large: {content.body_size} bytes, over max_message_size "
                    f"({self.max_body_size})"
                )
                content.too_large = True
            elif content.error is None:
                content.headers = frames.decode_headers(properties)
        except Exception as error:  # a property table pamqp cannot read either
            content.error = f"unreadable message properties: {error}"
            if content.body_size < 0:
                raise ProtocolError(content.error) from None
        if content.body_size == 0:
            self._complete(channel_id, content, events)

    def _on_body(self, channel_id: int, payload: memoryview, events: list[Event]) -> None:
        content = self._incoming.get(channel_id)
        if content is None or content.body_size < 0:
            raise ProtocolError(f"content body without a header on channel {channel_id}")
        if content.error is None:
            content.parts.append(bytes(payload))
        content.received += len(payload)
        if content.received >= content.body_size:
            self._complete(channel_id, content, events)

    def _complete(self, channel_id: int, content: _IncomingContent, events: list[Event]) -> None:
        del self._incoming[channel_id]
        deliver = content.deliver
        if isinstance(deliver, commands.Basic.Return):
            events.append(
                MessageReturned(
                    channel_id,
                    deliver.reply_code or 0,
                    deliver.reply_text or "",
                    deliver.exchange or "",
                    deliver.routing_key or "",
                    content.headers,
                    b"" if content.error is not None else b"".join(content.parts),
                    content.error,
                )
            )
            return
        if content.error is not None:
            events.append(
                UndecodableDelivery(channel_id, deliver.delivery_tag, content.error, content.too_large)
            )
            return
        body = content.parts[0] if len(content.parts) == 1 else b"".join(content.parts)
        events.append(
            Delivery(
                channel_id,
                deliver.delivery_tag,
                deliver.exchange,
                deliver.routing_key,
                content.headers,
                body,
                deliver.redelivered,
            )
        )


def _negotiate(ours: int, theirs: int) -> int:
    """Tune negotiation: the lower of two limits, where 0 means "no limit"."""
    if not ours:
        return theirs
    if not theirs:
        return ours
    return min(ours, theirs)
