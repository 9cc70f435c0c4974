"""`sipguard list`, `ban` and `unban`: the operator's view of the bans and manual changes to them."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..addresses import AllowList
from ..config import format_duration
from ..errors import SipguardError
from ..model import Ban
from .app import UNKNOWN, Columns, _duration_option, _iso, _kernel_enforcer, app, ctx, out, output_format

def _left(b: Ban, now: float) -> str:
    """Time left of a ban, as the table shows it (any stored value, even one no clock reaches)."""
    if b.expires is None:
        return "permanent"
    if b.expires != b.expires:
        return UNKNOWN
    return format_duration(max(0.0, b.expires - now))


def _json_number(v: object) -> object:
    """A score or offence as JSON can carry it (no NaN or Infinity)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


@app.command("list")
def list_(
    as_json: Annotated[bool, typer.Option("--json", help="JSON array of bans (short for --output json)")] = False,
    kernel: Annotated[bool, typer.Option("--kernel", help="also show what the kernel's sets hold")] = False,
    output: Annotated[Optional[str], typer.Option(
        "--output", help="table | plain | json | csv (default: table on a terminal, plain columns when piped)")] = None,
) -> None:
    """Bans in force (with --kernel: beside the kernel's own entries and their timeouts).

    Rows stream from the database as they are printed (bounded memory at any number of bans);
    no value is ever cut.
    """
    fmt = output_format(output, as_json)
    store = ctx.store(readonly=True)
    now = time.time()
    held: dict[str, float | None] = {}
    if kernel:
        enforcer = _kernel_enforcer()
        if enforcer is None:
            raise SipguardError('--kernel: [enforce] backend = "dryrun" enforces nothing')
        try:
            held = {e.ip: e.timeout for e in enforcer.entries()}
        finally:
            enforcer.close()
    n_kernel = len(held)
    write = sys.stdout.write
    if fmt == "json":
        sep = ""
        write("[")
        for b in store.iter_active_bans(now):
            row = {"ip": b.ip, "reason": b.reason, "created": _iso(b.created), "expires": _iso(b.expires),
                   "manual": b.manual, "score": _json_number(b.score), "offence": _json_number(b.offence),
                   "refused": b.refused}
            if kernel:
                row["kernel"] = {"timeout": held.pop(b.ip)} if b.ip in held else None
            write(sep + json.dumps(row))
            sep = ", "
        for ip in sorted(held):
            write(sep + json.dumps({"ip": ip, "reason": None, "created": None, "expires": None, "manual": None,
                                    "score": None, "offence": None, "kernel": {"timeout": held[ip]},
                                    "kernel_only": True}))
            sep = ", "
        write("]\n")
        return

    summary = store.active_bans_summary(now)
    refused = summary.refused or fmt == "csv"
    headers = ["ip", "reason", "created", "expires", "left", "offence", "by"] + (["kernel"] if kernel else []) \
        + (["refused by the enforcer"] if refused else [])
    ip_width = max([summary.ip_width, *map(len, held)])
    widths = [ip_width, max(summary.reason_width, len("(kernel only)")), 20, 20, 12, summary.offence_width, 6] \
        + ([12] if kernel else []) + ([0] if refused else [])
    if fmt == "table":
        write(f"{summary.count} bans in force" + (f", {n_kernel} kernel entries" if kernel else "") + "\n")
    cols = Columns(headers, widths, fmt)

    def k(ip: str) -> str:
        if ip not in held:
            return "MISSING"
        t = held.pop(ip)
        return "permanent" if t is None else format_duration(t)

    for b in store.iter_active_bans(now):
        cols.row([b.ip, "" if b.reason is None else b.reason, _iso(b.created), _iso(b.expires) or "never",
                  _left(b, now), str(b.offence), "manual" if b.manual else "auto",
                  *([k(b.ip)] if kernel else []), *([b.refused or ""] if refused else [])])
    for ip in sorted(held):
        t = held[ip]
        cols.row([ip, "(kernel only)", "", "", "", "", "", "permanent" if t is None else format_duration(t),
                  *([""] if refused else [])])


def _whole_internet(ip: str) -> str | None:
    """The one-line refusal of a /0 (every address of a family), which no --force lifts; None otherwise."""
    if ip.endswith("/0"):
        return f"{ip} is every {'IPv6' if ':' in ip else 'IPv4'} address: a /0 is never banned (not even with --force)"
    return None


def _read_targets(path: Path, allow: AllowList, force: bool) -> list[str]:
    """One address or CIDR per line, '#' comments and blank lines allowed; errors name file:line."""
    from ..addresses import parse_target

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SipguardError(f"{path}: cannot read: {exc}") from None
    targets = []
    for no, raw in enumerate(text.splitlines(), 1):
        item = raw.split("#", 1)[0].strip()
        if not item:
            continue
        try:
            ip = parse_target(item)
        except ValueError as exc:
            raise SipguardError(f"{path}:{no}: {exc}") from None
        if (whole := _whole_internet(ip)) is not None:
            raise SipguardError(f"{path}:{no}: {whole}")
        if ip in allow and not force:
            raise SipguardError(f"{path}:{no}: {ip} is allow-listed; use --force to ban it anyway")
        targets.append(ip)
    return targets


@app.command()
def ban(
    target: Annotated[Optional[str], typer.Argument(help="IP address or CIDR")] = None,
    for_: Annotated[Optional[str], typer.Option("--for", help="30s, 10m, 2h, 7d or 'permanent'")] = None,
    reason: Annotated[str, typer.Option("--reason", help="why (shown in list)")] = "manual",
    force: Annotated[bool, typer.Option("--force", help="ban even an allow-listed address")] = False,
    from_file: Annotated[Optional[Path], typer.Option("--from-file", help="one address/CIDR per line, # comments")] = None,
) -> None:
    """Ban an address or network by hand (or every one in a file, in one batch)."""
    from ..addresses import parse_target

    if bool(target) == bool(from_file):
        raise SipguardError("give either an address or --from-file FILE")
    dur = _duration_option(for_)
    if dur == "policy":
        dur = ctx.cfg.policy.bantime
    allow = ctx.allow()
    if from_file is not None:
        targets = _read_targets(from_file, allow, force)  # all validated before anything changes
        store = ctx.store()
        enforcer = _kernel_enforcer()
        t0 = time.perf_counter()
        try:
            from ..actions import manual_ban_many

            bans = manual_ban_many(store, targets, dur, reason, enforcer)  # type: ignore[arg-type]
        finally:
            if enforcer is not None:
                enforcer.close()
        out.print(f"banned {len(bans)} addresses from {from_file} for "
                  f"{format_duration(None if dur is None else float(dur))} in {time.perf_counter() - t0:.2f}s")
        return
    try:
        ip = parse_target(target or "")  # a bad address fails before any kernel state is looked at
    except ValueError as exc:
        raise SipguardError(str(exc)) from None
    if (whole := _whole_internet(ip)) is not None:
        raise SipguardError(whole)
    store = ctx.store()
    enforcer = _kernel_enforcer()
    try:
        from ..actions import manual_ban

        b = manual_ban(store, target or "", dur, reason, allow, enforcer=enforcer, force=force)  # type: ignore[arg-type]
    finally:
        if enforcer is not None:
            enforcer.close()
    out.print(f"banned {b.ip} for {format_duration(b.remaining(time.time()))} ({b.reason})")


@app.command()
def unban(
    target: Annotated[Optional[str], typer.Argument(help="IP address or CIDR")] = None,
    all_: Annotated[bool, typer.Option("--all", help="lift every ban")] = False,
) -> None:
    """Lift a ban (or all of them)."""
    if all_ == bool(target):
        raise SipguardError("give either an address or --all")
    store = ctx.store()
    enforcer = _kernel_enforcer()
    try:
        if all_:
            from ..actions import unban_all

            bans = unban_all(store, enforcer)
            out.print(f"unbanned {len(bans)} addresses")
            return
        from ..actions import manual_unban

        b = manual_unban(store, target or "", enforcer)
    finally:
        if enforcer is not None:
            enforcer.close()
    if b is None:
        out.print(f"{target} was not banned (its past events no longer count)")
    else:
        out.print(f"unbanned {b.ip}")


