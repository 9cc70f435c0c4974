"""Connecting to the fleet's Redis: plain URLs and Sentinel, one bounded attempt, no retries.

Only builds clients and names the errors that mean "Redis is away"; it reads and writes no keys,
and redis-py is imported only when a function here is called (standalone sipguard never needs it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    from ..config import ClusterConfig


def redis_errors() -> tuple[type[BaseException], ...]:
    """What a Redis call raises when the server is unreachable or refuses (caught as "down")."""
    import redis

    return (redis.RedisError, OSError)


def connect(cfg: ClusterConfig, extra_timeout: float = 0.0):
    """A redis-py client for [cluster] redis_url (decoded strings); Sentinel URLs find the master.

    redis+sentinel://[user:password@]host:26379[,host2:26379]/MASTER_NAME[/DB][?sentinel_password=X]
    (rediss+sentinel:// for TLS to the master). Everything else goes to redis-py's from_url.
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    timeout = cfg.socket_timeout + extra_timeout
    no_retry = Retry(NoBackoff(), 0)  # one bounded attempt: the bridge has its own retry and fallback
    scheme = cfg.redis_url.split("://", 1)[0].lower()
    if scheme.endswith("+sentinel"):
        from redis.sentinel import Sentinel

        u = urlsplit(cfg.redis_url)
        netloc = u.netloc.rsplit("@", 1)
        auth, hosts = (netloc[0], netloc[1]) if len(netloc) == 2 else ("", netloc[0])
        user, _, password = auth.partition(":") if auth else ("", "", "")
        nodes = []
        for h in (x.strip() for x in hosts.split(",") if x.strip()):
            if h.startswith("["):  # [2001:db8::1]:26379
                host, _, rest = h[1:].partition("]")
                port = rest.lstrip(":")
            elif h.count(":") == 1:
                host, port = h.split(":")
            else:
                host, port = h, ""
            nodes.append((host, int(port or 26379)))
        parts = [p for p in u.path.split("/") if p]
        if not parts:
            raise ValueError("redis+sentinel:// URL needs the master name as its path")
        service, db = parts[0], int(parts[1]) if len(parts) > 1 else 0
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        skw = {"socket_timeout": cfg.socket_timeout, "socket_connect_timeout": cfg.socket_timeout}
        if q.get("sentinel_password"):
            skw["password"] = q["sentinel_password"]
        sentinel = Sentinel(nodes, socket_timeout=cfg.socket_timeout, socket_connect_timeout=cfg.socket_timeout,
                            sentinel_kwargs=skw)
        return sentinel.master_for(service, socket_timeout=timeout, socket_connect_timeout=cfg.socket_timeout,
                                   db=db, username=unquote(user) or None, password=unquote(password) or None,
                                   ssl=scheme.startswith("rediss"), decode_responses=True, retry=no_retry)
    return redis.Redis.from_url(cfg.redis_url, socket_timeout=timeout, socket_connect_timeout=cfg.socket_timeout,
                                decode_responses=True, retry=no_retry)


def redacted(url: str) -> str:
    """The URL without its password (for logs and status)."""
    u = urlsplit(url)
    if u.password:
        return url.replace(":" + u.password + "@", ":***@", 1)
    return url
