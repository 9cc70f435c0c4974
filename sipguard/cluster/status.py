"""`sipguard status` for fleet mode: this node's last view (from the store) and the nodes Redis has seen.

Read only: it reads one meta key of the store and a few Redis keys (with its own short-lived
connection) and formats them; it changes nothing in either. What Redis holds is untrusted (anyone
who can write there can put anything in a heartbeat): every value is checked and converted here
(`_node_info`), node names are plain text of bounded length, a heartbeat that is no JSON object,
or a time that is no finite number, shows as unknown and never stops `status`; the Redis URL is
shown with its passwords as ***.
"""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING, Any

from .connection import connect, describe_error, redacted, redis_errors
from .wire import node_name

if TYPE_CHECKING:
    from ..config import ClusterConfig
    from ..store import Store

STATUS_META = "cluster_status"  # this node's cluster view, for `sipguard status` (written by the bridge)
MAX_NODES = 1000  # nodes listed (a Redis writer could add millions of names)
REFUSED = ("unverified", "malformed", "too_wide", "allowlisted", "own_address", "redis_server", "forged_events")


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def json_object(raw: Any) -> dict:
    """A heartbeat (or this node's stored view) as a dict: {} for anything that is not a json object
    of at most 64 KiB (anyone with Redis access can write one)."""
    if not isinstance(raw, str) or len(raw) > 65536:
        return {}
    try:
        d = json.loads(raw)
    except (ValueError, RecursionError):  # (a heartbeat nested thousands deep: anyone can write one)
        return {}
    return d if isinstance(d, dict) else {}


def _node_info(name: Any, last: Any, beat: Any, now: float) -> dict:
    """One node of `status` from the nodes zset and its heartbeat key, whatever they hold."""
    b = json_object(beat)
    last = _number(last)
    outbox = b.get("outbox")
    return {"node": node_name(name), "last_heartbeat": last,
            "age": None if last is None else round(now - last, 1), "alive": beat is not None,
            "in_sync": b.get("in_sync") is True,
            "outbox": outbox if isinstance(outbox, int) and not isinstance(outbox, bool) else None}


def cluster_status(cfg: ClusterConfig, store: Store, now: float | None = None) -> dict:
    """For `sipguard status`: this node's last view (from SQLite) and the nodes Redis has seen."""
    now = time.time() if now is None else now
    me = json_object(store.get_meta(STATUS_META))
    info: dict = {"node": cfg.node_name, "redis": redacted(cfg.redis_url), "this_node": me, "nodes": [],
                  "reachable": False}
    try:
        client = connect(cfg)
        try:
            P = cfg.key_prefix
            seen = client.zrevrange(P + "nodes", 0, MAX_NODES - 1, withscores=True)
            names = [n for n, _ in seen]
            beats = client.mget([P + "node:" + n for n in names]) if names else []
            info["reachable"] = True
            info["bans"] = client.hlen(P + "bans")
            info["nodes"] = sorted((_node_info(name, last, beat, now) for (name, last), beat in zip(seen, beats)),
                                   key=lambda n: n["node"])
        finally:
            client.close()
    except redis_errors() as exc:
        info["error"] = describe_error(exc, cfg.redis_url)
    return info


def cluster_lines(info: dict) -> list[str]:
    """`sipguard status` text for cluster_status()."""
    me = info.get("this_node") or {}
    beat = _number(me.get("heartbeat"))
    fresh = beat is not None and time.time() - beat < 10
    outbox = me.get("outbox") if isinstance(me.get("outbox"), int) else 0
    sync = ("in sync" if me.get("in_sync") is True else f"NOT in sync ({outbox} queued to publish)") \
        if fresh else "no recent heartbeat from this node's daemon"
    lines = [f"cluster: node {info['node']} via {info['redis']}: {sync}"]
    stats = me.get("stats") if isinstance(me.get("stats"), dict) else {}
    refused = {k: v for k in REFUSED if isinstance(v := stats.get(k), int) and not isinstance(v, bool) and v > 0}
    if refused:
        lines.append("  refused from the fleet: " + ", ".join(f"{k}={v}" for k, v in refused.items()))
    if not info.get("reachable"):
        lines.append(f"  Redis unreachable from here: {info.get('error', '?')}")
        return lines
    lines.append(f"  shared bans: {info.get('bans', 0)}; nodes seen:")
    for n in info["nodes"]:
        state = ("in sync" if n["in_sync"] else "NOT in sync") if n["alive"] else "gone (heartbeat expired)"
        age = "unknown" if n["age"] is None else f"{n['age']:.1f}s ago"
        lines.append(f"    {n['node']}: last heartbeat {age}, {state}")
    return lines
