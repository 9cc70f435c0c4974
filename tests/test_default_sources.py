"""The sources an installed daemon finds by itself (issue 13): with no [sources] configured, it follows
/var/log/kamailio.log if it exists, else the journal of kamailio.service if the journal has it, else
/var/log/syslog; the start log and `sipguard status` say which and why. The roots it looks in are
injected (SourceRoots, or $SIPGUARD_LOG_DIR / $SIPGUARD_JOURNALCTL for the CLI); journalctl is a
stand-in script that answers like the real one."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sipguard.config import Config, load_config
from sipguard.enforce.dryrun import DryRunEnforcer
from sipguard.sources import JournalFollower, MultiFollower
from sipguard.store import Store
from sipguard.wiring import SourceRoots, build_daemon, choose_sources
from waiting import wait_for

SIPGUARD = [sys.executable, "-m", "sipguard"]


def _journalctl(d: Path, unit_lines: str = "", fail: str = "", follow: list[dict] | None = None) -> Path:
    """A journalctl that prints `unit_lines` for `--unit kamailio.service --lines=1`, fails with
    `fail` when given, and for --follow prints `follow` as JSON entries, then waits."""
    entries = d / "entries.json"
    entries.write_text("".join(json.dumps(e) + "\n" for e in follow or []))
    (d / "unit.txt").write_text(unit_lines)
    script = d / "journalctl"
    body = f'echo "{fail}" >&2; exit 1' if fail else ""
    script.write_text(f"""#!/bin/sh
{body}
case " $* " in
  *" --follow "*) cat {entries}; exec sleep 600;;
  *" --unit kamailio.service "*) cat {d / 'unit.txt'};;
esac
exit 0
""")
    script.chmod(0o755)
    return script


def _defaults() -> Config:
    return Config.model_validate({})


def test_kamailio_log_first(tmp_path: Path) -> None:
    (tmp_path / "kamailio.log").touch()
    (tmp_path / "syslog").touch()
    c = choose_sources(_defaults().sources, SourceRoots(tmp_path, str(_journalctl(tmp_path, "x\n"))))
    assert (c.logs, c.journal, c.chosen_by) == ([str(tmp_path / "kamailio.log")], [], "default")
    assert c.reason == f"no [sources] configured and {tmp_path / 'kamailio.log'} exists"


def test_then_the_journal_of_kamailio_service(tmp_path: Path) -> None:
    c = choose_sources(_defaults().sources, SourceRoots(tmp_path, str(_journalctl(tmp_path, "Started kamailio\n"))))
    assert (c.logs, c.journal) == ([], ["kamailio.service"])
    assert c.reason == (f"no [sources] configured, {tmp_path / 'kamailio.log'} does not exist and the journal "
                        f"has entries of kamailio.service")
    assert c.describe() == "the journal of kamailio.service"


@pytest.mark.parametrize("unit_lines, fail, why", [
    ("", "", "the journal has no entries of kamailio.service"),
    ("x\n", "No journal files were found.", "journalctl failed: No journal files were found."),
])
def test_else_syslog(tmp_path: Path, unit_lines: str, fail: str, why: str) -> None:
    c = choose_sources(_defaults().sources, SourceRoots(tmp_path, str(_journalctl(tmp_path, unit_lines, fail))))
    assert (c.logs, c.journal) == ([str(tmp_path / "syslog")], [])
    assert c.reason == f"no [sources] configured, {tmp_path / 'kamailio.log'} does not exist and {why}"


def test_no_journalctl_at_all(tmp_path: Path) -> None:
    c = choose_sources(_defaults().sources, SourceRoots(tmp_path, str(tmp_path / "missing")))
    assert c.logs == [str(tmp_path / "syslog")] and "could not be run" in c.reason


def test_configured_sources_are_never_second_guessed(tmp_path: Path) -> None:
    (tmp_path / "kamailio.log").touch()
    roots = SourceRoots(tmp_path, str(tmp_path / "missing"))
    for sources, logs, journal in [({"logs": ["/srv/k.log"]}, ["/srv/k.log"], []),
                                   ({"logs": []}, [], []),  # explicitly nothing: nothing
                                   ({"journal": ["kamailio"]}, [], ["kamailio"])]:
        c = choose_sources(Config.model_validate({"sources": sources}).sources, roots)
        assert (c.logs, c.journal, c.chosen_by, c.reason) == (logs, journal, "config", "named in [sources]")
    # options that do not name sources leave the choice to the daemon
    c = choose_sources(Config.model_validate({"sources": {"from_start": True, "programs": ["k"]}}).sources, roots)
    assert c.chosen_by == "default" and c.logs == [str(tmp_path / "kamailio.log")]
    c = choose_sources(_defaults().sources, roots, cli_logs=["/x.log"])
    assert (c.logs, c.chosen_by, c.reason) == (["/x.log"], "command line", "--log on the command line")


def test_a_config_file_without_sources_lets_the_daemon_choose(tmp_path: Path) -> None:
    p = tmp_path / "sipguard.toml"
    p.write_text('[sources]\nformat = "auto"\n')
    assert not load_config(p).sources.chosen
    p.write_text('[sources]\nlogs = ["/var/log/kamailio.log"]\n')
    assert load_config(p).sources.chosen


def _entry(i: int, msg: str, **fields: str) -> dict:
    return {"__CURSOR": f"s=x;i={i}", "__REALTIME_TIMESTAMP": str(int(time.time() * 1e6)), "MESSAGE": msg, **fields}


def test_daemon_follows_the_chosen_journal_and_trusts_only_the_unit(tmp_path: Path, caplog) -> None:
    """The journal of kamailio.service, chosen by default: only entries journald put in that unit count
    (not a user's `logger -t kamailio`, not systemd's own messages about the unit)."""
    scanner = "WARNING: <script>: Blocked scanner UA 'friendly-scanner' from {}:5060"
    follow = [
        _entry(1, scanner.format("198.18.0.5"), _SYSTEMD_UNIT="kamailio.service", SYSLOG_IDENTIFIER="/usr/sbin/kamailio",
               _PID="87", _UID="102", _EXE="/usr/sbin/kamailio"),
        _entry(2, scanner.format("198.18.0.99"), _SYSTEMD_UNIT="user@1000.service", SYSLOG_IDENTIFIER="kamailio",
               _PID="900", _UID="1000", _EXE="/usr/bin/logger"),
        _entry(3, scanner.format("198.18.0.99"), _SYSTEMD_UNIT="init.scope", UNIT="kamailio.service", _PID="1",
               _UID="0", SYSLOG_IDENTIFIER="systemd"),
        _entry(4, scanner.format("198.18.0.99"), SYSLOG_IDENTIFIER="kamailio"),  # nothing journald vouches for
    ]
    roots = SourceRoots(tmp_path, str(_journalctl(tmp_path, "Started kamailio.service\n", follow=follow)))
    store = Store(":memory:")
    with caplog.at_level(logging.INFO, logger="sipguard"):
        d = build_daemon(_defaults(), store, DryRunEnforcer(), from_start=True, roots=roots)
    try:
        assert isinstance(d.parts.follower, MultiFollower)
        journal = d.parts.follower.journal
        assert isinstance(journal, JournalFollower) and journal.units == ["kamailio.service"]
        assert f"sources: the journal of kamailio.service (no [sources] configured, {tmp_path / 'kamailio.log'} " \
               f"does not exist and the journal has entries of kamailio.service)" in caplog.text
        saved = json.loads(store.get_meta("sources"))
        assert (saved["journal"], saved["chosen_by"]) == (["kamailio.service"], "default")
        d.setup()

        def read() -> bool:
            d.step(d.parts.follower.poll_batch(0.1))
            return d.stats.lines >= 4

        wait_for(read, timeout=15.0, interval=0.0)
        assert [r[0] for r in store.conn.execute("SELECT ip FROM events")] == ["198.18.0.5"]
        [parser] = [p for k, p in d.parts.parsers.items() if k.startswith("journal:")]
        assert parser.stats["untrusted"] == 3
    finally:
        d.parts.follower.close()
        store.close()


def _status(tmp_path: Path, state: Path, env: dict[str, str]) -> str:
    cfg = tmp_path / "empty.toml"
    cfg.write_text("")
    r = subprocess.run([*SIPGUARD, "--config", str(cfg), "--state-dir", str(state), "status"], capture_output=True,
                       text=True, timeout=60, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_status_says_which_source_and_why(tmp_path: Path) -> None:
    logs = tmp_path / "log"
    logs.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    journalctl = _journalctl(bin_dir, "Started kamailio.service\n")
    env = {"SIPGUARD_LOG_DIR": str(logs), "SIPGUARD_JOURNALCTL": str(journalctl)}
    state = tmp_path / "st"
    Store.open_state_dir(state).close()
    out = " ".join(_status(tmp_path, state, env).split())  # rich may wrap a long line
    assert (f"sources (the daemon would choose): the journal of kamailio.service (no [sources] configured, "
            f"{logs / 'kamailio.log'} does not exist and the journal has entries of kamailio.service)") in out, out
    # what a daemon chose at its start is what status says, even when the host changed since
    store = Store.open_state_dir(state)
    d = build_daemon(_defaults(), store, DryRunEnforcer(), roots=SourceRoots(logs, str(journalctl)))
    d.parts.follower.close()
    store.close()
    (logs / "kamailio.log").touch()
    out = " ".join(_status(tmp_path, state, env).split())
    assert "sources: the journal of kamailio.service (no [sources] configured" in out, out
    assert "would choose" not in out
