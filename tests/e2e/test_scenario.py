"""End to end: sipguard inside a namespace with a real Kamailio, real attack tools, a real kernel ban.

The scenario (tests/e2e/scenario.py, shared with `make demo`) builds namespaces sge2e-*, runs
Kamailio with examples/kamailio/kamailio.cfg behind the baseline firewall, `sipguard run` with the
kernel enforcer, a legitimate phone and nine attackers (svmap, svwar, svcrack stock and with a
phone's User-Agent, a pike flood, malformed requests, a SIP/3.0 request line, text injection), and
checks that every attacker is banned in the kernel within 2 s of the packet that completed the
evidence, that banned sources get no answer, and that the phone and the address named only in
attacker text are never banned. Needs root (namespaces, netfilter); skipped only without it.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def test_real_kamailio_under_attack(capsys):
    from tests.e2e.scenario import MAX_BAN_LATENCY, check, report, run_scenario

    lines: list[str] = []
    res, _ = run_scenario(prefix="sge2e-", echo=lines.append)
    report(res, echo=lines.append)
    failures = check(res)
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert not failures, "\n".join(failures)
    for a in res.attacks:
        assert a.latency_decisive is not None and a.latency_decisive <= MAX_BAN_LATENCY
    assert res.durations["total"] < 180
