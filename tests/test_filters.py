"""FilterSet: loading and validating filter files, matching, explain, and address-injection properties."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipguard.errors import ConfigError
from sipguard.filters import FilterSet, Verdict, shipped_dir
from sipguard.model import EventKind, Record

INJECTED = "198.18.0.99"
GOOD = """
name = "t"
description = "test"
kind = "auth_failure"
weight = 2.5
prefilter = ["boom"]
regex = ['boom from (?P<ip><ADDR>):<PORT>$']
"""


def write(d: Path, name: str, text: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def shipped() -> FilterSet:
    return FilterSet.load([shipped_dir()])


# -- loading --------------------------------------------------------------------------------------------

def test_shipped_filters_load_in_a_stable_attack_first_order(shipped: FilterSet) -> None:
    assert shipped.names == ["pike-block", "malformed", "scanner-ua", "secfilter", "auth-failure", "acl-refused",
                             "auth-challenge", "call-refused", "unknown-user", "call-attempt", "register-success"]
    kinds = {f.name: (f.kind, f.weight) for f in shipped.filters}
    assert kinds["register-success"] == (EventKind.SUCCESS, 0.0)
    assert kinds["pike-block"] == (EventKind.FLOOD, 1.0)
    assert shipped.triggers_complete and "auth failed for user" in shipped.triggers


def test_override_directory_replaces_by_name(tmp_path: Path) -> None:
    user = tmp_path / "user"
    write(user, "mine.toml", GOOD.replace('name = "t"', 'name = "auth-failure"'))
    write(user, "extra.toml", GOOD)
    fs = FilterSet.load([shipped_dir(), user, tmp_path / "missing"])
    f = next(f for f in fs.filters if f.name == "auth-failure")
    assert f.weight == 2.5 and f.path.endswith("mine.toml")
    assert "t" in fs.names and len(fs.names) == len(FilterSet.load([shipped_dir()]).names) + 1


def test_enabled_and_disabled(tmp_path: Path) -> None:
    write(tmp_path, "off.toml", GOOD + "enabled = false\n")
    assert FilterSet.load([tmp_path]).names == []
    assert FilterSet.load([tmp_path], enabled=["t"]).names == ["t"]
    fs = FilterSet.load([shipped_dir()], disabled=["register-success", "unknown-user"])
    assert "register-success" not in fs.names and len(fs.names) == len(FilterSet.load([shipped_dir()]).names) - 2
    with pytest.raises(ConfigError, match="unknown filter 'nope'"):
        FilterSet.load([shipped_dir()], disabled=["nope"])
    with pytest.raises(ConfigError, match="enabled"):
        FilterSet.load([shipped_dir()], enabled=["nope"])


def test_duplicate_name_in_one_directory(tmp_path: Path) -> None:
    write(tmp_path, "a.toml", GOOD)
    write(tmp_path, "b.toml", GOOD)
    with pytest.raises(ConfigError, match=r"b\.toml: name: filter 't' is also defined in .*a\.toml"):
        FilterSet.load([tmp_path])


def test_not_a_directory(tmp_path: Path) -> None:
    f = write(tmp_path, "x.toml", GOOD)
    with pytest.raises(ConfigError, match="not a directory"):
        FilterSet.load([f])


@pytest.mark.parametrize("text,where,reason", [
    (GOOD + "colour = 'red'\n", r"colour \(line 8\)", "unknown key"),
    (GOOD.replace("weight = 2.5", "weight = 'heavy'"), r"weight \(line 5\)", "must be a number"),
    (GOOD.replace("weight = 2.5", "weight = true"), r"weight \(line 5\)", "must be a number"),
    (GOOD.replace("weight = 2.5", "weight = -1"), r"weight \(line 5\)", "greater than or equal"),
    (GOOD + "enabled = 'yes'\n", r"enabled \(line 8\)", "valid boolean"),
    (GOOD.replace("kind = \"auth_failure\"", "kind = \"theft\""), r"kind \(line 4\)", "flood"),
    (GOOD.replace("regex = ['boom", "regex = [5, 'boom"), r"regex\[0\] \(line 7\)", "valid string"),
    (GOOD.replace("regex = ['boom from (?P<ip><ADDR>):<PORT>$']", "regex = []"), r"regex \(line 7\)", "at least 1"),
    (GOOD.replace('prefilter = ["boom"]', 'prefilter = [""]'), r"prefilter\[0\]", "at least 1 character"),
    (GOOD.replace('name = "t"', 'name = "Bad Name"'), r"name \(line 2\)", "pattern"),
    (GOOD.replace('name = "t"\n', ""), "name", "required key is missing"),
    (GOOD.replace("regex = [", "regex = ['(?P<ip>x)', 'x(', "), r"regex\[1\] \(line 7\)",
     "invalid regex: missing ), unterminated subpattern"),
    (GOOD.replace("regex = [", "regex = ['(?P<ip>x)', 'from <ADDR>', "), r"regex\[1\] \(line 7\)",
     "no named group 'ip'"),
    (GOOD + "ignore = ['[']\n", r"ignore\[0\] \(line 8\)", "invalid regex"),
])
def test_bad_filter_files(tmp_path: Path, text: str, where: str, reason: str) -> None:
    write(tmp_path, "bad.toml", text)
    with pytest.raises(ConfigError) as e:
        FilterSet.load([tmp_path])
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / "bad.toml") + ": "), msg
    assert re.search(where, msg), msg
    assert reason in msg, msg


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    write(tmp_path, "bad.toml", GOOD + "weight = = 3\n")
    with pytest.raises(ConfigError) as e:
        FilterSet.load([tmp_path])
    assert e.value.where == 8 and str(e.value).startswith(f"{tmp_path / 'bad.toml'}:8: invalid TOML")


def test_unreadable_encoding(tmp_path: Path) -> None:
    (tmp_path / "bin.toml").write_bytes(b"name = \"\xff\"\n")
    with pytest.raises(ConfigError, match="cannot read"):
        FilterSet.load([tmp_path])


# -- matching ----------------------------------------------------------------------------------------

def test_match_time_ip_and_counters(tmp_path: Path) -> None:
    # multiline = false: this filter refuses records that span lines (the default accepts them since issue 12)
    write(tmp_path, "t.toml", GOOD + "ignore = ['boom from 10\\.']\nmultiline = false\n")
    fs = FilterSet.load([tmp_path])
    e = fs.match(Record("x boom from [::ffff:198.18.0.5]:5060", time=123.0), now=999.0)
    assert (e.time, e.ip, e.filter, e.kind, e.weight) == (123.0, "198.18.0.5", "t", EventKind.AUTH_FAILURE, 2.5)
    assert fs.match(Record("boom from 198.18.0.5:1"), now=999.0).time == 999.0
    assert fs.match(Record("boom from 999.1.1.1:1"), 0) is None
    assert fs.match(Record("boom from 10.0.0.1:1"), 0) is None
    assert fs.match(Record("nothing here"), 0) is None
    assert fs.match(Record("boom from 198.18.0.5:1\nmore"), 0) is None
    assert fs.stats == {"records": 6, "skipped": 1, "events": 2, "ignored": 1, "invalid_ip": 1, "multiline": 1}
    assert fs.hits == {"t": 2}


def test_multiline_opt_in(tmp_path: Path) -> None:
    write(tmp_path, "t.toml", GOOD.replace("regex = ['boom", "regex = ['(?s:.*)boom") + "multiline = true\n")
    fs = FilterSet.load([tmp_path])
    # the prefilter is looked for on the record's first line (since issue 12), the regex sees it all
    assert fs.match(Record("boom\nboom from 198.18.0.5:1"), 0).ip == "198.18.0.5"
    assert fs.match(Record("head\nboom from 198.18.0.5:1"), 0) is None and fs.stats["skipped"] == 1


def test_multiline_is_the_default_and_can_be_refused(tmp_path: Path) -> None:
    rx = "regex = ['^boom (?s:.*)from (?P<ip><ADDR>):<PORT>$']"
    write(tmp_path, "t.toml", GOOD.replace("regex = ['boom from (?P<ip><ADDR>):<PORT>$']", rx))
    fs = FilterSet.load([tmp_path])
    assert fs.match(Record("boom UA 'a\r\nb' from 198.18.0.99:1\nc' from 198.18.0.5:1"), 0).ip == "198.18.0.5"
    write(tmp_path, "t.toml", GOOD.replace("regex = ['boom from (?P<ip><ADDR>):<PORT>$']", rx) + "multiline = false\n")
    fs = FilterSet.load([tmp_path])
    assert fs.match(Record("boom a\nb from 198.18.0.5:1"), 0) is None and fs.stats["multiline"] == 1
    assert fs.match(Record("boom a b from 198.18.0.5:1"), 0).ip == "198.18.0.5"


def test_second_regex_is_tried_when_first_captures_an_invalid_address(tmp_path: Path) -> None:
    # the first regex is not anchored at the end of the line: the file has to say so (check.py)
    write(tmp_path, "t.toml", GOOD.replace("regex = [", "regex = ['boom from (?P<ip>\\S+) x', ")
          + "unanchored = true\nreason = \"a test of the second regex\"\n")
    fs = FilterSet.load([tmp_path])
    assert fs.match(Record("boom from nonsense x boom from 1.2.3.4:5"), 0).ip == "1.2.3.4"


def test_explain(shipped: FilterSet) -> None:
    text = "NOTICE: <script>: auth failed for user 1000 from 198.18.0.50:5060 method REGISTER"
    v = {x.filter: x for x in shipped.explain(text)}
    assert v["auth-failure"] == Verdict("auth-failure", "198.18.0.50", "matched")
    assert v["scanner-ua"].result == "prefilter"
    assert shipped.explain(text.replace("198.18.0.50", "999.1.1.1"))[shipped.names.index("auth-failure")] == Verdict(
        "auth-failure", "999.1.1.1", "invalid_ip")
    # a record that spans lines is tried whole (issue 12): its end is not Kamailio's tail here
    assert {x.result for x in shipped.explain(text + "\nx")} == {"prefilter", "missed"}
    assert {x.result for x in shipped.explain(Record("auth failed for user 1"))} == {"prefilter", "missed"}
    name, ip, result = shipped.explain(text)[0]
    assert (name, result) == ("pike-block", "prefilter")


def test_explain_ignored_and_inactive(tmp_path: Path) -> None:
    write(tmp_path, "t.toml", GOOD + "ignore = ['from 10\\.']\nenabled = false\n")
    fs = FilterSet.load([tmp_path])
    assert fs.explain("boom from 10.1.1.1:1") == []
    (v,) = fs.explain("boom from 10.1.1.1:1", include_inactive=True)
    assert v == Verdict("t", "10.1.1.1", "ignored")


# -- injections: the address is always the one Kamailio printed last ---------------------------------

REAL = ["198.18.0.5", "2001:db8::5", "[2001:db8::5]", "::ffff:198.18.0.5", "fe80::5%eth0"]
NORM = {"198.18.0.5": "198.18.0.5", "2001:db8::5": "2001:db8::5", "[2001:db8::5]": "2001:db8::5",
        "::ffff:198.18.0.5": "198.18.0.5", "fe80::5%eth0": "fe80::5"}
# (filter, template): {a} is attacker text, {ci} the Call-ID in a log_prefix, {si} the real source
TEMPLATES = [
    ("pike-block", "ALERT: {pre}<script>: ALERT: pike block REGISTER from sip:{a}@x (IP:{si}:5060)"),
    ("pike-block", "ALERT: {pre}<script>: ALERT: pike blocking INVITE from {a} (IP:{si}:5060)"),
    ("pike-block", "WARNING: {pre}pike [pike_funcs.c:135]: pike_check_ipaddr(): PIKE - BLOCKing ip {si}, node=0x7f00"),
    ("malformed", "ERROR: {pre}<script>: Malformed SIP request from {si}:5060"),
    ("malformed", "ERROR: {pre}<core> [core/receive.c:376]: receive_msg(): core parsing of SIP message failed ({si}:5060/1)"),
    ("scanner-ua", "NOTICE: {pre}<script>: Blocked scanner UA '{a}' from {si}:5060"),
    ("auth-failure", "NOTICE: {pre}<script>: auth failed for user {a} from {si}:5060 method REGISTER"),
    ("auth-challenge", "NOTICE: {pre}<script>: auth challenge for user {a} from {si}:5060 method REGISTER"),
    ("unknown-user", "NOTICE: {pre}<script>: unknown user {a} from {si}:5060 method INVITE"),
    ("register-success", "NOTICE: {pre}<script>: REGISTER success for user {a} from {si}:5060"),
]
FRAGMENTS = [
    " ", "'", "\"", "}", "{", ")", "(", ":", "<script>: ", " from ", f"{INJECTED}", f"{INJECTED}:5060",
    f" from {INJECTED}:5060", f" from {INJECTED}:5060 method REGISTER", f"(IP:{INJECTED}:5060)",
    f" (IP:{INJECTED}:5060)", f"PIKE - BLOCKing ip {INJECTED}, node=0x1", "REGISTER success for user x",
    "auth failed for user", "Blocked scanner UA '", "Malformed SIP request", f"({INJECTED}:5060/1)",
    "NOTICE: ", "pike block REGISTER", " method REGISTER", "[2001:db8::99]:5060", "\r", "\t", "#015#012",
]
attacker_text = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(st.characters(blacklist_categories=["Cs"],
                                                                 blacklist_characters="\n"), max_size=8)),
    max_size=8).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(TEMPLATES), attacker_text, st.one_of(st.none(), attacker_text), st.sampled_from(REAL))
def test_injected_text_never_decides_the_address(shipped: FilterSet, tpl, a: str, ci: str | None, si: str) -> None:
    name, template = tpl
    pre = "" if ci is None else "{1 1 REGISTER " + ci + "} "
    text = template.format(a=a, pre=pre, si=si)
    e = shipped.match(Record(text), 0.0)
    assert e is None or e.ip == NORM[si], (text, e)
    if name == "register-success":
        # success needs a plain user token; an attack shape may win, but always for the real source
        if e is not None and e.filter != name:
            assert e.kind != EventKind.SUCCESS
    elif "{a}" in template or ci is not None:
        assert e is not None and e.filter in (name, "auth-failure", "scanner-ua", "malformed", "pike-block"), (text, e)
    else:
        assert e is not None and e.filter == name


@settings(max_examples=300, deadline=None)
@given(attacker_text, st.one_of(st.none(), attacker_text), st.sampled_from(REAL))
def test_scanner_line_never_reads_as_success(shipped: FilterSet, ua: str, ci: str | None, si: str) -> None:
    pre = "" if ci is None else "{1 1 OPTIONS " + ci + "} "
    text = f"NOTICE: {pre}<script>: Blocked scanner UA '{ua}' from {si}:5060"
    e = shipped.match(Record(text), 0.0)
    assert e is not None and e.kind != EventKind.SUCCESS and e.ip == NORM[si]
    alone = FilterSet([f for f in shipped.filters if f.name == "register-success"])
    assert alone.match(Record(text), 0.0) is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_random_text_never_raises_and_never_yields_the_injected_address(shipped: FilterSet, text: str) -> None:
    e = shipped.match(Record(text), 0.0)
    assert e is None or isinstance(e.ip, str)
    shipped.explain(text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS + ["NOTICE: <script>: ", "ERROR: ", "{1 1 X "]), max_size=14).map("".join))
def test_fragment_soup_never_yields_the_injected_address(shipped: FilterSet, text: str) -> None:
    """Text made only of attack fragments matches, if at all, on the shape of its very end."""
    e = shipped.match(Record(text), 0.0)
    if e is not None:
        assert text.rstrip(")").endswith(("5060", "5060/1", "REGISTER", "0x1"))
