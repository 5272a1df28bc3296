"""What a broker link counts, and its snapshot for ``layer.stats()``.

The counters are plain integers on a ``__slots__`` object, changed only on the link's
own loop: no lock, no allocation per message. A snapshot reads them from any thread;
under the GIL each read is whole, and the snapshot copies containers in one C call each
so that a change on the link's loop meanwhile cannot break it.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from types import MappingProxyType
from typing import TYPE_CHECKING

from ..stats import CONFIRM_BUCKETS, DROP_REASONS, ConfirmLatency, LinkStats, worst_state

if TYPE_CHECKING:
    from .link import BrokerLink
    from .supervisor import ConnectionSupervisor


class LinkCounters:
    """Publishes, confirms, deliveries and outages of one link (see :class:`~..stats.LinkStats`)."""

    __slots__ = (
        "confirm_counts",
        "confirm_seconds",
        "confirmed",
        "delivered",
        "outage_seconds",
        "outage_started",
        "publish_failed",
        "published",
        "refused",
    )

    def __init__(self) -> None:
        self.published = 0
        self.confirmed = 0
        self.refused = 0
        self.publish_failed = 0
        self.delivered = 0
        self.confirm_counts = [0] * (len(CONFIRM_BUCKETS) + 1)
        self.confirm_seconds = 0.0
        self.outage_seconds = 0.0  # outages that ended
        self.outage_started: float | None = None  # time.monotonic() when the current one began

    def confirm(self, accepted: bool, seconds: float) -> None:
        """A publish was confirmed (``accepted``) or refused after ``seconds``."""
        if accepted:
            self.confirmed += 1
        else:
            self.refused += 1
        self.confirm_counts[bisect_left(CONFIRM_BUCKETS, seconds)] += 1
        self.confirm_seconds += seconds

    def outage_began(self) -> None:
        if self.outage_started is None:
            self.outage_started = time.monotonic()

    def outage_ended(self) -> float:
        """End the current outage; return how long it lasted (0 when there was none)."""
        started, self.outage_started = self.outage_started, None
        if started is None:
            return 0.0
        lasted = time.monotonic() - started
        self.outage_seconds += lasted
        return lasted


def reported_state(supervisor: ConnectionSupervisor) -> str:
    """A connection's state as ``stats()`` says it: never "up" while its connection is not open
    (lost a moment ago, its supervisor not told yet): "up" means calls work."""
    state = supervisor.state.value
    if state == "up" and not supervisor.is_up:
        return "recovering"
    return state


def link_stats(link: BrokerLink) -> LinkStats:
    """A snapshot of ``link``; safe from any thread, no I/O."""
    counters = link.counters
    started = counters.outage_started
    current_outage = max(0.0, time.monotonic() - started) if started is not None else 0.0
    dropped = dict(link.inbound.dropped)  # one C call: never "changed size during iteration"
    consume_state = reported_state(link.consuming)
    publish_state = reported_state(link.publishing)
    states = [state for state in (consume_state, publish_state) if state != "idle"]
    return LinkStats(
        queue=link.queue_name,
        state="closed" if link.closed else worst_state(states),
        consume_state=consume_state,
        publish_state=publish_state,
        published=counters.published,
        confirmed=counters.confirmed,
        refused=counters.refused,
        publish_failed=counters.publish_failed,
        received=link.inbound.received,
        delivered=counters.delivered,
        dropped=MappingProxyType({reason: dropped.get(reason, 0) for reason in DROP_REASONS}),
        held=link.router.held,
        inboxes=link.router.inbox_count,
        groups=link.router.group_count,
        normal_channels=link.normal.channel_count,
        connections=link.consuming.connections + link.publishing.connections,
        reconnections=link.consuming.reconnections + link.publishing.reconnections,
        outage_seconds=counters.outage_seconds + current_outage,
        current_outage_seconds=current_outage,
        confirm_latency=ConfirmLatency(
            CONFIRM_BUCKETS, tuple(counters.confirm_counts), counters.confirm_seconds
        ),
    )
