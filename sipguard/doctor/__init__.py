"""`sipguard doctor`: is this Kamailio host set up right, end to end? One small function per check,
each returning typed `Finding`s (ok, problem, warning, skipped, with the exact fix).

Checks, in order (their names are what `--check` selects and what `--json` reports):
logs, contract, clock (sipguard/doctor/logs.py); journald, rsyslog (syslog.py); tools, iptables,
hook, sets (kernel.py); state-dir, database, heartbeat (state.py); redis (with fleet), htable,
allowlist (network.py).

Read-only throughout: doctor never changes firewall state, the store or any file; every check
catches its own failure, so one broken part never hides the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .base import STATUSES, Finding, Host, Status, printable
from .kernel import check_hook, check_iptables, check_sets, check_tools
from .logs import check_clock, check_contract, check_logs
from .network import check_allowlist, check_htable, check_redis
from .state import check_database, check_heartbeat, check_state_dir
from .syslog import check_journald, check_rsyslog

CHECKS: dict[str, Callable[[Host], list[Finding]]] = {
    "logs": check_logs,
    "contract": check_contract,
    "clock": check_clock,
    "journald": check_journald,
    "rsyslog": check_rsyslog,
    "tools": check_tools,
    "iptables": check_iptables,
    "hook": check_hook,
    "sets": check_sets,
    "state-dir": check_state_dir,
    "database": check_database,
    "heartbeat": check_heartbeat,
    "redis": check_redis,
    "htable": check_htable,
    "allowlist": check_allowlist,
}

MAX_EXIT = 125  # exit statuses above are the shell's (126 not executable, 127 not found, 128+N signals)


def run_checks(host: Host, only: Iterable[str] | None = None) -> list[Finding]:
    """The findings of every check (or of `only`), in CHECKS order; a check that raises is a problem."""
    names = list(CHECKS) if only is None else list(only)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ValueError(f"unknown check {', '.join(unknown)}: expected {', '.join(CHECKS)}")
    out: list[Finding] = []
    try:
        for name in CHECKS:
            if name not in names:
                continue
            try:
                out += CHECKS[name](host)
            except Exception as exc:  # noqa: BLE001 - a check must not hide the others
                out.append(Finding(name, "problem", f"the check failed: {printable(type(exc).__name__)}: "
                                   f"{printable(exc)}", "run with -v and report it; fix what the message names"))
    finally:
        store = host._cache.get("store")
        if store and store[0] is not None:
            store[0].close()
    return out


def summary(findings: list[Finding]) -> dict[str, int]:
    counts = {s: 0 for s in STATUSES}
    for f in findings:
        counts[f.status] += 1
    return counts


def exit_status(findings: list[Finding]) -> int:
    """The number of problems, at most MAX_EXIT."""
    return min(MAX_EXIT, sum(1 for f in findings if f.status == "problem"))


def as_json(findings: list[Finding]) -> dict:
    """The documented `doctor --json` schema."""
    c = summary(findings)
    return {"problems": c["problem"], "warnings": c["warning"], "exit_status": exit_status(findings),
            "checks": [f.as_json() for f in findings]}


__all__ = ["CHECKS", "Finding", "Host", "MAX_EXIT", "Status", "as_json", "exit_status", "run_checks", "summary"]
