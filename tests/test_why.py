"""`sipguard why ADDRESS [--json]`: bans made by the real daemon from real captured Kamailio lines show
those lines (escaped), the score arithmetic and the kernel's answer; an address not banned, a manual ban,
an escalated second ban, an allow-listed address, a fleet ban, hostile evidence printed literally, the
evidence bound under a spray, and the kernel asked (not assumed) in a namespace with ipset and nftables.
Evidence beyond one daemon's memory: a ban the fleet's score decided (three daemons on a real
redis-server of the test's own: 127.0.0.1, a free port, no persistence, stopped by its PID) keeps the
deciding node's exact lines and the other nodes show their own; a ban completed after a daemon restart
(alone, and scored by the fleet) shows the lines read before it; the record texts the store keeps stay
bounded under a spray.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from sipguard.actions import manual_ban, manual_unban
from sipguard.addresses import AllowList
from sipguard.bans import BanBook, ban_from_decision
from sipguard.cli.why import WhyReport, explain, render, schema_doc
from sipguard.config import Config
from sipguard.enforce.dryrun import DryRunEnforcer
from sipguard.model import EVIDENCE_CHARS, Ban, Event, EventKind
from sipguard.policy import EVIDENCE_SOURCES, Policy
from sipguard import store as store_module
from sipguard.store import Store
from sipguard.wiring import build_daemon
from waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / "tests" / "data" / "real" / "iso.log"
CLI = [sys.executable, "-m", "sipguard"]
NOBODY = AllowList([], include_host=False)


def real_lines(now: float) -> tuple[str, list[str]]:
    """iso.log with its timestamps moved to end a minute before `now` (the rest of each line exact), and
    the record texts (what follows `kamailio[PID]: `) of its lines, in order."""
    out, texts = [], []
    lines = REAL.read_text().splitlines(keepends=True)
    last = datetime.fromisoformat(lines[-1].split(" ", 1)[0]).timestamp()
    for ln in lines:
        stamp, rest = ln.split(" ", 1)
        t = datetime.fromisoformat(stamp).timestamp() - last + now - 60
        out.append(datetime.fromtimestamp(t, timezone.utc).isoformat() + " " + rest)
        texts.append(rest.split(": ", 1)[1].rstrip("\n") if ": " in rest else "")
    return "".join(out), texts


def syslog(text: str) -> str:
    return f"{datetime.now(timezone.utc).isoformat()} edge kamailio[4242]: {text}\n"


def auth_failed(ip: str) -> str:
    return syslog(f"NOTICE: <script>: auth failed for user 1000 from {ip}:5060 method REGISTER")


def scanner(ip: str, ua: str = "friendly-scanner") -> str:
    return syslog(f"WARNING: <script>: Blocked scanner UA '{ua}' from {ip}:5060")


class Running:
    """The real daemon (wiring + loop, dry-run enforcer) on a thread over one log file."""

    def __init__(self, tmp: Path, extra: dict | None = None) -> None:
        self.tmp = tmp
        self.log = tmp / "kamailio.log"
        self.log.touch()
        data = {"allowlist": {"include_host_addresses": False}, "daemon": {"control_interval": 0.05},
                "enforce": {"backend": "dryrun"}, **(extra or {})}
        self.cfg = Config.model_validate(data)
        self.config = tmp / "sipguard.toml"
        self.config.write_text('[enforce]\nbackend = "dryrun"\n[allowlist]\ninclude_host_addresses = false\n'
                               f'cidrs = {json.dumps(data["allowlist"].get("cidrs", []))}\n')
        self.enforcer = DryRunEnforcer()
        self.store = Store.open_state_dir(tmp / "state")
        self.daemon = build_daemon(self.cfg, self.store, self.enforcer, logs=[str(self.log)])
        self.thread = threading.Thread(target=self.daemon.run, daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        wait_for(lambda: self.daemon.ready.is_set())
        return self

    def __exit__(self, *exc) -> None:
        self.daemon.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.store.close()

    def write(self, *lines: str) -> None:
        with self.log.open("a") as f:
            f.write("".join(lines))

    def why(self, ip: str, allow: AllowList = NOBODY) -> WhyReport:
        return explain(self.store, self.cfg, allow, ip, time.time(), self.enforcer)

    def text(self, ip: str, allow: AllowList = NOBODY) -> str:
        parts: list[str] = []
        render(self.why(ip, allow), parts.append)
        return "".join(parts)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("SIPGUARD_CONFIG", None)
        return subprocess.run([*CLI, "--config", str(self.config), "--state-dir", str(self.tmp / "state"), *args],
                              capture_output=True, text=True, timeout=60, env=env)


# -- a ban made by the daemon from real captured lines ------------------------------------------------
def test_daemon_ban_from_real_lines_shows_those_lines_the_arithmetic_and_the_kernel(tmp_path):
    now = time.time()
    log, texts = real_lines(now)
    with Running(tmp_path) as r:
        r.write(log)
        wait_for(lambda: {"198.18.0.26", "198.18.0.27"} <= {e.ip for e in r.enforcer.entries()}, timeout=10)
        wait_for(lambda: all(r.store.get_ban(ip) is not None and r.store.evidence_of(ip)
                             for ip in ("198.18.0.26", "198.18.0.27")))

        # .26: svcrack, 23 wrong passwords: the auth jail (threshold 3) banned it on the third
        rep = r.why("198.18.0.26")
        failed = [t for t in texts if "auth failed" in t and "198.18.0.26:" in t]
        assert rep.banned and rep.ban is not None and rep.ban.reason == "auth:auth-failure"
        assert rep.kernel.checked and rep.kernel.held is True  # the daemon's own enforcer, asked
        assert [e.text for e in rep.ban.evidence] == failed[:3]  # the exact records, in order
        a = rep.ban.arithmetic
        assert a is not None and (a.jail, a.threshold, a.findtime, a.sum, a.score) == ("auth", 3, 600, 3, 3)
        assert [e.filter for e in a.events] == ["auth-failure"] * 3
        assert rep.ban.escalation is not None and rep.ban.escalation.offence == 1
        assert rep.ban.escalation.formula == "1h x 2^0 = 1h (cap 1w)"

        # .27: svwar, 31 unknown users: the probe jail (threshold 10): the last 5 records that counted
        rep = r.why("198.18.0.27")
        unknown = [t for t in texts if "unknown user" in t and "198.18.0.27:" in t]
        assert len(unknown) == 31
        assert [e.text for e in rep.ban.evidence] == unknown[5:10]
        assert rep.ban.arithmetic.sum == 10 and len(rep.ban.arithmetic.events) == 10
        shown = r.text("198.18.0.27")
        for t in unknown[5:10]:
            assert t in shown  # (these records hold nothing to escape: printed exactly)
        assert "= 10 >= 10" in shown and "kernel (dryrun): holds it" in shown

        # the CLI's --json answer is the documented schema (extra keys refused)
        p = r.cli("why", "198.18.0.27", "--json")
        assert p.returncode == 0, p.stderr
        got = WhyReport.model_validate_json(p.stdout)
        assert [e.text for e in got.ban.evidence] == unknown[5:10]
        assert not got.kernel.checked and "dryrun" in got.kernel.error  # another process: no kernel to ask
        # the .99 named inside attacker text is never banned and has no evidence
        assert r.why("198.18.0.99").ban is None and not r.store.evidence_of("198.18.0.99")


def test_not_banned_shows_the_window_and_the_distance_to_each_threshold(tmp_path):
    with Running(tmp_path) as r:
        r.write(auth_failed("198.18.5.20"), auth_failed("198.18.5.20"))
        wait_for(lambda: len(r.store.events_of("198.18.5.20", 0)) == 2)
        rep = r.why("198.18.5.20")
        assert not rep.banned and rep.ban is None and rep.kernel.held is False and not rep.would_ban
        jails = {j.name: j for j in rep.jails}
        assert (jails["auth"].score, jails["auth"].distance, len(jails["auth"].events)) == (2, 1, 2)
        assert (jails["probe"].score, jails["probe"].distance) == (0, 10)
        assert set(jails) == set(r.cfg.policy.jails)
        text = r.text("198.18.5.20")
        assert "198.18.5.20: not banned" in text and "auth: score 2 of 3 in 10m (2 events): 1 more to a ban" in text
        assert "would be banned again now: no" in text


def test_manual_ban(tmp_path):
    with Running(tmp_path) as r:
        manual_ban(r.store, "198.18.6.0/24", 7200, "INVITE spam", NOBODY)
        wait_for(lambda: "198.18.6.0/24" in {e.ip for e in r.enforcer.entries()})
        rep = r.why("198.18.6.0/24")
        assert rep.ban.manual and rep.ban.reason == "INVITE spam" and rep.ban.arithmetic is None
        assert rep.ban.evidence == [] and rep.kernel.held is True and 7190 < rep.ban.remaining <= 7200
        one = r.why("198.18.6.9")  # an address inside it: not banned itself, covered by the network
        assert not one.banned and one.covered_by == ["198.18.6.0/24"] and one.kernel.covering == {"198.18.6.0/24": True}
        assert "covered by the CIDR ban 198.18.6.0/24 (kernel: holds it)" in r.text("198.18.6.9")


def test_escalated_second_ban(tmp_path):
    ip = "198.18.5.30"
    with Running(tmp_path) as r:
        r.write(*[auth_failed(ip)] * 3)
        wait_for(lambda: r.store.get_ban(ip) is not None)
        first = r.store.get_ban(ip)
        manual_unban(r.store, ip)
        wait_for(lambda: ip not in {e.ip for e in r.enforcer.entries()})
        time.sleep(0.05)
        r.write(scanner(ip, ua="sipcli/v1.8"))
        wait_for(lambda: (b := r.store.get_ban(ip)) is not None and b.offence == 2)
        rep = r.why(ip)
        e = rep.ban.escalation
        assert rep.ban.reason == "scanner:scanner-ua" and e.offence == 2 and e.duration == 7200
        assert e.formula == "1h x 2^1 = 2h (cap 1w)" and len(e.earlier) == 1
        assert [h.action for h in rep.history] == ["ban", "unban", "ban"]
        assert [x.text for x in rep.history[0].evidence] == [
            "NOTICE: <script>: auth failed for user 1000 from 198.18.5.30:5060 method REGISTER"] * 3
        assert rep.history[0].time == rep.ban.escalation.earlier[0] and first.offence == 1
        assert [x.text for x in rep.ban.evidence] == ["WARNING: <script>: Blocked scanner UA 'sipcli/v1.8' from "
                                                      "198.18.5.30:5060"]
        text = r.text(ip)
        assert "offence 2, after 1 earlier automatic bans" in text and "1h x 2^1 = 2h (cap 1w)" in text


def test_allowlisted_address(tmp_path):
    with Running(tmp_path, {"allowlist": {"include_host_addresses": False, "cidrs": ["198.18.7.0/24"]}}) as r:
        r.write(*[auth_failed("198.18.7.5")] * 4)
        wait_for(lambda: len(r.store.events_of("198.18.7.5", 0)) == 4)
        allow = AllowList(["198.18.7.0/24"], include_host=False)
        rep = r.why("198.18.7.5", allow)
        assert not rep.banned and rep.allowlisted and rep.allowlist == ["198.18.7.0/24"] and not rep.would_ban
        assert {j.name: j.score for j in rep.jails}["auth"] == 4  # over the threshold, and still never banned
        text = r.text("198.18.7.5", allow)
        assert "allow-list: covered by 198.18.7.0/24" in text and "would be banned again now: no (allow-listed)" in text
        p = r.cli("why", "198.18.7.5", "--json")  # the CLI reads the allow-list from the config
        assert json.loads(p.stdout)["allowlist"] == ["198.18.7.0/24"]


def test_fleet_origin_ban(tmp_path):
    store = Store.open_state_dir(tmp_path / "state")
    cfg = Config.model_validate({"cluster": {"redis_url": "redis://127.0.0.1:1/0", "node_name": "edge1"}})
    now = time.time()
    ban = Ban("198.18.5.40", "auth:auth-failure", now - 5, now + 3595, score=4.0, offence=1)
    with store.transaction():  # as the fleet bridge stores a ban another node published
        store.put_bans([ban], now)
        store.hold(ban.ip, "edge2-17", "edge2", ban.created)
    rep = explain(store, cfg, NOBODY, ban.ip, now, None)
    f = rep.ban.fleet
    assert (f.origin, f.this_node, f.id, f.reason, f.score) == ("edge2", False, "edge2-17", "auth:auth-failure", 4.0)
    assert rep.ban.evidence == [] and rep.ban.arithmetic.events == []  # no evidence of its own on this node
    parts: list[str] = []
    render(rep, parts.append)
    assert "fleet: decided by node edge2 (fleet id edge2-17); published reason auth:auth-failure, score 4" in "".join(parts)


def test_hostile_evidence_is_printed_literally(tmp_path):
    ua = "\x1b]0;pwned\x07\x1b[2J\x1b[31m[link=https://evil.example]click[/link][/x][bold]\u009b2J\u202egnp.exe"
    with Running(tmp_path) as r:
        r.write(scanner("198.18.5.50", ua=ua))
        wait_for(lambda: r.store.evidence_of("198.18.5.50"))
        [kept] = next(iter(r.store.evidence_of("198.18.5.50").values()))
        assert ua in kept.text  # stored as read
        for p in (r.cli("why", "198.18.5.50"), r.cli("why", "198.18.5.50", "--json")):
            assert p.returncode == 0, p.stderr
            assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f\u0080-\u009f\u202a-\u202e]", p.stdout), p.stdout
        text = r.cli("why", "198.18.5.50").stdout
        assert ("\\x1b]0;pwned\\x07\\x1b[2J\\x1b[31m[link=https://evil.example]click[/link][/x][bold]\\x9b2J"
                "\\u202egnp.exe") in text
        assert json.loads(r.cli("why", "198.18.5.50", "--json").stdout)["ban"]["evidence"][0]["text"] == kept.text


# -- the evidence bound ----------------------------------------------------------------------------
def test_evidence_is_bounded_under_a_spray(tmp_path):
    cfg = Config.model_validate({"policy": {"evidence_lines": 5}})
    policy = Policy(cfg.policy, NOBODY)
    store = Store.open_state_dir(tmp_path / "state")
    book = BanBook(store, DryRunEnforcer(), policy)
    now = time.time()
    long = "NOTICE: <script>: auth failed for user " + "x" * 5000 + " from 198.18.0.1:5060 method REGISTER"
    # a spray: 100,000 sources, two auth failures each (threshold 3): nothing is banned, nothing stored
    for i in range(100_000):
        ip = f"2001:db8::{i >> 16:x}:{i & 0xffff:x}"
        for k in range(2):
            assert policy.observe(Event(now + k, ip, "auth-failure", EventKind.AUTH_FAILURE, 1.0, long)) is None
    held = policy.evidence
    assert EVIDENCE_SOURCES * 9 // 10 <= len(held) <= EVIDENCE_SOURCES  # the most recent sources only
    assert all(1 <= len(v) <= 2 for v in held.values()) and ("2001:db8::1:869f", "auth") in held
    assert all(e.cut and len(e.text) == EVIDENCE_CHARS and e.text.endswith("\u2026") for v in held.values() for e in v)
    assert policy.tracked == 100_000  # the windows are still scored (their own bound, max_tracked)
    # 1,000 of them go on: each ban keeps at most evidence_lines records, each capped
    bans = []
    for i in range(1000):
        ip = f"2001:db8:1::{i:x}"
        for k in range(7):
            d = policy.observe(Event(now + 2 + k, ip, "auth-failure", EventKind.AUTH_FAILURE, 1.0, long))
            if d is not None:
                bans.append(ban_from_decision(d, now))
    assert len(bans) == 1000
    book.ban(bans, now)
    book.commit(now)
    assert store.count_evidence() == 1000 * 3  # this source's 3 records that counted (2 earlier + the third)
    # pruned with the ban history, except the evidence of bans still in force
    store.prune(now + 100 * 86400, 86400, 10**6, 90 * 86400)
    assert store.count_evidence() == 1000 * 3  # the bans are still in force (no expiry yet: stored rows say so)
    book.unban([b.ip for b in bans[:400]], now)
    book.commit(now)
    store.prune(now + 100 * 86400, 86400, 10**6, 90 * 86400)
    assert store.count_evidence() == 600 * 3


def test_evidence_keeps_the_last_lines_inside_the_window():
    cfg = Config.model_validate({"policy": {"evidence_lines": 3}})
    policy = Policy(cfg.policy, NOBODY)
    ip = "198.18.5.60"
    # probe: threshold 10 in 10m; the first 4 events fall out of the window before the ban
    events = [Event(t, ip, "unknown-user", EventKind.PROBE, 1.0, f"line {n}")
              for n, t in enumerate([0, 1, 2, 3] + [700 + k for k in range(10)])]
    got = [policy.observe(e) for e in events]
    d = got[-1]
    assert d is not None and all(x is None for x in got[:-1])
    assert [e.text for e in d.evidence] == ["line 11", "line 12", "line 13"]
    # restored events (from the store: no text) leave no evidence, and evidence_lines = 0 keeps none
    quiet = Policy(Config.model_validate({"policy": {"evidence_lines": 0}}).policy, NOBODY)
    assert [quiet.observe(Event(k, "198.18.5.61", "auth-failure", EventKind.AUTH_FAILURE, 1.0, "x"))
            for k in range(3)][-1].evidence == ()


# -- the documented schema -----------------------------------------------------------------------
def test_the_json_schema_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    doc = "\n".join(schema_doc())
    assert doc in readme, "README's `why --json` schema is not what sipguard.cli.why.schema_doc() generates"
    keys = re.findall(r"^\s*- `(\w+)`", doc, re.M)
    assert {"ip", "banned", "ban", "evidence", "text", "kernel", "held", "arithmetic", "escalation", "fleet",
            "origin", "history", "jails", "distance", "would_ban", "allowlisted"} <= set(keys)


# -- the kernel asked in a namespace (ipset, nftables) ------------------------------------------------
root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces and netfilter")


@root
@pytest.mark.parametrize("backend", ["ipset", "nftables"])
def test_daemon_ban_in_a_namespace_kernel_checked_not_assumed(tmp_path, backend):
    from tests.lab.netns import Netns

    now = time.time()
    log_text, texts = real_lines(now)
    log = tmp_path / "kamailio.log"
    log.write_text("")
    config = tmp_path / "sipguard.toml"
    config.write_text(f'[enforce]\nbackend = "{backend}"\n' + ('iptables = "nft"\n' if backend == "ipset" else "")
                      + f'[sources]\nlogs = ["{log}"]\nformat = "syslog"\n'
                      + "[allowlist]\ninclude_host_addresses = false\n[daemon]\ncontrol_interval = 0.05\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SIPGUARD_CONFIG", None)
    state = tmp_path / "state"
    name = f"sge-why{os.getpid() % 100000}{backend[0]}"
    with Netns(name) as ns:
        def cli(*args: str) -> subprocess.CompletedProcess:
            return ns.run(*CLI, "--config", str(config), "--state-dir", str(state), *args, check=False, timeout=60,
                          env=env)

        err = open(tmp_path / "daemon.err", "wb")
        daemon = subprocess.Popen(ns.cmd(*CLI, "--config", str(config), "--state-dir", str(state), "run"),
                                  stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
        try:
            wait_for(lambda: (state / "sipguard.db").exists() and "following" in (tmp_path / "daemon.err").read_text(),
                     timeout=30)
            with log.open("a") as f:
                f.write(log_text)

            def answer() -> dict:
                p = cli("why", "198.18.0.26", "--json")
                assert p.returncode == 0, p.stderr
                return json.loads(p.stdout)

            wait_for(lambda: answer()["banned"], timeout=20, interval=0.2)
            got = answer()
            WhyReport.model_validate(got)
            assert got["kernel"] == {"backend": backend, "checked": True, "held": True, "error": None, "covering": {}}
            failed = [t for t in texts if "auth failed" in t and "198.18.0.26:" in t]
            assert [e["text"] for e in got["ban"]["evidence"]] == failed[:3]
            assert got["ban"]["arithmetic"]["sum"] == 3 and got["ban"]["arithmetic"]["threshold"] == 3
            text = cli("why", "198.18.0.26").stdout
            assert f"198.18.0.26: BANNED (store: yes; kernel ({backend}): holds it)" in text
            assert failed[0] in text
            # the kernel's own tool agrees; then the entry goes behind sipguard's back and `why` says so
            if backend == "ipset":
                assert ns.run("ipset", "test", "sipguard-v4", "198.18.0.26", check=False).returncode == 0
                os.kill(daemon.pid, signal.SIGSTOP)  # (its drift check would put the entry back at once)
                ns.run("ipset", "del", "sipguard-v4", "198.18.0.26")
            else:
                assert ns.run("nft", "get", "element", "inet", "sipguard", "v4", "{ 198.18.0.26 }",
                              check=False).returncode == 0
                os.kill(daemon.pid, signal.SIGSTOP)
                ns.run("nft", "delete", "element", "inet", "sipguard", "v4", "{ 198.18.0.26 }")
            try:
                got = answer()
                assert got["banned"] and got["kernel"]["checked"] and got["kernel"]["held"] is False
                assert "kernel (%s): does NOT hold it" % backend in cli("why", "198.18.0.26").stdout
                assert answer()["kernel"]["held"] is False
                nb = cli("why", "198.18.0.20", "--json")  # not banned: the kernel holds nothing for it
                assert json.loads(nb.stdout)["kernel"]["held"] is False
            finally:
                os.kill(daemon.pid, signal.SIGCONT)
        finally:
            if daemon.poll() is None:
                os.killpg(daemon.pid, signal.SIGTERM)
                try:
                    daemon.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(daemon.pid, signal.SIGKILL)
                    daemon.wait(10)
            err.close()


# -- evidence of fleet-scored bans ---------------------------------------------------------------
SECRET = "why-fleet-secret-0123456789"


def fleet_line(ip: str, user: str) -> str:
    """An auth failure as the fleet tests' nodes read it (classic syslog: one-second timestamps)."""
    from test_cluster import syslog as classic

    return classic(f"NOTICE: <script>: auth failed for user {user} from {ip}:5060 method REGISTER")


def record(line: str) -> str:
    return line.split(": ", 1)[1].rstrip("\n")


def test_fleet_scored_ban_keeps_this_nodes_lines_and_the_others_show_their_own(tmp_path):
    from test_cluster import Node, RedisServer  # (skips, or fails as root, without redis-server)

    server = RedisServer(tmp_path)
    server.start()
    nodes: list = []
    try:
        for name in ("edge1", "edge2", "edge3"):
            n = Node(tmp_path, server.url, name)
            n.raw_cfg["cluster"]["secret"] = SECRET  # a signed fleet: only verified members count
            n.cfg = Config.model_validate(n.raw_cfg)
            nodes.append(n.start())
        wait_for(lambda: all(n.bridge.in_sync() for n in nodes))
        a, b, c = nodes
        ip = "198.18.40.7"
        a1, b1, a2, a3 = (fleet_line(ip, u) for u in ("1001", "2001", "1002", "1003"))
        a.write(a1)
        wait_for(lambda: a.bridge.stats.scored >= 1)
        b.write(b1)
        wait_for(lambda: b.bridge.stats.scored >= 1)
        a.write(a2, a3)  # a2 makes the fleet's score 3 (auth's threshold): edge1 decides; a3 comes after
        wait_for(lambda: all(ip in n.enforced() for n in nodes), timeout=5)
        wait_for(lambda: all(n.store.get_ban(ip) is not None for n in nodes))
        assert a.bridge.stats.cluster_bans == 1 and b.bridge.stats.cluster_bans == c.bridge.stats.cluster_bans == 0

        # edge1 (decided it): its own two records that counted, exact, oldest first; not b1 (edge2's), not a3
        rep = explain(a.store, a.cfg, NOBODY, ip, time.time(), a.enforcer)
        assert rep.ban.fleet.this_node and rep.ban.fleet.origin == "edge1" and rep.ban.fleet.own_evidence == []
        assert [e.text for e in rep.ban.evidence] == [record(a1), record(a2)]
        assert rep.ban.score == 3 and rep.ban.arithmetic.threshold == 3
        cfg_a = a.config_file()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("SIPGUARD_CONFIG", None)

        def cli(node, cfg_file, *args):
            p = subprocess.run([*CLI, "--config", str(cfg_file), "--state-dir", str(node.dir / "state"), "why", ip,
                                *args], capture_output=True, text=True, timeout=60, env=env)
            assert p.returncode == 0, p.stderr
            return p.stdout

        got = WhyReport.model_validate_json(cli(a, cfg_a, "--json"))
        assert [e.text for e in got.ban.evidence] == [record(a1), record(a2)]
        assert got.ban.fleet.origin == "edge1" and got.ban.fleet.this_node
        text = cli(a, cfg_a)
        assert "evidence (2 records that counted, oldest first):" in text
        assert record(a1) in text and record(a2) in text and record(a3) not in text and record(b1) not in text

        # edge2: what edge1 published, and edge2's own record of it (from the texts its store keeps)
        got = WhyReport.model_validate_json(cli(b, b.config_file(), "--json"))
        f = got.ban.fleet
        assert (f.origin, f.this_node, f.reason, f.score) == ("edge1", False, "auth:auth-failure", 3)
        assert got.ban.evidence == [] and [e.text for e in f.own_evidence] == [record(b1)]
        assert got.ban.arithmetic.sum == 1 and got.ban.arithmetic.score == 3  # edge1's events made up the rest
        text = cli(b, b.config_file())
        assert "fleet: decided by node edge1" in text
        assert "= 1 < 3 (score recorded with the ban: 3)" in text
        assert "(the fleet's score: the other nodes' events make up the rest)" in text
        assert "evidence: node edge1 keeps the records that decided it; this node's own (1, oldest first):" in text
        assert record(b1) in text and record(a1) not in text
        # edge3 saw nothing of it
        got = WhyReport.model_validate_json(cli(c, c.config_file(), "--json"))
        assert got.ban.fleet.origin == "edge1" and got.ban.evidence == [] and got.ban.fleet.own_evidence == []
        assert "this node's own records of it: none" in cli(c, c.config_file())
    finally:
        for n in nodes:
            n.stop()
        server.stop()


def test_fleet_verdicts_carry_exactly_the_members_of_this_node(tmp_path):
    """ClusterPolicy on the real score script, batch by batch: the deciding batch's records by uid (a
    record after the decision, of the same second, is not one), earlier batches' by time, and a record
    before another node's success (which reset the fleet's window) is not one either."""
    from test_cluster import RedisServer

    from sipguard.cluster.scoring import ClusterPolicy
    from sipguard.cluster.scripts import SCORE_LUA
    from sipguard.cluster.signing import Signer
    from sipguard.config import ClusterConfig

    server = RedisServer(tmp_path)
    server.start()
    try:
        client = server.client()
        script = client.register_script(SCORE_LUA)
        pcfg = Config().policy
        prefix = "sgwhy:"

        def node(name):
            return ClusterPolicy(Policy(pcfg, NOBODY), ClusterConfig(redis_url=server.url, node_name=name,
                                                                     key_prefix=prefix), lambda: True,
                                 Signer(SECRET, prefix))

        one, two = node("edge1"), node("edge2")
        ip, t = "198.18.41.9", time.time() - 30

        def ev(at, text, kind=EventKind.AUTH_FAILURE):
            return Event(at, ip, "auth-failure" if kind is EventKind.AUTH_FAILURE else "register-success", kind,
                         1.0 if kind is EventKind.AUTH_FAILURE else 0.0, text)

        def batch(cp, *events):
            for e in events:
                assert cp.observe(e) is None
            sent = cp.take()
            candidates = script(args=cp.score_args(sent, round(t + 60, 3)))[0]
            verdicts, forged = cp.verdicts(candidates, round(t + 60, 3))
            assert not forged
            cp.scored(sent, [v.ban.ip for v in verdicts])
            return verdicts

        assert batch(one, ev(t - 10, "r0")) == []  # held by edge1, then reset by edge2's success
        assert batch(two, ev(t - 5, "ok", EventKind.SUCCESS)) == []
        assert batch(one, ev(t, "r1")) == []
        assert batch(two, ev(t + 1, "x2")) == []
        [v] = batch(one, ev(t + 2, "r3"), ev(t + 2, "r4"))  # r3 decides (score 3); r4, the same second, after
        assert v.ban.score == 3 and [e.text for e in v.ban.evidence] == ["r1", "r3"]
        assert [e.time for e in v.ban.evidence] == [t, t + 2]
    finally:
        server.stop()


# -- evidence across a restart -------------------------------------------------------------------
def test_ban_completed_after_a_restart_shows_the_lines_from_before_it(tmp_path):
    ip = "198.18.42.3"
    before = [syslog(f"NOTICE: <script>: auth failed for user 10{k} from {ip}:5060 method REGISTER") for k in (1, 2)]
    with Running(tmp_path) as r:
        r.write(*before)
        wait_for(lambda: len(r.store.events_of(ip, 0)) == 2)
        assert r.store.get_ban(ip) is None
    after = syslog(f"NOTICE: <script>: auth failed for user 103 from {ip}:5060 method REGISTER")
    with Running(tmp_path) as r:  # the same state and log: a restart
        assert r.daemon.parts.scorer.score(ip, time.time()).get("auth") == 2  # restored from the store
        r.write(after)
        wait_for(lambda: r.store.get_ban(ip) is not None and r.store.evidence_of(ip))
        rep = r.why(ip)
        assert [e.text for e in rep.ban.evidence] == [record(x) for x in (*before, after)]
        text = r.text(ip)
        assert all(record(x) in text for x in (*before, after))


def test_fleet_ban_completed_after_a_restart_shows_the_lines_from_before_it(tmp_path):
    from test_cluster import Node, RedisServer

    server = RedisServer(tmp_path)
    server.start()
    a = Node(tmp_path, server.url, "edge1")
    try:
        a.start()
        wait_for(lambda: a.bridge.in_sync())
        ip = "198.18.43.5"
        a1, a2, a3 = (fleet_line(ip, u) for u in ("1001", "1002", "1003"))
        a.write(a1, a2)
        wait_for(lambda: a.bridge.stats.scored >= 2 and len(a.store.events_of(ip, 0)) == 2)
        a.stop()
        a.start()  # the same state, log and Redis: a restart
        wait_for(lambda: a.bridge.in_sync())
        a.write(a3)
        wait_for(lambda: a.store.get_ban(ip) is not None and a.store.evidence_of(ip))
        assert a.bridge.stats.cluster_bans == 1  # decided by the fleet's score, after the restart
        rep = explain(a.store, a.cfg, NOBODY, ip, time.time(), a.enforcer)
        assert [e.text for e in rep.ban.evidence] == [record(x) for x in (a1, a2, a3)]
    finally:
        a.stop()
        server.stop()


def test_event_texts_stay_bounded_under_a_spray(tmp_path, monkeypatch):
    """The newest EVENT_TEXTS texts stay (each capped), whatever the spray; successes keep none; a
    restart restores only those, into the policy's bounded evidence; pruned events take their texts."""
    monkeypatch.setattr(store_module, "EVENT_TEXTS", 3000)
    store = Store.open_state_dir(tmp_path / "state")
    now = time.time()
    long = "NOTICE: <script>: auth failed for user " + "x" * 5000 + " from {ip}:5060 method REGISTER"
    n, size = 60_000, 2000
    for start in range(0, n, size):
        evs = [Event(now - n + i, f"2001:db8:42::{i:x}", "auth-failure", EventKind.AUTH_FAILURE, 1.0, long)
               for i in range(start, start + size)]
        evs.append(Event(now - n + start, "198.18.42.9", "register-success", EventKind.SUCCESS, 0.0, "success"))
        with store.transaction():
            store.add_events(evs)
        assert store.count_event_texts() <= 3000
    # the texts of the newest 3,000 events, successes excepted
    newest = store.conn.execute("SELECT ip, kind FROM events ORDER BY id DESC LIMIT 3000").fetchall()
    sprayed = {ip for ip, kind in newest if kind != "success"}
    assert store.count_events() == n + n // size and store.count_event_texts() == len(sprayed) == 3000 - 2
    assert store.conn.execute("SELECT max(length(text)) FROM event_texts").fetchone()[0] == EVIDENCE_CHARS + 1
    # a 60,000-source spray of 5 KB lines: the texts take about 3,000 x 513 bytes, not 60,000 x 5 KB
    pages = store.conn.execute("PRAGMA page_count").fetchone()[0] * store.conn.execute("PRAGMA page_size").fetchone()[0]
    assert pages < 12_000_000, pages
    restored = [e for e in store.iter_recent_events(0) if e.text]
    assert len(restored) == len(sprayed) and {e.ip for e in restored} == sprayed
    assert sprayed <= {f"2001:db8:42::{i:x}" for i in range(n - 3000, n)}
    assert all(e.kind is EventKind.AUTH_FAILURE for e in restored)
    policy = Policy(Config().policy, NOBODY)
    policy.restore(store.iter_recent_events(0))
    held = policy.evidence
    assert len(held) == len(sprayed) and all(len(v) == 1 and v[0].cut for v in held.values())
    # the events pruned take their texts with them
    store.prune(now, 999.5, 10**6, 90 * 86400)  # the newest 1,000 events stay
    assert store.count_events() <= 1000 + 30 and store.count_event_texts() <= 1000
