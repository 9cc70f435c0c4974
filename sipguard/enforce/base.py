"""The enforcers' shared ground: the `Enforcer` protocol every backend satisfies and the value types and
timeout arithmetic they share.

Backends (`ipset`, `nftables`, `dryrun`) import only this module (and the helpers of their own family,
`hook`, `ipsetnl`), never each other, as sshguard's `src/fw/*` backends share only `fw.h`.
Enforcers never decide who is banned; they apply what they are given. `sync` makes the enforcer's
view equal to the given bans both ways (after a restart, reboot or flush).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from ..model import Ban


@dataclass(frozen=True, slots=True)
class EnforcedEntry:
    """What the enforcer itself holds for one address: `timeout` seconds left, None = no timeout."""

    ip: str
    timeout: float | None


@dataclass(frozen=True, slots=True)
class SyncReport:
    added: int = 0
    removed: int = 0
    repaired: int = 0


class Enforcer(Protocol):
    name: str

    def refuses(self, ip: str) -> str | None:
        """Why this backend cannot hold `ip` at all (e.g. an ipset and a /0), or None."""
        ...

    def ban(self, ban: Ban, now: float) -> None: ...

    def ban_many(self, bans: list[Ban], now: float) -> None: ...

    def unban(self, ip: str) -> None: ...

    def sync(self, bans: list[Ban], now: float) -> SyncReport: ...

    def entries(self) -> list[EnforcedEntry]: ...

    def close(self) -> None: ...


# The kernel caps ipset entry timeouts at (2^31 - 1) ms = 2,147,483 s (about 24.8 days) and silently
# clamps longer ones. A longer ban is armed with the cap and re-armed by every `sync` (the daemon
# runs one each [enforce] resync_interval), so it never lapses while the daemon runs; when the daemon
# is down longer than the cap, it comes back at the next start (setup() syncs).
IPSET_MAX_TIMEOUT = 2_147_483
SYNC_TOLERANCE = 2.0  # seconds: a kernel timeout this close to the ban's remaining time is right


def kernel_timeout(ban: Ban, now: float, cap: int | None = None) -> int | None:
    """Whole seconds to arm a kernel entry with: 0 = permanent, None = already expired (skip)."""
    if ban.expires is None:
        return 0
    left = ban.expires - now
    if math.isnan(left) or left <= 0:  # a NaN expiry (a row written by something else): skip it
        return None
    if math.isinf(left):
        return 0
    secs = max(1, math.ceil(left))
    return min(secs, cap) if cap else secs


def needs_rearm(kernel: float | None, want: int) -> bool:
    """True when a kernel entry's timeout (None/0 = permanent) is not the one the ban wants."""
    k = kernel or 0
    if (k == 0) != (want == 0):
        return True
    return want != 0 and abs(k - want) > SYNC_TOLERANCE
