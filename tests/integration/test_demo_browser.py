"""The chat demo in a real browser: two servers, two pages, one room.

``example/serve.py`` starts the demo's two uvicorn servers on the run's vhost, as
``make demo`` does (on free ports, so a running demo does not get in the way). Headless
Chromium (Debian's ``chromium``, driven by Playwright) opens the same room once on each
server; what is typed in one page must appear in the other, marked with the server it was
sent through and the server that relayed it. Screenshots of both pages are saved under
``artifacts/``. Ctrl-C (SIGINT) to serve.py must stop both servers.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Locator, Page, expect, sync_playwright

from testbed.brokers.nodes import free_ports, port_answers
from tests.conftest import Broker

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts"
START_TIMEOUT = 40.0
SEEN_TIMEOUT_MS = 10_000

#: What a root, sandbox-less, offline machine needs (Playwright adds --headless and a fresh profile).
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.timeout(120)


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Chromium is not installed: `make test` installs it (apt-get install chromium)")
    return path


class Demo:
    """``example/serve.py`` on two free ports, its output kept in a file."""

    def __init__(self, broker_url: str) -> None:
        self.ports = free_ports(2)  # below the ephemeral range: no client socket takes them meanwhile
        self.log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "example" / "serve.py"), "--ports", *map(str, self.ports)],
            env={**os.environ, "AMQP_URL": broker_url, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def url(self, index: int, room: str) -> str:
        return f"http://127.0.0.1:{self.ports[index]}/?room={room}"

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while "Ctrl-C stops everything" not in self.output():
            if self.process.poll() is not None:
                pytest.fail(f"serve.py exited with {self.process.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the demo was not up within {START_TIMEOUT:g}s:\n{self.output()}")
            time.sleep(0.1)

    def interrupt(self) -> int:
        """Ctrl-C, as a person would press it; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=30)
        finally:
            self.log.close()


@pytest.fixture
def demo(broker: Broker) -> Iterator[Demo]:
    demo = Demo(broker.url)
    try:
        demo.wait_until_up()
        yield demo
    finally:
        output = demo.output() if not demo.log.closed else ""
        status = demo.interrupt()
    assert status == 0, f"serve.py exited with {status} after Ctrl-C:\n{output}"
    assert "Traceback" not in output, output
    still_serving = [port for port in demo.ports if port_answers(port)]
    assert not still_serving, f"Ctrl-C left servers on {still_serving}:\n{output}"


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def open_room(browser: Browser, url: str, errors: list[str]) -> Page:
    """A page of its own (a fresh context: its own cookies), in the room, ready to send."""
    page = browser.new_context().new_page()
    page.on("console", lambda message: _record_error(message, url, errors))
    page.on("pageerror", lambda error: errors.append(f"{url}: {error}"))
    page.goto(url)
    expect(page.locator("#status")).to_contain_text("In room", timeout=SEEN_TIMEOUT_MS)
    expect(page.locator("#send")).to_be_enabled()
    return page


def _record_error(message: ConsoleMessage, url: str, errors: list[str]) -> None:
    if message.type == "error":
        errors.append(f"{url}: {message.text}")


def chat_line(page: Page, text: str) -> Locator:
    return page.locator("#log li.chat", has_text=text)


def test_a_message_typed_on_one_server_appears_on_the_other(demo: Demo, browser: Browser) -> None:
    room = f"room-{secrets.token_hex(3)}"
    first_port, second_port = demo.ports
    errors: list[str] = []
    first = open_room(browser, demo.url(0, room), errors)
    second = open_room(browser, demo.url(1, room), errors)
    expect(first.locator("#server")).to_have_text(f"server {first_port}")
    expect(second.locator("#server")).to_have_text(f"server {second_port}")

    # Typed in the page on the first server, over its websocket.
    greeting = f"hello from {first_port} {secrets.token_hex(4)}"
    first.fill("#name", "alice")
    first.fill("#message", greeting)
    first.press("#message", "Enter")
    arrived = chat_line(second, greeting)
    expect(arrived).to_be_visible(timeout=SEEN_TIMEOUT_MS)
    expect(arrived).to_contain_text(f"alice: {greeting}")
    expect(arrived).to_contain_text(f"sent via server {first_port}")
    expect(arrived).to_contain_text(f"relayed to you by server {second_port}")
    expect(chat_line(first, greeting)).to_contain_text(f"relayed to you by server {first_port}")

    # Posted from the page on the second server through the sync view (async_to_sync).
    answer = f"answer via the sync view {secrets.token_hex(4)}"
    second.fill("#name", "bob")
    second.fill("#message", answer)
    second.click("#post")
    arrived = chat_line(first, answer)
    expect(arrived).to_be_visible(timeout=SEEN_TIMEOUT_MS)
    expect(arrived).to_contain_text("bob (sync view)")
    expect(arrived).to_contain_text(f"sent via server {second_port}")
    expect(arrived).to_contain_text(f"relayed to you by server {first_port}")

    # Each page shows each line once: one group binding per server, one copy per socket.
    for page in (first, second):
        expect(page.locator("#log li.chat")).to_have_count(2)

    ARTIFACTS.mkdir(exist_ok=True)
    first.screenshot(path=ARTIFACTS / "demo-chat-first-server.png", full_page=True)
    second.screenshot(path=ARTIFACTS / "demo-chat-second-server.png", full_page=True)
    assert not errors, errors


def test_another_room_does_not_get_the_message(demo: Demo, browser: Browser) -> None:
    errors: list[str] = []
    here = open_room(browser, demo.url(0, f"here-{secrets.token_hex(3)}"), errors)
    elsewhere = open_room(browser, demo.url(1, f"elsewhere-{secrets.token_hex(3)}"), errors)
    here_line, elsewhere_line = f"only here {secrets.token_hex(4)}", f"only elsewhere {secrets.token_hex(4)}"
    here.fill("#message", here_line)
    here.press("#message", "Enter")
    elsewhere.fill("#message", elsewhere_line)
    elsewhere.press("#message", "Enter")
    expect(chat_line(here, here_line)).to_be_visible(timeout=SEEN_TIMEOUT_MS)
    expect(chat_line(elsewhere, elsewhere_line)).to_be_visible(timeout=SEEN_TIMEOUT_MS)
    expect(here.locator("#log li.chat")).to_have_count(1)
    expect(elsewhere.locator("#log li.chat")).to_have_count(1)
    assert not errors, errors
