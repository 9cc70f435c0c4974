"""Literal search: the bytes a reader looks for before it parses a line (`search_literals`), and
one pass over a buffer that finds every line holding any of them (`trigger_lines`: Hyperscan, or
`bytes.find` where Hyperscan is not installed).

Never decodes or parses a line and never decides a match: it only says where literals are.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("sipguard.filters")


def search_literals(literals: Iterable[str]) -> tuple[bytes, ...]:
    """The byte strings to search for: one per literal, minus those another one already finds.

    A literal holding a newline can never be inside a one-line record, so it is not searched.
    """
    lits = sorted({t.encode() for t in literals if "\n" not in t}, key=len)
    out: list[bytes] = []
    for lit in lits:
        if not any(o in lit for o in out):
            out.append(lit)
    return tuple(out)



def trigger_lines(buf: bytes, literals: tuple[bytes, ...], start: int = 0, end: int | None = None
                  ) -> tuple[list[int], list[int]]:
    """The lines of `buf[start:end]` holding any literal: their sorted start offsets, and for each
    the bitmask of the literals it holds (bit i: `literals[i]`, see `FilterSet.candidates`).

    An occurrence belongs to the line holding its last byte, so a literal may begin with the newline
    that ends the line before: `b"\n "` marks the lines (after the first) that start with a space.

    One Hyperscan pass finds every literal at once (SIMD, several GB/s); without Hyperscan (not
    installed, or a CPU it does not support) one C-speed `bytes.find` pass per literal. Both are
    far faster than a regex alternation, which tries every alternative at almost every byte.
    """
    if end is None:
        end = len(buf)
    if any(b"\x00" in lit for lit in literals):
        return _trigger_lines_split(buf, literals, start, end)
    hs = _hyperscan(literals) if literals else None
    if hs is None:
        return _trigger_lines_find(buf, literals, start, end)
    db, scratch = hs
    hits: list[tuple[int, int]] = []
    add = hits.append
    view = memoryview(buf)[start:end] if start or end != len(buf) else buf
    db.scan(view, match_event_handler=lambda i, _from, to, _flags, _ctx: add((to, i)), scratch=scratch)
    # hits ascend by end offset: a new line starts at the first hit past the current line's end
    starts: list[int] = []
    masks: list[int] = []
    rfind, find = buf.rfind, buf.find
    line_end = -1
    for e, i in hits:
        last = e + start - 1  # the occurrence's last byte
        if last <= line_end:
            masks[-1] |= 1 << i
            continue
        starts.append(rfind(b"\n", start, last) + 1 or start)
        masks.append(1 << i)
        line_end = find(b"\n", last, end)
        if line_end < 0:
            line_end = end
    return starts, masks


def _trigger_lines_split(buf: bytes, literals: tuple[bytes, ...], start: int, end: int
                         ) -> tuple[list[int], list[int]]:
    """`trigger_lines` when some literals hold a NUL byte, which Hyperscan's literal API cannot take
    (it reads each literal as a C string): those by `bytes.find`, the others as usual."""
    plain = [i for i, lit in enumerate(literals) if b"\x00" not in lit]
    found: dict[int, int] = {}
    for indexes, search in ((plain, trigger_lines),
                            ([i for i in range(len(literals)) if i not in plain], _trigger_lines_find)):
        if not indexes:
            continue
        starts, masks = search(buf, tuple(literals[i] for i in indexes), start, end)
        for s, m in zip(starts, masks):
            bits = 0
            for j, i in enumerate(indexes):
                if m >> j & 1:
                    bits |= 1 << i
            found[s] = found.get(s, 0) | bits
    starts = sorted(found)
    return starts, [found[x] for x in starts]


def _trigger_lines_find(buf: bytes, literals: tuple[bytes, ...], start: int, end: int
                        ) -> tuple[list[int], list[int]]:
    """`trigger_lines` without Hyperscan: one `bytes.find` pass per literal, jumping to the next
    line after each hit."""
    found: dict[int, int] = {}
    find, rfind = buf.find, buf.rfind
    for bit, lit in enumerate(literals):
        b = 1 << bit
        tail = len(lit) - 1
        i = find(lit, start, end)
        while i >= 0:
            last = i + tail  # the occurrence's last byte: its line is the one holding it
            ls = rfind(b"\n", start, last) + 1 or start
            found[ls] = found.get(ls, 0) | b
            e = find(b"\n", last, end)
            if e < 0:
                break
            i = find(lit, max(i + 1, e + 1 - tail), end)  # the first occurrence ending past this line
    starts = sorted(found)
    return starts, [found[x] for x in starts]


_HS_DBS: dict[tuple[bytes, ...], object] = {}
_HS_BROKEN: list[str] = []  # why Hyperscan is not used at all (not installed, or disabled), once
_HS_FAILED: dict[tuple[bytes, ...], str] = {}  # literal sets Hyperscan would not compile (bytes.find for those)
_HS_LOCAL = threading.local()  # per thread: {literals: Scratch}; a scratch serves one scan at a time


def _hyperscan(literals: tuple[bytes, ...]) -> tuple[Any, Any] | None:
    """(database, this thread's scratch space) for `literals`, or None without Hyperscan."""
    db = _hyperscan_db(literals)
    if db is None:
        return None
    scratches = getattr(_HS_LOCAL, "scratches", None)
    if scratches is None:
        scratches = _HS_LOCAL.scratches = {}
    scratch = scratches.get(literals)
    if scratch is None or scratch.database is not db:
        import hyperscan

        if len(scratches) > 16:
            scratches.clear()
        scratch = scratches[literals] = hyperscan.Scratch(db)
    return db, scratch


def _hyperscan_db(literals: tuple[bytes, ...]) -> object | None:
    """A compiled Hyperscan block-mode database of `literals` (cached), or None without Hyperscan."""
    db = _HS_DBS.get(literals)
    if db is not None or _HS_BROKEN or literals in _HS_FAILED:
        return db
    if os.environ.get("SIPGUARD_NO_HYPERSCAN"):
        _HS_BROKEN.append("disabled by SIPGUARD_NO_HYPERSCAN")
        return None
    try:
        import hyperscan
    except Exception as exc:  # noqa: BLE001 - not installed (or its library is missing): bytes.find works
        _HS_BROKEN.append(f"{type(exc).__name__}: {exc}")
        log.info("Hyperscan unavailable (%s); searching literals with bytes.find", exc)
        return None
    try:
        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        db.compile(expressions=list(literals), ids=list(range(len(literals))), elements=len(literals),
                   flags=0, literal=True)
    except Exception as exc:  # noqa: BLE001 - a CPU or a literal set it rejects: bytes.find for this set only
        if len(_HS_FAILED) < 64:
            _HS_FAILED[literals] = f"{type(exc).__name__}: {exc}"
        log.info("Hyperscan cannot compile these literals (%s); searching them with bytes.find", exc)
        return None
    if len(_HS_DBS) > 16:
        _HS_DBS.clear()
    _HS_DBS[literals] = db
    return db
