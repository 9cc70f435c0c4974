"""Fleet scoring: `ClusterPolicy`, the `Scorer` whose decisions are made in Redis by `SCORE_LUA`.

It wraps the local `Policy` (sipguard/policy.py) and offers exactly the `Scorer` interface. While
the fleet scores (`scoring()` true: Redis answers and its snapshot is applied) `observe` counts and
buffers the event and decides nothing; the bridge scores the buffer in one Redis call per batch
(`score_args` builds that call) and reports back with `scored` or, when Redis failed mid-batch,
`decide_locally`. Otherwise it is the local Policy. It keeps its own counters and reads the local
Policy's; it never edits the local Policy's state except through that Policy's own methods, and it
never talks to Redis itself.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import fields
from typing import TYPE_CHECKING

from ..model import Decision, Event, EventKind
from ..policy import PolicyStats

if TYPE_CHECKING:
    from ..config import ClusterConfig
    from ..policy import Policy


class ClusterPolicy:
    """The `Scorer` of a fleet node: the local Policy's interface, scored cluster-wide in Redis.

    `observe` only counts and buffers while `scoring()` is true; `ClusterBridge.on_batch` takes the
    buffer (`take`), scores it with SCORE_LUA (`score_args`) and hands the result back (`scored`),
    or, if Redis failed, has the local Policy decide the same events (`decide_locally`). While
    `scoring()` is false it is the local Policy, unchanged.
    """

    def __init__(self, local: Policy, cfg: ClusterConfig, scoring: Callable[[], bool]) -> None:
        self.local = local
        self.scoring = scoring
        self._prefix = cfg.key_prefix
        self._node = cfg.node_name
        self._maxlen = cfg.stream_maxlen
        self._seq = itertools.count(int(time.time() * 1000) % 10**12)  # event uids, unique per node
        self._buffer: list[Event] = []
        self._own = PolicyStats()  # counted here while the fleet scores; `stats` adds the local ones
        self._jail_index = {j.name: n + 1 for n, j in enumerate(local.jails)}
        self._kind_jails: dict[EventKind, str] = {}
        for kind in EventKind:
            idx = [str(self._jail_index[j.name]) for j in local.jails if kind in j.kinds]
            if kind is EventKind.SUCCESS:
                self._kind_jails[kind] = "S"
            elif idx:
                self._kind_jails[kind] = ",".join(idx)

    # -- the Scorer interface ------------------------------------------------------------------
    def observe(self, ev: Event) -> Decision | None:
        if not self.scoring():
            return self.local.observe(ev)
        st = self._own
        st.events += 1
        if ev.ip in self.local.allow:
            st.allowlisted += 1
            return None
        if ev.ip in self.local.banned:
            st.while_banned += 1
            return None
        if ev.kind in self._kind_jails:
            self._buffer.append(ev)
        return None

    def note_ban(self, ip: str) -> None:
        self.local.note_ban(ip)

    def release(self, ip: str) -> None:
        self.local.release(ip)

    def restore(self, events: Iterable[Event]) -> None:
        self.local.restore(events)

    def expire(self, now: float) -> int:
        return self.local.expire(now)

    def score(self, ip: str, now: float) -> dict[str, float]:
        """The local windows' score (kept warm with every event the fleet scored from this node)."""
        return self.local.score(ip, now)

    @property
    def banned(self) -> set[str]:
        return self.local.banned

    @property
    def stats(self) -> PolicyStats:
        """The local Policy's counters plus what was counted here while the fleet scored (a copy)."""
        a, b = self.local.stats, self._own
        return PolicyStats(**{f.name: getattr(a, f.name) + getattr(b, f.name) for f in fields(PolicyStats)})

    @property
    def max_findtime(self) -> float:
        return self.local.max_findtime

    @property
    def windows(self) -> dict[tuple[str, str], list[float]]:
        return self.local.windows

    # -- the bridge's side ---------------------------------------------------------------------
    def take(self) -> list[Event]:
        """The events buffered since the last call (to score in Redis), oldest first."""
        events, self._buffer = self._buffer, []
        return events

    def score_args(self, events: list[Event], now: float) -> list:
        """ARGV of one SCORE_LUA call for `events` scored at batch time `now` (see lua/score.lua)."""
        cfg = self.local.cfg
        args: list = [self._prefix, self._node, f"{now:.3f}", self._maxlen, cfg.bantime,
                      cfg.bantime_factor, "" if cfg.max_bantime is None else cfg.max_bantime, cfg.offence_memory,
                      len(self.local.jails)]
        for j in self.local.jails:
            if "bantime" in j.cfg.model_fields_set:
                bt = "perm" if j.cfg.bantime is None else repr(float(j.cfg.bantime))
            else:
                bt = ""
            args += [j.name, j.cfg.findtime, j.cfg.threshold, bt, "1" if j.cfg.reset_on_success else "0"]
        seq = self._seq
        for ev in events:
            args += [ev.ip, self._kind_jails[ev.kind], f"{ev.time:.6f}", repr(float(ev.weight)), ev.filter,
                     f"{self._node}.{next(seq)}"]
        return args

    def scored(self, events: list[Event], banned: Iterable[str]) -> None:
        """Redis scored `events` and decided bans on `banned`: keep the local windows warm (for when
        Redis goes away) and count and note those bans."""
        self.local.restore(events)
        st = self._own
        for ip in banned:
            self.local.note_ban(ip)
            st.decisions += 1

    def decide_locally(self, events: list[Event]) -> list[Decision]:
        """Redis failed while scoring `events` (already counted by `observe`): the local Policy
        decides them, each counted once."""
        out = []
        for ev in events:
            d = self.local.observe(ev, count=False)
            if d is not None:
                out.append(d)
        return out
