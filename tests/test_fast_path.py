"""The shortcuts of the fast path give exactly what the plain path gives.

- `trigger_lines` (Hyperscan) == the bytes.find fallback == a line-by-line reference;
- `FilterSet.match(..., candidates(mask))` == `FilterSet.match(...)` for every corpus and capture line;
- `RecordParser.parse_alone` == `feed` + `flush`, records and counters alike.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from sipguard import filters as filters_mod
from sipguard.filters import FilterSet, shipped_dir, trigger_lines
from sipguard.formats import RecordParser
from sipguard.model import Line

HERE = Path(__file__).parent
NOW = time.mktime((2026, 12, 1, 12, 0, 0, 0, 0, -1))
SHIPPED = FilterSet.load([shipped_dir()])
LITS = SHIPPED.search_literals


def reference(buf: bytes, literals: tuple[bytes, ...]) -> tuple[list[int], list[int]]:
    starts, masks, pos = [], [], 0
    for line in buf.split(b"\n"):
        mask = sum(1 << i for i, lit in enumerate(literals) if lit in line)
        if mask:
            starts.append(pos)
            masks.append(mask)
        pos += len(line) + 1
    return starts, masks


def corpus_lines() -> list[bytes]:
    """Every syslog-shaped line we have: corpus entries (as traditional syslog) and the captures."""
    out = []
    for p in sorted((HERE / "corpus").glob("*.txt")):
        for raw in p.read_text("utf-8").splitlines():
            if " | " in raw and raw[:1] in "+=~-":
                text = raw.split(" | ", 1)[1]
                out.append(text.encode() if text[:1].isupper() and text[3:4] == " "
                           else b"Nov 30 02:00:00 edge kamailio[811]: " + text.encode())
    for p in sorted((HERE / "data" / "real").glob("*.log")):
        if p.name != "stderr.log":
            out.extend(b for b in p.read_bytes().split(b"\n") if b)
    return out


def test_hyperscan_is_used_where_it_is_installed():
    """CI runs on x86_64, where the dependency installs: the fast search must not silently fall back."""
    if platform.machine() in ("x86_64", "aarch64"):
        assert filters_mod._hyperscan_db(LITS) is not None, filters_mod._HS_BROKEN


PIECES = [b"\n", b"x", b" ", b"\r", b"auth failed for user", b"auth failed", b"pike block", b"unknown user",
          b"Malformed SIP request from", b"\xff", b"PIKE - BLOCKing ip", b"REGISTER success for user"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=60), st.integers(0, 5), st.integers(0, 5))
def test_trigger_lines_three_ways(parts, cut_head, cut_tail):
    buf = b"".join(parts)
    want = reference(buf, LITS)
    assert trigger_lines(buf, LITS) == want
    assert filters_mod._trigger_lines_find(buf, LITS, 0, len(buf)) == want
    # a byte range of a bigger buffer: offsets stay absolute, nothing outside is seen
    padded = b"pike block\n" * cut_head + buf + b"\nauth failed for user" * cut_tail
    lo = len(b"pike block\n") * cut_head
    got = trigger_lines(padded, LITS, lo, lo + len(buf))
    assert got == ([s + lo for s in want[0]], want[1])


def test_candidates_give_the_same_event_for_every_known_line():
    lines = corpus_lines()
    assert len(lines) > 300
    parser = RecordParser(now=lambda: NOW)
    checked = 0
    for data in lines:
        starts, masks = trigger_lines(data, LITS)
        for rec in parser.feed(Line("t", data)) + parser.flush():
            full = SHIPPED.match(rec, NOW)
            if not masks:
                assert full is None, data
                continue
            assert SHIPPED.match(rec, NOW, SHIPPED.candidates(masks[0])) == full, data
            checked += full is not None
    assert checked > 100


def test_candidates_of_each_literal_are_the_filters_holding_it():
    by_name = {f.name: f for f in SHIPPED.filters}
    for i, lit in enumerate(LITS):
        names = {f.name for f in SHIPPED.candidates(1 << i)}
        assert names == {n for n, f in by_name.items() if any(lit in p.encode() for p in f.prefilter)}
    assert SHIPPED.candidates(0) == ()


def test_parse_alone_equals_feed_and_flush():
    lines = corpus_lines() + [
        b"Nov 30 02:00:00 edge sshd[9]: auth failed for user root from 198.18.0.9:22",  # other program
        b"garbage without header auth failed for user",
        b"Nov 30 02:00:00 edge kamailio[811]: NOTICE: <script>: auth failed for user \xff from 198.18.0.8:5060 method REGISTER",
        b"Zzz 99 99:99:99 edge kamailio: NOTICE: <script>: unknown user 1 from 198.18.0.7:5060 method OPTIONS",
        b"2026-11-30T02:00:00.1+00:00 edge kamailio[811]: NOTICE: <script>: unknown user 1 from 198.18.0.7:5060 method OPTIONS",
        b" 1(811) NOTICE: <script>: unknown user 1 from 198.18.0.7:5060 method OPTIONS",
    ]
    a = RecordParser(now=lambda: NOW)
    b = RecordParser(now=lambda: NOW)
    for data in lines:
        want = a.feed(Line("s", data)) + a.flush()
        assert b.parse_alone(data, "s") == want, data
    assert a.stats.as_dict() == b.stats.as_dict()


def test_trigger_lines_from_many_threads_at_once():
    """Several daemons (cluster nodes, tests) in one process search at the same time: each thread
    needs its own Hyperscan scratch space."""
    import threading

    buf = (b"Nov 30 02:00:00 edge kamailio[1]: NOTICE: <script>: auth failed for user 1 from 198.18.0.1:5060\n"
           b"noise line without any trigger\n" * 3) * 20000
    want = reference(buf, LITS)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(8):
                assert trigger_lines(buf, LITS) == want
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
