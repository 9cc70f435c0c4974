"""Which iptables this host has: its flavour (nf_tables or legacy) and the binaries of it, found in one place.

The baseline firewall (sipguard/firewall/) and the ipset backend's hook chain (sipguard/enforce/hook.py)
both ask here, so the same settings put both on the same side of netfilter.

Settings are read in order: the first one that says "nft" or "legacy" decides, "auto" (or None) passes on
to the next one, and when every one says "auto" the host decides:
- the firewall: the flavour recorded by its last apply (for `remove` and the revert helper), then
  [firewall] iptables, then [enforce] iptables (`firewall_tools`);
- the enforcer's hook: [enforce] iptables (`choose_flavour(cfg.iptables)`).
Detection (`detect_flavour`) believes `iptables -V` (the host's update-alternatives choice); without a
runnable `iptables`, an `iptables-legacy`, then an `iptables-nft` binary. It does not switch flavour on its
own because the other flavour holds rules: the firewall warns about that instead (sipguard/firewall/guard.py).

Only looks: `shutil.which`, `BINARY -V` and /proc/net/ip*_tables_names; never runs a command that changes
a table, and never imports sipguard.firewall or sipguard.enforce (it sits below both).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SipguardError

if TYPE_CHECKING:
    from .config import Config

FLAVOURS = ("nft", "legacy")
_BASES = ("iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore")


@dataclass(frozen=True)
class Tools:
    """The iptables binaries of one flavour ("nft" or "legacy") for both families."""

    flavour: str
    cmd4: str
    save4: str
    restore4: str
    cmd6: str
    save6: str
    restore6: str

    def cmd(self, fam: int) -> str:
        return self.cmd4 if fam == 4 else self.cmd6

    def save(self, fam: int) -> str:
        return self.save4 if fam == 4 else self.save6

    def restore(self, fam: int) -> str:
        return self.restore4 if fam == 4 else self.restore6


def flavour_of(binary: str) -> str | None:
    """'nft' or 'legacy' from `BINARY -V` ("iptables v1.8.9 (nf_tables)"), None when it is absent or does not run."""
    if not shutil.which(binary):
        return None
    try:
        r = subprocess.run([binary, "-V"], capture_output=True, text=True, timeout=10)
    except (FileNotFoundError, subprocess.TimeoutExpired, PermissionError):
        return None
    text = r.stdout + r.stderr
    if "nf_tables" in text:
        return "nft"
    if "legacy" in text:
        return "legacy"
    return "legacy" if r.returncode == 0 and text.startswith("iptables v") else None  # before the split


def detect_flavour() -> str | None:
    """What this host uses when nothing is configured: `iptables -V`, else which explicit binaries exist."""
    plain = flavour_of("iptables")
    if plain:
        return plain
    if shutil.which("iptables-legacy"):
        return "legacy"
    if shutil.which("iptables-nft"):
        return "nft"
    return None


def has_iptables() -> bool:
    """True when some iptables binary is installed (`detect_flavour` would find one, without running it)."""
    return any(shutil.which(b) for b in ("iptables", "iptables-legacy", "iptables-nft"))


def choose_flavour(*settings: str | None) -> str:
    """The first setting that names a flavour; "auto"/None pass on; detected when all pass."""
    for s in settings:
        if s is None or s == "auto":
            continue
        if s not in FLAVOURS:
            raise SipguardError(f"unknown iptables flavour {s!r}")
        return s
    found = detect_flavour()
    if found is None:
        raise SipguardError("no iptables found (install the iptables package)")
    return found


def tools_for(flavour: str) -> Tools:
    """The six binaries of `flavour`: the explicit ones (iptables-nft-save, ...), else the plain names
    when plain `iptables` is that flavour; an error naming the first one missing."""
    if flavour not in FLAVOURS:
        raise SipguardError(f"unknown iptables flavour {flavour!r}")
    plain: str | None | bool = False  # False: not asked yet (only needed when an explicit name is missing)
    names = []
    for base in _BASES:
        head, _, tail = base.partition("-")
        explicit = f"{head}-{flavour}" + (f"-{tail}" if tail else "")
        if shutil.which(explicit):
            names.append(explicit)
            continue
        if plain is False:
            plain = flavour_of("iptables")
        if plain == flavour and shutil.which(base):
            names.append(base)
        else:
            raise SipguardError(f"no {flavour} iptables: neither {explicit} nor a {flavour} {base} found")
    return Tools(flavour, *names)


def resolve_tools(*settings: str | None) -> Tools:
    """`tools_for(choose_flavour(*settings))`."""
    return tools_for(choose_flavour(*settings))


def firewall_tools(cfg: Config, recorded: str | None = None) -> Tools:
    """The baseline firewall's binaries: `recorded` (the flavour its apply used), else [firewall] iptables,
    else [enforce] iptables, else detected."""
    return resolve_tools(recorded, cfg.firewall.iptables, cfg.enforce.iptables)


def legacy_tables(fam: int) -> set[str]:
    """The legacy (x_tables) tables that exist in this network namespace, e.g. {"filter"}.

    Read from /proc/net/ip_tables_names (ip6_tables_names): unlike iptables-legacy-save or libiptc,
    reading it does not create a table in the namespace. Empty when the module is not loaded.
    """
    path = Path("/proc/net/ip_tables_names" if fam == 4 else "/proc/net/ip6_tables_names")
    with contextlib.suppress(OSError):
        return set(path.read_text().split())
    return set()


__all__ = ["FLAVOURS", "Tools", "choose_flavour", "detect_flavour", "firewall_tools", "flavour_of", "has_iptables",
           "legacy_tables", "resolve_tools", "tools_for"]
