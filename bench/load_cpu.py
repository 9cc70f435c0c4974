"""sipguard's CPU at the load's log rate, without the load lab (issue 17's 5% goal).

`python -m bench.load` (tests/lab/load.py: Kamailio, rsyslog, SIPp, the attacks, in namespaces) measured
`sipguard run` at 15% of one core for Kamailio's 526 log lines/s. This replays a log of the same shape
at the same rate into `sipguard run --dry-run` following a file, with nothing else running, so the
daemon's own cost can be measured and profiled in a minute:

    python -m bench.load_cpu [--rate 526] [--seconds 60] [--runs N] [--profile FILE] [--json FILE]
                             [--replay CAPTURED_LOG]

The log: Kamailio's lines as examples/kamailio/kamailio.cfg and rsyslog's RSYSLOG_FileFormat write
them (`2026-12-01T23:16:17.138934+00:00 vm kamailio[11222]: NOTICE: <script>: ...`, stamped when
written), in the mix of a captured run of tests/lab/load.py: per 1000 lines about 453 `auth
challenge` and 453 `REGISTER success` (digest registrations of 3,000 phones, each from its own
address; 1% with a wrong password first: `auth failed`, a second challenge), 84 call lines (`call
attempt`, `INVITE refused (not authenticated)`, `call attempt` with credentials, to 10 callees), and
every 60 s a round of attacks from fresh addresses (a scanner User-Agent, malformed requests, a pike
block, password guessing, extension enumeration, `+` numbers dialled). Every action starts at a
random time (a Poisson process at the rate) and its lines follow each other by a few ms; the writer
appends each line when it is due, in one write() with the other lines due then, as rsyslog does.
`--replay LOG` writes a captured log of the load itself (`python -m bench.load --keep`) instead, each
line at its own time after the first.

Measured: the daemon's utime+stime (/proc) while idle before the log starts, and from the first
line written until its committed position reached the end of the file: CPU seconds per 100,000
lines and the share of one core at the rate. The config is the load lab's (defaults, the `fraud`
distinct jail) with the dry-run enforcer. `--profile FILE` runs the daemon under cProfile (which
costs time of its own: profile to see where, measure without it) and prints the top functions.

It never writes bench/RESULTS.md (its figures are copied there by hand) and touches no firewall.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import random
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from tests.e2e.scenario import FRAUD_JAIL

from .common import SIPGUARD, db_offset, db_status, log, start, stop, wait_for, write_config

RATE = 526.0
"""Kamailio's log lines/s in bench/RESULTS.md's Load run (157,943 lines in 300 s)."""
PHONES = 3000
CALLEES = 10
SG_EXTRA = FRAUD_JAIL
"""The load lab's sipguard config (tests/lab/load.py: SG_CONFIG + FRAUD_JAIL) less its files and kernel."""


def phone_ip(i: int) -> str:
    return f"198.18.{128 + i // 250}.{1 + i % 250}"  # tests/lab/load.py's phone addresses


def _registration(rng: random.Random) -> list[str]:
    i = rng.randrange(PHONES)
    who = f"user {100000 + i} from {phone_ip(i)}:5062"
    out = [f"NOTICE: <script>: auth challenge for {who} method REGISTER"]
    if rng.random() < 0.01:  # a wrong password first
        out += [f"NOTICE: <script>: auth failed for {who} method REGISTER",
                f"NOTICE: <script>: auth challenge for {who} method REGISTER"]
    return out + [f"NOTICE: <script>: REGISTER success for {who}"]


def _call(rng: random.Random) -> list[str]:
    i = rng.randrange(PHONES)
    to = f"to {300000 + rng.randrange(CALLEES)} from {phone_ip(i)}:5064"
    return [f"NOTICE: <script>: call attempt {to}", f"NOTICE: <script>: INVITE refused (not authenticated) {to}",
            f"NOTICE: <script>: call attempt {to}"]


def _attacks(n: int) -> list[list[str]]:
    """Round `n` of attacks, each attacker from a fresh address in 198.19.0.0/16."""
    def ip(k: int) -> str:
        return f"198.19.{n % 250}.{10 + k}"
    return [
        [f"WARNING: <script>: Blocked scanner UA 'friendly-scanner' from {ip(1)}:5060"] * 3,
        [f"ERROR: <script>: Malformed SIP request from {ip(2)}:5060"] * 5,
        [f"WARNING: pike [pike_funcs.c:143]: pike_check_ipaddr(): PIKE - BLOCKing ip {ip(3)}, node=0x7f1c2a4b1e28",
         f"ALERT: <script>: ALERT: pike block OPTIONS from sip:100@sipguard.test (IP:{ip(3)}:5060)"],
        [f"NOTICE: <script>: auth failed for user 100 from {ip(4)}:5060 method REGISTER"] * 6,
        [f"NOTICE: <script>: unknown user {200 + k} from {ip(5)}:5060 method OPTIONS" for k in range(10)],
        [f"NOTICE: <script>: INVITE refused (not authenticated) to +4420794600{k} from {ip(6)}:5060"
         for k in range(8)],
    ]


def schedule(seconds: float, rate: float = RATE, seed: int = 17) -> list[tuple[float, str]]:
    """(time from the start, message after the syslog header) for `seconds` of the load's log."""
    rng = random.Random(seed)
    per_reg, per_call = 2.03, 3.0  # lines per action
    regs = 0.453 * rate / 1.01  # registrations/s: 453 challenges per 1000 lines
    calls = 0.084 * rate / per_call
    attack_lines = sum(len(a) for a in _attacks(0)) / 60.0
    scale = (rate - attack_lines) / (regs * per_reg + calls * per_call)
    out: list[tuple[float, str]] = []
    for kind, per_s in ((_registration, regs * scale), (_call, calls * scale)):
        for _ in range(int(per_s * seconds)):
            t = rng.uniform(0, seconds)
            for k, msg in enumerate(kind(rng)):
                out.append((t + k * rng.uniform(0.001, 0.005), msg))
    n, t = 0, min(15.0, seconds / 3)
    while t < seconds:  # a round every 60 s from 15 s on (the load's first round came at 15-30 s)
        for attacker in _attacks(n):
            t0 = t + rng.uniform(0, 2)
            out += [(t0 + k * 0.02, msg) for k, msg in enumerate(attacker)]
        n, t = n + 1, t + 60.0
    out.sort()
    return [(t, m) for t, m in out if t < seconds]


_CAPTURED = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)([+-]\d\d:\d\d|Z) \S+ kamailio\[\d+\]: (.*)$")


def replay(path: Path, seconds: float) -> list[tuple[float, str]]:
    """A captured log of the load (`python -m bench.load --keep`: its work directory's kamailio.log), at
    the times it was written: (seconds after its first line, message), its first `seconds` seconds."""
    out: list[tuple[float, str]] = []
    t0 = None
    with path.open(encoding="utf-8", errors="surrogateescape") as fh:
        for raw in fh:
            m = _CAPTURED.match(raw.rstrip("\n"))
            if m is None:
                continue
            t = datetime.fromisoformat(m.group(1) + ("+00:00" if m.group(2) == "Z" else m.group(2))).timestamp()
            t0 = t if t0 is None else t0
            if t - t0 >= seconds:
                break
            out.append((t - t0, m.group(3)))
    if not out:
        raise SystemExit(f"{path}: no RSYSLOG_FileFormat kamailio lines")
    return out


def _header(pid: int) -> bytes:
    now = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    return f"{now} vm kamailio[{pid}]: ".encode()


def write_at_rate(target: Path, lines: list[tuple[float, str]], rng: random.Random) -> tuple[int, float]:
    """Append each line when it is due (lines due together in one write); (bytes written, seconds)."""
    fd = os.open(target, os.O_WRONLY | os.O_APPEND)
    written = 0
    t0 = time.monotonic()
    try:
        i = 0
        while i < len(lines):
            now = time.monotonic() - t0
            if lines[i][0] > now:
                time.sleep(min(lines[i][0] - now, 0.05))
                continue
            buf = bytearray()
            while i < len(lines) and lines[i][0] <= now:
                buf += _header(rng.choice((11222, 11223, 11224, 11225))) + lines[i][1].encode() + b"\n"
                i += 1
            written += os.write(fd, bytes(buf))
    finally:
        os.close(fd)
    return written, time.monotonic() - t0


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _threads(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of `pid` (the main thread's id is the pid: the loop; the others are the
    file watcher's, the journal reader's, the fleet's)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def measure(work: Path, rate: float = RATE, seconds: float = 60.0, idle: float = 5.0, seed: int = 17,
            profile: Path | None = None, captured: Path | None = None) -> dict:
    lines = schedule(seconds, rate, seed) if captured is None else replay(captured, seconds)
    if captured is not None:
        rate = len(lines) / max(lines[-1][0], 1e-9)
    state = work / "state"
    shutil.rmtree(state, ignore_errors=True)
    target = work / "kamailio.log"
    target.write_bytes(b"")
    cfg = write_config(work / "sipguard.toml", SG_EXTRA)
    cmd = [*SIPGUARD, "--config", str(cfg), "--state-dir", str(state), "run", "--dry-run", "--log", str(target)]
    if profile is not None:  # python -m cProfile -o FILE -m sipguard ... (it writes the file at the exit)
        cmd = [cmd[0], "-m", "cProfile", "-o", str(profile), *cmd[1:]]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    d = start(cmd, env=env, stderr=(work / "sipguard.err").open("wb"))
    try:
        if not wait_for(lambda: (state / "sipguard.db").exists() and bool(db_status(state).get("running")), 60):
            raise RuntimeError(f"sipguard run did not start: {(work / 'sipguard.err').read_text()[-2000:]}")
        time.sleep(1.0)  # the start-up's last work (restore, first heartbeat) out of the idle figure
        c0 = _cpu(d.pid)
        time.sleep(idle)
        c1 = _cpu(d.pid)
        t1 = _threads(d.pid)
        log(f"load_cpu: writing {len(lines):,} lines at {rate:.0f}/s for {seconds:g} s"
            + (f" (the times of {captured})" if captured else ""))
        wall0 = time.monotonic()
        written, took = write_at_rate(target, lines, random.Random(seed))
        caught = wait_for(lambda: db_offset(state, str(target)) >= written, 60, 0.01)
        wall = time.monotonic() - wall0
        c2 = _cpu(d.pid)
        t2 = _threads(d.pid)
        st = db_status(state)
    finally:
        stop(d, timeout=30)
    busy = c2 - c1
    res = {
        "rate": rate, "seconds": seconds, "lines": len(lines), "bytes": written, "write_seconds": took,
        "wall_seconds": wall, "caught_up": caught, "cpu_seconds": busy,
        "cpu_share": busy / wall, "cpu_seconds_per_100k_lines": busy / len(lines) * 100_000,
        "idle_seconds": idle, "idle_cpu_share": (c1 - c0) / idle,
        "events": st.get("daemon", {}).get("events"), "bans": st.get("daemon", {}).get("bans"),
        "profiled": profile is not None, "replayed": None if captured is None else str(captured),
        "main_thread_cpu_seconds": t2.get(d.pid, 0.0) - t1.get(d.pid, 0.0),
        "other_threads_cpu_seconds": {str(t): round(v - t1.get(t, 0.0), 2) for t, v in t2.items() if t != d.pid},
    }
    log(f"load_cpu: {busy:.2f} s CPU over {wall:.1f} s = {100 * res['cpu_share']:.2f}% of one core; "
        f"{res['cpu_seconds_per_100k_lines']:.2f} s per 100k lines; idle {100 * res['idle_cpu_share']:.2f}%; "
        f"events {res['events']}, bans {res['bans']}; main thread {res['main_thread_cpu_seconds']:.2f} s, "
        f"others {res['other_threads_cpu_seconds']}")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=RATE, help="log lines per second")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long the log is written")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measured before")
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--runs", type=int, default=1, help="repeat; the median run is reported")
    ap.add_argument("--replay", help="a captured load log (bench.load --keep) written at its own times instead")
    ap.add_argument("--profile", help="run the daemon under cProfile, write its stats here, print the top")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--work", help="scratch directory (default: a temp dir, removed)")
    a = ap.parse_args(argv)
    if not (0 < a.rate <= 100_000 and 0 < a.seconds <= 3600 and 1 <= a.runs <= 20):
        ap.error("rate in (0, 100000], seconds in (0, 3600], runs 1..20")
    work = Path(a.work or tempfile.mkdtemp(prefix="sgb-loadcpu-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        runs = [measure(work, a.rate, a.seconds, a.idle, a.seed + k, Path(a.profile) if a.profile else None,
                        Path(a.replay) if a.replay else None) for k in range(a.runs)]
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    runs.sort(key=lambda r: r["cpu_share"])
    res = {**runs[len(runs) // 2], "runs": runs}
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    if a.profile:
        s = pstats.Stats(a.profile)
        s.sort_stats("tottime").print_stats(30)
        s.sort_stats("cumulative").print_stats(40)
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}))
    return 0 if all(r["caught_up"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
