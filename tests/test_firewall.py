"""The baseline firewall: rendering and the SSH guard (no root), and apply/show/remove/confirm for real
inside throw-away network namespaces (root; never the host's own firewall).

Every iptables command here runs in a namespace named sgf-*, created and deleted by a fixture; addresses
are 198.18.96.0/24 and 2001:db8:96::/64 only. Regenerate the golden files with SIPGUARD_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sipguard import firewall as fw
from sipguard.config import Config, ConfigError, load_config
from sipguard.firewall import hostenv
from tests.lab.netns import Netns

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (network namespaces)")
DATA = Path(__file__).parent / "data" / "firewall"
SG = str(Path(sys.executable).with_name("sipguard"))
PY = sys.executable

GOLDEN_TOML = """\
[firewall]
public_interface = "veth-sgf0"
management_cidrs = ["198.18.96.0/24", "2001:db8:96::/64"]
websocket = [8443]
extra_udp = [123]
spoof_filter = "on"
tarpit = "never"
"""

# The traffic test: SSH only from the peer's first address.
TRAFFIC_TOML = """\
[firewall]
public_interface = "veth-sgf0"
management_cidrs = ["198.18.96.2/32", "2001:db8:96::2/128"]
tarpit = "never"
"""


def cfg_of(toml: str) -> Config:
    import tomllib

    return Config.model_validate(tomllib.loads(toml))


# -- no root: rendering ------------------------------------------------------------------------
def rules(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(("-A", ":"))]


def test_render_defaults_fix_the_blog():
    cfg = Config()
    env = fw.Env(public_interface="eth1")
    v4, v6 = fw.render(cfg, 4, env), fw.render(cfg, 6, env)
    r4, r6 = rules(v4), rules(v6)
    assert r4[:3] == [":INPUT DROP [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]"]
    assert [r for r in r4 if r.startswith("-A INPUT")][0] == "-A INPUT -j SIPGUARD"
    assert [r for r in r6 if r.startswith("-A INPUT")][0] == "-A INPUT -j SIPGUARD"
    assert not any("-p tcp -m udp" in r for r in r4 + r6)  # the blog's invalid SIP rule
    for proto, port, name in (("udp", "5060", "sip-udp"), ("tcp", "5060", "sip-tcp"), ("tcp", "5061", "sip-tls"),
                              ("udp", "10000:20000", "rtp")):
        want = f"-A SERVICES -p {proto} -m multiport --dports {port} -m comment --comment {name} -j ACCEPT"
        assert want in r4 and want in r6
    assert not any("websocket" in r for r in r4)
    assert not any(re.search(r"--dports? (53|123)\b", r) for r in r4 + r6)  # no DNS/NTP by default
    assert not any("-p ipv6" in r for r in r4)  # no 6in4 by default
    assert not any("TARPIT" in r for r in r4 + r6)
    assert "-A PSD -p tcp -m statistic --mode random --probability 0.05 -j REJECT --reject-with tcp-reset" in r4
    assert any(r.startswith("-A SERVICES -i eth1 -m limit") and r.endswith("-j PSD") for r in r4)
    assert not any("PRIVATE" in r for r in r4 + r6)  # spoof filter: auto, and no public address known
    ssh = [r for r in r4 if "--dport 22" in r]
    assert len(ssh) == 1 and "--hashlimit-upto 6/min" in ssh[0] and "--hashlimit-mode srcip" in ssh[0]
    assert "--hashlimit-srcmask 64" in [r for r in r6 if "--dport 22" in r][0]
    for t in (1, 2, 3, 4, 133, 134, 135, 136, 137):
        assert any(f"--icmpv6-type {t} " in r and r.endswith("-j ACCEPT") for r in r6), t
    assert any("--icmpv6-type 128 -m limit" in r for r in r6)
    assert any("--sport 547 --dport 546" in r for r in r6)
    assert "# FIX" in v4  # the explanations travel with the rules


def test_render_options():
    cfg = cfg_of(textwrap.dedent("""\
        [firewall]
        management_cidrs = ["203.0.113.0/24", "198.18.96.0/25"]
        websocket = [8080, 8443]
        sip_udp = [5060, 5062]
        extra_tcp = [53]
        extra_udp = ["53", "123", "20000-20100"]
        rtp = ["30000-30100", 40000]
        allow_6in4 = true
        spoof_filter = "on"
        icmp_echo = false
        psd = false
        ssh_port = 2200
        [enforce]
        hook_forward = true
        """))
    env = fw.Env(public_interface="wan0", spoof={4: True, 6: True}, tarpit={4: True, 6: True})
    r4, r6 = rules(fw.render(cfg, 4, env)), rules(fw.render(cfg, 6, env))
    assert "-A SERVICES -p udp -m multiport --dports 5060,5062 -m comment --comment sip-udp -j ACCEPT" in r4
    assert "-A SERVICES -p tcp -m multiport --dports 8080,8443 -m comment --comment sip-websocket -j ACCEPT" in r4
    assert "-A SERVICES -p udp -m multiport --dports 53,123,20000:20100 -m comment --comment extra-udp -j ACCEPT" in r4
    assert "-A SERVICES -p udp -m multiport --dports 30000:30100,40000 -m comment --comment rtp -j ACCEPT" in r4
    assert [r for r in r4 if "--dport 2200" in r] == [
        "-A SERVICES -s 203.0.113.0/24 -p tcp -m tcp --dport 2200 -m comment --comment ssh-management -j ACCEPT",
        "-A SERVICES -s 198.18.96.0/25 -p tcp -m tcp --dport 2200 -m comment --comment ssh-management -j ACCEPT"]
    assert not any("--dport 2200" in r for r in r6)  # no IPv6 management CIDR: no SSH over IPv6
    assert "-A INPUT -i wan0 -p ipv6 -j ACCEPT" in r4
    assert "-A INPUT -i wan0 -j PRIVATE" in r4 and "-A PRIVATE -s 10.0.0.0/8 -j DROP" in r4
    assert "-A PRIVATE -s fc00::/7 -j DROP" in r6 and not any("fe80" in r for r in r6 if "PRIVATE" in r)
    assert not any("PSD" in r for r in r4) and not any("--icmp-type 8" in r for r in r4)
    assert r4.index("-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT") < r4.index("-A INPUT -i wan0 -j PRIVATE")
    assert "-A FORWARD -j SIPGUARD" in r4
    # TARPIT when available
    cfg2 = Config()
    r = rules(fw.render(cfg2, 4, env))
    assert "-A PSD -p tcp -m statistic --mode random --probability 0.05 -j TARPIT --reset" in r
    assert "-A PSD -p tcp -m statistic --mode random --probability 0.5 -j TARPIT --tarpit" in r
    # no public interface known: no -i match at all
    r = rules(fw.render(cfg2, 4, fw.Env(public_interface=None)))
    assert not any(" -i " in x and "-i lo" not in x for x in r)


def test_multiport_chunks_at_15_slots():
    cfg = cfg_of("[firewall]\nextra_udp = [" + ", ".join(str(p) for p in range(7000, 7020)) + ', "8000-8010"]\n')
    r = [x for x in rules(fw.render(cfg, 4, fw.Env())) if "extra-udp" in x]
    assert len(r) == 2
    assert r[0].count(",") == 14 and "8000:8010" in r[1]


def test_config_values_are_validated(tmp_path):
    for bad in ('public_interface = "eth0 -j ACCEPT"', 'extra_tcp = ["22; reboot"]', 'rtp = ["20000-10000"]',
                'ssh_rate = "lots"', 'management_cidrs = ["198.18.96.0/33"]', 'tarpit = "yes"', 'sip_udp = [70000]'):
        p = tmp_path / "c.toml"
        p.write_text(f"[firewall]\n{bad}\n")
        with pytest.raises(ConfigError, match="firewall"):
            load_config(p)
    p.write_text('[firewall]\nssh_rate = "10/m"\nrtp = ["10000:10999"]\npublic_interface = "any"\n')
    c = load_config(p).firewall
    assert (c.ssh_rate, c.rtp, c.public_interface) == ("10/min", ["10000:10999"], "any")


def test_resolve_env_spoof_auto_and_default_interface(monkeypatch):
    # plain data for the decision (never configured anywhere): 9.9.9.9 stands for a public address
    addrs = {"lo": ["127.0.0.1", "::1"], "eth0": ["10.0.0.5", "fe80::1"], "wan0": ["9.9.9.9", "2001:db8::7"]}
    monkeypatch.setattr(hostenv, "interface_addresses", lambda: addrs)  # where resolve_env looks them up
    monkeypatch.setattr(hostenv, "default_route_interface", lambda: "eth0")
    env = fw.resolve_env(Config(), None)
    # behind NAT (10.x on the default-route interface): no spoof filter, it would cut the host off
    assert env.public_interface == "eth0" and env.spoof == {4: False, 6: False}
    env = fw.resolve_env(cfg_of('[firewall]\npublic_interface = "wan0"\n'), None)
    assert env.spoof == {4: True, 6: False}  # 9.9.9.9 is public; 2001:db8:: is documentation
    env = fw.resolve_env(cfg_of('[firewall]\npublic_interface = "any"\nspoof_filter = "on"\n'), None)
    assert env.public_interface is None and env.spoof == {4: False, 6: False} and env.notes
    monkeypatch.setattr(hostenv, "default_route_interface", lambda: None)
    env = fw.resolve_env(Config(), None)
    assert env.public_interface is None and "no default route" in env.notes[0]


def test_ssh_guard():
    cfg = cfg_of('[firewall]\nmanagement_cidrs = ["198.18.96.0/28", "2001:db8:96::/64"]\n')
    env = fw.Env()
    assert fw.ssh_guard(cfg, env, None) is None
    assert fw.ssh_guard(cfg, env, "198.18.96.2 50000 198.18.96.1 22") is None
    assert "not in management_cidrs" in fw.ssh_guard(cfg, env, "198.18.96.200 50000 198.18.96.1 22")
    assert fw.ssh_guard(cfg, env, "::ffff:198.18.96.3 50000 ::ffff:198.18.96.1 22") is None
    assert fw.ssh_guard(cfg, env, "2001:db8:96::9 50000 2001:db8:96::1 22") is None
    assert "not in management_cidrs" in fw.ssh_guard(cfg, env, "2001:db8:97::9 50000 2001:db8:96::1 22")
    assert "port 2222" in fw.ssh_guard(cfg, env, "198.18.96.2 50000 198.18.96.1 2222")
    # open to all (rate-limited): nobody is cut off
    assert fw.ssh_guard(Config(), env, "198.18.97.9 50000 198.18.96.1 22") is None
    assert "ssh_port = 0" in fw.ssh_guard(cfg_of("[firewall]\nssh_port = 0\n"), env, "198.18.97.9 1 198.18.96.1 22")
    # IPv6 left alone: an IPv6 client is not affected
    v4only = cfg_of('[firewall]\nipv6 = false\nmanagement_cidrs = ["198.18.96.0/28"]\n')
    assert fw.ssh_guard(v4only, env, "2001:db8:97::9 50000 2001:db8:96::1 22") is None
    # the spoof filter would drop a private client arriving on the public interface
    spoof = fw.Env(public_interface="wan0", spoof={4: True, 6: False}, addresses={"wan0": ["198.18.96.1"]})
    assert "spoof" in fw.ssh_guard(Config(), spoof, "10.1.2.3 50000 198.18.96.1 22")
    assert fw.ssh_guard(Config(), spoof, "10.1.2.3 50000 198.18.99.1 22") is None  # came in elsewhere
    assert fw.ssh_guard(cfg, env, "garbage") is None


def test_parse_and_strip_sipguard():
    text = textwrap.dedent("""\
        # Generated by iptables-save
        *filter
        :INPUT DROP [5:300]
        :FORWARD ACCEPT [0:0]
        :OUTPUT ACCEPT [0:0]
        :SIPGUARD - [0:0]
        :MINE - [0:0]
        -A INPUT -j SIPGUARD
        -A INPUT -m set --match-set sipguard-v4 src -j DROP
        -A INPUT -j MINE
        -A SIPGUARD -m set --match-set sipguard-v4 src -j DROP
        -A MINE -s 198.18.96.9/32 -j DROP
        COMMIT
        """)
    t = fw.parse_save(text)
    assert t.present and t.chains["INPUT"] == ("DROP", ["-j SIPGUARD", "-m set --match-set sipguard-v4 src -j DROP",
                                                        "-j MINE"])
    s = fw.strip_sipguard(t, "SIPGUARD", "sipguard")
    assert "SIPGUARD" not in s.chains and s.chains["INPUT"] == ("DROP", ["-j MINE"])
    assert fw.parse_save(s.dump()) == s
    assert fw.parse_save("") == fw.parse_save("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n"
                                              ":OUTPUT ACCEPT [0:0]\nCOMMIT\n")


# -- no root: one iptables flavour for the firewall and the enforcer's hook --------------------
def _fake_iptables(bindir: Path, says: str) -> None:
    """Stand-ins for every iptables binary of both flavours; plain `iptables -V` answers `says`."""
    bindir.mkdir(exist_ok=True)
    for flavour in ("", "-nft", "-legacy"):
        for base in ("iptables", "ip6tables"):
            for tail in ("", "-save", "-restore"):
                exe = bindir / f"{base}{flavour}{tail}"
                exe.write_text(f"#!/bin/sh\necho '{says}'\n")
                exe.chmod(0o755)


def test_netfilter_gives_the_firewall_and_the_enforcer_hook_one_answer(tmp_path, monkeypatch):
    from sipguard import netfilter
    from sipguard.enforce.ipset import IpsetEnforcer
    from sipguard.errors import SipguardError

    def both(toml: str) -> tuple[str, str]:
        cfg = cfg_of(toml)
        return netfilter.firewall_tools(cfg).flavour, IpsetEnforcer(cfg.enforce).hook.flavour  # touches nothing

    _fake_iptables(tmp_path / "bin", "iptables v1.8.9 (nf_tables)")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert both("") == ("nft", "nft")  # `iptables -V` decides for both
    cfg = Config()
    hook = IpsetEnforcer(cfg.enforce).hook
    assert hook.tools == netfilter.firewall_tools(cfg)  # the same binaries, iptables-nft-save & co
    assert (hook.tools.save(4), hook.tools.restore(6)) == ("iptables-nft-save", "ip6tables-nft-restore")
    # the override reaches both
    assert both('[enforce]\niptables = "legacy"\n') == ("legacy", "legacy")
    assert netfilter.firewall_tools(cfg_of('[enforce]\niptables = "legacy"\n')).save(6) == "ip6tables-legacy-save"
    # [firewall] iptables is the firewall's own: the hook keeps [enforce]'s
    assert both('[firewall]\niptables = "nft"\n[enforce]\niptables = "legacy"\n') == ("nft", "legacy")
    assert both('[firewall]\niptables = "legacy"\n') == ("legacy", "nft")
    # both ask the same detection: whatever it says, both say
    monkeypatch.setattr(netfilter, "detect_flavour", lambda: "legacy")
    assert both("") == ("legacy", "legacy")
    monkeypatch.undo()
    _fake_iptables(tmp_path / "bin", "iptables v1.8.9 (legacy)")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert both("") == ("legacy", "legacy")
    # no iptables at all: one clear error from either side
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for ask in (lambda: netfilter.firewall_tools(Config()), lambda: IpsetEnforcer(Config().enforce).hook):
        with pytest.raises(SipguardError, match="no iptables found"):
            ask()


# -- root: namespaces --------------------------------------------------------------------------
def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def netns():
    """Factory of sgf-* network namespaces (lo up); every one is deleted afterwards."""
    made: list[Netns] = []

    def make() -> str:
        ns = Netns(f"sgf-{secrets.token_hex(3)}")
        made.append(ns)
        return ns.create().name

    yield make
    for ns in made:
        ns.delete()


@pytest.fixture
def run_in(tmp_path):
    """Run the sipguard CLI inside a namespace with a config; revert helpers it starts are reaped after."""
    started: list[int] = []

    def run(ns: str, toml: str, *args: str, env_extra: dict | None = None, path: str | None = None):
        cfg = tmp_path / f"{ns}.toml"
        cfg.write_text(toml)
        env = {k: v for k, v in os.environ.items()
               if k not in ("SSH_CONNECTION", "SIPGUARD_CONFIG", "SIPGUARD_STATE_DIR")}
        env.update(env_extra or {})
        prefix = ["env", f"PATH={path}"] if path is not None else []
        r = subprocess.run(["ip", "netns", "exec", ns, *prefix, SG, "--config", str(cfg), "--state-dir",
                            str(tmp_path / f"state-{ns}"), *args], capture_output=True, text=True, timeout=90,
                           env=env)
        started.extend(int(m) for m in re.findall(r"revert process (\d+)", r.stdout))
        return r

    yield run
    for pid in started:
        try:
            if "revert-if-unconfirmed" in Path(f"/proc/{pid}/cmdline").read_text():
                os.kill(pid, signal.SIGTERM)
        except (OSError, ProcessLookupError):
            pass


def save(ns: str, fam: int = 4) -> str:
    tool = "iptables-save" if fam == 4 else "ip6tables-save"
    r = subprocess.run(["ip", "netns", "exec", ns, tool, "-t", "filter"], capture_output=True, text=True, timeout=30,
                       check=True)
    return r.stdout


def table(ns: str, fam: int = 4) -> str:
    """The filter table, normalized (no comments or counters, chains in a fixed order)."""
    return fw.parse_save(save(ns, fam)).dump()


def ipt(ns: str, *args: str, fam: int = 4) -> None:
    tool = "iptables" if fam == 4 else "ip6tables"
    subprocess.run(["ip", "netns", "exec", ns, tool, *args], check=True, capture_output=True, timeout=30)


def raw_lines(ns: str, fam: int = 4) -> list[str]:
    return [ln for ln in save(ns, fam).splitlines() if not ln.startswith("#")]


@needs_root
def test_apply_golden_idempotent_show_remove(netns, run_in):
    ns = netns()
    before = [raw_lines(ns, 4), raw_lines(ns, 6)]
    r = run_in(ns, GOLDEN_TOML, "firewall", "apply")
    assert r.returncode == 0, r.stderr
    assert "+-A INPUT -j SIPGUARD" in r.stdout and "applied: IPv4, IPv6" in r.stdout
    for fam in (4, 6):
        got = table(ns, fam)
        golden = DATA / f"expected-v{fam}.rules"
        if os.environ.get("SIPGUARD_UPDATE_GOLDEN"):
            golden.parent.mkdir(parents=True, exist_ok=True)
            golden.write_text(got)
        assert got == golden.read_text(), f"IPv{fam} differs from {golden}"
        lines = raw_lines(ns, fam)
        assert [ln for ln in lines if ln.startswith("-A INPUT")][0] == "-A INPUT -j SIPGUARD"
    applied = [save(ns, 4), save(ns, 6)]
    r = run_in(ns, GOLDEN_TOML, "firewall", "apply")
    assert r.returncode == 0 and "nothing changed" in r.stdout, r.stdout + r.stderr
    assert [table(ns, 4), table(ns, 6)] == [fw.parse_save(t).dump() for t in applied]
    r = run_in(ns, GOLDEN_TOML, "firewall", "show")
    assert r.returncode == 0 and r.stdout.count("in sync") == 2, r.stdout
    r = run_in(ns, GOLDEN_TOML.replace("websocket = [8443]", "websocket = [8080]"), "firewall", "show")
    assert r.returncode == 1 and "+-A SERVICES -p tcp -m multiport --dports 8080" in r.stdout, r.stdout
    r = run_in(ns, GOLDEN_TOML, "firewall", "apply", "--dry-run")
    assert r.returncode == 0 and "# FIX" in r.stdout and "-A INPUT -j SIPGUARD" in r.stdout
    r = run_in(ns, GOLDEN_TOML, "firewall", "remove")
    assert r.returncode == 0, r.stderr
    # exactly as before, line for line (a filter table that did not exist does not exist again)
    assert [raw_lines(ns, 4), raw_lines(ns, 6)] == before
    r = run_in(ns, GOLDEN_TOML, "firewall", "remove")
    assert r.returncode == 0 and "nothing to remove" in r.stdout


@needs_root
def test_remove_restores_previous_rules_and_leaves_no_sipguard(netns, run_in):
    ns = netns()
    ipt(ns, "-N", "MINE")
    ipt(ns, "-A", "MINE", "-s", "198.18.96.99", "-j", "DROP")
    ipt(ns, "-A", "INPUT", "-j", "MINE")
    ipt(ns, "-A", "INPUT", "-p", "tcp", "--dport", "2222", "-j", "ACCEPT", fam=6)
    before = [table(ns, 4), table(ns, 6)]
    r = run_in(ns, GOLDEN_TOML, "firewall", "apply")
    assert r.returncode == 0, r.stderr
    assert "MINE" in r.stderr  # warned: a chain it does not manage is replaced
    # the enforcer's part: sets and rules in the hook chain, which apply must carry over
    subprocess.run(["ip", "netns", "exec", ns, "ipset", "create", "sipguard-v4", "hash:ip"], check=True, timeout=30)
    ipt(ns, "-A", "SIPGUARD", "-m", "set", "--match-set", "sipguard-v4", "src", "-j", "DROP")
    subprocess.run(["ip", "netns", "exec", ns, "nft", "add", "table", "inet", "sipguard"], check=True, timeout=30)
    r = run_in(ns, GOLDEN_TOML.replace("extra_udp = [123]", "extra_udp = [124]"), "firewall", "apply")
    assert r.returncode == 0, r.stderr
    lines = raw_lines(ns)
    assert [ln for ln in lines if ln.startswith("-A INPUT")][0] == "-A INPUT -j SIPGUARD"
    assert "-A SIPGUARD -m set --match-set sipguard-v4 src -j DROP" in lines
    assert any("--dports 124" in ln for ln in lines)
    r = run_in(ns, GOLDEN_TOML, "firewall", "remove")
    assert r.returncode == 0, r.stderr
    # the enforcer's removal (sipguard.enforce.remove_all), with today's messages
    assert "ipset sipguard-v4: destroyed" in r.stdout and "nft table inet sipguard: deleted" in r.stdout, r.stdout
    assert [table(ns, 4), table(ns, 6)] == before
    assert "SIPGUARD" not in save(ns, 4) + save(ns, 6)
    sets = subprocess.run(["ip", "netns", "exec", ns, "ipset", "list", "-n"], capture_output=True, text=True,
                          timeout=30).stdout
    assert "sipguard" not in sets
    nft = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "tables"], capture_output=True, text=True,
                         timeout=30).stdout
    assert "sipguard" not in nft


FAILING_APPLY = r"""
import json, sys
from pathlib import Path
from sipguard import firewall as fw
from sipguard.config import Config
from sipguard.errors import SipguardError
from sipguard.firewall import lifecycle  # plan() looks render and canonical up here
cfg = Config.model_validate({"firewall": json.loads(sys.argv[1])})
real_render = lifecycle.render
def bad_render(cfg, fam, env, template=None):
    text = real_render(cfg, fam, env, template)
    return text.replace("-j ICMP\n", "-j NO_SUCH_CHAIN\n", 1) if fam == int(sys.argv[3]) else text
assert hasattr(lifecycle, "render") and hasattr(lifecycle, "canonical")
lifecycle.render = bad_render
if sys.argv[4] == "bypass":  # no scratch-namespace check: the real restore must fail and roll back
    lifecycle.canonical = lambda tools, fam, text, **kw: fw.parse_save(text)
try:
    fw.apply(cfg, Path(sys.argv[2]))
except SipguardError as exc:
    print("ERROR:", exc)
"""


@needs_root
@pytest.mark.parametrize("mode", ["checked", "bypass"])
def test_failing_rule_leaves_previous_rules_untouched(netns, run_in, tmp_path, mode):
    ns = netns()
    r = run_in(ns, GOLDEN_TOML, "firewall", "apply")
    assert r.returncode == 0, r.stderr
    before = [table(ns, 4), table(ns, 6)]
    # the new config changes both families; IPv6 carries a bad rule
    fwcfg = {"public_interface": "veth-sgf0", "sip_udp": [5070], "tarpit": "never"}
    r = subprocess.run(["ip", "netns", "exec", ns, PY, "-c", FAILING_APPLY, json.dumps(fwcfg),
                        str(tmp_path / f"state-{ns}"), "6", mode], capture_output=True, text=True, timeout=60)
    assert "ERROR:" in r.stdout, r.stdout + r.stderr
    if mode == "bypass":
        assert "IPv4 was put back" in r.stdout, r.stdout
    assert [table(ns, 4), table(ns, 6)] == before


@needs_root
def test_missing_iptables_is_one_clear_error(netns, run_in, tmp_path):
    ns = netns()
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    r = run_in(ns, GOLDEN_TOML, "firewall", "apply", path=str(empty))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("sipguard: error: no iptables found"), r.stderr
    assert "Traceback" not in r.stderr


@needs_root
def test_confirm_timeout_reverts_unless_confirmed(netns, run_in):
    ns1, ns2 = netns(), netns()
    for ns in (ns1, ns2):
        ipt(ns, "-A", "INPUT", "-s", "198.18.96.99", "-j", "DROP")
    before1, before2 = table(ns1), table(ns2)
    r1 = run_in(ns1, GOLDEN_TOML, "firewall", "apply", "--confirm-timeout", "2")
    r2 = run_in(ns2, GOLDEN_TOML, "firewall", "apply", "--confirm-timeout", "2")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert "sipguard firewall confirm" in r1.stdout
    assert table(ns1) != before1 and table(ns2) != before2
    r = run_in(ns2, GOLDEN_TOML, "firewall", "confirm")
    assert r.returncode == 0 and "confirmed" in r.stdout
    applied2 = table(ns2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and table(ns1) != before1:
        time.sleep(0.25)
    assert table(ns1) == before1, "not reverted within 10 s"
    assert table(ns2) == applied2  # confirmed: kept (its deadline has passed too by now)
    r = run_in(ns2, GOLDEN_TOML, "firewall", "confirm")
    assert "nothing to confirm" in r.stdout


@needs_root
def test_ssh_guard_refuses_unless_forced(netns, run_in):
    ns = netns()
    toml = GOLDEN_TOML.replace('["198.18.96.0/24", "2001:db8:96::/64"]', '["198.18.97.0/24"]')
    before = table(ns)
    env = {"SSH_CONNECTION": "198.18.96.2 50000 198.18.96.1 22"}
    r = run_in(ns, toml, "firewall", "apply", env_extra=env)
    assert r.returncode == 1 and "refusing" in r.stderr and "198.18.96.2" in r.stderr, r.stderr
    assert table(ns) == before
    r = run_in(ns, toml, "firewall", "apply", "--force", env_extra=env)
    assert r.returncode == 0, r.stderr
    assert table(ns) != before
    ok = run_in(ns, GOLDEN_TOML, "firewall", "apply", env_extra=env)  # the client is in management_cidrs
    assert ok.returncode == 0, ok.stderr
    assert "open to every address" not in ok.stderr
    r = run_in(ns, '[firewall]\npublic_interface = "veth-sgf0"\n', "firewall", "apply", env_extra=env)
    assert r.returncode == 0 and "warning: SSH (port 22) is open to every address" in r.stderr, r.stderr


# -- traffic through a veth pair ---------------------------------------------------------------
SERVER = r"""
import selectors, socket, sys, time
sel = selectors.DefaultSelector()
for spec in sys.argv[1:]:
    proto, fam, port = spec.split(":")
    af = socket.AF_INET if fam == "4" else socket.AF_INET6
    s = socket.socket(af, socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if af == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind(("0.0.0.0" if fam == "4" else "::", int(port)))
    if proto == "tcp":
        s.listen(16)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, proto)
print("ready", flush=True)
end = time.monotonic() + 90
while time.monotonic() < end:
    for key, _ in sel.select(1):
        s = key.fileobj
        if key.data == "udp":
            data, addr = s.recvfrom(2048)
            s.sendto(data, addr)
        elif key.data == "tcp":
            c, _ = s.accept()
            c.setblocking(True)
            c.settimeout(2)
            try:
                c.sendall(c.recv(2048))
            except OSError:
                pass
            c.close()
"""

CLIENT = r"""
import socket, sys
proto, host, port, src = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
af = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(af, socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM)
s.settimeout(3.0)  # generous: the CI machine has 2 busy cores
try:
    if src != "-":
        s.bind((src, 0))
    s.connect((host, port))
    s.send(b"sipguard-probe")
    ok = s.recv(2048) == b"sipguard-probe"
except OSError:
    ok = False
sys.exit(0 if ok else 1)
"""

PING6 = r"""
import os, socket, struct, sys, time
dst = sys.argv[1]
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.settimeout(1.0)
ident = os.getpid() & 0xFFFF
for seq in range(3):
    s.sendto(struct.pack("!BBHHH", 128, 0, 0, ident, seq) + b"sgf", (dst, 0))
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        try:
            data, addr = s.recvfrom(2048)
        except socket.timeout:
            break
        if data[0] == 129 and struct.unpack("!H", data[4:6])[0] == ident:
            sys.exit(0)
sys.exit(1)
"""


@pytest.fixture
def veth(netns):
    """Server namespace (veth-sgf0: 198.18.96.1, 2001:db8:96::1) and peer (.2 and .3, ::2 and ::3)."""
    srv, peer = netns(), netns()
    _ip("-n", srv, "link", "add", "veth-sgf0", "type", "veth", "peer", "name", "veth-sgf1", "netns", peer)
    for ns, dev, addrs in ((srv, "veth-sgf0", ["198.18.96.1/24", "2001:db8:96::1/64"]),
                           (peer, "veth-sgf1", ["198.18.96.2/24", "198.18.96.3/24", "2001:db8:96::2/64",
                                                "2001:db8:96::3/64"])):
        for a in addrs:
            _ip("-n", ns, "addr", "add", a, "dev", dev, *(["nodad"] if ":" in a else []))
        _ip("-n", ns, "link", "set", dev, "up")
    return srv, peer


@pytest.fixture
def server(veth):
    srv, _ = veth
    specs = ["udp:4:5060", "tcp:4:5060", "udp:4:10000", "tcp:4:2222", "tcp:4:22", "udp:6:5060", "tcp:6:22"]
    proc = subprocess.Popen(["ip", "netns", "exec", srv, PY, "-c", SERVER, *specs], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()  # only the process this fixture started
        proc.wait(timeout=10)


def probe(peer: str, proto: str, host: str, port: int, src: str = "-") -> bool:
    r = subprocess.run(["ip", "netns", "exec", peer, PY, "-c", CLIENT, proto, host, str(port), src],
                       capture_output=True, timeout=30)
    return r.returncode == 0


def ping6(peer: str, dst: str) -> bool:
    r = subprocess.run(["ip", "netns", "exec", peer, PY, "-c", PING6, dst], capture_output=True, timeout=30)
    return r.returncode == 0


@needs_root
def test_traffic_through_veth(veth, server, run_in):
    srv, peer = veth
    assert probe(peer, "tcp", "198.18.96.1", 2222)  # reachable before: a refusal later is the firewall's
    assert ping6(peer, "2001:db8:96::1")
    r = run_in(srv, TRAFFIC_TOML, "firewall", "apply")
    assert r.returncode == 0, r.stderr
    assert probe(peer, "udp", "198.18.96.1", 5060)
    assert probe(peer, "tcp", "198.18.96.1", 5060)
    assert probe(peer, "udp", "198.18.96.1", 10000)  # RTP
    assert probe(peer, "udp", "2001:db8:96::1", 5060)
    assert not probe(peer, "tcp", "198.18.96.1", 2222)  # not in SERVICES
    assert probe(peer, "tcp", "198.18.96.1", 22, src="198.18.96.2")  # management CIDR
    assert not probe(peer, "tcp", "198.18.96.1", 22, src="198.18.96.3")  # not in it
    assert probe(peer, "tcp", "2001:db8:96::1", 22, src="2001:db8:96::2")
    # neighbour discovery after apply: forget every neighbour, then ping6 must resolve them again
    for ns in (srv, peer):
        _ip("-n", ns, "-6", "neigh", "flush", "all")
    assert ping6(peer, "2001:db8:96::1")


def save_legacy(ns: str, fam: int = 4) -> str:
    tool = "iptables-legacy-save" if fam == 4 else "ip6tables-legacy-save"
    r = subprocess.run(["ip", "netns", "exec", ns, tool, "-t", "filter"], capture_output=True, text=True,
                       timeout=30, check=True)
    return r.stdout


@needs_root
def test_apply_and_remove_on_a_legacy_iptables_host(netns, run_in):
    """The same ruleset through iptables-legacy: same golden rules, nothing in the nf_tables side."""
    ns = netns()
    toml = GOLDEN_TOML.replace("[firewall]\n", "[firewall]\niptables = \"legacy\"\n")
    r = run_in(ns, toml, "firewall", "apply")
    assert r.returncode == 0, r.stderr
    for fam in (4, 6):
        assert fw.parse_save(save_legacy(ns, fam)).dump() == (DATA / f"expected-v{fam}.rules").read_text()
        assert "SIPGUARD" not in save(ns, fam)  # not split over two rule sets
    r = run_in(ns, toml, "firewall", "apply")
    assert r.returncode == 0 and "nothing changed" in r.stdout, r.stdout + r.stderr
    r = run_in(ns, toml, "firewall", "remove")
    assert r.returncode == 0, r.stderr
    for fam in (4, 6):
        assert "SIPGUARD" not in save_legacy(ns, fam) and "-A " not in save_legacy(ns, fam)
