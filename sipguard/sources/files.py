"""Files: complete lines out of Kamailio's log files, live (FileFollower) or offline (read_file,
read_chunks).

Never loses or repeats a line across appends, rotation (create, copytruncate, compress,
delaycompress, dateext), deletion or a restart, and never dies on what a file contains: bytes go out
undecoded, over-long lines are counted and skipped. A file is known by its content (identity.py): a
position carries a fingerprint of the bytes before it, so a file truncated in place is noticed even
when it grew back past the offset before the follower looked, its unread rest is read from its
rotated copy (renamed, dated or compressed since) before the file itself, and a restart resumes in
whichever file still holds the saved bytes. Knows nothing of log formats, filters or the store: the
caller persists `positions()`.
"""

from __future__ import annotations

import gzip
import logging
import os
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # watchdog is imported when a follower starts: `scan` and friends never pay for it
    from watchdog.events import FileSystemEvent
    from watchdog.observers import Observer

from ..model import Line
from .identity import (
    COMPRESSED, DECOMPRESS_ERRORS, Mark, Opened, Stream, open_at, open_start, plain_holds, rotated_siblings,
)
from .lines import CHUNK, HEAD, MAX_LINE, TAIL, LineBatch, SourcePosition, _Cutter, _to_lines
from .pace import BATCH_INTERVAL, Pacer

STREAM_POLLS = 10
"""Polls in a row that find lines at their first look before a steady stream is followed without inotify."""

log = logging.getLogger("sipguard.sources")

#: Counters every FileFollower.stats starts with (all 0), so a status page can list them.
STAT_KEYS = (
    "lines",  # lines returned by poll()
    "bytes",  # bytes read from files (skipped ones included)
    "too_long",  # lines longer than max_line: counted, skipped
    "rotations",  # a different file (inode) replaced the one we were reading
    "truncations",  # a file was truncated in place (copytruncate): its copy's unread rest, then it from 0
    "rewritten",  # of those, truncations seen by content only: the file had grown back past our offset
    "copies",  # truncations whose unread rest was read from the rotated copy
    "reopen",  # a path was opened again after its first open
    "missing",  # a path was found absent (at start or after having been present)
    "permission_denied",  # open/stat refused; retried every stat interval
    "errors",  # any other OSError while reading; retried
    "unterminated",  # final partial line of a rotated-away file, delivered as is
    "lost_rotated",  # saved position's file not found on restart: its unread rest is lost
    "streaming",  # a steady stream began: the watches were dropped until a poll found nothing (pace.py)
)



# --------------------------------------------------------------------------- offline reading

_DECOMPRESS: dict[str, Callable[..., Any]] = COMPRESSED
_DECOMPRESS_ERRORS = DECOMPRESS_ERRORS
_STREAM_READ = 1 << 20  # decompressed bytes per read of a compressed generation


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
    """One open file (by fd, so it survives renames) and how far we have read it.

    A compressed rotated file is read through `stream` (its decompressed bytes, in order). A `final`
    reader is a finished file (a truncated file's rotated copy, a compressed generation): at its end it
    is left at once for the next.
    """

    __slots__ = ("fd", "dev", "ino", "cutter", "last_data", "successor_seen", "stream", "final", "where")

    def __init__(self, fd: int, st: os.stat_result, cutter: _Cutter, stream: Stream | None = None,
                 final: bool = False, where: str = "") -> None:
        self.fd = fd
        self.dev = st.st_dev
        self.ino = st.st_ino
        self.cutter = cutter
        self.last_data = time.monotonic()
        self.successor_seen: float | None = None  # when a newer file appeared at the path
        self.stream = stream
        self.final = final
        self.where = where  # the file's path when it was opened (for messages)

    @property
    def ident(self) -> tuple[int, int]:
        return (self.dev, self.ino)

    def mark(self) -> Mark:
        """The fingerprint of where a restart would resume in this file (the last whole line read);
        empty digests when the bytes are not all known (a failed read at open): the inode decides then."""
        cut = self.cutter
        if len(cut.head) < min(HEAD, cut.committed) or len(cut.ctail) < min(TAIL, cut.committed):
            return Mark(cut.committed, "", "")
        return Mark.of(cut.committed, cut.head, cut.ctail)

    def unchanged(self) -> bool:
        """True while the plain file still holds the bytes read from it: its start and the bytes
        before the last whole line (a truncation that grew back past our offset does not)."""
        cut = self.cutter
        try:
            if cut.head and os.pread(self.fd, len(cut.head), 0) != cut.head:
                return False
            if cut.committed > len(cut.head) and cut.ctail:
                n = len(cut.ctail)
                return os.pread(self.fd, n, cut.committed - n) == cut.ctail
        except OSError:
            return True  # an error is not a rewrite; the read reports it
        return True

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1


class _Follow:
    """State of one followed path: the file being read and newer files queued behind it.

    Files are read strictly one after the other (old to end, then the next), so a single
    position (file, offset, fingerprint) is always enough to resume exactly.
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
    stat every `stat_interval` seconds. Paced (pace.py): while lines keep coming, a poll hands out
    at most one batch per `batch_interval` seconds (the first line after a quiet spell and a
    backlog at once), so a writer appending a line at a time does not cost a batch per line; during
    a steady stream the watches are dropped (the pacer's looks find the lines, inotify would wake a
    thread per write) until a poll finds nothing. Use from one thread: ``start()``, then ``poll()`` in a
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
        batch_interval: float = BATCH_INTERVAL,
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
        self.batch_interval = batch_interval
        self._pacer = Pacer(batch_interval)
        self.backlog = False  # the last poll was cut by the read budget: more lines are waiting
        self._streaming = False  # a steady stream: no directory watches, the pacer's looks instead
        self._hot = 0  # polls in a row whose first look found lines
        self._last_lines = False  # the last poll returned lines
        self._interrupted = False  # wake() was called: the current (or next) poll returns at once
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
        if not self._interrupted:
            self._pacer.hold(deadline)  # the lines of a steady stream gather meanwhile
        first = True
        while True:
            self._wake.clear()
            out, more = self._pass()
            now = time.monotonic()
            if out or now >= deadline or self._interrupted:
                self._interrupted = False
                self._handed(bool(out), more, hot=first and bool(out))
                return out
            first = False
            if self._streaming:  # a lull: inotify wakes the wait again, then one more look (a line
                self._watch_again()  # written before the watch was armed is not missed)
                continue
            if more:
                continue
            wait = min(deadline - now, self._interval())
            t = self._next_switch()
            if t is not None:
                wait = min(wait, max(0.0, t - now) + 0.001)
            self._wake.wait(wait)

    def _handed(self, lines: bool, more: bool, hot: bool) -> None:
        """A poll returns. `hot`: its first look found lines right after the previous batch (a steady
        stream): after STREAM_POLLS such polls in a row the directory watches are dropped, since the
        pacer looks every batch_interval anyway and inotify would only cost a wake-up (in the watcher's
        threads) for every line written; the first poll that finds nothing arms them again."""
        self.backlog = more
        self._pacer.handed(lines, more)
        self._hot = self._hot + 1 if hot and self._last_lines else 0
        self._last_lines = lines
        if not lines and self._streaming:
            self._watch_again()
        elif (self._hot >= STREAM_POLLS and not self._streaming and self._observer is not None
              and not self._watch_failed and self.batch_interval > 0):
            self._unwatch()

    def _unwatch(self) -> None:
        obs = self._observer
        for w, _ident in self._watches.values():
            try:
                obs.unschedule(w)  # type: ignore[union-attr, arg-type]
            except Exception:  # pragma: no cover - a watch the observer dropped itself
                pass
        self._watches.clear()
        self._streaming = True
        self.stats["streaming"] += 1

    def _watch_again(self) -> None:
        self._streaming = False
        self._hot = 0
        self._check_dirs(force=True)

    def wake(self) -> None:
        """End the current (or the next) poll's wait now, with the lines there are (maybe none).
        Safe from any thread: the daemon's other inputs (the fleet's stream, a CLI request) use it."""
        self._interrupted = True
        self._pacer.poke()
        self._wake.set()

    def positions(self) -> dict[str, SourcePosition]:
        """Per path (as given), the position just past the last line poll() returned."""
        res: dict[str, SourcePosition] = {}
        for f in self._follows:
            name = self._names.get(f.path, f.path)
            r = f.reader
            if r is not None:
                m = r.mark()
                res[name] = SourcePosition(name, r.dev, r.ino, m.offset, m.head, m.tail)
            elif f.saved is not None:
                sp = f.saved
                res[name] = SourcePosition(name, sp.dev, sp.inode, sp.offset, sp.head, sp.tail)
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
        if self._streaming or (not force and now < self._next_dir_check and not self._dead_dirs):
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
            r = _Reader(fd, fst, self._cutter(), where=f.path)
            latest.successor_seen = now
            f.queue.append(r)
            self.stats["rotations"] += 1
            log.info("%s was rotated; finishing the old file first", f.path)
        f.opened = True

    def _cutter(self) -> _Cutter:
        return _Cutter(self.max_line, 0, self.stats, track=True)

    def _first_open(self, f: _Follow, fd: int, st: os.stat_result, now: float) -> None:
        """Decide where to start in the first file we open for this path."""
        cut = self._cutter()
        r = _Reader(fd, st, cut, where=f.path)
        sp = f.saved
        if sp is not None and sp.inode:
            if sp.head or sp.tail:
                self._resume(f, r, sp, now)
                return
            # a position saved before fingerprints: the inode and a newline before the offset
            if (sp.dev, sp.inode) == r.ident and self._resumable(fd, st, sp.offset):
                cut.reset(sp.offset, *self._around(fd, sp.offset))
            elif (sp.dev, sp.inode) == r.ident and st.st_size < sp.offset:
                self.stats["truncations"] += 1
                log.info("%s is shorter than the saved offset: truncated, reading from 0", f.path)
            else:
                self._resume_elsewhere(f, r, sp, None, now)
                return
        elif sp is None and f.start_at is not None and f.start_at[0] == r.ident:
            # the end as of start(), even if the first open succeeded only later (permissions)
            start, mid_line = self._line_start_before(fd, min(f.start_at[1], st.st_size))
            cut.reset(start, *self._around(fd, start), skipping=mid_line)
        f.reader = r

    def _around(self, fd: int, offset: int) -> tuple[bytes, bytes]:
        """The file's first min(HEAD, offset) bytes and the min(TAIL, offset) bytes before `offset`."""
        try:
            head = os.pread(fd, min(HEAD, offset), 0)
            n = min(TAIL, offset)
            return head, os.pread(fd, n, offset - n)
        except OSError:
            return b"", b""

    def _resume(self, f: _Follow, r: _Reader, sp: SourcePosition, now: float) -> None:
        """At a restart: resume in whichever file holds the saved position's bytes. The path's file
        itself when it is the saved inode, else a rotated generation (renamed, copied by copytruncate,
        compressed) followed by the newer ones and then the path's file from its start; else the path's
        file under a new inode when it holds them (the same content put in place)."""
        mark = Mark(sp.offset, sp.head, sp.tail)
        got = plain_holds(r.fd, os.fstat(r.fd).st_size, mark)
        if got is not None and (sp.dev, sp.inode) == r.ident:
            r.cutter.reset(sp.offset, *got)
            f.reader = r
            return
        self._resume_elsewhere(f, r, sp, mark, now, current_holds=got)

    def _resume_elsewhere(self, f: _Follow, current: _Reader, sp: SourcePosition, mark: Mark | None,
                          now: float, current_holds: tuple[bytes, bytes] | None = None) -> None:
        """Restart after a rotation while we were down: rest of the saved file, then the newer ones."""
        chain = self._locate(f, mark, exclude={current.ident}, saved=(sp.dev, sp.inode), offset=sp.offset,
                             final_plain=False)
        if not chain and current_holds is not None:
            current.cutter.reset(sp.offset, *current_holds)
            f.reader = current
            return
        if not chain and (sp.dev, sp.inode) == current.ident and os.fstat(current.fd).st_size < sp.offset:
            self.stats["truncations"] += 1
            log.warning("%s is shorter than the saved offset and no rotated copy holds what it had: truncated "
                        "while stopped, reading from 0", f.path)
            f.reader = current
            return
        self.stats["rotations"] += 1
        if not chain:
            self.stats["lost_rotated"] += 1
            log.warning(
                "%s: the file read before the restart is gone (no rotated generation holds its bytes before "
                "offset %d); reading the current one from 0", f.path, sp.offset)
            f.reader = current
            return
        log.info("%s was rotated while stopped: finishing %s first", f.path, chain[0].where)
        for r in chain:
            r.successor_seen = now
        f.reader = chain[0]
        f.queue = chain[1:] + [current]

    def _locate(self, f: _Follow, mark: Mark | None, *, exclude: set[tuple[int, int]], saved: tuple[int, int],
                offset: int, final_plain: bool) -> list[_Reader]:
        """The rotated generation of `f.path` that holds `mark` (None: a position without fingerprint,
        found by its inode `saved` and a newline before `offset`), opened there, then every newer
        generation from its start, oldest first; [] when none holds it. Files in `exclude` (already
        open) are never taken. Tries the generations with the saved inode first, then the plain ones
        newest first, then the compressed ones (decompressed up to the offset to be checked)."""
        sibs = [s for s in rotated_siblings(f.path) if (s.dev, s.inode) not in exclude]
        order = sorted(range(len(sibs)), key=lambda i: ((sibs[i].dev, sibs[i].inode) != saved,
                                                        sibs[i].compressed, -i))
        found: tuple[int, Opened] | None = None
        for i in order:
            s = sibs[i]
            if mark is None:
                if s.compressed or (s.dev, s.inode) != saved:
                    continue
                opened = self._open(f, s.path)
                if opened is None:
                    continue
                fd, st = opened
                if (st.st_dev, st.st_ino) != saved or not self._resumable(fd, st, offset):
                    os.close(fd)
                    continue
                cand: Opened | None = Opened(fd, st, None, *self._around(fd, offset))
            else:
                cand = open_at(s.path, mark)
            if cand is not None:
                found = (i, cand)
                break
        if found is None:
            return []
        i, cand = found
        first = self._cutter()
        first.reset(offset, cand.head, cand.ctail)
        copy = cand.stream is not None or (cand.st.st_dev, cand.st.st_ino) != saved
        chain = [_Reader(cand.fd, cand.st, first, cand.stream, final=final_plain or copy, where=sibs[i].path)]
        taken = {(cand.st.st_dev, cand.st.st_ino)}
        for s in sibs[i + 1 :]:  # the newer generations, read whole
            if (s.dev, s.inode) in taken:
                continue
            newer = open_start(s.path)
            if newer is None:
                continue
            ident = (newer.st.st_dev, newer.st.st_ino)
            if ident in exclude or ident in taken:
                newer.close()
                continue
            taken.add(ident)
            chain.append(_Reader(newer.fd, newer.st, self._cutter(), newer.stream,
                                 final=final_plain or newer.stream is not None, where=s.path))
        return chain

    def _rewritten(self, f: _Follow, r: _Reader, now: float, grown: bool) -> None:
        """The plain file `r` was truncated in place (copytruncate), seen shorter than our offset or,
        when it grew back past it before we looked, holding other bytes before it: the unread rest is
        read from its rotated copy (renamed, dated or compressed since) first, then the file from 0."""
        self.stats["truncations"] += 1
        if grown:
            self.stats["rewritten"] += 1
        mark = r.mark()
        chain: list[_Reader] = []
        if mark.offset:
            chain = self._locate(f, mark, exclude={x.ident for x in f.readers()}, saved=r.ident,
                                 offset=mark.offset, final_plain=True)
        r.cutter.reset(0)
        r.last_data = now
        how = "and grew back past our offset " if grown else ""
        if not chain:
            if mark.offset:
                log.warning("%s was truncated %sand no rotated copy holds its bytes before offset %d: reading "
                            "it from its start (what it had after that offset, if anything, is lost)",
                            f.path, how, mark.offset)
            else:
                log.info("%s was truncated; reading from its start", f.path)
            return
        self.stats["copies"] += 1
        log.info("%s was truncated %s(copytruncate): reading the rest of %s first", f.path, how, chain[0].where)
        for c in chain:
            c.successor_seen = now
        f.queue[0:0] = chain[1:] + [r]
        f.reader = chain[0]

    def _resumable(self, fd: int, st: os.stat_result, offset: int) -> bool:
        """For a position saved without fingerprint: `offset` inside the file and just past a newline
        (which catches a recycled inode number that would otherwise make us skip the new file's start)."""
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

    def _read_stream(self, f: _Follow, r: _Reader, budget: int, out: list[tuple[str, int, bytes]],
                     now: float) -> tuple[int, bool]:
        """Read a compressed generation within `budget`; (budget left, at its end)."""
        assert r.stream is not None
        name = self._names.get(f.path, f.path)
        cut = r.cutter
        while budget > 0:
            try:
                data = r.stream.read(min(budget, _STREAM_READ))
            except DECOMPRESS_ERRORS as e:
                self.stats["errors"] += 1
                log.warning("%s: damaged or truncated compressed data after byte %d: %s", r.where, cut.pos, e)
                return budget, True
            if not data:
                return budget, True
            budget -= len(data)
            self.stats["bytes"] += len(data)
            r.last_data = now
            out.extend([(name, off, seg) for off, seg in cut.feed(data)])
        return budget, False

    def _read_follow(self, f: _Follow, budget: int, out: list[tuple[str, int, bytes]], now: float) -> int:
        """Read f's current file (then its successors once it is done) within `budget` bytes."""
        name = self._names.get(f.path, f.path)
        while f.reader is not None and budget > 0:
            r = f.reader
            cut = r.cutter
            if r.stream is not None:
                budget, done = self._read_stream(f, r, budget, out, now)
                if not done:
                    return budget
                self._leave(f, r, out, name)
                continue
            try:
                st = os.fstat(r.fd)
            except OSError as e:
                self._error(f, f.path, e)
                return budget
            if st.st_size < cut.pos:
                self._rewritten(f, r, now, grown=False)
                continue
            rewritten = False
            while budget > 0 and st.st_size > cut.pos:
                try:
                    data = os.pread(r.fd, min(st.st_size - cut.pos, budget), cut.pos)
                except OSError as e:
                    self._error(f, f.path, e)
                    return budget
                if not data:
                    break
                if not r.unchanged():  # checked after the read: what was read is the old file's, or dropped
                    rewritten = True
                    break
                f.failing = False
                budget -= len(data)
                self.stats["bytes"] += len(data)
                r.last_data = now
                out.extend([(name, off, seg) for off, seg in cut.feed(data)])
            if rewritten:
                self._rewritten(f, r, now, grown=True)
                continue
            if budget <= 0 or st.st_size > cut.pos:
                return budget
            if f.queue and not r.final:
                # At the end of a file that has a successor: leave it once it is gone or idle.
                idle_since = max(r.last_data, r.successor_seen or 0.0)
                if st.st_nlink > 0 and now - idle_since < self.rotate_grace:
                    return budget
            elif not f.queue and (st.st_nlink > 0 or now - r.last_data < self.rotate_grace):
                return budget
            # else: deleted with nothing in its place; holding it open would pin its disk space
            self._leave(f, r, out, name)
        return budget

    def _leave(self, f: _Follow, r: _Reader, out: list[tuple[str, int, bytes]], name: str) -> None:
        """`r` is done: its unterminated last line goes out as it is, then the next file (or none)."""
        tail = r.cutter.tail()
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
