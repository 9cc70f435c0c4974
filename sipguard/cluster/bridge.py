"""The fleet bridge: everything the daemon's thread does with Redis.

`ClusterBridge` is three things to the daemon, each a small interface the composition root wires:

* its batch scorer (`score_batch`): the events its `ClusterPolicy` buffered are scored in Redis in
  one call; the bans the script decided come back for the ban book (the local Policy decides when
  Redis is away);
* a ban listener (`on_bans` / `on_unbans`, called by the ban book inside the transaction that stores
  a change): this node's own bans and unbans go to the store's outbox (so a restart loses nothing)
  and the fleet ban ids it holds are kept; `on_user_bans` / `on_user_unbans` do the same for user
  bans (the office policy), published as `userban` / `userunban`;
* a hook (`tick`): it hands what the stream reader delivered (other nodes' bans and unbans,
  snapshots) to the ban book, publishes the outbox (a run of bans as bulk entries, one tag per list,
  while every node heard from reads them), keeps a heartbeat and garbage-collects the shared hashes.

It reaches SQLite only through the store's named methods, the policy only through methods (the
`Scorer` interface, and ClusterPolicy's take / score_args / verdicts / claim_args / scored /
decide_locally), and bans only through the ban book; it never decides a ban itself (the cluster score
on verified events, or the local Policy, does).

What it writes to Redis is signed (`signing.py`), what it reads is verified and bounds-checked
(`wire.py`: the stream and the shared set by the reader's process, `reader.py`; what the bridge reads
itself here) and passed through this node's guard rails (`guard.py`) before the ban book sees it;
everything refused is counted in `ClusterStats` and logged rate-limited. A user ban from the fleet
(`_apply_user_entry`, and `_apply_user_snapshot` with each snapshot) passes the same guard rails for
its address and goes to the ban book, which puts it in Kamailio's htable, never in the kernel.
The design (scoring, sharing, signatures, failure, the Redis layout) is in README.md next to this file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..bans import BLOCKLIST, EXPIRY, FLEET, FLEET_SCORE, POLICY, RESTORE, BanBook, ban_from_decision
from ..config import OFFICE_JAILS
from ..model import Ban
from .connection import connect, describe_error, redacted, redis_errors, sentinel_servers, server_hosts
from .guard import FleetGuard, Throttle, resolve
from .reader import StreamReader
from .scoring import ClusterPolicy
from .scripts import HDEL_IF_LUA, PUBLISH_LUA, SCORE_LUA
from .signing import Signer, bulk_parts, offence_parts, unban_parts, user_unban_parts
from .status import STATUS_META, json_object
from .reader import START_WAIT
from .wire import (Unverified, ban_of, ban_payload, bulk_payload, canonical_ip, check_entry, checked_user, parse_ban,
                   parse_user_ban, parse_user_unban, plain_text, tombstone_at, user_ban_payload, user_tombstone_at)

if TYPE_CHECKING:
    from ..addresses import AllowList
    from ..config import ClusterConfig, PolicyConfig
    from ..policy import Policy
    from ..store import Store

log = logging.getLogger("sipguard.cluster")

CONTROL_META = "cluster_control"  # (older versions) last CLI control request the fleet published
EPOCH_META = "cluster_epoch"  # the Redis epoch this node last synced with
SNAPSHOT_MARGIN = 2.0  # seconds: bans created this close to a snapshot are never dropped by it
UNBAN_MEMORY = 86400.0  # how long Redis remembers an unban (so a stale ban published later loses)
FLUSH_BATCH = 500
FLUSH_ROUNDS = 4  # outbox pipelines published per loop turn
SCORE_CHUNK = 2000  # events per score script call
REFUSALS = {"too_wide": "a network wider than [cluster] max_prefix_v4 / max_prefix_v6",
            "allowlisted": "in (or overlapping) this node's allow-list",
            "own_address": "it covers this node's own address", "redis_server": "it covers this node's Redis server",
            "network": "a user ban of a network (a user ban is of one address)"}
USER_OPS = ("userban", "userunban")  # the office policy's user bans on the stream and in the outbox
BULK_MIN = 8  # bans in a row of the outbox that go out as bulk entries (fewer: one entry each)
BULK_BANS = 100
"""Bans per bulk entry: the stream reader asks for fewer entries after a reply with bulk ones, yet a reply
of 2,000 of them read at once stays a few tens of MB."""
WIRE = 2  # what this version reads on the stream (2: bulk entries), in its heartbeat
MAX_PEERS = 1000  # heartbeats a node reads to learn what the others read (`_bulk_ok`)
APPLY_BATCH = 2000
"""Fleet entries (stream entries, snapshot bans) applied per loop turn: one store transaction, their
bans in one kernel batch (split only where an unban comes between), then the daemon reads its logs again."""


@dataclass
class ClusterStats:
    scored: int = 0  # events scored in Redis
    cluster_bans: int = 0  # bans decided by the cluster score on this node
    local_bans: int = 0  # bans decided locally (Redis away) and queued
    published: int = 0  # outbox entries accepted by Redis
    stale: int = 0  # outbox entries Redis refused as older than what it holds
    applied_bans: int = 0  # bans from other nodes applied here
    applied_unbans: int = 0
    applied_user_bans: int = 0  # user bans (the office policy) from other nodes applied here (Kamailio's htable)
    applied_user_unbans: int = 0
    duplicates: int = 0  # entries this node already held (idempotent skip)
    superseded: int = 0  # entries older than what this node holds
    malformed: int = 0  # stream entries or shared bans that could not be parsed or are out of bounds (skipped)
    unverified: int = 0  # stream entries or shared bans no node of this fleet signed (skipped)
    allowlisted: int = 0  # bans from the fleet of addresses (or overlapping networks) allow-listed here
    too_wide: int = 0  # fleet networks wider than max_prefix_v4 / max_prefix_v6 (refused)
    own_address: int = 0  # fleet bans covering this node's own addresses (refused)
    redis_server: int = 0  # fleet bans covering this node's Redis / Sentinel servers (refused)
    forged_events: int = 0  # unsigned or wrongly signed members found behind a score decision (removed)
    claims_lost: int = 0  # decisions another node (or a forged shared ban) claimed first
    snapshots: int = 0
    apply_batches: int = 0  # chunks of fleet entries applied (each one store transaction)
    kernel_batches: int = 0  # batches of fleet bans handed to the ban book (each one kernel call)
    over_cap: int = 0  # fleet bans not applied: this node holds [cluster] max_bans already
    dropped_by_snapshot: int = 0
    reseeds: int = 0
    outages: int = 0
    errors: int = 0


class ClusterBridge:
    """Everything Redis for one daemon; every method runs on the daemon's thread except the reader.

    It is built around the local `Policy` and offers its own `ClusterPolicy` (`self.policy`), which
    the composition root makes the daemon's scorer.
    """

    def __init__(self, cfg: ClusterConfig, policy_cfg: PolicyConfig, store: Store, allow: AllowList,
                 local: Policy, gc_interval: float, *, max_bans: int | None = None,
                 wake: Callable[[], None] | None = None) -> None:
        """`max_bans`: the most bans this node holds from the fleet (`[cluster] max_bans`, else the
        enforcer's maxelem, chosen by the composition root). `wake` ends the daemon loop's wait (the
        follower's `wake`): the reader calls it for every delivery, so an entry is applied at once."""
        self.cfg = cfg
        self.policy_cfg = policy_cfg
        self.store = store
        self.allow = allow
        self.gc_interval = max(gc_interval, 10.0)
        self.node = cfg.node_name
        self.prefix = cfg.key_prefix
        self.stats = ClusterStats()
        self.client = connect(cfg)
        current, previous, until = cfg.secrets()
        self.signer = Signer(current, cfg.key_prefix, previous, until)
        self.guard = FleetGuard(cfg, allow, servers=resolve(server_hosts(cfg.redis_url)))
        self.throttle = Throttle(log)
        if not self.signer.enabled:
            log.warning("cluster: no [cluster] secret: bans, unbans and scored events are not signed, so "
                        "anyone who can write to the Redis at %s can ban or unban addresses on every node",
                        redacted(cfg.redis_url))
        self._score = self.client.register_script(SCORE_LUA)
        self._publish = self.client.register_script(PUBLISH_LUA)
        self._hdel_if = self.client.register_script(HDEL_IF_LUA)
        self.max_bans = max_bans if max_bans is not None else (cfg.max_bans or 1_000_000)
        self._wake = wake
        self.queue: queue.Queue = queue.Queue()
        self.reader = StreamReader(cfg, self.queue, wake)
        # what the reader delivered and the loop has not applied yet (applied APPLY_BATCH at a time)
        self._backlog: deque[tuple] = deque()
        self._waiting = 0  # entries in the backlog beyond one per item (a "checked" item holds a reply's list)
        self._batch: dict[str, Ban] = {}  # fleet bans of the chunk being applied, for one kernel batch
        self._cur: dict[str, Ban | None] = {}  # the chunk's addresses: the ban held (prefetched, kept current)
        self._held_cache: dict[str, tuple[str, float] | None] = {}  # the chunk's addresses: held fleet id
        self._snap_ips: set[str] = set()  # the addresses of the snapshot being applied
        self._count: int | None = None  # bans in force here (for max_bans): counted at most once a second
        self._counted_at = 0.0
        self._fresh = 0  # addresses new to this node in the chunk's batch
        self.redis_ok = False  # main connection answers (scoring, publishing)
        self.synced = False  # the reader's latest snapshot is applied
        self._warned = False
        self._retry_at = 0.0
        self._last_heartbeat = -math.inf  # monotonic: a step of the wall clock never stops the heartbeat
        self._last_gc = time.monotonic()
        self._errors = redis_errors()
        self._jail_csv = ",".join([*policy_cfg.jails, *((OFFICE_JAILS) if policy_cfg.office.enabled else ())])
        self.policy = ClusterPolicy(local, cfg, lambda: self.scoring, self.signer)
        # fleet ids of the bans handed to the ban book and not yet stored: ip -> (id, origin, created)
        self._ids: dict[str, tuple[str, str, float]] = {}
        self._flush_at = 0.0  # monotonic: publish again after a WAIT found too few replicas
        self._peers_bulk = False  # every node heard from reads bulk entries (`_bulk_ok`; known after a heartbeat)
        self._unreplicated: dict[str, str] = {}
        self._user_snapshot_due = False  # a snapshot was applied: its user bans are read next (`tick`)
        self._tombstones: dict[str, str] = {}  # the unbans hash as read with the latest snapshot  # claimed bans no replica acknowledged: ip -> id (re-published)

    def outbox_size(self) -> int:
        return self.store.outbox_size()

    def _held_created(self, ip: str) -> float | None:
        held = self.store.held(ip)
        return None if held is None else held.created

    def _new_id(self) -> str:
        return f"{self.node}:{uuid.uuid4().hex[:16]}"

    def publish_ban(self, ban: Ban, ban_id: str | None = None) -> str:
        """Queue a ban this node made (or holds) for the cluster; it becomes the ban's id here."""
        ban_id = ban_id or self._new_id()
        self.store.hold(ban.ip, ban_id, self.node, ban.created)
        self.store.outbox_add("ban", ban.ip, ban_id, self._ban_json(ban, ban_id))
        return ban_id

    def _ban_json(self, ban: Ban, ban_id: str) -> str:
        """The json this node publishes for its ban: always signed with its secret (when it has one)."""
        return ban_payload(ban, ban_id, self.node, self.signer)

    def publish_unban(self, ip: str, at: float, op: str = "unban") -> None:
        if op == "unban":
            self.store.release_held(ip)
        self.store.outbox_add(op, ip, self._new_id(), repr(float(at)))

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def scoring(self) -> bool:
        """Score in Redis (else locally): the main connection works and the snapshot is applied."""
        return self.redis_ok and self.synced

    def start(self, book: BanBook) -> None:
        self.reader.start()
        # wait briefly for the first snapshot so a node that starts with Redis up scores cluster-wide
        # (once the reader's process runs: starting python and importing takes a moment of its own)
        self.reader.started.wait(START_WAIT)
        deadline = time.monotonic() + max(1.0, 2 * self.cfg.socket_timeout)
        while time.monotonic() < deadline and self.queue.empty():
            time.sleep(0.01)
        self.tick(time.time(), book)  # the first chunk of the snapshot; the rest between batches
        book.commit(time.time())
        if not self.synced and not self._backlog:
            self._down(self.reader.last_error or "no answer at start")

    def close(self) -> None:
        self.reader.stop()
        self.reader.join(timeout=self.reader.block_ms / 1000 + self.cfg.socket_timeout + 2)
        try:
            if self.redis_ok:
                self.client.delete(self.prefix + "node:" + self.node)
        except self._errors:
            pass
        try:
            self.client.close()
        except Exception:  # noqa: BLE001
            pass

    def _down(self, why: str | BaseException) -> None:
        why = describe_error(why, self.cfg.redis_url) if isinstance(why, BaseException) else why
        self.redis_ok = False
        self._retry_at = time.monotonic() + self.cfg.retry_interval
        if not self._warned:
            self._warned = True
            self.stats.outages += 1
            log.warning("cluster: Redis at %s unreachable (%s): detecting and banning on this node alone, "
                        "queuing bans to publish until it is back", redacted(self.cfg.redis_url), why)

    def _up(self) -> None:
        self.guard.add_servers(resolve(sentinel_servers(self.client)))  # the master (and replicas) now
        self.redis_ok = True
        if self._warned:
            self._warned = False
            log.warning("cluster: Redis at %s is back; publishing %d queued entries",
                        redacted(self.cfg.redis_url), self.outbox_size())

    # -- the daemon's batch -----------------------------------------------------------------
    def score_batch(self, now: float) -> list[tuple[str, list[Ban]]]:
        """Score the buffered events in Redis: the bans decided on verified events and claimed for the
        fleet (cause FLEET_SCORE), and those this node must decide itself (cause POLICY): when Redis fails
        now, when a forged shared ban stands in the way of a decision or of scoring a source at all. Each
        carries this node's records that counted (`Ban.evidence`, from `verdicts`; the ban book stores it)."""
        pol = self.policy
        events = pol.take()
        if not events:
            return []
        at = round(now, 3)
        P = self.prefix
        try:
            if len(events) <= SCORE_CHUNK:
                results = [self._score(args=pol.score_args(events, at))]
            else:  # short scripts, so Redis never blocks the other nodes long; still one round trip
                with self.client.pipeline(transaction=False) as pipe:
                    for k in range(0, len(events), SCORE_CHUNK):
                        self._score(args=pol.score_args(events[k:k + SCORE_CHUNK], at), client=pipe)
                    results = pipe.execute()
            candidates = [c for r in results for c in r[0]]
            held = [x for r in results for x in r[3]]
            verdicts, forged = pol.verdicts(candidates, at)
            office_forged, office_local = pol.office_checks(results, at)  # (the office policy, verified)
            for key, members in office_forged.items():
                forged.setdefault(key, []).extend(members)
            verdicts = pol.office_verdicts(verdicts, office_local)
            claims: list = []
            if verdicts or forged:
                with self.client.pipeline(transaction=False) as pipe:
                    for key, members in forged.items():
                        pipe.zrem(P + key, *members)
                    for v in verdicts:
                        self._publish(args=pol.claim_args(v, at, self.cfg.stream_maxlen, UNBAN_MEMORY,
                                                          self._jail_csv), client=pipe)
                    if verdicts and self.cfg.wait_replicas:
                        pipe.wait(self.cfg.wait_replicas, int(self.cfg.socket_timeout * 500))
                    out = pipe.execute()
                claims = out[len(forged):len(forged) + len(verdicts)]
                if verdicts and self.cfg.wait_replicas and out[-1] < self.cfg.wait_replicas:
                    for v, won in zip(verdicts, claims):
                        if won == 1:  # re-published from the outbox until a replica has it
                            self._unreplicated[v.ban.ip] = v.ban_id
            lost = [v for v, won in zip(verdicts, claims) if won != 1]
            in_force = self._verified_in_force([v.ban.ip for v in lost if v.ban.user is None], now) if lost else set()
            users_in_force = self._users_in_force([v for v in lost if v.ban.user is not None], now)
        except self._errors as exc:
            self._down(exc)
            local = [ban_from_decision(d, now) for d in pol.decide_locally(events)]  # counted once
            return [(POLICY, local)]
        self.stats.scored += len(events)
        n_forged = sum(len(m) for m in forged.values())
        if n_forged:
            self.stats.forged_events += n_forged
            self.throttle.warn("forged_events", "cluster: removed %d unsigned or wrongly signed events behind a "
                               "score decision (forged: they decide nothing)", n_forged)
        bans, mine = [], []
        for v, won in zip(verdicts, claims):
            if v.ban.user is not None:  # a user ban (the office policy): claimed in the user-ban hash
                if won == 1:
                    bans.append(v.ban)
                elif (v.ban.ip, v.ban.user) not in users_in_force | pol.local.user_banned:
                    mine.append(v.ban)  # a forged user ban refused the claim: ban here, publish
                else:
                    self.stats.claims_lost += 1
                continue
            if won == 1:
                bans.append(v.ban)
                self._ids[v.ban.ip] = (v.ban_id, self.node, v.ban.created)
            elif v.ban.ip not in in_force and v.ban.ip not in self.policy.banned:
                mine.append(v.ban)  # a forged shared ban (or tombstone) refused the claim: ban here, publish
            else:
                self.stats.claims_lost += 1
        # a source the script skipped as banned while this node holds no ban on it: what stands in the
        # shared set must verify, else this node scores those events itself (a forged ban stops no one)
        skipped = {ip for ip, payload in zip(held[0::2], held[1::2]) if not self._verifies_in_force(payload, now)}
        skipped -= self.policy.banned
        skipped_events = [ev for ev in events if ev.ip in skipped]
        if office_local:  # an office made by successes that do not verify, a user ban that does not: decided here
            self.throttle.warn("unverified_office", "cluster: %d office failures rested on successes or user bans "
                               "without a valid signature; scored on this node", len(office_local))
            here = {id(ev) for ev in pol.decided_here(events, office_local)}
            skipped_events = [ev for ev in events if ev.ip in skipped or id(ev) in here]
        if skipped:
            self.throttle.warn("unverified", "cluster: %d sources stood as banned in the shared set without a "
                               "valid signature; scored on this node", len(skipped))
        decided_here = {id(ev) for ev in skipped_events}
        pol.scored([ev for ev in events if id(ev) not in decided_here], [b.ip for b in bans + mine if b.user is None])
        mine += pol.unsendable()  # user bans whose user the stream refuses: this node's alone
        local = [ban_from_decision(d, now) for d in pol.decide_locally(skipped_events)] if skipped_events else []
        self.stats.cluster_bans += len(bans)
        return [(FLEET_SCORE, bans), (POLICY, mine + local)]

    def _users_in_force(self, lost: list, now: float) -> set[tuple[str, str]]:
        """Of the user-ban verdicts whose claims were refused, the (ip, user) the shared user-ban hash holds a
        verified user ban in force on (Redis errors propagate)."""
        if not lost:
            return set()
        values = self.client.hmget(self.prefix + "ubans", [f"{v.ban.ip}|{v.user_hash}" for v in lost])
        out = set()
        for v, value in zip(lost, values):
            try:
                ban = parse_user_ban(value, self.signer, now)[0] if value is not None else None
            except (ValueError, TypeError):
                continue
            if ban is not None and ban.user == v.ban.user and (ban.expires is None or ban.expires > now):
                out.add((v.ban.ip, v.ban.user))
        return out

    def _verifies_in_force(self, payload: str, now: float) -> bool:
        try:
            ban, _, _ = parse_ban(payload, self.signer, now)
        except (ValueError, TypeError):
            return False
        return ban.expires is None or ban.expires > now

    def _verified_in_force(self, ips: list[str], now: float) -> set[str]:
        """Which of `ips` the shared set holds a verified ban in force on (Redis errors propagate)."""
        values = self.client.hmget(self.prefix + "bans", ips)
        return {ip for ip, v in zip(ips, values) if v is not None and self._verifies_in_force(v, now)}

    # -- the ban book's listener (inside the transaction that stores each change) -------------
    def on_bans(self, bans: list[Ban], cause: str, now: float) -> None:
        if cause in (FLEET, FLEET_SCORE):  # already in the fleet's set: remember its id here
            ids = self._ids
            self.store.hold_many((ban.ip, *ids[ban.ip]) for ban in bans if ban.ip in ids)
            if cause == FLEET_SCORE:
                for ban in bans:
                    if self._unreplicated.get(ban.ip) is not None:
                        self.publish_ban(ban, self._unreplicated.pop(ban.ip))  # until a replica acknowledges it
            return
        if cause == BLOCKLIST:  # every node refreshes its own lists
            return
        if len(bans) > 8:  # a list (a CLI import, a start): a few statements for any count
            held = self.store.held_of(b.ip for b in bans)
            fresh = [b for b in bans if b.ip not in held or held[b.ip].created != b.created]
            rows = [(b, self._new_id()) for b in fresh]
            self.store.hold_many((b.ip, ban_id, self.node, b.created) for b, ban_id in rows)
            self.store.outbox_add_many(("ban", b.ip, ban_id, self._ban_json(b, ban_id)) for b, ban_id in rows)
            if cause == POLICY:
                self.stats.local_bans += len(fresh)
            return
        for ban in bans:  # decided here (policy with Redis away, CLI, adopted): publish what it lacks
            if self._held_created(ban.ip) != ban.created:
                self.publish_ban(ban)
                if cause == POLICY:
                    self.stats.local_bans += 1

    def on_unbans(self, ips: list[str], at: float, cause: str, now: float) -> None:
        if cause == FLEET:
            for ip in ips:
                self.store.release_held(ip)
            return
        if cause in (EXPIRY, BLOCKLIST):  # an expiry happens on every node at once; lists are per node
            return
        if ips == ["*"]:
            self.store.release_all_held()
            self.publish_unban("*", at, op="unban_all")
            return
        for ip in ips:
            self.publish_unban(ip, at)

    # -- user bans (the office policy) on the stream -------------------------------------------
    def on_user_bans(self, bans: list[Ban], cause: str, now: float) -> None:
        """The ban book's user bans (inside its transaction): this node's own (its policy with Redis away,
        adopted, ...) go to the outbox as `userban`; the fleet's and the claimed ones are there already."""
        if cause in (FLEET, FLEET_SCORE, BLOCKLIST, RESTORE):
            return
        for ban in bans:
            try:
                payload = user_ban_payload(ban, self._new_id(), self.node, self.signer)
            except ValueError:  # a control character or too long: never on the stream
                self.throttle.warn("user_unsendable", "cluster: a user ban at %s was not published: its user "
                                   "has a control character or is too long (banned on this node only)", ban.ip)
                continue
            self.store.outbox_add("userban", ban.ip, json.loads(payload)["id"], payload)

    def on_user_unbans(self, pairs: list[tuple[str, str]], cause: str, now: float) -> None:
        """A user ban lifted here (`unban --user`): published as `userunban` (expiries happen everywhere)."""
        if cause in (FLEET, EXPIRY, BLOCKLIST, RESTORE):
            return
        for ip, user in pairs:
            try:
                checked_user(user)
            except ValueError:
                continue
            self.store.outbox_add("userunban", ip, self._new_id(), json.dumps({"at": repr(float(now)), "user": user}))

    def _user_publish_args(self, op: str, ip: str, ban_id: str, payload: str) -> list | None:
        """PUBLISH_LUA's ARGV for a user ban or unban from the outbox (None: malformed, dropped)."""
        try:
            if op == "userban":
                d = json.loads(payload)
                user, arg, sig = d["user"], payload, ""
            else:
                d = json.loads(payload)
                user, arg = d["user"], d["at"]
                sig = self.signer.tag("userunban", *user_unban_parts(ip, user, ban_id, self.node, arg))
            h = self.policy.user_hash(checked_user(user))
        except (ValueError, KeyError, TypeError):
            return None
        return [self.prefix, self.cfg.stream_maxlen, op, ip, ban_id, self.node, arg, self.policy_cfg.offence_memory,
                UNBAN_MEMORY, "", sig, "", "", "0", repr(time.time()), h, user]

    def _apply_user_entry(self, book: BanBook, fields: dict, now: float) -> None:
        """A user ban or unban from the stream (another node's): verified and bounded (`wire.py`), the
        address part through the guard rails, then the ban book (Kamailio's htable, never the kernel)."""
        if fields.get("op") == "userban":
            ban, _ban_id, origin = parse_user_ban(fields["ban"], self.signer, now)
            ip = fields.get("ip")
            if ip != ban.ip and ban.ip != canonical_ip(ip):
                raise ValueError("ip mismatch")
            if origin == self.node or (ban.expires is not None and ban.expires <= now):
                return  # (this node's own: applied when it was claimed or made)
            refusal = self.guard.refusal(ban.ip) or ("network" if "/" in ban.ip else None)
            if refusal is not None:  # a user ban is of one address: a network is refused too
                self._refused(refusal, ban.ip, origin)
                return
            held = [b for b in self.store.user_bans_of(ban.ip) if b.user == ban.user]
            if held and held[0].created >= ban.created and (held[0].expires is None or held[0].expires > now):
                self.stats.duplicates += 1
                return
            self._flush_batch(book, now)  # in order with this chunk's address bans
            book.ban([ban], now, FLEET)
            self.stats.applied_user_bans += 1
            log.info("cluster: %s banned user %r at %s", origin, ban.user, ban.ip)
            return
        ip, user, _ban_id, origin, at = parse_user_unban(fields, self.signer, now)
        if origin == self.node:
            return
        held = [b for b in self.store.user_bans_of(ip) if b.user == user]
        if not held or held[0].created > at:
            return
        self._flush_batch(book, now)
        book.unban_user(ip, user, now, cause=FLEET)
        self.stats.applied_user_unbans += 1
        log.info("cluster: lifted the user ban of %r at %s", user, ip)

    def _apply_user_snapshot(self, book: BanBook) -> None:
        """After each snapshot (`tick`, once its chunk is stored): the shared user bans (the office policy)
        this node lacks, so a late joiner or a restarted node holds them too; each verified, bounded and
        through the guard rails like a stream entry; and the user bans this node holds that were lifted
        while it was away (not shared any more, and a verified tombstone in the user unbans hash newer
        than the ban), lifted here too. One transaction of its own. (Read on the main connection, beside
        the reader's snapshot of the address bans.)"""
        self._user_snapshot_due = False
        now = time.time()
        held = self.store.active_user_bans(now)
        try:
            shared = list(self.client.hscan_iter(self.prefix + "ubans", count=1000))
            tombs = dict(self.client.hscan_iter(self.prefix + "uunbans", count=1000)) if held else {}
        except self._errors as exc:
            self._down(exc)
            return
        if not shared and not held:
            return
        fields = {f for f, _ in shared}
        lifted = []
        for b in held:
            field = f"{b.ip}|{self.policy.user_hash(b.user or '')}"
            if field in fields or field not in tombs:
                continue
            at = user_tombstone_at(tombs[field], b.ip, b.user or "", self.signer, now)
            if at is not None and at >= b.created:
                lifted.append(b)
        try:
            with self.store.transaction():
                for field, payload in shared:
                    try:
                        ban = parse_user_ban(payload, self.signer, now)[0]
                        self._apply_user_entry(book, {"op": "userban", "ip": ban.ip, "ban": payload}, now)
                    except (KeyError, ValueError, TypeError, AttributeError) as exc:
                        self._skipped(exc, f"shared user ban {plain_text(field, 120)}")
                for b in lifted:
                    book.unban_user(b.ip, b.user or "", now, cause=FLEET)
                    log.info("cluster: the user ban of %r at %s was lifted while this node was away", b.user, b.ip)
                self.stats.dropped_by_snapshot += len(lifted)
                book.write(now)
        except BaseException:
            book.failed()
            raise
        book.written()

    def _gc_users(self, now: float) -> None:
        """Expired, malformed or forged user bans and old user unbans leave the shared user-ban hashes."""
        P = self.prefix
        for field, payload in self.client.hscan_iter(P + "ubans", count=1000):
            try:
                ban = parse_user_ban(payload, self.signer, now)[0]
                gone = ban.expires is not None and ban.expires <= now
            except (ValueError, TypeError):
                gone = True
            if gone:
                self._hdel_if(keys=[P + "ubans"], args=[field, payload])
        for field, at in self.client.hscan_iter(P + "uunbans", count=1000):
            try:
                old = float(at.split("|", 1)[0]) < now - UNBAN_MEMORY
            except ValueError:
                old = True
            if old:
                self._hdel_if(keys=[P + "uunbans"], args=[field, at])

    # -- housekeeping -----------------------------------------------------------------------
    def on_batch(self, report: object) -> None:
        pass  # an automatic ban is published by `on_bans`, in the transaction that stores it

    def tick(self, now: float, book: BanBook) -> None:
        """Between batches: the reader's deliveries to the ban book, the outbox to Redis, heartbeat, gc."""
        if book.pending == 0:
            self._ids.clear()  # every handed-over ban is stored with its id
        self._drain(book)
        if self._user_snapshot_due and self.redis_ok:
            self._apply_user_snapshot(book)
        if not self.redis_ok and time.monotonic() >= self._retry_at and self.reader.connected:
            try:
                self.client.ping()
                self._up()
            except self._errors as exc:
                self._down(exc)
        if self.redis_ok and time.monotonic() >= self._flush_at:
            self._flush()
        mono = time.monotonic()
        if mono - self._last_heartbeat >= self.cfg.heartbeat_interval:
            self._heartbeat(now)
        if mono - self._last_gc >= self.gc_interval:
            self._last_gc = mono
            self._gc(now)

    def _flush(self) -> None:
        """Publish the outbox, FLUSH_ROUNDS pipelines of FLUSH_BATCH per loop turn: a big import goes
        out between the daemon's batches (the loop is woken for the rest), never stalling detection.
        Runs of at least BULK_MIN bans go out as bulk entries of up to BULK_BANS (one script call and one
        stream entry, one tag, for the list) while every node heard from reads them (`_bulk_ok`)."""
        for _round in range(FLUSH_ROUNDS):
            entries = self.store.outbox_next(FLUSH_BATCH)
            if not entries:
                return
            need = self.cfg.wait_replicas
            sizes: list[int] = []  # per call: 0 for one entry (1 when applied), else the bans of its list
            try:
                with self.client.pipeline(transaction=False) as pipe:
                    run: list = []  # bans in a row
                    bulk = self._bulk_ok()
                    for e in entries:
                        if e.op == "ban":
                            run.append(e)
                            continue
                        self._publish_run(pipe, run, sizes, bulk)
                        run = []
                        if e.op in USER_OPS:  # (a user ban or unban: its own arguments; malformed: dropped)
                            args = self._user_publish_args(e.op, e.ip, e.id, e.payload)
                            if args is not None:
                                self._publish(args=args, client=pipe)
                                sizes.append(0)
                            continue
                        self._publish(args=self._publish_args(e), client=pipe)
                        sizes.append(0)
                    self._publish_run(pipe, run, sizes, bulk)
                    if need:
                        pipe.wait(need, int(self.cfg.socket_timeout * 500))
                    results = pipe.execute()
            except self._errors as exc:
                self._down(exc)
                return
            if need:
                if results.pop() < need:  # not on enough replicas yet: keep them queued (publishing is idempotent)
                    self._flush_at = time.monotonic() + self.cfg.retry_interval
                    self.throttle.warn("replicas", "cluster: fewer than %d replicas acknowledged what this node "
                                       "published; kept queued and published again", need)
                    return
            for n, r in zip(sizes, results):
                ok = (1 if r == 1 else 0) if n == 0 else int(r)
                self.stats.published += ok
                self.stats.stale += max(n, 1) - ok
            self.store.outbox_delete_upto(entries[-1].seq)
            if len(entries) < FLUSH_BATCH:
                return
        if self._wake is not None:
            self._wake()  # more to publish: right after the daemon's next batch

    def _publish_run(self, pipe, run: list, sizes: list[int], bulk: bool) -> None:  # noqa: ANN001 - a redis pipeline
        """Bans in a row of the outbox into `pipe`: with `bulk` and at least BULK_MIN of them, bulk entries
        of up to BULK_BANS, else one call each; `sizes` gets each call's (see `_flush`)."""
        if not bulk or len(run) < BULK_MIN:
            for e in run:
                self._publish(args=self._publish_args(e), client=pipe)
                sizes.append(0)
            return
        for k in range(0, len(run), BULK_BANS):
            part = run[k:k + BULK_BANS]
            self._publish(args=self._bulk_args(part), client=pipe)
            sizes.append(len(part))

    def _publish_args(self, e) -> list:  # noqa: ANN001 - an outbox entry
        """PUBLISH_LUA's ARGV for one ban or unban of the outbox."""
        sig, member, at = self._signatures(e.op, e.ip, e.id, e.payload)
        return [self.prefix, self.cfg.stream_maxlen, e.op, e.ip, e.id, self.node, e.payload,
                self.policy_cfg.offence_memory, UNBAN_MEMORY, self._jail_csv, sig, member, at, "0", repr(time.time())]

    def _bulk_args(self, run: list) -> list:
        """PUBLISH_LUA's ARGV for bans of the outbox published as one bulk entry (op "bans"): the list
        of their jsons with one tag, then five arguments per ban."""
        payload = bulk_payload([e.payload for e in run])
        args = [self.prefix, self.cfg.stream_maxlen, "bans", "", self._new_id(), self.node, payload,
                self.policy_cfg.offence_memory, UNBAN_MEMORY, self._jail_csv,
                self.signer.tag("bans", *bulk_parts(self.node, payload)), "", "", "0", repr(time.time())]
        for e in run:
            _sig, member, at = self._signatures(e.op, e.ip, e.id, e.payload)
            args += [e.ip, e.id, e.payload, member, at]
        return args

    def _bulk_ok(self) -> bool:
        """Whether every node whose heartbeat is in Redis reads bulk entries (its heartbeat says `wire` 2
        or more; `_heartbeat` looks, every heartbeat_interval): a node of an older version would skip
        them as malformed, so while one runs, lists go out one entry per ban."""
        return self._peers_bulk

    def _signatures(self, op: str, ip: str, ban_id: str, payload: str) -> tuple[str, str, str]:
        """(the unban's tag, the offence member and time of an automatic ban) for one outbox entry."""
        if op != "ban":
            return self.signer.tag(op, *unban_parts(op, ip, ban_id, self.node, payload)), "", ""
        try:
            d = json.loads(payload)
            at = f"{float(d['created']):.6f}"
        except (ValueError, KeyError, TypeError):
            return "", "", ""
        if d.get("manual") is not False or not self.signer.enabled:
            return "", "", at
        return "", f"{ban_id}|{self.signer.tag('off', *offence_parts(ip, ban_id, at))}", at

    def _take(self) -> None:
        """What the reader delivered, in order, into the backlog (a snapshot as one item per ban)."""
        self.reader.pump()  # (what its process sent and the relay thread has not handed over yet)
        try:
            while True:
                item = self.queue.get_nowait()
                kind = item[0]
                if kind == "snapshot":
                    _kind, epoch, bans, taken = item
                    self._backlog.extend(("snap", ip, payload) for ip, payload in bans.items())
                    self._backlog.append(("snap_end", epoch, taken, frozenset(bans)))
                elif kind == "checked_snapshot":  # (checked by the reader's process)
                    _kind, epoch, bans, taken = item
                    self._backlog.extend(("snapc", ip, checked) for ip, checked in bans)
                    self._backlog.append(("snap_end", epoch, taken, frozenset(ip for ip, _ in bans)))
                elif kind == "checked":  # (one item for a whole reply: `_chunk` cuts it, no tuple per entry)
                    if item[1]:
                        self._backlog.append(item)
                        self._waiting += len(item[1]) - 1
                elif kind == "entries":  # (raw entries, checked here)
                    self._backlog.extend(("entry", entry_id, fields) for entry_id, fields in item[1])
                else:
                    self._backlog.append(item)
        except queue.Empty:
            pass

    def _drain(self, book: BanBook) -> None:
        """Hand what the reader delivered, in order, to the ban book: up to APPLY_BATCH entries per
        call, their bans in kernel batches, stored in one short transaction. When more is waiting the
        loop is woken again, so a burst (or a big snapshot) is applied between the daemon's batches and
        detection never waits for all of it."""
        self._take()
        if not self._backlog:
            book.hold(False)
            return
        backlog = self._backlog
        chunk = self._chunk()
        book.hold(bool(backlog))  # a burst: its bans go to the kernel first, the store follows in slices
        now = time.time()
        self._prefetch(book, chunk)
        try:
            with self.store.transaction():
                for item in chunk:
                    kind = item[0]
                    if kind == "checked":  # ("checked", [(entry id, checked tuple), ...])
                        for entry_id, checked in item[1]:
                            self._apply_checked(book, entry_id, checked, now)
                    elif kind == "snapc":
                        self._apply_snap_checked(book, item[1], item[2], now)
                    elif kind == "snap":
                        self._apply_snap_ban(book, item[1], item[2], now)
                    elif kind == "snap_end":
                        self._flush_batch(book, now)
                        self._apply_snapshot(book, item[1], item[2], item[3], now)
                    elif kind == "entry":
                        self._apply_entry(book, item[1], item[2], now)
                    elif kind == "tombstones":  # (sent just before its snapshot)
                        self._tombstones = item[1]
                    elif kind == "down":
                        self.synced = False
                        self._down(item[1])
                self._flush_batch(book, now)
                book.write(now)
        except BaseException:
            book.failed()
            raise
        finally:
            self._batch.clear()
            self._cur.clear()
            self._held_cache.clear()
            self._fresh = 0
        book.written()
        self.stats.apply_batches += 1
        if backlog and self._wake is not None:
            self._wake()  # the next chunk right after the daemon's next batch

    def _chunk(self) -> list[tuple]:
        """Up to APPLY_BATCH entries off the front of the backlog (a reply's list cut where it ends)."""
        backlog = self._backlog
        chunk: list[tuple] = []
        room = APPLY_BATCH
        while backlog and room > 0:
            item = backlog[0]
            if item[0] == "checked":
                entries = item[1]
                if len(entries) > room:
                    chunk.append(("checked", entries[:room]))
                    backlog[0] = ("checked", entries[room:])
                    self._waiting -= room
                    break
                backlog.popleft()
                chunk.append(item)
                room -= len(entries)
                self._waiting -= len(entries) - 1
            else:
                chunk.append(backlog.popleft())
                room -= 1
        return chunk

    def _prefetch(self, book: BanBook, chunk: list[tuple]) -> None:
        """The bans, and the held ids of those banned here, of the addresses a chunk bans, in a few
        queries (not two per entry)."""
        ips = []
        for item in chunk:
            kind = item[0]
            if kind == "checked":
                ips += [checked[1] for _, checked in item[1] if checked[0] == "ban"]
            elif kind == "snap" or kind == "snapc":
                ips.append(item[1])
            elif item[0] == "entry" and isinstance(item[2], dict) and isinstance(item[2].get("ip"), str):
                ips.append(item[2]["ip"])
        if len(ips) < 8:
            return
        ips = [ip for ip in dict.fromkeys(ips) if len(ip) <= 64]
        cur = book.current_many(ips)
        self._cur.update(cur)
        ips = [ip for ip, ban in cur.items() if ban is not None]  # (held ids: only against a ban held here)
        held = self.store.held_of(ips) if ips else {}
        self._held_cache.update((ip, (held[ip].id, held[ip].created) if ip in held else None) for ip in ips)

    def _current(self, book: BanBook, ip: str) -> Ban | None:
        """The ban on `ip` as this node holds it, this chunk's not yet handed-over ones included."""
        ban = self._batch.get(ip)
        if ban is not None:
            return ban
        if ip in self._cur:
            return self._cur[ip]
        return book.current(ip)

    def _flush_batch(self, book: BanBook, now: float) -> None:
        """The fleet bans gathered so far go to the ban book as one kernel batch."""
        if not self._batch:
            return
        bans = list(self._batch.values())
        self._batch.clear()
        if self._count is not None:
            self._count += self._fresh
        self._fresh = 0
        for ban in book.ban(bans, now, FLEET, batch=True):
            self._cur[ban.ip] = ban
        self.stats.applied_bans += len(bans)
        self.stats.kernel_batches += 1
        if len(bans) <= 3:
            for ban in bans:
                log.info("cluster: %s banned %s until %s (%s)", self._ids.get(ban.ip, ("", "?"))[1], ban.ip,
                         "forever" if ban.expires is None else time.strftime("%H:%M:%S", time.localtime(ban.expires)),
                         ban.reason)
        else:
            log.info("cluster: applied %d bans from the fleet in one batch (%d so far)", len(bans),
                     self.stats.applied_bans)

    def _held(self, ip: str) -> tuple[str, float] | None:
        """(fleet id, created) of the ban this node holds on `ip`, handed-over ones included."""
        ident = self._ids.get(ip)
        if ident is not None:
            return ident[0], ident[2]
        if ip in self._held_cache:
            return self._held_cache[ip]
        held = self.store.held(ip)
        return None if held is None else (held.id, held.created)

    def _apply_snap_ban(self, book: BanBook, ip: str, payload: str, now: float) -> None:
        try:
            ban, ban_id, origin = parse_ban(payload, self.signer, now)
        except (ValueError, TypeError) as exc:
            self._skipped(exc, f"shared ban of {plain_text(ip, 64)}")
            return
        self._snap_ips.add(ban.ip)
        self._apply_ban(book, ban, ban_id, origin, now)

    def _apply_snapshot(self, book: BanBook, epoch: str | None, taken: float, keys: frozenset[str],
                        now: float) -> None:
        """The end of a snapshot (its bans were applied before, in batches; `keys`: every address the
        shared set named): a new epoch re-seeds Redis with what this node holds; the same one drops
        what Redis no longer has."""
        self.stats.snapshots += 1
        cluster, self._snap_ips = self._snap_ips, set()
        known = self.store.get_meta(EPOCH_META)
        pending = self.store.outbox_ips()
        if known != epoch:
            # a first join, or Redis lost its data: what this node holds goes (back) to the cluster
            self.stats.reseeds += 1
            republished = 0
            for ban in book.held(now):
                if ban.ip in cluster or ban.ip in pending:
                    continue
                held = self._held(ban.ip)
                self.publish_ban(ban, held[0] if held and held[1] == ban.created else None)
                republished += 1
            if known is not None:
                log.warning("cluster: Redis lost its state (new epoch); re-publishing %d bans held here", republished)
        else:
            # same Redis: a ban it no longer has was lifted while this node was away
            origins = self.store.held_origins()
            drop = []
            for ban in book.held(now):
                if ban.ip in keys or ban.ip in pending or ban.ip not in origins:
                    continue  # (not in origins: never shared, made before fleet mode: keep; named but
                    #            malformed or unverifiable: a bad or forged value over an address is no unban)
                if origins[ban.ip] == self.node and ban.created >= taken - SNAPSHOT_MARGIN:
                    continue  # decided here while the snapshot was read: its stream entry follows
                if self.signer.enabled:  # a missing entry is an unban only with a signed tombstone
                    lifted = tombstone_at(self._tombstones.get(ban.ip), ban.ip, self.signer, now)
                    if lifted is None or lifted < ban.created:
                        continue
                drop.append(ban.ip)
            if drop:
                book.unban(drop, now, FLEET, at=now)
                for ip in drop:
                    self._cur[ip] = None
                self.stats.dropped_by_snapshot += len(drop)
        self.store.set_meta(EPOCH_META, epoch or "")
        self._user_snapshot_due = True  # (read after this chunk's transaction: `_apply_user_snapshot`)
        self.synced = True
        if not self.redis_ok:
            try:
                self.client.ping()
                self._up()
            except self._errors as exc:
                self._down(exc)

    def _apply_entry(self, book: BanBook, entry_id: str, fields: dict, now: float) -> None:
        """A raw stream entry: checked here (the reader's process checks what it reads), then applied."""
        self._apply_checked(book, entry_id, check_entry(fields, self.signer, now), now)

    def _apply_checked(self, book: BanBook, entry_id: str, checked: tuple, now: float) -> None:
        """A checked stream entry (`wire.check_entry`'s tuple: tag, bounds and address checked)."""
        op = checked[0]
        if op == "ban":
            ban, ban_id, origin = ban_of(checked)
            self._apply_ban(book, ban, ban_id, origin, now)
        elif op == "unban":
            self._apply_unban(book, checked[1], checked[2], now)
        elif op == "unban_all":
            self._apply_unban_all(book, checked[2], now)
        elif op == "bulk":  # (a node's list read on this thread: `check_entry` of an op "bans" entry)
            for one in checked[1]:
                self._apply_checked(book, entry_id, one, now)
        elif op == "user":
            try:
                self._apply_user_entry(book, checked[1], now)
            except (KeyError, ValueError, TypeError, AttributeError) as exc:
                self._skipped(exc, f"stream entry {plain_text(entry_id, 40)}")
        else:
            self._skip(op, checked[1], f"stream entry {plain_text(entry_id, 40)}")

    def _apply_snap_checked(self, book: BanBook, ip: str, checked: tuple, now: float) -> None:
        """A checked value of the shared ban set (`wire.check_shared`'s tuple)."""
        if checked[0] != "ban":
            self._skip(checked[0], checked[1], f"shared ban of {plain_text(ip, 64)}")
            return
        ban, ban_id, origin = ban_of(checked)
        self._snap_ips.add(ban.ip)
        self._apply_ban(book, ban, ban_id, origin, now)

    def _skipped(self, exc: BaseException, what: str) -> None:
        """Count and (rate-limited) log a value from Redis that is not applied."""
        if isinstance(exc, Unverified):
            self._skip("unverified", "", what)
        else:
            self._skip("malformed", plain_text(f"no {exc}" if isinstance(exc, KeyError) else exc, 120), what)

    def _skip(self, kind: str, why: str, what: str) -> None:
        if kind == "unverified":
            self.stats.unverified += 1
            self.throttle.warn("unverified", "cluster: skipped %s: not signed by this fleet's secret", what)
        else:
            self.stats.malformed += 1
            self.throttle.warn("malformed", "cluster: skipped malformed %s (%s)", what, why)

    def _apply_ban(self, book: BanBook, ban: Ban, ban_id: str, origin: str, now: float) -> None:
        """Gather a fleet ban for this chunk's kernel batch (or skip it: over, allow-listed, held, older)."""
        if ban.expires is not None and ban.expires <= now:
            return
        refusal = self.guard.refusal(ban.ip)  # the local guard rails win over every fleet ban, manual or not
        if refusal is not None:
            self._refused(refusal, ban.ip, origin)
            return
        local = self._current(book, ban.ip)
        if local is not None:  # (the held id matters only against a ban held here)
            held = self._held(ban.ip)
            if held is not None and held[0] == ban_id:
                self.stats.duplicates += 1
                return
            if (local.created, held[0] if held else "") > (ban.created, ban_id):
                self.stats.superseded += 1
                return
        elif not self._room(book, now):
            return
        self._ids[ban.ip] = (ban_id, origin, ban.created)
        if local is None:
            self._fresh += 1
        self._batch.pop(ban.ip, None)  # (the latest of one chunk goes last)
        self._batch[ban.ip] = ban

    def _room(self, book: BanBook, now: float) -> bool:
        """Whether one more address fits under `[cluster] max_bans` on this node (counted, said rarely)."""
        mono = time.monotonic()
        if self._count is None or mono - self._counted_at >= 1.0:  # (the daemon's own bans and expiries too)
            self._count = self.store.count_active_bans(now) + book.pending
            self._counted_at = mono
        if self._count + self._fresh < self.max_bans:
            return True
        self.stats.over_cap += 1
        if self.stats.over_cap == 1 or self.stats.over_cap % 10000 == 0:
            log.warning("cluster: this node holds %d bans, [cluster] max_bans = %d: %d fleet bans not applied "
                        "here (raise max_bans and [enforce] maxelem)", self._count + self._fresh,
                        self.max_bans, self.stats.over_cap)
        return False

    def _refused(self, reason: str, ip: str, origin: str) -> None:
        if reason == "too_wide":
            self.stats.too_wide += 1
        elif reason == "allowlisted":
            self.stats.allowlisted += 1
        elif reason == "own_address":
            self.stats.own_address += 1
        elif reason == "redis_server":
            self.stats.redis_server += 1
        else:
            self.stats.malformed += 1
        self.throttle.warn("refused:" + reason, "cluster: refused a ban of %s from %s: %s", ip, origin,
                           REFUSALS.get(reason, reason))

    def _apply_unban(self, book: BanBook, ip: str, at: float, now: float) -> None:
        self._flush_batch(book, now)  # in order: a ban earlier in this chunk is in the book first
        local = self._current(book, ip)
        if local is not None and local.created > at:
            self.stats.superseded += 1
            return
        self._cur[ip] = None
        if local is None:  # nothing held here: only its old events stop counting
            book.unban([ip], now, FLEET, at=at, store=False)
            return
        self._ids.pop(ip, None)
        self._count = None
        book.unban([ip], now, FLEET, at=at)
        self.stats.applied_unbans += 1
        log.info("cluster: unbanned %s", ip)

    def _apply_unban_all(self, book: BanBook, at: float, now: float) -> None:
        """Every ban made up to `at` is lifted, in one kernel batch."""
        self._flush_batch(book, now)
        lift = []
        for ban in book.held(now):
            if ban.created > at:
                self.stats.superseded += 1
                continue
            lift.append(ban.ip)
        if not lift:
            return
        for ip in lift:
            self._ids.pop(ip, None)
            self._cur[ip] = None
        self._count = None
        book.unban(lift, now, FLEET, at=at)
        self.stats.applied_unbans += len(lift)
        log.info("cluster: unbanned all (%d addresses)", len(lift))

    # -- heartbeat, status, gc --------------------------------------------------------------
    def in_backlog(self) -> int:
        """Fleet entries delivered and not yet applied."""
        return len(self._backlog) + self._waiting

    def in_sync(self) -> bool:
        return self.redis_ok and self.synced and self.reader.connected and self.queue.empty() \
            and not self._backlog and self.outbox_size() == 0

    def view(self, now: float) -> dict:
        return {"node": self.node, "redis": redacted(self.cfg.redis_url), "connected": self.redis_ok,
                "in_sync": self.in_sync(), "outbox": self.outbox_size(), "heartbeat": now, "pid": os.getpid(),
                "wire": WIRE, "stats": asdict(self.stats)}

    def _heartbeat(self, now: float) -> None:
        self._last_heartbeat = time.monotonic()
        view = self.view(now)
        self.store.set_meta(STATUS_META, json.dumps(view))
        if not self.redis_ok:
            return
        try:
            ttl = max(1, math.ceil(self.cfg.node_timeout))
            with self.client.pipeline(transaction=False) as pipe:
                pipe.set(self.prefix + "node:" + self.node, json.dumps(view), ex=ttl)
                pipe.zadd(self.prefix + "nodes", {self.node: now})
                pipe.zremrangebyscore(self.prefix + "nodes", "-inf", now - 7 * 86400)
                pipe.zrangebyscore(self.prefix + "nodes", now - 2 * ttl, "+inf", start=0, num=MAX_PEERS + 1)
                names = pipe.execute()[-1]
            beats = self.client.mget([self.prefix + "node:" + n for n in names]) if names else []
        except self._errors as exc:
            self._down(exc)
            return
        # (more names than any fleet has: someone wrote them; lists then go out one entry per ban)
        self._peers_bulk = len(names) <= MAX_PEERS and all(_wire_of(b) >= WIRE for b in beats if b is not None)

    def _gc(self, now: float) -> None:
        """Expired bans and old unbans leave the shared hashes (compare-and-delete, so no race)."""
        if not self.redis_ok:
            return
        try:
            P = self.prefix
            for ip, payload in self.client.hscan_iter(P + "bans", count=1000):
                try:  # expired, malformed or (with a secret) forged values go; compare-and-delete
                    ban = parse_ban(payload, self.signer, now)[0]
                    gone = ban.expires is not None and ban.expires <= now
                except (ValueError, TypeError):
                    gone = True
                if gone:
                    self._hdel_if(keys=[P + "bans"], args=[ip, payload])
            for ip, at in self.client.hscan_iter(P + "unbans", count=1000):
                try:
                    old = float(at.split("|", 1)[0]) < now - UNBAN_MEMORY
                except ValueError:
                    old = True
                if old:
                    self._hdel_if(keys=[P + "unbans"], args=[ip, at])
            self._gc_users(now)
        except self._errors as exc:
            self._down(exc)
        self.store.gc_held()


def _wire_of(heartbeat: object) -> int:
    """The `wire` a node's heartbeat says it reads (1: none said, an older version, or no heartbeat json
    at all; 0: not a whole number)."""
    v = json_object(heartbeat).get("wire", 1)
    return v if type(v) is int else 0
