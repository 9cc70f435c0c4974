"""Steps of the wall clock: whether the wall clock jumped against the monotonic clock, and by how much.

A ban's end is a wall-clock instant (the store's `expires`), but a ban lasts real time: the kernel's
entries carry relative timeouts, which a step of the wall clock (NTP or chrony correcting a wrong
clock, an operator's `date -s`) does not move. `ClockWatch` tells the daemon when the wall clock
stepped and by how much, by comparing it with CLOCK_MONOTONIC, which is never stepped. On Linux both
clocks run at the same NTP-disciplined rate, so their difference changes only when the wall clock is
stepped (or the host was suspended: the monotonic clock does not count the time asleep), never by
drift.

The daemon keeps a reference (the boot, and wall minus monotonic) in the store's meta, so a start
after a step that happened while it was down knows of the step too. Only within one boot: after a
reboot the monotonic clock starts again and the kernel holds no entries anyway.

This module only measures: it never changes a ban (the ban book does) and never reads or writes the
store (the daemon stores the reference it hands out).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

STEP_THRESHOLD = 2.0
"""Seconds: a smaller jump is not treated as a step (a leap second; the kernel's timeouts are whole
seconds and a resync tolerates 2 s anyway)."""

MADE_SLACK = 0.5
"""Seconds: a ban made this close around the span in which the step can have happened (in the new
clock) is taken as made in the new clock."""

CLOCK_META = "clock"
"""Store meta key of the reference the daemon saves (`ClockRef.dumps`)."""

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    """This boot's id ("" when it cannot be read: then no reference from an earlier run is trusted)."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True, slots=True)
class ClockRef:
    """The wall clock's place against the monotonic clock: wall minus monotonic, in seconds, in `boot`."""

    boot: str
    offset: float

    def dumps(self) -> str:
        return json.dumps({"boot": self.boot, "offset": self.offset})

    @classmethod
    def loads(cls, text: str | None) -> ClockRef | None:
        """The reference `dumps` wrote, or None (nothing saved, or not readable)."""
        if not text:
            return None
        try:
            data = json.loads(text)
            return cls(str(data["boot"]), float(data["offset"]))
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True, slots=True)
class Step:
    """The wall clock jumped `seconds` (forward when positive) against the monotonic clock.

    `since`: the earliest instant, in the new clock, at which the step can have happened (less
    MADE_SLACK): a ban created from then on was made in the new clock, after the step, and must not
    be moved; None when that cannot be told (the step happened while the daemon was down).
    """

    seconds: float
    since: float | None


def describe(seconds: float) -> str:
    """A step for the log: '+2h00m00s', '-0m05s'."""
    sign = "+" if seconds >= 0 else "-"
    s = round(abs(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{sign}{h}h{m:02d}m{s:02d}s" if h else f"{sign}{m}m{s:02d}s"


class ClockWatch:
    """Looks at the wall clock against the monotonic clock; one per daemon, on the loop's thread."""

    def __init__(self, threshold: float = STEP_THRESHOLD, wall: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic, boot: Callable[[], str] = boot_id) -> None:
        self.threshold = threshold
        self._wall = wall
        self._mono = mono
        w, m = self._read()
        self.ref = ClockRef(boot(), w - m)  # the clock the bans are in
        self._agreed = m  # monotonic time of the last look that found no step

    def now(self) -> float:
        """The wall clock, as the bans are kept in it."""
        return self._wall()

    def _read(self) -> tuple[float, float]:
        m0 = self._mono()
        w = self._wall()
        return w, (m0 + self._mono()) / 2

    def look(self) -> Step | None:
        """The step since the reference, or None. A step stays seen until `accept`."""
        w, m = self._read()
        d = (w - m) - self.ref.offset
        if abs(d) < self.threshold:
            self._agreed = m
            return None
        # the step happened after the last look that agreed: in the new clock, not before this
        return Step(d, w - (m - self._agreed) - MADE_SLACK)

    def made_after(self, step: Step) -> tuple[float, float] | None:
        """The span of `created` (new clock) of the bans made after `step`, up to now, or None."""
        return None if step.since is None else (step.since, self.now() + MADE_SLACK)

    def after(self, step: Step) -> ClockRef:
        """The reference once `step` is dealt with (what the daemon stores with the moved bans)."""
        return ClockRef(self.ref.boot, self.ref.offset + step.seconds)

    def accept(self, step: Step) -> None:
        """The bans were moved by `step`: the new clock is the reference."""
        self.ref = self.after(step)
        self._agreed = self._read()[1]

    def since(self, saved: ClockRef | None) -> Step | None:
        """At start: the step between the reference an earlier run saved and now (same boot), or None."""
        if saved is None or not saved.boot or saved.boot != self.ref.boot:
            return None
        d = self.ref.offset - saved.offset
        if abs(d) < self.threshold:
            return None
        return Step(d, None)
