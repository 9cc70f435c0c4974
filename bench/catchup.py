"""Daemon catch-up with a journal source beside a file: `sipguard run --dry-run --from-start` over a big
generated log, alone and with an idle journal source configured beside it (`[sources] journal =
["kamailio.service"]`), alternated A B A B, each run on a fresh state directory; the time from starting
the process until its committed position reaches the end of the file.

The journal must be idle. The real `journalctl` is used when it is here and, for the unit, has nothing
to print and just waits (a machine without systemd as PID 1 and without journal files: it follows an
empty journal until SIGTERM); otherwise a small stand-in script is written into the work directory and
configured as `[sources] journalctl`: it prints nothing, returns at once when asked for the newest
entry, and with `--follow` waits until SIGTERM ends it. Either way the daemon's child processes are
counted while it runs (they must stay bounded: one follower, plus the short newest-entry query) and
every one seen is ended by its PID if it outlives the daemon (counted as `children_left`: must be 0).

Runs processes and reads /proc only: never changes anything outside its work directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .common import SIPGUARD, db_offset, db_status, log, median, start, stop, write_config
from .throughput import ensure_log

UNIT = "kamailio.service"
CONFIG = '[store]\nmax_events = 200000\n[daemon]\nprune_interval = "5s"\n'  # as the daemon row's
STUB = """#!/bin/sh
# An idle `journalctl` for bench/catchup.py: prints nothing. The one-shot query (the newest entry)
# returns at once; `--follow` becomes `sleep`, which SIGTERM ends (one process, the PID the daemon knows).
for a in "$@"; do
  if [ "$a" = "--follow" ]; then exec sleep infinity; fi
done
exit 0
"""


def write_stub(work: Path) -> Path:
    path = work / "journalctl-idle"
    path.write_text(STUB)
    path.chmod(0o755)
    return path


def _end(p: subprocess.Popen) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait(5)


def journal_is_idle(journalctl: str, unit: str = UNIT, wait: float = 1.0) -> bool:
    """True when `journalctl` has no entry for `unit` and, following it the way the daemon does,
    prints nothing for `wait` seconds, then exits on SIGTERM."""
    try:
        q = subprocess.run([journalctl, "--output=json", "--lines=1", "--no-pager", "--quiet", "--unit", unit],
                           capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if q.returncode != 0 or q.stdout.strip():
        return False
    p = subprocess.Popen([journalctl, "--follow", "--output=json", "--all", "--no-pager", "--quiet",
                          "--unit", unit, "--lines=all"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    try:
        time.sleep(wait)
        alive = p.poll() is None
        p.terminate()
        try:
            out, _ = p.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            return False
        return alive and not out
    finally:
        _end(p)


def pick_journalctl(work: Path, prefer: str = "auto") -> tuple[str, str]:
    """(path, "real" or "stub"): the real journalctl when it is here and idle (or `prefer="real"`),
    else the stand-in (`prefer="stub"` forces it)."""
    real = shutil.which("journalctl")
    if prefer != "stub" and real and (prefer == "real" or journal_is_idle(real)):
        return real, "real"
    return str(write_stub(work)), "stub"


def _children(pid: int) -> dict[int, int]:
    """The live child processes of `pid`: {child PID: its start time in clock ticks}."""
    kids: set[int] = set()
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError):
                kids.update(int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
    except OSError:
        return {}
    out = {}
    for k in kids:
        st = _stat(k)
        if st is not None and st[0] != "Z":
            out[k] = st[1]
    return out


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of a process, None when it is gone."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return f[0], int(f[19])
    except (OSError, IndexError, ValueError):
        return None


def _same_alive(pid: int, started: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z" and st[1] == started


def _cpu_seconds(pid: int) -> float | None:
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _end_by_pid(seen: dict[int, int]) -> int:
    """SIGTERM (then SIGKILL) every child seen that is still the same live process; how many were."""
    left = [p for p, t in seen.items() if _same_alive(p, t)]
    for p in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    end = time.monotonic() + 3
    while time.monotonic() < end and any(_same_alive(p, seen[p]) for p in left):
        time.sleep(0.05)
    for p in left:
        if _same_alive(p, seen[p]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
    return len(left)


def catch_up_once(work: Path, logf: Path, cfg: Path, tag: str, timeout: float = 900) -> dict:
    """One run on a fresh state directory: seconds from start until the whole file is committed."""
    state = work / f"catchup-state-{tag}"
    shutil.rmtree(state, ignore_errors=True)
    size = logf.stat().st_size
    seen: dict[int, int] = {}
    most = 0
    t0 = time.perf_counter()
    d = start([*SIPGUARD, "--config", str(cfg), "--state-dir", str(state), "run", "--dry-run", "--from-start",
               "--log", str(logf)])
    try:
        next_look = 0.0
        took = None
        while time.perf_counter() - t0 < timeout:
            now = time.perf_counter()
            if now >= next_look:  # every 0.25 s: the daemon's children (cheap: its own /proc entries)
                kids = _children(d.pid)
                seen.update(kids)
                most = max(most, len(kids))
                next_look = now + 0.25
            if db_offset(state, str(logf)) >= size:
                took = time.perf_counter() - t0
                break
            if d.poll() is not None:
                raise RuntimeError(f"sipguard run exited ({d.returncode}) before catching up")
            time.sleep(0.05)
        if took is None:
            raise RuntimeError(f"sipguard run did not catch up within {timeout:.0f}s")
        kids = _children(d.pid)
        seen.update(kids)
        most = max(most, len(kids))
        cpu = _cpu_seconds(d.pid)
        # SIGTERM to the daemon alone, by its PID: it ends its own journal follower
        with contextlib.suppress(ProcessLookupError):
            os.kill(d.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            d.wait(15)
    finally:
        left = _end_by_pid(seen)
        stop(d)  # whatever is left of its session (nothing, normally)
    st = db_status(state).get("daemon") or {}
    shutil.rmtree(state, ignore_errors=True)
    return {"seconds": took, "cpu_seconds": cpu, "lines": st.get("lines"), "events": st.get("events"),
            "children_max": most, "children_seen": len(seen), "children_left": left}


def journal_mix(work: Path, lines: int = 5_000_000, runs: int = 3, journalctl: str = "auto") -> dict:
    """Catch-up over a `lines`-line generated log, alone and with an idle journal source beside it."""
    logf = ensure_log(work, lines)
    jctl, kind = pick_journalctl(work, journalctl)
    alone = write_config(work / "catchup-alone.toml", CONFIG)
    mixed = write_config(work / "catchup-journal.toml",
                         CONFIG + f"[sources]\njournal = [{json.dumps(UNIT)}]\njournalctl = {json.dumps(jctl)}\n")
    log(f"catch-up: {lines:,} lines ({logf.stat().st_size / 1e6:,.0f} MB); journal source: {kind} {jctl}")
    runs_alone: list[dict] = []
    runs_mixed: list[dict] = []
    ratios: list[float] = []
    for i in range(runs):
        a = catch_up_once(work, logf, alone, "alone")
        b = catch_up_once(work, logf, mixed, "journal")
        runs_alone.append(a)
        runs_mixed.append(b)
        ratios.append(b["seconds"] / a["seconds"])
        log(f"catch-up {i + 1}/{runs}: file alone {a['seconds']:.2f}s (cpu {a['cpu_seconds']}), "
            f"with the journal source {b['seconds']:.2f}s (cpu {b['cpu_seconds']}); "
            f"journal children: at most {b['children_max']} at once, {b['children_seen']} seen, "
            f"{b['children_left']} left")
    t_a = median([r["seconds"] for r in runs_alone])
    t_b = median([r["seconds"] for r in runs_mixed])
    res = {
        "lines": lines,
        "bytes": logf.stat().st_size,
        "runs": runs,
        "journalctl": kind,
        "journalctl_path": jctl,
        "alone": runs_alone,
        "journal": runs_mixed,
        "alone_seconds": t_a,
        "journal_seconds": t_b,
        "alone_lines_per_s": lines / t_a,
        "journal_lines_per_s": lines / t_b,
        "alone_cpu_seconds": median([r["cpu_seconds"] for r in runs_alone if r["cpu_seconds"] is not None]),
        "journal_cpu_seconds": median([r["cpu_seconds"] for r in runs_mixed if r["cpu_seconds"] is not None]),
        "ratio": median(ratios),  # with the journal source / alone: equal is 1
        "same_events": len({r["events"] for r in runs_alone + runs_mixed}) == 1,
        "children_max": max([r["children_max"] for r in runs_mixed] + [r["children_max"] for r in runs_alone]),
        "children_left": sum(r["children_left"] for r in runs_alone + runs_mixed),
    }
    log(f"catch-up: alone {t_a:.2f}s, with the journal {t_b:.2f}s: {res['ratio']:.2f}x")
    return res


__all__ = ["journal_mix", "catch_up_once", "pick_journalctl", "journal_is_idle", "write_stub"]
