"""Bounds on every duration (issue 16, item 5): at most 100 years (`permanent` for more where a ban
time is asked), with one clear error naming the option (the config's file, line and key); and the
verbs that show bans (`list` in every output, `status`, `report`) never crash on a stored value,
whatever wrote it: huge, infinite, negative, text or NULL times are shown, not fatal.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sipguard.cli import app
from sipguard.config import MAX_DURATION, format_duration, load_config, parse_duration
from sipguard.errors import ConfigError
from sipguard.store import Store

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
DAY = 86400.0


# -- durations -------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, seconds", [("36525d", 36525 * DAY), ("5217w", 5217 * 604800.0),
                                            (MAX_DURATION, MAX_DURATION), ("30s", 30.0), (1, 1.0)])
def test_durations_up_to_100_years_are_taken(value, seconds):
    assert parse_duration(value) == seconds == parse_duration(value, allow_permanent=True)


@pytest.mark.parametrize("value", ["36526d", "100000000d", "99999999999d", "5219w", "1" * 400, 10 ** 400, 1e400,
                                   math.inf, MAX_DURATION + 1])
def test_longer_durations_are_refused_with_the_bound(value):
    with pytest.raises(ValueError, match=r"too long: at most 100 years \(36525d\)$"):
        parse_duration(value)
    with pytest.raises(ValueError, match=r"too long: at most 100 years \(36525d\); use 'permanent' for no end"):
        parse_duration(value, allow_permanent=True)
    assert parse_duration("permanent", allow_permanent=True) is None


@pytest.mark.parametrize("value", [math.nan, -math.inf, 0, -5, "0s"])
def test_not_a_duration(value):
    with pytest.raises(ValueError, match="not a number|must be positive"):
        parse_duration(value)


def test_format_duration_never_fails():
    assert format_duration(None) == "permanent" and format_duration(7200) == "2h"
    for v in (math.nan, math.inf, -math.inf, -1.0, 1e300):
        assert format_duration(v) == "out of range"
    assert format_duration(MAX_DURATION) == "36525d"


@pytest.mark.parametrize("toml, key", [
    ('[policy]\nmax_bantime = "99999999999d"\n', "policy.max_bantime"),
    ('[policy]\nbantime = "36526d"\n', "policy.bantime"),
    ('[policy]\n\n[policy.jails.auth]\nbantime = "200000w"\n', "policy.jails.auth.bantime"),
    ('[store]\nevent_retention = inf\n', "store.event_retention"),
    ('[[blocklists]]\nname = "x"\nurl = "https://example.net/x"\nbantime = 1e30\n', "blocklists.0.bantime"),
])
def test_config_durations_beyond_the_bound_name_file_line_and_key(tmp_path, toml, key):
    cfg = tmp_path / "sipguard.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    line = next(i for i, ln in enumerate(toml.splitlines(), 1) if "bantime" in ln or "retention" in ln)
    assert str(e.value).startswith(f"{cfg}: line {line}: {key}: too long: at most 100 years (36525d)"), str(e.value)


def test_config_nan_duration(tmp_path):
    cfg = tmp_path / "sipguard.toml"
    cfg.write_text("[policy.jails.auth]\nfindtime = nan\n")
    with pytest.raises(ConfigError, match=r"line 2: policy.jails.auth.findtime: bad duration: not a number"):
        load_config(cfg)


def test_config_max_bantime_permanent_and_100_years(tmp_path):
    cfg = tmp_path / "sipguard.toml"
    cfg.write_text('[policy]\nmax_bantime = "permanent"\nbantime = "36525d"\n')
    c = load_config(cfg)
    assert c.policy.max_bantime is None and c.policy.bantime == MAX_DURATION


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.delenv("SIPGUARD_CONFIG", raising=False)
    cfg = tmp_path / "sipguard.toml"
    # dryrun: these tests run in the host's network namespace and must never touch its firewall
    cfg.write_text('[enforce]\nbackend = "dryrun"\n[allowlist]\ninclude_host_addresses = false\n')
    return ["--config", str(cfg), "--state-dir", str(tmp_path / "state")]


def _sg(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SIPGUARD_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "sipguard", *args], capture_output=True, text=True, timeout=60,
                          env=env)


def test_cli_ban_for_too_long_is_one_line_and_changes_nothing(state):
    p = _sg([*state, "ban", "198.18.6.1", "--for", "100000000d"])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1 and lines == [
        "sipguard: error: --for: too long: at most 100 years (36525d); use 'permanent' for no end"], p.stderr
    assert _sg([*state, "ban", "198.18.6.2", "--for", "36525d"]).returncode == 0
    listed = json.loads(_sg([*state, "list", "--json"]).stdout)
    assert [b["ip"] for b in listed] == ["198.18.6.2"] and listed[0]["expires"].endswith("Z")


def test_import_for_too_long_names_the_option(state, tmp_path):
    bl = tmp_path / "list.txt"
    bl.write_text("198.18.6.3\n")
    p = _sg([*state, "import", str(bl), "--for", "99999999999d"])
    assert p.returncode == 1 and "sipguard: error: --for: too long: at most 100 years" in p.stderr


# -- stored values nobody can trust ------------------------------------------------------------------
FOREIGN_BANS = ('CREATE TABLE "bans" ("ip" TEXT PRIMARY KEY, "reason" TEXT, "score" REAL, "created" REAL, '
                '"expires" REAL, "offence" INTEGER, "manual" INTEGER, "refused" TEXT)')
NOW = time.time()
WEIRD = [  # ip, reason, score, created, expires, offence
    ("198.18.7.1", "huge expires", 1.0, NOW, 1e300, 1),
    ("198.18.7.2", "infinite expires", math.inf, NOW, math.inf, 2),
    ("198.18.7.3", "text expires", 1.0, NOW, "soon", 1),
    ("198.18.7.4", "NaN expires (NULL: permanent)", 1.0, NOW, math.nan, 1),
    ("198.18.7.5", "negative created", 1.0, -1e300, NOW + 3600, 1),
    ("198.18.7.6", "NULL created", 1.0, None, NOW + 3600, 99999999999999),
    ("198.18.7.7", None, None, "yesterday", None, None),
    ("198.18.7.8", "ok", 3.0, NOW, NOW + 3600, 1),
    ("198.18.7.9", "long ago, negative expires", 1.0, -1e12, -1e12, 1),  # expired: not listed
    (3323070218, b"blob \xff reason", "x", NOW, NOW + 86400, "many"),  # an integer address, a BLOB reason
]


@pytest.fixture
def weird(tmp_path, state):
    """A database whose bans table another program made and filled (no constraints, odd values)."""
    d = tmp_path / "state"
    d.mkdir(mode=0o750)
    con = sqlite3.connect(d / "sipguard.db")
    con.execute(FOREIGN_BANS)
    con.executemany("INSERT INTO bans (ip, reason, score, created, expires, offence, manual) "
                    "VALUES (?, ?, ?, ?, ?, ?, 0)", WEIRD)
    con.commit()
    con.close()
    s = Store.open_state_dir(d)  # sipguard adds its own tables beside it
    for t in (1e300, math.inf, -5.0, NOW - 60):
        s.conn.execute("INSERT INTO ban_log (time, action, ip, reason, manual) VALUES (?, 'ban', '198.18.7.1', "
                       "'x', 0)", (t,))
        s.conn.execute("INSERT INTO events (time, ip, filter, kind, weight) VALUES (?, '198.18.7.1', 'f', "
                       "'scanner', 1.0)", (t,))
    s.conn.execute("INSERT INTO ban_log (time, action, ip, reason, manual) VALUES ('noon', 'ban', '198.18.7.2', "
                   "'x', 0)")
    s.close()
    return state


def _strict_json(text: str):
    def no(c):
        raise ValueError(f"not JSON: {c}")

    return json.loads(text, parse_constant=no)


def test_store_reads_any_value_as_a_ban(weird, tmp_path):
    s = Store.open_state_dir(tmp_path / "state", readonly=True)
    bans = {b.ip: b for b in s.active_bans(NOW)}
    assert set(bans) == {f"198.18.7.{i}" for i in range(1, 9)} | {"3323070218"}
    assert bans["3323070218"].reason == "blob \ufffd reason" and bans["3323070218"].offence == 1
    assert bans["198.18.7.1"].expires == 1e300 and bans["198.18.7.2"].expires == math.inf
    assert math.isnan(bans["198.18.7.3"].expires) and bans["198.18.7.4"].expires is None
    assert math.isnan(bans["198.18.7.6"].created) and math.isnan(bans["198.18.7.7"].created)
    assert bans["198.18.7.2"].score == 0.0 and bans["198.18.7.7"].offence == 1
    assert s.count_active_bans(NOW) == 9 and s.active_bans_summary(NOW).count == 9


@pytest.mark.parametrize("output", ["plain", "table", "csv"])
def test_list_shows_every_stored_value(weird, output):
    p = _sg([*weird, "list", "--output", output])
    assert p.returncode == 0, p.stderr
    rows = {ln.split(",")[0] if output == "csv" else ln.split()[0]: ln for ln in p.stdout.splitlines()
            if ln.startswith(("198.18.7.", "3323070218"))}
    assert "blob \ufffd reason" in rows.pop("3323070218")
    assert set(rows) == {f"198.18.7.{i}" for i in range(1, 9)}
    assert "out of range" in rows["198.18.7.1"] and "out of range" in rows["198.18.7.2"]
    assert "unknown" in rows["198.18.7.3"] and "never" in rows["198.18.7.4"]
    assert "out of range" in rows["198.18.7.5"] and "unknown" in rows["198.18.7.6"]
    assert "99999999999999" in rows["198.18.7.6"] and "unknown" in rows["198.18.7.7"]


def test_list_json_is_valid_json_for_every_stored_value(weird):
    p = _sg([*weird, "list", "--json"])
    assert p.returncode == 0, p.stderr
    got = {b["ip"]: b for b in _strict_json(p.stdout)}
    assert len(got) == 9 and got["3323070218"]["reason"] == "blob \ufffd reason"
    assert got["198.18.7.1"]["expires"] == "out of range" and got["198.18.7.2"]["expires"] == "out of range"
    assert got["198.18.7.2"]["score"] == 0.0 and got["198.18.7.3"]["expires"] == "unknown"
    assert got["198.18.7.4"]["expires"] is None and got["198.18.7.5"]["created"] == "out of range"
    assert got["198.18.7.6"]["created"] == "unknown" and got["198.18.7.8"]["expires"].endswith("Z")


def test_status_and_report_never_crash_on_stored_values(weird, tmp_path):
    p = _sg([*weird, "status", "--json"])
    assert p.returncode == 0, p.stderr
    assert _strict_json(p.stdout)["daemon"] == "not running"
    p = _sg([*weird, "status"])
    assert p.returncode == 0 and "bans in force: " in p.stdout, p.stderr
    out = tmp_path / "report.html"
    p = _sg([*weird, "report", "--output", str(out)])
    assert p.returncode == 0, p.stderr
    assert "1 events" in p.stdout and "1 bans" in p.stdout  # only the row with a real time is counted
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_list_in_process_too(weird):
    r = runner.invoke(app, [*weird, "list", "--output", "plain"])
    assert r.exit_code == 0, r.output
    assert r.output.count("198.18.7.") == 8 and "3323070218" in r.output


def test_escalation_never_overflows_and_factor_is_bounded():
    from sipguard.addresses import AllowList
    from sipguard.config import MAX_DURATION, Config
    from sipguard.errors import ConfigError
    from sipguard.policy import Policy

    cfg = Config.model_validate({"policy": {"max_bantime": "permanent", "bantime_factor": 10}})
    pol = Policy(cfg.policy, AllowList([], include_host=False))
    assert pol.ban_duration(1) == cfg.policy.bantime
    assert pol.ban_duration(5000) is None  # past 100 years: permanent (10**4999 would overflow a float)
    assert pol.ban_duration(6) == 3600 * 10**5 < MAX_DURATION  # 42 days: still a number
    for bad in ("inf", "nan", 1e6):
        with pytest.raises((ConfigError, ValueError)):
            Config.model_validate({"policy": {"bantime_factor": bad}})


def test_kernel_timeout_of_a_stored_nan_or_inf_expiry():
    from sipguard.enforce.base import kernel_timeout
    from sipguard.model import Ban

    assert kernel_timeout(Ban("198.18.3.1", "r", 0.0, float("nan")), 10.0) is None
    assert kernel_timeout(Ban("198.18.3.1", "r", 0.0, float("inf")), 10.0) == 0
