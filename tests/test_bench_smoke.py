"""Every benchmark of bench/ run once with tiny sizes, so they cannot rot (`make bench` runs them
full size). fail2ban parts skip only when fail2ban is not installed; namespace parts need root."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import genlog, run  # noqa: E402
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
