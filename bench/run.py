"""Run every benchmark side by side with fail2ban and write bench/RESULTS.md, bench/latency.png and
bench/results.json (`make bench`).

    python -m bench.run [--quick] [--out DIR] [--only throughput,daemon,latency,scale,scan5m,journal_mix,cli]
                        [--journalctl auto|real|stub]

--quick uses tiny sizes (what tests/test_bench_smoke.py runs); the default sizes are the ones the
targets are stated for. Parts needing root and network namespaces are skipped without them;
fail2ban parts are skipped when fail2ban is not installed. The host's firewall is checked to be
identical before and after.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import bigscan, catchup, cli_concurrency, latency, scale, throughput
from .common import BENCH, can_netns, have_fail2ban, host_firewall, log, machine
from .common import median as median_of

FULL = {"scan_lines": 500_000, "scan_runs": 5, "daemon_rate": 500_000, "daemon_seconds": 8.0,
        "daemon_source": 200_000, "lat_n": 1000, "lat_rate": 10.0, "load_n": 100_000,
        "spray_n": 1_000_000, "spray_max_events": 100_000, "f2b_ipt_n": 1000,
        "bigscan_lines": 5_000_000, "bigscan_runs": 5, "catchup_lines": 5_000_000, "catchup_runs": 3,
        "cli_n": 50, "cli_rate": 20_000, "cli_probe_s": 5.0, "list_n": 100_000}
QUICK = {"scan_lines": 3000, "scan_runs": 1, "daemon_rate": 20_000, "daemon_seconds": 1.0,
         "daemon_source": 3000, "lat_n": 10, "lat_rate": 10.0, "load_n": 300,
         "spray_n": 3000, "spray_max_events": 1000, "f2b_ipt_n": 10,
         "bigscan_lines": 30_000, "bigscan_runs": 1, "catchup_lines": 30_000, "catchup_runs": 1,
         "cli_n": 5, "cli_rate": 2000, "cli_probe_s": 1.0, "list_n": 2000}
PARTS = ("throughput", "scan_json", "daemon", "latency", "scale", "scan5m", "journal_mix", "cli")
TARGETS = {
    "scan_ratio": 25.0, "daemon_lines_per_s": 500_000, "p99_ms": 20.0, "latency_ratio": 20.0,
    "load_s": 2.0, "restore_s": 5.0, "rss_mb": 150.0,
    "grep_ratio": 3.0, "grep_ratio_max": 4.0,  # big scan: sipguard's time / grep's (goal, never worse)
    "journal_mix_ratio": 1.10,  # catch-up with an idle journal source / alone: equal, within noise
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(BENCH))
    ap.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--only", default=",".join(PARTS))
    ap.add_argument("--journalctl", choices=("auto", "real", "stub"), default="auto",
                    help="journal_mix: the real journalctl when it is idle here (auto), or the idle stand-in")
    a = ap.parse_args(argv)
    sizes = QUICK if a.quick else FULL
    parts = [p.strip() for p in a.only.split(",") if p.strip()]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    own_work = a.work is None
    work = Path(a.work or tempfile.mkdtemp(prefix="sgb-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    before = host_firewall()
    res: dict = {"machine": machine(), "sizes": sizes, "quick": a.quick, "started": time.time(), "skipped": []}
    try:
        if "throughput" in parts:
            res["scan"] = throughput.scan_vs_fail2ban(work, sizes["scan_lines"], sizes["scan_runs"])
        if "scan_json" in parts:  # the same scan on the log as Kamailio's JSON engine writes it
            res["scan_json"] = throughput.scan_json_vs_syslog(work, sizes["scan_lines"], sizes["scan_runs"])
        if "daemon" in parts:
            res["daemon"] = throughput.daemon_follow(work, sizes["daemon_rate"], sizes["daemon_seconds"],
                                                     sizes["daemon_source"])
        if "latency" in parts:
            if can_netns():
                res["latency"] = {"sipguard": latency.measure("sipguard", sizes["lat_n"], sizes["lat_rate"],
                                                              work / "lat-sipguard")}
                if have_fail2ban():
                    for backend in ("pyinotify", "polling"):
                        res["latency"][f"fail2ban-{backend}"] = latency.measure(
                            "fail2ban", sizes["lat_n"], sizes["lat_rate"], work / f"lat-f2b-{backend}", backend)
                else:
                    res["skipped"].append("fail2ban latency (fail2ban not installed)")
            else:
                res["skipped"].append("latency (needs root, ip, ipset)")
        if "scale" in parts:
            if can_netns():
                res["load"] = scale.load_and_restore(work / "load", sizes["load_n"])
                if have_fail2ban():
                    res["f2b_iptables"] = scale.fail2ban_iptables(work / "f2bipt", sizes["f2b_ipt_n"],
                                                                  sizes["load_n"])
            else:
                res["skipped"].append("ban load/restore (needs root, ip, ipset)")
            res["spray"] = scale.spray(work / "spray", sizes["spray_n"], sizes["spray_max_events"])
            res["restart_memory"] = scale.restart_memory(work / "restart", sizes["spray_n"])
        if "scan5m" in parts:
            res["scan5m"] = bigscan.scan_vs_grep(work, sizes["bigscan_lines"], sizes["bigscan_runs"])
            if "fail2ban_seconds" not in res["scan5m"]:
                res["skipped"].append("fail2ban-regex beside the big scan (fail2ban not installed)")
        if "journal_mix" in parts:
            res["journal_mix"] = catchup.journal_mix(work, sizes["catchup_lines"], sizes["catchup_runs"],
                                                     a.journalctl)
        if "cli" in parts:  # concurrent `ban`s against the daemon (namespaces), `list` at scale (anywhere)
            if can_netns():
                res["cli"] = cli_concurrency.concurrent_bans(work / "cli", sizes["cli_n"], sizes["cli_rate"],
                                                             sizes["cli_probe_s"])
            else:
                res["skipped"].append("concurrent CLI bans (needs root, ip, ipset)")
            res["list"] = cli_concurrency.list_at_scale(work / "list", sizes["list_n"])
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
        after = host_firewall()
        res["host_firewall_unchanged"] = before == after
        if before != after:
            log("WARNING: the host firewall changed during the benchmarks!")
    res["finished"] = time.time()
    (out / "results.json").write_text(json.dumps(res, indent=1))
    write_png(res, out / "latency.png")
    (out / "RESULTS.md").write_text(render(res))
    log(f"wrote {out / 'RESULTS.md'}")
    return 0 if res["host_firewall_unchanged"] else 1


def _f(v, fmt: str = "{:,.0f}", none: str = "–") -> str:
    if v is None:
        return none
    try:
        if v != v:  # NaN
            return none
    except TypeError:
        pass
    return fmt.format(v)


def _ok(met: bool | None) -> str:
    return "–" if met is None else ("met" if met else "**missed**")


def render(r: dict) -> str:
    m = r["machine"]
    rows: list[tuple[str, str, str, str, str]] = []  # figure, sipguard, fail2ban, ratio, target
    s = r.get("scan")
    if s:
        rows.append((f"scan throughput, {s['lines']:,} lines, whole process (median of {s['runs']}, lines/s)",
                     _f(s["sipguard_lines_per_s"]), _f(s.get("fail2ban_lines_per_s")),
                     _f(s.get("ratio"), "{:.1f}x"),
                     f"≥ {TARGETS['scan_ratio']:.0f}x: {_ok(None if 'ratio' not in s else s['ratio'] >= TARGETS['scan_ratio'])}"))
        if "plain_ratio" in s:
            rows.append(("the same, fail2ban-regex with the plain filter (no prefregex, default date detection)",
                         _f(s["sipguard_lines_per_s"]), _f(s["plain_fail2ban_lines_per_s"]),
                         _f(s["plain_ratio"], "{:.1f}x"), "for reference"))
        if s.get("fail2ban_startup_seconds") is not None:
            sg_work = median_of(s["sipguard_seconds"]) - s["sipguard_startup_seconds"]
            f2b_work = median_of(s["fail2ban_seconds"]) - s["fail2ban_startup_seconds"]
            rows.append(("the same minus each one's start-up: work on the log alone (lines/s)",
                         _f(s["lines"] / sg_work), _f(s["lines"] / f2b_work), _f(f2b_work / sg_work, "{:.1f}x"),
                         "for reference"))
        if "sipguard_startup_seconds" in s:
            rows.append(("start-up alone: the same command on an empty log, whole process (s)",
                         _f(s["sipguard_startup_seconds"], "{:.3f}"), _f(s.get("fail2ban_startup_seconds"), "{:.3f}"),
                         "", "25x leaves " + _f(s["sipguard_seconds_budget"], "{:.3f}") + " s in all"
                         if s.get("sipguard_seconds_budget") else ""))
        rows.append(("lines matched (same filter semantics)", _f(s["sipguard_matched"]),
                     _f(s.get("fail2ban_matched")), "", "equal: " + _ok(s.get("same_lines_matched"))))
    sj = r.get("scan_json")
    if sj:
        rows.append((f"scan of the same {sj['lines']:,} lines as Kamailio's JSON engine writes them through rsyslog "
                     f"(`--log-engine=json:{sj['engine']}`, {sj['bytes_json'] / 1e6:,.0f} MB vs "
                     f"{sj['bytes_syslog'] / 1e6:,.0f} MB), whole process (median of {sj['runs']}, lines/s)",
                     _f(sj["json_lines_per_s"]), "", _f(sj["ratio"], "{:.2f}x the syslog scan's time"),
                     f"events equal: {_ok(sj['json_matched'] == sj['syslog_matched'])} "
                     f"({_f(sj['json_matched'])} / {_f(sj['syslog_matched'])})"))
    b = r.get("scan5m")
    if b:
        scaled = ""
        if b.get("fail2ban_seconds_scaled") is not None:
            scaled = (f"{_f(b['fail2ban_lines_per_s'])} ({b['fail2ban_lines']:,}-line log, "
                      f"×{b['lines'] / b['fail2ban_lines']:g} = {b['fail2ban_seconds_scaled']:.1f} s)")
        rows.append((f"scan of a {b['lines']:,}-line log ({b['bytes'] / 1e6:,.0f} MB), whole process "
                     f"(median of {b['runs']}, lines/s)", _f(b["sipguard_lines_per_s"]), scaled,
                     _f(b.get("fail2ban_ratio"), "{:.1f}x"), "for reference"))
        g = b["grep_ratio"]
        rows.append((f"the same beside the floor, `cat LOG \\| grep -cF` with the {len(b['literals'])} search literals "
                     "(s; ratio = sipguard's time / grep's)",
                     _f(median_of(b["sipguard_seconds"]), "{:.2f}"),
                     "grep " + _f(median_of(b["grep_seconds"]), "{:.2f}"),
                     _f(g, "{:.2f}x"),
                     f"≤ {TARGETS['grep_ratio']:.0f}x: {_ok(g <= TARGETS['grep_ratio'])}; "
                     f"never > {TARGETS['grep_ratio_max']:.0f}x: {_ok(g <= TARGETS['grep_ratio_max'])}"))
        rows.append(("lines holding a search literal: sipguard's reader (scan's events) / grep -c",
                     f"{_f(b['sipguard_literal_lines'])} ({_f(b['sipguard_matched'])})", "grep " + _f(b["grep_lines"]),
                     "", "equal: " + _ok(b["same_literal_lines"])))
    d = r.get("daemon")
    if d:
        th, un = d["throttled"], d["unthrottled"]
        rows.append((f"daemon follow, writer at {th['target_lines_per_s']:,} lines/s for {th['write_seconds']:.0f}s "
                     f"(lines/s processed)", _f(th["processed_lines_per_s"]), "", "",
                     f"≥ {TARGETS['daemon_lines_per_s']:,}: {_ok(th['processed_lines_per_s'] >= 0.98 * TARGETS['daemon_lines_per_s'] and th['lag_lines_end'] < th['target_lines_per_s'])}"))
        rows.append(("daemon lag behind the writer: mid-run / end of writing (lines)",
                     f"{_f(th['lag_lines_mid'])} / {_f(th['lag_lines_end'])}", "", "",
                     f"caught up {th['catch_up_seconds'] * 1000:.0f} ms after the writer stopped"))
        rows.append(("daemon ceiling, writer unthrottled (lines/s)", _f(un["processed_lines_per_s"]), "", "", ""))
    j = r.get("journal_mix")
    if j:
        rows.append((f"daemon catch-up over a {j['lines']:,}-line log (`run --dry-run --from-start`), the file alone "
                     f"(median of {j['runs']}, s)",
                     f"{j['alone_seconds']:.2f} ({_f(j['alone_lines_per_s'])} lines/s)", "", "", ""))
        rows.append((f"the same with an idle journal source beside the file (`[sources] journal`, {j['journalctl']} "
                     "journalctl; s, ratio = with / alone)",
                     f"{j['journal_seconds']:.2f} ({_f(j['journal_lines_per_s'])} lines/s)", "",
                     _f(j["ratio"], "{:.2f}x"),
                     f"equal (≤ {TARGETS['journal_mix_ratio']:.2f}x): {_ok(j['ratio'] <= TARGETS['journal_mix_ratio'])}"))
        rows.append(("daemon CPU time in those runs: alone / with the journal source (s)",
                     f"{_f(j['alone_cpu_seconds'], '{:.1f}')} / {_f(j['journal_cpu_seconds'], '{:.1f}')}", "", "",
                     "same events: " + _ok(j["same_events"])))
        rows.append(("the journal source's child processes: most at once / left after the daemon stopped",
                     f"{j['children_max']} / {j['children_left']}", "", "",
                     "bounded, none left: " + _ok(j["children_max"] <= 2 and j["children_left"] == 0)))
    lat = r.get("latency")
    if lat:
        sg = lat["sipguard"]
        f2 = {k: v for k, v in lat.items() if k.startswith("fail2ban")}
        best = min(f2.values(), key=lambda v: v["p99_ms"]) if f2 else None
        for q in ("p50", "p95", "p99"):
            ratio = best[f"{q}_ms"] / sg[f"{q}_ms"] if best else None
            tgt = ""
            if q == "p99":
                tgt = (f"≤ {TARGETS['p99_ms']:.0f} ms: {_ok(sg['p99_ms'] <= TARGETS['p99_ms'])}; "
                       f"≥ {TARGETS['latency_ratio']:.0f}x: {_ok(None if ratio is None else ratio >= TARGETS['latency_ratio'])}")
            rows.append((f"ban latency {q}, line written → address in the kernel set ({sg['banned']} bans, ms)",
                         _f(sg[f"{q}_ms"], "{:.1f}"),
                         " / ".join(f"{k[9:]} {_f(v[f'{q}_ms'], '{:.0f}')}" for k, v in f2.items()),
                         _f(ratio, "{:.0f}x") + (" (vs best)" if ratio else ""), tgt))
    ld = r.get("load")
    if ld:
        fi = r.get("f2b_iptables") or {}
        rows.append((f"load {ld['bans']:,} bans (`ban --from-file`, whole process, s)", _f(ld["load_seconds"], "{:.2f}"),
                     (f"{_f(fi.get('extrapolated_seconds'), '{:.0f}')} (iptables action: {fi.get('bans')} bans in "
                      f"{_f(fi.get('load_seconds'), '{:.2f}')} s, ×{ld['bans'] // max(1, fi.get('bans') or 1)})")
                     if fi else "",
                     _f((fi.get("extrapolated_seconds") or 0) / ld["load_seconds"] if fi else None, "{:.0f}x"),
                     f"≤ {TARGETS['load_s']:.0f} s: {_ok(ld['load_seconds'] <= TARGETS['load_s'])}"))
        rows.append((f"restart restoring {ld['bans']:,} bans into an empty kernel (s)",
                     _f(ld["restore_seconds"], "{:.2f}"), "", "",
                     f"≤ {TARGETS['restore_s']:.0f} s: {_ok(ld['restore_seconds'] is not None and ld['restore_seconds'] <= TARGETS['restore_s'])}"))
    sp = r.get("spray")
    if sp:
        rows.append((f"peak RSS of `sipguard run` after {sp['sources']:,} distinct sources (MB)",
                     _f(sp["peak_rss_mb"]), "", "", f"≤ {TARGETS['rss_mb']:.0f} MB: {_ok(sp['peak_rss_mb'] <= TARGETS['rss_mb'])}"))
        rows.append((f"SQLite files after it, `[store] max_events = {sp['max_events']:,}` (MB)",
                     _f(sp["db_mb"], "{:.1f}"), "", "", "bounded by max_events"))
        pol = sp.get("policy") or {}
        rows.append(("windows tracked / forgotten by the `max_tracked` cap", f"{_f(pol.get('tracked'))} / {_f(pol.get('evicted'))}",
                     "", "", ""))
    rm = r.get("restart_memory")
    if rm:
        rows.append((f"peak RSS of a restart with {rm['events']:,} recent events in the store (MB; the run that "
                     f"stored them: {_f(rm['first_peak_rss_mb'])})", _f(rm["restart_peak_rss_mb"]), "", "",
                     f"≤ {TARGETS['rss_mb']:.0f} MB: {_ok(rm['restart_peak_rss_mb'] <= TARGETS['rss_mb'])}; "
                     f"running after {rm['restart_seconds']:.1f} s"))
    rows += cli_concurrency.rows(r)
    out = ["# sipguard vs fail2ban: benchmark results", ""]
    out.append(f"Generated by `make bench` (`python -m bench.run{' --quick' if r['quick'] else ''}`) on "
               f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(r['started']))}; raw numbers in `results.json`.")
    out.append("")
    out.append(f"Machine: **{m['cpu']}**, {m['cores']} cores, kernel {m['kernel']}, Python {m['python']}, "
               f"{m.get('fail2ban') or 'fail2ban not installed'}.")
    out.append("")
    if r["quick"]:
        out.append("**Quick run (tiny sizes): a smoke test, the targets do not apply.**")
        out.append("")
    out.append("| figure | sipguard | fail2ban | ratio | target |")
    out.append("|---|---|---|---|---|")
    for row in rows:
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    if r.get("skipped"):
        out.append("Skipped: " + "; ".join(r["skipped"]) + ".")
        out.append("")
    out.append("Host firewall unchanged by the run: " + ("yes" if r.get("host_firewall_unchanged") else "**NO**") + ".")
    out.append("")
    if not r["quick"] and s and s.get("ratio") is not None and s["ratio"] < TARGETS["scan_ratio"] \
            and s.get("sipguard_seconds_budget"):
        budget, boot = s["sipguard_seconds_budget"], s["sipguard_startup_seconds"]
        out.append(
            f"Why the scan target is missed: {TARGETS['scan_ratio']:.0f}x the fast fail2ban filter leaves "
            f"{budget:.3f} s for the whole process, and {boot:.3f} s of it go before the first byte is read (the "
            f"interpreter, typer, pydantic, the config and the filters; fail2ban-regex's own start-up is "
            f"{s['fail2ban_startup_seconds']:.3f} s). That leaves {budget - boot:.3f} s to read "
            f"{s['lines']:,} lines, find and parse the trigger lines and run the policy; the work on the log "
            f"itself is already {s['lines'] / (median_of(s['sipguard_seconds']) - boot):,.0f} lines/s "
            "(see \"work on the log alone\").")
        out.append("")
    out.append(METHOD + cli_concurrency.METHOD)
    if lat:
        out.append("![ban latency histogram](latency.png)")
        out.append("")
    return "\n".join(out)


METHOD = """## How each figure is measured

- **Log**: `bench/genlog.py`, traditional syslog lines built from real Kamailio 5.6 line kinds: 5% attack
  lines in bursts from many distinct sources (198.18.0.0/15, 2001:db8::/32), 1% legitimate
  challenge/REGISTER-success pairs, the rest ordinary noise (script routing, acc, tm, usrloc, registrar, sl,
  dialog, core).
- **Scan throughput**: wall time of the whole process (`python -m sipguard scan --json LOG` vs
  `fail2ban-regex LOG bench/fail2ban/filter.d/sipguard-kamailio.conf`), alternated A B A B; lines/s from the
  median times, ratio = median of the per-pair ratios. The fail2ban filter is written the fast way fail2ban
  allows (a prefregex that passes only lines with a trigger text, the date anchored at the line start) and
  matches exactly the lines sipguard's filters turn into events (checked: "lines matched"); the target is
  judged against it. `sipguard-kamailio-plain.conf`, the same failregex lines written the way most fail2ban
  filters are (no prefregex, default date detection), runs in the same alternation for reference. The
  start-up row is the same two commands on an empty log: what each costs before it reads a byte
  (interpreter, libraries, configuration, filters), out of the whole-run budget the 25x target leaves;
  "work on the log alone" subtracts each one's start-up from its whole-process time.
- **Daemon**: `sipguard run --dry-run` follows a file a writer appends to at a fixed rate (a 200,000-line
  generated log replayed); lines/s = lines written / time until the daemon's committed position reached the
  end; the lag is read from the committed position at mid-run and when the writer stops.
- **JSON-log scan**: the scan throughput log converted line by line to what Kamailio's JSON log engine
  writes through rsyslog with the recommended `--log-engine=json:UM` (`@cee: {...}` after the same syslog
  header, `bench/throughput.py` `json_line`), scanned alternately with the syslog log (one untimed round
  first); the ratio is the median of the per-round JSON / syslog times, and both must give the same events.
- **Big scan**: `bench/genlog.py`'s log at 5,000,000 lines (as the 500,000-line one: same generator, same
  seed), `python -m sipguard scan --json LOG` beside the floor, GNU grep counting the lines that hold any of
  sipguard's search literals (`FilterSet.search_literals` of the benchmark's config, the set its reader
  searches) through a pipe: `cat LOG | LC_ALL=C grep -cF -e L1 -e L2 ...` (counting, since grep stops at the
  first match when only asked whether there is one; a pipe, so it can neither mmap nor skip; the C locale
  compares bytes, as sipguard does). fail2ban-regex (fast filter) is not run on the big file (minutes): its
  time on the 500,000-line log times ten is its figure at that size. One untimed round first (page cache,
  bytecode), then the three alternated; ratios are medians of the per-round ratios. "Lines holding a search
  literal" compares grep's count with sipguard's own (its reader's pieces searched with `trigger_lines`, as
  `scan` does before parsing); scan's events (in brackets) are fewer when a line holds a literal but no
  filter's regex matches it.
- **Daemon catch-up beside a journal source**: `sipguard run --dry-run --from-start` on the same big log
  (the daemon row's `[store]`/`[daemon]` settings, a fresh state directory each run), alone and with
  `[sources] journal = ["kamailio.service"]` beside the file, alternated; seconds from starting the process
  until its committed position reaches the end of the file. The journal is idle: the real `journalctl`
  when it has nothing for the unit here and just follows (no journal files), else a stand-in script in the
  work directory (`[sources] journalctl`) that prints nothing and waits for SIGTERM. The daemon's child
  processes are counted while it runs; it is stopped by its PID (SIGTERM: it ends its journal follower),
  and any child still alive afterwards would be ended by its PID and counted as left.
- **Ban latency**: each daemon in its own network namespace with its kernel enforcer (sipguard: ipset;
  fail2ban 1.0.2: `iptables-ipset` action, `maxretry = 1`); one new address per line (a pike block) written
  at a fixed rate; the time from the write to the address being in the set, tested over netlink every
  ~0.5 ms. fail2ban's `backend = auto` is pyinotify when python3-pyinotify is installed (polling otherwise);
  its systemd backend reads the journal, not a file, so it does not apply to a followed file.
- **Load / restore**: `ban --from-file` of 100,000 addresses in a fresh namespace (whole process), then
  `sipguard run` on that state in another fresh namespace (an empty kernel, as after a reboot) until the set
  holds all of them. fail2ban: its `iptables-multiport` action (one rule per address) given 1,000 bans at once
  (`fail2ban-client set JAIL banip ...`), extrapolated linearly to 100,000 (a lower bound: every insert gets
  slower as the chain grows).
- **Spray**: 1,000,000 auth failures from 1,000,000 distinct sources (no bans: one event each) read by
  `sipguard run --dry-run --from-start`; peak RSS is the kernel's VmHWM; the policy tracks at most
  `[policy] max_tracked` sources per jail (least recently active forgotten first).
"""


def write_png(r: dict, path: Path) -> None:
    lat = r.get("latency")
    if not lat:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no latency.png (pip install '.[bench]')")
        return
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, v in lat.items():
        vals = [x for x in v["latencies_ms"] if x > 0]
        if vals:
            ax.hist(vals, bins=[10 ** (i / 20) for i in range(-20, 81)], alpha=0.6,
                    label=f"{name} (p50 {v['p50_ms']:.1f} ms, p99 {v['p99_ms']:.1f} ms)")
    ax.set_xscale("log")
    ax.set_xlabel("ban latency: line written → address in the kernel set (ms, log scale)")
    ax.set_ylabel("bans")
    ax.legend()
    ax.set_title(f"{r['machine']['cpu']}, {r['machine']['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
