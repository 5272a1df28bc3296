"""The measurements the benchmarks, the soak and the tests share: one percentile, one memory reading."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of sorted samples: the smallest sample that at least ``fraction``
    of them do not exceed (``ordered[ceil(fraction * n) - 1]``). Raises ``ValueError`` when empty."""
    if not ordered:
        raise ValueError("no samples")
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be from 0 to 1, got {fraction}")
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def resident_kib(pid: int | str = "self") -> int | None:
    """The resident set size of a process in KiB (VmRSS from /proc), or None where it cannot be read."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None
