"""Files a root daemon can trust (issue 16, item 10; like sshd's StrictModes): running as root, a config
file, filter directory or filter file that root does not own, that others can write, or that sits in a
directory others could replace it in is refused with its reason; the shipped filters are trusted as
installed; `[sources] journalctl` must be an absolute path to a root-owned program nobody else can
write. Real files with bad modes and owners (chown to nobody), in temporary directories."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sipguard.config import Config, SYSTEM_PATH, load_config, trusted_as_installed, untrusted
from sipguard.errors import ConfigError
from sipguard.filters import FilterSet, shipped_dir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, and the checks apply to root)")

NOBODY = 65534
SIPGUARD = [sys.executable, "-m", "sipguard"]
FILTER = """name = "mine"
kind = "auth_failure"
prefilter = ["boom"]
regex = ['boom from (?P<ip><ADDR>):<PORT>$']
"""


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A root-owned 0755 directory under the (sticky, root-owned) temporary directory."""
    d = tmp_path / "etc"
    d.mkdir()
    d.chmod(0o755)
    return d


def _config(home: Path, text: str = 'state_dir = "/nonexistent/st"\n', mode: int = 0o644, uid: int = 0) -> Path:
    p = home / "sipguard.toml"
    p.write_text(text)
    os.chown(p, uid, -1)
    p.chmod(mode)
    return p


def _refused(path: Path, *words: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: refused (running as root): "), msg
    for w in words:
        assert w in msg, msg


# -- the config file -----------------------------------------------------------------------------------

def test_config_file_root_owned_and_private_is_used(home: Path) -> None:
    cfg = load_config(_config(home))
    assert str(cfg.state_dir) == "/nonexistent/st"


@pytest.mark.parametrize("mode, words", [
    (0o666, "the config file is group and world-writable (mode 0666)"),
    (0o646, "the config file is world-writable (mode 0646)"),
    (0o664, "the config file is group-writable (mode 0664)"),
])
def test_config_file_writable_by_others_is_refused(home: Path, mode: int, words: str) -> None:
    _refused(_config(home, mode=mode), words)


def test_config_file_owned_by_nobody_is_refused(home: Path) -> None:
    _refused(_config(home, uid=NOBODY), "the config file is owned by nobody (uid 65534), not root")


def test_config_file_in_a_directory_others_can_write_is_refused(home: Path) -> None:
    p = _config(home)
    home.chmod(0o777)
    _refused(p, f"its directory {home} is group and world-writable (mode 0777)")
    home.chmod(0o775)
    _refused(p, f"its directory {home} is group-writable (mode 0775)")
    home.chmod(0o1777)  # sticky, like /tmp: nobody else can replace root's file in it
    assert load_config(p).state_dir is not None
    home.chmod(0o755)
    os.chown(home, NOBODY, -1)
    _refused(p, f"its directory {home} is owned by nobody (uid 65534), not root")


def test_config_file_through_a_symlink_is_checked_where_it_points(home: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    os.chown(other, NOBODY, -1)
    target = other / "real.toml"
    target.write_text('state_dir = "/nonexistent/st"\n')
    link = home / "sipguard.toml"
    link.symlink_to(target)
    _refused(link, f"its directory {other} is owned by nobody")


def test_cli_refuses_with_one_line(home: Path) -> None:
    p = _config(home, mode=0o666)
    r = subprocess.run([*SIPGUARD, "--config", str(p), "check-config"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r
    assert r.stderr.strip().splitlines() == [
        f"sipguard: error: {p}: refused (running as root): the config file is group and world-writable "
        f"(mode 0666); a root daemon uses only files that root owns and nobody else can write "
        f"(chown root, chmod go-w)"], r.stderr


def test_not_root_nothing_is_refused() -> None:
    """The checks are for a root process: `nobody` may use a config file of its own, mode 0666."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) missing")
    d = Path(tempfile.mkdtemp(prefix="sg-trust-", dir="/tmp"))  # pytest's own tmp dirs are root's 0700
    try:
        d.chmod(0o755)
        p = _config(d, uid=NOBODY, mode=0o666)
        r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *SIPGUARD,
                            "--config", str(p), "check-config"], capture_output=True, text=True, timeout=60, cwd=d)
        if r.returncode != 0 and "Permission denied" in r.stderr and str(d) not in r.stderr:
            pytest.skip(f"nobody cannot run this checkout: {r.stderr.strip()[-200:]}")
        assert r.returncode == 0 and f"config: {p}: OK" in r.stdout, r
    finally:
        shutil.rmtree(d)


# -- filter directories and files ---------------------------------------------------------------------

def _filters(home: Path) -> Path:
    d = home / "filters.d"
    d.mkdir()
    d.chmod(0o755)
    (d / "mine.toml").write_text(FILTER)
    (d / "mine.toml").chmod(0o644)
    return d


def _filter_refused(d: Path, where: Path, *words: str) -> None:
    with pytest.raises(ConfigError) as e:
        FilterSet.load([shipped_dir(), d])
    msg = str(e.value)
    assert msg.startswith(f"{where}: refused (running as root): "), msg
    for w in words:
        assert w in msg, msg


def test_filter_directory_root_owned_and_private_is_used(home: Path) -> None:
    assert "mine" in FilterSet.load([shipped_dir(), _filters(home)]).names


def test_filter_directory_writable_by_others_is_refused(home: Path) -> None:
    d = _filters(home)
    d.chmod(0o777)
    _filter_refused(d, d, "the filter directory is group and world-writable (mode 0777)")
    d.chmod(0o1777)  # sticky or not: anyone could add a filter to it
    _filter_refused(d, d, "the filter directory is group and world-writable (mode 1777)")


def test_filter_directory_owned_by_nobody_is_refused(home: Path) -> None:
    d = _filters(home)
    os.chown(d, NOBODY, -1)
    _filter_refused(d, d, "the filter directory is owned by nobody (uid 65534), not root")


@pytest.mark.parametrize("mode, uid, words", [
    (0o666, 0, "the filter file is group and world-writable (mode 0666)"),
    (0o620, 0, "the filter file is group-writable (mode 0620)"),
    (0o644, NOBODY, "the filter file is owned by nobody (uid 65534), not root"),
])
def test_filter_file_refused(home: Path, mode: int, uid: int, words: str) -> None:
    d = _filters(home)
    f = d / "mine.toml"
    os.chown(f, uid, -1)
    f.chmod(mode)
    _filter_refused(d, f, words)


def test_filter_file_symlinked_to_a_file_nobody_owns_is_refused(home: Path, tmp_path: Path) -> None:
    d = _filters(home)
    (d / "mine.toml").unlink()
    target = tmp_path / "elsewhere.toml"
    target.write_text(FILTER)
    os.chown(target, NOBODY, -1)
    (d / "mine.toml").symlink_to(target)
    _filter_refused(d, d / "mine.toml", "the filter file is owned by nobody")


def test_a_filter_replacing_a_shipped_one_from_a_world_writable_directory_is_refused(home: Path) -> None:
    """The issue's case: a world-writable filters.d whose file has a shipped name (any regex, any weight)."""
    d = _filters(home)
    (d / "mine.toml").write_text(FILTER.replace('name = "mine"', 'name = "auth-failure"') + "weight = 1000.0\n")
    d.chmod(0o757)
    _filter_refused(d, d, "world-writable (mode 0757)")


def test_shipped_filters_are_trusted_as_installed_and_copies_are_not(home: Path) -> None:
    assert trusted_as_installed(shipped_dir())
    assert len(FilterSet.load([shipped_dir()]).names) == len(list(shipped_dir().glob("*.toml"))) == 11
    copy = home / "copy"
    shutil.copytree(shipped_dir(), copy)
    copy.chmod(0o777)
    assert not trusted_as_installed(copy)
    _filter_refused(copy, copy, "world-writable")


def test_config_naming_an_untrusted_filter_directory_is_refused_at_load(home: Path) -> None:
    d = _filters(home)
    d.chmod(0o777)
    p = _config(home, f'[filters]\ndirectories = ["{shipped_dir()}", "{d}"]\n')
    r = subprocess.run([*SIPGUARD, "--config", str(p), "check-config"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and f"sipguard: error: {d}: refused (running as root): the filter directory" in r.stderr, r


# -- the program the config names ---------------------------------------------------------------------

def _program(home: Path, mode: int = 0o755, uid: int = 0) -> Path:
    p = home / "journalctl"
    p.write_text("#!/bin/sh\nexit 0\n")
    os.chown(p, uid, -1)
    p.chmod(mode)
    return p


def _journal_config(home: Path, journalctl: str | None) -> Path:
    line = "" if journalctl is None else f'journalctl = "{journalctl}"\n'
    return _config(home, f'[sources]\nlogs = []\njournal_identifiers = ["kamailio"]\n{line}')


def _journalctl_refused(home: Path, journalctl: str, *words: str) -> None:
    p = _journal_config(home, journalctl)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: line 4: sources.journalctl: "), msg
    for w in words:
        assert w in msg, msg


def test_journalctl_root_owned_absolute_is_used(home: Path) -> None:
    prog = _program(home)
    assert load_config(_journal_config(home, str(prog))).sources.journalctl == str(prog)


def test_journalctl_relative_is_refused(home: Path) -> None:
    _journalctl_refused(home, "bin/journalctl", "'bin/journalctl': a program run as root must be an absolute path")


@pytest.mark.parametrize("mode, uid, words", [
    (0o777, 0, "the program is group and world-writable (mode 0777)"),
    (0o775, 0, "the program is group-writable (mode 0775)"),
    (0o755, NOBODY, "the program is owned by nobody (uid 65534), not root"),
])
def test_journalctl_untrusted_program_is_refused(home: Path, mode: int, uid: int, words: str) -> None:
    prog = _program(home, mode, uid)
    _journalctl_refused(home, str(prog), f"'{prog}' refused (running as root): {words}")


def test_journalctl_in_a_directory_nobody_owns_is_refused(home: Path) -> None:
    prog = _program(home)
    os.chown(home, NOBODY, -1)
    p = home.parent / "sipguard.toml"
    p.write_text(f'[sources]\nlogs = []\njournal = ["kamailio.service"]\njournalctl = "{prog}"\n')
    with pytest.raises(ConfigError, match=rf"sources\.journalctl: '{prog}' refused \(running as root\): "
                                          rf"its directory {home} is owned by nobody"):
        load_config(p)


def test_journalctl_not_executable_is_refused(home: Path) -> None:
    prog = _program(home, 0o644)
    _journalctl_refused(home, str(prog), "is not an executable file")


def test_journalctl_default_is_looked_up_in_the_system_path_only(home: Path, monkeypatch) -> None:
    fake = home / "bin"
    fake.mkdir()
    _program(fake)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ.get('PATH', '')}")  # never consulted
    system = next((Path(d) / "journalctl" for d in SYSTEM_PATH if (Path(d) / "journalctl").exists()), None)
    if system is None:
        _journalctl_refused(home, "journalctl", "not found in /usr/bin")
        return
    cfg = load_config(_journal_config(home, None))
    assert cfg.sources.journalctl == str(system) and untrusted(system) is None


def test_journalctl_not_checked_without_journal_sources(home: Path) -> None:
    p = _config(home, '[sources]\nlogs = []\njournalctl = "relative/journalctl"\n')
    assert load_config(p).sources.journalctl == "relative/journalctl"
    assert Config.model_validate({"sources": {"journalctl": "x"}}).sources.journalctl == "x"


# -- lines only Kamailio can have written (issue 12 part 5): the journal --------------------------------
#
# A real systemd-journald in private namespaces (tests/lab/journald.py), a real Kamailio (the example
# config, without log_name: identifier /usr/sbin/kamailio as under Debian 13's stock unit) running as
# user kamailio, and forgers: other local users (nobody, root, even kamailio itself through another
# program, and Kamailio's own binary run by nobody with a config of its own) writing lines that claim
# to be Kamailio's and name 198.18.0.99. Only the real Kamailio's line bans.

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.lab import journald as lab_journald  # noqa: E402

KAMAILIO_BIN = "/usr/sbin/kamailio"
FAKE = "198.18.0.99"
ATTACKER = "198.18.0.51"
PROXY = "198.18.0.1"
MPATH = "/usr/lib/x86_64-linux-gnu/kamailio/modules/"
FORGED = f"WARNING: <script>: Blocked scanner UA 'friendly-scanner' from {FAKE}:5060"
FORGING_CFG = f"""#!KAMAILIO
debug=2
log_stderror=no
log_facility=LOG_LOCAL0
children=1
listen=udp:127.0.0.1:5099
mpath="{MPATH}"
loadmodule "xlog.so"
event_route[core:worker-one-init] {{
    xlog("L_WARN", "Blocked scanner UA 'friendly-scanner' from {FAKE}:5060\\n");
}}
request_route {{
    drop;
}}
"""
_SEND_SIP = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 5060))
s.sendto(sys.stdin.buffer.read(), (sys.argv[2], 5060))
"""


def _wait_udp(j, addr: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if addr in j.run("ss", "-lunH", check=False).stdout.decode():
            time.sleep(0.3)
            return
        time.sleep(0.1)
    raise AssertionError(f"nothing listening on {addr}")


needs_kamailio_host = pytest.mark.skipif(not lab_journald.available() or not os.path.exists(KAMAILIO_BIN),
                                         reason="needs systemd-journald, unshare/nsenter/setpriv and kamailio")


@contextlib.contextmanager
def _kamailio_host(conf: str = lab_journald.CONF, unit: str | None = None):
    """A private journald and a real Kamailio (example config without log_name) as user kamailio
    (with `unit`, inside that unit's cgroup, as Debian's kamailio.service runs it)."""
    from tests.lab.kamailio import prepare_config

    work = Path(tempfile.mkdtemp(prefix="sgh-kam-", dir="/tmp"))
    kam = None
    try:
        work.chmod(0o755)
        cfg_path = prepare_config(work, PROXY)
        text = cfg_path.read_text()
        cfg_path.write_text("".join(ln for ln in text.splitlines(keepends=True) if not ln.startswith("log_name=")))
        run_dir = work / "run"
        run_dir.mkdir()
        os.chown(run_dir, pwd.getpwnam("kamailio").pw_uid, -1)
        with lab_journald.PrivateJournald(conf=conf, units=unit is not None) as j:
            kam = j.popen(KAMAILIO_BIN, "-DD", "-f", str(cfg_path), "-Y", str(run_dir), "-P", str(run_dir / "k.pid"),
                          "-w", str(work), user="kamailio", unit=unit, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait_udp(j, f"{PROXY}:5060")
            yield j, work
            kam.kill()  # nsenter; Kamailio itself ends with the namespace
            kam.wait(5)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _forge(j, work: Path) -> int:
    """Every way a local user can claim to be Kamailio; returns how many lines were sent."""
    n = 0
    for ident in ("kamailio", KAMAILIO_BIN):
        j.run("logger", "-p", "local0.warning", "-t", ident, FORGED, user=NOBODY)  # syslog socket, as nobody
        j.run("sh", "-c", f"echo \"{FORGED}\" | systemd-cat -t {ident}", user=NOBODY)  # stdout stream
        j.run("logger", "--journald", input=f"MESSAGE={FORGED}\nSYSLOG_IDENTIFIER={ident}\nSYSLOG_FACILITY=16\n"
              .encode(), user=NOBODY)  # native protocol
        n += 3
    for user in (NOBODY, 0, "kamailio"):  # long-lived senders: journald sees their _EXE (python)
        with lab_journald.Sender(j, user=user) as s:
            for ident in ("kamailio", KAMAILIO_BIN):
                s.send(FORGED, ident=ident)
                s.send(FORGED, ident=ident, mode="native")
                n += 2
            time.sleep(0.3)
    forger_dir = work / "forger"
    forger_dir.mkdir()
    os.chown(forger_dir, NOBODY, NOBODY)
    (work / "forging.cfg").write_text(FORGING_CFG)
    forger = j.popen(KAMAILIO_BIN, "-DD", "-f", str(work / "forging.cfg"), "-Y", str(forger_dir),
                     "-P", str(forger_dir / "k.pid"), "-w", str(forger_dir), user=NOBODY,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from waiting import wait_for

        wait_for(lambda: any(e.get("_UID") == str(NOBODY) and e.get("_EXE") == KAMAILIO_BIN
                             and FAKE in str(e.get("MESSAGE")) for e in j.entries()), timeout=10.0)
    finally:
        forger.kill()
        forger.wait(5)
    return n + 1


def _real_scanner(j) -> None:
    """A real scanner request to the real Kamailio, from ATTACKER: it logs `Blocked scanner UA`."""
    from tests.lab.sip import build_request

    sip = build_request("OPTIONS", f"sip:100@{PROXY}", from_uri=f"sip:100@{PROXY}", to_uri=f"sip:100@{PROXY}",
                        local_ip=ATTACKER, user_agent="friendly-scanner")
    j.run("/usr/bin/python3", "-c", _SEND_SIP, ATTACKER, PROXY, input=sip, user=NOBODY)


@needs_kamailio_host
def test_forged_journal_lines_from_other_users_ban_nobody(tmp_path: Path) -> None:
    import threading

    from sipguard.enforce.dryrun import DryRunEnforcer
    from sipguard.store import Store
    from sipguard.wiring import build_daemon
    from waiting import wait_for

    with _kamailio_host() as (j, work):
        cfg = Config.model_validate({"allowlist": {"include_host_addresses": False},
                                     "daemon": {"control_interval": 0.05},
                                     "sources": {"logs": [], "journal_identifiers": [KAMAILIO_BIN, "kamailio"],
                                                 "journalctl": str(j.journalctl)}})
        assert cfg.sources.journal_users == ["kamailio"] and KAMAILIO_BIN in cfg.sources.journal_executables
        store = Store.open_state_dir(tmp_path / "st")
        enf = DryRunEnforcer()
        d = build_daemon(cfg, store, enf, logs=[])
        th = threading.Thread(target=d.run, daemon=True)
        th.start()
        try:
            wait_for(lambda: d.ready.is_set(), timeout=10.0)
            time.sleep(0.5)
            sent = _forge(j, work)
            _real_scanner(j)
            wait_for(lambda: ATTACKER in {e.ip for e in enf.entries()}, timeout=10.0)
            time.sleep(0.5)
            forged = [e for e in j.entries() if FAKE in str(e.get("MESSAGE"))]
            assert len(forged) == sent, (len(forged), sent)  # every forgery reached the journal ...
            assert {e.ip for e in enf.entries()} == {ATTACKER}  # ... and banned nobody
            ips = {r[0] for r in store.conn.execute("SELECT ip FROM events")}
            assert ips == {ATTACKER}, ips
            [parser] = [p for k, p in d.parts.parsers.items() if k.startswith("journal:")]
            assert parser.stats["untrusted"] >= len(forged), dict(parser.stats)
            real = [e for e in j.entries() if ATTACKER in str(e.get("MESSAGE"))]
            assert real and all(e["_EXE"] == KAMAILIO_BIN and e["SYSLOG_IDENTIFIER"] == KAMAILIO_BIN for e in real)
        finally:
            d.stop()
            th.join(10)
            store.close()
        assert not th.is_alive()


@needs_kamailio_host
def test_default_source_is_the_real_journal_of_kamailio_service_and_trusts_only_the_unit(tmp_path: Path) -> None:
    """An installed daemon with no config on a stock Debian Kamailio host (no rsyslog, Kamailio as
    kamailio.service logging to the journal): it chooses the journal of kamailio.service by itself
    (asking the real journalctl), and the unit's cgroup, which journald records, is the only proof:
    the same forgers as above (none of them in the unit) ban nobody."""
    import threading

    from sipguard.enforce.dryrun import DryRunEnforcer
    from sipguard.store import Store
    from sipguard.wiring import SourceRoots, build_daemon, choose_sources
    from waiting import wait_for

    with _kamailio_host(unit="kamailio.service") as (j, work):
        wait_for(lambda: any(e.get("_SYSTEMD_UNIT") == "kamailio.service" for e in j.entries()), timeout=10.0)
        roots = SourceRoots(tmp_path / "varlog", str(j.journalctl))  # an empty /var/log: no kamailio.log
        cfg = Config.model_validate({"allowlist": {"include_host_addresses": False},
                                     "daemon": {"control_interval": 0.05}})
        choice = choose_sources(cfg.sources, roots)
        assert (choice.logs, choice.journal, choice.chosen_by) == ([], ["kamailio.service"], "default"), choice
        store = Store.open_state_dir(tmp_path / "st")
        enf = DryRunEnforcer()
        d = build_daemon(cfg, store, enf, roots=roots)
        th = threading.Thread(target=d.run, daemon=True)
        th.start()
        try:
            wait_for(lambda: d.ready.is_set(), timeout=10.0)
            time.sleep(0.5)
            # the forgers again, now also claiming the unit in what they write (UNIT=, _SYSTEMD_UNIT=)
            j.run("logger", "--journald", input=f"MESSAGE={FORGED}\nSYSLOG_IDENTIFIER=kamailio\nUNIT=kamailio.service\n"
                  f"_SYSTEMD_UNIT=kamailio.service\n".encode(), user=NOBODY)
            # root can even get a line selected by `journalctl -u kamailio.service` (OBJECT_SYSTEMD_UNIT with
            # _UID=0): the parser still refuses it, as it is not in the unit's cgroup
            j.run("logger", "--journald", input=f"MESSAGE={FORGED}\nSYSLOG_IDENTIFIER=kamailio\n"
                  f"OBJECT_SYSTEMD_UNIT=kamailio.service\n".encode(), user=0)
            _forge(j, work)
            _real_scanner(j)
            wait_for(lambda: ATTACKER in {e.ip for e in enf.entries()}, timeout=10.0)
            time.sleep(0.5)
            selected = j.entries("--unit=kamailio.service")
            assert any(FAKE in str(e.get("MESSAGE")) for e in selected), "the root forgery was selected"
            [parser] = [p for k, p in d.parts.parsers.items() if k.startswith("journal:")]
            assert parser.stats["untrusted"] >= 1, dict(parser.stats)
            assert {e.ip for e in enf.entries()} == {ATTACKER}
            assert {r[0] for r in store.conn.execute("SELECT ip FROM events")} == {ATTACKER}
            assert any(e.get("UNIT") == "kamailio.service" and FAKE in str(e.get("MESSAGE")) for e in j.entries())
            assert json.loads(store.get_meta("sources"))["journal"] == ["kamailio.service"]
        finally:
            d.stop()
            th.join(10)
            store.close()
        assert not th.is_alive()


# -- the rsyslog snippet's filter, in a real private rsyslogd ----------------------------------------------

SNIPPET = Path(__file__).resolve().parents[1] / "examples" / "kamailio" / "rsyslog-kamailio.conf"
DEBIAN_IMUXSOCK = 'module(load="imuxsock") # provides support for local system logging'  # Debian 12's rsyslog.conf


def _documented_module_line(tmp: Path) -> str:
    """Debian's imuxsock line after the `sed` the snippet's header tells the operator to run."""
    [cmd] = [ln.lstrip("# ").strip() for ln in SNIPPET.read_text().splitlines() if "sed -i" in ln and "rsyslog.conf" in ln]
    conf = tmp / "debian-rsyslog.conf"
    conf.write_text(DEBIAN_IMUXSOCK + "\n")
    subprocess.run(["sh", "-c", cmd.replace("/etc/rsyslog.conf", str(conf))], check=True, timeout=30)
    line = conf.read_text().splitlines()[0]
    assert 'SysSock.Annotate="on"' in line and 'SysSock.ParseTrusted="on"' in line, line
    return line


def _rsyslog(j, t: Path, module_line: str, uid: str | None) -> subprocess.Popen:
    """rsyslogd as Debian runs it, behind journald (ForwardToSyslog): its system socket is journald's
    forward socket (socket activation there; the name here), our snippet included before `*.*`."""
    snippet = SNIPPET.read_text().replace("/var/log/", f"{t}/")
    if uid is not None:  # the header's other sed line, as documented
        [cmd] = [ln.lstrip("# ").strip() for ln in snippet.splitlines() if "sed -i" in ln and "KAMAILIO_UID" in ln]
        assert cmd == 'sed -i "s/KAMAILIO_UID/$(id -u kamailio)/" /etc/rsyslog.d/10-kamailio.conf', cmd
        snippet = snippet.replace("KAMAILIO_UID", uid)
    (t / "10-kamailio.conf").write_text(snippet)
    module_line = module_line.replace('module(load="imuxsock"',
                                      'module(load="imuxsock" SysSock.Name="/run/systemd/journal/syslog"')
    (t / "rsyslog.conf").write_text(f"""{module_line}
global(workDirectory="{t}")
$IncludeConfig {t}/10-kamailio.conf
*.* {t}/syslog
""")
    proc = j.popen("rsyslogd", "-n", "-f", str(t / "rsyslog.conf"), "-i", str(t / "rsyslogd.pid"),
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(t / "rsyslogd.err", "wb"))
    from waiting import wait_for

    wait_for(lambda: (j.sock / "syslog").exists(), timeout=10.0)
    return proc


def _scan(path: Path) -> set[str]:
    from sipguard.filters import FilterSet, shipped_dir
    from sipguard.formats import RecordParser
    from sipguard.model import Line
    from sipguard.pipeline import Pipeline

    if not path.exists():
        return set()
    fs = FilterSet.load([shipped_dir()])
    lines = [b for b in path.read_bytes().split(b"\n") if b]
    recs = Pipeline(RecordParser()).records(Line(path.name, b, i) for i, b in enumerate(lines))
    return {e.ip for r in recs if (e := fs.match(r, time.time())) is not None}


@needs_kamailio_host
@pytest.mark.skipif(shutil.which("rsyslogd") is None, reason="needs rsyslog")
@pytest.mark.parametrize("setup", ["as documented", "without the annotation", "uid not filled in"])
def test_rsyslog_snippet_files_only_what_kamailio_sent(setup: str) -> None:
    from waiting import wait_for

    conf = lab_journald.CONF.replace("ForwardToSyslog=no", "ForwardToSyslog=yes")
    with _kamailio_host(conf) as (j, work):
        t = work / "rsyslog"
        t.mkdir()
        uid = None if setup == "uid not filled in" else str(pwd.getpwnam("kamailio").pw_uid)
        rs = _rsyslog(j, t, _documented_module_line(t) if setup != "without the annotation" else DEBIAN_IMUXSOCK, uid)
        try:
            sent = _forge(j, work)
            _real_scanner(j)
            wait_for(lambda: ATTACKER in (t / "kamailio.log").read_text(errors="replace")
                     if (t / "kamailio.log").exists() else
                     ATTACKER in (t / "kamailio-untrusted.log").read_text(errors="replace")
                     if (t / "kamailio-untrusted.log").exists() else False, timeout=10.0)
            time.sleep(0.5)
        finally:
            rs.terminate()
            rs.wait(10)
        log, untrusted = t / "kamailio.log", t / "kamailio-untrusted.log"
        forged_lines = [ln for ln in untrusted.read_text(errors="replace").splitlines() if FAKE in ln]
        if setup == "as documented":
            assert _scan(log) == {ATTACKER}  # the real Kamailio's line, and only Kamailio's lines
            assert FAKE not in log.read_text()
            assert f"{KAMAILIO_BIN}[" in log.read_text()  # Debian 13's identifier, read by the program check
            assert len(forged_lines) == sent, (len(forged_lines), sent)  # every forgery kept out, and visible
        else:  # a step missed: nothing is trusted, and it shows (everything in kamailio-untrusted.log)
            assert not log.exists() or _scan(log) == set()
            assert ATTACKER in untrusted.read_text()
        syslog = (t / "syslog").read_text(errors="replace") if (t / "syslog").exists() else ""
        assert FAKE not in syslog and "kamailio" not in syslog  # nothing claiming Kamailio in /var/log/syslog
