"""Source stage: every complete line exactly once, through appends, rotations and restarts."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sipguard.model import Line
from sipguard.sources import FileFollower, SourcePosition, read_chunks, read_file
from sipguard.sources.identity import digest

WAIT = 10.0  # generous deadline for anything expected; success returns as soon as it is there


def collect(
    f: FileFollower,
    until: Callable[[list[Line]], bool],
    timeout: float = WAIT,
    got: list[Line] | None = None,
) -> list[Line]:
    """Poll until `until(lines)` holds or the deadline passes; returns everything received."""
    got = [] if got is None else got
    deadline = time.monotonic() + timeout
    while not until(got) and time.monotonic() < deadline:
        got.extend(f.poll(0.05))
    return got


def wait_for(cond: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def datas(lines: list[Line]) -> list[bytes]:
    return [ln.data for ln in lines]


def numbers(lines: list[Line]) -> list[int]:
    return [int(ln.data.split(b" ")[1]) for ln in lines]


def numbered(i: int) -> bytes:
    return b"line %d padding-to-look-like-a-log-record\n" % i


# ---------------------------------------------------------------- basics


def test_partial_line_waits_for_its_newline(tmp_path: Path) -> None:
    p = tmp_path / "k.log"
    p.write_bytes(b"")
    with FileFollower([str(p)]) as f, open(p, "ab", buffering=0) as w:
        w.write(b"first half, ")
        assert f.poll(0.2) == []
        w.write(b"second half\nnext")
        got = collect(f, lambda g: len(g) >= 1)
        assert datas(got) == [b"first half, second half"]
        assert got[0].offset == len(b"first half, second half\n")
        assert f.poll(0.1) == []
        w.write(b"\n")
        got = collect(f, lambda g: len(g) >= 1)
        assert datas(got) == [b"next"]
        assert f.positions()[str(p)].offset == p.stat().st_size


def test_starts_at_end_of_existing_file_unless_from_start(tmp_path: Path) -> None:
    p = tmp_path / "k.log"
    p.write_bytes(b"old 1\nold 2\n")
    with FileFollower([str(p)]) as f:
        with open(p, "ab") as w:
            w.write(b"new 1\n")
        assert datas(collect(f, lambda g: len(g) >= 1)) == [b"new 1"]
        assert f.poll(0.1) == []
    with FileFollower([str(p)], from_start=True) as f:
        assert datas(collect(f, lambda g: len(g) >= 3)) == [b"old 1", b"old 2", b"new 1"]


def test_line_in_progress_at_start_is_read_whole(tmp_path: Path) -> None:
    p = tmp_path / "k.log"
    p.write_bytes(b"old\nhalf ")
    with FileFollower([str(p)]) as f:
        with open(p, "ab") as w:
            w.write(b"done\n")
        assert datas(collect(f, lambda g: len(g) >= 1)) == [b"half done"]


def test_poll_wakes_promptly_on_append(tmp_path: Path) -> None:
    p = tmp_path / "k.log"
    p.write_bytes(b"")
    written: list[float] = []

    def append() -> None:
        time.sleep(0.2)
        with open(p, "ab") as w:
            w.write(b"hello\n")
        written.append(time.monotonic())

    # stat fallback set far away: only the inotify wake-up can make this fast
    with FileFollower([str(p)], stat_interval=5.0) as f:
        t = threading.Thread(target=append)
        t.start()
        got = f.poll(8.0)
        done = time.monotonic()
        t.join()
        assert datas(got) == [b"hello"]
        assert done - written[0] < 2.5


def test_crlf_and_binary_pass_through(tmp_path: Path) -> None:
    p = tmp_path / "k.log"
    p.write_bytes(b"")
    with FileFollower([str(p)]) as f:
        with open(p, "ab") as w:
            w.write(b"a\r\nb\r\r\n\r\n\xff\xfe\x00bin\n\n")
        got = collect(f, lambda g: len(g) >= 5)
        assert datas(got) == [b"a", b"b\r", b"", b"\xff\xfe\x00bin", b""]
        assert [ln.offset for ln in got] == [3, 7, 9, 16, 17]


def test_missing_file_is_waited_for_and_read_from_start(tmp_path: Path) -> None:
    p = tmp_path / "k.log"
    with FileFollower([str(p)]) as f:
        assert f.poll(0.1) == []
        assert f.stats["missing"] == 1
        assert f.positions()[str(p)] == SourcePosition(str(p), 0, 0, 0)
        p.write_bytes(b"one\ntwo\n")
        assert datas(collect(f, lambda g: len(g) >= 2)) == [b"one", b"two"]


def test_missing_directory_is_waited_for(tmp_path: Path) -> None:
    p = tmp_path / "later" / "k.log"
    with FileFollower([str(p)], stat_interval=0.2) as f:
        assert f.poll(0.1) == []
        p.parent.mkdir()
        p.write_bytes(b"one\n")
        assert datas(collect(f, lambda g: len(g) >= 1)) == [b"one"]
        with open(p, "ab") as w:  # and it is watched now
            w.write(b"two\n")
        assert datas(collect(f, lambda g: len(g) >= 1)) == [b"two"]


def test_two_files_at_once(tmp_path: Path) -> None:
    a = tmp_path / "a.log"
    (tmp_path / "sub").mkdir()
    b = tmp_path / "sub" / "b.log"
    a.write_bytes(b"")
    with FileFollower([str(a), str(b)]) as f, open(a, "ab", buffering=0) as wa:
        for i in range(50):
            wa.write(b"a %d\n" % i)
            with open(b, "ab") as wb:
                wb.write(b"b %d\n" % i)
        got = collect(f, lambda g: len(g) >= 100)
        by = Counter(ln.source for ln in got)
        assert by == {str(a): 50, str(b): 50}
        for src, tag in ((str(a), b"a"), (str(b), b"b")):
            assert [ln.data for ln in got if ln.source == src] == [b"%s %d" % (tag, i) for i in range(50)]
        assert set(f.positions()) == {str(a), str(b)}


def test_read_budget_bounds_one_poll(tmp_path: Path) -> None:
    p = tmp_path / "k.log"
    p.write_bytes(b"".join(numbered(i) for i in range(20000)))
    with FileFollower([str(p)], from_start=True, read_budget=64 << 10) as f:
        first = f.poll(0)
        assert 0 < sum(len(ln.data) + 1 for ln in first) <= 64 << 10
        got = collect(f, lambda g: len(g) >= 20000, got=list(first))
        assert numbers(got) == list(range(20000))


def test_too_long_lines_are_counted_and_skipped(tmp_path: Path) -> None:
    p = tmp_path / "k.log"
    p.write_bytes(b"")
    big = b"x" * ((1 << 20) + 100)
    with FileFollower([str(p)]) as f, open(p, "ab", buffering=0) as w:
        w.write(b"before\n")
        assert datas(collect(f, lambda g: len(g) >= 1)) == [b"before"]
        # written in pieces with polls in between: the follower must drop, not buffer, it
        for k in range(0, len(big), 256 << 10):
            w.write(big[k : k + (256 << 10)])
            assert f.poll(0.01) == []
        w.write(b"\nafter\n" + big + b"\nlast\n")  # and one that arrives whole
        got = collect(f, lambda g: len(g) >= 2)
        assert datas(got) == [b"after", b"last"]
        assert f.stats["too_long"] == 2
        assert got[-1].offset == p.stat().st_size
        assert f.positions()[str(p)].offset == p.stat().st_size


def test_permission_error_is_counted_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "k.log"
    p.write_bytes(b"")
    real_open = os.open
    deny = threading.Event()
    deny.set()

    def fake_open(path, flags, *a, **k):  # type: ignore[no-untyped-def]
        if deny.is_set() and os.fspath(path) == str(p):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", fake_open)
    with FileFollower([str(p)], stat_interval=0.1) as f:
        assert f.poll(0.1) == []
        assert f.stats["permission_denied"] == 1
        with open(p, "ab") as w:
            w.write(b"one\n")
        deny.clear()
        with open(p, "ab") as w:
            w.write(b"two\n")
        # it existed at start: what was appended since start() is delivered once readable
        assert datas(collect(f, lambda g: len(g) >= 2)) == [b"one", b"two"]


# ---------------------------------------------------------------- rotation


def test_rename_create_rotation_with_concurrent_writer(tmp_path: Path) -> None:
    p = tmp_path / "kamailio.log"
    p.write_bytes(b"")
    n = 3000
    rotate_at = {700, 1500, 2300}
    f = FileFollower([str(p)])
    f.start()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            w = open(p, "ab", buffering=0)
            i = 0
            rotations = 0
            while i < n:
                if i in rotate_at:
                    if os.path.exists(f"{p}.1"):
                        os.rename(f"{p}.1", f"{p}.2")
                    os.rename(p, f"{p}.1")
                    for _ in range(3):  # old fd, after the rename, before the new file
                        w.write(numbered(i))
                        i += 1
                    new = open(p, "ab", buffering=0)
                    for _ in range(2):  # old fd, after the new file appeared
                        w.write(numbered(i))
                        i += 1
                    w.close()
                    w = new
                    rotations += 1
                    # a rotation the follower never saw would be invisible to any tail tool
                    assert wait_for(lambda r=rotations: f.stats["rotations"] >= r)
                w.write(numbered(i))
                i += 1
                if i % 50 == 0:
                    time.sleep(0.001)
            w.close()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        got = collect(f, lambda g: len(g) >= n, timeout=30)
        t.join(WAIT)
        assert not errors
        got.extend(f.poll(0.2))  # nothing extra may come
        nums = numbers(got)
        assert len(nums) == n, f"{len(nums)} lines, {len(set(nums))} distinct"
        assert set(nums) == set(range(n))
        assert f.stats["rotations"] == len(rotate_at)
        pos = f.positions()[str(p)]
        assert (pos.dev, pos.inode, pos.offset) == (p.stat().st_dev, p.stat().st_ino, p.stat().st_size)
    finally:
        f.close()


def test_copytruncate_with_concurrent_writer(tmp_path: Path) -> None:
    p = tmp_path / "kamailio.log"
    p.write_bytes(b"")
    n = 2000
    truncate_at = {500, 1100, 1600}
    f = FileFollower([str(p)])
    f.start()
    got: list[Line] = []
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            w = open(p, "ab", buffering=0)  # O_APPEND, as a logger used with copytruncate must
            k = 0
            for i in range(n):
                if i in truncate_at:
                    k += 1
                    # the writer pauses around copy+truncate (lines written in between are
                    # lost for every reader), and the reader has caught up before it
                    assert wait_for(lambda i=i: len(got) >= i)
                    shutil.copyfile(p, f"{p}.1")
                    os.truncate(p, 0)
                    assert wait_for(lambda k=k: f.stats["truncations"] >= k)
                w.write(numbered(i))
                if i % 50 == 0:
                    time.sleep(0.001)
            w.close()
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        collect(f, lambda g: len(g) >= n, timeout=30, got=got)
        t.join(WAIT)
        assert not errors
        got.extend(f.poll(0.2))
        assert numbers(got) == list(range(n))
        assert f.stats["truncations"] == len(truncate_at)
    finally:
        f.close()


def test_delete_and_recreate(tmp_path: Path) -> None:
    p = tmp_path / "k.log"
    p.write_bytes(b"")
    with FileFollower([str(p)]) as f:
        with open(p, "ab") as w:
            w.writelines(numbered(i) for i in range(10))
        os.unlink(p)
        with open(p, "ab") as w:
            w.writelines(numbered(i) for i in range(10, 20))
        got = collect(f, lambda g: len(g) >= 20)
        assert numbers(got) == list(range(20))
        # and again, after it was seen missing for a while
        os.unlink(p)
        assert f.poll(0.2) == []
        p.write_bytes(numbered(20))
        got = collect(f, lambda g: len(g) >= 1)
        assert numbers(got) == [20]
        assert f.stats["rotations"] >= 1


def test_deleted_file_is_released(tmp_path: Path) -> None:
    p = tmp_path / "k.log"
    p.write_bytes(b"")
    with FileFollower([str(p)], rotate_grace=0.1, stat_interval=0.1) as f:
        with open(p, "ab") as w:
            w.write(b"a\n")
        collect(f, lambda g: len(g) >= 1)
        os.unlink(p)
        # the fd on the deleted file is closed (its disk space freed) and the position says
        # "read whatever appears next from its start"
        collect(f, lambda g: f.positions()[str(p)] == SourcePosition(str(p), 0, 0, 0))
        assert f.positions()[str(p)] == SourcePosition(str(p), 0, 0, 0)
        p.write_bytes(b"b\n")
        assert datas(collect(f, lambda g: len(g) >= 1)) == [b"b"]
        assert f.stats["reopen"] == 1


def test_rotated_old_file_drained_before_new(tmp_path: Path) -> None:
    p = tmp_path / "k.log"
    p.write_bytes(b"")
    with FileFollower([str(p)], rotate_grace=0.3) as f, open(p, "ab", buffering=0) as old:
        old.write(b"a\n")
        assert datas(collect(f, lambda g: len(g) >= 1)) == [b"a"]
        os.rename(p, f"{p}.1")
        p.write_bytes(b"new\n")
        old.write(b"b\n")
        assert datas(collect(f, lambda g: len(g) >= 1)) == [b"b"]
        old.write(b"c\n")  # still inside the grace period
        got = collect(f, lambda g: len(g) >= 2)
        assert datas(got) == [b"c", b"new"]


# ---------------------------------------------------------------- restarts


def test_restart_resumes_exactly(tmp_path: Path) -> None:
    p = tmp_path / "k.log"
    p.write_bytes(b"")
    n = 1000
    f = FileFollower([str(p)])
    f.start()
    started = threading.Event()

    def writer() -> None:
        with open(p, "ab", buffering=0) as w:
            for i in range(n):
                w.write(numbered(i)[:10])  # split lines across writes
                w.write(numbered(i)[10:])
                if i == 10:
                    started.set()
                if i % 20 == 0:
                    time.sleep(0.001)

    t = threading.Thread(target=writer)
    t.start()
    assert started.wait(WAIT)
    first = collect(f, lambda g: len(g) >= 100)
    saved = f.positions()
    f.close()
    t.join(WAIT)
    assert saved[str(p)].offset == first[-1].offset
    with FileFollower([str(p)], positions=saved) as f2:
        rest = collect(f2, lambda g: len(first) + len(g) >= n)
        rest.extend(f2.poll(0.1))
    assert numbers(first) + numbers(rest) == list(range(n))


def test_restart_after_rotation_while_down(tmp_path: Path) -> None:
    p = tmp_path / "kamailio.log"
    p.write_bytes(b"".join(numbered(i) for i in range(5)))
    with FileFollower([str(p)], from_start=True) as f:
        assert numbers(collect(f, lambda g: len(g) >= 5)) == list(range(5))
        saved = f.positions()
    with open(p, "ab") as w:
        w.writelines(numbered(i) for i in range(5, 10))
    os.rename(p, f"{p}.1")
    (tmp_path / "kamailio.log.other").write_bytes(b"junk\n")
    p.write_bytes(b"".join(numbered(i) for i in range(10, 15)))
    with FileFollower([str(p)], positions=saved, rotate_grace=0.2) as f:
        got = collect(f, lambda g: len(g) >= 10)
        got.extend(f.poll(0.3))
        assert numbers(got) == list(range(5, 15))
        assert f.stats["rotations"] == 1


def test_restart_after_two_rotations_while_down(tmp_path: Path) -> None:
    p = tmp_path / "kamailio.log"
    p.write_bytes(b"".join(numbered(i) for i in range(3)))
    with FileFollower([str(p)], from_start=True) as f:
        collect(f, lambda g: len(g) >= 3)
        saved = f.positions()
    with open(p, "ab") as w:
        w.write(numbered(3))
    os.rename(p, f"{p}.1")
    p.write_bytes(numbered(4))
    os.rename(f"{p}.1", f"{p}.2")
    os.rename(p, f"{p}.1")
    p.write_bytes(numbered(5))
    with FileFollower([str(p)], positions=saved, rotate_grace=0.1) as f:
        got = collect(f, lambda g: len(g) >= 3)
        got.extend(f.poll(0.3))
        assert numbers(got) == [3, 4, 5]


def test_restart_with_truncated_or_vanished_file(tmp_path: Path) -> None:
    p = tmp_path / "k.log"
    p.write_bytes(b"one\ntwo\n")
    with FileFollower([str(p)], from_start=True) as f:
        collect(f, lambda g: len(g) >= 2)
        saved = f.positions()
    p.write_bytes(b"x\n")  # same inode, shorter: truncated while down
    with FileFollower([str(p)], positions=saved) as f:
        assert datas(collect(f, lambda g: len(g) >= 1)) == [b"x"]
        assert f.stats["truncations"] == 1
        saved = f.positions()
    os.unlink(p)
    p.write_bytes(b"fresh\n")  # saved file gone without a trace: the new one from 0
    with FileFollower([str(p)], positions=saved) as f:
        assert datas(collect(f, lambda g: len(g) >= 1)) == [b"fresh"]
        assert f.stats["lost_rotated"] == 1


def test_restart_when_file_was_missing(tmp_path: Path) -> None:
    p = tmp_path / "k.log"
    with FileFollower([str(p)]) as f:
        f.poll(0)
        saved = f.positions()
    p.write_bytes(b"created while we were down\n")
    with FileFollower([str(p)], positions=saved) as f:
        assert datas(collect(f, lambda g: len(g) >= 1)) == [b"created while we were down"]


def test_positions_survive_close(tmp_path: Path) -> None:
    p = tmp_path / "k.log"
    p.write_bytes(b"a\n")
    f = FileFollower([str(p)], from_start=True)
    f.start()
    collect(f, lambda g: len(g) >= 1)
    f.close()
    st_ = p.stat()
    fp = digest(b"a\n")  # the fingerprint of the bytes before the offset (all of them, here)
    assert f.positions() == {str(p): SourcePosition(str(p), st_.st_dev, st_.st_ino, 2, fp, fp)}


# ---------------------------------------------------------------- property


def _expected(data: bytes, max_line: int) -> list[bytes]:
    end = data.rfind(b"\n") + 1
    out = []
    for ln in data[:end].split(b"\n")[:-1]:
        if len(ln) <= max_line:
            out.append(ln[:-1] if ln.endswith(b"\r") else ln)
    return out


_chunks = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"a", b"\n").replace(b"b", b"\r")),
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=_chunks, max_line=st.sampled_from([1, 8, 32, 1 << 20]))
def test_property_follow_appends(pieces: list[bytes], max_line: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.log")
        open(p, "wb").close()
        got: list[Line] = []
        with FileFollower([p], max_line=max_line) as f, open(p, "ab", buffering=0) as w:
            for piece in pieces:
                w.write(piece)
                got.extend(f.poll(0))
            got.extend(f.poll(0))
        data = b"".join(pieces)
        assert datas(got) == _expected(data, max_line)
        for ln in got:
            assert data[ln.offset - 1 : ln.offset] == b"\n"
        last_nl = data.rfind(b"\n") + 1
        assert f.positions()[p].offset == last_nl


@settings(max_examples=100, deadline=None)
@given(
    data=st.binary(max_size=400).map(lambda b: b.replace(b"a", b"\n").replace(b"b", b"\r")),
    max_line=st.sampled_from([1, 5, 40]),
    chunk=st.sampled_from([1, 3, 64, 1 << 20]),
)
def test_property_read_file_and_chunks(data: bytes, max_line: int, chunk: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.log")
        with open(p, "wb") as w:
            w.write(data)
        expected = _expected(data, max_line)
        tail = data[data.rfind(b"\n") + 1 :]
        if tail and len(tail) <= max_line:
            expected.append(tail[:-1] if tail.endswith(b"\r") else tail)
        lines = list(read_file(p, max_line=max_line, chunk_size=chunk))
        assert datas(lines) == expected
        chunks = list(read_chunks(p, chunk_size=chunk, max_line=max_line))
        assert all(c.endswith(b"\n") for c in chunks[:-1])
        assert datas(_lines_of(chunks)) == expected


def _lines_of(chunks: list[bytes]) -> list[Line]:
    out = []
    for c in chunks:
        parts = c.split(b"\n")
        if parts[-1] == b"":
            parts.pop()
        out += [Line("", q[:-1] if q.endswith(b"\r") else q, 0) for q in parts]
    return out


# ---------------------------------------------------------------- offline


@pytest.mark.parametrize(
    ("suffix", "opener"),
    [("", open), (".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open)],
)
def test_read_file_decompresses(tmp_path: Path, suffix: str, opener) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / f"kamailio.log{suffix}"
    body = b"".join(numbered(i) for i in range(5000)) + b"crlf\r\n" + b"y" * 100 + b"\nno newline"
    with opener(p, "wb") as w:
        w.write(body)
    stats: Counter[str] = Counter()
    lines = list(read_file(str(p), max_line=99, stats=stats, chunk_size=4096))
    assert numbers(lines[:5000]) == list(range(5000))
    assert datas(lines[5000:]) == [b"crlf", b"no newline"]
    assert stats["too_long"] == 1
    assert lines[4999].offset == body.index(b"crlf")
    assert lines[-1].offset == len(body)
    assert b"".join(read_chunks(str(p), chunk_size=4096, max_line=99)) == body.replace(b"y" * 100 + b"\n", b"")


def test_read_file_truncated_gz_yields_what_it_can(tmp_path: Path) -> None:
    p = tmp_path / "kamailio.log.2.gz"
    body = b"".join(numbered(i) for i in range(20000))
    blob = gzip.compress(body)
    p.write_bytes(blob[: len(blob) * 3 // 4])  # logrotate still compressing it
    stats: Counter[str] = Counter()
    nums = numbers(list(read_file(str(p), stats=stats)))
    assert stats["errors"] == 1
    assert 0 < len(nums) < 20000 and nums == list(range(len(nums)))


def test_read_file_missing_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(read_file(str(tmp_path / "nope.gz")))


# ---------------------------------------------------------------- identity by content


def fixed(i: int) -> bytes:
    """Lines of one length, so a truncated file that grew back has a newline at the old offset."""
    return b"line %06d padding-to-look-like-a-log-record\n" % i


def fixed_numbers(lines: list[Line]) -> list[int]:
    return [int(ln.data.split(b" ")[1]) for ln in lines]


def _copytruncate(p: Path, copy: Path, compress: bool = False) -> None:
    shutil.copyfile(p, copy)
    os.truncate(p, 0)
    if compress:
        with open(copy, "rb") as src, gzip.open(f"{copy}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.unlink(copy)


@pytest.mark.parametrize("copy", ["k.log.1", "k.log-20250101", "k.log.1.gz"])
@pytest.mark.parametrize("grow_back", [False, True])
def test_copytruncate_under_lag_reads_the_unread_rest_from_the_copy(tmp_path: Path, copy: str,
                                                                     grow_back: bool) -> None:
    p = tmp_path / "k.log"
    p.write_bytes(b"")
    with FileFollower([str(p)], rotate_grace=0.1) as f, open(p, "ab", buffering=0) as w:
        for i in range(100):
            w.write(fixed(i))
        got = collect(f, lambda g: len(g) >= 100)
        for i in range(100, 300):  # not read yet: the follower lags
            w.write(fixed(i))
        _copytruncate(p, tmp_path / copy.removesuffix(".gz"), compress=copy.endswith(".gz"))
        more = 400 if grow_back else 50  # past the old offset (300 lines) or not
        for i in range(300, 300 + more):
            w.write(fixed(i))
        got = collect(f, lambda g: len(g) >= 300 + more, got=got)
        got.extend(f.poll(0.3))
        assert fixed_numbers(got) == list(range(300 + more))
        assert f.stats["truncations"] == 1 and f.stats["copies"] == 1
        assert f.stats["rewritten"] == (1 if grow_back else 0)
        pos = f.positions()[str(p)]
        assert (pos.inode, pos.offset) == (p.stat().st_ino, p.stat().st_size)


def test_grow_back_without_a_copy_is_noticed_and_read_from_the_start(tmp_path: Path) -> None:
    p = tmp_path / "k.log"
    p.write_bytes(b"")
    with FileFollower([str(p)]) as f, open(p, "ab", buffering=0) as w:
        for i in range(100):
            w.write(fixed(i))
        assert len(collect(f, lambda g: len(g) >= 100)) == 100
        os.truncate(p, 0)
        for i in range(100, 250):
            w.write(fixed(i))
        got = collect(f, lambda g: len(g) >= 150)
        assert fixed_numbers(got) == list(range(100, 250))
        assert f.stats["truncations"] == 1 and f.stats["rewritten"] == 1 and f.stats["copies"] == 0


@pytest.mark.parametrize("kind", ["create", "copytruncate", "compress", "delaycompress", "dateext",
                                  "copytruncate-compress"])
def test_restart_after_each_rotation_kind(tmp_path: Path, kind: str) -> None:
    p = tmp_path / "k.log"
    p.write_bytes(b"".join(fixed(i) for i in range(100)))
    with FileFollower([str(p)], from_start=True) as f:
        assert len(collect(f, lambda g: len(g) >= 100)) == 100
        saved = f.positions()
    with open(p, "ab") as w:  # written while down, before the rotation
        w.writelines(fixed(i) for i in range(100, 200))
    old = tmp_path / ("k.log-20250101" if kind == "dateext" else "k.log.1")
    if kind.startswith("copytruncate"):
        _copytruncate(p, old, compress=kind.endswith("compress"))
    else:
        os.rename(p, old)
        if kind == "compress":
            with open(old, "rb") as src, gzip.open(f"{old}.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.unlink(old)
    with open(p, "ab") as w:  # after it: as many lines again, so the new file reaches the old offset
        w.writelines(fixed(i) for i in range(200, 400))
    with FileFollower([str(p)], positions=saved, rotate_grace=0.1) as f:
        got = collect(f, lambda g: len(g) >= 300)
        got.extend(f.poll(0.3))
        assert fixed_numbers(got) == list(range(100, 400))
        assert f.stats["lost_rotated"] == 0


def test_restart_with_a_position_saved_before_fingerprints(tmp_path: Path) -> None:
    p = tmp_path / "k.log"
    p.write_bytes(b"".join(fixed(i) for i in range(10)))
    st_ = p.stat()
    legacy = {str(p): SourcePosition(str(p), st_.st_dev, st_.st_ino, 5 * len(fixed(0)))}
    with open(p, "ab") as w:
        w.write(fixed(10))
    os.rename(p, f"{p}.1")
    p.write_bytes(fixed(11))
    with FileFollower([str(p)], positions=legacy, rotate_grace=0.1) as f:
        got = collect(f, lambda g: len(g) >= 7)
        got.extend(f.poll(0.3))
        assert fixed_numbers(got) == list(range(5, 12))
        assert f.positions()[str(p)].head  # saved with a fingerprint from now on
