"""Steps of the wall clock (sipguard/clock.py, `BanBook.clock_stepped`, the daemon's `watch_clock` and
`clock_at_start`): a ban of N seconds lasts N seconds of real time whatever the wall clock does.

The unit tests drive a `ClockWatch` with a fake wall clock and a fake monotonic clock over the
dry-run enforcer and a store in a temp directory. The last test runs the real daemon and CLI with the
ipset backend in an `sge-` network namespace under libfaketime (Debian's `faketime`, with a tiny
preloaded shim, built here with gcc, that mends its monotonic sleeps): the wall clock of both is moved
through a timestamp file (FAKETIME_NO_CACHE=1), the monotonic clock stays real (DONT_FAKE_MONOTONIC=1);
the clock is stepped 2 h forward and back while bans are active, with the daemon running and while it
is stopped, and every ban must end on real time in the store and in the kernel (about 45 s).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from sipguard.actions import manual_ban
from sipguard.addresses import AllowList
from sipguard.bans import FLEET, BanBook
from sipguard.clock import CLOCK_META, ClockRef, ClockWatch, describe
from sipguard.config import Config
from sipguard.daemon import Daemon
from sipguard.enforce.base import EnforcedEntry
from sipguard.enforce.dryrun import DryRunEnforcer
from sipguard.model import Ban
from sipguard.store import Store
from sipguard.wiring import build_daemon

from lab.netns import Netns

NOW = 1_800_000_000.0
H2 = 7200.0
A, B, C, D, E = (f"198.18.70.{i}" for i in range(1, 6))


class Clocks:
    """A wall clock that can be stepped and a monotonic clock that cannot; both advance together."""

    def __init__(self, wall: float = NOW) -> None:
        self.real = wall
        self.mono = 5000.0
        self.offset = 0.0

    def wall(self) -> float:
        return self.real + self.offset

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.real += seconds
        self.mono += seconds

    def step(self, seconds: float) -> None:
        self.offset += seconds

    def watch(self, boot: str = "boot-1") -> ClockWatch:
        return ClockWatch(wall=self.wall, mono=self.monotonic, boot=lambda: boot)


# -- the watch ------------------------------------------------------------------------------------
def test_watch_sees_a_step_not_the_passing_of_time():
    c = Clocks()
    w = c.watch()
    c.advance(3600)
    assert w.look() is None  # an hour passing on both clocks is no step
    c.step(1.0)
    assert w.look() is None  # a leap second is no step
    c.advance(0.25)
    c.step(H2 - 1.0)
    step = w.look()
    assert step is not None and step.seconds == pytest.approx(H2)
    # made in the new clock: at or after the earliest instant the step can have happened, up to now
    assert step.since == pytest.approx(c.wall() - 0.25 - 0.5)
    assert w.made_after(step) == pytest.approx((c.wall() - 0.75, c.wall() + 0.5))
    assert w.look() is not None  # seen until dealt with
    assert w.after(step).offset == pytest.approx(w.ref.offset + H2)
    w.accept(step)
    assert w.look() is None
    c.step(-H2)
    assert w.look().seconds == pytest.approx(-H2)


def test_since_stays_put_while_a_step_waits_to_be_stored():
    c = Clocks()
    w = c.watch()
    c.advance(0.2)
    c.step(H2)
    first = w.look()
    c.advance(5)
    again = w.look()
    assert again.since == pytest.approx(first.since)
    assert w.made_after(again)[1] == pytest.approx(c.wall() + 0.5)  # a ban the CLI made meanwhile is new


def test_a_step_while_stopped_is_known_in_the_same_boot_only():
    c = Clocks()
    saved = c.watch().ref
    assert ClockRef.loads(saved.dumps()) == saved
    assert ClockRef.loads(None) is None and ClockRef.loads("{bad") is None and ClockRef.loads('{"boot": 1}') is None
    c.advance(100)
    assert c.watch().since(saved) is None
    c.step(-H2)
    step = c.watch().since(saved)
    assert step.seconds == pytest.approx(-H2) and step.since is None and c.watch().made_after(step) is None
    assert c.watch(boot="boot-2").since(saved) is None  # a reboot: monotonic time started again
    assert c.watch(boot="").since(ClockRef("", saved.offset)) is None
    assert describe(H2) == "+2h00m00s" and describe(-65) == "-1m05s"


# -- the ban book ---------------------------------------------------------------------------------
def _book(tmp_path: Path, enforcer=None) -> tuple[Store, BanBook]:
    store = Store(tmp_path / "s.db")
    return store, BanBook(store, enforcer or DryRunEnforcer())


def _ban(ip: str, created: float, seconds: float | None) -> Ban:
    return Ban(ip=ip, reason="manual", created=created, expires=None if seconds is None else created + seconds,
               manual=True)


@pytest.mark.parametrize("step", [H2, -H2])
def test_book_moves_the_bans_made_before_the_step(tmp_path, step):
    store, book = _book(tmp_path)
    book.ban([_ban(A, NOW - 5, 20), _ban(B, NOW - 5, None), _ban(C, NOW - 50, 49)], NOW)  # C: over at NOW - 1
    book.commit(NOW)
    new = NOW + 1 + step  # one real second later, in the new clock
    book.ban([_ban(D, new - 0.2, 30)], new - 0.2)  # made after the step (the CLI, or this batch)
    book.commit(new)
    history = len(store.history(1000))
    offences = store.offence_history(0)
    moved = book.clock_stepped(step, new, made_after=(new - 1 - 0.5, new + 0.5))
    assert {b.ip: b.expires for b in moved} == {A: NOW + 15 + step, C: NOW - 1 + step}
    assert store.get_ban(A).expires == NOW + 15 + step  # 14 real seconds left, in the new clock
    assert store.get_ban(B).expires is None
    assert store.get_ban(C).expires == NOW - 1 + step  # over a second ago, and over still
    assert store.get_ban(D).expires == new - 0.2 + 30
    assert len(store.history(1000)) == history and store.offence_history(0) == offences  # no new ban
    assert [b.ip for b in book.expire(new)] == [C]
    book.commit(new)
    assert {b.ip for b in store.active_bans(new)} == {A, B, D}
    assert [b.ip for b in book.expire(new + 13.9)] == []  # 14 real seconds after `new`, not sooner
    assert [b.ip for b in book.expire(new + 14)] == [A]


def test_book_moves_queued_bans_and_keeps_the_fleets(tmp_path):
    store, book = _book(tmp_path)
    book.ban([_ban(A, NOW - 5, 20), _ban(B, NOW - 5, 20)], NOW)  # queued: no transaction committed yet
    new = NOW + 1 - H2
    moved = book.clock_stepped(-H2, new, made_after=(new - 1.5, new + 0.5), keep={B})
    assert [b.ip for b in moved] == [A]
    assert book.current(A).expires == NOW + 15 - H2 and book.current(B).expires == NOW + 15
    assert {b.ip: b.expires for b in book.held(new)} == {A: NOW + 15 - H2, B: NOW + 15}
    book.commit(new)
    assert store.get_ban(A).expires == NOW + 15 - H2 and store.get_ban(B).expires == NOW + 15


def test_book_step_is_one_transaction_with_the_callers_reference(tmp_path):
    store, book = _book(tmp_path)
    book.ban([_ban(A, NOW - 5, 20)], NOW)
    book.commit(NOW)

    def fail():
        store.set_meta(CLOCK_META, "x")
        raise sqlite3.OperationalError("database or disk is full")

    with pytest.raises(sqlite3.OperationalError):
        book.clock_stepped(H2, NOW + H2, made_after=(NOW + H2 - 1, NOW + H2), also=fail)
    assert store.get_ban(A).expires == NOW + 15 and store.get_meta(CLOCK_META) is None
    book.clock_stepped(H2, NOW + H2, made_after=(NOW + H2 - 1, NOW + H2), also=lambda: store.set_meta(CLOCK_META, "y"))
    assert store.get_ban(A).expires == NOW + 15 + H2 and store.get_meta(CLOCK_META) == "y"


class KernelSays(DryRunEnforcer):
    """A dry-run enforcer whose entries report fixed remaining timeouts, like a kernel that counted
    real time while the daemon was down."""

    def __init__(self, left: dict[str, float | None]) -> None:
        super().__init__()
        self.left = left

    def entries(self):
        return [EnforcedEntry(ip, t) for ip, t in self.left.items()]


def test_book_at_start_goes_by_the_kernels_timeouts(tmp_path):
    long = 30 * 86400.0  # longer than the ipset timeout cap: its entry tells nothing
    left = {A: 9.0, B: 25.0, C: 2_147_000.0}
    store, book = _book(tmp_path, KernelSays(left))
    new = NOW + 11 + H2  # stopped, stepped forward, started again 11 real seconds later
    book.ban([_ban(A, NOW, 20), _ban(B, new - 5, 30), _ban(C, NOW, long), _ban(D, NOW, 20)], NOW)
    book.commit(NOW)
    moved = book.clock_stepped(H2, new, kernel=True)
    # A: the kernel agrees with the moved end; B (made by the CLI after the step): with its own end;
    # C: with neither (capped), so it moves; D: not in the kernel (refused, flushed), so it moves
    assert {b.ip for b in moved} == {A, C, D}
    assert store.get_ban(A).expires == NOW + 20 + H2
    assert store.get_ban(B).expires == new + 25
    assert store.get_ban(C).expires == NOW + long + H2
    assert store.get_ban(D).expires == NOW + 20 + H2


# -- the daemon -----------------------------------------------------------------------------------
def _cfg(**extra) -> Config:
    return Config.model_validate({"allowlist": {"include_host_addresses": False},
                                  "daemon": {"control_interval": 0.05}, **extra})


def _daemon(tmp_path: Path, clocks: Clocks, cfg: Config | None = None, store: Store | None = None,
            enforcer=None, boot: str = "boot-1") -> Daemon:
    log = tmp_path / "kamailio.log"
    log.touch()
    store = store or Store.open_state_dir(tmp_path / "state")
    built = build_daemon(_cfg(), store, enforcer or DryRunEnforcer(), logs=[str(log)])
    return Daemon(replace(built.parts, cfg=cfg or built.cfg, clock=clocks.watch(boot)))


def _cli_ban(d: Daemon, ip: str, seconds: float, clocks: Clocks) -> Ban:
    return manual_ban(d.parts.store, ip, seconds, "manual", AllowList([], include_host=False), now=clocks.wall())


def test_daemon_keeps_bans_on_real_time_across_steps(tmp_path, caplog):
    c = Clocks()
    d = _daemon(tmp_path, c)
    store = d.parts.store
    d.clock_at_start(c.wall())
    _cli_ban(d, A, 20, c)
    d.housekeeping(c.wall())
    c.advance(1)
    c.step(H2)
    with caplog.at_level(logging.WARNING, logger="sipguard.daemon"):
        d.housekeeping(c.wall())  # without the move, A would expire here, 19 s early
    assert store.get_ban(A).expires == NOW + 20 + H2
    assert [r.getMessage() for r in caplog.records if "stepped" in r.getMessage()] == [
        "the wall clock stepped +2h00m00s against the monotonic clock: the ends of 1 bans moved with it, "
        "so each lasts its real time"]
    assert d.stats.clock_steps == 1
    assert ClockRef.loads(store.get_meta(CLOCK_META)).offset == pytest.approx(NOW - 5000 + H2)
    _cli_ban(d, B, 30, c)  # the CLI after the step: already in the new clock
    c.advance(1)
    d.housekeeping(c.wall())
    assert store.get_ban(B).expires == NOW + 1 + H2 + 30
    c.advance(1)
    c.step(-H2)
    d.housekeeping(c.wall())  # without the move, A and B would last 2 h more
    assert store.get_ban(A).expires == NOW + 20 and store.get_ban(B).expires == NOW + 31
    assert d.stats.clock_steps == 2
    while c.real + 0.5 < NOW + 20:  # the daemon's own timers went back with the clock: a heartbeat every 2 s
        c.advance(0.5)
        d.housekeeping(c.wall())
    assert json.loads(store.get_meta("status"))["heartbeat"] >= c.wall() - 2.5
    assert c.real == NOW + 19.5 and store.get_ban(A) is not None
    c.advance(0.5)
    d.housekeeping(c.wall())
    assert store.get_ban(A) is None and store.get_ban(B) is not None
    c.advance(11)
    d.housekeeping(c.wall())
    assert store.get_ban(B) is None
    assert d.stats.expired == 2 and d.stats.clock_steps == 2


class FailingOnce(Store):
    """A store whose first move of ban ends fails (disk full)."""

    failures = 1

    def set_ban_expiries(self, expiries):
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return super().set_ban_expiries(expiries)


def test_daemon_expires_nothing_until_the_moved_bans_are_stored(tmp_path):
    c = Clocks()
    d = _daemon(tmp_path, c, store=FailingOnce.open_state_dir(tmp_path / "state"))
    store = d.parts.store
    _cli_ban(d, A, 20, c)
    c.advance(1)
    c.step(H2)
    d.housekeeping(c.wall())
    assert store.get_ban(A).expires == NOW + 20 and d.stats.errors == 1  # not moved, and not expired
    c.advance(1)
    d.housekeeping(c.wall())
    assert store.get_ban(A).expires == NOW + 20 + H2 and d.stats.clock_steps == 1


def test_daemon_start_after_a_step_while_stopped(tmp_path):
    c = Clocks()
    first = _daemon(tmp_path, c)
    store = first.parts.store
    first.clock_at_start(c.wall())  # saves the reference
    _cli_ban(first, A, 20, c)
    c.advance(2)
    c.step(H2)  # while stopped
    _cli_ban(first, B, 20, c)  # the CLI while the daemon is down, in the new clock
    c.advance(2)
    kernel = KernelSays({A: 16.0, B: 18.0})
    d = _daemon(tmp_path, c, store=store, enforcer=kernel)
    now = d.clock_at_start(c.wall())
    d.parts.book.expire(now)  # what setup() does next: nothing is over
    assert store.get_ban(A).expires == NOW + 20 + H2 and store.get_ban(B).expires == NOW + 2 + H2 + 20
    assert ClockRef.loads(store.get_meta(CLOCK_META)) == d.parts.clock.ref
    other = _daemon(tmp_path, c, store=store, boot="boot-2")  # after a reboot: nothing to go by
    c.step(-H2)
    other.clock_at_start(c.wall())
    assert store.get_ban(A).expires == NOW + 20 + H2


def test_daemon_in_a_fleet_never_ends_another_nodes_ban_sooner(tmp_path):
    c = Clocks()
    fleet = _cfg(cluster={"redis_url": "redis://127.0.0.1:1/0", "node_name": "edge1"})
    d = _daemon(tmp_path, c, cfg=fleet)
    store, book = d.parts.store, d.parts.book
    book.ban([_ban(A, NOW, 20), _ban(B, NOW, 20)], NOW, FLEET)
    book.commit(NOW)
    store.hold(A, "edge1:1", "edge1", NOW)  # this node's own (published) ban
    store.hold(B, "edge2:1", "edge2", NOW)  # another node's, on the fleet's clock
    c.advance(1)
    c.step(-H2)
    d.housekeeping(c.wall())
    assert store.get_ban(A).expires == NOW + 20 - H2 and store.get_ban(B).expires == NOW + 20
    c.step(2 * H2)
    d.housekeeping(c.wall())  # a step forward moves both: neither ends sooner
    assert store.get_ban(A).expires == NOW + 20 + H2 and store.get_ban(B).expires == NOW + 20 + 2 * H2


# -- the real daemon and CLI under a faked wall clock ---------------------------------------------
root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces and netfilter")
FAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))), None)
CHECK = 5.0  # [enforce] resync_interval of the lab: a ban may outlast its time by this much, never more
SLACK = 1.0  # polling, and the kernel's whole-second timeouts

# libfaketime 0.9.10 (Debian 12) turns a TIMER_ABSTIME sleep on CLOCK_MONOTONIC into a bad time even with
# DONT_FAKE_MONOTONIC=1 (its issue 426, fixed in later releases), and Python 3.11's time.sleep (so every
# subprocess.run with a timeout) makes exactly that call: EINVAL. This shim, preloaded before
# libfaketime, sends monotonic sleeps straight to the kernel and leaves every other call to libfaketime.
MONOTONIC_SLEEP_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int clock_nanosleep(clockid_t clock_id, int flags, const struct timespec *req, struct timespec *rem)
{
    static int (*next)(clockid_t, int, const struct timespec *, struct timespec *);
    if (clock_id == CLOCK_MONOTONIC)
        return syscall(SYS_clock_nanosleep, clock_id, flags, req, rem) == -1 ? errno : 0;
    if (next == NULL)
        next = (int (*)(clockid_t, int, const struct timespec *, struct timespec *))dlsym(RTLD_NEXT, "clock_nanosleep");
    return next(clock_id, flags, req, rem);
}
"""


def _preload(tmp: Path) -> str:
    """LD_PRELOAD for a faked wall clock whose monotonic sleeps work: the shim, then libfaketime."""
    src, lib = tmp / "monotonic_sleep.c", tmp / "monotonic_sleep.so"
    src.write_text(MONOTONIC_SLEEP_SHIM)
    p = subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(src), "-ldl"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return f"{lib}:{FAKETIME}"


class FakedLab:
    """The daemon and the CLI of one state directory in a namespace, with one faked wall clock.

    libfaketime reads the timestamp file at every call (FAKETIME_NO_CACHE=1), so writing an offset
    such as "+7200" steps the wall clock of every process started here at once, the running daemon
    included; the monotonic clock stays real (DONT_FAKE_MONOTONIC=1).
    """

    def __init__(self, ns: str, tmp: Path) -> None:
        self.ns, self.tmp = ns, tmp
        self.log = tmp / "kamailio.log"
        self.log.write_text("")
        self.state = tmp / "state"
        self.stamp = tmp / "faketime"
        self.offset = 0
        self.set_offset(0)
        self.config = tmp / "sipguard.toml"
        self.config.write_text(
            f'[enforce]\nbackend = "ipset"\niptables = "nft"\nresync_interval = "{CHECK:.0f}s"\n'
            f'[sources]\nlogs = ["{self.log}"]\nformat = "syslog"\nfrom_start = true\n'
            '[allowlist]\ninclude_host_addresses = false\n[policy]\nbantime = "30s"\n'
            '[daemon]\ncontrol_interval = 0.05\n')
        self.daemon: subprocess.Popen | None = None
        self.err = tmp / "daemon.err"
        self.preload = _preload(tmp)
        self._local = threading.local()
        self._dbs: list[sqlite3.Connection] = []

    def set_offset(self, seconds: int) -> None:
        new = self.stamp.with_suffix(".new")
        new.write_text(f"{seconds:+d}\n")
        os.replace(new, self.stamp)  # readers see the old or the new offset, never half a file
        self.offset = seconds

    def faked(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, "env", f"LD_PRELOAD={self.preload}",
                f"FAKETIME_TIMESTAMP_FILE={self.stamp}", "FAKETIME_NO_CACHE=1", "DONT_FAKE_MONOTONIC=1", *argv]

    def sipguard(self, *args: str) -> list[str]:
        return self.faked(sys.executable, "-m", "sipguard", "--config", str(self.config), "--state-dir",
                          str(self.state), *args)

    def env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        env.pop("SIPGUARD_CONFIG", None)
        return env

    def cli(self, *args: str) -> str:
        p = subprocess.run(self.sipguard(*args), capture_output=True, text=True, timeout=60, env=self.env())
        assert p.returncode == 0, (args, p.stdout, p.stderr)
        return p.stdout

    def ban(self, ip: str, seconds: int) -> tuple[float, float, int]:
        """Ban by hand; the real (monotonic) span in which the ban was made, and its length."""
        t0 = time.monotonic()
        self.cli("ban", ip, "--for", f"{seconds}s")
        return t0, time.monotonic(), seconds

    def attack(self, ip: str) -> None:
        ts = time.strftime("%b %e %H:%M:%S", time.localtime(time.time() + self.offset))  # the daemon's clock
        with self.log.open("a") as f:
            f.write(f"{ts} edge kamailio[42]: WARNING: <script>: Blocked scanner UA 'friendly-scanner' "
                    f"from {ip}:5060\n")

    def start(self) -> None:
        assert self.daemon is None
        self.daemon = subprocess.Popen(self.sipguard("run"), stdout=subprocess.DEVNULL, stderr=self.err.open("ab"),
                                       env=self.env(), start_new_session=True)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            assert self.daemon.poll() is None, self.err.read_text()[-3000:]
            st = json.loads(self.cli("status", "--json"))
            if st["daemon"] == "running" and st["last_status"].get("pid") == self._pid():
                return
            time.sleep(0.1)
        raise AssertionError("the daemon did not start: " + self.err.read_text()[-3000:])

    def _pid(self) -> int | None:
        # `ip netns exec` and `env` exec the daemon in the same process
        return None if self.daemon is None else self.daemon.pid

    def stop(self) -> None:
        assert self.daemon is not None
        os.killpg(self.daemon.pid, signal.SIGTERM)
        self.daemon.wait(15)
        assert self.daemon.returncode == 0, self.err.read_text()[-3000:]
        self.daemon = None

    def stop_all(self) -> None:
        for db in self._dbs:
            db.close()
        if self.daemon is not None and self.daemon.poll() is None:
            try:
                os.killpg(self.daemon.pid, signal.SIGTERM)
                self.daemon.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.daemon.pid, signal.SIGKILL)
                self.daemon.wait(10)

    def store_rows(self) -> set[str]:
        """Addresses with a row in the store (the daemon deletes a row when the ban is over).

        One connection per thread, kept open: a reader that opens and closes the database while the
        daemon is stopped would be its last connection each time (a WAL checkpoint at every close)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = sqlite3.connect(self.state / "sipguard.db", timeout=10, check_same_thread=False)
            self._dbs.append(db)
        return {r[0] for r in db.execute("SELECT ip FROM bans")}

    def kernel(self) -> set[str]:
        p = subprocess.run(["ip", "netns", "exec", self.ns, "ipset", "save"], capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 0, p.stderr
        return {ln.split()[2] for ln in p.stdout.splitlines() if ln.startswith("add ")}

    def listed(self) -> set[str]:
        """The bans in force as the CLI sees them, on the faked clock."""
        return {b["ip"] for b in json.loads(self.cli("list", "--json"))}

    def expect_live(self, made: dict[str, tuple[float, float, int]], when: str) -> None:
        """Every ban whose time cannot be over yet is in the store, in the kernel and in `list`."""
        store, kernel, listed = self.store_rows(), self.kernel(), self.listed()
        now = time.monotonic()  # (a loaded machine makes the CLI slow: only what must still be there)
        ips = {ip for ip, (lo, _hi, secs) in made.items() if lo + secs - SLACK > now}
        assert ips <= store and ips <= kernel and ips <= listed, (when, ips, store, kernel, listed,
                                                                  self.err.read_text()[-3000:])


class Watcher(threading.Thread):
    """Polls the store and the kernel from outside (on real time): when each address left each."""

    def __init__(self, lab: FakedLab) -> None:
        super().__init__(daemon=True)
        self.lab = lab
        self.gone: dict[tuple[str, str], float] = {}
        self.back: list[tuple[str, str, float]] = []
        self.seen: set[tuple[str, str]] = set()
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                t = time.monotonic()
                for where, ips in (("store", self.lab.store_rows()), ("kernel", self.lab.kernel())):
                    for ip in (A, B, C, D, E):
                        key = (ip, where)
                        if ip in ips:
                            if key in self.gone:
                                self.back.append((ip, where, t))  # ended, then came back: never right
                                del self.gone[key]
                            self.seen.add(key)
                        elif key in self.seen and key not in self.gone:
                            self.gone[key] = t
                self.halt.wait(0.2)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def _check_faketime(lab: FakedLab) -> None:
    """libfaketime on this machine: Python's wall clock follows the file, its monotonic clock stays real
    and sleeping on it works."""
    lab.set_offset(7200)
    try:
        p = subprocess.run(lab.faked(sys.executable, "-c", "import time; time.sleep(0.01); "
                                     "print(time.time() - time.monotonic(), time.monotonic())"),
                           capture_output=True, text=True, timeout=30)
    finally:
        lab.set_offset(0)
    assert p.returncode == 0, p.stderr
    offset, mono = map(float, p.stdout.split())
    assert abs(offset - (time.time() - time.monotonic()) - 7200) < 1.0, p.stdout
    assert abs(mono - time.monotonic()) < 10, p.stdout


@root
def test_bans_end_on_real_time_while_the_wall_clock_steps(tmp_path):
    """+2 h and -2 h while the daemon runs, +2 h and -2 h while it is stopped, bans of 20-40 s made by
    hand and by the policy before, between and after the steps: each ends after its length of real
    time, not sooner and not more than the resync check later, in the store and in the kernel."""
    if FAKETIME is None:  # CI runs as root after `make setup` installed it: never skip there
        pytest.fail("libfaketime is not installed (Debian package faketime; `make setup` installs it)")
    with Netns(f"sge-{os.getpid() % 100000}-ck") as ns:
        lab = FakedLab(ns.name, tmp_path)
        watcher = Watcher(lab)
        try:
            _check_faketime(lab)
            made: dict[str, tuple[float, float, int]] = {}
            lab.start()
            made[A] = lab.ban(A, 20)
            made[B] = lab.ban(B, 40)
            watcher.start()
            lab.set_offset(7200)  # the daemon's store would end both at once
            time.sleep(1.0)
            lab.expect_live(made, "after +2h, running")
            made[C] = lab.ban(C, 30)  # made in the stepped clock
            t0 = time.monotonic()
            lab.attack(E)  # the policy's ban (bantime 30s), in the stepped clock too
            end = time.monotonic() + 10
            while E not in lab.kernel():
                assert time.monotonic() < end, lab.err.read_text()[-3000:]
                time.sleep(0.05)
            made[E] = (t0, time.monotonic(), 30)
            lab.set_offset(0)  # back: the store would keep all four 2 h too long
            time.sleep(1.0)
            lab.expect_live(made, "after -2h, running")
            lab.stop()
            lab.set_offset(7200)  # while stopped: the start would end every ban at once
            made[D] = lab.ban(D, 25)  # by hand while the daemon is down, in the new clock
            lab.start()
            lab.expect_live(made, "started after +2h")
            lab.stop()
            lab.set_offset(0)  # while stopped: the start would re-arm the kernel for 2 h more
            lab.start()
            lab.expect_live(made, "started after -2h")
            last = max(hi + secs for _lo, hi, secs in made.values())
            while time.monotonic() < last + CHECK + SLACK + 1 and len(watcher.gone) < 10:
                assert watcher.is_alive(), watcher.error
                time.sleep(0.2)
        finally:
            watcher.halt.set()
            if watcher.is_alive():
                watcher.join(10)
            lab.stop_all()
        err = lab.err.read_text()
        assert watcher.error is None, watcher.error
        assert not watcher.back, (watcher.back, err[-3000:])
        report = []
        for ip, (lo, hi, secs) in made.items():
            for where in ("store", "kernel"):
                gone = watcher.gone.get((ip, where))
                report.append((ip, where, secs, None if gone is None else round(gone - hi - secs, 2)))
                assert gone is not None, (ip, where, "never ended", report, err[-3000:])
                assert gone >= lo + secs - SLACK, (ip, where, "ended early", report, err[-3000:])
                assert gone <= hi + secs + CHECK + SLACK, (ip, where, "lingered", report, err[-3000:])
        print("seconds each ban ended after its time (address, where, length, end - (made + length)):", report)
        steps = [ln.split("sipguard.daemon: ", 1)[1] for ln in err.splitlines() if "the wall clock stepped" in ln]
        assert [s.split(" against")[0] for s in steps] == ["the wall clock stepped +2h00m00s",
                                                          "the wall clock stepped -2h00m00s"] * 2, steps
        assert ["while sipguard was stopped" in s for s in steps] == [False, False, True, True], steps
