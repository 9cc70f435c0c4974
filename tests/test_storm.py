"""Lines lost in a storm, said out loud (issue 12 part 3).

* The notices themselves (formats/losses.py): journald's entry (trusted only with journald's own
  fields), journald's line through syslog, rsyslog's imuxsock/imjournal messages in both wordings;
  counted, warned about once per origin, never a crash on random bytes.
* A real private systemd-journald (tests/lab/journald.py) with a small RateLimitBurst in its own
  journald.conf and a real Kamailio (example config) in the unit kamailio.service, driven past the
  limit by a storm of scanner requests from 200 addresses: the daemon follows the unit's journal,
  reports the loss (status, metrics, one warning) with journald's own count, and bans every source
  whose line journald kept. Then the same storm with the drop-in's setting in force
  (examples/systemd/kamailio.service.d/sipguard-ratelimit.conf: LogRateLimitIntervalSec=0): there is
  no systemd here to read the drop-in, so the test writes what systemd writes for it,
  /run/systemd/units/log-rate-limit-interval:kamailio.service -> 0, which is what journald reads: no
  loss, every source banned.

The long measurement of where the limits start is bench/storm.py, not here.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipguard.config import Config
from sipguard.extras.metrics import Metrics
from sipguard.formats.losses import JOURNAL_DROPPED, LossNotices
from tests.lab import journald as lab_journald
from tests.lab.kamailio_unit import available, kamailio_unit, storm

NET = "198.18.8.0/24"
STORM = 200  # scanner requests, one from each of the first addresses of NET (bounded)


def _driver(n: int = 25, unit: str = "kamailio.service", **extra) -> bytes:
    e = {"_TRANSPORT": "driver", "MESSAGE_ID": JOURNAL_DROPPED, "N_DROPPED": str(n), "_PID": "26",
         "_COMM": "systemd-journal", "SYSLOG_IDENTIFIER": "systemd-journald", "OBJECT_SYSTEMD_UNIT": unit,
         "MESSAGE": f"Suppressed {n} messages from {unit}", **extra}
    return json.dumps(e).encode()


# -- the notices -----------------------------------------------------------------------------------

def test_journald_entry_counts_only_with_journalds_own_fields(caplog) -> None:
    ln = LossNotices()
    with caplog.at_level(logging.WARNING, logger="sipguard"):
        ln.scan(b'{"MESSAGE":"x"}\n' + _driver(25) + b"\n" + _driver(7) + b"\n")
        # a client can write MESSAGE_ID and N_DROPPED, never _TRANSPORT=driver
        ln.scan(_driver(10**6, _TRANSPORT="journal") + b"\n" + _driver(10**6, _TRANSPORT="syslog"))
    assert ln.stats.as_dict() == {"notices": 2, "lost": 32, "journald": 2, "rsyslog": 0, "untrusted": 2}
    warned = [r.getMessage() for r in caplog.records if "lines lost" in r.getMessage()]
    assert len(warned) == 1 and "kamailio.service" in warned[0] and "LogRateLimitIntervalSec=0" in warned[0]


@pytest.mark.parametrize("line, lost, origin", [
    (b"Dec  1 20:00:00 vm systemd-journald[26]: Suppressed 25 messages from kamailio.service", 25, "journald"),
    (b"2026-12-01T20:00:00.1+00:00 vm systemd-journald[26]: Suppressed 3 messages from kamailio.service", 3, "journald"),
    (b"Dec  1 20:00:00 vm rsyslogd: imuxsock: 123 messages lost due to rate-limiting (200 allowed within 5 seconds)",
     123, "rsyslog"),
    (b"Dec  1 20:00:00 vm rsyslogd: imjournal: 9 messages lost due to rate-limiting (20000 allowed within 600 "
     b"seconds)", 9, "rsyslog"),
    (b"Dec  1 20:00:00 vm rsyslogd: imuxsock from <vm:kamailio[87]>: begin to drop messages due to rate-limiting",
     0, "rsyslog"),
    (b"Dec  1 20:00:00 vm rsyslogd-2177: imuxsock begins to drop messages from pid 87 due to rate-limiting", 0,
     "rsyslog"),
    (b"Dec  1 21:03:59 vm rsyslogd-2177: imuxsock[pid: 12127, name: /usr/sbin/kamailio]: 90 messages lost due to "
     b"rate-limiting (10 allowed within 2 seconds)", 90, "rsyslog"),
    (b"Dec  1 21:03:56 vm rsyslogd-2177: imuxsock[pid: 12127, name: /usr/sbin/kamailio] from <vm:kamailio>: begin "
     b"to drop messages due to rate-limiting", 0, "rsyslog"),
    (b"Dec  1 20:00:00 vm rsyslogd2: imuxsock lost 40 messages from pid 87 due to rate-limiting", 0, None),
    (b"Dec  1 20:00:00 vm rsyslogd[5]: imuxsock begins to drop messages from pid 87 due to rate-limiting", 0,
     "rsyslog"),
    (b"Dec  1 20:00:00 vm rsyslogd: imuxsock lost 40 messages from pid 87 due to rate-limiting", 40, "rsyslog"),
    # Kamailio's own lines (attacker text inside) are not notices
    (b"Dec  1 20:00:00 vm kamailio[87]: WARNING: <script>: Blocked scanner UA 'x rsyslogd: imuxsock lost 9 "
     b"messages from pid 1 due to rate-limiting' from 198.18.0.5:5060", 0, None),
    (b"Dec  1 20:00:00 vm kamailio[87]: NOTICE: <script>: Suppressed 25 messages from kamailio.service", 0, None),
])
def test_text_notices(line: bytes, lost: int, origin: str | None) -> None:
    ln = LossNotices()
    ln.scan(b"Dec  1 19:59:59 vm kamailio[87]: NOTICE: <script>: x\n" + line + b"\n")
    assert ln.stats.notices == (0 if origin is None else 1)
    assert ln.stats.lost == lost
    if origin:
        assert getattr(ln.stats, origin) == 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=80), st.sampled_from([
    _driver(5), b"Suppressed ", b"due to rate-limiting", b"rsyslogd: imuxsock", JOURNAL_DROPPED.encode(), b"{",
    b"\n", b'"N_DROPPED":"x"', b"systemd-journald[1]: "])), max_size=12).map(b"".join))
def test_random_bytes_never_raise(data: bytes) -> None:
    ln = LossNotices()
    ln.scan(data)
    assert ln.stats.lost >= 0


def test_metrics_export_the_loss() -> None:
    from prometheus_client import generate_latest

    m = Metrics()
    m.set_losses({"notices": 2, "lost": 32, "journald": 1, "rsyslog": 1, "untrusted": 0})
    text = generate_latest(m.registry).decode()
    assert "sipguard_log_lines_lost_total 32.0" in text
    assert 'sipguard_log_loss_notices_total{origin="journald"} 1.0' in text
    assert 'sipguard_log_loss_notices_total{origin="rsyslog"} 1.0' in text


def test_the_drop_in_says_what_lifts_the_limit() -> None:
    text = (Path(__file__).parent.parent / "examples" / "systemd" / "kamailio.service.d"
            / "sipguard-ratelimit.conf").read_text()
    body = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert body == ["[Service]", "LogRateLimitIntervalSec=0"]


# -- a real journald past its limit ----------------------------------------------------------------

needs_host = pytest.mark.skipif(not available() and not (os.environ.get("CI") or os.geteuid() == 0),
                                reason="needs root, systemd-journald, unshare/nsenter/setpriv and kamailio")
LIMITED = lab_journald.CONF.replace("RateLimitIntervalSec=0", "RateLimitIntervalSec=2s\nRateLimitBurst=20")

def _addresses(n: int) -> list[str]:
    return [str(ip) for ip, _ in zip(ipaddress.ip_network(NET).hosts(), range(n))]


def _storm(tmp_path: Path, lifted: bool, caplog) -> tuple[dict, set[str], list[dict], list[str]]:
    """The storm against the unit, read by the real daemon from the unit's journal; returns the daemon's
    loss counters, the addresses it banned, journald's notices and the warnings."""
    from sipguard.enforce.dryrun import DryRunEnforcer
    from sipguard.store import Store
    from sipguard.wiring import build_daemon
    from waiting import wait_for

    if not available():
        pytest.fail("needs root, systemd-journald, unshare/nsenter/setpriv and kamailio "
                    "(the Makefile's APT_PACKAGES install them)", pytrace=False)
    with kamailio_unit(LIMITED, lifted, sources=NET) as j:
        time.sleep(2.5)  # Kamailio's start-up lines fall in a rate-limit interval of their own
        cfg = Config.model_validate({"allowlist": {"include_host_addresses": False},
                                     "daemon": {"control_interval": 0.05},
                                     "policy": {"max_tracked": 1000},
                                     "sources": {"logs": [], "journal": ["kamailio.service"], "from_start": True,
                                                 "journalctl": str(j.journalctl)}})
        store = Store.open_state_dir(tmp_path / ("lifted" if lifted else "limited"))
        enf = DryRunEnforcer()
        d = build_daemon(cfg, store, enf, logs=[])
        th = threading.Thread(target=d.run, daemon=True)
        with caplog.at_level(logging.WARNING, logger="sipguard"):
            th.start()
            try:
                wait_for(lambda: d.ready.is_set(), timeout=10.0)
                storm(j, STORM, NET)
                time.sleep(2.5)  # the rate-limit interval ends: the next line makes journald say what it dropped
                storm(j, 1, "198.18.0.51/32")
                wait_for(lambda: "198.18.0.51" in {e.ip for e in enf.entries()}, timeout=15.0)
                time.sleep(0.5)
                notices = [e for e in j.entries("-u", "kamailio.service") if e.get("MESSAGE_ID") == JOURNAL_DROPPED]
                losses = d.parts.pipeline.losses.stats.as_dict()
                d.write_status(time.time())
                status = json.loads(store.get_meta("status"))
            finally:
                d.stop()
                th.join(10)
                store.close()
        assert not th.is_alive()
        assert status["losses"] == losses
    warnings = [r.getMessage() for r in caplog.records if "lines lost" in r.getMessage()]
    return losses, {e.ip for e in enf.entries()} - {"198.18.0.51"}, notices, warnings


@needs_host
def test_journald_loss_is_reported_and_none_with_the_drop_in(tmp_path: Path, caplog) -> None:
    losses, banned, notices, warnings = _storm(tmp_path, lifted=False, caplog=caplog)
    dropped = sum(int(e["N_DROPPED"]) for e in notices)
    assert notices and dropped > 0, "journald did not drop anything: the limit is not reached"
    assert all(e["_TRANSPORT"] == "driver" and e["OBJECT_SYSTEMD_UNIT"] == "kamailio.service" for e in notices)
    assert losses["notices"] == len(notices) and losses["journald"] == len(notices)
    assert losses["lost"] == dropped and losses["untrusted"] == 0
    assert len(warnings) == 1 and "LogRateLimitIntervalSec=0" in warnings[0] and "kamailio.service" in warnings[0]
    # every scanner line journald kept banned its source; the ones it dropped are what it counted
    assert banned <= set(_addresses(STORM)) and 0 < len(banned) < STORM
    assert len(banned) + dropped >= STORM, (len(banned), dropped)
    print(f"limited: {len(banned)} banned, journald dropped {dropped} ({len(notices)} notices)")

    caplog.clear()
    losses, banned, notices, warnings = _storm(tmp_path, lifted=True, caplog=caplog)
    assert notices == [] and losses["notices"] == 0 and losses["lost"] == 0 and warnings == []
    assert banned == set(_addresses(STORM))


def test_status_says_how_many_lines_were_lost(tmp_path: Path) -> None:
    import subprocess
    import sys

    from sipguard.store import Store

    state = tmp_path / "state"
    store = Store.open_state_dir(state)
    losses = {"notices": 2, "lost": 12500, "journald": 1, "rsyslog": 1, "untrusted": 0}
    store.set_meta("status", json.dumps({"pid": 1, "running": False, "heartbeat": time.time(), "logs": [],
                                         "losses": losses}))
    store.conn.commit()
    store.close()
    cfg = tmp_path / "empty.toml"
    cfg.write_text("")
    r = subprocess.run([sys.executable, "-m", "sipguard", "--config", str(cfg), "--state-dir", str(state), "status"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "SIPGUARD_LOG_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    assert "lines lost before sipguard read them: 12500 by 2 notices (journald 1, rsyslog 1)" in out, out
    r = subprocess.run([sys.executable, "-m", "sipguard", "--config", str(cfg), "--state-dir", str(state), "status",
                        "--json"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "SIPGUARD_LOG_DIR": str(tmp_path)})
    assert json.loads(r.stdout)["last_status"]["losses"] == losses


RSYSLOG_CONF = """global(workDirectory="{w}" maxMessageSize="64k" processInternalMessages="on")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{w}/log.sock" CreatePath="on" RateLimit.Interval="2" RateLimit.Burst="10")
*.* action(type="omfile" file="{w}/kamailio.log" template="RSYSLOG_TraditionalFileFormat")
"""
_SYSLOG_BURST = r"""
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
def say(text):
    s.sendto(f"<133>{time.strftime('%b %d %H:%M:%S')} kamailio[{os.getpid()}]: NOTICE: <script>: {text}".encode(),
             sys.argv[1])
for i in range(100):
    say(f"auth failed for user 1000 from 198.18.7.{i + 1}:5060 method REGISTER")
time.sleep(3.5)  # the interval (2 s, counted in whole seconds) ends: rsyslog says what it dropped with the next line
say("auth failed for user 1000 from 198.18.7.200:5060 method REGISTER")
time.sleep(0.5)
"""


def test_a_real_rsyslogd_past_its_limit_is_reported(tmp_path: Path, caplog) -> None:
    """A private rsyslogd (its own socket and file, no network) with imuxsock limited to 10 lines per 2 s,
    100 lines in a burst from one process: rsyslog writes its own two notices into the file (the shipped
    snippet copies them into Kamailio's file, `$inputname == 'rsyslogd'`), and the daemon following that
    file counts 90 lines lost and warns once with the fix."""
    import shutil
    import subprocess
    import sys

    from sipguard.enforce.dryrun import DryRunEnforcer
    from sipguard.store import Store
    from sipguard.wiring import build_daemon
    from waiting import wait_for

    if shutil.which("rsyslogd") is None:
        if os.environ.get("CI") or os.geteuid() == 0:
            pytest.fail("rsyslogd is not installed (the Makefile's APT_PACKAGES install it)", pytrace=False)
        pytest.skip("needs rsyslogd")
    import tempfile

    w = Path(tempfile.mkdtemp(prefix="sgd-rs-", dir="/tmp"))  # a socket path fits in sockaddr_un
    (w / "rs.conf").write_text(RSYSLOG_CONF.format(w=w))
    rs = subprocess.Popen(["rsyslogd", "-n", "-f", str(w / "rs.conf"), "-i", str(w / "rs.pid")],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (w / "log.sock").exists(), timeout=10.0)
        subprocess.run([sys.executable, "-c", _SYSLOG_BURST, str(w / "log.sock")], check=True, timeout=30)
        try:
            wait_for(lambda: b"messages lost due to rate-limiting" in (w / "kamailio.log").read_bytes(), timeout=10.0)
        except AssertionError:
            raise AssertionError((w / "kamailio.log").read_bytes()[-3000:]) from None
        shutil.copyfile(w / "kamailio.log", tmp_path / "kamailio.log")
    finally:
        rs.terminate()
        rs.wait(10)
        shutil.rmtree(w, ignore_errors=True)
    w = tmp_path
    cfg = Config.model_validate({"allowlist": {"include_host_addresses": False}, "daemon": {"control_interval": 0.05},
                                 "sources": {"logs": [str(w / "kamailio.log")], "from_start": True}})
    store = Store.open_state_dir(tmp_path / "st")
    d = build_daemon(cfg, store, DryRunEnforcer())
    with caplog.at_level(logging.WARNING, logger="sipguard"):
        th = threading.Thread(target=d.run, daemon=True)
        th.start()
        try:
            wait_for(lambda: d.parts.pipeline.losses.stats.notices >= 2, timeout=10.0)
            stats = d.parts.pipeline.losses.stats.as_dict()
        finally:
            d.stop()
            th.join(10)
            store.close()
    assert stats == {"notices": 2, "lost": 90, "journald": 0, "rsyslog": 2, "untrusted": 0}, stats
    warned = [r.getMessage() for r in caplog.records if "lines lost" in r.getMessage()]
    assert len(warned) == 1 and "SysSock.RateLimit.Interval" in warned[0], warned
