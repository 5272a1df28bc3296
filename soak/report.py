"""The soak's Markdown tables, from a :class:`~soak.ledger.Summary` and the run's facts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .ledger import INHERENT_CAUSES, FaultWindow, Percentiles, Summary


@dataclass(frozen=True)
class ProcessMemory:
    name: str
    start_kib: int | None
    end_kib: int | None


def _milliseconds(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _latency(percentiles: Percentiles) -> str:
    return (
        f"p50 {_milliseconds(percentiles.p50)} ms, p99 {_milliseconds(percentiles.p99)} ms "
        f"({percentiles.count} deliveries)"
    )


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f} MiB"


def _by_kind(total: int, by_kind: Mapping[str, int]) -> str:
    details = ", ".join(f"{kind} {count}" for kind, count in sorted(by_kind.items()) if count)
    return f"{total} ({details})" if details else str(total)


def _must_be_zero_by_kind(total: int, by_kind: Mapping[str, int]) -> str:
    details = ", ".join(f"{kind} {count}" for kind, count in sorted(by_kind.items()) if count)
    return _must_be_zero(total) + (f" ({details})" if details else "")


def _by_cause(by_cause: Mapping[str, int]) -> str:
    return ", ".join(
        f"{cause} {count} ({'inherent' if cause in INHERENT_CAUSES else 'avoidable'})"
        for cause, count in sorted(by_cause.items())
        if count
    )


def _must_be_zero(count: int) -> str:
    return f"**{count}** (must be 0)" if count else "0 (must be 0)"


def summary_table(
    summary: Summary,
    *,
    memory: Sequence[ProcessMemory],
    error_examples: dict[str, str],
    receive_errors: dict[str, int],
    lost_outside_by_process: Mapping[str, int] | None = None,
) -> str:
    """The main table: sends, deliveries, losses, latency, memory."""
    rows: list[tuple[str, str]] = [
        ("sends", f"{summary.sends} ({summary.direct_sends} direct, {summary.group_sends} group)"),
        ("sends that returned", str(summary.returned)),
    ]
    for error_type, count in summary.raised.most_common():
        example = error_examples.get(error_type, "")
        why = f": {example}" if example else ""
        outside = summary.raised_outside_fault[error_type]
        rows.append(
            (
                f"sends that raised {error_type}",
                f"{count}, {outside} of them outside fault windows (e.g.{why[1:] or ' no message'})",
            )
        )
    rows += [
        ("sends that raised an undocumented exception", _must_be_zero(summary.undocumented_errors)),
        ("sends that neither returned nor raised in time", _must_be_zero(summary.unanswered)),
        (
            "expected deliveries (returned sends times receivers, slow and dead channels apart)",
            str(summary.expected),
        ),
        ("received exactly once", str(summary.exactly_once)),
        ("lost in a fault window", _by_kind(summary.lost_in_fault, summary.lost_in_fault_by_kind)),
        *(
            [("&nbsp;&nbsp;by cause", _by_cause(summary.lost_in_fault_by_cause))]
            if summary.lost_in_fault
            else []
        ),
        (
            "lost in a fault window to an avoidable cause",
            _must_be_zero_by_kind(summary.avoidable_in_fault, summary.avoidable_in_fault_by_kind),
        ),
        ("lost outside any fault", _must_be_zero(summary.lost_outside_fault)),
        *(
            [("&nbsp;&nbsp;by cause", _by_cause(summary.lost_outside_by_cause))]
            if summary.lost_outside_fault
            else []
        ),
        *(
            (f"&nbsp;&nbsp;of which to channels of {process}", str(count))
            for process, count in sorted((lost_outside_by_process or {}).items())
            if count
        ),
        ("duplicates", _must_be_zero(summary.duplicates)),
        ("deliveries to a channel that was not a receiver", _must_be_zero(summary.unexpected)),
        (
            "deliveries of sends that raised (allowed: may or may not be delivered)",
            str(summary.received_after_raise),
        ),
        ("receive() calls that raised", _must_be_zero(summary.receive_errors)),
        ("faults after which messages did not flow again in time", _must_be_zero(summary.unrecovered_faults)),
    ]
    for error_type, count in sorted(receive_errors.items()):
        rows.append((f"&nbsp;&nbsp;receive() raised {error_type}", str(count)))
    rows += [
        (
            "slow channel: received / sent to it (the rest: expected drops)",
            f"{summary.slow_received} / {summary.slow_expected} ({summary.slow_dropped} not received)",
        ),
        (
            "dead channel: messages sent to it (never read, not counted)",
            f"{summary.dead_sent}",
        ),
        ("delivery latency outside faults", _latency(summary.latency_outside)),
        ("delivery latency in fault windows", _latency(summary.latency_in_fault)),
    ]
    for process in memory:
        rows.append(
            (
                f"resident memory, {process.name}",
                f"{_mib(process.start_kib)} at start, {_mib(process.end_kib)} at end",
            )
        )
    lines = ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]
    return "\n".join(lines)


def faults_table(faults: Sequence[FaultWindow], run_start: float) -> str:
    """One row per fault: what, where, when (seconds into the run), and how long recovery took."""
    lines = ["| fault | target | at (s) | lasted (s) | flowing again after (s) |", "|---|---|---|---|---|"]
    for fault in faults:
        recovered = (
            "never seen" if fault.recovered_at is None else f"{fault.recovered_at - fault.ended_at:.1f}"
        )
        lines.append(
            f"| {fault.kind} | {fault.target} | {fault.started_at - run_start:.1f} | "
            f"{fault.ended_at - fault.started_at:.1f} | {recovered} |"
        )
    return "\n".join(lines)
