"""Mandatory publishes and basic.return: the frame bit, the protocol's event, matching a return to
its publish. No broker: server frames are built with pamqp (the broker side is in
tests/integration/test_remote_groups.py)."""

from __future__ import annotations

import asyncio

import pytest
from pamqp import body as pamqp_body
from pamqp import commands
from pamqp import header as pamqp_header

from channels_rabbitmq.amqp import frames
from channels_rabbitmq.amqp.channels import PublishConfirms, PublishOutcome
from channels_rabbitmq.amqp.protocol import MessageReturned, PublishConfirmed
from channels_rabbitmq.wire import NO_PROPERTIES
from tests.unit.test_protocol import feed_in_pieces, open_protocol, server, unmarshal_all


def returned_frames(
    body: bytes, *, channel: int = 1, routing_key: str = "channels.gone", headers=None
) -> bytes:
    """basic.return + content header + body, as RabbitMQ sends back an unroutable mandatory message."""
    properties = commands.Basic.Properties(headers=headers) if headers else commands.Basic.Properties()
    parts = [
        server(commands.Basic.Return(312, "NO_ROUTE", "", routing_key), channel),
        server(pamqp_header.ContentHeader(0, len(body), properties), channel),
    ]
    if body:
        parts.append(server(pamqp_body.ContentBody(body), channel))
    return b"".join(parts)


# The mandatory bit -------------------------------------------------------------------------------


@pytest.mark.parametrize("mandatory", [False, True])
def test_publish_sets_the_mandatory_bit_only_when_asked(mandatory: bool) -> None:
    data = frames.encode_publish(1, b"", b"q", NO_PROPERTIES, b"x", 131072, mandatory)
    publish = unmarshal_all(data)[0][1]
    assert publish.mandatory is mandatory
    assert publish.immediate is False


def test_protocol_publish_passes_mandatory_on() -> None:
    protocol = open_protocol()
    protocol.publish(1, b"", b"q", NO_PROPERTIES, b"x", mandatory=True)
    protocol.publish(1, b"", b"q", NO_PROPERTIES, b"x")
    first, second = (
        value for _, value in unmarshal_all(protocol.take_outgoing()) if hasattr(value, "mandatory")
    )
    assert (first.mandatory, second.mandatory) == (True, False)


# basic.return in the protocol ----------------------------------------------------------------------

HEADERS = {"asgi_control": "group_add"}
EXPECTED = MessageReturned(1, 312, "NO_ROUTE", "", "channels.gone", HEADERS, b"sealed body")


def test_a_return_with_its_content_gives_one_message_returned_event() -> None:
    protocol = open_protocol()
    assert protocol.receive_data(returned_frames(b"sealed body", headers=HEADERS)) == [EXPECTED]


@pytest.mark.parametrize("piece_size", [1, 7, 64])
def test_a_return_split_anywhere_gives_the_same_event(piece_size: int) -> None:
    protocol = open_protocol()
    assert feed_in_pieces(protocol, returned_frames(b"sealed body", headers=HEADERS), piece_size) == [
        EXPECTED
    ]


def test_a_return_then_its_ack_keep_their_order_and_the_stream_goes_on() -> None:
    """Before this, a content header after basic.return was a protocol error: the connection died."""
    protocol = open_protocol()
    data = returned_frames(b"b", headers=HEADERS) + server(commands.Basic.Ack(3, False), 1)
    events = protocol.receive_data(data)
    assert [type(event) for event in events] == [MessageReturned, PublishConfirmed]
    assert events[1] == PublishConfirmed(1, 3, False, True)


def test_a_return_with_no_body_and_no_properties() -> None:
    protocol = open_protocol()
    [event] = protocol.receive_data(returned_frames(b""))
    assert (event.body, event.headers, event.error) == (b"", None, None)


def test_a_return_over_max_body_size_says_so_and_keeps_no_body() -> None:
    protocol = open_protocol(max_body_size=10)
    [event] = protocol.receive_data(returned_frames(b"x" * 11))
    assert event.body == b""
    assert event.error is not None
    assert "too large" in event.error


# Matching a return to its publish --------------------------------------------------------------------


def confirm(tag: int, accepted: bool = True, multiple: bool = False) -> PublishConfirmed:
    return PublishConfirmed(1, tag, multiple, accepted)


def returned(body: bytes, routing_key: str = "q") -> MessageReturned:
    return MessageReturned(1, 312, "NO_ROUTE", "", routing_key, None, body)


class Publisher:
    """PublishConfirms as a connection drives it: one confirming channel, tags from 1."""

    def __init__(self) -> None:
        self.confirms = PublishConfirms()
        self.confirms.enable(1)
        self.tag = 0
        self.confirmed: list[asyncio.Future[bool]] = []

    def publish(self, body: bytes, routing_key: str = "q") -> asyncio.Future[PublishOutcome]:
        self.tag += 1
        confirmed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.confirmed.append(confirmed)
        self.confirms.waiting_on(1)[self.tag] = confirmed
        return self.confirms.outcome(1, self.tag, ("", routing_key, body), confirmed)


async def test_a_returned_publish_resolves_to_returned_and_the_others_to_their_confirm() -> None:
    publisher = Publisher()
    routed, gone, refused = publisher.publish(b"a"), publisher.publish(b"b"), publisher.publish(b"c")
    # B comes back while A still waits for its queue's confirm: matched by body, not by order.
    assert publisher.confirms.on_return(returned(b"b"))
    publisher.confirms.on_confirm(confirm(2))
    publisher.confirms.on_confirm(confirm(3, accepted=False))
    publisher.confirms.on_confirm(confirm(1))
    assert await routed is PublishOutcome.ACCEPTED
    assert await gone is PublishOutcome.RETURNED
    assert await refused is PublishOutcome.REFUSED


async def test_identical_mandatory_messages_are_matched_oldest_first() -> None:
    publisher = Publisher()
    first, second = publisher.publish(b"same"), publisher.publish(b"same")
    assert publisher.confirms.on_return(returned(b"same"))
    publisher.confirms.on_confirm(confirm(2, multiple=True))
    assert await first is PublishOutcome.RETURNED
    assert await second is PublishOutcome.ACCEPTED


async def test_a_return_nobody_published_as_mandatory_is_not_matched() -> None:
    publisher = Publisher()
    outcome = publisher.publish(b"mine")
    assert not publisher.confirms.on_return(returned(b"someone else's"))
    assert not publisher.confirms.on_return(returned(b"mine", routing_key="other"))
    publisher.confirms.on_confirm(confirm(1))
    assert await outcome is PublishOutcome.ACCEPTED
    # Settled: nothing is kept for it, and a late return matches nothing.
    assert not publisher.confirms.on_return(returned(b"mine"))
    assert publisher.confirms._may_return == {1: {}}
    assert publisher.confirms._returned in ({}, {1: set()})


async def test_a_lost_channel_fails_mandatory_publishes_and_forgets_their_returns() -> None:
    publisher = Publisher()
    outcome = publisher.publish(b"x")
    publisher.confirms.on_return(returned(b"x"))
    publisher.confirms.fail_channel(1, ConnectionError("lost"))
    with pytest.raises(ConnectionError):
        await outcome
    assert publisher.confirms._may_return == {}
    assert publisher.confirms._returned == {}


async def test_an_outcome_nobody_waits_for_any_more_still_retrieves_its_confirm_error() -> None:
    publisher = Publisher()
    outcome = publisher.publish(b"x")
    outcome.cancel()
    publisher.confirms.fail_channel(1, ConnectionError("lost"))
    await asyncio.sleep(0)
    [confirmed] = publisher.confirmed
    assert not confirmed._log_traceback  # retrieved: no "exception was never retrieved" at GC
