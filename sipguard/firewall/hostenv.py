"""What the baseline firewall needs to know about this machine: the default route's interface, the
interfaces' addresses, and from them (with [firewall]) the `Env` that rendering and the SSH guard use.

Reads /proc and `ip -j addr` only; changes nothing. Tests build an `Env` by hand instead.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..addresses import classify, is_global
from ..config import Config
from ..netfilter import Tools
from .tools import tarpit_available


def default_route_interface() -> str | None:
    """The interface of the IPv4 default route, else of the IPv6 one, else None."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            f = line.split()
            if len(f) >= 8 and f[1] == "00000000" and f[7] == "00000000" and int(f[3], 16) & 1:
                return f[0]
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/ipv6_route").read_text().splitlines():
            f = line.split()
            # dest, plen, src, splen, next hop, metric, refcnt, use, flags, iface; 0x0200 = RTF_REJECT
            if len(f) >= 10 and f[0] == "0" * 32 and f[1] == "00" and f[9] != "lo" and not int(f[8], 16) & 0x200:
                return f[9]
    return None


def interface_addresses() -> dict[str, list[str]]:
    """Interface name → its addresses (`ip -j addr`); {} when iproute2 is missing."""
    try:
        r = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, timeout=10)
        data = json.loads(r.stdout or "[]")
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return {}
    return {i.get("ifname", ""): [a["local"] for a in i.get("addr_info", []) if "local" in a] for i in data}


@dataclass
class Env:
    """What rendering needs to know about the machine (resolved once; fixed in tests)."""

    public_interface: str | None = None  # None: every interface (no -i match)
    spoof: dict[int, bool] = field(default_factory=lambda: {4: False, 6: False})
    tarpit: dict[int, bool] = field(default_factory=lambda: {4: False, 6: False})
    addresses: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def resolve_env(cfg: Config, tools: Tools | None) -> Env:
    """The Env of this machine for [firewall]; `tools` None: no TARPIT check (no iptables found)."""
    fw = cfg.firewall
    env = Env(addresses=interface_addresses())
    if fw.public_interface == "any":
        env.public_interface = None
    elif fw.public_interface:
        env.public_interface = fw.public_interface
        if env.addresses and fw.public_interface not in env.addresses:
            env.notes.append(f"public_interface {fw.public_interface!r} does not exist (yet): its rules "
                             "match nothing until it appears")
    else:
        env.public_interface = default_route_interface()
        if env.public_interface is None:
            env.notes.append("no default route: the public-interface rules (PSD, spoof filter) apply to every "
                             "interface; set [firewall] public_interface to choose one")
    for fam in (4, 6):
        if fw.spoof_filter == "off":
            continue
        if env.public_interface is None:
            if fw.spoof_filter == "on":
                env.notes.append("spoof_filter = \"on\" needs a public interface: it is left out")
            continue
        if fw.spoof_filter == "on":
            env.spoof[fam] = True
        else:  # auto: only when the public interface has a public address of this family
            addrs = env.addresses.get(env.public_interface, [])
            env.spoof[fam] = any(classify(a)[0] == fam and is_global(a) for a in addrs)
    if fw.tarpit == "auto" and tools is not None and fw.psd:
        for fam in (4, 6):
            env.tarpit[fam] = tarpit_available(tools, fam)
    return env
