"""The enforcer stack: the kernel enforcer first (it stops the attack), then its mirrors (Kamailio's
htable), composed by the composition root into one `Enforcer`.

A mirror's failure is logged and counted, never raised: the ban stands in the kernel and the next
resync repairs the mirror. What the stack can hold, and what it holds, is the kernel's.

User bans (the office policy: one user at one address, `Ban.user`) go to the mirrors that hold them
(Kamailio's htable, `holds_users`) and never to the kernel: the other users of that address keep
working. There the mirror is the only enforcer, so its errors reach the ban book (which counts them and
retries at the next resync).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..model import Ban
from .base import EnforcedEntry, Enforcer, SyncReport

log = logging.getLogger("sipguard.enforce")


class EnforcerStack:
    def __init__(self, primary: Enforcer, mirrors: Sequence[Enforcer]) -> None:
        self.primary = primary
        self.mirrors = tuple(mirrors)
        self.name = primary.name
        self.mirror_errors = 0

    def _each_mirror(self, op: str, call) -> None:  # call: Callable[[Enforcer], object]
        for m in self.mirrors:
            try:
                call(m)
            except Exception as exc:  # noqa: BLE001
                self.mirror_errors += 1
                log.error("%s %s failed: %s", m.name, op, exc)

    @property
    def holds_users(self) -> bool:
        """Does a mirror hold user bans (the htable mirror does)?"""
        return any(getattr(m, "holds_users", False) for m in self.mirrors)

    def _user_mirrors(self) -> list:
        return [m for m in self.mirrors if getattr(m, "holds_users", False)]

    def ban_users(self, bans: list[Ban], now: float) -> None:
        """Hold user bans (Ban.user set) in the mirrors that can; never the kernel."""
        for m in self._user_mirrors():
            m.ban_users(bans, now)

    def unban_user(self, ip: str, user: str) -> None:
        for m in self._user_mirrors():
            m.unban_user(ip, user)

    def sync_users(self, bans: list[Ban], now: float) -> None:
        """Make the mirrors hold exactly these user bans."""
        for m in self._user_mirrors():
            m.sync_users(bans, now)

    def refuses(self, ip: str) -> str | None:
        return self.primary.refuses(ip)

    def ban(self, ban: Ban, now: float) -> None:
        self.primary.ban(ban, now)
        self._each_mirror("ban", lambda m: m.ban(ban, now))

    def ban_many(self, bans: list[Ban], now: float) -> None:
        self.primary.ban_many(bans, now)
        self._each_mirror("ban_many", lambda m: m.ban_many(bans, now))

    def unban(self, ip: str) -> None:
        self.primary.unban(ip)
        self._each_mirror("unban", lambda m: m.unban(ip))

    def sync(self, bans: list[Ban], now: float) -> SyncReport:
        report = self.primary.sync(bans, now)
        self._each_mirror("sync", lambda m: m.sync(bans, now))
        return report

    def entries(self) -> list[EnforcedEntry]:
        return self.primary.entries()

    def contains(self, ip: str) -> bool:
        return self.primary.contains(ip)

    def drift(self, now: float) -> list[str]:
        """The kernel's drift (a mirror is repaired by the resync a drift triggers, and each resync_interval)."""
        return self.primary.drift(now)

    def close(self) -> None:
        self.primary.close()
        self._each_mirror("close", lambda m: m.close())
