"""What a broker link counts, and its snapshot for ``layer.stats()``.

The counters are plain integers on a ``__slots__`` object, changed only on the link's
own loop: no lock, no allocation per message. A snapshot reads them from any thread;
under the GIL each read is whole, and the snapshot copies containers in one C call each
so that a change on the link's loop meanwhile cannot break it.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import TYPE_CHECKING

from ..stats import CONFIRM_BUCKETS

if TYPE_CHECKING:
    from .supervisor import ConnectionSupervisor


class LinkCounters:
    """Publishes, confirms, deliveries and outages of one link (see :class:`~..stats.LinkStats`)."""

    __slots__ = (
        "_lost",
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
        self._lost: set[str] = set()  # the roles ("consume", "publish") whose connection is lost now

    def confirm(self, accepted: bool, seconds: float) -> None:
        """A publish was confirmed (``accepted``) or refused after ``seconds``."""
        if accepted:
            self.confirmed += 1
        else:
            self.refused += 1
        self.confirm_counts[bisect_left(CONFIRM_BUCKETS, seconds)] += 1
        self.confirm_seconds += seconds

    @property
    def in_outage(self) -> bool:
        """A connection of the link is lost and not back yet."""
        return bool(self._lost)

    def connection_lost(self, role: str) -> bool:
        """The connection of ``role`` was lost; True when that begins an outage (one outage lasts
        until every connection it took is back)."""
        began = not self._lost
        self._lost.add(role)
        if began:
            self.outage_started = time.monotonic()
        return began

    def connection_back(self, role: str) -> float | None:
        """The connection of ``role`` is back; once that ends the outage, how long it lasted."""
        if role not in self._lost:
            return None
        self._lost.discard(role)
        started = self.outage_started
        if self._lost or started is None:
            return None
        self.outage_started = None
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
