"""Channel names with a ``new_channel()`` prefix: how the name starts, where its queue is."""

from __future__ import annotations

import pytest
from channels.layers import BaseChannelLayer
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands

from channels_rabbitmq.amqp.frames import encode_method
from channels_rabbitmq.core import RabbitmqChannelLayer
from channels_rabbitmq.names import MAX_NAME_BYTES, is_valid_group_name, require_valid_group_name
from channels_rabbitmq.wire import (
    LOCAL_PART_LENGTH,
    MAX_PREFIX_LENGTH,
    QUEUE_NAME_LENGTH,
    channel_name_start,
    queue_of,
)

QUEUE = "channels.AbCdEf012345"
assert len(QUEUE) == QUEUE_NAME_LENGTH


@pytest.mark.parametrize(
    ("prefix", "start"),
    [
        ("specific.", "specific."),  # Channels' default: no second dot
        ("specific", "specific."),  # channels_redis' default: its dot added
        ("", ""),  # the names of before prefixes
        ("a.b-c_d", "a.b-c_d."),
        ("..", ".."),
    ],
)
def test_the_name_starts_with_the_prefix_and_one_dot(prefix, start):
    assert channel_name_start(prefix) == start


@pytest.mark.parametrize(
    "name",
    [
        f"{QUEUE}!XyZ987654321",
        f"specific.{QUEUE}!XyZ987654321",
        f"a.b.c.{QUEUE}!x",
        f"specific.channels.QQQQQQQQQQQQ.{QUEUE}!x",  # a prefix that looks like a queue
        f"x.{QUEUE}!",
    ],
)
def test_the_queue_is_the_21_characters_before_the_bang(name):
    assert queue_of(name) == QUEUE


@pytest.mark.parametrize(
    ("name", "queue"),
    [
        ("q!a", "q"),  # not a name of ours: the whole part before '!', as before prefixes
        ("channels.elsewhere!x", "channels.elsewhere"),
        (f"x{QUEUE}!a", f"x{QUEUE}"),  # no dot before the queue: not a prefix
        (f"x.{QUEUE[:-1]}!a", f"x.{QUEUE[:-1]}"),
        ("specific.inmemory!abc", "specific.inmemory"),
    ],
)
def test_other_names_keep_their_whole_head_as_the_queue(name, queue):
    assert queue_of(name) == queue


@given(
    prefix=st.text(st.sampled_from("abcXYZ019-_."), max_size=MAX_PREFIX_LENGTH - 1),
    local=st.text(st.sampled_from("abcXYZ019"), min_size=1, max_size=LOCAL_PART_LENGTH),
)
def test_every_valid_prefix_makes_a_valid_name_whose_queue_is_found(prefix, local):
    name = f"{channel_name_start(prefix)}{QUEUE}!{local}"
    assert name.startswith(prefix)
    assert queue_of(name) == QUEUE
    assert BaseChannelLayer().require_valid_channel_name(name)


def test_the_longest_prefix_makes_a_name_of_99_characters():
    start = channel_name_start("p" * (MAX_PREFIX_LENGTH - 1))
    name = f"{start}{QUEUE}!{'r' * LOCAL_PART_LENGTH}"
    assert len(name) == 99
    assert BaseChannelLayer().require_valid_channel_name(name)
    assert channel_name_start("p" * (MAX_PREFIX_LENGTH - 1) + ".") == "p" * (MAX_PREFIX_LENGTH - 1) + "."


@pytest.mark.parametrize(
    "prefix",
    [
        "p" * MAX_PREFIX_LENGTH,  # with its dot, one character too many
        "p" * MAX_PREFIX_LENGTH + ".",
        "bad!prefix",
        "spaces are not allowed",
        "ünï",
        "slash/",
    ],
)
def test_a_prefix_that_would_make_an_invalid_name_raises_value_error(prefix):
    with pytest.raises(ValueError, match="prefix"):
        channel_name_start(prefix)


@pytest.mark.parametrize("prefix", [None, b"specific.", 1, ["specific."]])
def test_a_prefix_that_is_not_a_string_raises_type_error(prefix):
    with pytest.raises(TypeError, match="prefix"):
        channel_name_start(prefix)


@pytest.mark.parametrize(("prefix", "error"), [("bad!", ValueError), ("p" * 70, ValueError), (3, TypeError)])
async def test_new_channel_refuses_a_bad_prefix_before_connecting(prefix, error):
    layer = RabbitmqChannelLayer("amqp://guest:guest@127.0.0.1:1/%2F")  # nothing listens there
    with pytest.raises(error, match="prefix"):
        await layer.new_channel(prefix)
    assert layer._links.all() == []  # no link made, nothing connected
    await layer.close()


# What this layer accepts beyond Channels' rule (channels_rabbitmq.names) ---------------------------

NAME_CHARACTERS = st.sampled_from("abcXYZ019-_.\uff10\u0663\u0301\n")


@given(name=st.text(NAME_CHARACTERS, min_size=1, max_size=110))
def test_a_group_name_is_accepted_exactly_when_channels_accepts_it_and_amqp_carries_it(name):
    channels_accepts = _accepts(BaseChannelLayer().require_valid_group_name, name)
    fits = len(name.encode()) <= MAX_NAME_BYTES and not name.endswith("\n")
    assert is_valid_group_name(name) == (channels_accepts and fits)
    if is_valid_group_name(name):  # then it encodes as a routing key
        encode_method(3, commands.Queue.Bind(queue="q", exchange="groups", routing_key=name))


@given(name=st.text(NAME_CHARACTERS, min_size=1, max_size=110))
def test_a_normal_channel_name_is_accepted_only_when_it_makes_an_ascii_queue_name(name):
    layer = RabbitmqChannelLayer()
    accepted = _accepts(layer.require_valid_channel_name, name)
    assert accepted == (
        _accepts(BaseChannelLayer().require_valid_channel_name, name) and name.isascii() and "\n" not in name
    )
    if accepted:  # then its queue can be declared
        queue = layer.config.normal_channel_prefix + name
        encode_method(3, commands.Queue.Declare(queue=queue, durable=True))


def test_the_byte_limit_is_named_in_the_error():
    with pytest.raises(TypeError, match="287 bytes in UTF-8: RabbitMQ carries at most 255"):
        require_valid_group_name("chat_" + "\uff10" * 94)
    with pytest.raises(TypeError, match="newline"):
        require_valid_group_name("room\n")


def _accepts(check, name) -> bool:
    try:
        check(name)
    except TypeError:
        return False
    return True
