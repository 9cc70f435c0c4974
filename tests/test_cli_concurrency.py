"""CLI writes against a busy database (issue 16, item 4): the write lock is waited for with bounded
retries, a lock still held after the budget is one line (`sipguard: error: ...`, never a traceback),
and a command whose store write fails leaves the kernel as the store has it.

The root tests run the real daemon (ipset backend) and real `sipguard ban` processes inside an
`sge-` network namespace made here (tests/test_bans.py's KillLab), with log lines arriving so the
daemon commits batches the whole time.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sipguard.model import Ban
from sipguard.store import BUSY_BUDGET, Store, StoreBusy

from lab.netns import Netns
from test_bans import KillLab, _kernel, _wait

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces and ipsets")
REPO = Path(__file__).resolve().parents[1]


def _hold_write_lock(db: Path) -> sqlite3.Connection:
    """Another process's long write transaction, as seen by sipguard (the lock stays until close)."""
    con = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    con.execute("BEGIN IMMEDIATE")
    con.execute("INSERT INTO meta (key, value) VALUES ('held-by-test', '1')")
    return con


# -- the store ---------------------------------------------------------------------------------
def test_a_writer_waits_for_the_lock_then_goes_on(tmp_path):
    s = Store.open_state_dir(tmp_path)
    other = _hold_write_lock(tmp_path / "sipguard.db")
    threading.Timer(0.4, other.close).start()  # released well inside the budget
    t0 = time.monotonic()
    with s.transaction():
        s.put_ban(Ban("198.18.3.1", "manual", 1.0, None, manual=True), now=1.0)
    assert 0.3 < time.monotonic() - t0 < BUSY_BUDGET
    assert s.get_ban("198.18.3.1") is not None and s.lock.retries > 0 and s.lock.wait_max >= 0.3


def test_a_lock_held_past_the_budget_raises_store_busy(tmp_path):
    Store.open_state_dir(tmp_path).close()
    s = Store(tmp_path / "sipguard.db", busy_budget=0.5)
    other = _hold_write_lock(tmp_path / "sipguard.db")
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreBusy, match="stayed locked by another process for 0.5s"):
            with s.transaction():
                s.put_ban(Ban("198.18.3.2", "manual", 1.0, None, manual=True), now=1.0)
        assert 0.5 <= time.monotonic() - t0 < 2.0
    finally:
        other.close()
    assert s.get_ban("198.18.3.2") is None and not s.in_transaction
    with s.transaction():  # the connection is usable again: nothing half-done was left behind
        s.put_ban(Ban("198.18.3.2", "manual", 1.0, None, manual=True), now=1.0)
    assert s.get_ban("198.18.3.2") is not None


def test_first_openers_racing_on_a_new_database_all_succeed(tmp_path):
    """Many processes creating the schema at once (the first `ban`s on a new host)."""
    code = ("import sys; from sipguard.store import Store; s = Store.open_state_dir(sys.argv[1]); "
            "print(sorted(s.stats()))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "state")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(12)]
    results = [p.communicate(60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in results]
    assert {o.strip() for o, _ in results} == {"['bans', 'events', 'history', 'refused']"}


# -- the CLI, lock held past the budget ----------------------------------------------------------
@pytest.fixture
def dry_state(tmp_path, monkeypatch):
    monkeypatch.delenv("SIPGUARD_CONFIG", raising=False)
    cfg = tmp_path / "sipguard.toml"
    # dryrun: this test runs in the host's network namespace and must never touch its firewall
    cfg.write_text('[enforce]\nbackend = "dryrun"\n[allowlist]\ninclude_host_addresses = false\n')
    return ["--config", str(cfg), "--state-dir", str(tmp_path / "state")]


def _sg(args: list[str], timeout: float = 90) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "sipguard", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_ban_on_a_database_locked_past_the_budget_is_one_line(dry_state, tmp_path):
    assert _sg([*dry_state, "ban", "198.18.3.3"]).returncode == 0  # the database exists
    other = _hold_write_lock(tmp_path / "state" / "sipguard.db")
    try:
        t0 = time.monotonic()
        p = _sg([*dry_state, "ban", "198.18.3.4", "--for", "1h"])
        took = time.monotonic() - t0
    finally:
        other.close()
    assert p.returncode == 1, (p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("sipguard: error: ") and "locked" in lines[0], p.stderr
    assert "Traceback" not in p.stderr and took >= BUSY_BUDGET
    listed = {b["ip"] for b in json.loads(_sg([*dry_state, "list", "--json"]).stdout)}
    assert listed == {"198.18.3.3"}  # the refused command changed nothing


def test_cli_ban_waits_for_a_short_lock(dry_state, tmp_path):
    assert _sg([*dry_state, "ban", "198.18.3.5"]).returncode == 0
    other = _hold_write_lock(tmp_path / "state" / "sipguard.db")
    threading.Timer(2.0, other.close).start()
    p = _sg([*dry_state, "ban", "198.18.3.6"])
    assert p.returncode == 0, p.stderr
    assert {b["ip"] for b in json.loads(_sg([*dry_state, "list", "--json"]).stdout)} == {"198.18.3.5", "198.18.3.6"}


# -- the real daemon and 50 real `sipguard ban` processes ----------------------------------------
@pytest.fixture
def clab(tmp_path):
    with Netns(f"sge-{os.getpid() % 100000}-cc") as ns:
        lab = KillLab(ns.name, tmp_path)
        try:
            yield lab
        finally:
            lab.stop_all()


class LogLoad:
    """Auth-failure lines from many sources (198.18.200.0/22), appended all the time: the daemon
    scores, bans and commits a batch every few hundred milliseconds while the CLI runs."""

    def __init__(self, path: Path, per_second: int = 5000) -> None:
        self.path, self.per_second = path, per_second
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.lines = 0

    def _run(self) -> None:
        rng = random.Random(16)
        with self.path.open("a") as f:
            while not self._stop.is_set():
                ts = time.strftime("%b %e %H:%M:%S")
                chunk = [f"{ts} edge kamailio[42]: NOTICE: <script>: auth failed for user 100 from "
                         f"198.18.{200 + rng.randrange(4)}.{rng.randrange(1, 255)}:5060 method REGISTER\n"
                         for _ in range(self.per_second // 10)]
                f.write("".join(chunk))
                f.flush()
                self.lines += len(chunk)
                time.sleep(0.1)

    def __enter__(self) -> LogLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@root
def test_fifty_concurrent_bans_while_the_daemon_works_all_land_in_store_and_kernel(clab: KillLab):
    clab.daemon()
    _wait(clab.running, 30, "the daemon's first heartbeat")
    targets = [f"198.18.77.{i}" for i in range(1, 51)]
    with LogLoad(clab.log) as load:
        _wait(lambda: load.lines > 2000, 10, "log lines for the daemon")
        t0 = time.monotonic()
        procs = [subprocess.Popen(clab.argv("ban", ip, "--for", "1h", "--reason", "concurrent"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clab.env())
                 for ip in targets]
        results = [(p, *p.communicate(120)) for p in procs]
        wall = time.monotonic() - t0
    failed = [(p.returncode, err.strip()[-300:]) for p, _, err in results if p.returncode != 0]
    assert not failed, failed
    assert not any("Traceback" in err or "locked" in err for _, _, err in results)
    listed = {b["ip"]: b for b in json.loads(clab.cli("list", "--json").stdout)}
    assert set(targets) <= set(listed) and all(listed[ip]["reason"] == "concurrent" for ip in targets)
    assert set(targets) <= _kernel(clab.ns)
    _wait(lambda: set(targets) <= _kernel(clab.ns) and clab.running(), 10, "the daemon still running")
    print(f"50 concurrent bans: {wall:.1f}s wall for all, daemon read {load.lines} lines meanwhile")


@root
def test_a_ban_whose_store_write_fails_is_taken_out_of_the_kernel_again(clab: KillLab):
    assert clab.cli("ban", "198.18.78.1", "--for", "1h").returncode == 0  # database and sets exist
    db = clab.state / "sipguard.db"
    other = _hold_write_lock(db)
    try:
        p = clab.cli("ban", "198.18.78.2", "--for", "1h")
        unban = clab.cli("unban", "198.18.78.1")
    finally:
        other.close()
    for q in (p, unban):
        lines = [ln for ln in q.stderr.splitlines() if ln.strip() and "INFO" not in ln]
        assert q.returncode == 1 and len(lines) == 1 and lines[0].startswith("sipguard: error: "), q.stderr
    kernel = _kernel(clab.ns)
    assert "198.18.78.2" not in kernel  # the kernel does not hold a ban the store refused
    assert "198.18.78.1" in kernel  # nor did it lose one the store still holds
    assert {b["ip"] for b in json.loads(clab.cli("list", "--json").stdout)} == {"198.18.78.1"}


# -- the bench part stays runnable ---------------------------------------------------------------
def test_bench_list_at_scale_runs_small(tmp_path):
    sys.path.insert(0, str(REPO))
    from bench import cli_concurrency

    res = cli_concurrency.list_at_scale(tmp_path / "list", 300)
    for name in ("plain", "json", "table"):
        assert res[name]["rows"] == 300 and res[name]["seconds"] > 0 and res[name]["peak_rss_mb"] > 5
    rows = cli_concurrency.rows({"list": res})
    assert len(rows) == 3 and "300 bans" in rows[0][0]


@root
def test_bench_concurrent_bans_runs_small(tmp_path):
    sys.path.insert(0, str(REPO))
    from bench import cli_concurrency

    res = cli_concurrency.concurrent_bans(tmp_path / "cli", 4, 1000, 0.5)
    for key in ("whole_process", "prestarted", "warm"):
        assert res[key]["ok"] == 4 and res[key]["tracebacks"] == 0 and res[key]["p99_s"] > 0
    assert res["in_store"] == res["in_kernel"] == 12 and res["daemon_alive"] and res["lock_wait"]["n"] > 0
    assert len(cli_concurrency.rows({"cli": res})) == 5
