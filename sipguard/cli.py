"""The `sipguard` command (typer): parses arguments and calls the stages; holds no logic of its own.

Errors are one clear line on stderr and a non-zero exit; `--json` output is for scripts,
tables are for people.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from . import __version__
from .addresses import AllowList
from .config import Config, format_duration, load_config, parse_duration, resolve_state_dir
from .cli_firewall import firewall_app
from .errors import SipguardError

if TYPE_CHECKING:
    from .store import Store

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="sipguard: bans the sources that attack a Kamailio SIP server, from what Kamailio logs.",
    pretty_exceptions_enable=False,
)
app.add_typer(firewall_app, name="firewall")


class _LazyConsole:
    """A rich Console made on first use: `scan --json` and friends never pay for importing rich."""

    def __init__(self, **kw: object) -> None:
        self._kw = kw
        self._console = None

    def __getattr__(self, name: str):  # noqa: ANN204
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._kw)
        return getattr(self._console, name)


def Table(*args, **kw):  # noqa: ANN201, N802 - rich's Table, imported on first use
    from rich.table import Table as _Table

    return _Table(*args, **kw)


out = _LazyConsole(highlight=False, soft_wrap=True)
err = _LazyConsole(stderr=True, highlight=False, soft_wrap=True)


class _Ctx:
    config_path: Optional[Path] = None
    state_dir: Optional[Path] = None
    _cfg: Optional[Config] = None

    @property
    def cfg(self) -> Config:
        if self._cfg is None:
            self._cfg = load_config(self.config_path)
        return self._cfg

    def store(self) -> Store:
        from .store import Store

        state = resolve_state_dir(self.cfg, self.state_dir)
        try:
            return Store.open_state_dir(state)
        except Exception as exc:  # noqa: BLE001 - permission, read-only fs, corrupt file
            raise SipguardError(f"cannot open the state database in {state}: {exc}") from None

    def allow(self) -> AllowList:
        c = self.cfg.allowlist
        return AllowList(c.cidrs, include_host=c.include_host_addresses)


ctx = _Ctx()


def _version(value: bool) -> None:
    if value:
        print(f"sipguard {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", envvar="SIPGUARD_CONFIG",
                                                   help="TOML config (default /etc/sipguard/sipguard.toml)")] = None,
    state_dir: Annotated[Optional[Path], typer.Option("--state-dir", envvar="SIPGUARD_STATE_DIR",
                                                      help="state directory (default /var/lib/sipguard)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    ctx.config_path = config
    ctx.state_dir = state_dir
    ctx._cfg = None
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _duration_option(value: str | None) -> float | None | str:
    if value is None:
        return "policy"
    try:
        return parse_duration(value, allow_permanent=True)
    except ValueError as exc:
        raise SipguardError(f"--for: {exc}") from None


# -- run ---------------------------------------------------------------------------------------
@app.command()
def run(
    log: Annotated[Optional[list[str]], typer.Option("--log", "-l", help="log file to follow (repeatable)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="decide and record, never touch the kernel")] = False,
    from_start: Annotated[bool, typer.Option("--from-start", help="first start: read existing lines too")] = False,
    max_seconds: Annotated[Optional[float], typer.Option(hidden=True)] = None,
) -> None:
    """Run the daemon in the foreground (systemd runs this)."""
    from .daemon import Daemon
    from .enforce import make_enforcer

    cfg = ctx.cfg
    from .filters import FilterSet

    filters = FilterSet.load(cfg.filters.directories, enabled=cfg.filters.enabled, disabled=cfg.filters.disabled)
    store = ctx.store()
    enforcer = make_enforcer("dryrun" if dry_run else cfg.enforce)
    daemon = Daemon(cfg, store, enforcer, logs=log or None, from_start=from_start or None, filters=filters)
    daemon.install_signal_handlers()
    stats = daemon.run(max_seconds=max_seconds)
    logging.getLogger("sipguard").info("stopped: %d lines, %d events, %d bans", stats.lines, stats.events, stats.bans)


# -- scan --------------------------------------------------------------------------------------
@app.command()
def scan(
    logs: Annotated[list[Path], typer.Argument(help="log files (.gz too)", exists=False)],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Offline: apply filters and policy to whole files in their own time; print the bans."""
    from .scan import scan_files

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
    from .filters import FilterSet
    from .formats import RecordParser
    from .sources import read_file

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
    lines = records = 0

    def handle(rec) -> None:
        hit = False
        for name, ip, outcome in fs.explain(rec.text):
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

    for line in read_file(str(log)):
        lines += 1
        for rec in parser.feed(line):
            records += 1
            handle(rec)
    for rec in parser.flush():
        records += 1
        handle(rec)
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


# -- bans --------------------------------------------------------------------------------------
def _kernel_enforcer():
    """The enforcer [enforce] names, or None with backend = "dryrun" (the CLI then only writes the store)."""
    from .enforce import make_enforcer

    if ctx.cfg.enforce.backend == "dryrun":
        return None
    return make_enforcer(ctx.cfg.enforce)


@app.command("list")
def list_(
    as_json: Annotated[bool, typer.Option("--json", help="JSON array of bans")] = False,
    kernel: Annotated[bool, typer.Option("--kernel", help="also show what the kernel's sets hold")] = False,
) -> None:
    """Bans in force (with --kernel: beside the kernel's own entries and their timeouts)."""
    store = ctx.store()
    now = time.time()
    bans = store.active_bans(now)
    held: dict[str, float | None] = {}
    if kernel:
        enforcer = _kernel_enforcer()
        if enforcer is None:
            raise SipguardError('--kernel: [enforce] backend = "dryrun" enforces nothing')
        try:
            held = {e.ip: e.timeout for e in enforcer.entries()}
        finally:
            enforcer.close()
    in_db = {b.ip for b in bans}
    if as_json:
        rows = []
        for b in bans:
            row = {"ip": b.ip, "reason": b.reason, "created": _iso(b.created), "expires": _iso(b.expires),
                   "manual": b.manual, "score": b.score, "offence": b.offence}
            if kernel:
                row["kernel"] = {"timeout": held[b.ip]} if b.ip in held else None
            rows.append(row)
        for ip in sorted(held.keys() - in_db):
            rows.append({"ip": ip, "reason": None, "created": None, "expires": None, "manual": None,
                         "score": None, "offence": None, "kernel": {"timeout": held[ip]}, "kernel_only": True})
        print(json.dumps(rows))
        return
    table = Table(title=f"{len(bans)} bans in force" + (f", {len(held)} kernel entries" if kernel else ""))
    cols = ["ip", "reason", "created", "expires", "left", "offence", "by"] + (["kernel"] if kernel else [])
    for col in cols:
        table.add_column(col)

    def k(ip: str) -> str:
        if ip not in held:
            return "MISSING"
        return "permanent" if held[ip] is None else format_duration(held[ip])

    for b in bans:
        table.add_row(b.ip, b.reason, _iso(b.created) or "", _iso(b.expires) or "never",
                      format_duration(b.remaining(now)), str(b.offence), "manual" if b.manual else "auto",
                      *([k(b.ip)] if kernel else []))
    for ip in sorted(held.keys() - in_db):
        table.add_row(ip, "(kernel only)", "", "", "", "", "", k(ip))
    out.print(table)


def _read_targets(path: Path, allow: AllowList, force: bool) -> list[str]:
    """One address or CIDR per line, '#' comments and blank lines allowed; errors name file:line."""
    from .addresses import parse_target

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
    from .addresses import parse_target

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
            from .actions import manual_ban_many

            bans = manual_ban_many(store, targets, dur, reason, enforcer)  # type: ignore[arg-type]
        finally:
            if enforcer is not None:
                enforcer.close()
        out.print(f"banned {len(bans)} addresses from {from_file} for "
                  f"{format_duration(None if dur is None else float(dur))} in {time.perf_counter() - t0:.2f}s")
        return
    try:
        parse_target(target or "")  # a bad address fails before any kernel state is looked at
    except ValueError as exc:
        raise SipguardError(str(exc)) from None
    store = ctx.store()
    enforcer = _kernel_enforcer()
    try:
        from .actions import manual_ban

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
            from .actions import unban_all

            bans = unban_all(store, enforcer)
            out.print(f"unbanned {len(bans)} addresses")
            return
        from .actions import manual_unban

        b = manual_unban(store, target or "", enforcer)
    finally:
        if enforcer is not None:
            enforcer.close()
    if b is None:
        out.print(f"{target} was not banned (its past events no longer count)")
    else:
        out.print(f"unbanned {b.ip}")


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """What the daemon is doing: heartbeat, counters, bans."""
    store = ctx.store()
    raw = store.get_meta("status")
    st = json.loads(raw) if raw else {}
    now = time.time()
    alive = bool(st) and st.get("running") and now - st.get("heartbeat", 0) < 10
    info = {"daemon": "running" if alive else "not running", "bans": len(store.active_bans(now)),
            "database": store.path, **store.stats(), "last_status": st}
    if ctx.cfg.cluster is not None:  # fleet mode: the nodes Redis has seen and whether this one is in sync
        from .cluster import cluster_status

        info["cluster"] = cluster_status(ctx.cfg.cluster, store, now)
    if as_json:
        print(json.dumps(info))
        return
    out.print(f"daemon: {info['daemon']}" + (f" (pid {st.get('pid')}, enforcer {st.get('enforcer')})" if alive else ""))
    if st:
        out.print(f"last heartbeat: {_iso(st.get('heartbeat'))}; following: {', '.join(st.get('logs', []))}")
        for part in ("daemon", "sources", "formats", "filters", "policy"):
            vals = st.get(part) or {}
            if vals:
                out.print(f"{part}: " + ", ".join(f"{k}={v}" for k, v in vals.items() if k != "started"))
    out.print(f"bans in force: {info['bans']}; events stored: {info['events']}; database: {store.path}")
    if "cluster" in info:
        from .cluster import cluster_lines

        for line in cluster_lines(info["cluster"]):
            out.print(line, markup=False)


@app.command("check-config")
def check_config() -> None:
    """Validate the config and every filter; print a summary."""
    from .filters import FilterSet

    cfg = ctx.cfg
    fs = FilterSet.load(cfg.filters.directories, enabled=cfg.filters.enabled, disabled=cfg.filters.disabled)
    out.print(f"config: {cfg.path or 'defaults (no file)'}: OK")
    out.print(f"filters: {', '.join(fs.names)}")
    for name, j in cfg.policy.jails.items():
        out.print(f"jail {name}: {'+'.join(k.value for k in j.kinds)} >= {j.threshold:g} in "
                  f"{format_duration(j.findtime)}" + (", reset on success" if j.reset_on_success else ""))


from . import cli_ops  # noqa: E402,F401 - registers `import` and `report`


def entry() -> None:
    """Console-script entry: every SipguardError is one line and exit code 1."""
    try:
        app(standalone_mode=True)
    except SipguardError as exc:
        err.print(f"sipguard: error: {exc}", markup=False)
        sys.exit(1)
    except OSError as exc:  # permissions, missing files: still one line, not a traceback
        err.print(f"sipguard: error: {exc}", markup=False)
        sys.exit(1)


if __name__ == "__main__":
    entry()
