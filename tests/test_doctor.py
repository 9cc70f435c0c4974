"""`sipguard doctor`: a host set up wrongly in each check reports each problem, with its fix; a good
setup reports none (exit 0).

Files, state and config roots live in temp dirs (the journald/rsyslog roots are injected with
`Host.root` / `--root`); the kernel checks run in network namespaces of their own (`sge-<pid>doc…`),
made and deleted here, with the real ipset/iptables/nftables. The host's firewall is never touched.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from sipguard.config import Config
from sipguard.doctor import CHECKS, Finding, Host, as_json, exit_status, run_checks
from sipguard.store import Store

from netns_util import ns_call
from tests.lab.netns import Netns

ROOT = os.geteuid() == 0
WT = Path(__file__).resolve().parents[1]

LINES = {
    "pike-block": "WARNING: pike [pike_funcs.c:135]: pike_check_ipaddr(): PIKE - BLOCKing ip {ip}, node=0x7f3a1c2b4e10",
    "scanner-ua": "NOTICE: <script>: Blocked scanner UA 'friendly-scanner' from {ip}:5060",
    "malformed": "ERROR: <script>: Malformed SIP request from {ip}:5060",
    "auth-failure": "NOTICE: <script>: auth failed for user 1000 from {ip}:5060 method REGISTER",
    "auth-challenge": "NOTICE: <script>: auth challenge for user 1000 from {ip}:5060 method REGISTER",
    "unknown-user": "NOTICE: <script>: unknown user 1234 from {ip}:5060 method REGISTER",
    "register-success": "NOTICE: <script>: REGISTER success for user 1000 from {ip}:5060",
    "call-attempt": "NOTICE: <script>: call attempt to +442079460000 from {ip}:5060",
    "call-refused": "NOTICE: <script>: INVITE refused (not authenticated) to +442079460000 from {ip}:5060",
    "acl-refused": "NOTICE: <script>: ACL refused INVITE to +88216000000 from {ip}:5060",
    "secfilter": "WARNING: <script>: secfilter blocked REGISTER (blacklisted UA) from {ip}:5060",
}


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="microseconds")


def write_log(path: Path, now: float, names=tuple(LINES), program: str = "kamailio", ahead: float = 0.0,
              age: float = 0.0) -> Path:
    """A RSYSLOG_FileFormat log with one line per filter in `names`, the newest `age` s old, stamped
    `ahead` s ahead of the host; the file's mtime is when the last line was written (host clock)."""
    rows = []
    for i, name in enumerate(names):
        t = now - age - (len(names) - 1 - i) * 10 + ahead
        rows.append(f"{iso(t)} sip1 {program}[4242]: {LINES[name].format(ip=f'198.18.0.{10 + i}')}\n")
    path.write_text("".join(rows))
    os.utime(path, (now - age, now - age))
    return path


def good_root(root: Path) -> Path:
    (root / "etc/systemd/system/kamailio.service.d").mkdir(parents=True)
    (root / "etc/systemd/journald.conf").write_text("[Journal]\n#RateLimitBurst=10000\n")
    (root / "etc/systemd/system/kamailio.service.d/ratelimit.conf").write_text("[Service]\nLogRateLimitIntervalSec=0\n")
    (root / "etc/rsyslog.d").mkdir(parents=True)
    (root / "etc/rsyslog.conf").write_text('module(load="imuxsock") # provides support for local system logging\n'
                                           '$IncludeConfig /etc/rsyslog.d/*.conf\n')
    return root


def cfg_of(tmp: Path, **sections) -> Config:
    data = {"sources": {"logs": [str(tmp / "kamailio.log")]}, "enforce": {"backend": "dryrun"},
            "allowlist": {"cidrs": ["198.18.200.0/24"]}, "firewall": {"management_cidrs": ["198.18.200.0/25"]}}
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    return Config.model_validate(data)


def beat(state: Path, now: float, running: bool = True) -> None:
    store = Store.open_state_dir(state)
    try:
        store.set_meta("status", json.dumps({"pid": 4242, "running": running, "heartbeat": now, "enforcer": "ipset"}))
    finally:
        store.close()


def run(host: Host, *checks: str) -> list[Finding]:
    return run_checks(host, checks or None)


def statuses(findings: list[Finding], check: str) -> list[str]:
    return [f.status for f in findings if f.check == check]


def problems(findings: list[Finding], check: str | None = None) -> list[Finding]:
    return [f for f in findings if f.status == "problem" and (check is None or f.check == check)]


# -- logs, contract, clock ----------------------------------------------------------------------
def test_logs_missing_unreadable_empty_foreign_stale_and_good(tmp_path):
    now = time.time()
    cfg = cfg_of(tmp_path)
    host = lambda: Host(cfg, tmp_path / "state", root=tmp_path, now=now)  # noqa: E731
    log = tmp_path / "kamailio.log"
    (p,) = problems(run(host(), "logs"))
    assert "does not exist" in p.message and "rsyslog-kamailio.conf" in p.fix
    log.mkdir()  # a path that cannot be read as a file
    (p,) = problems(run(host(), "logs"))
    assert "cannot be read" in p.message
    log.rmdir()
    log.write_text("")
    (p,) = problems(run(host(), "logs"))
    assert "empty" in p.message
    write_log(log, now, program="sshd")
    (p,) = problems(run(host(), "logs"))
    assert f"none of the last {len(LINES)} lines is a record of kamailio" in p.message and "[sources] programs" in p.fix
    write_log(log, now, age=7200)
    (p,) = problems(run(host(), "logs"))
    assert "last written 2h ago" in p.message
    write_log(log, now)
    found = run(host(), "logs")
    assert statuses(found, "logs") == ["ok"], found


def test_journal_sources(tmp_path):
    """A journal unit is read with journalctl (here a stand-in printing `journalctl -o json` lines)."""
    now = time.time()
    entries = tmp_path / "entries.json"
    fake = tmp_path / "journalctl"
    fake.write_text(f"#!/bin/sh\ncat {entries}\n")
    fake.chmod(0o755)
    cfg = cfg_of(tmp_path, sources={"logs": [], "journal": ["kamailio.service"], "journalctl": str(fake)})
    entries.write_text("")
    (p,) = problems(run(Host(cfg, tmp_path / "state", now=now), "logs"))
    assert "no entries at all" in p.message
    rows = [{"MESSAGE": LINES[n].format(ip=f"198.18.0.{i + 10}"), "__REALTIME_TIMESTAMP": str(int((now - 10 * len(LINES) + i * 10) * 1e6)),
             "_PID": "4242", "_SYSTEMD_UNIT": "kamailio.service", "SYSLOG_IDENTIFIER": "kamailio", "_HOSTNAME": "sip1", "_TRANSPORT": "syslog"}
            for i, n in enumerate(LINES)]
    entries.write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = run(Host(cfg, tmp_path / "state", now=now), "logs", "contract", "clock")
    assert [f.status for f in found] == ["ok"] * (2 + len(LINES)), found
    missing = cfg_of(tmp_path, sources={"logs": [], "journal": ["kamailio.service"],
                                         "journalctl": str(tmp_path / "journalctl")})
    fake.unlink()
    (p,) = problems(run(Host(missing, tmp_path / "state", now=now), "logs"))
    assert "cannot be read" in p.message and "journalctl" in p.fix


def test_no_sources_configured_reads_what_the_daemon_would_choose(tmp_path):
    """With no [sources], the doctor looks at the default chain's choice (here <root>/var/log/kamailio.log)."""
    now = time.time()
    cfg = Config.model_validate({"enforce": {"backend": "dryrun"}})
    (tmp_path / "var" / "log").mkdir(parents=True)
    log = write_log(tmp_path / "var" / "log" / "kamailio.log", now)
    found = run(Host(cfg, tmp_path / "state", root=tmp_path, now=now), "logs")
    assert [f.status for f in found] == ["ok"], found
    assert str(log) in found[0].message, found


def test_log_names_are_printed_escaped(tmp_path):
    cfg = cfg_of(tmp_path, sources={"logs": [str(tmp_path / "k\x1b]0;pwned\x07.log")]})
    (p,) = problems(run(Host(cfg, tmp_path / "state", root=tmp_path), "logs"))
    assert "\x1b" not in p.message and "\\x1b]0;pwned\\x07" in p.message
    conf = tmp_path / "c.toml"
    conf.write_text(f'[sources]\nlogs = ["{tmp_path}/[bold]k\\u001b[2J:smile:.log"]\n[enforce]\nbackend = "dryrun"\n')
    out = _doctor(None, conf, tmp_path / "state", tmp_path, "--check", "logs")
    assert out.returncode == 1 and "\x1b" not in out.stdout
    assert f"{tmp_path}/[bold]k\\x1b[2J:smile:.log: does not exist" in out.stdout, out.stdout


def test_contract_reports_missing_xlog_lines_and_filters_never_matched(tmp_path):
    now = time.time()
    cfg = cfg_of(tmp_path)
    log = tmp_path / "kamailio.log"
    write_log(log, now, names=("pike-block",))  # stock Kamailio: only pike's own line, no xlog lines
    found = run(Host(cfg, tmp_path / "state", now=now), "contract")
    (p,) = problems(found, "contract")
    assert "xlog lines" in p.message and "examples/kamailio/kamailio.cfg" in p.fix
    never = {f.details["filter"] for f in found if f.status == "warning"}
    assert never == set(LINES) - {"pike-block"}
    w = next(f for f in found if f.details.get("filter") == "register-success")
    assert "REGISTER success for user $fU from $si:$sp" in w.fix
    # lines older than the window do not count
    write_log(log, now, age=3 * 3600)
    found = run(Host(cfg, tmp_path / "state", now=now, hours=1), "contract")
    assert problems(found, "contract")
    write_log(log, now)
    found = run(Host(cfg, tmp_path / "state", now=now), "contract")
    assert statuses(found, "contract") == ["ok"] * len(LINES), found


def test_clock_skew_between_log_and_host(tmp_path):
    now = time.time()
    cfg = cfg_of(tmp_path)
    write_log(tmp_path / "kamailio.log", now, ahead=3600)  # a log clock (or time zone) an hour ahead
    (p,) = problems(run(Host(cfg, tmp_path / "state", now=now), "clock"))
    assert "1h ahead of" in p.message and "time zone" in p.fix and p.details["skew"] == pytest.approx(3600, abs=1)
    write_log(tmp_path / "kamailio.log", now, ahead=-600)
    (p,) = problems(run(Host(cfg, tmp_path / "state", now=now), "clock"))
    assert "10m behind" in p.message
    write_log(tmp_path / "kamailio.log", now)
    assert statuses(run(Host(cfg, tmp_path / "state", now=now), "clock"), "clock") == ["ok"]


# -- journald and rsyslog limits -----------------------------------------------------------------
def test_journald_limits(tmp_path):
    cfg = cfg_of(tmp_path)
    root = tmp_path / "root"
    (root / "etc/systemd").mkdir(parents=True)
    (root / "etc/systemd/journald.conf").write_text("[Journal]\n#RateLimitIntervalSec=30s\n")
    (p,) = problems(run(Host(cfg, tmp_path, root=root), "journald"))
    assert "10000 lines per 30s" in p.message and "LogRateLimitIntervalSec=0" in p.fix
    (root / "etc/systemd/journald.conf.d").mkdir()
    (root / "etc/systemd/journald.conf.d/x.conf").write_text("[Journal]\nRateLimitIntervalSec=1s\nRateLimitBurst=100\n")
    (p,) = problems(run(Host(cfg, tmp_path, root=root), "journald"))
    assert "100 lines per 1s" in p.message and "journald.conf.d/x.conf:3" in p.message
    (root / "etc/systemd/journald.conf.d/x.conf").write_text("[Journal]\nRateLimitBurst=0\n")
    assert statuses(run(Host(cfg, tmp_path, root=root), "journald"), "journald") == ["ok"]
    # the unit's own limit wins over journald.conf
    (root / "etc/systemd/system/kamailio.service.d").mkdir(parents=True)
    (root / "etc/systemd/system/kamailio.service.d/l.conf").write_text(
        "[Service]\nLogRateLimitIntervalSec=10s\nLogRateLimitBurst=500\n")
    (p,) = problems(run(Host(cfg, tmp_path, root=root), "journald"))
    assert "500 lines per 10s" in p.message and "kamailio.service.d/l.conf" in p.message
    good = good_root(tmp_path / "good")
    assert statuses(run(Host(cfg, tmp_path, root=good), "journald"), "journald") == ["ok"]


def test_rsyslog_limits(tmp_path):
    cfg = cfg_of(tmp_path)
    root = tmp_path / "root"
    (root / "etc/rsyslog.d").mkdir(parents=True)
    conf = root / "etc/rsyslog.conf"
    conf.write_text('module(load="imuxsock"\n       SysSock.RateLimit.Interval="5" SysSock.RateLimit.Burst="200")\n')
    (p,) = problems(run(Host(cfg, tmp_path, root=root), "rsyslog"))
    assert "imuxsock" in p.message and "200 lines per 5s" in p.message and 'SysSock.RateLimit.Interval="0"' in p.fix
    conf.write_text("$ModLoad imuxsock\n$SystemLogRateLimitInterval 2\n$SystemLogRateLimitBurst 50\n")
    (p,) = problems(run(Host(cfg, tmp_path, root=root), "rsyslog"))
    assert "50 lines per 2s" in p.message
    conf.write_text('module(load="imuxsock") # module(load="imuxsock" SysSock.RateLimit.Interval="5")\n')
    (root / "etc/rsyslog.d/j.conf").write_text('module(load="imjournal" StateFile="imjournal.state")\n')
    found = run(Host(cfg, tmp_path, root=root), "rsyslog")
    (p,) = problems(found)
    assert "imjournal" in p.message and "20000 lines per 600s" in p.message and "ratelimit.interval" in p.fix
    assert statuses(found, "rsyslog") == ["ok", "problem"]
    good = good_root(tmp_path / "good")
    assert statuses(run(Host(cfg, tmp_path, root=good), "rsyslog"), "rsyslog") == ["ok"]


# -- state directory, database, heartbeat -----------------------------------------------------------
def test_state_dir_not_a_directory(tmp_path):
    (tmp_path / "state").write_text("x")
    (p,) = problems(run(Host(cfg_of(tmp_path), tmp_path / "state"), "state-dir"))
    assert "not a directory" in p.message


def test_corrupted_database_is_reported_with_the_fix(tmp_path):
    state = tmp_path / "state"
    beat(state, time.time())
    db = state / "sipguard.db"
    data = bytearray(db.read_bytes())
    data[100:4096] = b"\xa5" * (4096 - 100)  # the header and schema page overwritten
    db.write_bytes(bytes(data))
    (p,) = problems(run(Host(cfg_of(tmp_path), state), "database"))
    assert "sipguard.db" in p.message and f"mv {db} {db}.corrupt" in p.fix
    db.write_bytes(b"not a database at all" * 100)
    (p,) = problems(run(Host(cfg_of(tmp_path), state), "database"))
    assert "cannot be opened" in p.message or "quick_check" in p.message


def test_damaged_page_fails_quick_check(tmp_path):
    state = tmp_path / "state"
    store = Store.open_state_dir(state)
    from sipguard.model import Event, EventKind

    with store.transaction():
        store.add_events([Event(time.time(), f"198.18.{i // 250}.{i % 250}", "auth-failure", EventKind.AUTH_FAILURE,
                                1.0) for i in range(5000)])
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    db = state / "sipguard.db"
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) > 8 * page
    data[50 * page: 51 * page] = bytes(range(256)) * 16  # one b-tree page in the middle: garbage
    db.write_bytes(bytes(data))
    found = run(Host(cfg_of(tmp_path), state), "database")
    (p,) = problems(found)
    assert "damaged" in p.message or "quick_check failed" in p.message or "malformed" in p.message, p


def test_heartbeat_missing_stale_stopped_and_fresh(tmp_path):
    now = time.time()
    state = tmp_path / "state"
    (p,) = problems(run(Host(cfg_of(tmp_path), state, now=now), "heartbeat"))
    assert "not running" in p.message
    Store.open_state_dir(state).close()
    (p,) = problems(run(Host(cfg_of(tmp_path), state, now=now), "heartbeat"))
    assert "never ran" in p.message
    beat(state, now - 120)
    (p,) = problems(run(Host(cfg_of(tmp_path), state, now=now), "heartbeat"))
    assert "2m old" in p.message and "systemctl restart sipguard" in p.fix
    beat(state, now - 30, running=False)
    (p,) = problems(run(Host(cfg_of(tmp_path), state, now=now), "heartbeat"))
    assert "stopped 30s ago" in p.message
    beat(state, now - 1)
    found = run(Host(cfg_of(tmp_path), state, now=now), "state-dir", "database", "heartbeat")
    assert [f.status for f in found] == ["ok", "ok", "ok"], found


# -- fleet, htable -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_redis_unreachable(tmp_path):
    cfg = cfg_of(tmp_path, cluster={"redis_url": f"redis://127.0.0.1:{free_port()}/0", "node_name": "edge1",
                                    "socket_timeout": 0.5})
    (p,) = problems(run(Host(cfg, tmp_path / "state"), "redis"))
    assert "unreachable" in p.message and "redis_url" in p.fix
    assert statuses(run(Host(cfg_of(tmp_path), tmp_path / "state"), "redis"), "redis") == ["skipped"]


def test_redis_reachable_and_fleet_sync(tmp_path):
    import shutil

    exe = shutil.which("redis-server")
    assert exe, "redis-server is in the Makefile's APT_PACKAGES"
    port = free_port()
    (tmp_path / "redis").mkdir()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path / "redis"),
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        cfg = cfg_of(tmp_path, cluster={"redis_url": f"redis://127.0.0.1:{port}/0", "node_name": "edge1"})
        now = time.time()
        state = tmp_path / "state"
        store = Store.open_state_dir(state)
        store.set_meta("cluster_status", json.dumps({"heartbeat": now, "in_sync": False, "outbox": 7}))
        store.close()
        found = run(Host(cfg, state, now=now), "redis")
        assert [f.status for f in found] == ["ok", "problem"], found
        assert "NOT in sync (7 changes queued" in found[1].message
        store = Store.open_state_dir(state)
        store.set_meta("cluster_status", json.dumps({"heartbeat": now, "in_sync": True, "outbox": 0}))
        store.close()
        assert [f.status for f in run(Host(cfg, state, now=now), "redis")] == ["ok", "ok"]
        assert problems(run(Host(cfg, state, now=now + 60), "redis"))  # this node stopped reporting
    finally:
        proc.kill()
        proc.wait(10)


def test_htable_socket(tmp_path):
    sock = tmp_path / "kamailio_rpc.sock"
    cfg = cfg_of(tmp_path, htable={"enabled": True, "rpc": f"unix:{sock}", "timeout": "1s"})
    (p,) = problems(run(Host(cfg, tmp_path / "state"), "htable"))
    assert "No such file" in p.message and "jsonrpcs" in p.fix
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(sock))
    tables = [{"name": "other", "dbtable": "", "dbmode": 0}]

    def answer(n: int) -> None:
        srv.settimeout(5)
        for _ in range(n):
            try:
                data, peer = srv.recvfrom(65536)
            except OSError:
                return
            req = json.loads(data)
            assert req["method"] == "htable.listTables"
            srv.sendto(json.dumps({"jsonrpc": "2.0", "result": tables, "id": req["id"]}).encode(), peer)

    t = threading.Thread(target=answer, args=(2,), daemon=True)
    t.start()
    try:
        (p,) = problems(run(Host(cfg, tmp_path / "state"), "htable"))
        assert "no htable 'ipban'" in p.message and "ipban=>" in p.fix
        tables.append({"name": "ipban", "dbtable": "", "dbmode": 0})
        assert statuses(run(Host(cfg, tmp_path / "state"), "htable"), "htable") == ["ok"]
    finally:
        t.join(10)
        srv.close()


# -- kernel: namespaces of our own -------------------------------------------------------------------
needs_root = pytest.mark.skipif(not ROOT and not os.environ.get("CI"), reason="needs root (network namespaces)")


def _ns(tag: str) -> Netns:
    return Netns(f"sge-{os.getpid() % 100000}doc{tag}")


def _sh(ns: str, *argv: str) -> None:
    p = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, (argv, p.stderr)


def _ensure(cfg: Config) -> int:
    from sipguard.enforce import make_enforcer

    e = make_enforcer(cfg.enforce)
    try:
        return e.ensure()
    finally:
        e.close()


def _legacy_tables() -> set[str]:
    from sipguard.netfilter import legacy_tables

    return legacy_tables(4) | legacy_tables(6)


def _kernel(cfg: Config, tmp: Path) -> list[Finding]:
    return run_checks(Host(cfg, tmp / "state"), ["tools", "iptables", "hook", "sets"])


def _allow(cfg: Config, tmp: Path, env: dict) -> list[Finding]:
    return run_checks(Host(cfg, tmp / "state", env=env), ["allowlist"])


@needs_root
@pytest.mark.parametrize("flavour", ["nft", "legacy"])
def test_ipset_backend_hook_not_first_missing_set_wrong_size(tmp_path, flavour):
    ipt, ip6t = f"iptables-{flavour}", f"ip6tables-{flavour}"
    cfg = cfg_of(tmp_path, enforce={"backend": "ipset", "maxelem": 4096, "iptables": flavour})
    with _ns("i" + flavour[0]) as ns:
        found = ns_call(ns.name, _kernel, cfg, tmp_path)  # nothing there yet (and nothing created by looking)
        assert {p.message for p in problems(found, "hook")} == {f"IPv4 ({ipt}): chain SIPGUARD missing",
                                                                 f"IPv4 ({ipt}): INPUT does not jump to SIPGUARD first",
                                                                 f"IPv6 ({ip6t}): chain SIPGUARD missing",
                                                                 f"IPv6 ({ip6t}): INPUT does not jump to SIPGUARD first"}
        assert len(problems(found, "sets")) == 4
        if flavour == "legacy":
            assert not ns_call(ns.name, _legacy_tables)  # looking created no legacy table
        assert ns_call(ns.name, _ensure, cfg) > 0
        found = ns_call(ns.name, _kernel, cfg, tmp_path)
        assert not problems(found), found
        assert len([f for f in found if f.check == "sets" and f.status == "ok"]) == 4
        assert len([f for f in found if f.check == "hook" and f.status == "ok"]) == 2
        # a wrong size: the sets hold 4096, the config now says 8192
        bigger = cfg_of(tmp_path, enforce={"backend": "ipset", "maxelem": 8192, "iptables": flavour})
        found = ns_call(ns.name, _kernel, bigger, tmp_path)
        sizes = problems(found, "sets")
        assert len(sizes) == 4 and all("at most 4096 entries" in p.message and "ipset destroy" in p.fix
                                       for p in sizes), found
        # the hook not first in INPUT (IPv4), and FORWARD hooked though hook_forward is off (IPv6)
        _sh(ns.name, ipt, "-I", "INPUT", "1", "-p", "udp", "--dport", "5060", "-j", "ACCEPT")
        _sh(ns.name, ip6t, "-A", "FORWARD", "-j", "SIPGUARD")
        found = ns_call(ns.name, _kernel, cfg, tmp_path)
        hooks = problems(found, "hook")
        assert [p.message for p in hooks] == [f"IPv4 ({ipt}): INPUT does not jump to SIPGUARD first",
                                              f"IPv6 ({ip6t}): FORWARD jumps to SIPGUARD"], hooks
        assert hooks[0].fix.startswith(f"{ipt} -D INPUT -j SIPGUARD; {ipt} -I INPUT 1 -j SIPGUARD")
        # with hook_forward the FORWARD jump is wanted, and must be first there too
        fwd = cfg_of(tmp_path, enforce={"backend": "ipset", "maxelem": 4096, "hook_forward": True, "iptables": flavour})
        found = ns_call(ns.name, _kernel, fwd, tmp_path)
        assert f"IPv4 ({ipt}): FORWARD does not jump to SIPGUARD first" in [p.message for p in problems(found, "hook")]
        # a missing set (and so a chain that no longer matches it)
        _sh(ns.name, ip6t, "-F", "SIPGUARD")
        _sh(ns.name, "ipset", "destroy", "sipguard-net6")
        found = ns_call(ns.name, _kernel, cfg, tmp_path)
        (missing,) = problems(found, "sets")
        assert missing.message == "ipset sipguard-net6 missing" and "systemctl restart sipguard" in missing.fix
        assert f"IPv6 ({ip6t}): chain SIPGUARD rules differ" in [p.message for p in problems(found, "hook")]
        # a set of the wrong type under our name
        _sh(ns.name, "ipset", "create", "sipguard-net6", "hash:ip", "family", "inet6", "maxelem", "4096")
        found = ns_call(ns.name, _kernel, cfg, tmp_path)
        (wrong,) = problems(found, "sets")
        assert "is hash:ip family inet6 without timeout" in wrong.message
        assert statuses(found, "iptables") == ["ok"]
        assert next(f for f in found if f.check == "iptables").details == {"flavour": flavour}
        if flavour == "nft":  # rules of the other flavour beside the hook
            _sh(ns.name, "iptables-legacy", "-A", "INPUT", "-j", "ACCEPT")
            found = ns_call(ns.name, _kernel, cfg, tmp_path)
            (w,) = [f for f in found if f.check == "iptables" and f.status == "warning"]
            assert "legacy iptables tables exist too (filter)" in w.message and "iptables-legacy-save" in w.fix


@needs_root
def test_nftables_backend_missing_table_set_chain_wrong_size(tmp_path):
    cfg = cfg_of(tmp_path, enforce={"backend": "nftables", "maxelem": 4096})
    with _ns("n") as ns:
        found = ns_call(ns.name, _kernel, cfg, tmp_path)
        assert [p.message for p in problems(found)] == ["table inet sipguard missing"] * 2, found
        assert ns_call(ns.name, _ensure, cfg) > 0
        found = ns_call(ns.name, _kernel, cfg, tmp_path)
        assert not problems(found), found
        assert statuses(found, "iptables") == ["skipped"]
        bigger = cfg_of(tmp_path, enforce={"backend": "nftables", "maxelem": 8192})
        sizes = problems(ns_call(ns.name, _kernel, bigger, tmp_path), "sets")
        assert len(sizes) == 4 and all("has size 4096" in p.message and "nft delete table inet sipguard" in p.fix
                                       for p in sizes)
        fwd = cfg_of(tmp_path, enforce={"backend": "nftables", "maxelem": 4096, "hook_forward": True})
        (p,) = problems(ns_call(ns.name, _kernel, fwd, tmp_path), "hook")
        assert p.message.startswith("chain inet sipguard forward missing")
        _sh(ns.name, "nft", "delete", "rule", "inet", "sipguard", "input", "handle",
            _rule_handle(ns.name, "@v6"))
        (p,) = problems(ns_call(ns.name, _kernel, cfg, tmp_path), "hook")
        assert "rules ['@v4', '@net4', '@net6']" in p.message
        _sh(ns.name, "nft", "flush", "chain", "inet", "sipguard", "input")
        _sh(ns.name, "nft", "delete", "set", "inet", "sipguard", "v6")
        found = ns_call(ns.name, _kernel, cfg, tmp_path)
        assert [p.message for p in problems(found, "sets")] == ["set inet sipguard v6 missing"]


def _rule_handle(ns: str, ref: str) -> str:
    p = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "-t", "list", "chain", "inet", "sipguard", "input"],
                       capture_output=True, text=True, timeout=30, check=True)
    for obj in json.loads(p.stdout)["nftables"]:
        r = obj.get("rule")
        if r and any(isinstance(e, dict) and e.get("match", {}).get("right") == ref for e in r["expr"]):
            return str(r["handle"])
    raise AssertionError(f"no rule for {ref}")


@needs_root
def test_tools_missing(tmp_path):
    """No nft (nftables backend), no iptables (ipset backend): a PATH without them, in a namespace."""
    log = tmp_path / "k.log"
    with _ns("t") as ns:
        for backend, want in (("nftables", "nft: not installed"), ("ipset", "iptables: not installed")):
            conf = _toml(tmp_path, backend, log)
            cmd = ["ip", "netns", "exec", ns.name, "env", "PATH=/nonexistent", f"PYTHONPATH={WT}", sys.executable,
                   "-m", "sipguard", "--config", str(conf), "--state-dir", str(tmp_path / "s"), "doctor", "--json",
                   "--check", "tools"]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            doc = json.loads(p.stdout)
            assert [c["message"] for c in doc["checks"] if c["status"] == "problem"] == [want], doc
            assert p.returncode == 1
            assert "apt-get install" in next(c["fix"] for c in doc["checks"] if c["status"] == "problem")


@needs_root
def test_allowlist_host_addresses_and_management_networks(tmp_path):
    with _ns("a") as ns:
        ns.ip("link", "add", "v0", "type", "veth", "peer", "name", "v1")
        ns.add_addr("v0", "198.18.77.1/24")
        ns.ip("link", "set", "v0", "up")
        cfg = cfg_of(tmp_path, allowlist={"include_host_addresses": False, "cidrs": ["198.18.200.0/26"]})
        found = ns_call(ns.name, _allow, cfg, tmp_path, {"SSH_CONNECTION": "198.18.99.9 50000 198.18.77.1 22"})
        msgs = {f.status + ": " + f.message for f in found}
        assert "problem: this host's own addresses can be banned: 198.18.77.1" in msgs, found
        assert any(m.startswith("problem: management networks not in the allow-list: 198.18.200.0/25") for m in msgs)
        assert "warning: you are connected from 198.18.99.9, which is not allow-listed" in msgs
        good = cfg_of(tmp_path)
        found = ns_call(ns.name, _allow, good, tmp_path, {"SSH_CONNECTION": "198.18.200.9 50000 198.18.77.1 22"})
        assert [f.status for f in found] == ["ok", "ok"], found


# -- the whole verb ---------------------------------------------------------------------------------
def _doctor(ns: str | None, cfg_path: Path, state: Path, root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SSH_CONNECTION"}
    env["PYTHONPATH"] = str(WT)
    cmd = [sys.executable, "-m", "sipguard", "--config", str(cfg_path), "--state-dir", str(state), "doctor",
           "--root", str(root), *args]
    if ns:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def _toml(tmp: Path, backend: str, log: Path, maxelem: int = 4096) -> Path:
    p = tmp / "sipguard.toml"
    p.write_text(f'[sources]\nlogs = ["{log}"]\n[enforce]\nbackend = "{backend}"\nmaxelem = {maxelem}\n'
                 f'[allowlist]\ncidrs = ["198.18.200.0/24"]\n[firewall]\nmanagement_cidrs = ["198.18.200.0/25"]\n')
    return p


@needs_root
@pytest.mark.parametrize("backend", ["ipset", "nftables"])
def test_good_setup_reports_nothing_and_a_bad_one_counts_its_problems(tmp_path, backend):
    now = time.time()
    log = write_log(tmp_path / "kamailio.log", now)
    root = good_root(tmp_path / "root")
    state = tmp_path / "state"
    conf = _toml(tmp_path, backend, log)
    with _ns("g" + backend[0]) as ns:
        ns_call(ns.name, _ensure, Config.model_validate({"enforce": {"backend": backend, "maxelem": 4096}}))
        beat(state, time.time())
        p = _doctor(ns.name, conf, state, root, "--json")
        assert p.returncode == 0, p.stdout + p.stderr
        doc = json.loads(p.stdout)
        assert set(doc) == {"problems", "warnings", "exit_status", "checks"}  # the README's schema
        assert doc["problems"] == 0 and doc["warnings"] == 0 and doc["exit_status"] == 0, doc
        assert {c["check"] for c in doc["checks"]} == set(CHECKS) - {"fleet"}
        for c in doc["checks"]:
            assert set(c) == {"check", "status", "message", "fix", "details"}
            assert c["status"] in ("ok", "skipped") and c["fix"] is None
        text = _doctor(ns.name, conf, state, root)
        assert text.returncode == 0 and "0 problems, 0 warnings" in text.stdout, text.stdout
        # now wrong in many ways at once: stale log, no journald drop-in, a hook not first, an old heartbeat
        write_log(log, now, age=7200)
        (root / "etc/systemd/system/kamailio.service.d/ratelimit.conf").unlink()
        if backend == "ipset":
            _sh(ns.name, "iptables", "-I", "INPUT", "1", "-j", "ACCEPT")
        else:
            _sh(ns.name, "nft", "flush", "chain", "inet", "sipguard", "input")
        beat(state, now - 600)
        p = _doctor(ns.name, conf, state, root, "--json")
        doc = json.loads(p.stdout)
        bad = {c["check"] for c in doc["checks"] if c["status"] == "problem"}
        assert bad == {"logs", "journald", "hook", "heartbeat"}, doc
        assert p.returncode == doc["problems"] == doc["exit_status"] == 4
        text = _doctor(ns.name, conf, state, root)
        assert text.returncode == 4 and "PROBLEM  hook" in text.stdout
        assert ("fix: iptables-nft -D INPUT" if backend == "ipset" else "fix: systemctl restart sipguard") in text.stdout


def test_exit_status_is_capped_and_unknown_checks_refused(tmp_path):
    many = [Finding("logs", "problem", "x", "y")] * 300 + [Finding("logs", "warning", "x", "y")]
    assert exit_status(many) == 125
    assert as_json(many)["problems"] == 300 and as_json(many)["warnings"] == 1
    with pytest.raises(ValueError, match="unknown check nope"):
        run_checks(Host(cfg_of(tmp_path), tmp_path), ["nope"])
    p = _doctor(None, _toml(tmp_path, "dryrun", tmp_path / "k.log"), tmp_path / "s", tmp_path, "--check", "nope")
    assert p.returncode == 1 and "--check: unknown nope" in p.stderr


def test_doctor_changes_nothing(tmp_path):
    """Read-only: the state directory, the database and the log are as they were."""
    now = time.time()
    log = write_log(tmp_path / "kamailio.log", now)
    state = tmp_path / "state"
    beat(state, now)
    db = state / "sipguard.db"
    before = (db.stat().st_mtime_ns, db.read_bytes())
    before_log = (log.stat().st_mtime_ns, log.read_bytes())
    p = _doctor(None, _toml(tmp_path, "dryrun", log), state, good_root(tmp_path / "root"), "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    assert (db.stat().st_mtime_ns, db.read_bytes()) == before
    # SQLite's own bookkeeping of a read-only reader: at most an empty -wal and the -shm index
    assert {x.name for x in state.iterdir()} <= {"sipguard.db", "sipguard.db-wal", "sipguard.db-shm"}
    assert not (state / "sipguard.db-wal").exists() or (state / "sipguard.db-wal").stat().st_size == 0
    assert (log.stat().st_mtime_ns, log.read_bytes()) == before_log
