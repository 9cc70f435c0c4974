"""Fleet scoring: `ClusterPolicy`, the `Scorer` whose decisions are made in Redis by `SCORE_LUA`.

It wraps the local `Policy` (sipguard/policy.py) and offers exactly the `Scorer` interface. While
the fleet scores (`scoring()` true: Redis answers and its snapshot is applied) `observe` counts and
buffers the event and decides nothing; the bridge scores the buffer in one Redis call per batch
(`score_args` builds that call) and reports back with `scored` or, when Redis failed mid-batch,
`decide_locally`. Otherwise it is the local Policy. It keeps its own counters and reads the local
Policy's; it never edits the local Policy's state except through that Policy's own methods, and it
never talks to Redis itself.

Signed evidence: every event it sends carries a tag per jail (`Signer`, sipguard/cluster/signing.py);
the script only returns candidates (a window at its threshold, with the members behind it and the
source's offences), and `verdicts` recounts each from the members whose tags verify: a candidate
that reaches the threshold on verified events alone becomes a ban (its id, score and escalation from
verified members only); forged members are named so the bridge can remove them. `claim_args` builds
the PUBLISH_LUA call that claims that ban once for the fleet.

Distinct jails (`distinct = "dest"`): an event counts there only with the value the local Policy would
count (`_Jail.value`); Redis gets that value's hash (`value_hash`: the same on every node, never the
attacker's text) as the member's weight field, `d` + hash, signed like a weight, and keeps one member
per value; `verdicts` counts the distinct verified values.

Evidence: a ban the cluster score decided carries this node's own records among its verified members:
those of the batch being scored by their uid (`score_args` remembers what it sent, `take` forgets it),
those of earlier batches by time from the local Policy's evidence (`evidence_for`: the events `scored`
restored, with their text). Other nodes' records stay on those nodes (never published).

The office policy ([policy.office]) is scored in Redis too, with the same semantics as the local Policy
(pinned by the shared policy cases): a success for (address, user) is shared as a member of the address's
successes, the user as a keyed hash (`Signer.keyed_hash`, never its text), signed like every member, so
node B knows the office had a success that node A saw; an auth failure with a user capture carries that
hash and the tags for the office's keys, and the script scores it as the office's (per (address, user
hash), and in the office's two address jails `office_users` and `office_rate`) when the shared successes
name another user. User candidates (`jail = "office_user"`) are recounted on verified members like the
others and become user bans (`Ban.user`, the user's text from this node's own deciding event), claimed
with PUBLISH_LUA (`userban`). The successes that made an address an office and the user bans an event was
skipped for are verified too (`office_checks`): what does not verify is removed and those events are
decided by this node's local Policy, so a forged success makes no office and a forged user ban stops no
one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import fields
from typing import TYPE_CHECKING, NamedTuple

from ..model import Ban, Decision, Event, EventKind, capture, evidence_of
from ..policy import PolicyStats
from .signing import Signer, event_parts, offence_parts
from .wire import Unverified, ban_payload, checked_user, parse_user_ban, plain_text, user_ban_payload

if TYPE_CHECKING:
    from ..config import ClusterConfig
    from ..policy import Policy


class Verdict(NamedTuple):
    """A ban the cluster score decided on verified events, with its fleet id and its offence entry."""

    ban: Ban
    ban_id: str
    offence_member: str  # id|tag, stored in the source's offence key when the claim wins
    offence_at: str  # the deciding event's time ("%.6f"), the offence's score
    user_hash: str = ""  # a user ban (the office policy): the user's keyed hash (its key in Redis)


class ClusterPolicy:
    """The `Scorer` of a fleet node: the local Policy's interface, scored cluster-wide in Redis.

    `observe` only counts and buffers while `scoring()` is true; `ClusterBridge.on_batch` takes the
    buffer (`take`), scores it with SCORE_LUA (`score_args`) and hands the result back (`scored`),
    or, if Redis failed, has the local Policy decide the same events (`decide_locally`). While
    `scoring()` is false it is the local Policy, unchanged.
    """

    def __init__(self, local: Policy, cfg: ClusterConfig, scoring: Callable[[], bool],
                 signer: Signer | None = None) -> None:
        self.local = local
        self.signer = signer if signer is not None else Signer(None, cfg.key_prefix)
        self.scoring = scoring
        self._prefix = cfg.key_prefix
        self._node = cfg.node_name
        self._maxlen = cfg.stream_maxlen
        self._seq = itertools.count(int(time.time() * 1000) % 10**12)  # event uids, unique per node
        self._buffer: list[Event] = []
        self._sent: dict[str, Event] = {}  # uid -> event, of the batch taken last (its evidence, by uid)
        self._own = PolicyStats()  # counted here while the fleet scores; `stats` adds the local ones
        self._jail_index = {j.name: n + 1 for n, j in enumerate(local.jails)}
        self._jails = {j.name: j for j in local.jails}
        self._office = local.office  # the office policy ([policy.office]) or None
        self._jails.update((j.name, j) for j in local.office_jails)
        self._user_hashes: dict[str, str] = {}  # user -> keyed hash (bounded: cleared when big)
        self._unsendable: list[Ban] = []
        self._offices: set[tuple[str, str]] = set()  # (ip, user hash) the last `office_checks` verified
        self._kind_names: dict[EventKind, list[str]] = {
            kind: [j.name for j in local.jails if kind in j.kinds] for kind in EventKind}
        self._kind_distinct = {kind for kind in EventKind
                               if any(kind in j.kinds and j.distinct is not None for j in local.jails)}
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
        if ev.kind in self._kind_jails or (self._office is not None and ev.kind is EventKind.AUTH_FAILURE
                                           and capture(ev, "user") is not None):
            self._buffer.append(ev)
        return None

    def note_ban(self, ip: str) -> None:
        self.local.note_ban(ip)

    def release(self, ip: str) -> None:
        self.local.release(ip)

    def note_user_ban(self, ip: str, user: str) -> None:
        """A user ban (the office policy) is in force: the local policy stops scoring that user there."""
        self.local.note_user_ban(ip, user)

    def release_user(self, ip: str, user: str) -> None:
        self.local.release_user(ip, user)

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
        """The events buffered since the last call (to score in Redis), oldest first: a new batch."""
        events, self._buffer = self._buffer, []
        self._sent = {}
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
            args += [j.name, j.cfg.findtime, j.cfg.threshold, bt, "1" if j.cfg.reset_on_success else "0",
                     "" if j.distinct is None else j.cfg.max_values]
        oc = self._office
        args += ["", "", "", "", "", "", ""] if oc is None else [
            oc.success_within, oc.user_findtime, oc.user_threshold, oc.findtime, oc.distinct_users, oc.rate,
            oc.max_users]
        seq = self._seq
        tag = self.signer.tag
        sent = self._sent
        for ev in events:
            uid, at, w = f"{self._node}.{next(seq)}", f"{ev.time:.6f}", repr(float(ev.weight))
            sent[uid] = ev
            user = None if oc is None else capture(ev, "user")
            if user is not None and ev.kind in (EventKind.SUCCESS, EventKind.AUTH_FAILURE):
                args += self._office_event(ev, user, uid, w, at)
                continue
            if ev.kind in self._kind_distinct:
                items, tags = self._distinct_items(ev, uid, w, at)
                args += [ev.ip, items, at, w, ev.filter, uid, tags]
                continue
            js = self._kind_jails[ev.kind]
            tags = "" if js == "S" or not self.signer.enabled else ",".join(
                tag("ev", *event_parts(ev.ip, name, uid, w, at)) for name in self._kind_names[ev.kind])
            args += [ev.ip, js, at, w, ev.filter, uid, tags]
        return args

    def user_hash(self, user: str) -> str:
        """The user's keyed hash, the name Redis knows it by (`Signer.keyed_hash`)."""
        h = self._user_hashes.get(user)
        if h is None:
            if len(self._user_hashes) > 100_000:
                self._user_hashes.clear()
            h = self._user_hashes[user] = self.signer.keyed_hash(user)
        return h

    def _office_event(self, ev: Event, user: str, uid: str, w: str, at: str) -> list:
        """The 7 ARGV fields of a success or an auth failure with a user capture (see lua/score.lua)."""
        h = self.user_hash(user)
        signed = self.signer.enabled
        tag = self.signer.tag
        if ev.kind is EventKind.SUCCESS:
            t = tag("ev", *event_parts(ev.ip, "office_ok", uid, "d" + h, at)) if signed else ""
            return [ev.ip, "S:" + h, at, w, ev.filter, uid, t]
        if ev.kind in self._kind_distinct:
            items, tags = self._distinct_items(ev, uid, w, at)
        else:
            items = self._kind_jails.get(ev.kind, "")
            tags = "" if not signed or not items else ",".join(
                tag("ev", *event_parts(ev.ip, name, uid, w, at)) for name in self._kind_names[ev.kind])
        otags = "" if not signed else ",".join((
            tag("ev", *event_parts(ev.ip, "office_users", uid, "d" + h, at)),
            tag("ev", *event_parts(ev.ip, "office_rate", uid, w, at)),
            tag("ev", *event_parts(ev.ip, "office_user:" + h, uid, w, at))))
        return [ev.ip, f"{items};{h}", at, w, ev.filter, uid, f"{tags};{otags}"]

    def office_checks(self, results: Iterable, now: float) -> tuple[dict[str, list[str]], set[tuple[str, str]]]:
        """The office parts of the script's results (one per call), verified: ({key suffix: forged success
        members}, {(ip, user hash) whose failures this node decides itself}): a failure scored as an
        office's on successes none of which verifies (for another user), or skipped for a user ban that
        does not verify (or no longer holds), decides nothing in Redis; the local Policy decides it."""
        forged: dict[str, list[str]] = {}
        local: set[tuple[str, str]] = set()
        verify = self.signer.verify
        for r in results:
            uheld = r[4] if len(r) > 4 and isinstance(r[4], list) else []
            for ip, h, value in zip(uheld[0::3], uheld[1::3], uheld[2::3]):
                try:
                    ban, _, _ = parse_user_ban(value, self.signer, now)
                    good = ban.ip == ip and self.user_hash(ban.user or "") == h and (
                        ban.expires is None or ban.expires > now)
                except (ValueError, TypeError, Unverified):
                    good = False
                if not good:
                    local.add((ip, h))
            for raw in (r[5] if len(r) > 5 and isinstance(r[5], list) else []):
                try:
                    c = json.loads(raw)
                    ip, h = c["ip"], c["u"]
                    ok = c.get("ok") if isinstance(c.get("ok"), list) else []
                except (ValueError, KeyError, TypeError):
                    continue
                good, bad = False, []
                for m, sc in zip(ok[0::2], ok[1::2]):
                    parts = str(m).split("|")
                    try:
                        t = f"{float(sc):.6f}"
                    except ValueError:
                        bad.append(m)
                        continue
                    if len(parts) == 3 and parts[1].startswith("d") and parts[1] != "d" + h and verify(
                            parts[2], "ev", *event_parts(ip, "office_ok", parts[0], parts[1], t), now=now) \
                            or len(parts) == 2 and not self.signer.enabled:
                        good = True
                    else:
                        bad.append(m)
                if bad:
                    forged.setdefault(f"s:{ip}:office_ok", []).extend(bad)
                if not good:
                    local.add((ip, h))
                else:
                    self._offices.add((ip, h))
        return forged, local

    def office_verdicts(self, verdicts: list[Verdict], pairs: set[tuple[str, str]]) -> list[Verdict]:
        """`verdicts` without those that rest on an office `office_checks` did not verify: a user ban of one
        of `pairs`, an address ban by an office jail of one of their addresses (the local Policy decides)."""
        if not pairs:
            return verdicts
        ips = {ip for ip, _ in pairs}
        return [v for v in verdicts if not (
            (v.ban.ip, v.user_hash) in pairs if v.ban.user is not None
            else v.ban.ip in ips and v.ban.reason.startswith(("office_users:", "office_rate:")))]

    def decided_here(self, events: Iterable[Event], pairs: set[tuple[str, str]]) -> list[Event]:
        """Of `events`, the auth failures of the (ip, user hash) pairs `office_checks` left to this node."""
        if not pairs:
            return []
        out = []
        for ev in events:
            user = capture(ev, "user") if ev.kind is EventKind.AUTH_FAILURE else None
            if user is not None and (ev.ip, self.user_hash(user)) in pairs:
                out.append(ev)
        return out

    def _distinct_items(self, ev: Event, uid: str, w: str, at: str) -> tuple[str, str]:
        """The jails field and the tags of an event of a kind some distinct jail counts (see lua/score.lua)."""
        items, tags = [], []
        for name in self._kind_names[ev.kind]:
            jail = self._jails[name]
            idx, weight = str(self._jail_index[name]), w
            if jail.distinct is not None:
                value = jail.value(ev)
                if value is None:
                    continue
                h = value_hash(value)
                idx, weight = f"{idx}:{h}", "d" + h
            items.append(idx)
            if self.signer.enabled:
                tags.append(self.signer.tag("ev", *event_parts(ev.ip, name, uid, weight, at)))
        return ",".join(items), ",".join(tags)

    def verdicts(self, candidates: Iterable[str], now: float) -> tuple[list[Verdict], dict[str, list[str]]]:
        """The script's candidates, recounted on verified evidence: (the bans they make, {key suffix
        (`s:IP:JAIL`, `off:IP`): forged members}). A candidate whose verified events do not reach the
        threshold makes no ban; its forged members are listed for removal. Escalation counts verified
        offences only. Each ban carries this node's records among its verified members: the batch's own
        by uid (what `score_args` sent), earlier batches' as the local Policy holds them, by time."""
        out: list[Verdict] = []
        forged: dict[str, list[str]] = {}
        verify, signed = self.signer.verify, self.signer.enabled
        node, sent = self._node, self._sent
        for raw in candidates:
            try:
                c = json.loads(raw)
                ip, name, uid, at = c["ip"], c["jail"], c["uid"], c["t"]
                if name == "office_user" and self._office is not None:
                    v = self._user_verdict(c, ip, uid, at, now, forged)
                    if v is not None:
                        out.append(v)
                    continue
                jail = self._jails[name]
            except (ValueError, KeyError, TypeError):
                continue
            members = c.get("ev") if isinstance(c.get("ev"), list) else []  # Lua's empty table is {}
            offs = c.get("off") if isinstance(c.get("off"), list) else []
            score, bad = 0.0, []
            distinct = jail.distinct is not None
            values: set[str] = set()  # a distinct jail: the verified values
            batch: list[Event] = []  # this node's verified members: of the batch scored now (by uid) ...
            earlier: dict[str, int] = {}  # ... and of earlier batches (how many at each time)
            for m, sc in zip(members[0::2], members[1::2]):
                parts = str(m).split("|")
                try:
                    t = f"{float(sc):.6f}"
                    if distinct:
                        if not parts[1].startswith("d"):
                            raise ValueError(parts[1])
                        w = 0.0
                    else:
                        w = float(parts[1])
                except (IndexError, ValueError):
                    bad.append(m)
                    continue
                if len(parts) == 3 and verify(parts[2], "ev", *event_parts(ip, name, parts[0], parts[1], t), now=now) \
                        or len(parts) == 2 and not signed:  # an untagged event counts in an unsigned fleet only
                    score += w
                    if distinct:
                        values.add(parts[1])
                    ev = sent.get(parts[0])
                    if ev is not None:
                        batch.append(ev)
                    elif parts[0].rpartition(".")[0] == node:
                        earlier[t] = earlier.get(t, 0) + 1
                else:
                    bad.append(m)
            if distinct:
                score = float(len(values))
            if bad:
                forged[f"s:{ip}:{name}"] = bad
            if score < jail.cfg.threshold:
                continue
            offence, bad = 1, []
            for m, sc in zip(offs[0::2], offs[1::2]):
                parts = str(m).split("|")
                try:
                    t = f"{float(sc):.6f}"
                except ValueError:
                    bad.append(m)
                    continue
                if len(parts) == 2 and verify(parts[1], "off", *offence_parts(ip, parts[0], t), now=now) \
                        or len(parts) == 1 and not signed:  # an untagged offence counts in an unsigned fleet only
                    offence += 1
                else:
                    bad.append(m)
            if bad:
                forged[f"off:{ip}"] = bad
            duration = jail.cfg.bantime if "bantime" in jail.cfg.model_fields_set else self.local.ban_duration(offence)
            evidence = self.local.evidence_for(ip, name, _counted(earlier), batch) if batch or earlier else ()
            ban = Ban(ip=ip, reason=plain_text(f"{name}:{c.get('filter')}"), created=now,
                      expires=None if duration is None else now + duration, score=score, offence=offence,
                      evidence=evidence)
            ban_id = f"{self._node}:{uid}"
            member = f"{ban_id}|{self.signer.tag('off', *offence_parts(ip, ban_id, at))}" if signed else ban_id
            out.append(Verdict(ban, ban_id, member, at))
        return out, forged

    def _user_verdict(self, c: dict, ip: str, uid: str, at: str, now: float,
                      forged: dict[str, list[str]]) -> Verdict | None:
        """A user candidate (the office policy) recounted on its verified members: a user ban when they reach
        user_threshold. Its user is the text of this node's own deciding event (the batch's, by uid)."""
        oc = self._office
        assert oc is not None
        h = c.get("u")
        ev = self._sent.get(uid)
        user = None if ev is None else capture(ev, "user")
        if not isinstance(h, str) or user is None or self.user_hash(user) != h:
            return None
        name = "office_user:" + h
        members = c.get("ev") if isinstance(c.get("ev"), list) else []
        score, bad, batch = 0.0, [], []
        for m, sc in zip(members[0::2], members[1::2]):
            parts = str(m).split("|")
            try:
                t = f"{float(sc):.6f}"
                w = float(parts[1])
            except (IndexError, ValueError):
                bad.append(m)
                continue
            if len(parts) == 3 and self.signer.verify(parts[2], "ev", *event_parts(ip, name, parts[0], parts[1], t),
                                                      now=now) or len(parts) == 2 and not self.signer.enabled:
                score += w
                got = self._sent.get(parts[0])
                if got is not None and got.text:
                    batch.append(got)
            else:
                bad.append(m)
        if bad:
            forged[f"s:{ip}:{name}"] = bad
        if score < oc.user_threshold:
            return None
        try:
            checked_user(user)
        except ValueError:  # a control character or too long: never on the stream; this node bans it alone
            unsendable = True
        else:
            unsendable = False
        lines = self.local.evidence_lines
        evidence = tuple(evidence_of(e) for e in sorted(batch, key=lambda e: e.time)[-lines:]) if lines else ()
        ban = Ban(ip=ip, reason=plain_text(f"office_user:{c.get('filter')}"), created=now,
                  expires=now + oc.user_bantime, score=score, offence=1, evidence=evidence, user=user)
        if unsendable:
            self._unsendable.append(ban)
            return None
        return Verdict(ban, f"{self._node}:{uid}", "", at, h)

    def unsendable(self) -> list[Ban]:
        """User bans `verdicts` made whose user the stream refuses (a control character): banned on this
        node alone (the bridge hands them to the ban book as this node's own, unpublished)."""
        out, self._unsendable = self._unsendable, []
        return out

    def claim_args(self, v: Verdict, now: float, maxlen: int, unban_memory: float, jail_csv: str) -> list:
        """ARGV of the PUBLISH_LUA call that claims a verdict's ban (once for the whole fleet); a user ban's
        (`userban`, in the shared user-ban hash, field IP|HASH) when the verdict is one."""
        if v.ban.user is not None:
            return [self._prefix, maxlen, "userban", v.ban.ip, v.ban_id, self._node,
                    user_ban_payload(v.ban, v.ban_id, self._node, self.signer), self.local.cfg.offence_memory,
                    unban_memory, "", "", "", v.offence_at, "1", f"{now:.6f}", v.user_hash, v.ban.user]
        if self._office is not None:  # an address ban also clears the office's address windows
            names = [x for x in jail_csv.split(",") if x]
            jail_csv = ",".join([*names, *(j.name for j in self.local.office_jails if j.name not in names)])
        return [self._prefix, maxlen, "ban", v.ban.ip, v.ban_id, self._node,
                ban_payload(v.ban, v.ban_id, self._node, self.signer), self.local.cfg.offence_memory,
                unban_memory, jail_csv, "", v.offence_member, v.offence_at, "1", f"{now:.6f}"]

    def scored(self, events: list[Event], banned: Iterable[str]) -> None:
        """Redis scored `events` and decided bans on `banned`: keep the local windows warm (for when
        Redis goes away) and their records as evidence (for the fleet's next bans, and the local Policy's),
        and count and note those bans. An office the script scored on verified successes other nodes saw
        (`office_checks`) is taught to the local Policy first (`Policy.note_office`), so its windows keep
        the office's failures where the fleet counted them, not in the address's auth jail."""
        offices, self._offices = self._offices, set()
        if offices:  # the fleet's verified successes, taught to the local Policy (for when Redis goes away)
            for ev in events:
                user = capture(ev, "user") if ev.kind is EventKind.AUTH_FAILURE else None
                if user is not None and (ev.ip, self.user_hash(user)) in offices:
                    self.local.note_office(ev.ip, user, ev.time)
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


def value_hash(value: str) -> str:
    """The hash a distinct jail's value is known by in Redis: the same on every node, 16 hex digits, so
    the attacker's text itself never reaches the fleet."""
    return hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def _counted(left: dict[str, int]) -> Callable[[Event], bool]:
    """Whether an event held from an earlier batch is one of this node's verified members: `left` counts
    those members per time ("%.6f", as sent), each matched once, the earliest held event first."""
    def counted(ev: Event) -> bool:
        k = f"{ev.time:.6f}"
        n = left.get(k, 0)
        if n <= 0:
            return False
        left[k] = n - 1
        return True
    return counted
