"""Shared plumbing for the benchmarks: the machine, namespaces, processes, statistics.

Safety: everything that touches iptables/ipset/nft runs inside network namespaces named `sgb-...`
that are created here and deleted afterwards even on failure; processes are started in their own
session and stopped by their own id. `host_firewall()` snapshots the host's rules so `run.py` can
prove nothing changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PY = sys.executable
SIPGUARD = [PY, "-m", "sipguard"]
F2B_FILTER = BENCH / "fail2ban" / "filter.d" / "sipguard-kamailio.conf"
F2B_FILTER_PLAIN = BENCH / "fail2ban" / "filter.d" / "sipguard-kamailio-plain.conf"
NS_PREFIX = "sgb-"

_started: list[subprocess.Popen] = []


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ machine
def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    f2b = None
    if shutil.which("fail2ban-client"):
        f2b = subprocess.run(["fail2ban-client", "-V"], capture_output=True, text=True).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fail2ban": f2b,
    }


def have_fail2ban() -> bool:
    return bool(shutil.which("fail2ban-regex") and shutil.which("fail2ban-client"))


def can_netns() -> bool:
    return os.geteuid() == 0 and bool(shutil.which("ip")) and bool(shutil.which("ipset"))


# ------------------------------------------------------------------------------------ stats
def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ------------------------------------------------------------------------------------ processes
def start(cmd: list[str], ns: str | None = None, **kw) -> subprocess.Popen:
    """Start a process (inside namespace `ns` if given) in its own session; tracked for stop_all."""
    if ns is not None:
        assert ns.startswith(NS_PREFIX)
        cmd = ["ip", "netns", "exec", ns, *cmd]
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.DEVNULL)
    p = subprocess.Popen(cmd, start_new_session=True, **kw)
    _started.append(p)
    return p


def stop(p: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM our process's own session (it leads it), bounded wait, then SIGKILL."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
    else:  # the leader is gone; children of its session may remain
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
    if p in _started:
        _started.remove(p)


def stop_all() -> None:
    for p in list(_started):
        stop(p, 5.0)


def run(cmd: list[str], ns: str | None = None, timeout: float = 600, check: bool = True,
        **kw) -> subprocess.CompletedProcess:
    if ns is not None:
        assert ns.startswith(NS_PREFIX)
        cmd = ["ip", "netns", "exec", ns, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check, **kw)


# ------------------------------------------------------------------------------------ namespaces
@contextlib.contextmanager
def netns(tag: str) -> Iterator[str]:
    """A fresh network namespace `sgb-<tag>-<pid>` (loopback up), deleted afterwards, always."""
    name = f"{NS_PREFIX}{tag}-{os.getpid()}"[:40]
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True)
        yield name
    finally:
        stop_all()
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def host_firewall() -> str:
    """The host's own firewall state (must be identical before and after the benchmarks)."""
    parts = []
    for cmd in (["iptables-save"], ["ip6tables-save"], ["ipset", "list", "-n"], ["nft", "list", "ruleset"]):
        if shutil.which(cmd[0]):
            out = subprocess.run(cmd, capture_output=True, text=True).stdout
            parts.append("\n".join(ln for ln in out.splitlines() if not ln.startswith("#")))
    return "\n---\n".join(parts)


# ------------------------------------------------------------------------------------ sipguard state
def write_config(path: Path, extra: str = "") -> Path:
    """A sipguard config for the benchmarks: defaults, this host's addresses not allow-listed
    (the lab addresses are documentation ranges anyway)."""
    path.write_text("[allowlist]\ninclude_host_addresses = false\n" + extra)
    return path


def db_status(state: Path) -> dict:
    """The daemon's last status heartbeat, read straight from its SQLite file."""
    try:
        con = sqlite3.connect(f"file:{state / 'sipguard.db'}?mode=ro", uri=True, timeout=5)
        try:
            row = con.execute("SELECT value FROM meta WHERE key = 'status'").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return {}
    return json.loads(row[0]) if row else {}


def db_offset(state: Path, path: str) -> int:
    """How far the daemon committed reading `path` (bytes)."""
    try:
        con = sqlite3.connect(f"file:{state / 'sipguard.db'}?mode=ro", uri=True, timeout=5)
        try:
            row = con.execute("SELECT offset FROM positions WHERE path = ?", (path,)).fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return 0
    return int(row[0]) if row else 0


def wait_for(cond, timeout: float, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())
