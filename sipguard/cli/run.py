"""`sipguard run`, `status` and `check-config`: the daemon in the foreground and what it reports."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Annotated, Optional

import typer

from ..config import format_duration
from .app import _iso, app, ctx, out
from .output import Column, output_format, print_rows

# -- run ---------------------------------------------------------------------------------------
@app.command()
def run(
    log: Annotated[Optional[list[str]], typer.Option("--log", "-l", help="log file to follow (repeatable)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="decide and record, never touch the kernel")] = False,
    from_start: Annotated[bool, typer.Option("--from-start", help="first start: read existing lines too")] = False,
    max_seconds: Annotated[Optional[float], typer.Option(hidden=True)] = None,
) -> None:
    """Run the daemon in the foreground (systemd runs this)."""
    from ..process import tune_gc
    from ..enforce import make_enforcer
    from ..wiring import build_daemon, load_filters

    cfg = ctx.cfg
    filters = load_filters(cfg)  # a bad filter fails before anything is opened
    store = ctx.store()
    enforcer = make_enforcer("dryrun" if dry_run else cfg.enforce)
    daemon = build_daemon(cfg, store, enforcer, logs=log or None, from_start=from_start or None, filters=filters)
    daemon.install_signal_handlers()
    tune_gc()
    stats = daemon.run(max_seconds=max_seconds)
    logging.getLogger("sipguard").info("stopped: %d lines, %d events, %d bans", stats.lines, stats.events, stats.bans)



@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="JSON (short for --output json)")] = False,
           output: Annotated[Optional[str], typer.Option(
               "--output", help="table | plain (lines for people) | json | csv (key,value rows of the JSON)")] = None,
           ) -> None:
    """What the daemon is doing: heartbeat, counters, bans."""
    fmt = output_format(output, as_json)
    store = ctx.store(readonly=True)
    raw = store.get_meta("status")
    st = json.loads(raw) if raw else {}
    now = time.time()
    alive = bool(st) and st.get("running") and now - st.get("heartbeat", 0) < 10
    stored = store.stats()  # its "bans" counts every row, expired ones not yet pruned too
    info = {"daemon": "running" if alive else "not running", "database": store.path, **stored,
            "bans": len(store.active_bans(now)), "ban_rows": stored["bans"], "last_status": st}
    info["source_choice"] = _source_choice(store)
    if ctx.cfg.cluster is not None:  # fleet mode: the nodes Redis has seen and whether this one is in sync
        from ..cluster import cluster_status

        info["cluster"] = cluster_status(ctx.cfg.cluster, store, now)
    if fmt == "json":
        print(json.dumps(info))
        return
    if fmt == "csv":
        print_rows([Column("key"), Column("value")], _flat(info), "csv")
        return
    out.print(f"daemon: {info['daemon']}" + (f" (pid {st.get('pid')}, enforcer {st.get('enforcer')})" if alive else ""))
    if st:
        out.print(f"last heartbeat: {_iso(st.get('heartbeat'))}; following: {', '.join(st.get('logs', []))}")
        for part in ("daemon", "sources", "formats", "filters", "policy", "bans"):
            vals = st.get(part) or {}
            if vals:
                out.print(f"{part}: " + ", ".join(f"{k}={v}" for k, v in vals.items() if k != "started"))
        lost = st.get("losses") or {}
        if lost.get("notices"):
            out.print(f"lines lost before sipguard read them: {lost.get('lost', 0)} by {lost['notices']} notices "
                      f"(journald {lost.get('journald', 0)}, rsyslog {lost.get('rsyslog', 0)}): lift the limits, "
                      "see README 'Lines lost in a storm'")
    sc = info["source_choice"]
    out.print(f"sources{'' if sc.get('saved') else ' (the daemon would choose)'}: {sc['described']} "
              f"({sc['reason']})", markup=False)
    out.print(f"bans in force: {info['bans']}" + (f" ({info['refused']} refused by the enforcer)" if info["refused"] else "")
              + f"; events stored: {info['events']}; database: {store.path}")
    if "cluster" in info:
        from ..cluster import cluster_lines

        for line in cluster_lines(info["cluster"]):
            out.print(line, markup=False)


def _flat(value: object, key: str = "") -> Iterator[tuple[str, object]]:
    """`status --output csv`: the JSON's leaves as (dotted key, value) rows."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flat(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        for i, v in enumerate(value):
            yield from _flat(v, f"{key}.{i}")
    else:
        yield key, json.dumps(value) if isinstance(value, list) else value


def _source_choice(store) -> dict:  # type: ignore[no-untyped-def]
    """What the daemon chose to follow and why (saved at its start), else what it would choose now."""
    raw = store.get_meta("sources")
    if raw:
        return {**json.loads(raw), "saved": True}
    from dataclasses import asdict

    from ..wiring import SourceRoots, choose_sources

    choice = choose_sources(ctx.cfg.sources, SourceRoots.from_env())
    return {**asdict(choice), "described": choice.describe(), "saved": False}


@app.command("check-config")
def check_config() -> None:
    """Validate the config and every filter; print a summary."""
    from ..filters import FilterSet

    cfg = ctx.cfg
    fs = FilterSet.load(cfg.filters.directories, enabled=cfg.filters.enabled, disabled=cfg.filters.disabled)
    out.print(f"config: {cfg.path or 'defaults (no file)'}: OK")
    out.print(f"filters: {', '.join(fs.names)}")
    for name, j in cfg.policy.jails.items():
        out.print(f"jail {name}: {'+'.join(k.value for k in j.kinds)} >= {j.threshold:g} in "
                  f"{format_duration(j.findtime)}" + (", reset on success" if j.reset_on_success else "")
                  + ("" if j.distinct is None else f", distinct values of {j.distinct!r}"
                     + (f" starting {' / '.join(j.prefixes)}" if j.prefixes else "") + f" (at most {j.max_values} kept)"))

