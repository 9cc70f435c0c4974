"""CLI verbs that work on the store: ban, unban, list --json, status, check-config, errors."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from sipguard.cli import app

runner = CliRunner()


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.delenv("SIPGUARD_CONFIG", raising=False)
    cfg = tmp_path / "sipguard.toml"
    # dryrun: these tests run in the host's network namespace and must never touch its firewall
    cfg.write_text('[allowlist]\ncidrs = ["198.18.9.0/24"]\n[enforce]\nbackend = "dryrun"\n')
    return ["--config", str(cfg), "--state-dir", str(tmp_path / "state")]


def sg(args, *rest):
    r = runner.invoke(app, [*args, *rest])
    return r


def test_ban_list_unban_roundtrip(state):
    r = sg(state, "ban", "198.18.0.7", "--for", "2h", "--reason", "test")
    assert r.exit_code == 0, r.output
    r = sg(state, "ban", "2001:db8::7", "--for", "permanent")
    assert r.exit_code == 0, r.output
    r = sg(state, "ban", "198.18.4.0/24")  # no --for: the policy's ban time
    assert r.exit_code == 0, r.output
    r = sg(state, "list", "--json")
    bans = {b["ip"]: b for b in json.loads(r.stdout)}
    assert set(bans) == {"198.18.0.7", "2001:db8::7", "198.18.4.0/24"}
    b = bans["198.18.0.7"]
    assert b["reason"] == "test" and b["manual"] is True
    assert b["created"].endswith("Z") and b["expires"].endswith("Z")
    from datetime import datetime
    created = datetime.fromisoformat(b["created"].replace("Z", "+00:00"))
    expires = datetime.fromisoformat(b["expires"].replace("Z", "+00:00"))
    assert abs((expires - created).total_seconds() - 7200) <= 1
    assert bans["2001:db8::7"]["expires"] is None
    e = datetime.fromisoformat(bans["198.18.4.0/24"]["expires"].replace("Z", "+00:00"))
    c = datetime.fromisoformat(bans["198.18.4.0/24"]["created"].replace("Z", "+00:00"))
    assert abs((e - c).total_seconds() - 3600) <= 1
    assert sg(state, "list").exit_code == 0
    assert sg(state, "unban", "198.18.0.7").exit_code == 0
    assert {b["ip"] for b in json.loads(sg(state, "list", "--json").stdout)} == {"2001:db8::7", "198.18.4.0/24"}
    r = sg(state, "unban", "--all")
    assert r.exit_code == 0 and "2" in r.output
    assert json.loads(sg(state, "list", "--json").stdout) == []


@pytest.mark.parametrize("target", ["127.0.0.1", "::1", "198.18.9.20", "198.18.0.0/16"])
def test_allowlisted_needs_force(state, target):
    r = sg(state, "ban", target)
    assert r.exit_code != 0
    assert "allow-listed" in str(r.exception) + r.output
    r = sg(state, "ban", target, "--force")
    assert r.exit_code == 0, r.output


def test_bad_input_one_line_errors(tmp_path):
    env = {**os.environ, "SIPGUARD_STATE_DIR": str(tmp_path / "s")}
    env.pop("SIPGUARD_CONFIG", None)
    exe = [sys.executable, "-m", "sipguard.cli"]
    for args, needle in [
        (["ban", "not-an-ip"], "not an IP address"),
        (["ban", "198.18.0.9", "--for", "soon"], "--for"),
        (["unban"], "either an address or --all"),
        (["--config", str(tmp_path / "missing.toml"), "list"], "config file not found"),
        (["scan", str(tmp_path / "nope.log")], "no such file"),
    ]:
        p = subprocess.run(exe + args, capture_output=True, text=True, env=env, timeout=60)
        assert p.returncode != 0, (args, p.stdout, p.stderr)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("sipguard: error:") and needle in lines[0], p.stderr


def test_bad_config_changes_nothing(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[policy]\nbantime = \"tomorrow\"\n")
    env = {**os.environ, "SIPGUARD_STATE_DIR": str(tmp_path / "s")}
    p = subprocess.run([sys.executable, "-m", "sipguard.cli", "--config", str(cfg), "ban", "198.18.0.9"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode != 0
    assert f"{cfg}: line 2: policy.bantime: bad duration" in p.stderr
    assert not (tmp_path / "s").exists()  # nothing happened: not even the database was created


def test_status_without_daemon(state):
    r = sg(state, "status")
    assert r.exit_code == 0 and "not running" in r.output
    r = sg(state, "status", "--json")
    assert json.loads(r.stdout)["daemon"] == "not running"


def test_manual_user_ban_roundtrip(state):
    """`ban ADDRESS --user USER`: one user at one address (the office policy's narrow ban), listed with its
    user, never an address ban; `unban --user` lifts it; a network, a control character and an allow-listed
    address are refused with a clear error and change nothing."""
    r = sg(state, "ban", "198.18.0.40", "--user", "1001", "--for", "2h", "--reason", "stale phone")
    assert r.exit_code == 0, r.output
    assert "1001" in r.output and "198.18.0.40" in r.output
    got = json.loads(sg(state, "list", "--json").stdout)
    assert [(b["ip"], b["user"], b["reason"], b["manual"]) for b in got] == [("198.18.0.40", "1001", "stale phone", True)]
    assert json.loads(sg(state, "list", "--json", "--manual").stdout)[0]["user"] == "1001"
    why = sg(state, "why", "198.18.0.40")
    assert why.exit_code == 0 and "1001" in why.output, why.output
    for bad, msg in ((["198.18.4.0/24", "--user", "1001"], "network"),
                     (["198.18.0.41", "--user", "10\x1b[2J01"], "not a user"),
                     (["198.18.9.20", "--user", "1001"], "allow-listed"),
                     (["198.18.0.42", "--user", ""], "not a user")):
        r = sg(state, "ban", *bad)
        said = str(r.exception) + r.output
        assert r.exit_code != 0 and msg in said, (bad, said)
        assert "\x1b" not in said
    assert len(json.loads(sg(state, "list", "--json").stdout)) == 1
    r = sg(state, "unban", "198.18.0.40", "--user", "1001")
    assert r.exit_code == 0 and "lifted" in r.output, r.output
    assert json.loads(sg(state, "list", "--json").stdout) == []


def test_manual_user_ban_reaches_the_daemons_mirror(tmp_path):
    """The daemon mirrors a CLI user ban (control request `ban_user`) into the user-ban holder of its
    enforcer stack and its scorer, never into the kernel; the unban lifts it there too."""
    from sipguard.actions import manual_ban_user, manual_unban_user
    from sipguard.addresses import AllowList
    from sipguard.bans import BanBook
    from sipguard.enforce.dryrun import DryRunEnforcer
    from sipguard.enforce.stack import EnforcerStack
    from sipguard.store import Store

    class Mirror:
        holds_users = True

        def __init__(self):
            self.users: set[tuple[str, str]] = set()

        def ban_users(self, bans, now):
            self.users |= {(b.ip, b.user) for b in bans}

        def unban_user(self, ip, user):
            self.users.discard((ip, user))

        def __getattr__(self, name):  # the address side of a mirror: nothing to hold here
            return lambda *a, **k: None

    class Scorer:
        def __init__(self):
            self.users: set[tuple[str, str]] = set()

        def note_ban(self, ip): ...

        def release(self, ip): ...

        def note_user_ban(self, ip, user):
            self.users.add((ip, user))

        def release_user(self, ip, user):
            self.users.discard((ip, user))

    store = Store.open_state_dir(tmp_path / "st")
    kernel = DryRunEnforcer()
    mirror = Mirror()
    stack = EnforcerStack(kernel, [mirror])
    scorer = Scorer()
    book = BanBook(store, stack, scorer=scorer)
    last = max((r.id for r in store.requests_after(0)), default=0)
    manual_ban_user(store, "198.18.0.40", "1001", 600.0, "manual", AllowList([]))
    for req in store.requests_after(last):
        book.apply_request(req, req.time)
        last = req.id
    assert mirror.users == {("198.18.0.40", "1001")} and scorer.users == {("198.18.0.40", "1001")}
    assert kernel.entries() == []
    manual_unban_user(store, "198.18.0.40", "1001")
    for req in store.requests_after(last):
        book.apply_request(req, req.time)
    assert mirror.users == set() and scorer.users == set()
    store.close()
