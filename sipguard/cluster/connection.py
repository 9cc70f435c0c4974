"""Connecting to the fleet's Redis: plain URLs, TLS and Sentinel, one bounded attempt, no retries.

Only builds clients, names the errors that mean "Redis is away" (`describe_error` words them, with a
hint for a TLS certificate that does not verify), names the servers a URL points at (`server_hosts`,
so the guard never lets the fleet ban them) and hides passwords (`redacted`, `scrub`: user-info and
`?password=` / `?sentinel_password=` never reach a log, `status`, the store or a heartbeat). It reads
and writes no keys, and redis-py is imported only when a function here is called (standalone
sipguard never needs it).
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
        user, password, nodes = _sentinel_parts(cfg.redis_url)
        parts = [p for p in u.path.split("/") if p]
        if not parts:
            raise ValueError("redis+sentinel:// URL needs the master name as its path")
        service, db = parts[0], int(parts[1]) if len(parts) > 1 else 0
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        skw = {"socket_timeout": cfg.socket_timeout, "socket_connect_timeout": cfg.socket_timeout}
        if q.get("sentinel_password"):
            skw["password"] = q["sentinel_password"]
        tls = {}
        if scheme.startswith("rediss"):
            tls = {"ssl": True, **{k: q[k] for k in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
                                   if k in q}}
        sentinel = Sentinel(nodes, socket_timeout=cfg.socket_timeout, socket_connect_timeout=cfg.socket_timeout,
                            sentinel_kwargs=skw)
        return sentinel.master_for(service, socket_timeout=timeout, socket_connect_timeout=cfg.socket_timeout,
                                   db=db, username=unquote(user) or None,
                                   password=unquote(password) or q.get("password") or None,
                                   decode_responses=True, retry=no_retry, **tls)
    return redis.Redis.from_url(cfg.redis_url, socket_timeout=timeout, socket_connect_timeout=cfg.socket_timeout,
                                decode_responses=True, retry=no_retry)


def _sentinel_parts(url: str) -> tuple[str, str, list[tuple[str, int]]]:
    """(user, password, [(host, port)]) of a redis+sentinel:// URL."""
    netloc = urlsplit(url).netloc.rsplit("@", 1)
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
    return user, password, nodes


def server_hosts(url: str) -> list[str]:
    """The host names or addresses a URL connects to (the Sentinels for a Sentinel URL; none for unix://)."""
    scheme = url.split("://", 1)[0].lower()
    if scheme == "unix":
        return []
    if scheme.endswith("+sentinel"):
        return [h for h, _ in _sentinel_parts(url)[2]]
    host = urlsplit(url).hostname
    return [host] if host else []


def sentinel_servers(client) -> list[str]:
    """The master's and replicas' addresses a Sentinel-made client knows now (best effort), else []."""
    pool = getattr(client, "connection_pool", None)
    sentinel = getattr(pool, "sentinel_manager", None)
    name = getattr(pool, "service_name", None)
    if sentinel is None or name is None:
        return []
    out = []
    try:
        out.append(sentinel.discover_master(name)[0])
        out += [h for h, _ in sentinel.discover_slaves(name)]
    except Exception:  # noqa: BLE001 - Sentinels unreachable now: the next (re)connect tries again
        pass
    return out


_SECRET_KEYS = ("password", "sentinel_password", "pass", "auth", "token")


def _secrets_of(url: str) -> list[str]:
    """Every password in a URL: the user-info's and the query's (raw and decoded)."""
    u = urlsplit(url)
    found = []
    netloc = u.netloc
    if "@" in netloc:
        auth = netloc.rsplit("@", 1)[0]
        if ":" in auth:
            found.append(auth.split(":", 1)[1])
        elif auth:
            found.append(auth)  # redis://password@host (redis-py takes a lone user-info as the username)
    for part in u.query.split("&"):
        k, _, v = part.partition("=")
        if unquote(k).lower() in _SECRET_KEYS and v:
            found.append(v)
    return [s for x in found for s in dict.fromkeys((x, unquote(x))) if s]


def redacted(url: str) -> str:
    """The URL with every password (user-info, ?password=, ?sentinel_password=) as *** (for logs, status,
    the store and the heartbeat)."""
    u = urlsplit(url)
    netloc = u.netloc
    if "@" in netloc:
        auth, hosts = netloc.rsplit("@", 1)
        user = auth.split(":", 1)[0] if ":" in auth else ""
        netloc = f"{user}:***@{hosts}"
    query = "&".join(
        (f"{k}=***" if unquote(k).lower() in _SECRET_KEYS else f"{k}={v}" if sep else k)
        for k, sep, v in (p.partition("=") for p in u.query.split("&") if p))
    out = f"{u.scheme}://{netloc}{u.path}"
    if query:
        out += "?" + query
    if u.fragment:
        out += "#" + u.fragment
    return out


def scrub(text: str, url: str) -> str:
    """`text` (an error message) with every password of `url` replaced by ***."""
    for secret in sorted(_secrets_of(url), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def describe_error(exc: BaseException, url: str) -> str:
    """One line for a connection error, passwords scrubbed; a TLS certificate that does not verify says so."""
    text = scrub(str(exc) or type(exc).__name__, url)
    chain, e = [], exc
    while e is not None and len(chain) < 5:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if any("CERTIFICATE_VERIFY_FAILED" in str(x) or type(x).__name__ == "SSLCertVerificationError" for x in chain):
        text = (f"TLS certificate verification failed: {text}; check the server's certificate and the CA in "
                f"redis_url's ssl_ca_certs=")
    return text
