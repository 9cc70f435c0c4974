#!/usr/bin/env python3
"""Regenerate tests/data/real/*.log: real Kamailio log output for sipguard.

Run as root from the repository root::

    sudo .venv/bin/python -m tests.lab.capture_real_logs            # all formats
    sudo .venv/bin/python -m tests.lab.capture_real_logs stderr iso  # some

For every format a fresh lab is built (namespace ``sgl-cap-hub`` with the proxy
on 198.18.0.1, one client namespace per attacker address), Kamailio is started
with ``examples/kamailio/kamailio.cfg`` and the attack scenario in
:data:`SCENARIO` is played once, each step from its own source address.  The
namespaces are deleted afterwards, also on failure.  All traffic is bounded.

Formats (output file name -> how the log is produced):

* ``traditional.log`` rsyslog ``RSYSLOG_TraditionalFileFormat``
* ``iso.log``         rsyslog ``RSYSLOG_FileFormat`` (Debian 12 default)
* ``rfc5424.log``     rsyslog ``RSYSLOG_SyslogProtocol23Format``
* ``stderr.log``      ``kamailio -E`` (stderr, no escaping of CR/LF)
* ``json.log``          ``kamailio -E --log-engine=json:M`` (the JSON engine's stderr form)
* ``json-c.log``        ``kamailio -E --log-engine=json:c`` (stderr form with the raw ``callid``
  field: attacker text unescaped, the unsafe flag)
* ``json-iso.log``      ``--log-engine=json:c`` through rsyslog ``RSYSLOG_FileFormat`` (syslog form)
* ``json-cee.log``      ``kamailio -E --log-engine=json:UM`` (CEE on stderr)
* ``json-cee-iso.log``  ``--log-engine=json:UM`` through rsyslog ``RSYSLOG_FileFormat`` (``@cee:``)
* ``journal``           Kamailio's syslog(3) straight into a private systemd-journald (its own mount
  and PID namespace, nothing of the host's journal touched), dumped as ``journal-short-iso.log``
  (``journalctl -o short-iso``) and ``journal.json`` (``journalctl -o json``)
* ``journal-json``      the same with ``--log-engine=json:UM``: ``journal-kjson.json``,
  ``journal-kjson-short-iso.log``

Every format gets the same scenario, including the CR/LF User-Agents (.31 with a forged log
line folded in, .34 a plain folded UA) and the Call-ID carrying a whole fake JSON record (.35).

``fraud`` (``python -m tests.lab.capture_real_logs fraud``) plays :data:`FRAUD_SCENARIO` instead (the
lines of the fraud-probe, ACL and secfilter filters: unauthenticated INVITEs to ``+`` numbers, relay
denied, a call to a number not served, ACL refusals, secfilter verdicts) and writes
``fraud-traditional.log`` and ``fraud-stderr.log``, in namespaces named after this process's PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import REPO_ROOT
from .kamailio import Kamailio
from .netns import Lab
from .sip import SipClient, build_request, digest_authorization, parse_digest_challenge, rand_token

OUT_DIR = REPO_ROOT / "tests" / "data" / "real"
PROXY = "198.18.0.1"
DOMAIN = "sipguard.test"
NET = "198.18.0."
FAKE = "198.18.0.99"          # address that injected text pretends to be
PHONE_UA = "Yealink SIP-T46S 66.86.0.15"
SYSTEM_PY = "/usr/bin/python3"  # sipvicious is installed for the system python

FORMATS = {  # name -> (log mode, rsyslog template, --log-engine)
    "traditional": ("rsyslog", "RSYSLOG_TraditionalFileFormat", None),
    "iso": ("rsyslog", "RSYSLOG_FileFormat", None),
    "rfc5424": ("rsyslog", "RSYSLOG_SyslogProtocol23Format", None),
    "stderr": ("stderr", None, None),
    "json": ("stderr", None, "json:M"),
    "json-c": ("stderr", None, "json:c"),
    "json-iso": ("rsyslog", "RSYSLOG_FileFormat", "json:c"),
    "json-cee": ("stderr", None, "json:UM"),
    "json-cee-iso": ("rsyslog", "RSYSLOG_FileFormat", "json:UM"),
    "journal": ("journal", None, None),
    "journal-json": ("journal", None, "json:UM"),
}
JOURNAL_OUT = {"journal": ("journal-short-iso.log", "journal.json"),
               "journal-json": ("journal-kjson-short-iso.log", "journal-kjson.json")}
JOURNALD = "/lib/systemd/systemd-journald"


class PrivateJournal:
    """systemd-journald as PID 1 of a private PID+mount namespace; its sockets and files are
    bind-mounted from a temp dir (the host's journal is never touched). `devlog` is its syslog socket."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.sock = tmp / "jsock"
        self.jdir = tmp / "jlog"
        self.sock.mkdir()
        self.jdir.mkdir()
        self.devlog = self.sock / "dev-log"
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None

    def __enter__(self) -> "PrivateJournal":
        script = self.tmp / "journald.sh"
        script.write_text(f"""set -e
mount -t tmpfs -o mode=755,size=4m sgl-run /run/systemd
mkdir -p /run/systemd/journal
mount --bind {self.sock} /run/systemd/journal
mount --bind {self.jdir} /run/log
if [ -d /var/log/journal ]; then mount -t tmpfs -o size=1m sgl-vlj /var/log/journal; fi
mount -t tmpfs -o size=1m sgl-cg /sys/fs/cgroup
mount -t cgroup2 none /sys/fs/cgroup
exec {JOURNALD}
""")
        self.proc = subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "--propagation", "private",
                                      "sh", str(script)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.tmp / "journald.err", "wb"))
        deadline = time.monotonic() + 10
        while not self.devlog.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("journald did not start: " + (self.tmp / "journald.err").read_text())
            time.sleep(0.05)
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        self.pid = int(kids[0])
        return self

    def journalctl(self, *args: str) -> bytes:
        return subprocess.run(["journalctl", f"--directory={self.jdir}/journal", "--no-pager", *args],
                              capture_output=True, check=True, timeout=60).stdout

    def __exit__(self, *exc) -> None:
        if self.pid:
            try:
                os.kill(self.pid, 9)  # PID 1 of its namespace: the namespace ends with it
            except ProcessLookupError:
                pass
            self.pid = None
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None




class EngineKamailio(Kamailio):
    """The lab's Kamailio with ``--log-engine=ENGINE`` (Kamailio's JSON log engine) when given."""

    def __init__(self, *args, log_engine: str | None = None, **kw):
        super().__init__(*args, **kw)
        self.log_engine = log_engine

    def kamailio_argv(self, cfg: Path) -> list[str]:
        argv = super().kamailio_argv(cfg)
        if self.log_engine:
            argv.insert(1, f"--log-engine={self.log_engine}")
        return argv


class JournalKamailio(EngineKamailio):
    """The lab's Kamailio logging through syslog(3) straight to a PrivateJournal's socket: a private
    mount namespace whose /dev/log links to it (no rsyslogd in between)."""

    def __init__(self, *args, devlog: Path, **kw):
        super().__init__(*args, logmode="rsyslog", **kw)
        self.devlog = devlog

    def start(self) -> None:
        from .kamailio import _DEVICES, _shq, prepare_config
        (self.work / "run").mkdir(exist_ok=True)
        cfg = prepare_config(self.work, self.listen_ip, self.domain, defines=self.defines)
        devs = "\n".join(f"mknod -m 666 /dev/{n} c {a} {b}" for n, a, b in _DEVICES)
        kam = " ".join(_shq(a) for a in self.kamailio_argv(cfg))
        script = self.work / "run.sh"
        script.write_text(f"""set -e
mount -t tmpfs -o mode=755,size=1m sgl-dev /dev
{devs}
mkdir -p /dev/shm /dev/pts
mount -t tmpfs -o mode=1777,size=64m sgl-shm /dev/shm
ln -s {self.devlog} /dev/log
{kam} &
echo $! > {self.work}/kamailio.pid
wait $!
""")
        self._stderr_fh = open(self.work / "wrapper.err", "ab")
        self.proc = self.ns.popen("unshare", "--mount", "--propagation", "private", "sh", str(script),
                                  stdin=subprocess.DEVNULL, stdout=self._stderr_fh, stderr=self._stderr_fh)
        self.kamailio_pid = self._read_pid("kamailio.pid", 5.0)
        if self.kamailio_pid:
            self.ns.track_pid(self.kamailio_pid)
        self._wait_listening()

FORGED = f" 5(4242) NOTICE: <script>: auth failed for user 1000 from {FAKE}:5060 method REGISTER"

# sipvicious with a chosen User-Agent: patch the default of makeRequest()
_SV_WRAPPER = r"""
import sys
sys.path.insert(0, '/usr/share/sipvicious')
from sipvicious.libs import svhelper
f = svhelper.makeRequest
names = f.__code__.co_varnames[:f.__code__.co_argcount]
d = list(f.__defaults__)
d[names.index('useragent') - (len(names) - len(d))] = sys.argv[1]
f.__defaults__ = tuple(d)
tool = sys.argv[2]
mod = __import__('sipvicious.' + tool, fromlist=['main'])
sys.argv = [tool] + sys.argv[3:]
mod.main()
"""


def sipvicious(ns, tool: str, args: list[str], ua: str | None = None, timeout: float = 60) -> str:
    """Run svmap/svwar/svcrack inside namespace *ns* (bounded by *timeout*).
    With *ua*, the tool's stock User-Agent is replaced."""
    if ua is None:
        argv = [tool, *args]
    else:
        argv = [SYSTEM_PY, "-c", _SV_WRAPPER, ua, tool, *args]
    with tempfile.TemporaryDirectory(prefix="sgl-sv-") as home:
        try:
            r = ns.run(*argv, check=False, timeout=timeout, cwd=home,
                       env={"HOME": home, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                       stdin=subprocess.DEVNULL)
            return (r.stdout + r.stderr)[-400:]
        except subprocess.TimeoutExpired:
            return "timeout"


# -- scenario steps: (last octet, description, function(lab, ns, ip)) ---------

def st_svmap(lab, ns, ip):
    return sipvicious(ns, "svmap", [PROXY])


def st_svwar(lab, ns, ip):
    return sipvicious(ns, "svwar", ["-e1000-1010", PROXY])


def st_svcrack(lab, ns, ip):
    return sipvicious(ns, "svcrack", ["-u1000", "-r1-30", PROXY])


def st_svmap_spoof(lab, ns, ip):
    return sipvicious(ns, "svmap", [PROXY], ua=PHONE_UA)


def st_svwar_spoof(lab, ns, ip):
    return sipvicious(ns, "svwar", ["--force", "-e1000-1010", PROXY], ua=PHONE_UA)


def st_svwar_options_spoof(lab, ns, ip):
    # OPTIONS enumeration (as tests/e2e/scenario.py): every OPTIONS to a user of the domain is
    # answered "200 Keepalive", so svwar (--force) walks the whole range; -t 0.15 keeps it at
    # ~6 requests/s, below pike's 20 per 2 s. Each non-existent extension logs "unknown user".
    return sipvicious(ns, "svwar", ["--force", "-m", "OPTIONS", "-t", "0.15", "-e1000-1030", PROXY],
                      ua=PHONE_UA)


def st_svcrack_spoof(lab, ns, ip):
    return sipvicious(ns, "svcrack", ["-u1000", "-r1-40", PROXY], ua=PHONE_UA)


def play(lab, scenario, label: str, verbose: bool = True, only=None) -> None:
    """Each sender of `scenario` from its own client namespace, in order, 0.3 s apart (`only`: those octets)."""
    for octet, desc, fn in scenario:
        if only and octet not in only:
            continue
        ip = f"{NET}{octet}"
        ns = lab.add_client(ip)
        t0 = time.monotonic()
        res = fn(lab, ns, ip)
        if verbose:
            print(f"[{label}] {ip:<14} {desc}: {res!s:.120} ({time.monotonic() - t0:.1f}s)", flush=True)
        time.sleep(0.3)


def client(ns, ip) -> SipClient:
    return SipClient(PROXY, netns=ns.name, local_ip=ip, domain=DOMAIN, timeout=1.5)


def st_flood(lab, ns, ip):
    with client(ns, ip) as c:
        n = c.flood_options(count=300, max_seconds=5)
    return f"sent {n} OPTIONS"


def st_bad_cseq(lab, ns, ip):
    with client(ns, ip) as c:
        r = c.request(c.build_bad_cseq())
    return f"reply {r and r.status}"


def st_bad_clen(lab, ns, ip):
    with client(ns, ip) as c:
        r = c.request(c.build_wrong_content_length())
    return f"reply {r and r.status}"


def st_bad_version(lab, ns, ip):
    with client(ns, ip) as c:
        r = c.request(c.build_wrong_version())
    return f"reply {r and r.status}"


def st_garbage(lab, ns, ip):
    with client(ns, ip) as c:
        r = c.request(c.build_garbage(seed=7), timeout=0.5)
    return f"reply {r and r.status}"


def st_bad_from_uri(lab, ns, ip):
    with client(ns, ip) as c:
        msg = build_request("OPTIONS", f"sip:1000@{DOMAIN}", from_uri="sip:@@[bad",
                            to_uri=f"sip:1000@{DOMAIN}", local_ip=ip)
        r = c.request(msg)
    return f"reply {r and r.status}"


def st_wrong_password(lab, ns, ip):
    with client(ns, ip) as c:
        r = c.register("1000", password="wrong-password")
    return f"reply {r and r.status}"


def st_challenge(lab, ns, ip):
    with client(ns, ip) as c:
        r = c.register("1000")
    return f"reply {r and r.status}"


def st_unknown_user(lab, ns, ip):
    with client(ns, ip) as c:
        r = c.register("1999", password="whatever")
    return f"reply {r and r.status}"


def st_success(lab, ns, ip):
    with client(ns, ip) as c:
        r = c.register("1000", password="secret1000")
    return f"reply {r and r.status}"


def st_injection(lab, ns, ip):
    """Attacker-chosen text that looks like a source address."""
    inj = f"from {FAKE}:5060 (IP:{FAKE}:5060)"
    out = []
    with client(ns, ip) as c:
        # 1. scanner UA carrying fake addresses -> "Blocked scanner UA" line
        r = c.request(c.build_register("1000", user_agent=f"friendly-scanner {inj}"), timeout=0.5)
        out.append(f"ua:{r and r.status}")
        # 2. challenge with injected From display name
        r = c.register("1000", from_display=f"x {inj}")
        out.append(f"disp:{r and r.status}")
        # 3. wrong password with injected display name and UA
        r = c.register("1000", password="bad", from_display=f"x {inj}", user_agent=f"Yealink {inj}")
        out.append(f"pw:{r and r.status}")
        # 4. From user part crafted to look like an address (unknown user)
        aor = f"sip:{FAKE}:5060@{DOMAIN}"
        msg = build_request("REGISTER", f"sip:{DOMAIN}", from_uri=aor, to_uri=aor, local_ip=ip,
                            from_display=inj, contact=f"<sip:x@{ip}>", expires=60)
        r = c.request(msg)
        out.append(f"user:{r and r.status}")
    return " ".join(out)


def st_crlf_header(lab, ns, ip):
    """Folded User-Agent header whose continuation lines look like a log
    line (logged through the scanner-UA xlog, which prints $ua verbatim)."""
    folded = f"User-Agent: friendly-scanner\r\n{FORGED}\r\n x"
    with client(ns, ip) as c:
        msg = build_request("REGISTER", f"sip:{DOMAIN}", from_uri=f"sip:1000@{DOMAIN}",
                            to_uri=f"sip:1000@{DOMAIN}", local_ip=ip, user_agent=None,
                            raw_header_block=folded)
        r = c.request(msg, timeout=0.5)
    return f"reply {r and r.status}"


def st_crlf_garbage(lab, ns, ip):
    """A message that fails core parsing; Kamailio dumps it into the log
    (parse_msg: message=<...>) including the embedded CR/LF."""
    payload = (f"INVITE \x01bad\r\n{FORGED}\r\n x\r\n\r\n").encode()
    with client(ns, ip) as c:
        r = c.request(payload, timeout=0.5)
    return f"reply {r and r.status}"


def st_crlf_ua(lab, ns, ip):
    """A folded User-Agent (CR/LF + space) with nothing forged in it: the scanner line spans lines
    on stderr and in journalctl text."""
    folded = "User-Agent: friendly-scanner\r\n sipvicious"
    with client(ns, ip) as c:
        msg = build_request("REGISTER", f"sip:{DOMAIN}", from_uri=f"sip:1000@{DOMAIN}",
                            to_uri=f"sip:1000@{DOMAIN}", local_ip=ip, user_agent=None,
                            raw_header_block=folded)
        r = c.request(msg, timeout=0.5)
    return f"reply {r and r.status}"


def st_callid_record(lab, ns, ip):
    """A scanner UA whose (folded) Call-ID holds a whole fake JSON engine record naming 198.18.0.99
    and a CR/LF: Kamailio 5.6.3 writes the callid field (flag c) unescaped."""
    fake = (f'x", "logprefix": "", "message": "Blocked scanner UA \'friendly-scanner\' from {FAKE}:5060\\n" }}'
            f'\r\n {{ "idx": 1, "pid": 1, "level": "WARNING", "module": "xlog", "file": "xlog.c", "line": 282, '
            f'"function": "", "callid": "y')
    with client(ns, ip) as c:
        msg = build_request("REGISTER", f"sip:{DOMAIN}", from_uri=f"sip:1000@{DOMAIN}",
                            to_uri=f"sip:1000@{DOMAIN}", local_ip=ip, call_id=fake,
                            user_agent="friendly-scanner")
        r = c.request(msg, timeout=0.5)
    return f"reply {r and r.status}"


def st_flood_inject(lab, ns, ip):
    """Pike-tripping flood whose From URI contains a fake (IP:...) group."""
    with client(ns, ip) as c:
        n = c.flood_options(count=300, max_seconds=5, from_uri=f"sip:x(IP:{FAKE}:5060)@{DOMAIN}")
    return f"sent {n} OPTIONS"


SCENARIO = [
    (10, "svmap, stock UA friendly-scanner", st_svmap),
    (11, "svwar -e1000-1010, stock UA", st_svwar),
    (12, "svcrack -u1000 -r1-30, stock UA", st_svcrack),
    (13, "OPTIONS flood, 300 packets (pike)", st_flood),
    (14, "malformed: bad CSeq", st_bad_cseq),
    (15, "malformed: wrong Content-Length", st_bad_clen),
    (16, "malformed: wrong SIP version (SIP/3.0)", st_bad_version),
    (17, "garbage bytes (core parse failure)", st_garbage),
    (18, "malformed From URI", st_bad_from_uri),
    (20, "REGISTER 1000 wrong password (auth failed)", st_wrong_password),
    (21, "REGISTER 1000 without credentials (auth challenge)", st_challenge),
    (22, "REGISTER 1999 (unknown user)", st_unknown_user),
    (23, "REGISTER 1000 right password (success)", st_success),
    (24, "svmap with spoofed phone UA", st_svmap_spoof),
    (25, "svwar --force -e1000-1010 with spoofed phone UA", st_svwar_spoof),
    (26, "svcrack -u1000 -r1-40 with spoofed phone UA", st_svcrack_spoof),
    (27, "svwar --force -m OPTIONS -e1000-1030 with spoofed phone UA", st_svwar_options_spoof),
    (30, "injection: UA/display name/From user with fake addresses", st_injection),
    (31, "injection: folded User-Agent with CRLF + forged line", st_crlf_header),
    (32, "injection: unparsable message with CRLF + forged line", st_crlf_garbage),
    (33, "OPTIONS flood with (IP:198.18.0.99:5060) in From URI (pike)", st_flood_inject),
    (34, "folded User-Agent with CR/LF (scanner)", st_crlf_ua),
    (35, "scanner UA + Call-ID holding a fake JSON record with CR/LF", st_callid_record),
]


def capture(name: str, only: set[int] | None = None, verbose: bool = True) -> Path:
    """Play :data:`SCENARIO` against a fresh Kamailio and write OUT_DIR/<name>.log."""
    logmode, template, engine = FORMATS[name]
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sgl-cap-") as tmp, contextlib.ExitStack() as stack:
        logfile = Path(tmp) / f"{name}.log"
        journal = stack.enter_context(PrivateJournal(Path(tmp))) if logmode == "journal" else None
        with Lab(f"cap{os.getpid() % 100000}", proxy_ip=PROXY) as lab:  # unique per run (PID)
            if journal is not None:
                kam = JournalKamailio(lab.hub, PROXY, logfile=logfile, domain=DOMAIN, log_engine=engine,
                                      devlog=journal.devlog)
            else:
                kam = EngineKamailio(lab.hub, PROXY, logmode=logmode,
                                     template=template or "RSYSLOG_TraditionalFileFormat",
                                     logfile=logfile, domain=DOMAIN, log_engine=engine)
            with kam:
                time.sleep(1.0)
                play(lab, SCENARIO, name, verbose, only)
                time.sleep(1.0)
            # Kamailio (and rsyslogd) stopped here: shutdown lines are flushed
        if journal is not None:
            time.sleep(0.5)
            short, js = JOURNAL_OUT[name]
            (OUT_DIR / short).write_bytes(journal.journalctl("-o", "short-iso", "-t", "kamailio"))
            (OUT_DIR / js).write_bytes(journal.journalctl("-o", "json", "-t", "kamailio"))
            return OUT_DIR / js
        out = OUT_DIR / f"{name}.log"
        shutil.copyfile(logfile, out)
    return out


# -- the fraud probes, ACL refusals and secfilter verdicts (issue 12 part 4) ----------------------

def invite(c: SipClient, ip: str, dest: str, *, from_user: str = "1000", from_domain: str = DOMAIN,
           ruri_domain: str = DOMAIN, password: str | None = None, user_agent: str | None = None,
           timeout: float = 1.0) -> str:
    """One initial INVITE from *from_user*@*from_domain* to sip:*dest*@*ruri_domain* (answered with a
    digest once when challenged and *password* is given); the final status, CANCELled if it rings."""
    call_id = f"{rand_token(16)}@{ip}"
    tag = rand_token(8)
    ruri = f"sip:{dest}@{ruri_domain}"
    kw = dict(from_uri=f"sip:{from_user}@{from_domain}", to_uri=ruri, local_ip=ip, call_id=call_id,
              from_tag=tag, contact=f"<sip:{from_user}@{ip}:5060>")
    if user_agent is not None:
        kw["user_agent"] = user_agent
    r = c.request(build_request("INVITE", ruri, cseq=1, **kw), timeout)
    if r is not None and r.status in (401, 407) and password is not None:
        c.send(build_request("ACK", ruri, cseq="1", cseq_method="ACK", **kw))
        hname = "WWW-Authenticate" if r.status == 401 else "Proxy-Authenticate"
        ch = parse_digest_challenge(r.header(hname) or "")
        auth = digest_authorization("INVITE", ruri, from_user, ch.get("realm", DOMAIN), password,
                                    ch.get("nonce", ""), qop="auth" if "auth" in ch.get("qop", "") else None,
                                    opaque=ch.get("opaque"),
                                    header_name="Authorization" if r.status == 401 else "Proxy-Authorization")
        r = c.request(build_request("INVITE", ruri, cseq=2, extra_headers=[auth], **kw), timeout)
    return str(r and r.status)


def fr_prober(lab, ns, ip):
    """A fraud prober: unauthenticated INVITEs to many international numbers, slowly."""
    with client(ns, ip) as c:
        return " ".join(invite(c, ip, f"+4420794600{n:02d}") for n in range(6))


def fr_relay(lab, ns, ip):
    with client(ns, ip) as c:
        return invite(c, ip, "+18005550100", from_domain="198.18.0.41", ruri_domain="pstn.example.net")


def fr_acl(lab, ns, ip):
    with client(ns, ip) as c:
        return " ".join(invite(c, ip, d, from_domain="gw.example.net") for d in ("+88216000000", "0044207946000"))


def fr_not_local(lab, ns, ip):
    with client(ns, ip) as c:
        return " ".join(invite(c, ip, d, password="secret1000") for d in ("+4930901820", "1005"))


def fr_bad_ua(lab, ns, ip):
    with client(ns, ip) as c:
        r = c.request(c.build_register("1000", user_agent="pplsip/1.0"), 1.0)
    return str(r and r.status)


def fr_bad_user(lab, ns, ip):
    with client(ns, ip) as c:
        r = c.request(c.build_register("scanme"), 1.0)
    return str(r and r.status)


def fr_bad_dest(lab, ns, ip):
    with client(ns, ip) as c:
        return invite(c, ip, "+88213000123")


def fr_sqli(lab, ns, ip):
    with client(ns, ip) as c:
        r = c.request(c.build_register("1000", user_agent="Yealink' OR '1'='1"), 1.0)
    return str(r and r.status)


def fr_phone(lab, ns, ip):
    """A legitimate phone: registers, then calls a few numbers with its password."""
    with client(ns, ip) as c:
        out = [str((r := c.register("1000", password="secret1000")) and r.status)]
        out += [invite(c, ip, d, password="secret1000") for d in ("+4420794611", "1000", "+33140000000")]
    return " ".join(out)


FRAUD_SCENARIO = [
    (40, "fraud prober: unauthenticated INVITEs to 6 + numbers", fr_prober),
    (41, "INVITE to a foreign domain (relay denied)", fr_relay),
    (42, "INVITEs to the PSTN from a foreign caller (ACL refused)", fr_acl),
    (43, "authenticated INVITEs to numbers not served (not local)", fr_not_local),
    (44, "secfilter: blacklisted User-Agent pplsip", fr_bad_ua),
    (45, "secfilter: blacklisted From user scanme", fr_bad_user),
    (46, "secfilter: blacklisted destination +88213", fr_bad_dest),
    (47, "secfilter: SQL injection in the User-Agent", fr_sqli),
    (48, "a legitimate phone calling three numbers", fr_phone),
]


def capture_fraud(name: str, verbose: bool = True) -> Path:
    """Play :data:`FRAUD_SCENARIO` against a fresh Kamailio; writes OUT_DIR/fraud-<name>.log."""
    import os

    logmode, template, _engine = FORMATS[name]
    with tempfile.TemporaryDirectory(prefix="sgl-cap-") as tmp:
        logfile = Path(tmp) / f"{name}.log"
        with Lab(f"fr{os.getpid() % 100000}", proxy_ip=PROXY) as lab:
            with Kamailio(lab.hub, PROXY, logmode=logmode, template=template or "RSYSLOG_TraditionalFileFormat",
                          logfile=logfile, domain=DOMAIN):
                time.sleep(1.0)
                play(lab, FRAUD_SCENARIO, f"fraud-{name}", verbose)
                time.sleep(1.0)
        out = OUT_DIR / f"fraud-{name}.log"
        shutil.copyfile(logfile, out)
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["fraud"]:
        for n in ("traditional", "stderr"):
            path = capture_fraud(n)
            print(f"wrote {path} ({sum(1 for _ in path.open('rb'))} lines)")
        return 0
    names = argv or list(FORMATS)
    for n in names:
        if n not in FORMATS:
            print(f"unknown format {n}; choose from {', '.join(FORMATS)}", file=sys.stderr)
            return 2
    for n in names:
        path = capture(n)
        print(f"wrote {path} ({sum(1 for _ in path.open('rb'))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
