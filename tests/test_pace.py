"""Paced following (sipguard/sources/pace.py): a steady stream of lines written one at a time goes out
in few batches, every line exactly once; the first line after a quiet spell, a backlog and `wake()`
are not held; during a stream the follower drops its inotify watches and arms them again at the
first poll that finds nothing (inotify, not the stat fallback, then wakes the next poll)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from sipguard.sources import FileFollower
from sipguard.sources.pace import Pacer


def _writer(path: Path, n: int, gap: float) -> threading.Thread:
    """Appends n numbered lines, one write() each, `gap` seconds apart (as rsyslog writes)."""
    def run() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            for i in range(n):
                os.write(fd, b"line %d\n" % i)
                time.sleep(gap)
        finally:
            os.close(fd)
    return threading.Thread(target=run, daemon=True)


def _drain(f: FileFollower, want: int, seconds: float = 20.0) -> tuple[list[bytes], int]:
    got: list[bytes] = []
    batches = 0
    end = time.monotonic() + seconds
    while len(got) < want and time.monotonic() < end:
        out = f.poll_batch(0.5)
        if out:
            batches += 1
            got += [ln.data for ln in out]
    return got, batches


def test_a_steady_stream_goes_out_in_few_batches_every_line_once(tmp_path: Path) -> None:
    p = tmp_path / "k.log"
    p.write_bytes(b"")
    n, gap = 1000, 0.002  # 2 s or more of one line per write (40 paced polls: a stall of the writer is no matter)
    with FileFollower([str(p)], stat_interval=5.0, batch_interval=0.05) as f:
        w = _writer(p, n, gap)
        t0 = time.monotonic()
        w.start()
        got, batches = _drain(f, n)
        took = time.monotonic() - t0
        w.join(10)
        assert got == [b"line %d" % i for i in range(n)]
        # unpaced, nearly every write was a batch of its own; paced, at most one per 50 ms (+ the first)
        assert batches <= took / 0.05 + 3, (batches, took)
        assert f.stats["streaming"] >= 1, f.stats  # the watches were dropped during the stream


def test_after_a_stream_inotify_wakes_the_next_line_at_once(tmp_path: Path) -> None:
    p = tmp_path / "k.log"
    p.write_bytes(b"")
    # the stat fallback far away: only inotify (armed again after the stream) can make the last line fast
    with FileFollower([str(p)], stat_interval=30.0, batch_interval=0.02) as f:
        w = _writer(p, 500, 0.002)
        w.start()
        got, _ = _drain(f, 500)
        w.join(10)
        assert len(got) == 500 and f.stats["streaming"] >= 1
        assert not f.poll_batch(0.1)  # a poll that finds nothing arms the watches again
        written: list[float] = []

        def late() -> None:
            time.sleep(0.3)
            with open(p, "ab") as fh:
                fh.write(b"late\n")
            written.append(time.monotonic())

        t = threading.Thread(target=late)
        t.start()
        out = f.poll_batch(10.0)
        done = time.monotonic()
        t.join()
        assert [ln.data for ln in out] == [b"late"]
        assert done - written[0] < 2.0  # inotify, not the 30 s stat fallback


def test_the_first_line_after_a_quiet_spell_is_not_held(tmp_path: Path) -> None:
    p = tmp_path / "k.log"
    p.write_bytes(b"")
    with FileFollower([str(p)], stat_interval=5.0, batch_interval=5.0) as f:
        with open(p, "ab") as fh:
            fh.write(b"one\n")
        t0 = time.monotonic()
        assert [ln.data for ln in f.poll_batch(10.0)] == [b"one"]
        assert time.monotonic() - t0 < 2.0  # the previous batch was never: nothing to wait for
        # a batch just went out: the next one waits for the interval, unless woken
        with open(p, "ab") as fh:
            fh.write(b"two\n")
        threading.Timer(0.2, f.wake).start()
        t0 = time.monotonic()
        out = f.poll_batch(10.0)
        assert time.monotonic() - t0 < 3.0  # wake() ended the 5 s hold
        assert [ln.data for ln in out] == [b"two"]


def test_a_backlog_is_read_without_pauses(tmp_path: Path) -> None:
    p = tmp_path / "k.log"
    p.write_bytes(b"".join(b"line %05d\n" % i for i in range(2000)))
    # read_budget: about 20 lines per poll, so 100 polls; paced they would take 100 x 1 s
    with FileFollower([str(p)], from_start=True, read_budget=200, batch_interval=1.0) as f:
        t0 = time.monotonic()
        got, batches = _drain(f, 2000, seconds=30)
        assert len(got) == 2000 and batches >= 50
        assert time.monotonic() - t0 < 5.0


def test_the_pacer_alone() -> None:
    with pytest.raises(ValueError):
        Pacer(-1)
    pc = Pacer(0.2)
    t0 = time.monotonic()
    pc.hold(t0 + 10)  # nothing handed out yet
    assert time.monotonic() - t0 < 0.1
    pc.handed(lines=True, backlog=False)
    t0 = time.monotonic()
    pc.hold(t0 + 10)
    assert 0.15 <= time.monotonic() - t0 < 2.0
    pc.handed(lines=True, backlog=False)
    t0 = time.monotonic()
    pc.hold(t0 + 0.01)  # never past the poll's own deadline
    assert time.monotonic() - t0 < 0.15
    pc.handed(lines=True, backlog=True)  # more waiting: at once
    t0 = time.monotonic()
    pc.hold(t0 + 10)
    assert time.monotonic() - t0 < 0.1
    pc.handed(lines=False, backlog=False)  # an empty poll: the next lines at once
    t0 = time.monotonic()
    pc.hold(t0 + 10)
    assert time.monotonic() - t0 < 0.1
    pc.handed(lines=True, backlog=False)
    pc.poke()
    t0 = time.monotonic()
    pc.hold(t0 + 10)
    assert time.monotonic() - t0 < 0.1
