"""The policy's compact windows decide exactly like plain per-(source, jail) event lists, and the
`max_tracked` cap bounds memory under a spray of distinct sources."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sipguard.addresses import AllowList
from sipguard.config import PolicyConfig
from sipguard.model import Event, EventKind
from sipguard.policy import DEFAULT_MAX_TRACKED, Policy

ALLOW = AllowList([], include_host=False)
KINDS = [EventKind.AUTH_FAILURE, EventKind.PROBE, EventKind.MALFORMED, EventKind.SUCCESS, EventKind.SCANNER]


def reference(cfg: PolicyConfig, events: list[Event]) -> list[tuple[str, str, float]]:
    """The straightforward model: every (source, jail) keeps its (time, weight) list."""
    wins: dict[tuple[str, str], list[tuple[float, float]]] = {}
    banned: set[str] = set()
    out = []
    for ev in events:
        if ev.ip in banned:
            continue
        if ev.kind is EventKind.SUCCESS:
            for name, j in cfg.jails.items():
                if j.reset_on_success:
                    wins.pop((ev.ip, name), None)
            continue
        for name, j in cfg.jails.items():
            if ev.kind not in j.kinds:
                continue
            w = wins.setdefault((ev.ip, name), [])
            w.append((ev.time, ev.weight))
            w[:] = [(t, x) for t, x in w if t >= ev.time - j.findtime]
            score = sum(x for _, x in w)
            if score >= j.threshold:
                out.append((ev.ip, name, score))
                banned.add(ev.ip)
                for n2 in cfg.jails:
                    wins.pop((ev.ip, n2), None)
                break
    return out


event = st.builds(
    lambda t, ip, k, w: Event(time=float(t), ip=f"198.18.0.{ip}", filter="f", kind=k, weight=w),
    st.integers(0, 3000), st.integers(1, 4), st.sampled_from(KINDS), st.sampled_from([1.0, 1.0, 0.5, 2.0]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(event, max_size=60))
def test_compact_windows_decide_like_plain_lists(events):
    events.sort(key=lambda e: e.time)
    cfg = PolicyConfig()
    p = Policy(cfg, ALLOW)
    got = []
    for ev in events:
        d = p.observe(ev)
        if d is not None:
            got.append((d.ip, d.reason.split(":")[0], d.score))
    assert got == reference(cfg, events)


def test_max_tracked_caps_a_spray_and_keeps_the_recent():
    p = Policy(PolicyConfig(), ALLOW)
    p.max_tracked = 1000
    assert Policy(PolicyConfig(max_tracked=1000), p.allow).max_tracked == 1000
    for i in range(10_000):
        p.observe(Event(time=float(i), ip=f"198.18.{i // 250}.{i % 250 + 1}", filter="f",
                        kind=EventKind.AUTH_FAILURE, weight=1.0))
    assert p.tracked <= 1000
    assert p.stats.evicted >= 9000
    assert ("198.18.39.250", "auth") in p.windows  # the newest source is still scored
    assert DEFAULT_MAX_TRACKED >= 100_000
