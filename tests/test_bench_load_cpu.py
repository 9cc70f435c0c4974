"""bench/load_cpu.py run tiny, so it cannot rot: the load's log shape, the replay of a captured log,
and a short measurement of `sipguard run --dry-run` following the file it writes (no root needed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import load_cpu  # noqa: E402


def test_the_schedule_has_the_loads_shape():
    lines = load_cpu.schedule(60.0, rate=526.0, seed=3)
    assert lines == load_cpu.schedule(60.0, rate=526.0, seed=3)
    assert 0.9 * 526 * 60 <= len(lines) <= 1.1 * 526 * 60
    assert all(0 <= t < 60 for t, _ in lines) and lines == sorted(lines)
    share = {k: sum(k in m for _, m in lines) / len(lines)
             for k in ("auth challenge", "REGISTER success", "call attempt", "auth failed", "Blocked scanner")}
    assert 0.40 <= share["auth challenge"] <= 0.50 and 0.40 <= share["REGISTER success"] <= 0.50
    assert 0.03 <= share["call attempt"] <= 0.08 and share["auth failed"] > 0 and share["Blocked scanner"] > 0


def test_a_captured_log_is_replayed_at_its_own_times(tmp_path):
    cap = tmp_path / "kamailio.log"
    cap.write_text("2026-12-01T23:16:17.100000+00:00 vm kamailio[1]: NOTICE: <script>: auth challenge for user 1 "
                   "from 198.18.128.2:5062 method REGISTER\n"
                   "not a kamailio line\n"
                   "2026-12-01T23:16:17.600000+00:00 vm kamailio[2]: NOTICE: <script>: REGISTER success for user 1 "
                   "from 198.18.128.2:5062\n"
                   "2026-12-01T23:16:27.000000+00:00 vm kamailio[2]: NOTICE: <script>: late\n")
    got = load_cpu.replay(cap, seconds=5.0)
    assert [round(t, 3) for t, _ in got] == [0.0, 0.5]
    assert got[1][1].startswith("NOTICE: <script>: REGISTER success")


def test_it_measures_a_short_run(tmp_path):
    out = tmp_path / "r.json"
    assert load_cpu.main(["--seconds", "3", "--idle", "0.5", "--rate", "300", "--work", str(tmp_path / "w"),
                          "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["caught_up"] and r["lines"] > 500 and r["events"] and r["events"] > 0.8 * r["lines"]
    assert r["cpu_seconds"] >= 0 and "cpu_seconds_per_100k_lines" in r
