"""`sipguard scan`: the same formats, filters and policy over whole files, in the log's own time.

Offline and side-effect free: no store, no enforcer, no positions. What it prints is what the
daemon would have banned had it followed these files as they were written.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .addresses import AllowList
from .config import Config
from .filters import FilterSet, trigger_starts
from .formats import RecordParser
from .model import Event, EventKind, Line
from .policy import Policy
from .sources import read_chunks, read_file

SNIFF_LINES = 200
SNIFF_CHUNK = 1 << 16
PARALLEL_MIN = 16 << 20
"""A plain file at least this big is scanned by two processes (one forked), each over half of it."""


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


def scan_events(events: Iterable[Event], cfg: Config, allow: AllowList) -> list[ScanBan]:
    """Run the policy over events in log time; a ban ends when its (log-time) duration is over."""
    policy = Policy(cfg.policy, allow)
    per_ip_filters: dict[str, set[str]] = {}
    per_ip_events: dict[str, int] = {}
    expires: dict[str, float | None] = {}
    bans: dict[str, ScanBan] = {}
    for ev in events:
        if ev.kind.value != "success":
            per_ip_filters.setdefault(ev.ip, set()).add(ev.filter)
            per_ip_events[ev.ip] = per_ip_events.get(ev.ip, 0) + 1
        if ev.ip in policy.banned:
            end = expires.get(ev.ip)
            if end is not None and ev.time >= end:
                policy.release(ev.ip)
        d = policy.observe(ev)
        if d is None:
            continue
        expires[d.ip] = None if d.duration is None else d.time + d.duration
        if d.ip in bans:
            b = bans[d.ip]
            b.bans += 1
            b.score = max(b.score, d.score)
        else:
            bans[d.ip] = ScanBan(d.ip, [], 0, d.score, d.reason, d.time)
    out = []
    for ip, b in bans.items():
        b.filters = sorted(per_ip_filters.get(ip, ()))
        b.events = per_ip_events.get(ip, 0)
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


def _trigger_lines(path: str, literals: tuple[bytes, ...], counter: list[int],
                   start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """Only the lines that carry a trigger literal, found over big buffers (CR/LF stripped).

    `counter[0]` receives the number of lines read, so the caller can report it.
    """
    for chunk in read_chunks(path, start=start, end=end):
        counter[0] += chunk.count(b"\n") + (0 if chunk.endswith(b"\n") else 1)
        find = chunk.find
        size = len(chunk)
        for start in trigger_starts(chunk, literals):
            end = find(b"\n", start)
            if end < 0:
                end = size
            data = chunk[start:end]
            if data[-1:] == b"\r":
                data = data[:-1]
            yield data


def _fast_part(path: str, literals: tuple[bytes, ...], filters: FilterSet, fmt: str,
               programs: frozenset[str], now: float, start: int = 0, end: int | None = None
               ) -> tuple[int, list[Event]]:
    """(lines, events) of one byte range: each trigger line is a record of its own, fed then
    flushed (what parsing every line gives, since the next line starts a new record or is skipped)."""
    parser = RecordParser(fmt, programs=programs)
    feed, flush, match = parser.feed, parser.flush, filters.match
    events: list[Event] = []
    counter = [0]
    for data in _trigger_lines(path, literals, counter, start, end):
        for rec in feed(Line(path, data, 0)) + flush():
            ev = match(rec, now)
            if ev is not None:
                events.append(ev)
    return counter[0], events


def _split_point(path: str) -> int | None:
    """Where a plain, big file can be cut in two at a line boundary (None: don't split)."""
    if (os.cpu_count() or 1) < 2 or not hasattr(os, "fork"):
        return None
    try:
        size = os.path.getsize(path)
        if size < PARALLEL_MIN or os.path.splitext(path)[1].lower() in (".gz", ".bz2", ".xz", ".lzma"):
            return None
        with open(path, "rb") as f:
            f.seek(size // 2)
            window = f.read(2 << 20)
    except OSError:
        return None
    nl = window.find(b"\n")
    return None if nl < 0 else size // 2 + nl + 1


def _fast_file(path: str, literals: tuple[bytes, ...], filters: FilterSet, fmt: str,
               programs: frozenset[str], now: float) -> tuple[int, list[Event]]:
    """The fast path over one file, the second half in a forked child when the file is big."""
    split = _split_point(path)
    if split is None:
        return _fast_part(path, literals, filters, fmt, programs, now)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: scan the second half, send (lines, event tuples) back, never return
        code = 1
        try:
            os.close(rfd)
            n, evs = _fast_part(path, literals, filters, fmt, programs, now, split, None)
            payload = pickle.dumps((n, [(e.time, e.ip, e.filter, e.kind.value, e.weight) for e in evs]),
                                   protocol=pickle.HIGHEST_PROTOCOL)
            with os.fdopen(wfd, "wb") as w:
                w.write(payload)
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    try:
        n1, first = _fast_part(path, literals, filters, fmt, programs, now, 0, split)
    finally:
        with os.fdopen(rfd, "rb") as r:
            payload = r.read()
        _, status = os.waitpid(pid, 0)
    if status != 0 or not payload:  # the child failed: do its half here
        n2, second = _fast_part(path, literals, filters, fmt, programs, now, split, None)
    else:
        n2, rows = pickle.loads(payload)
        second = [Event(t, ip, f, EventKind(k), w) for t, ip, f, k, w in rows]
    return n1 + n2, first + second


def scan_files(paths: list[str], cfg: Config, filters: FilterSet | None = None,
               allow: AllowList | None = None, fast: bool = True) -> ScanResult:
    """Read every file whole (.gz too) in order and return lines, matches and resulting bans.

    Fast path: when every filter has prefilter literals (and none accepts multi-line records) and
    the log is syslog-shaped, only the lines holding a literal are parsed; the result is the same
    as parsing every line.
    """
    t0 = time.perf_counter()
    filters = filters or FilterSet.load(cfg.filters.directories, enabled=cfg.filters.enabled,
                                        disabled=cfg.filters.disabled)
    allow = allow or AllowList(cfg.allowlist.cidrs, include_host=cfg.allowlist.include_host_addresses)
    result = ScanResult()
    events: list[Event] = []
    now = time.time()
    programs = frozenset(cfg.sources.programs)
    fmt = cfg.sources.format
    literals = filters.search_literals if fast else None
    match = filters.match
    for path in paths:
        if literals is not None and not _looks_like_stderr(path, fmt, programs):
            n, evs = _fast_file(path, literals, filters, fmt, programs, now)
            events.extend(evs)
            result.lines += n
            continue
        parser = RecordParser(fmt, programs=programs)
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
        result.lines += n
    result.matched = len(events)
    result.bans = scan_events(events, cfg, allow)
    result.seconds = time.perf_counter() - t0
    return result
