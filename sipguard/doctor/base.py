"""The types every doctor check shares: the host being checked (`Host`) and what a check found
(`Finding`).

A check is a small function `check(host) -> list[Finding]`. `Host` names everything a check reads,
so tests point it at a temp root, a temp state directory or a network namespace: the config, the
state directory, the root under which /etc/systemd and /etc/rsyslog* are read, the time, how far
back the log is looked at. Nothing here changes anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import Config
from ..text import printable as _printable

def printable(text: object) -> str:
    """`text` (a path, a log line, an error) as it may reach a terminal: sipguard.text's escaping rule."""
    return _printable("" if text is None else str(text))


Status = Literal["ok", "problem", "warning", "skipped"]
STATUSES: tuple[Status, ...] = ("ok", "problem", "warning", "skipped")


@dataclass(frozen=True)
class Finding:
    """One line of the doctor's answer.

    `status`: ok, problem (counted in the exit status), warning (worth a look, not counted) or
    skipped (does not apply here: e.g. no [cluster]). `fix` is what to do, exactly (a command or
    the line to change), for problems and warnings; None when there is nothing to do.
    """

    check: str
    status: Status
    message: str
    fix: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"check": self.check, "status": self.status, "message": self.message, "fix": self.fix,
                "details": self.details}


def ok(check: str, message: str, **details: Any) -> Finding:
    return Finding(check, "ok", message, None, details)


def problem(check: str, message: str, fix: str, **details: Any) -> Finding:
    return Finding(check, "problem", message, fix, details)


def warning(check: str, message: str, fix: str, **details: Any) -> Finding:
    return Finding(check, "warning", message, fix, details)


def skipped(check: str, message: str, **details: Any) -> Finding:
    return Finding(check, "skipped", message, None, details)


STORM_RATE = 1000
"""Lines per second a storm makes Kamailio log (a pike flood, a scanner): a rate limit that lets
fewer through drops the evidence sipguard bans on."""

FRESH = 3600.0
"""A followed log Kamailio has not written for this long is stale (phones re-register every few
minutes, so a live Kamailio logs far more often)."""

HEARTBEAT_STALE = 10.0
"""A daemon heartbeat older than this is stale (the same limit `sipguard status` uses)."""

CLOCK_TOLERANCE = 5.0
"""Seconds the newest log timestamp may differ from the host clock (whole-second formats, rsyslog's
queue) before it is called clock skew."""


@dataclass
class Host:
    """What the doctor looks at. `root` is where host config files are read (/ on a real host)."""

    cfg: Config
    state_dir: Path
    root: Path = Path("/")
    now: float = field(default_factory=time.time)
    hours: float = 6.0  # how far back the log contract is looked for
    tail_bytes: int = 32 << 20  # at most this much of each followed log is read
    kernel: bool = True  # look at the kernel (sets, hook); False: skip those checks
    env: dict[str, str] = field(default_factory=dict)  # environment (SSH_CONNECTION); tests inject it
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def path(self, absolute: str) -> Path:
        """`absolute` (e.g. /etc/rsyslog.conf) under `root`."""
        return self.root / absolute.lstrip("/")

    def cached(self, key: str, make: Any) -> Any:
        """`make()` once per host and key (the log sample is read once for several checks)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]
