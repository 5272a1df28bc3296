"""``scripts/with-broker``, which ``make test`` and ``make demo`` run their commands under.

- A broker that answers at ``AMQP_URL`` is used as it is.
- When none answers and ``rabbitmq-server`` is installed, a private node is started (on
  another port when the URL's port is taken by something that is not a broker), the command
  runs against it, and Ctrl-C stops the command and then the node: here the command is the
  demo, as in ``make demo``.
- When none answers and RabbitMQ is not installed (and we may not install it), the exact
  command to install it is printed and the exit status is 1.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.brokers import nodes
from tests.conftest import Broker

REPO = Path(__file__).resolve().parents[2]
WITH_BROKER = REPO / "scripts" / "with-broker"

PRINT_AMQP_URL = "import os; print(os.environ['AMQP_URL'])"

pytestmark = pytest.mark.timeout(180)


def wait_for(condition: Callable[[], bool], what: str, output: Callable[[], str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout:g}s:\n{output()}")
        time.sleep(0.1)


@pytest.fixture
def not_a_broker() -> Iterator[int]:
    """A port taken by a server that answers like an HTTP server, not like an AMQP broker."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    stopping = threading.Event()

    def serve() -> None:
        while not stopping.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection:
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stopping.set()
        server.close()
        thread.join(5)


def test_a_broker_that_answers_is_used_as_it_is(broker: Broker) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(WITH_BROKER),
            "--",
            sys.executable,
            "-c",
            "import os; print(os.environ['AMQP_URL'])",
        ],
        env={**os.environ, "AMQP_URL": broker.url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == broker.url
    assert "starting a private RabbitMQ node" not in result.stderr


def test_make_demo_on_a_private_node_and_ctrl_c_stops_everything(not_a_broker: int) -> None:
    reason = nodes.unavailable_reason()
    if reason is not None:
        pytest.fail(f"this test starts a private node: {reason}")
    node_name = f"ct{secrets.token_hex(3)}wb@localhost"
    node_dir = Path(tempfile.mkdtemp(prefix="channels-rabbitmq-with-broker-", dir=nodes.reachable_tmp()))
    demo_ports = nodes.free_ports(2)
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed below)

    def output() -> str:
        log.flush()
        log.seek(0)
        return log.read().decode(errors="replace")

    command = [sys.executable, str(WITH_BROKER), "--node-dir", str(node_dir), "--node-name", node_name]
    command += ["--", sys.executable, str(REPO / "example" / "serve.py"), "--ports", *map(str, demo_ports)]
    env = {key: value for key, value in os.environ.items() if not key.startswith("RABBITMQ_")}
    env.update(AMQP_URL=f"amqp://guest:guest@127.0.0.1:{not_a_broker}/%2F", PYTHONUNBUFFERED="1")
    # A session of its own, as a terminal's foreground job: Ctrl-C goes to the whole group.
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "Ctrl-C stops everything" in output(), "the demo was not up", output, 120)
        started = re.search(r"private RabbitMQ node \S+ on port (\d+)", output())
        assert started, output()
        node_port = int(started.group(1))
        assert node_port != not_a_broker, "the node must not try the port something else holds"
        assert nodes.port_answers(node_port)
        with urllib.request.urlopen(f"http://127.0.0.1:{demo_ports[0]}/", timeout=10) as page:
            assert page.status == 200

        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C
        status = process.wait(timeout=90)
        assert status == 0, output()
        assert output().rstrip().endswith("with-broker: stopped"), output()
        assert not [port for port in (*demo_ports, node_port) if nodes.port_answers(port)], output()
        leftovers = subprocess.run(["pgrep", "-f", node_name], capture_output=True, text=True, check=False)
        assert leftovers.stdout.strip() == "", f"processes of the node are left: {leftovers.stdout}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        subprocess.run(["pkill", "-KILL", "-f", node_name], check=False)
        log.close()
        shutil.rmtree(node_dir, ignore_errors=True)


def test_without_rabbitmq_and_without_root_it_prints_the_install_command() -> None:
    # A copy of the script and of what it imports, readable by an unprivileged user.
    project = Path(tempfile.mkdtemp(prefix="channels-rabbitmq-no-broker-", dir=nodes.reachable_tmp()))
    try:
        (project / "scripts").mkdir()
        (project / "tests" / "brokers").mkdir(parents=True)
        shutil.copy(WITH_BROKER, project / "scripts" / "with-broker")
        for name in ("tests/__init__.py", "tests/brokers/__init__.py", "tests/brokers/nodes.py"):
            shutil.copy(REPO / name, project / name)
        for path in [project, *project.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        free_port = nodes.free_ports(1)[0]
        result = subprocess.run(
            ["/usr/bin/python3", str(project / "scripts" / "with-broker"), "--", "true"],
            env={"PATH": "/usr/bin:/bin", "AMQP_URL": f"amqp://guest:guest@127.0.0.1:{free_port}/%2F"},
            user="nobody",
            cwd=project,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        shutil.rmtree(project, ignore_errors=True)
    assert result.returncode == 1, result.stderr
    assert "rabbitmq-server is not installed" in result.stderr
    assert "sudo apt-get install rabbitmq-server" in result.stderr
