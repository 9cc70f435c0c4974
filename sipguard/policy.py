"""Scoring and decisions: Event -> Decision, from jails (kinds, findtime, threshold), escalation
and the allow-list; each Decision carries its evidence (the last `[policy] evidence_lines` records
that counted, for `sipguard why`), held by `EvidenceKeeper`, which the fleet's bans draw on too
(`Policy.evidence_for`, called by sipguard/cluster/scoring.py). A distinct jail counts the distinct
values of one named capture of its events (distinct users tried, distinct destinations dialled)
instead of the events themselves.

The office policy ([policy.office], on by default): many users behind one NAT address. Once an address
has had a success for some user (the `user` capture) within `success_within`, its auth failures for
another user are counted per (address, user): at `user_threshold` a Decision with `user` set (a user
ban: that user at that address only), and the address itself is decided only by the office's own two
jails, `office_users` (distinct failing users) and `office_rate` (failures, whatever the users). Those two
are not in `jails` (`office_jails`); the fleet's score script (sipguard/cluster/lua/score.lua) scores the
same policy in Redis, with successes shared across the nodes, and the shared policy cases pin that both agree.

Pure in-memory arithmetic over state it is handed (restored events, offence history): it reads
no file, writes no database and touches no kernel, so every rule is testable with a table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import islice
from dataclasses import dataclass, field
from typing import Protocol

from .addresses import AllowList
from .config import MAX_DURATION, JailConfig, OfficeConfig, PolicyConfig
from .model import EVIDENCE_CHARS, Decision, Event, EventKind, Evidence, capture, evidence_of


DEFAULT_MAX_TRACKED = PolicyConfig.model_fields["max_tracked"].default
"""Sources each jail scores at once unless [policy] max_tracked says otherwise (about 130 bytes each)."""

EVIDENCE_SOURCES = 10_000
"""Sources per jail whose evidence (records that counted, not yet a ban) is held at once: beyond it the
least recently active lose theirs first (their ban then shows only the records from there on). Bounds
the memory of evidence under a spray: at most EVIDENCE_SOURCES x evidence_lines texts of at most
EVIDENCE_CHARS each per jail."""


class EvidenceKeeper:
    """Per (jail, source) the last `lines` events with text that counted towards a ban not made yet: the
    one place evidence is held, for the local Policy's decisions and the fleet's (both through `Policy`).

    Bounded: at most `sources` sources per jail (EVIDENCE_SOURCES; beyond it the least recently active
    tenth goes at once), `lines` events each, each text at most EVIDENCE_CHARS + 1 characters (cut and
    marked when it becomes Evidence). The events themselves are held (references, no copy) unless a text
    is longer than that.
    """

    __slots__ = ("lines", "sources", "_held")

    def __init__(self, jails: Iterable[str], lines: int, sources: int = EVIDENCE_SOURCES) -> None:
        self.lines = lines
        self.sources = sources
        self._held: dict[str, dict[str, list[Event]]] = {j: {} for j in jails}

    def keep(self, jail: str, ev: Event) -> None:
        """Hold `ev` as evidence of its source in `jail` (its last `lines`; bounded sources)."""
        if len(ev.text) > EVIDENCE_CHARS:
            ev = ev._replace(text=ev.text[:EVIDENCE_CHARS + 1])  # bounded memory; still cut (and marked) later
        held = self._held[jail]
        got = held.pop(ev.ip, None)  # re-inserted below: dict order is least recently active first
        if got is None:
            got = [ev]
        else:
            got.append(ev)
            if len(got) > self.lines:
                del got[0]
        held[ev.ip] = got
        if len(held) > self.sources:
            for ip in list(islice(held, len(held) - self.sources + self.sources // 10)):
                del held[ip]

    def pick(self, jail: str, ip: str, counted: Callable[[Event], bool], more: Iterable[Event] = ()
             ) -> tuple[Evidence, ...]:
        """A ban's evidence: of `ip`'s events held in `jail` those `counted` says counted, and `more` (the
        events not held yet that counted, e.g. the one that decided), the last `lines` in time order."""
        got = [e for e in self._held[jail].get(ip, ()) if counted(e)]
        got += [e for e in more if e.text]
        got.sort(key=lambda e: e.time)  # (stable: events of one time stay in the order they came)
        return tuple(evidence_of(e) for e in got[-self.lines:]) if self.lines > 0 else ()

    def forget(self, ip: str, jails: Iterable[str]) -> None:
        """`ip` holds nothing in `jails` any more (a ban, an unban, a success that reset them)."""
        for jail in jails:
            self._held[jail].pop(ip, None)

    def drop(self, jail: str, ips: Iterable[str], *, compact: bool = False) -> None:
        """Sources whose windows `jail` forgot (evicted, expired) hold nothing there; `compact`: rebuild
        the jail's dict afterwards (a dict keeps its size after deletions)."""
        held = self._held[jail]
        for ip in ips:
            held.pop(ip, None)
        if compact:
            self._held[jail] = dict(held)

    @property
    def evidence(self) -> dict[tuple[str, str], list[Evidence]]:
        """Everything held as {(source, jail): [Evidence, ...]} (a copy, for inspection and tests)."""
        return {(ip, name): [evidence_of(e) for e in v] for name, held in self._held.items() for ip, v in held.items()}


@dataclass(slots=True)
class PolicyStats:
    events: int = 0
    allowlisted: int = 0
    while_banned: int = 0
    decisions: int = 0
    resets: int = 0
    tracked: int = 0
    evicted: int = 0


class Scorer(Protocol):
    """What the daemon, the ban book and the fleet call on a policy: the local `Policy`
    satisfies it, and so does the fleet's `ClusterPolicy` (sipguard/cluster/scoring.py), which
    scores in Redis. Type callers against this, not against either class.
    """

    def observe(self, ev: Event) -> Decision | None:
        """Count and score one event; a Decision when it completes a ban."""
        ...

    def note_ban(self, ip: str) -> None:
        """A ban on `ip` is in force (from any origin): its events are not scored until `release`."""
        ...

    def release(self, ip: str) -> None:
        """The ban on `ip` ended: forget its windows so old events don't re-ban."""
        ...

    def restore(self, events: Iterable[Event]) -> None:
        """Replay events into the windows (no decisions)."""
        ...

    def expire(self, now: float) -> int:
        """Drop windows that fell out of their findtime; how many went."""
        ...

    def score(self, ip: str, now: float) -> dict[str, float]:
        """Current score per jail for one source."""
        ...

    @property
    def banned(self) -> set[str]:
        """Sources with a ban in force (read only: change it with note_ban / release)."""
        ...

    @property
    def stats(self) -> PolicyStats: ...

    @property
    def max_findtime(self) -> float: ...

    @property
    def windows(self) -> dict[tuple[str, str], list[float]]: ...


@dataclass(slots=True)
class _Jail:
    name: str
    cfg: JailConfig
    kinds: frozenset[EventKind] = field(init=False)
    distinct: str | None = field(init=False)
    prefixes: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.kinds = frozenset(self.cfg.kinds)
        self.distinct = self.cfg.distinct
        self.prefixes = tuple(self.cfg.prefixes)

    def value(self, ev: Event) -> str | None:
        """A distinct jail: the value `ev` counts with (its capture, inside `prefixes`), or None when it
        does not count here (no such capture, another prefix, weight 0). The fleet's scorer asks the same."""
        name = self.distinct
        value = next((v for k, v in ev.captures if k == name), None)
        if value is None or ev.weight <= 0 or (self.prefixes and not value.startswith(self.prefixes)):
            return None
        return value


class Policy:
    """Keeps, per (source, jail), the weighted events inside that jail's findtime.

    Compact, so a spray of a million one-event sources stays small: one dict per jail keyed by
    the source, whose value is the time of its one event (when that event weighs 1.0, the usual
    case) or a flat list [t0, w0, t1, w1, ...]. Each jail tracks at most `max_tracked` sources
    ([policy] max_tracked, default DEFAULT_MAX_TRACKED): beyond that the least recently active
    ones are forgotten in bulk, like sshguard's attacker list (an attacker spraying more sources
    than that can make a slow guesser's partial score be forgotten; its next events count anew).
    `banned` holds sources with a ban in force, whose events are not scored again until the ban
    ends (`release`).

    Evidence (`EvidenceKeeper`): per (source, jail) the last `evidence_lines` events with text that
    counted and did not decide (references to their record texts, capped at EVIDENCE_CHARS), for at
    most EVIDENCE_SOURCES sources per jail; a Decision takes those inside the jail's findtime and the
    event that decided. A jail that bans on one event (threshold 1) keeps nothing. Restored events are
    held like observed ones when they carry text: the records the store kept with recent events (a
    restart), and the fleet's scored events (`ClusterPolicy.scored`), whose bans `evidence_for` picks.

    A distinct jail (`distinct = "dest"`) keeps instead, per source, the hashes of the distinct values
    of that capture it saw inside findtime, each with the time it was last seen, least recently seen
    first: at most `max_values` per source (the oldest go first) and at most `max_tracked` sources. Its
    score is how many there are. An event without that capture, with a value outside the jail's
    `prefixes`, or of weight 0 does not count in it. Restored events carry no captures (the store keeps
    none), so after a restart a distinct jail counts anew.
    """

    def __init__(
        self,
        cfg: PolicyConfig,
        allow: AllowList,
        offences: dict[str, list[float]] | None = None,
        *,
        evidence: bool = True,
    ) -> None:
        """`evidence=False`: keep no evidence (decisions carry none), whatever [policy] evidence_lines says
        (`sipguard scan`, which shows none)."""
        self.cfg = cfg
        self.allow = allow
        self.jails = [_Jail(name, j) for name, j in cfg.jails.items()]
        self._by_kind: dict[EventKind, list[_Jail]] = {}
        for jail in self.jails:
            for kind in jail.kinds:
                self._by_kind.setdefault(kind, []).append(jail)
        self._reset_jails = [j for j in self.jails if j.cfg.reset_on_success]
        self._win: dict[str, dict[str, float | list[float]]] = {j.name: {} for j in self.jails}
        self._dist: dict[str, dict[str, dict[int, float]]] = {j.name: {} for j in self.jails if j.distinct}
        self.max_tracked = cfg.max_tracked
        self.offences: dict[str, list[float]] = {k: list(v) for k, v in (offences or {}).items()}
        self.banned: set[str] = set()
        self.stats = PolicyStats()
        self.max_findtime = max((j.cfg.findtime for j in self.jails), default=0.0)
        self.evidence_lines = cfg.evidence_lines if evidence else 0
        # the office policy: its two address jails (kept out of `jails`: the fleet scores `jails`), the
        # addresses' recent successful users (hashed), per-(address, user) windows and evidence, user bans
        oc = cfg.office
        self._office = oc if oc.enabled else None
        self._office_jails: tuple[_Jail, ...] = ()
        if self._office is not None:
            self._office_jails = (
                _Jail("office_users", JailConfig(kinds=[EventKind.AUTH_FAILURE], findtime=oc.findtime,
                                                  threshold=oc.distinct_users, distinct="user",
                                                  max_values=max(100, oc.distinct_users))),
                _Jail("office_rate", JailConfig(kinds=[EventKind.AUTH_FAILURE], findtime=oc.findtime,
                                                 threshold=oc.rate)))
            for j in self._office_jails:
                self._win[j.name] = {}
            self._dist["office_users"] = {}
            self.max_findtime = max(self.max_findtime, oc.findtime, oc.user_findtime)
        self._every = [*self.jails, *self._office_jails]
        # every source that may hold a window (a superset: rebuilt by `expire`): clearing one that holds
        # none is one set lookup (a fleet burst clears 100,000 sources it never saw)
        self._known: set[str] = set()
        self._keeper = EvidenceKeeper((j.name for j in self._every), self.evidence_lines)
        self._succ: dict[str, dict[int, float]] = {}
        self._uwin: dict[tuple[str, str], list[float]] = {}
        self._uevid: dict[tuple[str, str], list[Event]] = {}
        self.user_banned: set[tuple[str, str]] = set()

    # -- state from outside ------------------------------------------------------------------
    def restore(self, events: Iterable[Event]) -> None:
        """Replay events into the windows (no decisions are made): the stored ones after a restart, the
        fleet's scored ones; those with text are held as evidence like observed ones."""
        for ev in events:
            self._score(ev, decide=False)

    def note_ban(self, ip: str) -> None:
        self.banned.add(ip)
        self._clear(ip, self._every)

    def release(self, ip: str) -> None:
        """The ban ended (expired or unbanned): forget its windows so old events don't re-ban."""
        self.banned.discard(ip)
        self._clear(ip, self._every)

    # -- the decision ------------------------------------------------------------------------
    def observe(self, ev: Event, count: bool = True) -> Decision | None:
        """Score one event; a Decision when a jail's threshold is reached.

        `count=False`: the event was already counted in `stats.events` by whoever admitted it
        (the fleet's scorer, deciding here what Redis could not score), so it is only decided.
        """
        if count:
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
            if self._office is not None:
                self._note_success(ev)
            return None
        if self._office is not None and ev.kind is EventKind.AUTH_FAILURE:
            user = capture(ev, "user")
            if user is not None and self._is_office(ev.ip, user, ev.time):
                return self._score_office(ev, user, decide)
        keep = bool(self.evidence_lines and ev.text)
        for jail in self._by_kind.get(ev.kind, ()):
            if jail.distinct is not None:
                got = self._count_distinct(jail, ev, decide)
            else:
                got = self._count(jail, ev, decide, keep)
            if got is not None:
                return got
        return None

    def _count(self, jail: _Jail, ev: Event, decide: bool, keep: bool) -> Decision | None:
        """Count `ev` in a counting jail; a Decision when the source's sum inside findtime reaches the threshold."""
        ip, t, w = ev.ip, ev.time, ev.weight
        wins = self._win[jail.name]
        old = wins.pop(ip, None)  # re-inserted below: dict order is least recently active first
        since = t - jail.cfg.findtime
        if old is None:
            self._known.add(ip)
        if old is None and w == 1.0:
            win: float | list[float] = t  # one event of weight 1.0: just its time
            score = 1.0
        else:
            if old is None:
                win = [t, w]
            elif type(old) is not list:
                win = [old, 1.0, t, w] if t >= old else [t, w, old, 1.0]
            else:
                win = old
                if win and t < win[-2]:  # a late event (a lagging source): keep the list in time order
                    k = len(win) - 2
                    while k > 0 and win[k - 2] > t:
                        k -= 2
                    win[k:k] = (t, w)
                else:
                    win.append(t)
                    win.append(w)
            score = _prune_and_sum(win, since)
        wins[ip] = win
        if len(wins) > self.max_tracked:
            self._evict(wins, jail.name)
        if decide and score >= jail.cfg.threshold:
            self.stats.decisions += 1
            return self._decide(ev, jail, score)
        if keep:
            self._keeper.keep(jail.name, ev)
        return None

    # -- the office policy ([policy.office]) ----------------------------------------------------
    def _note_success(self, ev: Event) -> None:
        """A successful REGISTER for a user at an address: remembered (hashed) for `success_within`; that
        user's own failure window there is cleared."""
        user = capture(ev, "user")
        if user is None:
            return
        seen = self._succ.pop(ev.ip, None)  # re-inserted: least recently active address first
        if seen is None:
            seen = {}
        h = hash(user)  # a key only: never kept as text
        seen.pop(h, None)
        seen[h] = ev.time
        if len(seen) > self._office.max_users:
            del seen[next(iter(seen))]
        self._succ[ev.ip] = seen
        if len(self._succ) > self.max_tracked:
            for ip in list(islice(self._succ, len(self._succ) - self.max_tracked + self.max_tracked // 10)):
                del self._succ[ip]
        if self._uwin.pop((ev.ip, user), None) is not None:
            self.stats.resets += 1
        self._uevid.pop((ev.ip, user), None)

    @property
    def office(self) -> OfficeConfig | None:
        """The office policy's config when it is on ([policy.office] enabled), else None."""
        return self._office

    @property
    def office_jails(self) -> tuple[_Jail, ...]:
        """The office's two address jails (`office_users`, `office_rate`), empty when the policy is off."""
        return self._office_jails

    def note_office(self, ip: str, user: str, t: float) -> None:
        """The fleet says `ip` had, at `t`, a verified success for a user other than `user` (seen by another
        node: sipguard/cluster/scoring.py): remembered like a success of this node's own, under a key that is
        no user's, so `ip` is an office for `user` (and, until it ages out, for the others: the fleet's
        successes come hashed, not named; it only matters while Redis is away)."""
        if self._office is None:
            return
        seen = self._succ.pop(ip, None)
        if seen is None:
            seen = {}
        k = hash(("fleet", user))  # never hash(user) of a user: the success was another's
        if seen.get(k, -math.inf) < t:
            seen.pop(k, None)
            seen[k] = t
        if len(seen) > self._office.max_users:
            del seen[next(iter(seen))]
        self._succ[ip] = seen
        if len(self._succ) > self.max_tracked:
            for old in list(islice(self._succ, len(self._succ) - self.max_tracked + self.max_tracked // 10)):
                del self._succ[old]

    def _is_office(self, ip: str, user: str, t: float) -> bool:
        """Has `ip` had a success for a user other than `user` within success_within?"""
        seen = self._succ.get(ip)
        if not seen:
            return False
        h = hash(user)
        since = t - self._office.success_within
        return any(when >= since and k != h for k, when in seen.items())

    def _score_office(self, ev: Event, user: str, decide: bool) -> Decision | None:
        """An auth failure for `user` at an office address: the address jails first (distinct failing
        users, then the failure rate), then the per-(address, user) count that bans the user alone."""
        key = (ev.ip, user)
        if key in self.user_banned:
            self.stats.while_banned += 1
            return None
        keep = bool(decide and self.evidence_lines and ev.text)
        users_jail, rate_jail = self._office_jails
        got = self._count_distinct(users_jail, ev, decide)
        if got is None:
            got = self._count(rate_jail, ev, decide, keep)
        if got is not None:
            return got
        oc = self._office
        win = self._uwin.pop(key, None)
        if win is None:
            win = []
        win.append(ev.time)
        win.append(ev.weight)
        score = _prune_and_sum(win, ev.time - oc.user_findtime)
        self._uwin[key] = win
        if len(self._uwin) > self.max_tracked:
            over = list(islice(self._uwin, len(self._uwin) - self.max_tracked + self.max_tracked // 10))
            for k in over:
                del self._uwin[k]
                self._uevid.pop(k, None)
            self.stats.evicted += len(over)
        if not decide:
            return None
        if score >= oc.user_threshold:
            self.stats.decisions += 1
            held = [e for e in self._uevid.pop(key, ()) if e.time >= ev.time - oc.user_findtime]
            if ev.text:
                held.append(ev)
            evidence = tuple(evidence_of(e) for e in held[-self.evidence_lines:]) if self.evidence_lines else ()
            self.note_user_ban(ev.ip, user)
            return Decision(ip=ev.ip, reason=f"office_user:{ev.filter}", score=score, duration=oc.user_bantime,
                            offence=1, time=ev.time, evidence=evidence, user=user)
        if keep:
            got_ev = self._uevid.pop(key, [])
            got_ev.append(ev if len(ev.text) <= EVIDENCE_CHARS else ev._replace(text=ev.text[:EVIDENCE_CHARS + 1]))
            del got_ev[:-self.evidence_lines]
            self._uevid[key] = got_ev
            if len(self._uevid) > EVIDENCE_SOURCES:
                for k in list(islice(self._uevid, len(self._uevid) - EVIDENCE_SOURCES + EVIDENCE_SOURCES // 10)):
                    del self._uevid[k]
        return None

    def note_user_ban(self, ip: str, user: str) -> None:
        """A user ban on (ip, user) is in force: that user's failures there are not scored until released."""
        self.user_banned.add((ip, user))
        self._uwin.pop((ip, user), None)
        self._uevid.pop((ip, user), None)

    def release_user(self, ip: str, user: str) -> None:
        """The user ban on (ip, user) ended: its failures count anew."""
        self.user_banned.discard((ip, user))
        self._uwin.pop((ip, user), None)

    def _count_distinct(self, jail: _Jail, ev: Event, decide: bool) -> Decision | None:
        """Count `ev` in a distinct jail: its capture's value, hashed, as seen now; a Decision when the
        source's distinct values inside findtime reach the threshold."""
        value = jail.value(ev)
        if value is None:
            return None
        srcs = self._dist[jail.name]
        t = ev.time
        seen = srcs.pop(ev.ip, None)  # re-inserted below: least recently active source first
        if seen is None:
            seen = {}
            self._known.add(ev.ip)
        h = hash(value)  # a counting key only: never kept as text, never an address
        last = seen.pop(h, None)
        seen[h] = t if last is None or t > last else last
        since = t - jail.cfg.findtime
        for old in [k for k, when in seen.items() if when < since]:
            del seen[old]
        over = len(seen) - jail.cfg.max_values
        if over > 0:
            for old in list(islice(seen, over)):
                del seen[old]
        srcs[ev.ip] = seen
        if len(srcs) > self.max_tracked:
            self._evict(srcs, jail.name)
        score = float(len(seen))
        if decide and score >= jail.cfg.threshold:
            self.stats.decisions += 1
            return self._decide(ev, jail, score)
        if self.evidence_lines and ev.text:
            self._keeper.keep(jail.name, ev)
        return None

    def _evict(self, wins: dict, jail: str) -> None:
        """Forget the least recently active tenth of a full jail at once (amortised O(1))."""
        n = len(wins) - self.max_tracked + self.max_tracked // 10
        gone = list(islice(wins, n))
        for ip in gone:
            del wins[ip]
        self._keeper.drop(jail, gone)
        held = [*self._win.values(), *self._dist.values()]  # (a spray keeps `_known` no bigger than the windows)
        known = self._known
        for ip in gone:
            if not any(ip in d for d in held):
                known.discard(ip)
        self.stats.evicted += n

    @property
    def windows(self) -> dict[tuple[str, str], list[float]]:
        """Every window as {(source, jail): [t0, w0, ...]} (a copy, for inspection and tests)."""
        out = {(ip, name): (list(w) if type(w) is list else [w, 1.0])
               for name, wins in self._win.items() for ip, w in wins.items()}
        for name, srcs in self._dist.items():  # a distinct jail: each value's last time, weight 1
            for ip, seen in srcs.items():
                out[(ip, name)] = [x for when in sorted(seen.values()) for x in (when, 1.0)]
        return out

    @property
    def evidence(self) -> dict[tuple[str, str], list[Evidence]]:
        """Every source's held evidence as {(source, jail): [Evidence, ...]} (a copy, for inspection and tests)."""
        return self._keeper.evidence

    def evidence_for(self, ip: str, jail: str, counted: Callable[[Event], bool], more: Iterable[Event] = ()
                     ) -> tuple[Evidence, ...]:
        """The evidence of a ban of `ip` by `jail` decided elsewhere (the fleet's score): of the events held
        (observed or restored with text) those `counted` says counted, in the order they came, and `more`
        (events known to have counted, not held: the batch being scored), the last evidence_lines in time
        order. Changes nothing."""
        return self._keeper.pick(jail, ip, counted, more)

    @property
    def tracked(self) -> int:
        """How many (source, jail) windows are held."""
        return (sum(len(w) for w in self._win.values()) + sum(len(s) for s in self._dist.values())
                + len(self._uwin) + len(self._succ))

    def _decide(self, ev: Event, jail: _Jail, score: float) -> Decision:
        history = [t for t in self.offences.get(ev.ip, ()) if t >= ev.time - self.cfg.offence_memory]
        offence = len(history) + 1
        history.append(ev.time)
        self.offences[ev.ip] = history
        duration = jail.cfg.bantime if "bantime" in jail.cfg.model_fields_set else self.ban_duration(offence)
        evidence: tuple[Evidence, ...] = ()
        if self.evidence_lines:
            since = ev.time - jail.cfg.findtime
            evidence = self._keeper.pick(jail.name, ev.ip, lambda e: e.time >= since, (ev,))
        self.note_ban(ev.ip)
        return Decision(ip=ev.ip, reason=f"{jail.name}:{ev.filter}", score=score,
                        duration=duration, offence=offence, time=ev.time, evidence=evidence)

    def ban_duration(self, offence: int) -> float | None:
        """bantime * factor^(offence-1), capped at max_bantime. With no cap (max_bantime permanent) an
        escalation past MAX_DURATION (100 years) is a permanent ban (None): it never overflows."""
        try:
            base = self.cfg.bantime * self.cfg.bantime_factor ** max(0, offence - 1)
        except OverflowError:
            base = math.inf
        cap = self.cfg.max_bantime
        if cap is None:
            return None if base > MAX_DURATION else base
        return min(base, cap)

    def _clear(self, ip: str, jails: Iterable[_Jail]) -> bool:
        if ip not in self._known:  # (no window anywhere, so no evidence either)
            return False
        if jails is self._every:
            self._known.discard(ip)
        hit = False
        for jail in jails:
            if self._win[jail.name].pop(ip, None) is not None:
                hit = True
            if jail.distinct is not None and self._dist[jail.name].pop(ip, None) is not None:
                hit = True
        self._keeper.forget(ip, (j.name for j in jails))
        return hit

    def expire(self, now: float) -> int:
        """Drop windows whose newest event is older than their findtime (bounds memory)."""
        n = 0
        for jail in self._every:
            wins = self._win[jail.name]
            since = now - jail.cfg.findtime
            dead = [ip for ip, w in wins.items() if ((not w or w[-2] < since) if type(w) is list else w < since)]
            for ip in dead:
                del wins[ip]
            n += len(dead)
            if dead:  # a dict keeps its size after deletions: rebuild a much smaller one
                self._win[jail.name] = dict(wins)
                self._keeper.drop(jail.name, dead, compact=True)
        for jail in self._every:
            if jail.distinct is None:
                continue
            srcs = self._dist[jail.name]
            since = now - jail.cfg.findtime
            dead = [ip for ip, seen in srcs.items() if not seen or max(seen.values()) < since]
            for ip in dead:
                del srcs[ip]
            n += len(dead)
            if dead:
                self._dist[jail.name] = dict(srcs)
                self._keeper.drop(jail.name, dead, compact=True)
        if self._office is not None:
            since = now - self._office.success_within
            gone = [ip for ip, seen in self._succ.items() if max(seen.values(), default=0.0) < since]
            for ip in gone:
                del self._succ[ip]
            since = now - self._office.user_findtime
            dead_u = [k for k, w in self._uwin.items() if not w or w[-2] < since]
            for k in dead_u:
                del self._uwin[k]
                self._uevid.pop(k, None)
            n += len(dead_u)
            if gone or dead_u:
                self._succ, self._uwin, self._uevid = dict(self._succ), dict(self._uwin), dict(self._uevid)
        self._known = {ip for held in (*self._win.values(), *self._dist.values()) for ip in held}
        horizon = now - self.cfg.offence_memory
        for ip in [ip for ip, ts in self.offences.items() if not ts or ts[-1] < horizon]:
            del self.offences[ip]
        self.stats.tracked = self.tracked
        return n

    def score(self, ip: str, now: float) -> dict[str, float]:
        """Current score per jail for one source (for `status` and tests)."""
        out = {}
        for jail in self._every:
            if jail.distinct is not None:
                seen = self._dist[jail.name].get(ip)
                if seen:
                    out[jail.name] = float(sum(1 for when in seen.values() if when >= now - jail.cfg.findtime))
                continue
            win = self._win[jail.name].get(ip)
            if type(win) is list:
                if win:
                    out[jail.name] = _sum_since(win, now - jail.cfg.findtime)
            elif win is not None:
                out[jail.name] = 1.0 if win >= now - jail.cfg.findtime else 0.0
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
