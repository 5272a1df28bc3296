"""LocalRouter: inboxes, waiters, groups, expiry and capacity, with an explicit clock."""

from __future__ import annotations

import asyncio

from channels_rabbitmq.routing import EMPTY, LocalRouter
from channels_rabbitmq.wire.serializers import decode_message, encode_message

EXPIRY = 60.0
GROUP_EXPIRY = 86400.0


def make_router(
    capacity: int = 100, expiry: float = EXPIRY, group_expiry: float = GROUP_EXPIRY
) -> LocalRouter:
    return LocalRouter(capacity=capacity, expiry=expiry, group_expiry=group_expiry)


def group_message(message: dict) -> tuple[dict, bytes]:
    """A group delivery as the broker link hands it over: decoded message and its body."""
    body = encode_message(message, 1 << 20)
    return decode_message(body), body


class RoomCounter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def new_future() -> asyncio.Future:
    return asyncio.get_running_loop().create_future()


# take / deliver -------------------------------------------------------------------------------


def test_take_from_an_unknown_channel_returns_empty():
    router = make_router()
    assert router.take("q!a", 0) is EMPTY
    assert router.inbox_count == 0


def test_take_returns_messages_in_fifo_order():
    router = make_router()
    for number in range(5):
        router.deliver("q!a", {"n": number}, now=float(number))
    assert [router.take("q!a", 10)["n"] for _ in range(5)] == [0, 1, 2, 3, 4]
    assert router.take("q!a", 10) is EMPTY


def test_buffered_messages_are_held_until_taken_and_the_inbox_is_then_deleted():
    router = make_router()
    router.deliver("q!a", {"n": 1}, 0)
    router.deliver("q!a", {"n": 2}, 0)
    assert router.held == 2
    assert router.inbox_count == 1
    router.take("q!a", 1)
    assert router.held == 1
    router.take("q!a", 1)
    assert router.held == 0
    assert router.inbox_count == 0


def test_held_by_counts_one_channels_buffered_messages():
    router = make_router()
    for n in range(3):
        router.deliver("q!a", {"n": n}, 0)
    router.deliver("q!b", {"n": 0}, 0)
    assert (router.held_by("q!a"), router.held_by("q!b"), router.held_by("q!c")) == (3, 1, 0)
    router.take("q!a", 1)
    assert router.held_by("q!a") == 2


def test_channels_have_separate_inboxes():
    router = make_router()
    router.deliver("q!a", {"to": "a"}, 0)
    router.deliver("q!b", {"to": "b"}, 0)
    assert router.take("q!b", 0) == {"to": "b"}
    assert router.take("q!a", 0) == {"to": "a"}
    assert router.take("q!a", 0) is EMPTY


def test_take_skips_expired_messages_and_releases_them():
    router = make_router()
    router.deliver("q!a", {"n": "old"}, now=0)
    router.deliver("q!a", {"n": "new"}, now=30)
    assert router.take("q!a", now=EXPIRY + 1) == {"n": "new"}
    assert router.held == 0
    assert router.inbox_count == 0


def test_take_of_only_expired_messages_returns_empty_and_deletes_the_inbox():
    router = make_router()
    router.deliver("q!a", {"n": 1}, now=0)
    assert router.take("q!a", now=EXPIRY) is EMPTY  # expiry is exclusive: expires_at <= now is expired
    assert router.held == 0
    assert router.inbox_count == 0


async def test_waiter_gets_the_message_directly_without_increasing_held():
    router = make_router()
    waiter = new_future()
    router.add_waiter("q!a", waiter)
    message = {"type": "hello"}
    router.deliver("q!a", message, 0)
    assert waiter.done()
    assert waiter.result() is message
    assert router.held == 0
    assert router.inbox_count == 0


async def test_waiters_are_served_in_order():
    router = make_router()
    first, second = new_future(), new_future()
    router.add_waiter("q!a", first)
    router.add_waiter("q!a", second)
    router.deliver("q!a", {"n": 1}, 0)
    assert first.result() == {"n": 1}
    assert not second.done()
    assert router.inbox_count == 1
    router.deliver("q!a", {"n": 2}, 0)
    assert second.result() == {"n": 2}
    assert router.inbox_count == 0


async def test_cancelled_waiters_are_skipped_and_the_message_is_buffered():
    router = make_router()
    waiter = new_future()
    router.add_waiter("q!a", waiter)
    waiter.cancel()
    router.deliver("q!a", {"n": 1}, 0)
    assert router.held == 1
    assert router.take("q!a", 0) == {"n": 1}


async def test_remove_waiter_deletes_the_empty_inbox():
    router = make_router()
    waiter = new_future()
    router.add_waiter("q!a", waiter)
    assert router.inbox_count == 1
    router.remove_waiter("q!a", waiter)
    assert router.inbox_count == 0
    router.remove_waiter("q!a", waiter)  # twice, or for an unknown channel: no error
    router.remove_waiter("q!unknown", waiter)


async def test_remove_waiter_keeps_the_inbox_of_other_waiters():
    router = make_router()
    first, second = new_future(), new_future()
    router.add_waiter("q!a", first)
    router.add_waiter("q!a", second)
    router.remove_waiter("q!a", first)
    router.deliver("q!a", {"n": 1}, 0)
    assert second.result() == {"n": 1}
    assert not first.done()


# put_back -------------------------------------------------------------------------------------


def test_put_back_puts_the_message_at_the_front():
    router = make_router()
    router.deliver("q!a", {"n": 2}, 0)
    router.deliver("q!a", {"n": 3}, 0)
    router.put_back("q!a", {"n": 1}, 0)
    assert router.held == 3
    assert [router.take("q!a", 1)["n"] for _ in range(3)] == [1, 2, 3]
    assert router.held == 0
    assert router.inbox_count == 0


async def test_put_back_after_a_cancelled_receive_is_read_by_the_next_take():
    router = make_router()
    waiter = new_future()
    router.add_waiter("q!a", waiter)
    router.deliver("q!a", {"n": 1}, 0)
    router.put_back("q!a", waiter.result(), 1)
    assert router.held == 1
    assert router.take("q!a", 2) == {"n": 1}


async def test_put_back_hands_the_message_to_another_waiting_receive():
    router = make_router()
    first, second = new_future(), new_future()
    router.add_waiter("q!a", first)
    router.add_waiter("q!a", second)
    router.deliver("q!a", {"n": 1}, 0)
    router.put_back("q!a", first.result(), 0)
    assert second.result() == {"n": 1}
    assert router.held == 0


async def test_put_back_handed_to_another_waiter_leaves_no_empty_inbox():
    router = make_router()
    first, second = new_future(), new_future()
    router.add_waiter("q!a", first)
    router.add_waiter("q!a", second)
    router.deliver("q!a", {"n": 1}, 0)
    router.put_back("q!a", first.result(), 0)
    assert second.done()
    assert router.inbox_count == 0


# Expiry ---------------------------------------------------------------------------------------


def test_expire_messages_drops_old_messages_and_deletes_their_inboxes():
    router = make_router()
    for number in range(1000):
        router.deliver(f"q!gone{number}", {"n": number}, now=0)
    router.deliver("q!fresh", {"n": "fresh"}, now=30)
    assert router.inbox_count == 1001
    assert router.expire_messages(now=EXPIRY + 1) == 1000
    assert router.inbox_count == 1
    assert router.held == 1
    assert router.take("q!fresh", EXPIRY + 1) == {"n": "fresh"}
    assert router.inbox_count == 0


def test_memory_stays_bounded_for_channels_nobody_reads():
    router = make_router(capacity=10**6, expiry=1)
    for second in range(100):
        for number in range(50):
            router.deliver(f"q!abandoned{second}-{number}", {"n": number}, now=second)
        router.expire_messages(now=second)
        assert router.inbox_count == 50  # only the messages of the last second are left
    router.expire_messages(now=1000)
    assert router.inbox_count == 0
    assert router.held == 0


def test_expire_messages_keeps_unexpired_messages_behind_expired_ones():
    router = make_router()
    router.deliver("q!a", {"n": 1}, now=0)
    router.deliver("q!a", {"n": 2}, now=10)
    assert router.expire_messages(now=EXPIRY + 5) == 1
    assert router.take("q!a", EXPIRY + 5) == {"n": 2}


def test_expire_messages_with_nothing_held_is_a_no_op():
    router = make_router()
    assert router.expire_messages(now=10**9) == 0


async def test_expire_messages_keeps_inboxes_with_waiters():
    router = make_router()
    waiter = new_future()
    router.add_waiter("q!waiting", waiter)
    router.deliver("q!other", {"n": 1}, now=0)
    router.expire_messages(now=EXPIRY + 1)
    assert router.inbox_count == 1
    router.deliver("q!waiting", {"n": 2}, now=EXPIRY + 1)
    assert waiter.result() == {"n": 2}


def test_expired_group_copies_count_each_copy_and_release_held_once():
    router = make_router()
    for channel in ("q!a", "q!b", "q!c"):
        router.add_membership("room", channel, 0)
    message, body = group_message({"text": "hi"})
    router.deliver_to_group("room", message, body, now=0)
    assert router.held == 1
    assert router.expire_messages(now=EXPIRY + 1) == 3
    assert router.held == 0
    assert router.inbox_count == 0


# Capacity and on_room ---------------------------------------------------------------------------


def test_is_full_when_held_reaches_capacity():
    router = make_router(capacity=2)
    router.deliver("q!a", {}, 0)
    assert not router.is_full
    router.deliver("q!a", {}, 0)
    assert router.is_full


def test_on_room_fires_exactly_once_when_held_drops_below_capacity():
    router = make_router(capacity=3)
    room = RoomCounter()
    router.on_room = room
    for number in range(5):  # prefetched deliveries may go past capacity
        router.deliver("q!a", {"n": number}, 0)
    router.take("q!a", 1)  # 4 held
    router.take("q!a", 1)  # 3 held: still full
    assert room.calls == 0
    router.take("q!a", 1)  # 2 held: room
    assert room.calls == 1
    router.take("q!a", 1)
    router.take("q!a", 1)
    assert room.calls == 1
    assert router.held == 0


def test_on_room_does_not_fire_when_never_full():
    router = make_router(capacity=3)
    room = RoomCounter()
    router.on_room = room
    router.deliver("q!a", {}, 0)
    router.take("q!a", 0)
    router.deliver("q!a", {}, 0)
    router.expire_messages(EXPIRY + 1)
    router.flush()
    assert room.calls == 0


def test_on_room_fires_once_after_an_expiry_sweep_that_makes_room():
    router = make_router(capacity=3)
    room = RoomCounter()
    router.on_room = room
    for number in range(6):
        router.deliver(f"q!c{number}", {"n": number}, 0)
    assert router.expire_messages(EXPIRY + 1) == 6
    assert room.calls == 1
    assert router.on_room is room


def test_on_room_does_not_fire_after_a_sweep_that_leaves_the_router_full():
    router = make_router(capacity=2)
    room = RoomCounter()
    router.on_room = room
    router.deliver("q!a", {}, 0)
    router.deliver("q!b", {}, 10)
    router.deliver("q!c", {}, 10)
    router.expire_messages(EXPIRY + 1)
    assert router.held == 2
    assert room.calls == 0


def test_on_room_fires_when_the_last_copy_of_a_group_message_is_read():
    router = make_router(capacity=1)
    room = RoomCounter()
    router.on_room = room
    router.add_membership("room", "q!a", 0)
    router.add_membership("room", "q!b", 0)
    message, body = group_message({"x": 1})
    router.deliver_to_group("room", message, body, 0)
    assert router.is_full
    router.take("q!a", 1)
    assert room.calls == 0
    assert router.is_full
    router.take("q!b", 1)
    assert room.calls == 1
    assert router.held == 0


def test_flush_of_a_full_router_fires_on_room():
    router = make_router(capacity=1)
    room = RoomCounter()
    router.on_room = room
    router.deliver("q!a", {}, 0)
    router.flush()
    assert room.calls == 1


# Groups ---------------------------------------------------------------------------------------


def test_add_membership_returns_true_only_for_the_first_local_member():
    router = make_router()
    assert router.add_membership("room", "q!a", 0) is True
    assert router.add_membership("room", "q!b", 0) is False
    assert router.add_membership("room", "q!a", 1) is False  # refresh
    assert router.has_members("room")
    assert "q!a" in router._groups.get("room", ())
    assert "q!c" not in router._groups.get("room", ())
    assert "q!a" not in router._groups.get("other", ())
    assert set(router.groups) == {"room"}


def test_discard_membership_returns_true_when_the_group_lost_its_last_member():
    router = make_router()
    router.add_membership("room", "q!a", 0)
    router.add_membership("room", "q!b", 0)
    assert router.discard_membership("room", "q!a") is False
    assert router.discard_membership("room", "q!b") is True
    assert not router.has_members("room")
    assert list(router.groups) == []


def test_discard_of_a_non_member_returns_false():
    router = make_router()
    assert router.discard_membership("room", "q!a") is False
    router.add_membership("room", "q!a", 0)
    assert router.discard_membership("room", "q!b") is False
    assert "q!a" in router._groups.get("room", ())


def test_deliver_to_group_without_local_members_returns_zero_and_holds_nothing():
    router = make_router()
    message, body = group_message({"x": 1})
    assert router.deliver_to_group("room", message, body, 0) == 0
    assert router.held == 0
    assert router.inbox_count == 0


def test_group_message_is_held_once_however_many_members_buffered_it():
    router = make_router()
    members = [f"q!m{number}" for number in range(5)]
    for channel in members:
        router.add_membership("room", channel, 0)
    message, body = group_message({"text": "hello"})
    assert router.deliver_to_group("room", message, body, 0) == 5
    assert router.held == 1
    for channel in members[:-1]:
        assert router.take(channel, 1) == {"text": "hello"}
        assert router.held == 1
    router.take(members[-1], 1)
    assert router.held == 0
    assert router.inbox_count == 0


def test_group_members_each_get_their_own_copy():
    router = make_router()
    members = ["q!a", "q!b", "q!c"]
    for channel in members:
        router.add_membership("room", channel, 0)
    message, body = group_message({"type": "chat", "data": {"items": [1, 2]}, "raw": b"\x00\x01"})
    router.deliver_to_group("room", message, body, 0)
    received = [router.take(channel, 1) for channel in members]
    assert all(copy == {"type": "chat", "data": {"items": [1, 2]}, "raw": b"\x00\x01"} for copy in received)
    received[0]["data"]["items"].append(3)
    received[0]["type"] = "changed"
    assert received[1] == {"type": "chat", "data": {"items": [1, 2]}, "raw": b"\x00\x01"}
    assert received[2] == received[1]
    assert len({id(copy) for copy in received}) == 3
    assert len({id(copy["data"]) for copy in received}) == 3


async def test_group_members_with_waiters_each_get_their_own_copy_without_holding():
    router = make_router()
    waiters = {}
    for channel in ("q!a", "q!b", "q!c"):
        router.add_membership("room", channel, 0)
        waiters[channel] = new_future()
        router.add_waiter(channel, waiters[channel])
    message, body = group_message({"data": {"items": [1]}})
    assert router.deliver_to_group("room", message, body, 0) == 3
    assert router.held == 0
    assert router.inbox_count == 0
    copies = [waiter.result() for waiter in waiters.values()]
    copies[0]["data"]["items"].append(2)
    assert copies[1] == {"data": {"items": [1]}}
    assert copies[2] == {"data": {"items": [1]}}


async def test_waiting_members_of_a_flat_message_get_copies_without_decoding_again():
    decoded = []

    def counting_decode(body: bytes) -> dict:
        decoded.append(body)
        return decode_message(body)

    router = LocalRouter(capacity=100, expiry=EXPIRY, group_expiry=GROUP_EXPIRY, decode=counting_decode)
    waiters = {}
    for channel in ("q!a", "q!b", "q!c"):
        router.add_membership("room", channel, 0)
        waiters[channel] = new_future()
        router.add_waiter(channel, waiters[channel])
    flat = {"type": "chat.message", "text": "hi", "n": 1, "x": 1.5, "ok": True, "none": None, "raw": b"\x00"}
    message, body = group_message(flat)
    router.deliver_to_group("room", message, body, 0)
    copies = [waiter.result() for waiter in waiters.values()]
    assert copies == [flat] * 3
    assert len({id(copy) for copy in copies}) == 3
    assert decoded == []  # every value is immutable: dict.copy() gives what decoding would
    copies[0]["text"] = "changed"
    assert copies[1] == flat
    assert copies[2] == flat
    # A value that a member could change in place (a list): each copy is decoded from the body.
    for channel in waiters:
        waiters[channel] = new_future()
        router.add_waiter(channel, waiters[channel])
    message, body = group_message({"type": "m", "items": [1]})
    router.deliver_to_group("room", message, body, 0)
    assert decoded == [body, body]
    copies = [waiter.result() for waiter in waiters.values()]
    copies[0]["items"].append(2)
    assert copies[1] == {"type": "m", "items": [1]} == copies[2]


async def test_group_message_mixes_handoffs_and_buffered_copies():
    router = make_router()
    for channel in ("q!a", "q!b", "q!c", "q!d"):
        router.add_membership("room", channel, 0)
    waiter = new_future()
    router.add_waiter("q!b", waiter)
    message, body = group_message({"n": 1})
    router.deliver_to_group("room", message, body, 0)
    assert waiter.result() == {"n": 1}
    assert router.held == 1
    copies = [router.take(channel, 1) for channel in ("q!a", "q!c", "q!d")]
    assert copies == [{"n": 1}] * 3
    copies[0]["n"] = 2
    assert waiter.result() == {"n": 1}
    assert copies[1] == {"n": 1}
    assert router.held == 0


def test_group_expiry_drops_memberships_and_returns_groups_left_empty():
    router = make_router(group_expiry=100)
    router.add_membership("lonely", "q!a", 0)
    router.add_membership("shared", "q!a", 0)
    router.add_membership("shared", "q!b", 50)
    assert router.expire_memberships(now=99) == []
    assert router.expire_memberships(now=100) == ["lonely"]  # "shared" still has q!b
    assert "q!a" not in router._groups.get("shared", ())
    assert "q!b" in router._groups.get("shared", ())
    assert router.expire_memberships(now=150) == ["shared"]
    assert list(router.groups) == []


def test_refreshing_a_membership_postpones_its_expiry():
    router = make_router(group_expiry=100)
    router.add_membership("room", "q!a", 0)
    router.add_membership("other", "q!b", 10)
    router.add_membership("room", "q!a", 80)  # refresh: now expires at 180
    assert router.expire_memberships(now=120) == ["other"]
    assert "q!a" in router._groups.get("room", ())
    assert router.expire_memberships(now=179) == []
    assert router.expire_memberships(now=180) == ["room"]


def test_discarded_membership_does_not_expire_later():
    router = make_router(group_expiry=100)
    router.add_membership("room", "q!a", 0)
    router.discard_membership("room", "q!a")
    router.add_membership("room", "q!b", 50)
    assert router.expire_memberships(now=100) == []
    assert "q!b" in router._groups.get("room", ())


def test_expired_members_no_longer_receive_group_messages():
    router = make_router(group_expiry=10)
    router.add_membership("room", "q!a", 0)
    router.add_membership("room", "q!b", 5)
    router.expire_memberships(now=12)
    message, body = group_message({"n": 1})
    assert router.deliver_to_group("room", message, body, 12) == 1
    assert router.take("q!a", 12) is EMPTY
    assert router.take("q!b", 12) == {"n": 1}


# flush / close -----------------------------------------------------------------------------------


async def test_flush_empties_messages_and_memberships_but_keeps_waiters():
    router = make_router()
    router.add_membership("room", "q!a", 0)
    router.add_membership("hall", "q!b", 0)
    router.deliver("q!a", {"n": 1}, 0)
    router.deliver("q!c", {"n": 2}, 0)
    waiter = new_future()
    router.add_waiter("q!w", waiter)
    router.deliver("q!x", {"n": "buffered before its waiter came"}, 0)
    late = new_future()
    router.add_waiter("q!x", late)
    assert router.held == 3
    assert sorted(router.flush()) == ["hall", "room"]
    assert router.held == 0
    assert router.inbox_count == 2  # the inboxes with waiters
    assert not late.done()
    assert list(router.groups) == []
    assert router.take("q!a", 0) is EMPTY
    assert router.take("q!c", 0) is EMPTY
    assert router.take("q!x", 0) is EMPTY
    assert not waiter.done()
    router.deliver("q!w", {"n": 3}, 0)
    assert waiter.result() == {"n": 3}
    assert router.expire_memberships(now=10**9) == []


async def test_close_fails_every_waiter_with_a_fresh_error():
    router = make_router()
    waiters = [new_future() for _ in range(3)]
    router.add_waiter("q!a", waiters[0])
    router.add_waiter("q!a", waiters[1])
    router.add_waiter("q!b", waiters[2])
    done = new_future()
    done.cancel()
    router.add_waiter("q!b", done)
    router.add_membership("room", "q!a", 0)
    router.deliver("q!c", {"n": 1}, 0)

    class Closed(Exception):
        pass

    router.close(Closed)
    errors = [waiter.exception() for waiter in waiters]
    assert all(isinstance(error, Closed) for error in errors)
    assert len({id(error) for error in errors}) == 3
    assert router.held == 0
    assert router.inbox_count == 0
    assert list(router.groups) == []


# Per-channel capacity ---------------------------------------------------------------------------


def test_a_full_channel_drops_only_its_own_messages_and_reports_each_drop():
    router = LocalRouter(capacity=1000, expiry=EXPIRY, group_expiry=GROUP_EXPIRY, channel_capacity=3)
    reported: list[tuple[str, str | None]] = []
    router.on_channel_full = lambda channel, group: reported.append((channel, group))
    for number in range(5):
        router.deliver("q!stuck", {"n": number}, 0)
    router.deliver("q!other", {"n": 99}, 0)
    assert router.full_drops == 2
    assert reported == [("q!stuck", None), ("q!stuck", None)]
    assert [router.take("q!stuck", 1)["n"] for _ in range(3)] == [0, 1, 2]  # the oldest are kept
    assert router.take("q!stuck", 1) is EMPTY
    assert router.take("q!other", 1) == {"n": 99}
    assert router.held == 0


def test_a_full_member_misses_a_group_message_and_the_other_members_get_it():
    router = LocalRouter(capacity=1000, expiry=EXPIRY, group_expiry=GROUP_EXPIRY, channel_capacity=2)
    reported: list[tuple[str, str | None]] = []
    router.on_channel_full = lambda channel, group: reported.append((channel, group))
    for channel in ("q!dead", "q!alive"):
        router.add_membership("room", channel, 0)
    for number in range(3):
        message, body = group_message({"n": number})
        router.deliver_to_group("room", message, body, 0)
        if number < 2:
            assert router.take("q!alive", 0) == {"n": number}
    assert reported == [("q!dead", "room")]
    assert router.take("q!alive", 0) == {"n": 2}
    assert [router.take("q!dead", 0)["n"] for _ in range(2)] == [0, 1]
    assert router.held == 0


def test_a_waiting_receive_takes_no_room_and_a_put_back_message_is_never_dropped():
    router = LocalRouter(capacity=1000, expiry=EXPIRY, group_expiry=GROUP_EXPIRY, channel_capacity=1)
    router.deliver("q!a", {"n": 1}, 0)
    router.put_back("q!a", {"n": 0}, 0)  # a cancelled receive() gives its message back
    assert router.full_drops == 0
    assert [router.take("q!a", 0)["n"] for _ in range(2)] == [0, 1]


def test_channel_capacity_can_differ_per_channel():
    capacities = {"q!big": 5}
    router = LocalRouter(
        capacity=1000,
        expiry=EXPIRY,
        group_expiry=GROUP_EXPIRY,
        channel_capacity=lambda channel: capacities.get(channel, 1),
    )
    for number in range(6):
        router.deliver("q!big", {"n": number}, 0)
        router.deliver("q!small", {"n": number}, 0)
    assert router.full_drops == 1 + 5
