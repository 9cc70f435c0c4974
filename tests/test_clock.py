"""Steps of the wall clock (sipguard/clock.py, `BanBook.clock_stepped`, the daemon's `watch_clock` and
`clock_at_start`): a ban of N seconds lasts N seconds of real time whatever the wall clock does.

The unit tests drive a `ClockWatch` with a fake wall clock and a fake monotonic clock over the
dry-run enforcer and a store in a temp directory. The last test runs the real daemon and CLI with the
ipset backend in an `sge-` network namespace under libfaketime (Debian's `faketime`): the wall clock
of both is moved through a timestamp file (FAKETIME_NO_CACHE=1), the monotonic clock stays real
(DONT_FAKE_MONOTONIC=1); the clock is stepped 2 h forward and back while bans are active, with the
daemon running and while it is stopped, and every ban must end on real time in the store and in the
kernel.
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
