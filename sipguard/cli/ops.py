"""CLI verbs for operators' tooling: `sipguard import` (blocklists) and `sipguard report` (HTML).

Registered on the typer app of sipguard/cli/app.py; they parse and check arguments (list names, ban
times) and call sipguard/extras/blocklists.py and sipguard/report.py, which do the work.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import _duration_option, app, ctx, out
from ..config import format_duration
from ..errors import SipguardError


@app.command("import")
def import_(
    source: Annotated[str, typer.Argument(help="blocklist file or URL: one address/CIDR per line, or APIBAN JSON")],
    list_name: Annotated[Optional[str], typer.Option("--list", help="list name (default: the file's name)")] = None,
    for_: Annotated[Optional[str], typer.Option("--for", help="ban time (default: until it drops off the list)")] = None,
    fmt: Annotated[str, typer.Option("--format", help="auto | text | json")] = "auto",
    max_entries: Annotated[Optional[int], typer.Option(
        "--max-entries", help="refuse a list with more distinct entries (default: the configured list's "
                              "max_entries, else 1000000)")] = None,
    allow_private: Annotated[Optional[bool], typer.Option(
        "--allow-private/--no-allow-private", help="let a URL redirect to loopback, link-local and private "
                                                   "addresses (default: the configured list's allow_private)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable summary")] = False,
) -> None:
    """Ban a blocklist's entries (reason blocklist:NAME); entries gone from the list are unbanned.

    The list is read within the same bounds as a configured [[blocklists]] entry of that name (its
    max_entries, max_bytes and allow_private; the defaults otherwise)."""
    import re
    from dataclasses import replace

    from ..extras.blocklists import Limits, apply_blocklist, load_blocklist
    from .app import _kernel_enforcer

    if fmt not in ("auto", "text", "json"):
        raise SipguardError(f"--format: expected auto, text or json, not {fmt!r}")
    name = list_name or re.sub(r"[^A-Za-z0-9_.-]", "_", Path(source.rstrip("/")).stem or "import")[:40]
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", name):
        raise SipguardError(f"--list: bad name {name!r}: letters, digits, '_', '.', '-' (at most 40)")
    dur = _duration_option(for_)
    bantime = None if dur == "policy" else dur
    configured = next((b for b in ctx.cfg.blocklists if b.name == name), None)
    limits = Limits() if configured is None else Limits.of(configured)
    if max_entries is not None:
        if max_entries < 1:
            raise SipguardError(f"--max-entries: must be at least 1, not {max_entries}")
        limits = replace(limits, max_entries=max_entries)
    if allow_private is not None:
        limits = replace(limits, allow_private=allow_private)
    entries = load_blocklist(source, fmt, limits=limits)  # the whole list is checked before anything changes
    store = ctx.store()
    enforcer = _kernel_enforcer()
    t0 = time.perf_counter()
    try:
        res = apply_blocklist(store, name, entries, ctx.allow(), enforcer, bantime=bantime)  # type: ignore[arg-type]
    finally:
        if enforcer is not None:
            enforcer.close()
    took = time.perf_counter() - t0
    if as_json:
        print(json.dumps({"list": name, "listed": res.listed, "added": res.added, "removed": res.removed,
                          "kept": res.kept, "already_banned": res.already_banned,
                          "skipped_allowlisted": res.skipped_allowlisted, "seconds": round(took, 3)}))
        return
    out.print(f"blocklist {name}: {res.listed} listed; banned {res.added} new, lifted {res.removed} delisted, "
              f"{res.kept} kept, {res.already_banned} already banned otherwise, "
              f"{len(res.skipped_allowlisted)} allow-listed skipped; ban time "
              f"{'until delisted' if bantime is None else format_duration(float(bantime))} ({took:.2f}s)")
    for ip in res.skipped_allowlisted[:20]:
        out.print(f"  skipped (allow-listed): {ip}")
    if len(res.skipped_allowlisted) > 20:
        out.print(f"  ... and {len(res.skipped_allowlisted) - 20} more allow-listed entries skipped "
                  f"(--json lists the count)")


@app.command()
def report(
    output: Annotated[Path, typer.Option("--output", "-o", help="HTML file to write")] = Path("sipguard-report.html"),
    days: Annotated[float, typer.Option("--days", help="how far back (events are kept [store] event_retention)")] = 7.0,
    top: Annotated[int, typer.Option("--top", help="rows in the top-sources tables")] = 20,
) -> None:
    """Write a self-contained HTML report: attacks over time per filter, top sources and networks, bans."""
    from ..report import build_report, render_html

    store = ctx.store(readonly=True)
    data = build_report(store, since=time.time() - days * 86400, top=top)
    output.write_text(render_html(data), encoding="utf-8")
    out.print(f"report written to {output} ({data['totals']['events']} events, {data['totals']['bans']} bans)")
