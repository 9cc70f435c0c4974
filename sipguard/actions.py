"""The operator's manual changes, as the CLI makes them: ban, ban a list, unban, unban everything.

Each validates its targets (and the allow-list), then changes the bans through a ban book of its own
(sipguard/bans.py: the kernel first, then the store) in strict mode, so a command changes both or
neither, and leaves a control request in the same transaction, so a running daemon mirrors the change
into its own policy and enforcer stack within a second.
"""

from __future__ import annotations

import time

from .addresses import AllowList, parse_target
from .bans import MANUAL, BanBook
from .enforce.base import Enforcer
from .errors import SipguardError
from .model import Ban
from .store import Store


def _book(store: Store, enforcer: Enforcer | None) -> BanBook:
    return BanBook(store, enforcer, strict=True)


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
    [ban] = book.ban([ban], now, MANUAL)
    with store.transaction():
        book.write(now)
        store.request("ban", ip)
    book.written()
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
    bans = book.ban(bans, now, MANUAL, batch=True)
    with store.transaction():
        book.write(now)
        store.request("sync")
    book.written()
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
    with store.transaction():
        book.write(now)
        store.request("unban", ip)
    book.written()
    return ban


def unban_all(store: Store, enforcer: Enforcer | None = None, now: float | None = None) -> list[Ban]:
    """Lift every ban (one kernel batch, one store transaction)."""
    now = time.time() if now is None else now
    bans = store.active_bans(now=0)
    book = _book(store, enforcer)
    book.unban([b.ip for b in bans], now, MANUAL)  # several: one kernel batch (nothing stays)
    with store.transaction():
        book.write(now)
        store.request("unban_all")
    book.written()
    return bans
