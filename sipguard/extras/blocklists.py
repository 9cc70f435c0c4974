"""Blocklists: ban every address or network a published list names, for as long as it names it.

Formats (`auto` tells them apart by the first non-blank character):

* text: one address or CIDR per line; `#` and `;` start comments (APIBAN's plain list, Spamhaus DROP);
* json: APIBAN's `{"ipaddress": ["198.51.100.7", ...]}`, or a plain JSON array of strings.

A list is parsed whole before anything changes: one malformed entry rejects it with an error naming
the file or URL and the line (`BlocklistError`), and the bans stay as they were. Entries are banned
with reason `blocklist:NAME`; an entry that drops off the list is unbanned at the next refresh or
import of that list. Allow-listed entries are skipped and counted, never banned; an address that
already has a ban (a jail's or a manual one) keeps it. The changes go through the ban book: new bans to
the kernel in one batch, then to the store in one transaction.

Bounded reading (`Limits`): a list is read and parsed in pieces as it arrives, never whole: reading
stops, and the list is refused, past `max_bytes` bytes or `max_entries` distinct entries (so a huge
list costs what `max_entries` entries cost, not what its size would). A URL may redirect (at most
MAX_REDIRECTS times) only to http(s) URLs whose host is a public address, checked for the name and for
the address actually connected to, unless the list says `allow_private = true` (then loopback,
link-local and private addresses too). Errors never show the list's text: a bad entry is named by its
line (and its index in a JSON array), a failed fetch by the HTTP status or the socket error.
"""

from __future__ import annotations

import codecs
import http.client
import json
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

from ..addresses import AllowList, is_global, normalize_ip, parse_target
from ..bans import BLOCKLIST, BanBook
from ..errors import SipguardError
from ..model import Ban
from ..store import Store

if TYPE_CHECKING:
    from ..config import BlocklistConfig
    from ..enforce.base import Enforcer

log = logging.getLogger("sipguard.blocklists")

REASON_PREFIX = "blocklist:"
MAX_BYTES = 64 << 20  # a list larger than this is refused, not half-read
MAX_ENTRIES = 1_000_000  # distinct entries of one list
MAX_REDIRECTS = 5
MAX_JSON_DEPTH = 64  # nesting of the JSON values a list may carry beside its entries
CHUNK = 64 << 10  # bytes read at a time
READ_TIME_FACTOR = 10  # a whole list must arrive within this many times the per-read timeout
USER_AGENT = "sipguard-blocklist/1"


class BlocklistError(SipguardError):
    """A list that cannot be used; nothing was changed."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What one read of a list may take: bytes, distinct entries, and where redirects may lead."""

    max_entries: int = MAX_ENTRIES
    max_bytes: int = MAX_BYTES
    allow_private: bool = False  # redirects to loopback, link-local and private addresses too

    @classmethod
    def of(cls, cfg: BlocklistConfig) -> Limits:
        return cls(cfg.max_entries, cfg.max_bytes, cfg.allow_private)


@dataclass
class ApplyResult:
    name: str
    listed: int = 0  # distinct valid entries on the list
    added: int = 0
    removed: int = 0
    kept: int = 0  # already banned by this list
    skipped_allowlisted: list[str] = field(default_factory=list)
    already_banned: int = 0  # banned for another reason: that ban stays
    added_ips: list[str] = field(default_factory=list)
    removed_ips: list[str] = field(default_factory=list)


# -- parsing, in pieces ------------------------------------------------------------------------------------

class _Entries:
    """The distinct canonical targets of a list in order, refused past `max_entries`."""

    def __init__(self, origin: str, max_entries: int | None) -> None:
        self.origin = origin
        self.max_entries = max_entries
        self.found: dict[str, None] = {}

    def add(self, item: str, where: str) -> None:
        try:
            target = parse_target(item)
        except ValueError:
            raise BlocklistError(f"{self.origin}:{where}: not an IP address or CIDR") from None
        self.found[target] = None
        if self.max_entries is not None and len(self.found) > self.max_entries:
            raise BlocklistError(f"{self.origin}: more than max_entries = {self.max_entries} entries "
                                 f"(reading stopped at line {where.split(':')[0]}); refused")


_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines cuts at
_HAS_BREAK = re.compile(f"[{_LINE_BREAKS}]")


def _text_lines(chunks: Iterable[str]) -> Iterator[str]:
    """The lines of the text (as str.splitlines cuts them) from pieces of it."""
    parts: list[str] = []
    for chunk in chunks:
        if not _HAS_BREAK.search(chunk):
            parts.append(chunk)
            continue
        parts.append(chunk)
        text = "".join(parts)
        lines = text.splitlines(keepends=True)
        last = lines[-1]
        # a last line without its break, or ending in CR (its LF may come next), waits for more
        parts = [lines.pop()] if last.rstrip(_LINE_BREAKS) == last or last.endswith("\r") else []
        yield from lines
    rest = "".join(parts)
    if rest:
        yield from rest.splitlines(keepends=True)


def _parse_text(chunks: Iterable[str], entries: _Entries) -> None:
    for no, raw in enumerate(_text_lines(chunks), 1):
        item = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if item:
            entries.add(item, str(no))


_WS = re.compile(r"[ \t\n\r]*+")
_STRING_BODY = re.compile(r'"[^"\\\x00-\x1f]*+(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*+)*+')
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?(?:[eE][+-]?[0-9]++)?")
_LITERAL = re.compile(r"true|false|null")


class _JsonTokens:
    """JSON tokens read from pieces of text, with the line each starts on; never holds more than the
    piece being read and the token being cut (bounded by the list's byte cap)."""

    def __init__(self, chunks: Iterable[str], origin: str) -> None:
        self._chunks = iter(chunks)
        self.origin = origin
        self.buf = ""
        self.pos = 0
        self.line = 1  # of self.pos
        self.eof = False

    def error(self, what: str, line: int | None = None) -> BlocklistError:
        return BlocklistError(f"{self.origin}:{self.line if line is None else line}: invalid JSON: {what}")

    def _more(self, want: int) -> bool:
        """Read at least `want` more characters (or to the end); False at the end."""
        if self.eof:
            return False
        got: list[str] = [self.buf[self.pos:]]
        n = 0
        for chunk in self._chunks:
            got.append(chunk)
            n += len(chunk)
            if n >= want:
                break
        else:
            self.eof = True
        self.buf, self.pos = "".join(got), 0
        return n > 0 or not self.eof

    def next(self) -> tuple[str, str, int]:
        """(kind, text, line): kind "s" string, "n" number, "l" literal, "p" punctuation, "?" a character
        no token starts with, "" the end."""
        want = CHUNK
        while True:
            buf, pos = self.buf, self.pos
            m = _WS.match(buf, pos)
            start = m.end()
            if start < len(buf):
                line = self.line + buf.count("\n", pos, start)
                kind, end = self._token(buf, start)
                if kind:
                    self.line, self.pos = line, end
                    return kind, buf[start:end], line
                if kind is None:  # a string that cannot be one
                    self.line = line
                    raise self.error(end)
            elif self.eof:
                self.line += buf.count("\n", pos, start)
                self.pos = start
                return "", "", self.line
            if not self._more(want):
                if start >= len(self.buf):
                    continue
            want *= 2  # one long token: read in growing pieces, so cutting it stays linear

    def _token(self, buf: str, i: int) -> tuple[str | None, Any]:
        """("kind", end) for a whole token at i; ("", 0) when the text so far may still become one."""
        ch = buf[i]
        if ch in "[]{},:":
            return "p", i + 1
        if ch == '"':
            m = _STRING_BODY.match(buf, i)
            e = m.end()
            if e < len(buf) and buf[e] == '"':
                return "s", e + 1
            if e >= len(buf):
                return ("", 0) if not self.eof else (None, "Unterminated string")
            if buf[e] == "\\" and len(buf) - e < 6 and not self.eof:  # an escape cut by the piece's end
                return "", 0
            return None, "Invalid control character or escape in a string"
        if ch == "-" or "0" <= ch <= "9":
            m = _NUMBER.match(buf, i)
            if m is None or (m.end() == len(buf) and not self.eof):
                return ("", 0) if not self.eof else (None, "Expecting value")
            return "n", m.end()
        if ch in "tfn":
            m = _LITERAL.match(buf, i)
            if m is not None:
                return "l", m.end()
            if len(buf) - i < 5 and not self.eof:
                return "", 0
        return "?", i + 1  # no token starts here: the grammar says what it expected


def _parse_json(chunks: Iterable[str], entries: _Entries) -> None:
    tok = _JsonTokens(chunks, entries.origin)
    kind, text, line = tok.next()
    if (kind, text) == ("p", "["):
        _json_array(tok, entries)
    elif (kind, text) == ("p", "{"):
        state = None  # the last 'ipaddress' member: "list", "other", or None (none)
        kind, text, line = tok.next()
        if (kind, text) != ("p", "}"):
            while True:
                if kind != "s":
                    raise tok.error("Expecting property name enclosed in double quotes", line)
                key = json.loads(text)
                kind, text, line = tok.next()
                if (kind, text) != ("p", ":"):
                    raise tok.error("Expecting ':' delimiter", line)
                kind, text, line = tok.next()
                if key == "ipaddress":
                    entries.found.clear()  # a repeated member: the last one counts (as json.loads)
                    if (kind, text) == ("p", "["):
                        _json_array(tok, entries)
                        state = "list"
                    else:
                        _json_skip(tok, kind, text, line)
                        state = "other"
                else:
                    _json_skip(tok, kind, text, line)
                kind, text, line = tok.next()
                if (kind, text) == ("p", "}"):
                    break
                if (kind, text) != ("p", ","):
                    raise tok.error("Expecting ',' delimiter", line)
                kind, text, line = tok.next()
        if state is None:
            _json_end(tok)
            raise BlocklistError(f"{entries.origin}:1: JSON object without an 'ipaddress' list")
        if state == "other":
            _json_end(tok)
            raise BlocklistError(f"{entries.origin}:1: 'ipaddress' is not a list")
    else:
        _json_skip(tok, kind, text, line)
        _json_end(tok)
        raise BlocklistError(f"{entries.origin}:1: 'ipaddress' is not a list")
    _json_end(tok)


def _json_end(tok: _JsonTokens) -> None:
    kind, _, line = tok.next()
    if kind:
        raise tok.error("Extra data", line)


def _json_array(tok: _JsonTokens, entries: _Entries) -> None:
    """The entries of a JSON array whose '[' was read: strings, each an address or CIDR."""
    kind, text, line = tok.next()
    if (kind, text) == ("p", "]"):
        return
    i = 0
    while True:
        if kind == "s":
            entries.add((text[1:-1] if "\\" not in text else json.loads(text)).strip(), f"{line}: entry {i}")
        elif kind in ("n", "l") or text in ("[", "{"):
            raise BlocklistError(f"{entries.origin}:{line}: entry {i} is not a string")
        else:
            raise tok.error("Expecting value", line)
        i += 1
        kind, text, line = tok.next()
        if (kind, text) == ("p", "]"):
            return
        if (kind, text) != ("p", ","):
            raise tok.error("Expecting ',' delimiter", line)
        kind, text, line = tok.next()


def _json_skip(tok: _JsonTokens, kind: str, text: str, line: int) -> None:
    """Read past one JSON value whose first token is given, checking its grammar, keeping nothing."""
    stack: list[str] = []
    while True:
        # a value starts here
        if (kind, text) == ("p", "[") or (kind, text) == ("p", "{"):
            if len(stack) >= MAX_JSON_DEPTH:
                raise tok.error("nested too deep", line)
            stack.append(text)
            kind, text, line = tok.next()
            if (kind, text) == ("p", "]" if stack[-1] == "[" else "}"):
                stack.pop()
            else:
                if stack[-1] == "{":
                    kind, text, line = _json_key(tok, kind, text, line)
                continue
        elif kind not in ("s", "n", "l"):
            raise tok.error("Expecting value", line)
        # after a value: close containers or go on to the next member
        while True:
            if not stack:
                return
            kind, text, line = tok.next()
            if (kind, text) == ("p", "]" if stack[-1] == "[" else "}"):
                stack.pop()
                continue
            if (kind, text) != ("p", ","):
                raise tok.error("Expecting ',' delimiter", line)
            kind, text, line = tok.next()
            if stack[-1] == "{":
                kind, text, line = _json_key(tok, kind, text, line)
            break


def _json_key(tok: _JsonTokens, kind: str, text: str, line: int) -> tuple[str, str, int]:
    """Read `"key":` (its first token given); returns the token after the colon."""
    if kind != "s":
        raise tok.error("Expecting property name enclosed in double quotes", line)
    kind, text, line = tok.next()
    if (kind, text) != ("p", ":"):
        raise tok.error("Expecting ':' delimiter", line)
    return tok.next()


def _decoded(chunks: Iterable[bytes], origin: str) -> Iterator[str]:
    """UTF-8 text from pieces of bytes (a leading BOM dropped); BlocklistError names the line of a bad byte."""
    dec = codecs.getincrementaldecoder("utf-8")()
    lines = 0
    first = True
    for data in chunks:
        try:
            text = dec.decode(data)
        except UnicodeDecodeError as exc:
            line = lines + data[: exc.start].count(b"\n") + 1
            raise BlocklistError(f"{origin}:{line}: not UTF-8 text") from None
        lines += data.count(b"\n")
        if first and text:
            text = text.lstrip("\ufeff")
            first = False
        if text:
            yield text
    try:
        tail = dec.decode(b"", final=True)
    except UnicodeDecodeError:
        raise BlocklistError(f"{origin}:{lines + 1}: not UTF-8 text") from None
    if tail:
        yield tail


def _parse(chunks: Iterable[str], origin: str, fmt: str, max_entries: int | None) -> list[str]:
    entries = _Entries(origin, max_entries)
    it = iter(chunks)
    head: list[str] = []
    if fmt == "auto":  # the first non-blank character tells
        fmt = "text"
        for chunk in it:
            head.append(chunk)
            first = chunk.lstrip()[:1]
            if first:
                fmt = "json" if first in ("{", "[") else "text"
                break
    pieces = _chain(head, it)
    if fmt == "json":
        _parse_json(pieces, entries)
    else:
        _parse_text(pieces, entries)
    return list(entries.found)


def _chain(head: list[str], rest: Iterator[str]) -> Iterator[str]:
    yield from head
    yield from rest


def parse_blocklist(text: str, origin: str, fmt: str = "auto", max_entries: int | None = None) -> list[str]:
    """The canonical targets of a list, in order, without duplicates; BlocklistError names origin:line."""
    return _parse([text.lstrip("\ufeff")], origin, fmt, max_entries)


# -- reading, bounded ----------------------------------------------------------------------------------------

class _Redirects:
    """Where the redirects of one fetch may lead (Limits.allow_private), checked twice: the URL's host
    when the redirect is followed, and the address a connection for it is made to."""

    def __init__(self, src: str, allow_private: bool) -> None:
        self.src = src
        self.allow_private = allow_private
        self.requests: weakref.WeakSet[urllib.request.Request] = weakref.WeakSet()  # the redirected ones

    def refuse(self, host: str, why: str) -> BlocklistError:
        return BlocklistError(f"{self.src}: redirect to {host} refused: {why}")

    def check_address(self, host: str, address: str) -> None:
        canonical = normalize_ip(address)
        if not self.allow_private and (canonical is None or not is_global(canonical)):
            raise self.refuse(host, f"{address} is not a public address (loopback, link-local or private); "
                                    f"allow_private = true on the list allows it")

    def check_url(self, url: str) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise self.refuse(parts.netloc or url[:80], f"a {scheme or 'relative'}: URL (only http and https)")
        host = parts.hostname
        if not host:
            raise self.refuse(url[:80], "no host")
        if self.allow_private:
            return
        try:
            port = parts.port or (443 if scheme == "https" else 80)
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, ValueError) as exc:
            raise self.refuse(host, f"cannot resolve: {exc}") from None
        for info in infos:
            self.check_address(host, str(info[4][0]))

    def connect(self, address: tuple[str, int], timeout: object = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore[attr-defined]
                source_address: tuple[str, int] | None = None) -> socket.socket:
        """socket.create_connection, to a checked address only (a name that changed since check_url)."""
        host, port = address
        error: OSError | None = None
        for af, socktype, proto, _name, sa in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            self.check_address(host, str(sa[0]))
            sock = socket.socket(af, socktype, proto)
            try:
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                    sock.settimeout(timeout)  # type: ignore[arg-type]
                if source_address:
                    sock.bind(source_address)
                sock.connect(sa)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        raise error or OSError(f"cannot connect to {host}")

    def connection(self, http_class: type[http.client.HTTPConnection]) -> Callable[..., http.client.HTTPConnection]:
        """`http_class`, connecting through `connect`."""
        redirects = self

        class Checked(http_class):  # type: ignore[valid-type, misc]
            def __init__(self, *args: Any, **kw: Any) -> None:
                super().__init__(*args, **kw)
                self._create_connection = redirects.connect

        return Checked


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS

    def __init__(self, redirects: _Redirects) -> None:
        self.redirects = redirects

    def http_error_302(self, req, fp, code, msg, headers):  # type: ignore[no-untyped-def]
        location = headers.get("location") or headers.get("uri")
        if location:  # checked before urllib looks at it (it would follow ftp:// too)
            self.redirects.check_url(urljoin(req.full_url, location.strip()))
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            self.redirects.requests.add(new)  # its connection goes to checked addresses only
        return new


class _Checked:
    """An HTTP(S) handler whose redirected requests connect only to checked addresses (not through a
    proxy: there only the URL's host is checked)."""

    redirects: _Redirects

    def do_open(self, http_class, req, **kw):  # type: ignore[no-untyped-def]
        if req in self.redirects.requests and not req.has_proxy():
            http_class = self.redirects.connection(http_class)
        return super().do_open(http_class, req, **kw)  # type: ignore[misc]


class _CheckedHTTP(_Checked, urllib.request.HTTPHandler):
    def __init__(self, redirects: _Redirects) -> None:
        super().__init__()
        self.redirects = redirects


class _CheckedHTTPS(_Checked, urllib.request.HTTPSHandler):
    def __init__(self, redirects: _Redirects) -> None:
        super().__init__()
        self.redirects = redirects


def _reading(read: Callable[[int], bytes], src: str, limits: Limits, deadline: float) -> Iterator[bytes]:
    total = 0
    while True:
        try:
            data = read(CHUNK)
        except (OSError, http.client.HTTPException) as exc:
            raise BlocklistError(f"{src}: cannot fetch: {_why(exc)}") from None
        if not data:
            return
        total += len(data)
        if total > limits.max_bytes:
            raise BlocklistError(f"{src}: larger than {_size(limits.max_bytes)}; refused")
        if time.monotonic() > deadline:
            raise BlocklistError(f"{src}: cannot fetch: too slow (the whole list takes longer than "
                                 f"{READ_TIME_FACTOR} x the timeout)")
        yield data


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n % (1 << 20) == 0 else f"{n} bytes"


def _why(exc: BaseException) -> str:
    """A fetch error in words of our own and the socket's (never text the server sent)."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP status {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        return _why(reason) if isinstance(reason, BaseException) else "cannot connect"
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    if isinstance(exc, http.client.HTTPException):
        return f"bad HTTP response ({type(exc).__name__})"
    return type(exc).__name__


def read_chunks(src: str, limits: Limits = Limits(), timeout: float = 30.0) -> Iterator[bytes]:
    """A list's bytes from a URL (http, https, file) or a local path, in pieces, never more than
    `limits.max_bytes`; BlocklistError names the source (and never holds what the server sent)."""
    deadline = time.monotonic() + READ_TIME_FACTOR * timeout  # the whole read, however slowly bytes come
    if "://" in src:
        redirects = _Redirects(src, limits.allow_private)
        opener = urllib.request.build_opener(_RedirectHandler(redirects), _CheckedHTTP(redirects),
                                             _CheckedHTTPS(redirects))
        req = urllib.request.Request(src, headers={"User-Agent": USER_AGENT})
        try:
            resp = opener.open(req, timeout=timeout)
        except BlocklistError:
            raise
        except Exception as exc:  # noqa: BLE001 - any fetch failure is one clear error
            raise BlocklistError(f"{src}: cannot fetch: {_why(exc)}") from None
        with resp:
            length = (resp.headers.get("Content-Length") or "").strip() if resp.headers else ""
            if length.isdigit() and int(length) > limits.max_bytes:
                raise BlocklistError(f"{src}: larger than {_size(limits.max_bytes)}; refused")
            yield from _reading(resp.read, src, limits, deadline)
    else:
        try:
            fh = open(src, "rb")
        except OSError as exc:
            raise BlocklistError(f"{src}: cannot fetch: {_why(exc)}") from None
        with fh:
            yield from _reading(fh.read, src, limits, deadline)


def load_blocklist(src: str, fmt: str = "auto", timeout: float = 30.0, max_entries: int | None = None,
                   *, limits: Limits | None = None) -> list[str]:
    """The canonical targets of the list at `src`, read and parsed in pieces within `limits` (or the
    defaults, with `max_entries` when given); BlocklistError names the source and the line."""
    if limits is None:
        limits = Limits() if max_entries is None else Limits(max_entries=max_entries)
    chunks = read_chunks(src, limits, timeout)
    try:
        return _parse(_decoded(chunks, src), src, fmt, limits.max_entries)
    finally:
        chunks.close()  # a refusal stops the reading now: the connection or file is closed here


def listed_bans(store: Store, name: str) -> dict[str, Ban]:
    """The bans a list holds now (reason blocklist:NAME)."""
    return {b.ip: b for b in store.active_bans(now=0) if b.reason == REASON_PREFIX + name}


def apply_blocklist(
    store: Store,
    name: str,
    entries: list[str],
    allow: AllowList,
    enforcer: Enforcer | None = None,
    now: float | None = None,
    bantime: float | None = None,
    notify_daemon: bool = True,
    book: BanBook | None = None,
) -> ApplyResult:
    """Make the list's bans equal to `entries` (minus the allow-list): add new, lift delisted.

    The changes go through `book` (the daemon's) or, without one, a strict ban book of their own over
    `enforcer` (the CLI: a kernel error changes nothing); `notify_daemon` leaves a control request.
    """
    now = time.time() if now is None else now
    res = ApplyResult(name=name, listed=len(entries))
    current = listed_bans(store, name)
    others = {b.ip for b in store.active_bans(now=0)} - current.keys()
    want: set[str] = set()
    new: list[Ban] = []
    expires = None if bantime is None else now + bantime
    reason = REASON_PREFIX + name
    for ip in entries:
        if ip in allow:
            res.skipped_allowlisted.append(ip)
            continue
        want.add(ip)
        if ip in current:
            res.kept += 1
        elif ip in others:
            res.already_banned += 1
        else:
            new.append(Ban(ip=ip, reason=reason, created=now, expires=expires, score=0.0, offence=1, manual=True))
    gone = [ip for ip in current if ip not in want]
    book = book or BanBook(store, enforcer, strict=True)
    book.ban(new, now, BLOCKLIST, batch=True)
    book.unban(gone, now, BLOCKLIST, action="delist", clear=False)
    try:
        with store.transaction():
            book.write(now)
            if notify_daemon and (new or gone):
                store.request("sync")
    except BaseException:
        book.failed()
        raise
    book.written()
    res.added, res.removed = len(new), len(gone)
    res.added_ips = [b.ip for b in new]
    res.removed_ips = gone
    return res


class BlocklistRefresher:
    """The daemon's scheduler: fetches each configured list every `refresh` on a worker thread and
    hands what it fetched to the daemon's own thread (`tick`), so store and enforcer stay
    single-threaded. A failed fetch or a malformed list changes nothing and is retried sooner."""

    RETRY = 300.0

    def __init__(self, lists: list[BlocklistConfig]) -> None:
        self.lists = lists
        self.due = {b.name: 0.0 for b in lists}
        self._busy: set[str] = set()
        self._done: list[tuple[BlocklistConfig, list[str] | None, str | None]] = []
        self._lock = threading.Lock()
        self.errors: dict[str, str] = {}

    def tick(self, now: float) -> list[tuple[BlocklistConfig, list[str] | None, str | None]]:
        """Start the fetches that are due; returns the fetches finished since the last tick."""
        finished: list[tuple[BlocklistConfig, list[str] | None, str | None]] = []
        with self._lock:
            done, self._done = self._done, []
        for cfg, entries, error in done:
            self._busy.discard(cfg.name)
            if error:
                self.errors[cfg.name] = error
                self.due[cfg.name] = now + min(cfg.refresh, self.RETRY)
            else:
                self.errors.pop(cfg.name, None)
            finished.append((cfg, entries, error))
        for cfg in self.lists:
            if cfg.name in self._busy or now < self.due[cfg.name]:
                continue
            self._busy.add(cfg.name)
            self.due[cfg.name] = now + cfg.refresh
            threading.Thread(target=self._fetch, args=(cfg,), name=f"blocklist-{cfg.name}", daemon=True).start()
        return finished

    def _fetch(self, cfg: BlocklistConfig) -> None:
        try:
            entries: list[str] | None = load_blocklist(cfg.url, cfg.format, limits=Limits.of(cfg))
            error = None
        except BlocklistError as exc:
            entries, error = None, str(exc)
        except Exception as exc:  # noqa: BLE001
            entries, error = None, f"{cfg.url}: {exc}"
        with self._lock:
            self._done.append((cfg, entries, error))


class BlocklistHook:
    """The daemon's hook for `[[blocklists]]`: each finished fetch becomes ban changes in the ban book."""

    def __init__(self, lists: list[BlocklistConfig], store: Store, allow: AllowList, metrics: Any = None) -> None:
        self.refresher = BlocklistRefresher(lists)
        self.store = store
        self.allow = allow
        self.metrics = metrics  # extras.metrics.Metrics, for the skipped counter

    def start(self, book: Any) -> None:
        pass

    def on_batch(self, report: Any) -> None:
        pass

    def tick(self, now: float, book: BanBook) -> None:
        for bl, entries, error in self.refresher.tick(now):
            if error is not None or entries is None:
                log.error("blocklist %s not refreshed (bans unchanged): %s", bl.name, error)
                continue
            res = apply_blocklist(self.store, bl.name, entries, self.allow, now=now, bantime=bl.bantime,
                                  notify_daemon=False, book=book)
            if self.metrics is not None and res.skipped_allowlisted:
                self.metrics.blocklist_skipped.labels(bl.name).inc(len(res.skipped_allowlisted))
            log.warning("blocklist %s: %d listed, +%d -%d, %d allow-listed skipped", bl.name, res.listed, res.added,
                        res.removed, len(res.skipped_allowlisted))

    def close(self) -> None:
        pass
