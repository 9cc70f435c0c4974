"""examples/kamailio/kamailio.cfg on Kamailio 5.6 and 6.0: it loads, and it emits the log contract (issue 13).

As root, for each version (the new test of `make test`; it never skips where root is, like
tests/test_installed.py, and builds the Debian 13 root with packaging/rootfs.py when it is not cached):

* **5.6.3**, the host's Debian 12 Kamailio: `kamailio -c` of the example config (prepared by
  tests/lab/kamailio.py), then a live run in a lab namespace logging through a private rsyslogd in
  Debian 12's /var/log/syslog form (`RSYSLOG_FileFormat`);
* **6.0.1**, Debian 13's, in a container booted with systemd from the cached trixie root
  (tests/lab/container.py): `kamailio -c`, then a live run as Debian's own `kamailio.service` logging to
  the container's journal, read back with `journalctl -u kamailio.service -o json` and the journal
  reader trusting that unit, as the daemon does.

In each live run one sender per line of the log contract (README "Making Kamailio print what sipguard
reads") sends from its own address, and every contract line must appear in the form the shipped filters
match (the text Kamailio printed, checked by a regex per line) and give the right (filter, address)
events through sipguard's own formats, pipeline and filters; 198.18.0.99, injected into a User-Agent,
is never an event's address. `kamailio -c` must pass without a warning or error line, and fail on the
same config naming a module that does not exist (so the check is a real one). Namespaces are `sgk60-<pid>-*`; everything is torn down even on
failure. The time of each version's part is printed with -s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pytest

from sipguard.filters import FilterSet, shipped_dir
from sipguard.formats import JournalParser, JournalTrust, RecordParser
from sipguard.model import Line
from sipguard.pipeline import Pipeline

pytestmark = pytest.mark.root

FAKE = "198.18.0.99"
NET = "198.18.0."
PREFIX = "sgk60-"


def _need_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("needs root (CI runs as root)", pytrace=False)
        pytest.skip("needs root (network namespaces, systemd-nspawn)")
    missing = [t for t in ("kamailio", "rsyslogd", "systemd-nspawn", "nsenter", "debootstrap")
               if not shutil.which(t)]
    if missing:
        pytest.fail(f"missing tools (make apt installs them): {missing}")


# -- the senders: one per contract line (tests/lab/capture_real_logs.py's SIP client helpers) -----------

def _client(ns, ip):
    from tests.lab.capture_real_logs import client

    return client(ns, ip)


def s_scanner(ns, ip):
    with _client(ns, ip) as c:  # the fake address in the UA must never be taken
        r = c.request(c.build_register("1000", user_agent=f"friendly-scanner from {FAKE}:5060 (IP:{FAKE}:5060)"),
                      0.5)
    return r and r.status


def s_flood(ns, ip):
    with _client(ns, ip) as c:
        return c.flood_options(count=300, max_seconds=5)


def s_bad_cseq(ns, ip):
    with _client(ns, ip) as c:
        return (r := c.request(c.build_bad_cseq())) and r.status


def s_bad_version(ns, ip):
    with _client(ns, ip) as c:
        return (r := c.request(c.build_wrong_version(), 0.5)) and r.status


def s_garbage(ns, ip):
    with _client(ns, ip) as c:
        return (r := c.request(c.build_garbage(seed=7), 0.5)) and r.status


def s_wrong_password(ns, ip):
    with _client(ns, ip) as c:
        return (r := c.register("1000", password="wrong-password")) and r.status


def s_unknown_user(ns, ip):
    with _client(ns, ip) as c:
        return (r := c.register("1999")) and r.status


def s_phone(ns, ip):
    """A phone: registers with its password, calls a number this proxy does not serve."""
    from tests.lab.capture_real_logs import invite

    with _client(ns, ip) as c:
        r = c.register("1000", password="secret1000")
        return r and r.status, invite(c, ip, "+4930901820", password="secret1000")


def s_unauth_call(ns, ip):
    from tests.lab.capture_real_logs import invite

    with _client(ns, ip) as c:
        return invite(c, ip, "+442079460001")


def s_relay(ns, ip):
    from tests.lab.capture_real_logs import invite

    with _client(ns, ip) as c:
        return invite(c, ip, "+18005550100", from_domain="gw.example.net", ruri_domain="pstn.example.net")


def s_acl(ns, ip):
    from tests.lab.capture_real_logs import invite

    with _client(ns, ip) as c:
        return invite(c, ip, "+88216000000", from_domain="gw.example.net")


def s_secfilter_ua(ns, ip):
    with _client(ns, ip) as c:
        return (r := c.request(c.build_register("1000", user_agent="pplsip/1.0"), 1.0)) and r.status


def s_sqli(ns, ip):
    with _client(ns, ip) as c:
        return (r := c.request(c.build_register("1000", user_agent="Yealink' OR '1'='1"), 1.0)) and r.status


A = r"(?P<a>{ip}):5060"  # the sender's address as Kamailio prints $si:$sp
# (octet, sender, {filter: the record's text as Kamailio prints it, a regex with {ip}})
CONTRACT = [
    (50, s_scanner, {"scanner-ua": r"WARNING: <script>: Blocked scanner UA 'friendly-scanner from "
                                   r"198\.18\.0\.99:5060 \(IP:198\.18\.0\.99:5060\)' from " + A}),
    (51, s_flood, {"pike-block": r"WARNING: pike \[pike_funcs\.c:\d+\]: pike_check_ipaddr\(\): PIKE - "
                                 r"BLOCKing ip {ip}, node=0x[0-9a-f]+",
                   "pike-block#2": r"ALERT: <script>: ALERT: pike block OPTIONS from sip:probe@{ip} \(IP:" + A + r"\)"}),
    (52, s_bad_cseq, {"malformed": r"ERROR: <script>: Malformed SIP request from " + A}),
    (53, s_bad_version, {"malformed": r"ERROR: <script>: Malformed SIP request from " + A}),
    (54, s_garbage, {"malformed": r"ERROR: <core> \[core/receive\.c:\d+\]: receive_msg\(\): core parsing of SIP "
                                  r"message failed \(" + A + r"/1\)"}),
    (55, s_wrong_password, {
        "auth-challenge": r"NOTICE: <script>: auth challenge for user 1000 from " + A + " method REGISTER",
        "auth-failure": r"NOTICE: <script>: auth failed for user 1000 from " + A + " method REGISTER"}),
    (56, s_unknown_user, {"unknown-user": r"NOTICE: <script>: unknown user 1999 from " + A + " method REGISTER"}),
    (57, s_phone, {
        "auth-challenge": r"NOTICE: <script>: auth challenge for user 1000 from " + A + " method REGISTER",
        "register-success": r"NOTICE: <script>: REGISTER success for user 1000 from " + A,
        "call-attempt": r"NOTICE: <script>: call attempt to \+4930901820 from " + A,
        "call-refused": r"NOTICE: <script>: INVITE refused \(not local\) to \+4930901820 from " + A}),
    (58, s_unauth_call, {
        "call-attempt": r"NOTICE: <script>: call attempt to \+442079460001 from " + A,
        "call-refused": r"NOTICE: <script>: INVITE refused \(not authenticated\) to \+442079460001 from " + A}),
    (59, s_relay, {
        "call-attempt": r"NOTICE: <script>: call attempt to \+18005550100 from " + A,
        "call-refused": r"NOTICE: <script>: INVITE refused \(relay denied\) to \+18005550100 from " + A}),
    (60, s_acl, {
        "call-attempt": r"NOTICE: <script>: call attempt to \+88216000000 from " + A,
        "acl-refused": r"NOTICE: <script>: ACL refused INVITE to \+88216000000 from " + A}),
    (61, s_secfilter_ua, {"secfilter": r"WARNING: <script>: secfilter blocked REGISTER \(blacklisted UA\) from " + A}),
    (62, s_sqli, {"secfilter": r"WARNING: <script>: secfilter blocked REGISTER \(SQL injection\) from " + A}),
]


def play(lab) -> dict[str, object]:
    out = {}
    for octet, send, _ in CONTRACT:
        ip = f"{NET}{octet}"
        out[ip] = send(lab.add_client(ip), ip)
        time.sleep(0.2)
    return out


def check_contract(records: list, label: str) -> None:
    """Every contract line is a record in its exact form, and gives its (filter, address) event."""
    filters = FilterSet.load([shipped_dir()])
    now = time.time()
    events = {}
    for r in records:
        e = filters.match(r, now)
        if e is not None:
            events.setdefault((e.filter, e.ip), []).append(r.text)
    assert all(ip != FAKE for _, ip in events), sorted(events)
    texts = [r.text for r in records]
    problems = []
    want_events = set()
    for octet, send, lines in CONTRACT:
        ip = f"{NET}{octet}"
        mine = [t for t in texts if re.search(rf"\b{re.escape(ip)}\b", t)]
        for key, rx in lines.items():
            filt = key.split("#")[0]  # "#2": a second line for the same filter
            pat = re.compile("^" + rx.format(ip=re.escape(ip)) + "$")
            hits = [t for t in mine if pat.match(t)]
            if not hits:
                problems.append(f"{label}: no {filt!r} line of form {pat.pattern!r} from {ip} ({send.__name__}); "
                                f"its lines: {mine[:8]}")
                continue
            want_events.add((filt, ip))
            if not any(t in events.get((filt, ip), []) for t in hits):
                problems.append(f"{label}: {hits[0]!r} gives no {filt} event for {ip}")
    got = {k for k in events if k[1].startswith(NET) and int(k[1].rsplit(".", 1)[1]) in {o for o, _, _ in CONTRACT}}
    extra = got - {(k.split("#")[0], f"{NET}{o}") for o, _, lines in CONTRACT for k in lines}
    assert not problems, "\n".join(problems)
    assert not extra, f"{label}: events the contract does not name: {sorted(extra)}"
    assert want_events == got, (label, sorted(want_events ^ got))


def broken(cfg: str) -> str:
    """The config naming a module that does not exist."""
    assert cfg.count('loadmodule "pike.so"') == 1
    return cfg.replace('loadmodule "pike.so"', 'loadmodule "sgk60_nonexistent.so"')


def config_checks(run, cfg: str, broken_cfg: str) -> None:
    """`kamailio -c -f CFG` passes, without a warning (nothing deprecated, renamed or gone); the broken
    config fails it. *run* runs an argv where that Kamailio is (namespace or container)."""
    r = run(["kamailio", "-c", "-f", cfg])
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "config file ok" in out, out[-3000:]
    notes = [ln for ln in out.splitlines() if re.search(r"\b(WARNING|ERROR|CRITICAL|BUG|deprecated)\b", ln, re.I)]
    assert not notes, notes
    r = run(["kamailio", "-c", "-f", broken_cfg])
    assert r.returncode != 0 and "config file ok" not in r.stdout + r.stderr, r.stdout + r.stderr


# -- Kamailio 5.6 (the host's) ---------------------------------------------------------------------

def test_example_config_on_kamailio_5_6(tmp_path):
    _need_root()
    from tests.lab.kamailio import Kamailio, prepare_config
    from tests.lab.netns import Lab

    t0 = time.monotonic()
    ver = subprocess.run(["kamailio", "-v"], capture_output=True, text=True, timeout=10).stdout
    assert re.search(r"^version: kamailio 5\.6\.", ver, re.M), ver
    with Lab(str(os.getpid()), prefix=PREFIX) as lab:
        (tmp_path / "check").mkdir()
        cfg = prepare_config(tmp_path / "check", lab.proxy_ip)

        (tmp_path / "check" / "broken.cfg").write_text(broken(cfg.read_text()))
        config_checks(lambda argv: lab.hub.run(*argv, check=False, timeout=30), str(cfg),
                      str(tmp_path / "check" / "broken.cfg"))
        log = tmp_path / "syslog"
        with Kamailio(lab.hub, lab.proxy_ip, logmode="rsyslog", template="RSYSLOG_FileFormat", logfile=log) as k:
            time.sleep(0.5)
            sent = play(lab)
            time.sleep(1.0)
        # Kamailio and rsyslogd stopped: everything is in the file
        lines = log.read_bytes().split(b"\n")
    parser = RecordParser(now=time.time)
    records = list(Pipeline(parser).records(Line(log.name, b, i) for i, b in enumerate(lines) if b))
    assert parser.stats.by_format.get("iso", 0) > 20, parser.stats
    check_contract(records, f"5.6 ({sent})")
    print(f"\n[kamailio 5.6] config check + live run: {time.monotonic() - t0:.1f} s")


# -- Kamailio 6.0 (Debian 13's, in a container) ----------------------------------------------------

def test_example_config_on_kamailio_6_0():
    _need_root()
    from tests.lab.capture_k60 import install_config, journal, last_cursor, restart_kamailio, stock_ident_config
    from tests.lab.container import Container
    from tests.lab.netns import Lab

    t0 = time.monotonic()
    tag = str(os.getpid())
    with Lab(tag, prefix=PREFIX) as lab:
        lab.hub.sysctl("net.unix.max_dgram_qlen", "512")
        with Container("trixie", lab.hub, name=f"sgk60v{tag}") as c:
            ver = c.sh("kamailio -v").stdout
            assert re.search(r"^version: kamailio 6\.0\.", ver, re.M), ver
            cfg, tables = stock_ident_config(lab.proxy_ip, keep_log_name=True)  # the example as committed
            install_config(c, cfg, tables)
            c.put("/etc/kamailio/broken.cfg", broken(cfg))
            config_checks(lambda argv: c.run(*argv, check=False, timeout=30), "/etc/kamailio/kamailio.cfg",
                          "/etc/kamailio/broken.cfg")
            t_boot = time.monotonic() - t0
            c.sh("systemctl stop kamailio.service", timeout=60)  # the boot started it with Debian's config
            cursor = last_cursor(c)
            restart_kamailio(c, None)
            sent = play(lab)
            time.sleep(0.5)
            c.sh("systemctl stop kamailio.service", timeout=60)  # everything it logged is in the journal
            out = journal(c, "json", cursor)
    lines = [b for b in out.split(b"\n") if b]
    entries = [json.loads(b) for b in lines]
    kam = [e for e in entries if e.get("_SYSTEMD_UNIT") == "kamailio.service"]
    # journald could not read the executable of a few entries of exiting processes: None
    assert kam and {e.get("_EXE") for e in kam} - {None} == {"/usr/sbin/kamailio"}, {e.get("_EXE") for e in kam}
    # the config's log_name: the identifier of everything it logs through syslog (Debian's stock config,
    # which the container's boot ran before the cursor, has none: `/usr/sbin/kamailio`)
    assert {e["SYSLOG_IDENTIFIER"] for e in kam if e["_TRANSPORT"] == "syslog"} == {"kamailio"}
    parser = JournalParser(trust=JournalTrust.of(units=["kamailio.service"]))
    records = list(Pipeline(parser).records(Line("journal", b, i) for i, b in enumerate(lines)))
    check_contract(records, f"6.0 ({sent})")
    print(f"\n[kamailio 6.0] container ready + config checks {t_boot:.1f} s; "
          f"total {time.monotonic() - t0:.1f} s")
