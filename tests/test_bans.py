"""The ban book (sipguard/bans.py): one order for every change (kernel, scorer, store), refusals that
never stop anything, store failures retried, and a process killed at each step leaving store and
kernel in agreement after the restart.

The unit tests use the dry-run enforcer and an in-memory store; the kill tests run the real daemon
and CLI with the ipset backend inside an `sge-` network namespace made here, killing the process
with SIGKILL at each step of a ban, an unban and an expiry.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sipguard.addresses import AllowList
from sipguard.bans import ADOPTED_REASON, FLEET, MANUAL, POLICY, BanBook
from sipguard.config import PolicyConfig
from sipguard.enforce.dryrun import DryRunEnforcer
from sipguard.model import Ban
from sipguard.policy import Policy
from sipguard.store import Store

from lab.netns import Netns

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces and netfilter")
NOW = 1_800_000_000.0


class Recorder(DryRunEnforcer):
    """A dry-run enforcer that notes each call and whether the store already held the ban then."""

    def __init__(self, store: Store, refuse: str = "") -> None:
        super().__init__()
        self.store = store
        self.calls: list[tuple[str, str, bool]] = []
        self.refuse = refuse

    def refuses(self, ip: str) -> str | None:
        return "no room for it" if self.refuse and ip == self.refuse else None

    def ban(self, ban, now):
        self.calls.append(("ban", ban.ip, self.store.get_ban(ban.ip) is not None))
        super().ban(ban, now)

    def ban_many(self, bans, now):
        for b in bans:
            self.calls.append(("ban", b.ip, self.store.get_ban(b.ip) is not None))
        super().ban_many(bans, now)

    def unban(self, ip):
        self.calls.append(("unban", ip, self.store.get_ban(ip) is not None))
        super().unban(ip)


def policy() -> Policy:
    return Policy(PolicyConfig(), AllowList([], include_host=False))


def ban(ip: str, secs: float | None = 600, reason: str = "auth:auth-failed") -> Ban:
    return Ban(ip, reason, NOW, None if secs is None else NOW + secs, score=3.0)


def test_kernel_first_then_scorer_then_store():
    store = Store(":memory:")
    kernel = Recorder(store)
    pol = policy()
    book = BanBook(store, kernel, pol)
    book.ban([ban("198.18.1.1")], NOW)
    assert kernel.calls == [("ban", "198.18.1.1", False)]  # the kernel had it before the store
    assert "198.18.1.1" in pol.banned and store.get_ban("198.18.1.1") is None
    book.commit(NOW)
    assert store.get_ban("198.18.1.1").reason == "auth:auth-failed" and book.pending == 0
    book.unban(["198.18.1.1"], NOW + 1)
    assert kernel.calls[-1] == ("unban", "198.18.1.1", True)  # kernel first for an unban too
    assert "198.18.1.1" not in pol.banned and store.get_ban("198.18.1.1") is not None
    book.commit(NOW + 1)
    assert store.get_ban("198.18.1.1") is None
    assert [h["action"] for h in store.history()] == ["unban", "ban"]


def test_a_failed_transaction_keeps_the_changes_queued_until_one_commits():
    store = Store(":memory:")
    book = BanBook(store, DryRunEnforcer(), policy())
    book.ban([ban("198.18.1.2")], NOW)
    with pytest.raises(sqlite3.OperationalError):
        with store.transaction():
            book.write(NOW)
            raise sqlite3.OperationalError("database or disk is full")  # what a full disk says
    book.failed()
    assert store.get_ban("198.18.1.2") is None and book.pending == 1 and book.stats.pending == 1
    assert [b.ip for b in book.held(NOW)] == ["198.18.1.2"]  # still in force as far as the book knows
    with store.transaction():
        book.write(NOW)
    book.written()
    assert store.get_ban("198.18.1.2") is not None and book.pending == 0
    assert len(store.history()) == 1  # written once, not twice


def test_refused_entries_are_stored_marked_and_never_stop_anything():
    store = Store(":memory:")
    kernel = Recorder(store, refuse="0.0.0.0/0")
    book = BanBook(store, kernel, policy())
    out = book.ban([ban("0.0.0.0/0"), ban("198.18.1.3")], NOW)
    book.commit(NOW)
    assert [b.refused for b in out] == ["no room for it", None]
    assert [c[1] for c in kernel.calls] == ["198.18.1.3"]  # the refused one never reached the kernel
    assert store.get_ban("0.0.0.0/0").refused == "no room for it" and store.get_ban("198.18.1.3").refused is None
    assert store.stats()["refused"] == 1 and book.stats.refused == 1
    report = book.resync(NOW)  # a resync leaves the refused entry out of the kernel as well
    assert {e.ip for e in kernel.entries()} == {"198.18.1.3"} and report.removed == 0


def test_kernel_errors_daemon_goes_on_cli_changes_nothing():
    class Boom(DryRunEnforcer):
        def ban(self, b, now):
            raise OSError("kernel said no")

    store = Store(":memory:")
    daemon_book = BanBook(store, Boom(), policy())
    daemon_book.ban([ban("198.18.1.4")], NOW)
    daemon_book.commit(NOW)
    assert store.get_ban("198.18.1.4") is not None and daemon_book.stats.kernel_errors == 1  # resync retries
    cli_book = BanBook(store, Boom(), strict=True)
    with pytest.raises(OSError):
        cli_book.ban([ban("198.18.1.5")], NOW)
    cli_book.commit(NOW)
    assert store.get_ban("198.18.1.5") is None and cli_book.pending == 0


def test_restore_adopts_kernel_entries_the_store_lacks():
    store = Store(":memory:")
    kernel = DryRunEnforcer()
    kernel.ban(ban("198.18.1.6", 300), NOW)  # a crash after the kernel, before the store
    store.put_ban(ban("198.18.1.7", 600), NOW)
    store.put_ban(Ban("198.18.1.8", "manual", NOW - 20, NOW - 10), NOW - 20)  # expired meanwhile
    pol = policy()
    book = BanBook(store, kernel, pol)
    book.expire(NOW)
    book.restore(NOW)
    held = {b.ip: b for b in store.active_bans(NOW)}
    assert set(held) == {"198.18.1.6", "198.18.1.7"} == {e.ip for e in kernel.entries()}
    assert held["198.18.1.6"].reason == ADOPTED_REASON and book.stats.adopted == 1
    assert pol.banned >= {"198.18.1.6", "198.18.1.7"} and "198.18.1.8" not in pol.banned


def test_listeners_hear_each_change_inside_its_transaction():
    store = Store(":memory:")
    heard = []

    class Ear:
        def on_bans(self, bans, cause, now):
            heard.append(("ban", [b.ip for b in bans], cause, store.in_transaction))

        def on_unbans(self, ips, at, cause, now):
            heard.append(("unban", list(ips), cause, store.in_transaction))

    book = BanBook(store, DryRunEnforcer(), policy(), [Ear()])
    book.ban([ban("198.18.1.9")], NOW, POLICY)
    book.ban([ban("198.18.1.10")], NOW, FLEET)
    book.unban(["198.18.1.9"], NOW, MANUAL)
    assert heard == []  # nothing is said before it is stored
    book.commit(NOW)
    assert heard == [("ban", ["198.18.1.9"], POLICY, True), ("ban", ["198.18.1.10"], FLEET, True),
                     ("unban", ["198.18.1.9"], MANUAL, True)]


def test_many_unbans_are_one_kernel_batch():
    store = Store(":memory:")
    kernel = Recorder(store)
    book = BanBook(store, kernel, policy())
    book.ban([ban(f"198.18.2.{i}") for i in range(1, 6)], NOW)
    book.commit(NOW)
    kernel.calls.clear()
    book.unban([f"198.18.2.{i}" for i in range(1, 5)], NOW)
    assert kernel.calls == []  # no per-address unban: one sync to what stays
    assert {e.ip for e in kernel.entries()} == {"198.18.2.5"}


# -- killed at each step (real daemon, real CLI, kernel sets in a namespace) -----------------------
KILLER = r"""
import os, signal, sys
where, mode, match = sys.argv[1:4]
del sys.argv[1:4]
import sipguard.bans, sipguard.store
owner = {"Store": sipguard.store.Store, "BanBook": sipguard.bans.BanBook}[where.split(".")[0]]
name = where.split(".")[1]
orig = getattr(owner, name)

def wrapped(self, *a, **k):
    hit = not match or match in repr(a) + repr(k)
    if hit and mode == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    out = orig(self, *a, **k)
    if hit and mode == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return out

setattr(owner, name, wrapped)
from sipguard.__main__ import main
main()
"""

ATTACKER = "198.18.90.7"


def attack_line() -> str:
    ts = time.strftime("%b %e %H:%M:%S")
    return f"{ts} edge kamailio[42]: WARNING: <script>: Blocked scanner UA 'friendly-scanner' from {ATTACKER}:5060\n"


def _kernel(ns: str) -> set[str]:
    from netns_util import ns_call

    def entries():
        from sipguard.config import EnforceConfig
        from sipguard.enforce import make_enforcer

        e = make_enforcer(EnforceConfig(backend="ipset", iptables="nft"))
        try:
            return {x.ip for x in e.entries()}
        finally:
            e.close()

    return ns_call(ns, entries)


class KillLab:
    def __init__(self, ns: str, tmp: Path) -> None:
        self.ns, self.tmp = ns, tmp
        self.log = tmp / "kamailio.log"
        self.log.write_text("")
        self.state = tmp / "state"
        self.config = tmp / "sipguard.toml"
        self.config.write_text(f'[enforce]\nbackend = "ipset"\niptables = "nft"\n[sources]\nlogs = ["{self.log}"]\n'
                               'format = "syslog"\nfrom_start = true\n[allowlist]\ninclude_host_addresses = false\n'
                               '[daemon]\ncontrol_interval = 0.05\n')
        self.procs: list[subprocess.Popen] = []

    def argv(self, *args: str, kill: tuple[str, str, str] | None = None) -> list[str]:
        head = [sys.executable, "-c", KILLER, *kill] if kill else [sys.executable, "-m", "sipguard"]
        return ["ip", "netns", "exec", self.ns, *head, "--config", str(self.config), "--state-dir",
                str(self.state), *args]

    def env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        env.pop("SIPGUARD_CONFIG", None)
        return env

    def cli(self, *args: str, kill=None) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args, kill=kill), capture_output=True, text=True, timeout=60, env=self.env())

    def daemon(self, kill=None) -> subprocess.Popen:
        p = subprocess.Popen(self.argv("run", kill=kill), stdout=subprocess.DEVNULL,
                             stderr=open(self.tmp / "daemon.err", "ab"), env=self.env(), start_new_session=True)
        self.procs.append(p)
        return p

    def running(self) -> bool:
        p = self.cli("status", "--json")
        return p.returncode == 0 and json.loads(p.stdout)["daemon"] == "running"

    def store_bans(self) -> set[str]:
        return {b["ip"] for b in json.loads(self.cli("list", "--json").stdout)}

    def events(self, ip: str) -> int:
        s = Store.open_state_dir(self.state)
        try:
            return sum(1 for e in s.recent_events(0) if e.ip == ip)
        finally:
            s.close()

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(10)


def _wait(cond, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def klab(tmp_path):
    with Netns(f"sge-{os.getpid() % 100000}-bk") as ns:
        lab = KillLab(ns.name, tmp_path)
        try:
            yield lab
        finally:
            lab.stop_all()


def _restart_and_agree(lab: KillLab) -> set[str]:
    d = lab.daemon()
    _wait(lab.running, 30, "the restarted daemon's heartbeat")
    time.sleep(0.3)
    store, kernel = lab.store_bans(), _kernel(lab.ns)
    assert store == kernel, (store, kernel, (lab.tmp / "daemon.err").read_text()[-2000:])
    os.killpg(d.pid, signal.SIGTERM)
    d.wait(15)
    return store


# the daemon decides a ban; it dies: (method, before/after it, argument it must see)
DAEMON_STEPS = {
    "after-kernel": ("Store.put_bans", "before", ATTACKER),
    "inside-transaction": ("Store.save_positions", "before", ""),
    "after-commit": ("BanBook.written", "after", ""),
}


@root
@pytest.mark.parametrize("step", list(DAEMON_STEPS))
def test_daemon_killed_at_each_step_of_a_ban_loses_nothing(klab: KillLab, step: str):
    where, mode, match = DAEMON_STEPS[step]
    d = klab.daemon(kill=(where, mode, match))
    _wait(klab.running, 30, "the daemon's first heartbeat")
    with klab.log.open("a") as f:
        f.write(attack_line())
    d.wait(30)
    assert d.returncode == -signal.SIGKILL, (d.returncode, (klab.tmp / "daemon.err").read_text()[-2000:])
    assert ATTACKER in _kernel(klab.ns)  # the kernel came first: the attack is stopped
    held = _restart_and_agree(klab)
    assert ATTACKER in held  # what the daemon decided survived the kill
    assert klab.events(ATTACKER) == 1  # the line was neither lost nor counted twice


@root
@pytest.mark.parametrize("step", ["after-kernel", "after-commit"])
def test_cli_unban_killed_at_each_step_leaves_store_and_kernel_agreeing(klab: KillLab, step: str):
    assert klab.cli("ban", ATTACKER, "--for", "1h").returncode == 0
    assert ATTACKER in _kernel(klab.ns) and ATTACKER in klab.store_bans()
    kill = ("Store.remove_ban", "before", ATTACKER) if step == "after-kernel" else ("BanBook.written", "after", "")
    p = klab.cli("unban", ATTACKER, kill=kill)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert ATTACKER not in _kernel(klab.ns)
    held = _restart_and_agree(klab)
    # killed before the store changed: the ban stands again in both; after: gone from both
    assert (ATTACKER in held) == (step == "after-kernel")


@root
def test_daemon_killed_while_expiring_a_ban_leaves_store_and_kernel_agreeing(klab: KillLab):
    assert klab.cli("ban", ATTACKER, "--for", "2s").returncode == 0
    d = klab.daemon(kill=("Store.remove_ban", "before", "expire"))
    d.wait(30)
    assert d.returncode == -signal.SIGKILL
    held = _restart_and_agree(klab)
    assert ATTACKER not in held


@root
def test_cli_ban_killed_between_kernel_and_store_is_adopted_at_restart(klab: KillLab):
    p = klab.cli("ban", ATTACKER, "--for", "1h", kill=("Store.put_bans", "before", ATTACKER))
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert ATTACKER in _kernel(klab.ns) and ATTACKER not in klab.store_bans()
    held = _restart_and_agree(klab)
    assert ATTACKER in held  # adopted from the kernel with its remaining time, not dropped
    s = Store.open_state_dir(klab.state)
    try:
        b = s.get_ban(ATTACKER)
        assert b.reason == ADOPTED_REASON and 3500 < b.expires - time.time() <= 3600
    finally:
        s.close()
