"""`make demo`: sipguard against a real Kamailio under real attack tools, narrated.

Runs the same scenario as tests/e2e/test_scenario.py in network namespaces sgdemo-* (a leftover
from an interrupted run is cleaned first), prints what attacked, what sipguard saw and banned and
when, the proof that banned sources are dropped and that the phone was never touched, then tears
everything down. The host's own firewall, routes and interfaces are never changed.

Run as root from the repository root: `make demo` (or `.venv/bin/python -m tests.e2e.demo`).
`--journal`: Kamailio logs into a private systemd-journald as kamailio.service, and sipguard follows
`[sources] journal = ["kamailio.service"]` through journalctl (default: a private rsyslogd writing a
file). `--json`: Kamailio's JSON log engine (`--log-engine=json:UM`) instead of its classic text.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.e2e.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--journal", action="store_true",
                    help="Kamailio -> private systemd-journald (kamailio.service) -> journalctl -> sipguard")
    ap.add_argument("--json", action="store_true", help="Kamailio's JSON log engine (--log-engine=json:UM)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("make demo needs root (it builds network namespaces)", file=sys.stderr)
        return 2
    from tests.e2e.scenario import MAX_BAN_LATENCY, attacks, install_signal_handlers, report, run_scenario

    install_signal_handlers()
    t0 = time.monotonic()
    how = ("its journal (a private systemd-journald, read through journalctl)" if args.journal
           else "its log (a private rsyslogd writing a file)")
    print(f"sipguard demo: a Kamailio 5.6 SIP edge in its own network namespace, {len(attacks())} attackers "
          "and one real phone in theirs;")
    print(f"sipguard follows {how}{' in the JSON log engine' if args.json else ''} and bans in the kernel.\n")
    res, failures = run_scenario(prefix="sgdemo-", echo=lambda s: print(s, flush=True),
                                 log_path="journal" if args.journal else "rsyslog",
                                 log_engine="json:UM" if args.json else None)
    report(res)
    print("")
    print(f"Everything torn down (namespaces sgdemo-* deleted); the host firewall was never touched. "
          f"{time.monotonic() - t0:.1f}s.")
    if failures:
        print("\nPROBLEMS:", *failures, sep="\n  ")
        return 1
    worst = max(a.latency_decisive or 0 for a in res.attacks)
    print(f"All {len(res.attacks)} attackers banned; slowest ban {worst:.3f}s after its decisive packet "
          f"(limit {MAX_BAN_LATENCY:.0f}s).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
