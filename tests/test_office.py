"""The office policy (issue 17, [policy.office]): one user failing forever behind a NAT address where other
users authenticate is banned alone (a user ban, enforced by Kamailio), not the address; the address is banned
when distinct failing users or the failure rate say an attack comes from behind it; without successes the
policy scores as before."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sipguard.addresses import AllowList
from sipguard.config import PolicyConfig
from sipguard.filters.filterset import FilterSet
from sipguard.model import Event, EventKind, Record, user_key
from sipguard.policy import Policy

OFFICE = "198.18.200.10"


def fail(t: float, user: str | None, ip: str = OFFICE) -> Event:
    caps = (("user", user),) if user is not None else ()
    return Event(t, ip, "auth-failure", EventKind.AUTH_FAILURE, 1.0,
                 f"NOTICE: <script>: auth failed for user {user} from {ip}:5060 method REGISTER", caps)


def ok(t: float, user: str | None, ip: str = OFFICE) -> Event:
    caps = (("user", user),) if user is not None else ()
    return Event(t, ip, "register-success", EventKind.SUCCESS, 0.0, "", caps)


def policy(**office) -> Policy:
    return Policy(PolicyConfig(office=office) if office else PolicyConfig(), AllowList([], include_host=False))


def run(p: Policy, events):
    return [d for d in (p.observe(e) for e in events) if d is not None]


def test_one_user_failing_forever_beside_successes_is_a_user_ban_not_the_address():
    p = policy()
    events = []
    for i in range(60):  # an hour: others register every 60 s, the stale phone fails every 20 s
        t = 1000.0 + i * 60
        events += [ok(t, f"2000{i % 10:02d}"), fail(t + 10, "stale"), fail(t + 30, "stale"), fail(t + 50, "stale")]
    got = run(p, events)
    assert len(got) == 1
    d = got[0]
    assert d.user == "stale" and d.ip == OFFICE and d.reason == "office_user:auth-failure"
    assert d.duration == 3600 and d.score == 3.0
    assert OFFICE not in p.banned and (OFFICE, "stale") in p.user_banned
    assert len(d.evidence) == 3 and all("stale" in e.text for e in d.evidence)
    assert p.stats.while_banned > 100  # the banned user's further failures are not scored


def test_user_ban_released_counts_anew_and_own_success_resets():
    p = policy()
    run(p, [ok(0, "a"), fail(1, "b"), fail(2, "b"), ok(3, "b"), fail(4, "b"), fail(5, "b")])
    assert not p.user_banned  # b's own success reset its count
    d = run(p, [fail(6, "b")])
    assert d and d[0].user == "b"
    p.release_user(OFFICE, "b")
    assert run(p, [fail(7, "b"), fail(8, "b")]) == []
    assert run(p, [fail(9, "b")])[0].user == "b"


def test_five_distinct_failing_users_ban_the_address():
    p = policy()
    got = run(p, [ok(0, "a")] + [fail(10 + i, f"u{i}") for i in range(5)])
    assert [(d.ip, d.user, d.reason, d.score) for d in got] == [(OFFICE, None, "office_users:auth-failure", 5.0)]
    assert OFFICE in p.banned


def test_four_distinct_users_twice_each_do_not_ban_the_address():
    p = policy()
    got = run(p, [ok(0, "a")] + [fail(10 + i, f"u{i % 4}") for i in range(8)])
    assert got == [] and OFFICE not in p.banned and not p.user_banned  # 2 failures each: under user_threshold


def test_the_failure_rate_bans_the_address():
    p = policy(rate=6, user_threshold=100)
    got = run(p, [ok(0, "a")] + [fail(10 + i, f"u{i % 2}") for i in range(6)])
    assert [(d.user, d.reason) for d in got] == [(None, "office_rate:auth-failure")]


def test_no_successes_at_all_scores_as_today():
    p, q = policy(), policy(enabled=False)
    events = [fail(10 + i, "stale") for i in range(3)]
    a, b = run(p, events), run(q, events)
    assert [(d.ip, d.user, d.reason) for d in a] == [(d.ip, d.user, d.reason) for d in b] == [
        (OFFICE, None, "auth:auth-failure")]


def test_a_success_for_the_same_user_only_is_no_office():
    p = policy()
    got = run(p, [ok(0, "stale")] + [fail(10 + i, "stale") for i in range(3)])
    assert [(d.user, d.reason) for d in got] == [(None, "auth:auth-failure")]


def test_an_old_success_is_no_office():
    p = policy(success_within=60)
    got = run(p, [ok(0, "a")] + [fail(100 + i, "stale") for i in range(3)])
    assert [(d.user, d.reason) for d in got] == [(None, "auth:auth-failure")]


def test_failures_without_a_user_capture_score_as_today():
    p = policy()
    got = run(p, [ok(0, "a")] + [fail(10 + i, None) for i in range(3)])
    assert [(d.user, d.reason) for d in got] == [(None, "auth:auth-failure")]


def test_disabled_office_is_today():
    p = policy(enabled=False)
    got = run(p, [ok(0, "a")] + [fail(10 + i, "stale") for i in range(3)])
    assert [(d.user, d.reason) for d in got] == [(None, "auth:auth-failure")]


def test_config_errors():
    with pytest.raises(ValidationError):
        PolicyConfig(office={"distinct_users": 1})
    with pytest.raises(ValidationError):
        PolicyConfig(office={"rate": 0})
    with pytest.raises(ValidationError, match="office policy's own"):
        PolicyConfig(jails={"office_users": {"kinds": ["auth_failure"], "findtime": 60, "threshold": 1}})
    PolicyConfig(office={"enabled": False}, jails={"office_users": {"kinds": ["auth_failure"], "findtime": 60,
                                                                     "threshold": 1}})


def test_memory_is_bounded_under_a_spray_of_users():
    p = Policy(PolicyConfig(max_tracked=100), AllowList([], include_host=False))
    for i in range(5000):
        ip = f"198.18.{i // 250}.{i % 250}"
        p.observe(ok(i, "a", ip))
        p.observe(fail(i, f"u{i}", ip))
    assert len(p._succ) <= 100 and len(p._uwin) <= 100


def test_the_shipped_filters_capture_the_user():
    fs = FilterSet.load(["filters"])
    f = fs.match(Record(f"NOTICE: <script>: auth failed for user 200000 from {OFFICE}:5060 method REGISTER"), 0.0)
    assert f.kind is EventKind.AUTH_FAILURE and f.captures == (("user", "200000"),) and f.ip == OFFICE
    s = fs.match(Record(f"NOTICE: <script>: REGISTER success for user 200001 from {OFFICE}:5060"), 0.0)
    assert s.kind is EventKind.SUCCESS and s.captures == (("user", "200001"),)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=80))
def test_user_text_never_decides_the_address(user):
    """Whatever the From user says (an address, a key separator, a forged tail), the ban is of the address
    Kamailio printed as $si, and the user ban key is that text plus that address."""
    p = policy()
    got = run(p, [ok(0, "a")] + [fail(10 + i, user) for i in range(3)])
    for d in got:
        assert d.ip == OFFICE
        if d.user is not None:
            assert d.user == user and user_key(d.user, d.ip).endswith("@" + OFFICE)


# -- the ban book: a user ban skips the kernel, lands in the store and the htable mirror ---------------

class FakeRpc:
    """Kamailio's htable over JSON-RPC, in memory (the real one: test_the_office_against_real_kamailio)."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, int]] = {"ipban": {}, "userban": {}}
        self.calls: list[tuple] = []

    def call(self, method: str, *params):
        self.calls.append((method, *params))
        t = self.tables.setdefault(params[0], {})
        if method in ("htable.setxi", "htable.seti"):
            t[params[1]] = params[2]
        elif method == "htable.delete":
            t.pop(params[1], None)
        elif method == "htable.dump":
            return [{"slot": [{"name": k, "value": v} for k, v in t.items()]}]
        return None


def _book(tmp_path, htable: bool = True):
    from sipguard.bans import BanBook
    from sipguard.config import HtableConfig
    from sipguard.enforce.dryrun import DryRunEnforcer
    from sipguard.enforce.stack import EnforcerStack
    from sipguard.extras.htable import HtableEnforcer
    from sipguard.store import Store

    store = Store.open_state_dir(tmp_path / "st")
    kernel, rpc = DryRunEnforcer(), FakeRpc()
    mirrors = [HtableEnforcer(HtableConfig(enabled=True), rpc)] if htable else []  # type: ignore[arg-type]
    p = policy()
    return BanBook(store, EnforcerStack(kernel, mirrors), p), store, kernel, rpc, p


def test_a_user_ban_goes_through_the_book_to_the_store_and_kamailio_never_the_kernel(tmp_path):
    from sipguard.bans import ban_from_decision

    book, store, kernel, rpc, p = _book(tmp_path)
    (d,) = run(p, [ok(0, "a")] + [fail(10 + i, "stale") for i in range(3)])
    now = 100.0
    book.ban([ban_from_decision(d, now)], now)
    book.commit(now)
    assert kernel.entries() == [] and rpc.tables["ipban"] == {}  # the office keeps working
    assert rpc.tables["userban"] == {f"stale@{OFFICE}": 2}
    assert ("htable.setxi", "userban", f"stale@{OFFICE}", 2, 3600) in rpc.calls
    (b,) = store.active_user_bans(now)
    assert (b.ip, b.user, b.reason, b.expires) == (OFFICE, "stale", "office_user:auth-failure", now + 3600)
    kept = store.evidence_of(f"stale@{OFFICE}")[now]  # the records that decided it (for `why`)
    assert len(kept) == 3 and all("auth failed for user stale" in e.text for e in kept)
    assert store.evidence_of(OFFICE) == {}
    assert store.get_ban(OFFICE) is None and book.held(now) == [] and [x.user for x in book.held_users(now)] == ["stale"]
    assert OFFICE not in p.banned and (OFFICE, "stale") in p.user_banned
    # a resync keeps it and drops a stale sipguard entry (value 2), leaves others
    rpc.tables["userban"].update({"gone@198.18.0.9": 2, "theirs@198.18.0.9": 1})
    book.resync(now)
    assert rpc.tables["userban"] == {f"stale@{OFFICE}": 2, "theirs@198.18.0.9": 1}
    # expiry: out of Kamailio, the store and the scorer
    later = now + 3601
    book.expire(later)
    book.commit(later)
    assert store.active_user_bans(later) == [] and f"stale@{OFFICE}" not in rpc.tables["userban"]
    assert not p.user_banned
    actions = [h for h in store.history(100) if "user=stale" in str(h)]
    assert len(actions) == 2


def test_a_user_ban_without_htable_is_stored_and_listed_only(tmp_path, caplog):
    from sipguard.bans import ban_from_decision

    book, store, kernel, rpc, p = _book(tmp_path, htable=False)
    (d,) = run(p, [ok(0, "a")] + [fail(10 + i, "stale") for i in range(3)])
    book.ban([ban_from_decision(d, 100.0)], 100.0)
    book.commit(100.0)
    assert kernel.entries() == [] and [b.user for b in store.active_user_bans(100.0)] == ["stale"]
    assert "htable" in caplog.text


def test_list_shows_a_user_ban_escaped(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from sipguard.model import Ban
    from sipguard.store import Store

    hostile = "st\x1b[31male\u202e"
    store = Store.open_state_dir(tmp_path / "st")
    with store.transaction():
        store.put_user_bans([Ban(OFFICE, "office_user:auth-failure", 1e9, 4e9, 3.0, user=hostile)], 1e9)
    store.close()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    base = [sys.executable, "-m", "sipguard", "--state-dir", str(tmp_path / "st"), "list"]
    rows = json.loads(subprocess.run([*base, "--json"], capture_output=True, text=True, env=env, check=True).stdout)
    assert [(r["ip"], r["user"], r["reason"]) for r in rows] == [(OFFICE, hostile, "office_user:auth-failure")]
    plain = subprocess.run(base, capture_output=True, text=True, env=env, check=True).stdout
    assert OFFICE in plain and "\x1b" not in plain and "\u202e" not in plain and "st\\x1b[31male" in plain


# -- against the real Kamailio: the failing user gets 403, the other users of the address register -------

@pytest.mark.root
@pytest.mark.skipif(__import__("os").geteuid() != 0 or __import__("shutil").which("kamailio") is None,
                    reason="needs root and kamailio")
def test_the_office_against_real_kamailio(tmp_path):
    """Two users behind one address: 300000 registers, 300001 has a stale password. Kamailio's own log
    lines (through a private rsyslogd) drive sipguard's daemon (dry-run kernel, the htable mirror to this
    Kamailio): a user ban of 300001 at that address in `userban`, then Kamailio answers 300001 with 403
    while 300000 still registers and the address is in neither the kernel nor `ipban`."""
    import os
    import shutil
    import tempfile
    import threading

    from waiting import wait_for

    from sipguard.config import Config
    from sipguard.enforce.dryrun import DryRunEnforcer
    from sipguard.extras.htable import JsonRpc, dump_keys
    from sipguard.store import Store
    from sipguard.wiring import build_daemon
    from tests.lab.load import LoadKamailio, User, subscriber_table
    from tests.lab.netns import Lab
    from tests.lab.sip import SipClient

    client_ip = "198.18.0.32"
    good, stale = User("300000", "right-one", client_ip), User("300001", "new-secret", client_ip)
    with Lab(f"of{os.getpid() % 100000}", prefix="sgo-") as lab:
        with LoadKamailio(lab.hub, lab.proxy_ip, logmode="rsyslog", template="RSYSLOG_TraditionalFileFormat",
                          subscriber=subscriber_table([good, stale])) as k:
            client = lab.add_client(client_ip)
            rpc_url = f"unix:{k.work / 'run' / 'kamailio_rpc.sock'}"
            rpc = JsonRpc(rpc_url)
            users = lambda: dump_keys(rpc.call("htable.dump", "userban"))  # noqa: E731
            ipban = lambda: dump_keys(rpc.call("htable.dump", "ipban"))  # noqa: E731
            replies = Path(tempfile.mkdtemp(prefix="sgo-of-", dir="/tmp")) / "r"
            store = Store.open_state_dir(tmp_path / "st")
            cfg = Config.model_validate({"allowlist": {"include_host_addresses": False},
                                         "daemon": {"control_interval": 0.05},
                                         "htable": {"enabled": True, "rpc": rpc_url, "reply_dir": str(replies),
                                                    "reply_group": ""}})
            kernel = DryRunEnforcer()
            d = build_daemon(cfg, store, kernel, logs=[str(k.logfile)])
            th = threading.Thread(target=d.run, daemon=True)
            th.start()
            try:
                wait_for(lambda: d.ready.is_set(), timeout=8.0)
                with SipClient(server=lab.proxy_ip, netns=client.name, local_ip=client_ip, timeout=2.0) as sip:
                    r = sip.register(good.user, password=good.password)
                    assert r is not None and r.status == 200
                    wait_for(lambda: k.logfile.read_text().count("REGISTER success for user 300000") >= 1,
                             timeout=5.0)
                    for _ in range(3):  # the stale phone: a wrong password, three times
                        r = sip.register(stale.user, password="old-secret")
                        assert r is not None and r.status == 401
                    wait_for(lambda: f"300001@{client_ip}" in users(), timeout=8.0)
                    sip.drain()
                    r = sip.register(stale.user, password="old-secret")
                    assert r is not None and r.status == 403  # refused before auth, by the userban entry
                    r = sip.register(stale.user, password=stale.password)
                    assert r is not None and r.status == 403  # even with the right password, until it ends
                    r = sip.register(good.user, password=good.password)
                    assert r is not None and r.status == 200  # the office's other user goes on
                    r = sip.options()
                    assert r is not None and r.status == 200  # the address is not banned
                assert kernel.entries() == [] and client_ip not in ipban()
                assert [(b.ip, b.user) for b in Store.open_state_dir(tmp_path / "st", readonly=True)
                        .active_user_bans(__import__("time").time())] == [(client_ip, "300001")]
            finally:
                d.stop()
                th.join(10)
                store.close()
                shutil.rmtree(replies.parent, ignore_errors=True)
            assert not th.is_alive()


def test_why_shows_the_user_bans_at_an_address(tmp_path):
    import json
    import os
    import subprocess
    import sys
    import time

    from sipguard.model import Ban, Evidence
    from sipguard.store import Store

    store = Store.open_state_dir(tmp_path / "st")
    now = time.time()
    with store.transaction():
        store.put_user_bans([Ban(OFFICE, "office_user:auth-failure", now, now + 3600, 3.0, user="st\x1bale",
                                 evidence=(Evidence(now - 5, "auth-failure", 1.0, "auth failed for user st\x1bale"),)),
                             Ban(OFFICE, "office_user:auth-failure", now - 7200, now - 3600, 3.0, user="over")], now)
    store.close()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    base = [sys.executable, "-m", "sipguard", "--state-dir", str(tmp_path / "st"), "why", OFFICE]
    r = json.loads(subprocess.run([*base, "--json"], capture_output=True, text=True, env=env, check=True).stdout)
    assert r["banned"] is False and [u["user"] for u in r["user_bans"]] == ["st\x1bale"]
    assert [e["text"] for e in r["user_bans"][0]["evidence"]] == ["auth failed for user st\x1bale"]
    text = subprocess.run(base, capture_output=True, text=True, env=env, check=True).stdout
    assert "not banned" in text and "user ban: user st\\x1bale at this address only" in text and "\x1b" not in text
    assert "auth-failure  auth failed for user st\\x1bale" in text


def test_fleet_mode_sends_an_offices_successes_and_failures_to_redis():
    """The office policy is scored in Redis (issue 17, fleet): while the fleet scores, successes and auth
    failures with a user capture are buffered for the script like every other event (none decided by this
    node alone), and the user reaches Redis only as its keyed hash, never as text."""
    from sipguard.cluster import ClusterPolicy
    from sipguard.cluster.signing import Signer
    from sipguard.config import ClusterConfig

    cp = ClusterPolicy(policy(), ClusterConfig(redis_url="unix:///unused.sock", node_name="n1"), scoring=lambda: True,
                       signer=Signer("s3cret", "sipguard:"))
    evs = [ok(0, "a"), *(fail(10 + i, "stale") for i in range(3)), fail(20, "x", ip="198.18.0.50")]
    assert [cp.observe(e) for e in evs] == [None] * 5
    got = cp.take()
    assert got == evs
    args = [str(a) for a in cp.score_args(got, 30.0)]
    assert not any("stale" in a for a in args)
    h = cp.user_hash("stale")
    assert h == Signer("s3cret", "sipguard:").keyed_hash("stale") != Signer("other", "sipguard:").keyed_hash("stale")
    assert f";{h}" in args[args.index(OFFICE, args.index(OFFICE) + 1) + 1]  # a failure: its jails, ';', the hash


def test_unban_user_lifts_a_user_ban_and_the_daemon_mirrors_it(tmp_path):
    import os
    import subprocess
    import sys
    import time

    from sipguard.model import Ban
    from sipguard.store import Store

    book, store, kernel, rpc, p = _book(tmp_path)
    now = time.time()
    b = Ban(OFFICE, "office_user:auth-failure", now, now + 3600, 3.0, user="stale")
    book.ban([b], now)
    book.commit(now)
    assert rpc.tables["userban"] == {f"stale@{OFFICE}": 2} and (OFFICE, "stale") in p.user_banned
    last = store.last_request_id()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    base = [sys.executable, "-m", "sipguard", "--state-dir", str(tmp_path / "st"), "unban", OFFICE]
    r = subprocess.run([*base, "--user", "stale"], capture_output=True, text=True, env=env, check=True)
    assert f"lifted the user ban of stale at {OFFICE}" in r.stdout
    r = subprocess.run([*base, "--user", "other"], capture_output=True, text=True, env=env, check=True)
    assert "had no user ban" in r.stdout
    assert store.active_user_bans(time.time()) == [] and store.get_ban(OFFICE) is None
    (req,) = store.requests_after(last)
    assert (req.action, req.target, req.payload) == ("unban_user", OFFICE, {"user": "stale"})
    book.apply_request(req, time.time())  # what the running daemon does with it
    book.commit(time.time())
    assert rpc.tables["userban"] == {} and not p.user_banned and kernel.entries() == []
