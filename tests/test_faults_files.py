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
        # the scanners first: the first batch read during the fault holds them, whatever its size
        r.write(b"".join(scanner_line(i) for i in scanners) + b"".join(auth_line(i) for i in range(10, n)))
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


def test_a_stalled_store_shows_in_the_metrics(tmp_path: Path) -> None:
    from test_metrics import metrics_hook, scrape, val

    log = tmp_path / "kamailio.log"
    log.touch()
    cfg = Config.model_validate({"allowlist": {"include_host_addresses": False}, "daemon": {"control_interval": 0.05},
                                 "metrics": {"listen": "127.0.0.1:0"}})
    store = Refusing.open_state_dir(tmp_path / "state")
    d = build_daemon(cfg, store, DryRunEnforcer(), logs=[str(log)])
    addr = metrics_hook(d).metrics.address
    th = threading.Thread(target=d.run, daemon=True)
    th.start()
    try:
        wait_for(d.ready.is_set)
        assert val(scrape(addr), "sipguard_store_stalled") == 0
        store.full = True
        with log.open("ab") as f:
            f.write(auth_line(1))
        wait_for(lambda: val(scrape(addr), "sipguard_store_stalled") == 1, timeout=10)
        assert val(scrape(addr), "sipguard_store_errors_total") >= 1
        store.full = False
        wait_for(lambda: val(scrape(addr), "sipguard_store_stalled") == 0, timeout=10)
        assert store.count_events() == 1
    finally:
        d.stop()
        th.join(20)
        store.close()


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
    # the flood: before every 20 auth lines (seq i..i+19) a scanner line (a ban) from seq n + i // 20,
    # so every batch the daemon reads decides bans
    expected = set(range(n)) | {n + i // 20 for i in range(100, n, 20)}
    with tmpfs("12m") as state:  # (the store keeps the text of recent events: room for them and the WAL)
        with Running(tmp_path, state) as r:
            d, store = r.daemon, r.store
            r.write(b"".join(auth_line(i) for i in range(100)))
            wait_for(lambda: store.count_events() == 100, timeout=20)
            filler = fill(state)
            for k in range(100, n, 2000):  # the flood, with bans in it, while the disk is full
                r.write(b"".join(scanner_line(n + i // 20) + b"".join(auth_line(j) for j in range(i, min(n, i + 20)))
                                 for i in range(k, min(n, k + 2000), 20)))
            wait_for(lambda: d.stats.store_errors >= 3, timeout=30)
            assert r.thread.is_alive() and d.stats.stalled
            assert "full" in d.stats.last_store_error, d.stats.last_store_error
            unstored = {ip for ip in r.enforced() if store.get_ban(ip) is None}
            assert unstored, "no ban decided during the fault was waiting for the store"
            filler.unlink()  # room again
            wait_for(lambda: store.count_events() >= len(expected), timeout=60)
            wait_for(lambda: not d.stats.stalled, timeout=10)
            time.sleep(0.3)
            got = store.events_per_source(0)
            assert {seq_of(ip) for ip in got} == expected and set(got.values()) == {1}, (
                f"{len(expected - {seq_of(ip) for ip in got})} lost, {sum(v > 1 for v in got.values())} doubled")
            assert unstored <= {b.ip for b in store.active_bans()}
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


# ------------------------------------------------------------------------- rotation with the real logrotate

LINE_SRC = r'''
import ipaddress
from datetime import datetime

def line(i):
    """Line i: auth failure from 198.18.0.0 + i, every line of one length (seq and padding)."""
    ip = str(ipaddress.ip_address(0xC6120000 + i))
    ts = datetime.now().strftime("%b %d %H:%M:%S")
    user = f"seq{i:06d}" + "x" * (15 - len(ip))
    return (f"{ts} edge kamailio[4242]: NOTICE: <script>: auth failed for user {user} from {ip}:5060 "
            f"method REGISTER\n").encode()
'''

WRITER = LINE_SRC + r'''
import os, signal, sys, time
path, start, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pauses = sorted(int(x) for x in sys.argv[4].split(",") if x) if len(sys.argv) > 4 else []
ack = sys.argv[5] if len(sys.argv) > 5 else ""
go = [False]
signal.signal(signal.SIGUSR2, lambda *a: go.__setitem__(0, True))
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
i = start
deadline = time.monotonic() + 120
while i < end:
    if i in pauses:  # tell the test where we stand, wait for its SIGUSR2
        go[0] = False
        with open(ack + ".tmp", "w") as f:
            f.write(str(i))
        os.rename(ack + ".tmp", ack)
        while not go[0] and time.monotonic() < deadline:
            time.sleep(0.002)
    k = min([end, i + 100] + [p for p in pauses if p > i])
    os.write(fd, b"".join(line(j) for j in range(i, k)))  # whole lines per write, as a logger does
    i = k
    time.sleep(0.002)
os.close(fd)
'''

_ns: dict = {}
exec(LINE_SRC, _ns)
fixed_line = _ns["line"]


class RotLab:
    """`sipguard run --dry-run` as its own process over one log, writer processes, and logrotate."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.log = tmp / "kamailio.log"
        self.log.touch()
        self.state = tmp / "state"
        self.config = tmp / "sipguard.toml"
        self.config.write_text(f'[sources]\nlogs = ["{self.log}"]\nformat = "syslog"\nfrom_start = true\n'
                               '[allowlist]\ninclude_host_addresses = false\n[daemon]\ncontrol_interval = 0.05\n')
        self.procs: list[subprocess.Popen] = []
        self.rotations = 0

    def env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONPATH": str(TREE)}
        env.pop("SIPGUARD_CONFIG", None)
        env.pop("SIPGUARD_STATE_DIR", None)
        return env

    def daemon(self) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "sipguard", "--config", str(self.config), "--state-dir",
                              str(self.state), "run", "--dry-run"], stdout=subprocess.DEVNULL,
                             stderr=open(self.tmp / "daemon.err", "ab"), env=self.env(), start_new_session=True)
        self.procs.append(p)
        wait_for(lambda: self.status().get("running") and self.status().get("pid") == p.pid, timeout=30,
                 interval=0.05)
        return p

    def _query(self, sql: str) -> list[tuple]:
        """Read the daemon's database (read-only, never creating or migrating anything)."""
        db = self.state / "sipguard.db"
        if not db.exists():
            return []
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.OperationalError:  # not created yet
            return []
        finally:
            conn.close()

    def status(self) -> dict:
        rows = self._query("SELECT value FROM meta WHERE key = 'status'")
        return json.loads(rows[0][0]) if rows else {}

    def per_source(self) -> dict[str, int]:
        return dict(self._query("SELECT ip, count(*) FROM events GROUP BY ip"))

    def count(self) -> int:
        rows = self._query("SELECT count(*) FROM events")
        return rows[0][0] if rows else 0

    def settle(self, n: int, timeout: float = 90.0) -> None:
        """Until n events are stored, or the count stood still for 5 s (then the check tells what is
        missing), then half a second more for anything extra."""
        end = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < end:
            k = self.count()
            if k >= n:
                break
            if k != last:
                last, since = k, time.monotonic()
            elif time.monotonic() - since > 5.0:
                break
            time.sleep(0.2)
        time.sleep(0.5)

    def writer(self, start: int, end: int, pauses: tuple[int, ...] = ()) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(self.log), str(start), str(end),
                              ",".join(map(str, pauses)), str(self.tmp / "ack")], start_new_session=True)
        self.procs.append(p)
        return p

    def write(self, start: int, end: int) -> None:
        p = self.writer(start, end)
        assert p.wait(60) == 0

    def paused_at(self, seq: int) -> None:
        ack = self.tmp / "ack"
        wait_for(lambda: ack.exists() and ack.read_text() == str(seq), timeout=60)
        ack.unlink()

    def rotate(self, *options: str) -> None:
        """One forced logrotate run with `options` (copytruncate, compress, dateext, ...)."""
        self.rotations += 1
        conf = self.tmp / "logrotate.conf"
        body = "\n".join(["rotate 9", "missingok", "notifempty", *options])
        conf.write_text(f"{self.log} {{\n{textwrap.indent(body, '    ')}\n}}\n")
        p = subprocess.run([LOGROTATE, "-f", "-s", str(self.tmp / "logrotate.state"), str(conf)],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr

    def stop(self, p: subprocess.Popen) -> None:
        os.killpg(p.pid, signal.SIGTERM)
        assert p.wait(30) == 0, (self.tmp / "daemon.err").read_text()[-3000:]

    def stop_all(self) -> None:
        """Every process this lab started ends, whatever state it is in (stopped ones are continued)."""
        for p in self.procs:
            for sig, wait in ((signal.SIGCONT, 0), (signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                if p.poll() is not None:
                    break
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                if wait:
                    try:
                        p.wait(wait)
                    except subprocess.TimeoutExpired:
                        continue


@pytest.fixture
def rot(tmp_path: Path) -> Iterator[RotLab]:
    lab = RotLab(tmp_path)
    try:
        yield lab
    finally:
        lab.stop_all()


COPYTRUNCATE = {
    "copytruncate": ("copytruncate",),
    "copytruncate-compress": ("copytruncate", "compress"),  # the copy is compressed at once: only .1.gz holds it
    "copytruncate-dateext": ("copytruncate", "dateext"),
}


@needs_logrotate
@pytest.mark.parametrize("grow_back", [False, True], ids=["lag", "grown-back"])
@pytest.mark.parametrize("kind", list(COPYTRUNCATE))
def test_copytruncate_while_the_daemon_lags(rot: RotLab, kind: str, grow_back: bool) -> None:
    n, stop_at, rotate_at = 30_000, 6_000, 12_000
    d = rot.daemon()
    w = rot.writer(0, n, pauses=(stop_at, rotate_at))
    rot.paused_at(stop_at)
    wait_for(lambda: rot.count() >= stop_at // 2, timeout=30)
    os.killpg(d.pid, signal.SIGSTOP)  # the daemon lags: what comes now is not read before the rotation
    w.send_signal(signal.SIGUSR2)
    rot.paused_at(rotate_at)  # the writer holds still around copy+truncate (logrotate's own gap)
    size = rot.log.stat().st_size
    rot.rotate(*COPYTRUNCATE[kind])
    if grow_back:  # the file grows back past the old offset before the daemon looks again
        w.send_signal(signal.SIGUSR2)
        wait_for(lambda: rot.log.stat().st_size > size + 4096, timeout=60)
        os.killpg(d.pid, signal.SIGCONT)
    else:  # the daemon finds the file shorter than its offset; the writer goes on once the copy is read
        os.killpg(d.pid, signal.SIGCONT)
        try:
            wait_for(lambda: rot.count() >= rotate_at, timeout=30, interval=0.05)
        except AssertionError:
            pass  # lines lost: the count below says which
        w.send_signal(signal.SIGUSR2)
    assert w.wait(120) == 0
    rot.settle(n)
    check_each_once(rot.per_source(), n, kind)
    rot.stop(d)
    src = rot.status()["sources"]  # as the daemon said when it stopped
    assert src["truncations"] == 1 and src["copies"] == 1, src
    assert src["rewritten"] == (1 if grow_back else 0), src


ROTATIONS = {
    "create": ("create",),
    "copytruncate": ("copytruncate",),
    "compress": ("create", "compress"),  # the old file is compressed at once: its rest is only in .1.gz
    "delaycompress": ("create", "compress", "delaycompress"),
    "dateext": ("create", "dateext", "dateformat -%Y%m%d-%s"),
    "copytruncate-compress": ("copytruncate", "compress"),
}


@needs_logrotate
@pytest.mark.parametrize("kind", list(ROTATIONS))
def test_restart_after_two_rotations_while_down(rot: RotLab, kind: str) -> None:
    """Read 8,000 lines, stop; 8,000 more, rotate, 8,000 more, rotate, 16,000 more (the new file passes
    the old offset with lines of one length); start: the 32,000 unread lines, each once."""
    step = 8_000
    d = rot.daemon()
    rot.write(0, step)
    wait_for(lambda: rot.count() >= step, timeout=60, interval=0.1)
    rot.stop(d)
    rot.write(step, 2 * step)
    rot.rotate(*ROTATIONS[kind])
    rot.write(2 * step, 3 * step)
    if kind == "dateext":
        time.sleep(1.1)  # the second rotation's name differs by its second
    rot.rotate(*ROTATIONS[kind])
    rot.write(3 * step, 5 * step)
    assert rot.log.stat().st_size > step * len(fixed_line(0))
    d = rot.daemon()
    rot.settle(5 * step)
    check_each_once(rot.per_source(), 5 * step, kind)
    rot.stop(d)
    src = rot.status()["sources"]
    assert src["lost_rotated"] == 0 and src["lines"] == 4 * step, src
