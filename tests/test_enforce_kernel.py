"""Kernel enforcers, end to end in network namespaces: packets really stop, and come back.

For each backend (ipset + iptables-nft, ipset + iptables-legacy via python-iptables, nftables):
two namespaces joined by a veth pair (server 198.18.64.1 / 2001:db8:64::1, peer .2 / ::2);
UDP and TCP to port 5060 from the peer must arrive before a ban, be dropped while banned, and
arrive again after unban and after a 2 s ban expires. Also: CIDR bans, kernel timeouts equal
the ban's remaining time, sync repairs, `ban --from-file` with 100,000 addresses, a SIGKILLed
daemon restoring every ban after the sets were flushed, kernel batches cut by size (IPv6 included)
with an entry the kernel refuses reported while the rest is applied, and a daemon restoring 100,000
IPv6 and 100,000 IPv4 bans into an empty kernel (ipset and nftables).

Needs root (network namespaces, netfilter); never touches the host's own firewall: every
netfilter operation runs inside an `sge-` namespace made here.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sipguard.config import EnforceConfig
from sipguard.enforce import IPSET_MAX_TIMEOUT, kernel_timeout, needs_rearm
from sipguard.enforce.hook import RuleSpec, plans, problems, Observed
from sipguard.enforce import ipsetnl
from sipguard.enforce.ipsetnl import ADT_BUDGET, IpsetNetlink, IpsetNetlinkError
from sipguard.enforce.nftables import NftablesEnforcer
from sipguard.model import Ban
from sipguard.store import Store

from netns_util import ALL, PEER4, PEER6, SERVER4, listener, netns_pair, ns_call, probe, sh

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces and netfilter")

BACKENDS = {
    "ipset-nft": {"backend": "ipset", "iptables": "nft"},
    "ipset-legacy": {"backend": "ipset", "iptables": "legacy"},
    "nftables": {"backend": "nftables"},
}
CLI = [sys.executable, "-m", "sipguard.cli"]


# -- pure logic (no root) ----------------------------------------------------------------------
def test_kernel_timeout_and_rearm():
    now = 1000.0
    assert kernel_timeout(Ban("1.2.3.4", "r", now, None), now) == 0
    assert kernel_timeout(Ban("1.2.3.4", "r", now, now - 1), now) is None
    assert kernel_timeout(Ban("1.2.3.4", "r", now, now + 0.2), now) == 1
    assert kernel_timeout(Ban("1.2.3.4", "r", now, now + 99.5), now) == 100
    assert kernel_timeout(Ban("1.2.3.4", "r", now, now + 40 * 86400), now, IPSET_MAX_TIMEOUT) == IPSET_MAX_TIMEOUT
    assert not needs_rearm(None, 0) and not needs_rearm(99.0, 100)
    assert needs_rearm(None, 100) and needs_rearm(50.0, 0) and needs_rearm(IPSET_MAX_TIMEOUT - 3600, IPSET_MAX_TIMEOUT)


def test_rules_are_data_rendered_once():
    p4, p6 = plans("SIPGUARD", {4: ("sg-v4", "sg-net4"), 6: ("sg-v6", "sg-net6")}, "REJECT", False)
    assert [r.restore_args() for r in p4.rules] == [
        "-m set --match-set sg-v4 src -j REJECT --reject-with icmp-port-unreachable",
        "-m set --match-set sg-net4 src -j REJECT --reject-with icmp-port-unreachable"]
    assert p6.rules[0].reject_with == "icmp6-port-unreachable" and p4.hooks == ("INPUT",)
    assert RuleSpec("SIPGUARD").restore_args() == "-j SIPGUARD"
    good = Observed(True, [r.restore_args() for r in p4.rules], {"INPUT": ["-j SIPGUARD", "-j ACCEPT"]})
    assert problems(p4, good) == []
    late = Observed(True, good.chain_rules, {"INPUT": ["-j ACCEPT", "-j SIPGUARD"]})
    assert problems(p4, late) == ["INPUT does not jump to SIPGUARD first"]
    assert len(problems(p4, Observed(False, [], {"INPUT": [], "FORWARD": ["-j SIPGUARD"]}))) == 3


def test_nft_interval_sets_stay_free_of_overlaps():
    ops = NftablesEnforcer._net_ops
    arm, delete = ops({"198.18.0.0/16": 10, "198.18.3.0/24": 20}, {"198.18.7.0/24": 5.0}, authoritative=False)
    assert arm == ["198.18.0.0/16"] and delete == ["198.18.7.0/24"]
    arm, delete = ops({"198.18.3.0/24": 20}, {"198.18.0.0/16": 5.0}, authoritative=False)
    assert arm == [] and delete == []  # already covered by the kernel's /16
    arm, delete = ops({"198.18.3.0/24": 20}, {"198.18.0.0/16": 5.0, "198.18.3.0/24": 1.0}, authoritative=True)
    assert arm == ["198.18.3.0/24"] and delete == ["198.18.0.0/16"]


# -- batches cut by size (no root: a stand-in for the kernel's ipset) ----------------------------
def _decode(data: bytes) -> tuple[int, str]:
    """(line number, entry) of one encoded IPSET_ATTR_DATA, as the kernel reads it."""
    from sipguard.addresses import address_from_packed

    (_, body), = list(ipsetnl._attrs(data))
    addr, cidr, lineno = "", None, 0
    for k, v in ipsetnl._attrs(body):
        if k == ipsetnl.D_IP:
            (_, raw), = list(ipsetnl._attrs(v))
            addr, maxlen = address_from_packed(raw)
        elif k == ipsetnl.D_CIDR:
            cidr = v[0]
        elif k == ipsetnl.D_LINENO:
            lineno = struct.unpack("=I", v)[0]
    return lineno, addr if cidr is None or cidr == maxlen else f"{addr}/{cidr}"


class FakeIpset(IpsetNetlink):
    """An IpsetNetlink whose kernel is this object: it checks every message's size, applies entries in
    order and refuses those in `refuse` the way ip_set_core does (the entries before are applied; the
    error names the entry's LINENO, or nothing when `lineno` is False)."""

    def __init__(self, refuse: set[str] = frozenset(), lineno: bool = True, whole: int | None = None) -> None:
        self.adt_budget = ADT_BUDGET
        self.refuse, self.lineno, self.whole = refuse, lineno, whole
        self.payloads: list[int] = []
        self.held: list[str] = []

    def request(self, cmd, attrs, what, family=socket.AF_INET, flags=0):
        adt = dict(ipsetnl._attrs(attrs))[ipsetnl.A_ADT]
        assert len(adt) + 4 <= 0xFFFF, len(adt)  # the 16-bit attribute length never overflows
        self.payloads.append(len(adt))
        for kind, data in ipsetnl._attrs(adt):
            no, ip = _decode(ipsetnl._attr(kind, data))
            if self.whole is not None:
                raise IpsetNetlinkError(self.whole, what, no)
            if ip in self.refuse:
                raise IpsetNetlinkError(4104, what, no if self.lineno else 0)
            self.held.append(ip)
        return []


def _v6(n: int, base: str = "2001:db8:1::") -> list[tuple[str, int]]:
    """n canonical IPv6 addresses from `base` on."""
    start = int(ipaddress.IPv6Address(base))
    return [(str(ipaddress.IPv6Address(start + i)), 3600) for i in range(n)]


def test_ipset_batches_are_cut_by_encoded_size_not_by_count():
    nl = FakeIpset()
    entries = _v6(100_000)
    result = nl.adt_many("sipguard-v6", entries)
    assert result.sent == 100_000 and result.failed == [] and nl.held == [ip for ip, _ in entries]
    assert max(nl.payloads) <= ADT_BUDGET < 0xFFFF - 4  # 44-byte IPv6 entries: 1,363 a message
    assert len(nl.payloads) == -(-100_000 * 44 // ADT_BUDGET)
    nets = [(f"2001:db8:{i + 1:x}::/48", 0) for i in range(5_000)]  # 52 bytes each
    v4 = [(f"198.18.{i >> 8}.{i & 255}", 60) for i in range(30_000)]  # 32 bytes each
    for batch in (nets, v4):
        nl = FakeIpset()
        assert nl.adt_many("s", batch).sent == len(batch) and nl.held == [ip for ip, _ in batch]
        assert max(nl.payloads) <= ADT_BUDGET
    nl = FakeIpset()
    nl.adt_many("sipguard-v6", _v6(2_000))  # ~1,500 IPv6 entries overflowed the length before
    assert len(nl.payloads) == 2


def test_a_refused_entry_is_reported_and_the_rest_applied():
    entries = _v6(5_000)
    bad = {entries[0][0], entries[1_700][0], entries[4_999][0]}
    for lineno in (True, False):  # the kernel's LINENO, or halving when the error names no entry
        nl = FakeIpset(refuse=bad, lineno=lineno)
        result = nl.adt_many("sipguard-v6", entries + [("not-an-address", 5)])
        assert sorted(ip for ip, _ in result.failed) == sorted(bad | {"not-an-address"}), lineno
        assert all("CIDR" in why for _, why in result.failed), result.failed
        assert sorted(set(nl.held)) == sorted(ip for ip, _ in entries if ip not in bad), lineno
        assert result.sent == 5_000 - 3
    with pytest.raises(IpsetNetlinkError):  # about the set as a whole (full): stop, not 5,000 refusals
        FakeIpset(whole=4352).adt_many("sipguard-v6", entries)



class _Headers:
    """Set headers and listings as a kernel would give them: `live` entries, `counted` in the header."""

    def __init__(self, live: dict[str, int], counted: dict[str, int]) -> None:
        self.live, self.counted, self.listed = live, counted, 0

    def header(self, name):
        if name not in self.live:
            return None
        return ipsetnl.SetHeader(name, "hash:ip", socket.AF_INET, True, 1 << 20, self.counted[name], 1)

    def dump(self, name):
        self.listed += 1
        return {f"198.18.9.{i}": 0 for i in range(self.live[name])}


class _GoodHook:
    def __init__(self, plans_) -> None:
        self.plans = plans_

    def observe(self, plan):
        return Observed(True, [r.restore_args() for r in plan.rules], {"INPUT": ["-j SIPGUARD"], "FORWARD": []})


def test_ipset_drift_counts_from_headers_and_lists_a_set_only_on_a_surplus():
    from sipguard.enforce.ipset import RECOUNT_EVERY, IpsetEnforcer

    e = IpsetEnforcer(_cfg("ipset-nft"))
    names = list(e.sets.values())
    assert e.drift(0.0) == ["the kernel was not synced yet"]
    now = 1_000_000.0
    e.ledger.reset({names[0]: {"198.18.9.1": None, "198.18.9.2": now + 600, "198.18.9.3": now + 1}})
    e._hook = _GoodHook(plans("SIPGUARD", {4: (names[0], names[2]), 6: (names[1], names[3])}, "DROP", False))
    kernel = _Headers({n: 0 for n in names}, {n: 0 for n in names})
    e._nl = kernel
    kernel.live[names[0]] = kernel.counted[names[0]] = 3
    assert e.drift(now) == []
    kernel.live[names[0]] = kernel.counted[names[0]] = 2  # the one expiring in 1 s may be gone already
    assert e.drift(now) == []
    kernel.live[names[0]] = kernel.counted[names[0]] = 1  # flushed in part
    assert e.drift(now) == [f"ipset {names[0]} holds 1 entries, 2-3 expected"]
    kernel.live[names[0]], kernel.counted[names[0]] = 3, 9  # 6 expired, not collected yet: listed once
    assert e.drift(now) == [] and kernel.listed == 1
    kernel.live[names[0]] = 5  # a real surplus, seen at the next listing (a minute later), not before
    assert e.drift(now + 10) == [] and kernel.listed == 1
    # (by then the entry that expired at now + 1 is forgotten: 2 expected)
    assert e.drift(now + RECOUNT_EVERY) == [f"ipset {names[0]} holds 5 entries, 2 expected"]
    del kernel.live[names[3]]
    assert f"ipset {names[3]} missing" in e.drift(now + RECOUNT_EVERY)

# -- helpers run inside the server namespace ---------------------------------------------------
def _cfg(backend: str) -> EnforceConfig:
    return EnforceConfig(**BACKENDS[backend])


def _entries(backend: str) -> dict[str, float | None]:
    from sipguard.enforce import make_enforcer

    e = make_enforcer(_cfg(backend))
    try:
        return {x.ip: x.timeout for x in e.entries()}
    finally:
        e.close()


def _sync(backend: str, bans: list[Ban]):
    from sipguard.enforce import make_enforcer

    e = make_enforcer(_cfg(backend))
    try:
        return e.sync(bans, time.time())
    finally:
        e.close()


def _ban(backend: str, bans: list[Ban]) -> None:
    from sipguard.enforce import make_enforcer

    e = make_enforcer(_cfg(backend))
    try:
        e.ban_many(bans, time.time())
    finally:
        e.close()


def _ban_latency(backend: str, n: int) -> float:
    """Median seconds of one more single ban (sets and hook already exist)."""
    from sipguard.enforce import make_enforcer

    e = make_enforcer(_cfg(backend))
    try:
        now = time.time()
        e.ban(Ban("198.19.0.1", "warm", now, now + 60), now)
        took = []
        for i in range(n):
            t = time.perf_counter()
            e.ban(Ban(f"198.19.1.{i + 1}", "lat", now, now + 60), now)
            took.append(time.perf_counter() - t)
        for i in range(n):
            e.unban(f"198.19.1.{i + 1}")
        e.unban("198.19.0.1")
        return sorted(took)[n // 2]
    finally:
        e.close()


def flush_sets(backend: str, ns: str) -> None:
    if backend == "nftables":
        for s in ("v4", "v6", "net4", "net6"):
            sh("nft", "flush", "set", "inet", "sipguard", s, ns=ns)
    else:
        for s in ("v4", "v6", "net4", "net6"):
            sh("ipset", "flush", f"sipguard-{s}", ns=ns)


def delete_jump(backend: str, ns: str) -> None:
    if backend == "nftables":
        sh("nft", "flush", "chain", "inet", "sipguard", "input", ns=ns)
    else:
        flavour = BACKENDS[backend]["iptables"]
        sh(f"iptables-{flavour}", "-D", "INPUT", "-j", "SIPGUARD", ns=ns)
        sh(f"ip6tables-{flavour}", "-D", "INPUT", "-j", "SIPGUARD", ns=ns)


class Lab:
    def __init__(self, pair, backend: str, tmp: Path) -> None:
        self.pair, self.backend, self.tmp = pair, backend, tmp
        self.config = tmp / "sipguard.toml"
        self.state = tmp / "state"
        self.log = tmp / "kamailio.log"
        self.log.write_text("")
        lines = ["[enforce]"] + [f'{k} = "{v}"' for k, v in BACKENDS[backend].items()]
        lines += ["[sources]", f'logs = ["{self.log}"]', 'format = "syslog"']
        self.config.write_text("\n".join(lines) + "\n")

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        env = {**os.environ}
        env.pop("SIPGUARD_CONFIG", None)
        cmd = ["ip", "netns", "exec", self.pair.server, *CLI, "--config", str(self.config),
               "--state-dir", str(self.state), *args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: rc {p.returncode}: {p.stderr.strip()}")
        return p

    def entries(self) -> dict[str, float | None]:
        return ns_call(self.pair.server, _entries, self.backend)

    def db(self) -> dict[str, dict]:
        return {b["ip"]: b for b in json.loads(self.cli("list", "--json").stdout)}

    def expect(self, banned: set[str], what: str) -> None:
        """Probe all four (v4/v6 × udp/tcp); those in `banned` families must be dropped."""
        got = probe(self.pair.peer)
        want = {(dst, proto): ("6" if ":" in dst else "4") not in banned for dst, proto in ALL}
        late = [t for t, answers in want.items() if answers and not got[t]]
        if late:  # an echo a busy machine delayed past 0.5 s, or a real drop: ask again, slower
            got.update(probe(self.pair.peer, late, timeout=2.0))
        assert got == want, f"{self.backend}, {what}: answered {got}, expected {want}"


@pytest.fixture(params=list(BACKENDS))
def lab(request, tmp_path):
    backend = request.param
    tag = {"ipset-nft": "n", "ipset-legacy": "l", "nftables": "t"}[backend]
    with netns_pair(tag) as pair, listener(pair.server):
        yield Lab(pair, backend, tmp_path)


# -- packets -----------------------------------------------------------------------------------
@root
def test_ban_drops_then_unban_and_expiry_restore(lab: Lab):
    lab.expect(set(), "before any ban")

    def counted_down(timeout: float | None, full: float, since: float) -> bool:
        """A kernel timeout set to `full` seconds at some moment after `since` (the CLI's run and the
        packet checks in between take seconds on a loaded machine: the bound is what really elapsed)."""
        return timeout is not None and full - (time.time() - since) - 1 <= timeout <= full

    t0 = time.time()
    lab.cli("ban", PEER4, "--for", "10m")
    lab.cli("ban", PEER6, "--for", "permanent")
    lab.expect({"4", "6"}, "while banned")
    held = lab.entries()
    assert counted_down(held[PEER4], 600, t0) and held[PEER6] is None, held
    lab.cli("unban", PEER4)
    lab.expect({"6"}, "after unbanning the v4 address")
    lab.cli("unban", PEER6)
    lab.expect(set(), "after unbanning both")
    assert lab.entries() == {}

    both = lab.tmp / "both.txt"
    both.write_text(f"{PEER4}\n{PEER6}\n")
    lab.cli("ban", "--from-file", str(both), "--for", "4s")  # one batch: both timeouts start together
    t_banned = time.time()  # (after the CLI returned: the kernel's 4 s began before this)
    lab.expect({"4", "6"}, "during a 4 s ban")
    time.sleep(max(0.0, t_banned + 4.6 - time.time()))
    lab.expect(set(), "after the 4 s ban expired (kernel timeout, no daemon)")

    t0 = time.time()
    lab.cli("ban", "198.18.64.0/28", "--for", "1h", "--force")  # covers this host too: --force
    lab.cli("ban", "2001:db8:64::/120", "--for", "1h", "--force")
    lab.expect({"4", "6"}, "while the CIDRs are banned")
    held = lab.entries()
    assert counted_down(held["198.18.64.0/28"], 3600, t0) and counted_down(held["2001:db8:64::/120"], 3600, t0), held
    listing = {b["ip"]: b for b in json.loads(lab.cli("list", "--kernel", "--json").stdout)}
    assert counted_down(listing["198.18.64.0/28"]["kernel"]["timeout"], 3600, t0), listing
    lab.cli("unban", "--all")
    lab.expect(set(), "after unban --all")
    assert lab.entries() == {}


@root
def test_reject_action_and_single_ban_latency(lab: Lab):
    cfg_text = lab.config.read_text().replace("[enforce]\n", '[enforce]\naction = "REJECT"\n')
    lab.config.write_text(cfg_text)
    lab.cli("ban", PEER4, "--for", "1m")
    assert probe(lab.pair.peer, [(SERVER4, "udp")]) == {(SERVER4, "udp"): False}
    t = time.monotonic()
    got = probe(lab.pair.peer, [(SERVER4, "tcp")], timeout=3)
    assert got == {(SERVER4, "tcp"): False} and time.monotonic() - t < 2.5  # refused at once, not timed out
    lat = ns_call(lab.pair.server, _ban_latency, lab.backend, 50)
    print(f"\n{lab.backend}: single ban latency (median of 50) {lat * 1000:.2f} ms")
    assert lat < 0.05


# -- reconcile ---------------------------------------------------------------------------------
@root
def test_sync_repairs_flushed_sets_deleted_jump_and_removes_stale(lab: Lab):
    now = time.time()
    bans = [Ban(PEER4, "t", now, now + 300), Ban(PEER6, "t", now, None), Ban("198.18.100.0/24", "t", now, now + 900)]
    _ = ns_call(lab.pair.server, _sync, lab.backend, bans)
    lab.expect({"4", "6"}, "after the first sync")
    flush_sets(lab.backend, lab.pair.server)
    ns_call(lab.pair.server, _ban, lab.backend, [Ban("198.18.99.9", "stale", now, now + 300)])
    delete_jump(lab.backend, lab.pair.server)
    lab.expect(set(), "after flush + deleted jump")
    report = ns_call(lab.pair.server, _sync, lab.backend, bans)
    assert report.added == 3 and report.removed == 1 and report.repaired >= 1, report
    lab.expect({"4", "6"}, "after sync repaired everything")
    held = lab.entries()
    assert set(held) == {PEER4, PEER6, "198.18.100.0/24"}, held
    assert abs(held[PEER4] - (now + 300 - time.time())) <= 2 and held[PEER6] is None
    again = ns_call(lab.pair.server, _sync, lab.backend, bans)
    assert (again.added, again.removed, again.repaired) == (0, 0, 0), again


# -- bulk --------------------------------------------------------------------------------------
@root
def test_ban_from_file_100k(lab: Lab):
    bad = lab.tmp / "bad.txt"
    bad.write_text("# a comment\n198.18.1.1\n\n198.18.1.2  # trailing comment\nnot-an-address\n")
    p = lab.cli("ban", "--from-file", str(bad), check=False)
    assert p.returncode != 0 and f"{bad}:5:" in p.stderr, p.stderr
    assert lab.db() == {} and lab.entries() == {}  # nothing applied

    n = 100_000
    base = int.from_bytes(bytes([198, 18, 65, 0]), "big")  # 198.18.65.0 .. 198.19.199.157 (inside 198.18.0.0/15,
    # clear of the namespaces' own 198.18.64.x, which are allow-listed)
    f = lab.tmp / "many.txt"
    lines = ["# 100k sources"] + [".".join(str(b) for b in (base + i).to_bytes(4, "big")) for i in range(n - 2)]
    lines += ["2001:db8:77::1", "198.19.250.0/24"]
    f.write_text("\n".join(lines) + "\n")
    t = time.perf_counter()
    p = lab.cli("ban", "--from-file", str(f), "--for", "1h", timeout=180)
    took = time.perf_counter() - t
    print(f"\n{lab.backend}: ban --from-file {n} addresses: {took:.2f}s wall (CLI says: {p.stdout.strip()})")
    held = lab.entries()
    assert len(held) == n, len(held)
    # the kernel counts the hour down from the add, somewhere inside the CLI's run (slow on a loaded machine)
    assert 3600 - took - 3 <= held["198.19.250.0/24"] <= 3600, (held["198.19.250.0/24"], took)
    assert took < 30
    t = time.perf_counter()
    lab.cli("unban", "--all", timeout=180)
    print(f"{lab.backend}: unban --all of {n}: {time.perf_counter() - t:.2f}s")
    assert lab.entries() == {}


@root
def test_ban_from_file_and_import_of_ipv6_lists(lab: Lab):
    """IPv6 batches bigger than one netlink attribute holds (~1,489 entries) go in whole."""
    f = lab.tmp / "v6.txt"
    f.write_text("\n".join(ip for ip, _ in _v6(5_000, "2001:db8:500::")) + "\n")
    lab.cli("ban", "--from-file", str(f), "--for", "1h")
    g = lab.tmp / "list6.txt"
    g.write_text("\n".join(ip for ip, _ in _v6(4_000, "2001:db8:600::")) + "\n2001:db8:700::/48\n")
    lab.cli("import", str(g), "--list", "v6list")
    held = lab.entries()
    assert len(held) == 9_001 and "2001:db8:700::/48" in held, len(held)
    assert len(lab.db()) == 9_001

# -- the daemon --------------------------------------------------------------------------------
def _wait(cond, timeout: float, what: str, step: float = 0.2):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = cond()
        if last:
            return last
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last})")


@root
def test_daemon_sigkill_flush_restart_restores_every_ban(lab: Lab):
    lab.cli("ban", PEER4, "--for", "10m")
    lab.cli("ban", PEER6, "--for", "permanent")
    lab.cli("ban", "198.18.200.0/24", "--for", "30m")
    db = lab.db()

    def start() -> subprocess.Popen:
        env = {**os.environ}
        env.pop("SIPGUARD_CONFIG", None)
        return subprocess.Popen(
            ["ip", "netns", "exec", lab.pair.server, *CLI, "--config", str(lab.config), "--state-dir",
             str(lab.state), "run", "--log", str(lab.log)],
            stdout=subprocess.DEVNULL, stderr=open(lab.tmp / "daemon.err", "ab"), env=env, start_new_session=True)

    def running() -> bool:
        st = json.loads(lab.cli("status", "--json").stdout)
        return st["daemon"] == "running"

    procs = []
    try:
        d = start()
        procs.append(d)
        _wait(running, 30, "the daemon's first heartbeat")
        os.killpg(d.pid, signal.SIGKILL)
        d.wait(10)
        flush_sets(lab.backend, lab.pair.server)
        delete_jump(lab.backend, lab.pair.server)
        assert lab.entries() == {}
        lab.expect(set(), "daemon dead, sets flushed")
        d = start()
        procs.append(d)
        held = _wait(lambda: (lambda h: h if len(h) == 3 else None)(lab.entries()), 30, "bans restored")
        now = time.time()
        for ip, ban in db.items():
            if ban["expires"] is None:
                assert held[ip] is None, (ip, held)
            else:
                from datetime import datetime

                exp = datetime.fromisoformat(ban["expires"].replace("Z", "+00:00")).timestamp()
                assert abs(held[ip] - (exp - now)) <= 2.5, (ip, held[ip], exp - now)
        lab.expect({"4", "6"}, "after the restart restored the bans")
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)


# -- batches against the real kernel -------------------------------------------------------------
def _kernel_batches() -> dict:
    """In a fresh namespace: bulk adds with entries the kernel refuses in the middle, then syncs with
    entries every backend must refuse or the kernel refuses; what each reported and what it holds."""
    from sipguard.enforce.ipset import IpsetEnforcer

    e = IpsetEnforcer(_cfg("ipset-nft"))
    try:
        e.ensure()
        v6 = _v6(5_000, "2001:db8:6::")
        nets = [(f"198.18.{i}.0/24", 60) for i in range(200)]
        out = {
            "v6": e.nl.adt_many("sipguard-v6", v6[:2_500] + [("::", 60)] + v6[2_500:]),  # null: HASH_ELEM
            "net4": e.nl.adt_many("sipguard-net4", nets[:50] + [("0.0.0.0/0", 60)] + nets[50:]),  # bad CIDR
            "v4": e.nl.adt_many("sipguard-v4", [("198.18.0.1", 60), ("2001:db8::9", 60), ("198.18.0.2", 60)]),
        }
        held = {name: len(e.nl.dump(name)) for name in ("sipguard-v6", "sipguard-net4", "sipguard-v4")}
        return {"results": {k: (r.sent, sorted(ip for ip, _ in r.failed)) for k, r in out.items()}, "held": held}
    finally:
        e.close()


def _sync_with_refused(backend: str) -> tuple:
    from sipguard.enforce import make_enforcer

    now = time.time()
    good = [Ban(ip, "t", now, now + 600) for ip, _ in _v6(3_000, "2001:db8:7::")]
    good += [Ban(f"198.18.{i >> 8}.{i & 255}", "t", now, None) for i in range(1, 3_000)]
    bad = [Ban("fe80::1%eth0", "t", now, None)]  # a row no kernel takes (scoped address)
    if backend != "nftables":
        bad += [Ban("0.0.0.0/0", "t", now, None), Ban("::", "t", now, None)]
    e = make_enforcer(_cfg(backend))
    try:
        first = e.sync(good[:1_500] + bad + good[1_500:], now)
        again = e.sync(good[:1_500] + bad + good[1_500:], now)
        return first, again, len(e.entries()), sorted(ip for ip in (b.ip for b in bad) if e.refuses(ip))
    finally:
        e.close()


@root
def test_kernel_names_refused_entries_and_takes_the_rest():
    from tests.lab.netns import Netns

    with Netns(f"sge-{os.getpid() % 100000}-kb") as ns:
        got = ns_call(ns.name, _kernel_batches)
    assert got["results"] == {"v6": (5_000, ["::"]), "net4": (200, ["0.0.0.0/0"]), "v4": (2, ["2001:db8::9"])}, got
    assert got["held"] == {"sipguard-v6": 5_000, "sipguard-net4": 200, "sipguard-v4": 2}, got


@pytest.mark.parametrize("backend", ["ipset-nft", "nftables"])
@root
def test_sync_applies_everything_but_the_entries_refused(backend):
    from tests.lab.netns import Netns

    with Netns(f"sge-{os.getpid() % 100000}-s{backend[-1]}") as ns:
        first, again, held, refused = ns_call(ns.name, _sync_with_refused, backend, timeout=180)
    nbad = 1 if backend == "nftables" else 3
    assert held == 5_999 and first.added == 5_999 and first.failed == nbad, (first, held)
    assert refused == sorted({"fe80::1%eth0", "0.0.0.0/0", "::"} if nbad == 3 else {"fe80::1%eth0"})
    assert (again.added, again.removed, again.failed) == (0, 0, nbad), again  # refused from then on, not re-sent


# -- a restart into an empty kernel: 100,000 IPv6 and 100,000 IPv4 bans --------------------------
@contextlib.contextmanager
def run_daemon(lab: Lab, config: Path | None = None):
    """`sipguard run` in the server namespace (own session, stderr to daemon.err); stopped by its PID."""
    env = {**os.environ}
    env.pop("SIPGUARD_CONFIG", None)
    err = open(lab.tmp / "daemon.err", "ab")
    p = subprocess.Popen(["ip", "netns", "exec", lab.pair.server, *CLI, "--config", str(config or lab.config),
                          "--state-dir", str(lab.state), "run", "--log", str(lab.log)],
                         stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
    try:
        yield p
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        err.close()


def _counts(backend: str) -> dict[str, int]:
    """Members per set, read cheaply (set headers; nf_tables element dumps)."""
    if backend == "nftables":
        from sipguard.enforce.nftables import NftNetlink

        nl = NftNetlink("sipguard")
        try:
            return {s: nl.count(s, s.startswith("net")) for s in nl.sets()} if nl.has_table() else {}
        finally:
            nl.close()
    nl = IpsetNetlink()
    try:
        return {s: h.elements for s in ("v4", "v6", "net4", "net6") if (h := nl.header(f"sipguard-{s}"))}
    finally:
        nl.close()


def tool_counts(backend: str, ns: str) -> dict[str, int]:
    """The same counts as `ipset` / `nft` print them (independent of sipguard's own netlink code)."""
    out = {}
    for s in ("v4", "v6"):
        if backend == "nftables":
            data = json.loads(sh("nft", "-j", "list", "set", "inet", "sipguard", s, ns=ns).stdout)
            out[s] = sum(len(o["set"].get("elem", [])) for o in data["nftables"] if "set" in o)
        else:
            text = sh("ipset", "list", "-t", f"sipguard-{s}", ns=ns).stdout
            out[s] = int(text.split("Number of entries:")[1].split()[0])
    return out


@pytest.fixture(params=["ipset-nft", "nftables"])
def big_lab(request, tmp_path):
    with netns_pair({"ipset-nft": "R", "nftables": "S"}[request.param]) as pair:
        yield Lab(pair, request.param, tmp_path)


@root
def test_restart_into_an_empty_kernel_restores_100k_ipv6_and_100k_ipv4(big_lab: Lab):
    lab = big_lab
    n = 100_000
    now = time.time()
    v6 = [ip for ip, _ in _v6(n, "2001:db8:100::")]
    first4 = int(ipaddress.IPv4Address("198.18.100.0"))  # .. 198.19.234.159: inside 198.18.0.0/15
    v4 = [str(ipaddress.IPv4Address(first4 + i)) for i in range(n)]
    store = Store.open_state_dir(lab.state)
    with store.transaction():  # what a node held before a reboot emptied its kernel
        for i, ip in enumerate(v6 + v4):
            store.put_ban(Ban(ip, "flood", now - 60, None if i % 3 == 0 else now + 3600 + i % 600), now - 60)
    store.close()
    assert ns_call(lab.pair.server, _counts, lab.backend) == {}
    want = {"v4": n, "v6": n, "net4": 0, "net6": 0}
    t0 = time.monotonic()
    with run_daemon(lab) as d:
        _wait(lambda: ns_call(lab.pair.server, _counts, lab.backend) == want, 180, "200,000 bans in the kernel",
              step=0.25)
        took = time.monotonic() - t0
        assert d.poll() is None, "the daemon exited"
        assert tool_counts(lab.backend, lab.pair.server) == {"v4": n, "v6": n}
        print(f"\n{lab.backend}: restart into an empty kernel restored {2 * n} bans ({n} IPv6, {n} IPv4) "
              f"{took:.1f}s after the daemon was started")
        time.sleep(lab_check_interval() + 1.5)  # the first drift checks agree with what was restored
        assert d.poll() is None
    err = (lab.tmp / "daemon.err").read_text()
    assert "Traceback" not in err and "enforcer drift" not in err, err[-3000:]
    assert f"restored {2 * n} bans" in err, err[-2000:]


def lab_check_interval() -> float:
    from sipguard.config import EnforceConfig as _E

    return _E().check_interval
