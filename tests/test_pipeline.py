"""The one pipeline: its shortcuts give exactly what parsing every line gives.

- `trigger_lines` (Hyperscan) == the bytes.find fallback == a line-by-line reference, for literals
  that may begin with a newline (`CONTINUATION`) too;
- `FilterSet.match(..., candidates(mask))` == `FilterSet.match(...)` for every corpus and capture line;
- `RecordParser.parse_alone` == `feed` + `flush`, records and counters alike;
- sparse batches give the events of parsing every line, in the same order: the daemon's two files;
  mixed formats and sources (syslog, journalctl text with continuation lines, stderr, journal JSON)
  in several segments per source, flushed per batch (daemon) or at the end only (scan); journal
  JSON whose MESSAGE hides a literal behind escapes or a byte array;
- a follower mix (a file beside the journal) keeps the sparse path.
"""

from __future__ import annotations

import json
import platform
import threading
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from sipguard.addresses import AllowList
from sipguard.config import Config
from sipguard.daemon import Daemon
from sipguard.wiring import build_daemon
from sipguard.enforce.dryrun import DryRunEnforcer
from sipguard.filters import FilterSet, search as search_mod, shipped_dir, trigger_lines
from sipguard.formats import JournalParser, RecordParser
from sipguard.model import Event, Line
from sipguard.pipeline import CONTINUATION, Pipeline
from sipguard.sources import LineBatch, MultiFollower
from sipguard.store import Store
from waiting import wait_for

HERE = Path(__file__).parent
NOW = time.mktime((2026, 12, 1, 12, 0, 0, 0, 0, -1))
SHIPPED = FilterSet.load([shipped_dir()])
LITS = SHIPPED.search_literals


# -- literal search -------------------------------------------------------------------------------

def reference(buf: bytes, literals: tuple[bytes, ...]) -> tuple[list[int], list[int]]:
    starts, masks, pos = [], [], 0
    for line in buf.split(b"\n"):
        mask = sum(1 << i for i, lit in enumerate(literals) if lit in line)
        if mask:
            starts.append(pos)
            masks.append(mask)
        pos += len(line) + 1
    return starts, masks


def reference_last_byte(buf: bytes, literals: tuple[bytes, ...], lo: int = 0, hi: int | None = None
                        ) -> tuple[list[int], list[int]]:
    """Every occurrence inside buf[lo:hi] marks the line holding its last byte (offsets absolute)."""
    hi = len(buf) if hi is None else hi
    found: dict[int, int] = {}
    for bit, lit in enumerate(literals):
        for i in range(lo, hi - len(lit) + 1):
            if buf[i:i + len(lit)] == lit:
                ls = max(lo, buf.rfind(b"\n", 0, i + len(lit) - 1) + 1)
                found[ls] = found.get(ls, 0) | 1 << bit
    starts = sorted(found)
    return starts, [found[s] for s in starts]


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
        assert search_mod._hyperscan_db(LITS) is not None, search_mod._HS_BROKEN
        assert search_mod._hyperscan_db((*LITS, CONTINUATION)) is not None, search_mod._HS_BROKEN


PIECES = [b"\n", b"x", b" ", b"\r", b"auth failed for user", b"auth failed", b"pike block", b"unknown user",
          b"Malformed SIP request from", b"\xff", b"PIKE - BLOCKing ip", b"REGISTER success for user"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=60), st.integers(0, 5), st.integers(0, 5))
def test_trigger_lines_three_ways(parts, cut_head, cut_tail):
    buf = b"".join(parts)
    want = reference(buf, LITS)
    assert reference_last_byte(buf, LITS) == want
    assert trigger_lines(buf, LITS) == want
    assert search_mod._trigger_lines_find(buf, LITS, 0, len(buf)) == want
    # a byte range of a bigger buffer: offsets stay absolute, nothing outside is seen
    padded = b"pike block\n" * cut_head + buf + b"\nauth failed for user" * cut_tail
    lo = len(b"pike block\n") * cut_head
    got = trigger_lines(padded, LITS, lo, lo + len(buf))
    assert got == ([s + lo for s in want[0]], want[1])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES + [b"\n ", b"  ", b"\n\n"]), max_size=60), st.integers(0, 3),
       st.integers(0, 3))
def test_trigger_lines_with_a_literal_that_begins_with_a_newline(parts, cut_head, cut_tail):
    """`CONTINUATION` marks the lines that start with a space (not a first line: no newline before it)."""
    lits = (*LITS, CONTINUATION)
    buf = b"".join(parts)
    want = reference_last_byte(buf, lits)
    assert trigger_lines(buf, lits) == want
    assert search_mod._trigger_lines_find(buf, lits, 0, len(buf)) == want
    spaced = [i for i, ln in enumerate(buf.split(b"\n")) if ln[:1] == b" " and i > 0]
    line_starts = [0] + [i + 1 for i, c in enumerate(buf) if c == 10]
    assert [s for s, m in zip(*want) if m >> len(LITS) & 1] == [line_starts[i] for i in spaced]
    padded = b"\n \n" * cut_head + buf + b"\n pike block" * cut_tail
    lo = 3 * cut_head
    assert trigger_lines(padded, lits, lo, lo + len(buf)) == reference_last_byte(padded, lits, lo, lo + len(buf))
    assert search_mod._trigger_lines_find(padded, lits, lo, lo + len(buf)) == \
        reference_last_byte(padded, lits, lo, lo + len(buf))


def test_candidates_give_the_same_event_for_every_known_line():
    lines = corpus_lines()
    assert len(lines) > 300
    parser = RecordParser(now=lambda: NOW, trust_plain_stderr=True)
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
    a = RecordParser(now=lambda: NOW, trust_plain_stderr=True)
    b = RecordParser(now=lambda: NOW, trust_plain_stderr=True)
    for data in lines:
        want = a.feed(Line("s", data)) + a.flush()
        assert b.parse_alone(data, "s") == want, data
    assert a.stats.as_dict() == b.stats.as_dict()


def test_trigger_lines_from_many_threads_at_once():
    """Several daemons (cluster nodes, tests) in one process search at the same time: each thread
    needs its own Hyperscan scratch space."""
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


# -- the daemon's batches ---------------------------------------------------------------------------

SRC = "/var/log/kamailio.log"
OTHER = "/var/log/other.log"

DAEMON_PIECES = [
    "Nov 30 01:55:12 sip1 kamailio[23875]: NOTICE: <script>: auth failed for user 1000 from 198.18.0.50:5060 method REGISTER",
    "Nov 30 01:55:12 sip1 kamailio[23875]: WARNING: <script>: Blocked scanner UA 'friendly-scanner' from 198.18.0.51:5060",
    "Nov 30 01:55:13 sip1 kamailio[23875]: WARNING: pike [pike_funcs.c:135]: pike_check_ipaddr(): PIKE - BLOCKing ip 198.18.0.52, node=0x7f1",
    "Nov 30 01:55:13 sip1 kamailio[23875]: INFO: <script>: INVITE sip:1000@example.net relayed",
    "Nov 30 01:55:14 sip1 sshd[99]: auth failed for user 1000 from 198.18.0.53:5060 method REGISTER",
    "Nov 30 01:55:14 sip1 kamailio[23875]: NOTICE: <script>: REGISTER success for user 1000 from 198.18.0.50:5060",
    "2026-11-30T02:08:09+0000 sip1 kamailio[23875]: NOTICE: <script>: unknown user 77 from 198.18.0.54:5060 method REGISTER",
    "2026-11-30T02:08:09+0000 sip1 kamailio[23875]: ERROR: <script>: Malformed SIP request from 198.18.0.55:5060",
    "                                   continued text",
    "    auth failed for user 1 from 198.18.0.56:5060 method REGISTER",
    "-- Boot 0123456789abcdef --",
    "garbage without header auth failed for user 2 from 198.18.0.57:5060 method REGISTER",
    " 1(23875) NOTICE: <script>: auth failed for user 1000 from 198.18.0.58:5060 method REGISTER",
    "",
]


def make_daemon() -> Daemon:
    cfg = Config.model_validate({"allowlist": {"include_host_addresses": False}})
    return build_daemon(cfg, Store(":memory:"), DryRunEnforcer(), logs=[SRC, OTHER])


def events_of(d: Daemon, batches) -> list[Event]:
    """Parse like Daemon.step does (the same pipeline call), without the policy/store around it."""
    out: list[Event] = []
    for batch in batches:
        out.extend(d.parts.pipeline.batch(batch, 0.0).events)
    return out


def to_segments(source: str, text: bytes, cuts: list[int]) -> list[tuple[str, int, bytes]]:
    """Split `text` into whole-line segments at the line boundaries nearest to `cuts`."""
    segs = []
    start = 0
    for c in sorted(set(cuts)):
        nl = text.find(b"\n", max(c, start))
        if nl < 0 or nl + 1 >= len(text):
            break
        if nl + 1 > start:
            segs.append((source, start, text[start:nl + 1]))
            start = nl + 1
    if start < len(text):
        segs.append((source, start, text[start:]))
    return segs


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(DAEMON_PIECES), min_size=1, max_size=40),
    st.lists(st.sampled_from(DAEMON_PIECES), max_size=10),
    st.lists(st.integers(0, 4000), max_size=4),
    st.integers(1, 3),
)
def test_sparse_batches_give_the_events_of_parsing_every_line(lines, other, cuts, nbatches):
    text = ("\n".join(lines) + "\n").encode()
    other_text = ("\n".join(other) + "\n").encode() if other else b""
    segs = to_segments(SRC, text, cuts) + (to_segments(OTHER, other_text, []) if other_text else [])
    # the same segments in 1-3 polls, as plain Line lists (every line parsed) and as LineBatches
    per = max(1, len(segs) // nbatches)
    groups = [segs[i:i + per] for i in range(0, len(segs), per)]
    full = events_of(make_daemon(), [list(LineBatch(g)) for g in groups])
    fast_daemon = make_daemon()
    assert fast_daemon.parts.filters.search_literals is not None
    fast = events_of(fast_daemon, [LineBatch(g) for g in groups])
    assert fast == full


def test_allowlist_untouched_by_fast_path():
    # sanity: the helper above builds daemons that do not allow-list the lab addresses
    assert "198.18.0.50" not in AllowList([], include_host=False)


# -- any mix of formats and sources -------------------------------------------------------------------

def _attack(ip: str) -> list[str]:
    return [f"NOTICE: <script>: auth failed for user 1000 from {ip}:5060 method REGISTER",
            f"WARNING: <script>: Blocked scanner UA 'friendly-scanner' from {ip}:5060",
            f"ERROR: <script>: Malformed SIP request from {ip}:5060",
            f"NOTICE: <script>: unknown user 77 from {ip}:5060 method OPTIONS",
            f"NOTICE: <script>: REGISTER success for user 1000 from {ip}:5060"]


TEXT_PIECES: list[bytes] = []
for _i, _msg in enumerate(_attack("198.18.1.1") + ["INFO: <script>: INVITE relayed", "NOTICE: nothing to see"]):
    TEXT_PIECES += [
        f"Nov 30 01:55:1{_i} sip1 kamailio[23875]: {_msg}".encode(),
        f"2026-11-30T02:08:0{_i}.5+00:00 sip1 kamailio[23875]: {_msg}".encode(),
        f"2026-11-30T02:08:0{_i}+0000 sip1 kamailio[23875]: {_msg}".encode(),
        f"<133>1 2026-11-30T02:08:0{_i}Z sip1 kamailio 23875 - - {_msg}".encode(),
        f" 1(23875) {_msg}".encode(),
        f"12(23876) {_msg}".encode(),
    ]
TEXT_PIECES += [
    b"Nov 30 01:55:14 sip1 sshd[99]: auth failed for user 1000 from 198.18.1.2:5060 method REGISTER",
    b"2026-11-30T02:08:09+0000 sip1 sshd[99]: unknown user 1 from 198.18.1.3:5060 method OPTIONS",
    b"                                           continued text",
    b"    auth failed for user 1 from 198.18.1.4:5060 method REGISTER",
    b" Malformed SIP request from 198.18.1.5:5060",
    b"Via: SIP/2.0/UDP 198.18.1.6 auth failed for user 1",
    b"-- Boot 0123456789abcdef --",
    b"garbage without header auth failed for user 2 from 198.18.1.7:5060 method REGISTER",
    b"Zzz 99 99:99:99 junk unknown user 1 from 198.18.1.8:5060 method OPTIONS",
    b"Nov 30 01:55:12 sip1 kamailio[1]: NOTICE: <script>: auth failed for user \xff from 198.18.1.9:5060 method REGISTER",
    b"\xff\xfe auth failed for user",
    b"Nov 30 01:55:12 sip1 kamailio[23875]: NOTICE: <script>: auth failed for user 9 from 198.18.1.10:5060 method REGISTER\r",
    b"",
    b"\r",
]


def _journal(msg: object, raw: bool = False, **fields: object) -> bytes:
    entry = {"__CURSOR": "s=1;i=2", "__REALTIME_TIMESTAMP": "1796008463136064", "SYSLOG_IDENTIFIER": "kamailio",
             "_PID": "77", "_HOSTNAME": "edge", "MESSAGE": msg, **fields}
    return json.dumps(entry, ensure_ascii=not raw).encode()


_AUTH = "NOTICE: <script>: auth failed for user 1000 from 198.18.2.1:5060 method REGISTER"
JSON_PIECES: list[bytes] = [
    _journal(_AUTH),
    _journal("NOTICE: <script>: unknown user é from 198.18.2.2:5060 method OPTIONS", raw=True),
    _journal("NOTICE: <script>: unknown user é from 198.18.2.3:5060 method OPTIONS"),  # \u00e9: an escape
    _journal(list(_AUTH.replace("2.1", "2.4").encode())),  # byte array: the literal is not in the line
    _journal(list(b"NOTICE: <script>: auth failed for user a\rb from 198.18.2.5:5060 method REGISTER")),
    _journal("INFO: <script>: INVITE relayed"),
    _journal(_AUTH.replace("2.1", "2.6"), SYSLOG_IDENTIFIER="sshd"),
    _journal(" 1(77) " + _AUTH.replace("2.1", "2.7"), _TRANSPORT="stdout"),
    _journal(" 1(99) " + _AUTH.replace("2.1", "2.8"), _TRANSPORT="stdout"),
    b'{"MESSAGE": "NOTICE: <script>: auth \\u0066ailed for user 1 from 198.18.2.9:5060 method REGISTER"}',
    b'{"MESSAGE": "NOTICE: <script>: auth\\u0020failed for user 1 from 198.18.2.10:5060 method REGISTER"}',
    b'{"MESSAGE": "NOTICE: <script>: \\"x\\" Malformed SIP request from 198.18.2.11:5060"}',
    b'{"MESSAGE"\t:\r[' + ",".join(str(c) for c in _AUTH.replace("2.1", "2.12").encode()).encode() + b"]}",
    b'{"MESSAGE": "noise", "MESSAGE": "' + _AUTH.replace("2.1", "2.13").encode() + b'"}',
    b'{"MESSAGE": "' + _AUTH.replace("2.1", "2.14").encode() + b'", "MESSAGE": "noise"}',
    b'{"MESS\\u0041GE": [' + ",".join(str(c) for c in _AUTH.replace("2.1", "2.15").encode()).encode() + b"]}",
    ("\ufeff" + json.dumps({"MESSAGE": _AUTH.replace("2.1", "2.16")})).encode("utf-16-le"),
    json.dumps({"MESSAGE": _AUTH.replace("2.1", "2.17")}).encode("utf-16-be"),
    json.dumps({"MESSAGE": _AUTH.replace("2.1", "2.18")}).encode("utf-32-le"),
    ("\ufeff" + json.dumps({"MESSAGE": _AUTH.replace("2.1", "2.19")})).encode("utf-8"),
    b'{"MESSAGE": 5}',
    b"[1, 2]",
    b"{not json auth failed for user",
    _journal(_AUTH.replace("2.1", "2.20")) + b"\r",
]
assert not any(b"\n" in p for p in JSON_PIECES)

def _kjson(msg: str, ip_first: bool = False, **head: object) -> str:
    """`msg` as a record of Kamailio's JSON engine: stderr form, or syslog form with `idx=None`."""
    level, _, rest = msg.partition(": <script>: ")
    idx = head.get("idx", 1)
    ids = "" if idx is None else f'"idx": {idx}, "pid": {head.get("pid", 23875)}, '
    middle = head.get("middle", ', "logprefix": ""')
    return ("{ " + ids + f'"level": "{level}", "module": "xlog", "file": "xlog.c", "line": 282, "function": ""'
            + middle + ', "message": ' + json.dumps(rest + "\n") + " }")


# Kamailio's JSON engine (issue 12): stderr form, syslog form after each syslog header, CEE, raw
# callid fields holding fake records, CR/LF in a UA, cut lines
JSON_ENGINE_PIECES: list[bytes] = []
for _i, _msg in enumerate(_attack("198.18.4.1")):
    JSON_ENGINE_PIECES += [
        _kjson(_msg).encode(),
        f"2026-11-30T02:08:0{_i}.5+00:00 sip1 kamailio[23875]: {_kjson(_msg, idx=None)}".encode(),
        f"Nov 30 01:55:1{_i} sip1 kamailio[23875]: @cee: ".encode()
        + json.dumps({"time": "2026-11-30T02:08:09.1Z", "proc": {"id": "23875"}, "pri": _msg.split(":")[0],
                      "subsys": "xlog", "file": {"name": "xlog.c", "line": 282}, "native": {"function": ""},
                      "msg": _msg.partition(": <script>: ")[2], "hostname": "sip1"}).encode(),
    ]
JSON_ENGINE_PIECES += [
    _kjson("WARNING: <script>: Blocked scanner UA 'friendly-scanner\r\n 5(4242) NOTICE: x from 198.18.0.99:5060' "
           "from 198.18.4.2:5060").encode(),
    _kjson("NOTICE: <script>: auth failed for user 1 from 198.18.4.3:5060 method REGISTER",
           middle=', "callid": "x", "logprefix": "", "message": "auth failed for user 1 from 198.18.0.99:5060 '
                  'method REGISTER\\n" }').encode(),
    b'{ "idx": 1, "pid": 23875, "level": "WARNING", "module": "xlog", "file": "xlog.c", "line": 282, '
    b'"function": "", "callid": "x", "logprefix": "", "message": "Blocked scanner UA \'a\' from 198.18.0.99:5060\\n" }',
    b' x", "logprefix": "", "message": "Blocked scanner UA \'b\' from 198.18.4.4:5060\\n" }',
    b'{ "idx": 1, "pid": 23875, "level": "NOTICE", "module": "xlog", "file": "xlog.c", "line": 282, "function": "", '
    b'"logprefix": "", "message": "auth failed for user 1 from 198.18.4.5:50',
    b'{ "idx": 2, "pid": 23876, "level": "WARNING", "module": "pike", "file": "pike_funcs.c", "line": 135, '
    b'"function": "pike_check_ipaddr", "logprefix": "", "message": "PIKE - BLOCKing ip 198.18.4.6, node=0x7f00\\n" }',
    b'Nov 30 01:55:12 sip1 kamailio[23875]: { "level": "NOTICE", broken',
    b" 1(23875) NOTICE: <script>: auth failed for user 1 from 198.18.4.7:5060 method REGISTER",
    b"{not json auth failed for user",
]


SOURCES = {  # source -> (its parser, the lines it may hold)
    "/log/a": (lambda: RecordParser(now=lambda: NOW, trust_plain_stderr=True), TEXT_PIECES),
    "/log/b": (lambda: RecordParser(now=lambda: NOW, trust_plain_stderr=True), TEXT_PIECES),
    "/log/syslog-only": (lambda: RecordParser("syslog", now=lambda: NOW, trust_plain_stderr=True), TEXT_PIECES),
    "/log/stderr": (lambda: RecordParser("stderr", now=lambda: NOW, trust_plain_stderr=True), TEXT_PIECES),
    "journal:id=kamailio": (lambda: JournalParser(programs=None), JSON_PIECES),
    "journal:id=k2": (lambda: JournalParser(programs=frozenset({"kamailio"})), JSON_PIECES),
    # the default since issue 12: plain stderr text is not read (trust_plain_stderr off)
    "/log/untrusted": (lambda: RecordParser(now=lambda: NOW), TEXT_PIECES),
    "/log/kjson": (lambda: RecordParser(now=lambda: NOW), JSON_ENGINE_PIECES),
    "/log/kjson-trusted": (lambda: RecordParser(now=lambda: NOW, trust_plain_stderr=True), JSON_ENGINE_PIECES),
    "/log/kjson-mixed": (lambda: RecordParser(now=lambda: NOW), JSON_ENGINE_PIECES + TEXT_PIECES),
}


def every_line_reference(parsers: dict, batches: list[LineBatch], flush_each: bool) -> list[Event]:
    """The plain loop, written out here: every line fed in order, every record against every filter,
    parsers flushed (first-fed first) after each batch or only at the end."""
    events: list[Event] = []
    fed: dict[str, object] = {}

    def flush() -> None:
        for p in fed.values():
            for rec in p.flush():
                if (ev := SHIPPED.match(rec, NOW)) is not None:
                    events.append(ev)
        fed.clear()

    for batch in batches:
        for line in batch:
            p = parsers[line.source]
            fed.setdefault(line.source, p)
            for rec in p.feed(line):
                if (ev := SHIPPED.match(rec, NOW)) is not None:
                    events.append(ev)
        if flush_each:
            flush()
    flush()
    return events


@st.composite
def mixes(draw):
    """Several sources, each a random text cut into random segments, interleaved in random order
    (each source's own order kept), in 1-4 batches."""
    names = draw(st.lists(st.sampled_from(sorted(SOURCES)), min_size=1, max_size=4, unique=True))
    queues = []
    for name in names:
        pieces = SOURCES[name][1]
        lines = draw(st.lists(st.sampled_from(pieces), min_size=1, max_size=30))
        text = b"\n".join(lines) + draw(st.sampled_from([b"\n", b""]))
        cuts = draw(st.lists(st.integers(0, len(text)), max_size=5))
        queues.append(to_segments(name, text, cuts))
    order = []
    while any(queues):
        i = draw(st.integers(0, len(queues) - 1))
        if queues[i]:
            order.append(queues[i].pop(0))
        else:
            queues.pop(i)
    nb = draw(st.integers(1, 4))
    bounds = sorted(draw(st.lists(st.integers(0, len(order)), min_size=nb - 1, max_size=nb - 1)))
    groups, last = [], 0
    for b in [*bounds, len(order)]:
        groups.append(order[last:b])
        last = b
    return names, groups


@settings(max_examples=400, deadline=None)
@given(mixes(), st.booleans())
def test_any_mix_of_formats_and_sources_reads_sparse_as_every_line(mix, flush_each):
    names, groups = mix
    batches = [LineBatch(g) for g in groups]
    want = every_line_reference({n: SOURCES[n][0]() for n in names}, batches, flush_each)
    sparse = Pipeline({n: SOURCES[n][0]() for n in names}, SHIPPED)
    full = Pipeline({n: SOURCES[n][0]() for n in names}, SHIPPED, sparse=False)
    assert sparse.sparse and not full.sparse
    got, got_full = [], []
    for batch in batches:
        got += sparse.batch(batch, NOW, flush=flush_each).events
        got_full += full.batch(batch, NOW, flush=flush_each).events
    got += sparse.flush(NOW).events
    got_full += full.flush(NOW).events
    assert got == want
    assert got_full == want
    assert sparse.n_lines == full.n_lines == sum(len(b) for b in batches)
    assert full.n_parsed == full.n_lines


_FRAGMENTS = ["NOTICE: <script>: ", "auth failed for user", " 1000", " from 198.18.3.1:5060", " method REGISTER",
              "unknown user", "Malformed SIP request from", "\r", "\x01", '"', "\\", "/", "é", " ", "\ufffd"]


def _encode_message(draw, text: str) -> bytes:
    """`text` as journalctl could print it: a JSON string (escapes anywhere, or none), or an array."""
    how = draw(st.sampled_from(["plain", "ascii", "escapes", "array"]))
    if how == "array":
        value = ",".join(str(c) for c in text.encode())
        return draw(st.sampled_from(['"MESSAGE":[', '"MESSAGE" : [', '"MESSAGE"\t:\n[', '"MESSAGE":  ['])).encode() \
            + value.encode() + b"]"
    if how == "escapes":
        flags = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
        body = "".join(f"\\u{ord(c):04x}" if esc and ord(c) < 0x10000 else json.dumps(c)[1:-1]
                       for c, esc in zip(text, flags))
        return b'"MESSAGE": "' + body.encode() + b'"'
    return b'"MESSAGE": ' + json.dumps(text, ensure_ascii=how == "ascii").encode()


@st.composite
def journal_lines(draw):
    out = []
    for _ in range(draw(st.integers(1, 12))):
        text = "".join(draw(st.lists(st.sampled_from(_FRAGMENTS), max_size=8)))
        out.append(b'{"__CURSOR": "s=1", "SYSLOG_IDENTIFIER": "kamailio", ' + _encode_message(draw, text) + b"}")
    return out


@settings(max_examples=400, deadline=None)
@given(journal_lines())
def test_journal_json_sparse_rule(lines):
    """A journal line is parsed when it shows a literal, a backslash, `"MESSAGE" : [` or a NUL/BOM
    byte: then no MESSAGE can hide a literal from the byte search."""
    batch = LineBatch([("journal:x", 0, b"\n".join(lines) + b"\n")])
    want = every_line_reference({"journal:x": JournalParser()}, [batch], True)
    sparse = Pipeline({"journal:x": JournalParser()}, SHIPPED)
    assert sparse.batch(batch, NOW).events == want


def test_sparse_reading_skips_lines_and_candidates_narrow_the_filters():
    """Not a no-op: plain syslog and journal lines without literal are never parsed."""
    noise = [b"Nov 30 01:55:12 sip1 kamailio[1]: INFO: <script>: INVITE relayed %d" % i for i in range(500)]
    attack = [b"Nov 30 01:55:12 sip1 kamailio[1]: " + _attack("198.18.4.%d" % i)[i % 4].encode() for i in range(10)]
    text = b"\n".join(noise[:250] + attack + noise[250:]) + b"\n"
    jtext = b"\n".join(_journal(f"INFO: noise {i}") for i in range(300)) + b"\n" + _journal(_AUTH) + b"\n"
    parsers = {"f": RecordParser(now=lambda: NOW, trust_plain_stderr=True), "j": JournalParser()}
    pipe = Pipeline(parsers, SHIPPED)
    res = pipe.batch(LineBatch([("f", 0, text), ("j", 0, jtext)]), NOW)
    assert [e.ip for e in res.events] == [f"198.18.4.{i}" for i in range(10)] + ["198.18.2.1"]
    assert res.lines == 811
    assert res.parsed <= 10 + 1 + 1 + 1  # the literal lines, the line that ends the last record, the journal's
    assert parsers["f"].stats.lines + parsers["j"].stats["lines"] == res.parsed
    assert SHIPPED.stats["records"] >= 11


# -- a file beside the journal, through the daemon ------------------------------------------------

def test_file_beside_journal_keeps_the_sparse_path(tmp_path):
    """The daemon follows a file and the journal (a stand-in journalctl): one LineBatch per poll for
    both, so the parsers see only the lines that can matter, and the journal cursor is saved."""
    noise = "Nov 30 01:55:12 sip1 kamailio[4242]: INFO: <script>: INVITE sip:1000@example.net relayed\n"
    lines = [noise] * 1000
    for i in range(0, 1000, 100):
        lines[i] = (f"Nov 30 01:55:12 sip1 kamailio[4242]: WARNING: <script>: Blocked scanner UA 'friendly-scanner' "
                    f"from 198.18.6.{i // 100}:5060\n")
    log = tmp_path / "kamailio.log"
    log.write_text("".join(lines))
    entries = tmp_path / "entries.json"
    jl = []
    for i in range(600):
        msg = (f"NOTICE: <script>: unknown user {i} from 198.18.7.1:5060 method OPTIONS" if i % 60 == 0
               else f"INFO: <script>: INVITE relayed {i}")
        jl.append(json.dumps({"__CURSOR": f"s=abc;i={i}", "__REALTIME_TIMESTAMP": "1796008463136064",
                              "SYSLOG_IDENTIFIER": "kamailio", "_PID": "77", "MESSAGE": msg,
                              "_EXE": "/usr/sbin/kamailio"}))  # what journald sets: Kamailio's entry
    entries.write_text("\n".join(jl) + "\n")
    journalctl = tmp_path / "journalctl"
    journalctl.write_text(f'#!/bin/sh\ncase " $* " in *" --follow "*) cat {entries}; exec sleep 600;; esac\n')
    journalctl.chmod(0o755)
    cfg = Config.model_validate({"allowlist": {"include_host_addresses": False},
                                 "sources": {"journal_identifiers": ["kamailio"], "journal_users": [],
                                             "journalctl": str(journalctl)}})
    store = Store(":memory:")
    d = build_daemon(cfg, store, DryRunEnforcer(), logs=[str(log)], from_start=True)
    d.setup()
    try:
        assert isinstance(d.parts.follower, MultiFollower)
        batches = []

        def read_all() -> bool:
            batch = d.parts.follower.poll_batch(0.1)
            batches.append(type(batch))
            d.step(batch)
            return d.stats.lines >= 1600

        wait_for(read_all, timeout=20.0, interval=0.0)
        assert set(batches) == {LineBatch}
        assert d.stats.lines == 1600
        assert d.stats.events == 10 + 10
        seen = sum(p.stats["lines"] if isinstance(p, JournalParser) else p.stats.lines for p in d.parts.parsers.values())
        assert seen == d.parts.pipeline.n_parsed
        assert seen <= 10 + 10 + 20, f"{seen} of {d.stats.lines} lines parsed: the mix fell back to every line"
        assert store.get_meta("journal_cursor:journal:id=kamailio") == "s=abc;i=599"
    finally:
        d.parts.follower.close()
        store.close()


_T = b"Nov 30 01:55:12 sip1 kamailio[1]: NOTICE: <script>: auth failed for user 1 from 198.18.5.1:5060 method REGISTER"
_T2 = b"Nov 30 01:55:13 sip1 kamailio[1]: WARNING: <script>: Blocked scanner UA 'sipvicious' from 198.18.5.2:5060"
_H = b"Nov 30 01:55:12 sip1 kamailio[1]: INFO: <script>: INVITE relayed"
_G = b"garbage without header auth failed for user 2 from 198.18.5.3:5060 method REGISTER"
_C = b"    continued text"
_S = b" 1(23875) NOTICE: <script>: auth failed for user 3 from 198.18.5.4:5060 method REGISTER"
_S0 = b" 1(23875) INFO: <script>: hello"
_R = b"12(23876) NOTICE: <script>: auth failed for user 7 from 198.18.5.8:5060 method REGISTER"  # rank 12: no space
_R0 = b"12(23876) INFO: <script>: hello"

_L = b"    auth failed for user 4 from 198.18.5.5:5060 method REGISTER"  # a continuation holding a literal
_J = json.dumps({"MESSAGE": "NOTICE: <script>: unknown user 5 from 198.18.5.6:5060 method OPTIONS"}).encode()

HARD_CASES = {  # (source, lines of one segment), in order; a source's first segment finds its family
    # a skipped header ends the hot record; the line jumped to is garbage: the record must end there,
    # before another source's event (order) and before a continuation in the next segment (content)
    "ended-by-skipped-header, then another source": [("a", [_H]), ("a", [_T, _H, _G]), ("b", [_T2, _T2])],
    "ended-by-skipped-header, then a continuation": [("a", [_H]), ("a", [_T, _H, _G]), ("a", [_C]), ("b", [_T2])],
    "same, continuation in the segment": [("a", [_H]), ("a", [_T, _H, _G, _C]), ("b", [_T2])],
    "same, hot record carried into the segment": [("a", [_H, _T]), ("a", [_H, _G]), ("a", [_C])],
    # the last literal line's record ends in its segment, before the next source's events
    "last record ends in its segment": [("a", [_H]), ("a", [_T, _H]), ("b", [_H]), ("b", [_T2, _T2])],
    "last record ends, continuation next": [("a", [_H]), ("a", [_T, _H]), ("a", [_C]), ("b", [_T2])],
    "continuation in the next segment": [("a", [_T]), ("a", [_C]), ("b", [_T2])],
    "continuation first in the next segment": [("a", [_H]), ("a", [_T]), ("a", [_C, _T2])],
    "continuation after garbage": [("a", [_T, _G, _C]), ("b", [_T2])],
    "a continuation with a literal after a skipped header": [("a", [_H]), ("a", [_T, _H, _L]), ("b", [_T2])],
    "each record against its own candidates": [("a", [_H]), ("a", [_T, _T2, _T, _H])],
    "stderr: forged headers continue a record": [("s", [_S0]), ("s", [_S, _H, _S0]), ("s", [_S, _G]),
                                                 ("s", [_S0, _S, _S0])],
    "stderr: a record goes on over lines without literal": [("s", [_R0]), ("s", [_R, _H, _R, _R0])],
    "family found late": [("a", [_G, _C, b"", _S, _H]), ("a", [_T, _S0, _S, _S0])],
    "a syslog header first: stderr lines are text": [("a", [_H, _S, _H]), ("a", [_S, _T, _H])],
    "journal: escapes, byte arrays, UTF-16": [("j", [_J, b'{"MESSAGE": "NOTICE: <script>: auth \\u0066ailed for user 6 from 198.18.5.7:5060 method REGISTER"}',
                                                     b'{"MESSAGE" :[' + ",".join(str(c) for c in _T[34:]).encode() + b"]}",
                                                     ("\ufeff" + json.dumps({"MESSAGE": _T2[34:].decode()})).encode("utf-16-le")])],
}


def _hard_parsers() -> dict:
    return {"a": RecordParser(now=lambda: NOW, trust_plain_stderr=True), "b": RecordParser(now=lambda: NOW, trust_plain_stderr=True),
            "s": RecordParser("stderr", now=lambda: NOW, trust_plain_stderr=True), "j": JournalParser()}


def test_hard_cases_read_sparse_as_every_line():
    for name, segs in HARD_CASES.items():
        batch = LineBatch([(src, 0, b"\n".join(lines) + b"\n") for src, lines in segs])
        for flush_each in (True, False):
            want = every_line_reference(_hard_parsers(), [batch], flush_each)
            pipe = Pipeline(_hard_parsers(), SHIPPED)
            got = pipe.batch(batch, NOW, flush=flush_each).events + pipe.flush(NOW).events
            assert got == want, name
            assert want, name
