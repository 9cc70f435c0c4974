"""One scoring semantics: every case in tests/policy_cases/ runs through the local Policy and through
the fleet's Redis score script, and both must give exactly the decisions the case expects.

A case is a directory (in the spirit of CrowdSec's pkg/leakybucket/testdata/<scenario>/):

* `policy.toml`: the policy config, the same keys as the `[policy]` section of sipguard.toml
  (validated as that section, so an unknown key fails the case);
* `events.jsonl`: the events in, one per line: `time` (seconds from the case's start), `ip`,
  `filter`, `kind`, `weight`, optionally `captures` (the regex's named groups, e.g. {"dest": "+44..."},
  what distinct jails count), `batch` (a label: consecutive events with the same label are read in
  one batch) and `node` (which fleet node reads it, "a" when absent: a case of several nodes, each its
  own ClusterPolicy with its own name on the one Redis; the local run is one Policy that sees every
  event, the decisions a fleet must give when its nodes share what they see);
* `decisions.jsonl`: the decisions out, in order: `event` (0-based index of the event that decided
  it, among the lines of events.jsonl), `time` (that event's time), `ip`, `reason`, `score`,
  `duration` (seconds, null = permanent) and `offence`, and `user` for a user ban (the office policy:
  that user at that address only);
* `README.md`: what the case shows, in a few lines.

Times. The Redis script scores a whole batch at one batch time `now` (a ban's `created`, the
instant at which "is this source banned" is asked), while window and offence arithmetic use each
event's own time, as the local Policy does. To make the two comparable the harness gives both the
same batches: an event without a `batch` label is a batch of its own, and a batch's `now` is the
time of its last event (as in the daemon, where `now` is read after the lines were logged). The
decision's duration is its ban's `expires - created`, with `created = now` on both sides (the
daemon's rule, `ban_from_decision`). A ban is in force while `now < expires`: before each batch
the harness releases (`Policy.release`, as the daemon's expiry does) every ban with
`expires <= now` (a user ban: `Policy.release_user`); Redis's script checks the same itself. Case times are offsets from T0, a real
epoch time, so the script's number formatting is exercised at realistic magnitudes.

Runs, each against the case's expectations:

* `local`: `Policy.observe` per event;
* `fleet`: the node's real path: `ClusterPolicy.observe` (buffers), `take`, the real `SCORE_LUA`
  called with `ClusterPolicy.score_args` (every event signed), its candidates recounted on verified
  events by `ClusterPolicy.verdicts` and claimed with the real `PUBLISH_LUA`, `ClusterPolicy.scored`
  with the bans (so the local `banned` set follows, as `ClusterBridge.score_batch` does) and
  `note_user_ban` for user bans (as the ban book does);
* `script`: `SCORE_LUA` alone on every scored event (no local filtering), so the script's own
  "already banned" check (the shared ban hash, with its expiry) decides.

Scores are compared to 1e-9 (the script returns bans as JSON, whose numbers carry 14 significant
digits: 0.1 + 0.1 + 0.1 comes back as 0.3), durations to 1e-6 s; everything else exactly.

The redis-server is this test's own: a unix socket in a temp dir (no TCP port), no persistence,
stopped by its PID.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from sipguard.addresses import AllowList
from sipguard.cluster import PUBLISH_LUA, SCORE_LUA, ClusterPolicy, parse_ban
from sipguard.cluster.signing import Signer
from sipguard.cluster.wire import parse_user_ban
from sipguard.config import ClusterConfig, Config, PolicyConfig
from sipguard.model import Ban, Event, EventKind
from sipguard.policy import Policy

CASES_DIR = Path(__file__).parent / "policy_cases"
CASES = sorted(p.name for p in CASES_DIR.iterdir() if p.is_dir())
T0 = 1_700_000_000.0
NO_ALLOW = AllowList([], include_host=False)
FIELDS = ("event", "time", "ip", "reason", "score", "duration", "offence")
OPTIONAL = ("user",)

REDIS = shutil.which("redis-server")
NODES: dict[int, str] = {}  # id(event) -> the node that reads it (the case's `node`, default "a")


# -- the case files -----------------------------------------------------------------------------
def load_case(name: str) -> tuple[PolicyConfig, list[list[tuple[int, Event]]], list[dict]]:
    d = CASES_DIR / name
    with (d / "policy.toml").open("rb") as f:
        cfg = Config.model_validate({"policy": tomllib.load(f)}).policy
    batches: list[list[tuple[int, Event]]] = []
    label = None
    for i, line in enumerate(l for l in (d / "events.jsonl").read_text().splitlines() if l.strip()):
        e = json.loads(line)
        assert set(e) <= {"time", "ip", "filter", "kind", "weight", "batch", "captures", "node"}, e
        ev = Event(T0 + e["time"], e["ip"], e["filter"], EventKind(e["kind"]), float(e["weight"]),
                   captures=tuple(e.get("captures", {}).items()))
        NODES[id(ev)] = e.get("node", "a")
        if "batch" in e and e["batch"] == label:
            assert NODES[id(batches[-1][0][1])] == NODES[id(ev)], "a batch is read by one node"
            batches[-1].append((i, ev))
        else:
            batches.append([(i, ev)])
        label = e.get("batch")
    expected = [json.loads(line) for line in (d / "decisions.jsonl").read_text().splitlines() if line.strip()]
    for x in expected:
        assert set(FIELDS) <= set(x) <= set(FIELDS + OPTIONAL), x
    assert (d / "README.md").is_file(), f"{name}: say what the case shows"
    return cfg, batches, expected


def decision(i: int, ev: Event, ban: Ban) -> dict:
    d = {"event": i, "time": ev.time - T0, "ip": ban.ip, "reason": ban.reason, "score": ban.score,
         "duration": None if ban.expires is None else ban.expires - ban.created, "offence": ban.offence}
    if ban.user is not None:
        d["user"] = ban.user
    return d


def comparable(ds: list[dict]) -> list[tuple]:
    return [(d["event"], d["time"], d["ip"], d["reason"], round(d["score"], 9),
             None if d["duration"] is None else round(d["duration"], 6), d["offence"], d.get("user")) for d in ds]


# -- the runs -----------------------------------------------------------------------------------
class Run:
    """Feeds a case's batches; subclasses score one batch and say how a ban ends."""

    def __init__(self, cfg: PolicyConfig) -> None:
        self.cfg = cfg
        self.in_force: dict[tuple[str, str | None], float | None] = {}  # (ip, user or None) -> expires

    def feed(self, batches: list[list[tuple[int, Event]]]) -> list[dict]:
        out: list[dict] = []
        for batch in batches:
            now = batch[-1][1].time
            for key, expires in list(self.in_force.items()):
                if expires is not None and expires <= now:
                    del self.in_force[key]
                    if key[1] is None:
                        self.release(key[0])
                    else:
                        self.release_user(*key)
            for i, ev, ban in self.batch(batch, now):
                assert ban.created == now and not ban.manual
                self.in_force[(ban.ip, ban.user)] = ban.expires
                out.append(decision(i, ev, ban))
        return out

    def release(self, ip: str) -> None:
        raise NotImplementedError

    def release_user(self, ip: str, user: str) -> None:
        raise NotImplementedError

    def batch(self, batch: list[tuple[int, Event]], now: float) -> list[tuple[int, Event, Ban]]:
        raise NotImplementedError


class LocalRun(Run):
    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__(cfg)
        self.policy = Policy(cfg, NO_ALLOW)

    def release(self, ip: str) -> None:
        self.policy.release(ip)

    def release_user(self, ip: str, user: str) -> None:
        self.policy.release_user(ip, user)

    def batch(self, batch, now):
        out = []
        for i, ev in batch:
            d = self.policy.observe(ev)
            if d is not None:
                assert d.time == ev.time
                expires = None if d.duration is None else now + d.duration
                out.append((i, ev, Ban(d.ip, d.reason, now, expires, d.score, d.offence, user=d.user)))
        return out


class ScriptRun(Run):
    """SCORE_LUA through ClusterPolicy.score_args, its candidates recounted on verified (signed)
    events by ClusterPolicy.verdicts and claimed with PUBLISH_LUA, as the bridge does; `fleet` adds
    the node's own path around it."""

    def __init__(self, cfg: PolicyConfig, client, prefix: str, fleet: bool) -> None:
        super().__init__(cfg)
        self.fleet = fleet
        self.nodes: dict[str, ClusterPolicy] = {}
        self.client, self.prefix = client, prefix
        self.cp = self.node("a")
        self.script = client.register_script(SCORE_LUA)
        self.publish = client.register_script(PUBLISH_LUA)
        self.jail_csv = ",".join(cfg.jails)
        self.client, self.prefix = client, prefix
        self.scored_kinds = {EventKind.SUCCESS} | {k for j in cfg.jails.values() for k in j.kinds} | (
            {EventKind.AUTH_FAILURE} if cfg.office.enabled else set())

    def node(self, label: str) -> ClusterPolicy:
        """The ClusterPolicy of node `label` ("a": named "case", else "case-LABEL"), made at first use."""
        cp = self.nodes.get(label)
        if cp is None:
            name = "case" if label == "a" else f"case-{label}"
            ccfg = ClusterConfig(redis_url="unix:///unused.sock", node_name=name, key_prefix=self.prefix)
            cp = self.nodes[label] = ClusterPolicy(Policy(self.cfg, NO_ALLOW), ccfg, scoring=lambda: True,
                                                   signer=Signer("policy-cases-secret", self.prefix))
        return cp

    def release(self, ip: str) -> None:
        if self.fleet:  # what the daemon's expiry does (on every node); the script itself needs nothing
            for cp in self.nodes.values():
                cp.release(ip)

    def release_user(self, ip: str, user: str) -> None:
        if self.fleet:
            for cp in self.nodes.values():
                cp.release_user(ip, user)

    def batch(self, batch, now):
        self.cp = self.node(NODES.get(id(batch[0][1]), "a"))
        index = {id(ev): i for i, ev in batch}
        if self.fleet:
            for _, ev in batch:
                assert self.cp.observe(ev) is None  # the fleet decides nothing locally
            events = self.cp.take()
        else:
            events = [ev for _, ev in batch if ev.kind in self.scored_kinds]
        if not events:
            return []
        args = self.cp.score_args(events, round(now, 3))
        first = 9 + 6 * len(self.cfg.jails) + 7  # ARGV layout: see sipguard/cluster/lua/score.lua
        assert len(args) == first + 7 * len(events)
        by_uid = {args[first + 7 * k + 5]: ev for k, ev in enumerate(events)}
        result = self.script(args=args)
        candidates = result[0]
        verdicts, forged = self.cp.verdicts(candidates, round(now, 3))
        assert not forged  # every event here was signed by this node
        assert self.cp.office_checks([result], round(now, 3)) == ({}, set())  # (successes signed too)
        out = []
        for v in verdicts:
            if self.publish(args=self.cp.claim_args(v, round(now, 3), 100_000, 86400.0, self.jail_csv)) != 1:
                continue
            if v.ban.user is None:
                stored = self.client.hget(self.prefix + "bans", v.ban.ip)  # what the claim put in the shared set
                ban, ban_id, origin = parse_ban(stored, self.cp.signer)
            else:  # a user ban: in the shared user-ban hash, field IP|HASH
                stored = self.client.hget(self.prefix + "ubans", f"{v.ban.ip}|{self.cp.user_hash(v.ban.user)}")
                ban, ban_id, origin = parse_user_ban(stored, self.cp.signer)
                ban = dataclasses.replace(ban, evidence=v.ban.evidence)  # (evidence stays on the node)
            assert ban == v.ban
            assert origin == self.cp._node and ban_id.startswith(origin + ":")
            ev = by_uid[ban_id.split(":", 1)[1]]
            out.append((index[id(ev)], ev, ban))
        if self.fleet:
            self.cp.scored(events, [b.ip for _, _, b in out if b.user is None])
            for cp in self.nodes.values():  # every node's ban book applies the fleet's bans
                for _, _, b in out:
                    if b.user is not None:
                        cp.note_user_ban(b.ip, b.user)
                    elif cp is not self.cp:
                        cp.note_ban(b.ip)
        return out


# -- redis --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def redis_client(tmp_path_factory):
    if REDIS is None:
        if os.geteuid() == 0:  # CI runs as root after `make setup` installed it: never skip there
            pytest.fail("redis-server is not installed (the Makefile's APT_PACKAGES install it)", pytrace=False)
        pytest.skip("redis-server is not installed")
    import redis

    d = tmp_path_factory.mktemp("redis")
    sock = d / "redis.sock"
    proc = subprocess.Popen(
        [REDIS, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700", "--dir", str(d),
         "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(unix_socket_path=str(sock), decode_responses=True, socket_timeout=5)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except (redis.RedisError, OSError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        yield client
    finally:
        client.close()
        proc.kill()
        proc.wait(10)


# -- the tests ----------------------------------------------------------------------------------
def test_there_are_enough_cases():
    assert len(CASES) >= 12, CASES


@pytest.mark.parametrize("name", CASES)
def test_local_policy(name):
    cfg, batches, expected = load_case(name)
    assert comparable(LocalRun(cfg).feed(batches)) == comparable(expected)


@pytest.mark.parametrize("mode", ["fleet", "script"])
@pytest.mark.parametrize("name", CASES)
def test_redis_score_script(name, mode, redis_client):
    cfg, batches, expected = load_case(name)
    prefix = f"case:{name}:{mode}:"
    try:
        got = ScriptRun(cfg, redis_client, prefix, fleet=mode == "fleet").feed(batches)
    finally:
        keys = list(redis_client.scan_iter(prefix + "*"))
        if keys:
            redis_client.delete(*keys)
    assert comparable(got) == comparable(expected)


def test_two_nodes_case_needs_the_shared_successes():
    """office_two_nodes is no trivial case: node b's events alone, on one Policy, ban the office's address
    (it never saw a success), so the fleet's user ban comes from the successes node a shared."""
    cfg, batches, expected = load_case("office_two_nodes")
    alone = [[(i, ev) for i, ev in b if NODES[id(ev)] == "b"] for b in batches]
    got = LocalRun(cfg).feed([b for b in alone if b])
    assert [(d["ip"], d["reason"], d.get("user")) for d in got][:1] == [("198.18.45.1", "auth:auth-failure", None)]
    assert [d.get("user") for d in expected] == ["stale", None]


def test_comparison_tells_a_difference_apart():
    """The harness is not blind: a changed score, duration or event index is a difference."""
    base = {"event": 2, "time": 599.0, "ip": "198.18.20.1", "reason": "auth:auth-failure", "score": 3.0,
            "duration": 3600.0, "offence": 1}
    assert comparable([base]) == comparable([dict(base, score=3.0 + 1e-12)])
    for change in ({"score": 3.001}, {"duration": 3601.0}, {"duration": None}, {"event": 3}, {"offence": 2},
                   {"reason": "auth-slow:auth-failure"}, {"user": "stale"}):
        assert comparable([base]) != comparable([dict(base, **change)]), change
    assert math.isclose(0.1 + 0.1 + 0.1, 0.3) and 0.1 + 0.1 + 0.1 != 0.3  # why scores are rounded


def test_forged_successes_and_user_bans_decide_nothing(redis_client):
    """What a stranger writes into Redis for the office policy decides nothing: a success member it ZADDs
    (no valid tag) makes the address an office in the script, but the node's `office_checks` finds no
    verified success for another user, names the member for removal and leaves those failures to the local
    Policy (which saw no success: the auth jail bans the address); a forged user ban in the shared user-ban
    hash that made the script skip a user's failures is left to the local Policy the same way."""
    cfg = Config.model_validate({"policy": {"bantime": "1h"}}).policy
    prefix = "case:forged-office:"
    run = ScriptRun(cfg, redis_client, prefix, fleet=True)
    cp, ip = run.cp, "198.18.60.1"
    try:
        forged = f"x.1|d{cp.user_hash('alice')}|AAAAAAAAAAAAAAAAAAAAAA"
        redis_client.zadd(prefix + f"s:{ip}:office_ok", {forged: T0})
        fails = [Event(T0 + k, ip, "auth-failure", EventKind.AUTH_FAILURE, 1.0, captures=(("user", "stale"),))
                 for k in range(1, 4)]
        for ev in fails:
            assert cp.observe(ev) is None
        events = cp.take()
        result = run.script(args=cp.score_args(events, T0 + 3))
        # the script took it for an office: a user candidate (on signed failures), none in the auth jail
        assert [json.loads(c)["jail"] for c in result[0]] == ["office_user"]
        verdicts, _ = cp.verdicts(result[0], T0 + 3)
        assert [v.ban.user for v in verdicts] == ["stale"]
        bad, here = cp.office_checks([result], T0 + 3)
        assert bad == {f"s:{ip}:office_ok": [forged]} and here == {(ip, cp.user_hash("stale"))}
        assert cp.office_verdicts(verdicts, here) == []  # the user ban rested on the forged success
        assert cp.decided_here(events, here) == events
        (d,) = [d for d in cp.decide_locally(events) if d is not None]
        assert (d.ip, d.reason, d.user) == (ip, "auth:auth-failure", None)
        # a genuine success (signed by a node) verifies: nothing is left to the local Policy
        ok = Event(T0 + 10, "198.18.60.2", "register-success", EventKind.SUCCESS, 0.0, captures=(("user", "alice"),))
        fail = Event(T0 + 11, "198.18.60.2", "auth-failure", EventKind.AUTH_FAILURE, 1.0, captures=(("user", "bob"),))
        cp.observe(ok)
        cp.observe(fail)
        result = run.script(args=cp.score_args(cp.take(), T0 + 11))
        assert cp.office_checks([result], T0 + 11) == ({}, set())
        # a forged user ban (no valid tag) in the shared hash: the script skips bob's failure, the node does not
        redis_client.hset(prefix + "ubans", f"198.18.60.2|{cp.user_hash('bob')}",
                          json.dumps({"ip": "198.18.60.2", "user": "bob", "created": T0, "expires": None,
                                      "reason": "x", "score": 3.0, "offence": 1, "manual": False, "id": "e:1",
                                      "origin": "e", "sig": "AAAAAAAAAAAAAAAAAAAAAA"}))
        cp.observe(fail._replace(time=T0 + 12))
        result = run.script(args=cp.score_args(cp.take(), T0 + 12))
        assert result[2] == 1  # skipped for the user ban ...
        assert cp.office_checks([result], T0 + 12)[1] == {("198.18.60.2", cp.user_hash("bob"))}  # ... not verified
    finally:
        keys = list(redis_client.scan_iter(prefix + "*"))
        if keys:
            redis_client.delete(*keys)


def test_a_node_remembers_the_fleets_offices_for_when_redis_goes_away(redis_client):
    """Node a sees the office's success, node b two failures of its stale phone (scored in Redis as the
    office's, on a's verified success); then Redis goes away and b's local Policy decides the third: a user
    ban, as the fleet would have made, not the address ban of the auth jail (b never saw a success itself)."""
    cfg = Config.model_validate({"policy": {"bantime": "1h"}}).policy
    prefix = "case:office-outage:"
    run = ScriptRun(cfg, redis_client, prefix, fleet=True)
    a, b, ip = run.node("a"), run.node("b"), "198.18.61.1"
    try:
        a.observe(Event(T0, ip, "register-success", EventKind.SUCCESS, 0.0, captures=(("user", "alice"),)))
        run.script(args=a.score_args(a.take(), T0))
        fails = [Event(T0 + k, ip, "auth-failure", EventKind.AUTH_FAILURE, 1.0, "auth failed for user stale",
                       (("user", "stale"),)) for k in (1, 2, 3)]
        for ev in fails[:2]:
            b.observe(ev)
        events = b.take()
        result = run.script(args=b.score_args(events, T0 + 2))
        assert result[0] == [] and b.office_checks([result], T0 + 2) == ({}, set())
        b.scored(events, [])
        (d,) = b.decide_locally(fails[2:])  # Redis away: the local Policy decides
        assert (d.ip, d.user, d.reason) == (ip, "stale", "office_user:auth-failure") and ip not in b.banned
    finally:
        keys = list(redis_client.scan_iter(prefix + "*"))
        if keys:
            redis_client.delete(*keys)
