"""The soak's ledger and its tables (soak/ledger.py): how sends and receipts add up, with explicit times."""

from __future__ import annotations

import pytest

from soak.ledger import (
    DIRECT,
    GROUP,
    QUEUE_GONE,
    REFUSED,
    UNEXPLAINED,
    FaultWindow,
    Ledger,
    ProcessMemory,
    faults_table,
    percentiles,
    summary_table,
)
from testbed.measure import percentile

MEMBERS = {"room": ["a", "b", "slow", "dead"], "hall": ["c"]}


def make_ledger(margin: float = 1.0) -> Ledger:
    return Ledger(MEMBERS, slow_channels=["slow"], dead_channels=["dead"], margin=margin)


def test_a_direct_send_received_once_is_exactly_once_with_its_latency() -> None:
    ledger = make_ledger()
    ledger.sent(1, DIRECT, "a", sent_at=10.0)
    ledger.returned(1)
    ledger.received(1, "a", 10.25)
    summary = ledger.summarize()
    assert (summary.expected, summary.exactly_once, summary.duplicates) == (1, 1, 0)
    assert summary.latency_outside.p50 == pytest.approx(0.25)
    assert summary.latency_in_fault.count == 0
    assert summary.failures == []


def test_a_group_send_expects_every_member_and_sets_slow_and_dead_apart() -> None:
    ledger = make_ledger()
    ledger.sent(1, GROUP, "room", sent_at=10.0)
    ledger.returned(1)
    ledger.received(1, "a", 10.1)
    summary = ledger.summarize()
    assert summary.expected == 2  # a and b; slow and dead are counted apart
    assert summary.exactly_once == 1
    assert summary.lost_outside_fault == 1
    assert summary.lost_outside_by_channel == {"b": 1}
    assert (summary.slow_expected, summary.slow_received, summary.slow_dropped) == (1, 0, 1)
    assert (summary.dead_sent, summary.dead_received) == (1, 0)
    assert summary.failures == ["lost outside any fault: 1"]


def test_a_second_receipt_is_a_duplicate_even_on_the_slow_channel() -> None:
    ledger = make_ledger()
    ledger.sent(1, DIRECT, "a", sent_at=0.0)
    ledger.returned(1)
    ledger.sent(2, DIRECT, "slow", sent_at=0.0)
    ledger.returned(2)
    for channel, message_id in (("a", 1), ("a", 1), ("slow", 2), ("slow", 2)):
        ledger.received(message_id, channel, 1.0)
    summary = ledger.summarize()
    assert summary.duplicates == 2
    assert summary.exactly_once == 0
    assert "duplicates: 2" in summary.failures


def test_losses_are_in_a_fault_window_from_margin_before_the_start_to_margin_after_recovery() -> None:
    ledger = make_ledger(margin=1.0)
    ledger.fault(FaultWindow("cut", "node 1", started_at=100.0, ended_at=100.0, recovered_at=105.0))
    for message_id, sent_at in enumerate([98.9, 99.0, 103.0, 106.0, 106.1], start=1):
        ledger.sent(message_id, DIRECT, "a", sent_at)
        ledger.returned(message_id)
    ledger.sent(6, DIRECT, "a", 104.0)
    ledger.raised(6, "ChannelFull")
    summary = ledger.summarize()
    assert summary.lost_in_fault == 3  # 99.0, 103.0 and 106.0
    assert summary.lost_in_fault_by_kind == {"cut": 3}
    assert summary.lost_outside_fault == 2  # 98.9 and 106.1
    assert summary.raised == {"ChannelFull": 1}
    assert summary.raised_outside_fault == {}


def test_a_fault_that_never_recovered_fails_and_its_window_closes_after_the_wait() -> None:
    ledger = make_ledger(margin=0.0)
    ledger.fault(FaultWindow("stall", "node 2", 10.0, 14.0, recovered_at=None, waited=30.0))
    for message_id, sent_at in ((1, 43.0), (2, 45.0)):
        ledger.sent(message_id, DIRECT, "a", sent_at)
        ledger.returned(message_id)
    summary = ledger.summarize()
    assert (summary.lost_in_fault, summary.lost_outside_fault) == (1, 1)
    assert summary.unrecovered_faults == 1
    assert "faults after which messages did not flow again in time: 1" in summary.failures


def test_latency_is_split_by_whether_the_send_was_in_a_fault_window() -> None:
    ledger = make_ledger(margin=0.0)
    ledger.fault(FaultWindow("memory_alarm", "node 3", 50.0, 60.0, recovered_at=61.0))
    for message_id, (sent_at, received_at) in enumerate([(10.0, 10.002), (55.0, 60.5)], start=1):
        ledger.sent(message_id, DIRECT, "c", sent_at)
        ledger.returned(message_id)
        ledger.received(message_id, "c", received_at)
    summary = ledger.summarize()
    assert summary.latency_outside.p50 == pytest.approx(0.002)
    assert summary.latency_in_fault.p99 == pytest.approx(5.5)


def test_raised_sends_are_counted_by_type_and_their_deliveries_are_allowed() -> None:
    ledger = make_ledger()
    ledger.sent(1, DIRECT, "a", 0.0)
    ledger.raised(1, "BrokerConnectionError", "lost", documented=True)
    ledger.sent(2, DIRECT, "a", 0.0)
    ledger.raised(2, "OSError", "raw", documented=False)
    ledger.received(1, "a", 0.5)
    summary = ledger.summarize()
    assert summary.raised == {"BrokerConnectionError": 1, "OSError": 1}
    assert summary.raised_outside_fault == {"BrokerConnectionError": 1, "OSError": 1}
    assert summary.returned == 0
    assert summary.expected == 0  # nothing is expected of a send that raised
    assert summary.received_after_raise == 1
    assert summary.undocumented_errors == 1
    assert ledger.error_examples == {"BrokerConnectionError": "lost", "OSError": "raw"}
    assert summary.failures == ["sends that raised an undocumented exception: 1"]


def test_pending_sends_and_deliveries_to_non_receivers_are_failures() -> None:
    ledger = make_ledger()
    ledger.sent(1, GROUP, "hall", 0.0)  # never returned nor raised
    ledger.sent(2, DIRECT, "a", 0.0)
    ledger.returned(2)
    ledger.received(2, "a", 0.1)
    ledger.received(2, "b", 0.1)  # b was not a receiver of message 2
    ledger.received(99, "c", 0.1)  # never sent
    ledger.receive_failed("c", "RuntimeError")
    summary = ledger.summarize()
    assert summary.unanswered == 1
    assert summary.unexpected == 2
    assert summary.receive_errors == 1
    assert len(summary.failures) == 3


def test_bad_sends_are_refused() -> None:
    ledger = make_ledger()
    with pytest.raises(ValueError, match="unknown group"):
        ledger.sent(1, GROUP, "nobody", 0.0)
    with pytest.raises(ValueError, match="kind"):
        ledger.sent(1, "broadcast", "a", 0.0)
    ledger.sent(1, DIRECT, "a", 0.0)
    with pytest.raises(ValueError, match="already sent"):
        ledger.sent(1, DIRECT, "a", 0.0)


def test_percentiles_are_nearest_rank() -> None:
    assert percentiles([]).p50 is None
    result = percentiles(range(1, 101))
    assert (result.count, result.p50, result.p99) == (100, 50, 99)
    assert percentiles([7.0]).p99 == 7.0


def test_the_tables_mark_the_must_be_zero_rows_that_are_not() -> None:
    ledger = make_ledger()
    ledger.fault(FaultWindow("cut", "node 1 (its proxy)", 10.0, 10.0, recovered_at=11.5))
    ledger.sent(1, DIRECT, "a", 20.0)
    ledger.returned(1)
    summary = ledger.summarize()
    table = summary_table(
        summary,
        memory=[ProcessMemory("server 0", 20480, 21504)],
        error_examples={},
        receive_errors={},
    )
    assert "| lost outside any fault | **1** (must be 0) |" in table
    assert "| duplicates | 0 (must be 0) |" in table
    ledger.sent(2, DIRECT, "a", 10.5)
    ledger.returned(2)
    assert "| lost in a fault window | 1 (cut 1) |" in summary_table(
        ledger.summarize(), memory=[], error_examples={}, receive_errors={}
    )
    assert "20.0 MiB at start, 21.0 MiB at end" in table
    assert "| cut | node 1 (its proxy) | 5.0 | 0.0 | 1.5 |" in faults_table(ledger.faults, run_start=5.0)


def test_a_loss_while_the_receiving_process_had_no_queue_is_inherent_any_other_is_avoidable() -> None:
    ledger = make_ledger(margin=1.0)
    ledger.fault(FaultWindow("cut", "node 1", started_at=100.0, ended_at=100.0, recovered_at=102.0))
    ledger.outage(["a"], started_at=100.5, ended_at=101.5)  # a's process: queue gone, then set up again
    for message_id, channel in ((1, "a"), (2, "b")):
        ledger.sent(message_id, DIRECT, channel, 100.2)
        ledger.returned(message_id, at=100.3)
    summary = ledger.summarize()
    assert summary.lost_in_fault_by_cause == {QUEUE_GONE: 1, UNEXPLAINED: 1}
    assert summary.avoidable_in_fault_by_kind == {"cut": 1}
    assert summary.failures == ["lost in a fault window to an avoidable cause: 1"]


def test_an_outage_that_ended_before_the_send_does_not_explain_its_loss() -> None:
    ledger = make_ledger(margin=1.0)
    ledger.fault(FaultWindow("cut", "node 1", started_at=100.0, ended_at=100.0, recovered_at=102.0))
    ledger.outage(["a"], started_at=100.0, ended_at=100.4)
    ledger.outage(["a"], started_at=200.0, ended_at=None)  # down at the end of the run, long after
    ledger.sent(1, DIRECT, "a", 100.5)
    ledger.returned(1, at=100.6)
    assert ledger.summarize().lost_in_fault_by_cause == {UNEXPLAINED: 1}


def test_a_group_send_in_flight_when_the_sender_counted_a_refusal_was_refused() -> None:
    ledger = make_ledger(margin=1.0)
    ledger.fault(FaultWindow("memory_alarm", "node 2", started_at=50.0, ended_at=60.0, recovered_at=60.1))
    ledger.sent(1, GROUP, "room", 55.0)  # a and b expected
    ledger.refused(at=60.05)
    ledger.returned(1, at=60.05)
    ledger.sent(2, GROUP, "hall", 60.2)  # sent after the refusal: not its cause
    ledger.returned(2, at=60.3)
    summary = ledger.summarize()
    assert summary.lost_in_fault_by_cause == {REFUSED: 2, UNEXPLAINED: 1}
    assert summary.avoidable_in_fault == 3
    table = summary_table(summary, memory=[], error_examples={}, receive_errors={})
    assert "refused by a full queue 2 (avoidable)" in table
    assert "| lost in a fault window to an avoidable cause | **3** (must be 0) (memory_alarm 3) |" in table


def test_losses_outside_faults_get_a_cause_too() -> None:
    ledger = make_ledger()
    ledger.outage(["c"], started_at=10.0, ended_at=10.5)
    ledger.sent(1, GROUP, "hall", 9.9)
    ledger.returned(1, at=10.0)
    summary = ledger.summarize()
    assert summary.lost_outside_by_cause == {QUEUE_GONE: 1}
    assert summary.failures == ["lost outside any fault: 1"]


def test_the_shared_percentile_is_nearest_rank_and_refuses_no_samples() -> None:
    ordered = [float(n) for n in range(1, 101)]
    assert (percentile(ordered, 0.5), percentile(ordered, 0.99), percentile(ordered, 1.0)) == (
        50.0,
        99.0,
        100.0,
    )
    assert percentile([7.0], 0.0) == 7.0
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 0.5)
