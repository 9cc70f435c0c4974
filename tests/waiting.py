"""The tests' one way to wait: poll a condition until it holds or a deadline passes (never a blind sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(cond: Callable[[], object], timeout: float = 5.0, interval: float = 0.01) -> float:
    """Seconds it took `cond()` to become true; AssertionError after `timeout` seconds."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(interval)
    raise AssertionError(f"condition not met in {timeout}s")
