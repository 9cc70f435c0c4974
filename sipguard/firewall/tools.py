"""Running iptables for the baseline firewall: one call with a clear error, a family's table as text,
whether TARPIT works here, whether a scratch network namespace can be made.

Which binaries (nft or legacy flavour) comes from sipguard/netfilter.py; this module only runs them, in
the current network namespace (and `unshare --net` scratch ones), and never decides what to install.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

from ..errors import SipguardError
from ..netfilter import Tools

TIMEOUT = 60  # seconds for one iptables command


def run(args: list[str], *, input: str | None = None, check: bool = True,
        timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run one command; a missing binary, a timeout or (with check) a failure is one SipguardError."""
    try:
        r = subprocess.run(args, input=input, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SipguardError(f"{args[0]}: command not found (install iptables)") from None
    except subprocess.TimeoutExpired:
        raise SipguardError(f"{args[0]} did not finish within {timeout:g}s") from None
    if check and r.returncode != 0:
        raise SipguardError(f"{' '.join(args[:3])} failed: {first_lines(r.stderr or r.stdout)}")
    return r


def first_lines(text: str, n: int = 2) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return "; ".join(lines[:n]) or "no error message"


def save_text(tools: Tools, fam: int) -> str:
    """`iptables-save -t filter` of one family, as printed."""
    return run([tools.save(fam), "-t", "filter"]).stdout


def unshare_works() -> bool:
    """True when this process may create a scratch network namespace (`unshare --net`)."""
    if not shutil.which("unshare"):
        return False
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        return subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=10).returncode == 0
    return False


def tarpit_available(tools: Tools, fam: int) -> bool:
    """TARPIT (xtables-addons) needs both the iptables extension and the kernel module.

    `iptables -j TARPIT --help` exits 0 even without the extension (TARPIT is then taken for a chain
    name), so its output must mention TARPIT's own options; the kernel side is /proc/net/ip*_tables_targets
    (loaded) or a module modprobe could load.
    """
    try:
        r = subprocess.run([tools.cmd(fam), "-j", "TARPIT", "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if r.returncode != 0 or "TARPIT" not in (r.stdout + r.stderr):
        return False
    proc = Path("/proc/net/ip_tables_targets" if fam == 4 else "/proc/net/ip6_tables_targets")
    with contextlib.suppress(OSError):
        if "TARPIT" in proc.read_text().split():
            return True
    if shutil.which("modinfo"):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            return subprocess.run(["modinfo", "xt_TARPIT"], capture_output=True, timeout=10).returncode == 0
    return False
