"""The baseline ruleset as text: rules/baseline-v4.rules and -v6.rules (string.Template) filled from
[firewall] and the machine's `Env`, giving one family's iptables-restore text, comments included.

Pure: reads the template file, runs nothing, touches no table. Every value placed in a rule went through
the config's validators first (ports are numbers, CIDRs parse, interface names are restricted), so the
text cannot carry anything injected.
"""

from __future__ import annotations

from pathlib import Path
from string import Template
from typing import Iterator

from ..addresses import classify
from ..config import SHIPPED_RULES, Config
from ..errors import SipguardError
from .hostenv import Env


def _nets(cidrs: list[str], fam: int) -> list[str]:
    return [c for c in cidrs if classify(c)[0] == fam]


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
    """The shipped template of one family: rules/baseline-v4.rules or -v6.rules."""
    return SHIPPED_RULES / f"baseline-v{fam}.rules"


def render(cfg: Config, fam: int, env: Env, template: str | None = None) -> str:
    """The iptables-restore text of one family's filter table, comments included."""
    fw = cfg.firewall
    hook = cfg.enforce.chain
    iface = f"-i {env.public_interface} " if env.public_interface else ""
    spoof, tarpit = env.spoof.get(fam, False), env.tarpit.get(fam, False)
    blocks: dict[str, list[str]] = {k: [] for k in (
        "PRIVATE_CHAIN", "PSD_CHAIN", "HOOK_FORWARD", "PRIVATE_JUMP", "TUNNEL_6IN4", "ICMP_ECHO", "PRIVATE_RULES",
        "PSD_RULES", "SERVICE_RULES", "SSH_RULES", "PSD_JUMP", "DHCPV6_CLIENT")}
    if cfg.enforce.hook_forward:
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
