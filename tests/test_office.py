"""The office policy (issue 17, [policy.office]): one user failing forever behind a NAT address where other
users authenticate is banned alone (a user ban, enforced by Kamailio), not the address; the address is banned
when distinct failing users or the failure rate say an attack comes from behind it; without successes the
policy scores as before."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sipguard.addresses import AllowList
from sipguard.config import PolicyConfig
from sipguard.filters.filterset import FilterSet
from sipguard.model import Event, EventKind, Record, user_key
from sipguard.policy import Policy

OFFICE = "198.18.200.10"


def fail(t: float, user: str | None, ip: str = OFFICE) -> Event:
    caps = (("user", user),) if user is not None else ()
    return Event(t, ip, "auth-failure", EventKind.AUTH_FAILURE, 1.0,
                 f"NOTICE: <script>: auth failed for user {user} from {ip}:5060 method REGISTER", caps)


def ok(t: float, user: str | None, ip: str = OFFICE) -> Event:
    caps = (("user", user),) if user is not None else ()
    return Event(t, ip, "register-success", EventKind.SUCCESS, 0.0, "", caps)


def policy(**office) -> Policy:
    return Policy(PolicyConfig(office=office) if office else PolicyConfig(), AllowList([], include_host=False))


def run(p: Policy, events):
    return [d for d in (p.observe(e) for e in events) if d is not None]


def test_one_user_failing_forever_beside_successes_is_a_user_ban_not_the_address():
    p = policy()
    events = []
    for i in range(60):  # an hour: others register every 60 s, the stale phone fails every 20 s
        t = 1000.0 + i * 60
        events += [ok(t, f"2000{i % 10:02d}"), fail(t + 10, "stale"), fail(t + 30, "stale"), fail(t + 50, "stale")]
    got = run(p, events)
    assert len(got) == 1
    d = got[0]
    assert d.user == "stale" and d.ip == OFFICE and d.reason == "office_user:auth-failure"
    assert d.duration == 3600 and d.score == 3.0
    assert OFFICE not in p.banned and (OFFICE, "stale") in p.user_banned
    assert len(d.evidence) == 3 and all("stale" in e.text for e in d.evidence)
    assert p.stats.while_banned > 100  # the banned user's further failures are not scored


def test_user_ban_released_counts_anew_and_own_success_resets():
    p = policy()
    run(p, [ok(0, "a"), fail(1, "b"), fail(2, "b"), ok(3, "b"), fail(4, "b"), fail(5, "b")])
    assert not p.user_banned  # b's own success reset its count
    d = run(p, [fail(6, "b")])
    assert d and d[0].user == "b"
    p.release_user(OFFICE, "b")
    assert run(p, [fail(7, "b"), fail(8, "b")]) == []
    assert run(p, [fail(9, "b")])[0].user == "b"


def test_five_distinct_failing_users_ban_the_address():
    p = policy()
    got = run(p, [ok(0, "a")] + [fail(10 + i, f"u{i}") for i in range(5)])
    assert [(d.ip, d.user, d.reason, d.score) for d in got] == [(OFFICE, None, "office_users:auth-failure", 5.0)]
    assert OFFICE in p.banned


def test_four_distinct_users_twice_each_do_not_ban_the_address():
    p = policy()
    got = run(p, [ok(0, "a")] + [fail(10 + i, f"u{i % 4}") for i in range(8)])
    assert got == [] and OFFICE not in p.banned and not p.user_banned  # 2 failures each: under user_threshold


def test_the_failure_rate_bans_the_address():
    p = policy(rate=6, user_threshold=100)
    got = run(p, [ok(0, "a")] + [fail(10 + i, f"u{i % 2}") for i in range(6)])
    assert [(d.user, d.reason) for d in got] == [(None, "office_rate:auth-failure")]


def test_no_successes_at_all_scores_as_today():
    p, q = policy(), policy(enabled=False)
    events = [fail(10 + i, "stale") for i in range(3)]
    a, b = run(p, events), run(q, events)
    assert [(d.ip, d.user, d.reason) for d in a] == [(d.ip, d.user, d.reason) for d in b] == [
        (OFFICE, None, "auth:auth-failure")]


def test_a_success_for_the_same_user_only_is_no_office():
    p = policy()
    got = run(p, [ok(0, "stale")] + [fail(10 + i, "stale") for i in range(3)])
    assert [(d.user, d.reason) for d in got] == [(None, "auth:auth-failure")]


def test_an_old_success_is_no_office():
    p = policy(success_within=60)
    got = run(p, [ok(0, "a")] + [fail(100 + i, "stale") for i in range(3)])
    assert [(d.user, d.reason) for d in got] == [(None, "auth:auth-failure")]


def test_failures_without_a_user_capture_score_as_today():
    p = policy()
    got = run(p, [ok(0, "a")] + [fail(10 + i, None) for i in range(3)])
    assert [(d.user, d.reason) for d in got] == [(None, "auth:auth-failure")]


def test_disabled_office_is_today():
    p = policy(enabled=False)
    got = run(p, [ok(0, "a")] + [fail(10 + i, "stale") for i in range(3)])
    assert [(d.user, d.reason) for d in got] == [(None, "auth:auth-failure")]


def test_config_errors():
    with pytest.raises(ValidationError):
        PolicyConfig(office={"distinct_users": 1})
    with pytest.raises(ValidationError):
        PolicyConfig(office={"rate": 0})
    with pytest.raises(ValidationError, match="office policy's own"):
        PolicyConfig(jails={"office_users": {"kinds": ["auth_failure"], "findtime": 60, "threshold": 1}})
    PolicyConfig(office={"enabled": False}, jails={"office_users": {"kinds": ["auth_failure"], "findtime": 60,
                                                                     "threshold": 1}})


def test_memory_is_bounded_under_a_spray_of_users():
    p = Policy(PolicyConfig(max_tracked=100), AllowList([], include_host=False))
    for i in range(5000):
        ip = f"198.18.{i // 250}.{i % 250}"
        p.observe(ok(i, "a", ip))
        p.observe(fail(i, f"u{i}", ip))
    assert len(p._succ) <= 100 and len(p._uwin) <= 100


def test_the_shipped_filters_capture_the_user():
    fs = FilterSet.load(["filters"])
    f = fs.match(Record(f"NOTICE: <script>: auth failed for user 200000 from {OFFICE}:5060 method REGISTER"), 0.0)
    assert f.kind is EventKind.AUTH_FAILURE and f.captures == (("user", "200000"),) and f.ip == OFFICE
    s = fs.match(Record(f"NOTICE: <script>: REGISTER success for user 200001 from {OFFICE}:5060"), 0.0)
    assert s.kind is EventKind.SUCCESS and s.captures == (("user", "200001"),)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=80))
def test_user_text_never_decides_the_address(user):
    """Whatever the From user says (an address, a key separator, a forged tail), the ban is of the address
    Kamailio printed as $si, and the user ban key is that text plus that address."""
    p = policy()
    got = run(p, [ok(0, "a")] + [fail(10 + i, user) for i in range(3)])
    for d in got:
        assert d.ip == OFFICE
        if d.user is not None:
            assert d.user == user and user_key(d.user, d.ip).endswith("@" + OFFICE)
