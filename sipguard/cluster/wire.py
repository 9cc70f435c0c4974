"""The fleet's wire format: a Ban <-> the ban json kept in Redis and carried on the stream.

Pure conversion with bounds checks: what comes from Redis is untrusted (any node, or anyone with
access to it, can write there), so `parse_ban` refuses what is not a well-formed ban (ValueError)
rather than guessing, and with a `Signer` that has a secret, what no node signed (`Unverified`).
The bounds are the CLI's and the config's: `created` at most a day ahead of this node's clock, a ban time
of at most 100 years (MAX_DURATION) or permanent, finite scores, whole offence counts, ids and node
names in the node-name alphabet; reasons are plain text (control characters removed) of bounded
length (`plain_text`) before they reach a log, the store or a terminal. Nothing here talks to Redis
or touches the store.

A node's list of bans (an import, the bans it re-publishes) travels as one bulk entry (op `bans`,
`check_bulk`): the ban jsons as one json array with one tag for the whole list (kind "bans"), and
`skip`, the positions the publish script refused (unsigned: whoever writes to Redis can drop a ban
from it, or replay one a node signed, as with single entries). Each ban in it is bounded as a single
one is.

User bans (the office policy: one user at one address, `Ban.user`) travel as their own kinds, `userban`
and `userunban` (`user_ban_payload`, `parse_user_ban`, `parse_user_unban`): the ban json plus the user,
signed as kind "userban", so a user ban never reads as an address ban. The user is attacker text: at
most CAPTURE_CHARS characters, and one with a control or format character is refused, not cleaned.
"""

from __future__ import annotations

import json
import math
import re
import socket
import unicodedata
from dataclasses import replace
from typing import Any

from orjson import loads as _loads  # a quarter of json.loads's time: a burst parses 100,000 bans

from ..addresses import parse_target
from ..config import MAX_DURATION
from ..model import Ban, checked_user
from .signing import Signer, ban_parts, bulk_parts, unban_parts, user_ban_parts, user_unban_parts

CREATED_SKEW = 86400.0  # a ban's `created` is at most a day away from this node's clock
MAX_SCORE = 1e12
MAX_OFFENCE = 1_000_000
REASON_CHARS = 200
BULK_MAX = 2000  # bans in one bulk stream entry (nodes write at most FLUSH_BATCH)
BULK_CHARS = BULK_MAX * 4096  # the json of a bulk entry's list, at most
NAME_CHARS = 64
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # [cluster] node_name's alphabet
_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,160}$")


class Unverified(ValueError):
    """A value whose tag does not verify under any accepted secret (forged, or another fleet's)."""


def plain_text(v: Any, limit: int = REASON_CHARS) -> str:
    """`v` as one line of plain text: control and format characters (CR, LF, ESC, bidi overrides)
    removed, at most `limit` characters."""
    s = v if isinstance(v, str) else str(v)
    if s.isprintable():  # (no character of category C, the common case: nothing to remove)
        return s[:limit]
    s = "".join(c for c in s[: limit * 4] if unicodedata.category(c)[0] != "C")
    return s[:limit]


def node_name(v: Any) -> str:
    """A node name as it may be shown: plain text of at most NAME_CHARS characters."""
    return plain_text(v, NAME_CHARS)


def ban_dict(ban: Ban, ban_id: str, origin: str) -> dict:
    return {"ip": ban.ip, "reason": plain_text(ban.reason), "created": ban.created, "expires": ban.expires,
            "score": ban.score, "offence": ban.offence, "manual": ban.manual, "id": ban_id, "origin": origin}


def ban_payload(ban: Ban, ban_id: str, origin: str, signer: Signer | None = None) -> str:
    """The ban json for Redis: the ban's fields, its fleet id, the node it came from and its tag."""
    d = ban_dict(ban, ban_id, origin)
    if signer is not None and signer.enabled:
        d["sig"] = signer.tag("ban", *ban_parts(d))
    return json.dumps(d, separators=(",", ":"))


def bulk_payload(payloads: list[str]) -> str:
    """The list a bulk stream entry carries: the ban jsons (`ban_payload`) as one json array."""
    return "[" + ",".join(payloads) + "]"


def checked_number(v: Any, what: str) -> float:
    """`v` as a float when it is a finite number (not a bool); else ValueError("bad WHAT")."""
    try:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"bad {what}")
        return float(v)
    except OverflowError:  # an integer of hundreds of digits
        raise ValueError(f"bad {what}") from None


def checked_time(v: Any, what: str, now: float | None) -> float:
    """A finite time at most CREATED_SKEW (a day) ahead of `now` and at most MAX_DURATION (100 years)
    behind it (when `now` is given: a ban re-published after an outage or a Redis restart was made
    before, never after); else ValueError."""
    t = _finite(v, what)
    if now is not None and t > now + CREATED_SKEW:
        raise ValueError(f"{what} more than a day ahead of this node's clock")
    if now is not None and t < now - MAX_DURATION:
        raise ValueError(f"{what} more than 100 years ago")
    return t


def canonical_ip(ip: Any) -> str:
    """The address or CIDR as the CLI and the filters write it (so one source is one key)."""
    if not isinstance(ip, str) or len(ip) > 64:
        raise ValueError("bad ip")
    if "/" not in ip:  # an address already in canonical text (what nodes publish) is taken as it is
        v6 = ":" in ip
        af = socket.AF_INET6 if v6 else socket.AF_INET
        try:
            same = socket.inet_ntop(af, socket.inet_pton(af, ip)) == ip
        except (OSError, ValueError):
            same = False
        # (the kernel's text is sipguard's except for v4 inside v6, and the unspecified address is no source)
        if same and (("." not in ip and ip != "::") if v6 else ip != "0.0.0.0"):
            return ip
    return parse_target(ip)


def checked_id(v: Any) -> str:
    if not isinstance(v, str) or not _ID.match(v):
        raise ValueError("bad id")
    return v


def checked_origin(v: Any) -> str:
    if not isinstance(v, str) or not _NAME.match(v):
        raise ValueError("bad origin")
    return v


def parse_ban(payload: str, signer: Signer | None = None, now: float | None = None) -> tuple[Ban, str, str]:
    """A ban json from Redis → (Ban, id, origin); ValueError when malformed or out of bounds,
    Unverified when `signer` has a secret and no accepted one signed it. With `now`, `created` must be
    within a day of it.

    One json parse, the tag checked on the fields as parsed, then each bound once (a burst parses
    100,000 of these: no helper object per ban)."""
    return ban_of(checked_ban(payload, signer, now))


def checked_ban(payload: str, signer: Signer | None = None, now: float | None = None) -> tuple:
    """`parse_ban` as a checked "ban" tuple (below), without the Ban object (the reader's process
    sends tuples)."""
    if not isinstance(payload, str) or len(payload) > 4096:
        raise ValueError("bad ban json")
    d = _json(payload)
    if not isinstance(d, dict):
        raise ValueError("ban is not an object")
    get = d.get
    if signer is not None and signer.enabled and not signer.verify(  # (the fields of `ban_parts`, in its order)
            get("sig"), "ban", get("ip"), get("reason"), get("created"), get("expires"), get("score"),
            get("offence"), get("manual"), get("id"), get("origin"), now=now):
        raise Unverified("ban not signed by this fleet")
    return _bounded_ban(d, now)


def _json(text: str) -> Any:
    """A json text from Redis, parsed (orjson, then json for what orjson refuses and json takes: NaN,
    huge integers, lone surrogates; the bounds decide on those); ValueError for anything else, a
    nesting deeper than Python's recursion included (anyone with Redis access can write one)."""
    try:
        return _loads(text)
    except ValueError:
        try:
            return json.loads(text)
        except RecursionError:
            raise ValueError("json nested too deep") from None


def _bounded_ban(d: dict, now: float | None) -> tuple:
    """A ban json's fields (its tag verified, or the list's that holds it) as a checked "ban" tuple;
    ValueError when one is out of bounds."""
    get = d.get
    ip, reason, created, expires = get("ip"), get("reason"), get("created"), get("expires")
    score, offence, manual, ban_id, origin = get("score"), get("offence"), get("manual"), get("id"), get("origin")
    ip = canonical_ip(ip)
    created = checked_time(created, "created", now)
    if expires is not None:
        expires = _finite(expires, "expires")
        if not created < expires <= created + MAX_DURATION + 1:
            raise ValueError("expires out of bounds (after created, at most 100 years)")
    score = _finite(score or 0.0, "score")
    if not 0 <= score <= MAX_SCORE:
        raise ValueError("score out of bounds")
    offence = _finite(offence or 1, "offence")
    if offence != int(offence) or not 1 <= offence <= MAX_OFFENCE:
        raise ValueError("offence out of bounds")
    if manual is None and "manual" not in d:
        manual = False
    elif manual is not True and manual is not False:
        raise ValueError("bad manual")
    if ban_id is None or origin is None:
        raise ValueError("ban without id/origin")
    ban_id, origin = checked_id(ban_id), checked_origin(origin)
    return ("ban", ip, plain_text(reason or "cluster"), created, expires, score, int(offence), manual, ban_id, origin)


def _finite(v: Any, what: str) -> float:
    """`checked_number`, with the usual json number (a finite float, or an int) first."""
    t = type(v)
    if t is float and v - v == 0:  # (inf - inf and nan - nan are nan)
        return v
    return checked_number(v, what)


def parse_unban(fields: dict, signer: Signer | None = None, now: float | None = None) -> tuple[str, str, str, str, float]:
    """An unban stream entry → (op, ip or "*", id, origin, at); ValueError when malformed (`at` a finite
    time at most a day ahead), Unverified when `signer` has a secret and no accepted one signed it."""
    op, ip, ban_id, origin, at = (fields.get(k) for k in ("op", "ip", "id", "origin", "at"))
    if op not in ("unban", "unban_all") or not isinstance(at, str) or len(at) > 40:
        raise ValueError("bad unban")
    if signer is not None and signer.enabled and not signer.verify(
            fields.get("sig"), op, *unban_parts(op, ip, ban_id, origin, at), now=now):
        raise Unverified("unban not signed by this fleet")
    try:
        t = float(at)
    except ValueError:
        raise ValueError("bad at") from None
    t = checked_time(t, "at", now)
    target = "*" if op == "unban_all" else canonical_ip(ip)
    return op, target, checked_id(ban_id), checked_origin(origin), t


def tombstone_at(value: Any, ip: str, signer: Signer, now: float | None = None) -> float | None:
    """The time of a verified unban of `ip` from its tombstone in the unbans hash (publish.lua writes
    "at|op|id|origin|sig"), else None."""
    if not isinstance(value, str) or len(value) > 512:
        return None
    parts = value.split("|")
    if len(parts) != 5:
        return None if signer.enabled else _float(parts[0])
    at, op, ban_id, origin, sig = parts
    target = "*" if op == "unban_all" else ip
    if op not in ("unban", "unban_all") or not signer.verify(sig, op, *unban_parts(op, target, ban_id, origin, at),
                                                             now=now):
        return None
    return _float(at)


def user_tombstone_at(value: Any, ip: str, user: str, signer: Signer, now: float | None = None) -> float | None:
    """The time of a verified unban of `user` at `ip` from its tombstone in the user unbans hash
    (publish.lua writes "at|id|origin|sig"), else None."""
    if not isinstance(value, str) or len(value) > 512:
        return None
    parts = value.split("|")
    if len(parts) != 4:
        return None if signer.enabled else _float(parts[0])
    at, ban_id, origin, sig = parts
    if signer.enabled and not signer.verify(sig, "userunban", *user_unban_parts(ip, user, ban_id, origin, at), now=now):
        return None
    return _float(at)


def _float(v: str) -> float | None:
    try:
        t = float(v)
    except ValueError:
        return None
    return t if math.isfinite(t) else None


# -- user bans (the office policy) ---------------------------------------------------------------------
def user_ban_payload(ban: Ban, ban_id: str, origin: str, signer: Signer | None = None) -> str:
    """The json of a user ban (Ban.user set) for the stream and the shared user-ban hash, signed as "userban"."""
    d = ban_dict(ban, ban_id, origin)
    d["user"] = checked_user(ban.user)
    if signer is not None and signer.enabled:
        d["sig"] = signer.tag("userban", *user_ban_parts(d))
    return json.dumps(d, separators=(",", ":"))


def parse_user_ban(payload: str, signer: Signer | None = None, now: float | None = None) -> tuple[Ban, str, str]:
    """A user ban json → (Ban with `user`, id, origin), with the bounds of `parse_ban` and `checked_user`;
    Unverified when no accepted secret signed it as a user ban."""
    if not isinstance(payload, str) or len(payload) > 4096:
        raise ValueError("bad user ban json")
    d = _json(payload)
    if not isinstance(d, dict):
        raise ValueError("user ban is not an object")
    if signer is not None and signer.enabled and not signer.verify(d.get("sig"), "userban", *user_ban_parts(d),
                                                                   now=now):
        raise Unverified("user ban not signed by this fleet")
    user = checked_user(d.get("user"))
    rest = {k: v for k, v in d.items() if k not in ("sig", "user")}
    ban, ban_id, origin = parse_ban(json.dumps(rest), None, now)  # the address ban's bounds, already verified
    return replace(ban, user=user), ban_id, origin  # (a network: the guard rails, then the bridge, refuse it)


def parse_user_unban(fields: dict, signer: Signer | None = None, now: float | None = None
                     ) -> tuple[str, str, str, str, float]:
    """A userunban stream entry → (ip, user, id, origin, at); ValueError when malformed, Unverified when
    not signed by this fleet."""
    ip, user, ban_id, origin, at = (fields.get(k) for k in ("ip", "user", "id", "origin", "at"))
    if fields.get("op") != "userunban" or not isinstance(at, str) or len(at) > 40:
        raise ValueError("bad user unban")
    if signer is not None and signer.enabled and not signer.verify(
            fields.get("sig"), "userunban", *user_unban_parts(ip, user, ban_id, origin, at), now=now):
        raise Unverified("user unban not signed by this fleet")
    try:
        t = float(at)
    except ValueError:
        raise ValueError("bad at") from None
    target = canonical_ip(ip)
    if "/" in target:
        raise ValueError("a user ban is of one address, not a network")
    return target, checked_user(user), checked_id(ban_id), checked_origin(origin), checked_time(t, "at", now)


# -- checked entries: what the stream reader's process hands the daemon -----------------------------
# A stream entry or a shared ban, checked (tag, bounds, canonical address) and reduced to a tuple of
# plain values, so the daemon's thread only applies it (the guard rails, the ban book, the store):
#   ("ban", ip, reason, created, expires, score, offence, manual, ban_id, origin)
#   ("unban", ip, at) / ("unban_all", "*", at)
#   ("user", fields)    (a userban / userunban entry, as read: `parse_user_ban` / `parse_user_unban` there)
#   ("unverified", "") / ("malformed", why)      (skipped: the daemon counts and logs them)
#   ("bulk", [checked tuple per ban])    (`check_entry` of a bulk entry; `check_reply` lists them flat)
# The tuples are marshalled through a pipe between two processes of the same node: never through Redis.

def ban_of(item: tuple) -> tuple[Ban, str, str]:
    """A checked "ban" tuple back to (Ban, id, origin)."""
    _, ip, reason, created, expires, score, offence, manual, ban_id, origin = item
    return Ban(ip, reason, created, expires, score, offence, manual), ban_id, origin


def _skip(exc: BaseException) -> tuple:
    if isinstance(exc, Unverified):
        return ("unverified", "")
    return ("malformed", plain_text(f"no {exc}" if isinstance(exc, KeyError) else exc, 120))


def check_shared(payload: Any, signer: Signer | None, now: float) -> tuple:
    """A value of the shared ban set → a checked "ban" tuple, or a skip tuple."""
    try:
        return checked_ban(payload, signer, now)
    except (ValueError, TypeError) as exc:
        return _skip(exc)


def check_ban_entry(ip: Any, payload: Any, signer: Signer | None, now: float) -> tuple:
    """A "ban" stream entry given its `ip` and `ban` fields → a checked "ban" tuple (its `ip` the same
    address as its ban's); raises as `checked_ban` does (`check_entry` turns that into a skip)."""
    checked = checked_ban(payload, signer, now)
    if ip != checked[1] and checked[1] != canonical_ip(ip):  # (the same text: canonical already)
        raise ValueError("ip mismatch")
    return checked


def check_bulk(fields: dict, signer: Signer | None, now: float) -> list[tuple]:
    """A bulk stream entry (op "bans": a node's list of bans, one tag for the list, `skip` the positions
    the publish script refused) → a checked tuple per ban applied (a skip tuple for a ban out of
    bounds), or one skip tuple for the whole entry (not signed by this fleet, malformed)."""
    try:
        payload, origin, skip = fields.get("bans"), fields.get("origin"), fields.get("skip") or ""
        if not isinstance(payload, str) or len(payload) > BULK_CHARS or not isinstance(skip, str) \
                or len(skip) > BULK_CHARS // 100:
            raise ValueError("bad bans list")
        if signer is not None and signer.enabled and not signer.verify(
                fields.get("sig"), "bans", *bulk_parts(origin, payload), now=now):  # type: ignore[arg-type]
            raise Unverified("bans list not signed by this fleet")
        bans = _json(payload)
        if not isinstance(bans, list) or len(bans) > BULK_MAX:
            raise ValueError("bad bans list")
        refused = {int(k) for k in skip.split(",")} if skip else set()  # (int(): ValueError for a bad one)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        return [_skip(exc)]
    out = []
    for k, d in enumerate(bans, 1):
        if k in refused:
            continue
        try:
            if not isinstance(d, dict):
                raise ValueError("ban is not an object")
            out.append(_bounded_ban(d, now))
        except (ValueError, TypeError) as exc:
            out.append(_skip(exc))
    return out


def check_reply(entries: Any, signer: Signer | None, now: float) -> list[tuple]:
    """An XREAD reply's entries ([(entry id, field-value list)]) → [(entry id, checked tuple)], a bulk
    entry's bans one tuple each (the reader's process hands the daemon this list)."""
    out = []
    for eid, flat in entries:
        if type(flat) is list and len(flat) > 1 and flat[1] == "bans" and flat[0] == "op":
            it = iter(flat)
            out += [(eid, checked) for checked in check_bulk(dict(zip(it, it)), signer, now)]
        else:
            out.append((eid, check_flat_entry(flat, signer, now)))
    return out


def check_flat_entry(flat: Any, signer: Signer | None, now: float) -> tuple:
    """`check_entry` of a stream entry as XREAD's reply holds it (its field-value list): the ban entries
    nodes write (op, ip, id, origin, ban: publish.lua's order) without a dict, any other through one."""
    if type(flat) is list and len(flat) == 10 and flat[0] == "op" and flat[1] == "ban" and flat[2] == "ip" \
            and flat[8] == "ban":
        try:
            return check_ban_entry(flat[3], flat[9], signer, now)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            return _skip(exc)
    if isinstance(flat, dict):
        return check_entry(flat, signer, now)
    if not isinstance(flat, list):
        return check_entry({}, signer, now)
    it = iter(flat)
    return check_entry(dict(zip(it, it)), signer, now)


def check_entry(fields: Any, signer: Signer | None, now: float) -> tuple:
    """A stream entry (its fields) → a checked tuple ("ban", "unban", "unban_all") or a skip tuple:
    the tag verified, every bound checked, the entry's `ip` the same address as its ban's."""
    try:
        op = fields.get("op")
        if op == "ban":
            return check_ban_entry(fields.get("ip"), fields["ban"], signer, now)
        if op in ("unban", "unban_all"):
            op, ip, _, _, at = parse_unban(fields, signer, now)
            return (op, ip, at)
        if op == "bans":  # a node's list: ("bulk", [checked tuple per ban])
            return ("bulk", check_bulk(fields, signer, now))
        if op in ("userban", "userunban"):  # rare (the office policy): checked by the daemon's thread
            return ("user", {k: v for k, v in fields.items() if isinstance(k, str) and isinstance(v, str)})
        raise ValueError("unknown op")
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        return _skip(exc)
