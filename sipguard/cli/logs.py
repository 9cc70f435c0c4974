"""`sipguard scan` and `sipguard test-filter`: the filters and the policy over whole log files, offline;
`test-filter --corpus` checks a filter corpus (sipguard.filters.corpus). Prints log text escaped."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import SipguardError
from .app import Table, _iso, app, ctx, out

# -- scan --------------------------------------------------------------------------------------
@app.command()
def scan(
    logs: Annotated[list[Path], typer.Argument(help="log files (.gz too)", exists=False)],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Offline: apply filters and policy to whole files in their own time; print the bans."""
    from ..scan import scan_files

    for p in logs:
        if not p.is_file():
            raise SipguardError(f"{p}: no such file")
    result = scan_files([str(p) for p in logs], ctx.cfg)
    if as_json:
        print(json.dumps(result.as_json()))
        return
    table = Table(title=f"{len(result.bans)} bans from {result.lines} lines ({result.matched} matched, "
                        f"{result.seconds:.2f}s)")
    for col in ("ip", "filters", "events", "score", "first ban (log time)"):
        table.add_column(col)
    for b in result.bans:
        table.add_row(b.ip, ", ".join(b.filters), str(b.events), f"{b.score:g}", _iso(b.first_ban) or "")
    out.print(table)



# -- test-filter -------------------------------------------------------------------------------
@app.command("test-filter")
def test_filter(
    log: Annotated[Optional[Path], typer.Argument(help="a log file (.gz too); not with --corpus")] = None,
    filter_name: Annotated[Optional[str], typer.Option(
        "--filter", "-f", help="only this filter; with --corpus, the filter its '+' and '~' lines are "
                               "about (default: the corpus file's name without .txt)")] = None,
    samples: Annotated[int, typer.Option(help="sample lines shown per filter")] = 5,
    show_missed: Annotated[bool, typer.Option("--show-missed", help="print lines no filter matched")] = False,
    corpus: Annotated[Optional[Path], typer.Option(
        "--corpus", help="check a corpus file of sample lines and their expected events "
                         "(grammar: tests/corpus/README.md) instead of reading a log")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="with --corpus: machine-readable output")] = False,
) -> None:
    """Like fail2ban-regex: per filter, lines matched and missed, samples, ignored lines, time.

    With --corpus FILE: check a filter corpus like sshguard's sshg-parser -t; exit status 1 if a case fails.
    """
    if log is None and corpus is None:
        raise SipguardError("test-filter needs a LOG file or --corpus FILE")
    if log is not None and corpus is not None:
        raise SipguardError("test-filter takes a LOG file or --corpus FILE, not both")
    if corpus is not None:
        if show_missed:
            raise SipguardError("--show-missed is for a LOG file, not --corpus")
        _test_corpus(corpus, filter_name, as_json)
        return
    if as_json:
        raise SipguardError("--json goes with --corpus (a LOG file's report is for reading)")
    from ..filters import FilterSet
    from ..formats import RecordParser
    from ..pipeline import Pipeline
    from ..sources import read_file

    if not log.is_file():
        raise SipguardError(f"{log}: no such file")
    cfg = ctx.cfg
    fs = FilterSet.load(cfg.filters.directories, enabled=cfg.filters.enabled, disabled=cfg.filters.disabled)
    names = list(fs.names)
    if filter_name:
        if filter_name not in names:
            raise SipguardError(f"no filter named {filter_name!r} (have: {', '.join(names)})")
        names = [filter_name]
    matched = {n: 0 for n in names}
    ignored = {n: 0 for n in names}
    sample = {n: [] for n in names}
    missed: list[str] = []
    t0 = time.perf_counter()
    parser = RecordParser(cfg.sources.format, programs=frozenset(cfg.sources.programs),
                          trust_plain_stderr=cfg.sources.trust_plain_stderr)
    pipe = Pipeline(parser, fs, sparse=False)  # every record, the missed ones too
    for rec, verdicts in pipe.verdicts(read_file(str(log))):
        hit = False
        for name, ip, outcome in verdicts:
            if name not in matched:
                continue
            if outcome == "matched":
                matched[name] += 1
                hit = True
                if len(sample[name]) < samples:
                    sample[name].append(f"{ip}  <-  {rec.text[:160]}")
            elif outcome == "ignored":
                ignored[name] += 1
        if not hit and show_missed and len(missed) < 50:
            missed.append(rec.text[:200])
    lines, records = pipe.n_lines, pipe.n_records
    took = time.perf_counter() - t0
    out.print(f"Lines: {lines}, records: {records}, time: {took:.3f}s")
    pstats = dict(parser.stats)
    if pstats:
        out.print("Parser: " + ", ".join(f"{k}={v}" for k, v in sorted(pstats.items())))
    table = Table()
    for col in ("filter", "matched", "missed", "ignored"):
        table.add_column(col)
    for n in names:
        table.add_row(n, str(matched[n]), str(records - matched[n] - ignored[n]), str(ignored[n]))
    out.print(table)
    for n in names:
        if sample[n]:
            out.print(f"[bold]{n}[/bold] samples:")
            for s in sample[n]:
                out.print(f"  {_printable(s)}", markup=False)
    if missed:
        out.print("[bold]missed[/bold] (no filter matched):")
        for m in missed:
            out.print(f"  {_printable(m)}", markup=False)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    """`text` with every control character (C0, DEL, C1) as `\\xNN`: log and corpus lines are attacker
    text, and an escape sequence in them must never reach the operator's terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _test_corpus(path: Path, own: str | None, as_json: bool) -> None:
    """`test-filter --corpus`: the corpus's cases through the configured filters (sipguard.filters.corpus),
    printed escaped; exit status 1 when a case fails."""
    from ..filters import FilterSet
    from ..filters.corpus import CorpusError, parse_corpus, run_corpus

    if not path.is_file():
        raise SipguardError(f"{path}: no such file")
    cfg = ctx.cfg
    fs = FilterSet.load(cfg.filters.directories, enabled=cfg.filters.enabled, disabled=cfg.filters.disabled)
    name = path.stem if own is None else own  # the filter of its '+' and '~' lines
    try:
        cases = parse_corpus(path, own=name)
        if not cases:
            raise CorpusError(f"{path}: no cases (see tests/corpus/README.md for the grammar)")
        if name not in fs.names and any(c.op in "+~" for c in cases):
            why = "given with --filter" if own is not None else "the file's name; name another with --filter"
            raise CorpusError(f"{path}: its '+' and '~' lines are about filter {name!r} ({why}), which is not "
                              f"an active filter (active: {', '.join(fs.names) or 'none'})")
        # coverage of the corpus's own filter; of the filters its '=' lines name when it has none
        report = run_corpus(cases, fs, cover=[name] if name in fs.names else None, programs=cfg.sources.programs)
    except CorpusError as exc:
        raise SipguardError(str(exc)) from None
    failures = report.failures
    if as_json:
        print(json.dumps({"file": str(path), **report.as_json()}))  # ensure_ascii: control bytes are \\uXXXX
        if failures:
            raise typer.Exit(1)
        return
    for r in failures:
        text = "\n".join(r.case.lines)  # printed as \x0a: one line per case
        print(_printable(f"{r.case.id}: expected {r.case.expected}; got {r.got} ({'; '.join(r.problems)}): "
                         f"{text[:200]}"))
    rows = [(c.filter, f"{c.what}[{c.index}]", str(len(c.cases)), c.pattern) for c in report.coverage]
    if rows:
        head = ("filter", "entry", "cases", "pattern")
        w = [max(len(x[i]) for x in [head, *rows]) for i in range(3)]
        print("coverage (passing cases each regex decided):")
        for i, row in enumerate([head, *rows]):
            mark = "   <- no case" if i and row[2] == "0" else ""
            print(_printable(f"  {row[0]:<{w[0]}}  {row[1]:<{w[1]}}  {row[2]:>{w[2]}}  {row[3]}{mark}"))
    hit = len(report.coverage) - len(report.uncovered)
    print(_printable(f"{path}: {len(report.results)} cases, {len(report.results) - len(failures)} passed, "
                     f"{len(failures)} failed; {hit} of {len(report.coverage)} regex/ignore entries hit by a case"))
    if failures:
        raise typer.Exit(1)


