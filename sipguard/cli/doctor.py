"""`sipguard doctor`: parses its options, builds the `Host` to look at and prints what
sipguard/doctor/ found (a line per finding, its fix under it; or `--json`). Exit status = the
number of problems (at most 125). Changes nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import resolve_state_dir
from ..errors import SipguardError
from ..text import printable
from .app import app, ctx

_MARK = {"ok": "OK", "problem": "PROBLEM", "warning": "WARNING", "skipped": "skipped"}


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable findings (schema in README)")] = False,
    check: Annotated[Optional[list[str]], typer.Option("--check", help="run only this check (repeatable)")] = None,
    hours: Annotated[float, typer.Option("--hours", help="how far back to look for the log contract")] = 6.0,
    root: Annotated[Path, typer.Option("--root", help="where /etc/systemd and /etc/rsyslog* are read", hidden=True)]
    = Path("/"),
    no_kernel: Annotated[bool, typer.Option("--no-kernel", help="skip the kernel checks (sets, hook)")] = False,
) -> None:
    """Check this host end to end: logs, log contract, rate limits, kernel hook and sets, state, fleet."""
    from ..doctor import CHECKS, Host, as_json as to_json, exit_status, run_checks, summary

    if hours <= 0:
        raise SipguardError("--hours: must be positive")
    if check:
        bad = [c for c in check if c not in CHECKS]
        if bad:
            raise SipguardError(f"--check: unknown {', '.join(bad)}; the checks are {', '.join(CHECKS)}")
    cfg = ctx.cfg
    host = Host(cfg=cfg, state_dir=resolve_state_dir(cfg, ctx.state_dir), root=root, hours=hours,
                kernel=not no_kernel, env=dict(os.environ))
    findings = run_checks(host, check)
    code = exit_status(findings)
    if as_json:
        print(json.dumps(to_json(findings)))
        raise typer.Exit(code)
    for f in findings:  # plain lines (no rich: no markup, no emoji codes, nothing wrapped or cut)
        print(f"{_MARK[f.status]:8} {f.check:10} {printable(f.message)}")
        if f.fix and f.status in ("problem", "warning"):
            print(f"{'':8} {'':10} fix: {printable(f.fix)}")
    c = summary(findings)
    print(f"{c['problem']} problem{'s' if c['problem'] != 1 else ''}, {c['warning']} warning"
          f"{'s' if c['warning'] != 1 else ''}, {c['ok']} ok, {c['skipped']} skipped")
    raise typer.Exit(code)
