"""The check's output: one line per step, the problems counted, every known secret hidden."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TextIO
from urllib.parse import quote, unquote

OK = "ok    "
WARN = "WARN  "
FAIL = "FAIL  "
SKIP = "skip  "
MORE = "      "  # the lines that belong to the one above


class Report:
    """Prints one line per step, counts the problems, and hides every known secret.

    Nothing here formats a password in the first place; hiding is the safety net for
    text that comes from elsewhere (exception messages, logs).
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.problems = 0
        self.warnings = 0
        self._secrets: set[str] = set()

    def hide(self, secrets: Iterable[str]) -> None:
        self._secrets.update(secrets)

    def redact(self, text: str) -> str:
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, "****")
        return text

    def ok(self, what: str, *details: str) -> None:
        self._write(OK, what, details)

    def warn(self, what: str, *details: str) -> None:
        """Works now, but something needs attention (an upgrade would break it, say): printed and
        counted, without failing the check."""
        self.warnings += 1
        self._write(WARN, what, details)

    def fail(self, what: str, *hints: str) -> None:
        self.problems += 1
        self._write(FAIL, what, hints)

    def skip(self, what: str, reason: str) -> None:
        self._write(SKIP, f"{what}: {reason}", ())

    def finish(self) -> int:
        """Print the last line; the exit status: 0 when every check passed, else 1."""
        warned = ""
        if self.warnings:
            warned = f", {self.warnings} warning{'' if self.warnings == 1 else 's'}"
        if self.problems:
            plural = "" if self.problems == 1 else "s"
            self._print(f"{self.problems} problem{plural} found{warned}")
            return 1
        self._print(f"all checks passed{warned}")
        return 0

    def _write(self, prefix: str, what: str, more: Iterable[str]) -> None:
        self._print(prefix + what)
        for line in more:
            self._print(MORE + line)

    def _print(self, line: str) -> None:
        print(self.redact(line), file=self.out, flush=True)


class RedactingFormatter(logging.Formatter):
    """Log lines (the layer's warnings, asyncio's errors) pass through the report's hiding too."""

    def __init__(self, report: Report) -> None:
        super().__init__(MORE + "log: %(levelname)s %(name)s: %(message)s")
        self.report = report

    def format(self, record: logging.LogRecord) -> str:
        return self.report.redact(super().format(record))


def passwords_in(url: object) -> set[str]:
    """The password of an AMQP URL in every spelling it may show up in (raw, decoded, encoded).

    The password is taken after the first ":" of the credentials, which end at the last
    "@", as :func:`~channels_rabbitmq.config.parse_amqp_url` does. The default
    ``guest``, a password equal to the user name (printed anyway) and very short ones
    (hiding them would garble every line) are left alone.
    """
    if not isinstance(url, str):
        return set()
    _scheme, separator, rest = url.partition("://")
    userinfo, at, _location = rest.rpartition("@")
    if separator and not at:  # its "@" percent-encoded or left out: the password may run to the end
        userinfo = rest
    if not separator or ":" not in userinfo:
        return set()
    username, _, raw = userinfo.partition(":")
    if not at and raw.split("/", 1)[0].isdigit():
        return set()  # host:port
    spellings = {raw, unquote(raw), quote(unquote(raw), safe="")}
    return {
        secret
        for secret in spellings
        if len(secret) >= 4 and secret != "guest" and secret not in (username, unquote(username))
    }
