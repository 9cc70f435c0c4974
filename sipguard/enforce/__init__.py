"""Enforcers: the one small protocol that turns bans into something that drops packets.

Enforcers never decide who is banned; they apply what the store holds. `sync` makes the
enforcer's view equal to the store's both ways (after a restart, reboot or flush).
"""

from __future__ import annotations

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

    def ban(self, ban: Ban, now: float) -> None: ...

    def ban_many(self, bans: list[Ban], now: float) -> None: ...

    def unban(self, ip: str) -> None: ...

    def sync(self, bans: list[Ban], now: float) -> SyncReport: ...

    def entries(self) -> list[EnforcedEntry]: ...

    def close(self) -> None: ...


def make_enforcer(backend: str, state_dir: str | None = None) -> Enforcer:
    """The enforcer a config names; 'auto' is dry-run until the kernel enforcers land."""
    from .dryrun import DryRunEnforcer

    if backend in ("auto", "dryrun"):
        return DryRunEnforcer()
    raise ValueError(f"unknown enforcer backend {backend!r}")
