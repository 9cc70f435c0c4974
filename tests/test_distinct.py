"""Distinct jails and the filters that feed them (issue 12 part 4): named captures travel with the event,
attacker text is a counting key only, memory stays bounded under a spray, and the fraud prober of the real
capture is banned while the phone is not. (Local and fleet scoring agree case by case in
tests/policy_cases/distinct_*, run by tests/test_policy_cases.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipguard.addresses import AllowList
from sipguard.config import Config, PolicyConfig
from sipguard.errors import ConfigError
from sipguard.filters import FilterSet, shipped_dir
from sipguard.model import CAPTURE_CHARS, Event, EventKind, Record
from sipguard.policy import Policy
from sipguard.scan import scan_files

REAL = Path(__file__).parent / "data" / "real"
NO_ALLOW = AllowList([], include_host=False)
INJECTED = "198.18.0.99"

FRAUD = {"kinds": ["dial", "probe"], "distinct": "dest", "prefixes": ["+", "00"], "findtime": "1h", "threshold": 5}


def policy(**jail) -> Policy:
    cfg = Config.model_validate({"policy": {"jails": {
        "probe": {"enabled": False}, "auth": {"enabled": False}, "fraud": {**FRAUD, **jail}}}}).policy
    return Policy(cfg, NO_ALLOW)


def dial(t: float, ip: str, dest: str | None, kind: EventKind = EventKind.DIAL, weight: float = 1.0) -> Event:
    return Event(t, ip, "call-attempt", kind, weight, captures=() if dest is None else (("dest", dest),))


@pytest.fixture(scope="module")
def shipped() -> FilterSet:
    return FilterSet.load([shipped_dir()])


# -- config ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("jail, words", [
    ({"distinct": "Dest"}, "distinct"),
    ({"distinct": "dest", "threshold": 101}, "can never be reached with max_values 100"),
    ({"distinct": None, "prefixes": ["+"]}, "read only with distinct"),
    ({"distinct": None, "max_values": 5}, "read only with distinct"),
    ({"max_values": 0}, "max_values"),
    ({"prefixes": [""]}, "prefixes"),
])
def test_bad_distinct_jails_are_refused(tmp_path: Path, jail: dict, words: str) -> None:
    body = {**FRAUD, **jail}
    lines = ["[policy.jails.fraud]"]
    for k, v in body.items():
        if v is None:
            continue
        lines.append(f"{k} = " + (f'"{v}"' if isinstance(v, str) else str(v).replace("'", '"').replace("True", "true")))
    p = tmp_path / "sg.toml"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=words):
        from sipguard.config import load_config
        load_config(p)


def test_a_distinct_jail_loads_with_its_defaults() -> None:
    cfg = PolicyConfig.model_validate({"jails": {"fraud": FRAUD}})
    j = cfg.jails["fraud"]
    assert (j.distinct, j.prefixes, j.max_values, j.threshold) == ("dest", ["+", "00"], 100, 5)
    assert cfg.jails["probe"].distinct is None  # the default jails count events, as before


# -- filters: captures -----------------------------------------------------------------------------

def test_a_capture_name_must_be_lower_case(tmp_path: Path) -> None:
    (tmp_path / "t.toml").write_text('name = "t"\nkind = "probe"\n'
                                     "regex = ['^x (?P<Dest>\\S+) from (?P<ip><ADDR>):<PORT>$']\n")
    with pytest.raises(ConfigError, match="lower-case name"):
        FilterSet.load([tmp_path])


def test_captures_travel_with_the_event(shipped: FilterSet) -> None:
    f = {x.name: x for x in shipped.filters}
    assert f["call-attempt"].captures == ("dest",) and f["call-refused"].captures == ("dest",)
    assert f["acl-refused"].captures == ("dest",) and f["secfilter"].captures == ()
    assert f["auth-failure"].captures == ("user",) and f["register-success"].captures == ("user",)  # the office policy
    e = shipped.match(Record("NOTICE: <script>: call attempt to +442079460000 from 198.18.0.40:5060"), 0.0)
    assert e._replace(text="") == Event(0.0, "198.18.0.40", "call-attempt", EventKind.DIAL, 1.0,
                                       captures=(("dest", "+442079460000"),))
    assert e.text == "NOTICE: <script>: call attempt to +442079460000 from 198.18.0.40:5060"  # the evidence
    e = shipped.match(Record("NOTICE: <script>: INVITE refused (relay denied) to +1800 from [2001:db8::5]:5060"), 0.0)
    assert (e.ip, e.kind, e.captures) == ("2001:db8::5", EventKind.PROBE, (("dest", "+1800"),))
    e = shipped.match(Record("WARNING: <script>: secfilter blocked INVITE (SQL injection) from 198.18.0.47:5060"), 0.0)
    assert (e.filter, e.kind, e.captures) == ("secfilter", EventKind.SCANNER, ())
    e = shipped.match(Record("NOTICE: <script>: auth failed for user 1000 from 198.18.0.5:5060 method REGISTER"), 0.0)
    assert e.captures == (("user", "1000"),)  # the office policy's key (it was () before the office policy)


def test_a_long_value_is_cut(shipped: FilterSet) -> None:
    e = shipped.match(Record(f"NOTICE: <script>: call attempt to +{'9' * 250} from 198.18.0.40:5060"), 0.0)
    assert e.captures == (("dest", "+" + "9" * (CAPTURE_CHARS - 1)),)


TEMPLATES = [
    ("call-attempt", "NOTICE: {pre}<script>: call attempt to {a} from {si}:5060"),
    ("call-refused", "NOTICE: {pre}<script>: INVITE refused (not authenticated) to {a} from {si}:5060"),
    ("call-refused", "NOTICE: {pre}<script>: {a} refused (relay denied) to +44 from {si}:5060"),
    ("acl-refused", "NOTICE: {pre}<script>: ACL refused INVITE to {a} from {si}:5060"),
    ("secfilter", "WARNING: {pre}<script>: secfilter blocked {a} (SQL injection) from {si}:5060"),
]
FRAGMENTS = [" ", "+44", "00", ")", "(", ":", "<script>: ", " from ", INJECTED, f"{INJECTED}:5060",
             f" from {INJECTED}:5060", "call attempt to ", " refused (relay denied) to ", "ACL refused INVITE to ",
             "secfilter blocked X (SQL injection)", "[2001:db8::99]:5060", "\t", "#015#012"]
attacker_text = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\n"), max_size=8)), max_size=8).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(TEMPLATES), attacker_text, st.one_of(st.none(), attacker_text),
       st.sampled_from(["198.18.0.5", "2001:db8::5", "[2001:db8::5]"]))
def test_attacker_text_is_a_key_never_an_address(shipped: FilterSet, tpl, a: str, ci: str | None, si: str) -> None:
    name, template = tpl
    pre = "" if ci is None else "{1 1 INVITE " + ci + "} "
    text = template.format(a=a, pre=pre, si=si)
    e = shipped.match(Record(text), 0.0)
    assert e is None or e.ip == si.strip("[]"), (text, e)
    if e is not None:
        assert all(len(v) <= CAPTURE_CHARS for _, v in e.captures)
    token = a and not any(c.isspace() for c in a) and len(a) <= 32 and "\x85" not in a
    if name != "secfilter" and "{a} from" in template and token and ci is None:
        # a dialled user without whitespace is always read, and kept exactly as it was dialled
        assert e is not None and e.filter == name and e.captures == (("dest", a[:CAPTURE_CHARS]),), (text, e)


# -- the policy ------------------------------------------------------------------------------------

def test_distinct_destinations_ban_and_repeats_do_not() -> None:
    p = policy()
    for k in range(20):  # one number twenty times
        assert p.observe(dial(k, "198.18.1.1", "+4420794600")) is None
    assert p.score("198.18.1.1", 20) == {"fraud": 1.0}
    for k in range(4):
        assert p.observe(dial(100 + k, "198.18.1.2", f"+4420794600{k}")) is None
    assert p.observe(dial(104, "198.18.1.2", "1005")) is None  # a local number: not a fraud prefix
    assert p.observe(dial(105, "198.18.1.2", None)) is None  # no capture
    assert p.observe(dial(106, "198.18.1.2", "+49", weight=0.0)) is None  # weight 0
    d = p.observe(dial(107, "198.18.1.2", "00881", kind=EventKind.PROBE))
    assert d is not None and (d.ip, d.reason, d.score) == ("198.18.1.2", "fraud:call-attempt", 5.0)


def test_memory_stays_bounded_under_a_spray() -> None:
    """One source spraying 50,000 distinct numbers keeps max_values of them; 5,000 sources keep at most
    max_tracked (plus the eviction slack); values are held as hashes, never as the text."""
    cfg = PolicyConfig.model_validate({"max_tracked": 1000, "jails": {
        "probe": {"enabled": False}, "auth": {"enabled": False}, "fraud": {**FRAUD, "threshold": 50, "max_values": 50}}})
    p = Policy(cfg, NO_ALLOW)
    p.note_ban("198.18.9.9")
    p.release("198.18.9.9")
    # restore (no decisions) can hold what observe would have banned on: the cap holds there too
    p.restore(dial(k * 0.001, "198.18.2.1", f"+1{k}") for k in range(50_000))
    held = p._dist["fraud"]["198.18.2.1"]
    assert len(held) == 50 and all(type(h) is int for h in held)
    assert p.score("198.18.2.1", 50) == {"fraud": 50.0}
    for n in range(5000):
        p.observe(dial(100 + n * 0.01, f"198.18.{3 + n // 250}.{n % 250}", f"+44{n}"))
    assert len(p._dist["fraud"]) <= 1000
    assert p.stats.evicted > 0
    assert p.expire(10_000) > 0 and p.tracked == 0


def test_restored_events_without_captures_count_nowhere() -> None:
    """The store keeps no captures: after a restart a distinct jail counts anew (documented)."""
    p = policy()
    p.restore([Event(k, "198.18.1.3", "call-attempt", EventKind.DIAL, 1.0) for k in range(10)])
    assert p.score("198.18.1.3", 10) == {}
    assert p.windows == {}


def test_a_success_resets_a_distinct_jail_that_says_so() -> None:
    p = policy(reset_on_success=True)
    for k in range(4):
        p.observe(dial(k, "198.18.1.4", f"+1{k}"))
    p.observe(Event(5, "198.18.1.4", "register-success", EventKind.SUCCESS, 0.0))
    assert p.score("198.18.1.4", 6) == {}
    assert p.observe(dial(7, "198.18.1.4", "+99")) is None


# -- end to end on the real capture ----------------------------------------------------------------

def test_the_real_fraud_prober_is_banned_and_the_phone_is_not(tmp_path: Path) -> None:
    """tests/data/real/fraud-traditional.log (Debian's Kamailio 5.6.3, the example config): the prober
    (.40, six unauthenticated INVITEs to + numbers) is banned by the distinct jail alone; the phone
    (.48: registered, three calls) and the callers refused once or twice are not; the secfilter
    verdicts ban at once."""
    cfg = Config.model_validate({"allowlist": {"include_host_addresses": False},
                                 "policy": {"jails": {"fraud": FRAUD}}})
    res = scan_files([str(REAL / "fraud-traditional.log")], cfg)
    bans = {b.ip: b for b in res.bans}
    assert set(bans) == {"198.18.0.40", "198.18.0.44", "198.18.0.45", "198.18.0.46", "198.18.0.47"}
    assert bans["198.18.0.40"].reason.startswith("fraud:") and bans["198.18.0.40"].score == 5.0
    assert all(bans[ip].reason == "scanner:secfilter" for ip in ("198.18.0.44", "198.18.0.45", "198.18.0.46", "198.18.0.47"))
    # without the distinct jail the slow prober stays under every per-event threshold
    plain = scan_files([str(REAL / "fraud-traditional.log")],
                       Config.model_validate({"allowlist": {"include_host_addresses": False}}))
    assert "198.18.0.40" not in {b.ip for b in plain.bans}


# -- the e2e scenario's senders against a real Kamailio (the scenario itself runs in tests/e2e) ----------

def test_the_scenario_senders_against_a_real_kamailio(tmp_path: Path) -> None:
    """tests/e2e/scenario.py's fraud prober and its phone's calls, played against Debian's Kamailio with
    the example config in namespaces of this test's own (PID-unique names): read back from the real
    log, the distinct jail bans the prober, nothing else does, and the phone, its calls answered, is
    banned by nothing."""
    import os
    import shutil
    import time

    if os.geteuid() != 0 or shutil.which("kamailio") is None:
        if os.environ.get("CI") or os.geteuid() == 0:
            pytest.fail("needs root and kamailio (the Makefile's APT_PACKAGES install it)", pytrace=False)
        pytest.skip("needs root and kamailio")
    from tests.e2e.scenario import DOMAIN, FRAUD_NUMBERS, PHONE_CALLS, PROXY, SG_CONFIG, Phone, a_fraud
    from tests.lab.kamailio import Kamailio
    from tests.lab.netns import Lab

    log = tmp_path / "kamailio.log"
    with Lab(f"ds{os.getpid() % 100000}", proxy_ip=PROXY) as lab:
        with Kamailio(lab.hub, PROXY, logmode="rsyslog", template="RSYSLOG_FileFormat", logfile=log, domain=DOMAIN):
            phone = Phone(lab.add_client("198.18.0.50"), "198.18.0.50", max_seconds=20, call_every=1.0)
            phone.start()
            assert phone.registered.wait(8), phone.results
            out = a_fraud(None, lab.add_client("198.18.0.20"), "198.18.0.20")
            deadline = time.monotonic() + 10
            while phone.calls and time.monotonic() < deadline:
                time.sleep(0.2)
            phone.stop()
            time.sleep(0.5)
    assert phone.error is None, phone.error
    assert [n for _t, n, _s in phone.call_results] == list(PHONE_CALLS)
    assert all(st == "404" for _t, _n, st in phone.call_results), phone.call_results  # not served here
    assert out == "fraud:" + " ".join(["407"] * len(FRAUD_NUMBERS)), out  # challenged each time
    sg = Config.model_validate(__import__("tomllib").loads(SG_CONFIG.format(state=tmp_path, sources=f'logs = ["{log}"]')))
    sg = sg.model_copy(update={"allowlist": sg.allowlist.model_copy(update={"include_host_addresses": False})})
    bans = {b.ip: b for b in scan_files([str(log)], sg).bans}
    assert set(bans) == {"198.18.0.20"} and bans["198.18.0.20"].reason.startswith("fraud:"), bans
    assert bans["198.18.0.20"].score == 5.0
    plain = Config.model_validate({"allowlist": {"include_host_addresses": False}})
    assert scan_files([str(log)], plain).bans == []  # under every per-event threshold
