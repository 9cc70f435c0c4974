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
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..addresses import AllowList, parse_target
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


class BlocklistError(SipguardError):
    """A list that cannot be used; nothing was changed."""


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


def parse_blocklist(text: str, origin: str, fmt: str = "auto") -> list[str]:
    """The canonical targets of a list, in order, without duplicates; BlocklistError names origin:line."""
    body = text.lstrip("\ufeff")
    if fmt == "auto":
        first = body.lstrip()[:1]
        fmt = "json" if first in ("{", "[") else "text"
    out: dict[str, None] = {}
    if fmt == "json":
        try:
            data = json.loads(body)
        except json.JSONDecodeError as exc:
            raise BlocklistError(f"{origin}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        if isinstance(data, dict):
            if "ipaddress" not in data:
                raise BlocklistError(f"{origin}:1: JSON object without an 'ipaddress' list")
            items = data["ipaddress"]
        else:
            items = data
        if not isinstance(items, list):
            raise BlocklistError(f"{origin}:1: 'ipaddress' is not a list")
        lines = body.splitlines()
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise BlocklistError(f"{origin}:{_json_line(lines, item)}: entry {i} is not a string: {item!r}")
            try:
                out[parse_target(item.strip())] = None
            except ValueError as exc:
                raise BlocklistError(f"{origin}:{_json_line(lines, item)}: entry {i}: {exc}") from None
        return list(out)
    for no, raw in enumerate(body.splitlines(), 1):
        item = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not item:
            continue
        try:
            out[parse_target(item)] = None
        except ValueError as exc:
            raise BlocklistError(f"{origin}:{no}: {exc}") from None
    return list(out)


def _json_line(lines: list[str], item: Any) -> int:
    needle = json.dumps(item)
    for no, line in enumerate(lines, 1):
        if needle in line:
            return no
    return 1


def read_source(src: str, timeout: float = 30.0) -> str:
    """A list's text from a URL (http, https, file) or a local path; errors name the source."""
    try:
        if "://" in src:
            req = urllib.request.Request(src, headers={"User-Agent": "sipguard-blocklist/1"})
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - operator's URL
                data = resp.read(MAX_BYTES + 1)
        else:
            with open(src, "rb") as fh:
                data = fh.read(MAX_BYTES + 1)
    except Exception as exc:  # noqa: BLE001 - any fetch failure is one clear error
        raise BlocklistError(f"{src}: cannot fetch: {exc}") from None
    if len(data) > MAX_BYTES:
        raise BlocklistError(f"{src}: larger than {MAX_BYTES >> 20} MiB; refused")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise BlocklistError(f"{src}:{line}: not UTF-8 text") from None


def load_blocklist(src: str, fmt: str = "auto", timeout: float = 30.0, max_entries: int | None = None) -> list[str]:
    entries = parse_blocklist(read_source(src, timeout), src, fmt)
    if max_entries is not None and len(entries) > max_entries:
        raise BlocklistError(f"{src}: {len(entries)} entries, more than max_entries = {max_entries}; refused")
    return entries


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
            entries: list[str] | None = load_blocklist(cfg.url, cfg.format, max_entries=cfg.max_entries)
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
