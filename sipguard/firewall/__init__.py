"""The baseline firewall: rules/baseline-v4.rules and -v6.rules, rendered from [firewall], applied atomically.

`apply` replaces the whole filter table with one `iptables-restore` call per family (all or nothing; if
IPv6 fails after IPv4 succeeded, IPv4 is put back), keeps sipguard's ban hook chain ([enforce] chain,
SIPGUARD) and its rules, and keeps `-A INPUT -j SIPGUARD` the first rule of INPUT. The table as it was
before the first apply is saved under STATE/firewall/ so that `remove` can restore it. With a confirm
timeout, a detached process (`sipguard firewall revert-if-unconfirmed TOKEN`) puts the previous rules
back unless `sipguard firewall confirm` runs in time (like iptables-apply).

Comparisons are made on iptables' own spelling of the rules: the rendered text is loaded into a scratch
network namespace (`unshare --net`) and read back with iptables-save, so "in sync" means what the
kernel holds is what the config asks for. Nothing here runs iptables outside the current network
namespace except that scratch one.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Callable, Iterator

from ..config import SHIPPED_RULES, Config
from ..errors import SipguardError

BUILTIN = ("INPUT", "FORWARD", "OUTPUT")
OUR_CHAINS = ("CHECK_TCP", "ICMP", "PRIVATE", "PSD", "SERVICES")
Echo = Callable[[str], None]
_TIMEOUT = 60


# -- tools -------------------------------------------------------------------------------------
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


def _run(args: list[str], *, input: str | None = None, check: bool = True,
         timeout: float = _TIMEOUT) -> subprocess.CompletedProcess[str]:
    try:
        r = subprocess.run(args, input=input, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SipguardError(f"{args[0]}: command not found (install iptables)") from None
    except subprocess.TimeoutExpired:
        raise SipguardError(f"{args[0]} did not finish within {timeout:g}s") from None
    if check and r.returncode != 0:
        raise SipguardError(f"{' '.join(args[:3])} failed: {_first_lines(r.stderr or r.stdout)}")
    return r


def _first_lines(text: str, n: int = 2) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return "; ".join(lines[:n]) or "no error message"


def _flavour_of(binary: str) -> str | None:
    """'nft' or 'legacy' from `BINARY -V` ("iptables v1.8.9 (nf_tables)"), None when it does not run."""
    try:
        r = subprocess.run([binary, "-V"], capture_output=True, text=True, timeout=10)
    except (FileNotFoundError, subprocess.TimeoutExpired, PermissionError):
        return None
    text = r.stdout + r.stderr
    if "nf_tables" in text:
        return "nft"
    if "legacy" in text:
        return "legacy"
    return "legacy" if r.returncode == 0 and text.startswith("iptables v") else None


def resolve_tools(cfg: Config, flavour: str | None = None) -> Tools:
    """The binaries to use: [firewall] iptables, else [enforce] iptables, else what `iptables -V` says."""
    want = flavour or cfg.firewall.iptables
    if want == "auto":
        want = getattr(cfg.enforce, "iptables", "auto")
    plain = _flavour_of("iptables") if shutil.which("iptables") else None
    if want == "auto":
        if plain:
            want = plain
        elif shutil.which("iptables-legacy"):
            want = "legacy"
        elif shutil.which("iptables-nft"):
            want = "nft"
        else:
            raise SipguardError("no iptables found (install the iptables package)")
    infix = "nft" if want == "nft" else "legacy"
    names = []
    for base in ("iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore"):
        head, _, tail = base.partition("-")
        explicit = f"{head}-{infix}" + (f"-{tail}" if tail else "")
        if shutil.which(explicit):
            names.append(explicit)
        elif plain == want and shutil.which(base):
            names.append(base)
        else:
            raise SipguardError(f"no {want} iptables: neither {explicit} nor a {want} {base} found")
    return Tools(want, *names)


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


# -- the machine -------------------------------------------------------------------------------
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
            addrs = [ipaddress.ip_address(a) for a in env.addresses.get(env.public_interface, [])]
            env.spoof[fam] = any(a.version == fam and a.is_global for a in addrs)
    if fw.tarpit == "auto" and tools is not None and fw.psd:
        for fam in (4, 6):
            env.tarpit[fam] = tarpit_available(tools, fam)
    return env


# -- rendering ---------------------------------------------------------------------------------
def _nets(cidrs: list[str], fam: int) -> list[str]:
    return [c for c in cidrs if ipaddress.ip_network(c).version == fam]


def _multiport_chunks(ports: list[str]) -> Iterator[str]:
    """multiport takes at most 15 ports per rule, a range counting two."""
    seen: list[str] = []
    for p in ports:
        if p not in seen:
            seen.append(p)
    chunk: list[str] = []
    slots = 0
    for p in seen:
        cost = 2 if ":" in p else 1
        if slots + cost > 15:
            yield ",".join(chunk)
            chunk, slots = [], 0
        chunk.append(p)
        slots += cost
    if chunk:
        yield ",".join(chunk)


def _accept(proto: str, ports: list, comment: str) -> list[str]:
    return [f"-A SERVICES -p {proto} -m multiport --dports {group} -m comment --comment {comment} -j ACCEPT"
            for group in _multiport_chunks([str(p) for p in ports])]


def _burst(rate: str) -> int:
    return max(1, min(10000, int(rate.split("/")[0])))


def template_path(fam: int) -> Path:
    return SHIPPED_RULES / f"baseline-v{fam}.rules"


def render(cfg: Config, fam: int, env: Env, template: str | None = None) -> str:
    """The iptables-restore text of one family's filter table, comments included."""
    fw = cfg.firewall
    hook = getattr(cfg.enforce, "chain", "SIPGUARD")
    iface = f"-i {env.public_interface} " if env.public_interface else ""
    spoof, tarpit = env.spoof.get(fam, False), env.tarpit.get(fam, False)
    blocks: dict[str, list[str]] = {k: [] for k in (
        "PRIVATE_CHAIN", "PSD_CHAIN", "HOOK_FORWARD", "PRIVATE_JUMP", "TUNNEL_6IN4", "ICMP_ECHO", "PRIVATE_RULES",
        "PSD_RULES", "SERVICE_RULES", "SSH_RULES", "PSD_JUMP", "DHCPV6_CLIENT")}
    if getattr(cfg.enforce, "hook_forward", False):
        blocks["HOOK_FORWARD"].append(f"-A FORWARD -j {hook}")
    if spoof:
        blocks["PRIVATE_CHAIN"].append(":PRIVATE - [0:0]")
        blocks["PRIVATE_JUMP"].append(f"-A INPUT -i {env.public_interface} -j PRIVATE")
        blocks["PRIVATE_RULES"] += [f"-A PRIVATE -s {c} -j DROP"
                                    for c in _nets(fw.spoof_sources_v4 if fam == 4 else fw.spoof_sources_v6, fam)]
        blocks["PRIVATE_RULES"].append("-A PRIVATE -j RETURN")
    if fam == 4 and fw.allow_6in4:
        blocks["TUNNEL_6IN4"].append(f"-A INPUT {iface}-p ipv6 -j ACCEPT")
    if fam == 6 and fw.dhcpv6_client:
        blocks["DHCPV6_CLIENT"].append("-A SERVICES -s fe80::/10 -d fe80::/10 -p udp -m udp --sport 547 --dport 546 "
                                       "-m comment --comment dhcpv6-client -j ACCEPT")
    if fw.icmp_echo:
        limit = f"-m limit --limit {fw.icmp_rate} --limit-burst {fw.icmp_burst} -j ACCEPT"
        if fam == 4:
            blocks["ICMP_ECHO"].append(f"-A ICMP -p icmp -m icmp --icmp-type 8 {limit}")
        else:
            blocks["ICMP_ECHO"] += [f"-A ICMP -p ipv6-icmp -m icmp6 --icmpv6-type {t} {limit}" for t in (128, 129)]
    if fw.psd:
        blocks["PSD_CHAIN"].append(":PSD - [0:0]")
        unreach_port = "icmp-port-unreachable" if fam == 4 else "icmp6-port-unreachable"
        unreach_host = "icmp-host-unreachable" if fam == 4 else "icmp6-addr-unreachable"
        stat = "-m statistic --mode random --probability"
        psd = [f"-A PSD -p tcp {stat} 0.05 -j REJECT --reject-with {unreach_port}"]
        if tarpit:
            psd += [f"-A PSD -p tcp {stat} 0.05 -j TARPIT --reset", f"-A PSD -p tcp {stat} 0.5 -j TARPIT --tarpit"]
        else:
            psd += [f"-A PSD -p tcp {stat} 0.05 -j REJECT --reject-with tcp-reset"]
        psd += [f"-A PSD -p udp {stat} 0.05 -j REJECT --reject-with {unreach_port}",
                f"-A PSD {stat} 0.05 -j REJECT --reject-with {unreach_host}"]
        blocks["PSD_RULES"] = psd
        blocks["PSD_JUMP"].append(f"-A SERVICES {iface}-m limit --limit {fw.psd_rate} "
                                  f"--limit-burst {2 * _burst(fw.psd_rate)} -j PSD")
    svc = blocks["SERVICE_RULES"]
    svc += _accept("udp", fw.sip_udp, "sip-udp")
    svc += _accept("tcp", fw.sip_tcp, "sip-tcp")
    svc += _accept("tcp", fw.sip_tls, "sip-tls")
    svc += _accept("tcp", fw.websocket, "sip-websocket")
    svc += _accept("udp", fw.rtp, "rtp")
    svc += _accept("tcp", fw.extra_tcp, "extra-tcp")
    svc += _accept("udp", fw.extra_udp, "extra-udp")
    if fw.ssh_port:
        if fw.management_cidrs:
            nets = _nets(fw.management_cidrs, fam)
            blocks["SSH_RULES"] += [f"-A SERVICES -s {c} -p tcp -m tcp --dport {fw.ssh_port} "
                                    "-m comment --comment ssh-management -j ACCEPT" for c in nets]
            if not nets:
                blocks["SSH_RULES"].append(f"# no IPv{fam} management_cidrs: no SSH over IPv{fam}")
        else:
            mask = " --hashlimit-srcmask 64" if fam == 6 else ""
            blocks["SSH_RULES"].append(
                f"-A SERVICES -p tcp -m tcp --dport {fw.ssh_port} -m conntrack --ctstate NEW -m hashlimit "
                f"--hashlimit-upto {fw.ssh_rate} --hashlimit-burst {_burst(fw.ssh_rate)} --hashlimit-mode srcip"
                f"{mask} --hashlimit-name sipguard-ssh -m comment --comment ssh-ratelimited -j ACCEPT")
    else:
        blocks["SSH_RULES"].append("# ssh_port = 0: no SSH")
    values = {k: "\n".join(v) for k, v in blocks.items()}
    values["HOOK"] = hook
    text = template if template is not None else template_path(fam).read_text(encoding="utf-8")
    try:
        rendered = Template(text).substitute(values)
    except (KeyError, ValueError) as exc:
        raise SipguardError(f"{template_path(fam)}: bad template placeholder: {exc}") from None
    # A line that rendered empty (an unused block) is dropped; so is a comment block's trailing blank.
    return "\n".join(ln for ln in rendered.splitlines() if ln.strip()) + "\n"


# -- tables ------------------------------------------------------------------------------------
@dataclass
class Table:
    """One family's filter table as iptables-save shows it: chain → (policy or None, rules)."""

    present: bool = False
    chains: dict[str, tuple[str | None, list[str]]] = field(default_factory=dict)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Table) and self.normal() == other.normal()

    def normal(self) -> dict[str, tuple[str | None, list[str]]]:
        """A missing table is a table of empty ACCEPT built-ins (that is what the kernel does)."""
        if self.present:
            return {k: (p, list(r)) for k, (p, r) in self.chains.items()}
        return {c: ("ACCEPT", []) for c in BUILTIN}

    def dump(self) -> str:
        """iptables-restore text, built-ins first, then the other chains sorted (stable for diffs)."""
        chains = self.normal()
        order = [c for c in BUILTIN if c in chains] + sorted(c for c in chains if c not in BUILTIN)
        lines = ["*filter"]
        lines += [f":{c} {chains[c][0] or '-'} [0:0]" for c in order]
        for c in order:
            lines += [f"-A {c} {r}" for r in chains[c][1]]
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"


def parse_save(text: str) -> Table:
    """Parse `iptables-save -t filter` (or restore text) output; ignores comments and counters."""
    t = Table()
    in_filter = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            in_filter = line == "*filter"
            t.present = t.present or in_filter
            continue
        if not in_filter:
            continue
        if line == "COMMIT":
            in_filter = False
        elif line.startswith(":"):
            name, policy = (line[1:].split() + ["-"])[:2]
            t.chains[name] = (None if policy == "-" else policy, t.chains.get(name, (None, []))[1])
        else:
            line = re.sub(r"^\[\d+:\d+\]\s+", "", line)
            m = re.match(r"^-A\s+(\S+)\s*(.*)$", line)
            if not m:
                raise SipguardError(f"cannot read this iptables rule: {line!r}")
            policy, rules = t.chains.setdefault(m.group(1), (None, []))
            rules.append(m.group(2))
    return t


def _is_hook_chain(name: str, hook: str) -> bool:
    return name == hook or name.startswith(hook + "-") or name.startswith(hook + "_")


def _targets(rule: str) -> set[str]:
    return set(re.findall(r"(?:^|\s)-[jg]\s+(\S+)", rule))


def strip_sipguard(t: Table, hook: str, set_prefix: str) -> Table:
    """The table without sipguard's hook chains, jumps to them, or rules matching sipguard's sets."""
    if not t.present:
        return Table()
    out = Table(present=True)
    for name, (policy, rules) in t.chains.items():
        if _is_hook_chain(name, hook):
            continue
        kept = [r for r in rules if not any(_is_hook_chain(x, hook) for x in _targets(r))
                and not re.search(rf"--match-set\s+{re.escape(set_prefix)}-", r)]
        out.chains[name] = (policy, kept)
    return out


# -- iptables I/O ------------------------------------------------------------------------------
def save_text(tools: Tools, fam: int) -> str:
    return _run([tools.save(fam), "-t", "filter"]).stdout


def _unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        return subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=10).returncode == 0
    return False


def canonical(tools: Tools, fam: int, text: str) -> Table:
    """The rules as iptables itself spells them: loaded into a scratch network namespace, read back.

    This also validates them (a bad rule fails here, before the real table is touched). Without the
    privilege to create a namespace, the rendered text is used as it is.
    """
    if not _unshare_works():
        return parse_save(text)
    r = _run(["unshare", "--net", "sh", "-c", '"$0" && "$1" -t filter', tools.restore(fam), tools.save(fam)],
             input=text, check=False)
    if r.returncode != 0:
        raise SipguardError(f"the IPv{fam} rules were refused ({tools.restore(fam)}): {_first_lines(r.stderr)}; "
                            "the firewall was left as it was")
    return parse_save(r.stdout)


def restore_table(tools: Tools, fam: int, table: Table) -> None:
    """Replace the filter table with `table` in one iptables-restore call (atomic)."""
    if table.present:
        text = table.dump()
    else:
        text = Table().dump()  # empty ACCEPT built-ins; a table that did not exist is then deleted below
    r = _run([tools.restore(fam)], input=text, check=False)
    if r.returncode != 0:
        raise SipguardError(f"{tools.restore(fam)} failed: {_first_lines(r.stderr or r.stdout)}")
    if not table.present and tools.flavour == "nft" and shutil.which("nft"):
        subprocess.run(["nft", "delete", "table", "ip" if fam == 4 else "ip6", "filter"],
                       capture_output=True, timeout=_TIMEOUT)


# -- state -------------------------------------------------------------------------------------
def fw_dir(state_dir: Path) -> Path:
    d = Path(state_dir) / "firewall"
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise SipguardError(f"cannot create {d}: {exc}") from None
    return d


@contextlib.contextmanager
def _locked(d: Path) -> Iterator[None]:
    with open(d / "lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_pending(d: Path) -> dict | None:
    try:
        return json.loads((d / "pending.json").read_text())
    except (OSError, ValueError):
        return None


def _drop_pending(d: Path, token: str | None = None) -> None:
    p = _read_pending(d)
    if p and (token is None or p.get("token") == token):
        (d / "pending.json").unlink(missing_ok=True)
        for fam in (4, 6):
            (d / f"prev-{p.get('token')}-v{fam}.rules").unlink(missing_ok=True)


# -- the SSH guard -----------------------------------------------------------------------------
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
    try:
        client = ipaddress.ip_address(parts[0].split("%")[0])
        server = ipaddress.ip_address(parts[2].split("%")[0])
        port = int(parts[3])
    except ValueError:
        return None
    if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped:
        client = client.ipv4_mapped
    if isinstance(server, ipaddress.IPv6Address) and server.ipv4_mapped:
        server = server.ipv4_mapped
    fam = client.version
    fw = cfg.firewall
    if fam == 6 and not fw.ipv6:
        return None  # ip6tables is left alone
    who = f"your SSH client {client} (SSH_CONNECTION)"
    if env.spoof.get(fam) and env.public_interface:
        on_public = str(server) in env.addresses.get(env.public_interface, [])
        spoofed = [c for c in (fw.spoof_sources_v4 if fam == 4 else fw.spoof_sources_v6)
                   if client in ipaddress.ip_network(c)]
        if on_public and spoofed:
            return f"{who} is in spoof_sources ({spoofed[0]}) and arrives on the public interface " \
                   f"{env.public_interface}: the spoof filter would drop it"
    if fw.ssh_port and port == fw.ssh_port:
        if not fw.management_cidrs:
            return None
        if any(client in ipaddress.ip_network(c) for c in fw.management_cidrs):
            return None
        return f"{who} is not in management_cidrs ({', '.join(fw.management_cidrs)}): SSH to port {port} " \
               "would be refused to it"
    if _port_in(port, [*fw.sip_tcp, *fw.sip_tls, *fw.websocket, *fw.extra_tcp]):
        return None
    if not fw.ssh_port:
        return f"ssh_port = 0: the new rules accept no SSH, and {who} came in on port {port}"
    return f"{who} came in on port {port}, but the new rules accept SSH on port {fw.ssh_port} only"


# -- plans -------------------------------------------------------------------------------------
@dataclass
class Family:
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
    return [4, 6] if cfg.firewall.ipv6 else [4]


def plan(cfg: Config, tools: Tools, env: Env) -> list[Family]:
    """Current and wanted table per family; the wanted one carries the current hook chains' rules over."""
    hook = getattr(cfg.enforce, "chain", "SIPGUARD")
    out = []
    for fam in families(cfg):
        text = save_text(tools, fam)
        current = parse_save(text)
        desired = canonical(tools, fam, render(cfg, fam, env))
        if current.present:
            for name, (policy, rules) in current.chains.items():
                if _is_hook_chain(name, hook):
                    desired.chains[name] = (None, list(rules))
        out.append(Family(fam, text, current, desired))
    return out


def _foreign_chains(cfg: Config, t: Table) -> list[str]:
    hook = getattr(cfg.enforce, "chain", "SIPGUARD")
    return sorted(c for c in t.chains if c not in BUILTIN and c not in OUR_CHAINS and not _is_hook_chain(c, hook)
                  and (t.chains[c][1] or any(c in _targets(r) for _, rs in t.chains.values() for r in rs)))


def _legacy_warning(tools: Tools) -> str | None:
    """Rules in the other iptables flavour also filter packets: say so."""
    if tools.flavour != "nft" or not shutil.which("iptables-legacy-save"):
        return None
    try:  # reading this does not instantiate legacy tables in the namespace; iptables-legacy-save would
        if "filter" not in Path("/proc/net/ip_tables_names").read_text().split():
            return None
    except OSError:
        return None
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        r = subprocess.run(["iptables-legacy-save", "-t", "filter"], capture_output=True, text=True, timeout=10)
        t = parse_save(r.stdout) if r.returncode == 0 else Table()
        if t.present and any(rules for _, rules in t.chains.values()):
            return ("legacy iptables rules exist too (iptables-legacy-save): they filter packets as well; "
                    "set [firewall] iptables = \"legacy\" if the host's firewall lives there")
    return None


def ssh_warning(cfg: Config) -> str | None:
    fw = cfg.firewall
    if fw.ssh_port and not fw.management_cidrs:
        return (f"SSH (port {fw.ssh_port}) is open to every address, new connections rate-limited to "
                f"{fw.ssh_rate} per source: set [firewall] management_cidrs to restrict it")
    return None


def apply(cfg: Config, state_dir: Path, *, force: bool = False, confirm_timeout: int | None = None,
          ssh_connection: str | None = None, echo: Echo = print, warn: Echo = print,
          config_path: Path | None = None, env: Env | None = None, tools: Tools | None = None) -> bool:
    """Make the installed filter tables what the config asks for; True when something changed."""
    tools = tools or resolve_tools(cfg)
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
    if (w := _legacy_warning(tools)):
        warn(f"warning: {w}")
    d = fw_dir(state_dir)
    with _locked(d):
        plans = plan(cfg, tools, env)
        if all(p.in_sync for p in plans):
            fams = " and ".join(f"IPv{p.fam}" for p in plans)
            echo(f"firewall in sync with the config ({fams}, {tools.flavour}): nothing changed")
            if _read_pending(d):
                warn("note: an earlier apply is still waiting for `sipguard firewall confirm`")
            return False
        for p in plans:
            if p.in_sync:
                echo(f"IPv{p.fam}: in sync, unchanged")
                continue
            foreign = _foreign_chains(cfg, p.current)
            if foreign:
                warn(f"warning: the IPv{p.fam} filter table has chains sipguard does not manage "
                     f"({', '.join(foreign)}): apply replaces them (`sipguard firewall remove` brings them back)")
            echo(p.diff())
        # The table before sipguard ever touched it: saved once, for `remove`.
        for p in plans:
            before = d / f"before-v{p.fam}.rules"
            if not before.exists():
                _write(before, p.current_text)
        old = _read_pending(d)
        if old:  # still connected enough to apply again: the earlier apply is confirmed by this one
            _drop_pending(d, old.get("token"))
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
        _write(d / "applied.json", json.dumps({"flavour": tools.flavour, "time": time.time(),
                                               "families": [p.fam for p in plans]}))
        for p in done:
            if parse_save(save_text(tools, p.fam)) != p.desired:
                warn(f"warning: the installed IPv{p.fam} rules read back differently from the wanted ones "
                     "(`sipguard firewall show` will report it)")
        echo("applied: " + ", ".join(f"IPv{p.fam}" for p in done) + f" ({tools.flavour})")
        if confirm_timeout:
            token = secrets.token_hex(8)
            for p in done:
                _write(d / f"prev-{token}-v{p.fam}.rules", p.current.dump() if p.current.present else "")
            pending = {"token": token, "deadline": time.time() + confirm_timeout, "flavour": tools.flavour,
                       "families": [p.fam for p in done]}
            _write(d / "pending.json", json.dumps(pending))
            pending["pid"] = _spawn_reverter(state_dir, token, config_path)
            _write(d / "pending.json", json.dumps(pending))
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
    p = _read_pending(d)
    marker = d / f"confirmed-{token}"
    if not p or p.get("token") != token:
        marker.unlink(missing_ok=True)
        return "nothing pending"
    deadline = float(p["deadline"])
    while time.time() < deadline:  # bounded by the deadline
        cur = _read_pending(d)
        if marker.exists() or not cur or cur.get("token") != token:
            marker.unlink(missing_ok=True)
            return "confirmed"
        time.sleep(max(0.0, min(poll, deadline - time.time())))
    with _locked(d):
        cur = _read_pending(d)
        if marker.exists() or not cur or cur.get("token") != token:
            marker.unlink(missing_ok=True)
            return "confirmed"
        tools = _tools_for_flavour(cur.get("flavour", "auto"))
        errors = []
        for fam in cur.get("families", []):
            try:
                prev = parse_save((d / f"prev-{token}-v{fam}.rules").read_text())
                restore_table(tools, fam, prev)
            except (OSError, SipguardError) as exc:
                errors.append(f"IPv{fam}: {exc}")
        _drop_pending(d, token)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    msg = f"{stamp} apply {token} not confirmed: previous rules restored" + (f" (errors: {'; '.join(errors)})"
                                                                             if errors else "")
    print(msg, flush=True)
    return "reverted"


def _tools_for_flavour(flavour: str) -> Tools:
    return resolve_tools(Config(), flavour if flavour in ("nft", "legacy") else "auto")


def confirm(state_dir: Path) -> str:
    d = fw_dir(state_dir)
    with _locked(d):
        p = _read_pending(d)
        if not p:
            return "nothing to confirm (no apply is waiting for confirmation)"
        (d / f"confirmed-{p['token']}").touch()
        _drop_pending(d, p["token"])
    return "confirmed: the new rules stay"


def show(cfg: Config, tools: Tools | None = None, env: Env | None = None) -> tuple[bool, str]:
    tools = tools or resolve_tools(cfg)
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
    """Put back the tables saved at the first apply, minus anything of sipguard's; destroy its sets."""
    d = fw_dir(state_dir)
    hook = getattr(cfg.enforce, "chain", "SIPGUARD")
    prefix = getattr(cfg.enforce, "set_prefix", "sipguard")
    flavour = None
    with contextlib.suppress(OSError, ValueError):
        flavour = json.loads((d / "applied.json").read_text()).get("flavour")
    tools = resolve_tools(cfg, flavour)
    with _locked(d):
        _drop_pending(d)
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
        for msg in destroy_sets(prefix, getattr(cfg.enforce, "nft_table", "sipguard")):
            echo(msg)
        for f in d.iterdir():
            if f.name.startswith(("before-", "prev-", "confirmed-")) or f.name in ("pending.json", "applied.json"):
                f.unlink(missing_ok=True)


def destroy_sets(prefix: str, nft_table: str) -> list[str]:
    """ipset destroy PREFIX-*, nft delete table inet NAME: whatever of them exists."""
    msgs = []
    if shutil.which("ipset"):
        r = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True, timeout=_TIMEOUT)
        for name in r.stdout.split() if r.returncode == 0 else []:
            if name == prefix or name.startswith(prefix + "-"):
                x = subprocess.run(["ipset", "destroy", name], capture_output=True, text=True, timeout=_TIMEOUT)
                msgs.append(f"ipset {name}: destroyed" if x.returncode == 0 else
                            f"ipset {name}: cannot destroy: {_first_lines(x.stderr)}")
    if shutil.which("nft"):
        r = subprocess.run(["nft", "list", "table", "inet", nft_table], capture_output=True, text=True,
                           timeout=_TIMEOUT)
        if r.returncode == 0:
            x = subprocess.run(["nft", "delete", "table", "inet", nft_table], capture_output=True, text=True,
                               timeout=_TIMEOUT)
            msgs.append(f"nft table inet {nft_table}: deleted" if x.returncode == 0 else
                        f"nft table inet {nft_table}: cannot delete: {_first_lines(x.stderr)}")
    return msgs


def dry_run(cfg: Config) -> str:
    """The rendered rules of every managed family (comments included); touches nothing."""
    try:
        tools: Tools | None = resolve_tools(cfg)
    except SipguardError:
        tools = None
    env = resolve_env(cfg, tools)
    parts = [f"# note: {n}" for n in env.notes]
    for fam in families(cfg):
        parts.append(f"# ===== IPv{fam} ({tools.restore(fam) if tools else 'iptables-restore'}) =====")
        parts.append(render(cfg, fam, env).rstrip("\n"))
    return "\n".join(parts) + "\n"
