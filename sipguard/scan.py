"""`sipguard scan`: the same formats, filters and policy over whole files, in the log's own time.

Offline and side-effect free: no store, no enforcer, no positions. What it prints is what the
daemon would have banned had it followed these files as they were written.
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .addresses import AllowList
from .config import Config
from .filters import FilterSet, trigger_lines
from .formats import RecordParser
from .model import Event, EventKind
from .policy import Policy
from .sources import read_chunks, read_file

SNIFF_LINES = 200
SNIFF_CHUNK = 1 << 16
PARALLEL_MIN = 16 << 20
"""A plain file at least this big is scanned by two processes (the parent and a forked child)."""
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
        self.policy = Policy(cfg.policy, allow)
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


def _looks_like_stderr(path: str, fmt: str, programs: frozenset[str]) -> bool:
    """Kamailio -E output needs every line (continuations, PID checks): no fast path for it."""
    if fmt == "stderr":
        return True
    if fmt != "auto":
        return False
    seen: list[str] = []
    parser = RecordParser(fmt, programs=programs, on_stderr=seen.append)
    # small reads: the generator stops after the first few, not after a whole 8 MB chunk
    for i, line in enumerate(read_file(path, chunk_size=SNIFF_CHUNK)):
        parser.feed(line)
        if seen or i >= SNIFF_LINES:
            break
    return bool(seen)


def _fast_chunks(path: str, literals: tuple[bytes, ...], filters: FilterSet, fmt: str,
                 programs: frozenset[str], now: float, start: int = 0, end: int | None = None
                 ) -> Iterator[tuple[int, list[Event]]]:
    """(lines, events) of each big piece of one byte range, in order.

    Only the lines holding a trigger literal are parsed, each as a record of its own (what parsing
    every line gives: the next line starts a new record or is skipped), and tried only against
    the filters its literals can pass (`FilterSet.candidates`).
    """
    parser = RecordParser(fmt, programs=programs)
    parse, match, candidates = parser.parse_alone, filters.match, filters.candidates
    for chunk in read_chunks(path, chunk_size=PIECE, start=start, end=end):
        lines = chunk.count(b"\n") + (0 if chunk.endswith(b"\n") else 1)
        events: list[Event] = []
        add = events.append
        find = chunk.find
        starts, masks = trigger_lines(chunk, literals)
        for i, mask in zip(starts, masks):
            j = find(b"\n", i)
            data = chunk[i:] if j < 0 else chunk[i:j]
            if data[-1:] == b"\r":
                data = data[:-1]
            recs = parse(data, path)
            pool = candidates(mask) if len(recs) == 1 else None  # a pending record: not this line's
            for rec in recs:
                ev = match(rec, now, pool)
                if ev is not None:
                    add(ev)
        yield lines, events


PARENT_SHARE = 0.48
"""The forking parent scans this share of a split file: it also replays every event through the
policy, the child's too (piece by piece as they arrive), so both finish at about the same time."""


def _split_point(path: str) -> int | None:
    """Where a plain, big file can be cut in two at a line boundary (None: don't split)."""
    if (os.cpu_count() or 1) < 2 or not hasattr(os, "fork"):
        return None
    try:
        size = os.path.getsize(path)
        if size < PARALLEL_MIN or os.path.splitext(path)[1].lower() in (".gz", ".bz2", ".xz", ".lzma"):
            return None
        cut = int(size * PARENT_SHARE)
        with open(path, "rb") as f:
            f.seek(cut)
            window = f.read(2 << 20)
    except OSError:
        return None
    nl = window.find(b"\n")
    return None if nl < 0 else cut + nl + 1


_FRAME = struct.Struct("<Q")  # each child message: its length, then the pickle


def _child_scan(wfd: int, path: str, literals: tuple[bytes, ...], filters: FilterSet, fmt: str,
                programs: frozenset[str], now: float, start: int) -> None:
    """In the forked child: scan from `start` to the end, one framed pickle of (lines, event rows)
    per piece as soon as it is done, then a framed None. Never returns."""
    code = 1
    try:
        with os.fdopen(wfd, "wb") as w:
            for n, evs in _fast_chunks(path, literals, filters, fmt, programs, now, start, None):
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


def _fast_file(path: str, literals: tuple[bytes, ...], filters: FilterSet, fmt: str,
               programs: frozenset[str], now: float, replay: BanReplay) -> int:
    """The fast path over one file, its events fed to `replay` in file order; a big file's second
    part is scanned by a forked child meanwhile. Returns the number of lines."""
    split = _split_point(path)
    if split is None:
        total = 0
        for n, events in _fast_chunks(path, literals, filters, fmt, programs, now):
            total += n
            replay.feed(events)
        return total
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        _child_scan(wfd, path, literals, filters, fmt, programs, now, split)
    os.close(wfd)
    frames: queue.SimpleQueue = queue.SimpleQueue()
    reader = threading.Thread(target=_read_frames, args=(rfd, frames), name="scan-child-reader", daemon=True)
    reader.start()
    total = 0
    received = 0  # pieces of the child's part fed so far
    complete = False
    kinds = {k.value: k for k in EventKind}
    done = False
    try:
        for n, events in _fast_chunks(path, literals, filters, fmt, programs, now, 0, split):
            total += n
            replay.feed(events)
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
        done = True
    finally:
        if not done:  # the parent failed: its child's work is moot
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        reader.join()
    if not complete or status != 0:  # the child failed: same pieces, same order, skip those fed
        for i, (n, events) in enumerate(_fast_chunks(path, literals, filters, fmt, programs, now, split, None)):
            if i >= received:
                total += n
                replay.feed(events)
    return total


def scan_files(paths: list[str], cfg: Config, filters: FilterSet | None = None,
               allow: AllowList | None = None, fast: bool = True) -> ScanResult:
    """Read every file whole (.gz too) in order and return lines, matches and resulting bans.

    Fast path: when every filter has prefilter literals (and none accepts multi-line records) and
    the log is syslog-shaped, only the lines holding a literal are parsed; the result is the same
    as parsing every line.
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()  # millions of short-lived acyclic tuples: collector passes would find nothing
    try:
        return _scan_files(paths, cfg, filters, allow, fast)
    finally:
        if gc_was_enabled:
            gc.enable()


def _scan_files(paths: list[str], cfg: Config, filters: FilterSet | None, allow: AllowList | None,
                fast: bool) -> ScanResult:
    t0 = time.perf_counter()
    filters = filters or FilterSet.load(cfg.filters.directories, enabled=cfg.filters.enabled,
                                        disabled=cfg.filters.disabled)
    allow = allow or AllowList(cfg.allowlist.cidrs, include_host=cfg.allowlist.include_host_addresses)
    result = ScanResult()
    replay = BanReplay(cfg, allow)
    now = time.time()
    programs = frozenset(cfg.sources.programs)
    fmt = cfg.sources.format
    literals = filters.search_literals if fast else None
    match = filters.match
    for path in paths:
        if literals is not None and not _looks_like_stderr(path, fmt, programs):
            result.lines += _fast_file(path, literals, filters, fmt, programs, now, replay)
            continue
        parser = RecordParser(fmt, programs=programs)
        events: list[Event] = []
        n = 0
        for line in read_file(path):
            n += 1
            for rec in parser.feed(line):
                ev = match(rec, now)
                if ev is not None:
                    events.append(ev)
        for rec in parser.flush():
            ev = match(rec, now)
            if ev is not None:
                events.append(ev)
        replay.feed(events)
        result.lines += n
    result.matched = replay.matched
    result.bans = replay.bans()
    result.seconds = time.perf_counter() - t0
    return result
