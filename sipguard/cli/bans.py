"""`sipguard list`, `ban` and `unban`: the operator's view of the bans and manual changes to them.

`list` streams the store's bans through its filters (address or CIDR, reason or jail, since, manual or
automatic; applied here as rows stream, the store only reads) into sipguard/cli/output.py's writer;
every confirmation line prints the ban's values literally (escaped, never as markup)."""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..addresses import AllowList
from ..config import format_duration, parse_duration
from ..errors import SipguardError
from ..model import Ban
from .app import UNKNOWN, _duration_option, _iso, _kernel_enforcer, app, ctx, out
from .output import Column, open_rows, output_format


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


def _since_option(value: str | None, now: float) -> float | None:
    """--since: a duration back from now (30m, 2h, 7d) or an ISO 8601 time (UTC unless it says)."""
    if value is None:
        return None
    try:
        return now - parse_duration(value)
    except ValueError:
        pass
    from datetime import datetime, timezone

    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise SipguardError(f"--since: expected a duration (30m, 2h, 7d) or an ISO 8601 time, not {value!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.timestamp()


def _address_filter(target: str | None):
    """The test `list`'s address argument makes of a ban (None: no address given): the bans whose address
    or network overlaps it. The other filters (reason, since, manual) are the store's SQL."""
    from ..addresses import network

    if target is None:
        return None
    from ..addresses import parse_target

    try:
        net = network(parse_target(target))
    except ValueError as exc:
        raise SipguardError(f"list: {exc}") from None

    def keep(b: Ban) -> bool:
        try:
            other = network(b.ip)
        except ValueError:
            return False
        return other.version == net.version and net.overlaps(other)

    return keep


@app.command("list")
def list_(
    target: Annotated[Optional[str], typer.Argument(
        help="only the bans of this address or inside/around this CIDR")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON array of bans (short for --output json)")] = False,
    kernel: Annotated[bool, typer.Option("--kernel", help="also show what the kernel's sets hold")] = False,
    output: Annotated[Optional[str], typer.Option(
        "--output", help="table | plain | json | csv (default: table on a terminal, plain columns when piped)")] = None,
    reason: Annotated[Optional[str], typer.Option(
        "--reason", "--jail", help="only this reason, or every reason of this jail (sip matches sip:auth, "
                                   "blocklist every blocklist:NAME)")] = None,
    since: Annotated[Optional[str], typer.Option(
        "--since", help="only bans made since: a duration back (30m, 2h, 7d) or an ISO 8601 time")] = None,
    manual: Annotated[Optional[bool], typer.Option(
        "--manual/--auto", help="only the bans made by hand / only those the policy or a list made")] = None,
    count: Annotated[bool, typer.Option("--count", help="print only the number of bans that match")] = False,
) -> None:
    """Bans in force (with --kernel: beside the kernel's own entries and their timeouts).

    Rows stream from the database as they are printed (bounded memory at any number of bans);
    no value is ever cut, and reasons are printed literally (escaped, never as markup).
    """
    fmt = output_format(output, as_json)
    store = ctx.store(readonly=True)
    now = time.time()
    keep = _address_filter(target)
    narrow = {"reason": reason, "since": _since_option(since, now), "manual": manual}
    if count:
        if kernel:
            raise SipguardError("--count and --kernel: choose one")
        n = store.count_active_bans(now, **narrow) if keep is None else \
            sum(1 for b in store.iter_active_bans(now, **narrow) if keep(b))
        print(json.dumps({"count": n}) if fmt == "json" else n)
        return
    bans = store.iter_active_bans(now, **narrow)
    users: list[Ban] = []
    # then the user bans (the office policy: one user at one address, in Kamailio only)
    users = [b for b in store.active_user_bans(now) if (narrow["since"] is None or b.created >= narrow["since"])
             and (manual is None or b.manual is manual)
             and (reason is None or b.reason == reason or b.reason.split(":", 1)[0] == reason)
             and (keep is None or keep(b))]
    bans = itertools.chain(bans, users)
    if keep is not None:
        bans = (b for b in bans if keep(b))
    held: dict[str, float | None] = {}
    if kernel:
        enforcer = _kernel_enforcer()
        if enforcer is None:
            raise SipguardError('--kernel: [enforce] backend = "dryrun" enforces nothing')
        try:
            held = {e.ip: e.timeout for e in enforcer.entries()}
        finally:
            enforcer.close()
        if keep is not None:  # the kernel's own entries go through the address filter only
            held = {ip: t for ip, t in held.items() if keep(Ban(ip, "", now, None))}
    n_kernel = len(held)
    if fmt == "json":
        cols = [Column(k) for k in ("ip", "user", "reason", "created", "expires", "manual", "score", "offence",
                                    "refused")] \
            + ([Column("kernel"), Column("kernel_only")] if kernel else [])
        with open_rows(cols, fmt) as rows:
            for b in bans:
                extra = [{"timeout": held.pop(b.ip)} if b.ip in held else None, False] if kernel else []
                if b.user is not None:
                    extra = [None, False] if kernel else []
                rows.row([b.ip, b.user, b.reason, _iso(b.created), _iso(b.expires), b.manual, _json_number(b.score),
                          _json_number(b.offence), b.refused, *extra])
            for ip in sorted(held):
                rows.row([ip, None, None, None, None, None, None, None, None, {"timeout": held[ip]}, True])
        return

    summary = store.active_bans_summary(now)
    refused = summary.refused or fmt == "csv"
    cols = [Column("ip", width=max([summary.ip_width, *map(len, held)]), whole=True),
            Column("reason", width=max(summary.reason_width, len("(kernel only)"))),
            Column("created", width=20, whole=True), Column("expires", width=20, whole=True),
            Column("left", width=12, whole=True), Column("offence", width=summary.offence_width, right=True),
            Column("by", width=6)] + ([Column("user")] if users else []) \
        + ([Column("kernel", width=12, whole=True)] if kernel else []) \
        + ([Column("refused", "refused by the enforcer")] if refused else [])
    if fmt == "table":
        out.print((f"{summary.count} bans in force" if keep is None else "bans in force that match")
                  + (f", {n_kernel} kernel entries" if kernel else ""))

    def k(ip: str) -> str:
        if ip not in held:
            return "MISSING"
        t = held.pop(ip)
        return "permanent" if t is None else format_duration(t)

    with open_rows(cols, fmt) as rows:
        for b in bans:
            rows.row([b.ip, "" if b.reason is None else b.reason, _iso(b.created), _iso(b.expires) or "never",
                      _left(b, now), str(b.offence), "manual" if b.manual else "auto", *([b.user or ""] if users else []),
                      *([("(htable)" if b.user is not None else k(b.ip))] if kernel else []),
                      *([b.refused or ""] if refused else [])])
        for ip in sorted(held):
            t = held[ip]
            rows.row([ip, "(kernel only)", "", "", "", "", "", *([""] if users else []),
                      "permanent" if t is None else format_duration(t),
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
    user: Annotated[Optional[str], typer.Option(
        "--user", help="ban only this user at the address (the office policy: Kamailio answers that user 403 "
                       "through the htable mirror; the address and its other users are not touched)")] = None,
) -> None:
    """Ban an address or network by hand (or every one in a file, in one batch), or one user at one
    address (--user)."""
    from ..addresses import parse_target

    if bool(target) == bool(from_file):
        raise SipguardError("give either an address or --from-file FILE")
    if user is not None and from_file is not None:
        raise SipguardError("--user needs an address, not --from-file")
    dur = _duration_option(for_)
    if dur == "policy":
        dur = ctx.cfg.policy.office.user_bantime if user is not None else ctx.cfg.policy.bantime
    allow = ctx.allow()
    if user is not None:
        from ..actions import manual_ban_user

        ub = manual_ban_user(ctx.store(), target or "", user, dur, reason, allow, force=force)  # type: ignore[arg-type]
        out.print(f"banned user {ub.user} at {ub.ip} for {format_duration(ub.remaining(time.time()))} ({ub.reason}); "
                  "Kamailio enforces it through the htable mirror" + ("" if ctx.cfg.htable.enabled else
                                                                       " ([htable] enabled = false: stored and listed only)"))
        return
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
    user: Annotated[Optional[str], typer.Option(
        "--user", help="lift the user ban of this user at the address (the office policy), not an address ban")] = None,
) -> None:
    """Lift a ban (or all of them)."""
    if all_ == bool(target):
        raise SipguardError("give either an address or --all")
    store = ctx.store()
    if user is not None:
        if all_:
            raise SipguardError("--user needs an address, not --all")
        from ..actions import manual_unban_user

        ub = manual_unban_user(store, target or "", user)  # out.print escapes what it prints
        out.print(f"user {user} at {target} had no user ban" if ub is None else
                  f"lifted the user ban of {user} at {ub.ip}")
        return
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


