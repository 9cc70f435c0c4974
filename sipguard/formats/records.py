"""Records: turn the physical lines of a log file into Kamailio Records (traditional syslog, ISO-8601,
RFC 5424, journalctl short/short-iso text, Kamailio stderr, Kamailio's JSON log engine on stderr or
inside any of the syslog forms), joining continuation lines.

A record is complete when the next one starts; its text is every physical line of it joined with
`\n` (the filters match the whole record, the address anchored at its end, where Kamailio prints
`$si`). A record over MAX_RECORD_CHARS keeps its first part and its last line, so its end stays
Kamailio's. Headers that must not start a record (a forged stderr header, a header of the other
family) are part of the pending record, never a record of their own.

Plain stderr text (`kamailio -E` without the JSON engine) is forgeable: an attacker who guesses a
live (rank, PID) pair can write a whole record with a CR/LF, so it is read only with
`trust_plain_stderr=True` (`[sources] trust_plain_stderr`); otherwise its records are counted
(`untrusted_stderr`), never matched, and a warning points to the JSON engine once. JSON engine
records (kjson.py) are decoded when complete; on stderr, a record carrying a raw field (flag `c`, a
log prefix with text) or cut in two makes its source as forgeable as plain stderr (`unsafe_json`).

Never decides what is an attack and never raises on input: unknown text is counted and skipped.
Never reads a file or chooses which lines to parse: it is fed lines in order (the pipeline does that).
"""

from __future__ import annotations

import calendar
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..model import Line, Record
from . import kjson

log = logging.getLogger("sipguard.formats")

FORMATS = ("auto", "syslog", "traditional", "iso", "short-iso", "journal", "rfc5424", "stderr", "json")
"""Accepted `fmt` values: `auto` detects per line; `syslog` is every syslog-family format but
never stderr; the others accept only that format (`iso`, `short-iso` and `journal` — journalctl
-o short-iso — share one parser; `json` is Kamailio's JSON engine on stderr). A syslog-family
message that is a JSON engine record is decoded in every syslog format."""

MAX_RANKS = 4096
"""Kamailio never runs this many processes; more ranks on one source are forged headers (bounded memory)."""

MAX_RECORD_CHARS = 65536
"""A record never grows past this: an attacker's flood of continuation lines costs bounded memory."""

_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}

# One compiled regex per format; each captures only what a Record needs.
# `Nov 30 01:55:12 host kamailio[123]: msg` (rsyslog pads single-digit days with a space).
_TRADITIONAL = re.compile(
    r"([A-Z][a-z]{2}) {1,2}(\d{1,2}) (\d\d):(\d\d):(\d\d) (\S+) ([^\s\[\]:]+)(?:\[(\d{1,10})\])?: ?(.*)",
    re.S,
)
# RSYSLOG_FileFormat `2026-11-30T02:08:09.376964+00:00 host prog[pid]: msg` and journalctl
# short-iso(-precise) `2026-11-30T02:08:09+0000 host prog[pid]: msg`.
_ISO = re.compile(
    r"(\d{4}-\d\d-\d\dT\d\d:\d\d):(\d\d)(\.\d{1,9})?(Z|[+-]\d\d:?\d\d) (\S+) ([^\s\[\]:]+)"
    r"(?:\[(\d{1,10})\])?: ?(.*)",
    re.S,
)
# RFC 5424: `<PRI>1 TIMESTAMP HOST APP PROCID MSGID SD [MSG]`; SD is `-` or `[...]` elements whose
# quoted values may hold escaped `"`, `\` and `]`.
_RFC5424 = re.compile(
    r"<\d{1,3}>1 (\S+) (\S+) (\S+) (\S+) \S+ "
    r"(?:-|(?:\[[^\]\"]*(?:\"(?:[^\"\\]|\\.)*\"[^\]\"]*)*\])+)(?: (.*))?",
    re.S,
)
_TIMESTAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d):(\d\d)(\.\d{1,9})?(Z|[+-]\d\d:?\d\d)")
# Kamailio's `-E` output: fprintf(stderr, "%2d(%d) %s: ...", process_no, pid, level) — so exactly
# one space before a one-digit rank and none before a longer one. The exact width matters: a
# journal continuation line is indented far more, and must never pass for a stderr header.
_STDERR = re.compile(r"(?: (\d)|([1-9]\d{1,5}))\((\d{1,10})\) (.*)", re.S)


@dataclass(slots=True)
class ParserStats:
    """Counters for `sipguard status` and tests; cheap attribute increments on the hot path.

    Also a read-only mapping of flat integer counters (`dict(stats)`), where `by_format` appears
    as `format.<name>` keys; `as_dict()` keeps it nested.
    """

    lines: int = 0
    records: int = 0
    continuation: int = 0
    garbage: int = 0
    forged: int = 0
    invalid_utf8: int = 0
    other_program: int = 0
    truncated: int = 0
    json_invalid: int = 0  # JSON engine records that cannot be read (cut, not Kamailio's shape): skipped
    untrusted_stderr: int = 0  # plain stderr records read without trust_plain_stderr: never matched
    unsafe_json: int = 0  # stderr JSON records of a source whose raw fields make it forgeable: never matched
    by_format: dict[str, int] = field(default_factory=dict)

    _COUNTERS = ("lines", "records", "continuation", "garbage", "forged", "invalid_utf8",
                 "other_program", "truncated", "json_invalid", "untrusted_stderr", "unsafe_json")

    def keys(self) -> list[str]:
        return [*self._COUNTERS, *(f"format.{k}" for k in self.by_format)]

    def __getitem__(self, key: str) -> int:
        if key in self._COUNTERS:
            return getattr(self, key)
        if key.startswith("format.") and key[7:] in self.by_format:
            return self.by_format[key[7:]]
        raise KeyError(key)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def as_dict(self) -> dict[str, object]:
        return {
            "lines": self.lines, "records": self.records, "continuation": self.continuation,
            "garbage": self.garbage, "forged": self.forged, "invalid_utf8": self.invalid_utf8,
            "other_program": self.other_program, "truncated": self.truncated,
            "json_invalid": self.json_invalid, "untrusted_stderr": self.untrusted_stderr,
            "unsafe_json": self.unsafe_json, "by_format": dict(self.by_format),
        }


_DROPPED = object()  # pending marker: the current record belongs to another program (or is never read)
# the kind of a pending record (its 8th element): plain text, a JSON record after a syslog header,
# a JSON record on stderr
# stderr, a JSON record on stderr that absorbed a forged head (never read: its last message may be
# the forger's)
_PLAIN, _JSYSLOG, _JSTDERR, _JFORGED = None, "j", "s", "f"


class _SourceState:
    """What the parser remembers per source: the record being assembled and stderr's rank→PID map."""

    __slots__ = ("pending", "family", "ranks", "pids", "warned", "indent", "raw", "json")

    def __init__(self) -> None:
        self.pending: list | object | None = None  # [text, time, host, program, pid, rank, source, kind]
        self.family: str | None = None  # "syslog", "stderr" or "json" once a header was accepted
        self.raw = False  # json: a record showed a raw field or was cut in two (sticky)
        self.json = False  # a syslog-family message was a JSON engine record (sticky)
        self.ranks: dict[int, int] = {}  # stderr: rank -> pid
        self.pids: dict[int, int] = {}  # stderr: pid -> rank
        self.warned = False
        self.indent = 0  # journal: column of the message, the indentation of continuation lines


class RecordParser:
    """Line → Record for one or more sources; a record is complete when the next one starts.

    `feed` returns the records a line completed (normally the previous one), `flush` the pending
    one. `pid_alive(pid)` (the daemon checks /proc/PID/comm) lets stderr headers be verified;
    `now()` is used to infer the year of traditional syslog timestamps. `trust_plain_stderr` opts in
    to reading plain stderr text (and stderr JSON with raw fields), which an attacker can forge.
    `on_stderr(source)` replaces the warnings about stderr sources (once per source).
    """

    def __init__(
        self,
        fmt: str = "auto",
        pid_alive: Callable[[int], bool] | None = None,
        *,
        programs: Iterable[str] = ("kamailio",),
        now: Callable[[], float] = time.time,
        on_stderr: Callable[[str], None] | None = None,
        trust_plain_stderr: bool = False,
    ) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")
        self.fmt = fmt
        self.pid_alive = pid_alive
        self.programs = frozenset(programs)
        self.now = now
        self.on_stderr = on_stderr
        self.trust_plain_stderr = trust_plain_stderr
        self.stats = ParserStats()
        self._states: dict[str, _SourceState] = {}
        self._last_source: str | None = None
        self._last_state: _SourceState | None = None
        self._minute_cache: dict[str, float | None] = {}
        self._cache_born = 0.0
        auto = fmt == "auto"
        syslog = auto or fmt == "syslog"
        self._want_trad = syslog or fmt == "traditional"
        self._want_iso = syslog or fmt in ("iso", "short-iso", "journal")
        self._want_5424 = syslog or fmt == "rfc5424"
        self._want_stderr = auto or fmt == "stderr"
        self._want_json = auto or fmt == "json"

    # -- public API ------------------------------------------------------------------------------

    def feed(self, line: Line) -> list[Record]:
        """Records completed by this line (usually none or the previous record)."""
        stats = self.stats
        stats.lines += 1
        data = line.data
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            # Still parse: $si is ASCII, and skipping would let one bad byte hide an attack.
            stats.invalid_utf8 += 1
            text = data.decode("utf-8", "replace")
        source = line.source
        if source == self._last_source:
            st = self._last_state
        else:
            st = self._states.get(source)
            if st is None:
                st = self._states[source] = _SourceState()
            self._last_source, self._last_state = source, st
        assert st is not None

        c = text[:1]
        if c == " ":
            if self._want_stderr and st.family != "syslog" and text[1:2].isdigit():
                m = _STDERR.match(text)
                if m is not None:
                    return self._stderr(st, m, text, source)
            return self._continuation(st, text)
        if "0" <= c <= "9":
            if self._want_iso and text[4:5] == "-":
                m = _ISO.match(text)
                if m is not None:
                    return self._syslog_iso(st, m, text, source)
            elif self._want_stderr and st.family != "syslog":
                m = _STDERR.match(text)
                if m is not None:
                    return self._stderr(st, m, text, source)
        elif c == "<":
            if self._want_5424:
                m = _RFC5424.match(text)
                if m is not None:
                    return self._syslog_5424(st, m, text, source)
        elif "A" <= c <= "Z":
            if self._want_trad:
                m = _TRADITIONAL.match(text)
                if m is not None:
                    return self._syslog_trad(st, m, text, source)
        elif c == "{":
            if self._want_json and st.family != "syslog" and kjson.is_stderr_head(text):
                return self._json_stderr(st, text, source)
        return self._continuation(st, text)

    def parse_alone(self, data: bytes, source: str = "") -> list[Record]:
        """`feed` then `flush` of one line: anything pending, then the line's own record.

        For probes that judge one line on its own, e.g. whether it starts a syslog record (where
        `sipguard scan` may cut a file in two).
        """
        done = self.feed(Line(source, data, 0))
        done += self.flush()
        return done

    def family(self, source: str) -> str | None:
        """"syslog", "stderr" or "json" (Kamailio's JSON engine on stderr) once a header of that
        family started a record of `source`, else None.

        Sticky: once set, headers of the other family are only ever continuation text.
        """
        st = self._states.get(source)
        return None if st is None else st.family

    def has_json(self, source: str) -> bool:
        """Whether a record of `source` was Kamailio's JSON engine (stderr form, or a syslog message)."""
        st = self._states.get(source)
        if st is None:
            return False
        p = st.pending
        return st.json or st.family == "json" or (isinstance(p, list) and p[7] is not None)

    def pending(self, source: str) -> object:
        """An opaque token for the record `source` has pending: it changes when a header line ends
        that record and starts another (continuation and garbage lines keep it), except between two
        records of other programs in a row, which both yield nothing."""
        st = self._states.get(source)
        return None if st is None else st.pending

    def flush(self) -> list[Record]:
        """Every pending record (end of a read batch, or EOF when scanning offline)."""
        out = []
        for st in self._states.values():
            pending = st.pending
            st.pending = None
            if pending is not None and pending is not _DROPPED:
                rec = self._finish(st, pending)  # type: ignore[arg-type]
                if rec is not None:
                    out.append(rec)
        return out

    # -- per-format handlers ----------------------------------------------------------------------

    def _continuation(self, st: _SourceState, text: str) -> list[Record]:
        """A line without a header: part of the pending record, or garbage when none is pending."""
        pending = st.pending
        # In the syslog family only journalctl's indented lines continue a message (rsyslog
        # escapes control characters); anything else there is garbage, e.g. `-- Boot ... --`.
        if pending is None or (st.family == "syslog" and text[:1] != " "):
            self.stats.garbage += 1
            return []
        self.stats.continuation += 1
        if pending is _DROPPED:
            return []
        if st.family == "syslog":
            n = st.indent
            text = text[n:] if text[:n].isspace() else text.lstrip(" ")
        return self._append(pending, text)  # type: ignore[arg-type]

    def _start(self, st: _SourceState, new: list | object, family: str, fmt: str) -> list[Record]:
        """A header line: it completes the pending record and becomes the new pending one."""
        stats = self.stats
        stats.by_format[fmt] = stats.by_format.get(fmt, 0) + 1
        if st.family != family:
            st.family = family
        old = st.pending
        st.pending = new
        if old is None or old is _DROPPED:
            return []
        rec = self._finish(st, old)  # type: ignore[arg-type]
        return [] if rec is None else [rec]

    def _finish(self, st: _SourceState, p: list) -> Record | None:
        """The Record of a complete pending record ([text, time, host, program, pid, rank, source,
        kind]), or None when it is not read (a JSON record that cannot be, an unsafe source's)."""
        kind = p[7]
        if kind is _PLAIN:
            self.stats.records += 1
            return Record(p[0], p[1], p[2], p[3], p[4], p[5], p[6])
        if kind is _JFORGED:  # a plain stderr header inside: a raw field's CR/LF split this record
            st.raw = True
            self.stats.unsafe_json += 1
            return None
        if kind is _JSYSLOG and "\n" in p[0]:
            # a raw field's CR/LF cut it (journalctl text): its message, on the last line, may hold
            # literals its first line does not show, which a sparse reader skips: never read
            self.stats.unsafe_json += 1
            return None
        d = kjson.decode(p[0])
        if d is None:
            self.stats.json_invalid += 1
            return None
        st.json = True
        if kind is _JSTDERR:
            if d.raw or "\n" in p[0]:
                st.raw = True  # raw text, or a record cut in two: framing is forgeable on stderr
            if st.raw and not self.trust_plain_stderr:
                self.stats.unsafe_json += 1
                self._warn_untrusted(st, p[6], json_raw=True)
                return None
        self.stats.records += 1
        return Record(d.text, d.time if p[1] is None else p[1], p[2] if d.host is None else d.host,
                      p[3], d.pid if d.pid is not None else p[4], d.rank if d.rank is not None else p[5], p[6])

    def _warn_untrusted(self, st: _SourceState, source: str, json_raw: bool = False) -> None:
        """Once per source: its stderr records are not read without trust_plain_stderr."""
        if st.warned:
            return
        st.warned = True
        if self.on_stderr is not None:
            self.on_stderr(source)
        elif json_raw:
            log.warning(
                "source %s is Kamailio's JSON log engine on stderr with raw fields (flag c, or a log_prefix "
                "holding text): an attacker can forge records there, so they are not read. Drop flag c and "
                "log_prefix or use --log-engine=json:UM (see README), or set [sources] trust_plain_stderr "
                "= true to accept the risk", source or "?")
        else:
            log.warning(
                "source %s is plain Kamailio stderr text: an attacker can forge whole records there, so they "
                "are not read. Run Kamailio with --log-engine=json:UM (see README), or set [sources] "
                "trust_plain_stderr = true to accept the risk", source or "?")

    def _forged_into_pending(self, st: _SourceState, text: str) -> list[Record]:
        """A header that must not start a record (forged or of the other family): continuation.

        In Kamailio's JSON engine only a raw field (flag c, a log prefix) can put such a line into
        a record, and a whole forged line there could end up read as its message: such a record is
        never read, and its source is as forgeable as plain stderr from then on (`unsafe_json`)."""
        self.stats.forged += 1
        pending = st.pending
        if pending is None or pending is _DROPPED:
            self.stats.garbage += 1
            return []
        if st.family == "json":
            pending[7] = _JFORGED  # type: ignore[index]
        return self._append(pending, text)  # type: ignore[arg-type]

    def _append(self, pending: list, text: str) -> list[Record]:
        """One more physical line of the pending record, within MAX_RECORD_CHARS: past it, the
        record keeps its first half and this last line (its end, where Kamailio prints $si)."""
        body = pending[0]
        if len(body) + len(text) + 1 > MAX_RECORD_CHARS:
            self.stats.truncated += 1
            half = MAX_RECORD_CHARS // 2
            pending[0] = body[:half] + "\n" + text[-(half - 1):]
            return []
        pending[0] = body + "\n" + text
        return []

    def _other_program(self, st: _SourceState, fmt: str) -> list[Record]:
        """Another program's header: it ends the pending record, and its own lines are dropped."""
        self.stats.other_program += 1
        return self._start(st, _DROPPED, "syslog", fmt)

    def _is_kamailio(self, prog: str) -> bool:
        """A path-like program name (Debian 13's stock unit logs as `/usr/sbin/kamailio`, its argv[0])
        whose basename is one of the configured programs."""
        return "/" in prog and prog.rpartition("/")[2] in self.programs

    def _syslog_trad(self, st: _SourceState, m: re.Match, text: str, source: str) -> list[Record]:
        if st.family == "stderr" or st.family == "json":
            return self._forged_into_pending(st, text)
        host, prog, pid, msg = m.group(6, 7, 8, 9)
        if prog not in self.programs and not self._is_kamailio(prog):
            return self._other_program(st, "traditional")
        st.indent = m.start(9)
        return self._start(st, [msg, self._trad_time(text, m), host, prog, int(pid) if pid else None, None,
                                source, _JSYSLOG if msg[:1] in "{@" and kjson.is_json_message(msg) else None],
                           "syslog", "traditional")

    def _syslog_iso(self, st: _SourceState, m: re.Match, text: str, source: str) -> list[Record]:
        if st.family == "stderr" or st.family == "json":
            return self._forged_into_pending(st, text)
        minute, ss, frac, off, host, prog, pid, msg = m.groups()
        fmt = "short-iso" if len(off) == 5 else "iso"  # journalctl prints +0000, rsyslog +00:00
        if prog not in self.programs and not self._is_kamailio(prog):
            return self._other_program(st, fmt)
        ts = self._iso_time(minute, ss, frac, off)
        st.indent = m.start(8)
        return self._start(st, [msg, ts, host, prog, int(pid) if pid else None, None, source,
                                _JSYSLOG if msg[:1] in "{@" and kjson.is_json_message(msg) else None],
                           "syslog", fmt)

    def _syslog_5424(self, st: _SourceState, m: re.Match, text: str, source: str) -> list[Record]:
        if st.family == "stderr" or st.family == "json":
            return self._forged_into_pending(st, text)
        stamp, host, prog, procid, msg = m.groups()
        if prog not in self.programs and not self._is_kamailio(prog):
            return self._other_program(st, "rfc5424")
        ts = None
        if stamp != "-":
            t = _TIMESTAMP.fullmatch(stamp)
            if t is not None:
                ts = self._iso_time(*t.groups())
        msg = msg or ""
        if msg[:1] == " ":  # rsyslog keeps the space Kamailio's syslog() message starts with
            msg = msg[1:]
        if msg[:1] == "\ufeff":
            msg = msg[1:]
        st.indent = 0
        return self._start(
            st,
            [msg, ts, None if host == "-" else host, prog, int(procid) if procid.isdigit() else None,
             None, source, _JSYSLOG if msg[:1] in "{@" and kjson.is_json_message(msg) else None],
            "syslog", "rfc5424",
        )

    def _stderr(self, st: _SourceState, m: re.Match, text: str, source: str) -> list[Record]:
        if st.family == "syslog" or st.family == "json":
            return self._forged_into_pending(st, text)
        r1, r2, p, msg = m.groups()
        rank = int(r1 or r2)
        pid = int(p)
        if not self._stderr_genuine(st, rank, pid):
            return self._forged_into_pending(st, text)
        if not self.trust_plain_stderr:
            self.stats.untrusted_stderr += 1
            self._warn_untrusted(st, source)
            return self._start(st, _DROPPED, "stderr", "stderr")
        if not st.warned:
            st.warned = True
            if self.on_stderr is not None:  # the caller reports it its own way
                self.on_stderr(source)
            else:
                log.warning(
                    "source %s is Kamailio stderr output: it has no timestamps and lets SIP text forge "
                    "lines; prefer Kamailio's JSON log engine or syslog", source or "?")
        return self._start(st, [msg, None, None, None, pid, rank, source, None], "stderr", "stderr")

    def _json_stderr(self, st: _SourceState, text: str, source: str) -> list[Record]:
        """A line starting a record of Kamailio's JSON engine on stderr (`{ "idx": ...` or CEE),
        decoded when complete.

        Every such line starts a record, whatever its (idx, pid): Kamailio escapes the message, and
        the raw fields' CR/LF come from folded SIP headers, so the line after one starts with a space
        (a continuation). No rank/PID check, so records written before a Kamailio restart, or read
        long after, are not taken for forgeries."""
        if st.family == "stderr":
            return self._forged_into_pending(st, text)
        return self._start(st, [text, None, None, None, None, None, source, _JSTDERR], "json", "json")

    def _stderr_genuine(self, st: _SourceState, rank: int, pid: int) -> bool:
        """Whether a stderr header can be Kamailio's own rather than text copied from a SIP message.

        A rank keeps its PID and a PID its rank for the life of a Kamailio instance; with
        `pid_alive`, the PID must also be a running kamailio. A restart changes every PID: a new
        live PID for a rank whose old PID is gone resets the map.
        """
        ranks = st.ranks
        known = ranks.get(rank)
        if known == pid:
            return True
        alive = self.pid_alive
        if known is None:
            if st.pids.get(pid, rank) != rank or len(ranks) >= MAX_RANKS:
                return False  # this PID already speaks for another rank
            if alive is not None and not alive(pid):
                return False
            ranks[rank] = pid
            st.pids[pid] = rank
            return True
        # Known rank, other PID: a forgery, unless Kamailio restarted (only provable with pid_alive).
        if alive is not None and alive(pid) and not alive(known):
            ranks.clear()
            st.pids.clear()
            ranks[rank] = pid
            st.pids[pid] = rank
            return True
        return False

    # -- timestamps -------------------------------------------------------------------------------

    def _trad_time(self, text: str, m: re.Match) -> float | None:
        """Epoch of a `_TRADITIONAL` header's timestamp; its minute is computed once and cached."""
        key = text[: m.end(4)]
        base = self._minute_cache.get(key, 0.0)
        if base == 0.0:
            mon, day, hh, mi = m.group(1, 2, 3, 4)
            base = self._trad_minute(key, mon, int(day), int(hh), int(mi))
        return None if base is None else base + int(m.group(5))

    def _trad_minute(self, key: str, mon: str, day: int, hh: int, mi: int) -> float | None:
        """Epoch of a `Mmm dd HH:MM` local minute; the year is this year unless that is > 1 day ahead."""
        month = _MONTHS.get(mon)
        now = self.now()
        if len(self._minute_cache) > 4096 or now - self._cache_born > 3600:
            self._minute_cache.clear()
            self._cache_born = now
        if month is None:
            base = None
        else:
            year = time.localtime(now).tm_year
            try:
                base = time.mktime((year, month, day, hh, mi, 0, 0, 0, -1))
                if base - now > 86400:
                    base = time.mktime((year - 1, month, day, hh, mi, 0, 0, 0, -1))
            except (OverflowError, ValueError):
                base = None
        self._minute_cache[key] = base
        return base

    def _iso_time(self, minute: str, ss: str, frac: str | None, off: str) -> float | None:
        key = minute + off
        base = self._minute_cache.get(key, 0.0)
        if base == 0.0:
            try:
                y, mo, d = int(minute[0:4]), int(minute[5:7]), int(minute[8:10])
                base = float(calendar.timegm((y, mo, d, int(minute[11:13]), int(minute[14:16]), 0)))
                if off != "Z":
                    sign = -1 if off[0] == "-" else 1
                    base -= sign * (int(off[1:3]) * 3600 + int(off[-2:]) * 60)
                if not 1 <= mo <= 12:
                    base = None
            except (ValueError, OverflowError):
                base = None
            if len(self._minute_cache) > 4096:
                self._minute_cache.clear()
            self._minute_cache[key] = base
        if base is None:
            return None
        ts = base + int(ss)
        if frac:
            ts += float(frac)
        return ts
