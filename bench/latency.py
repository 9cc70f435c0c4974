"""Ban latency: from the moment a line is written to the followed file to the moment its address
is in the kernel set, for sipguard (ipset enforcer) and for fail2ban-server (ipset action, each
backend), each in its own network namespace.

One new attacker address per line (a pike block: threshold 1 in both), written at a fixed rate;
a poller tests every pending address in the set over netlink every ~0.5 ms.

    python -m bench.latency inner-sipguard WORK N RATE      (run inside a namespace by `measure`)
    python -m bench.latency inner-fail2ban WORK N RATE BACKEND
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .common import F2B_FILTER, PY, ROOT, SIPGUARD, db_status, log, netns, pct, start, stop, wait_for, write_config
from .genlog import attacker_address_n, syslog_stamp


def _line(ip: str) -> bytes:
    return (f"{syslog_stamp(time.time())} sip1 kamailio[23866]: WARNING: pike [pike_funcs.c:135]: "
            f"pike_check_ipaddr(): PIKE - BLOCKing ip {ip}, node=0x7f00deadbeef\n").encode()


def _drive(logf: Path, set_name: str, n: int, rate: float, offset: int) -> dict:
    """Write n lines at `rate`/s, poll the set; latencies in ms."""
    from pyroute2.ipset import IPSet

    ips = IPSet()
    ips_test = ips.test
    fd = os.open(logf, os.O_WRONLY | os.O_APPEND)
    pending: dict[str, float] = {}
    lat: list[float] = []
    missing = 0
    t0 = time.perf_counter()
    k = 0
    try:
        while k < n or pending:
            now = time.perf_counter()
            if k < n and now >= t0 + k / rate:
                ip = attacker_address_n(offset + k)
                data = _line(ip)
                t_w = time.perf_counter()
                os.write(fd, data)
                pending[ip] = t_w
                k += 1
            for ip, t_w in list(pending.items()):
                try:
                    hit = ips_test(set_name, ip, family=socket.AF_INET)
                except Exception:  # noqa: BLE001 - set not created yet
                    hit = False
                t = time.perf_counter()
                if hit:
                    lat.append((t - t_w) * 1000)
                    del pending[ip]
                elif t - t_w > 10.0:
                    missing += 1
                    del pending[ip]
            time.sleep(0.0005)
    finally:
        os.close(fd)
        ips.close()
    return {"n": n, "rate": rate, "banned": len(lat), "missing": missing, "latencies_ms": lat,
            "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99), "max_ms": max(lat, default=0)}


def inner_sipguard(work: Path, n: int, rate: float) -> dict:
    state = work / "state"
    logf = work / "kamailio.log"
    logf.write_bytes(b"")
    cfg = write_config(work / "sipguard.toml")
    d = start([*SIPGUARD, "--config", str(cfg), "--state-dir", str(state), "run", "--log", str(logf)])
    try:
        if not wait_for(lambda: bool(db_status(state).get("running")), 30):
            raise RuntimeError("sipguard run did not start")
        warm = _drive(logf, "sipguard-v4", 5, 50, 100_000)  # first ban creates the sets and hook
        res = _drive(logf, "sipguard-v4", n, rate, 0)
        res["warmup_ms"] = warm["latencies_ms"]
        return res
    finally:
        stop(d)


F2B_CONF = """[Definition]
loglevel = INFO
logtarget = {work}/fail2ban.log
socket = {work}/fail2ban.sock
pidfile = {work}/fail2ban.pid
dbfile = {work}/fail2ban.sqlite3
dbpurgeage = 1d
"""

JAIL_CONF = """[DEFAULT]
usedns = no
ignoreself = false
ignoreip =
backend = {backend}

[kam]
enabled = true
filter = sipguard-kamailio
logpath = {logf}
maxretry = 1
findtime = 600
bantime = 3600
action = {action}[name=kam, port="5060", protocol=udp]
"""


def fail2ban_confdir(work: Path, logf: Path, backend: str, action: str) -> Path:
    """A private fail2ban configuration (socket, pid, db, log all in `work`): never the host's service."""
    conf = work / "conf"
    shutil.rmtree(conf, ignore_errors=True)
    (conf / "filter.d").mkdir(parents=True)
    shutil.copytree("/etc/fail2ban/action.d", conf / "action.d")
    shutil.copy(F2B_FILTER, conf / "filter.d")
    for name in ("paths-common.conf", "paths-debian.conf"):
        if Path("/etc/fail2ban", name).exists():
            shutil.copy(Path("/etc/fail2ban", name), conf)
    (conf / "fail2ban.conf").write_text(F2B_CONF.format(work=work))
    (conf / "jail.conf").write_text(JAIL_CONF.format(backend=backend, logf=logf, action=action))
    return conf


def start_fail2ban(work: Path, conf: Path):
    p = start(["fail2ban-client", "-c", str(conf), "-s", str(work / "fail2ban.sock"), "-p",
               str(work / "fail2ban.pid"), "-f", "-x", "start"])
    ok = wait_for(lambda: "Jail 'kam' started" in _read(work / "fail2ban.log")
                  or "Jail kam started" in _read(work / "fail2ban.log"), 60, 0.1)
    if not ok:
        stop(p)
        raise RuntimeError("fail2ban did not start: " + _read(work / "fail2ban.log")[-2000:])
    return p


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except OSError:
        return ""


def inner_fail2ban(work: Path, n: int, rate: float, backend: str) -> dict:
    logf = work / "kamailio.log"
    logf.write_bytes(b"")
    conf = fail2ban_confdir(work, logf, backend, "iptables-ipset")
    p = start_fail2ban(work, conf)
    try:
        time.sleep(1.0)
        warm = _drive(logf, "f2b-kam", 3, 2, 100_000)
        res = _drive(logf, "f2b-kam", n, rate, 0)
        res["warmup_ms"] = warm["latencies_ms"]
        res["backend"] = backend
        return res
    finally:
        stop(p)


def measure(kind: str, n: int, rate: float, work: Path, backend: str = "auto") -> dict:
    """Run one latency measurement in a fresh namespace; returns the inner JSON."""
    shutil.rmtree(work, ignore_errors=True)  # no state (bans, databases) from an earlier run
    work.mkdir(parents=True)
    with netns(f"lat-{kind[:3]}-{backend[:4]}") as ns:
        args = [PY, "-m", "bench.latency", f"inner-{kind}", str(work), str(n), str(rate)]
        if kind == "fail2ban":
            args.append(backend)
        timeout = 120 + n / rate * 3 + 60
        p = start(args, ns=ns, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, errs = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(p)  # SIGTERM: the inner stops its own daemon before exiting
            raise
        if p.returncode != 0:
            raise RuntimeError(f"latency {kind} failed: {errs[-3000:]}")
    res = json.loads(out)
    log(f"latency {kind}{'/' + backend if kind == 'fail2ban' else ''}: p50 {res['p50_ms']:.1f} ms, "
        f"p95 {res['p95_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms ({res['banned']} bans, {res['missing']} missing)")
    return res


def _terminate(*_: object) -> None:
    raise SystemExit(143)  # so the finally blocks stop the daemons this process started


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    kind, work, n, rate = argv[0], Path(argv[1]), int(argv[2]), float(argv[3])
    if kind == "inner-sipguard":
        res = inner_sipguard(work, n, rate)
    elif kind == "inner-fail2ban":
        res = inner_fail2ban(work, n, rate, argv[4])
    else:
        raise SystemExit(f"unknown {kind}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
