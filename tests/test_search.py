"""Literal search (sipguard/filters/search.py) with literals Hyperscan's literal API cannot take: a NUL
byte (the journal reader searches for it) is found by bytes.find, the other literals still by
Hyperscan, and Hyperscan stays in use for every other literal set of the process."""

from __future__ import annotations

import platform

from hypothesis import given, settings
from hypothesis import strategies as st

from sipguard.filters import search as search_mod
from sipguard.filters.search import trigger_lines

LITS = (b"auth failed for user", b"pike block", b"\\", b"\x00", b"\xfe\xff")
PIECES = [b"\n", b"x", b" ", b"\x00", b"\\", b"auth failed for user", b"pike block", b"\xfe\xff", b"\xfe"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40), st.integers(0, 3))
def test_nul_literals_are_found_like_every_other(parts: list[bytes], pad: int) -> None:
    buf = b"\n" * pad + b"".join(parts)
    assert trigger_lines(buf, LITS) == search_mod._trigger_lines_find(buf, LITS, 0, len(buf))
    assert trigger_lines(buf, LITS, pad, len(buf)) == search_mod._trigger_lines_find(buf, LITS, pad, len(buf))


def test_a_nul_literal_does_not_turn_hyperscan_off() -> None:
    trigger_lines(b"a\x00b\n", LITS)
    if platform.machine() in ("x86_64", "aarch64"):  # where the dependency installs
        assert search_mod._hyperscan_db((b"auth failed for user", b"pike block")) is not None, search_mod._HS_BROKEN
        assert not search_mod._HS_BROKEN
