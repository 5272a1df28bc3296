"""Logging helpers: warnings that can repeat under load are rate-limited."""

from __future__ import annotations

import logging
import time


class RateLimitedLogger:
    """Log at most one record per ``interval`` seconds; count and report what was skipped."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last = float("-inf")
        self._skipped = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._skipped += 1
            return
        if self._skipped:
            message += f" (and {self._skipped} more like it in the last {self.interval:g}s)"
        self._last = now
        self._skipped = 0
        self.logger.warning(message, *args)
