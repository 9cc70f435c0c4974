"""What a long-running process of sipguard's sets up for itself: the daemon's (`sipguard run`) and the
fleet reader's (sipguard/cluster/reader.py). Never called in a test's process or a CLI command's."""

from __future__ import annotations

import gc

GC_YOUNG = 10_000
"""Allocations between two young-generation collections in the daemon's process (Python's default: 700)."""


def tune_gc() -> None:
    """For a daemon's own process (`sipguard run`, the fleet reader's process), never a test's: what
    start-up made (imports, config, filters) is moved out of the collector's way (`gc.freeze`), and the
    young generation is collected every GC_YOUNG allocations. A burst keeps 100,000 bans and their
    rows alive for a moment: with the defaults the collector scanned them again and again (a third of
    the daemon's CPU in a fleet burst, bench/fleet_apply.py). Cycles are still collected, later."""
    gc.collect()
    gc.freeze()
    _young, mid, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG, mid, old)
