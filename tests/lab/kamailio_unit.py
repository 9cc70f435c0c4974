"""A real Kamailio (examples/kamailio/kamailio.cfg, logging to syslog) as Debian's kamailio.service runs
it, in a private systemd-journald (tests/lab/journald.py): user kamailio, inside the cgroup
/system.slice/kamailio.service, so journald records `_SYSTEMD_UNIT=kamailio.service` and applies its
per-service rate limit to it. For tests/test_storm.py and bench/storm.py.

`lifted=True` writes what systemd writes for a drop-in's `LogRateLimitIntervalSec=0`
(examples/systemd/kamailio.service.d/sipguard-ratelimit.conf) and journald reads:
/run/systemd/units/log-rate-limit-interval:kamailio.service -> 0 (there is no systemd here to read the
drop-in itself). `sources` is a CIDR made local on lo (`ip route add local`): a storm may send from any
of its addresses. Everything lives in the private journald's namespaces and is stopped with them.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from . import journald as lab_journald
from .netns import check_addr

KAMAILIO_BIN = "/usr/sbin/kamailio"
PROXY = "198.18.0.1"


def available() -> bool:
    return lab_journald.available() and os.path.exists(KAMAILIO_BIN)


def wait_udp(j: lab_journald.PrivateJournald, addr: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if addr in j.run("ss", "-lunH", check=False).stdout.decode():
            time.sleep(0.3)
            return
        time.sleep(0.1)
    raise AssertionError(f"nothing listening on {addr}")


@contextlib.contextmanager
def kamailio_unit(conf: str, lifted: bool = False, sources: str = "198.18.64.0/18",
                  children: int | None = None) -> Iterator[lab_journald.PrivateJournald]:
    """The private journald (`conf` is its journald.conf) with Kamailio running in kamailio.service."""
    from .kamailio import prepare_config

    check_addr(sources.split("/")[0])
    work = Path(tempfile.mkdtemp(prefix="sgd-kamunit-", dir="/tmp"))
    kam = None
    try:
        work.chmod(0o755)
        cfg_path = prepare_config(work, PROXY)
        text = "".join(ln for ln in cfg_path.read_text().splitlines(keepends=True) if not ln.startswith("log_name="))
        if children is not None:
            text = re.sub(r"^children=\d+$", f"children={int(children)}", text, flags=re.M)
        cfg_path.write_text(text)
        run_dir = work / "run"
        run_dir.mkdir()
        os.chown(run_dir, pwd.getpwnam("kamailio").pw_uid, -1)
        with lab_journald.PrivateJournald(conf=conf, prefix="sgd-jd-", units=True) as j:
            if lifted:
                j.run("sh", "-c", "mkdir -p /run/systemd/units && "
                      "ln -s 0 /run/systemd/units/log-rate-limit-interval:kamailio.service")
            j.run("ip", "route", "add", "local", sources, "dev", "lo")
            kam = j.popen(KAMAILIO_BIN, "-DD", "-f", str(cfg_path), "-Y", str(run_dir), "-P", str(run_dir / "k.pid"),
                          "-w", str(work), user="kamailio", unit="kamailio.service", stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_udp(j, f"{PROXY}:5060")
            yield j
            kam.kill()  # nsenter; Kamailio itself ends with the namespace
            kam.wait(5)
    finally:
        shutil.rmtree(work, ignore_errors=True)


STORM_SENDER = r"""
import ipaddress, socket, sys, time
n, proxy, net, seconds = int(sys.argv[1]), sys.argv[2], ipaddress.ip_network(sys.argv[3]), float(sys.argv[4])
hosts = iter(net.hosts())
t0 = time.monotonic()
for i in range(n):
    ip = str(next(hosts))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ip, 5060))
    s.sendto((f"OPTIONS sip:100@{proxy} SIP/2.0\r\nVia: SIP/2.0/UDP {ip}:5060;branch=z9hG4bK{i}x\r\n"
              f"From: <sip:100@{proxy}>;tag={i}\r\nTo: <sip:100@{proxy}>\r\nCall-ID: storm{i}@{ip}\r\n"
              f"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nUser-Agent: friendly-scanner\r\n"
              f"Content-Length: 0\r\n\r\n").encode(), (proxy, 5060))
    s.close()
    if seconds > 0:
        ahead = t0 + seconds * (i + 1) / n - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
print(f"{time.monotonic() - t0:.3f}")
"""
"""One scanner OPTIONS (User-Agent friendly-scanner) from each of the first N addresses of a network,
spread over `seconds` (0: as fast as it goes); prints how long it took. Bounded by N."""


def storm(j: lab_journald.PrivateJournald, n: int, net: str, seconds: float = 0.0, user: int | None = None) -> float:
    """Send the storm from inside the namespace; returns the sender's own duration (s)."""
    n = max(0, min(int(n), 60_000))
    r = j.run("/usr/bin/python3", "-c", STORM_SENDER, str(n), PROXY, net, str(seconds),
              user=pwd.getpwnam("nobody").pw_uid if user is None else user, timeout=120, check=False)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.decode()[-2000:])
    return float(r.stdout.decode().strip() or 0)
