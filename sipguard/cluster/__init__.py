"""Fleet mode: cluster-wide scoring and ban sharing through one Redis ([cluster] in the config).

Without a `[cluster]` section nothing here is imported and sipguard stays standalone. The design
(scoring, sharing, failure, the Redis layout) is in README.md next to this file; each idea is one
module (connection, signing, wire, guard, reader, scoring, bridge, status; the Redis scripts are
lua/*.lua).

This file only re-exports the names other modules and tests use; it holds no code, and the
modules of this package never import it (they import each other directly).
"""

from .bridge import (
    CONTROL_META,
    EPOCH_META,
    FLUSH_BATCH,
    SCORE_CHUNK,
    SNAPSHOT_MARGIN,
    UNBAN_MEMORY,
    ClusterBridge,
    ClusterStats,
)
from .connection import connect, redacted, redis_errors
from .reader import StreamReader
from .scoring import ClusterPolicy
from .scripts import HDEL_IF_LUA, PUBLISH_LUA, SCORE_LUA
from .status import STATUS_META, cluster_lines, cluster_status
from .wire import ban_payload, canonical_ip, checked_number, parse_ban

__all__ = [
    "CONTROL_META", "EPOCH_META", "FLUSH_BATCH", "HDEL_IF_LUA", "PUBLISH_LUA", "SCORE_CHUNK", "SCORE_LUA",
    "SNAPSHOT_MARGIN", "STATUS_META", "UNBAN_MEMORY", "ClusterBridge", "ClusterPolicy", "ClusterStats",
    "StreamReader", "ban_payload", "canonical_ip", "checked_number", "cluster_lines", "cluster_status",
    "connect", "parse_ban", "redacted", "redis_errors",
]
