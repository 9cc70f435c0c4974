"""The fleet's wire format: a Ban <-> the ban json kept in Redis and carried on the stream.

Pure conversion with bounds checks: what comes from Redis is untrusted (any node, or anyone with
access to it, can write there), so `parse_ban` refuses what is not a well-formed ban (ValueError)
rather than guessing. Nothing here talks to Redis or touches the store.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..addresses import parse_target
from ..model import Ban


def ban_payload(ban: Ban, ban_id: str, origin: str) -> str:
    """The ban json for Redis: the ban's fields, its fleet id and the node it came from."""
    return json.dumps({"ip": ban.ip, "reason": ban.reason, "created": ban.created, "expires": ban.expires,
                       "score": ban.score, "offence": ban.offence, "manual": ban.manual, "id": ban_id,
                       "origin": origin}, separators=(",", ":"))


def checked_number(v: Any, what: str) -> float:
    """`v` as a float when it is a finite number (not a bool); else ValueError("bad WHAT")."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"bad {what}")
    return float(v)


def canonical_ip(ip: Any) -> str:
    """The address or CIDR as the CLI and the filters write it (so one source is one key)."""
    if not isinstance(ip, str) or len(ip) > 64:
        raise ValueError("bad ip")
    return parse_target(ip)


def parse_ban(payload: str) -> tuple[Ban, str, str]:
    """A ban json from Redis → (Ban, id, origin); ValueError when malformed."""
    d = json.loads(payload)
    if not isinstance(d, dict):
        raise ValueError("ban is not an object")
    ip = canonical_ip(d.get("ip"))
    expires = d.get("expires")
    ban = Ban(ip=ip, reason=str(d.get("reason") or "cluster")[:200],
              created=checked_number(d.get("created"), "created"),
              expires=None if expires is None else checked_number(expires, "expires"),
              score=checked_number(d.get("score", 0.0) or 0.0, "score"),
              offence=int(checked_number(d.get("offence", 1) or 1, "offence")),
              manual=bool(d.get("manual", False)))
    ban_id, origin = d.get("id"), d.get("origin")
    if not isinstance(ban_id, str) or not ban_id or not isinstance(origin, str):
        raise ValueError("ban without id/origin")
    return ban, ban_id, origin
