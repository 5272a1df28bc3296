"""The stats snapshot's arithmetic: histogram buckets, sums over links, retired links, plain data."""

from __future__ import annotations

import json
import math
import time
from types import MappingProxyType

import pytest

from channels_rabbitmq.link.counters import LinkCounters
from channels_rabbitmq.stats import (
    CONFIRM_BUCKETS,
    DROP_REASONS,
    ConfirmLatency,
    LinkStats,
    layer_stats,
    retire,
    worst_state,
)


def test_a_confirm_lands_in_the_first_bucket_whose_bound_it_does_not_exceed() -> None:
    counters = LinkCounters()
    counters.confirm(True, 0.001)  # exactly on a bound: that bucket (Prometheus' "le")
    counters.confirm(True, 0.0010001)
    counters.confirm(False, 0.0)
    counters.confirm(True, 60.0)  # beyond the last bound
    assert (counters.confirmed, counters.refused) == (3, 1)
    latency = ConfirmLatency(CONFIRM_BUCKETS, tuple(counters.confirm_counts), counters.confirm_seconds)
    assert latency.count == 4
    assert latency.sum == pytest.approx(60.0020001)
    cumulative = dict(latency.cumulative())
    assert cumulative[0.0005] == 1
    assert cumulative[0.001] == 2
    assert cumulative[0.0025] == 3
    assert cumulative[10.0] == 3
    assert cumulative[math.inf] == 4
    assert list(cumulative) == [*CONFIRM_BUCKETS, math.inf]


def test_an_outage_lasts_until_every_connection_it_took_is_back_and_counts_once() -> None:
    counters = LinkCounters()
    assert counters.connection_back("consume") is None  # none was lost
    assert counters.connection_lost("consume")  # an outage begins
    first_start = counters.outage_started
    time.sleep(0.02)
    assert not counters.connection_lost("publish")  # the same outage: still the first start
    assert counters.outage_started == first_start
    assert counters.connection_back("consume") is None  # the publishing connection is still lost
    assert counters.in_outage
    lasted = counters.connection_back("publish")
    assert lasted is not None
    assert lasted >= 0.02
    assert counters.outage_seconds == lasted
    assert counters.outage_started is None
    assert not counters.in_outage


def link(queue: str, state: str = "up", **counts: object) -> LinkStats:
    return LinkStats(queue=queue, state=state, consume_state=state, publish_state=state, **counts)  # type: ignore[arg-type]


def latency(*counts: int, total: float) -> ConfirmLatency:
    padded = counts + (0,) * (len(CONFIRM_BUCKETS) + 1 - len(counts))
    return ConfirmLatency(CONFIRM_BUCKETS, padded, total)


def test_a_layer_sums_its_links_counters_and_gauges_and_keeps_each_link() -> None:
    one = link(
        "channels.one",
        published=5,
        confirmed=4,
        refused=1,
        delivered=7,
        received=6,
        held=2,
        inboxes=1,
        groups=3,
        connections=2,
        outage_seconds=1.5,
        current_outage_seconds=0.0,
        dropped=MappingProxyType({"channel_full": 1, "expired": 0, "too_large": 0, "undecodable": 2}),
        confirm_latency=latency(1, 3, total=0.004),
    )
    two = link(
        "channels.two",
        state="recovering",
        published=1,
        confirmed=1,
        held=1,
        groups=1,
        connections=3,
        reconnections=1,
        outage_seconds=0.5,
        current_outage_seconds=0.5,
        confirm_latency=latency(0, 1, total=0.001),
    )
    stats = layer_stats((one, two), None, closed=False)
    assert stats.state == "recovering"  # the worse of the two
    assert not stats.is_up
    assert stats.links == (one, two)
    assert (stats.published, stats.confirmed, stats.refused) == (6, 5, 1)
    assert (stats.delivered, stats.received) == (7, 6)
    assert (stats.held, stats.inboxes, stats.groups) == (3, 1, 4)
    assert (stats.connections, stats.reconnections) == (5, 1)
    assert stats.outage_seconds == 2.0
    assert stats.current_outage_seconds == 0.5
    assert dict(stats.dropped) == {"channel_full": 1, "expired": 0, "too_large": 0, "undecodable": 2}
    assert stats.confirm_latency.counts[:2] == (1, 4)
    assert stats.confirm_latency.count == 5
    assert stats.confirm_latency.sum == pytest.approx(0.005)


def test_retired_links_keep_their_counters_but_not_their_gauges() -> None:
    gone = link(
        "channels.gone", published=3, delivered=2, held=5, groups=2, reconnections=1, outage_seconds=1.0
    )
    retired = retire(None, gone)
    retired = retire(
        retired, link("channels.gone.too", published=1, confirm_latency=latency(1, total=0.0001))
    )
    assert (retired.published, retired.delivered, retired.reconnections) == (4, 2, 1)
    assert (retired.held, retired.groups) == (0, 0)
    live = link("channels.live", published=10, held=1)
    stats = layer_stats((live,), retired, closed=False)
    assert stats.published == 14  # never goes back when a loop ends
    assert stats.held == 1
    assert stats.outage_seconds == 1.0
    assert stats.confirm_latency.count == 1
    assert [each.queue for each in stats.links] == ["channels.live"]
    closed = layer_stats((), retired, closed=True)
    assert (closed.state, closed.published, closed.links) == ("closed", 4, ())


def test_states_rank_from_idle_to_closed() -> None:
    assert worst_state([]) == "idle"
    assert worst_state(["idle", "up"]) == "up"
    assert worst_state(["up", "connecting"]) == "connecting"
    assert worst_state(["connecting", "recovering", "up"]) == "recovering"
    assert worst_state(["recovering", "closed"]) == "closed"
    assert layer_stats((), None, closed=False).state == "idle"


def test_the_snapshot_is_frozen_and_as_dict_is_plain_json() -> None:
    stats = layer_stats(
        (link("channels.one", published=1, confirm_latency=latency(1, total=0.0002)),), None, closed=False
    )
    with pytest.raises(AttributeError):
        stats.published = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        stats.dropped["expired"] = 1  # type: ignore[index]
    data = json.loads(json.dumps(stats.as_dict()))
    assert data["published"] == 1
    assert data["state"] == "up"
    assert data["dropped"] == dict.fromkeys(DROP_REASONS, 0)
    assert data["confirm_latency"]["count"] == 1
    assert data["confirm_latency"]["bounds"] == list(CONFIRM_BUCKETS)
    assert data["links"][0]["queue"] == "channels.one"
    assert data["links"][0]["confirm_latency"]["counts"][0] == 1
