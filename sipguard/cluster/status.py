"""`sipguard status` for fleet mode: this node's last view (from the store) and the nodes Redis has seen.

Read only: it reads one meta key of the store and a few Redis keys (with its own short-lived
connection) and formats them; it changes nothing in either.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from .connection import connect, redacted, redis_errors

if TYPE_CHECKING:
    from ..config import ClusterConfig
    from ..store import Store

STATUS_META = "cluster_status"  # this node's cluster view, for `sipguard status` (written by the bridge)


def cluster_status(cfg: ClusterConfig, store: Store, now: float | None = None) -> dict:
    """For `sipguard status`: this node's last view (from SQLite) and the nodes Redis has seen."""
    now = time.time() if now is None else now
    raw = store.get_meta(STATUS_META)
    me = json.loads(raw) if raw else {}
    info: dict = {"node": cfg.node_name, "redis": redacted(cfg.redis_url), "this_node": me, "nodes": [],
                  "reachable": False}
    try:
        client = connect(cfg)
        try:
            P = cfg.key_prefix
            seen = client.zrange(P + "nodes", 0, -1, withscores=True)
            names = [n for n, _ in seen]
            beats = client.mget([P + "node:" + n for n in names]) if names else []
            info["reachable"] = True
            info["bans"] = client.hlen(P + "bans")
            for (name, last), beat in zip(seen, beats):
                b = json.loads(beat) if beat else {}
                info["nodes"].append({"node": name, "last_heartbeat": last, "age": round(now - last, 1),
                                      "alive": bool(beat), "in_sync": bool(b.get("in_sync")),
                                      "outbox": b.get("outbox")})
        finally:
            client.close()
    except redis_errors() as exc:
        info["error"] = str(exc) or type(exc).__name__
    return info


def cluster_lines(info: dict) -> list[str]:
    """`sipguard status` text for cluster_status()."""
    me = info.get("this_node") or {}
    fresh = bool(me) and time.time() - me.get("heartbeat", 0) < 10
    sync = ("in sync" if me.get("in_sync") else f"NOT in sync ({me.get('outbox', 0)} queued to publish)") \
        if fresh else "no recent heartbeat from this node's daemon"
    lines = [f"cluster: node {info['node']} via {info['redis']}: {sync}"]
    if not info.get("reachable"):
        lines.append(f"  Redis unreachable from here: {info.get('error', '?')}")
        return lines
    lines.append(f"  shared bans: {info.get('bans', 0)}; nodes seen:")
    for n in info["nodes"]:
        state = ("in sync" if n["in_sync"] else "NOT in sync") if n["alive"] else "gone (heartbeat expired)"
        lines.append(f"    {n['node']}: last heartbeat {n['age']:.1f}s ago, {state}")
    return lines
