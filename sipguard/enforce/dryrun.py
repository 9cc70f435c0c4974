"""The dry-run enforcer: remembers and logs what it would do, touches no kernel state.

Used by `sipguard run --dry-run` and by every test about decisions rather than packets. What it holds
lives in its own memory, which nothing else can change: its `drift` check always finds nothing.
"""

from __future__ import annotations

import logging
import time

from ..model import Ban
from .base import EnforcedEntry, SyncReport

log = logging.getLogger("sipguard.enforce")


class DryRunEnforcer:
    name = "dryrun"

    def __init__(self) -> None:
        self._entries: dict[str, float | None] = {}  # ip -> absolute expiry (None: permanent)

    def refuses(self, ip: str) -> str | None:
        return None

    def ban(self, ban: Ban, now: float) -> None:
        self._entries[ban.ip] = ban.expires
        log.info("dry-run: would ban %s (%s) for %s", ban.ip, ban.reason,
                 "ever" if ban.expires is None else f"{ban.remaining(now):.0f}s")

    def ban_many(self, bans: list[Ban], now: float) -> None:
        for ban in bans:
            self._entries[ban.ip] = ban.expires
        log.info("dry-run: would ban %d addresses", len(bans))

    def unban(self, ip: str) -> None:
        if self._entries.pop(ip, "absent") != "absent":
            log.info("dry-run: would unban %s", ip)

    def sync(self, bans: list[Ban], now: float) -> SyncReport:
        want = {b.ip: b.expires for b in bans}
        self._expire(now)
        added = len(want.keys() - self._entries.keys())
        removed = len(self._entries.keys() - want.keys())
        self._entries = dict(want)
        return SyncReport(added=added, removed=removed)

    def drift(self, now: float) -> list[str]:
        """Nothing outside this object holds its entries, so they cannot drift."""
        return []

    def entries(self) -> list[EnforcedEntry]:
        now = time.time()
        self._expire(now)
        return [EnforcedEntry(ip, None if exp is None else exp - now) for ip, exp in sorted(self._entries.items())]

    def contains(self, ip: str) -> bool:
        """Whether this object holds `ip` (it is the only place a dry run's bans are)."""
        self._expire(time.time())
        return ip in self._entries

    def _expire(self, now: float) -> None:
        for ip in [ip for ip, exp in self._entries.items() if exp is not None and exp <= now]:
            del self._entries[ip]

    def close(self) -> None:
        pass
