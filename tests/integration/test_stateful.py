"""A stateful hunt for lost, doubled or stuck messages: layer calls interleaved with protocol faults.

Hypothesis's ``RuleBasedStateMachine`` drives one receiving layer, connected through a fault
proxy, and a sending layer connected straight to the broker. Its rules make channels, send to them,
receive, join and leave groups, send to groups, and inject faults: a cut now, or an armed fault that
ends, closes or stalls the connection right after a chosen method frame from the broker (during a
set-up or later), followed by a cut that makes the layer reconnect through that point.

What must hold, on asyncio's loop and on uvloop:

- a send() or group_send() that returned is received, unless the receiving queue may have gone
  meanwhile: a consuming connection installed after the send began means the process's exclusive
  queue (and what it held) went with the old one, which the layer documents and counts;
- nothing is received twice, and one sender's messages to a channel arrive in order;
- every call ends within its documented bound (here: ``CALL_BOUND``), with the result or a
  documented error;
- after the faults stop, the layer is "up" again within a bound, and then calls work;
- asyncio reports no exception nobody retrieved.

``make test`` runs a few examples; ``STATEFUL_EXAMPLES=200 make test PYTEST_ARGS=-k stateful``
runs many more.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from typing import Any

import pytest
from channels.exceptions import ChannelFull
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from channels_rabbitmq.core import RabbitmqChannelLayer
from channels_rabbitmq.exceptions import RabbitmqLayerError
from testbed.faults.proxy import FaultProxy
from tests.conftest import LOOP_FACTORIES, Broker, new_loops_of_kind

pytestmark = [pytest.mark.timeout(900), pytest.mark.no_unretrieved_errors]

EXAMPLES = int(os.environ.get("STATEFUL_EXAMPLES", "4"))
STEPS = 20
#: Every call of the layer under test must end within this: connect_timeout plus connection_wait
#: (the longest documented bound of one call, with these settings), plus a margin.
CONFIG = {
    "connect_timeout": 2.0,
    "connection_wait": 3.0,
    "reconnect_delay_min": 0.01,
    "reconnect_delay_max": 0.2,
}
CALL_BOUND = CONFIG["connect_timeout"] + CONFIG["connection_wait"] + 2.0
RECOVERY_BOUND = 30.0
#: Methods a fault may follow: the set-up of each connection, and the calls after it.
FAULT_POINTS = (
    "Connection.OpenOk",
    "Channel.OpenOk",
    "Exchange.DeclareOk",
    "Queue.DeclareOk",
    "Queue.BindOk",
    "Basic.QosOk",
    "Basic.ConsumeOk",
    "Confirm.SelectOk",
    "Queue.UnbindOk",
)
GROUPS = ("red", "green", "blue")


class LayerUnderFaults(RuleBasedStateMachine):
    loop_kind = "asyncio"
    broker: Broker

    def __init__(self) -> None:
        super().__init__()
        self.loop = LOOP_FACTORIES[self.loop_kind]()
        self.proxy = FaultProxy(*self._broker_address())
        self.run(self.proxy.__aenter__())
        self.layer = RabbitmqChannelLayer(host=self.proxy.url(self.broker.url), **CONFIG)
        self.sender = RabbitmqChannelLayer(host=self.broker.url, **CONFIG)
        self.channels: list[str] = []
        #: Per channel: what was sent and not received yet, as (number, consuming connections then).
        self.expected: dict[str, deque[tuple[int, int]]] = {}
        self.members: dict[str, set[str]] = {group: set() for group in GROUPS}
        self.received: dict[str, set[int]] = {}  # per channel: a group's message reaches each member
        self.next_number = 0
        self.faults = 0

    def _broker_address(self) -> tuple[str, int]:
        from urllib.parse import urlsplit

        parts = urlsplit(self.broker.url)
        return parts.hostname or "127.0.0.1", parts.port or 5672

    def run(self, awaitable: Any, bound: float | None = None) -> Any:
        """Run one call on the machine's loop; it must end within ``bound`` (default CALL_BOUND)."""

        async def bounded() -> Any:
            started = time.monotonic()
            try:
                return await asyncio.wait_for(awaitable, bound or CALL_BOUND)
            except asyncio.TimeoutError:
                raise AssertionError(
                    f"a call did not end within {bound or CALL_BOUND:g}s "
                    f"(after {time.monotonic() - started:.1f}s)"
                ) from None

        return self.loop.run_until_complete(bounded())

    def next_message(self, channel: str, wait: float) -> dict[str, Any] | None:
        """receive() (which waits for ever by design), or None after ``wait`` seconds or an outage."""

        async def receive() -> dict[str, Any] | None:
            try:
                return await asyncio.wait_for(self.layer.receive(channel), wait)
            except (asyncio.TimeoutError, RabbitmqLayerError):
                return None

        return self.loop.run_until_complete(receive())

    @property
    def epoch(self) -> int:
        """Consuming connections installed so far: a later one means the queue was made anew."""
        link = self.layer._links.of_loop(self.loop)
        return 0 if link is None else link.consuming.connections

    # Rules ------------------------------------------------------------------------------------

    @initialize()
    def first_channel(self) -> None:
        self.new_channel()

    @rule()
    def new_channel(self) -> None:
        try:
            channel = self.run(self.layer.new_channel())
        except RabbitmqLayerError:
            return  # documented: an outage outlasting the bound
        self.channels.append(channel)
        self.expected[channel] = deque()
        self.received[channel] = set()

    @precondition(lambda self: self.channels)
    @rule(data=st.data())
    def send(self, data: st.DataObject) -> None:
        channel = data.draw(st.sampled_from(self.channels))
        number = self.next_number
        self.next_number += 1
        epoch = self.epoch
        try:
            self.run(self.sender.send(channel, {"type": "n", "n": number}))
        except ChannelFull:
            return
        self.expected[channel].append((number, epoch))

    @precondition(lambda self: self.channels)
    @rule(data=st.data())
    def receive(self, data: st.DataObject) -> None:
        channel = data.draw(st.sampled_from(self.channels))
        self._receive_some(channel, wait=0.2)

    @precondition(lambda self: self.channels)
    @rule(group=st.sampled_from(GROUPS), data=st.data())
    def group_add(self, group: str, data: st.DataObject) -> None:
        channel = data.draw(st.sampled_from(self.channels))
        try:
            self.run(self.layer.group_add(group, channel))
        except RabbitmqLayerError:
            return  # not added; or added once the connection is back (then it is a member)
        self.members[group].add(channel)

    @rule(group=st.sampled_from(GROUPS), data=st.data())
    def group_discard(self, group: str, data: st.DataObject) -> None:
        if not self.members[group]:
            return
        channel = data.draw(st.sampled_from(sorted(self.members[group])))
        try:
            self.run(self.layer.group_discard(group, channel))
        except RabbitmqLayerError:
            return
        self.members[group].discard(channel)

    @rule(group=st.sampled_from(GROUPS))
    def group_send(self, group: str) -> None:
        number = self.next_number
        self.next_number += 1
        epoch = self.epoch
        members = set(self.members[group])
        try:
            self.run(self.sender.group_send(group, {"type": "n", "n": number}))
        except RabbitmqLayerError:
            return
        for channel in members:
            self.expected[channel].append((number, epoch))

    @rule()
    def cut(self) -> None:
        self.faults += 1
        self.proxy.cut()
        self.loop.run_until_complete(asyncio.sleep(0.01))  # the resets reach both ends

    @rule(point=st.sampled_from(FAULT_POINTS), action=st.sampled_from(("cut", "close", "stall")))
    def fault_after(self, point: str, action: str) -> None:
        """The next time the broker sends ``point``, act; then cut, so that a reconnection passes there."""
        self.faults += 1
        self.proxy.after_method(point, action)
        self.proxy.cut()
        self.loop.run_until_complete(asyncio.sleep(0.05))
        if action == "stall":
            self.loop.run_until_complete(asyncio.sleep(0.2))
            self.proxy.resume()

    # Invariants ---------------------------------------------------------------------------------

    @invariant()
    def state_is_documented(self) -> None:
        assert self.layer.stats().state in ("idle", "connecting", "up", "recovering")

    # The end ------------------------------------------------------------------------------------

    def _receive_some(self, channel: str, wait: float) -> None:
        """Receive what arrives for ``channel`` within ``wait`` seconds; check it against what was sent."""
        while True:
            message = self.next_message(channel, wait)
            if message is None:
                return
            if message.get("type") != "n":
                continue  # not one of ours (a reconnect notice, were it configured)
            number = message["n"]
            assert number not in self.received[channel], f"message {number} received twice on {channel}"
            expected = self.expected[channel]
            # Everything sent before it to this channel either arrived already, or was lost with a queue.
            while expected and expected[0][0] != number:
                lost_number, epoch = expected.popleft()
                assert self.epoch > epoch, (
                    f"message {lost_number} to {channel} is missing, "
                    "though no new queue was made since it was sent"
                )
            assert expected, f"message {number} arrived on {channel} out of order, or was never sent there"
            expected.popleft()
            self.received[channel].add(number)

    def teardown(self) -> None:
        try:
            self.proxy.accept()
            self.proxy.resume()
            self.proxy._triggers.clear()
            deadline = time.monotonic() + RECOVERY_BOUND
            while True:  # the faults stopped: up again, and calls work, within a bound
                # A cut made just before may not be noticed yet: "up" is checked again after a
                # probe that went through the layer's own connections both ways.
                while self.layer.stats().state != "up":
                    assert time.monotonic() < deadline, f"not up again {RECOVERY_BOUND:g}s after the faults"
                    self.loop.run_until_complete(asyncio.sleep(0.01))
                try:
                    probe = self.run(self.layer.new_channel())
                    self.run(self.layer.send(probe, {"type": "probe"}))
                    if self.next_message(probe, 2.0) == {"type": "probe"}:
                        break
                except RabbitmqLayerError:
                    pass  # an outage that began before the faults stopped
                assert time.monotonic() < deadline, f"calls do not work {RECOVERY_BOUND:g}s after the faults"
            assert self.layer.stats().state == "up"
            for channel in self.channels:
                self._receive_some(channel, wait=0.5)
                for number, epoch in self.expected[channel]:
                    assert self.epoch > epoch, f"message {number} to {channel} never arrived"
        finally:
            self.run(self.layer.close())
            self.run(self.sender.close())
            self.run(self.proxy.__aexit__(None, None, None))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()
            assert not self.proxy.errors


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_no_message_is_lost_doubled_or_stuck_under_faults_at_protocol_points(
    broker: Broker, loop_kind: str
) -> None:
    machine = type(
        f"LayerUnderFaults_{loop_kind}", (LayerUnderFaults,), {"loop_kind": loop_kind, "broker": broker}
    )
    machine.TestCase.settings = settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    with new_loops_of_kind(loop_kind):
        machine.TestCase().runTest()
