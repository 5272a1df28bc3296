"""What ``layer.stats()`` returns: a frozen snapshot of what the layer has done and holds.

Everything here is plain data with no I/O. The counters it is built from are kept by each
broker link (:mod:`.link.counters`) as plain integers on the link's own loop; a snapshot
reads them from any thread without a lock, so two fields of one snapshot may be a message
apart, never more. Counters only grow for the life of the layer: a link whose event loop
ended leaves its counts behind (``retired``), so that a Prometheus counter never goes back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

#: Upper bounds (seconds) of the confirm-latency histogram's buckets; a last one is unbounded.
CONFIRM_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

# Why an incoming message was dropped.
DROPPED_CHANNEL_FULL = "channel_full"  # its channel already held its capacity of unread messages
DROPPED_EXPIRED = "expired"  # nobody read it within expiry
DROPPED_TOO_LARGE = "too_large"  # a body over max_message_size, skipped unread
DROPPED_UNDECODABLE = "undecodable"  # unreadable, not for a channel of ours, or not opened
#: The keys of ``dropped`` (always all of them).
DROP_REASONS: tuple[str, ...] = (
    DROPPED_CHANNEL_FULL,
    DROPPED_EXPIRED,
    DROPPED_TOO_LARGE,
    DROPPED_UNDECODABLE,
)

#: Connection states, from best to worst; a link's or a layer's is the worst of its parts.
STATES: tuple[str, ...] = ("idle", "up", "connecting", "recovering", "closed")


@dataclass(frozen=True)
class Count:
    """One number of a snapshot: a field of :class:`LinkStats` and :class:`LayerStats`, and its
    Prometheus family (:mod:`.prometheus`). ``kind``: "counter" (only grows for the life of the
    layer: combined over every link, those whose loop ended included) or "gauge" (what is so now:
    combined over the live links); ``combine``: how links add up (``sum``, or ``max``)."""

    field: str
    kind: str
    metric: str  # the family's name, after the prefix channels_rabbitmq_
    help: str
    combine: Callable[[Iterable[float]], float] = sum


def _longest(values: Iterable[float]) -> float:
    return max(values, default=0.0)


#: Every plain number of a snapshot, in the order of docs/operations/metrics.md: the one table that
#: the snapshot's sums, the Prometheus families and the documentation's test follow. A new count is a
#: line here, its field in LinkStats and LayerStats, and its uses.
COUNTS: tuple[Count, ...] = (
    Count(
        "published", "counter", "messages_published_total", "Messages published by send() and group_send()."
    ),
    Count(
        "confirmed",
        "counter",
        "messages_confirmed_total",
        "Published messages RabbitMQ accepted (basic.ack).",
    ),
    Count(
        "refused",
        "counter",
        "messages_refused_total",
        "Published messages RabbitMQ refused (basic.nack: a queue at capacity; ChannelFull for send()).",
    ),
    Count(
        "publish_failed",
        "counter",
        "publish_failures_total",
        "Publishes without a confirm: connection lost or blocked, no connection in time, or cancelled.",
    ),
    Count(
        "received",
        "counter",
        "messages_received_total",
        "Messages for channels and groups received from RabbitMQ.",
    ),
    Count("delivered", "counter", "messages_delivered_total", "Messages handed to a receive()."),
    Count("held", "gauge", "messages_held", "Messages from RabbitMQ in memory, waiting to be read."),
    Count("inboxes", "gauge", "inboxes", "Channels with buffered messages or a waiting receive()."),
    Count("groups", "gauge", "groups", "Groups with local members, bound to this process's queue(s)."),
    Count("normal_channels", "gauge", "normal_channels", "Normal channels (shared queues) in use."),
    Count("connections", "counter", "connections_opened_total", "Connections to RabbitMQ opened and set up."),
    Count("reconnections", "counter", "reconnections_total", "Connections opened to replace a lost one."),
    Count(
        "outage_seconds",
        "counter",
        "outage_seconds_total",
        "Seconds spent recovering lost connections, per link.",
    ),
    Count(
        "current_outage_seconds",
        "gauge",
        "current_outage_seconds",
        "How long the current outage has lasted; 0 if none.",
        combine=_longest,
    ),
)


def worst_state(states: Iterable[str]) -> str:
    """The state of several connections or links: "idle" for none, else the worst one."""
    return max(states, key=STATES.index, default="idle")


def _frozen(mapping: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class ConfirmLatency:
    """How long publishes waited for RabbitMQ's confirm (ack or nack), as a histogram.

    ``counts[i]`` publishes took at most ``bounds[i]`` seconds (and more than the bound
    before it); the last count, one more than there are bounds, is for longer ones.
    """

    bounds: tuple[float, ...] = CONFIRM_BUCKETS
    counts: tuple[int, ...] = (0,) * (len(CONFIRM_BUCKETS) + 1)
    sum: float = 0.0  # seconds, over every confirmed publish

    @property
    def count(self) -> int:
        """Publishes timed: as many as were confirmed or refused."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, publishes up to it)`` pairs as Prometheus wants them, ending with +Inf."""
        pairs = []
        total = 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += count
            pairs.append((bound, total))
        return pairs

    def __add__(self, other: ConfirmLatency) -> ConfirmLatency:
        return ConfirmLatency(
            self.bounds,
            tuple(mine + theirs for mine, theirs in zip(self.counts, other.counts, strict=True)),
            self.sum + other.sum,
        )


@dataclass(frozen=True)
class LinkStats:
    """One broker link: the layer's queue and connections for one event loop.

    Counters (they only grow): ``published`` … ``outage_seconds``. Gauges (now): the rest.
    """

    queue: str  # this link's exclusive queue: every channel name it receives on contains it
    state: str  # "idle", "connecting", "up", "recovering" or "closed": the worse of the two below
    consume_state: str  # the consuming connection's
    publish_state: str  # the publishing connection's
    published: int = 0  # messages published: send(), group_send() (and replies to other processes)
    confirmed: int = 0  # ... that RabbitMQ accepted (basic.ack)
    refused: int = 0  # ... that it refused (basic.nack: a queue at capacity): ChannelFull for send()
    publish_failed: int = 0  # ... that got no answer: connection lost or blocked before the confirm
    received: int = 0  # messages for channels and groups from RabbitMQ (not the control messages)
    delivered: int = 0  # messages handed to a receive()
    dropped: Mapping[str, int] = field(default_factory=lambda: _frozen(dict.fromkeys(DROP_REASONS, 0)))
    held: int = 0  # messages from RabbitMQ waiting in memory to be read (a group's counts once)
    inboxes: int = 0  # channels with buffered messages or a waiting receive()
    groups: int = 0  # groups with local members, each bound to the queue
    normal_channels: int = 0  # normal channels (no "!") this link sent to or received from
    connections: int = 0  # connections opened and set up (both roles)
    reconnections: int = 0  # ... of them to replace a lost one
    outage_seconds: float = 0.0  # time spent recovering a lost connection, the current outage included
    current_outage_seconds: float = 0.0  # how long the current outage has lasted; 0 when none
    confirm_latency: ConfirmLatency = field(default_factory=ConfirmLatency)


@dataclass(frozen=True)
class LayerStats:
    """A snapshot of one layer: its links' counters and gauges summed, and each link's own.

    Returned by :meth:`channels_rabbitmq.core.RabbitmqChannelLayer.stats`; ``as_dict()``
    gives plain dicts, lists and numbers (for JSON, or a health endpoint).
    """

    state: str  # the worst of the links' states; "idle" with none, "closed" after close()
    links: tuple[LinkStats, ...]  # the live links (one per event loop the layer receives on)
    published: int = 0
    confirmed: int = 0
    refused: int = 0
    publish_failed: int = 0
    received: int = 0
    delivered: int = 0
    dropped: Mapping[str, int] = field(default_factory=lambda: _frozen(dict.fromkeys(DROP_REASONS, 0)))
    held: int = 0
    inboxes: int = 0
    groups: int = 0
    normal_channels: int = 0
    connections: int = 0
    reconnections: int = 0
    outage_seconds: float = 0.0  # summed over links: two links down for 1 s count 2 s
    current_outage_seconds: float = 0.0  # the longest current outage of any link
    confirm_latency: ConfirmLatency = field(default_factory=ConfirmLatency)

    @property
    def is_up(self) -> bool:
        """Every link is up (and there is at least one)."""
        return self.state == "up"

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as plain data: dicts, lists, strings and numbers (JSON-ready)."""
        return _plain(self)


def _plain(snapshot: LayerStats | LinkStats) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for item in fields(snapshot):
        value = getattr(snapshot, item.name)
        if isinstance(value, ConfirmLatency):
            value = {
                "count": value.count,
                "sum": value.sum,
                "bounds": list(value.bounds),
                "counts": list(value.counts),
            }
        elif isinstance(value, Mapping):
            value = dict(value)
        elif item.name == "links":
            value = [_plain(link) for link in value]
        data[item.name] = value
    return data


def retire(retired: LinkStats | None, link: LinkStats) -> LinkStats:
    """The counters of links whose loop ended, ``link`` added; its gauges are left out.

    A current outage is counted up to now, as ended."""
    counted = (retired, link) if retired is not None else (link,)
    return _summed(counted, (), state="closed", queue="")


def layer_stats(links: tuple[LinkStats, ...], retired: LinkStats | None, *, closed: bool) -> LayerStats:
    """Sum the live links and the retired counters into one layer snapshot."""
    counted = (*links, retired) if retired is not None else links
    summed = _summed(counted, links, state="closed" if closed else worst_state(link.state for link in links))
    numbers: dict[str, Any] = {count.field: getattr(summed, count.field) for count in COUNTS}
    return LayerStats(
        state=summed.state,
        links=links,
        dropped=summed.dropped,
        confirm_latency=summed.confirm_latency,
        **numbers,
    )


def _summed(
    counted: tuple[LinkStats, ...], live: tuple[LinkStats, ...], *, state: str, queue: str = ""
) -> LinkStats:
    """Counters combined over ``counted``, gauges over ``live`` (the links that hold something now)."""
    latency = ConfirmLatency()
    for link in counted:
        latency += link.confirm_latency
    numbers: dict[str, Any] = {
        count.field: count.combine(
            getattr(link, count.field) for link in (counted if count.kind == "counter" else live)
        )
        for count in COUNTS
    }
    return LinkStats(
        queue=queue,
        state=state,
        consume_state=worst_state(link.consume_state for link in live) if live else state,
        publish_state=worst_state(link.publish_state for link in live) if live else state,
        dropped=_frozen({reason: sum(link.dropped[reason] for link in counted) for reason in DROP_REASONS}),
        confirm_latency=latency,
        **numbers,
    )
