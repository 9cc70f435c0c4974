"""Files: complete lines out of Kamailio's log files, live (FileFollower) or offline (read_file,
read_chunks).

Never loses or repeats a line across appends, rotation, copytruncate, deletion or a restart, and
never dies on what a file contains: bytes go out undecoded, over-long lines are counted and skipped.
Knows nothing of log formats, filters or the store: the caller persists `positions()`.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
import os
import stat
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # watchdog is imported when a follower starts: `scan` and friends never pay for it
    from watchdog.events import FileSystemEvent
    from watchdog.observers import Observer

from ..model import Line
from .lines import CHUNK, MAX_LINE, LineBatch, SourcePosition, _Cutter, _to_lines

log = logging.getLogger("sipguard.sources")

#: Counters every FileFollower.stats starts with (all 0), so a status page can list them.
STAT_KEYS = (
    "lines",  # lines returned by poll()
    "bytes",  # bytes read from files (skipped ones included)
    "too_long",  # lines longer than max_line: counted, skipped
    "rotations",  # a different file (inode) replaced the one we were reading
    "truncations",  # a file got shorter than our offset (copytruncate): restarted at 0
    "reopen",  # a path was opened again after its first open
    "missing",  # a path was found absent (at start or after having been present)
    "permission_denied",  # open/stat refused; retried every stat interval
    "errors",  # any other OSError while reading; retried
    "unterminated",  # final partial line of a rotated-away file, delivered as is
    "lost_rotated",  # saved position's file not found on restart: its unread rest is lost
)



# --------------------------------------------------------------------------- offline reading

_DECOMPRESS: dict[str, Callable[..., Any]] = {
    ".gz": gzip.open,
    ".bz2": bz2.open,
    ".xz": lzma.open,
    ".lzma": lzma.open,
}
#: What a truncated (being compressed right now) or corrupt compressed file raises.
_DECOMPRESS_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError)


def _raw_reads(path: str, chunk_size: int, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """Big reads of a plain file; of a compressed one (by extension) its decompressed data.

    Compressed data comes from read1() pieces gathered up to chunk_size, so a truncated or
    corrupt archive still yields everything before the damage (then warns and stops, counted
    by the caller as an error) instead of losing the last chunk.
    """
    opener = _DECOMPRESS.get(os.path.splitext(path)[1].lower())
    if opener is None:
        with open(path, "rb", buffering=0) as f:
            read = f.read
            if start:
                f.seek(start)
            left = -1 if end is None else end - start  # a byte range of a plain file (parallel scan)
            while left and (data := read(chunk_size if left < 0 else min(chunk_size, left))):
                left -= len(data) if left > 0 else 0
                yield data
        return
    if start or end is not None:
        raise ValueError("byte ranges are for plain files only")
    with opener(path, "rb") as z:
        read1 = z.read1
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                piece = read1(chunk_size - size)
            except _DECOMPRESS_ERRORS:
                if parts:
                    yield b"".join(parts)  # what came before the damage, then the error
                raise
            if not piece:
                break
            parts.append(piece)
            size += len(piece)
            if size >= chunk_size:
                yield b"".join(parts)
                parts, size = [], 0
        if parts:
            yield b"".join(parts)


def _segments(
    path: str, chunk_size: int, max_line: int, stats: Counter[str], start: int = 0, end: int | None = None
) -> Iterator[tuple[int, bytes]]:
    """Contiguous (offset, bytes) pieces of the (decompressed) file, cut at line boundaries.

    `start`/`end` select a byte range of a plain file; `start` must begin a line."""
    cutter = _Cutter(max_line, start, stats)
    reads = _raw_reads(path, chunk_size, start, end)
    while True:
        try:
            data = next(reads)
        except StopIteration:
            break
        except _DECOMPRESS_ERRORS as e:
            if isinstance(e, OSError) and not isinstance(e, gzip.BadGzipFile) and e.errno:
                raise  # a real I/O error (missing file, permissions): the caller reports it
            stats["errors"] += 1
            log.warning("%s: damaged or truncated compressed data after byte %d: %s", path, cutter.pos, e)
            return  # the cut-off last line is not a line
        stats["bytes"] += len(data)
        yield from cutter.feed(data)
    tail = cutter.tail()
    if tail is not None:
        yield tail


def read_chunks(
    path: str,
    *,
    chunk_size: int = CHUNK,
    max_line: int = MAX_LINE,
    stats: Counter[str] | None = None,
    start: int = 0,
    end: int | None = None,
) -> Iterator[bytes]:
    """Yield big pieces of a whole file (or of the byte range [start, end) of a plain file, start
    at a line's beginning), each ending at a line boundary, for bulk scanners.

    Lets a scanner run one regex over megabytes instead of a Python call per line. Pieces hold raw lines (newline and any CR included) and never a line longer than
    max_line (those are dropped and counted in stats["too_long"]); only the last piece may lack
    a final newline, when the file does. Compressed files are decompressed.
    """
    for _off, seg in _segments(path, chunk_size, max_line, stats if stats is not None else Counter(), start, end):
        yield seg


def read_file(
    path: str,
    *,
    max_line: int = MAX_LINE,
    chunk_size: int = CHUNK,
    stats: Counter[str] | None = None,
) -> Iterator[Line]:
    """Yield every line of a whole file (offline scan), decompressing .gz/.bz2/.xz.

    Same rules as the follower (newline and one trailing CR stripped, lines > max_line counted
    in stats["too_long"] and skipped), except that a final line without newline is yielded too:
    the file is complete. Offsets are in the decompressed data. A truncated or corrupt
    compressed file yields its intact lines, then warns and counts stats["errors"]; a file that
    cannot be opened raises OSError.
    """
    st = stats if stats is not None else Counter()
    out: list[Line] = []
    for seg in _segments(path, chunk_size, max_line, st):
        _to_lines(path, [seg], out)
        st["lines"] += len(out)
        yield from out
        out.clear()


# --------------------------------------------------------------------------- following


class _Reader:
    """One open file (by fd, so it survives renames) and how far we have read it."""

    __slots__ = ("fd", "dev", "ino", "cutter", "last_data", "successor_seen")

    def __init__(self, fd: int, st: os.stat_result, cutter: _Cutter) -> None:
        self.fd = fd
        self.dev = st.st_dev
        self.ino = st.st_ino
        self.cutter = cutter
        self.last_data = time.monotonic()
        self.successor_seen: float | None = None  # when a newer file appeared at the path

    @property
    def ident(self) -> tuple[int, int]:
        return (self.dev, self.ino)

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1


class _Follow:
    """State of one followed path: the file being read and newer files queued behind it.

    Files are read strictly one after the other (old to end, then the next), so a single
    (dev, inode, offset) is always enough to resume exactly.
    """

    def __init__(self, path: str, saved: SourcePosition | None) -> None:
        self.path = path
        self.saved = saved
        self.reader: _Reader | None = None
        self.queue: list[_Reader] = []
        self.checked = False  # first stat done
        # existed at start (and no from_start): read only what comes after (ident, size) then
        self.start_at: tuple[tuple[int, int], int] | None = None
        self.opened = False
        self.missing = False
        self.denied = False
        self.failing = False

    def readers(self) -> list[_Reader]:
        return ([self.reader] if self.reader else []) + self.queue

    def close(self) -> None:
        """Close the files but keep their identities and offsets for positions()."""
        for r in self.readers():
            r.close()


def _wake_handler(follower: FileFollower, directory: str, names: tuple[str, ...]) -> object:
    """A watchdog handler that wakes poll() on events touching a followed name (or its rotations)."""
    from watchdog.events import FileSystemEventHandler

    class _Wake(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            if event.is_directory:
                if os.fsdecode(event.src_path) == directory:
                    follower._dir_gone(directory)
                return
            for p in (event.src_path, getattr(event, "dest_path", "")):
                if p and os.path.basename(os.fsdecode(p)).startswith(names):
                    follower._wake.set()
                    return

    return _Wake()


def _watched_events() -> list[type]:
    from watchdog.events import (
        DirDeletedEvent, DirMovedEvent, FileClosedEvent, FileCreatedEvent, FileDeletedEvent,
        FileModifiedEvent, FileMovedEvent,
    )

    return [FileCreatedEvent, FileDeletedEvent, FileModifiedEvent, FileMovedEvent, FileClosedEvent,
            DirDeletedEvent, DirMovedEvent]


class FileFollower:
    """Follows several log files at once and hands out their complete lines exactly once.

    Woken by inotify (watchdog watching the parent directories) and, as a safety net, by a
    stat every `stat_interval` seconds. Use from one thread: ``start()``, then ``poll()`` in a
    loop; after processing each batch persist ``positions()``; ``close()`` at the end. On a
    restart pass the persisted positions back in.
    """

    def __init__(
        self,
        paths: list[str],
        positions: dict[str, SourcePosition] | None = None,
        from_start: bool = False,
        max_line: int = MAX_LINE,
        *,
        rotate_grace: float = 2.0,
        stat_interval: float = 1.0,
        read_budget: int = CHUNK,
    ) -> None:
        self.paths = list(dict.fromkeys(os.path.abspath(p) for p in paths))
        self._names = {os.path.abspath(p): p for p in paths}  # absolute -> as given
        saved = {os.path.abspath(k): v for k, v in (positions or {}).items()}
        self._follows = [_Follow(p, saved.get(p)) for p in self.paths]
        self.from_start = from_start
        self.max_line = max_line
        self.rotate_grace = rotate_grace
        self.stat_interval = stat_interval
        self.read_budget = read_budget
        self.stats: Counter[str] = Counter({k: 0 for k in STAT_KEYS})
        self._wake = threading.Event()
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._watches: dict[str, tuple[object, tuple[int, int]]] = {}  # dir -> (watch, dir ident)
        self._dead_dirs: set[str] = set()
        self._lock = threading.Lock()
        self._next_dir_check = 0.0
        self._watch_failed = False
        self._rr = 0  # round-robin start, so one busy file cannot starve the others
        self._started = False
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Watch the directories and fix the starting points (end of existing files) now."""
        if self._started:
            return
        self._started = True
        try:
            from watchdog.observers import Observer

            obs = Observer()
            obs.daemon = True
            obs.start()
            self._observer = obs
        except Exception as e:  # inotify limits reached etc.: the stat fallback still works
            log.warning("file watching unavailable (%s); polling every %.2fs", e, self._fallback_interval())
            self._observer = None
        self._check_dirs(force=True)
        for f in self._follows:
            self._check_path(f, time.monotonic())

    def close(self) -> None:
        """Stop watching and close every file; positions() stays valid afterwards."""
        if self._closed:
            return
        self._closed = True
        if self._observer is not None:
            try:
                self._observer.stop()
                self._observer.join(timeout=5)
            except Exception:  # pragma: no cover - shutting down anyway
                pass
            self._observer = None
        for f in self._follows:
            f.close()

    def __enter__(self) -> FileFollower:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ public

    def poll(self, timeout: float) -> list[Line]:
        """Complete lines available now, waiting up to `timeout` seconds for the first ones.

        Reads at most about `read_budget` bytes per call; when more is pending the next call
        returns at once.
        """
        return list(self.poll_batch(timeout))

    def poll_batch(self, timeout: float) -> LineBatch:
        """Like poll(), but the lines stay in the big buffers they were read in (a LineBatch):
        a reader that skips most lines (the daemon) never pays for Line objects it does not use."""
        if not self._started:
            self.start()
        if self._closed:
            return LineBatch([])
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            self._wake.clear()
            out, more = self._pass()
            now = time.monotonic()
            if out or now >= deadline:
                return out
            if more:
                continue
            wait = min(deadline - now, self._interval())
            t = self._next_switch()
            if t is not None:
                wait = min(wait, max(0.0, t - now) + 0.001)
            self._wake.wait(wait)

    def positions(self) -> dict[str, SourcePosition]:
        """Per path (as given), the position just past the last line poll() returned."""
        res: dict[str, SourcePosition] = {}
        for f in self._follows:
            name = self._names.get(f.path, f.path)
            r = f.reader
            if r is not None:
                res[name] = SourcePosition(name, r.dev, r.ino, r.cutter.committed)
            elif f.saved is not None:
                res[name] = SourcePosition(name, f.saved.dev, f.saved.inode, f.saved.offset)
            else:
                res[name] = SourcePosition(name, 0, 0, 0)
        return res

    # ------------------------------------------------------------------ internals

    def _fallback_interval(self) -> float:
        return min(self.stat_interval, 0.25)

    def _interval(self) -> float:
        if self._observer is None or self._watch_failed:
            return self._fallback_interval()
        return self.stat_interval

    def _dir_gone(self, d: str) -> None:
        """Called from the watchdog thread when a watched directory vanished."""
        with self._lock:
            self._dead_dirs.add(d)
        self._wake.set()

    def _check_dirs(self, force: bool = False) -> None:
        """(Re)schedule directory watches: dirs appearing late, or replaced by a new inode."""
        now = time.monotonic()
        if not force and now < self._next_dir_check and not self._dead_dirs:
            return
        self._next_dir_check = now + self.stat_interval
        obs = self._observer
        if obs is None:
            return
        with self._lock:
            dead, self._dead_dirs = self._dead_dirs, set()
        by_dir: dict[str, list[str]] = {}
        for p in self.paths:
            by_dir.setdefault(os.path.dirname(p), []).append(os.path.basename(p))
        failed = False
        for d, names in by_dir.items():
            try:
                st = os.stat(d)
                ident: tuple[int, int] | None = (st.st_dev, st.st_ino)
            except OSError:
                ident = None
            cur = self._watches.get(d)
            if cur is not None and (d in dead or cur[1] != ident):
                try:
                    obs.unschedule(cur[0])  # type: ignore[arg-type]
                except Exception:
                    pass
                del self._watches[d]
                cur = None
            if cur is None and ident is not None:
                try:
                    w = obs.schedule(_wake_handler(self, d, tuple(names)), d, recursive=False,
                                     event_filter=_watched_events())
                    self._watches[d] = (w, ident)
                except Exception as e:
                    failed = True
                    if not self._watch_failed:
                        log.warning("cannot watch %s (%s); polling instead", d, e)
        self._watch_failed = failed

    def _next_switch(self) -> float | None:
        """Earliest time a drained rotated file may be left for its successor."""
        t: float | None = None
        for f in self._follows:
            r = f.reader
            if r is not None and f.queue:
                at = max(r.last_data, r.successor_seen or 0.0) + self.rotate_grace
                t = at if t is None else min(t, at)
        return t

    def _pass(self) -> tuple[LineBatch, bool]:
        """One round over all paths: notice new/rotated files, read what is there."""
        self._check_dirs()
        now = time.monotonic()
        segs: list[tuple[str, int, bytes]] = []
        budget = self.read_budget
        n = len(self._follows)
        start = self._rr
        self._rr = (self._rr + 1) % max(1, n)
        for k in range(n):
            f = self._follows[(start + k) % n]
            self._check_path(f, now)
            budget = self._read_follow(f, budget, segs, now)
            if budget <= 0:
                break
        out = LineBatch(segs)
        self.stats["lines"] += len(out)
        return out, budget <= 0

    def _open(self, f: _Follow, path: str) -> tuple[int, os.stat_result] | None:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
        except FileNotFoundError:
            return None
        except PermissionError as e:
            if not f.denied:
                f.denied = True
                self.stats["permission_denied"] += 1
                log.warning("cannot read %s: %s; retrying", path, e.strerror)
            return None
        except OSError as e:
            self._error(f, path, e)
            return None
        f.denied = False
        try:
            st = os.fstat(fd)
        except OSError as e:  # pragma: no cover - fstat on a fresh fd does not fail
            os.close(fd)
            self._error(f, path, e)
            return None
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            self._error(f, path, OSError(f"not a regular file: {path}"))
            return None
        return fd, st

    def _error(self, f: _Follow, path: str, e: OSError) -> None:
        if not f.failing:
            f.failing = True
            self.stats["errors"] += 1
            log.warning("error reading %s: %s; retrying", path, e)

    def _check_path(self, f: _Follow, now: float) -> None:
        """Stat the path: first open, or queue a new file that replaced the one we read."""
        first = not f.checked
        f.checked = True
        try:
            st = os.stat(f.path)
        except (FileNotFoundError, NotADirectoryError):
            if not f.missing:
                f.missing = True
                self.stats["missing"] += 1
                if first:
                    log.info("%s does not exist yet; waiting for it", f.path)
            return
        except PermissionError as e:
            if not f.denied:
                f.denied = True
                self.stats["permission_denied"] += 1
                log.warning("cannot stat %s: %s; retrying", f.path, e.strerror)
            return
        except OSError as e:
            self._error(f, f.path, e)
            return
        f.missing = False
        if first and not self.from_start:
            f.start_at = ((st.st_dev, st.st_ino), st.st_size)
        ident = (st.st_dev, st.st_ino)
        latest = f.queue[-1] if f.queue else f.reader
        if latest is not None and latest.ident == ident:
            return
        opened = self._open(f, f.path)
        if opened is None:
            return
        fd, fst = opened
        if latest is not None and latest.ident == (fst.st_dev, fst.st_ino):
            os.close(fd)  # replaced back between stat and open: nothing new
            return
        if f.opened:
            self.stats["reopen"] += 1
        if latest is None:
            self._first_open(f, fd, fst, now)
        else:
            r = _Reader(fd, fst, _Cutter(self.max_line, 0, self.stats))
            latest.successor_seen = now
            f.queue.append(r)
            self.stats["rotations"] += 1
            log.info("%s was rotated; finishing the old file first", f.path)
        f.opened = True

    def _first_open(self, f: _Follow, fd: int, st: os.stat_result, now: float) -> None:
        """Decide where to start in the first file we open for this path."""
        cut = _Cutter(self.max_line, 0, self.stats)
        r = _Reader(fd, st, cut)
        sp = f.saved
        if sp is not None and sp.inode:
            if (sp.dev, sp.inode) == r.ident and self._resumable(fd, st, sp.offset):
                cut.reset(sp.offset)
            elif (sp.dev, sp.inode) == r.ident and st.st_size < sp.offset:
                self.stats["truncations"] += 1
                log.info("%s is shorter than the saved offset: truncated, reading from 0", f.path)
            else:
                self._resume_rotated(f, r, sp, now)
                return
        elif sp is None and f.start_at is not None and f.start_at[0] == r.ident:
            # the end as of start(), even if the first open succeeded only later (permissions)
            start, mid_line = self._line_start_before(fd, min(f.start_at[1], st.st_size))
            cut.reset(start)
            cut.skipping = mid_line
        f.reader = r

    def _resumable(self, fd: int, st: os.stat_result, offset: int) -> bool:
        """True when `offset` can be ours: inside the file and just past a newline.

        The newline check catches a recycled inode number (a new file that happens to reuse
        the inode of the one we saved), which would otherwise make us skip its start.
        """
        if offset > st.st_size:
            return False
        if offset == 0:
            return True
        try:
            return os.pread(fd, 1, offset - 1) == b"\n"
        except OSError:
            return False

    def _line_start_before(self, fd: int, size: int) -> tuple[int, bool]:
        """Start of the line in progress at `size`, so a line being written is read whole.

        Returns (offset, mid_line): mid_line when that line is already too long to be kept,
        so reading starts at `size` dropping the rest of it.
        """
        if size == 0:
            return 0, False
        lo = max(0, size - self.max_line - 1)
        try:
            data = os.pread(fd, size - lo, lo)
        except OSError:
            return size, True
        i = data.rfind(b"\n")
        if i >= 0:
            return lo + i + 1, False
        return (0, False) if lo == 0 else (size, True)

    def _resume_rotated(self, f: _Follow, current: _Reader, sp: SourcePosition, now: float) -> None:
        """Restart after a rotation while we were down: rest of the saved file, then the new."""
        d, base = os.path.split(f.path)
        found: tuple[str, _Reader] | None = None
        try:
            entries = list(os.scandir(d))
        except OSError:
            entries = []
        for e in entries:
            try:
                if e.name == base or e.inode() != sp.inode:
                    continue
                opened = self._open(f, e.path)
                if opened is None:
                    continue
                fd, st = opened
                if (st.st_dev, st.st_ino) != (sp.dev, sp.inode):
                    os.close(fd)
                    continue
                old = _Reader(fd, st, _Cutter(self.max_line, 0, self.stats))
                if self._resumable(fd, st, sp.offset):
                    old.cutter.reset(sp.offset)
                else:
                    self.stats["truncations"] += 1
                found = (e.name, old)
                break
            except OSError:
                continue
        self.stats["rotations"] += 1
        if found is None:
            self.stats["lost_rotated"] += 1
            log.warning(
                "%s: the file read before the restart is gone (or its inode was reused); "
                "reading the current one from 0",
                f.path,
            )
            f.reader = current
            return
        name, old = found
        log.info("%s was rotated while stopped: finishing %s first", f.path, name)
        chain = [old]
        # logrotate numbering: base.N is older than base.N-1 ... base.1, then base itself.
        suffix = name[len(base) + 1 :] if name.startswith(base + ".") else ""
        if suffix.isdigit():
            for k in range(int(suffix) - 1, 0, -1):
                opened = self._open(f, os.path.join(d, f"{base}.{k}"))
                if opened is None:
                    continue
                fd, st = opened
                ident = (st.st_dev, st.st_ino)
                if ident == current.ident or any(ident == c.ident for c in chain):
                    os.close(fd)
                    continue
                chain.append(_Reader(fd, st, _Cutter(self.max_line, 0, self.stats)))
        chain.append(current)
        for r in chain[:-1]:
            r.successor_seen = now
        f.reader = chain[0]
        f.queue = chain[1:]

    def _read_follow(self, f: _Follow, budget: int, out: list[tuple[str, int, bytes]], now: float) -> int:
        """Read f's current file (then its successors once it is done) within `budget` bytes."""
        name = self._names.get(f.path, f.path)
        while f.reader is not None and budget > 0:
            r = f.reader
            try:
                st = os.fstat(r.fd)
            except OSError as e:
                self._error(f, f.path, e)
                return budget
            cut = r.cutter
            if st.st_size < cut.pos:
                self.stats["truncations"] += 1
                log.info("%s was truncated; reading from its start", f.path)
                cut.reset(0)
            while budget > 0 and st.st_size > cut.pos:
                try:
                    data = os.pread(r.fd, min(st.st_size - cut.pos, budget), cut.pos)
                except OSError as e:
                    self._error(f, f.path, e)
                    return budget
                if not data:
                    break
                f.failing = False
                budget -= len(data)
                self.stats["bytes"] += len(data)
                r.last_data = now
                out.extend([(name, off, seg) for off, seg in cut.feed(data)])
            if budget <= 0 or st.st_size > cut.pos:
                return budget
            if f.queue:
                # At the end of a file that has a successor: leave it once it is gone or idle.
                idle_since = max(r.last_data, r.successor_seen or 0.0)
                if st.st_nlink > 0 and now - idle_since < self.rotate_grace:
                    return budget
            elif st.st_nlink > 0 or now - r.last_data < self.rotate_grace:
                return budget
            # else: deleted with nothing in its place; holding it open would pin its disk space
            tail = cut.tail()
            if tail is not None:
                self.stats["unterminated"] += 1
                out.append((name, *tail))
            r.close()
            if f.queue:
                f.reader = f.queue.pop(0)
            else:
                f.reader = None
                f.saved = None  # positions(): "read the next file at this path from its start"
                f.start_at = None
                log.info("%s was deleted; released it, waiting for a new one", f.path)
        return budget
