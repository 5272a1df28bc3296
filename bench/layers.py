"""The layers the benchmarks measure, which of them can run here, and why the others cannot.

  InMemoryChannelLayer       channels (one shared instance), always
  RedisChannelLayer          channels_redis.core, at the Redis URL, if installed and Redis answers
  RedisPubSubChannelLayer    channels_redis.pubsub, likewise
  this project               channels_rabbitmq.core, at the AMQP URL, from this interpreter
  channels_rabbitmq (PyPI)   the released package, from another virtualenv's python (it has the
                             same import name as this project), when one is given

Both RabbitMQ layers get remote_capacity=100000 and local_capacity=10000, and every layer with a
per-channel capacity gets 100000, so that the timed sends never meet ChannelFull.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from bench import scenarios
from channels_rabbitmq import __version__
from channels_rabbitmq.config import parse_amqp_url

SCENARIO_SCRIPT = Path(scenarios.__file__).resolve()
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"
OLD_PYTHON_ENV = "OLD_CHANNELS_RABBITMQ_PYTHON"
OURS, OLD_RELEASE = "ours", "rabbitmq-old"
RABBITMQ_CLASS = "channels_rabbitmq.core.RabbitmqChannelLayer"
CHECK_TIMEOUT = 60.0
BROKER_PROBE_TIMEOUT = 3.0


@dataclass
class LayerSpec:
    """One layer to measure, and the interpreter to measure it with."""

    key: str
    label: str
    cls: str
    config: dict[str, Any]
    python: str = sys.executable
    shared_instance: bool = False
    version: str = ""
    broker_port: int | None = None  # where its broker listens on this machine, for the broker's CPU


def without_password(url: str) -> str:
    """The URL with its password shown as ``***``. The credentials end at the last "@" (a password
    may hold "/", "#", "?", ":" and "@", as the layer's URL parser allows), the password starts
    after their first ":"."""
    scheme, separator, rest = url.partition("://")
    credentials, at, location = rest.rpartition("@")
    if not separator or not at or ":" not in credentials:
        return url
    return f"{scheme}://{credentials.partition(':')[0]}:***@{location}"


def amqp_port(url: str) -> int:
    return parse_amqp_url(url).port


def broker_process(port: int | None) -> psutil.Process | None:
    """The process listening on ``port`` on this machine (the broker), if it may be seen."""
    with contextlib.suppress(psutil.Error):
        for connection in psutil.net_connections("tcp") if port else ():
            address = connection.laddr
            if connection.status == psutil.CONN_LISTEN and address and address.port == port:
                return psutil.Process(connection.pid) if connection.pid else None
    return None


def rabbitmq_problem(url: str) -> str | None:
    """Why nothing can be measured on RabbitMQ at ``url`` (no TCP listener there), or None."""
    try:
        address = parse_amqp_url(url)
    except ValueError as error:  # its message masks the password
        return f"not a usable AMQP URL: {error}"
    try:
        with socket.create_connection((address.host, address.port), BROKER_PROBE_TIMEOUT):
            return None
    except OSError as error:
        return f"no RabbitMQ at {address} ({scenarios.short_reason(error)})"


def redis_problem(url: str) -> str | None:
    """Why channels_redis cannot be measured here: not installed, or no Redis answers; or None."""
    if importlib.util.find_spec("channels_redis") is None:
        return "not installed: pip install channels-redis"
    try:
        import redis  # channels_redis's own client library

        client = redis.Redis.from_url(url, socket_connect_timeout=BROKER_PROBE_TIMEOUT)
    except (ImportError, ValueError) as error:
        return f"cannot reach Redis at {without_password(url)}: {scenarios.short_reason(error)}"
    try:
        client.ping()
    except Exception as error:
        return f"no Redis at {without_password(url)} ({scenarios.short_reason(error)})"
    finally:
        client.close()
    return None


def config_environment(config: dict[str, Any]) -> dict[str, str]:
    """This environment, plus the layer's config (which holds the broker's password: not on the
    command line, which every local user can read) for a measuring subprocess."""
    return {**os.environ, scenarios.CONFIG_VARIABLE: json.dumps(config)}


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def last_json_line(text: str) -> dict[str, Any] | None:
    """The last line of ``text`` that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def check(spec: LayerSpec) -> str | None:
    """Import the layer's class in its interpreter and note its version; why it cannot run, or None."""
    if not Path(spec.python).exists():
        return f"python {spec.python} not found"
    command = [spec.python, str(SCENARIO_SCRIPT), "--layer", spec.cls, "--check"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=CHECK_TIMEOUT, check=False)
    except (subprocess.TimeoutExpired, OSError) as error:
        return f"cannot run {spec.python}: {scenarios.short_reason(error)}"
    line = last_json_line(done.stdout)
    if line is None:
        return f"import check failed: {last_line(done.stderr) or f'exit status {done.returncode}'}"
    if "error" in line:
        return f"not importable with {spec.python}: {line['error']}"
    spec.version = str(line.get("version", ""))
    if spec.key == OLD_RELEASE:
        if spec.version == __version__:
            return f"{spec.python} has this project ({__version__}), not a PyPI release"
        spec.label = f"channels_rabbitmq {spec.version} (PyPI)"
    return None


def choose(amqp_url: str, redis_url: str, old_python: str = "") -> tuple[list[LayerSpec], list[str]]:
    """The layers that will be measured, with their versions (peers first, then this project and its
    PyPI release), and a line for each one skipped, with the reason."""
    amqp = {"host": amqp_url, "remote_capacity": 100000, "local_capacity": 10000}
    redis, big = [redis_url], 100000
    rabbitmq_port = redis_port = None
    with contextlib.suppress(ValueError):  # a bad URL is reported as the reason its layer is skipped
        rabbitmq_port = amqp_port(amqp_url)
    with contextlib.suppress(ValueError):
        redis_port = urlsplit(redis_url).port or 6379
    no_redis = redis_problem(redis_url)
    no_old = "" if old_python else f"not asked for: --old-python or ${OLD_PYTHON_ENV}"
    candidates = [
        (LayerSpec("inmemory", "InMemoryChannelLayer", "channels.layers.InMemoryChannelLayer",
                   {"capacity": big}, shared_instance=True), None),
        (LayerSpec("redis", "RedisChannelLayer", "channels_redis.core.RedisChannelLayer",
                   {"hosts": redis, "capacity": big}, broker_port=redis_port), no_redis),
        (LayerSpec("redis-pubsub", "RedisPubSubChannelLayer", "channels_redis.pubsub.RedisPubSubChannelLayer",
                   {"hosts": redis}, broker_port=redis_port), no_redis),
        # The capacity per channel, like the other layers' (the old release has no such key).
        (LayerSpec(OURS, "channels_rabbitmq (this project)", RABBITMQ_CLASS, amqp | {"capacity": big},
                   broker_port=rabbitmq_port), None),
        (LayerSpec(OLD_RELEASE, "channels_rabbitmq (PyPI)", RABBITMQ_CLASS, amqp, old_python,
                   broker_port=rabbitmq_port), no_old),
    ]  # fmt: skip
    chosen, skipped = [], []
    for spec, reason in candidates:
        if reason := reason or check(spec):
            skipped.append(f"skipped {spec.label}: {reason}")
        else:
            chosen.append(spec)
    return chosen, skipped
