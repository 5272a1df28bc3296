"""A TCP proxy between the layer and RabbitMQ that breaks the network on command.

    async with FaultProxy() as proxy:
        layer = RabbitmqChannelLayer(host=proxy.url(broker.url))
        ...
        proxy.cut()  # every current connection is reset, on both sides

What it can do to the connections that go through it:

- ``cut()``: abort every current connection, client and broker side (a TCP reset);
- ``stall()`` / ``resume()``: a blackhole on the current connections: no byte, end of
  stream or reset goes through in either direction, yet every socket stays open; what
  was held back goes through on ``resume()``, as TCP retransmissions would carry it.
  Connections made after ``stall()`` are not affected;
- ``slow(delay)``: hold each chunk ``delay`` seconds before forwarding it (order kept);
  ``slow(0)`` ends that;
- ``refuse()`` / ``accept()``: while refusing, a new connection is reset as soon as it
  is accepted, so connecting fails at once;
- ``after_method(name, action)``: the next time the broker sends that AMQP method (``"Confirm.SelectOk"``),
  on any connection, forward it, then ``"cut"`` (reset), ``"close"`` (end both streams in order) or
  ``"stall"`` that connection: a fault at an exact point of the protocol;
- ``accepted``, ``refused`` and ``active`` count the connections.

It runs on the loop that enters it; everything it opened is closed on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

CHUNK = 64 * 1024
ACTIONS = ("cut", "close", "stall")
_FRAME_HEAD = struct.Struct(">BHI")  # type, channel, size; then the payload and 0xCE
_METHOD_INDEX = struct.Struct(">I")  # class id and method id, as pamqp's ``index``


def method_index(name: str) -> int:
    """pamqp's index of an AMQP method named like ``"Confirm.SelectOk"``."""
    from pamqp import commands

    class_name, _, method_name = name.partition(".")
    return int(getattr(getattr(commands, class_name), method_name).index)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with a TCP reset rather than an orderly end of stream."""
    sock = writer.get_extra_info("socket")
    if sock is not None and not writer.transport.is_closing():
        # uvloop's stand-in socket of a transport closed meanwhile has no descriptor: ValueError.
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _wait_closed(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        await writer.wait_closed()


class _Forwarding:
    """One client connection and its connection to the target, and the two pumps between them."""

    def __init__(self, proxy: FaultProxy, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter):
        self.proxy = proxy
        self.client_reader = client_reader
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.task: asyncio.Task[None] | None = None
        self._was_cut = False  # end with resets rather than orderly closes
        self._cancelled = False
        self._from_broker = bytearray()  # bytes from the broker not yet parsed into whole frames

    def stall(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    def cut(self) -> None:
        if self._cancelled:
            return  # already going: cancelling again would cut its clean-up short
        self._was_cut = self._cancelled = True
        _reset(self.client)
        if self.upstream is not None:
            _reset(self.upstream)
        if self.task is not None:
            self.task.cancel()

    async def run(self) -> None:
        try:
            try:
                upstream_reader, self.upstream = await asyncio.open_connection(
                    self.proxy.target_host, self.proxy.target_port
                )
            except OSError:
                _reset(self.client)
                return
            if self._was_cut:  # cut while we were connecting
                _reset(self.upstream)
                return
            pumps = [
                asyncio.ensure_future(self._pump(self.client_reader, self.upstream)),
                asyncio.ensure_future(self._pump(upstream_reader, self.client, from_broker=True)),
            ]
            try:
                await asyncio.gather(*pumps)
            except OSError:  # one side was reset: so is the other
                self._was_cut = True
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            for writer in (self.client, self.upstream):
                if writer is None:
                    continue
                if self._was_cut:
                    _reset(writer)
                else:
                    writer.close()
                await _wait_closed(writer)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, from_broker: bool = False
    ) -> None:
        """Forward one direction; an end of stream or a reset is held back while stalled, like bytes."""
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                delay = self.proxy.delay
                if delay > 0:
                    await asyncio.sleep(delay)
                await self.flowing.wait()
                action = None
                if from_broker:
                    data, action = self._until_trigger(data)
                if writer.is_closing():  # the other side ended while we waited (uvloop raises on a write)
                    raise ConnectionResetError("the other side of the proxy is closed")
                writer.write(data)
                await writer.drain()
                if action is not None:
                    await self._act(action)
                    if action != "stall":
                        return
        except OSError:
            await self.flowing.wait()
            raise
        await self.flowing.wait()
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()

    def _until_trigger(self, data: bytes) -> tuple[bytes, str | None]:
        """``data`` up to the end of the method frame an armed trigger waits for, and its action;
        or all of ``data`` and None."""
        buffer = self._from_broker
        earlier = len(buffer)  # bytes of earlier chunks, forwarded already
        buffer += data
        position = 0
        while len(buffer) - position >= _FRAME_HEAD.size + 4:
            frame_type, _channel, size = _FRAME_HEAD.unpack_from(buffer, position)
            end = position + _FRAME_HEAD.size + size + 1
            if end > len(buffer):
                break
            if frame_type == 1:
                (index,) = _METHOD_INDEX.unpack_from(buffer, position + _FRAME_HEAD.size)
                action = self.proxy._take_trigger(index)
                if action is not None:
                    del buffer[:]
                    return data[: end - earlier], action
            position = end
        del buffer[:position]
        return data, None

    async def _act(self, action: str) -> None:
        if action == "stall":
            self.stall()
        elif action == "cut":
            self.cut()
        else:  # close: an orderly end of both streams, as a broker that closes its socket
            for writer in (self.client, self.upstream):
                if writer is not None and writer.can_write_eof() and not writer.is_closing():
                    writer.write_eof()
            self.client.close()
            if self.upstream is not None:
                self.upstream.close()


class FaultProxy:
    """Listens on 127.0.0.1 (a free port) and forwards every connection to ``target_host:target_port``."""

    def __init__(self, target_host: str = "127.0.0.1", target_port: int = 5672) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = "127.0.0.1"
        self.port = 0  # known once entered
        #: Connections forwarded to the target since the start.
        self.accepted = 0
        #: Connections reset at once because the proxy was refusing.
        self.refused = 0
        #: Seconds each chunk is held before it is forwarded (see :meth:`slow`).
        self.delay = 0.0
        #: What a forwarding task raised unexpectedly (a bug of the proxy): the tests check it is empty.
        self.errors: list[BaseException] = []
        self._refusing = False
        self._closing = False
        self._triggers: dict[int, str] = {}  # method index -> action, see after_method()
        #: How many armed triggers fired.
        self.triggered = 0
        self._forwardings: set[_Forwarding] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    # Lifetime ------------------------------------------------------------------------------------

    async def __aenter__(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._on_client, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop listening and reset every connection; returns once every socket is closed."""
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self.cut()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    # Faults --------------------------------------------------------------------------------------

    def url(self, amqp_url: str) -> str:
        """``amqp_url`` (credentials and vhost kept) pointing at this proxy instead."""
        parts = urlsplit(amqp_url)
        userinfo, at, _address = parts.netloc.rpartition("@")
        return urlunsplit((parts.scheme, f"{userinfo}{at}{self.host}:{self.port}", parts.path, "", ""))

    @property
    def active(self) -> int:
        """Connections being forwarded now (stalled ones included)."""
        return len(self._forwardings)

    def cut(self) -> int:
        """Reset every current connection on both sides; return how many there were."""
        forwardings = list(self._forwardings)
        for forwarding in forwardings:
            forwarding.cut()
        return len(forwardings)

    def stall(self) -> None:
        """Stop forwarding anything on the current connections, in both directions; keep them open."""
        for forwarding in self._forwardings:
            forwarding.stall()

    def resume(self) -> None:
        """Let the stalled connections go on with what they held back."""
        for forwarding in self._forwardings:
            forwarding.resume()

    def slow(self, delay: float) -> None:
        """Hold every chunk, of current and new connections, ``delay`` seconds; 0 ends that."""
        self.delay = delay

    def after_method(self, name: str, action: str = "cut") -> None:
        """The next time the broker sends method ``name`` (``"Confirm.SelectOk"``) on any connection:
        forward it, then ``action`` that connection ("cut", "close" or "stall"). Once."""
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}")
        self._triggers[method_index(name)] = action

    def _take_trigger(self, index: int) -> str | None:
        action = self._triggers.pop(index, None)
        if action is not None:
            self.triggered += 1
        return action

    def refuse(self) -> None:
        """Reset new connections as soon as they are accepted (current ones go on)."""
        self._refusing = True

    def accept(self) -> None:
        """Forward new connections again."""
        self._refusing = False

    # Connections -------------------------------------------------------------------------------

    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing or self._closing:
            self.refused += 1
            _reset(writer)
            task = asyncio.ensure_future(_wait_closed(writer))
        else:
            self.accepted += 1
            forwarding = _Forwarding(self, reader, writer)
            self._forwardings.add(forwarding)
            task = forwarding.task = asyncio.ensure_future(forwarding.run())
            task.add_done_callback(lambda _task: self._forwardings.discard(forwarding))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.errors.append(task.exception())  # type: ignore[arg-type]
