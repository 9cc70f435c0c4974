"""Doctor checks of the kernel side: the enforcer's tools, the iptables flavour, sipguard's hook
(the first rule of INPUT, and of FORWARD with [enforce] hook_forward) and its sets (there, of the
right type and size: ipset maxelem or nftables size = [enforce] maxelem).

Only looks, in the network namespace it runs in: ipset headers over netlink, `iptables-save`,
`nft -t -j list table` (terse: no set elements). On a legacy host a family whose filter table does
not exist is not opened (libiptc would create it). Never creates, repairs or flushes anything.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess

from ..enforce.hook import IptablesHook, plans, problems
from ..enforce.ipsetnl import IpsetNetlink, IpsetNetlinkError, ipset_available
from ..errors import SipguardError
from ..netfilter import choose_flavour, has_iptables, legacy_tables, tools_for
from .base import Finding, Host, ok, problem, skipped

RESTART = "systemctl restart sipguard"


def backend(host: Host) -> str | None:
    """The kernel backend the daemon would use here: ipset, nftables, None (dryrun), or SipguardError."""
    b = host.cfg.enforce.backend
    if b == "dryrun":
        return None
    if b == "auto":
        from ..enforce import detect_backend

        return detect_backend()
    return b


def _backend_or_findings(host: Host, check: str) -> tuple[str | None, list[Finding]]:
    if not host.kernel:
        return None, [skipped(check, "kernel checks not asked for")]
    try:
        b = backend(host)
    except SipguardError as exc:
        return None, [problem(check, f"no kernel enforcer available: {exc}",
                              "apt-get install iptables ipset nftables, run sipguard as root (modprobe ip_set)")]
    if b is None:
        return None, [skipped(check, "[enforce] backend = \"dryrun\": nothing is enforced in the kernel")]
    return b, []


def check_tools(host: Host) -> list[Finding]:
    """The backend's kernel support and programs are there."""
    b, early = _backend_or_findings(host, "tools")
    if early:
        return early
    if b == "ipset":
        out = []
        out.append(ok("tools", "ipset: the kernel answers (ip_set loaded)") if ipset_available() else
                   problem("tools", "ipset: the kernel has no ip_set support here",
                           "modprobe ip_set (and ip_set_hash_ip, ip_set_hash_net), or set [enforce] backend = "
                           "\"nftables\""))
        out.append(ok("tools", "iptables: installed") if has_iptables() else
                   problem("tools", "iptables: not installed", "apt-get install iptables"))
        return out
    nft = shutil.which("nft")
    return [ok("tools", f"nft: {nft}") if nft else problem("tools", "nft: not installed", "apt-get install nftables")]


def _ipset_plans(host: Host) -> list:
    e = host.cfg.enforce
    p = e.set_prefix
    sets = {4: (f"{p}-v4", f"{p}-net4"), 6: (f"{p}-v6", f"{p}-net6")}
    return plans(e.chain, sets, e.action, e.hook_forward)


def check_iptables(host: Host) -> list[Finding]:
    """Which iptables flavour the hook goes into, and rules of the other flavour beside it."""
    b, early = _backend_or_findings(host, "iptables")
    if early:
        return early
    if b != "ipset":
        return [skipped("iptables", "the nftables backend does not use iptables")]
    try:
        flavour = choose_flavour(host.cfg.enforce.iptables)
    except SipguardError as exc:
        return [problem("iptables", str(exc), "apt-get install iptables")]
    out = [ok("iptables", f"flavour {flavour} ([enforce] iptables = \"{host.cfg.enforce.iptables}\")",
              flavour=flavour)]
    if flavour == "nft":
        other = sorted(t for v in (4, 6) for t in legacy_tables(v))
        if other:
            out.append(Finding("iptables", "warning", f"legacy iptables tables exist too ({', '.join(other)}): "
                               f"their rules run beside sipguard's hook, not after it",
                               "iptables-legacy-save | less; move those rules to the nf_tables flavour "
                               "(iptables-legacy-save | iptables-nft-restore) and flush the legacy ones"))
    return out


def _commands(host: Host, flavour: str, version: int) -> str:
    try:
        return tools_for(flavour).cmd(version)
    except SipguardError:
        return ("iptables" if version == 4 else "ip6tables") + ("-legacy" if flavour == "legacy" else "")


def check_hook(host: Host) -> list[Finding]:
    """The hook chain is whole and the first rule of INPUT (and FORWARD when configured)."""
    b, early = _backend_or_findings(host, "hook")
    if early:
        return early
    e = host.cfg.enforce
    if b == "nftables":
        return _nft_hook(host)
    try:
        hook = IptablesHook(e.iptables, _ipset_plans(host))
    except SipguardError as exc:
        return [problem("hook", f"cannot tell the iptables flavour: {exc}", "apt-get install iptables")]
    out: list[Finding] = []
    for plan in hook.plans:
        cmd = _commands(host, hook.flavour, plan.version)
        if hook.flavour == "legacy" and "filter" not in legacy_tables(plan.version):
            wrong = [f"chain {plan.chain} missing"] + [f"{h} does not jump to {plan.chain} first" for h in plan.hooks]
        else:
            try:
                wrong = problems(plan, hook.observe(plan))
            except SipguardError as exc:
                out.append(problem("hook", f"IPv{plan.version}: cannot read the rules: {exc}",
                                   "run sipguard doctor as root; apt-get install iptables"))
                continue
        if not wrong:
            where = " and ".join(plan.hooks)
            out.append(ok("hook", f"IPv{plan.version} ({cmd}): chain {plan.chain} is whole and the first rule of "
                          f"{where}", family=plan.version))
            continue
        for w in wrong:
            if w.endswith("first"):
                chain = w.split()[0]
                fix = (f"{cmd} -D {chain} -j {plan.chain}; {cmd} -I {chain} 1 -j {plan.chain}  (the daemon does "
                       f"this itself within [enforce] check_interval: if it keeps coming back, another tool "
                       f"(ufw, firewalld, docker, fail2ban) inserts rules above it)")
            elif w.endswith("missing") or w.endswith("differ"):
                fix = f"{RESTART} (it rebuilds chain {plan.chain} at start and on drift)"
            else:  # FORWARD jumps to it without hook_forward
                fix = f"{cmd} -D FORWARD -j {plan.chain} (or set [enforce] hook_forward = true)"
            out.append(problem("hook", f"IPv{plan.version} ({cmd}): {w}", fix, family=plan.version))
    return out


def check_sets(host: Host) -> list[Finding]:
    """sipguard's sets exist with the right type and size."""
    b, early = _backend_or_findings(host, "sets")
    if early:
        return early
    if b == "nftables":
        return _nft_sets(host)
    e = host.cfg.enforce
    p = e.set_prefix
    want = {f"{p}-v4": ("hash:ip", socket.AF_INET), f"{p}-v6": ("hash:ip", socket.AF_INET6),
            f"{p}-net4": ("hash:net", socket.AF_INET), f"{p}-net6": ("hash:net", socket.AF_INET6)}
    try:
        nl = IpsetNetlink()
    except OSError as exc:
        return [problem("sets", f"cannot ask the kernel for ipsets: {exc}", "run as root; modprobe ip_set")]
    try:
        flavour = choose_flavour(e.iptables)
    except SipguardError:
        flavour = "nft"
    recreate = (f"systemctl stop sipguard; {_commands(host, flavour, 4)} -F {e.chain}; "
                f"{_commands(host, flavour, 6)} -F {e.chain}; ipset destroy {{name}}; systemctl start sipguard "
                f"(it creates the set with maxelem {e.maxelem} and restores every ban from its database)")
    out: list[Finding] = []
    try:
        for name, (stype, fam) in want.items():
            try:
                head = nl.header(name)
            except IpsetNetlinkError as exc:
                out.append(problem("sets", f"ipset {name}: cannot read: {exc}", "run as root"))
                continue
            if head is None:
                out.append(problem("sets", f"ipset {name} missing",
                                   f"{RESTART} (it creates the set and restores the bans from its database)",
                                   set=name))
                continue
            if head.typename != stype or head.family != fam or not head.timeout:
                out.append(problem("sets", f"ipset {name} is {head.typename or '?'} family "
                                   f"{'inet6' if head.family == socket.AF_INET6 else 'inet'}"
                                   f"{'' if head.timeout else ' without timeout'}; sipguard needs {stype} "
                                   f"{'inet6' if fam == socket.AF_INET6 else 'inet'} timeout",
                                   recreate.format(name=name), set=name))
                continue
            if head.maxelem != e.maxelem:
                out.append(problem("sets", f"ipset {name} holds at most {head.maxelem} entries, [enforce] maxelem "
                                   f"says {e.maxelem}", recreate.format(name=name), set=name,
                                   maxelem=head.maxelem))
                continue
            out.append(ok("sets", f"ipset {name}: {stype}, maxelem {head.maxelem}, {head.elements} entries",
                          set=name, maxelem=head.maxelem, entries=head.elements))
    finally:
        nl.close()
    return out


# -- nftables ---------------------------------------------------------------------------------
def _nft_table(host: Host) -> tuple[dict | None, str | None]:
    """({sets: {name: obj}, chains: {name: obj}, rules: {chain: [expr...]}} or None when absent, error)."""
    exe = shutil.which("nft")
    if exe is None:
        return None, "nft not found"
    t = host.cfg.enforce.nft_table
    try:
        p = subprocess.run([exe, "-t", "-j", "list", "table", "inet", t], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None, "nft did not answer in 60s"
    if p.returncode != 0:
        if "No such file or directory" in p.stderr:
            return None, None
        return None, (p.stderr or p.stdout).strip()[:300]
    out: dict = {"sets": {}, "chains": {}, "rules": {}}
    for obj in json.loads(p.stdout).get("nftables", []):
        if "set" in obj:
            out["sets"][obj["set"]["name"]] = obj["set"]
        elif "chain" in obj:
            out["chains"][obj["chain"]["name"]] = obj["chain"]
        elif "rule" in obj:
            out["rules"].setdefault(obj["rule"]["chain"], []).append(obj["rule"].get("expr", []))
    return out, None


_NFT_SETS = {"v4": ("ipv4_addr", False), "v6": ("ipv6_addr", False), "net4": ("ipv4_addr", True),
             "net6": ("ipv6_addr", True)}


def _nft_missing(host: Host, check: str) -> list[Finding] | tuple[dict, str]:
    t = f"inet {host.cfg.enforce.nft_table}"
    table, err = _nft_table(host)
    if err is not None:
        return [problem(check, f"cannot list table {t}: {err}", "run as root; apt-get install nftables")]
    if table is None:
        return [problem(check, f"table {t} missing", f"{RESTART} (it creates the table, its sets and chains and "
                        f"restores the bans from its database)")]
    return table, t


def _nft_sets(host: Host) -> list[Finding]:
    got = _nft_missing(host, "sets")
    if isinstance(got, list):
        return got
    table, t = got
    n = host.cfg.enforce.maxelem
    recreate = (f"systemctl stop sipguard; nft delete table {t}; systemctl start sipguard (it re-creates the table "
                f"with size {n} and restores every ban from its database)")
    out: list[Finding] = []
    for name, (typ, interval) in _NFT_SETS.items():
        s = table["sets"].get(name)
        if s is None:
            out.append(problem("sets", f"set {t} {name} missing", recreate, set=name))
            continue
        flags = set(s.get("flags", []))
        if s.get("type") != typ or "timeout" not in flags or ("interval" in flags) != interval:
            out.append(problem("sets", f"set {t} {name} is {s.get('type')} flags {sorted(flags)}; sipguard needs "
                               f"{typ} flags {['interval', 'timeout'] if interval else ['timeout']}", recreate,
                               set=name))
            continue
        if s.get("size") != n:
            out.append(problem("sets", f"set {t} {name} has size {s.get('size', 'unlimited')}, [enforce] maxelem "
                               f"says {n}", recreate, set=name, size=s.get("size")))
            continue
        out.append(ok("sets", f"set {t} {name}: {typ}, size {n}", set=name, size=n))
    return out


def _nft_hook(host: Host) -> list[Finding]:
    got = _nft_missing(host, "hook")
    if isinstance(got, list):
        return got
    table, t = got
    verdict = "drop" if host.cfg.enforce.action == "DROP" else "reject"
    want = [f"@{s}" for s in ("v4", "net4", "v6", "net6")]
    out: list[Finding] = []
    hooks = ("input", "forward") if host.cfg.enforce.hook_forward else ("input",)
    for hook in hooks:
        c = table["chains"].get(hook)
        if c is None or c.get("hook") != hook or c.get("prio") != -10:
            what = "missing" if c is None else f"hooked at {c.get('hook')} priority {c.get('prio')}"
            out.append(problem("hook", f"chain {t} {hook} {what}; it must hook {hook} at priority filter - 10 "
                               f"(before the filter chains)", f"{RESTART} (it rebuilds the chain)", chain=hook))
            continue
        refs = []
        for expr in table["rules"].get(hook, []):
            ref = next((e["match"]["right"] for e in expr if isinstance(e, dict) and "match" in e
                        and isinstance(e["match"].get("right"), str)), "?")
            has = any(isinstance(e, dict) and verdict in e for e in expr)
            refs.append(ref if has else f"{ref} (not {verdict})")
        if refs != want:
            out.append(problem("hook", f"chain {t} {hook}: rules {refs}, expected {want} each {verdict}",
                               f"{RESTART} (it rewrites the chain)", chain=hook))
            continue
        out.append(ok("hook", f"chain {t} {hook}: hooked at priority filter - 10, {len(refs)} rules", chain=hook))
    return out
