"""Filter corpora: sample log lines with what the filters must make of them, read and checked.

The grammar is `tests/corpus/README.md`'s (one case per `+ = - ~` line, `| ` continuation lines, an
optional `@TIME` expectation of the record's time). `parse_corpus` turns a file into Cases that
keep their line numbers; `run_corpus` reads every case through the pipeline (sipguard/pipeline.py,
with its own fresh RecordParser) and `FilterSet.match`, as the daemon, `scan` and `test-filter` do, and returns
per-case results and per-regex coverage: which cases each `regex` and `ignore` entry decided,
as `FilterSet.explain(detail=True)` reports it. `sipguard test-filter --corpus` and
`tests/test_corpus.py` both run corpora through here.

Never writes anywhere (no store, no policy, no kernel; only the FilterSet's own match counters
count the corpus's records) and never prints: the caller formats the results, escaping the
attacker text they hold. Imports its sibling modules, `sipguard.formats`, `sipguard.model` and
`sipguard.pipeline`; the `sipguard.filters` package never imports this module.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..formats import RecordParser
from ..model import Event, Line, Record
from ..pipeline import Pipeline
from .filterset import FilterSet, VerdictDetail
from .spec import MACROS

CLOCK = time.mktime((2026, 12, 1, 12, 0, 0, 0, 0, -1))
"""The parsers' clock while a corpus runs: 2026-12-01 12:00:00 local time. Traditional syslog has no
year; the parser takes the clock's year unless that puts the record more than a day after the
clock (then the year before), so `Nov 30 ...` is 2026 and `Dec 31 ...` 2025 in every year the
corpus is run. Events of records without a time carry this time."""

TIME_TOLERANCE = 1e-6
"""Seconds a record's time may differ from its `@TIME` (float rounding of microsecond stamps)."""

OPS = "+=-~"


class CorpusError(ValueError):
    """A corpus file that does not follow the grammar, or names a filter the FilterSet lacks;
    the message starts with `file:line:` when a line is to blame."""


@dataclass(frozen=True, slots=True)
class Case:
    """One corpus entry: its physical lines and what must come of them.

    `op` `+`: exactly one event, from `filter` (the corpus's own), for `ip`; `=`: the same from the
    named `filter`; `-`: no event from any filter; `~`: `filter` (the corpus's own) does not match,
    others may. `time` is the `@TIME` expectation as epoch seconds (`time_text` as written), or None.
    """

    file: str
    lineno: int
    op: str
    filter: str | None
    ip: str | None
    time: float | None
    time_text: str | None
    lines: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.file}:{self.lineno}"

    @property
    def expected(self) -> str:
        if self.op in "+=":
            return f"{self.filter} {self.ip}" + (f" at {self.time_text}" if self.time_text else "")
        if self.op == "-":
            return "no event"
        return f"no match from {self.filter}"


@dataclass(frozen=True, slots=True)
class CaseResult:
    """What one case produced. `problems` is empty exactly when the case passed; `got` describes
    the events (or, for `~`, the own filter's verdicts) in the words of `Case.expected`."""

    case: Case
    records: tuple[Record, ...]
    events: tuple[Event, ...]
    got: str
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.problems


@dataclass(frozen=True, slots=True)
class RegexCoverage:
    """The passing cases one regex decided: `what` is "regex" (it matched a must-match case's
    event) or "ignore" (it rejected a line the case says this filter must not turn into an event)."""

    filter: str
    what: str
    index: int
    pattern: str  # as written in the filter file (macros such as <ADDR> not expanded)
    cases: tuple[Case, ...]


@dataclass(frozen=True, slots=True)
class CorpusReport:
    results: tuple[CaseResult, ...]
    coverage: tuple[RegexCoverage, ...]

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if not r.passed]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def uncovered(self) -> list[RegexCoverage]:
        return [c for c in self.coverage if not c.cases]

    def result(self, case_id: str) -> CaseResult:
        for r in self.results:
            if r.case.id == case_id:
                return r
        raise KeyError(case_id)

    def as_json(self) -> dict[str, object]:
        fails = self.failures
        return {
            "ok": not fails,
            "cases": len(self.results),
            "passed": len(self.results) - len(fails),
            "failed": len(fails),
            "failures": [
                {"where": r.case.id, "file": r.case.file, "line": r.case.lineno, "op": r.case.op,
                 "expected": r.case.expected, "got": r.got, "problems": list(r.problems),
                 "text": list(r.case.lines)}
                for r in fails
            ],
            "coverage": [
                {"filter": c.filter, "what": c.what, "index": c.index, "pattern": c.pattern,
                 "hits": len(c.cases), "cases": [k.id for k in c.cases]}
                for c in self.coverage
            ],
        }


# -- reading ---------------------------------------------------------------------------------------

_ENTRY = re.compile(r"([+=~-])((?: \S+)*?) \| (.*)", re.S)
_TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(\.\d{1,9})?(Z|[+-]\d\d:?\d\d)?")


def parse_time(text: str) -> float:
    """Epoch seconds of an `@TIME` expectation: ISO 8601 with `Z` or an offset, or without one for
    a local wall-clock time (what traditional syslog prints). ValueError when it is neither."""
    m = _TIME.fullmatch(text)
    if m is None:
        raise ValueError(f"bad time {text!r}: expected like 2026-11-30T02:08:09.376964+00:00, "
                         "or 2026-11-30T01:55:12 for local time")
    y, mo, d, hh, mi, ss = (int(x) for x in m.group(1, 2, 3, 4, 5, 6))
    frac, off = m.group(7), m.group(8)
    try:
        datetime(y, mo, d, hh, mi, ss)  # range check: month 13, hour 25, Feb 30 are errors
    except ValueError as exc:
        raise ValueError(f"bad time {text!r}: {exc}") from None
    if off is None:
        base = time.mktime((y, mo, d, hh, mi, ss, 0, 0, -1))
    else:
        base = float(calendar.timegm((y, mo, d, hh, mi, ss)))
        if off != "Z":
            sign = -1 if off[0] == "-" else 1
            base -= sign * (int(off[1:3]) * 3600 + int(off[-2:]) * 60)
    return base + (float(frac) if frac else 0.0)


def format_time(ts: float, local: bool) -> str:
    """`ts` the way an `@TIME` is written: local wall clock without offset, or UTC with +00:00."""
    if local:
        return datetime.fromtimestamp(ts).isoformat()
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


def parse_corpus_text(text: str, label: str, own: str | None) -> list[Case]:
    """The cases of a corpus text. `label` names it in case ids and errors (`label:line`), `own` is
    the filter its `+` and `~` lines are about (None: such lines are an error)."""
    pending: list[tuple[int, str, str | None, str | None, float | None, str | None, list[str]]] = []
    for n, raw in enumerate(text.split("\n"), 1):
        if not raw.strip() or raw.startswith("#"):
            continue
        if raw.startswith("| "):
            if not pending:
                raise CorpusError(f"{label}:{n}: continuation line without an entry before it")
            pending[-1][6].append(raw[2:])
            continue
        m = _ENTRY.fullmatch(raw)
        if m is None:
            raise CorpusError(f"{label}:{n}: not a corpus entry (see the grammar): {raw!r}")
        op, head, line = m.groups()
        words = head.split()
        when: str | None = None
        if words and words[-1].startswith("@"):
            when = words.pop()[1:]
            if op not in "+=":
                raise CorpusError(f"{label}:{n}: only '+' and '=' entries take an @TIME")
        ts = None
        if when is not None:
            try:
                ts = parse_time(when)
            except ValueError as exc:
                raise CorpusError(f"{label}:{n}: {exc}") from None
        want = {"+": 1, "=": 2}.get(op, 0)
        if len(words) != want or any(w.startswith("@") for w in words):
            shape = {"+": "+ IP [@TIME] | LINE", "=": "= FILTER IP [@TIME] | LINE"}.get(op, f"{op} | LINE")
            raise CorpusError(f"{label}:{n}: expected '{shape}'")
        if op in "+~" and own is None:
            raise CorpusError(f"{label}:{n}: '{op}' entries need the corpus's own filter "
                              "(a file named FILTER.txt, or the filter given by name)")
        if op == "+":
            pending.append((n, op, own, words[0], ts, when, [line]))
        elif op == "=":
            pending.append((n, op, words[0], words[1], ts, when, [line]))
        elif op == "-":
            pending.append((n, op, None, None, None, None, [line]))
        else:
            pending.append((n, op, own, None, None, None, [line]))
    return [Case(label, n, op, f, ip, ts, when, tuple(lines)) for n, op, f, ip, ts, when, lines in pending]


def parse_corpus(path: Path | str, *, own: str | None = None, label: str | None = None) -> list[Case]:
    """The cases of a corpus file. Its own filter (`+`, `~`) is `own`, by default the file's name
    without `.txt`; `label` (default: the path as given) names it in case ids and errors."""
    path = Path(path)
    label = str(path) if label is None else label
    try:
        text = path.read_bytes().decode("utf-8")  # not read_text: a CR inside a line stays in it
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{label}: not UTF-8: {exc}") from None
    return parse_corpus_text(text, label, path.stem if own is None else own)


# -- running ---------------------------------------------------------------------------------------

def match_lines(lines: Iterable[str], filters: FilterSet, *, source: str = "corpus",
                programs: Iterable[str] = ("kamailio",), clock: float = CLOCK
                ) -> tuple[list[tuple[Record, Event | None]], RecordParser]:
    """Every record of these physical lines (one stream, one fresh `auto` parser whose clock is
    `clock`) with the event `filters.match` makes of it; and the parser, for its counters."""
    # corpora hold plain stderr lines on purpose (they test the filters on every format Kamailio
    # writes): read them (trust_plain_stderr), and the parser's warning about them is not news
    parser = RecordParser("auto", programs=programs, now=lambda: clock, on_stderr=lambda _source: None,
                          trust_plain_stderr=True)
    records = Pipeline(parser, filters).records(Line(source, s.encode("utf-8"), i) for i, s in enumerate(lines))
    return [(r, filters.match(r, clock)) for r in records], parser


def _pattern_as_written(pattern: str) -> str:
    for macro, body in MACROS.items():
        pattern = pattern.replace(body, macro)
    return pattern


def run_case(case: Case, filters: FilterSet, *, programs: Iterable[str] = ("kamailio",),
             require_time: bool = False, clock: float = CLOCK) -> tuple[CaseResult, list[tuple[str, str, int]]]:
    """One case's result, and the (filter, "regex"|"ignore", index) entries it covers when it passed.

    `require_time`: a `+`/`=` case whose record has a time must say it with `@TIME`.
    """
    pairs, parser = match_lines(case.lines, filters, source=case.file, programs=programs, clock=clock)
    # times are shown as the expectation is written (local without offset), or else local only
    # for traditional syslog, the one format that prints local time without an offset
    m = None if case.time_text is None else _TIME.fullmatch(case.time_text)
    local = m.group(8) is None if m is not None else set(parser.stats.by_format) == {"traditional"}
    records = tuple(r for r, _ in pairs)
    events = tuple(e for _, e in pairs if e is not None)
    details = [{v.filter: v for v in filters.explain(r, detail=True)} for r in records]
    problems: list[str] = []
    hits: list[tuple[str, str, int]] = []

    def said(r: Record, e: Event) -> str:
        return f"{e.filter} {e.ip}" + ("" if r.time is None else f" at {format_time(r.time, local)}")

    if case.op == "~":
        verdicts = [d[case.filter] for d in details if case.filter in d]
        got = "; ".join(f"{case.filter} {v.result}" + (f" {v.ip}" if v.ip else "") for v in verdicts) \
            or "no record"
        if any(v.result == "matched" for v in verdicts):
            problems.append(f"{case.filter} matched")
    else:
        got = "; ".join(said(r, e) for r, e in pairs if e is not None) or "no event"
        want = [(case.filter, case.ip)] if case.op in "+=" else []
        if [(e.filter, e.ip) for e in events] != want:
            problems.append("wrong events")
        elif case.op in "+=":
            (i, r, e), = [(i, r, e) for i, (r, e) in enumerate(pairs) if e is not None]
            v: VerdictDetail | None = details[i].get(e.filter)
            if v is None or v.result != "matched" or v.ip != e.ip or v.regex is None:
                problems.append(f"explain disagrees with match: {v}")
            else:
                hits.append((e.filter, "regex", v.regex))
            if case.time is not None:
                if r.time is None:
                    problems.append("the record has no time")
                elif abs(r.time - case.time) > TIME_TOLERANCE:
                    problems.append("wrong time")
            elif require_time and r.time is not None:
                problems.append(f"no @TIME for a record with a time (@{format_time(r.time, local)})")
    if problems:
        return CaseResult(case, records, events, got, tuple(problems)), []
    expected_filter = case.filter if case.op in "+=" else None
    for d in details:
        for w in d.values():
            if w.result == "ignored" and w.ignore is not None and w.filter != expected_filter:
                hits.append((w.filter, "ignore", w.ignore))
    return CaseResult(case, records, events, got, ()), hits


def run_corpus(cases: Sequence[Case], filters: FilterSet, *, cover: Iterable[str] | None = None,
               programs: Iterable[str] = ("kamailio",), require_time: bool = False,
               clock: float = CLOCK) -> CorpusReport:
    """Every case through its own fresh parser and `filters`; coverage of the regexes of `cover`
    (default: the filters the cases name). A case naming a filter `filters` does not have as
    active is a CorpusError (it could never pass)."""
    active = {f.name: f for f in filters.filters}
    for c in cases:
        if c.filter is not None and c.filter not in active:
            raise CorpusError(f"{c.id}: no active filter named {c.filter!r} "
                              f"(active: {', '.join(sorted(active)) or 'none'})")
    names = list(dict.fromkeys(c.filter for c in cases if c.filter is not None)) if cover is None else list(cover)
    for n in names:
        if n not in active:
            raise CorpusError(f"no active filter named {n!r} (active: {', '.join(sorted(active)) or 'none'})")
    results: list[CaseResult] = []
    covered: dict[tuple[str, str, int], list[Case]] = {}
    for c in cases:
        res, hits = run_case(c, filters, programs=programs, require_time=require_time, clock=clock)
        results.append(res)
        for key in dict.fromkeys(hits):
            covered.setdefault(key, []).append(c)
    coverage = []
    for n in names:
        f = active[n]
        for what, rxs in (("regex", f.regexes), ("ignore", f.ignores)):
            for i, rx in enumerate(rxs):
                coverage.append(RegexCoverage(n, what, i, _pattern_as_written(rx.pattern),
                                              tuple(covered.get((n, what, i), ()))))
    return CorpusReport(tuple(results), tuple(coverage))
