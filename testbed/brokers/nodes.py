"""Extra RabbitMQ nodes on this machine, each with its own name, ports, data, logs and config.

The main node (``rabbit@...`` on 5672) is never touched: every extra node gets a unique
name (``ct<token><n>@localhost``), an AMQP (or TLS) port and an Erlang distribution port
of its own, and a private directory holding its ``rabbitmq.conf``, an empty plugin list
(so the management and prometheus listeners never start), its data and its logs.

On Debian the ``rabbitmq-server`` and ``rabbitmqctl`` scripts, run as root, switch to the
``rabbitmq`` user with ``HOME=/var/lib/rabbitmq``: extra nodes and every CLI call then
share that user's Erlang cookie, the same one the main node uses. The node directory is
handed over to that user before the node starts, so it can read its config and keys.

Use :class:`Nodes` as a context manager: on exit (normal or not) every node it started is
stopped and its directory deleted.

The nodes are of this machine's RabbitMQ, or, when ``RABBITMQ_ROOT`` names a folder that holds
another Debian with its own ``rabbitmq-server`` (``scripts/rabbitmq4`` makes one with 4.x), of
that one: every command then runs under ``chroot``, the nodes' files live inside that folder, and
each node is configured as RabbitMQ 4.3 runs by default (:data:`RABBITMQ_4_SETTINGS`, and the
Khepri metadata store). Both kinds share epmd and the loopback, so they run side by side.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

RABBITMQ_USER = "rabbitmq"
STARTED_LINE = "Server startup complete"
FAILED_MARKERS = ("BOOT FAILED", "eaddrinuse")
_PORT_RANGE = (20000, 32000)  # below the ephemeral range (32768+), so no client socket takes them
#: rabbitmq.conf lines that give a 4.x node RabbitMQ 4.3's defaults: what 4.3 deprecates is denied.
RABBITMQ_4_SETTINGS = {
    "deprecated_features.permit.transient_nonexcl_queues": "false",
    "deprecated_features.permit.global_qos": "false",
    "deprecated_features.permit.classic_queue_mirroring": "false",
    "deprecated_features.permit.ram_node_type": "false",
}

T = TypeVar("T")


class NodeError(RuntimeError):
    """A node did not start, stop or answer; the message carries what its log said."""


class Distribution:
    """Where the RabbitMQ programs come from: this machine's (``root`` None), or the Debian in
    the folder ``root``, run under ``chroot`` (see ``scripts/rabbitmq4``)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root

    @classmethod
    def from_environment(cls) -> Distribution:
        """``RABBITMQ_ROOT`` when set (and not empty), else this machine's."""
        root = os.environ.get("RABBITMQ_ROOT")
        return cls(Path(root).resolve() if root else None)

    def __repr__(self) -> str:
        return f"<Distribution {self.root or 'this machine'}>"

    @property
    def is_chroot(self) -> bool:
        return self.root is not None

    def argv(self, *command: str) -> list[str]:
        """A command of this distribution (``rabbitmqctl``, ...), as run from this machine."""
        return ["chroot", str(self.root), *command] if self.root is not None else list(command)

    def inside(self, path: Path) -> str:
        """``path`` (of this machine) as the distribution's programs see it."""
        if self.root is None:
            return str(path)
        return "/" + str(path.resolve().relative_to(self.root))

    def temp_directory(self) -> str:
        """Where nodes' folders go: somewhere the distribution's rabbitmq user can reach."""
        if self.root is None:
            return reachable_tmp()
        return str(self.root / "tmp")

    def user_ids(self) -> tuple[int, int]:
        """The uid and gid of the rabbitmq user the nodes run as, in this distribution."""
        if self.root is None:
            entry = pwd.getpwnam(RABBITMQ_USER)
            return entry.pw_uid, entry.pw_gid
        for line in (self.root / "etc" / "passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == RABBITMQ_USER:
                return int(fields[2]), int(fields[3])
        raise NodeError(f"there is no {RABBITMQ_USER} user in {self.root}")

    def settings(self) -> dict[str, str]:
        """rabbitmq.conf lines every node of this distribution gets."""
        return dict(RABBITMQ_4_SETTINGS) if self.root is not None else {}

    def unavailable_reason(self) -> str | None:
        """Why extra nodes of this distribution cannot run here, or None when they can."""
        if os.geteuid() != 0:
            return "extra RabbitMQ nodes are started as root (the Debian scripts then switch to rabbitmq)"
        if self.root is not None:
            if not (self.root / "usr" / "sbin" / "rabbitmq-server").exists():
                return f"{self.root} holds no rabbitmq-server: make it with scripts/rabbitmq4 build"
            mount_system_folders(self.root)
        else:
            for tool in ("rabbitmq-server", "rabbitmqctl"):
                if shutil.which(tool) is None:
                    return f"{tool} is not installed"
        try:
            self.user_ids()
        except (KeyError, NodeError):
            return f"there is no {RABBITMQ_USER} user to run the nodes as"
        return None


def mount_system_folders(root: Path) -> None:
    """Bind-mount /proc and /dev into a chroot folder, unless they are there already (idempotent)."""
    mounted = Path("/proc/self/mounts").read_text()
    for folder in ("proc", "dev"):
        target = root / folder
        if f" {target} " not in mounted:
            target.mkdir(exist_ok=True)
            subprocess.run(["mount", "--bind", f"/{folder}", str(target)], check=True, timeout=30)


def unavailable_reason() -> str | None:
    """Why extra nodes cannot run on this machine, or None when they can."""
    return Distribution.from_environment().unavailable_reason()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_answers(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections at host:port now."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def free_ports(count: int, *, taken: Iterable[int] = (), consecutive: bool = False) -> list[int]:
    """``count`` ports nobody listens on (on 127.0.0.1 and, when available, ::1)."""
    avoid = set(taken)
    for _ in range(1000):
        if consecutive:
            start = random.randrange(*_PORT_RANGE)
            candidates = list(range(start, start + count))
        else:
            candidates = random.sample(range(*_PORT_RANGE), count)
        if avoid.intersection(candidates):
            continue
        if all(port_is_free(port) and _free_on_ipv6(port) for port in candidates):
            return candidates
    raise NodeError(f"found no {count} free port(s)")


def _free_on_ipv6(port: int) -> bool:
    if not socket.has_ipv6:
        return True
    try:
        return port_is_free(port, "::1")
    except OSError:  # no IPv6 loopback here
        return True


def run(argv: list[str], *, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a command in a process group of its own; on timeout kill that whole group.

    The RabbitMQ scripts run ``su``, a shell and an Erlang VM under one another: killing
    only the first would leave the others behind.
    """
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise NodeError(
            f"{' '.join(argv)} did not finish within {timeout:g}s:\n{stdout}{stderr}".rstrip()
        ) from None
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def _parallel(function: Callable[[T], Any], items: Iterable[T]) -> None:
    """Call ``function`` on every item at once; raise the first error after all have finished."""
    errors: list[BaseException] = []

    def call(item: T) -> None:
        try:
            function(item)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=call, args=(item,), daemon=True) for item in items]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


class Node:
    """One extra RabbitMQ node. Made by :meth:`Nodes.add`."""

    def __init__(
        self,
        name: str,
        directory: Path,
        cli_env: dict[str, str],
        *,
        tls: bool = False,
        listen: str = "127.0.0.1",
        settings: dict[str, str] | None = None,
        distribution: Distribution | None = None,
    ) -> None:
        self.name = name
        self.distribution = distribution or Distribution.from_environment()
        self.directory = directory
        self.tls = tls
        self.listen = listen
        self.settings = dict(settings or {})
        self.port = 0  # the AMQP (or, with tls, AMQPS) port
        self.dist_port = 0
        self.started_seconds: float | None = None
        self._cli_env = cli_env
        self._log_offset = 0
        self._launcher_output = ""
        self._pid: int | None = None
        self._launched = False

    def __repr__(self) -> str:
        return f"<Node {self.name} port={self.port}>"

    @property
    def pid_file(self) -> Path:
        return self.directory / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.directory / "log" / f"{self.name}.log"

    @property
    def config_file(self) -> Path:
        return self.directory / "rabbitmq.conf"

    def url(
        self,
        *,
        host: str = "127.0.0.1",
        username: str = "guest",
        password: str = "guest",
        vhost: str = "/",
        port: int | None = None,
    ) -> str:
        scheme = "amqps" if self.tls else "amqp"
        netloc = f"{quote(username, safe='')}:{quote(password, safe='')}@{host}:{port or self.port}"
        return f"{scheme}://{netloc}/{quote(vhost, safe='')}"

    # Files ----------------------------------------------------------------------------------

    def allocate_ports(self, taken: Iterable[int] = ()) -> None:
        self.port, self.dist_port = free_ports(2, taken=taken)

    def write_files(self) -> None:
        (self.directory / "data").mkdir(parents=True, exist_ok=True)
        (self.directory / "log").mkdir(parents=True, exist_ok=True)
        listener = f"{self.listen}:{self.port}"
        lines = {
            "listeners.tcp": "none" if self.tls else None,
            "listeners.tcp.default": None if self.tls else listener,
            "listeners.ssl.default": listener if self.tls else None,
            "log.console": "false",
            "log.file.level": "info",
            **self.distribution.settings(),
            **self.settings,
        }
        self.config_file.write_text(
            "".join(f"{key} = {value}\n" for key, value in lines.items() if value is not None)
        )
        (self.directory / "enabled_plugins").write_text("[].\n")  # no management, no prometheus
        (self.directory / "rabbitmq-env.conf").write_text("# settings come from the environment\n")

    def _env(self) -> dict[str, str]:
        inside = self.distribution.inside
        env = {key: value for key, value in os.environ.items() if not key.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=inside(self.directory / "data"),
            RABBITMQ_LOG_BASE=inside(self.directory / "log"),
            RABBITMQ_PID_FILE=inside(self.pid_file),
            RABBITMQ_CONFIG_FILE=inside(self.config_file),
            RABBITMQ_ADVANCED_CONFIG_FILE=inside(self.directory / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=inside(self.directory / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=inside(self.directory / "rabbitmq-env.conf"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_CRASH_DUMP=inside(self.directory / "erl_crash.dump"),
        )
        return env

    # Life cycle -----------------------------------------------------------------------------

    def launch(self) -> None:
        """``rabbitmq-server -detached``: returns at once, the node boots in the background."""
        self._log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        self.pid_file.unlink(missing_ok=True)  # a stale one would look like a node that died
        (self.directory / "erl_crash.dump").unlink(missing_ok=True)  # and a stale dump like a crash
        self._pid = None
        self.started_seconds = None
        self._launched_at = time.monotonic()
        self._launched = True
        result = run(self.distribution.argv("rabbitmq-server", "-detached"), env=self._env(), timeout=60)
        self._launcher_output = (result.stdout + result.stderr).strip()
        if result.returncode != 0:
            raise NodeError(f"rabbitmq-server -detached for {self.name} failed:\n{self._launcher_output}")

    def wait_started(self, timeout: float = 90) -> None:
        """Wait for the log's "Server startup complete"; fail early, with the log, if the node died."""
        deadline = time.monotonic() + timeout
        while True:
            log = self._new_log()
            if STARTED_LINE in log:
                self.started_seconds = time.monotonic() - self._launched_at
                return
            pid = self.pid
            died = pid is not None and not _alive(pid)
            if died or any(marker in log for marker in FAILED_MARKERS):
                raise NodeError(f"{self.name} failed to start{self.diagnostics()}")
            if (self.directory / "erl_crash.dump").exists():
                raise NodeError(f"{self.name} crashed while starting (erl_crash.dump){self.diagnostics()}")
            if time.monotonic() > deadline:
                raise NodeError(f"{self.name} did not start within {timeout:g}s{self.diagnostics()}")
            time.sleep(0.1)

    def start(self, timeout: float = 90, *, taken: Iterable[int] = ()) -> None:
        """Launch and wait; once more on fresh ports if someone took ours meanwhile. A node of a
        4.x distribution then switches to the Khepri metadata store, as 4.2 and later run."""
        for attempt in range(2):
            self.launch()
            try:
                self.wait_started(timeout)
                if self.distribution.is_chroot:
                    self.ctl("enable_feature_flag", "--opt-in", "khepri_db", timeout=timeout)
                return
            except NodeError:
                if attempt == 1 or "eaddrinuse" not in self._new_log():
                    raise
                self.terminate()
                self.allocate_ports(taken)
                self.write_files()
                hand_over(self.directory, self.distribution)

    def ctl(self, *args: str, timeout: float = 90) -> str:
        """``rabbitmqctl -n <this node> <args>``; its stdout, or NodeError."""
        argv = self.distribution.argv("rabbitmqctl", "-q", "-n", self.name, *args)
        result = run(argv, env=self._cli_env, timeout=timeout)
        if result.returncode != 0:
            raise NodeError(
                f"rabbitmqctl -n {self.name} {' '.join(args)} failed ({result.returncode}): "
                f"{(result.stdout + result.stderr).strip()}{self.diagnostics()}"
            )
        return result.stdout

    def stop(self, timeout: float = 60) -> None:
        """``rabbitmqctl stop <pid file>``: a clean shutdown; returns once the process is gone."""
        if not self.is_running:
            return
        try:
            self.ctl("stop", self.distribution.inside(self.pid_file), timeout=timeout)
        except NodeError:
            self.terminate()
        self._wait_gone(timeout)

    def terminate(self, timeout: float = 30) -> None:
        """SIGTERM (RabbitMQ then shuts down cleanly), SIGKILL if it takes too long."""
        pid = self.pid
        if pid is None:
            if self._launched:  # launched, but no pid file (yet): ask it by name, if it answers
                with contextlib.suppress(NodeError):
                    self.ctl("stop", timeout=timeout)
            return
        if not _alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        try:
            self._wait_gone(timeout)
        except NodeError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._wait_gone(10)

    def _wait_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.is_running:
            if time.monotonic() > deadline:
                raise NodeError(f"{self.name} (pid {self.pid}) is still running after {timeout:g}s")
            time.sleep(0.05)

    @property
    def pid(self) -> int | None:
        """The node's OS process: from its pid file, remembered (the node deletes it when stopping)."""
        try:
            self._pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            pass
        return self._pid

    @property
    def is_running(self) -> bool:
        pid = self.pid
        return pid is not None and _alive(pid)

    # Diagnostics ----------------------------------------------------------------------------

    def _new_log(self) -> str:
        try:
            with self.log_file.open("rb") as file:
                file.seek(self._log_offset)
                return file.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        text = self._new_log() or "(empty: the node wrote no log)"
        return "\n".join(text.splitlines()[-lines:])

    def crash_slogan(self, wait: float = 3) -> str | None:
        """Why the VM halted, from ``erl_crash.dump`` (configuration errors never reach the log)."""
        dump = self.directory / "erl_crash.dump"
        deadline = time.monotonic() + wait
        while dump.exists():
            with dump.open("rb") as file:
                for line in file.read(64 * 1024).decode(errors="replace").splitlines():
                    if line.startswith("Slogan:"):
                        return line
            if time.monotonic() > deadline:
                return "(erl_crash.dump has no Slogan line)"
            time.sleep(0.1)
        return None

    def diagnostics(self) -> str:
        launcher = f"\nrabbitmq-server said: {self._launcher_output}" if self._launcher_output else ""
        slogan = self.crash_slogan()
        crash = f"\n--- erl_crash.dump: {slogan}" if slogan else ""
        return (
            f"\n--- {self.name}: port {self.port}, dist port {self.dist_port}, {self.directory}"
            f"{launcher}{crash}\n--- tail of {self.log_file}:\n{self.log_tail()}"
        )


def reachable_tmp() -> str:
    """The temp directory, if the rabbitmq user can reach into it (TMPDIR=/root/... cannot); else /tmp."""
    path = Path(tempfile.gettempdir()).resolve()
    for parent in [path, *path.parents]:
        if not parent.stat().st_mode & 0o001:
            return "/tmp"
    return str(path)


def hand_over(directory: Path, distribution: Distribution | None = None) -> None:
    """Give the node's files to the rabbitmq user the node runs as."""
    uid, gid = (distribution or Distribution.from_environment()).user_ids()
    os.chown(directory, uid, gid)
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


class Nodes:
    """A set of extra nodes, started together (in parallel) and always cleaned up.

    ::

        with Nodes("cluster") as nodes:
            first, second = nodes.add(), nodes.add()
            nodes.start()
            nodes.cluster()
    """

    def __init__(self, purpose: str = "nodes", distribution: Distribution | None = None) -> None:
        self.distribution = distribution = distribution or Distribution.from_environment()
        reason = distribution.unavailable_reason()
        if reason is not None:
            raise NodeError(reason)
        self.token = secrets.token_hex(3)
        self.directory = Path(
            tempfile.mkdtemp(prefix=f"channels-rabbitmq-{purpose}-", dir=distribution.temp_directory())
        )
        self.nodes: list[Node] = []
        self.started_seconds: float | None = None  # launch to every node up
        self.clustered_seconds: float | None = None  # forming the cluster, after that
        ctl_port = free_ports(11, consecutive=True)[0]
        self.cli_env = {key: value for key, value in os.environ.items() if not key.startswith("RABBITMQ_")}
        # CLI calls get a distribution port range of their own, not the machine-wide 35672-35682.
        self.cli_env.update(
            RABBITMQ_CTL_DIST_PORT_MIN=str(ctl_port), RABBITMQ_CTL_DIST_PORT_MAX=str(ctl_port + 10)
        )
        self._closed = False
        atexit.register(self.close)

    def __enter__(self) -> Nodes:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __getitem__(self, index: int) -> Node:
        return self.nodes[index]

    def add(
        self, *, tls: bool = False, listen: str = "127.0.0.1", settings: dict[str, str] | None = None
    ) -> Node:
        """A new node (not started yet); its ports are chosen now, so tests can name them.

        ``tls``: its one listener is AMQPS (give the ``ssl_options.*`` in ``settings``);
        ``listen``: the address it listens on; ``settings``: more ``rabbitmq.conf`` lines.
        """
        index = len(self.nodes) + 1
        name = f"ct{self.token}{index}@localhost"
        node = Node(
            name,
            self.directory / f"node{index}",
            self.cli_env,
            tls=tls,
            listen=listen,
            settings=settings,
            distribution=self.distribution,
        )
        node.allocate_ports(self._ports())
        self.nodes.append(node)
        return node

    def _ports(self) -> set[int]:
        return {port for node in self.nodes for port in (node.port, node.dist_port)}

    def start(self, timeout: float = 90) -> None:
        """Start every node at once and wait for all of them."""
        started = time.monotonic()
        for node in self.nodes:
            node.write_files()
        hand_over(self.directory, self.distribution)
        _parallel(lambda node: node.start(timeout, taken=self._ports()), self.nodes)
        self.started_seconds = time.monotonic() - started

    def cluster(self, timeout: float = 90) -> None:
        """Join every other node to the first: ``stop_app``, ``join_cluster``, ``start_app``."""
        started = time.monotonic()
        first = self.nodes[0]

        others = self.nodes[1:]
        _parallel(lambda node: node.ctl("stop_app", timeout=timeout), others)
        for node in others:  # one at a time: joins change the cluster's membership tables
            node.ctl("join_cluster", first.name, timeout=timeout)
        _parallel(lambda node: node.ctl("start_app", timeout=timeout), others)
        running = first.ctl("eval", "rabbit_nodes:all_running().", timeout=timeout)
        missing = [node.name for node in self.nodes if node.name not in running]
        if missing:
            raise NodeError(f"{missing} are not running in the cluster of {first.name}: {running}")
        self.clustered_seconds = time.monotonic() - started

    def close(self) -> None:
        """Stop every node still running (in parallel), then delete their files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            _parallel(Node.terminate, self.nodes)
        finally:
            leftovers = [node.name for node in self.nodes if node.is_running]
            if not leftovers:
                shutil.rmtree(self.directory, ignore_errors=True)
        if leftovers:
            raise NodeError(f"could not stop {leftovers}; their files stay in {self.directory}")
