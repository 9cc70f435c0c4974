"""Big scan: `sipguard scan` of a 5,000,000-line log beside the physical floor, `grep -cF` of the same
search literals over the same file, and fail2ban-regex's figure at that size (its 500,000-line time
times ten: it is not run on the big file, that takes minutes).

The floor is GNU grep counting the lines that hold any of sipguard's search literals
(`FilterSet.search_literals` of the benchmark's config, the exact set the sparse reader searches),
fed through a pipe (`cat LOG | grep -cF -e L1 -e L2 ...`): counting, because grep stops at the first
match when it only has to say whether one exists; a pipe, so it cannot mmap the file or skip through
it. `LC_ALL=C` makes grep compare bytes, as sipguard does (and is grep's fastest mode, so the floor is
not flattered). The three commands run alternated A B C A B C after one untimed round (page cache,
bytecode), and the ratios are medians of the per-round ratios.

Reads files and runs processes only: never changes anything outside its work directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

from .common import F2B_FILTER, SIPGUARD, have_fail2ban, log, median, write_config
from .throughput import ensure_log


def search_literals(cfg: Path) -> tuple[bytes, ...]:
    """The literals sipguard's sparse reader searches for with this config (`FilterSet.search_literals`)."""
    from sipguard.config import load_config
    from sipguard.filters import FilterSet

    c = load_config(cfg)
    lits = FilterSet.load(c.filters.directories, enabled=c.filters.enabled,
                          disabled=c.filters.disabled).search_literals
    if not lits:
        raise RuntimeError("the benchmark's filters have no search literals: the scan would parse every line")
    return lits


def literal_lines(path: Path, lits: tuple[bytes, ...]) -> int:
    """sipguard's own count of the lines holding a search literal: its reader's pieces
    (`read_chunks`) searched with `trigger_lines`, as `sipguard scan` does before parsing."""
    from sipguard.filters import trigger_lines
    from sipguard.sources import read_chunks

    return sum(len(trigger_lines(chunk, lits)[0]) for chunk in read_chunks(str(path), chunk_size=8 << 20))


def grep_argv(lits: tuple[bytes, ...]) -> list[str | bytes]:
    argv: list[str | bytes] = ["grep", "-cF"]
    for lit in lits:
        argv += ["-e", lit]
    return argv


def _kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        p.wait(5)


def grep_count(path: Path, argv: list[str | bytes]) -> tuple[float, int]:
    """Wall time and count of `cat PATH | LC_ALL=C grep -cF ...` (no shell: two processes, one pipe)."""
    env = dict(os.environ, LC_ALL="C")
    t = time.perf_counter()
    cat = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
    try:
        g = subprocess.Popen(argv, stdin=cat.stdout, stdout=subprocess.PIPE, env=env)
        try:
            assert cat.stdout is not None
            cat.stdout.close()  # grep holds the only read end: cat sees EPIPE if grep dies
            out, _ = g.communicate(timeout=600)
            cat.wait(60)
            dt = time.perf_counter() - t
        finally:
            _kill(g)
    finally:
        _kill(cat)
    if cat.returncode != 0 or g.returncode not in (0, 1):  # 1: no line matched (count 0)
        raise RuntimeError(f"cat | grep failed: cat {cat.returncode}, grep {g.returncode}")
    return dt, int(out)


def _timed(cmd: list[str], **kw) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800, **kw)
    return time.perf_counter() - t, p.stdout


def _f2b_matched(out: str) -> int | None:
    m = re.search(r"Lines: (\d+) lines, (\d+) ignored, (\d+) matched", out)
    return int(m.group(2)) + int(m.group(3)) if m else None


def scan_vs_grep(work: Path, lines: int = 5_000_000, runs: int = 5, peer_lines: int | None = None) -> dict:
    """`runs` alternated rounds of: `sipguard scan --json` of the big log, `cat | grep -cF` of it,
    and fail2ban-regex (fast filter) of the `peer_lines` log (default lines/10), scaled to `lines`."""
    logf = ensure_log(work, lines)
    peer_lines = peer_lines or max(1, lines // 10)
    peer = ensure_log(work, peer_lines)
    cfg = write_config(work / "scan.toml")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    lits = search_literals(cfg)
    argv = grep_argv(lits)
    sg_cmd = [*SIPGUARD, "--config", str(cfg), "scan", "--json", str(logf)]
    f2b = have_fail2ban()
    scale = lines / peer_lines
    log(f"big scan: {lines:,} lines ({logf.stat().st_size / 1e6:,.0f} MB), {len(lits)} search literals")
    # one untimed round: the file in the page cache, bytecode and Hyperscan warm for every command
    _timed(sg_cmd, env=env)
    grep_count(logf, argv)
    sg_t: list[float] = []
    grep_t: list[float] = []
    f2b_t: list[float] = []
    grep_ratio: list[float] = []
    f2b_ratio: list[float] = []
    sg_matched = grep_matched = f2b_matched = None
    for i in range(runs):
        t_sg, out = _timed(sg_cmd, env=env)
        got = json.loads(out)
        if got["lines"] != lines:
            raise RuntimeError(f"sipguard scan counted {got['lines']} lines, the log has {lines}")
        sg_matched = got["matched"]
        t_g, grep_matched = grep_count(logf, argv)
        sg_t.append(t_sg)
        grep_t.append(t_g)
        grep_ratio.append(t_sg / t_g)
        said = f"big scan {i + 1}/{runs}: sipguard {t_sg:.3f}s, cat | grep -cF {t_g:.3f}s"
        if f2b:
            t_f, out = _timed(["fail2ban-regex", str(peer), str(F2B_FILTER)])
            f2b_matched = _f2b_matched(out)
            f2b_t.append(t_f)
            f2b_ratio.append(t_f * scale / t_sg)
            said += f", fail2ban-regex {peer_lines:,} lines {t_f:.3f}s (x{scale:g} = {t_f * scale:.1f}s)"
        log(said)
    in_lines = literal_lines(logf, lits)
    res: dict = {
        "lines": lines,
        "bytes": logf.stat().st_size,
        "runs": runs,
        "literals": [lit.decode("utf-8", "replace") for lit in lits],
        "sipguard_seconds": sg_t,
        "sipguard_lines_per_s": lines / median(sg_t),
        "grep_seconds": grep_t,
        "grep_lines_per_s": lines / median(grep_t),
        "grep_ratio": median(grep_ratio),  # sipguard's time / grep's: the floor is 1
        "grep_lines": grep_matched,
        "sipguard_literal_lines": in_lines,
        "sipguard_matched": sg_matched,
        "same_literal_lines": grep_matched == in_lines,
        "every_literal_line_matched": sg_matched == in_lines,
    }
    if f2b:
        res.update({
            "fail2ban_lines": peer_lines,
            "fail2ban_seconds": f2b_t,
            "fail2ban_lines_per_s": peer_lines / median(f2b_t),
            "fail2ban_seconds_scaled": median(f2b_t) * scale,
            "fail2ban_ratio": median(f2b_ratio),  # fail2ban's scaled time / sipguard's
            "fail2ban_matched": f2b_matched,
        })
    log(f"big scan: sipguard {median(sg_t):.3f}s, grep {median(grep_t):.3f}s: {res['grep_ratio']:.2f}x the floor; "
        f"lines holding a literal: grep {grep_matched:,}, sipguard {in_lines:,} (scan matched {sg_matched:,})")
    return res


__all__ = ["scan_vs_grep", "search_literals", "literal_lines", "grep_count"]
