"""Every benchmark of bench/ run once with tiny sizes, so they cannot rot (`make bench` runs them
full size). fail2ban parts skip only when fail2ban is not installed; namespace parts need root."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import catchup, genlog, run  # noqa: E402
from bench.common import have_fail2ban  # noqa: E402


def test_genlog_is_deterministic_and_shaped(tmp_path):
    a = list(genlog.generate(2000, seed=3))
    assert a == list(genlog.generate(2000, seed=3))
    assert len(a) == 2000
    attacks = [ln for ln in a if any(t in ln for t in ("auth failed", "unknown user", "Blocked scanner",
                                                        "PIKE - BLOCK", "pike block", "Malformed SIP",
                                                        "core parsing"))]
    assert 0.03 * len(a) <= len(attacks) <= 0.08 * len(a)
    assert all(" sip1 kamailio[" in ln for ln in a)
    assert any("2001:db8:" in ln for ln in attacks) and any(" 198.1" in ln or "(198.1" in ln for ln in attacks)


@pytest.mark.root
def test_every_benchmark_runs_tiny(tmp_path):
    if os.geteuid() != 0 or not shutil.which("ipset"):
        pytest.skip("needs root and ipset (network namespaces)")
    out = tmp_path / "out"
    rc = run.main(["--quick", "--out", str(out), "--work", str(tmp_path / "work")])
    assert rc == 0, "the host firewall changed"
    res = json.loads((out / "results.json").read_text())
    assert res["host_firewall_unchanged"]
    assert res["scan"]["sipguard_matched"] > 0
    assert res["daemon"]["throttled"]["lines"] > 0
    assert res["latency"]["sipguard"]["banned"] == res["sizes"]["lat_n"]
    assert res["load"]["load_in_kernel"] == res["sizes"]["load_n"]
    assert res["load"]["restore_in_kernel"] == res["sizes"]["load_n"]
    assert res["spray"]["processed"]
    if have_fail2ban():
        assert res["scan"]["same_lines_matched"], "the fail2ban filter must match the same lines"
        assert res["latency"]["fail2ban-pyinotify"]["banned"] + res["latency"]["fail2ban-polling"]["banned"] > 0
        assert res["f2b_iptables"]["in_kernel"] == res["sizes"]["f2b_ipt_n"]
    else:
        assert any("fail2ban" in s for s in res["skipped"])
    assert (out / "RESULTS.md").read_text().startswith("# sipguard vs fail2ban")
    _check_new_rows(res, (out / "RESULTS.md").read_text())


def _check_new_rows(res: dict, md: str) -> None:
    """The big scan and the journal-mix catch-up rows: their result keys, their counts, their rows."""
    b = res["scan5m"]
    assert b["lines"] == res["sizes"]["bigscan_lines"] and b["runs"] == res["sizes"]["bigscan_runs"]
    assert len(b["sipguard_seconds"]) == len(b["grep_seconds"]) == b["runs"]
    assert b["sipguard_lines_per_s"] > 0 and b["grep_lines_per_s"] > 0 and b["grep_ratio"] > 0
    assert b["literals"] and all(isinstance(x, str) for x in b["literals"])
    assert b["grep_lines"] > 0 and b["same_literal_lines"], "grep and sipguard must count the same lines"
    assert b["grep_lines"] == b["sipguard_literal_lines"]
    assert 0 < b["sipguard_matched"] <= b["sipguard_literal_lines"]
    if have_fail2ban():
        assert b["fail2ban_lines"] == b["lines"] // 10 and len(b["fail2ban_seconds"]) == b["runs"]
        assert b["fail2ban_seconds_scaled"] > 0 and b["fail2ban_ratio"] > 0 and b["fail2ban_lines_per_s"] > 0
    else:
        assert "fail2ban_seconds" not in b and any("big scan" in s for s in res["skipped"])
    j = res["journal_mix"]
    assert j["lines"] == res["sizes"]["catchup_lines"] and j["journalctl"] in ("real", "stub")
    assert len(j["alone"]) == len(j["journal"]) == j["runs"] == res["sizes"]["catchup_runs"]
    for r in j["alone"] + j["journal"]:
        assert r["seconds"] > 0 and r["lines"] == j["lines"] and r["events"] > 0
        assert r["children_left"] == 0
    assert all(r["children_max"] == 0 for r in j["alone"]), "a file alone starts no child process"
    assert all(1 <= r["children_max"] <= 2 for r in j["journal"]), "the journal source: one follower"
    assert j["same_events"] and j["children_left"] == 0
    assert j["alone_seconds"] > 0 and j["journal_seconds"] > 0 and j["ratio"] > 0
    assert j["alone_lines_per_s"] > 0 and j["journal_lines_per_s"] > 0
    assert "grep -cF" in md and "daemon catch-up over a" in md and "idle journal source" in md


def test_new_rows_run_tiny_without_root(tmp_path):
    """The big scan and the journal-mix catch-up need no namespaces: they run everywhere."""
    out = tmp_path / "out"
    rc = run.main(["--quick", "--only", "scan5m,journal_mix", "--out", str(out), "--work", str(tmp_path / "work")])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    _check_new_rows(res, (out / "RESULTS.md").read_text())


def test_journal_mix_with_the_stub(tmp_path):
    """The stand-in journalctl (what journal_mix uses where the real one is missing or not idle)."""
    res = catchup.journal_mix(tmp_path, 2000, 1, journalctl="stub")
    assert res["journalctl"] == "stub" and res["journalctl_path"] == str(tmp_path / "journalctl-idle")
    assert res["same_events"] and res["children_left"] == 0
    assert [r["children_max"] for r in res["journal"]] == [1]


def test_journal_stub_is_idle(tmp_path):
    stub = str(catchup.write_stub(tmp_path))
    q = subprocess.run([stub, "--output=json", "--lines=1", "--unit", "kamailio.service"], capture_output=True,
                       timeout=5)
    assert q.returncode == 0 and q.stdout == b""
    p = subprocess.Popen([stub, "--follow", "--output=json", "--all", "--unit", "kamailio.service"],
                         stdout=subprocess.PIPE)
    try:
        time.sleep(0.3)
        assert p.poll() is None, "--follow must wait"
        os.kill(p.pid, signal.SIGTERM)
        out, _ = p.communicate(timeout=5)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
    assert out == b"" and p.returncode == -signal.SIGTERM
    assert catchup.journal_is_idle(stub, wait=0.3)


@pytest.mark.root
def test_cluster_bench_runs_tiny_with_a_secret(tmp_path):
    """bench/cluster_bench.py end to end, tiny: 2 daemons in namespaces with a [cluster] secret, a few
    propagation samples, a 2,000-ban signed burst as an import writes it (bulk entries) and as single
    entries (every entry verified by the receiver), idle CPU, one scoring run; it writes nothing into
    bench/RESULTS.md."""
    if os.geteuid() != 0 or not shutil.which("ipset") or not shutil.which("redis-server"):
        pytest.skip("needs root, ipset and redis-server (network namespaces)")
    out = tmp_path / "cluster.json"
    before = (ROOT / "bench" / "RESULTS.md").read_text()
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "cluster_bench.py"), "--bans", "2", "--nodes", "2",
                        "--burst", "2000", "--burst-nodes", "2", "--burst-via", "stream,single", "--burst-repeat", "2",
                        "--seconds", "0.5",
                        "--scoring", "1", "--idle", "1", "--no-write", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["secret"] is True
    lat = res["latency"]["2"]
    assert set(lat) == {"manual ban", "manual unban", "automatic ban", "unban of an automatic ban"}
    assert all(v["samples"] == 2 and 0 <= v["p50"] <= v["p99"] <= v["max"] for v in lat.values())
    for key in ("stream/2", "single/2"):  # (an import's bulk entries, and one entry per ban; a fleet of 2)
        burst = res["burst"][key]
        assert burst["size"] == 2000 and burst["nodes"] == 2 and burst["unverified"] == 0 and burst["malformed"] == 0
        assert len(burst["runs"]) == 2 and burst["applied"] in [x["applied"] for x in burst["runs"]]
        assert 0 < burst["first"] <= burst["applied"]
    assert "| an import: 100 bans per entry, appended to the stream (XADD) | 2 |" in r.stdout
    assert len(res["idle_cpu"]["2"]) == 2 and res["scoring"]["1"] > 0
    assert "| manual ban | 2 |" in r.stdout
    assert (ROOT / "bench" / "RESULTS.md").read_text() == before
