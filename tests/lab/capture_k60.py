#!/usr/bin/env python3
"""Capture tests/data/real/k60-*: what Kamailio 6.0.1 under Debian 13's stock kamailio.service logs.

Run as root from the repository root::

    PYTHONPATH=. .venv/bin/python -m tests.lab.capture_k60            # every capture
    PYTHONPATH=. .venv/bin/python -m tests.lab.capture_k60 journal    # some: journal journal-kjson fraud

A Debian 13 (trixie) container from packaging/rootfs.py's cache (`test` flavour: Kamailio 6.0.1 from
Debian) boots with systemd as PID 1 (tests/lab/container.py) in the hub namespace of a lab
(`sgk60-<pid>-hub`, proxy 198.18.0.1, one client namespace per sender). Kamailio runs as Debian's own
`kamailio.service` (User=kamailio, ExecStart=/usr/sbin/kamailio ..., logging to the journal: no rsyslog
in the container) with `examples/kamailio/kamailio.cfg` minus its `log_name="kamailio"` line, so the
syslog identifier is the stock one, argv[0] `/usr/sbin/kamailio`. The senders are
tests/lab/capture_real_logs.py's (the same SCENARIO as the 5.6.3 captures, and FRAUD_SCENARIO), from
the host's SIPVicious and the lab's SIP client, each from its own address. Each capture stops
kamailio.service (the boot started it with Debian's stock config, or it is the previous capture's),
takes the journal's cursor, starts it again (fresh pike and htable state) and, after the scenario and a
stop (its shutdown lines flushed), dumps what came after that cursor with the commands an operator uses:

* ``journal``      -> ``k60-journal.json`` (``journalctl -u kamailio.service -o json``) and
  ``k60-journal-short-iso.log`` (``journalctl -u kamailio.service -o short-iso``): the classic engine
* ``journal-kjson`` -> ``k60-journal-kjson.json``, ``k60-journal-kjson-short-iso.log``: the same with the
  JSON log engine, ``--log-engine=json:UM`` added by a drop-in (README's ``systemctl edit kamailio``)
* ``fraud``        -> ``k60-fraud-journal.json``, ``k60-fraud-journal-short-iso.log``: FRAUD_SCENARIO
  (fraud prober, relay, ACL, not-local, secfilter verdicts, a phone calling), classic engine

Everything is torn down afterwards (container, namespaces), even on failure; nothing is done to the
host's firewall, routes or interfaces and all traffic stays in 198.18.0.0/24 inside the lab.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import REPO_ROOT
from .capture_real_logs import DOMAIN, FRAUD_SCENARIO, PROXY, SCENARIO, play
from .container import Container
from .kamailio import prepare_config
from .netns import Lab

OUT_DIR = REPO_ROOT / "tests" / "data" / "real"
PREFIX = "sgk60-"
CAPTURES = {  # name -> (file stem, --log-engine or None, scenario)
    "journal": ("k60-journal", None, SCENARIO),
    "journal-kjson": ("k60-journal-kjson", "json:UM", SCENARIO),
    "fraud": ("k60-fraud-journal", None, FRAUD_SCENARIO),
}
# README's drop-in for the JSON log engine (Debian's unit has no options variable in ExecStart)
ENGINE_DROPIN = """[Service]
ExecStart=
ExecStart=/usr/sbin/kamailio -P /run/kamailio/kamailio.pid -f $CFGFILE -m $SHM_MEMORY -M $PKG_MEMORY --log-engine={engine}
"""
DROPIN = "/etc/systemd/system/kamailio.service.d/sgk60-engine.conf"


def stock_ident_config(listen_ip: str, *, keep_log_name: bool = False) -> tuple[str, dict[str, bytes]]:
    """The example config for /etc/kamailio (db_text tables there) and its tables; without
    `log_name` unless *keep_log_name*, so the identifier is Debian 13's stock `/usr/sbin/kamailio`."""
    with tempfile.TemporaryDirectory(prefix="sgk60-cfg-") as d:
        cfg = prepare_config(Path(d), listen_ip).read_text()
        cfg = cfg.replace(f"text://{Path(d) / 'dbtext'}", "text:///etc/kamailio/dbtext")
        tables = {f.name: f.read_bytes() for f in (Path(d) / "dbtext").iterdir()}
    if not keep_log_name:
        if cfg.count('\nlog_name="kamailio"\n') != 1:
            raise RuntimeError("the example config has no single log_name line to drop")
        cfg = cfg.replace('\nlog_name="kamailio"\n', "\n")
    return cfg, tables


def install_config(c: Container, cfg: str, tables: dict[str, bytes]) -> None:
    c.put("/etc/kamailio/kamailio.cfg", cfg)
    for name, data in tables.items():
        c.put(f"/etc/kamailio/dbtext/{name}", data)


def restart_kamailio(c: Container, engine: str | None, timeout: float = 30) -> None:
    """(Re)start kamailio.service with the engine's drop-in (or none); wait until it listens."""
    if engine:
        c.put(DROPIN, ENGINE_DROPIN.format(engine=engine))
    else:
        (c.root / DROPIN.lstrip("/")).unlink(missing_ok=True)
    c.sh("chown -R kamailio:kamailio /etc/kamailio/dbtext && systemctl daemon-reload && "
         "systemctl restart kamailio.service", timeout=60)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f"{PROXY}:5060" in c.sh("ss -lunH", check=False).stdout:
            time.sleep(0.5)  # the children finish initialising
            return
        time.sleep(0.2)
    raise RuntimeError("kamailio.service not listening:\n" + journal(c, "short-iso", None)[-3000:].decode(
        errors="replace"))


def last_cursor(c: Container) -> str | None:
    out = c.sh("journalctl -o json -n 1 --no-pager", check=False).stdout.strip().splitlines()
    return json.loads(out[-1])["__CURSOR"] if out else None


def journal(c: Container, fmt: str, after: str | None) -> bytes:
    """`journalctl -u kamailio.service -o FMT` (after the cursor *after*), as bytes."""
    argv = ["journalctl", "-u", "kamailio.service", "-o", fmt, "--no-pager"]
    if after:
        argv.append(f"--after-cursor={after}")
    r = subprocess.run(c.cmd(*argv), capture_output=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"journalctl failed: {r.stderr[-500:]!r}")
    return r.stdout


def version(c: Container) -> str:
    return c.sh("kamailio -v | head -1").stdout.strip()


def main(argv: list[str]) -> int:
    names = argv or list(CAPTURES)
    bad = [n for n in names if n not in CAPTURES]
    if bad:
        print(f"unknown capture {bad}; choose from {', '.join(CAPTURES)}", file=sys.stderr)
        return 2
    tag = str(os.getpid())
    with Lab(tag, proxy_ip=PROXY, prefix=PREFIX) as lab:
        lab.hub.sysctl("net.unix.max_dgram_qlen", "512")
        with Container("trixie", lab.hub, name=f"sgk60c{tag}") as c:
            cfg, tables = stock_ident_config(PROXY)
            install_config(c, cfg, tables)
            print(f"[k60] {version(c)}; systemd {c.sh('systemctl --version | head -1').stdout.strip()}",
                  flush=True)
            for n in names:
                stem, engine, scenario = CAPTURES[n]
                c.sh("systemctl stop kamailio.service", timeout=60)  # the boot's (or last capture's) instance
                cursor = last_cursor(c)  # each capture starts with its own Kamailio's start-up
                restart_kamailio(c, engine)
                time.sleep(1.0)
                play(lab, scenario, n)
                time.sleep(1.0)
                c.sh("systemctl stop kamailio.service", timeout=60)  # its shutdown lines are flushed too
                time.sleep(0.5)
                for fmt, suffix in (("json", ".json"), ("short-iso", "-short-iso.log")):
                    out = OUT_DIR / f"{stem}{suffix}"
                    out.write_bytes(journal(c, fmt, cursor))
                    print(f"[k60] wrote {out} ({len(out.read_bytes().splitlines())} lines)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
