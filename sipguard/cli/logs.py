"""`sipguard scan` and `sipguard test-filter`: the filters and the policy over whole log files, offline."""

from __future__ import annotations

import json
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
    log: Annotated[Path, typer.Argument(help="a log file (.gz too)")],
    filter_name: Annotated[Optional[str], typer.Option("--filter", "-f", help="only this filter")] = None,
    samples: Annotated[int, typer.Option(help="sample lines shown per filter")] = 5,
    show_missed: Annotated[bool, typer.Option("--show-missed", help="print lines no filter matched")] = False,
) -> None:
    """Like fail2ban-regex: per filter, lines matched and missed, samples, ignored lines, time."""
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
    parser = RecordParser(cfg.sources.format, programs=frozenset(cfg.sources.programs))
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
                out.print(f"  {s}", markup=False)
    if missed:
        out.print("[bold]missed[/bold] (no filter matched):")
        for m in missed:
            out.print(f"  {m}", markup=False)


