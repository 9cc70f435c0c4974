"""`sipguard scan` and `sipguard test-filter`: the filters and the policy over whole log files, offline;
`test-filter --corpus` checks a filter corpus (sipguard.filters.corpus). Prints log text escaped
(sipguard.text), tables through sipguard/cli/output.py, and `scan`'s progress bar on a terminal's stderr."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import SipguardError
from ..text import clip, printable
from .app import _iso, app, ctx, err, out
from .output import Column, open_rows, output_format


# -- scan --------------------------------------------------------------------------------------
PROGRESS_MIN = 16 << 20
"""A plain file set at least this big (or any compressed file) shows a progress bar on a terminal."""
_COMPRESSED = (".gz", ".bz2", ".xz", ".lzma")


def _sizes(paths: list[Path]) -> dict[str, int | None]:
    """Each file's size as the scan reads it (decompressed): a plain file's length, a gzip file's
    trailer (when it is plausible: one member under 4 GiB), None for other compressed files."""
    sizes: dict[str, int | None] = {}
    for p in paths:
        size = p.stat().st_size
        ext = p.suffix.lower()
        n: int | None = size
        if ext in _COMPRESSED:
            n = None
            if ext == ".gz" and size >= 18:
                with open(p, "rb") as f:
                    f.seek(-4, 2)
                    n = int.from_bytes(f.read(4), "little")
                if n < size:  # over 4 GiB, or not what the trailer says: unknown
                    n = None
        sizes[str(p)] = n
    return sizes


@contextmanager
def _progress(paths: list[Path], sizes: dict[str, int | None]):
    """A callback that advances a rich progress bar on stderr by the bytes scanned, when stderr is a
    terminal and the files are big or compressed; None otherwise (nothing is printed when piped)."""
    import sys

    known = [n for n in sizes.values() if n is not None]
    total = sum(known) if len(known) == len(sizes) else None
    worth = any(p.suffix.lower() in _COMPRESSED for p in paths) or sum(known) >= PROGRESS_MIN
    if not worth or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("scanning"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                  console=err.console, transient=False) as bar:
        task = bar.add_task("scan", total=total)
        yield lambda n: bar.advance(task, n)


@app.command()
def scan(
    logs: Annotated[list[Path], typer.Argument(help="log files (.gz too)", exists=False)],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output (short for --output json)")] = False,
    output: Annotated[Optional[str], typer.Option(
        "--output", help="table | plain | json | csv (default: table on a terminal, plain columns when piped)")] = None,
) -> None:
    """Offline: apply filters and policy to whole files in their own time; print the bans.

    A big or compressed file shows a progress bar on stderr when it is a terminal."""
    from ..scan import scan_files

    fmt = output_format(output, as_json)
    for p in logs:
        if not p.is_file():
            raise SipguardError(f"{p}: no such file")
    sizes = _sizes(logs)
    with _progress(logs, sizes) as advance:
        result = scan_files([str(p) for p in logs], ctx.cfg, progress=advance, sizes=sizes)
    if fmt == "json":
        print(json.dumps(result.as_json()))
        return
    if fmt in ("table", "plain"):
        out.print(f"{len(result.bans)} bans from {result.lines} lines ({result.matched} matched, "
                  f"{result.seconds:.2f}s)")
    cols = [Column("ip", width=max([2, *(len(b.ip) for b in result.bans)]), whole=True),
            Column("filters", width=max([7, *(len(", ".join(b.filters)) for b in result.bans)])),
            Column("events", width=6, right=True), Column("score", width=5, right=True),
            Column("first_ban", "first ban (log time)", width=20, whole=True)]
    with open_rows(cols, fmt) as rows:
        for b in result.bans:
            rows.row([b.ip, b.filters, b.events, f"{b.score:g}", _iso(b.first_ban) or ""])



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
    output: Annotated[Optional[str], typer.Option(
        "--output", help="a LOG file's per-filter table: table | plain | json | csv (json and csv: only "
                         "the table; default: table on a terminal, plain columns when piped)")] = None,
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
        if output is not None:
            raise SipguardError("--output is for a LOG file's table (--corpus has --json)")
        _test_corpus(corpus, filter_name, as_json)
        return
    if as_json:
        raise SipguardError("--json goes with --corpus (a LOG file's report is for reading; "
                            "--output json gives its per-filter table)")
    fmt = output_format(output)
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
                    sample[name].append(f"{ip}  <-  {clip(rec.text, SAMPLE_CHARS)}")
            elif outcome == "ignored":
                ignored[name] += 1
        if not hit and show_missed and len(missed) < 50:
            missed.append(clip(rec.text, MISSED_CHARS))
    lines, records = pipe.n_lines, pipe.n_records
    took = time.perf_counter() - t0
    cols = [Column("filter", width=max(len(n) for n in names) if names else 6), Column("matched", right=True),
            Column("missed", right=True), Column("ignored", right=True)]
    rows = [[n, matched[n], records - matched[n] - ignored[n], ignored[n]] for n in names]
    if fmt in ("json", "csv"):  # the table alone, for programs
        with open_rows(cols, fmt) as w:
            w.rows(rows)
        return
    out.print(f"Lines: {lines}, records: {records}, time: {took:.3f}s")
    pstats = dict(parser.stats)
    if pstats:
        out.print("Parser: " + ", ".join(f"{k}={v}" for k, v in sorted(pstats.items())))
    with open_rows(cols, fmt) as w:
        w.rows(rows)
    for n in names:
        if sample[n]:
            out.print(f"{n} samples:")
            for s in sample[n]:
                out.print(f"  {s}")
    if missed:
        out.print("missed (no filter matched):")
        for m in missed:
            out.print(f"  {m}")


SAMPLE_CHARS = 400
"""A sample line is shown up to this many (escaped) characters, then marked with how many more it has."""
MISSED_CHARS = 400


def _printable(text: str) -> str:
    """`text` with every control character (C0, DEL, C1, bidi overrides) as a visible escape
    (sipguard.text.printable): log and corpus lines are attacker text."""
    return printable(text)


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
                         f"{clip(text, MISSED_CHARS)}"))
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


