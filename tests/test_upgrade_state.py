"""An upgrade keeps the state: a database written by an earlier version (tests/data/upgrade/README.md)
opened by today's code keeps its bans, their reasons and ends, and its events; the tables and columns
added since are created (user bans, their `manual`), and today's verbs work on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from sipguard.cli import app
from sipguard.store import Store

DATA = Path(__file__).parent / "data" / "upgrade"
runner = CliRunner()


def _state(tmp_path: Path, monkeypatch) -> list[str]:
    monkeypatch.delenv("SIPGUARD_CONFIG", raising=False)
    (tmp_path / "state").mkdir(mode=0o750)
    shutil.copyfile(DATA / "sipguard-0.1.0-730009a.db", tmp_path / "state" / "sipguard.db")
    cfg = tmp_path / "sipguard.toml"
    cfg.write_text('[enforce]\nbackend = "dryrun"\n')  # the host's kernel is never touched
    return ["--config", str(cfg), "--state-dir", str(tmp_path / "state")]


def test_an_old_database_keeps_its_bans_and_events(tmp_path, monkeypatch):
    args = _state(tmp_path, monkeypatch)
    r = runner.invoke(app, [*args, "list", "--json"])
    assert r.exit_code == 0, r.output
    bans = {b["ip"]: b for b in json.loads(r.stdout)}
    assert set(bans) == {"198.18.0.7", "2001:db8::7", "198.18.4.0/24"}
    assert bans["198.18.0.7"]["reason"] == "test" and bans["198.18.0.7"]["expires"] is not None
    assert bans["2001:db8::7"]["expires"] is None and bans["198.18.4.0/24"]["expires"] is None
    assert all(b["manual"] is True for b in bans.values())
    store = Store.open_state_dir(tmp_path / "state")
    try:
        assert store.count_events() == 3
        assert store.active_user_bans(0) == []  # the table added since exists, empty
    finally:
        store.close()


def test_todays_verbs_work_on_an_old_database(tmp_path, monkeypatch):
    args = _state(tmp_path, monkeypatch)
    r = runner.invoke(app, [*args, "ban", "198.18.0.30", "--user", "1001", "--for", "1h"])
    assert r.exit_code == 0, r.output
    got = json.loads(runner.invoke(app, [*args, "list", "--json"]).stdout)
    assert {(b["ip"], b.get("user")) for b in got} == {("198.18.0.7", None), ("2001:db8::7", None),
                                                        ("198.18.4.0/24", None), ("198.18.0.30", "1001")}
    assert runner.invoke(app, [*args, "unban", "198.18.0.7"]).exit_code == 0
    r = runner.invoke(app, [*args, "why", "198.18.0.30"])
    assert r.exit_code == 0 and "1001" in r.output, r.output
    store = Store.open_state_dir(tmp_path / "state", readonly=True)
    try:
        assert {b.ip for b in store.active_bans(0)} == {"2001:db8::7", "198.18.4.0/24"}
    finally:
        store.close()
