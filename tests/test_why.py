"""`sipguard why ADDRESS [--json]`: bans made by the real daemon from real captured Kamailio lines show
those lines (escaped), the score arithmetic and the kernel's answer; an address not banned, a manual ban,
an escalated second ban, an allow-listed address, a fleet ban, hostile evidence printed literally, the
evidence bound under a spray, and the kernel asked (not assumed) in a namespace with ipset and nftables.
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
