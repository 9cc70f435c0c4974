"""RecordParser: every on-disk format, continuation lines, stderr forgery defences, robustness."""

from __future__ import annotations

import calendar
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
