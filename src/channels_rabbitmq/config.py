"""The layer's settings: CONFIG keys checked at construction, AMQP URLs parsed.

Nothing here does I/O or needs an event loop: Channels builds the layer lazily, often
from sync code.
"""

from __future__ import annotations

import base64
import difflib
import fnmatch
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar
from urllib.parse import unquote, urlsplit

from .wire.serializers import MessageSerializer, load_serializer

DEFAULT_HOST = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_MAX_MESSAGE_SIZE = 4 * 1024 * 1024  # 4 MiB

#: The longest ``expiry`` accepted, in seconds. When the local buffers are full the layer
#: withholds acks until buffered messages are read or expire, so up to about ``expiry``;
#: RabbitMQ closes a consuming channel whose oldest ack is late by its ``consumer_timeout``
#: (30 minutes by default), and this leaves 5 minutes of margin below that.
MAX_EXPIRY = 1500.0

_QUEUE_PREFIX = re.compile(r"^[a-zA-Z0-9\-_.:]{1,100}$")
#: The queue types a normal channel's queue may have (``normal_channel_queue_type``).
NORMAL_QUEUE_TYPES = ("classic", "quorum")
_EXCHANGE_NAME = re.compile(r"^[a-zA-Z0-9\-_.:]{1,127}$")
# What of an URL's credentials errors may show: a scheme and a username of plain characters.
_CREDENTIALS = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)?(?P<username>[a-zA-Z0-9\-_.~%]*)(?P<password>:.*)?",
    re.DOTALL,
)
# Without an "@", what may stand between "scheme://" and the path and be no secret: a host (a name,
# an address or an IPv6 literal) and a port of digits. Anything else may be "user:password" whose
# "@" was percent-encoded or left out.
_SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*:)?//")
_HOST_AND_PORT = re.compile(r"(\[[0-9A-Fa-f:.]*\]|[^:/?#\[\]@\s]*)(:[0-9]*)?")
_PLAIN_USERNAME = re.compile(r"[a-zA-Z0-9\-_.~%]*")


@dataclass(frozen=True)
class BrokerAddress:
    """Where and how to connect, from one AMQP URL. ``repr`` and ``str`` hide the password."""

    scheme: str
    host: str
    port: int
    username: str
    password: str = field(repr=False)
    virtual_host: str

    @property
    def uses_tls(self) -> bool:
        return self.scheme == "amqps"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        vhost = "%2F" if self.virtual_host == "/" else self.virtual_host
        return f"{self.scheme}://{self.username}@{host}:{self.port}/{vhost}"


def parse_amqp_url(url: str) -> BrokerAddress:
    """Parse ``amqp://user:password@host:port/vhost``; the vhost path is URL-encoded.

    ``/asgi`` is the vhost ``asgi``; ``/%2F``, ``/`` or no path is the vhost ``/``.
    Errors never quote the password.
    """
    url = _url_string(url)
    # Split the credentials off first, at the last "@": a password may hold "/", "#" or "?"
    # that were not percent-encoded, and must then neither break parsing nor leak into errors.
    scheme_part, separator, rest = url.partition("://")
    userinfo, at, location = rest.rpartition("@")
    if not separator:
        userinfo, at, location = "", "", url
    try:
        parts = urlsplit(f"{scheme_part}{separator}{location}")
        port = parts.port
    except ValueError:
        parts = None  # raised below, outside this block: no chained error that quotes the URL
    if parts is None or not _HOST_AND_PORT.fullmatch(parts.netloc):  # urlsplit lets junk by a [...]
        raise ValueError(f"host is not a valid AMQP URL (bad host or port): {_without_password(url)}")
    username, colon, password = userinfo.partition(":")
    scheme = parts.scheme.lower()
    if scheme not in ("amqp", "amqps"):
        raise ValueError(f"host must start with amqp:// or amqps://, got {_without_password(url)}")
    if not parts.hostname:
        raise ValueError(f"host names no broker: {_without_password(url)}")
    if parts.query or parts.fragment:
        raise ValueError(
            f"host takes no query string or fragment ({_without_password(url)}): "
            "set heartbeat, connect_timeout and the rest as CONFIG keys"
        )
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if "/" in path:
        raise ValueError(f"host: the vhost must be URL-encoded (%2F for '/'): {_without_password(url)}")
    virtual_host = unquote(path) if path else "/"
    return BrokerAddress(
        scheme=scheme,
        host=parts.hostname,
        port=port or (5671 if scheme == "amqps" else 5672),
        username=unquote(username) if at else "guest",
        password=unquote(password) if colon else "guest",
        virtual_host=virtual_host,
    )


def _url_string(url: object) -> str:
    """``url`` if it is a string: a URL of another type is refused before it is parsed."""
    if not isinstance(url, str):
        raise TypeError(f"host must be an AMQP URL string, got {type(url).__name__}")
    return url


def _without_password(url: str) -> str:
    """The URL with its credentials masked, for error messages; safe for any malformed string.

    Anything before the last ``@`` may hold a password, with or without ``://``, and with
    unencoded delimiters in it: only a well-formed scheme and a username made of plain
    characters are kept from there, and the rest becomes ``***``.
    """
    credentials, at, location = url.rpartition("@")
    if not at:
        return _without_userinfo(url)
    shown = _CREDENTIALS.fullmatch(credentials)
    if shown is None:
        return f"***@{location}"
    scheme, username, password = shown.group("scheme", "username", "password")
    return f"{scheme or ''}{username}{':***' if password is not None else ''}@{location}"


def _without_userinfo(url: str) -> str:
    """A URL with no ``@``: its part before the path is shown only if it is a host and a port;
    otherwise it may be ``user:password`` (``amqp://app:S3cret%40host/v``, ``amqp://user:S3cret``),
    and everything from its first ``:`` on is masked, the path included (where the password ends
    cannot be known)."""
    scheme = _SCHEME.match(url)
    prefix = scheme.group(0) if scheme else ""
    rest = url[len(prefix) :]
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if _HOST_AND_PORT.fullmatch(netloc) or ":" not in netloc:
        return url
    username = netloc.partition(":")[0]
    return f"{prefix}{username if _PLAIN_USERNAME.fullmatch(username) else '***'}:***"


@dataclass(frozen=True)
class LayerConfig:
    """Every CONFIG key of the layer, checked. See docs/configuration.md for what each one means.

    ``DEFAULTS`` is the one place where the keys and their defaults are written: :meth:`build`
    applies it, the layer's constructor passes its CONFIG through, and a test holds the table of
    docs/configuration.md to it.
    """

    #: Every CONFIG key and its default, as a user would write it in CONFIG.
    DEFAULTS: ClassVar[Mapping[str, object]] = MappingProxyType(
        {
            "host": DEFAULT_HOST,
            "expiry": 60,
            "group_expiry": 86400,
            "capacity": 100,
            "channel_capacity": None,
            "local_capacity": 100_000,
            "remote_capacity": 10_000,
            "remote_capacity_bytes": 128 * 1024 * 1024,  # the largest max_message_size
            "prefetch_count": 100,
            "groups_exchange": "groups",
            "ssl_context": None,
            "connect_timeout": 10,
            "heartbeat": 60,
            "connection_wait": 10,
            "reconnect_delay_min": 0.1,
            "reconnect_delay_max": 10,
            "encryption_keys": None,
            "max_message_size": DEFAULT_MAX_MESSAGE_SIZE,
            "normal_channel_prefix": "channels.normal.",
            "normal_channel_queue_type": "classic",
            "normal_channel_idle_expiry": 3600,
            "serializer": "msgpack",
            "reconnect_notice_type": None,
        }
    )

    addresses: tuple[BrokerAddress, ...]  # cluster nodes, in the order given
    expiry: float
    group_expiry: float | None  # None: memberships never expire
    capacity: int
    channel_capacity: tuple[tuple[re.Pattern[str], int], ...]  # (pattern, capacity), first match wins
    local_capacity: int
    remote_capacity: int
    remote_capacity_bytes: int
    prefetch_count: int
    groups_exchange: str
    ssl_context: ssl.SSLContext | None
    connect_timeout: float
    heartbeat: int
    max_message_size: int
    connection_wait: float
    reconnect_delay_min: float
    reconnect_delay_max: float
    encryption_keys: tuple[bytes, ...] = field(repr=False)  # () when encryption is off
    normal_channel_prefix: str
    normal_channel_queue_type: str  # "classic" or "quorum"
    normal_channel_idle_expiry: float
    serializer: MessageSerializer
    reconnect_notice_type: str | None  # None: no notice after the queue was lost

    @property
    def address(self) -> BrokerAddress:
        """The first broker address (the one named in logs when there is only one)."""
        return self.addresses[0]

    @property
    def description(self) -> str:
        """The broker address(es), without passwords."""
        return ", ".join(str(address) for address in self.addresses)

    def capacity_of(self, channel: str) -> int:
        """The capacity of one channel: the first ``channel_capacity`` pattern it matches, or ``capacity``."""
        for pattern, capacity in self.channel_capacity:
            if pattern.match(channel):
                return capacity
        return self.capacity

    @classmethod
    def build(cls, **config: object) -> LayerConfig:
        """Check a CONFIG dict: unknown keys are refused, missing keys take their ``DEFAULTS``.

        Every error names the key it is about, and none quotes a password.
        """
        _refuse_unknown_keys(config, cls.DEFAULTS)
        settings = {**cls.DEFAULTS, **config}
        addresses = _addresses(settings["host"])
        ssl_context = settings["ssl_context"]
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise TypeError(
                f"ssl_context must be an ssl.SSLContext or None, got {type(ssl_context).__name__}"
            )
        for address in addresses:
            if address.uses_tls and ssl_context is None:
                raise ValueError(
                    f"host {address} is amqps:// but ssl_context is None: pass an ssl.SSLContext "
                    "(ssl.create_default_context(cafile=...) verifies the broker)"
                )
            if not address.uses_tls and ssl_context is not None:
                raise ValueError(
                    f"ssl_context is set but host {address} is amqp://: use amqps:// to connect with TLS"
                )
        delay_min = _number("reconnect_delay_min", settings["reconnect_delay_min"], minimum=0.001)
        delay_max = _number("reconnect_delay_max", settings["reconnect_delay_max"], minimum=0.001)
        if delay_max < delay_min:
            raise ValueError(
                f"reconnect_delay_max ({delay_max:g}) must not be below reconnect_delay_min ({delay_min:g})"
            )
        max_message_size = _integer("max_message_size", settings["max_message_size"], 1, 128 * 1024 * 1024)
        remote_capacity_bytes = _integer(
            "remote_capacity_bytes", settings["remote_capacity_bytes"], 1, 2**63 - 1
        )
        if remote_capacity_bytes < max_message_size:
            raise ValueError(
                f"remote_capacity_bytes ({remote_capacity_bytes}) must be at least max_message_size "
                f"({max_message_size}): RabbitMQ would refuse every message larger than the queue may hold"
            )
        groups_exchange = settings["groups_exchange"]
        if not isinstance(groups_exchange, str):
            raise TypeError(f"groups_exchange must be a string, got {type(groups_exchange).__name__}")
        if not _EXCHANGE_NAME.match(groups_exchange):
            raise ValueError(
                f"groups_exchange must be 1-127 characters of letters, digits, '-', '_', '.', ':'; "
                f"got {groups_exchange!r}"
            )
        if groups_exchange.startswith("amq."):
            raise ValueError(
                f"groups_exchange may not start with 'amq.' (reserved by RabbitMQ): {groups_exchange!r}"
            )
        expiry = _number("expiry", settings["expiry"], minimum=0.001)
        if expiry > MAX_EXPIRY:
            raise ValueError(
                f"expiry must be at most {MAX_EXPIRY:g}s, got {expiry:g}: with full buffers the "
                "layer withholds an ack for up to expiry seconds, and RabbitMQ closes a consumer whose "
                "ack is later than its consumer_timeout (30 minutes by default)"
            )
        prefix = settings["normal_channel_prefix"]
        if not isinstance(prefix, str) or not _QUEUE_PREFIX.match(prefix) or prefix.startswith("amq."):
            raise ValueError(
                "normal_channel_prefix must be 1-100 characters of letters, digits, '-', '_', '.', ':', "
                f"not starting with 'amq.'; got {prefix!r}"
            )
        queue_type = settings["normal_channel_queue_type"]
        if queue_type not in NORMAL_QUEUE_TYPES:
            raise ValueError(f"normal_channel_queue_type must be 'classic' or 'quorum', got {queue_type!r}")
        idle_expiry = _number("normal_channel_idle_expiry", settings["normal_channel_idle_expiry"], minimum=1)
        if idle_expiry < 2 * expiry:
            raise ValueError(
                f"normal_channel_idle_expiry ({idle_expiry:g}s) must be at least twice expiry ({expiry:g}s): "
                "an idle queue is removed only once every message in it has expired"
            )
        return cls(
            addresses=addresses,
            expiry=expiry,
            group_expiry=_optional_number("group_expiry", settings["group_expiry"], minimum=0.001),
            capacity=_integer("capacity", settings["capacity"], 1, 10_000_000),
            channel_capacity=_channel_capacity(settings["channel_capacity"]),
            local_capacity=_integer("local_capacity", settings["local_capacity"], 1, 100_000_000),
            remote_capacity=_integer("remote_capacity", settings["remote_capacity"], 1, 2**31 - 1),
            remote_capacity_bytes=remote_capacity_bytes,
            prefetch_count=_integer("prefetch_count", settings["prefetch_count"], 1, 65535),
            groups_exchange=groups_exchange,
            ssl_context=ssl_context,
            connect_timeout=_number("connect_timeout", settings["connect_timeout"], minimum=0.001),
            heartbeat=_integer("heartbeat", settings["heartbeat"], 0, 65535),
            max_message_size=max_message_size,
            connection_wait=_number("connection_wait", settings["connection_wait"], minimum=0),
            reconnect_delay_min=delay_min,
            reconnect_delay_max=delay_max,
            encryption_keys=_encryption_keys(settings["encryption_keys"]),
            normal_channel_prefix=prefix,
            normal_channel_queue_type=str(queue_type),
            normal_channel_idle_expiry=idle_expiry,
            serializer=load_serializer(settings["serializer"]),
            reconnect_notice_type=_notice_type(settings["reconnect_notice_type"]),
        )


def _refuse_unknown_keys(config: Mapping[str, object], known: Mapping[str, object]) -> None:
    """Raise ``TypeError`` naming every key of ``config`` the layer does not know, and the known ones.

    A misspelt key would otherwise be ignored silently and its default used instead.
    """
    unknown = [key for key in config if key not in known]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    plural = "s" if len(unknown) > 1 else ""
    raise TypeError(
        f"unknown CONFIG key{plural} {', '.join(hints)}; the keys are: {', '.join(sorted(known))}"
    )


def _addresses(host: object) -> tuple[BrokerAddress, ...]:
    """The broker addresses of ``host``: one AMQP URL, or a list (or tuple) of them."""
    if isinstance(host, list | tuple):
        if not host:
            raise ValueError("host is an empty list: name at least one AMQP URL")
        return tuple(parse_amqp_url(url) for url in host)
    return (parse_amqp_url(_url_string(host)),)


def _channel_capacity(patterns: object) -> tuple[tuple[re.Pattern[str], int], ...]:
    """Compile ``{pattern: capacity}``: glob-style strings (``"http.*"``) or compiled regexes, in order."""
    if patterns is None:
        return ()
    if not isinstance(patterns, Mapping):
        raise TypeError(
            f"channel_capacity must be a dict of {{pattern: capacity}}, got {type(patterns).__name__}"
        )
    compiled = []
    for pattern, capacity in patterns.items():
        if isinstance(pattern, str):
            regex = re.compile(fnmatch.translate(pattern))
        elif isinstance(pattern, re.Pattern) and isinstance(pattern.pattern, str):
            regex = pattern
        else:
            raise TypeError(
                f"channel_capacity keys must be glob strings or compiled str regexes, got {pattern!r}"
            )
        compiled.append((regex, _integer(f"channel_capacity[{pattern!r}]", capacity, 1, 10_000_000)))
    return tuple(compiled)


def _encryption_keys(keys: object) -> tuple[bytes, ...]:
    """Check the keys (Fernet keys: 32 bytes, URL-safe base64); () when encryption is off."""
    if keys is None:
        return ()
    if isinstance(keys, str | bytes) or not isinstance(keys, list | tuple):
        raise TypeError("encryption_keys must be a list of keys (the first encrypts, any decrypts)")
    if not keys:
        raise ValueError("encryption_keys is an empty list: give at least one key, or None to turn it off")
    checked = []
    for index, key in enumerate(keys):
        raw = key.encode() if isinstance(key, str) else key
        if not isinstance(raw, bytes):
            raise TypeError(f"encryption_keys[{index}] must be str or bytes, got {type(key).__name__}")
        try:
            decoded = base64.urlsafe_b64decode(raw)
        except ValueError:
            decoded = b""
        if len(decoded) != 32:
            raise ValueError(
                f"encryption_keys[{index}] is not a key: expected 32 bytes in URL-safe base64 "
                "(make one with channels_rabbitmq.encryption.generate_key())"
            )
        checked.append(raw)
    return tuple(checked)


def _number(key: str, value: object, *, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{key} must be a number of seconds, got {type(value).__name__}")
    if not value >= minimum or value == float("inf"):
        raise ValueError(f"{key} must be a finite number >= {minimum}, got {value!r}")
    return float(value)


def _optional_number(key: str, value: object, *, minimum: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{key} must be a number of seconds or None, got {type(value).__name__}")
    return _number(key, value, minimum=minimum)


def _notice_type(value: object) -> str | None:
    """A message ``type`` for the reconnect notice, or None (off)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"reconnect_notice_type must be a string or None, got {type(value).__name__}")
    if not value or value.startswith("_"):
        # Channels' consumers refuse types that start with "_"; "" names no handler.
        raise ValueError(
            f"reconnect_notice_type must be a message type such as 'layer.reconnected', got {value!r}"
        )
    return value


def _integer(key: str, value: object, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{key} must be an integer, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{key} must be between {minimum} and {maximum}, got {value}")
    return value
