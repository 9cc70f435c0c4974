"""Read-only state (issue 16, item 11) and the state's modes and owner (item 10).

`status`, `list` (every output, and `--kernel`), `report`, `scan`, `test-filter` and `check-config`
work on a read-only state directory: a read-only bind mount in a private mount namespace
(`unshare -m`; as root, modes alone stop no write), and a user that may read but not write (`nobody`
in the directory's group). The database is opened `mode=ro` and nothing is created or migrated; a
writing verb fails with one line, and so does a read on a directory that has no database yet.

A new state directory is 0750 and a new database (and its -wal and -shm) 0640 whatever the umask; as
root, a state directory or database owned by another user is refused with one line.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shlex
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sipguard.model import Ban
from sipguard.store import Store

REPO = Path(__file__).resolve().parents[1]
root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount namespaces, other users)")
LOG_LINE = ("Dec  1 10:00:00 edge kamailio[42]: WARNING: <script>: Blocked scanner UA 'friendly-scanner' "
            "from 198.18.8.9:5060\n")


@pytest.fixture
def world(monkeypatch) -> Iterator[Path]:
    """A directory every user may enter (pytest's own temp dirs are 0700 root)."""
    monkeypatch.delenv("SIPGUARD_CONFIG", raising=False)
    d = Path(tempfile.mkdtemp(prefix="sg-ro-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _config(d: Path, backend: str = "dryrun") -> Path:
    cfg = d / "sipguard.toml"
    # dryrun: outside a network namespace these tests must never touch the host's firewall
    cfg.write_text(f'[enforce]\nbackend = "{backend}"\niptables = "nft"\n[allowlist]\n'
                   'include_host_addresses = false\n')
    cfg.chmod(0o644)
    return cfg


def _fill(state: Path) -> None:
    s = Store.open_state_dir(state)
    now = time.time()
    with s.transaction():
        s.put_ban(Ban("198.18.8.1", "scanner:scanner-ua", now, now + 3600, 1.0), now)
        s.put_ban(Ban("2001:db8::8", "manual", now, None, manual=True), now)
    s.close()


def _argv(cfg: Path, state: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "sipguard", "--config", str(cfg), "--state-dir", str(state), *args]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("SIPGUARD_CONFIG", None)
    return env


def _read_verbs(d: Path) -> list[tuple[list[str], str]]:
    """(arguments, text the output must hold) for every verb that only looks."""
    (d / "k.log").write_text(LOG_LINE)
    (d / "k.log").chmod(0o644)
    return [
        (["status"], "bans in force: "),
        (["status", "--json"], '"daemon": "not running"'),
        (["list"], "198.18.8.1"),
        (["list", "--json"], '"2001:db8::8"'),
        (["list", "--output", "csv"], "2001:db8::8,manual"),
        (["list", "--output", "table"], " bans in force"),
        (["report", "--output", str(d / "out" / "report.html")], "report written"),
        (["scan", str(d / "k.log")], "198.18.8.9"),
        (["test-filter", str(d / "k.log")], "scanner-ua"),
        (["check-config"], "OK"),
    ]


def _in_ro_mount(state: Path, argvs: list[list[str]], ns: str | None = None) -> list[subprocess.CompletedProcess]:
    """Run each argv with `state` bind-mounted read-only over itself in a private mount namespace."""
    results = []
    for argv in argvs:
        script = f"mount --bind -o ro {shlex.quote(str(state))} {shlex.quote(str(state))} && exec {shlex.join(argv)}"
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
        if ns:
            cmd = ["ip", "netns", "exec", ns, *cmd]
        results.append(subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=_env()))
    return results


def _one_line_error(p: subprocess.CompletedProcess, needle: str) -> None:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("sipguard: error: "), p.stderr
    assert needle in lines[0], lines[0]


@contextlib.contextmanager
def _writer_open(state: Path) -> Iterator[None]:
    """A running writer's state: the -wal and -shm files exist and hold rows the main file lacks."""
    s = Store.open_state_dir(state)
    now = time.time()
    with s.transaction():
        s.put_ban(Ban("198.18.8.2", "manual", now, now + 600, manual=True), now)
    hold = sqlite3.connect(state / "sipguard.db")  # a second reader: no checkpoint truncates the log
    hold.execute("SELECT count(*) FROM bans").fetchone()
    try:
        assert (state / "sipguard.db-wal").exists()
        yield
    finally:
        hold.close()
        s.close()


# -- read-only bind mount ------------------------------------------------------------------------------
@root
@pytest.mark.parametrize("writer", ["stopped", "running"])
def test_read_verbs_on_a_read_only_mount(world, writer):
    cfg, state = _config(world), world / "state"
    (world / "out").mkdir()
    _fill(state)
    verbs = _read_verbs(world)
    with _writer_open(state) if writer == "running" else contextlib.nullcontext():
        results = _in_ro_mount(state, [_argv(cfg, state, *args) for args, _ in verbs])
        ban = _in_ro_mount(state, [_argv(cfg, state, "ban", "198.18.8.3")])[0]
    for (args, needle), p in zip(verbs, results):
        assert p.returncode == 0, (args, p.stderr)
        assert needle in p.stdout, (args, p.stdout)
        assert "Traceback" not in p.stderr
    if writer == "running":  # the live log is read: the row not yet in the main file is listed
        listed = next(p for (a, _), p in zip(verbs, results) if a == ["list", "--json"])
        assert "198.18.8.2" in listed.stdout
    _one_line_error(ban, "read-only")


@root
def test_no_database_on_a_read_only_mount_is_one_line(world):
    cfg, state = _config(world), world / "empty"
    state.mkdir(mode=0o750)
    for p in _in_ro_mount(state, [_argv(cfg, state, "list"), _argv(cfg, state, "status")]):
        _one_line_error(p, f"no database in {state} yet")
    assert os.listdir(state) == []


# -- a user that may read, not write --------------------------------------------------------------------
def _as_nobody(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=_env(), user="nobody",
                          group="nogroup", extra_groups=[], cwd="/")


@root
@pytest.mark.parametrize("writer", ["stopped", "running"])
def test_read_verbs_as_a_user_in_the_state_group(world, writer):
    cfg, state = _config(world), world / "state"
    out = world / "out"
    out.mkdir()
    os.chown(out, pwd.getpwnam("nobody").pw_uid, -1)
    _fill(state)
    gid = grp.getgrnam("nogroup").gr_gid
    with _writer_open(state) if writer == "running" else contextlib.nullcontext():
        for p in [state, *state.iterdir()]:
            os.chown(p, 0, gid)  # root:nogroup, 0750 / 0640: the group reads, nobody else
        verbs = _read_verbs(world)
        results = [_as_nobody(_argv(cfg, state, *args)) for args, _ in verbs]
        ban = _as_nobody(_argv(cfg, state, "ban", "198.18.8.3"))
    for (args, needle), p in zip(verbs, results):
        assert p.returncode == 0 and needle in p.stdout, (args, p.stdout, p.stderr)
    assert ban.returncode == 1 and ban.stderr.startswith("sipguard: error: ") and "Traceback" not in ban.stderr


@root
def test_a_user_outside_the_group_gets_one_line(world):
    cfg, state = _config(world), world / "state"
    _fill(state)
    _one_line_error(_as_nobody(_argv(cfg, state, "list")),
                    f"cannot read the state directory {state}: Permission denied")


# -- list --kernel on a read-only state, inside a network namespace ---------------------------------------
@root
def test_list_kernel_on_a_read_only_state(world):
    from lab.netns import Netns

    cfg, state = _config(world, "ipset"), world / "state"
    with Netns(f"sge-{os.getpid() % 100000}-ro") as ns:
        p = subprocess.run(["ip", "netns", "exec", ns.name, *_argv(cfg, state, "ban", "198.18.8.4", "--for", "1h")],
                           capture_output=True, text=True, timeout=60, env=_env())
        assert p.returncode == 0, p.stderr
        [listed] = _in_ro_mount(state, [_argv(cfg, state, "list", "--kernel", "--json")], ns=ns.name)
    assert listed.returncode == 0, listed.stderr
    rows = {b["ip"]: b for b in json.loads(listed.stdout)}
    assert rows["198.18.8.4"]["kernel"]["timeout"] > 3500


# -- modes and owner ------------------------------------------------------------------------------------
def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("umask", [0o000, 0o077, 0o022])
def test_state_dir_and_database_modes_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        s = Store.open_state_dir(tmp_path / "new" / "state")
        with s.transaction():
            s.put_ban(Ban("198.18.8.5", "manual", 1.0, None, manual=True), 1.0)
        d = tmp_path / "new" / "state"
        wal, shm = d / "sipguard.db-wal", d / "sipguard.db-shm"
        assert wal.exists() and shm.exists()
        assert (_mode(d), _mode(d / "sipguard.db"), _mode(wal), _mode(shm)) == (0o750, 0o640, 0o640, 0o640)
        s.close()
    finally:
        os.umask(old)


def test_cli_creates_the_state_with_those_modes(tmp_path, monkeypatch):
    monkeypatch.delenv("SIPGUARD_CONFIG", raising=False)
    cfg = _config(tmp_path)
    state = tmp_path / "state"
    p = subprocess.run(["sh", "-c", f"umask 000 && exec {shlex.join(_argv(cfg, state, 'ban', '198.18.8.6'))}"],
                       capture_output=True, text=True, timeout=60, env=_env())
    assert p.returncode == 0, p.stderr
    assert _mode(state) == 0o750 and _mode(state / "sipguard.db") == 0o640


def test_an_existing_state_dir_keeps_its_mode(tmp_path):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    Store.open_state_dir(d).close()
    assert _mode(d) == 0o700


@root
@pytest.mark.parametrize("what", ["directory", "database"])
def test_root_refuses_state_owned_by_another_user(world, what):
    cfg, state = _config(world), world / "state"
    _fill(state)
    nobody = pwd.getpwnam("nobody").pw_uid
    target = state if what == "directory" else state / "sipguard.db"
    os.chown(target, nobody, -1)
    for args in (["status"], ["list"], ["ban", "198.18.8.7"]):
        p = subprocess.run(_argv(cfg, state, *args), capture_output=True, text=True, timeout=60, env=_env())
        _one_line_error(p, f"{target} is owned by nobody (uid {nobody}), not root")
    os.chown(target, 0, -1)
    assert subprocess.run(_argv(cfg, state, "list"), capture_output=True, timeout=60, env=_env()).returncode == 0
