"""Scoring and decisions: Event -> Decision, from jails (kinds, findtime, threshold), escalation
and the allow-list.

Pure in-memory arithmetic over state it is handed (restored events, offence history): it reads
no file, writes no database and touches no kernel, so every rule is testable with a table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .addresses import AllowList
from .config import JailConfig, PolicyConfig
from .model import Decision, Event, EventKind


@dataclass(slots=True)
class PolicyStats:
    events: int = 0
    allowlisted: int = 0
    while_banned: int = 0
    decisions: int = 0
    resets: int = 0
    tracked: int = 0


@dataclass(slots=True)
class _Jail:
    name: str
    cfg: JailConfig
    kinds: frozenset[EventKind] = field(init=False)

    def __post_init__(self) -> None:
        self.kinds = frozenset(self.cfg.kinds)


class Policy:
    """Keeps, per (source, jail), the weighted events inside that jail's findtime.

    A source's window is a flat list [t0, w0, t1, w1, ...] (compact: a spray of a million
    one-event sources must stay small). `banned` holds sources with a ban in force, whose
    events are not scored again until the ban ends (`release`).
    """

    def __init__(
        self,
        cfg: PolicyConfig,
        allow: AllowList,
        offences: dict[str, list[float]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.allow = allow
        self.jails = [_Jail(name, j) for name, j in cfg.jails.items()]
        self._by_kind: dict[EventKind, list[_Jail]] = {}
        for jail in self.jails:
            for kind in jail.kinds:
                self._by_kind.setdefault(kind, []).append(jail)
        self._reset_jails = [j for j in self.jails if j.cfg.reset_on_success]
        self.windows: dict[tuple[str, str], list[float]] = {}
        self.offences: dict[str, list[float]] = {k: list(v) for k, v in (offences or {}).items()}
        self.banned: set[str] = set()
        self.stats = PolicyStats()
        self.max_findtime = max((j.cfg.findtime for j in self.jails), default=0.0)

    # -- state from outside ------------------------------------------------------------------
    def restore(self, events: Iterable[Event]) -> None:
        """Replay stored events into the windows after a restart (no decisions are made)."""
        for ev in events:
            self._score(ev, decide=False)

    def note_ban(self, ip: str) -> None:
        self.banned.add(ip)
        self._clear(ip, self.jails)

    def release(self, ip: str) -> None:
        """The ban ended (expired or unbanned): forget its windows so old events don't re-ban."""
        self.banned.discard(ip)
        self._clear(ip, self.jails)

    # -- the decision ------------------------------------------------------------------------
    def observe(self, ev: Event) -> Decision | None:
        """Score one event; a Decision when a jail's threshold is reached."""
        self.stats.events += 1
        if ev.ip in self.allow:
            self.stats.allowlisted += 1
            return None
        if ev.ip in self.banned:
            self.stats.while_banned += 1
            return None
        return self._score(ev, decide=True)

    def _score(self, ev: Event, decide: bool) -> Decision | None:
        if ev.kind is EventKind.SUCCESS:
            if self._clear(ev.ip, self._reset_jails):
                self.stats.resets += 1
            return None
        for jail in self._by_kind.get(ev.kind, ()):
            key = (ev.ip, jail.name)
            win = self.windows.get(key)
            if win is None:
                win = self.windows[key] = []
            win.append(ev.time)
            win.append(ev.weight)
            score = _prune_and_sum(win, ev.time - jail.cfg.findtime)
            if decide and score >= jail.cfg.threshold:
                self.stats.decisions += 1
                return self._decide(ev, jail, score)
        return None

    def _decide(self, ev: Event, jail: _Jail, score: float) -> Decision:
        history = [t for t in self.offences.get(ev.ip, ()) if t >= ev.time - self.cfg.offence_memory]
        offence = len(history) + 1
        history.append(ev.time)
        self.offences[ev.ip] = history
        duration = jail.cfg.bantime if "bantime" in jail.cfg.model_fields_set else self.ban_duration(offence)
        self.note_ban(ev.ip)
        return Decision(ip=ev.ip, reason=f"{jail.name}:{ev.filter}", score=score,
                        duration=duration, offence=offence, time=ev.time)

    def ban_duration(self, offence: int) -> float | None:
        """bantime * factor^(offence-1), capped at max_bantime (None = permanent cap reached)."""
        base = self.cfg.bantime * self.cfg.bantime_factor ** max(0, offence - 1)
        cap = self.cfg.max_bantime
        if cap is None:
            return base
        return min(base, cap)

    def _clear(self, ip: str, jails: Iterable[_Jail]) -> bool:
        hit = False
        for jail in jails:
            if self.windows.pop((ip, jail.name), None) is not None:
                hit = True
        return hit

    def expire(self, now: float) -> int:
        """Drop windows whose newest event is older than their findtime (bounds memory)."""
        findtime = {j.name: j.cfg.findtime for j in self.jails}
        dead = [k for k, w in self.windows.items() if not w or w[-2] < now - findtime.get(k[1], 0.0)]
        for k in dead:
            del self.windows[k]
        horizon = now - self.cfg.offence_memory
        for ip in [ip for ip, ts in self.offences.items() if not ts or ts[-1] < horizon]:
            del self.offences[ip]
        self.stats.tracked = len(self.windows)
        return len(dead)

    def score(self, ip: str, now: float) -> dict[str, float]:
        """Current score per jail for one source (for `status` and tests)."""
        out = {}
        for jail in self.jails:
            win = self.windows.get((ip, jail.name))
            if win:
                out[jail.name] = _sum_since(win, now - jail.cfg.findtime)
        return out


def _prune_and_sum(win: list[float], since: float) -> float:
    """Drop entries older than `since` from the flat [t, w, ...] list and sum the rest."""
    cut = 0
    n = len(win)
    while cut < n and win[cut] < since:
        cut += 2
    if cut:
        del win[:cut]
    return sum(win[1::2])


def _sum_since(win: list[float], since: float) -> float:
    return sum(w for t, w in zip(win[0::2], win[1::2]) if t >= since)
