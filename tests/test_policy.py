"""Policy arithmetic: windows, thresholds, escalation, allow-list, success reset."""

import pytest

from sipguard.addresses import AllowList
from sipguard.config import PolicyConfig
from sipguard.model import Event, EventKind
from sipguard.policy import Policy

A = "198.18.1.10"
B = "198.18.1.11"


def ev(t, kind, ip=A, weight=1.0, name=None):
    return Event(time=t, ip=ip, filter=name or kind.value, kind=kind, weight=weight)


@pytest.fixture
def allow():
    return AllowList(["198.18.9.0/24"], include_host=False)


@pytest.fixture
def policy(allow):
    return Policy(PolicyConfig(), allow)


def feed(policy, events):
    return [d for d in (policy.observe(e) for e in events) if d is not None]


def test_scanner_and_pike_ban_at_once(policy):
    d = feed(policy, [ev(0, EventKind.SCANNER)])
    assert len(d) == 1 and d[0].duration == 3600 and d[0].reason.startswith("scanner:")
    d = feed(policy, [ev(0, EventKind.FLOOD, ip=B)])
    assert len(d) == 1 and d[0].ip == B


def test_three_auth_failures_in_ten_minutes(policy):
    assert feed(policy, [ev(0, EventKind.AUTH_FAILURE), ev(100, EventKind.AUTH_FAILURE)]) == []
    d = feed(policy, [ev(599, EventKind.AUTH_FAILURE)])
    assert len(d) == 1 and d[0].score == 3


def test_auth_failures_outside_window_do_not_add_up(policy):
    assert feed(policy, [ev(0, EventKind.AUTH_FAILURE), ev(400, EventKind.AUTH_FAILURE),
                         ev(800, EventKind.AUTH_FAILURE)]) == []  # 0 fell out at 800
    assert len(feed(policy, [ev(900, EventKind.AUTH_FAILURE)])) == 1  # 400, 800, 900


def test_malformed_five_in_a_minute(policy):
    assert feed(policy, [ev(t, EventKind.MALFORMED) for t in (0, 10, 20, 30)]) == []
    assert feed(policy, [ev(61, EventKind.MALFORMED)]) == []  # 0 is out: 10,20,30,61
    assert len(feed(policy, [ev(65, EventKind.MALFORMED)])) == 1


def test_success_resets_consecutive_failures(policy):
    assert feed(policy, [ev(0, EventKind.AUTH_FAILURE), ev(1, EventKind.AUTH_FAILURE),
                         ev(2, EventKind.SUCCESS, weight=0), ev(3, EventKind.AUTH_FAILURE),
                         ev(4, EventKind.AUTH_FAILURE)]) == []
    assert len(feed(policy, [ev(5, EventKind.AUTH_FAILURE)])) == 1


def test_success_does_not_reset_malformed(policy):
    feed(policy, [ev(t, EventKind.MALFORMED) for t in range(4)])
    feed(policy, [ev(4, EventKind.SUCCESS, weight=0)])
    assert len(feed(policy, [ev(5, EventKind.MALFORMED)])) == 1


def test_success_of_one_source_does_not_reset_another(policy):
    feed(policy, [ev(0, EventKind.AUTH_FAILURE), ev(1, EventKind.AUTH_FAILURE)])
    feed(policy, [ev(2, EventKind.SUCCESS, ip=B, weight=0)])
    assert len(feed(policy, [ev(3, EventKind.AUTH_FAILURE)])) == 1


def test_probe_many_challenges_without_success(policy):
    assert feed(policy, [ev(t, EventKind.PROBE) for t in range(9)]) == []
    assert len(feed(policy, [ev(9, EventKind.PROBE)])) == 1


def test_phone_with_one_challenge_per_registration_is_never_banned(policy):
    events = []
    for i in range(100):  # re-registers every 30 s for 50 minutes: challenge, then success
        events += [ev(i * 30, EventKind.PROBE, ip=B), ev(i * 30 + 0.1, EventKind.SUCCESS, ip=B, weight=0)]
    assert feed(policy, events) == []


def test_weights_are_summed(policy):
    assert feed(policy, [ev(0, EventKind.AUTH_FAILURE, weight=2.0)]) == []
    assert len(feed(policy, [ev(1, EventKind.AUTH_FAILURE, weight=1.0)])) == 1


def test_allowlisted_never_decided(policy):
    assert feed(policy, [ev(0, EventKind.SCANNER, ip="198.18.9.7")]) == []
    assert feed(policy, [ev(0, EventKind.SCANNER, ip="127.0.0.1")]) == []
    assert feed(policy, [ev(0, EventKind.SCANNER, ip="::1")]) == []
    assert policy.stats.allowlisted == 3


def test_no_second_decision_while_banned(policy):
    assert len(feed(policy, [ev(0, EventKind.SCANNER)])) == 1
    assert feed(policy, [ev(1, EventKind.SCANNER), ev(2, EventKind.FLOOD)]) == []
    policy.release(A)
    assert len(feed(policy, [ev(3, EventKind.SCANNER)])) == 1


def test_release_forgets_old_events(policy):
    feed(policy, [ev(0, EventKind.AUTH_FAILURE), ev(1, EventKind.AUTH_FAILURE)])
    policy.release(A)  # an operator unban: old events no longer count
    assert feed(policy, [ev(2, EventKind.AUTH_FAILURE)]) == []


def test_escalation_doubles_up_to_a_week(allow):
    p = Policy(PolicyConfig(), allow)
    durations = []
    t = 0.0
    for _ in range(10):
        d = feed(p, [ev(t, EventKind.SCANNER)])[0]
        durations.append(d.duration)
        p.release(A)
        t += 3600
    assert durations[:8] == [3600, 7200, 14400, 28800, 57600, 115200, 230400, 460800]
    assert durations[8] == durations[9] == 604800  # capped at one week


def test_offence_memory_forgets_old_offences(allow):
    cfg = PolicyConfig(offence_memory="1d")
    p = Policy(cfg, allow, offences={A: [0.0, 10.0]})
    d = feed(p, [ev(100, EventKind.SCANNER)])[0]
    assert d.offence == 3 and d.duration == 4 * 3600
    p.release(A)
    d = feed(p, [ev(86400 + 50, EventKind.SCANNER)])[0]
    assert d.offence == 2  # 0 and 10 are forgotten, the ban at t=100 is remembered


def test_permanent_cap_and_jail_bantime(allow):
    cfg = PolicyConfig(max_bantime="permanent", jails={"scanner": {"bantime": "permanent"},
                                                       "flood": {"bantime": "10m"}})
    p = Policy(cfg, allow)
    assert feed(p, [ev(0, EventKind.SCANNER)])[0].duration is None
    assert feed(p, [ev(0, EventKind.FLOOD, ip=B)])[0].duration == 600
    assert p.ban_duration(20) == 3600 * 2**19  # uncapped
    assert p.ban_duration(30) is None  # 3600 * 2**29 s is past 100 years (issue 16's bound): permanent


def test_restore_rebuilds_windows_without_deciding(policy):
    policy.restore([ev(0, EventKind.AUTH_FAILURE), ev(1, EventKind.AUTH_FAILURE)])
    assert policy.stats.decisions == 0
    assert len(feed(policy, [ev(2, EventKind.AUTH_FAILURE)])) == 1


def test_expire_bounds_memory(policy):
    feed(policy, [ev(0, EventKind.AUTH_FAILURE, ip=f"198.19.{i // 250}.{i % 250 + 1}") for i in range(5000)])
    assert len(policy.windows) == 5000
    policy.expire(10_000)
    assert len(policy.windows) == 0
