"""``python -m channels_rabbitmq check``, run as a subprocess against the real broker.

Every run is a real process: its exit status and its output are what an operator sees.
The user of these tests has a password of its own, with characters that URL-encoding
changes, so that each failure case can check that no spelling of it is printed.
"""

from __future__ import annotations

import errno
import io
import os
import re
import secrets
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

from channels_rabbitmq.config import LayerConfig
from channels_rabbitmq.deployment_check.explain import explain_connection_error, is_access_refused
from channels_rabbitmq.deployment_check.report import Report, passwords_in
from channels_rabbitmq.exceptions import (
    BrokerAccessRefusedError,
    BrokerConnectionError,
    BrokerConnectionLostError,
    BrokerLoginRefusedError,
    BrokerProtocolError,
    BrokerRefusedError,
    BrokerTimeoutError,
    BrokerTLSError,
    BrokerUnreachableError,
    BrokerVhostRefusedError,
    ReplyCode,
)
from testbed.brokers.certs import CertificateAuthority, Issued
from testbed.brokers.nodes import Node, NodeError, Nodes, free_ports, unavailable_reason
from tests.conftest import Broker, rabbitmqctl

PASSWORD = "Cli/check:S3cret@pw"  # raw; in a URL it becomes Cli%2Fcheck%3AS3cret%40pw
WRONG_PASSWORD = "Not/the:Right@one7"
BACKEND = "channels_rabbitmq.core.RabbitmqChannelLayer"
# The permissions docs/operations/deployment.md grants: configure, write, read.
DOCUMENTED_PERMISSIONS = (
    r"^(groups|channels\..*)$",
    r"^(groups|amq\.default|channels\..*)$",
    r"^(groups|channels\..*)$",
)


@dataclass
class Run:
    """One finished ``check`` process."""

    status: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def line(self, start: str) -> str:
        """The one stdout line that starts with ``start``."""
        (found,) = [line for line in self.stdout.splitlines() if line.startswith(start)]
        return found

    def assert_hides(self, *passwords: str) -> None:
        for password in passwords:
            for spelling in (password, quote(password, safe="")):
                assert spelling not in self.output, f"the output shows a password:\n{self.output}"


def check(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> Run:
    environment = {key: value for key, value in os.environ.items() if key != "DJANGO_SETTINGS_MODULE"}
    environment.update(env or {})
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "channels_rabbitmq", "check", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environment,
        timeout=90,
        check=False,
    )
    return Run(completed.returncode, completed.stdout, completed.stderr, time.monotonic() - started)


@dataclass
class User:
    name: str
    broker: Broker

    def url(self, *, password: str = PASSWORD, vhost: str | None = None) -> str:
        return self.broker.url_for(username=self.name, password=password, vhost=vhost)

    def allow(self, configure: str, write: str, read: str) -> None:
        rabbitmqctl("set_permissions", "-p", self.broker.vhost, self.name, configure, write, read)


@pytest.fixture(scope="module")
def user(broker: Broker) -> Iterator[User]:
    """A user of the run's vhost with a password of its own; each test sets its permissions."""
    name = f"channels_rabbitmq_cli_{secrets.token_hex(3)}"
    rabbitmqctl("add_user", name, PASSWORD)
    try:
        yield User(name, broker)
    finally:
        rabbitmqctl("delete_user", name)


# Arguments ----------------------------------------------------------------------------------------


def test_help_describes_the_command() -> None:
    run = check("--help")
    assert run.status == 0, run.output
    for words in (
        "usage:",
        "URL",
        "--settings",
        "--alias",
        "--cafile",
        "--certfile",
        "--keyfile",
        "--timeout",
    ):
        assert words in run.stdout
    assert "Exit status" in run.stdout
    assert "never printed" in run.stdout
    summary = subprocess.run(
        [sys.executable, "-m", "channels_rabbitmq", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert re.search(r"^\s+check\s+Connect to RabbitMQ and say in plain words", summary, re.MULTILINE)


def test_nothing_to_check_exits_2_and_says_what_to_give() -> None:
    run = check()
    assert run.status == 2, run.output
    assert "nothing to check" in run.stderr
    assert "--settings" in run.stderr
    assert "DJANGO_SETTINGS_MODULE" in run.stderr
    assert run.stdout == ""


@pytest.mark.parametrize(
    "url",
    [
        f"amqp://someone:{quote(PASSWORD, safe='')}@localhost:notaport/vhost",
        f"amqp://someone:{quote(PASSWORD, safe='')}%40localhost/vhost",  # its "@" percent-encoded
        f"amqp://someone:{quote(PASSWORD, safe='')}",  # no host at all
    ],
)
def test_a_malformed_url_is_a_settings_problem_that_hides_the_password(url: str) -> None:
    run = check(url)
    assert run.status == 1, run.output
    assert run.line("FAIL  settings").startswith("FAIL  settings: host is not a valid AMQP URL")
    assert "skip  connect, permissions, layer, latency" in run.stdout
    assert run.stdout.splitlines()[-1] == "1 problem found"
    run.assert_hides(PASSWORD)


def test_the_report_hides_a_password_in_every_spelling_as_a_safety_net() -> None:
    out = io.StringIO()
    report = Report(out)
    report.hide(passwords_in(f"amqp://someone:{quote(PASSWORD, safe='')}@host/vhost"))
    report.hide(passwords_in("amqp://guest:guest@host/vhost"))  # the default is no secret
    report.fail(f"raw {PASSWORD}, encoded {quote(PASSWORD, safe='')}, user guest")
    assert out.getvalue() == "FAIL  raw ****, encoded ****, user guest\n"


# Explanations are chosen by type and fields, never by message ----------------------------------

# Each message below names another failure, to show that the explanation does not read it.
MISLEADING = (
    "TLS: hostname mismatch, certificate has expired, WRONG_VERSION_NUMBER, CERTIFICATE_REQUIRED, "
    "UNKNOWN_CA; RabbitMQ refused the login, refused the vhost: not found; no answer within "
    "connect_timeout; AMQP protocol error; closed during the handshake; ACCESS_REFUSED"
)
TARGET = {"url": "amqps://someone@broker.example:5671/site", "address": "192.0.2.7:5671"}


@pytest.mark.parametrize(
    ("error", "summary", "hint"),
    [
        pytest.param(
            BrokerTLSError(MISLEADING, reason="CERTIFICATE_VERIFY_FAILED", verify_code=10, **TARGET),
            "TLS: the broker's certificate has expired",
            "renew the broker's certificate",
            id="tls-expired",
        ),
        pytest.param(
            BrokerTLSError(MISLEADING, reason="CERTIFICATE_VERIFY_FAILED", verify_code=62, **TARGET),
            "TLS: the broker's certificate does not name the host 'broker.example'",
            "certificate that names broker.example",
            id="tls-host-name",
        ),
        pytest.param(
            BrokerTLSError(MISLEADING, reason="CERTIFICATE_VERIFY_FAILED", verify_code=20, **TARGET),
            "TLS: the broker's certificate is not trusted",
            "--cafile",
            id="tls-unknown-ca",
        ),
        pytest.param(
            BrokerTLSError(MISLEADING, reason="TLSV13_ALERT_CERTIFICATE_REQUIRED", **TARGET),
            "TLS: the broker requires a client certificate",
            "--certfile and --keyfile",
            id="tls-client-certificate-required",
        ),
        pytest.param(
            BrokerTLSError(MISLEADING, reason="TLSV1_ALERT_UNKNOWN_CA", **TARGET),
            "TLS: the broker does not accept the client certificate",
            "ssl_options.cacertfile",
            id="tls-client-certificate-refused",
        ),
        pytest.param(
            BrokerTLSError(MISLEADING, reason="WRONG_VERSION_NUMBER", **TARGET),
            "TLS: broker.example:5671 does not speak TLS",
            "use amqp:// for this port",
            id="tls-not-tls",
        ),
        pytest.param(
            BrokerTLSError(MISLEADING, reason="SSLV3_ALERT_HANDSHAKE_FAILURE", **TARGET),
            "TLS: the handshake failed",
            "may require a client certificate",
            id="tls-other",
        ),
        pytest.param(
            BrokerLoginRefusedError(
                MISLEADING, reply_code=ReplyCode.ACCESS_REFUSED, reply_text="ACCESS_REFUSED", **TARGET
            ),
            "login refused: wrong user name or password, or no such user",
            "rabbitmqctl authenticate_user",
            id="login",
        ),
        pytest.param(
            BrokerVhostRefusedError(
                MISLEADING, virtual_host="site", reply_code=ReplyCode.NOT_ALLOWED, reply_text="x", **TARGET
            ),
            "vhost refused: the vhost 'site' does not exist, or the user 'someone' may not use it",
            "rabbitmqctl list_vhosts    and    rabbitmqctl list_permissions -p site",
            id="vhost",
        ),
        pytest.param(
            BrokerUnreachableError(MISLEADING, errno=errno.ECONNREFUSED, reason="refused", **TARGET),
            "nothing is listening at broker.example:5671",
            "is RabbitMQ running there",
            id="connection-refused",
        ),
        pytest.param(
            BrokerUnreachableError(MISLEADING, errno=errno.EHOSTUNREACH, reason="No route to host", **TARGET),
            "cannot connect to broker.example:5671: No route to host",
            "firewalls",
            id="no-route",
        ),
        pytest.param(
            BrokerTimeoutError(MISLEADING, operation="connect", timeout=1.5, **TARGET),
            "timed out: no answer within 3s",
            "firewall",
            id="timeout",
        ),
        pytest.param(
            BrokerProtocolError(MISLEADING, **TARGET),
            "what answers at broker.example:5671 is not an AMQP 0-9-1 broker, or hung up",
            "use amqps://",
            id="protocol",
        ),
        pytest.param(
            BrokerConnectionLostError(MISLEADING, during_handshake=True, **TARGET),
            "what answers at broker.example:5671 is not an AMQP 0-9-1 broker, or hung up",
            "use amqps://",
            id="hung-up-in-handshake",
        ),
        pytest.param(
            BrokerConnectionLostError(
                MISLEADING,
                reply_code=ReplyCode.CONNECTION_FORCED,
                reply_text="CONNECTION_FORCED - bye",
                **TARGET,
            ),
            "RabbitMQ closed the connection: 320 CONNECTION_FORCED - bye",
            "the broker's log says why",
            id="closed-by-broker",
        ),
        pytest.param(BrokerConnectionError(MISLEADING, **TARGET), "cannot connect", None, id="base-class"),
    ],
)
def test_the_explanation_is_chosen_by_the_error_type_and_fields(
    error: BrokerConnectionError, summary: str, hint: str | None
) -> None:
    config = LayerConfig.build(
        host="amqps://someone:pw@broker.example:5671/site",
        ssl_context=ssl.create_default_context(),
        connect_timeout=3,
    )
    got_summary, hints = explain_connection_error(error, config.address, config)
    assert got_summary == summary
    if hint is None:
        assert hints == []
    else:
        assert any(hint in line for line in hints), hints


def test_only_a_refused_request_counts_as_a_missing_permission() -> None:
    refused = ReplyCode.ACCESS_REFUSED
    assert is_access_refused(BrokerRefusedError(refused, "ACCESS_REFUSED - no", "Queue.Bind"))
    assert is_access_refused(
        BrokerAccessRefusedError(MISLEADING, request="Queue.Declare", reply_code=refused, reply_text="no")
    )
    assert is_access_refused(
        BrokerConnectionLostError("publish refused", reply_code=refused, reply_text="no")
    )
    # The same code for a login is a wrong password, not a permission; the text decides nothing.
    assert not is_access_refused(BrokerLoginRefusedError(MISLEADING, reply_code=refused, reply_text="no"))
    assert not is_access_refused(BrokerRefusedError(ReplyCode.NOT_FOUND, MISLEADING, "Queue.Bind"))
    assert not is_access_refused(BrokerConnectionLostError(MISLEADING))


# A broker that works ------------------------------------------------------------------------------


def test_a_good_url_passes_every_step_with_the_readme_permissions(user: User) -> None:
    user.allow(*DOCUMENTED_PERMISSIONS)
    run = check(user.url())
    assert run.status == 0, run.output
    vhost = user.broker.vhost
    settings = run.line("ok    settings from the command line: 1 broker")
    assert "groups exchange 'groups'" in settings
    assert f"user '{user.name}', password ****, vhost '{vhost}', TLS off" in run.stdout
    assert f"login and vhost '{vhost}' accepted" in run.line("ok    connect to amqp://")
    assert re.search(r"RabbitMQ [34]\.", run.line("ok    connect to amqp://"))
    assert "nothing here that RabbitMQ 4.3 denies" in run.line("ok    versions and settings on amqp://")
    assert "deleted channels.check." in run.line("ok    permissions on amqp://")
    assert run.line("ok    layer: new_channel() connected")
    assert run.line("ok    layer: group round trip")
    assert run.line("ok    layer: direct round trip")
    assert "median" in run.line("ok    latency: 20 send -> receive round trips")
    assert "FAIL" not in run.output
    assert "skip" not in run.output
    assert run.stdout.splitlines()[-1] == "all checks passed"
    assert run.stderr == ""
    run.assert_hides(PASSWORD)


def test_a_queue_that_rabbitmq_4_3_denies_is_named_with_the_command_that_deletes_it(broker: Broker) -> None:
    """The transient shared roll call an older version of the layer left: a 4.3 node that holds
    one refuses to start once the denial is configured. (A 4.x broker configured as 4.3 refuses to
    make one: there, the check must find none.)"""
    vhost = f"{broker.vhost}_old_roll_call"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        url = broker.url_for(vhost=vhost)
        made = subprocess.run(
            [sys.executable, "-c", MAKE_TRANSIENT_SHARED_QUEUE, url, "channels.links:groups"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        run = check(url)
        if made.returncode == 0:
            assert run.status == 0, run.output
            line = run.line("WARN  versions and settings on amqp://")
            assert re.search(r"RabbitMQ [34]\.", line)
            assert f"rabbitmqctl delete_queue -p {vhost} 'channels.links:groups'" in run.stdout
            assert run.stdout.splitlines()[-1] == "all checks passed, 1 warning"
        else:  # denied, as RabbitMQ 4.3 does by default
            assert "transient_nonexcl_queues" in made.stdout + made.stderr
            assert run.line("ok    versions and settings on amqp://")
    finally:
        rabbitmqctl("delete_vhost", vhost)


MAKE_TRANSIENT_SHARED_QUEUE = """
import asyncio, sys
from urllib.parse import urlsplit, unquote
from pamqp import commands
from channels_rabbitmq.amqp.opening import connect
from channels_rabbitmq.amqp.protocol import Credentials

async def main(url, queue):
    parts = urlsplit(url)
    connection = await connect(
        parts.hostname, parts.port, Credentials(parts.username, parts.password), unquote(parts.path[1:]),
        ssl_context=None, timeout=10, heartbeat=60, client_properties={}, description="old layer",
        on_delivery=None, on_deliveries_done=lambda: None, on_lost=lambda *_: None,
    )
    await connection.open_channel(1, [])
    try:
        await connection.call(1, commands.Queue.Declare(queue=queue))
    except Exception as error:
        sys.exit(f"refused: {error}")
    await connection.close()

asyncio.run(main(*sys.argv[1:]))
"""


def test_several_urls_are_each_checked(broker: Broker) -> None:
    (port,) = free_ports(1)
    nowhere = f"amqp://guest:guest@127.0.0.1:{port}/{broker.vhost}"
    run = check(broker.url, nowhere)
    assert run.status == 1, run.output
    assert "2 brokers" in run.line("ok    settings")
    assert run.line(f"ok    connect to amqp://guest@127.0.0.1:{urlsplit(broker.url).port}/{broker.vhost}")
    assert run.line(f"FAIL  connect to amqp://guest@127.0.0.1:{port}/{broker.vhost}")
    assert run.line(f"skip  permissions on amqp://guest@127.0.0.1:{port}/{broker.vhost}: not connected")
    # One node works, so the layer itself is still checked: it connects to the node that answers.
    assert run.line("ok    layer: group round trip")
    assert run.line("ok    latency")
    assert run.stdout.splitlines()[-1] == "1 problem found"


# What goes wrong --------------------------------------------------------------------------------


def test_a_wrong_password_says_login_refused_and_never_shows_either_password(user: User) -> None:
    run = check(user.url(password=WRONG_PASSWORD))
    assert run.status == 1, run.output
    failure = run.line("FAIL  connect to")
    assert "login refused: wrong user name or password" in failure
    assert "hint: check the user name and password" in run.stdout
    assert run.line("skip  permissions on")
    assert run.line("skip  layer: no broker passed the checks above")
    assert run.line("skip  latency")
    assert run.stdout.splitlines()[-1] == "1 problem found"
    run.assert_hides(WRONG_PASSWORD, PASSWORD)


def assert_explains_a_refused_vhost(run: Run, user: User, vhost: str) -> None:
    """RabbitMQ refuses a missing vhost and one the user has no permission on alike (530): the
    explanation covers both, with the commands that tell them apart and those that fix each."""
    assert run.status == 1, run.output
    assert (
        f"vhost refused: the vhost '{vhost}' does not exist, or the user '{user.name}' may not use it"
        in run.line("FAIL  connect to")
    )
    assert f"rabbitmqctl list_vhosts    and    rabbitmqctl list_permissions -p {vhost}" in run.stdout
    assert f"rabbitmqctl add_vhost {vhost}" in run.stdout
    assert f"rabbitmqctl set_permissions -p {vhost} {user.name} " in run.stdout
    assert run.line("skip  permissions on")
    run.assert_hides(PASSWORD)


def test_an_unknown_vhost_is_explained_with_the_commands_to_tell_which(user: User) -> None:
    run = check(user.url(vhost="no-such-vhost"))
    assert_explains_a_refused_vhost(run, user, "no-such-vhost")


def test_a_user_without_access_to_the_vhost_is_told_the_permissions_to_grant(user: User) -> None:
    rabbitmqctl("clear_permissions", "-p", user.broker.vhost, user.name)
    run = check(user.url())
    assert_explains_a_refused_vhost(run, user, user.broker.vhost)


@pytest.mark.parametrize(
    ("permissions", "missing"),
    [
        (("", ".*", ".*"), "lacks the configure permission on queues named channels.*"),
        ((".*", "", ".*"), "lacks the write permission on queues named channels.*"),
        ((".*", ".*", ""), "lacks the read permission on queues named channels.*"),
        ((".*", ".*", r"^channels\..*$"), "lacks the read permission on the exchange 'groups'"),
        ((".*", r"^(groups|channels\..*)$", ".*"), "lacks the write permission on the default exchange"),
    ],
    ids=["configure", "write", "read", "read-on-the-exchange", "write-on-amq.default"],
)
def test_a_missing_permission_is_named(user: User, permissions: tuple[str, str, str], missing: str) -> None:
    user.allow(*permissions)
    run = check(user.url())
    assert run.status == 1, run.output
    assert run.line("ok    connect to")
    failure = run.line("FAIL  permissions on")
    assert missing in failure
    assert "ACCESS_REFUSED" in run.stdout
    assert "the layer needs configure on the exchange 'groups'" in run.stdout
    assert f"rabbitmqctl set_permissions -p {user.broker.vhost} {user.name} " in run.stdout
    assert run.line("skip  layer")
    assert run.stdout.splitlines()[-1] == "1 problem found"
    run.assert_hides(PASSWORD)


def test_nothing_listening_fails_at_once(user: User) -> None:
    (port,) = free_ports(1)
    run = check(f"amqp://{user.name}:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/x", "--timeout", "30")
    assert run.status == 1, run.output
    assert f"nothing is listening at 127.0.0.1:{port}" in run.line("FAIL  connect to")
    assert "is RabbitMQ running there" in run.stdout
    assert run.seconds < 10, "a refused connection is reported at once, not after the timeout"
    run.assert_hides(PASSWORD)


def test_a_server_that_never_answers_times_out_within_the_timeout(user: User) -> None:
    with socket.socket() as silent:  # the kernel accepts connections into the backlog: nobody speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        url = f"amqp://{user.name}:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/x"
        run = check(url, "--timeout", "0.5")
    assert run.status == 1, run.output
    assert "timed out: no answer within 0.5s" in run.line("FAIL  connect to")
    assert "firewall" in run.stdout
    assert run.seconds < 10
    run.assert_hides(PASSWORD)


# Django settings --------------------------------------------------------------------------------


def write_settings(directory: Path, name: str, layers: str) -> None:
    (directory / f"{name}.py").write_text(f"CHANNEL_LAYERS = {layers}\n")


def test_the_layer_of_a_django_settings_module_passes(broker: Broker, tmp_path: Path) -> None:
    layers = {
        "default": {"BACKEND": BACKEND, "CONFIG": {"host": broker.url, "groups_exchange": "check.groups"}},
    }
    write_settings(tmp_path, "site_settings", repr(layers))
    run = check("--settings", "site_settings", cwd=tmp_path)
    assert run.status == 0, run.output
    settings = run.line("ok    settings from CHANNEL_LAYERS['default'] in site_settings: 1 broker")
    assert "groups exchange 'check.groups'" in settings
    assert "declared the exchange 'check.groups'" in run.line("ok    permissions on")
    assert run.line("ok    layer: group round trip")
    assert run.stdout.splitlines()[-1] == "all checks passed"


def test_django_settings_module_from_the_environment_and_an_alias(broker: Broker, tmp_path: Path) -> None:
    layers = {
        "default": {"BACKEND": "channels.layers.InMemoryChannelLayer"},
        "rabbit": {"BACKEND": BACKEND, "CONFIG": {"host": [broker.url], "connect_timeout": 7}},
    }
    write_settings(tmp_path, "env_settings", repr(layers))
    run = check("--alias", "rabbit", cwd=tmp_path, env={"DJANGO_SETTINGS_MODULE": "env_settings"})
    assert run.status == 0, run.output
    assert "connect timeout 7s" in run.line("ok    settings from CHANNEL_LAYERS['rabbit'] in env_settings")
    assert run.stdout.splitlines()[-1] == "all checks passed"


def test_settings_whose_layer_is_another_backend_are_refused_plainly(tmp_path: Path) -> None:
    layers = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    write_settings(tmp_path, "memory_settings", repr(layers))
    run = check("--settings", "memory_settings", cwd=tmp_path)
    assert run.status == 1, run.output
    assert run.line("FAIL  settings") == (
        "FAIL  settings: CHANNEL_LAYERS['default'] in memory_settings uses "
        f"channels.layers.InMemoryChannelLayer, not {BACKEND}"
    )
    assert "skip  connect, permissions, layer, latency: the settings are not usable" in run.stdout
    assert run.stdout.splitlines()[-1] == "1 problem found"


def test_settings_with_a_wrong_password_never_show_it(user: User, tmp_path: Path) -> None:
    layers = {"default": {"BACKEND": BACKEND, "CONFIG": {"host": user.url(password=WRONG_PASSWORD)}}}
    write_settings(tmp_path, "wrong_settings", repr(layers))
    run = check("--settings", "wrong_settings", cwd=tmp_path)
    assert run.status == 1, run.output
    assert "login refused" in run.line("FAIL  connect to")
    run.assert_hides(WRONG_PASSWORD, PASSWORD)


def test_a_settings_module_that_cannot_be_imported_is_explained(tmp_path: Path) -> None:
    run = check("--settings", "no_such_settings_module", cwd=tmp_path)
    assert run.status == 1, run.output
    assert "cannot import the settings module no_such_settings_module" in run.line("FAIL  settings")
    assert "manage.py" in run.stdout


# TLS --------------------------------------------------------------------------------------------

TLS_USER = "cli-tls-user"
TLS_PASSWORD = "Tls/cli%S3cret@pw"  # no ":" (RabbitMQ 4 reads "x:y" in rabbitmq.conf as encrypted)


@dataclass
class TlsBroker:
    ca: CertificateAuthority
    client: Issued
    node: Node  # requires a client certificate signed by ``ca``

    @property
    def url(self) -> str:
        return self.node.url(host="localhost", username=TLS_USER, password=TLS_PASSWORD)


def start_tls_broker(nodes: Nodes) -> TlsBroker:
    """One extra node with a TLS listener only, which requires a client certificate."""
    certs = nodes.directory / "certs"  # handed to the rabbitmq user with the node's files
    ca = CertificateAuthority(certs, "cli-check-test-ca")
    server = ca.issue("server", "localhost", server=True, dns_names=("localhost",))
    node = nodes.add(
        tls=True,
        settings={
            "ssl_options.cacertfile": nodes.distribution.inside(ca.cert),
            "ssl_options.certfile": nodes.distribution.inside(server.cert),
            "ssl_options.keyfile": nodes.distribution.inside(server.key),
            "ssl_options.verify": "verify_peer",
            "ssl_options.fail_if_no_peer_cert": "true",
            "default_user": TLS_USER,
            "default_pass": TLS_PASSWORD,
        },
    )
    client = ca.issue("client", "cli-check-client", server=False)
    nodes.start()
    return TlsBroker(ca, client, node)


@pytest.fixture(scope="module", autouse=True)
def tls_node_starting(request: pytest.FixtureRequest) -> Iterator[Future[TlsBroker] | None]:
    """Start the TLS node in a thread as soon as this module's tests begin, if any of them needs it:
    it takes seconds to boot, and the tests without TLS run meanwhile."""
    wanted = any(
        "tls" in item.fixturenames for item in request.session.items if item.module is request.module
    )
    if not wanted or unavailable_reason() is not None:
        yield None
        return
    # On exit the pool waits for the start to end, then the nodes are stopped and deleted.
    with Nodes("cli-tls") as nodes, ThreadPoolExecutor(1, thread_name_prefix="tls-node") as pool:
        yield pool.submit(start_tls_broker, nodes)


@pytest.fixture
def tls(tls_node_starting: Future[TlsBroker] | None) -> TlsBroker:
    if tls_node_starting is None:
        pytest.skip(f"cannot run an extra RabbitMQ node: {unavailable_reason()}")
    try:
        return tls_node_starting.result(timeout=100)
    except NodeError as error:
        pytest.fail(f"the TLS test node did not come up: {error}", pytrace=False)


def test_tls_with_the_ca_and_a_client_certificate_passes(tls: TlsBroker) -> None:
    run = check(
        tls.url,
        "--cafile",
        str(tls.ca.cert),
        "--certfile",
        str(tls.client.cert),
        "--keyfile",
        str(tls.client.key),
    )
    assert run.status == 0, run.output
    assert f"TLS on, CA file {tls.ca.cert}, client certificate {tls.client.cert}" in run.stdout
    assert "accepted over TLS" in run.line("ok    connect to amqps://")
    assert run.stdout.splitlines()[-1] == "all checks passed"
    run.assert_hides(TLS_PASSWORD)


def test_tls_without_the_ca_says_the_certificate_is_not_trusted(tls: TlsBroker) -> None:
    run = check(tls.url, "--certfile", str(tls.client.cert), "--keyfile", str(tls.client.key))
    assert run.status == 1, run.output
    assert "TLS on, the system's CA certificates" in run.stdout
    assert "TLS: the broker's certificate is not trusted" in run.line("FAIL  connect to amqps://")
    assert "--cafile" in run.stdout
    run.assert_hides(TLS_PASSWORD)


def test_tls_without_a_client_certificate_says_one_is_required(tls: TlsBroker) -> None:
    run = check(tls.url, "--cafile", str(tls.ca.cert))
    assert run.status == 1, run.output
    # TLS 1.3 (the default): the broker's alert names what is missing.
    assert "TLS: the broker requires a client certificate" in run.line("FAIL  connect to amqps://")
    assert "--certfile and --keyfile" in run.stdout
    run.assert_hides(TLS_PASSWORD)


def test_plain_amqp_to_a_tls_port_suggests_amqps(tls: TlsBroker) -> None:
    run = check(tls.url.replace("amqps://", "amqp://"), "--timeout", "5")
    assert run.status == 1, run.output
    assert "is not an AMQP 0-9-1 broker" in run.line("FAIL  connect to amqp://")
    assert "if this is a TLS port, use amqps://" in run.stdout
    assert run.stderr == ""  # the connection's own error log is not repeated
    run.assert_hides(TLS_PASSWORD)


def test_tls_from_settings_uses_their_ssl_context(tls: TlsBroker, tmp_path: Path) -> None:
    context = (
        f"ssl.create_default_context(cafile={str(tls.ca.cert)!r})",
        f"load_cert_chain({str(tls.client.cert)!r}, {str(tls.client.key)!r})",
    )
    (tmp_path / "tls_settings.py").write_text(
        "import ssl\n\n"
        f"context = {context[0]}\n"
        f"context.{context[1]}\n"
        "CHANNEL_LAYERS = {'default': {\n"
        f"    'BACKEND': {BACKEND!r},\n"
        f"    'CONFIG': {{'host': {tls.url!r}, 'ssl_context': context}},\n"
        "}}\n"
    )
    run = check("--settings", "tls_settings", cwd=tmp_path)
    assert run.status == 0, run.output
    assert "verifies the broker's certificate and host name; trusts CA cli-check-test-ca" in run.stdout
    assert run.stdout.splitlines()[-1] == "all checks passed"
    run.assert_hides(TLS_PASSWORD)
