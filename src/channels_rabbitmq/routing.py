"""Local routing: this process's inboxes, group memberships, expiry and capacity.

A plain data structure with no I/O and no clock of its own (callers pass ``now``),
so every rule is a unit test without a broker.

- Each channel with something to read or someone waiting has an *inbox*: buffered
  messages (FIFO) and waiting ``receive()`` futures. A message for a channel with a
  waiter is handed over at once; otherwise it is buffered until read or expired.
  Inboxes with nothing in them and nobody waiting are deleted, so channels whose
  readers vanished cost nothing once their messages expire.
- Each inbox holds at most its channel's capacity (``channel_capacity(name)``): a
  message for a full inbox is dropped for that channel alone, counted in
  ``full_drops`` and reported to ``on_channel_full``, so one channel nobody reads never
  holds up the others.
- ``held`` counts the deliveries from RabbitMQ still waiting in inboxes; a group message
  counts once, however many local members hold a copy. It is the process-wide memory
  bound: when ``held`` reaches ``capacity`` the broker link stops acknowledging (so
  RabbitMQ stops delivering), and ``on_room`` tells it when to go on.
- Group memberships expire ``group_expiry`` seconds after their last ``group_add``;
  with ``group_expiry=None`` they never expire, and nothing about them is timed.
- Every member of a group gets its own copy: the first buffered or handed-over copy
  is the decoded message, the others are decoded again from the body when read (with
  ``decode``: the layer's serializer). A copy handed to a waiting ``receive()`` of a
  message whose values are all immutable (strings, numbers, bytes, booleans, None) is a
  shallow copy instead: the same dict as decoding would give, at a fraction of the cost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any, cast

from .wire.serializers import decode_message

Message = dict[str, Any]
#: Value types that a member cannot change in place: a message holding only these is copied
#: for another member with ``dict.copy()``.
IMMUTABLE_VALUES = frozenset({str, int, float, bool, bytes, type(None)})

#: What take() returns when there is nothing to read (compare with ``is``).
EMPTY: Message = cast(Message, object())


Entry = tuple[float, Any, "list[int] | None"]
#: The entries of an inbox that never buffered anything: most inboxes only ever hold a waiting
#: receive(), and come and go with every message, so their deque is made on first need.
_NO_ENTRIES: tuple[()] = ()


class _Inbox:
    __slots__ = ("entries", "limit", "waiters")

    def __init__(self, limit: int) -> None:
        # (expires_at, message or body bytes, shared copy counter of a group message or None)
        self.entries: deque[Entry] | tuple[()] = _NO_ENTRIES
        # Waiting receive() futures, oldest first: rarely more than one, so a list.
        self.waiters: list[asyncio.Future[Message]] = []
        self.limit = limit  # the channel's capacity: buffered messages beyond it are dropped

    def buffer(self, entry: Entry) -> None:
        entries = self.entries
        if type(entries) is deque:
            entries.append(entry)
        else:
            self.entries = deque((entry,))

    def buffer_first(self, entry: Entry) -> None:
        entries = self.entries
        if type(entries) is deque:
            entries.appendleft(entry)
        else:
            self.entries = deque((entry,))


class LocalRouter:
    """Inboxes and group memberships of the channels of one layer instance."""

    def __init__(
        self,
        *,
        capacity: int,
        expiry: float,
        group_expiry: float | None,
        channel_capacity: int | Callable[[str], int] = 2**62,
        decode: Callable[[bytes], Message] = decode_message,
    ) -> None:
        self.capacity = capacity
        self.expiry = expiry
        self.group_expiry = group_expiry  # None: memberships never expire
        self._decode = decode
        self.held = 0
        self.full_drops = 0  # messages dropped because their channel's inbox was full
        self.on_room: Callable[[], None] | None = None
        #: Called with (channel, group or None) for each message dropped at a full inbox.
        self.on_channel_full: Callable[[str, str | None], None] | None = None
        if callable(channel_capacity):
            self._capacity_of: Callable[[str], int] | None = channel_capacity
            self._default_limit = 0
        else:
            self._capacity_of = None
            self._default_limit = channel_capacity
        self._inboxes: dict[str, _Inbox] = {}
        self._groups: dict[str, set[str]] = {}
        self._membership_expiry: OrderedDict[tuple[str, str], float] = OrderedDict()

    def _new_inbox(self, channel: str) -> _Inbox:
        capacity_of = self._capacity_of
        return _Inbox(capacity_of(channel) if capacity_of is not None else self._default_limit)

    def _drop_full(self, channel: str, group: str | None) -> None:
        self.full_drops += 1
        if self.on_channel_full is not None:
            self.on_channel_full(channel, group)

    # Reading ----------------------------------------------------------------------------------

    @property
    def is_full(self) -> bool:
        return self.held >= self.capacity

    def take(self, channel: str, now: float) -> Message:
        """Return the oldest unexpired message for ``channel``, or :data:`EMPTY`."""
        inbox = self._inboxes.get(channel)
        if inbox is None:
            return EMPTY
        entries = inbox.entries
        while entries:
            expires_at, payload, copies = entries.popleft()
            self._release(copies)
            if expires_at > now:
                if not entries and not inbox.waiters:
                    del self._inboxes[channel]
                message: Message = payload if type(payload) is dict else self._decode(payload)
                return message
        if not inbox.waiters:
            del self._inboxes[channel]
        return EMPTY

    def add_waiter(self, channel: str, waiter: asyncio.Future[Message]) -> None:
        """Register a ``receive()`` waiting for ``channel``; the next message resolves it."""
        inbox = self._inboxes.get(channel)
        if inbox is None:
            inbox = self._inboxes[channel] = self._new_inbox(channel)
        inbox.waiters.append(waiter)

    def remove_waiter(self, channel: str, waiter: asyncio.Future[Message]) -> None:
        """Forget a waiter that was cancelled before it got a message."""
        inbox = self._inboxes.get(channel)
        if inbox is None:
            return
        with contextlib.suppress(ValueError):
            inbox.waiters.remove(waiter)
        if not inbox.waiters and not inbox.entries:
            del self._inboxes[channel]

    def put_back(self, channel: str, message: Message, now: float) -> None:
        """Return a handed-over message whose ``receive()`` was cancelled: it is read next."""
        inbox = self._inboxes.get(channel)
        if inbox is None:
            inbox = self._inboxes[channel] = self._new_inbox(channel)
        while inbox.waiters:  # another receive() of the same channel may be waiting
            waiter = inbox.waiters.pop(0)
            if not waiter.done():
                waiter.set_result(message)
                if not inbox.waiters and not inbox.entries:
                    del self._inboxes[channel]
                return
        inbox.buffer_first((now + self.expiry, message, None))
        self.held += 1

    # Delivering -------------------------------------------------------------------------------

    def deliver(self, channel: str, message: Message, now: float) -> None:
        """Hand ``message`` to a waiting ``receive()`` of ``channel``, or buffer it."""
        inbox = self._inboxes.get(channel)
        if inbox is None:
            inbox = self._inboxes[channel] = self._new_inbox(channel)
        else:
            waiters = inbox.waiters
            while waiters:
                waiter = waiters.pop(0)
                if not waiter.done():
                    waiter.set_result(message)
                    if not waiters and not inbox.entries:
                        del self._inboxes[channel]
                    return
            if len(inbox.entries) >= inbox.limit:
                self._drop_full(channel, None)
                return
        inbox.buffer((now + self.expiry, message, None))
        self.held += 1

    def deliver_to_group(self, group: str, message: Message, body: bytes, now: float) -> int:
        """Give every local member of ``group`` its own copy; return how many members there were."""
        members = self._groups.get(group)
        if not members:
            return 0
        copies = [0]
        expires_at = now + self.expiry
        payload: Any = message  # the first copy is the decoded message itself
        flat = len(members) > 1 and all(type(value) in IMMUTABLE_VALUES for value in message.values())
        for channel in members:
            inbox = self._inboxes.get(channel)
            if inbox is None:
                inbox = self._inboxes[channel] = self._new_inbox(channel)
            else:
                handed = False
                waiters = inbox.waiters
                while waiters:
                    waiter = waiters.pop(0)
                    if not waiter.done():
                        if type(payload) is dict:
                            waiter.set_result(payload)
                        else:  # a new copy, made before any member could change the first one
                            waiter.set_result(message.copy() if flat else self._decode(payload))
                        handed = True
                        break
                if handed:
                    payload = body
                    if not waiters and not inbox.entries:
                        del self._inboxes[channel]
                    continue
                if len(inbox.entries) >= inbox.limit:
                    self._drop_full(channel, group)
                    continue
            inbox.buffer((expires_at, payload, copies))
            copies[0] += 1
            payload = body
        if copies[0]:
            self.held += 1
        return len(members)

    def _release(self, copies: list[int] | None) -> None:
        """One buffered copy was read or dropped."""
        if copies is not None:
            copies[0] -= 1
            if copies[0]:
                return
        self.held -= 1
        if self.held == self.capacity - 1 and self.on_room is not None:
            self.on_room()

    # Expiry -----------------------------------------------------------------------------------

    def expire_messages(self, now: float) -> int:
        """Drop buffered messages older than ``expiry``; return how many copies were dropped."""
        if not self.held:
            return 0
        dropped = 0
        held_before = self.held
        on_room, self.on_room = self.on_room, None  # one notification after the sweep
        try:
            for channel, inbox in list(self._inboxes.items()):
                entries = inbox.entries
                while entries and entries[0][0] <= now:
                    self._release(entries.popleft()[2])
                    dropped += 1
                if not entries and not inbox.waiters:
                    del self._inboxes[channel]
        finally:
            self.on_room = on_room
        if held_before >= self.capacity > self.held and on_room is not None:
            on_room()
        return dropped

    def channels(self) -> set[str]:
        """The channels known to be alive here: with an inbox (messages or a waiting receive) or
        a group membership."""
        alive = set(self._inboxes)
        for members in self._groups.values():
            alive |= members
        return alive

    def held_by(self, channel: str) -> int:
        """Messages buffered for one channel."""
        inbox = self._inboxes.get(channel)
        return 0 if inbox is None else len(inbox.entries)

    @property
    def inbox_count(self) -> int:
        """Channels with an inbox (buffered messages or a waiting receive); ``layer.stats()``
        reports it."""
        return len(self._inboxes)

    # Groups -----------------------------------------------------------------------------------

    @property
    def group_count(self) -> int:
        """Groups with at least one local member; ``layer.stats()`` reports it."""
        return len(self._groups)

    def add_membership(self, group: str, channel: str, now: float) -> bool:
        """Add or refresh a membership; True when it is the group's first local member."""
        if self.group_expiry is not None:
            key = (group, channel)
            self._membership_expiry.pop(key, None)
            self._membership_expiry[key] = now + self.group_expiry
        members = self._groups.get(group)
        if members is None:
            self._groups[group] = {channel}
            return True
        members.add(channel)
        return False

    def discard_membership(self, group: str, channel: str) -> bool:
        """Remove a membership if there is one; True when the group lost its last local member."""
        members = self._groups.get(group)
        if members is None or channel not in members:
            return False
        self._membership_expiry.pop((group, channel), None)
        members.discard(channel)
        if members:
            return False
        del self._groups[group]
        return True

    def discard_group(self, group: str) -> list[str]:
        """Remove every local membership of ``group``; return the channels that were members."""
        members = self._groups.pop(group, set())
        for channel in members:
            self._membership_expiry.pop((group, channel), None)
        return sorted(members)

    def expire_memberships(self, now: float) -> list[str]:
        """Drop memberships past ``group_expiry``; return the groups left with no local member."""
        emptied = []
        expiry = self._membership_expiry
        while expiry:
            (group, channel), expires_at = next(iter(expiry.items()))
            if expires_at > now:
                break
            del expiry[(group, channel)]
            if self.discard_membership(group, channel):
                emptied.append(group)
        return emptied

    def has_members(self, group: str) -> bool:
        return group in self._groups

    @property
    def groups(self) -> Iterable[str]:
        """The groups with at least one local member."""
        return self._groups.keys()

    # Whole-layer operations -------------------------------------------------------------------

    def flush(self) -> list[str]:
        """Drop every buffered message and membership; return the groups that had members."""
        groups = list(self._groups)
        self._groups.clear()
        self._membership_expiry.clear()
        was_full = self.is_full
        for channel, inbox in list(self._inboxes.items()):
            inbox.entries = _NO_ENTRIES
            if not inbox.waiters:
                del self._inboxes[channel]
        self.held = 0
        if was_full and self.on_room is not None:
            self.on_room()
        return groups

    def close(self, error_factory: Callable[[], BaseException]) -> None:
        """Fail every waiting ``receive()`` with a fresh error, and drop everything."""
        for inbox in self._inboxes.values():
            for waiter in inbox.waiters:
                if not waiter.done():
                    waiter.set_exception(error_factory())
        self._inboxes.clear()
        self._groups.clear()
        self._membership_expiry.clear()
        self.held = 0
