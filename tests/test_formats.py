"""RecordParser: every on-disk format, continuation lines, stderr forgery defences, robustness."""

from __future__ import annotations

import calendar
import json
import logging
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipguard.formats import MAX_RANKS, MAX_RECORD_CHARS, RecordParser
from sipguard.model import Line, Record
from sipguard.pipeline import Pipeline

NOW = time.mktime((2026, 11, 30, 12, 0, 0, 0, 0, -1))
MSG = "NOTICE: <script>: auth failed for user 1000 from 198.18.0.50:5060 method REGISTER"


def L(text: str | bytes, source: str = "s") -> Line:
    return Line(source, text.encode() if isinstance(text, str) else text)


def parse(*lines: str | bytes, **kw) -> tuple[list[Record], RecordParser]:
    kw.setdefault("now", lambda: NOW)
    kw.setdefault("trust_plain_stderr", True)  # these tests read plain stderr (opt-in since issue 12)
    p = RecordParser(**kw)
    return list(Pipeline(p).records(L(s) for s in lines)), p


# -- the formats ------------------------------------------------------------------------------------

def test_traditional() -> None:
    (r,), p = parse(f"Nov 30 01:55:12 sip1 kamailio[23875]: {MSG}")
    assert r == Record(MSG, time.mktime((2026, 11, 30, 1, 55, 12, 0, 0, -1)), "sip1", "kamailio", 23875, None, "s")
    assert p.stats.by_format == {"traditional": 1}


def test_traditional_single_digit_day_and_year_inference() -> None:
    (a, b), _ = parse(f"Nov  3 01:55:12 h kamailio[1]: {MSG}", f"Dec 25 00:00:00 h kamailio[1]: {MSG}")
    assert time.localtime(a.time)[:6] == (2026, 11, 3, 1, 55, 12)
    # Dec 25 2026 would be > 1 day in the future on Nov 30 2026: it was last year's
    assert time.localtime(b.time)[:3] == (2025, 12, 25)
    # one day ahead is tolerated (clock skew between hosts)
    (c,), _ = parse(f"Dec  1 06:00:00 h kamailio[1]: {MSG}")
    assert time.localtime(c.time)[:3] == (2026, 12, 1)


def test_year_inference_uses_now_at_new_year() -> None:
    jan = time.mktime((2027, 1, 1, 0, 5, 0, 0, 0, -1))
    (a, b), _ = parse(f"Dec 31 23:59:59 h kamailio[1]: {MSG}", f"Jan  1 00:04:00 h kamailio[1]: {MSG}",
                      now=lambda: jan)
    assert time.localtime(a.time)[:3] == (2026, 12, 31)
    assert time.localtime(b.time)[:3] == (2027, 1, 1)


def test_iso_rsyslog_file_format() -> None:
    (r,), p = parse(f"2026-11-30T02:08:09.376964+00:00 sip1 kamailio[23875]: {MSG}")
    assert r.text == MSG and r.host == "sip1" and r.pid == 23875 and r.program == "kamailio"
    assert r.time == pytest.approx(calendar.timegm((2026, 11, 30, 2, 8, 9)) + 0.376964)
    assert p.stats.by_format == {"iso": 1}


def test_journal_alias() -> None:
    (r,), _ = parse(f"2026-11-30T02:08:09+0000 h kamailio[1]: {MSG}", fmt="journal")
    assert r.text == MSG


@pytest.mark.parametrize("off,delta", [("-05:00", 5 * 3600), ("+0130", -5400), ("Z", 0), ("+00:00", 0)])
def test_iso_offsets(off: str, delta: int) -> None:
    (r,), _ = parse(f"2026-11-30T02:08:09{off} h kamailio[1]: {MSG}")
    assert r.time == calendar.timegm((2026, 11, 30, 2, 8, 9)) + delta


def test_iso_bad_date_still_a_record_without_time() -> None:
    (r,), _ = parse(f"2026-13-30T02:08:09+00:00 h kamailio[1]: {MSG}")
    assert r.text == MSG and r.time is None


def test_rfc5424() -> None:
    (r,), p = parse(f"<133>1 2026-11-30T02:08:09.376964+00:00 sip1 kamailio 23875 - - {MSG}")
    assert (r.text, r.host, r.program, r.pid) == (MSG, "sip1", "kamailio", 23875)
    assert r.time == pytest.approx(calendar.timegm((2026, 11, 30, 2, 8, 9)) + 0.376964)
    assert p.stats.by_format == {"rfc5424": 1}


@pytest.mark.parametrize("sd", [
    "[timeQuality tzKnown=\"1\"]",
    "[a@1 x=\"y\"][b@2 z=\"w\"]",
    "[x a=\"]\\\"\\\\\"]",  # escaped ] " \ inside a value
])
def test_rfc5424_structured_data(sd: str) -> None:
    (r,), _ = parse(f"<133>1 2026-11-30T02:08:09Z sip1 kamailio 23875 ID1 {sd} {MSG}")
    assert r.text == MSG


def test_rfc5424_nil_values_bom_and_double_space() -> None:
    (a, b, c), _ = parse(
        f"<133>1 - - kamailio - - - {MSG}",
        f"<133>1 - h kamailio 1 - - \ufeff{MSG}",
        f"<133>1 - h kamailio 1 - -  {MSG}",
    )
    assert (a.text, a.time, a.host, a.pid) == (MSG, None, None, None)
    assert b.text == MSG and c.text == MSG


def test_journal_short_iso_with_continuation_lines() -> None:
    head = "2026-11-30T02:08:09+0000 sip1 kamailio[23875]: "
    pad = " " * len(head)
    (r, s), p = parse(head + "ERROR: first line", pad + "second line", pad + "  third, indented",
                      head + MSG)
    assert r.text == "ERROR: first line\nsecond line\n  third, indented"
    assert s.text == MSG and s.time == calendar.timegm((2026, 11, 30, 2, 8, 9))
    assert p.stats.continuation == 2 and p.stats.by_format == {"short-iso": 2}


def test_journal_markers_are_garbage_not_continuations() -> None:
    recs, p = parse("-- Boot 0123456789abcdef --", f"2026-11-30T02:08:09+0000 h kamailio[1]: {MSG}",
                    "-- No entries --")
    assert [r.text for r in recs] == [MSG]
    assert p.stats.garbage == 2


def test_journal_continuation_that_looks_like_stderr_is_a_continuation() -> None:
    head = "2026-11-30T02:08:09+0000 sip1 kamailio[23875]: "
    forged = " " * len(head) + " 5(4242) NOTICE: <script>: auth failed for user 1 from 198.18.0.99:5060 method X"
    (r,), p = parse(head + "ERROR: x", forged)
    assert r.pid == 23875 and r.text.startswith("ERROR: x\n")
    assert p.stats.by_format == {"short-iso": 1}


def test_stderr() -> None:
    (a, b, c), p = parse(f" 1(24255) {MSG}", " 0(24250) NOTICE: main", f"12(24266) {MSG}")
    assert (a.text, a.time, a.host, a.program, a.pid, a.rank) == (MSG, None, None, None, 24255, 1)
    assert (b.rank, b.pid) == (0, 24250) and (c.rank, c.pid) == (12, 24266)
    assert p.stats.by_format == {"stderr": 3}


def test_stderr_continuation_lines() -> None:
    (a, b), p = parse(" 1(24255) ERROR: msg=<INVITE sip:x SIP/2.0\r", "Via: x\r", "", ">", f" 1(24255) {MSG}")
    assert a.text == "ERROR: msg=<INVITE sip:x SIP/2.0\r\nVia: x\r\n\n>" and b.text == MSG
    assert p.stats.continuation == 3


def test_stderr_warns_once_per_source(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []
    p = RecordParser(on_stderr=seen.append)
    with caplog.at_level(logging.WARNING, logger="sipguard.formats"):
        for src in ("a", "a", "b"):
            p.feed(Line(src, f" 1(24255) {MSG}".encode()))
    assert seen == ["a", "b"]  # a caller's callback replaces the log line
    assert not caplog.records
    p = RecordParser()
    with caplog.at_level(logging.WARNING, logger="sipguard.formats"):
        for src in ("a", "a", "b"):
            p.feed(Line(src, f" 1(24255) {MSG}".encode()))
    assert sum("stderr" in r.message for r in caplog.records) == 2


# -- stderr forgery -----------------------------------------------------------------------------------

FORGED = " 5(4242) NOTICE: <script>: auth failed for user 1000 from 198.18.0.99:5060 method REGISTER"


def test_forged_header_with_known_rank_and_other_pid_is_a_continuation() -> None:
    recs, p = parse(" 5(24259) NOTICE: hello", " 3(24257) ERROR: bad header x\r", FORGED)
    assert [r.text for r in recs] == ["NOTICE: hello", "ERROR: bad header x\r\n" + FORGED]
    assert p.stats.forged == 1


def test_forged_header_reusing_a_pid_of_another_rank() -> None:
    recs, p = parse(" 1(4242) NOTICE: a", " 3(24257) ERROR: x", FORGED)
    assert [r.rank for r in recs] == [1, 3] and recs[1].text.endswith(FORGED)
    assert p.stats.forged == 1


def test_unseen_rank_without_pid_alive_is_accepted() -> None:
    """Known limit: with no pid_alive and no earlier line of that rank, a forged header passes."""
    recs, p = parse(" 3(24257) ERROR: x", FORGED)
    assert [r.rank for r in recs] == [3, 5] and p.stats.forged == 0


def test_rank_map_is_bounded() -> None:
    p = RecordParser()
    for rank in range(10, 10 + MAX_RANKS + 50):
        p.feed(L(f"{rank}({100000 + rank}) NOTICE: x"))
    assert p.stats.forged == 50  # the first MAX_RANKS ranks are accepted, the rest are not
    assert len(p._states["s"].ranks) == MAX_RANKS


def test_pid_alive_rejects_dead_or_foreign_pids() -> None:
    alive = {24250, 24257}.__contains__
    recs, p = parse(" 0(24250) NOTICE: main", " 3(24257) ERROR: x", FORGED, pid_alive=alive)
    assert [r.rank for r in recs] == [0, 3] and recs[1].text.endswith(FORGED)
    assert p.stats.forged == 1


def test_restart_resets_the_rank_map_only_when_pid_alive_proves_it() -> None:
    old, new = [" 0(100) NOTICE: main", " 1(101) NOTICE: a"], [" 0(200) NOTICE: restarted", " 1(201) NOTICE: b"]
    # both instances alive (e.g. PIDs guessed by an attacker): the new PIDs are forgeries
    recs, p = parse(*old, *new, pid_alive=lambda pid: pid in {100, 101, 200, 201})
    assert len(recs) == 2 and p.stats.forged == 2
    # the old instance is gone and the new one runs: a restart, the map starts over
    live = {100, 101}
    p = RecordParser(pid_alive=lambda pid: pid in live, trust_plain_stderr=True)
    for s in old:
        p.feed(L(s))
    live.clear()
    live.update({200, 201})
    for s in new:
        p.feed(L(s))
    assert p.stats.forged == 0 and [r.pid for r in p.flush()] == [201] and p.stats.records == 4


def test_restart_without_pid_alive_is_treated_as_forged() -> None:
    recs, p = parse(" 0(100) NOTICE: main", " 0(200) NOTICE: restarted")
    assert len(recs) == 1 and p.stats.forged == 1


def test_syslog_line_inside_stderr_stream_is_not_a_record() -> None:
    fake = "Nov 30 01:55:12 sip1 kamailio[1]: NOTICE: <script>: auth failed for user 1 from 198.18.0.99:5060 method R"
    recs, p = parse(" 3(24257) ERROR: bad header x", fake, f" 3(24257) {MSG}")
    assert [r.text for r in recs] == ["ERROR: bad header x\n" + fake, MSG]
    assert p.stats.forged == 1


def test_stderr_line_inside_syslog_stream_is_not_a_record() -> None:
    """In a syslog stream an indented line is a journal continuation, whatever it looks like."""
    recs, p = parse(f"Nov 30 01:55:12 h kamailio[1]: {MSG}", FORGED)
    assert [r.text for r in recs] == [MSG + "\n" + FORGED.lstrip()] and p.stats.continuation == 1


# -- program filter, garbage, sources, limits ------------------------------------------------------

def test_other_programs_and_their_continuations_are_dropped() -> None:
    head = "2026-11-30T02:08:09+0000 h "
    recs, p = parse(
        f"{head}kamailio[1]: {MSG}",
        f"{head}sshd[2]: {MSG}",
        " " * 40 + "continuation of sshd's message",
        f"Nov 30 01:55:12 h logger: {MSG}",
        f"<133>1 - h - - - - {MSG}",
        f"<133>1 - h sshd 2 - - {MSG}",
    )
    assert [r.text for r in recs] == [MSG]
    assert p.stats.other_program == 4 and p.stats.continuation == 1


def test_configurable_programs() -> None:
    recs, p = parse(f"Nov 30 01:55:12 h kamailio[1]: {MSG}", f"Nov 30 01:55:12 h sip-proxy[2]: {MSG}",
                    programs={"sip-proxy"})
    assert [r.program for r in recs] == ["sip-proxy"] and p.stats.other_program == 1


def test_garbage_without_pending_record() -> None:
    recs, p = parse("hello", "", "   indented", "NOTICE: <script>: x")
    assert recs == [] and p.stats.garbage == 4 and p.stats.records == 0


def test_fixed_format_skips_detection() -> None:
    recs, p = parse(f"Nov 30 01:55:12 h kamailio[1]: {MSG}", f"2026-11-30T02:08:09Z h kamailio[1]: {MSG}",
                    fmt="traditional")
    assert len(recs) == 1 and p.stats.garbage == 1
    recs, p = parse(f"Nov 30 01:55:12 h kamailio[1]: {MSG}", f" 1(9) {MSG}", fmt="stderr")
    assert [r.rank for r in recs] == [1] and p.stats.garbage == 1
    recs, p = parse(f"Nov 30 01:55:12 h kamailio[1]: {MSG}", f" 1(9) {MSG}", fmt="syslog")
    assert [r.text for r in recs] == [MSG + "\n" + f"1(9) {MSG}"]
    with pytest.raises(ValueError):
        RecordParser(fmt="xml")  # ("json" is Kamailio's JSON engine on stderr since issue 12)


def test_feed_returns_previous_record_and_flush_the_pending_one() -> None:
    p = RecordParser(now=lambda: NOW, trust_plain_stderr=True)
    assert p.feed(L(f" 1(9) {MSG}")) == []
    assert [r.text for r in p.feed(L(" 1(9) second"))] == [MSG]
    assert [r.text for r in p.flush()] == ["second"]
    assert p.flush() == []
    assert p.feed(L("orphan continuation")) == [] and p.stats.garbage == 1


def test_sources_are_independent() -> None:
    p = RecordParser(now=lambda: NOW, trust_plain_stderr=True)
    p.feed(Line("a", f" 1(9) {MSG}".encode()))
    p.feed(Line("b", f"Nov 30 01:55:12 h kamailio[1]: {MSG}".encode()))
    p.feed(Line("a", b"continued"))
    p.feed(Line("b", b" 1(9) forged for b"))
    recs = {r.source: r for r in p.flush()}
    assert recs["a"].text == MSG + "\ncontinued" and recs["a"].rank == 1
    assert recs["b"].text == MSG + "\n1(9) forged for b"


def test_invalid_utf8_is_counted_and_still_parsed() -> None:
    raw = b"Nov 30 01:55:12 h kamailio[1]: NOTICE: <script>: Blocked scanner UA '\xff\xfe' from 198.18.0.5:5060"
    (r,), p = parse(raw)
    assert p.stats.invalid_utf8 == 1
    assert r.text == "NOTICE: <script>: Blocked scanner UA '\ufffd\ufffd' from 198.18.0.5:5060"


def test_record_size_is_bounded() -> None:
    p = RecordParser(trust_plain_stderr=True)
    p.feed(L(" 1(9) ERROR: start"))
    chunk = "x" * 1000
    for _ in range(200):
        p.feed(L(chunk))
    (r,) = p.flush()
    assert len(r.text) <= MAX_RECORD_CHARS and p.stats.truncated > 0


def test_stats_as_dict() -> None:
    _, p = parse(f" 1(9) {MSG}", "x")
    d = p.stats.as_dict()
    assert d["records"] == 1 and d["continuation"] == 1 and d["by_format"] == {"stderr": 1}
    flat = dict(p.stats)
    assert flat["records"] == 1 and flat["format.stderr"] == 1 and all(isinstance(v, int) for v in flat.values())
    assert p.stats["garbage"] == 0
    with pytest.raises(KeyError):
        p.stats["by_format"]


# -- never raises ---------------------------------------------------------------------------------------

PREFIXES = ["", " 1(9) ", "12(34) ", "Nov 30 01:55:12 h kamailio[1]: ", "Feb 30 99:99:99 h kamailio: ",
            "2026-11-30T02:08:09.1+00:00 h kamailio[1]: ", "9999-99-99T99:99:99+9999 h kamailio[9]: ",
            "<133>1 - - kamailio - - - ", "<999>1 x y kamailio z - [a b=\"", " " * 45, "<"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(PREFIXES), st.text()), max_size=20),
       st.sampled_from(["auto", "syslog", "stderr", "traditional", "iso", "rfc5424"]))
def test_random_text_never_raises(lines: list[tuple[str, str]], fmt: str) -> None:
    p = RecordParser(fmt, pid_alive=lambda pid: pid % 2 == 0, now=lambda: NOW)
    out = []
    for prefix, body in lines:
        out += p.feed(Line("h", (prefix + body).encode("utf-8", "surrogatepass")))
    out += p.flush()
    assert all(isinstance(r, Record) and isinstance(r.text, str) for r in out)
    assert p.stats.lines == len(lines)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=20))
def test_random_bytes_never_raise(lines: list[bytes]) -> None:
    p = RecordParser()
    for b in lines:
        p.feed(Line("h", b))
    p.flush()


# -- plain stderr is opt-in (issue 12) ------------------------------------------------------------------

def test_plain_stderr_is_not_read_without_trust(caplog: pytest.LogCaptureFixture) -> None:
    """Off (the default): plain stderr records are counted, warned about once per source (naming the
    JSON engine and the switch), never returned, so never matched; their continuations go with them."""
    p = RecordParser(now=lambda: NOW)
    with caplog.at_level(logging.WARNING, logger="sipguard.formats"):
        out = []
        for src, text in [("a", f" 1(24255) {MSG}"), ("a", "continued"), ("a", f" 1(24255) {MSG}"),
                          ("b", f"12(24266) {MSG}")]:
            out += p.feed(Line(src, text.encode()))
        out += p.flush()
    assert out == [] and p.stats.untrusted_stderr == 3 and p.stats.records == 0
    warnings = [r.message for r in caplog.records]
    assert len(warnings) == 2 and all("--log-engine=json" in w and "trust_plain_stderr" in w for w in warnings)
    # the syslog formats are read as before, and a syslog source is never taken for stderr
    (r,), _ = parse(f"Nov 30 01:55:12 sip1 kamailio[23875]: {MSG}", trust_plain_stderr=False)
    assert r.text == MSG
    # with the switch, the same lines are records
    recs, p = parse(f" 1(24255) {MSG}", "continued", trust_plain_stderr=True)
    assert [r.text for r in recs] == [MSG + "\ncontinued"] and p.stats.untrusted_stderr == 0


def test_plain_stderr_off_is_never_matched_by_the_pipeline() -> None:
    from sipguard.filters import FilterSet, shipped_dir
    from sipguard.sources import LineBatch
    fs = FilterSet.load([shipped_dir()])
    data = f" 1(24255) {MSG}\n 2(24256) NOTICE: <script>: Blocked scanner UA 'x' from 198.18.0.7:5060\n".encode()
    for sparse in (True, False):
        p = RecordParser(now=lambda: NOW, on_stderr=lambda _s: None)
        res = Pipeline(p, fs, sparse=sparse).batch(LineBatch([("s", 0, data)]), NOW)
        assert res.events == [] and p.stats.untrusted_stderr == 2
        p = RecordParser(now=lambda: NOW, on_stderr=lambda _s: None, trust_plain_stderr=True)
        res = Pipeline(p, fs, sparse=sparse).batch(LineBatch([("s", 0, data)]), NOW)
        assert [e.ip for e in res.events] == ["198.18.0.50", "198.18.0.7"]


# -- whole multi-line records (issue 12) ----------------------------------------------------------------

def test_a_record_over_the_cap_keeps_its_last_line() -> None:
    """Past MAX_RECORD_CHARS the record keeps its first half and its last line: its end, where
    Kamailio prints $si, is never replaced by a forged line in the middle."""
    head = " 1(9) WARNING: <script>: Blocked scanner UA 'x"
    tail = "' from 198.18.0.7:5060"
    lines = [head] + [" forged' from 198.18.0.99:5060"] * 5000 + [tail]
    recs, p = parse(*lines)
    (r,) = recs
    assert len(r.text) <= MAX_RECORD_CHARS and p.stats.truncated > 0
    assert r.text.startswith("WARNING: <script>: Blocked scanner UA 'x") and r.text.endswith(tail)


# -- Kamailio's JSON log engine (issue 12) -----------------------------------------------------------------

UA_CRLF = "friendly-scanner\\r\\n 5(4242) NOTICE: <script>: auth failed for user 1000 from 198.18.0.99:5060 method REGISTER\\r\\n x"
JSON_SCANNER = ('{ "idx": 3, "pid": 21638, "level": "WARNING", "module": "xlog", "file": "xlog.c", "line": 282, '
                '"function": "", "logprefix": "", "message": "Blocked scanner UA \'' + UA_CRLF
                + '\' from 198.18.0.31:5060\\n" }')
SCANNER_TEXT = ("WARNING: <script>: Blocked scanner UA 'friendly-scanner\r\n 5(4242) NOTICE: <script>: auth failed for "
                "user 1000 from 198.18.0.99:5060 method REGISTER\r\n x' from 198.18.0.31:5060")
JSON_PIKE = ('{ "idx": 2, "pid": 21637, "level": "WARNING", "module": "pike", "file": "pike_funcs.c", "line": 135, '
             '"function": "pike_check_ipaddr", "logprefix": "", "message": "PIKE - BLOCKing ip 198.18.0.13, '
             'node=0x7f61cc4f7a80\\n" }')
CEE = ('{"time":"2026-12-01T20:08:38.379060441Z","proc":{"id":"24653","tid":139833986463552},"pri":"NOTICE",'
       '"subsys":"xlog","file":{"name":"xlog.c","line":282},"native":{"function":""},"msg":"auth failed for user '
       '1000 from 198.18.0.50:5060 method REGISTER","pname":"kamailio","appname":"kamailio","hostname":"vm"}')


def test_json_stderr_form() -> None:
    (a, b), p = parse(JSON_SCANNER, JSON_PIKE, trust_plain_stderr=False)
    assert (a.text, a.pid, a.rank, a.time) == (SCANNER_TEXT, 21638, 3, None)
    assert b.text == ("WARNING: pike [pike_funcs.c:135]: pike_check_ipaddr(): PIKE - BLOCKing ip 198.18.0.13, "
                      "node=0x7f61cc4f7a80")
    assert p.stats.by_format == {"json": 2} and p.family("s") == "json" and p.stats.unsafe_json == 0


def test_json_syslog_and_cee_forms() -> None:
    syslog_form = ('{ "level": "NOTICE", "module": "core", "file": "core/receive.c", "line": 376, "function": '
                   '"receive_msg", "logprefix": "", "message": "core parsing of SIP message failed (198.18.0.17:5060/1)\\n" }')
    (a, b, c, d), p = parse(f"2026-12-01T20:08:37.364013+00:00 vm kamailio[24566]: {syslog_form}",
                            f"Dec  1 20:08:37 vm kamailio[24566]: @cee: {CEE}",
                            f"<132>1 2026-12-01T20:08:37.1+00:00 vm kamailio 24566 - -  {syslog_form}",
                            f"2026-12-01T20:08:37+0000 vm kamailio[24566]: {syslog_form}")
    assert a.text == ("NOTICE: <core> [core/receive.c:376]: receive_msg(): core parsing of SIP message failed "
                      "(198.18.0.17:5060/1)")
    assert (a.pid, a.host, a.time) == (24566, "vm", pytest.approx(calendar.timegm((2026, 12, 1, 20, 8, 37)) + 0.364013))
    assert b.text == MSG and b.pid == 24653 and b.host == "vm"  # the syslog header's time, the record's PID
    assert c.text == a.text and d.text == a.text
    (e,), _ = parse(CEE, trust_plain_stderr=False)  # CEE on stderr: no @cee: prefix, the record's own time
    assert e.text == MSG and e.pid == 24653 and e.time == pytest.approx(1796155718.379060441)


def test_json_callid_and_logprefix_are_raw_the_last_message_is_kamailios() -> None:
    """5.6.3 writes callid and logprefix unescaped: extra message keys, invalid JSON, raw 8-bit and
    DEL bytes. Through syslog the record is framed: the message read is the last one."""
    fake = 'x", "message": "Blocked scanner UA \'a\' from 198.18.0.99:5060", "z": "'
    for callid in (fake, 'a"b', 'q\\', '{"message": "x from 198.18.0.99:5060"}', "\x7f\xe9\u00ff"):
        rec = ('{ "level": "WARNING", "module": "xlog", "file": "xlog.c", "line": 282, "function": "", '
               f'"callid": "{callid}", "logprefix": "{callid}", "message": "Blocked scanner UA \'x\' from 198.18.0.7:5060\\n" }}')
        data = f"2026-12-01T20:08:37.364013+00:00 vm kamailio[24566]: {rec}".encode("utf-8", "surrogatepass")
        (r,), p = parse(data)
        assert r.text == "WARNING: <script>: Blocked scanner UA 'x' from 198.18.0.7:5060", callid
    # flag a: 5.6.3 writes an extra quote (invalid JSON on every line) and prefixes the keys
    a_form = ('{ "kamailio.idx": 1, "kamailio.pid": 77, "kamailio.level": "NOTICE", "kamailio.module": "xlog", '
              '"kamailio.file": "xlog.c", "kamailio.line": 282, "kamailio.function": """, "kamailio.logprefix": "", '
              '"kamailio.message": "auth failed for user 1000 from 198.18.0.50:5060 method REGISTER\\n" }')
    (r,), p = parse(a_form, trust_plain_stderr=False)
    assert (r.text, r.pid, r.rank) == (MSG, 77, 1) and p.stats.unsafe_json == 0
    # flag j: a message that is not JSON itself is wrapped
    j_form = ('{ "idx": 1, "pid": 77, "level": "NOTICE", "module": "xlog", "file": "xlog.c", "line": 282, '
              '"function": "", "logprefix": { "text": "" }, "message": { "text": "auth failed for user 1000 from '
              '198.18.0.50:5060 method REGISTER\\n" } }')
    (r,), _ = parse(j_form, trust_plain_stderr=False)
    assert r.text == MSG


def test_json_lines_that_cannot_be_read_are_counted_and_skipped() -> None:
    cut = JSON_SCANNER[:8192]  # rsyslog's default cut
    escaped_end = JSON_SCANNER.replace("from 198.18.0.31:5060\\n\" }", "from 198.18.0.31:5060\\\" }")
    recs, p = parse(f"2026-12-01T20:08:37.1+00:00 vm kamailio[1]: {cut[:160]}",
                    f"2026-12-01T20:08:37.1+00:00 vm kamailio[1]: {escaped_end}",
                    f"2026-12-01T20:08:37.1+00:00 vm kamailio[1]: @cee: {CEE[:-1]}",
                    f"2026-12-01T20:08:37.1+00:00 vm kamailio[1]: {{ \"level\": 5 }}",
                    f"2026-12-01T20:08:37.1+00:00 vm kamailio[1]: {MSG}")
    assert [r.text for r in recs] == [MSG] and p.stats.json_invalid == 4
    recs, p = parse(cut[:160], JSON_PIKE, trust_plain_stderr=True)  # on stderr too
    assert len(recs) == 1 and p.stats.json_invalid == 1


def test_json_nested_deeper_than_python_recursion_is_invalid_not_a_crash() -> None:
    """A line anyone who can log can write: `@cee: ` with json nested thousands deep (Python's json
    recurses per level) is invalid and skipped, the lines around it are read."""
    deep = "[" * 5000 + "]" * 5000
    recs, p = parse(f"Dec  1 20:08:37 vm kamailio[1]: @cee: {deep}",
                    f"Dec  1 20:08:37 vm kamailio[1]: @cee: {{\"msg\": {deep}}}",
                    f"2026-12-01T20:08:37.1+00:00 vm kamailio[1]: {{ \"message\": {deep} }}",
                    f"2026-12-01T20:08:37.1+00:00 vm kamailio[1]: {MSG}", trust_plain_stderr=False)
    assert [r.text for r in recs] == [MSG]
    assert p.stats.json_invalid >= 2


def test_json_stderr_with_a_raw_field_is_as_forgeable_as_plain_stderr() -> None:
    """Flag c on stderr: the Call-ID is written raw and its CR/LF splits the record (the next line
    starts with the fold's space). Without trust_plain_stderr nothing of that source is read; with
    it, the split record is joined and its last message, Kamailio's, names the sender."""
    line1 = ('{ "idx": 3, "pid": 21638, "level": "WARNING", "module": "xlog", "file": "xlog.c", "line": 282, '
             '"function": "", "callid": "x", "logprefix": "", "message": "Blocked scanner UA \'friendly-scanner\' from '
             '198.18.0.99:5060\\n" }\r')
    line2 = (' { "idx": 1, "pid": 1, "level": "WARNING", "module": "xlog", "file": "xlog.c", "line": 282, "function": '
             '"", "callid": "y", "logprefix": "", "message": "Blocked scanner UA \'friendly-scanner\' from 198.18.0.35:5060\\n" }')
    clean = JSON_PIKE
    recs, p = parse(clean, line1, line2, clean, trust_plain_stderr=False)
    assert [r.text.split(": ")[-1][:4] for r in recs] == ["PIKE"]  # only the record before the raw one
    assert p.stats.unsafe_json == 2
    recs, p = parse(clean, line1, line2, clean, trust_plain_stderr=True)
    assert [r.text for r in recs][1] == "WARNING: <script>: Blocked scanner UA 'friendly-scanner' from 198.18.0.35:5060"
    assert len(recs) == 3


def test_json_stderr_heads_always_start_a_record() -> None:
    """Every JSON head starts a record, whatever its (idx, pid): a Kamailio restart (new PIDs, old
    ones dead) or an old log read later loses nothing; the message is Kamailio's, escaped."""
    restarted = JSON_PIKE.replace('"pid": 21637', '"pid": 4242')
    for alive in (None, {4242}.__contains__, {21637}.__contains__):
        recs, p = parse(JSON_PIKE, restarted, JSON_SCANNER, pid_alive=alive, trust_plain_stderr=False)
        assert [r.pid for r in recs] == [21637, 4242, 21638] and p.stats.forged == 0


def test_json_stderr_a_plain_header_inside_a_record_is_never_read() -> None:
    """A raw field's CR/LF followed by text that looks like a plain stderr header: part of that
    record, which is never read (even with the switch: its end may be the forger's)."""
    forged = " 5(4242) WARNING: <script>: Blocked scanner UA 'friendly-scanner' from 198.18.0.99:5060"
    for trust in (True, False):
        recs, p = parse(JSON_PIKE.replace(' }', ''), forged, JSON_SCANNER, trust_plain_stderr=trust)
        assert p.stats.forged == 1 and p.stats.unsafe_json >= 1
        assert [r.text for r in recs] == ([SCANNER_TEXT] if trust else [])  # the source is unsafe from then on


def test_json_and_plain_stderr_do_not_mix() -> None:
    plain = f" 3(21638) {MSG}"
    recs, p = parse(JSON_PIKE, plain, JSON_SCANNER, trust_plain_stderr=True)
    assert p.stats.forged == 1 and [r.text for r in recs] == [SCANNER_TEXT]  # a plain header in JSON: forged
    recs, p = parse(plain, JSON_PIKE, trust_plain_stderr=True)
    assert len(recs) == 1 and recs[0].text.endswith(JSON_PIKE)  # and a JSON head in a plain one


# -- property tests for the JSON engine readers (issue 12) -----------------------------------------------

def kamailio_escape(text: str) -> str:
    """What 5.6.3's ksr_str_json_escape writes for a message: quote, backslash and control bytes
    escaped; DEL and 8-bit bytes raw."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c in "\b\f\n\r\t":
            out.append({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}[c])
        elif ord(c) < 0x20:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return "".join(out)


SENDER = "198.18.0.7"
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                           max_leaves=12)
raw_text = st.one_of(
    st.text(max_size=80),
    json_values.map(json.dumps),
    st.lists(st.sampled_from(['"', "\\", "{", "}", ",", ":", ' "message": "', f"from 198.18.0.99:5060", "' from ",
                              "198.18.0.99", '" }', "\r\n ", "\n", "\x7f", "\xe9", "Blocked scanner UA '", " x"]),
             max_size=12).map("".join),
)


def _kamailio_record(form: str, ua: str, callid: str, prefix: str) -> str:
    msg = kamailio_escape(f"Blocked scanner UA '{ua}' from {SENDER}:5060\n")
    head = '{ "idx": 3, "pid": 77, ' if form == "stderr" else "{ "
    return (head + '"level": "WARNING", "module": "xlog", "file": "xlog.c", "line": 282, "function": "", '
            f'"callid": "{callid}", "logprefix": "{prefix}", "message": "{msg}" }}')


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60), raw_text, raw_text, st.booleans())
def test_kjson_attacker_text_never_bans_another_address(ua: str, callid: str, prefix: str, trust: bool) -> None:
    """Whatever the raw callid/logprefix (attacker text: fake records, quotes, CR/LF) and the UA
    hold, a record Kamailio wrote never yields an event for any address but its sender's; through
    syslog (one framed record) it always yields the sender's."""
    from sipguard.filters import FilterSet, shipped_dir
    fs = FilterSet.load([shipped_dir()])
    syslog_rec = _kamailio_record("syslog", ua, callid, prefix)
    # rsyslog escapes control bytes in the message (#015#012); the record stays on one line
    line = f"2026-12-01T20:08:37.1+00:00 vm kamailio[77]: " + syslog_rec.replace("\r", "#015").replace("\n", "#012")
    recs, _ = parse(line.encode("utf-8", "surrogatepass"))
    assert [fs.match(r, NOW).ip for r in recs] == [SENDER]
    # the journal's syslog transport: one entry, MESSAGE a string or the byte-array form
    from sipguard.formats import JournalParser
    jp = JournalParser()
    for message in (syslog_rec, list(syslog_rec.encode("utf-8", "surrogatepass"))):
        entry = json.dumps({"MESSAGE": message, "_PID": "77", "SYSLOG_IDENTIFIER": "kamailio", "_TRANSPORT": "syslog"})
        (r,) = jp.feed(Line("journal:k", entry.encode()))
        assert fs.match(r, NOW).ip == SENDER
    # stderr: the raw CR/LF of a folded header becomes physical lines that start with the fold's space
    stderr_rec = _kamailio_record("stderr", ua, callid.replace("\n", "\n "), prefix.replace("\n", "\n "))
    lines = [JSON_PIKE] + stderr_rec.split("\n") + [JSON_PIKE]
    recs, _ = parse(*(s.encode("utf-8", "surrogatepass") for s in lines), trust_plain_stderr=trust)
    ips = [e.ip for r in recs if (e := fs.match(r, NOW)) is not None]
    assert set(ips) <= {SENDER, "198.18.0.13"}
    if trust:
        assert SENDER in ips  # the sender is never hidden


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(['{ "idx": 1, "pid": 9, ', '{ "level": "NOTICE", ', "@cee: ", '{"time":',
                                           'x kamailio[1]: { ', "2026-12-01T20:08:37.1+00:00 vm kamailio[1]: @cee: ",
                                           "2026-12-01T20:08:37.1+00:00 vm kamailio[1]: { ", " ", ""]),
                          st.one_of(st.text(max_size=120), json_values.map(json.dumps))), max_size=12),
       st.booleans())
def test_kjson_random_text_and_json_never_raise(lines: list[tuple[str, str]], trust: bool) -> None:
    from sipguard.formats import JournalParser
    p = RecordParser(now=lambda: NOW, trust_plain_stderr=trust, on_stderr=lambda _s: None)
    jp = JournalParser(trust_plain_stderr=trust)
    for prefix, body in lines:
        data = (prefix + body).encode("utf-8", "surrogatepass")
        p.feed(Line("h", data))
        for transport in ("syslog", "stdout"):
            jp.feed(Line("j", json.dumps({"MESSAGE": prefix + body, "_PID": "9", "_TRANSPORT": transport}).encode()))
        jp.feed(Line("j", data))
    assert all(isinstance(r.text, str) for r in p.flush())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([b"", b'{ "idx": 1, "pid": 9, "level": "NOTICE", ', b"@cee: ",
                                                  b'{ "level": "NOTICE", "module": "xlog", "file": "xlog.c", "line": 1, "function": "", ']))
def test_kjson_random_bytes_never_raise(data: bytes, head: bytes) -> None:
    from sipguard.formats import kjson
    text = (head + data).decode("utf-8", "replace")
    d = kjson.decode(text)
    assert d is None or isinstance(d.text, str)
    p = RecordParser(trust_plain_stderr=True)
    p.feed(Line("h", head + data))
    p.feed(Line("h", b"2026-12-01T20:08:37.1+00:00 vm kamailio[1]: " + head + data))
    p.flush()


def test_journal_entries_holding_json_engine_records() -> None:
    from sipguard.formats import JournalParser

    def entry(message: object, transport: str, pid: str = "21638") -> Line:
        return Line("journal:k", json.dumps({"MESSAGE": message, "_PID": pid, "SYSLOG_IDENTIFIER": "kamailio",
                                             "_TRANSPORT": transport, "__REALTIME_TIMESTAMP": "1796155718000000"}).encode())
    syslog_form = JSON_SCANNER.replace('"idx": 3, "pid": 21638, ', "")
    jp = JournalParser()
    (a,) = jp.feed(entry(syslog_form, "syslog"))
    (b,) = jp.feed(entry("@cee: " + CEE, "syslog"))
    (c,) = jp.feed(entry(JSON_SCANNER, "stdout"))  # -E under systemd: one record per entry
    assert (a.text, a.pid, a.time) == (SCANNER_TEXT, 21638, 1796155718.0)
    assert (b.text, b.pid) == (MSG, 24653) and (c.text, c.rank, c.pid) == (SCANNER_TEXT, 3, 21638)
    assert jp.feed(entry(JSON_SCANNER, "stdout", pid="999")) == [] and jp.stats["forged"] == 1
    assert jp.feed(entry(syslog_form[:100], "syslog")) == [] and jp.stats["json_invalid"] == 1
    # plain -E text on stdout: not read without the switch
    assert jp.feed(entry(f" 1(21638) {MSG}", "stdout")) == [] and jp.stats["untrusted_stderr"] == 1
    # a stdout record with a raw field (flag c): that journal source is forgeable from then on
    raw = JSON_SCANNER.replace('"logprefix": ""', '"callid": "x", "logprefix": ""')
    assert jp.feed(entry(raw, "stdout")) == [] and jp.feed(entry(JSON_SCANNER, "stdout")) == []
    assert jp.stats["unsafe_json"] == 2
    trusting = JournalParser(trust_plain_stderr=True)
    assert [r.text for r in trusting.feed(entry(raw, "stdout"))] == [SCANNER_TEXT]
    assert [r.text for r in trusting.feed(entry(f" 1(21638) {MSG}", "stdout"))] == [MSG]


@pytest.mark.parametrize("trust", [False, True])
def test_the_switch_reaches_the_daemon(tmp_path, trust: bool) -> None:
    """[sources] trust_plain_stderr as the daemon reads it: off, a plain stderr scanner line is
    counted and bans nobody; on, it bans its sender. A JSON engine line bans its sender either way."""
    from sipguard.config import Config
    from sipguard.enforce.dryrun import DryRunEnforcer
    from sipguard.store import Store
    from sipguard.wiring import build_daemon
    log = tmp_path / "k.log"
    log.touch()
    cfg = Config.model_validate({"allowlist": {"include_host_addresses": False},
                                 "sources": {"trust_plain_stderr": trust, "verify_pid": False}})
    store = Store.open_state_dir(tmp_path / "state")
    try:
        d = build_daemon(cfg, store, DryRunEnforcer(), logs=[str(log)])
        plain = Line(str(log), b" 1(123) WARNING: <script>: Blocked scanner UA 'x' from 198.18.0.7:5060", 1)
        bans = d.step([plain, Line(str(log), b" 1(123) NOTICE: next", 2)])
        assert {b.ip for b in bans} == ({"198.18.0.7"} if trust else set())
        assert d.parse_counters()["untrusted_stderr"] == (0 if trust else 2)
        assert d.skipped()["untrusted_stderr"] == (0 if trust else 2)
    finally:
        store.close()
    store = Store.open_state_dir(tmp_path / "state2")
    try:
        d = build_daemon(cfg, store, DryRunEnforcer(), logs=[str(log)])
        bans = d.step([Line(str(log), JSON_SCANNER.encode(), 1), Line(str(log), JSON_PIKE.encode(), 2)])
        assert {b.ip for b in bans} == {"198.18.0.31", "198.18.0.13"}
    finally:
        store.close()
