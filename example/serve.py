#!/usr/bin/env python3
"""Serve the chat demo from two ASGI server processes (uvicorn) that share only RabbitMQ.

    python example/serve.py [--ports 8001 8002]

Prints both URLs once both servers answer; Ctrl-C (or SIGTERM) stops both. The broker is
``AMQP_URL`` (default: the local one); ``make demo`` starts one when none answers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class Stop(Exception):
    """Ctrl-C, SIGTERM or SIGHUP: stop the servers."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_stopping = False


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def start_server(port: int) -> subprocess.Popen[bytes]:
    """One uvicorn process, in a session of its own: only this script decides when it stops."""
    env = {**os.environ, "CHAT_SERVER_NAME": str(port), "PYTHONPATH": str(HERE)}
    command = [sys.executable, "-m", "uvicorn", "chatsite.asgi:application", "--host", HOST]
    command += ["--port", str(port), "--timeout-graceful-shutdown", "3", "--lifespan", "off"]
    return subprocess.Popen(
        command, cwd=HERE, env=env, start_new_session=True, preexec_fn=_terminate_when_parent_dies
    )


def _terminate_when_parent_dies() -> None:
    """In each server, before it starts: SIGTERM when this script dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_until_serving(servers: dict[int, subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    waiting = set(servers)
    while waiting:
        for port in list(waiting):
            if servers[port].poll() is not None:
                raise RuntimeError(f"the server on port {port} exited (status {servers[port].returncode})")
            if answers(port):
                waiting.discard(port)
        if time.monotonic() > deadline:
            raise RuntimeError(f"port(s) {sorted(waiting)} did not answer within {START_TIMEOUT:g}s")
        time.sleep(0.2)


def stop_servers(servers: dict[int, subprocess.Popen[bytes]]) -> None:
    for server in servers.values():
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for server in servers.values():
        try:
            server.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def raise_stop(signum: int, frame: FrameType | None) -> None:
    """The first stop signal interrupts the main loop; the next ones must not interrupt the stopping."""
    global _stopping
    if not _stopping:
        _stopping = True
        raise Stop


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ports", type=int, nargs=2, default=[8001, 8002], metavar=("FIRST", "SECOND"))
    ports = parser.parse_args().ports
    taken = [port for port in ports if not port_is_free(port)]
    if taken:
        print(f"port(s) {taken} are taken on {HOST} (is the demo already running?)", file=sys.stderr)
        return 1

    for number in STOP_SIGNALS:
        signal.signal(number, raise_stop)
    servers: dict[int, subprocess.Popen[bytes]] = {}
    try:
        for port in ports:
            servers[port] = start_server(port)
        wait_until_serving(servers)
        print("\nThe chat demo is up on two servers that share only RabbitMQ:", flush=True)
        for port in ports:
            print(f"    http://{HOST}:{port}/", flush=True)
        print("Open both, join the same room, and chat. Ctrl-C stops everything.\n", flush=True)
        while True:
            for port, server in servers.items():
                if server.poll() is not None:
                    raise RuntimeError(f"the server on port {port} exited (status {server.returncode})")
            time.sleep(0.5)
    except Stop:
        print("\nStopping the servers...", flush=True)
        return 0
    except RuntimeError as error:
        print(f"demo: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        with contextlib.suppress(Stop):  # the first stop signal, if it comes only now, ends this call...
            stop_servers(servers)
        stop_servers(servers)  # ...and this one finishes the job (later signals are ignored)


if __name__ == "__main__":
    sys.exit(main())
