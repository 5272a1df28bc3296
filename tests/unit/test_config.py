"""CONFIG keys, AMQP URLs and building the layer: checked at construction, no I/O, no loop."""

from __future__ import annotations

import asyncio
import math
import re
import socket
import ssl
import traceback

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from channels_rabbitmq.config import DEFAULT_HOST, MAX_EXPIRY, BrokerAddress, LayerConfig, parse_amqp_url
from channels_rabbitmq.core import RabbitmqChannelLayer
from channels_rabbitmq.link import BrokerLink
from channels_rabbitmq.wire.codec import MessageCodec

PASSWORD = "Sup3r-S3cret-Pw"


def tls_context() -> ssl.SSLContext:
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything connects or resolves a name."""

    def refuse(*args, **kwargs):
        raise AssertionError("construction must not do network I/O")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return refuse


# Defaults ---------------------------------------------------------------------------------------


def test_layer_defaults():
    layer = RabbitmqChannelLayer()
    config = layer.config
    assert config.address == BrokerAddress("amqp", "127.0.0.1", 5672, "guest", "guest", "/")
    assert config.expiry == 60.0
    assert config.group_expiry == 86400.0
    assert config.capacity == 100
    assert config.channel_capacity == ()
    assert config.local_capacity == 100_000
    assert config.remote_capacity == 10_000
    assert config.remote_capacity_bytes == 128 * 1024 * 1024
    assert config.prefetch_count == 100
    assert config.groups_exchange == "groups"
    assert config.ssl_context is None
    assert config.connect_timeout == 10.0
    assert config.heartbeat == 60
    assert config.max_message_size == 4 * 1024 * 1024
    assert layer.expiry == 60
    assert layer.capacity == 100
    assert layer.group_expiry == 86400
    assert set(layer.extensions) >= {"groups", "flush"}


def test_build_applies_the_default_of_every_missing_key():
    config = LayerConfig.build()
    assert config == RabbitmqChannelLayer().config  # the layer adds no default of its own
    assert config.addresses == (parse_amqp_url(DEFAULT_HOST),)
    assert (config.connection_wait, config.reconnect_delay_min, config.reconnect_delay_max) == (10, 0.1, 10)
    assert config.encryption_keys == ()
    assert config.max_message_size == LayerConfig.DEFAULTS["max_message_size"] == 4 * 1024 * 1024


def test_build_applies_defaults_only_to_the_keys_not_given():
    config = LayerConfig.build(expiry=5, capacity=7)
    assert (config.expiry, config.capacity) == (5.0, 7)
    assert (config.group_expiry, config.local_capacity) == (86400.0, 100_000)


def test_the_layer_takes_its_defaults_from_the_config_object(monkeypatch):
    changed = {**LayerConfig.DEFAULTS, "expiry": 30, "capacity": 9, "groups_exchange": "elsewhere"}
    monkeypatch.setattr(LayerConfig, "DEFAULTS", changed)
    layer = RabbitmqChannelLayer()
    assert (layer.config.expiry, layer.config.capacity, layer.config.groups_exchange) == (30, 9, "elsewhere")
    assert (layer.expiry, layer.capacity) == (30, 9)  # what Channels reads too


def test_defaults_are_read_only():
    with pytest.raises(TypeError):
        LayerConfig.DEFAULTS["expiry"] = 1  # type: ignore[index]


def test_defaults_pass_their_own_checks():
    assert LayerConfig.build(**LayerConfig.DEFAULTS) == LayerConfig.build()


def test_layer_keeps_the_given_values():
    context = tls_context()
    layer = RabbitmqChannelLayer(
        "amqps://me:pw@rabbit.example:5000/prod",
        expiry=5,
        group_expiry=10.5,
        capacity=6,
        local_capacity=7,
        remote_capacity=8,
        prefetch_count=9,
        groups_exchange="my.groups:x",
        ssl_context=context,
        connect_timeout=0.5,
        heartbeat=0,
        max_message_size=1024,
    )
    config = layer.config
    assert config.address == BrokerAddress("amqps", "rabbit.example", 5000, "me", "pw", "prod")
    assert (config.expiry, config.group_expiry) == (5.0, 10.5)
    assert (config.local_capacity, config.remote_capacity, config.prefetch_count) == (7, 8, 9)
    assert config.groups_exchange == "my.groups:x"
    assert config.ssl_context is context
    assert (config.connect_timeout, config.heartbeat, config.max_message_size) == (0.5, 0, 1024)
    assert layer.capacity == 6


def test_channel_capacity_takes_globs_and_regexes_and_the_first_match_wins():
    layer = RabbitmqChannelLayer(
        capacity=10,
        channel_capacity={"http.request": 200, re.compile(r"^websocket\.send!.*"): 20, "*": 5},
    )
    assert layer.config.capacity_of("http.request") == 200
    assert layer.config.capacity_of("websocket.send!abc") == 20
    assert layer.config.capacity_of("channels.x!y") == 5
    assert layer.get_capacity("http.request") == 200  # Channels' own lookup agrees
    assert RabbitmqChannelLayer(capacity=10).config.capacity_of("anything") == 10


@pytest.mark.parametrize(
    ("value", "error", "named"),
    [
        ([("a", 1)], TypeError, "channel_capacity"),
        ({1: 5}, TypeError, "channel_capacity"),
        ({"a": 0}, ValueError, "channel_capacity"),
        ({"a": "5"}, TypeError, "channel_capacity"),
    ],
)
def test_bad_channel_capacity_is_refused_naming_the_key(value, error, named):
    with pytest.raises(error, match=named):
        RabbitmqChannelLayer(channel_capacity=value)


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_capacity_is_refused_naming_the_key(value, error):
    with pytest.raises(error, match="capacity"):
        RabbitmqChannelLayer(capacity=value)


async def test_each_link_has_its_own_queue_name():
    loop = asyncio.get_running_loop()
    config = RabbitmqChannelLayer().config
    first, second = (BrokerLink(config, loop, MessageCodec(config)) for _ in range(2))
    assert first.queue_name.startswith("channels.")
    assert len(first.queue_name) == len("channels.") + 12
    assert first.queue_name != second.queue_name


# Construction: no loop, no I/O ----------------------------------------------------------------------


def test_construction_from_sync_code_without_a_running_loop_opens_no_socket(no_network, monkeypatch):
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()
    monkeypatch.setattr(socket.socket, "__init__", no_network)  # not even a socket object
    monkeypatch.setattr(socket, "socketpair", no_network)  # nor an event loop's self-pipe
    layer = RabbitmqChannelLayer("amqp://user:pw@broker.invalid:5672/asgi")
    assert layer.config.address.host == "broker.invalid"
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()


def test_construction_with_tls_opens_no_socket(no_network):
    layer = RabbitmqChannelLayer("amqps://user:pw@broker.invalid/asgi", ssl_context=tls_context())
    assert layer.config.address.uses_tls


async def test_construction_inside_a_running_loop_does_no_io(no_network, monkeypatch):
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "create_connection", no_network)
    monkeypatch.setattr(loop, "getaddrinfo", no_network)
    tasks_before = asyncio.all_tasks()
    layer = RabbitmqChannelLayer("amqp://user:pw@broker.invalid/asgi")
    assert asyncio.all_tasks() == tasks_before  # nothing started in the background
    await asyncio.sleep(0)
    assert layer.config.address.virtual_host == "asgi"


# Unknown keys, wrong types, wrong ranges --------------------------------------------------------------


def test_unknown_key_raises_type_error_naming_it():
    with pytest.raises(TypeError, match="capacity_per_channel"):
        RabbitmqChannelLayer(capacity_per_channel=10)


def test_unknown_key_error_lists_the_known_keys_and_suggests_a_close_one():
    with pytest.raises(TypeError) as caught:
        RabbitmqChannelLayer(expiri=10)
    message = str(caught.value)
    assert message.startswith("unknown CONFIG key 'expiri' (did you mean 'expiry'?); the keys are: ")
    listed = message.split("the keys are: ")[1].split(", ")
    assert listed == sorted(LayerConfig.DEFAULTS)


def test_every_unknown_key_is_named_and_nothing_is_built():
    with pytest.raises(TypeError, match=r"^unknown CONFIG keys 'nope', 'BACKEND'; ") as caught:
        LayerConfig.build(expiry=10, nope=1, BACKEND="x")
    assert "did you mean" not in str(caught.value)


def test_unknown_key_is_refused_before_the_values_are_checked():
    with pytest.raises(TypeError, match="unknown CONFIG key 'hosts'"):
        RabbitmqChannelLayer(hosts=["amqp://a"], expiry=-1)


def test_unknown_key_error_never_shows_a_value():
    with pytest.raises(TypeError) as caught:
        RabbitmqChannelLayer(password=PASSWORD)
    assert PASSWORD not in str(caught.value)


def test_host_is_the_only_positional_argument():
    with pytest.raises(TypeError):
        RabbitmqChannelLayer(DEFAULT_HOST, 60)


WRONG_TYPES = [
    ("host", 5672),
    ("host", None),
    ("expiry", "60"),
    ("expiry", None),
    ("expiry", True),
    ("group_expiry", "1d"),
    ("group_expiry", [1]),
    ("local_capacity", 10.0),
    ("local_capacity", "10"),
    ("local_capacity", True),
    ("remote_capacity", 1.5),
    ("remote_capacity", None),
    ("remote_capacity_bytes", 1e9),
    ("prefetch_count", "10"),
    ("prefetch_count", False),
    ("ssl_context", "yes"),
    ("ssl_context", True),
    ("connect_timeout", "10"),
    ("connect_timeout", False),
    ("heartbeat", 60.0),
    ("heartbeat", None),
    ("max_message_size", 1024.0),
    ("max_message_size", "1MB"),
]


@pytest.mark.parametrize(("key", "value"), WRONG_TYPES, ids=[f"{k}={v!r}" for k, v in WRONG_TYPES])
def test_wrong_type_raises_type_error_naming_the_key(key, value):
    with pytest.raises(TypeError, match=key):
        RabbitmqChannelLayer(**{key: value})


@pytest.mark.parametrize("value", [None, 5, b"groups"])
def test_groups_exchange_of_wrong_type_raises_naming_the_key(value):
    with pytest.raises((TypeError, ValueError), match="groups_exchange"):
        RabbitmqChannelLayer(groups_exchange=value)


WRONG_RANGES = [
    ("expiry", 0),
    ("expiry", -1),
    ("expiry", 0.0009),
    ("expiry", math.inf),
    ("expiry", math.nan),
    ("group_expiry", 0),
    ("group_expiry", -86400),
    ("group_expiry", math.inf),
    ("group_expiry", math.nan),
    ("local_capacity", 0),
    ("local_capacity", -1),
    ("local_capacity", 100_000_001),
    ("remote_capacity", 0),
    ("remote_capacity", 2**31),
    ("remote_capacity_bytes", 0),
    ("remote_capacity_bytes", 2**63),
    ("remote_capacity_bytes", 4 * 1024 * 1024 - 1),  # below max_message_size: no message could fit
    ("prefetch_count", 0),
    ("prefetch_count", 65536),
    ("connect_timeout", 0),
    ("connect_timeout", -5),
    ("connect_timeout", math.inf),
    ("connect_timeout", math.nan),
    ("heartbeat", -1),
    ("heartbeat", 65536),
    ("max_message_size", 0),
    ("max_message_size", 128 * 1024 * 1024 + 1),
    ("groups_exchange", ""),
    ("groups_exchange", "has space"),
    ("groups_exchange", "slash/name"),
    ("groups_exchange", "é"),
    ("groups_exchange", "x" * 128),
    ("groups_exchange", "amq.groups"),
]


@pytest.mark.parametrize(("key", "value"), WRONG_RANGES, ids=[f"{k}={v!r}"[:40] for k, v in WRONG_RANGES])
def test_wrong_range_raises_value_error_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        RabbitmqChannelLayer(**{key: value})


RANGE_LIMITS = [
    ("expiry", 0.001),
    ("group_expiry", 0.001),
    ("local_capacity", 1),
    ("local_capacity", 10_000_000),
    ("remote_capacity", 1),
    ("remote_capacity", 2**31 - 1),
    ("remote_capacity_bytes", 4 * 1024 * 1024),
    ("remote_capacity_bytes", 2**63 - 1),
    ("prefetch_count", 1),
    ("prefetch_count", 65535),
    ("connect_timeout", 0.001),
    ("heartbeat", 0),
    ("heartbeat", 65535),
    ("max_message_size", 1),
    ("max_message_size", 128 * 1024 * 1024),
    ("groups_exchange", "a"),
    ("groups_exchange", "x" * 127),
    ("groups_exchange", "A-z_0.9:x"),
]


@pytest.mark.parametrize(("key", "value"), RANGE_LIMITS, ids=[f"{k}={v!r}"[:40] for k, v in RANGE_LIMITS])
def test_values_at_the_range_limits_are_accepted(key, value):
    assert getattr(RabbitmqChannelLayer(**{key: value}).config, key) == value


def test_integer_seconds_are_stored_as_floats():
    config = LayerConfig.build(expiry=5, group_expiry=7, connect_timeout=3)
    assert (type(config.expiry), type(config.group_expiry), type(config.connect_timeout)) == (float,) * 3


def test_amqps_without_ssl_context_raises_naming_ssl_context():
    with pytest.raises(ValueError, match="ssl_context"):
        RabbitmqChannelLayer("amqps://user:pw@broker/asgi")


def test_ssl_context_with_amqp_scheme_raises():
    with pytest.raises(ValueError, match="amqps://"):
        RabbitmqChannelLayer("amqp://user:pw@broker/asgi", ssl_context=tls_context())


def test_config_is_immutable():
    config = LayerConfig.build()
    with pytest.raises(AttributeError):
        config.expiry = 1  # type: ignore[misc]


# parse_amqp_url -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://user:pw@host:1234/asgi", ("amqp", "host", 1234, "user", "pw", "asgi")),
        ("amqp://user:pw@host/%2F", ("amqp", "host", 5672, "user", "pw", "/")),
        ("amqp://user:pw@host/%2f", ("amqp", "host", 5672, "user", "pw", "/")),
        ("amqp://user:pw@host/", ("amqp", "host", 5672, "user", "pw", "/")),
        ("amqp://user:pw@host", ("amqp", "host", 5672, "user", "pw", "/")),
        ("amqp://host", ("amqp", "host", 5672, "guest", "guest", "/")),
        ("amqp://user@host/v", ("amqp", "host", 5672, "user", "guest", "v")),
        ("amqps://user:pw@host/v", ("amqps", "host", 5671, "user", "pw", "v")),
        ("AMQPS://user:pw@HOST:443/v", ("amqps", "host", 443, "user", "pw", "v")),
        ("amqp://user:pw@host/a%2Fb", ("amqp", "host", 5672, "user", "pw", "a/b")),
        ("amqp://us%40er:p%40ss%3Aw%2Fd@host/v", ("amqp", "host", 5672, "us@er", "p@ss:w/d", "v")),
        ("amqp://user:pw@[::1]:5673/v", ("amqp", "::1", 5673, "user", "pw", "v")),
        ("amqp://user:pw@10.0.0.1/v%20x", ("amqp", "10.0.0.1", 5672, "user", "pw", "v x")),
    ],
)
def test_parse_amqp_url(url, expected):
    assert parse_amqp_url(url) == BrokerAddress(*expected)


def test_default_host_is_local_guest_on_the_root_vhost():
    assert parse_amqp_url(DEFAULT_HOST) == BrokerAddress("amqp", "127.0.0.1", 5672, "guest", "guest", "/")


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("http://user:{pw}@host/", "amqp://"),
        ("host:5672", "amqp://"),
        ("", "amqp://"),
        ("amqp://user:{pw}@/v", "no broker"),
        ("amqp://user:{pw}@host/?heartbeat=30", "query"),
        ("amqp://user:{pw}@host/v#frag", "fragment"),
        ("amqp://user:{pw}@host/a/b", "URL-encoded"),
        ("amqp://user:{pw}@host:99999/v", "not a valid"),
        ("amqp://user:{pw}@host:port/v", "not a valid"),
        ("amqp://user:{pw}@[::1/v", "not a valid"),
        # No "@" to find the password by: percent-encoded, or left out.
        ("amqp://app:{pw}%40rmq2.example.com/asgi", "not a valid"),
        ("amqp://app:{pw}%40rmq2.example.com:5672/asgi", "not a valid"),
        ("amqp://user:{pw}", "not a valid"),
        ("amqps://user:{pw}/v", "not a valid"),
        ("user:{pw}", "amqp://"),
    ],
)
def test_invalid_urls_raise_value_error_without_the_password(url, match):
    url = url.format(pw=PASSWORD)
    with pytest.raises(ValueError, match=match) as caught:
        parse_amqp_url(url)
    assert PASSWORD not in str(caught.value)
    assert PASSWORD not in repr(caught.value)
    with pytest.raises(ValueError, match=match) as caught_by_layer:
        RabbitmqChannelLayer(url)
    assert PASSWORD not in str(caught_by_layer.value)


@pytest.mark.parametrize("password", ["ab/cd" + PASSWORD, PASSWORD + "#x", PASSWORD + "?x", "a@" + PASSWORD])
def test_passwords_with_unencoded_url_delimiters_are_read_whole(password):
    address = parse_amqp_url(f"amqp://user:{password}@host:5672/v")
    assert (address.username, address.password, address.host, address.port) == (
        "user",
        password,
        "host",
        5672,
    )
    assert address.virtual_host == "v"
    assert PASSWORD not in str(address)


@pytest.mark.parametrize("password", ["ab/cd" + PASSWORD, PASSWORD + "#x", PASSWORD + "?x"])
def test_errors_for_urls_with_unencoded_delimiters_never_contain_the_password(password):
    with pytest.raises(ValueError, match=r"^host") as caught:
        parse_amqp_url(f"amqp://user:{password}@host:notaport/v")
    message = str(caught.value)
    assert PASSWORD not in message
    assert "ab/cd" not in message


def test_non_string_url_raises_type_error():
    with pytest.raises(TypeError, match="host"):
        parse_amqp_url(b"amqp://host")  # type: ignore[arg-type]


def test_str_and_repr_of_address_never_contain_the_password():
    address = parse_amqp_url(f"amqp://user:{PASSWORD}@host:5672/asgi")
    assert address.password == PASSWORD
    assert str(address) == "amqp://user@host:5672/asgi"
    assert PASSWORD not in str(address)
    assert PASSWORD not in repr(address)


@pytest.mark.parametrize(
    ("url", "text"),
    [
        ("amqp://u:p@host/%2F", "amqp://u@host:5672/%2F"),
        ("amqps://u:p@[::1]:5671/v", "amqps://u@[::1]:5671/v"),
        ("amqp://u:p@host", "amqp://u@host:5672/%2F"),
    ],
)
def test_str_of_address(url, text):
    assert str(parse_amqp_url(url)) == text


def test_layer_repr_and_config_repr_never_contain_the_password():
    layer = RabbitmqChannelLayer(f"amqp://user:{PASSWORD}@host/asgi")
    assert PASSWORD not in repr(layer)
    assert PASSWORD not in str(layer)
    assert PASSWORD not in repr(layer.config)
    assert "amqp://user@host:5672/asgi" in repr(layer)


def test_tls_address_uses_tls():
    assert parse_amqp_url("amqps://h").uses_tls
    assert not parse_amqp_url("amqp://h").uses_tls


# Any malformed host string: the password never shows ------------------------------------------

# The password's mark: "Q" and "5" never come out of the other strategies, so neither the
# mark nor its percent-encoded form (%51) can appear in a message by chance.
MARK = "QQQpw"
ENCODED_MARK = "%51%51%51pw"
URL_TEXT = st.text(alphabet="abcz0123:/#?%[]@.!-_ ~\t\n+=&", max_size=8)


@st.composite
def urls_with_a_password(draw: st.DrawFn) -> str:
    """URL-like strings where a password (with the mark) sits before a later ``@``."""
    schemes = ["", "amqp://", "amqps://", "AMQP://", "amqp:", "amqp:/", "amqp:///", "http://", "//"]
    scheme = draw(st.sampled_from(schemes) | URL_TEXT)
    username = draw(st.sampled_from(["", "user", "us%40er", "a:b", "a/b", "a#b", "a?b", "[u]"]) | URL_TEXT)
    mark = draw(st.sampled_from([MARK, ENCODED_MARK]))
    password = draw(URL_TEXT) + mark + draw(URL_TEXT)
    hosts = ["", "host", "127.0.0.1", "[::1]", "[::1", "::1]", "h@st", "[v1.x]"]
    host = draw(st.sampled_from(hosts) | URL_TEXT)
    port = draw(st.sampled_from(["", ":", ":5672", ":99999", ":-1", ":port", ":56 72", "::"]) | URL_TEXT)
    path = draw(st.sampled_from(["", "/", "/%2F", "/a/b", "/v?q=1", "/v#f", "/%zz", "?#"]) | URL_TEXT)
    return f"{scheme}{username}:{password}@{host}{port}{path}"


def assert_hidden(text: str) -> None:
    assert MARK not in text
    assert ENCODED_MARK not in text


@settings(max_examples=1500, deadline=None, database=None)
@given(urls_with_a_password())
def test_no_error_or_address_built_from_any_host_string_shows_its_password(url: str) -> None:
    try:
        address = parse_amqp_url(url)
    except ValueError as error:
        assert_hidden(str(error))
        assert_hidden(repr(error))
        assert_hidden("".join(traceback.format_exception(error)))
        return
    assert_hidden(str(address))
    assert_hidden(repr(address))


@st.composite
def urls_with_a_password_and_no_at(draw: st.DrawFn) -> str:
    """URL-like strings where ``user:password`` lost its ``@`` (percent-encoded, or left out)."""
    schemes = ["", "amqp://", "amqps://", "AMQP://", "amqp:", "http://", "//"]
    scheme = draw(st.sampled_from(schemes))
    username = draw(
        st.sampled_from(["", "user", "us%40er", "[u]"]) | st.text(alphabet="abcz09_-.%", max_size=6)
    )
    no_delimiter = st.text(alphabet="abcz0123:%[].!-_ ~+=&", max_size=8)  # nothing that ends a netloc
    password = draw(no_delimiter) + draw(st.sampled_from([MARK, ENCODED_MARK])) + draw(no_delimiter)
    rest = draw(st.sampled_from(["", "%40host", "%40host:5672", "%40[::1]", "/", "/%2F", "/a/b", "?q", "#f"]))
    return f"{scheme}{username}:{password}{rest}"


@settings(max_examples=1500, deadline=None, database=None)
@given(urls_with_a_password_and_no_at())
def test_no_error_for_a_host_string_whose_at_is_missing_shows_its_password(url: str) -> None:
    try:
        address = parse_amqp_url(url)
    except ValueError as error:
        assert_hidden(str(error))
        assert_hidden("".join(traceback.format_exception(error)))
        return
    assert_hidden(str(address))


@pytest.mark.parametrize(
    "url",
    [
        f"guest:{PASSWORD}@127.0.0.1/%2F",
        f"guest:{PASSWORD}@127.0.0.1:5672/%2F",
        f"amqp:guest:{PASSWORD}@host/%2F",
        f"amqp:/guest:{PASSWORD}@host/%2F",
        f"user:pa://{PASSWORD}@host/",
        f"[user:{PASSWORD}@host/",
    ],
)
def test_malformed_host_without_scheme_separator_never_shows_the_password(url):
    with pytest.raises(ValueError, match=r"^host") as caught:
        RabbitmqChannelLayer(url)
    assert PASSWORD not in str(caught.value)
    assert PASSWORD not in "".join(traceback.format_exception(caught.value))


# expiry and RabbitMQ's consumer_timeout ---------------------------------------------------------


def test_expiry_up_to_the_maximum_is_accepted():
    assert LayerConfig.build(expiry=MAX_EXPIRY).expiry == MAX_EXPIRY


@pytest.mark.parametrize("expiry", [MAX_EXPIRY + 0.5, 1800, 86400])
def test_expiry_above_the_broker_consumer_timeout_margin_is_refused(expiry):
    with pytest.raises(ValueError, match="expiry") as caught:
        LayerConfig.build(expiry=expiry)
    assert "consumer_timeout" in str(caught.value)
    with pytest.raises(ValueError, match="consumer_timeout"):
        RabbitmqChannelLayer(DEFAULT_HOST, expiry=expiry)


# Normal channels ------------------------------------------------------------------------------------


def test_normal_channel_keys_have_their_defaults() -> None:
    config = LayerConfig.build()
    assert (config.normal_channel_prefix, config.normal_channel_queue_type) == ("channels.normal.", "classic")
    assert config.normal_channel_idle_expiry == 3600


@pytest.mark.parametrize("prefix", ["", "amq.jobs.", "with space", "x" * 101, 7])
def test_a_bad_normal_channel_prefix_is_refused_naming_the_key(prefix: object) -> None:
    with pytest.raises(ValueError, match="normal_channel_prefix"):
        LayerConfig.build(normal_channel_prefix=prefix)


def test_the_normal_channel_queue_type_is_classic_or_quorum() -> None:
    assert LayerConfig.build(normal_channel_queue_type="quorum").normal_channel_queue_type == "quorum"
    with pytest.raises(ValueError, match="normal_channel_queue_type"):
        LayerConfig.build(normal_channel_queue_type="stream")


def test_idle_queues_live_at_least_twice_expiry() -> None:
    assert LayerConfig.build(expiry=10, normal_channel_idle_expiry=20).normal_channel_idle_expiry == 20
    with pytest.raises(ValueError, match="normal_channel_idle_expiry"):
        LayerConfig.build(expiry=10, normal_channel_idle_expiry=19)
