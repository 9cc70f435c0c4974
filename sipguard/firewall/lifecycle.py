"""Changing the installed firewall: plan (installed vs wanted, per family), apply, confirm, the detached
revert helper, show, remove, dry_run.

`apply` replaces the whole filter table with one `iptables-restore` call per family (all or nothing; if
IPv6 fails after IPv4 succeeded, IPv4 is put back), keeps sipguard's ban hook chain ([enforce] chain,
SIPGUARD) and its rules, and keeps `-A INPUT -j SIPGUARD` the first rule of INPUT. The table as it was
before the first apply is saved under STATE/firewall/ so that `remove` can restore it. With a confirm
timeout, a detached process (`sipguard firewall revert-if-unconfirmed TOKEN`) puts the previous rules
back unless `sipguard firewall confirm` runs in time (like iptables-apply).

Only the filter tables of the current network namespace are changed. The enforcer's ipsets and nftables
table are never deleted here: `sipguard firewall remove` asks sipguard.enforce.remove_all for that.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import Config
from ..errors import SipguardError
from ..netfilter import FLAVOURS, Tools, firewall_tools, resolve_tools
from ..text import printable
from .guard import foreign_chains, legacy_warning, ssh_guard, ssh_warning
from .hostenv import Env, resolve_env
from .state import drop_pending, fw_dir, locked, read_pending, write_atomic
from .tables import Table, canonical, is_hook_chain, parse_save, restore_table, strip_sipguard
from .templates import render
from .tools import save_text

Echo = Callable[[str], None]


@dataclass
class Family:
    """One family's plan: the installed table (as text and parsed) and the wanted one."""

    fam: int
    current_text: str
    current: Table
    desired: Table

    @property
    def in_sync(self) -> bool:
        return self.current == self.desired

    def diff(self) -> str:
        a, b = self.current.dump().splitlines(), self.desired.dump().splitlines()
        return "\n".join(difflib.unified_diff(a, b, f"IPv{self.fam} installed", f"IPv{self.fam} wanted",
                                              lineterm="", n=1))


def families(cfg: Config) -> list[int]:
    """The families the firewall manages: IPv4, and IPv6 unless [firewall] ipv6 = false."""
    return [4, 6] if cfg.firewall.ipv6 else [4]


def plan(cfg: Config, tools: Tools, env: Env) -> list[Family]:
    """Current and wanted table per family; the wanted one carries the current hook chains' rules over."""
    hook = cfg.enforce.chain
    out = []
    for fam in families(cfg):
        text = save_text(tools, fam)
        current = parse_save(text)
        desired = canonical(tools, fam, render(cfg, fam, env))
        if current.present:
            for name, (policy, rules) in current.chains.items():
                if is_hook_chain(name, hook):
                    desired.chains[name] = (None, list(rules))
        out.append(Family(fam, text, current, desired))
    return out


def apply(cfg: Config, state_dir: Path, *, force: bool = False, confirm_timeout: int | None = None,
          ssh_connection: str | None = None, echo: Echo = print, warn: Echo = print,
          config_path: Path | None = None, env: Env | None = None, tools: Tools | None = None) -> bool:
    """Make the installed filter tables what the config asks for; True when something changed."""
    tools = tools or firewall_tools(cfg)
    env = env or resolve_env(cfg, tools)
    for note in env.notes:
        warn(f"note: {note}")
    reason = ssh_guard(cfg, env, ssh_connection)
    if reason:
        if not force:
            raise SipguardError(f"refusing to apply: {reason}; fix [firewall] or use --force")
        warn(f"warning: {reason} (--force: applying anyway)")
    if (w := ssh_warning(cfg)):
        warn(f"warning: {w}")
    if (w := legacy_warning(tools)):
        warn(f"warning: {w}")
    d = fw_dir(state_dir)
    with locked(d):
        plans = plan(cfg, tools, env)
        if all(p.in_sync for p in plans):
            fams = " and ".join(f"IPv{p.fam}" for p in plans)
            echo(f"firewall in sync with the config ({fams}, {tools.flavour}): nothing changed")
            if read_pending(d):
                warn("note: an earlier apply is still waiting for `sipguard firewall confirm`")
            return False
        for p in plans:
            if p.in_sync:
                echo(f"IPv{p.fam}: in sync, unchanged")
                continue
            foreign = foreign_chains(cfg, p.current)
            if foreign:
                warn(f"warning: the IPv{p.fam} filter table has chains sipguard does not manage "
                     f"({', '.join(foreign)}): apply replaces them (`sipguard firewall remove` brings them back)")
            echo(p.diff())
        # The table before sipguard ever touched it: saved once, for `remove`.
        for p in plans:
            before = d / f"before-v{p.fam}.rules"
            if not before.exists():
                write_atomic(before, p.current_text)
        old = read_pending(d)
        if old:  # still connected enough to apply again: the earlier apply is confirmed by this one
            drop_pending(d, old.get("token"))
            (d / f"confirmed-{old.get('token')}").touch()
        done: list[Family] = []
        for p in plans:
            if p.in_sync:
                continue
            try:
                restore_table(tools, p.fam, p.desired)
            except SipguardError as exc:
                msg = f"applying the IPv{p.fam} rules failed: {exc}"
                for q in reversed(done):
                    try:
                        restore_table(tools, q.fam, q.current)
                        msg += f"; IPv{q.fam} was put back as it was"
                    except SipguardError as exc2:
                        msg += f"; putting IPv{q.fam} back failed too: {exc2}"
                raise SipguardError(msg) from None
            done.append(p)
        write_atomic(d / "applied.json", json.dumps({"flavour": tools.flavour, "time": time.time(),
                                                     "families": [p.fam for p in plans]}))
        for p in done:
            if parse_save(save_text(tools, p.fam)) != p.desired:
                warn(f"warning: the installed IPv{p.fam} rules read back differently from the wanted ones "
                     "(`sipguard firewall show` will report it)")
        echo("applied: " + ", ".join(f"IPv{p.fam}" for p in done) + f" ({tools.flavour})")
        if confirm_timeout:
            token = secrets.token_hex(8)
            for p in done:
                write_atomic(d / f"prev-{token}-v{p.fam}.rules", p.current.dump() if p.current.present else "")
            pending = {"token": token, "deadline": time.time() + confirm_timeout, "flavour": tools.flavour,
                       "families": [p.fam for p in done]}
            write_atomic(d / "pending.json", json.dumps(pending))
            pending["pid"] = _spawn_reverter(state_dir, token, config_path)
            write_atomic(d / "pending.json", json.dumps(pending))
            echo(f"run `sipguard firewall confirm` within {confirm_timeout}s, or the previous rules come back "
                 f"(revert process {pending['pid']})")
    return True


def _spawn_reverter(state_dir: Path, token: str, config_path: Path | None) -> int:
    args = [sys.executable, "-m", "sipguard"]
    if config_path:
        args += ["--config", str(config_path)]
    args += ["--state-dir", str(state_dir), "firewall", "revert-if-unconfirmed", token]
    log = open(fw_dir(state_dir) / "revert.log", "a")
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                                start_new_session=True)  # setsid: survives the SSH session that ran apply
    finally:
        log.close()
    return proc.pid


def revert_if_unconfirmed(state_dir: Path, token: str, poll: float = 0.1) -> str:
    """The detached helper: wait for the deadline; revert unless confirmed (or superseded) meanwhile."""
    d = fw_dir(state_dir)
    p = read_pending(d)
    marker = d / f"confirmed-{token}"
    if not p or p.get("token") != token:
        marker.unlink(missing_ok=True)
        return "nothing pending"
    deadline = float(p["deadline"])
    while time.time() < deadline:  # bounded by the deadline
        cur = read_pending(d)
        if marker.exists() or not cur or cur.get("token") != token:
            marker.unlink(missing_ok=True)
            return "confirmed"
        time.sleep(max(0.0, min(poll, deadline - time.time())))
    with locked(d):
        cur = read_pending(d)
        if marker.exists() or not cur or cur.get("token") != token:
            marker.unlink(missing_ok=True)
            return "confirmed"
        recorded = cur.get("flavour")
        tools = resolve_tools(recorded if recorded in FLAVOURS else None)  # as applied, not as configured now
        errors = []
        for fam in cur.get("families", []):
            try:
                prev = parse_save((d / f"prev-{token}-v{fam}.rules").read_text())
                restore_table(tools, fam, prev)
            except (OSError, SipguardError) as exc:
                errors.append(f"IPv{fam}: {exc}")
        drop_pending(d, token)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    msg = f"{stamp} apply {token} not confirmed: previous rules restored" + (f" (errors: {'; '.join(errors)})"
                                                                             if errors else "")
    print(printable(msg), flush=True)  # error texts can quote rule lines: never raw control bytes
    return "reverted"


def confirm(state_dir: Path) -> str:
    """Keep the rules of the apply waiting for confirmation (its revert helper then exits)."""
    d = fw_dir(state_dir)
    with locked(d):
        p = read_pending(d)
        if not p:
            return "nothing to confirm (no apply is waiting for confirmation)"
        (d / f"confirmed-{p['token']}").touch()
        drop_pending(d, p["token"])
    return "confirmed: the new rules stay"


def show(cfg: Config, tools: Tools | None = None, env: Env | None = None) -> tuple[bool, str]:
    """(in sync, text): per family "in sync" or the diff between the installed and the wanted table."""
    tools = tools or firewall_tools(cfg)
    env = env or resolve_env(cfg, tools)
    plans = plan(cfg, tools, env)
    lines = []
    for p in plans:
        if p.in_sync:
            lines.append(f"IPv{p.fam}: in sync with the config ({tools.flavour})")
        else:
            lines.append(f"IPv{p.fam}: differs from the config ({tools.flavour}):")
            lines.append(p.diff())
    if not cfg.firewall.ipv6:
        lines.append("IPv6: not managed (ipv6 = false)")
    return all(p.in_sync for p in plans), "\n".join(lines)


def remove(cfg: Config, state_dir: Path, *, echo: Echo = print, warn: Echo = print) -> None:
    """Put back the tables saved at the first apply, minus anything of sipguard's (its hook chains, jumps to
    them, rules matching its sets), and forget the firewall's files. The sets themselves are the
    enforcer's: `sipguard firewall remove` then calls sipguard.enforce.remove_all."""
    d = fw_dir(state_dir)
    hook = cfg.enforce.chain
    prefix = cfg.enforce.set_prefix
    flavour = None
    with contextlib.suppress(OSError, ValueError):
        flavour = json.loads((d / "applied.json").read_text()).get("flavour")
    tools = firewall_tools(cfg, flavour if flavour in FLAVOURS else None)  # the flavour apply used
    with locked(d):
        drop_pending(d)
        for fam in (4, 6):
            before = d / f"before-v{fam}.rules"
            current = parse_save(save_text(tools, fam))
            if before.exists():
                base = parse_save(before.read_text())
            elif fam == 6 and not cfg.firewall.ipv6:
                continue
            else:
                warn(f"note: no saved pre-sipguard IPv{fam} table in {d}: only sipguard's chains are removed")
                base = current
            wanted = strip_sipguard(base, hook, prefix)
            if wanted == current and wanted.present == current.present:
                echo(f"IPv{fam}: nothing to remove")
                continue
            restore_table(tools, fam, wanted)
            echo(f"IPv{fam}: restored the filter table as it was before sipguard")
        for f in d.iterdir():
            if f.name.startswith(("before-", "prev-", "confirmed-")) or f.name in ("pending.json", "applied.json"):
                f.unlink(missing_ok=True)


def dry_run(cfg: Config) -> str:
    """The rendered rules of every managed family (comments included); touches nothing."""
    try:
        tools: Tools | None = firewall_tools(cfg)
    except SipguardError:
        tools = None
    env = resolve_env(cfg, tools)
    parts = [f"# note: {n}" for n in env.notes]
    for fam in families(cfg):
        parts.append(f"# ===== IPv{fam} ({tools.restore(fam) if tools else 'iptables-restore'}) =====")
        parts.append(render(cfg, fam, env).rstrip("\n"))
    return "\n".join(parts) + "\n"
