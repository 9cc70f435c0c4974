"""Faults of the disk and of the files (issue 16, items 2 and 3): nothing lost, nothing doubled.

* A store that refuses writes (a real tmpfs state directory filled up, and a store made to fail): the
  daemon holds the batch, reads nothing more, retries, stays up, says so, and once there is room every
  event is in the store exactly once and every ban decided meanwhile is stored.
* Rotation under load with the real `logrotate` and real writer processes: copytruncate while the daemon
  lags (SIGSTOP, rotate, write more, SIGCONT), a file that grew back past the old offset before the
  daemon looked, and a restart after each rotation kind while the daemon was down. Every line carries a
  sequence number (in its text and in its source address); the store is counted address by address.

The tmpfs is mounted under /tmp with this process's PID in its name and unmounted afterwards, whatever
happens; no test touches the network or the firewall (the daemon runs with the dry-run enforcer).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest

from sipguard.config import Config
from sipguard.enforce.dryrun import DryRunEnforcer
from sipguard.store import Store
from sipguard.wiring import build_daemon
from waiting import wait_for

ROOT = os.geteuid() == 0
root = pytest.mark.skipif(not ROOT, reason="needs root (a tmpfs mount)")
LOGROTATE = shutil.which("logrotate") or ("/usr/sbin/logrotate" if os.path.exists("/usr/sbin/logrotate") else None)
needs_logrotate = pytest.mark.skipif(LOGROTATE is None, reason="needs logrotate (make setup installs it)")
TREE = Path(__file__).resolve().parents[1]
BASE = int(ipaddress.ip_address("198.18.0.0"))


def ip_of(i: int) -> str:
    """Line i's source address: 198.18.0.0 + i (198.18.0.0/15 holds 131072 of them)."""
    return str(ipaddress.ip_address(BASE + i))


def seq_of(ip: str) -> int:
    return int(ipaddress.ip_address(ip)) - BASE


def auth_line(i: int) -> bytes:
    ts = datetime.now().strftime("%b %d %H:%M:%S")
    return (f"{ts} edge kamailio[4242]: NOTICE: <script>: auth failed for user seq{i:06d} from {ip_of(i)}:5060 "
            f"method REGISTER\n").encode()


def scanner_line(i: int) -> bytes:
    ts = datetime.now().strftime("%b %d %H:%M:%S")
    return f"{ts} edge kamailio[4242]: WARNING: <script>: Blocked scanner UA 'friendly-scanner' from {ip_of(i)}:5060\n".encode()


def check_each_once(per_source: dict[str, int], n: int, what: str = "") -> None:
    """Every sequence number 0..n-1 stored exactly once, and nothing else."""
    seqs = {seq_of(ip): k for ip, k in per_source.items()}
    missing = [i for i in range(n) if i not in seqs]
    doubled = {i: k for i, k in seqs.items() if k != 1}
    extra = [i for i in seqs if not 0 <= i < n]
    assert not missing and not doubled and not extra, (
        f"{what}: {len(missing)} of {n} lines lost (first {missing[:5]}), {len(doubled)} doubled "
        f"(first {list(doubled.items())[:5]}), {len(extra)} unexpected")


# ------------------------------------------------------------------------- a store that refuses writes


class Running:
    """A daemon on its own thread over one log file (dry-run enforcer), its state in `state`."""

    def __init__(self, tmp: Path, state: Path, store: Store | None = None) -> None:
        self.log = tmp / "kamailio.log"
        self.log.touch()
        self.cfg = Config.model_validate({"allowlist": {"include_host_addresses": False},
                                          "daemon": {"control_interval": 0.05},
                                          "sources": {"from_start": True}})
        self.enforcer = DryRunEnforcer()
        self.store = store or Store.open_state_dir(state)
        self.daemon = build_daemon(self.cfg, self.store, self.enforcer, logs=[str(self.log)])
        self.thread = threading.Thread(target=self.daemon.run, daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        wait_for(self.daemon.ready.is_set)
        return self

    def __exit__(self, *exc: object) -> None:
        self.daemon.stop()
        self.thread.join(20)
        assert not self.thread.is_alive()
        self.store.close()

    def write(self, data: bytes) -> None:
        with self.log.open("ab") as f:
            f.write(data)

    def enforced(self) -> set[str]:
        return {e.ip for e in self.enforcer.entries()}


class Refusing(Store):
    """A store whose batch inserts fail while `full` is set, as SQLite's do on a full disk."""

    full = False
    attempts = 0

    def add_events(self, events):  # type: ignore[no-untyped-def]
        if self.full:
            self.attempts += 1
            raise sqlite3.OperationalError("database or disk is full")
        super().add_events(events)


def test_a_refused_batch_is_held_and_retried_not_lost(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Refusing.open_state_dir(tmp_path / "state")
    n = 3000
    scanners = range(n, n + 30)
    with caplog.at_level(logging.WARNING, logger="sipguard.daemon"), Running(tmp_path, tmp_path, store) as r:
        d = r.daemon
        r.write(b"".join(auth_line(i) for i in range(10)))
        wait_for(lambda: store.count_events() == 10)
        saved = store.positions()[str(r.log)].offset
        store.full = True
        r.write(b"".join(auth_line(i) for i in range(10, n)) + b"".join(scanner_line(i) for i in scanners))
        wait_for(lambda: store.attempts >= 4, timeout=20)
        assert r.thread.is_alive()
        assert d.stats.stalled and d.stats.store_errors >= 4
        assert "disk is full" in d.stats.last_store_error
        assert {ip_of(i) for i in scanners} <= r.enforced()  # the kernel came first
        assert all(store.get_ban(ip_of(i)) is None for i in scanners)  # the store could not take them
        assert store.positions()[str(r.log)].offset == saved  # the position did not pass them
        assert store.count_events() == 10
        store.full = False
        wait_for(lambda: store.count_events() == n + len(scanners), timeout=20)
        wait_for(lambda: not d.stats.stalled)
        check_each_once(store.events_per_source(0), n + len(scanners), "refused batches")
        assert all(store.get_ban(ip_of(i)) is not None for i in scanners)
        assert store.positions()[str(r.log)].offset == r.log.stat().st_size
        wait_for(lambda: json.loads(store.get_meta("status") or "{}").get("daemon", {}).get("store_errors", 0) >= 4)
        assert json.loads(store.get_meta("status") or "{}")["daemon"]["stalled"] is False
    said = [rec.getMessage() for rec in caplog.records if rec.name == "sipguard.daemon"]
    assert sum("refused a batch" in m for m in said) == 1, said  # said once, not at every retry
    assert sum("caught up" in m for m in said) == 1, said


def test_a_stop_while_the_store_refuses_reads_the_batch_again_at_the_next_start(tmp_path: Path) -> None:
    store = Refusing.open_state_dir(tmp_path / "state")
    with Running(tmp_path, tmp_path, store) as r:
        r.write(b"".join(auth_line(i) for i in range(5)))
        wait_for(lambda: store.count_events() == 5)
        store.full = True
        r.write(b"".join(auth_line(i) for i in range(5, 500)))
        wait_for(lambda: store.attempts >= 2, timeout=20)
    store = Store.open_state_dir(tmp_path / "state")
    try:
        assert store.count_events() == 5
    finally:
        store.close()
    with Running(tmp_path, tmp_path / "state") as r:  # the same state, a store that works
        wait_for(lambda: r.store.count_events() == 500, timeout=20)
        check_each_once(r.store.events_per_source(0), 500, "restart after a refused batch")


@contextmanager
def tmpfs(size: str) -> Iterator[Path]:
    """A real tmpfs of `size` under /tmp, named after this process; unmounted whatever happens."""
    d = Path(f"/tmp/sgf16-{os.getpid()}-state")
    d.mkdir(exist_ok=False)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", f"sgf16-{os.getpid()}", str(d)],
                       check=True, capture_output=True, timeout=30)
        try:
            yield d
        finally:
            p = subprocess.run(["umount", str(d)], capture_output=True, timeout=30)
            if p.returncode != 0:
                subprocess.run(["umount", "-l", str(d)], capture_output=True, timeout=30)
    finally:
        d.rmdir()


def fill(d: Path) -> Path:
    """A filler file that takes every free byte of the filesystem at `d`."""
    filler = d / "filler"
    block = b"\0" * (64 << 10)
    with open(filler, "wb", buffering=0) as f:
        while True:
            try:
                f.write(block)
            except OSError:
                break
        for _ in range(64):  # the last partial block
            try:
                f.write(b"\0" * 1024)
            except OSError:
                break
    return filler


@root
def test_disk_full_on_a_real_tmpfs_loses_nothing(tmp_path: Path) -> None:
    n = 20_000
    scanners = list(range(n, n + 40))
    with tmpfs("6m") as state:
        with Running(tmp_path, state) as r:
            d, store = r.daemon, r.store
            r.write(b"".join(auth_line(i) for i in range(100)))
            wait_for(lambda: store.count_events() == 100, timeout=20)
            filler = fill(state)
            # the flood, with bans in it, while the disk is full
            for k in range(100, n, 2000):
                r.write(b"".join(auth_line(i) for i in range(k, min(n, k + 2000))))
                r.write(scanner_line(scanners[k // 2000]))
            r.write(b"".join(scanner_line(i) for i in scanners[n // 2000:]))
            wait_for(lambda: d.stats.store_errors >= 3, timeout=30)
            assert r.thread.is_alive() and d.stats.stalled
            assert "full" in d.stats.last_store_error, d.stats.last_store_error
            banned_in_fault = r.enforced()
            assert banned_in_fault, "no ban was decided during the fault"
            assert not all(store.get_ban(ip) for ip in banned_in_fault), "the store took every ban: no fault"
            filler.unlink()  # room again
            wait_for(lambda: store.count_events() == n + len(scanners), timeout=60)
            wait_for(lambda: not d.stats.stalled, timeout=10)
            check_each_once(store.events_per_source(0), n + len(scanners), "disk full")
            assert {ip_of(i) for i in scanners} <= r.enforced()
            missing = [ip for ip in r.enforced() if store.get_ban(ip) is None]
            assert not missing, f"{len(missing)} bans decided during the fault are not in the store"
            assert store.positions()[str(r.log)].offset == r.log.stat().st_size


def test_positions_from_before_fingerprints_are_migrated(tmp_path: Path) -> None:
    db = tmp_path / "sipguard.db"
    old = sqlite3.connect(db)
    old.execute("CREATE TABLE positions (path TEXT PRIMARY KEY, dev INTEGER, inode INTEGER, offset INTEGER)")
    old.execute("INSERT INTO positions VALUES ('/var/log/kamailio.log', 2049, 1234, 5678)")
    old.commit()
    old.close()
    s = Store(db)
    try:
        pos = s.positions()["/var/log/kamailio.log"]
        assert (pos.dev, pos.inode, pos.offset, pos.head, pos.tail) == (2049, 1234, 5678, "", "")
        from sipguard.sources import SourcePosition

        s.save_positions([SourcePosition("/var/log/kamailio.log", 2049, 1234, 6000, "ab" * 16, "cd" * 16)])
        pos = s.positions()["/var/log/kamailio.log"]
        assert (pos.offset, pos.head, pos.tail) == (6000, "ab" * 16, "cd" * 16)
    finally:
        s.close()
