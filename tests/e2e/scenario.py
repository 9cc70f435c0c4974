"""sipguard against a real Kamailio under real attack tools: one scenario, two entry points.

`tests/e2e/test_scenario.py` (pytest, run by `make test` as root) and `tests/e2e/demo.py`
(`make demo`) both call :func:`run_scenario`. Topology (all in network namespaces this module
creates and deletes, addresses in 198.18.0.0/15 only)::

    PREFIX-proxy   198.18.0.1 on bridge br0: Kamailio (examples/kamailio/kamailio.cfg) logging
                   through a private rsyslogd (RSYSLOG_FileFormat) to a file; `sipguard run`
                   follows it with the kernel enforcer ([enforce] backend = "auto"); the
                   baseline firewall (`sipguard firewall apply --force`) is applied there
    PREFIX-lab-cN  one attacker or the phone each, with one address, bridged to the proxy

Measurements: a packet tap on br0 (AF_PACKET, kernel timestamps) gives each source's first
packet and every reply the proxy sent; a watcher polls the kernel set (ipset, or the nft set)
and records when each address appeared. "Decisive" is the log line (rsyslog's microsecond
timestamp) that brought the source's score to its jail's threshold.

Nothing here touches the host's firewall, routes or interfaces; every loop is bounded in count
and time; only processes started here are stopped (by PID), and leftovers of an interrupted run
(namespaces with this run's prefix and the processes still inside them) are removed first.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tests.lab import NS_PREFIXES, REPO_ROOT
from tests.lab.capture_real_logs import _SV_WRAPPER, SYSTEM_PY, invite
from tests.lab.kamailio import Kamailio
from tests.lab.netns import Lab, Netns, in_netns, kill_pid, list_namespaces, run
from tests.lab.sip import SipClient, build_request

PROXY = "198.18.0.1"
DOMAIN = "sipguard.test"
FAKE = "198.18.0.99"                 # only ever appears inside injected text
PHONE_UA = "Zoiper rv2.10.20.1"      # what the "slowed" tools pretend to be
PHONE_IP = "198.18.0.50"
MAX_BAN_LATENCY = 2.0                # seconds, decisive packet -> address in the kernel set
SG_ARGV = [sys.executable, "-m", "sipguard"]

Echo = Callable[[str], None]
SCENARIO_PREFIXES = ("sge2e-", "sgdemo-")  # only this scenario makes namespaces with these
assert set(SCENARIO_PREFIXES) <= set(NS_PREFIXES)


# -- helpers -------------------------------------------------------------------------------------
def _ts() -> str:
    return time.strftime("%H:%M:%S")


def cleanup_stale(prefix: str, echo: Echo | None = None) -> list[str]:
    """Delete namespaces left by an interrupted run with this *prefix*, stopping (by PID) the
    processes still inside them: only this scenario creates namespaces with these prefixes."""
    if prefix not in SCENARIO_PREFIXES:
        raise ValueError(f"refusing to clean prefix {prefix!r}")
    gone = []
    for name in list_namespaces():
        if not name.startswith(prefix):
            continue
        pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
        for pid in pids:
            if pid.isdigit() and int(pid) != os.getpid():
                kill_pid(int(pid), timeout=3)
        run(["ip", "netns", "del", name], check=False)
        gone.append(name)
    if gone and echo:
        echo(f"cleaned up leftovers of an interrupted run: {', '.join(gone)}")
    return gone


def sipvicious(ns: Netns, tool: str, args: list[str], ua: str | None = None,
               timeout: float = 25) -> str:
    """Run svmap/svwar/svcrack in *ns* (bounded); *ua* replaces the stock User-Agent."""
    argv = [tool, *args] if ua is None else [SYSTEM_PY, "-c", _SV_WRAPPER, ua, tool, *args]
    with tempfile.TemporaryDirectory(prefix="sge2e-sv-") as home:
        # popen: the namespace tracks the process and stops it (by PID) if the run is interrupted
        proc = ns.popen(*argv, cwd=home, env={"HOME": home, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
            return out
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=5)
            return "(timed out)"


# -- packet tap ----------------------------------------------------------------------------------
SO_TIMESTAMPNS = 35
ETH_P_IP = 0x0800


class PacketTap(threading.Thread):
    """Records (time, src, dst, sport, dport) of every IPv4 UDP/TCP packet on br0 of the proxy
    namespace, incoming and outgoing, with the kernel's receive timestamp. AF_PACKET sees packets
    before netfilter, so packets the ban drops are seen too. Bounded: stops at *max_seconds* or
    *max_packets*."""

    def __init__(self, netns: str, ifname: str = "br0", max_seconds: float = 600,
                 max_packets: int = 500_000):
        super().__init__(daemon=True, name="packet-tap")
        with in_netns(netns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.bind((ifname, ETH_P_IP))
        self.sock.settimeout(0.2)
        self.packets: list[tuple[float, str, str, int, int]] = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.deadline = time.monotonic() + max_seconds
        self.max_packets = max_packets

    def run(self) -> None:
        try:
            while not self.stop_event.is_set() and time.monotonic() < self.deadline:
                if len(self.packets) >= self.max_packets:
                    break
                try:
                    data, anc, _flags, _addr = self.sock.recvmsg(256, socket.CMSG_SPACE(16))
                except (socket.timeout, BlockingIOError):
                    continue
                except OSError:
                    break
                ts = time.time()
                for level, typ, cdata in anc:
                    if level == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS and len(cdata) >= 16:
                        sec, nsec = struct.unpack("qq", cdata[:16])
                        ts = sec + nsec / 1e9
                if len(data) < 20 or data[0] >> 4 != 4:
                    continue
                ihl = (data[0] & 0x0F) * 4
                proto = data[9]
                src = socket.inet_ntoa(data[12:16])
                dst = socket.inet_ntoa(data[16:20])
                sport = dport = 0
                if proto in (6, 17) and len(data) >= ihl + 4:
                    sport, dport = struct.unpack("!HH", data[ihl:ihl + 4])
                with self.lock:
                    self.packets.append((ts, src, dst, sport, dport))
        finally:
            self.sock.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=2)

    def _select(self, pred) -> list[tuple[float, str, str, int, int]]:
        with self.lock:
            return [p for p in self.packets if pred(p)]

    def first_from(self, ip: str, after: float = 0.0) -> float | None:
        ts = [p[0] for p in self._select(lambda p: p[1] == ip and p[2] == PROXY and p[0] >= after)]
        return min(ts) if ts else None

    def count_from(self, ip: str, after: float = 0.0) -> int:
        return len(self._select(lambda p: p[1] == ip and p[2] == PROXY and p[0] > after))

    def count_to(self, ip: str, after: float = 0.0) -> int:
        return len(self._select(lambda p: p[1] == PROXY and p[2] == ip and p[0] > after))


# -- kernel watcher ------------------------------------------------------------------------------
_IPV4 = re.compile(r"\b(\d{1,3}(?:\.\d{1,3}){3}(?:/\d{1,2})?)\b")


def kernel_bans(netns: str) -> set[str]:
    """Addresses in sipguard's kernel sets in *netns*: ipset sipguard-*, else nft table sipguard."""
    r = run(["ip", "netns", "exec", netns, "ipset", "list", "-o", "save"], check=False, timeout=10)
    found: set[str] = set()
    have_sets = False
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "add" and parts[1].startswith("sipguard-"):
            found.add(parts[2])
        if len(parts) >= 2 and parts[0] == "create" and parts[1].startswith("sipguard-"):
            have_sets = True
    if have_sets:
        return found
    r = run(["ip", "netns", "exec", netns, "nft", "list", "table", "inet", "sipguard"],
            check=False, timeout=10)
    if r.returncode == 0:
        for block in re.findall(r"elements = \{([^}]*)\}", r.stdout):
            found.update(_IPV4.findall(block))
    return found


class KernelWatcher(threading.Thread):
    """Polls the kernel sets every *interval* and records when each address first appeared
    (the time the poll that saw it started: it was in the kernel by then or within ~10 ms)."""

    def __init__(self, netns: str, interval: float = 0.05, max_seconds: float = 600):
        super().__init__(daemon=True, name="kernel-watcher")
        self.netns = netns
        self.interval = interval
        self.deadline = time.monotonic() + max_seconds
        self.first_seen: dict[str, float] = {}
        self.current: set[str] = set()
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set() and time.monotonic() < self.deadline:
            t0 = time.time()
            try:
                now_in = kernel_bans(self.netns)
            except Exception:  # noqa: BLE001 - namespace going away at the end
                now_in = set()
            t1 = time.time()
            for ip in now_in - set(self.first_seen):
                self.first_seen[ip] = t1
            self.current = now_in
            self.stop_event.wait(max(0.0, self.interval - (t1 - t0)))

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=3)

    def wait_for(self, ip: str, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ip in self.first_seen:
                return self.first_seen[ip]
            time.sleep(0.02)
        return self.first_seen.get(ip)


# -- the legitimate phone ------------------------------------------------------------------------
PHONE_CALLS = ("+442079460123", "+33140000000", "+442079460123")
"""The international numbers the phone dials (with its password) during the attacks: it must stay
unbanned although the fraud jail counts distinct destinations (2 here, the jail bans at 5)."""


class Phone(threading.Thread):
    """A real phone: one REGISTER with a typo'd password, then the right one; then, for the whole
    scenario, a REGISTER every *reregister* seconds (challenge + answer, as phones do) and an OPTIONS
    keepalive every *keepalive* seconds, and a call to each of *calls* (authenticated INVITEs, from a
    second port, every *call_every* seconds). Records every request and whether it was answered."""

    def __init__(self, ns: Netns, ip: str, user: str = "1000", password: str = "secret1000",
                 reregister: float = 3.0, keepalive: float = 0.5, max_seconds: float = 300,
                 calls: tuple[str, ...] = PHONE_CALLS, call_every: float = 2.0):
        super().__init__(daemon=True, name="phone")
        self.ns, self.ip, self.user, self.password = ns, ip, user, password
        self.reregister, self.keepalive = reregister, keepalive
        self.calls, self.call_every = list(calls), call_every
        self.call_results: list[tuple[float, str, str]] = []  # (time, number, final status or "None")
        self.deadline = time.monotonic() + max_seconds
        self.stop_event = threading.Event()
        self.results: list[tuple[float, str, int | None]] = []  # (time, what, status or None)
        self.registered = threading.Event()
        self.error: str | None = None

    def _note(self, what: str, resp) -> None:
        self.results.append((time.time(), what, resp.status if resp is not None else None))

    def run(self) -> None:
        try:
            with SipClient(PROXY, netns=self.ns.name, local_ip=self.ip, domain=DOMAIN,
                           timeout=1.5) as c:
                # as real phones do: a quoted display name in From (the config's SQL-injection check
                # must look at user parts only, never at a whole header)
                self._note("REGISTER (typo)", c.register(self.user, password="secret100O", from_display="Front Desk",
                                                         user_agent="Yealink SIP-T46S 66.86.0.15"))
                r = c.register(self.user, password=self.password, from_display="Front Desk",
                               user_agent="Yealink SIP-T46S 66.86.0.15")
                self._note("REGISTER", r)
                if r is not None and r.status == 200:
                    self.registered.set()
                last_reg = last_call = time.monotonic()
                for _ in range(100_000):  # bounded; ends on stop or deadline
                    if self.stop_event.wait(self.keepalive) or time.monotonic() > self.deadline:
                        break
                    c.drain(max_packets=20, timeout=0.0)
                    if self.calls and time.monotonic() - last_call >= self.call_every:
                        last_call = time.monotonic()
                        number = self.calls.pop(0)
                        # its own socket: the call's reply retransmissions never reach the keepalives
                        with SipClient(PROXY, netns=self.ns.name, local_ip=self.ip, local_port=5070,
                                       domain=DOMAIN, timeout=1.5) as cc:
                            self.call_results.append((time.time(), number, invite(
                                cc, self.ip, number, from_user=self.user, password=self.password,
                                user_agent="Yealink SIP-T46S 66.86.0.15", timeout=1.5)))
                    elif time.monotonic() - last_reg >= self.reregister:
                        last_reg = time.monotonic()
                        self._note("REGISTER", c.register(
                            self.user, password=self.password, user_agent="Yealink SIP-T46S 66.86.0.15"))
                    else:
                        self._note("OPTIONS", c.options(user_agent="Yealink SIP-T46S 66.86.0.15"))
        except Exception as exc:  # noqa: BLE001 - reported, fails the scenario
            self.error = repr(exc)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)

    @property
    def unanswered(self) -> list[tuple[float, str, int | None]]:
        return [r for r in self.results if r[2] is None]


# -- attacks ------------------------------------------------------------------------------------
@dataclass
class Attack:
    key: str
    ip: str
    title: str
    jail: str                 # the jail expected to ban it ("" = must NOT be banned)
    threshold: int            # events of that jail's kinds needed
    kinds: tuple[str, ...]    # event kinds that count (from sipguard's filters)
    run: Callable[["Scenario", Netns, str], str]
    # measured
    output: str = ""
    started: float = 0.0
    finished: float = 0.0
    first_packet: float | None = None
    decisive: float | None = None
    kernel: float | None = None
    reason: str = ""
    events: dict[str, int] = field(default_factory=dict)
    proof: str = ""

    @property
    def latency_first(self) -> float | None:
        if self.kernel is None or self.first_packet is None:
            return None
        return self.kernel - self.first_packet

    @property
    def latency_decisive(self) -> float | None:
        if self.kernel is None or self.decisive is None:
            return None
        return self.kernel - self.decisive


def _client(ns: Netns, ip: str, timeout: float = 1.0) -> SipClient:
    return SipClient(PROXY, netns=ns.name, local_ip=ip, domain=DOMAIN, timeout=timeout)


def a_svmap(sc: "Scenario", ns: Netns, ip: str) -> str:
    return sipvicious(ns, "svmap", ["-t", "0.5", PROXY], timeout=20)


def a_svwar(sc: "Scenario", ns: Netns, ip: str) -> str:
    return sipvicious(ns, "svwar", ["-e1000-1010", PROXY], timeout=20)


def a_svcrack(sc: "Scenario", ns: Netns, ip: str) -> str:
    return sipvicious(ns, "svcrack", ["-u1000", "-r1-30", PROXY], timeout=20)


def a_svwar_spoofed(sc: "Scenario", ns: Netns, ip: str) -> str:
    # OPTIONS enumeration: the example config answers every OPTIONS to a user of its domain with
    # the same "200 Keepalive" (nothing leaks), so svwar goes through the whole range; -t 0.15
    # paces it at ~6 requests/s, below pike's 20 per 2 s.
    return sipvicious(ns, "svwar", ["--force", "-m", "OPTIONS", "-t", "0.15", "-e1000-1030", PROXY],
                      ua=PHONE_UA, timeout=25)


def a_svcrack_spoofed(sc: "Scenario", ns: Netns, ip: str) -> str:
    return sipvicious(ns, "svcrack", ["-u1000", "-r1-40", "-t", "0.15", PROXY], ua=PHONE_UA, timeout=25)


def a_flood(sc: "Scenario", ns: Netns, ip: str) -> str:
    # From URI carries a fake "(IP:...)" group: pike's line must still ban the real sender
    with _client(ns, ip) as c:
        n = c.flood_options(count=300, max_seconds=3, from_uri=f"sip:x(IP:{FAKE}:5060)@{DOMAIN}")
    return f"sent {n} OPTIONS"


def a_malformed(sc: "Scenario", ns: Netns, ip: str) -> str:
    out = []
    with _client(ns, ip, timeout=0.3) as c:
        builders = [c.build_bad_cseq, c.build_wrong_content_length, c.build_wrong_version] * 2
        for b in builders:
            r = c.request(b())
            out.append(str(r.status) if r else "-")
            time.sleep(0.05)
    return "replies: " + " ".join(out)


def a_sip_version(sc: "Scenario", ns: Netns, ip: str) -> str:
    out = []
    with _client(ns, ip, timeout=0.3) as c:
        for _ in range(6):
            r = c.request(c.build_wrong_version())
            out.append(str(r.status) if r else "-")
            time.sleep(0.05)
    return "replies: " + " ".join(out)


def a_injection(sc: "Scenario", ns: Netns, ip: str) -> str:
    inj = f"from {FAKE}:5060 (IP:{FAKE}:5060)"
    out = []
    with _client(ns, ip) as c:
        r = c.register("1000", from_display=f"x {inj}", user_agent=f"Yealink {inj}")
        out.append(f"challenge:{r and r.status}")
        r = c.register("1000", password="bad", from_display=f"x {inj}", user_agent=f"Yealink {inj}")
        out.append(f"wrong-password:{r and r.status}")
        aor = f"sip:{FAKE}:5060@{DOMAIN}"
        msg = build_request("REGISTER", f"sip:{DOMAIN}", from_uri=aor, to_uri=aor, local_ip=ip,
                            from_display=inj, contact=f"<sip:x@{ip}>", expires=60,
                            user_agent=f"Zoiper {inj}")
        r = c.request(msg)
        out.append(f"fake-user:{r and r.status}")
        r = c.request(c.build_register("1000", user_agent=f"friendly-scanner {inj}"), timeout=0.5)
        out.append(f"scanner-ua:{r and r.status}")
    return " ".join(out)


def a_crlf_ua(sc: "Scenario", ns: Netns, ip: str) -> str:
    """A scanner whose User-Agent is a folded header: a CR/LF inside it, and a forged log line naming
    198.18.0.99 on its continuation (issue 12: the whole record is matched, its end names the sender)."""
    folded = (f"User-Agent: friendly-scanner\r\n 5(4242) NOTICE: <script>: auth failed for user 1000 from "
              f"{FAKE}:5060 method REGISTER\r\n sipvicious")
    with _client(ns, ip) as c:
        msg = build_request("REGISTER", f"sip:{DOMAIN}", from_uri=f"sip:1000@{DOMAIN}", to_uri=f"sip:1000@{DOMAIN}",
                            local_ip=ip, user_agent=None, raw_header_block=folded)
        r = c.request(msg, timeout=0.5)
    return f"crlf-ua:{r and r.status}"


FRAUD_NUMBERS = tuple(f"+88216{n:06d}" if n % 3 == 0 else f"+4420794{n:05d}" for n in range(8))


def a_fraud(sc: "Scenario", ns: Netns, ip: str) -> str:
    """A toll-fraud prober: unauthenticated INVITEs (From a real user, no password) to eight different
    international numbers, slowly (one every 0.6 s: 8 probe events, under the probe jail's 10); only
    the distinct jail (distinct destinations) sees it. Once banned, its INVITEs go unanswered."""
    out = []
    with _client(ns, ip, timeout=0.4) as c:
        for number in FRAUD_NUMBERS:
            out.append(invite(c, ip, number, timeout=0.4))
            time.sleep(0.6)
    return "fraud:" + " ".join(out)


def attacks() -> list[Attack]:
    n = "198.18.0."
    return [
        Attack("svmap", n + "10", "svmap scan (stock User-Agent)", "scanner", 1, ("scanner",), a_svmap),
        Attack("svwar", n + "11", "svwar -e1000-1010 (stock User-Agent)", "scanner", 1, ("scanner",), a_svwar),
        Attack("svcrack", n + "12", "svcrack -u1000 -r1-30 (stock User-Agent)", "scanner", 1, ("scanner",),
               a_svcrack),
        Attack("flood", n + "13", "OPTIONS flood, 300 packets, fake (IP:198.18.0.99) in From", "flood", 1,
               ("flood",), a_flood),
        Attack("malformed", n + "14", "malformed: bad CSeq, wrong Content-Length, SIP/3.0", "malformed", 5,
               ("malformed",), a_malformed),
        Attack("sipversion", n + "15", "malformed: request line SIP/3.0 only", "malformed", 5,
               ("malformed",), a_sip_version),
        Attack("svwar-spoofed", n + "16", f"svwar -m OPTIONS as '{PHONE_UA}', ~6 req/s", "probe", 10,
               ("probe",), a_svwar_spoofed),
        Attack("svcrack-spoofed", n + "17", f"svcrack -u1000 as '{PHONE_UA}', ~6 req/s", "auth", 3,
               ("auth_failure",), a_svcrack_spoofed),
        Attack("injection", n + "18", f"fake '{FAKE}' in User-Agent / From display name / From user",
               "scanner", 1, ("scanner",), a_injection),
        Attack("crlf-ua", n + "19", f"scanner User-Agent with a CR/LF and a forged line naming '{FAKE}'",
               "scanner", 1, ("scanner",), a_crlf_ua),
        Attack("fraud", n + "20", "toll-fraud prober: unauthenticated INVITEs to 8 + numbers, 1 per 0.6 s",
               "fraud", 5, ("dial",), a_fraud),
    ]


# -- the scenario -------------------------------------------------------------------------------
FRAUD_JAIL = """\
# distinct destinations dialled from one source (README: fraud probes)
[policy.jails.fraud]
kinds = ["dial", "probe"]
distinct = "dest"
prefixes = ["+", "00"]
findtime = "1h"
threshold = 5
"""

SG_CONFIG = """\
# sipguard config of the e2e scenario: defaults everywhere except where the files are
state_dir = "{state}"

[sources]
logs = ["{log}"]
from_start = true

[enforce]
backend = "auto"

""" + FRAUD_JAIL + """
[firewall]
public_interface = "any"
sip_udp = [5060]
sip_tcp = [5060]
management_cidrs = []
"""


@dataclass
class Result:
    attacks: list[Attack]
    phone_results: list[tuple[float, str, int | None]]
    phone_error: str | None
    phone_calls: list[tuple[float, str, str]]
    phone_banned: bool
    fake_banned: bool
    bans: list[dict]
    kernel_final: set[str]
    counters: str
    firewall: str
    backend: str
    durations: dict[str, float]
    second_svmap: str
    log_lines: int
    problems: list[str]


class Scenario:
    """Build the lab, run everything, tear it down. Use as a context manager."""

    def __init__(self, prefix: str = "sge2e-", echo: Echo = print, keep: bool = False):
        if prefix not in SCENARIO_PREFIXES:
            raise ValueError("prefix must be sge2e- or sgdemo-")
        self.prefix = prefix
        self.echo = echo
        self.keep = keep
        self.work = Path(tempfile.mkdtemp(prefix=f"{prefix}work-"))
        self.logfile = self.work / "kamailio.log"
        self.state = self.work / "state"
        self.cfgfile = self.work / "sipguard.toml"
        self.sg_out = self.work / "sipguard.out"
        self.lab: Lab | None = None
        self.kam: Kamailio | None = None
        self.sg_proc: subprocess.Popen | None = None
        self.tap: PacketTap | None = None
        self.watcher: KernelWatcher | None = None
        self.phone: Phone | None = None
        self._closed = False
        self.t0 = time.monotonic()

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> "Scenario":
        atexit.register(self.close)
        try:
            self.setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def proxy(self) -> Netns:
        assert self.lab is not None
        return self.lab.hub

    def sg(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """`sipguard --config C --state-dir S ARGS` inside the proxy namespace."""
        return self.proxy.run(*SG_ARGV, "--config", str(self.cfgfile), "--state-dir", str(self.state),
                              *args, check=check, timeout=timeout, cwd=str(REPO_ROOT))

    def setup(self) -> None:
        cleanup_stale(self.prefix, self.echo)
        self.state.mkdir(parents=True)
        self.cfgfile.write_text(SG_CONFIG.format(state=self.state, log=self.logfile))
        self.lab = Lab("lab", proxy_ip=PROXY, prefix=self.prefix, hub_name=f"{self.prefix}proxy")
        self.lab.__enter__()
        self.echo(f"[{_ts()}] namespace {self.proxy.name}: proxy {PROXY} on bridge br0")
        # the baseline firewall first: the proxy namespace is a real, locked-down SIP edge
        r = self.sg("firewall", "apply", "--force")
        self.firewall_msg = (r.stdout + r.stderr).strip()
        self.echo(f"[{_ts()}] baseline firewall applied in {self.proxy.name} (INPUT policy DROP; "
                  "SIP 5060/udp+tcp open)")
        self.kam = Kamailio(self.proxy, PROXY, logmode="rsyslog", template="RSYSLOG_FileFormat",
                            logfile=self.logfile, domain=DOMAIN)
        self.kam.start()
        self.echo(f"[{_ts()}] Kamailio 5.6 running ({self.kam.kamailio_pid}), logging via a private "
                  f"rsyslogd to {self.logfile}")
        self.sg_fh = open(self.sg_out, "ab")
        self.sg_proc = self.proxy.popen(*SG_ARGV, "--config", str(self.cfgfile), "--state-dir",
                                        str(self.state), "run", stdin=subprocess.DEVNULL,
                                        stdout=self.sg_fh, stderr=self.sg_fh, cwd=str(REPO_ROOT))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.sg_proc.poll() is not None:
                raise RuntimeError(f"sipguard run exited: {self.sg_out.read_text()[-2000:]}")
            if "following" in self.sg_out.read_text(errors="replace"):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"sipguard run did not start: {self.sg_out.read_text()[-2000:]}")
        self.echo(f"[{_ts()}] sipguard run (pid {self.sg_proc.pid}) follows the log inside "
                  f"{self.proxy.name}, enforcer backend \"auto\"")
        self.tap = PacketTap(self.proxy.name)
        self.tap.start()
        self.watcher = KernelWatcher(self.proxy.name)
        self.watcher.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for t in (self.phone, self.watcher, self.tap):
            if t is not None:
                try:
                    t.stop()
                except Exception:  # noqa: BLE001
                    pass
        if self.kam is not None:
            try:
                self.kam.stop()
            except Exception:  # noqa: BLE001
                pass
        if self.lab is not None:
            self.lab.close()  # stops sipguard (tracked PID) and deletes every namespace
        if getattr(self, "sg_fh", None):
            self.sg_fh.close()
        if not self.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        try:
            atexit.unregister(self.close)
        except Exception:  # noqa: BLE001
            pass

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> Result:
        assert self.lab is not None and self.tap is not None and self.watcher is not None
        durations: dict[str, float] = {"setup": time.monotonic() - self.t0}
        problems: list[str] = []
        # the legitimate phone first: registered before the attacks and active throughout
        phone_ns = self.lab.add_client(PHONE_IP)
        self.phone = Phone(phone_ns, PHONE_IP)
        self.phone.start()
        if not self.phone.registered.wait(8):
            problems.append(f"the phone could not register: {self.phone.results} {self.phone.error}")
        self.echo(f"[{_ts()}] phone {PHONE_IP} (user 1000) registered after one typo; it re-registers "
                  "every 3 s and sends an OPTIONS keepalive every 0.5 s from now on")
        atts = attacks()
        nss = {a.key: self.lab.add_client(a.ip) for a in atts}
        self.echo(f"[{_ts()}] {len(atts)} attackers start at once, each from its own address")
        t_att = time.monotonic()
        threads = []
        for a in atts:
            def go(a=a):
                a.started = time.time()
                try:
                    a.output = a.run(self, nss[a.key], a.ip)
                except Exception as exc:  # noqa: BLE001
                    a.output = f"error: {exc!r}"
                a.finished = time.time()
            t = threading.Thread(target=go, daemon=True, name=a.key)
            t.start()
            threads.append(t)
        for t in threads:
            t.join(timeout=40)
        for a in atts:
            a.kernel = self.watcher.wait_for(a.ip, timeout=3)
        durations["attacks"] = time.monotonic() - t_att

        # proof that banned sources are now dropped: a plain phone-like OPTIONS gets no answer
        t_proof = time.monotonic()
        proof_threads = []

        def probe(a: Attack) -> None:
            with _client(nss[a.key], a.ip, timeout=1.0) as c:
                r = c.options(user_agent="Yealink SIP-T46S 66.86.0.15")
            a.proof = "no reply" if r is None else f"REPLY {r.status}"
        for a in atts:
            t = threading.Thread(target=probe, args=(a,), daemon=True)
            t.start()
            proof_threads.append(t)
        svmap_ns = nss["svmap"]
        # svmap again from the banned scanner, now even posing as a phone (which an unbanned
        # source gets answered: "200 Keepalive"): the kernel drops it before Kamailio sees it
        second_svmap = sipvicious(svmap_ns, "svmap", ["-t", "0.5", PROXY], ua=PHONE_UA, timeout=20)
        for t in proof_threads:
            t.join(timeout=5)
        durations["proof"] = time.monotonic() - t_proof
        # let the phone run a little longer with every attacker banned
        time.sleep(1.0)
        self.phone.stop()

        # what sipguard and the kernel hold now
        bans = json.loads(self.sg("list", "--json").stdout or "[]")
        by_ip = {b["ip"]: b for b in bans}
        kernel_final = kernel_bans(self.proxy.name)
        counters = self.proxy.run("iptables", "-w", "-n", "-v", "-L", "SIPGUARD", check=False).stdout
        if not counters.strip():
            counters = self.proxy.run("nft", "list", "table", "inet", "sipguard", check=False).stdout
        backend = "ipset + iptables" if "match-set" in counters else \
            ("nftables" if "table inet" in counters else "?")
        fw = self.sg("firewall", "show", check=False)
        time.sleep(0.3)  # let rsyslog flush the last lines

        # decisive log lines, by sipguard's own parser and filters
        events = log_events(self.logfile)
        for a in atts:
            a.first_packet = self.tap.first_from(a.ip, after=a.started - 1)
            a.reason = by_ip.get(a.ip, {}).get("reason", "")
            mine = [(t, k) for (t, ip, k) in events if ip == a.ip]
            for _t, k in mine:
                a.events[k] = a.events.get(k, 0) + 1
            counted = [t for (t, k) in mine if k in a.kinds]
            if len(counted) >= a.threshold:
                a.decisive = counted[a.threshold - 1]
            a.proof += (f"; after the ban: {self.tap.count_from(a.ip, a.kernel)} packets from it dropped, "
                        f"{self.tap.count_to(a.ip, a.kernel)} replies to it") if a.kernel else ""
        phone_banned = PHONE_IP in by_ip or PHONE_IP in self.watcher.first_seen
        fake_banned = FAKE in by_ip or any(ip.startswith(FAKE) for ip in self.watcher.first_seen)
        log_lines = sum(1 for _ in self.logfile.open("rb"))
        durations["total"] = time.monotonic() - self.t0
        return Result(atts, list(self.phone.results), self.phone.error, list(self.phone.call_results),
                      phone_banned, fake_banned, bans,
                      kernel_final, counters, fw.stdout, backend, durations, second_svmap, log_lines,
                      problems)


def log_events(logfile: Path) -> list[tuple[float, str, str]]:
    """(log time, source address, event kind) of every line sipguard's shipped filters match."""
    from sipguard.filters import FilterSet
    from sipguard.formats import RecordParser
    from sipguard.config import SHIPPED_FILTERS
    from sipguard.pipeline import Pipeline
    from sipguard.sources import read_file

    fs = FilterSet.load([SHIPPED_FILTERS])
    out = []
    for rec in Pipeline(RecordParser("auto"), fs).records(read_file(str(logfile))):
        ev = fs.match(rec, time.time())
        if ev is not None and rec.time is not None:
            out.append((rec.time, ev.ip, ev.kind.value))
    return out


# -- checks and report -----------------------------------------------------------------------
def check(res: Result) -> list[str]:
    """Everything that must hold; returns the failures (empty = pass)."""
    bad = list(res.problems)
    for a in res.attacks:
        if a.kernel is None:
            bad.append(f"{a.key} ({a.ip}) was never banned in the kernel; events {a.events}; "
                       f"tool said: {a.output[-300:]!r}")
            continue
        if a.jail and not a.reason.startswith(a.jail + ":"):
            bad.append(f"{a.key} ({a.ip}) banned by {a.reason!r}, expected jail {a.jail}")
        lat = a.latency_decisive
        if lat is None:
            bad.append(f"{a.key} ({a.ip}): no decisive log line found (events {a.events})")
        elif lat > MAX_BAN_LATENCY:
            bad.append(f"{a.key} ({a.ip}): ban took {lat:.2f}s after the decisive packet (> {MAX_BAN_LATENCY}s)")
        if a.threshold == 1 and a.latency_first is not None and a.latency_first > MAX_BAN_LATENCY \
                and a.key != "flood":
            bad.append(f"{a.key} ({a.ip}): ban took {a.latency_first:.2f}s after its first packet")
        if not a.proof.startswith("no reply"):
            bad.append(f"{a.key} ({a.ip}) still answered after its ban: {a.proof}")
        if a.kernel and ", 0 replies" not in a.proof:
            bad.append(f"{a.key} ({a.ip}) got replies after its ban: {a.proof}")
    if res.phone_banned:
        bad.append(f"the legitimate phone {PHONE_IP} was banned")
    if len(res.phone_calls) != len(PHONE_CALLS) or any(st == "None" for _t, _n, st in res.phone_calls):
        bad.append(f"the phone's calls were not all answered: {res.phone_calls}")
    if res.phone_error:
        bad.append(f"phone error: {res.phone_error}")
    unanswered = [r for r in res.phone_results if r[2] is None]
    if unanswered:
        bad.append(f"{len(unanswered)} of the phone's {len(res.phone_results)} requests got no answer: "
                   f"{unanswered[:5]}")
    if len(res.phone_results) < 10:
        bad.append(f"the phone sent only {len(res.phone_results)} requests")
    wrong = [r for r in res.phone_results[1:] if r[2] not in (200,)]
    if wrong:
        bad.append(f"phone requests not answered 200: {wrong[:5]}")
    if res.fake_banned:
        bad.append(f"{FAKE} (only ever named inside attacker text) was banned")
    if "found nothing" not in res.second_svmap:
        bad.append(f"svmap from the banned 198.18.0.10 still found the proxy: {res.second_svmap[-300:]!r}")
    return bad


def report(res: Result, echo: Echo = print) -> None:
    """The narrated report: what attacked, what sipguard saw and banned and when, the proof."""
    echo("")
    echo("What attacked, what sipguard saw, and when the kernel started dropping it")
    echo("(latency = address in the kernel set minus the attack's first packet / minus the packet")
    echo(" that completed the evidence; times from a packet tap on the proxy's bridge)")
    echo("")
    hdr = f"{'source':<13} {'attack':<58} {'events seen':<26} {'banned by':<26} {'1st pkt':>8} {'decisive':>8}"
    echo(hdr)
    echo("-" * len(hdr))
    for a in res.attacks:
        ev = ", ".join(f"{v} {k}" for k, v in sorted(a.events.items())) or "-"
        lf = f"{a.latency_first:.3f}s" if a.latency_first is not None else "-"
        ld = f"{a.latency_decisive:.3f}s" if a.latency_decisive is not None else "-"
        echo(f"{a.ip:<13} {a.title[:58]:<58} {ev[:26]:<26} {(a.reason or 'NOT BANNED')[:26]:<26} {lf:>8} {ld:>8}")
    echo("")
    echo("After the bans (a plain OPTIONS from each banned address, and the packet tap):")
    for a in res.attacks:
        echo(f"  {a.ip:<13} {a.key:<16} {a.proof}")
    s = res.second_svmap.strip().splitlines()
    echo(f"  svmap again from 198.18.0.10, as '{PHONE_UA}': {(s[-1] if s else '(no output)')[:100]}")
    echo("")
    echo(f"Kernel ({res.backend}) rules in the proxy namespace, with packet counters:")
    for line in res.counters.strip().splitlines()[:12]:
        echo("  " + line)
    ph = res.phone_results
    ok = sum(1 for r in ph if r[2] == 200)
    echo("")
    echo(f"Legitimate phone {PHONE_IP}: {len(ph)} requests during the attacks "
         f"({sum(1 for r in ph if r[1] == 'OPTIONS')} OPTIONS, "
         f"{sum(1 for r in ph if r[1].startswith('REGISTER'))} REGISTER incl. the typo), "
         f"{ok} answered 200, {sum(1 for r in ph if r[2] is None)} unanswered; "
         f"banned: {'YES' if res.phone_banned else 'no'}")
    echo(f"  its calls (authenticated, the numbers are not served here): "
         f"{', '.join(f'{n} -> {st}' for _t, n, st in res.phone_calls) or 'none'}")
    echo(f"{FAKE} (written into User-Agent/From by an attacker): banned: {'YES' if res.fake_banned else 'no'}")
    d = res.durations
    echo(f"Kamailio wrote {res.log_lines} log lines. Setup {d.get('setup', 0):.1f}s, attacks "
         f"{d.get('attacks', 0):.1f}s, proof {d.get('proof', 0):.1f}s, total {d.get('total', 0):.1f}s.")


def run_scenario(prefix: str = "sge2e-", echo: Echo = print, keep: bool = False) -> tuple[Result, list[str]]:
    """Build, run, measure, tear down. Returns the result and the list of failed checks."""
    with Scenario(prefix=prefix, echo=echo, keep=keep) as sc:
        res = sc.run()
    return res, check(res)


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP end the run through the normal cleanup path (finally blocks, atexit)."""
    def _raise(signum, _frame):
        raise SystemExit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)
