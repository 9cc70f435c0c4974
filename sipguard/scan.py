"""`sipguard scan`: the same formats, filters and policy over whole files, in the log's own time.

Offline and side-effect free: no store, no enforcer, no positions. What it prints is what the
daemon would have banned had it followed these files as they were written. It prints nothing
itself: the CLI shows the result, and a progress bar from the `progress` callback.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import queue
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from .addresses import AllowList
from .config import Config
from .filters import FilterSet
from .formats import RecordParser
from .model import Event, EventKind
from .pipeline import Pipeline
from .policy import Policy
from .sources import MAX_LINE, LineBatch, read_chunks, read_file

SNIFF_LINES = 200
SNIFF_CHUNK = 1 << 16
PARALLEL_MIN = 16 << 20
"""A plain syslog-family file at least this big is scanned by two processes (the parent and a forked
child), when read sparsely."""
PIECE = 8 << 20
"""Bytes read and searched at a time; the child sends its events back piece by piece."""


@dataclass
class ScanBan:
    ip: str
    filters: list[str]
    events: int
    score: float
    reason: str
    first_ban: float
    bans: int = 1


@dataclass
class ScanResult:
    lines: int = 0
    matched: int = 0
    bans: list[ScanBan] = field(default_factory=list)
    seconds: float = 0.0

    def as_json(self) -> dict:
        """The documented `scan --json` schema, exactly."""
        return {
            "lines": self.lines,
            "matched": self.matched,
            "bans": [{"ip": b.ip, "filters": b.filters, "events": b.events, "score": b.score} for b in self.bans],
        }


class BanReplay:
    """The policy run over events in log time, fed in file order in as many pieces as convenient
    (a scan feeds one file, or one part of a file, at a time); a ban ends when its (log-time)
    duration is over."""

    def __init__(self, cfg: Config, allow: AllowList) -> None:
        self.policy = Policy(cfg.policy, allow, evidence=False)  # (scan shows no evidence: none is kept)
        self._filters: dict[str, set[str]] = {}
        self._events: dict[str, int] = {}
        self._expires: dict[str, float | None] = {}
        self._bans: dict[str, ScanBan] = {}
        self.matched = 0

    def feed(self, events: Iterable[Event]) -> None:
        policy = self.policy
        observe, banned = policy.observe, policy.banned
        per_ip_filters, per_ip_events, expires, bans = self._filters, self._events, self._expires, self._bans
        success = EventKind.SUCCESS
        n = 0
        for ev in events:
            n += 1
            ip = ev.ip
            if ev.kind is not success:
                got = per_ip_filters.get(ip)
                if got is None:
                    per_ip_filters[ip] = {ev.filter}
                else:
                    got.add(ev.filter)
                per_ip_events[ip] = per_ip_events.get(ip, 0) + 1
            if ip in banned:
                end = expires.get(ip)
                if end is not None and ev.time >= end:
                    policy.release(ip)
            d = observe(ev)
            if d is None:
                continue
            expires[ip] = None if d.duration is None else d.time + d.duration
            b = bans.get(ip)
            if b is not None:
                b.bans += 1
                b.score = max(b.score, d.score)
            else:
                bans[ip] = ScanBan(ip, [], 0, d.score, d.reason, d.time)
        self.matched += n

    def bans(self) -> list[ScanBan]:
        """Every source banned at least once, by (first ban time, address)."""
        out = []
        for ip, b in self._bans.items():
            b.filters = sorted(self._filters.get(ip, ()))
            b.events = self._events.get(ip, 0)
            out.append(b)
        out.sort(key=lambda b: (b.first_ban, b.ip))
        return out


def _family(path: str, fmt: str, programs: frozenset[str]) -> str | None:
    """The record family ("syslog" or "stderr") the start of a file sets, from its first lines
    (None: no header among them)."""
    parser = RecordParser(fmt, programs=programs, on_stderr=lambda _source: None)
    # small reads: the generator stops after the first few, not after a whole 8 MB chunk
    for i, line in enumerate(read_file(path, chunk_size=SNIFF_CHUNK)):
        parser.feed(line)
        family = parser.family(line.source)
        if family is not None or i >= SNIFF_LINES:
            return family
    return None


def _trusting(trust: bool) -> dict[str, bool]:
    """`trust=True` as a keyword argument when set ([sources] trust_plain_stderr), nothing otherwise."""
    return {"trust": True} if trust else {}


def _pieces(path: str, filters: FilterSet, fmt: str, programs: frozenset[str], now: float, sparse: bool,
            start: int = 0, end: int | None = None, trust: bool = False) -> Iterator[tuple[int, list[Event]]]:
    """(lines, events) of each big piece of one byte range of `path`, in order, through one
    pipeline (sparse: only the lines that can matter are parsed); the last item is what the flush
    at the end of the range gives (0 lines)."""
    pipe = Pipeline(RecordParser(fmt, programs=programs, trust_plain_stderr=trust), filters, sparse=sparse)
    off = start
    for chunk in read_chunks(path, chunk_size=PIECE, start=start, end=end):
        res = pipe.batch(LineBatch([(path, off, chunk)]), now, flush=False)
        off += len(chunk)
        yield res.lines, res.events
    yield 0, pipe.flush(now).events


Progress = Callable[[int], None]
"""Told the bytes done after each piece of a file (how `scan` draws its progress bar)."""


def _nothing(_size: int) -> None:
    return None


PARENT_SHARE = 0.48
"""The forking parent scans this share of a split file: it also replays every event through the
policy, the child's too (piece by piece as they arrive), so both finish at about the same time."""


def _split_point(path: str, fmt: str, programs: frozenset[str]) -> int | None:
    """Where a plain, big syslog-family file can be cut in two (None: don't split).

    The cut is at the first line after PARENT_SHARE of the file that starts a syslog record: the
    record before it ends there (a record goes on only over lines starting with a space), so each
    part read on its own gives exactly the records of reading the file whole.
    """
    if (os.cpu_count() or 1) < 2 or not hasattr(os, "fork"):
        return None
    try:
        size = os.path.getsize(path)
        if size < PARALLEL_MIN or os.path.splitext(path)[1].lower() in (".gz", ".bz2", ".xz", ".lzma"):
            return None
        if _family(path, fmt, programs) != "syslog":
            return None
        cut = int(size * PARENT_SHARE)
        with open(path, "rb") as f:
            f.seek(cut)
            window = f.read(2 << 20)
    except OSError:
        return None
    return _record_start(window, cut, fmt, programs, eof=cut + len(window) >= size)


def _record_start(window: bytes, base: int, fmt: str, programs: frozenset[str], eof: bool = True) -> int | None:
    """File offset of the first whole line of `window` (read at offset `base`, past a line's start;
    `eof`: it reaches the end of the file) that starts a record in a syslog-family source, or None.
    A line longer than MAX_LINE is never it: the reader skips such lines, so they end no record."""
    probe = RecordParser(fmt, programs=programs)
    pos = window.find(b"\n") + 1
    i = 0
    while 0 < pos < len(window):
        e = window.find(b"\n", pos)
        if e < 0 and not eof:
            return None  # a line cut by the window: its length is not known
        end = len(window) if e < 0 else e  # the file's last line may have no newline
        line = window[pos:end]
        if len(line) <= MAX_LINE:
            probe.parse_alone(line[:-1] if line[-1:] == b"\r" else line, str(i))  # each line on its own
            if probe.family(str(i)) == "syslog":
                return base + pos
        pos = e + 1
        i += 1
    return None


_FRAME = struct.Struct("<Q")  # each child message: its length, then the pickle


def _child_scan(wfd: int, path: str, filters: FilterSet, fmt: str, programs: frozenset[str], now: float,
                start: int, trust: bool = False) -> None:
    """In the forked child: scan from `start` to the end, one framed pickle of (lines, event rows)
    per piece as soon as it is done, then a framed None. Never returns."""
    code = 1
    try:
        with os.fdopen(wfd, "wb") as w:
            for n, evs in _pieces(path, filters, fmt, programs, now, True, start, None, **_trusting(trust)):
                msg = pickle.dumps((n, [(e.time, e.ip, e.filter, e.kind.value, e.weight) for e in evs]),
                                   protocol=pickle.HIGHEST_PROTOCOL)
                w.write(_FRAME.pack(len(msg)) + msg)
                w.flush()
            msg = pickle.dumps(None)
            w.write(_FRAME.pack(len(msg)) + msg)
        code = 0
    finally:
        os._exit(code)


def _read_frames(fd: int, out: queue.SimpleQueue) -> None:
    """Reader thread: keep the pipe empty (so the child never waits for the parent) and queue each
    complete message; None at the end of the stream (a cut-off message is dropped)."""
    try:
        with os.fdopen(fd, "rb") as r:
            while True:
                head = r.read(_FRAME.size)
                if len(head) < _FRAME.size:
                    return
                (size,) = _FRAME.unpack(head)
                body = r.read(size)
                if len(body) < size:
                    return
                out.put(body)
    finally:
        out.put(None)


class _Bytes:
    """The progress of one byte range of a file, piece by piece: every piece but the last of a range
    is PIECE bytes as read (decompressed), so `piece()` advances that much and `done()` the rest.
    Sized by the caller (None: unknown, e.g. a bz2 file; then each piece counts PIECE)."""

    def __init__(self, progress: Progress, size: int | None) -> None:
        self.progress = progress
        self.left = size

    def piece(self) -> None:
        if self.left is None:
            self.progress(PIECE)
            return
        step = min(PIECE, self.left)
        self.left -= step
        if step:
            self.progress(step)

    def done(self) -> None:
        if self.left:
            self.progress(self.left)
        self.left = 0


def _scan_file(path: str, filters: FilterSet, fmt: str, programs: frozenset[str], now: float, sparse: bool,
               replay: BanReplay, progress: Progress | None = None, size: int | None = None,
               trust: bool = False) -> int:
    """One file through the pipeline, its events fed to `replay` in file order; a big file read
    sparsely has its second part scanned by a forked child meanwhile. Returns the number of lines.
    `progress` is told the bytes done after each piece (`size`: the file's, decompressed, if known)."""
    advance = progress or _nothing
    split = _split_point(path, fmt, programs) if sparse else None
    if split is None:
        total = 0
        whole = _Bytes(advance, size)
        for n, events in _pieces(path, filters, fmt, programs, now, sparse, **_trusting(trust)):
            total += n
            replay.feed(events)
            whole.piece()
        whole.done()
        return total
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        _child_scan(wfd, path, filters, fmt, programs, now, split, **_trusting(trust))
    os.close(wfd)
    frames: queue.SimpleQueue = queue.SimpleQueue()
    reader = threading.Thread(target=_read_frames, args=(rfd, frames), name="scan-child-reader", daemon=True)
    reader.start()
    total = 0
    received = 0  # pieces of the child's part fed so far
    complete = False
    kinds = {k.value: k for k in EventKind}
    done = False
    mine = _Bytes(advance, split)  # a file is split only when plain: its size is its length
    theirs = _Bytes(advance, None if size is None else size - split)
    try:
        for n, events in _pieces(path, filters, fmt, programs, now, True, 0, split, **_trusting(trust)):
            total += n
            replay.feed(events)
            mine.piece()
        mine.done()
        while (body := frames.get()) is not None:
            try:
                msg = pickle.loads(body)
            except (pickle.UnpicklingError, EOFError, ValueError):
                break
            if msg is None:
                complete = True
                break
            n, rows = msg
            total += n
            received += 1
            replay.feed([Event(t, ip, f, kinds[k], w) for t, ip, f, k, w in rows])
            theirs.piece()
        done = True
    finally:
        if not done:  # the parent failed: its child's work is moot
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        reader.join()
    if not complete or status != 0:  # the child failed: same pieces, same order, skip those fed
        for i, (n, events) in enumerate(_pieces(path, filters, fmt, programs, now, True, split, None,
                                                **_trusting(trust))):
            if i >= received:
                total += n
                replay.feed(events)
                theirs.piece()
    theirs.done()
    return total


def scan_files(paths: list[str], cfg: Config, filters: FilterSet | None = None,
               allow: AllowList | None = None, fast: bool = True, progress: Progress | None = None,
               sizes: dict[str, int | None] | None = None) -> ScanResult:
    """Read every file whole (.gz too) in order and return lines, matches and resulting bans.

    Fast path (`fast`): the pipeline reads sparsely (when every filter has prefilter literals and
    none accepts multi-line records, only the lines that can matter are parsed); the result is the
    same as parsing every line (`fast=False`). `progress`, when given, is called with the number of
    bytes (decompressed) done after each piece; `sizes` are the files' sizes as read, where known.
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()  # millions of short-lived acyclic tuples: collector passes would find nothing
    try:
        return _scan_files(paths, cfg, filters, allow, fast, progress, sizes or {})
    finally:
        if gc_was_enabled:
            gc.enable()


def _scan_files(paths: list[str], cfg: Config, filters: FilterSet | None, allow: AllowList | None,
                fast: bool, progress: Progress | None = None, sizes: dict[str, int | None] | None = None) -> ScanResult:
    t0 = time.perf_counter()
    filters = filters or FilterSet.load(cfg.filters.directories, enabled=cfg.filters.enabled,
                                        disabled=cfg.filters.disabled)
    allow = allow or AllowList(cfg.allowlist.cidrs, include_host=cfg.allowlist.include_host_addresses)
    result = ScanResult()
    replay = BanReplay(cfg, allow)
    now = time.time()
    programs = frozenset(cfg.sources.programs)
    fmt = cfg.sources.format
    for path in paths:
        size = (sizes or {}).get(path)
        if size is None and not path.lower().endswith((".gz", ".bz2", ".xz", ".lzma")):
            with contextlib.suppress(OSError):
                size = os.path.getsize(path)
        result.lines += _scan_file(path, filters, fmt, programs, now, fast, replay, progress, size,
                                   cfg.sources.trust_plain_stderr)
    result.matched = replay.matched
    result.bans = replay.bans()
    result.seconds = time.perf_counter() - t0
    return result
