"""The sans-I/O AMQP state machine, driven by server frames built with pamqp."""

from __future__ import annotations

import struct

import pytest
from pamqp import body as pamqp_body
from pamqp import commands
from pamqp import frame as pamqp_frame
from pamqp import header as pamqp_header
from pamqp import heartbeat as pamqp_heartbeat

from channels_rabbitmq.amqp import frames
from channels_rabbitmq.amqp import protocol as protocol_module
from channels_rabbitmq.amqp.errors import RequestNotEncodable
from channels_rabbitmq.amqp.protocol import (
    AmqpProtocol,
    ChannelClosed,
    ConnectionBlocked,
    ConnectionClosed,
    ConnectionOpened,
    ConnectionUnblocked,
    Credentials,
    Delivery,
    MethodReceived,
    ProtocolError,
    PublishConfirmed,
    State,
    UndecodableDelivery,
)
from channels_rabbitmq.wire import NO_PROPERTIES, channel_properties

# Helpers ----------------------------------------------------------------------------------------


def server(method: object, channel: int = 0) -> bytes:
    return pamqp_frame.marshal(method, channel)


def unmarshal_all(data: bytes) -> list[tuple[int, object]]:
    result = []
    while data:
        consumed, channel, value = pamqp_frame.unmarshal(data)
        result.append((channel, value))
        data = data[consumed:]
    return result


def sent_methods(protocol: AmqpProtocol) -> list[tuple[int, object]]:
    return unmarshal_all(protocol.take_outgoing())


def new_protocol(**kwargs) -> AmqpProtocol:
    return AmqpProtocol(Credentials("user", "s3cret"), kwargs.pop("vhost", "asgi"), **kwargs)


def open_protocol(
    *, frame_max: int = 131072, channel_max: int = 2047, heartbeat: int = 60, **kwargs
) -> AmqpProtocol:
    protocol = new_protocol(**kwargs)
    protocol.receive_data(server(commands.Connection.Start(server_properties={"product": "RabbitMQ"})))
    protocol.receive_data(server(commands.Connection.Tune(channel_max, frame_max, heartbeat)))
    events = protocol.receive_data(server(commands.Connection.OpenOk()))
    assert [type(event) for event in events] == [ConnectionOpened]
    protocol.take_outgoing()
    return protocol


def delivery_frames(
    body: bytes,
    *,
    channel: int = 2,
    tag: int = 1,
    properties: commands.Basic.Properties | None = None,
    exchange: str = "",
    routing_key: str = "channels.q",
    redelivered: bool = False,
    frame_max: int = 131072,
    consumer_tag: str = "ctag.1",
) -> bytes:
    """basic.deliver + content header + body frames, as RabbitMQ would send them (via pamqp)."""
    parts = [
        server(commands.Basic.Deliver(consumer_tag, tag, redelivered, exchange, routing_key), channel),
        server(pamqp_header.ContentHeader(0, len(body), properties or commands.Basic.Properties()), channel),
    ]
    chunk = frame_max - frames.FRAME_OVERHEAD
    for start in range(0, len(body), chunk):
        parts.append(server(pamqp_body.ContentBody(body[start : start + chunk]), channel))
    return b"".join(parts)


def feed_in_pieces(protocol: AmqpProtocol, data: bytes, size: int) -> list:
    events = []
    for start in range(0, len(data), size):
        events += protocol.receive_data(data[start : start + size])
    return events


# The message kinds every feeding strategy must agree on: (name, frames kwargs, expected delivery)
CHANNEL = "channels.q!abcdef"
MESSAGE_KINDS = [
    (
        "no-properties",
        {"body": b"\x81\xa4type\xa4test"},
        Delivery(2, 1, "", "channels.q", None, b"\x81\xa4type\xa4test"),
    ),
    (
        "asgi-channel-header",
        {"body": b"payload", "properties": commands.Basic.Properties(headers={"asgi_channel": CHANNEL})},
        Delivery(2, 1, "", "channels.q", {"asgi_channel": CHANNEL}, b"payload"),
    ),
    (
        "several-string-headers",
        {
            "body": b"p" * 50,
            "tag": 77,
            "properties": commands.Basic.Properties(headers={"asgi_channel": CHANNEL, "x-other": "é✓"}),
        },
        Delivery(2, 77, "", "channels.q", {"asgi_channel": CHANNEL, "x-other": "é✓"}, b"p" * 50),
    ),
    (
        "content-type-and-mixed-headers",
        {
            "body": b"body",
            "properties": commands.Basic.Properties(
                content_type="application/msgpack", headers={"asgi_channel": CHANNEL, "count": 3}
            ),
        },
        Delivery(2, 1, "", "channels.q", {"asgi_channel": CHANNEL, "count": 3}, b"body"),
    ),
    (
        "headers-only-with-non-string-value",
        {"body": b"xyz", "properties": commands.Basic.Properties(headers={"n": 1, "asgi_channel": CHANNEL})},
        Delivery(2, 1, "", "channels.q", {"n": 1, "asgi_channel": CHANNEL}, b"xyz"),
    ),
    (
        "other-properties-no-headers",
        {"body": b"abc", "properties": commands.Basic.Properties(delivery_mode=2, message_id="m1")},
        Delivery(2, 1, "", "channels.q", None, b"abc"),
    ),
    (
        "empty-body",
        {"body": b"", "properties": commands.Basic.Properties(headers={"asgi_channel": CHANNEL})},
        Delivery(2, 1, "", "channels.q", {"asgi_channel": CHANNEL}, b""),
    ),
    (
        "empty-body-no-properties",
        {"body": b""},
        Delivery(2, 1, "", "channels.q", None, b""),
    ),
    (
        "group-redelivered-big-tag",
        {
            "body": b"g",
            "exchange": "groups",
            "routing_key": "room",
            "redelivered": True,
            "tag": 2**40,
            "channel": 9,
        },
        Delivery(9, 2**40, "groups", "room", None, b"g", redelivered=True),
    ),
]
KIND_IDS = [kind[0] for kind in MESSAGE_KINDS]


# Handshake ---------------------------------------------------------------------------------------


def test_new_protocol_first_sends_the_protocol_header():
    protocol = new_protocol()
    assert protocol.has_outgoing
    assert protocol.take_outgoing() == frames.PROTOCOL_HEADER
    assert not protocol.has_outgoing
    assert protocol.take_outgoing() == b""
    assert protocol.state is State.AWAIT_START


def test_start_is_answered_with_start_ok_plain_credentials_and_client_properties():
    protocol = new_protocol(client_properties={"product": "channels_rabbitmq", "version": "1"})
    protocol.take_outgoing()
    events = protocol.receive_data(server(commands.Connection.Start(mechanisms="AMQPLAIN PLAIN")))
    assert events == []
    ((channel, start_ok),) = sent_methods(protocol)
    assert channel == 0
    assert isinstance(start_ok, commands.Connection.StartOk)
    assert start_ok.mechanism == "PLAIN"
    assert start_ok.response == "\0user\0s3cret"
    assert start_ok.client_properties == {"product": "channels_rabbitmq", "version": "1"}
    assert protocol.state is State.AWAIT_TUNE


def test_start_without_plain_mechanism_raises_protocol_error():
    protocol = new_protocol()
    with pytest.raises(ProtocolError, match="PLAIN"):
        protocol.receive_data(server(commands.Connection.Start(mechanisms="AMQPLAIN EXTERNAL")))


def test_tune_is_answered_with_tune_ok_then_open_of_the_vhost():
    protocol = new_protocol(vhost="/")
    protocol.receive_data(server(commands.Connection.Start()))
    protocol.take_outgoing()
    events = protocol.receive_data(server(commands.Connection.Tune(2047, 131072, 60)))
    assert events == []
    (_, tune_ok), (_, open_) = sent_methods(protocol)
    assert isinstance(tune_ok, commands.Connection.TuneOk)
    assert (tune_ok.channel_max, tune_ok.frame_max, tune_ok.heartbeat) == (2047, 131072, 60)
    assert isinstance(open_, commands.Connection.Open)
    assert open_.virtual_host == "/"
    assert protocol.state is State.AWAIT_OPEN_OK


@pytest.mark.parametrize(
    ("ours", "theirs", "expected"),
    [
        ((60, 131072, 64), (60, 131072, 2047), (60, 131072, 64)),
        ((60, 131072, 64), (30, 4096, 10), (30, 4096, 10)),
        ((60, 131072, 64), (600, 1048576, 65535), (60, 131072, 64)),
        ((60, 131072, 64), (0, 0, 0), (60, 131072, 64)),  # 0 from the broker: no limit
        ((0, 131072, 64), (60, 131072, 2047), (0, 131072, 64)),  # our 0 heartbeat: disabled
        ((0, 131072, 64), (0, 131072, 2047), (0, 131072, 64)),
        ((10, 0, 0), (60, 4096, 100), (10, 4096, 100)),  # our 0 frame/channel max: theirs
    ],
)
def test_tune_negotiates_the_lower_limit_where_zero_means_no_limit(ours, theirs, expected):
    heartbeat, frame_max, channel_max = ours
    protocol = new_protocol(heartbeat=heartbeat, frame_max=frame_max, channel_max=channel_max)
    protocol.receive_data(server(commands.Connection.Start()))
    protocol.take_outgoing()
    protocol.receive_data(server(commands.Connection.Tune(theirs[2], theirs[1], theirs[0])))
    (_, tune_ok), _ = sent_methods(protocol)
    assert (tune_ok.heartbeat, tune_ok.frame_max, tune_ok.channel_max) == expected
    events = protocol.receive_data(server(commands.Connection.OpenOk()))
    assert events == [ConnectionOpened(expected[1], expected[2], expected[0], {})]
    assert (protocol.heartbeat, protocol.frame_max, protocol.channel_max) == expected


def test_full_handshake_byte_by_byte_ends_with_connection_opened():
    protocol = new_protocol(vhost="asgi")
    assert protocol.take_outgoing() == frames.PROTOCOL_HEADER
    events = []
    for method in (
        commands.Connection.Start(server_properties={"product": "RabbitMQ"}),
        commands.Connection.Tune(2047, 131072, 60),
        commands.Connection.OpenOk(),
    ):
        events += feed_in_pieces(protocol, server(method), 1)
    assert len(events) == 1
    assert isinstance(events[0], ConnectionOpened)
    assert (events[0].frame_max, events[0].channel_max, events[0].heartbeat) == (131072, 2047, 60)
    assert protocol.state is State.OPEN
    kinds = [type(value) for _, value in sent_methods(protocol)]
    assert kinds == [commands.Connection.StartOk, commands.Connection.TuneOk, commands.Connection.Open]


def test_whole_handshake_in_one_buffer_ends_with_connection_opened():
    protocol = new_protocol()
    events = protocol.receive_data(
        server(commands.Connection.Start())
        + server(commands.Connection.Tune(0, 0, 0))
        + server(commands.Connection.OpenOk())
    )
    assert [type(event) for event in events] == [ConnectionOpened]
    assert protocol.state is State.OPEN


def test_connection_opened_carries_the_server_properties_of_connection_start():
    protocol = new_protocol()
    protocol.receive_data(server(commands.Connection.Start(server_properties={"product": "RabbitMQ"})))
    protocol.receive_data(server(commands.Connection.Tune(0, 0, 0)))
    (event,) = protocol.receive_data(server(commands.Connection.OpenOk()))
    assert event.server_properties.get("product") == "RabbitMQ"


def test_tune_before_start_raises_protocol_error():
    with pytest.raises(ProtocolError, match="tune"):
        new_protocol().receive_data(server(commands.Connection.Tune(0, 0, 0)))


def test_second_start_raises_protocol_error():
    protocol = new_protocol()
    protocol.receive_data(server(commands.Connection.Start()))
    with pytest.raises(ProtocolError, match="start"):
        protocol.receive_data(server(commands.Connection.Start()))


def test_sasl_challenge_raises_protocol_error():
    protocol = new_protocol()
    protocol.receive_data(server(commands.Connection.Start()))
    with pytest.raises(ProtocolError, match="SASL"):
        protocol.receive_data(server(commands.Connection.Secure(challenge="x")))


def test_close_during_handshake_reports_refused_login_and_answers_close_ok():
    protocol = new_protocol()
    protocol.receive_data(server(commands.Connection.Start()))
    protocol.take_outgoing()
    events = protocol.receive_data(
        server(commands.Connection.Close(403, "ACCESS_REFUSED - Login was refused", 0, 0))
    )
    assert events == [ConnectionClosed(403, "ACCESS_REFUSED - Login was refused")]
    assert protocol.state is State.CLOSED
    ((_, close_ok),) = sent_methods(protocol)
    assert isinstance(close_ok, commands.Connection.CloseOk)


def test_credentials_repr_hides_the_password():
    assert "s3cret" not in repr(Credentials("user", "s3cret"))


# Closing -----------------------------------------------------------------------------------------


def test_connection_close_from_server_gives_connection_closed_and_queues_close_ok():
    protocol = open_protocol()
    events = protocol.receive_data(
        server(commands.Connection.Close(320, "CONNECTION_FORCED - shutdown", 0, 0))
    )
    assert events == [ConnectionClosed(320, "CONNECTION_FORCED - shutdown", by_us=False)]
    ((channel, close_ok),) = sent_methods(protocol)
    assert channel == 0
    assert isinstance(close_ok, commands.Connection.CloseOk)
    assert protocol.state is State.CLOSED


def test_client_close_sends_close_once_and_close_ok_gives_connection_closed_by_us():
    protocol = open_protocol()
    protocol.close(200, "bye")
    protocol.close(200, "again")
    ((_, close),) = sent_methods(protocol)
    assert isinstance(close, commands.Connection.Close)
    assert (close.reply_code, close.reply_text) == (200, "bye")
    assert protocol.state is State.CLOSING
    events = protocol.receive_data(server(commands.Connection.CloseOk()))
    assert events == [ConnectionClosed(200, "closed by client", by_us=True)]
    assert protocol.state is State.CLOSED


def test_server_close_while_we_are_closing_is_answered_with_close_ok():
    protocol = open_protocol()
    protocol.close()
    protocol.take_outgoing()
    events = protocol.receive_data(server(commands.Connection.Close(320, "forced", 0, 0)))
    assert events == [ConnectionClosed(320, "forced")]
    assert [type(value) for _, value in sent_methods(protocol)] == [commands.Connection.CloseOk]


def test_close_before_open_sends_nothing():
    protocol = new_protocol()
    protocol.take_outgoing()
    protocol.close()
    assert protocol.state is State.CLOSED
    assert protocol.take_outgoing() == b""


def test_channel_close_from_server_gives_channel_closed_and_queues_close_ok_on_that_channel():
    protocol = open_protocol()
    events = protocol.receive_data(
        server(commands.Channel.Close(404, "NOT_FOUND - no exchange 'x'", 40, 10), channel=3)
    )
    assert events == [ChannelClosed(3, 404, "NOT_FOUND - no exchange 'x'", 40, 10)]
    ((channel, close_ok),) = sent_methods(protocol)
    assert channel == 3
    assert isinstance(close_ok, commands.Channel.CloseOk)


def test_blocked_and_unblocked_give_events():
    protocol = open_protocol()
    events = protocol.receive_data(
        server(commands.Connection.Blocked("low on memory")) + server(commands.Connection.Unblocked())
    )
    assert events == [ConnectionBlocked("low on memory"), ConnectionUnblocked()]


def test_other_methods_give_method_received():
    protocol = open_protocol()
    events = protocol.receive_data(
        server(commands.Channel.OpenOk(), 1)
        + server(commands.Queue.DeclareOk("channels.q", 0, 0), 3)
        + server(commands.Basic.ConsumeOk("ctag"), 2)
        + server(commands.Connection.UpdateSecretOk(), 0)
    )
    assert [(type(event), event.channel_id) for event in events] == [
        (MethodReceived, 1),
        (MethodReceived, 3),
        (MethodReceived, 2),
        (MethodReceived, 0),
    ]
    assert isinstance(events[1].method, commands.Queue.DeclareOk)
    assert events[1].method.queue == "channels.q"


def test_heartbeats_from_server_give_no_events():
    protocol = open_protocol()
    heartbeat = pamqp_frame.marshal(pamqp_heartbeat.Heartbeat(), 0)
    assert protocol.receive_data(heartbeat * 3) == []
    assert protocol.take_outgoing() == b""


def test_heartbeat_frame_queues_a_heartbeat():
    protocol = open_protocol()
    protocol.heartbeat_frame()
    ((channel, value),) = sent_methods(protocol)
    assert channel == 0
    assert isinstance(value, pamqp_heartbeat.Heartbeat)


def test_a_method_that_cannot_be_encoded_raises_and_queues_nothing():
    protocol = open_protocol()
    with pytest.raises(RequestNotEncodable) as raised:
        protocol.send_method(3, commands.Queue.Bind(queue="q", exchange="groups", routing_key="\uff10" * 86))
    assert raised.value.request == "Queue.Bind"
    assert protocol.take_outgoing() == b""


def test_a_publish_with_a_routing_key_over_255_bytes_raises_and_takes_no_tag():
    protocol = open_protocol()
    protocol.send_method(1, commands.Confirm.Select())
    protocol.take_outgoing()
    with pytest.raises(RequestNotEncodable):
        protocol.publish(1, b"groups", "\uff10".encode() * 86, NO_PROPERTIES, b"x")
    assert protocol.take_outgoing() == b""
    assert protocol.publish(1, b"groups", b"room", NO_PROPERTIES, b"x") == 1


# Publishing ----------------------------------------------------------------------------------------


def test_publish_returns_zero_on_a_channel_not_in_confirm_mode():
    protocol = open_protocol()
    assert protocol.publish(1, b"", b"q", NO_PROPERTIES, b"x") == 0
    assert protocol.publish(1, b"", b"q", NO_PROPERTIES, b"x") == 0


def test_publish_returns_increasing_tags_after_confirm_select_per_channel():
    protocol = open_protocol()
    protocol.send_method(1, commands.Confirm.Select())
    assert [protocol.publish(1, b"", b"q", NO_PROPERTIES, b"x") for _ in range(3)] == [1, 2, 3]
    assert protocol.publish(2, b"", b"q", NO_PROPERTIES, b"x") == 0
    protocol.send_method(2, commands.Confirm.Select())
    assert protocol.publish(2, b"", b"q", NO_PROPERTIES, b"x") == 1
    assert protocol.publish(1, b"", b"q", NO_PROPERTIES, b"x") == 4


def test_reopening_a_channel_leaves_confirm_mode_until_the_next_select():
    protocol = open_protocol()
    protocol.send_method(1, commands.Confirm.Select())
    protocol.publish(1, b"", b"q", NO_PROPERTIES, b"x")
    protocol.send_method(1, commands.Channel.Open())
    assert protocol.publish(1, b"", b"q", NO_PROPERTIES, b"x") == 0
    protocol.send_method(1, commands.Confirm.Select())
    assert protocol.publish(1, b"", b"q", NO_PROPERTIES, b"x") == 1


def test_channel_closed_by_server_leaves_confirm_mode():
    protocol = open_protocol()
    protocol.send_method(1, commands.Confirm.Select())
    protocol.publish(1, b"", b"q", NO_PROPERTIES, b"x")
    protocol.receive_data(server(commands.Channel.Close(406, "PRECONDITION_FAILED", 60, 40), 1))
    assert protocol.publish(1, b"", b"q", NO_PROPERTIES, b"x") == 0


def test_publish_queues_frames_that_pamqp_decodes():
    protocol = open_protocol()
    protocol.publish(1, b"groups", b"room", channel_properties(CHANNEL), b"body")
    (ch1, publish), (ch2, header), (ch3, body) = sent_methods(protocol)
    assert (ch1, ch2, ch3) == (1, 1, 1)
    assert (publish.exchange, publish.routing_key) == ("groups", "room")
    assert header.properties.headers == {"asgi_channel": CHANNEL}
    assert body.value == b"body"


def test_publish_splits_bodies_by_the_negotiated_frame_max():
    protocol = open_protocol(frame_max=4096)
    payload = bytes(range(256)) * 40  # 10240 bytes
    protocol.publish(1, b"", b"q", NO_PROPERTIES, payload)
    decoded = sent_methods(protocol)
    bodies = [value.value for _, value in decoded[2:]]
    assert len(bodies) == 3
    assert all(len(piece) <= 4096 - frames.FRAME_OVERHEAD for piece in bodies)
    assert b"".join(bodies) == payload


def test_ack_queues_a_basic_ack():
    protocol = open_protocol()
    protocol.ack(2, 17)
    protocol.ack(2, 18, multiple=False)
    (_, first), (_, second) = sent_methods(protocol)
    assert (first.delivery_tag, first.multiple) == (17, True)
    assert (second.delivery_tag, second.multiple) == (18, False)


# Confirms ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("multiple", [False, True])
def test_basic_ack_and_nack_give_publish_confirmed(multiple):
    protocol = open_protocol()
    events = protocol.receive_data(
        server(commands.Basic.Ack(5, multiple), 1) + server(commands.Basic.Nack(6, multiple, False), 1)
    )
    assert events == [
        PublishConfirmed(1, 5, multiple, accepted=True),
        PublishConfirmed(1, 6, multiple, accepted=False),
    ]


def test_confirms_split_byte_by_byte_give_the_same_events():
    protocol = open_protocol()
    data = server(commands.Basic.Ack(5, True), 1) + server(commands.Basic.Nack(6, False, True), 1)
    assert feed_in_pieces(protocol, data, 1) == [
        PublishConfirmed(1, 5, True, True),
        PublishConfirmed(1, 6, False, False),
    ]


# Deliveries ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kwargs", "expected"), MESSAGE_KINDS, ids=KIND_IDS)
def test_delivery_in_one_buffer_gives_one_delivery_event(name, kwargs, expected):
    protocol = open_protocol()
    assert protocol.receive_data(delivery_frames(**kwargs)) == [expected]
    assert protocol.take_outgoing() == b""


@pytest.mark.parametrize(("name", "kwargs", "expected"), MESSAGE_KINDS, ids=KIND_IDS)
def test_delivery_byte_by_byte_gives_the_same_event(name, kwargs, expected):
    protocol = open_protocol()
    assert feed_in_pieces(protocol, delivery_frames(**kwargs), 1) == [expected]


@pytest.mark.parametrize(("name", "kwargs", "expected"), MESSAGE_KINDS, ids=KIND_IDS)
def test_delivery_split_at_every_offset_gives_the_same_event(name, kwargs, expected):
    data = delivery_frames(**kwargs)
    for cut in range(len(data) + 1):
        protocol = open_protocol()
        events = protocol.receive_data(data[:cut]) + protocol.receive_data(data[cut:])
        assert events == [expected], f"split at {cut}"


@pytest.mark.parametrize(("name", "kwargs", "expected"), MESSAGE_KINDS, ids=KIND_IDS)
def test_delivery_split_in_three_at_frame_boundaries_gives_the_same_event(name, kwargs, expected):
    data = delivery_frames(**kwargs)
    boundaries = []
    offset = 0
    while offset < len(data):
        (size,) = struct.unpack_from(">I", data, offset + 3)
        offset += 8 + size
        boundaries.append(offset)
    protocol = open_protocol()
    events = []
    start = 0
    for boundary in boundaries:
        events += protocol.receive_data(data[start:boundary])
        start = boundary
    assert events == [expected]


FAST_PATH_KINDS = {
    "no-properties",
    "asgi-channel-header",
    "several-string-headers",
    "empty-body",
    "empty-body-no-properties",
    "group-redelivered-big-tag",
}


@pytest.mark.parametrize(("name", "kwargs", "expected"), MESSAGE_KINDS, ids=KIND_IDS)
def test_whole_deliveries_with_plain_properties_take_the_fast_path_and_others_do_not(
    name, kwargs, expected, monkeypatch
):
    # the equivalence tests above only compare two code paths if the fast one is really taken
    results = []

    def spy(*args):
        results.append(frames.decode_whole_delivery(*args))
        return results[-1]

    monkeypatch.setattr(protocol_module, "decode_whole_delivery", spy)
    assert open_protocol().receive_data(delivery_frames(**kwargs)) == [expected]
    assert len(results) == 1
    assert (results[0] is not None) is (name in FAST_PATH_KINDS)


def test_delivery_with_long_exchange_routing_key_and_consumer_tag():
    exchange, routing_key, consumer_tag = "e" * 127, "r" * 255, "c" * 255
    data = delivery_frames(b"x", exchange=exchange, routing_key=routing_key, consumer_tag=consumer_tag)
    expected = [Delivery(2, 1, exchange, routing_key, None, b"x")]
    assert open_protocol().receive_data(data) == expected
    assert feed_in_pieces(open_protocol(), data, 1) == expected


def test_delivery_event_bodies_are_bytes_on_both_paths():
    data = delivery_frames(b"abc", properties=commands.Basic.Properties(headers={"asgi_channel": CHANNEL}))
    fast = open_protocol().receive_data(data)
    slow = feed_in_pieces(open_protocol(), data, 1)
    assert type(fast[0].body) is bytes
    assert type(slow[0].body) is bytes


def test_several_deliveries_in_one_buffer_give_events_in_order():
    data = b"".join(delivery_frames(**kwargs) for _, kwargs, _ in MESSAGE_KINDS)
    expected = [delivery for _, _, delivery in MESSAGE_KINDS]
    assert open_protocol().receive_data(data) == expected
    for size in (1, 3, 7, 13, 64, 1000):
        assert feed_in_pieces(open_protocol(), data, size) == expected, f"pieces of {size}"


def test_deliveries_mixed_with_confirms_heartbeats_and_replies_keep_their_order():
    heartbeat = pamqp_frame.marshal(pamqp_heartbeat.Heartbeat(), 0)
    data = (
        delivery_frames(b"one", tag=1)
        + server(commands.Basic.Ack(3, True), 1)
        + heartbeat
        + delivery_frames(
            b"two", tag=2, properties=commands.Basic.Properties(headers={"asgi_channel": CHANNEL})
        )
        + server(commands.Queue.BindOk(), 3)
        + delivery_frames(b"three", tag=3, properties=commands.Basic.Properties(content_type="x"))
    )
    expected_kinds = [Delivery, PublishConfirmed, Delivery, MethodReceived, Delivery]
    for size in (len(data), 1, 5, 50):
        events = feed_in_pieces(open_protocol(), data, size)
        assert [type(event) for event in events] == expected_kinds
        assert [event.body for event in events if isinstance(event, Delivery)] == [b"one", b"two", b"three"]
        assert [event.delivery_tag for event in events if isinstance(event, Delivery)] == [1, 2, 3]


def test_deliveries_interleaved_on_two_channels_are_assembled_per_channel():
    first = delivery_frames(b"first", channel=2, tag=1)
    second = delivery_frames(b"second", channel=4, tag=9)
    first_frames = unmarshal_frames(first)
    second_frames = unmarshal_frames(second)
    interleaved = b"".join(a + b for a, b in zip(first_frames, second_frames, strict=True))
    events = open_protocol().receive_data(interleaved)
    assert events == [
        Delivery(2, 1, "", "channels.q", None, b"first"),
        Delivery(4, 9, "", "channels.q", None, b"second"),
    ]


def unmarshal_frames(data: bytes) -> list[bytes]:
    """Split ``data`` into the raw bytes of each frame."""
    result = []
    offset = 0
    while offset < len(data):
        (size,) = struct.unpack_from(">I", data, offset + 3)
        result.append(data[offset : offset + 8 + size])
        offset += 8 + size
    return result


@pytest.mark.parametrize("piece_size", [None, 4096, 65536, 100_000, 131_080])
def test_300_kb_body_across_several_frames_is_reassembled(piece_size):
    payload = bytes(i % 253 for i in range(300 * 1024))
    properties = commands.Basic.Properties(headers={"asgi_channel": CHANNEL})
    data = delivery_frames(payload, properties=properties, tag=4, frame_max=131072)
    assert len(unmarshal_frames(data)) == 2 + 3  # method, header, three body frames
    protocol = open_protocol(frame_max=131072)
    events = protocol.receive_data(data) if piece_size is None else feed_in_pieces(protocol, data, piece_size)
    assert events == [Delivery(2, 4, "", "channels.q", {"asgi_channel": CHANNEL}, payload)]


def test_multi_frame_body_followed_by_a_small_delivery_gives_both():
    payload = b"z" * 10_000
    data = delivery_frames(payload, tag=1, frame_max=4096) + delivery_frames(b"small", tag=2)
    events = open_protocol(frame_max=4096).receive_data(data)
    assert [(event.delivery_tag, event.body) for event in events] == [(1, payload), (2, b"small")]


def test_delivery_header_on_another_channel_than_the_method_is_not_taken_by_the_fast_path():
    # method on channel 2, then a complete delivery on channel 4, then channel 2's header and body
    frames_2 = unmarshal_frames(delivery_frames(b"two", channel=2, tag=1))
    data = frames_2[0] + delivery_frames(b"four", channel=4, tag=2) + frames_2[1] + frames_2[2]
    events = open_protocol().receive_data(data)
    assert events == [
        Delivery(4, 2, "", "channels.q", None, b"four"),
        Delivery(2, 1, "", "channels.q", None, b"two"),
    ]


def test_content_header_of_another_channel_right_after_a_deliver_is_not_attributed_to_it():
    # RabbitMQ may interleave channels: deliver(4), deliver(2), header(4), header(2), body(2)
    frames_2 = unmarshal_frames(delivery_frames(b"two", channel=2, tag=1, routing_key="q2"))
    frames_4 = unmarshal_frames(
        delivery_frames(
            b"", channel=4, tag=2, routing_key="q4", properties=commands.Basic.Properties(headers={"h": "4"})
        )
    )
    data = frames_4[0] + frames_2[0] + frames_4[1] + frames_2[1] + frames_2[2]
    expected = [
        Delivery(4, 2, "", "q4", {"h": "4"}, b""),
        Delivery(2, 1, "", "q2", None, b"two"),
    ]
    assert open_protocol().receive_data(data) == expected
    assert feed_in_pieces(open_protocol(), data, 1) == expected


def test_body_frame_of_another_channel_after_a_header_is_not_attributed_to_it():
    # deliver(4), header(4), deliver(2), header(2), body(4), body(2), bodies of the same size
    frames_2 = unmarshal_frames(delivery_frames(b"two", channel=2, tag=1))
    frames_4 = unmarshal_frames(delivery_frames(b"for", channel=4, tag=2))
    data = frames_4[0] + frames_4[1] + frames_2[0] + frames_2[1] + frames_4[2] + frames_2[2]
    expected = [
        Delivery(4, 2, "", "channels.q", None, b"for"),
        Delivery(2, 1, "", "channels.q", None, b"two"),
    ]
    assert open_protocol().receive_data(data) == expected
    assert feed_in_pieces(open_protocol(), data, 1) == expected


# Undecodable and broken input ---------------------------------------------------------------------


def raw_content_header(channel: int, body_size: int, properties: bytes) -> bytes:
    return (
        struct.pack(
            ">BHIHHQ", frames.FRAME_HEADER, channel, 12 + len(properties), frames.BASIC_CLASS, 0, body_size
        )
        + properties
        + frames.FRAME_END_BYTE
    )


def deliver_frame(channel: int = 2, tag: int = 1) -> bytes:
    return server(commands.Basic.Deliver("ctag", tag, False, "", "channels.q"), channel)


UNKNOWN_FIELD_TYPE = struct.pack(">HI", frames.HEADERS_FLAG, 3) + b"\x01aZ"
OVERRUNNING_TABLE = struct.pack(">HI", frames.HEADERS_FLAG, 100) + b"\x01aS"
OVERRUNNING_ENTRY = struct.pack(">HI", frames.HEADERS_FLAG, 7) + b"\x01aS" + struct.pack(">I", 9)


@pytest.mark.parametrize(
    "properties",
    [UNKNOWN_FIELD_TYPE, OVERRUNNING_TABLE, OVERRUNNING_ENTRY],
    ids=["unknown", "table", "entry"],
)
@pytest.mark.parametrize("piece_size", [None, 1, 9])
def test_unreadable_properties_give_undecodable_delivery_and_the_stream_goes_on(properties, piece_size):
    data = (
        deliver_frame(tag=7)
        + raw_content_header(2, 3, properties)
        + server(pamqp_body.ContentBody(b"abc"), 2)
        + delivery_frames(b"next", tag=8)
    )
    protocol = open_protocol()
    events = protocol.receive_data(data) if piece_size is None else feed_in_pieces(protocol, data, piece_size)
    assert len(events) == 2
    assert isinstance(events[0], UndecodableDelivery)
    assert (events[0].channel_id, events[0].delivery_tag) == (2, 7)
    assert "properties" in events[0].reason
    assert events[1] == Delivery(2, 8, "", "channels.q", None, b"next")


def test_unreadable_properties_with_empty_body_give_undecodable_delivery():
    events = open_protocol().receive_data(deliver_frame(tag=3) + raw_content_header(2, 0, UNKNOWN_FIELD_TYPE))
    assert len(events) == 1
    assert isinstance(events[0], UndecodableDelivery)
    assert events[0].delivery_tag == 3


def test_content_header_without_property_flags_is_read_as_no_properties():
    data = deliver_frame() + raw_content_header(2, 3, b"") + server(pamqp_body.ContentBody(b"abc"), 2)
    assert open_protocol().receive_data(data) == [Delivery(2, 1, "", "channels.q", None, b"abc")]


def test_frame_without_frame_end_raises_protocol_error():
    protocol = open_protocol()
    with pytest.raises(ProtocolError, match="0xCE"):
        protocol.receive_data(struct.pack(">BHI", 8, 0, 0) + b"\x00")


def test_complete_frame_of_unknown_type_raises_protocol_error():
    with pytest.raises(ProtocolError, match="type 9"):
        open_protocol().receive_data(struct.pack(">BHI", 9, 1, 2) + b"ab" + frames.FRAME_END_BYTE)


def test_incomplete_frame_of_unknown_type_raises_protocol_error_without_waiting_for_it():
    with pytest.raises(ProtocolError):
        open_protocol().receive_data(struct.pack(">BHI", 42, 0, 10) + b"abc")


def test_incomplete_frame_of_absurd_size_raises_protocol_error():
    with pytest.raises(ProtocolError):
        open_protocol().receive_data(struct.pack(">BHI", 3, 1, 2**31) + b"abc")


def test_protocol_header_from_a_broker_refusing_our_version_raises_protocol_error():
    with pytest.raises(ProtocolError):
        new_protocol().receive_data(b"AMQP\x00\x00\x09\x01")


def test_unknown_method_raises_protocol_error():
    with pytest.raises(ProtocolError, match=r"99\.99"):
        open_protocol().receive_data(struct.pack(">BHIHH", 1, 1, 4, 99, 99) + frames.FRAME_END_BYTE)


def test_malformed_method_arguments_raise_protocol_error():
    payload = struct.pack(">HHH", 20, 40, 200)  # channel.close cut after its reply code
    with pytest.raises(ProtocolError, match="Close"):
        open_protocol().receive_data(
            struct.pack(">BHI", 1, 1, len(payload)) + payload + frames.FRAME_END_BYTE
        )


def test_content_header_without_a_delivery_raises_protocol_error():
    with pytest.raises(ProtocolError, match="content header"):
        open_protocol().receive_data(raw_content_header(2, 3, NO_PROPERTIES))


def test_body_without_a_header_raises_protocol_error():
    with pytest.raises(ProtocolError, match="body"):
        open_protocol().receive_data(server(pamqp_body.ContentBody(b"abc"), 2))


def test_second_content_header_for_one_delivery_raises_protocol_error():
    data = deliver_frame() + raw_content_header(2, 3, NO_PROPERTIES) + raw_content_header(2, 3, NO_PROPERTIES)
    with pytest.raises(ProtocolError):
        open_protocol().receive_data(data)


def test_content_header_of_another_class_raises_protocol_error():
    header = struct.pack(">BHIHHQH", frames.FRAME_HEADER, 2, 14, 50, 0, 3, 0) + frames.FRAME_END_BYTE
    with pytest.raises(ProtocolError, match="class 50"):
        open_protocol().receive_data(deliver_frame() + header)


def test_bytes_after_a_protocol_error_keep_raising():
    protocol = open_protocol()
    bad = struct.pack(">BHI", 8, 0, 0) + b"\x00"
    with pytest.raises(ProtocolError):
        protocol.receive_data(bad)
    with pytest.raises(ProtocolError):
        protocol.receive_data(server(commands.Basic.Ack(1, False), 1))


TRUNCATED_METHODS = {
    "method-shorter-than-its-ids": struct.pack(">BHI", 1, 1, 2) + b"\x00\x3c" + frames.FRAME_END_BYTE,
    "empty-method": struct.pack(">BHI", 1, 1, 0) + frames.FRAME_END_BYTE,
    "ack-without-arguments": struct.pack(">BHIHH", 1, 1, 4, 60, 80) + frames.FRAME_END_BYTE,
    "deliver-without-arguments": struct.pack(">BHIHH", 1, 1, 4, 60, 60) + frames.FRAME_END_BYTE,
}


@pytest.mark.parametrize("data", TRUNCATED_METHODS.values(), ids=TRUNCATED_METHODS.keys())
def test_truncated_method_frame_raises_protocol_error(data):
    with pytest.raises(ProtocolError):
        open_protocol().receive_data(data)


@pytest.mark.parametrize("how", ["whole", "bytes"])
def test_deliver_whose_routing_key_overruns_its_frame_raises_protocol_error_saying_so(how):
    # a frames.FrameError, reported as itself, as soon as the method frame is whole
    method = raw_deliver_frame(b"ex", b"room")
    method = method[:-6] + b"\x09" + method[-5:]  # the routing key's size claims 9 bytes of 4
    data = method + raw_content_header(2, 0, NO_PROPERTIES)
    with pytest.raises(ProtocolError, match=r"^basic\.deliver arguments overrun their frame$"):
        feed(open_protocol(), data, how)


# Hostile deliveries: bodies over max_body_size, non-UTF-8 names, a tiny frame_max ---------------


def raw_deliver_frame(exchange: bytes, routing_key: bytes, *, channel: int = 2, tag: int = 1) -> bytes:
    """A basic.deliver frame with any bytes as exchange name and routing key (pamqp writes only str)."""
    arguments = (
        struct.pack(">HH", frames.BASIC_CLASS, frames.BASIC_DELIVER)
        + b"\x04ctag"
        + struct.pack(">QB", tag, 0)
        + bytes((len(exchange),))
        + exchange
        + bytes((len(routing_key),))
        + routing_key
    )
    head = struct.pack(">BHI", frames.FRAME_METHOD, channel, len(arguments))
    return head + arguments + frames.FRAME_END_BYTE


def split_at_frames(data: bytes) -> list[bytes]:
    return unmarshal_frames(data)


def feed(protocol: AmqpProtocol, data: bytes, how: str) -> list:
    """Feed ``data`` whole, byte by byte, in odd pieces, or frame by frame."""
    if how == "whole":
        return protocol.receive_data(data)
    if how == "frames":
        return [event for frame in split_at_frames(data) for event in protocol.receive_data(frame)]
    return feed_in_pieces(protocol, data, {"bytes": 1, "pieces": 7}[how])


FEEDINGS = ["whole", "frames", "bytes", "pieces"]


@pytest.mark.parametrize("how", FEEDINGS)
def test_body_over_max_body_size_in_one_frame_is_skipped_as_too_large(how):
    data = delivery_frames(b"x" * 101, tag=5) + delivery_frames(b"y" * 100, tag=6)
    events = feed(open_protocol(max_body_size=100), data, how)
    assert len(events) == 2
    assert isinstance(events[0], UndecodableDelivery)
    assert (events[0].channel_id, events[0].delivery_tag, events[0].too_large) == (2, 5, True)
    assert "too large" in events[0].reason
    assert events[1] == Delivery(2, 6, "", "channels.q", None, b"y" * 100)


@pytest.mark.parametrize("how", ["whole", "frames", "pieces"])
def test_body_over_max_body_size_across_many_frames_is_counted_not_kept(how):
    payload = b"z" * 300_000
    data = delivery_frames(payload, tag=1, frame_max=4096) + delivery_frames(b"small", tag=2)
    protocol = open_protocol(frame_max=4096, max_body_size=1000)
    all_frames = split_at_frames(data)
    assert len(all_frames) > 70
    # Half-way through the big body, nothing of it is held.
    half = len(all_frames) // 2
    events = feed(protocol, b"".join(all_frames[:half]), how)
    assert events == []
    assert protocol._incoming[2].parts == []
    events += feed(protocol, b"".join(all_frames[half:]), how)
    assert [type(event) for event in events] == [UndecodableDelivery, Delivery]
    assert (events[0].delivery_tag, events[0].too_large) == (1, True)
    assert events[1].body == b"small"


@pytest.mark.parametrize("how", FEEDINGS)
def test_body_of_exactly_max_body_size_is_delivered(how):
    events = feed(open_protocol(max_body_size=100), delivery_frames(b"x" * 100, tag=3), how)
    assert events == [Delivery(2, 3, "", "channels.q", None, b"x" * 100)]


def test_too_large_body_with_unreadable_properties_is_too_large_without_reading_them():
    data = deliver_frame(tag=4) + raw_content_header(2, 50, UNKNOWN_FIELD_TYPE)
    data += server(pamqp_body.ContentBody(b"a" * 50), 2)
    events = open_protocol(max_body_size=10).receive_data(data)
    assert len(events) == 1
    assert isinstance(events[0], UndecodableDelivery)
    assert (events[0].delivery_tag, events[0].too_large) == (4, True)


def test_without_max_body_size_any_body_is_delivered():
    payload = b"q" * 200_000
    events = open_protocol().receive_data(delivery_frames(payload, frame_max=131072))
    assert [event.body for event in events] == [payload]


NOT_UTF8 = b"\xff\xfe\x80"


@pytest.mark.parametrize("how", FEEDINGS)
@pytest.mark.parametrize(
    ("exchange", "routing_key"),
    [(NOT_UTF8, b"room"), (b"groups", NOT_UTF8), (b"", b"channels.q\xc3")],
    ids=["exchange", "routing-key", "truncated-sequence"],
)
def test_non_utf8_exchange_or_routing_key_gives_undecodable_delivery_and_the_stream_goes_on(
    how, exchange, routing_key
):
    data = (
        raw_deliver_frame(exchange, routing_key, tag=11)
        + raw_content_header(2, 3, b"\x00\x00")
        + server(pamqp_body.ContentBody(b"abc"), 2)
        + delivery_frames(b"next", tag=12)
    )
    events = feed(open_protocol(), data, how)
    assert len(events) == 2
    assert isinstance(events[0], UndecodableDelivery)
    assert (events[0].channel_id, events[0].delivery_tag, events[0].too_large) == (2, 11, False)
    assert "UTF-8" in events[0].reason
    assert events[1] == Delivery(2, 12, "", "channels.q", None, b"next")


def test_non_utf8_routing_key_with_an_empty_body_gives_undecodable_delivery():
    data = raw_deliver_frame(b"groups", NOT_UTF8, tag=2) + raw_content_header(2, 0, b"\x00\x00")
    events = open_protocol().receive_data(data)
    assert [(type(event), event.delivery_tag) for event in events] == [(UndecodableDelivery, 2)]


@pytest.mark.parametrize("frame_max", [1, 8, 4095])
def test_tune_with_frame_max_below_the_protocol_minimum_raises_protocol_error(frame_max):
    protocol = new_protocol()
    protocol.receive_data(server(commands.Connection.Start(server_properties={})))
    with pytest.raises(ProtocolError, match="frame_max") as caught:
        protocol.receive_data(server(commands.Connection.Tune(2047, frame_max, 60)))
    assert "4096" in str(caught.value)


@pytest.mark.parametrize(("theirs", "negotiated"), [(0, 131072), (4096, 4096)])
def test_tune_with_frame_max_zero_or_the_minimum_is_accepted(theirs, negotiated):
    assert open_protocol(frame_max=theirs).frame_max == negotiated
