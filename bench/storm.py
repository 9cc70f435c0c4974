"""Where lines start to be lost in a storm, between Kamailio and what sipguard follows (issue 12 part 3).

Run as root: ``PYTHONPATH=. .venv/bin/python -m bench.storm`` (about two minutes); writes
``bench/storm.json`` and prints the table the README quotes.

Each row: a private systemd-journald (tests/lab/journald.py) with the journald.conf of the row (stock:
journald's built-in defaults, RateLimitIntervalSec=30s, RateLimitBurst=10000 scaled up with the free
space of the journal's file system), a real Kamailio 5.6.3 with examples/kamailio/kamailio.cfg as the
unit kamailio.service (tests/lab/kamailio_unit.py; `children` UDP workers), and a storm: one scanner
OPTIONS (User-Agent friendly-scanner, so one `Blocked scanner UA` line each) from each of N distinct
addresses, as fast as one sender goes or spread over S seconds. Counted afterwards:

* `udp_dropped`: datagrams the kernel dropped at Kamailio's receive buffer (the namespace's
  /proc/net/snmp Udp RcvbufErrors: they never reached a route, so no line);
* `handled`: N minus those; `in_journal`: the `Blocked scanner UA` entries journald kept for the unit;
* `journald_dropped`: handled - in_journal, and journald's own count from its notice(s) (N_DROPPED,
  read after the rate-limit interval ended) where it dropped any.

Bounded: at most 60,000 datagrams a row, every wait has a deadline; everything runs inside the
private journald's namespaces (198.18.0.0/15 only) and is stopped with them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.lab import journald as lab_journald
from tests.lab.kamailio_unit import available, kamailio_unit, storm

OUT = Path(__file__).resolve().parent / "storm.json"
NET = "198.19.0.0/16"  # 65,534 sources
DROPPED_ID = "a596d6fe7bfa4994828e72309e95d61e"
STOCK = lab_journald.CONF.replace("RateLimitIntervalSec=0\n", "")  # journald's own rate-limit defaults
SMALL = lab_journald.CONF.replace("RateLimitIntervalSec=0", "RateLimitIntervalSec=30s\nRateLimitBurst=1000")

ROWS = [
    # name, journald.conf, lifted (drop-in), children, N, seconds
    ("burst 2,000, stock", STOCK, False, 4, 2000, 0.0),
    ("burst 12,000, stock", STOCK, False, 4, 12000, 0.0),
    ("burst 12,000, children=16", STOCK, False, 16, 12000, 0.0),
    ("16,000 over 20 s, stock", STOCK, False, 4, 16000, 20.0),
    ("50,000 over 20 s, stock", STOCK, False, 4, 50000, 20.0),
    ("16,000 over 20 s, RateLimitBurst=1000", SMALL, False, 4, 16000, 20.0),
    ("16,000 over 20 s, RateLimitBurst=1000 + drop-in", SMALL, True, 4, 16000, 20.0),
]


def log(msg: str) -> None:
    print(f"[storm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def udp_counters(j: lab_journald.PrivateJournald) -> dict[str, int]:
    lines = [ln.split() for ln in j.run("cat", "/proc/net/snmp").stdout.decode().splitlines() if ln.startswith("Udp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))


def scanner_lines(j: lab_journald.PrivateJournald) -> int:
    p = subprocess.run([str(j.journalctl), "-u", "kamailio.service", "-o", "cat", "--no-pager", "--quiet"],
                       capture_output=True, timeout=120)
    return sum(1 for ln in p.stdout.splitlines() if b"Blocked scanner UA" in ln)


def notices(j: lab_journald.PrivateJournald) -> list[dict]:
    return [e for e in j.entries("-u", "kamailio.service", f"MESSAGE_ID={DROPPED_ID}")
            if e.get("_TRANSPORT") == "driver"]


def row(name: str, conf: str, lifted: bool, children: int, n: int, seconds: float) -> dict:
    with kamailio_unit(conf, lifted, sources=NET, children=children) as j:
        time.sleep(1.0)
        before = udp_counters(j)
        t0 = time.monotonic()
        took = storm(j, n, NET, seconds)
        # Kamailio works off its socket queue; journald writes: wait until the journal stops growing
        last, deadline = -1, time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(1.0)
            got = scanner_lines(j)
            if got == last:
                break
            last = got
        after = udp_counters(j)
        udp_dropped = after.get("RcvbufErrors", 0) - before.get("RcvbufErrors", 0)
        handled = n - udp_dropped
        in_journal = scanner_lines(j)
        said = None
        if handled - in_journal > 0 and not lifted:
            # journald says what it dropped with the next line after the interval: wait it out, then one line
            interval = 30.0
            wait = max(0.0, t0 + interval + 1.0 - time.monotonic())
            time.sleep(wait)
            storm(j, 1, "198.18.0.51/32")
            time.sleep(1.0)
            said = sum(int(e.get("N_DROPPED", 0)) for e in notices(j))
    r = {"row": name, "children": children, "sent": n, "seconds": round(took, 2), "rate": round(n / max(took, 1e-3)),
         "udp_dropped": udp_dropped, "handled": handled, "in_journal": in_journal,
         "journald_dropped": handled - in_journal, "journald_said": said, "drop_in": lifted}
    log(json.dumps(r))
    return r


def render(rows: list[dict]) -> str:
    out = ["| storm | sent | in (s) | rate (/s) | dropped at Kamailio's socket | lines journald kept | "
           "journald dropped (its notice) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        said = "" if r["journald_said"] is None else f" ({r['journald_said']})"
        out.append(f"| {r['row']} | {r['sent']:,} | {r['seconds']} | {r['rate']:,} | {r['udp_dropped']:,} | "
                   f"{r['in_journal']:,} | {r['journald_dropped']:,}{said} |")
    return "\n".join(out)


def main() -> int:
    if not available():
        print("needs root, systemd-journald, unshare/nsenter/setpriv and kamailio", file=sys.stderr)
        return 2
    rows = [row(*spec) for spec in ROWS]
    OUT.write_text(json.dumps({"started": time.time(), "rows": rows}, indent=1) + "\n")
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
