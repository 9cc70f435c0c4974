"""`sipguard scan`: the same formats, filters and policy over whole files, in the log's own time.

Offline and side-effect free: no store, no enforcer, no positions. What it prints is what the
daemon would have banned had it followed these files as they were written.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .addresses import AllowList
from .config import Config
from .filters import FilterSet, trigger_starts
from .formats import RecordParser
from .model import Event, Line
from .policy import Policy
from .sources import read_chunks, read_file

SNIFF_LINES = 200
SNIFF_CHUNK = 1 << 16


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


def _trigger_lines(path: str, literals: tuple[bytes, ...], counter: list[int]) -> Iterator[bytes]:
    """Only the lines that carry a trigger literal, found over big buffers (CR/LF stripped).

    `counter[0]` receives the number of lines read, so the caller can report it.
    """
    for chunk in read_chunks(path):
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
    append = events.append
    for path in paths:
        parser = RecordParser(fmt, programs=programs)
        if literals is not None and not _looks_like_stderr(path, fmt, programs):
            # Each trigger line is a record of its own: fed, then flushed (what parsing every
            # line would give, since the line after it starts a new record or is skipped).
            counter = [0]
            feed, flush = parser.feed, parser.flush
            for data in _trigger_lines(path, literals, counter):
                for rec in feed(Line(path, data, 0)):
                    ev = match(rec, now)
                    if ev is not None:
                        append(ev)
                for rec in flush():
                    ev = match(rec, now)
                    if ev is not None:
                        append(ev)
            result.lines += counter[0]
            continue
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
