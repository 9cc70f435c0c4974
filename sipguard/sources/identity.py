"""File identity by content: which file a saved position still belongs to.

An inode number says little (copytruncate keeps it while the content goes, compression makes a new
one for the same content, a deleted file's number is handed out again), so a position carries a
fingerprint of what the file held there, as Vector's `checksum` and Filebeat's `fingerprint` file
identities do: a digest of the file's first ``min(HEAD, offset)`` bytes and one of the
``min(TAIL, offset)`` bytes just before the offset. A file belongs to a position when it holds
those bytes at those places, whatever its name or inode; a file that grew back past the offset
after a truncation holds other bytes there and does not.

Here: the digests (`Mark`), logrotate's names for a file's rotated generations (`base.N`,
`base-YYYYMMDD` with `dateext`, each maybe compressed: `.gz`, `.bz2`, `.xz`), oldest first
(`rotated_siblings`), and `open_at`, which opens a candidate and checks the mark, leaving it
positioned at the offset (a compressed one decompressed up to there).

Never follows a file, never cuts lines and never touches the store.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import re
import stat
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .lines import HEAD, TAIL

COMPRESSED: dict[str, Callable[..., Any]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open,
                                             ".lzma": lzma.open}
#: What a truncated (being compressed right now) or corrupt compressed file raises.
DECOMPRESS_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError)
_READ = 1 << 20


def digest(data: bytes) -> str:
    """The fingerprint digest of some bytes (BLAKE2b, 128 bits, hex)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class Mark:
    """What a file must hold for `offset` to be a position in it: the digests of its first
    min(HEAD, offset) bytes and of the min(TAIL, offset) bytes before offset."""

    offset: int
    head: str
    tail: str

    @classmethod
    def of(cls, offset: int, head: bytes, ctail: bytes) -> Mark:
        """From the bytes themselves: `head` the file's first bytes (at least min(HEAD, offset) of
        them), `ctail` the bytes before `offset` (at least min(TAIL, offset))."""
        return cls(offset, digest(head[: min(HEAD, offset)]), digest(ctail[len(ctail) - min(TAIL, offset):]))

    def head_len(self) -> int:
        return min(HEAD, self.offset)

    def tail_len(self) -> int:
        return min(TAIL, self.offset)


# --------------------------------------------------------------------------- logrotate's names

_ROTATED = re.compile(r"(?:\.(\d+)|-(\d[\d_.-]*\d|\d))(\.(?:gz|bz2|xz|lzma))?")


@dataclass(frozen=True, slots=True)
class Rotated:
    """One rotated generation of a log file, as found in its directory."""

    path: str
    dev: int
    inode: int
    mtime_ns: int
    rank: int  # older generations first when mtimes tie: base.2 before base.1, -20240101 before -20240102
    compressed: bool


def rotated_siblings(path: str) -> list[Rotated]:
    """The rotated generations of `path` in its directory, oldest first: logrotate's `base.N` and
    `base-DATE` (dateext), plain or compressed. A compressed file whose plain twin is still there (being
    compressed right now) is left out: it holds the same lines, and perhaps not all of them yet."""
    d, base = os.path.split(path)
    try:
        with os.scandir(d or ".") as it:
            entries = list(it)
    except OSError:
        return []
    found: list[Rotated] = []
    names = {e.name for e in entries}
    for e in entries:
        if not e.name.startswith(base) or e.name == base:
            continue
        m = _ROTATED.fullmatch(e.name, len(base))
        if m is None:
            continue
        number, date, ext = m.groups()
        if ext and e.name[: -len(ext)] in names:
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        rank = -int(number) if number is not None else int(re.sub(r"\D", "", date or "0")[:18] or 0)
        found.append(Rotated(e.path, st.st_dev, st.st_ino, st.st_mtime_ns, rank, bool(ext)))
    found.sort(key=lambda r: (r.mtime_ns, r.rank, r.compressed))
    return found


# --------------------------------------------------------------------------- opening a candidate


class Stream:
    """The decompressed bytes of a compressed file, read in order from its start; owns its own
    duplicate of the file's descriptor (closed with it)."""

    def __init__(self, fd: int, opener: Callable[..., Any]) -> None:
        self._raw = os.fdopen(os.dup(fd), "rb")
        try:
            self._z = opener(self._raw, "rb")
        except BaseException:
            self._raw.close()
            raise

    def read(self, n: int) -> bytes:
        return self._z.read(n)

    def close(self) -> None:
        try:
            self._z.close()
        except Exception:  # noqa: BLE001 - closing a damaged stream
            pass
        self._raw.close()


@dataclass(slots=True)
class Opened:
    """A candidate that holds the mark, positioned at its offset: a plain file (read with pread on
    `fd`) or a compressed one (`stream`, decompressed up to the offset already)."""

    fd: int
    st: os.stat_result
    stream: Stream | None
    head: bytes  # the first min(HEAD, offset) bytes
    ctail: bytes  # the min(TAIL, offset) bytes before the offset

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        try:
            os.close(self.fd)
        except OSError:
            pass


def _open_fd(path: str) -> tuple[int, os.stat_result] | None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    except OSError:  # pragma: no cover - fstat on a fresh fd does not fail
        os.close(fd)
        return None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, st


def plain_holds(fd: int, size: int, mark: Mark) -> tuple[bytes, bytes] | None:
    """(head, ctail) when the plain file on `fd` (`size` bytes) holds `mark`, else None."""
    if size < mark.offset:
        return None
    try:
        head = os.pread(fd, mark.head_len(), 0)
        ctail = os.pread(fd, mark.tail_len(), mark.offset - mark.tail_len())
    except OSError:
        return None
    if digest(head) != mark.head or digest(ctail) != mark.tail:
        return None
    return head, ctail


def open_at(path: str, mark: Mark) -> Opened | None:
    """Open `path` if it holds `mark`, positioned at the mark's offset; None otherwise."""
    opened = _open_fd(path)
    if opened is None:
        return None
    fd, st = opened
    opener = COMPRESSED.get(os.path.splitext(path)[1].lower())
    if opener is None:
        got = plain_holds(fd, st.st_size, mark)
        if got is None:
            os.close(fd)
            return None
        return Opened(fd, st, None, *got)
    try:
        stream = Stream(fd, opener)
    except (OSError, ValueError):
        os.close(fd)
        return None
    cand = Opened(fd, st, stream, b"", b"")
    try:
        head = _read_exactly(stream, mark.head_len())
        if head is None or digest(head) != mark.head:
            cand.close()
            return None
        pos, ctail = len(head), head[len(head) - mark.tail_len():]
        while pos < mark.offset:  # decompress up to the offset, keeping the last TAIL bytes
            piece = stream.read(min(_READ, mark.offset - pos))
            if not piece:
                cand.close()
                return None
            pos += len(piece)
            ctail = (ctail + piece[-TAIL:])[-TAIL:]
        ctail = ctail[len(ctail) - mark.tail_len():]
        if digest(ctail) != mark.tail:
            cand.close()
            return None
    except DECOMPRESS_ERRORS:
        cand.close()
        return None
    return Opened(fd, st, stream, head, ctail)


def open_start(path: str) -> Opened | None:
    """`path` opened at its start (a compressed one with its stream), or None."""
    opened = _open_fd(path)
    if opened is None:
        return None
    fd, st = opened
    opener = COMPRESSED.get(os.path.splitext(path)[1].lower())
    if opener is None:
        return Opened(fd, st, None, b"", b"")
    try:
        return Opened(fd, st, Stream(fd, opener), b"", b"")
    except (OSError, ValueError):
        os.close(fd)
        return None


def is_compressed(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in COMPRESSED


def _read_exactly(stream: Stream, n: int) -> bytes | None:
    out = b""
    while len(out) < n:
        piece = stream.read(n - len(out))
        if not piece:
            return None
        out += piece
    return out
