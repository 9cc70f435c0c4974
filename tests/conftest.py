"""Suite-wide guard: the host's own firewall must be exactly as it was after the whole run.

Every test that touches netfilter works in its own network namespace; this fixture proves it by
comparing the host's iptables/ip6tables (both flavours), ipsets and nftables before and after.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def _host_firewall() -> dict[str, str]:
    if os.geteuid() != 0:
        return {}
    out = {}
    for cmd in (["iptables-save"], ["ip6tables-save"], ["iptables-legacy-save"], ["ip6tables-legacy-save"],
                ["ipset", "list", "-n"], ["nft", "list", "ruleset"]):
        if shutil.which(cmd[0]) is None:
            continue
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        # iptables-save prints a timestamp comment: drop comments and counters
        lines = [ln.split(" [")[0] if ln.startswith(":") else ln
                 for ln in p.stdout.splitlines() if not ln.startswith("#")]
        out[" ".join(cmd)] = "\n".join(lines)
    return out


@pytest.fixture(scope="session", autouse=True)
def host_firewall_untouched():
    before = _host_firewall()
    yield
    after = _host_firewall()
    assert after == before, "a test changed the HOST's firewall: " + ", ".join(
        k for k in before if before.get(k) != after.get(k))
