"""Lines: how a source's bytes are cut into complete lines, and the values that describe them
(LineBatch, the lines of one read; SourcePosition, where reading stands and what the file holds
there).

Pure byte handling: never opens a file, never decodes a byte, never drops a line except one longer
than max_line (counted by the caller's stats).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from ..model import Line

MAX_LINE = 1 << 20
CHUNK = 8 << 20
HEAD = 1024
"""Bytes at a file's start a position's fingerprint covers (fewer when the offset is smaller)."""
TAIL = 1024
"""Bytes before a position's offset its fingerprint covers (fewer near the file's start)."""

@dataclass(frozen=True, slots=True)
class SourcePosition:
    """Where reading of `path` stands: the file's identity and the offset just past the last line.

    Persisted by the caller together with what it derived from the lines, so a restart resumes
    exactly there. ``dev == inode == 0`` means "the file did not exist: read it from its start
    when it appears".

    `head` and `tail` fingerprint the content (sources/identity.py): digests of the file's first
    ``min(HEAD, offset)`` bytes and of the ``min(TAIL, offset)`` bytes before `offset`. A restart
    resumes in whichever file (the path, a rotated copy, a compressed one) still holds those bytes
    there; "" (a position saved before fingerprints) falls back to the inode.
    """

    path: str
    dev: int
    inode: int
    offset: int
    head: str = ""
    tail: str = ""


# --------------------------------------------------------------------------- line cutting


def _split_long(data: bytes, base: int, max_line: int) -> tuple[list[tuple[int, bytes]], int]:
    """Cut `data` (starting at a line start, ending with a newline) around lines > max_line.

    Returns contiguous segments ``(file_offset, bytes)`` without over-long lines, and how many
    were dropped. Searches newlines window by window with C-speed `rfind`, so a chunk of short
    lines costs a few calls, not one per line.
    """
    n = len(data)
    if n <= max_line + 1:
        return [(base, data)], 0
    segs: list[tuple[int, bytes]] = []
    dropped = 0
    seg_start = pos = 0
    window = max_line + 1
    while n - pos > window:
        p = data.rfind(b"\n", pos, pos + window)
        if p >= 0:
            pos = p + 1
            continue
        end = data.find(b"\n", pos)  # exists: data ends with a newline
        if pos > seg_start:
            segs.append((base + seg_start, data[seg_start:pos]))
        dropped += 1
        pos = seg_start = end + 1
    if seg_start < n:
        segs.append((base + seg_start, data if seg_start == 0 else data[seg_start:]))
    return segs, dropped


class _Cutter:
    """Incremental line splitter: fed consecutive bytes of one file, returns complete lines.

    Keeps the partial last line (at most max_line bytes: beyond that the line is counted as
    too long and the rest of it is dropped as it arrives, never buffered). `committed` is the
    offset just past the last newline seen, i.e. what a restart may resume from.

    With `track` (the live follower) it also keeps what a fingerprint needs: `head`, the file's
    first bytes as read (up to HEAD), and `ctail`, the TAIL bytes before `committed`.
    """

    __slots__ = ("max_line", "pos", "committed", "partial", "skipping", "stats", "track", "head", "ctail",
                 "_skipped")

    def __init__(self, max_line: int, pos: int, stats: Counter[str], track: bool = False) -> None:
        self.max_line = max_line
        self.pos = pos  # offset of the next byte to be fed
        self.committed = pos
        self.partial = bytearray()
        self.skipping = False
        self.stats = stats
        self.track = track
        self.head = b""  # the file's bytes [0, min(HEAD, pos)) when known
        self.ctail = b""  # the file's bytes [committed - min(TAIL, committed), committed)
        self._skipped = b""  # the last bytes of the too-long line being skipped

    def reset(self, pos: int, head: bytes = b"", ctail: bytes = b"", skipping: bool = False) -> None:
        """Go on from `pos` (a line start, or the middle of a too-long line with `skipping`); a
        tracking cutter is told the file's first min(HEAD, pos) bytes and the TAIL bytes before pos."""
        self.pos = self.committed = pos
        self.partial = bytearray()
        self.skipping = skipping
        self.head = head
        self.ctail = ctail
        self._skipped = ctail if skipping else b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        start = self.pos
        self.pos += len(data)
        if self.track and start < HEAD and len(self.head) == start:
            self.head += data[: HEAD - start]
        if self.skipping:
            i = data.find(b"\n")
            if i < 0:
                if self.track:
                    self._skipped = (self._skipped + data[-TAIL:])[-TAIL:]
                return []
            self.skipping = False
            start += i + 1
            self.committed = start
            if self.track:
                self.ctail = (self._skipped + data[max(0, i + 1 - TAIL) : i + 1])[-TAIL:]
                self._skipped = b""
            data = data[i + 1 :]
        j = data.rfind(b"\n")
        if j < 0:
            self.partial += data
            self._check_partial()
            return []
        if self.partial:
            seg_start = start - len(self.partial)
            buf = b"".join((self.partial, memoryview(data)[: j + 1]))  # one copy of the big read, not three
        else:
            seg_start = start
            buf = data if j + 1 == len(data) else data[: j + 1]
        self.partial = bytearray(data[j + 1 :])
        self.committed = seg_start + len(buf)
        if self.track:  # buf is the bytes [old committed, new committed)
            self.ctail = bytes(buf[-TAIL:]) if len(buf) >= TAIL else (self.ctail + buf)[-TAIL:]
        self._check_partial()
        segs, dropped = _split_long(buf, seg_start, self.max_line)
        if dropped:
            self.stats["too_long"] += dropped
        return segs

    def _check_partial(self) -> None:
        if len(self.partial) > self.max_line:
            self.stats["too_long"] += 1
            if self.track:
                self._skipped = bytes(self.partial[-TAIL:])
            self.partial = bytearray()
            self.skipping = True

    def tail(self) -> tuple[int, bytes] | None:
        """The unterminated last line (file offset, bytes), if any; for files that are done."""
        if self.partial and not self.skipping:
            return self.pos - len(self.partial), bytes(self.partial)
        return None


def _to_lines(source: str, segs: list[tuple[int, bytes]], out: list[Line]) -> None:
    """Append one Line per newline-terminated line of `segs` (newline and one CR stripped)."""
    append = out.append
    for off, seg in segs:
        parts = seg.split(b"\n")
        last = parts.pop()  # b"" when the segment ends with a newline
        for p in parts:
            off += len(p) + 1
            if p[-1:] == b"\r":
                p = p[:-1]
            append(Line(source, p, off))
        if last:
            off += len(last)
            if last[-1:] == b"\r":
                last = last[:-1]
            append(Line(source, last, off))


class LineBatch:
    """The complete lines of one poll, kept as the `(source, offset, bytes)` segments they were
    read in (each segment is whole lines; only a rotated-away file's last may lack its newline).

    Iterating yields Line objects (made on demand); `len()` is the number of lines.
    """

    __slots__ = ("segments", "_count")

    def __init__(self, segments: list[tuple[str, int, bytes]]) -> None:
        self.segments = segments
        self._count = sum(seg.count(b"\n") + (seg[-1:] not in (b"\n", b"")) for _, _, seg in segments)

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[Line]:
        out: list[Line] = []
        for source, off, seg in self.segments:
            _to_lines(source, [(off, seg)], out)
            yield from out
            out.clear()

