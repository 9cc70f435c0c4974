"""What `apply` must refuse or warn about before it changes anything: the SSH guard (would the new rules
cut off the SSH client apply runs from?), SSH open to all, chains sipguard does not manage, rules in the
other iptables flavour.

Decides and words only; the caller refuses or prints. Reads tables (iptables-legacy-save), never writes one.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess

from ..addresses import classify, networks_holding, normalize_ip
from ..config import Config
from ..netfilter import Tools, legacy_tables
from .hostenv import Env
from .tables import BUILTIN, OUR_CHAINS, Table, is_hook_chain, parse_save, targets


def _port_in(port: int, specs: list) -> bool:
    for s in specs:
        lo, _, hi = str(s).partition(":")
        if int(lo) <= port <= int(hi or lo):
            return True
    return False


def ssh_guard(cfg: Config, env: Env, ssh_connection: str | None) -> str | None:
    """Why the new rules would cut off the current SSH client (SSH_CONNECTION), or None if they would not.

    The running session itself survives (ESTABLISHED is accepted); what is checked is the next login:
    is a new TCP connection from the client's address to the server's SSH port accepted?
    """
    if not ssh_connection:
        return None
    parts = ssh_connection.split()
    if len(parts) != 4:
        return None
    client, server = normalize_ip(parts[0]), normalize_ip(parts[2])  # zone dropped, IPv4-mapped unmapped
    try:
        port = int(parts[3])
    except ValueError:
        return None
    if client is None or server is None:
        return None
    fam = classify(client)[0]
    fw = cfg.firewall
    if fam == 6 and not fw.ipv6:
        return None  # ip6tables is left alone
    who = f"your SSH client {client} (SSH_CONNECTION)"
    if env.spoof.get(fam) and env.public_interface:
        on_public = server in env.addresses.get(env.public_interface, [])
        spoofed = networks_holding(client, fw.spoof_sources_v4 if fam == 4 else fw.spoof_sources_v6)
        if on_public and spoofed:
            return f"{who} is in spoof_sources ({spoofed[0]}) and arrives on the public interface " \
                   f"{env.public_interface}: the spoof filter would drop it"
    if fw.ssh_port and port == fw.ssh_port:
        if not fw.management_cidrs:
            return None
        if networks_holding(client, fw.management_cidrs):
            return None
        return f"{who} is not in management_cidrs ({', '.join(fw.management_cidrs)}): SSH to port {port} " \
               "would be refused to it"
    if _port_in(port, [*fw.sip_tcp, *fw.sip_tls, *fw.websocket, *fw.extra_tcp]):
        return None
    if not fw.ssh_port:
        return f"ssh_port = 0: the new rules accept no SSH, and {who} came in on port {port}"
    return f"{who} came in on port {port}, but the new rules accept SSH on port {fw.ssh_port} only"


def ssh_warning(cfg: Config) -> str | None:
    """SSH open to every address (no management_cidrs): say so."""
    fw = cfg.firewall
    if fw.ssh_port and not fw.management_cidrs:
        return (f"SSH (port {fw.ssh_port}) is open to every address, new connections rate-limited to "
                f"{fw.ssh_rate} per source: set [firewall] management_cidrs to restrict it")
    return None


def foreign_chains(cfg: Config, t: Table) -> list[str]:
    """Chains of `t` that are neither built-in, nor the baseline's, nor the enforcer's hook, and are used."""
    hook = cfg.enforce.chain
    return sorted(c for c in t.chains if c not in BUILTIN and c not in OUR_CHAINS and not is_hook_chain(c, hook)
                  and (t.chains[c][1] or any(c in targets(r) for _, rs in t.chains.values() for r in rs)))


def legacy_warning(tools: Tools) -> str | None:
    """Rules in the other iptables flavour also filter packets: say so."""
    if tools.flavour != "nft" or not shutil.which("iptables-legacy-save"):
        return None
    # legacy_tables reads /proc: that does not create legacy tables in the namespace; iptables-legacy-save would
    if "filter" not in legacy_tables(4):
        return None
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        r = subprocess.run(["iptables-legacy-save", "-t", "filter"], capture_output=True, text=True, timeout=10)
        t = parse_save(r.stdout) if r.returncode == 0 else Table()
        if t.present and any(rules for _, rules in t.chains.values()):
            return ("legacy iptables rules exist too (iptables-legacy-save): they filter packets as well; "
                    "set [firewall] iptables = \"legacy\" if the host's firewall lives there")
    return None
