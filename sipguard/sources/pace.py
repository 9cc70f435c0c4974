"""Pacing of a follower's batches: while lines keep coming, at most one batch per `interval`.

A writer that appends a line at a time (rsyslog writes each message as it gets it) wakes a follower
for every line: at a busy edge's few hundred lines/s the daemon would run a whole batch (parse, score,
one store transaction, housekeeping) for one or two lines, and that per-batch cost was most of its
CPU. A Pacer makes the follower wait, before it looks again, until `interval` has passed since it
handed out the previous batch, so the lines written meanwhile go out together:

- the first line after a quiet spell (no batch in the last `interval`) goes out at once, so an idle
  daemon's ban latency is unchanged; under a steady stream a line waits at most `interval` more;
- a batch cut by the read budget (a backlog: catching up, a burst) is followed at once;
- `poke()` (the follower's `wake()`: a CLI request, the fleet, `stop`) ends a wait at once.
"""

from __future__ import annotations

import threading
import time

BATCH_INTERVAL = 0.05
"""Seconds between two batches of a steady stream of lines (at most 20 batches/s)."""


class Pacer:
    """Before a follower looks for lines: `hold(deadline)`; after it handed a batch out: `handed()`."""

    def __init__(self, interval: float = BATCH_INTERVAL) -> None:
        if interval < 0:
            raise ValueError("the batch interval cannot be negative")
        self.interval = interval
        self._next = 0.0  # monotonic time before which the next batch is not looked for
        self._poked = threading.Event()

    def hold(self, deadline: float) -> None:
        """Wait until the interval since the last batch has passed (never past `deadline`, the poll's
        own timeout), or until poked."""
        left = min(self._next, deadline) - time.monotonic()
        if left > 0 and not self._poked.is_set():
            self._poked.wait(left)
        self._poked.clear()

    def handed(self, lines: bool, backlog: bool) -> None:
        """A poll returned: with lines (`backlog`: more are waiting, read at once) or without."""
        self._next = time.monotonic() + self.interval if lines and not backlog else 0.0

    def poke(self) -> None:
        """End the current or the next hold now (from any thread)."""
        self._poked.set()
