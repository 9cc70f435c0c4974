"""The daemon's fast path parses only trigger lines and what ends their records: it must give
exactly the events of parsing every line, whatever the mix of formats, continuations, garbage,
other programs and read-buffer boundaries."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sipguard.addresses import AllowList
from sipguard.config import Config
from sipguard.daemon import Daemon
from sipguard.wiring import build_daemon
from sipguard.enforce.dryrun import DryRunEnforcer
from sipguard.model import Event
from sipguard.sources import LineBatch
from sipguard.store import Store

SRC = "/var/log/kamailio.log"
OTHER = "/var/log/other.log"

PIECES = [
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
    """Parse like Daemon.step does (same generator), without the policy/store around it."""
    out: list[Event] = []
    for batch in batches:
        touched: set[str] = set()
        for line in d._to_parse(batch, touched):
            for rec in d.parts.parsers[line.source].feed(line):
                ev = d.parts.filters.match(rec, 0.0)
                if ev is not None:
                    out.append(ev)
        for path in touched:
            for rec in d.parts.parsers[path].flush():
                ev = d.parts.filters.match(rec, 0.0)
                if ev is not None:
                    out.append(ev)
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
    st.lists(st.sampled_from(PIECES), min_size=1, max_size=40),
    st.lists(st.sampled_from(PIECES), max_size=10),
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
    assert fast_daemon._literals is not None
    fast = events_of(fast_daemon, [LineBatch(g) for g in groups])
    assert fast == full


def test_allowlist_untouched_by_fast_path():
    # sanity: the helper above builds daemons that do not allow-list the lab addresses
    assert "198.18.0.50" not in AllowList([], include_host=False)
