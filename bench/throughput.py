"""Throughput: `sipguard scan` vs `fail2ban-regex` (whole process, A B A B ...), and the lines/s
`sipguard run --dry-run` sustains while a writer appends to the file it follows."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from . import genlog
from .common import (
    F2B_FILTER, F2B_FILTER_PLAIN, SIPGUARD, db_offset, have_fail2ban, log, median, start, stop, wait_for, write_config,
)


def ensure_log(work: Path, lines: int) -> Path:
    path = work / f"kamailio-{lines}.log"
    if not path.exists():
        log(f"generating {lines} lines -> {path}")
        genlog.write_log(str(path) + ".tmp", lines)
        os.replace(str(path) + ".tmp", path)
    return path


def _timed(cmd: list[str], **kw) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, check=True, **kw)
    return time.perf_counter() - t, p.stdout


def scan_vs_fail2ban(work: Path, lines: int = 500_000, runs: int = 5) -> dict:
    """Median lines/s of each over `runs` alternated runs (sipguard, fail2ban-regex with the fast
    filter, with the plain filter), the median of the per-pair ratios, and a check that all three
    matched the same lines."""
    logf = ensure_log(work, lines)
    cfg = write_config(work / "scan.toml")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    sg_times: list[float] = []
    f2b_times: dict[str, list[float]] = {"fast": [], "plain": []}
    ratios: dict[str, list[float]] = {"fast": [], "plain": []}
    sg_matched = None
    f2b_matched: dict[str, int | None] = {}
    f2b = have_fail2ban()
    filters = {"fast": F2B_FILTER, "plain": F2B_FILTER_PLAIN}
    for i in range(runs):
        t_sg, out = _timed([*SIPGUARD, "--config", str(cfg), "scan", "--json", str(logf)], env=env)
        sg_times.append(t_sg)
        sg_matched = json.loads(out)["matched"]
        said = f"scan run {i + 1}/{runs}: sipguard {t_sg:.3f}s"
        for name, conf in filters.items() if f2b else ():
            t_f, out = _timed(["fail2ban-regex", str(logf), str(conf)])
            f2b_times[name].append(t_f)
            m = re.search(r"Lines: (\d+) lines, (\d+) ignored, (\d+) matched", out)
            f2b_matched[name] = int(m.group(2)) + int(m.group(3)) if m else None
            ratios[name].append(t_f / t_sg)
            said += f", fail2ban-regex ({name} filter) {t_f:.3f}s"
        log(said)
    # start-up alone: the same commands on an empty log (interpreter, libraries, config, filters)
    empty = work / "empty.log"
    empty.write_text("")
    sg_empty = [_timed([*SIPGUARD, "--config", str(cfg), "scan", "--json", str(empty)], env=env)[0]
                for _ in range(runs)]
    f2b_empty = [_timed(["fail2ban-regex", str(empty), str(F2B_FILTER)])[0] for _ in range(runs)] if f2b else []
    log(f"start-up (empty log): sipguard {median(sg_empty):.3f}s"
        + (f", fail2ban-regex {median(f2b_empty):.3f}s" if f2b else ""))
    res = {
        "lines": lines,
        "runs": runs,
        "sipguard_startup_seconds": median(sg_empty),
        "fail2ban_startup_seconds": median(f2b_empty) if f2b else None,
        "sipguard_seconds": sg_times,
        "sipguard_lines_per_s": lines / median(sg_times),
        "sipguard_matched": sg_matched,
    }
    if f2b:
        res.update({
            "fail2ban_seconds": f2b_times["fast"],
            "fail2ban_lines_per_s": lines / median(f2b_times["fast"]),
            "fail2ban_matched": f2b_matched["fast"],
            "ratio": median(ratios["fast"]),
            "sipguard_seconds_budget": median(f2b_times["fast"]) / 25.0,  # the whole run the 25x target allows
            "plain_fail2ban_seconds": f2b_times["plain"],
            "plain_fail2ban_lines_per_s": lines / median(f2b_times["plain"]),
            "plain_fail2ban_matched": f2b_matched["plain"],
            "plain_ratio": median(ratios["plain"]),
            "same_lines_matched": sg_matched == f2b_matched["fast"] == f2b_matched["plain"],
        })
    return res


def daemon_follow(work: Path, rate: float = 500_000, seconds: float = 8.0, source_lines: int = 200_000) -> dict:
    """`sipguard run --dry-run` following a file a writer appends to at `rate` lines/s for
    `seconds` (then unthrottled until the same amount again, to see the ceiling).

    Reports lines/s processed while writing, the lag (lines written but not yet processed) at
    mid-run and at the end of writing, and how long catching up took.
    """
    body = ensure_log(work, source_lines).read_bytes()
    nl = body.count(b"\n")
    per_line = len(body) / nl
    state = work / "daemon-state"
    shutil.rmtree(state, ignore_errors=True)
    target = work / "followed.log"
    target.write_bytes(b"")
    cfg = write_config(work / "daemon.toml", '[store]\nmax_events = 200000\n[daemon]\nprune_interval = "5s"\n')
    d = start([*SIPGUARD, "--config", str(cfg), "--state-dir", str(state), "run", "--dry-run", "--log", str(target)])
    try:
        if not wait_for(lambda: (state / "sipguard.db").exists() and _status_ok(state), 30):
            raise RuntimeError("sipguard run did not start")
        results = {}
        for phase, r in (("throttled", rate), ("unthrottled", None)):
            written = 0
            t0 = time.perf_counter()
            start_off = os.path.getsize(target)
            block = 1 << 16
            samples = []
            fd = os.open(target, os.O_WRONLY | os.O_APPEND)
            try:
                pos = 0
                total = int((r or rate) * seconds)
                lines_written = 0
                next_sample = t0 + 0.5
                while lines_written < total:
                    now = time.perf_counter()
                    if r is not None:
                        due = int((now - t0) * r)
                        if lines_written >= due:
                            time.sleep(0.002)
                            continue
                    chunk = body[pos:pos + block]
                    cut = chunk.rfind(b"\n") + 1
                    if cut == 0:
                        pos = 0
                        continue
                    os.write(fd, chunk[:cut])
                    written += cut
                    lines_written += chunk[:cut].count(b"\n")
                    pos = (pos + cut) % len(body)
                    if now >= next_sample:
                        done = db_offset(state, str(target)) - start_off
                        samples.append((now - t0, (written - done) / per_line))
                        next_sample += 0.5
            finally:
                os.close(fd)
            t_end = time.perf_counter()
            processed_at_end = db_offset(state, str(target)) - start_off
            lag_end = (written - processed_at_end) / per_line
            wait_for(lambda: db_offset(state, str(target)) - start_off >= written, 120, 0.02)
            t_caught = time.perf_counter()
            elapsed_write = t_end - t0
            results[phase] = {
                "target_lines_per_s": r,
                "lines": lines_written,
                "write_seconds": elapsed_write,
                "processed_lines_per_s": lines_written / (t_caught - t0),
                "lag_lines_mid": samples[len(samples) // 2][1] if samples else 0.0,
                "lag_lines_end": lag_end,
                "catch_up_seconds": t_caught - t_end,
            }
            log(f"daemon {phase}: {results[phase]['processed_lines_per_s']:,.0f} lines/s, "
                f"lag at end {lag_end:,.0f} lines, caught up in {t_caught - t_end:.2f}s")
        results["daemon_cpu_seconds"] = _cpu_seconds(d.pid)
        return results
    finally:
        stop(d)
        target.unlink(missing_ok=True)


def _status_ok(state: Path) -> bool:
    from .common import db_status

    return bool(db_status(state).get("running"))


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


_TRAD_LINE = re.compile(rb"^([A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \S+ kamailio\[\d+\]: )([A-Z]+): (.*)$")
_MODULE = re.compile(r"^(<core>|[a-z_]+) \[([^\]:]+):(\d+)\]: (?:(\w+)\(\): )?(.*)$", re.S)


def json_line(line: bytes, engine: str = "UM") -> bytes:
    """One traditional syslog line as Kamailio's JSON log engine writes it through rsyslog
    (`--log-engine=json:UM`: `@cee: {...}`; `json:M`: the syslog form), other lines unchanged."""
    m = _TRAD_LINE.match(line)
    if m is None:
        return line
    head, level, rest = m.group(1), m.group(2).decode(), m.group(3).decode("utf-8", "replace")
    if rest.startswith("<script>: "):
        module, file, lno, func, msg = "xlog", "xlog.c", 282, "", rest[10:]
    else:
        mm = _MODULE.match(rest)
        if mm is None:
            module, file, lno, func, msg = "core", "core/main.c", 1, "", rest
        else:
            module = "core" if mm.group(1) == "<core>" else mm.group(1)
            file, lno, func, msg = mm.group(2), int(mm.group(3)), mm.group(4) or "", mm.group(5)
    if engine == "UM":
        rec = json.dumps({"time": "2026-11-30T03:01:56.000000000Z", "proc": {"id": "23866", "tid": 1}, "pri": level,
                          "subsys": module, "file": {"name": file, "line": lno}, "native": {"function": func},
                          "msg": msg, "pname": "kamailio", "appname": "kamailio", "hostname": "sip1"},
                         ensure_ascii=False, separators=(",", ":"))
        return head + b"@cee: " + rec.encode()
    rec = (f'{{ "level": "{level}", "module": "{module}", "file": "{file}", "line": {lno}, "function": "{func}", '
           f'"logprefix": "", "message": {json.dumps(msg, ensure_ascii=False)} }}')
    return head + rec.encode()


def ensure_json_log(work: Path, lines: int, engine: str = "UM") -> Path:
    """The benchmark log (`ensure_log`) converted line by line by `json_line`."""
    path = work / f"kamailio-{lines}-json-{engine}.log"
    if not path.exists():
        src = ensure_log(work, lines)
        log(f"converting {src} to the JSON engine's form (json:{engine}) -> {path}")
        with src.open("rb") as f, open(str(path) + ".tmp", "wb") as out:
            for raw in f:
                out.write(json_line(raw.rstrip(b"\n"), engine) + b"\n")
        os.replace(str(path) + ".tmp", path)
    return path


def scan_json_vs_syslog(work: Path, lines: int = 500_000, runs: int = 5, engine: str = "UM") -> dict:
    """`sipguard scan --json` of the benchmark log and of the same log as Kamailio's JSON engine
    writes it through rsyslog, alternated, `runs` rounds after one untimed round: the median
    times, lines/s, the median per-round ratio (JSON / syslog) and both event counts (equal: the
    JSON engine carries the same records)."""
    syslog_log = ensure_log(work, lines)
    json_log = ensure_json_log(work, lines, engine)
    cfg = write_config(work / "scan.toml")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    cmd = [*SIPGUARD, "--config", str(cfg), "scan", "--json"]
    _timed([*cmd, str(syslog_log)], env=env)
    _timed([*cmd, str(json_log)], env=env)
    t_sys: list[float] = []
    t_json: list[float] = []
    ratios: list[float] = []
    matched: dict[str, int] = {}
    for i in range(runs):
        a, out_a = _timed([*cmd, str(syslog_log)], env=env)
        b, out_b = _timed([*cmd, str(json_log)], env=env)
        matched = {"syslog": json.loads(out_a)["matched"], "json": json.loads(out_b)["matched"]}
        t_sys.append(a)
        t_json.append(b)
        ratios.append(b / a)
        log(f"scan JSON vs syslog {i + 1}/{runs}: syslog {a:.3f}s, JSON (json:{engine}) {b:.3f}s")
    return {"lines": lines, "runs": runs, "engine": engine, "bytes_syslog": syslog_log.stat().st_size,
            "bytes_json": json_log.stat().st_size, "syslog_seconds": t_sys, "json_seconds": t_json,
            "syslog_lines_per_s": lines / median(t_sys), "json_lines_per_s": lines / median(t_json),
            "ratio": median(ratios), "syslog_matched": matched.get("syslog"), "json_matched": matched.get("json")}
