"""The soak's end-to-end ledger: what was sent, what arrived where, and what that adds up to.

Pure bookkeeping, no I/O and no clock: the orchestrator feeds it sends, send outcomes,
receipts and fault windows, all stamped with ``time.monotonic()`` (one clock for every
process on Linux), and asks for a :class:`Summary` at the end.

For each send that returned normally, the expected receivers are its channel (a direct
send) or every member of its group (memberships are fixed for the whole run). Each
(message, receiver) pair is then received exactly once, more than once (duplicates), or
never. A pair never received is:

- not counted when the receiver is a *dead* channel (one that never reads);
- an expected drop when the receiver is a *slow* channel (it reads slower than it is
  sent to, so its excess is dropped or expires by design);
- lost in a fault window when it was sent while a fault was on (from ``margin`` seconds
  before the fault started until ``margin`` seconds after the layer had recovered):
  RabbitMQ deletes a dropped connection's exclusive queue with what waited in it;
- lost outside any fault otherwise: the layer promises that never happens.

Each lost pair also gets a cause, from what the processes reported while it was on its way:

- QUEUE_GONE (inherent): the receiving process's consuming connection was down at some
  moment between the send and the end of its fault window. RabbitMQ deleted its exclusive
  queue, with what waited in it, and its groups were unbound until it set up again;
- REFUSED (avoidable): a group send during which the sender's layer counted a publish
  that RabbitMQ refused (a member's queue at ``remote_capacity``; ``group_send()`` does not
  raise for that);
- UNEXPLAINED (avoidable): neither. The layer has no loss of this kind by design.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from testbed.measure import percentile

DIRECT = "direct"
GROUP = "group"

QUEUE_GONE = "queue gone with its connection"
REFUSED = "refused by a full queue"
UNEXPLAINED = "unexplained"
INHERENT_CAUSES = frozenset({QUEUE_GONE})  # the design loses these; the others are avoidable


@dataclass(frozen=True)
class FaultWindow:
    """One injected fault: ``started_at`` to ``ended_at``, and when messages flowed again.

    ``recovered_at`` is None when no probe got through within ``waited`` seconds after the
    end: the window then closes ``waited`` seconds after the end, and what was lost later
    counts as lost outside any fault.
    """

    kind: str
    target: str
    started_at: float
    ended_at: float
    recovered_at: float | None
    waited: float = 0.0

    @property
    def closes_at(self) -> float:
        return self.recovered_at if self.recovered_at is not None else self.ended_at + self.waited

    def covers(self, sent_at: float, margin: float) -> bool:
        return self.started_at - margin <= sent_at <= max(self.closes_at, self.ended_at) + margin


@dataclass(frozen=True)
class Outage:
    """A receiving process's consuming connection was down from ``started_at`` to ``ended_at``
    (None: still down at the end): its queue was gone and its groups unbound meanwhile."""

    channels: frozenset[str]
    started_at: float
    ended_at: float | None

    def overlaps(self, start: float, end: float) -> bool:
        return self.started_at <= end and (self.ended_at is None or self.ended_at >= start)


@dataclass
class _Send:
    kind: str
    target: str
    sent_at: float
    outcome: str | None = None  # None while pending; "returned", or the exception's type name
    answered_at: float | None = None  # when the call returned or raised
    documented: bool = True  # for a raised send: whether the layer documents that exception


@dataclass(frozen=True)
class Percentiles:
    count: int
    p50: float | None
    p99: float | None


@dataclass
class Summary:
    """Every figure of the soak's table; ``failures`` names the must-be-zero rows that are not."""

    sends: int = 0
    direct_sends: int = 0
    group_sends: int = 0
    returned: int = 0
    raised: Counter[str] = field(default_factory=Counter)
    raised_outside_fault: Counter[str] = field(default_factory=Counter)
    unanswered: int = 0  # sends still pending at the end: the call never returned nor raised
    expected: int = 0  # (message, receiver) pairs for normal channels
    exactly_once: int = 0
    lost_in_fault: int = 0
    lost_in_fault_by_kind: Counter[str] = field(default_factory=Counter)  # the first fault covering it
    lost_in_fault_by_cause: Counter[str] = field(default_factory=Counter)
    avoidable_in_fault_by_kind: Counter[str] = field(default_factory=Counter)  # causes not inherent
    lost_outside_fault: int = 0
    lost_outside_by_channel: Counter[str] = field(default_factory=Counter)
    lost_outside_by_cause: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    unexpected: int = 0  # receipts by a channel that was not a receiver of that message
    received_after_raise: int = 0  # allowed: a send that raised "may or may not have been delivered"
    slow_expected: int = 0
    slow_received: int = 0
    dead_sent: int = 0
    dead_received: int = 0
    latency_outside: Percentiles = Percentiles(0, None, None)
    latency_in_fault: Percentiles = Percentiles(0, None, None)
    undocumented_errors: int = 0  # raised types outside the documented ones
    receive_errors: int = 0
    unrecovered_faults: int = 0  # faults after which no probe reached every process in time

    @property
    def slow_dropped(self) -> int:
        return self.slow_expected - self.slow_received

    @property
    def avoidable_in_fault(self) -> int:
        return sum(self.avoidable_in_fault_by_kind.values())

    @property
    def failures(self) -> list[str]:
        checks = {
            "lost outside any fault": self.lost_outside_fault,
            "lost in a fault window to an avoidable cause": self.avoidable_in_fault,
            "duplicates": self.duplicates,
            "deliveries to a channel that was not a receiver": self.unexpected,
            "sends that neither returned nor raised": self.unanswered,
            "sends that raised an undocumented exception": self.undocumented_errors,
            "receive() calls that raised": self.receive_errors,
            "faults after which messages did not flow again in time": self.unrecovered_faults,
        }
        return [f"{name}: {count}" for name, count in checks.items() if count]


def percentiles(values: Iterable[float]) -> Percentiles:
    """Nearest-rank p50 and p99 (:func:`testbed.measure.percentile`)."""
    ordered = sorted(values)
    if not ordered:
        return Percentiles(0, None, None)
    return Percentiles(len(ordered), percentile(ordered, 0.50), percentile(ordered, 0.99))


class Ledger:
    """Sends and receipts of one soak run, keyed by message id."""

    def __init__(
        self,
        memberships: Mapping[str, Iterable[str]],
        *,
        slow_channels: Iterable[str] = (),
        dead_channels: Iterable[str] = (),
        margin: float = 2.0,
    ) -> None:
        self.memberships = {group: frozenset(members) for group, members in memberships.items()}
        self.slow_channels = frozenset(slow_channels)
        self.dead_channels = frozenset(dead_channels)
        self.receive_errors: Counter[str] = Counter()
        self.margin = margin
        self.faults: list[FaultWindow] = []
        self.error_examples: dict[str, str] = {}  # exception type -> the first message seen
        self.outages: list[Outage] = []
        self.refusals: list[float] = []  # when the sender's layer counted a refused publish
        self._sends: dict[int, _Send] = {}
        self._receipts: dict[tuple[int, str], list[float]] = {}

    # Feeding -------------------------------------------------------------------------------------

    def sent(self, message_id: int, kind: str, target: str, sent_at: float) -> None:
        """A send is starting (``kind`` is DIRECT with a channel, or GROUP with a group)."""
        if kind not in (DIRECT, GROUP):
            raise ValueError(f"kind must be {DIRECT!r} or {GROUP!r}, got {kind!r}")
        if kind == GROUP and target not in self.memberships:
            raise ValueError(f"unknown group {target!r}")
        if message_id in self._sends:
            raise ValueError(f"message id {message_id} was already sent")
        self._sends[message_id] = _Send(kind, target, sent_at)

    def returned(self, message_id: int, at: float | None = None) -> None:
        send = self._sends[message_id]
        send.outcome, send.answered_at = "returned", at

    def raised(
        self,
        message_id: int,
        error_type: str,
        text: str = "",
        *,
        documented: bool = True,
        at: float | None = None,
    ) -> None:
        """The send raised ``error_type``; ``documented``: the layer documents it for send() (the
        caller decides by isinstance, so subclasses of documented errors count as documented)."""
        send = self._sends[message_id]
        send.outcome, send.documented, send.answered_at = error_type, documented, at
        self.error_examples.setdefault(error_type, text)

    def outage(self, channels: Iterable[str], started_at: float, ended_at: float | None) -> None:
        """The process that reads ``channels`` lost its consuming connection at ``started_at`` and
        had set up a new one at ``ended_at`` (None: not by the end)."""
        self.outages.append(Outage(frozenset(channels), started_at, ended_at))

    def refused(self, at: float, count: int = 1) -> None:
        """The sender's layer counted ``count`` more publishes refused by RabbitMQ (seen at ``at``)."""
        self.refusals.extend([at] * count)

    def receive_failed(self, channel: str, error_type: str) -> None:
        """A ``receive()`` raised (it should wait through any outage instead)."""
        self.receive_errors[error_type] += 1

    def received(self, message_id: int, channel: str, received_at: float) -> None:
        self._receipts.setdefault((message_id, channel), []).append(received_at)

    def fault(self, window: FaultWindow) -> None:
        self.faults.append(window)

    # Reading -------------------------------------------------------------------------------------

    def receivers(self, message_id: int) -> frozenset[str]:
        send = self._sends[message_id]
        return frozenset((send.target,)) if send.kind == DIRECT else self.memberships[send.target]

    def fault_at(self, sent_at: float) -> FaultWindow | None:
        """The first fault whose window covers a send at ``sent_at``, if any."""
        return next((window for window in self.faults if window.covers(sent_at, self.margin)), None)

    def in_fault(self, sent_at: float) -> bool:
        return self.fault_at(sent_at) is not None

    def cause(self, message_id: int, channel: str, fault: FaultWindow | None) -> str:
        """Why ``channel`` never received ``message_id``, from the outages and refusals reported
        between the send and the end of its fault window (or the send's answer, outside faults)."""
        send = self._sends[message_id]
        answered = send.answered_at if send.answered_at is not None else send.sent_at
        until = (fault.closes_at if fault is not None else answered) + self.margin
        if any(
            channel in outage.channels and outage.overlaps(send.sent_at, until) for outage in self.outages
        ):
            return QUEUE_GONE
        if send.kind == GROUP and any(send.sent_at <= at <= answered + 0.1 for at in self.refusals):
            return REFUSED  # 0.1 s: slack for the sender's bookkeeping
        return UNEXPLAINED

    def summarize(self) -> Summary:
        """Add everything up."""
        summary = Summary()
        summary.unrecovered_faults = sum(window.recovered_at is None for window in self.faults)
        outside: list[float] = []
        in_fault: list[float] = []
        for message_id, send in self._sends.items():
            summary.sends += 1
            if send.kind == DIRECT:
                summary.direct_sends += 1
            else:
                summary.group_sends += 1
            if send.outcome is None:
                summary.unanswered += 1
                continue
            if send.outcome != "returned":
                summary.raised[send.outcome] += 1
                if not self.in_fault(send.sent_at):
                    summary.raised_outside_fault[send.outcome] += 1
                if not send.documented:
                    summary.undocumented_errors += 1
                continue
            summary.returned += 1
            fault = self.fault_at(send.sent_at)
            during_fault = fault is not None
            for channel in self.receivers(message_id):
                times = self._receipts.get((message_id, channel), [])
                if channel in self.dead_channels:
                    summary.dead_sent += 1
                    summary.dead_received += bool(times)
                    continue
                if channel in self.slow_channels:
                    summary.slow_expected += 1
                    summary.slow_received += bool(times)
                    summary.duplicates += max(0, len(times) - 1)
                    continue
                summary.expected += 1
                if not times:
                    cause = self.cause(message_id, channel, fault)
                    if fault is not None:
                        summary.lost_in_fault += 1
                        summary.lost_in_fault_by_kind[fault.kind] += 1
                        summary.lost_in_fault_by_cause[cause] += 1
                        if cause not in INHERENT_CAUSES:
                            summary.avoidable_in_fault_by_kind[fault.kind] += 1
                    else:
                        summary.lost_outside_fault += 1
                        summary.lost_outside_by_channel[channel] += 1
                        summary.lost_outside_by_cause[cause] += 1
                    continue
                summary.exactly_once += len(times) == 1
                summary.duplicates += len(times) - 1
                (in_fault if during_fault else outside).append(min(times) - send.sent_at)
        for (message_id, channel), times in self._receipts.items():
            send = self._sends.get(message_id)
            if send is None or channel not in self.receivers(message_id):
                summary.unexpected += len(times)
            elif send.outcome != "returned":
                summary.received_after_raise += len(times)
                summary.duplicates += len(times) - 1
        summary.receive_errors = sum(self.receive_errors.values())
        summary.latency_outside = percentiles(outside)
        summary.latency_in_fault = percentiles(in_fault)
        return summary
