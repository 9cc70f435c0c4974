"""The enforcers' shared ground: the `Enforcer` protocol every backend satisfies and the value types and
timeout arithmetic they share.

Backends (`ipset`, `nftables`, `dryrun`) import only this module (and the helpers of their own family,
`hook`, `ipsetnl`), never each other, as sshguard's `src/fw/*` backends share only `fw.h`.
Enforcers never decide who is banned; they apply what they are given. `sync` makes the enforcer's
view equal to the given bans both ways (after a restart, reboot or flush). An entry the kernel refuses
never fails the others: a backend applies the rest of the batch, reports the refused ones (`SyncReport.failed`,
logged once) and from then on `refuses` them. `drift` is the cheap check the daemon runs every
[enforce] check_interval: the kernel's sets, hook and member counts against the `Ledger` of what this
enforcer asked it to hold; it reads, never changes anything, and never raises for a kernel it cannot read
(that is a problem it reports).
"""

from __future__ import annotations

import math
import random
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
    failed: int = 0  # entries the kernel refused (the others were applied)


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

    def contains(self, ip: str) -> bool:
        """Whether the kernel holds exactly `ip` (an address or CIDR as stored) in the set it belongs in,
        asked of the kernel now (never of what this enforcer remembers): `sipguard why`. False when the
        set does not exist; an error (SipguardError) when the kernel cannot be read."""
        ...

    def drift(self, now: float) -> list[str]:
        """What differs between the kernel and what this enforcer last asked it to hold (sets, hook rules,
        member counts), one short phrase each; empty when nothing does. Cheap, read-only, never raises."""
        ...

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


EXPIRY_SLACK = SYNC_TOLERANCE + 1.0
"""Seconds: an entry this close to its expiry may be gone from the kernel already (timeouts are armed in
whole seconds and re-armed only beyond SYNC_TOLERANCE)."""
EXPIRED_GRACE = 30.0
"""Seconds: an entry that expired this recently may still be counted by the kernel (ipset's garbage
collector walks a big set region by region)."""


class Ledger:
    """What one enforcer asked the kernel to hold since its last `sync`: per set, each entry's kernel
    expiry (epoch seconds, None = no timeout). Every ban change reaches the enforcer through the ban book,
    so this is the book's bans in force minus the refused ones, as the kernel should hold them; `drift`
    compares the kernel's member counts with it. Unknown (`known` False) until the first `sync`.
    """

    def __init__(self, sets: tuple[str, ...]) -> None:
        self.sets = sets
        self._held: dict[str, dict[str, float | None]] | None = None

    @property
    def known(self) -> bool:
        return self._held is not None

    def reset(self, held: dict[str, dict[str, float | None]]) -> None:
        """Exactly these entries (a sync)."""
        self._held = {name: dict(held.get(name, {})) for name in self.sets}

    def put(self, set_name: str, key: str, timeout: int, now: float) -> None:
        """`key` armed in `set_name` with `timeout` whole seconds (0 = none)."""
        if self._held is not None:
            self._held[set_name][key] = None if timeout == 0 else now + timeout

    def drop(self, set_name: str, key: str) -> None:
        if self._held is not None:
            self._held[set_name].pop(key, None)

    def size(self, set_name: str) -> int:
        return 0 if self._held is None else len(self._held[set_name])

    def sample(self, set_name: str, k: int, now: float) -> list[str]:
        """Up to `k` entries of `set_name`, chosen at random among those not about to expire."""
        if self._held is None:
            return []
        entries = self._held[set_name]
        keys = list(entries)
        picked = random.sample(keys, min(len(keys), 2 * k))
        soon = now + EXPIRY_SLACK
        return [key for key in picked if (e := entries[key]) is None or e > soon][:k]

    def bounds(self, set_name: str, now: float) -> tuple[int, int]:
        """(least, most) members the kernel may count in `set_name` now: entries about to expire or
        expired a moment ago may or may not be counted. Forgets entries long expired."""
        assert self._held is not None
        entries = self._held[set_name]
        sure = maybe = gone = 0
        soon, past = now + EXPIRY_SLACK, now - EXPIRED_GRACE
        for exp in entries.values():
            if exp is None or exp > soon:
                sure += 1
            elif exp > past:
                maybe += 1
            else:
                gone += 1
        if gone:
            self._held[set_name] = {k: e for k, e in entries.items() if e is None or e > past}
        return sure, sure + maybe


def count_problem(what: str, count: int, bounds: tuple[int, int]) -> str | None:
    """'SET holds N entries, M expected' when `count` is outside `bounds`, else None."""
    lo, hi = bounds
    if lo <= count <= hi:
        return None
    want = str(lo) if lo == hi else f"{lo}-{hi}"
    return f"{what} holds {count} entries, {want} expected"
