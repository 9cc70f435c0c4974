"""The pipeline: whole lines in, Records (formats/) and Events (filters/) out, for every reader.

The daemon (`batch` per poll, flushed), `sipguard scan` (`batch` per piece of a file, `flush` at its
end), `sipguard test-filter` (`verdicts`: every record with what each filter says) and the corpus
tests all read through here, so they parse alike. Input is a LineBatch (segments of whole lines,
sources/) or plain Lines; each source has its parser (a Parser of formats/).

Sparse reading. When every active filter has prefilter literals (`FilterSet.search_literals` is
not None), only a record whose first line holds a literal can yield an event (prefilters are looked
for on a record's first line; the record itself may span lines and is matched whole). Then only the
lines of a LineBatch that can matter are parsed, and the events are exactly those of parsing every
line:

- syslog-family sources (RecordParser): the lines holding a literal, found by one search pass
  (`trigger_lines`) that also marks the lines starting with a space, in the syslog family the only
  lines that continue a record. While the record of a literal line is pending ("hot"), the lines
  after it are parsed until it ends, unless the next marked line holds a literal and does not start
  with a space: nothing in between can continue the record, so reading jumps there (and when that
  line did not start a record, the lines jumped over are parsed after all: one of them may have
  ended the hot record). A source's first lines are parsed one by one until its family is known. So
  a hot record gets exactly its lines and ends where it would, and the events come in the order of
  parsing every line. A record that began on a literal line is tried only against that line's
  candidate filters (`FilterSet.candidates`); one that began on a line without literal cannot
  match and is not tried.
- Kamailio stderr sources, plain text or the JSON engine's stderr form: every line (continuations
  and the rank/PID checks need them).
- syslog-family lines whose message is a JSON engine record are found by the same search: the
  message is in the raw line (escaped only where a shipped literal has no character), so a literal
  of the decoded record's first line is in the raw line too, provided `FilterSet.json_safe`;
  when it is not, a source once it showed a JSON record is read every line.
- journal JSON sources (JournalParser, one entry per line): the lines holding a literal, and every
  line whose MESSAGE could hide one from a byte search: a line holding a backslash (a JSON escape
  anywhere), `"MESSAGE"` followed by `:` and `[` (journalctl's byte-array form, for control
  characters), or a NUL, `FE FF` or `FF FE` byte (what json.loads would read as UTF-16/32).
- plain Lines, sources with another parser, and `sparse=False`: every line.

Loss notices (journald's "Suppressed N messages", rsyslog's rate-limit messages) in a LineBatch are
counted by `losses` (formats/losses.py) before any parsing, whether or not the lines are parsed.

Never reads a file or a follower, never touches the store or the policy: it is handed lines and
hands back events, records and counts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from .filters import FilterSet, Verdict, trigger_lines
from .formats import JournalParser, Parser, RecordParser
from .formats.losses import LossNotices
from .model import Event, Line, Record
from .sources import LineBatch

CONTINUATION = b"\n "
"""Searched with the literals: marks the lines (after a segment's first) that start with a space."""
JSON_MARKERS = (b"\\", b"\x00", b"\xfe\xff", b"\xff\xfe")
"""Bytes that make a journal JSON line be parsed whatever literals it shows (see the module doc)."""
_BYTE_ARRAY_MESSAGE = re.compile(rb'"MESSAGE"[ \t\n\r]*:[ \t\n\r]*\[')
_ALL = -1  # start mask of a record whose first line's literals are not known: try every filter


@dataclass(slots=True)
class BatchResult:
    """What one call made of its input."""

    events: list[Event] = field(default_factory=list)
    lines: int = 0  # lines in the input (parsed or not)
    records: int = 0  # records completed
    parsed: int = 0  # lines handed to a parser


class _Everywhere(Mapping[str, Parser]):
    """One parser for every source (scan, test-filter, the corpus tests): a mapping for lookups only."""

    def __init__(self, parser: Parser) -> None:
        self.parser = parser

    def __getitem__(self, source: str) -> Parser:
        return self.parser

    def get(self, source: str, default: object = None) -> Parser:  # type: ignore[override]
        return self.parser

    def __contains__(self, source: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


class Pipeline:
    """Lines -> Records -> Events with one parser per source and one FilterSet.

    `parsers` maps a source to its parser (the daemon's dict, which may grow: lines of a source
    without a parser are counted, not parsed), or is one parser for every source. State (pending
    records, what is known of them) lasts across calls until `flush`. Counters over its life:
    `n_lines` (read), `n_parsed` (lines fed to a parser), `n_records`, `n_events`.
    """

    def __init__(self, parsers: Mapping[str, Parser] | Parser, filters: FilterSet | None = None, *,
                 sparse: bool = True) -> None:
        self.parsers: Mapping[str, Parser] = parsers if isinstance(parsers, Mapping) else _Everywhere(parsers)
        self.filters = filters if filters is not None else FilterSet(())
        lits = self.filters.search_literals if sparse else None
        self.sparse = lits is not None
        """True when LineBatches are read sparsely (see the module doc)."""
        self._lits = lits or ()
        self._lit_bits = (1 << len(self._lits)) - 1
        self._cont_bit = 1 << len(self._lits)
        self._syslog_search = (*self._lits, CONTINUATION)
        self._json_search = (*self._lits, *JSON_MARKERS)
        self._json_safe = self.filters.json_safe
        self._start: dict[str, int] = {}  # per source: literal mask of the line its pending record began on
        self._fed: dict[str, Parser] = {}  # sources fed since the last flush, in first-fed order
        self.n_lines = self.n_parsed = self.n_records = self.n_events = 0
        self.losses = LossNotices()  # lines lost before they reached us, as journald / rsyslog say

    # -- entry points --------------------------------------------------------------------------

    def batch(self, lines: LineBatch | Iterable[Line], now: float, *, flush: bool = True) -> BatchResult:
        """The events of `lines` (in the order parsing every line gives them), then, unless
        `flush=False` (more of the same input follows), those of the records still pending."""
        res = BatchResult()
        if isinstance(lines, LineBatch):
            for seg in lines.segments:
                self.losses.scan(seg[2])
        if self.sparse and isinstance(lines, LineBatch):
            parsers = self.parsers
            for src, off, data in lines.segments:
                p = parsers.get(src)
                if p is None:
                    continue
                if src not in self._fed:
                    self._fed[src] = p
                kind = type(p)
                if kind is RecordParser:
                    self._syslog_segment(src, off, data, p, now, res)  # type: ignore[arg-type]
                elif kind is JournalParser:
                    self._journal_segment(src, off, data, p, now, res)
                else:
                    self._every_line(LineBatch([(src, off, data)]), now, res)
            res.lines = len(lines)
        else:
            res.lines = self._every_line(lines, now, res)
        if flush:
            self._flush(now, res)
        self._count(res)
        return res

    def flush(self, now: float) -> BatchResult:
        """The events of every pending record (the end of the input)."""
        res = BatchResult()
        self._flush(now, res)
        self._count(res)
        return res

    def records(self, lines: LineBatch | Iterable[Line]) -> Iterator[Record]:
        """Every record of `lines`, every line parsed, in order; flushed at the end of the input."""
        parsers, fed, start = self.parsers, self._fed, self._start
        n = parsed = made = 0
        try:
            for line in lines:
                n += 1
                src = line.source
                p = parsers.get(src)
                if p is None:
                    continue
                if src not in fed:
                    fed[src] = p
                start[src] = _ALL
                parsed += 1
                for rec in p.feed(line):
                    made += 1
                    yield rec
            for p in self._flushing():
                for rec in p.flush():
                    made += 1
                    yield rec
        finally:
            self.n_lines += n
            self.n_parsed += parsed
            self.n_records += made

    def verdicts(self, lines: LineBatch | Iterable[Line]) -> Iterator[tuple[Record, list[Verdict]]]:
        """Every record of `lines` (as `records`) with what each active filter makes of it, for
        `sipguard test-filter`, which also shows the records no filter matched."""
        explain = self.filters.explain
        for rec in self.records(lines):
            yield rec, explain(rec)

    # -- internals -----------------------------------------------------------------------------

    def _count(self, res: BatchResult) -> None:
        self.n_lines += res.lines
        self.n_parsed += res.parsed
        self.n_records += res.records
        self.n_events += len(res.events)

    def _flushing(self) -> list[Parser]:
        """The parsers to flush (each once), forgetting what was pending."""
        out: list[Parser] = []
        for p in self._fed.values():
            if not any(p is q for q in out):
                out.append(p)
        self._fed.clear()
        self._start.clear()
        return out

    def _flush(self, now: float, res: BatchResult) -> None:
        start = self._start.copy()
        events = res.events
        match, candidates = self.filters.match, self.filters.candidates
        for p in self._flushing():
            for rec in p.flush():
                res.records += 1
                m = start.get(rec.source, _ALL)
                if m:
                    ev = match(rec, now, None if m < 0 else candidates(m))
                    if ev is not None:
                        events.append(ev)

    def _every_line(self, lines: Iterable[Line], now: float, res: BatchResult) -> int:
        """Feed every line; records tried against every filter. Returns the number of lines."""
        parsers, fed, start = self.parsers, self._fed, self._start
        match = self.filters.match
        events = res.events
        n = parsed = made = 0
        last: str | None = None
        p: Parser | None = None
        for line in lines:
            n += 1
            src = line.source
            if src != last:
                last = src
                p = parsers.get(src)
                if p is not None:
                    if src not in fed:
                        fed[src] = p
                    start[src] = _ALL
            if p is None:
                continue
            parsed += 1
            for rec in p.feed(line):
                made += 1
                ev = match(rec, now)
                if ev is not None:
                    events.append(ev)
        res.parsed += parsed
        res.records += made
        return n

    def _syslog_segment(self, src: str, off: int, data: bytes, p: RecordParser, now: float,
                        res: BatchResult) -> None:
        """One segment of a RecordParser source, read sparsely (see the module doc)."""
        family = p.family(src)
        if family == "stderr" or family == "json" or (not self._json_safe and p.has_json(src)):
            self._every_line(LineBatch([(src, off, data)]), now, res)
            return
        lit_bits, cont = self._lit_bits, self._cont_bit
        starts, masks = trigger_lines(data, self._syslog_search)
        if data[:1] == b" ":  # the segment's first line starts with a space: no newline marks it
            if starts and starts[0] == 0:
                masks[0] |= cont
            else:
                starts.insert(0, 0)
                masks.insert(0, cont)
        start = self._start
        hot = start.get(src, 0)  # literal mask of the pending record's first line; 0: it cannot match
        if family is not None and not any(m & cont for m in masks):
            start[src] = self._syslog_plain(src, off, data, p, now, res, starts, masks, hot)
            return
        n = len(starts)
        size = len(data)
        find = data.find
        pending, feed = p.pending, p.feed
        match, candidates = self.filters.match, self.filters.candidates
        events = res.events
        k = pos = 0
        parsed = made = 0
        token = pending(src)
        while True:
            jumped = False
            if family is None or (hot and not (k < n and masks[k] & lit_bits and not masks[k] & cont)):
                # the next line, whatever it holds: the family is not known yet, or a hot record is
                # pending and the next marked line may continue it (or none is left in this segment)
                if pos >= size:
                    break
                if k < n and starts[k] == pos:
                    mask = masks[k] & lit_bits
                    k += 1
                else:
                    mask = 0
            else:
                # jump to the next line holding a literal: the lines in between can neither continue
                # a record (none starts with a space) nor, being without literal, start one that matches
                while k < n and not masks[k] & lit_bits:
                    k += 1
                if k == n:
                    break
                jumped = bool(hot) and starts[k] > pos
                gap = pos
                pos = starts[k]
                mask = masks[k] & lit_bits
                k += 1
            ls = pos
            e = find(b"\n", pos)
            pos = size if e < 0 else e + 1
            ln = data[ls:size if e < 0 else e]
            if ln[-1:] == b"\r":
                ln = ln[:-1]
            recs = feed(Line(src, ln, off + pos))
            parsed += 1
            if recs:
                made += len(recs)
                if hot:
                    pool = None if hot < 0 else candidates(hot)
                    for rec in recs:
                        ev = match(rec, now, pool)
                        if ev is not None:
                            events.append(ev)
            after = pending(src)
            if after is not token:
                hot = mask
                token = after
            elif jumped:
                hot = self._replay(src, off, data, p, now, res, gap, ls, hot)
                token = pending(src)
            if family is None:
                family = p.family(src)
                if family == "stderr" or family == "json" or (not self._json_safe and p.has_json(src)):
                    # from here on, every line
                    start[src] = _ALL if hot else 0
                    res.parsed += parsed
                    res.records += made
                    if pos < size:
                        self._every_line(LineBatch([(src, off + pos, data[pos:])]), now, res)
                    return
        start[src] = hot
        res.parsed += parsed
        res.records += made

    def _syslog_plain(self, src: str, off: int, data: bytes, p: RecordParser, now: float, res: BatchResult,
                      starts: list[int], masks: list[int], hot: int) -> int:
        """`_syslog_segment` for the usual segment: the family is known and no line starts with a
        space, so no record goes on past its first line, and every marked line holds a literal.
        Those lines are parsed; the lines between only to find where a hot record ended when the
        next marked line did not start a record (`_replay`); after the last, lines until the hot
        record ends. Returns the start mask of the record left pending."""
        size = len(data)
        find = data.find
        pending, feed = p.pending, p.feed
        match, candidates = self.filters.match, self.filters.candidates
        events = res.events
        pos = parsed = made = 0
        token = pending(src)
        for ls, mask in zip(starts, masks):
            gap = pos
            e = find(b"\n", ls)
            pos = size if e < 0 else e + 1
            ln = data[ls:size if e < 0 else e]
            if ln[-1:] == b"\r":
                ln = ln[:-1]
            recs = feed(Line(src, ln, off + pos))
            parsed += 1
            if recs:
                made += len(recs)
                if hot:
                    pool = None if hot < 0 else candidates(hot)
                    for rec in recs:
                        ev = match(rec, now, pool)
                        if ev is not None:
                            events.append(ev)
            after = pending(src)
            if after is not token:
                hot = mask
                token = after
            elif hot and ls > gap:
                hot = self._replay(src, off, data, p, now, res, gap, ls, hot)
                token = pending(src)
        res.parsed += parsed
        res.records += made
        if hot and pos < size:  # the lines after the last marked one, until the hot record ends
            hot = self._replay(src, off, data, p, now, res, pos, size, hot, until_new=True)
        return hot

    def _replay(self, src: str, off: int, data: bytes, p: RecordParser, now: float, res: BatchResult,
                a: int, b: int, hot: int, until_new: bool = False) -> int:
        """Feed the lines of data[a:b], none holding a literal or starting with a space, while a
        hot record is pending; returns the start mask after them (0 once one of them started a
        record). With `until_new`, stop after the line that started one.

        Used when a jump over such lines landed on a line that did not start a record: one of the
        lines jumped over may have ended the hot record. Fed now, after that line (which changed
        nothing), they leave the parser as parsing every line in order would have, and the hot
        record's event comes out where it would have.
        """
        find = data.find
        pending, feed = p.pending, p.feed
        match, candidates = self.filters.match, self.filters.candidates
        events = res.events
        parsed = made = 0
        token = pending(src)
        q = a
        while q < b:
            e = find(b"\n", q, b)
            nxt = b if e < 0 else e + 1
            ln = data[q:b if e < 0 else e]
            if ln[-1:] == b"\r":
                ln = ln[:-1]
            recs = feed(Line(src, ln, off + nxt))
            parsed += 1
            q = nxt
            if recs:
                made += len(recs)
                if hot:
                    pool = None if hot < 0 else candidates(hot)
                    for rec in recs:
                        ev = match(rec, now, pool)
                        if ev is not None:
                            events.append(ev)
            after = pending(src)
            if after is not token:
                hot = 0
                token = after
                if until_new:
                    break
        res.parsed += parsed
        res.records += made
        return hot

    def _journal_segment(self, src: str, off: int, data: bytes, p: JournalParser, now: float,
                         res: BatchResult) -> None:
        """One segment of journal JSON lines: those holding a literal or a marker (see the module doc)."""
        lit_bits = self._lit_bits
        starts, masks = trigger_lines(data, self._json_search)
        arrays = [data.rfind(b"\n", 0, m.start()) + 1 for m in _BYTE_ARRAY_MESSAGE.finditer(data)]
        if arrays:
            marked = dict(zip(starts, masks))
            for ls in arrays:
                marked[ls] = marked.get(ls, 0) | ~lit_bits
            starts = sorted(marked)
            masks = [marked[s] for s in starts]
        size = len(data)
        find = data.find
        match, candidates = self.filters.match, self.filters.candidates
        events = res.events
        made = 0
        for ls, mask in zip(starts, masks):
            e = find(b"\n", ls)
            nxt = size if e < 0 else e + 1
            ln = data[ls:size if e < 0 else e]
            if ln[-1:] == b"\r":
                ln = ln[:-1]
            recs = p.feed(Line(src, ln, off + nxt))
            if recs:
                made += len(recs)
                pool = candidates(mask) if not mask & ~lit_bits else None
                for rec in recs:
                    ev = match(rec, now, pool)
                    if ev is not None:
                        events.append(ev)
        res.parsed += len(starts)
        res.records += made
