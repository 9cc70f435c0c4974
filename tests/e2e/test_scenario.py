"""End to end: sipguard inside a namespace with a real Kamailio, real attack tools, a real kernel ban.

The scenario (tests/e2e/scenario.py, shared with `make demo`) builds namespaces sge2e-*, runs
Kamailio with examples/kamailio/kamailio.cfg behind the baseline firewall, `sipguard run` with the
kernel enforcer, a legitimate phone (which also calls two numbers) and eleven attackers (svmap, svwar, svcrack stock and with a
phone's User-Agent, a pike flood, malformed requests, a SIP/3.0 request line, text injection, a
scanner User-Agent holding a CR/LF and a forged line, a toll-fraud prober), and checks that every attacker is banned in
the kernel within 2 s of the packet that completed the evidence, that banned sources get no answer,
and that the phone and the address named only in attacker text are never banned.

Four runs, by log path between Kamailio and sipguard: a private rsyslogd writing a file (Kamailio's
classic text, and its JSON log engine `--log-engine=json:UM`); a private systemd-journald that
records `_SYSTEMD_UNIT=kamailio.service` (Kamailio runs in that unit's cgroup, as user kamailio),
followed through journalctl with `[sources] journal = ["kamailio.service"]` (classic text); the
same journald with Kamailio in no unit, followed with `journal_identifiers = ["kamailio"]` and
trusted by `_EXE=/usr/sbin/kamailio` and `_UID` of user kamailio (JSON engine). In the journal runs
a local user (nobody) also forges Kamailio lines naming 198.18.0.99, which must ban nobody.
Needs root (namespaces, netfilter, journald); skipped only without it.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

RUNS = [  # (log path, Kamailio's log engine)
    pytest.param("rsyslog", None, id="rsyslog"),
    pytest.param("journal", None, id="journal"),
    pytest.param("journal-ident", "json:UM", id="journal-ident-json"),
    pytest.param("rsyslog", "json:UM", id="rsyslog-json"),
]


@pytest.mark.parametrize(("log_path", "log_engine"), RUNS)
def test_real_kamailio_under_attack(capsys, log_path, log_engine):
    from tests.e2e.scenario import MAX_BAN_LATENCY, check, report, run_scenario

    lines: list[str] = []
    res, _ = run_scenario(prefix="sge2e-", echo=lines.append, log_path=log_path, log_engine=log_engine)
    report(res, echo=lines.append)
    failures = check(res)
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert (res.log_path, res.log_engine) == (log_path, log_engine)
    assert not failures, "\n".join(failures)
    for a in res.attacks:
        assert a.latency_decisive is not None and a.latency_decisive <= MAX_BAN_LATENCY
    assert res.durations["total"] < 180


def test_cleanup_stale_ends_a_leftover_private_journald():
    """What an interrupted journal run leaves (a private journald with Kamailio's unit cgroup, no
    close()) is ended by PID and removed by the next run's cleanup, and nothing else is touched."""
    from tests.e2e.scenario import cleanup_stale
    from tests.lab.journald import PrivateJournald, available

    if not available():
        pytest.skip("needs systemd-journald, unshare/nsenter/setpriv")
    left = PrivateJournald(prefix="sge2e-jd-", units=True)
    other = PrivateJournald(prefix="sgh-jd-")  # not this scenario's: must survive
    try:
        other.start()
        left.start()
        init, jd = left.init_pid, left.journald_pid()
        assert init and jd and os.path.exists(f"/proc/{jd}")
        gone = cleanup_stale("sge2e-")
        assert str(left.tmp) in gone and not left.tmp.exists()
        assert not os.path.exists(f"/proc/{init}") and not os.path.exists(f"/proc/{jd}")
        assert other.journald_pid() is not None and other.tmp.exists()
        assert cleanup_stale("sge2e-") == []
    finally:
        try:
            left.close()
        finally:
            other.close()
