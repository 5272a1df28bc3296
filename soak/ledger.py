"""The soak's end-to-end ledger and its Markdown tables: bookkeeping of what :mod:`soak.run` saw, with
its ``time.monotonic()`` times, and no I/O. A delivery that never came is lost in a fault window (sent
from ``margin`` s before a fault until ``margin`` s after messages flowed again) or outside any, with a
cause: QUEUE_GONE (inherent), REFUSED or UNEXPLAINED (avoidable). See docs/operations/soak.md.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from testbed.measure import percentile

DIRECT = "direct"
GROUP = "group"
QUEUE_GONE = "queue gone with its connection"  # the receiver's consuming connection was down meanwhile
REFUSED = "refused by a full queue"  # a group send while the sender's layer counted a refused publish
UNEXPLAINED = "unexplained"  # neither of them: none by design
INHERENT_CAUSES = frozenset({QUEUE_GONE})  # the design loses these; the others are avoidable
MUST_BE_ZERO_FAILED = r"^\| ([^|]+) \| \*\*(\d+)\*\* \(must be 0\)"  # a table row, with its label and count


class FaultWindow(NamedTuple):
    """One fault, and when messages flowed again (None: not within ``waited`` seconds after its end)."""

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


@dataclass
class _Send:
    kind: str
    receivers: Collection[str]
    sent_at: float
    outcome: str | None = None  # None while pending; "returned", or the exception's type name
    answered_at: float | None = None  # when the call returned or raised
    documented: bool = True  # for a raised send: whether the layer documents that exception


@dataclass(frozen=True)
class Percentiles:
    count: int
    p50: float | None
    p99: float | None


class ProcessMemory(NamedTuple):
    name: str
    start_kib: int | None
    end_kib: int | None


@dataclass
class Summary:
    """Every figure of the soak's table; ``failures`` names the must-be-zero rows that are not."""

    sends: Counter[str] = field(default_factory=Counter)  # by kind: DIRECT or GROUP
    returned: int = 0
    raised: Counter[str] = field(default_factory=Counter)
    raised_outside_fault: Counter[str] = field(default_factory=Counter)
    unanswered: int = 0  # sends still pending at the end: the call never returned nor raised
    expected: int = 0  # (message, receiver) pairs for normal channels
    exactly_once: int = 0
    lost_in_fault: int = 0
    lost_in_fault_by_kind: Counter[str] = field(default_factory=Counter)  # the first fault covering it
    lost_in_fault_by_cause: Counter[str] = field(default_factory=Counter)
    avoidable_in_fault: int = 0  # lost in a fault window to a cause that is not inherent
    avoidable_in_fault_by_kind: Counter[str] = field(default_factory=Counter)
    lost_outside_fault: int = 0
    lost_outside_by_channel: Counter[str] = field(default_factory=Counter)
    lost_outside_by_cause: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    unexpected: int = 0  # receipts by a channel that was not a receiver of that message
    received_after_raise: int = 0  # allowed: a send that raised "may or may not have been delivered"
    slow_expected: int = 0
    slow_received: int = 0
    slow_dropped: int = 0  # sent to the slow channel and never received: expected drops
    dead_sent: int = 0
    dead_received: int = 0
    latency_outside: Percentiles = Percentiles(0, None, None)
    latency_in_fault: Percentiles = Percentiles(0, None, None)
    undocumented_errors: int = 0  # raised types outside the documented ones
    receive_errors: int = 0
    unrecovered_faults: int = 0  # faults after which no probe reached every process in time

    @property
    def failures(self) -> list[str]:
        """``row: count`` for each row of the table marked "must be 0" that is not zero."""
        table = summary_table(self, memory=(), error_examples={}, receive_errors={})
        return [f"{row}: {count}" for row, count in re.findall(MUST_BE_ZERO_FAILED, table, re.MULTILINE)]


def percentiles(values: Iterable[float]) -> Percentiles:
    """Nearest-rank p50 and p99 (:func:`testbed.measure.percentile`)."""
    ordered = sorted(values)
    p50, p99 = (percentile(ordered, 0.50), percentile(ordered, 0.99)) if ordered else (None, None)
    return Percentiles(len(ordered), p50, p99)


@dataclass
class Ledger:
    """Sends and receipts of one soak run, keyed by message id."""

    memberships: Mapping[str, Collection[str]]  # group -> its channels, fixed for the run
    slow_channels: Collection[str] = ()
    dead_channels: Collection[str] = ()
    margin: float = 2.0
    faults: list[FaultWindow] = field(default_factory=list)
    error_examples: dict[str, str] = field(default_factory=dict)  # exception type -> the first message
    receive_errors: Counter[str] = field(default_factory=Counter)
    outages: list[tuple[Collection[str], float, float | None]] = field(default_factory=list)  # down, up
    refusals: list[float] = field(default_factory=list)  # when the sender's layer counted a refused publish
    sends: dict[int, _Send] = field(default_factory=dict)
    receipts: dict[tuple[int, str], list[float]] = field(default_factory=dict)

    def sent(self, message_id: int, kind: str, target: str, sent_at: float) -> None:
        """A send is starting (``kind`` is DIRECT with a channel, or GROUP with a group)."""
        if kind not in (DIRECT, GROUP):
            raise ValueError(f"kind must be {DIRECT!r} or {GROUP!r}, got {kind!r}")
        if kind == GROUP and target not in self.memberships:
            raise ValueError(f"unknown group {target!r}")
        if message_id in self.sends:
            raise ValueError(f"message id {message_id} was already sent")
        receivers = [target] if kind == DIRECT else self.memberships[target]
        self.sends[message_id] = _Send(kind, receivers, sent_at)

    def returned(self, message_id: int, at: float | None = None) -> None:
        send = self.sends[message_id]
        send.outcome, send.answered_at = "returned", at

    def raised(
        self, message_id: int, error: str, text: str = "", *, documented: bool = True, at: float | None = None
    ) -> None:
        """The send raised ``error`` (a type name); ``documented``: an exception the layer documents."""
        send = self.sends[message_id]
        send.outcome, send.documented, send.answered_at = error, documented, at
        self.error_examples.setdefault(error, text)

    def outage(self, channels: Iterable[str], started_at: float, ended_at: float | None) -> None:
        """The process that reads ``channels`` had no consuming connection (``ended_at`` None: at the end)."""
        self.outages.append((frozenset(channels), started_at, ended_at))

    def refused(self, at: float, count: int = 1) -> None:
        """The sender's layer counted ``count`` more publishes refused by RabbitMQ (seen at ``at``)."""
        self.refusals.extend([at] * count)

    def receive_failed(self, channel: str, error_type: str) -> None:
        """A ``receive()`` raised (it should wait through any outage instead)."""
        self.receive_errors[error_type] += 1

    def received(self, message_id: int, channel: str, received_at: float) -> None:
        self.receipts.setdefault((message_id, channel), []).append(received_at)

    def fault(self, window: FaultWindow) -> None:
        self.faults.append(window)

    def cause(self, send: _Send, channel: str, fault: FaultWindow | None) -> str:
        """Why ``channel`` never received ``send``: the outages and refusals until its window's end."""
        answered = send.answered_at if send.answered_at is not None else send.sent_at
        until = (fault.closes_at if fault is not None else answered) + self.margin
        outages = ((start, end) for channels, start, end in self.outages if channel in channels)
        if any(start <= until and (end is None or end >= send.sent_at) for start, end in outages):
            return QUEUE_GONE
        if send.kind == GROUP and any(send.sent_at <= at <= answered + 0.1 for at in self.refusals):
            return REFUSED  # 0.1 s: slack for the sender's bookkeeping
        return UNEXPLAINED

    def summarize(self) -> Summary:
        kinds = Counter(send.kind for send in self.sends.values())
        s = Summary(kinds, receive_errors=self.receive_errors.total())
        s.unrecovered_faults = sum(window.recovered_at is None for window in self.faults)
        latencies: dict[bool, list[float]] = {False: [], True: []}  # by "sent in a fault window"
        for message_id, send in self.sends.items():
            fault = next((fault for fault in self.faults if fault.covers(send.sent_at, self.margin)), None)
            if send.outcome is None:
                s.unanswered += 1
                continue
            if send.outcome != "returned":
                s.raised[send.outcome] += 1
                if fault is None:
                    s.raised_outside_fault[send.outcome] += 1
                s.undocumented_errors += not send.documented
                continue
            s.returned += 1
            for channel in send.receivers:
                times = self.receipts.get((message_id, channel), [])
                if channel in self.dead_channels:
                    s.dead_sent += 1
                    s.dead_received += bool(times)
                    continue
                s.duplicates += max(0, len(times) - 1)
                if channel in self.slow_channels:
                    s.slow_expected += 1
                    s.slow_received += bool(times)
                    s.slow_dropped += not times
                    continue
                s.expected += 1
                if times:
                    s.exactly_once += len(times) == 1
                    latencies[fault is not None].append(min(times) - send.sent_at)
                elif fault is not None:
                    cause = self.cause(send, channel, fault)
                    s.lost_in_fault += 1
                    s.lost_in_fault_by_kind[fault.kind] += 1
                    s.lost_in_fault_by_cause[cause] += 1
                    if cause not in INHERENT_CAUSES:
                        s.avoidable_in_fault += 1
                        s.avoidable_in_fault_by_kind[fault.kind] += 1
                else:
                    s.lost_outside_fault += 1
                    s.lost_outside_by_channel[channel] += 1
                    s.lost_outside_by_cause[self.cause(send, channel, None)] += 1
        for (message_id, channel), times in self.receipts.items():
            sent = self.sends.get(message_id)
            if sent is None or channel not in sent.receivers:
                s.unexpected += len(times)
            elif sent.outcome != "returned":
                s.received_after_raise += len(times)
                s.duplicates += len(times) - 1
        s.latency_outside, s.latency_in_fault = percentiles(latencies[False]), percentiles(latencies[True])
        return s


def summary_table(
    summary: Summary,
    *,
    memory: Sequence[ProcessMemory],
    error_examples: Mapping[str, str],
    receive_errors: Mapping[str, int],
    lost_by_process: Mapping[str, int] | None = None,  # lost outside any fault, by process
) -> str:
    """Sends, deliveries, losses, latency, memory; rows with nothing to show (an empty value) left out."""

    def details(counts: Mapping[str, int], *, causes: bool = False, parens: bool = False) -> str:
        """``key count, ...`` but zeros (``parens``: in parentheses, if any; ``causes``: each one's kind)."""
        marks = {True: " (inherent)", False: " (avoidable)"} if causes else {True: "", False: ""}
        text = ", ".join(f"{k} {n}{marks[k in INHERENT_CAUSES]}" for k, n in sorted(counts.items()) if n)
        return f" ({text})" if parens and text else text

    def latency(values: Percentiles) -> str:
        ms = ["-" if value is None else f"{value * 1000:.1f}" for value in (values.p50, values.p99)]
        return f"p50 {ms[0]} ms, p99 {ms[1]} ms ({values.count} deliveries)"

    def mib(kib: int | None) -> str:
        return "-" if kib is None else f"{kib / 1024:.1f} MiB"

    s, by_process = summary, sorted((lost_by_process or {}).items())
    raised = "\n".join(
        f"| sends that raised {error} | {count}, {s.raised_outside_fault[error]} of them outside fault "
        f"windows (e.g. {error_examples.get(error) or 'no message'}) |"
        for error, count in s.raised.most_common()
    )
    of_process = "\n".join(f"| &nbsp;&nbsp;of which to channels of {p} | {n or ''} |" for p, n in by_process)
    receive_raised = "\n".join(
        f"| &nbsp;&nbsp;receive() raised {e} | {n} |" for e, n in sorted(receive_errors.items())
    )
    memory_rows = "\n".join(
        f"| resident memory, {m.name} | {mib(m.start_kib)} at start, {mib(m.end_kib)} at end |"
        for m in memory
    )
    avoidable_kinds = details(s.avoidable_in_fault_by_kind, parens=True)
    slow = f"{s.slow_received} / {s.slow_expected} ({s.slow_dropped} not received)"
    table = f"""| | |
|---|---|
| sends | {s.sends.total()} ({s.sends[DIRECT]} direct, {s.sends[GROUP]} group) |
| sends that returned | {s.returned} |
{raised}
| sends that raised an undocumented exception | {s.undocumented_errors} (must be 0) |
| sends that neither returned nor raised in time | {s.unanswered} (must be 0) |
| expected deliveries (returned sends times receivers, slow and dead channels apart) | {s.expected} |
| received exactly once | {s.exactly_once} |
| lost in a fault window | {s.lost_in_fault}{details(s.lost_in_fault_by_kind, parens=True)} |
| &nbsp;&nbsp;by cause | {details(s.lost_in_fault_by_cause, causes=True)} |
| lost in a fault window to an avoidable cause | {s.avoidable_in_fault} (must be 0){avoidable_kinds} |
| lost outside any fault | {s.lost_outside_fault} (must be 0) |
| &nbsp;&nbsp;by cause | {details(s.lost_outside_by_cause, causes=True)} |
{of_process}
| duplicates | {s.duplicates} (must be 0) |
| deliveries to a channel that was not a receiver | {s.unexpected} (must be 0) |
| deliveries of sends that raised (allowed: may or may not be delivered) | {s.received_after_raise} |
| receive() calls that raised | {s.receive_errors} (must be 0) |
| faults after which messages did not flow again in time | {s.unrecovered_faults} (must be 0) |
{receive_raised}
| slow channel: received / sent to it (the rest: expected drops) | {slow} |
| dead channel: messages sent to it (never read, not counted) | {s.dead_sent} |
| delivery latency outside faults | {latency(s.latency_outside)} |
| delivery latency in fault windows | {latency(s.latency_in_fault)} |
{memory_rows}"""
    table = "\n".join(line for line in table.splitlines() if line and not line.endswith("|  |"))
    return re.sub(r"\| ([1-9]\d*) \(must be 0\)", r"| **\1** (must be 0)", table)  # in bold when not 0


def faults_table(faults: Sequence[FaultWindow], run_start: float) -> str:
    """One row per fault: what, where, when (seconds into the run), and how long recovery took."""
    lines = ["| fault | target | at (s) | lasted (s) | flowing again after (s) |", "|---|---|---|---|---|"]
    for f in faults:
        recovered = "never seen" if f.recovered_at is None else f"{f.recovered_at - f.ended_at:.1f}"
        at, lasted = f.started_at - run_start, f.ended_at - f.started_at
        lines.append(f"| {f.kind} | {f.target} | {at:.1f} | {lasted:.1f} | {recovered} |")
    return "\n".join(lines)
