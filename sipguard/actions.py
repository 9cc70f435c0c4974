"""The operator's manual changes, as the CLI makes them: ban, ban a list, unban, unban everything, and
the office policy's user bans (one user at one address) by hand.

Each validates its targets (and the allow-list), then changes the bans through a ban book of its own
(sipguard/bans.py: the kernel first, then the store) in strict mode, so a command changes both or
neither, and leaves a control request in the same transaction, so a running daemon mirrors the change
into its own policy and enforcer stack; then it rings the daemon's doorbell (sipguard/doorbell.py), so
that happens at once (and, in fleet mode, the change reaches Redis at once) rather than at its tick.

The store's transaction is short (the kernel call comes before it), and a busy database is waited
for with bounded retries (sipguard/store.py). When the store write fails all the same (still locked
after the budget, disk full, read-only), the kernel is put back as the store still has it, through
the same book, for the addresses this command changed only: then the error is raised.
"""

from __future__ import annotations

import time

from .addresses import AllowList, parse_target
from .bans import MANUAL, BanBook
from .doorbell import ring
from .enforce.base import Enforcer
from .errors import SipguardError
from .model import CAPTURE_CHARS, Ban, checked_user
from .store import Store
from .text import printable


def _book(store: Store, enforcer: Enforcer | None) -> BanBook:
    return BanBook(store, enforcer, strict=True)


def _store(book: BanBook, store: Store, now: float, before: dict[str, Ban | None], *request: str) -> None:
    """Write what `book` queued and the control request in one transaction; when that fails, undo the
    kernel side for the addresses in `before` (their bans as the store held them) and re-raise."""
    try:
        with store.transaction():
            book.write(now)
            store.request(*request)
    except BaseException:
        book.failed()
        _put_back(book, now, before)
        raise
    book.written()
    ring(store.path)


def _put_back(book: BanBook, now: float, before: dict[str, Ban | None]) -> None:
    """The kernel as the store still has it, for these addresses only (kernel and nothing else)."""
    again = [b for b in before.values() if b is not None and (b.expires is None or b.expires > now)]
    lift = [ip for ip, b in before.items() if b is None]
    try:
        if again:
            book.ban(again, now, MANUAL, store=False, batch=True)
        for ip in lift:  # one by one: a batch unban would resync the whole kernel to the store
            book.unban([ip], now, MANUAL, store=False)
    except Exception:  # noqa: BLE001 - the daemon's resync, or its restore at start, repairs the kernel
        pass


def manual_ban(
    store: Store,
    target: str,
    duration: float | None,
    reason: str,
    allow: AllowList,
    enforcer: Enforcer | None = None,
    force: bool = False,
    now: float | None = None,
) -> Ban:
    """Ban an address or CIDR by hand; refuses allow-listed targets unless `force`."""
    now = time.time() if now is None else now
    try:
        ip = parse_target(target)
    except ValueError as exc:
        raise SipguardError(str(exc)) from None
    if ip in allow and not force:
        raise SipguardError(f"{ip} is allow-listed (loopback, this host or [allowlist]); use --force to ban it anyway")
    ban = Ban(ip=ip, reason=reason, created=now, expires=None if duration is None else now + duration,
              score=0.0, offence=1, manual=True)
    book = _book(store, enforcer)
    before = {ip: store.get_ban(ip)}
    [ban] = book.ban([ban], now, MANUAL)
    _store(book, store, now, before, "ban", ip)
    return ban


def manual_ban_many(
    store: Store,
    targets: list[str],
    duration: float | None,
    reason: str,
    enforcer: Enforcer | None = None,
    now: float | None = None,
) -> list[Ban]:
    """Ban many canonical targets (already parsed and allow-list checked) in one batch.

    The kernel gets one batch, the store one transaction; a running daemon re-syncs once instead of
    mirroring every ban.
    """
    now = time.time() if now is None else now
    expires = None if duration is None else now + duration
    bans = [Ban(ip=ip, reason=reason, created=now, expires=expires, score=0.0, offence=1, manual=True)
            for ip in dict.fromkeys(targets)]
    book = _book(store, enforcer)
    held = store.bans_of(b.ip for b in bans)
    before = {b.ip: held.get(b.ip) for b in bans}
    bans = book.ban(bans, now, MANUAL, batch=True)
    _store(book, store, now, before, "sync")
    return bans


def manual_unban(store: Store, target: str, enforcer: Enforcer | None = None, now: float | None = None) -> Ban | None:
    """Lift a ban; the source's earlier events stop counting, so it is not re-banned on them."""
    now = time.time() if now is None else now
    try:
        ip = parse_target(target)
    except ValueError as exc:
        raise SipguardError(str(exc)) from None
    ban = store.get_ban(ip)
    book = _book(store, enforcer)
    book.unban([ip], now, MANUAL)
    _store(book, store, now, {ip: ban}, "unban", ip)
    return ban


def manual_ban_user(
    store: Store,
    target: str,
    user: str,
    duration: float | None,
    reason: str,
    allow: AllowList,
    force: bool = False,
    now: float | None = None,
) -> Ban:
    """Ban one user at one address by hand (the office policy's narrow ban): the store here, Kamailio's
    htable entry by the running daemon (a control request), never the kernel. A network is refused (a
    user ban names one address), and so is an allow-listed address unless `force`."""
    now = time.time() if now is None else now
    try:
        ip = parse_target(target)
    except ValueError as exc:
        raise SipguardError(str(exc)) from None
    if "/" in ip:
        raise SipguardError(f"{ip} is a network: a user ban is one user at one address")
    try:
        user = checked_user(user)
    except ValueError:
        raise SipguardError(f"{printable(user)!s} is not a user a ban can name: 1 to {CAPTURE_CHARS} printable "
                            "characters, no control or format characters") from None
    if ip in allow and not force:
        raise SipguardError(f"{ip} is allow-listed (loopback, this host or [allowlist]); use --force to ban it anyway")
    ban = Ban(ip=ip, reason=reason, created=now, expires=None if duration is None else now + duration,
              score=0.0, offence=1, manual=True, user=user)
    book = _book(store, None)  # no kernel: a user ban is Kamailio's (the daemon sets its htable entry)
    [ban] = book.ban([ban], now, MANUAL)
    _store_user(book, store, now, "ban_user", ip, user)
    return ban


def _store_user(book: BanBook, store: Store, now: float, action: str, ip: str, user: str) -> None:
    """Write a user ban change `book` queued and its control request in one transaction (no kernel side
    to put back: the running daemon changes Kamailio's entry when it mirrors the request)."""
    try:
        with store.transaction():
            book.write(now)
            store.request(action, ip, user=user)
    except BaseException:
        book.failed()
        raise
    book.written()
    ring(store.path)


def manual_unban_user(store: Store, target: str, user: str, now: float | None = None) -> Ban | None:
    """Lift the user ban (the office policy) of `user` at address `target`: the store here, Kamailio's
    htable entry by the running daemon (a control request). None when there was none."""
    now = time.time() if now is None else now
    try:
        ip = parse_target(target)
    except ValueError as exc:
        raise SipguardError(str(exc)) from None
    ban = next((b for b in store.user_bans_of(ip) if b.user == user), None)
    if ban is None:
        return None
    book = _book(store, None)  # no kernel: a user ban is Kamailio's (the daemon lifts its htable entry)
    book.unban_user(ip, user, now)
    _store_user(book, store, now, "unban_user", ip, user)
    return ban


def unban_all(store: Store, enforcer: Enforcer | None = None, now: float | None = None) -> list[Ban]:
    """Lift every ban (one kernel batch, one store transaction)."""
    now = time.time() if now is None else now
    bans = store.active_bans(now=0)
    book = _book(store, enforcer)
    book.unban([b.ip for b in bans], now, MANUAL)  # several: one kernel batch (nothing stays)
    _store(book, store, now, {b.ip: b for b in bans}, "unban_all")
    return bans
