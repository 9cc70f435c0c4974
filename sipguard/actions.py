"""Operator actions shared by the CLI and the daemon: manual ban and unban.

They validate against the allow-list, write the store, apply the enforcer when one is given,
and leave a control request so a running daemon mirrors the change within a second.
"""

from __future__ import annotations

import time

from .addresses import AllowList, parse_target
from .enforce import Enforcer
from .errors import SipguardError
from .model import Ban
from .store import Store


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
    with store.transaction():  # a kernel error rolls the store back: both or neither
        store.put_ban(ban, now)
        store.request("ban", ip)
        if enforcer is not None:
            enforcer.ban(ban, now)
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

    The kernel gets one batch, the store one transaction; a kernel error rolls the store back.
    A running daemon re-syncs once instead of mirroring every ban.
    """
    now = time.time() if now is None else now
    expires = None if duration is None else now + duration
    bans = [Ban(ip=ip, reason=reason, created=now, expires=expires, score=0.0, offence=1, manual=True)
            for ip in dict.fromkeys(targets)]
    with store.transaction():
        for ban in bans:
            store.put_ban(ban, now)
        store.request("sync")
        if enforcer is not None:
            enforcer.ban_many(bans, now)
    return bans


def manual_unban(store: Store, target: str, enforcer: Enforcer | None = None, now: float | None = None) -> Ban | None:
    """Lift a ban; the source's earlier events stop counting, so it is not re-banned on them."""
    now = time.time() if now is None else now
    try:
        ip = parse_target(target)
    except ValueError as exc:
        raise SipguardError(str(exc)) from None
    with store.transaction():
        ban = store.remove_ban(ip, now)
        store.mark_cleared(ip, now)
        store.request("unban", ip)
    if enforcer is not None:
        enforcer.unban(ip)
    return ban


def unban_all(store: Store, enforcer: Enforcer | None = None, now: float | None = None) -> list[Ban]:
    now = time.time() if now is None else now
    with store.transaction():
        bans = store.active_bans(now=0)
        for ban in bans:
            store.remove_ban(ban.ip, now)
            store.mark_cleared(ban.ip, now)
        store.request("unban_all")
    if enforcer is not None:  # one batch, not one kernel call per ban
        enforcer.sync(store.active_bans(now), now)
    return bans
