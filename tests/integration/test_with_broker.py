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

import contextlib
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

from testbed.brokers import nodes
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


def processes_of_node(node_name: str) -> list[int]:
    """The processes of the node: the Erlang VM and its helpers have its name in their environment."""
    marker = f"RABBITMQ_NODENAME={node_name}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def kill_node_processes(node_name: str) -> None:
    for pid in processes_of_node(node_name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def private_node() -> Iterator[tuple[str, Path]]:
    """A name and a folder for a private node of the test's own; whatever it leaves is killed."""
    reason = nodes.unavailable_reason()
    if reason is not None:
        pytest.fail(f"this test starts a private node: {reason}")
    name = f"ct{secrets.token_hex(3)}wb@localhost"
    directory = Path(tempfile.mkdtemp(prefix="channels-rabbitmq-with-broker-", dir=nodes.reachable_tmp()))
    try:
        yield name, directory
    finally:
        kill_node_processes(name)
        shutil.rmtree(directory, ignore_errors=True)


class Output:
    """A subprocess's output, kept in a file."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())

    def __call__(self) -> str:
        self.file.flush()
        self.file.seek(0)
        return self.file.read().decode(errors="replace")

    def close(self) -> None:
        self.file.close()


def with_broker(
    private_node: tuple[str, Path], amqp_url: str, command: list[str], output: Output
) -> subprocess.Popen[bytes]:
    """scripts/with-broker in a session of its own, as a terminal's foreground job: Ctrl-C hits the group."""
    name, directory = private_node
    env = {key: value for key, value in os.environ.items() if not key.startswith("RABBITMQ_")}
    env.update(AMQP_URL=amqp_url, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(WITH_BROKER), "--node-dir", str(directory), "--node-name", name, "--", *command],
        env=env,
        stdout=output.file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def ctrl_c(process: subprocess.Popen[bytes]) -> int:
    os.killpg(process.pid, signal.SIGINT)
    return process.wait(timeout=120)


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


def test_make_demo_on_a_private_node_and_ctrl_c_stops_everything(
    not_a_broker: int, private_node: tuple[str, Path]
) -> None:
    name, _ = private_node
    demo_ports = nodes.free_ports(2)
    output = Output()
    serve = [sys.executable, str(REPO / "example" / "serve.py"), "--ports", *map(str, demo_ports)]
    process = with_broker(private_node, f"amqp://guest:guest@127.0.0.1:{not_a_broker}/%2F", serve, output)
    try:
        wait_for(lambda: "Ctrl-C stops everything" in output(), "the demo was not up", output, 150)
        started = re.search(r"private RabbitMQ node \S+ on port (\d+)", output())
        assert started, output()
        node_port = int(started.group(1))
        assert node_port != not_a_broker, "the node must not try the port something else holds"
        assert nodes.port_answers(node_port)
        assert processes_of_node(name), "the node's processes are not to be found"
        with urllib.request.urlopen(f"http://127.0.0.1:{demo_ports[0]}/", timeout=10) as page:
            assert page.status == 200

        status = ctrl_c(process)
        assert status == 0, output()
        assert output().rstrip().endswith("with-broker: stopped"), output()
        assert not [port for port in (*demo_ports, node_port) if nodes.port_answers(port)], output()
        assert processes_of_node(name) == [], output()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        output.close()


def test_ctrl_c_while_the_node_is_starting_leaves_no_node(private_node: tuple[str, Path]) -> None:
    name, _ = private_node
    output = Output()
    free_port = nodes.free_ports(1)[0]
    process = with_broker(
        private_node, f"amqp://guest:guest@127.0.0.1:{free_port}/%2F", ["sleep", "60"], output
    )
    try:
        wait_for(lambda: "starting a private RabbitMQ node" in output(), "no node was started", output, 30)
        time.sleep(0.5)  # rabbitmq-server is launching the Erlang VM, which takes seconds to boot
        status = ctrl_c(process)
        assert status == 130, output()
        assert output().rstrip().endswith("with-broker: stopped"), output()
        time.sleep(1)  # a VM the launcher would start after all would show by now
        assert processes_of_node(name) == [], output()
        assert not nodes.port_answers(free_port), output()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        output.close()


def test_without_rabbitmq_and_without_root_it_prints_the_install_command() -> None:
    # A copy of the script and of what it imports, readable by an unprivileged user.
    project = Path(tempfile.mkdtemp(prefix="channels-rabbitmq-no-broker-", dir=nodes.reachable_tmp()))
    try:
        (project / "scripts").mkdir()
        (project / "testbed" / "brokers").mkdir(parents=True)
        shutil.copy(WITH_BROKER, project / "scripts" / "with-broker")
        for name in ("testbed/__init__.py", "testbed/brokers/__init__.py", "testbed/brokers/nodes.py"):
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
