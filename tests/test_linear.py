"""Linear matching: every shipped regex runs in time linear in the record's length (issue 16, item 9).

The test measures scaling, not wall time: for every shipped regex, the worst record shapes found at a
small size (pieces of a real matching record repeated, runs of one character, with the record's own
end, a broken end or none) are timed at 64 KiB and at 1 MiB; the 16x longer record must cost less
than 32x the time (best of a few runs). The quadratic shape the shipped filters used to have
(`(?:.* )?<script>: ... .* from ...`) fails the same check, and the linear forms decide every record
exactly as the old forms did (same match, same address).
"""

from __future__ import annotations

import json
import re
import time
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipguard.config import Config
from sipguard.enforce.dryrun import DryRunEnforcer
from sipguard.filters import FilterSet, expand_macros, shipped_dir
from sipguard.filters.corpus import parse_corpus, run_corpus
from sipguard.formats import JournalParser
from sipguard.model import Line
from sipguard.store import Store
from sipguard.wiring import build_daemon
from waiting import wait_for

CORPUS = Path(__file__).parent / "corpus"
KIB = 1024
SCREEN = 16 * KIB  # shapes are screened at this size; the slowest are then timed at SMALL and BIG
SMALL, BIG = 64 * KIB, 1024 * KIB
TOP = 4  # slowest shapes per regex timed at SMALL and BIG
LIMIT = 32.0  # BIG is 16x SMALL: linear is ~16x, quadratic ~256x

# The shipped regexes before the linear rewrite (quadratic in the record's length): the reference the
# linear forms must agree with, and the proof that the scaling check catches a quadratic regex.
TOKEN = "[A-Za-z0-9_.!%*+~-]{1,32}"
OLD = {
    ("auth-failure", 0): rf"^[A-Z]+: (?:.* )?<script>: auth failed for user .* from (?P<ip><ADDR>):<PORT> method {TOKEN}$",
    ("auth-challenge", 0): rf"^[A-Z]+: (?:.* )?<script>: auth challenge for user .* from (?P<ip><ADDR>):<PORT> method {TOKEN}$",
    ("unknown-user", 0): rf"^[A-Z]+: (?:.* )?<script>: unknown user .* from (?P<ip><ADDR>):<PORT> method {TOKEN}$",
    # the UA may span lines (a CR/LF in it): the record is matched whole since issue 12
    ("scanner-ua", 0): r"^[A-Z]+: (?:.* )?<script>: Blocked scanner UA '(?s:.*)' from (?P<ip><ADDR>):<PORT>$",
    ("pike-block", 1): rf"^[A-Z]+: (?:.* )?<script>: (?:[A-Z]+: )?pike block(?:ing)? {TOKEN} from .* \(IP:(?P<ip><ADDR>):<PORT>\)$",
}


@pytest.fixture(scope="module")
def shipped() -> FilterSet:
    return FilterSet.load([shipped_dir()])


@lru_cache(maxsize=1)
def samples() -> dict[tuple[str, int], str]:
    """Per shipped regex (filter, index), the text of one real record of its corpus that it decides."""
    fs = FilterSet.load([shipped_dir()])
    out: dict[tuple[str, int], str] = {}
    for f in fs.filters:
        rep = run_corpus(parse_corpus(CORPUS / f"{f.name}.txt"), fs, cover=[f.name])
        for cov in rep.coverage:
            if cov.what != "regex" or not cov.cases:
                continue
            # the plainest case: a one-line record of the syslog family
            for case in sorted(cov.cases, key=lambda c: len(c.lines[0])):
                (rec,) = rep.result(case.id).records
                if f.regexes[cov.index].search(rec.text):
                    out[(f.name, cov.index)] = rec.text
                    break
    return out


def regexes() -> list[tuple[str, int]]:
    fs = FilterSet.load([shipped_dir()])
    return [(f.name, i) for f in fs.filters for i in range(len(f.regexes))]


def _cuts(text: str) -> list[int]:
    """Places to cut a record: next to spaces and the punctuation Kamailio's lines are made of."""
    marks = set(" :'()[],<>")
    return sorted({0, len(text)} | {i for i in range(1, len(text)) if text[i] in marks or text[i - 1] in marks})


def shapes(text: str) -> list[tuple]:
    """The shapes made from a matching record: ("rep", a, b, end) repeats the piece text[a:b] between
    the head text[:a] and an end (the record's own text[b:], the same broken, or none); ("run", a, ch)
    puts a run of one of its characters at a."""
    cuts = _cuts(text)
    out: list[tuple] = [("rep", a, b, end) for a in cuts for b in cuts if b > a for end in ("end", "broken", "none")]
    out += [("run", a, ch) for a in cuts for ch in sorted(set(text) | {" "})]
    return out


def build(shape: tuple, text: str, size: int) -> str:
    """The record of about `size` characters of `shape`."""
    if shape[0] == "run":
        _, a, ch = shape
        return text[:a] + ch * max(1, size - len(text)) + text[a:]
    _, a, b, end = shape
    piece = text[a:b]
    tail = {"end": text[b:], "broken": text[b:] + " <", "none": ""}[end]
    return text[:a] + piece * max(1, (size - len(text)) // len(piece)) + tail


def describe(shape: tuple, text: str) -> str:
    if shape[0] == "run":
        return f"a run of {shape[2]!r} at {shape[1]}"
    _, a, b, end = shape
    return f"{text[:a]!r} + {text[a:b]!r} repeated + {end}"


def best(rx: re.Pattern[str], s: str, runs: int) -> float:
    t = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        rx.search(s)
        t = min(t, time.perf_counter() - t0)
    return t


def worst_ratio(rx: re.Pattern[str], text: str, small: int, big: int, screen: int) -> tuple[float, str, float, float]:
    """The largest time(big)/time(small) over the slowest shapes at `screen`: (ratio, shape, t_small, t_big)."""
    all_shapes = shapes(text)
    timed = sorted(((best(rx, build(s, text, screen), 1), i) for i, s in enumerate(all_shapes)), reverse=True)
    worst = (0.0, "", 0.0, 0.0)
    for _, i in timed[:TOP]:
        shape = all_shapes[i]
        t_small = best(rx, build(shape, text, small), 5)
        t_big = best(rx, build(shape, text, big), 3)
        ratio = t_big / max(t_small, 1e-7)
        if ratio > worst[0]:
            worst = (ratio, describe(shape, text), t_small, t_big)
    return worst


def test_every_shipped_regex_has_a_sample(shipped: FilterSet) -> None:
    assert sorted(samples()) == sorted(regexes())


@pytest.mark.parametrize("key", regexes(), ids=lambda k: f"{k[0]}[{k[1]}]")
def test_shipped_regex_scales_linearly(shipped: FilterSet, key: tuple[str, int]) -> None:
    name, i = key
    rx = next(f for f in shipped.filters if f.name == name).regexes[i]
    ratio, shape, t_small, t_big = worst_ratio(rx, samples()[key], SMALL, BIG, SCREEN)
    assert ratio < LIMIT, (f"{name} regex[{i}] is not linear: shape {shape}: {t_small * 1e3:.2f} ms at "
                           f"{SMALL // KIB} KiB, {t_big * 1e3:.2f} ms at {BIG // KIB} KiB ({ratio:.0f}x)")
    assert t_big < 2.0, f"{name} regex[{i}]: {t_big:.2f} s for a 1 MiB record ({shape})"


def test_the_check_catches_the_old_quadratic_shape() -> None:
    """The same measurement flags the shape the shipped filters had (at smaller sizes: it is slow)."""
    rx = re.compile(expand_macros(OLD[("auth-failure", 0)]))
    ratio, shape, t_small, t_big = worst_ratio(rx, samples()[("auth-failure", 0)], 4 * KIB, 64 * KIB, 4 * KIB)
    assert ratio > LIMIT, (ratio, shape, t_small, t_big)


# -- the linear forms decide exactly as the old ones did ---------------------------------------------------

INJECTED = "198.18.0.99"
FRAGMENTS = [
    " ", "  ", "'", "''", ")", "(", ":", "<script>: ", " from ", "from ", INJECTED, f"{INJECTED}:5060",
    f" from {INJECTED}:5060", f" from {INJECTED}:5060 method REGISTER", " method ", "method INVITE",
    f"(IP:{INJECTED}:5060)", f" (IP:{INJECTED}:5060)", "(IP:", "[2001:db8::99]:5060", "fe80::9%eth0:5060",
    "auth failed for user ", "auth challenge for user ", "unknown user ", "Blocked scanner UA '",
    "ALERT: ", "pike block ", "pike blocking ", "REGISTER ", "OPTIONS", "sip:1@x", "NOTICE: ", "x", "\t",
    "\n", "\r\n", "\n 5(4242) ",
]
HEADS = ["NOTICE: ", "ALERT: ", "WARNING: ", "NOTICE: {1 1 REGISTER x} ", "ERROR: <script>: ", "notice: ", ""]
soup = st.tuples(st.sampled_from(HEADS), st.lists(st.sampled_from(FRAGMENTS), max_size=16).map("".join))


def _old_and_new(shipped: FilterSet) -> list[tuple[str, re.Pattern[str], re.Pattern[str]]]:
    out = []
    for (name, i), pattern in OLD.items():
        new = next(f for f in shipped.filters if f.name == name).regexes[i]
        out.append((f"{name}[{i}]", re.compile(expand_macros(pattern)), new))
    return out


def _same(old: re.Pattern[str], new: re.Pattern[str], text: str) -> None:
    a, b = old.search(text), new.search(text)
    assert (a is None) == (b is None), (text, a, b)
    if a is not None and b is not None:
        assert a.group("ip") == b.group("ip"), text


@settings(max_examples=1500, deadline=None)
@given(soup)
def test_linear_forms_decide_like_the_old_ones(shipped: FilterSet, parts: tuple[str, str]) -> None:
    text = parts[0] + parts[1]
    for _, old, new in _old_and_new(shipped):
        _same(old, new, text)


def test_linear_forms_on_every_corpus_record(shipped: FilterSet) -> None:
    texts = []
    for f in shipped.filters:
        rep = run_corpus(parse_corpus(CORPUS / f"{f.name}.txt"), shipped, cover=[f.name])
        texts += [r.text for res in rep.results for r in res.records]
    assert len(texts) > 200
    for _, old, new in _old_and_new(shipped):
        for text in texts:
            _same(old, new, text)
            for cut in range(0, len(text), 7):  # and every shorter record made of its pieces
                _same(old, new, text[:cut])
                _same(old, new, text[cut:])


# -- bounded records: no filter runs over more than [sources] max_line ------------------------------------

def _entry(message: object, **kw: object) -> Line:
    return Line("journal:id=kamailio", json.dumps({"MESSAGE": message, "SYSLOG_IDENTIFIER": "kamailio", **kw}).encode())


def test_journal_entries_are_capped_at_max_line() -> None:
    p = JournalParser(max_line=1024)
    ok = "NOTICE: <script>: x " + "a" * (1024 - 20)
    assert len(ok.encode()) == 1024 and [r.text for r in p.feed(_entry(ok))] == [ok]
    assert p.feed(_entry(ok + "a")) == []  # one byte too many
    assert p.feed(_entry(list((ok + "a").encode()))) == []  # the byte-array form of MESSAGE
    assert p.feed(_entry("é" * 513)) == []  # 513 characters, 1026 bytes
    assert p.feed(_entry("\x1b" * 1000 + "x" * 60000)) == []  # escapes inflate the JSON, not the count
    assert p.feed(Line("j", b"x" * (6 * 1024 + 65537))) == []  # too long to hold a capped MESSAGE: not decoded
    assert p.stats["too_long"] == 5 and p.stats["records"] == 1 and p.stats["garbage"] == 0
    assert JournalParser().max_line == 1 << 20  # the config's default


def test_every_source_caps_records_through_the_daemon(tmp_path: Path) -> None:
    """A file line and a journal entry (4 MiB MESSAGE, through a stand-in journalctl) longer than
    max_line are skipped and counted as too_long; the lines around them still make their events."""
    big = "NOTICE: <script>: auth failed for user " + "x" * (4 << 20) + " from 198.18.9.9:5060 method REGISTER"
    good = "NOTICE: <script>: auth failed for user 1 from 198.18.9.{n}:5060 method REGISTER"
    entries = tmp_path / "entries.json"
    now = time.time()  # recent records: the daemon's pruning keeps a day of events
    entries.write_text("".join(json.dumps({"__CURSOR": f"c{i}", "SYSLOG_IDENTIFIER": "kamailio", "_PID": "7",
                                           "_EXE": "/usr/sbin/kamailio",
                                           "__REALTIME_TIMESTAMP": str(int(now * 1e6)), "MESSAGE": m}) + "\n"
                               for i, m in enumerate([good.format(n=1), big, good.format(n=2)])))
    journalctl = tmp_path / "journalctl"
    journalctl.write_text(f'#!/bin/sh\ncase " $* " in *" --follow "*) cat {entries}; exec sleep 600;; esac\n')
    journalctl.chmod(0o755)
    log = tmp_path / "kamailio.log"
    head = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now)) + " sip1 kamailio[4242]: "
    log.write_text(f"{head}{good.format(n=3)}\n{head}{big}\n{head}{good.format(n=4)}\n")
    cfg = Config.model_validate({"allowlist": {"include_host_addresses": False},
                                 "sources": {"max_line": 65536, "journal_identifiers": ["kamailio"], "journal_users": [],
                                             "journalctl": str(journalctl)}})
    store = Store(":memory:")
    d = build_daemon(cfg, store, DryRunEnforcer(), logs=[str(log)], from_start=True)
    d.setup()
    try:
        def read_all() -> bool:
            d.step(d.parts.follower.poll_batch(0.1))
            return d.stats.events >= 4 and d.skipped()["too_long"] >= 2

        wait_for(read_all, timeout=20.0, interval=0.0)
        assert d.stats.events == 4
        assert d.skipped()["too_long"] == 2
        assert sorted(e.ip for e in store.recent_events(0)) == [f"198.18.9.{n}" for n in (1, 2, 3, 4)]
    finally:
        d.parts.follower.close()
        store.close()
