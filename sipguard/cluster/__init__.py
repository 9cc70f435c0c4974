"""Fleet mode: cluster-wide scoring and ban sharing through one Redis ([cluster] in the config).

Without a `[cluster]` section nothing here is imported and sipguard stays standalone (SQLite only).
With it, three things change in a running daemon (`attach` wires them in `Daemon.setup`):

* Scoring. `ClusterPolicy` wraps the local `Policy`: events that pass the allow-list and are not
  from a banned source are buffered during a batch and scored in Redis by ONE Lua call per batch
  (`SCORE_LUA`): per (ip, jail) a sorted set of weighted events from every node, trimmed by findtime
  and summed; at the threshold the script claims the decision atomically (the ban goes into the
  shared ban hash, so no other node decides it again), escalates on the cluster's offence history
  and appends the ban to the stream. Success events clear the cluster score of reset_on_success
  jails. While Redis is unreachable the local Policy decides alone (its windows are kept warm).

* Ban sharing. Every ban and unban (automatic, manual from the CLI, imported with --from-file,
  decided locally while Redis was away) is published on a Redis stream with its absolute expiry,
  its id and origin, and kept in a hash ip → ban (the current ban set). A reader thread follows the
  stream (XREAD BLOCK) and hands entries to the daemon loop through a queue; the loop applies them to
  this node's enforcer and SQLite. Conflicts resolve last-writer-wins on (created, id), the same on
  every node, so every node ends with the same ban and the same expiry instant. Applying is
  idempotent: an entry whose id this node already holds is a duplicate and is skipped.

* Failure. Anything to publish goes first to an outbox table in SQLite (so a restart loses nothing)
  and is flushed when Redis answers; a lost Redis is reported by one warning and one "back" line.
  When a node (re)connects it reads the ban hash (a snapshot) and the stream after it, so a late
  joiner or a restarted node converges. When Redis itself lost its data (a new `epoch` key) every
  node re-publishes the bans it holds. A malformed stream entry is counted and skipped.

Redis layout (prefix P, default "sipguard:"): P+"s:IP:JAIL" scores (zset), P+"off:IP" offences
(zset), P+"bans" (hash ip → ban json), P+"unbans" (hash ip → time of last unban), P+"stream",
P+"done:ID" (dedupe of unbans), P+"epoch", P+"node:NAME" (heartbeat, TTL) and P+"nodes" (zset).
Plain Redis or Sentinel; not Redis Cluster (the scripts touch keys of many sources).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import queue
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..addresses import parse_target
from ..model import Ban, Decision, Event, EventKind

if TYPE_CHECKING:
    from ..config import ClusterConfig
    from ..daemon import Daemon
    from ..policy import Policy
    from ..store import Store

log = logging.getLogger("sipguard.cluster")

CONTROL_META = "cluster_control"  # last CLI control request this node has published
EPOCH_META = "cluster_epoch"  # the Redis epoch this node last synced with
STATUS_META = "cluster_status"  # this node's cluster view, for `sipguard status`
SNAPSHOT_MARGIN = 2.0  # seconds: bans created this close to a snapshot are never dropped by it
UNBAN_MEMORY = 86400.0  # how long Redis remembers an unban (so a stale ban published later loses)
FLUSH_BATCH = 500
SCORE_CHUNK = 2000  # events per score script call


# -- Redis scripts ------------------------------------------------------------------------------
SCORE_LUA = r"""
local P, node, now, maxlen = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local bantime, factor, cap, memory = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local nj = tonumber(ARGV[9])
local jails = {}
local i = 10
for j = 1, nj do
  jails[j] = {name = ARGV[i], findtime = tonumber(ARGV[i + 1]), threshold = tonumber(ARGV[i + 2]),
              bantime = ARGV[i + 3], reset = ARGV[i + 4] == '1'}
  i = i + 5
end
local banned = {}
local function is_banned(ip)
  if banned[ip] ~= nil then return banned[ip] end
  local v = redis.call('HGET', P .. 'bans', ip)
  local b = false
  if v then
    local ok, ban = pcall(cjson.decode, v)
    if ok and type(ban) == 'table' then
      local e = tonumber(ban.expires)
      b = (e == nil) or (e > now)
    end
  end
  banned[ip] = b
  return b
end
local out = {}
local resets, skipped = 0, 0
while i <= #ARGV do
  local ip, js, t, w, filter, uid = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  i = i + 6
  if js == 'S' then
    for j = 1, nj do
      if jails[j].reset then resets = resets + redis.call('DEL', P .. 's:' .. ip .. ':' .. jails[j].name) end
    end
  elseif is_banned(ip) then
    skipped = skipped + 1
  else
    for idx in string.gmatch(js, '%d+') do
      local jail = jails[tonumber(idx)]
      local key = P .. 's:' .. ip .. ':' .. jail.name
      redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. string.format('%.6f', t - jail.findtime))
      redis.call('ZADD', key, string.format('%.6f', t), uid .. '|' .. w)
      redis.call('PEXPIRE', key, math.ceil(jail.findtime * 1000) + 1000)
      local score = 0
      for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
        score = score + (tonumber(string.match(m, '|([^|]*)$')) or 0)
      end
      if score >= jail.threshold then
        local okey = P .. 'off:' .. ip
        redis.call('ZREMRANGEBYSCORE', okey, '-inf', '(' .. string.format('%.6f', t - memory))
        local offence = redis.call('ZCARD', okey) + 1
        local id = node .. ':' .. uid
        redis.call('ZADD', okey, string.format('%.6f', t), id)
        redis.call('PEXPIRE', okey, math.ceil(memory * 1000))
        local dur
        if jail.bantime == 'perm' then dur = nil
        elseif jail.bantime ~= '' then dur = tonumber(jail.bantime)
        else
          dur = bantime * factor ^ math.max(0, offence - 1)
          if cap ~= nil and dur > cap then dur = cap end
        end
        for j = 1, nj do redis.call('DEL', P .. 's:' .. ip .. ':' .. jails[j].name) end
        local ban = {ip = ip, reason = jail.name .. ':' .. filter, created = now, score = score,
                     offence = offence, manual = false, id = id, origin = node}
        if dur ~= nil then ban.expires = now + dur end
        local payload = cjson.encode(ban)
        redis.call('HSET', P .. 'bans', ip, payload)
        redis.call('XADD', P .. 'stream', 'MAXLEN', '~', maxlen, '*',
                   'op', 'ban', 'ip', ip, 'id', id, 'origin', node, 'ban', payload)
        banned[ip] = true
        table.insert(out, payload)
        break
      end
    end
  end
end
return {out, resets, skipped}
"""

PUBLISH_LUA = r"""
local P, maxlen, op, ip, id, origin, payload = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local memory, unban_memory = tonumber(ARGV[8]), tonumber(ARGV[9])
local function clear(addr)
  for name in string.gmatch(ARGV[10], '[^,]+') do redis.call('DEL', P .. 's:' .. addr .. ':' .. name) end
end
local function created_of(v)
  local ok, b = pcall(cjson.decode, v)
  if ok and type(b) == 'table' then return tonumber(b.created) or 0, tostring(b.id or '') end
  return 0, ''
end
if op == 'ban' then
  local nb = cjson.decode(payload)
  local c = tonumber(nb.created)
  local cur = redis.call('HGET', P .. 'bans', ip)
  if cur then
    local oc, oid = created_of(cur)
    if oc > c or (oc == c and oid >= id) then return 0 end
  end
  local tomb = tonumber(redis.call('HGET', P .. 'unbans', ip) or '-1')
  if tomb >= c then return 0 end
  redis.call('HSET', P .. 'bans', ip, payload)
  clear(ip)
  if nb.manual == false then
    redis.call('ZADD', P .. 'off:' .. ip, string.format('%.6f', c), id)
    redis.call('PEXPIRE', P .. 'off:' .. ip, math.ceil(memory * 1000))
  end
  redis.call('XADD', P .. 'stream', 'MAXLEN', '~', maxlen, '*', 'op', 'ban', 'ip', ip, 'id', id,
             'origin', origin, 'ban', payload)
  return 1
end
if not redis.call('SET', P .. 'done:' .. id, '1', 'NX', 'PX', math.ceil(unban_memory * 1000)) then return 0 end
local at = tonumber(payload)
local function unban(addr, cur)
  if cur then
    if created_of(cur) > at then return end
    redis.call('HDEL', P .. 'bans', addr)
  end
  local tomb = tonumber(redis.call('HGET', P .. 'unbans', addr) or '-1')
  if at > tomb then redis.call('HSET', P .. 'unbans', addr, payload) end
  clear(addr)
end
if op == 'unban' then
  unban(ip, redis.call('HGET', P .. 'bans', ip))
elseif op == 'unban_all' then
  local all = redis.call('HGETALL', P .. 'bans')
  for k = 1, #all, 2 do unban(all[k], all[k + 1]) end
else
  return 0
end
redis.call('XADD', P .. 'stream', 'MAXLEN', '~', maxlen, '*', 'op', op, 'ip', ip, 'id', id,
           'origin', origin, 'at', payload)
return 1
"""

# delete a hash field only if it still holds the value we looked at (GC of expired bans / old unbans)
HDEL_IF_LUA = r"""
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""


# -- connecting ---------------------------------------------------------------------------------
def redis_errors() -> tuple[type[BaseException], ...]:
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


# -- ban <-> json -------------------------------------------------------------------------------
def ban_payload(ban: Ban, ban_id: str, origin: str) -> str:
    return json.dumps({"ip": ban.ip, "reason": ban.reason, "created": ban.created, "expires": ban.expires,
                       "score": ban.score, "offence": ban.offence, "manual": ban.manual, "id": ban_id,
                       "origin": origin}, separators=(",", ":"))


def _num(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"bad {what}")
    return float(v)


def _canonical_ip(ip: Any) -> str:
    """The address or CIDR as the CLI and the filters write it (so one source is one key)."""
    if not isinstance(ip, str) or len(ip) > 64:
        raise ValueError("bad ip")
    return parse_target(ip)


def parse_ban(payload: str) -> tuple[Ban, str, str]:
    """A ban json from Redis → (Ban, id, origin); ValueError when malformed."""
    d = json.loads(payload)
    if not isinstance(d, dict):
        raise ValueError("ban is not an object")
    ip = _canonical_ip(d.get("ip"))
    expires = d.get("expires")
    ban = Ban(ip=ip, reason=str(d.get("reason") or "cluster")[:200], created=_num(d.get("created"), "created"),
              expires=None if expires is None else _num(expires, "expires"),
              score=_num(d.get("score", 0.0) or 0.0, "score"), offence=int(_num(d.get("offence", 1) or 1, "offence")),
              manual=bool(d.get("manual", False)))
    ban_id, origin = d.get("id"), d.get("origin")
    if not isinstance(ban_id, str) or not ban_id or not isinstance(origin, str):
        raise ValueError("ban without id/origin")
    return ban, ban_id, origin


# -- the reader thread --------------------------------------------------------------------------
class StreamReader(threading.Thread):
    """Follows the ban stream with its own connection; everything goes to the daemon loop as items:

    ("snapshot", epoch, {ip: json}, taken_at) on every (re)connect, then ("entries", [(id, fields)]),
    ("down", reason) when the connection is lost.
    """

    def __init__(self, cfg: ClusterConfig, out: queue.Queue, wake: threading.Event | None = None) -> None:
        super().__init__(name=f"sipguard-cluster-{cfg.node_name}", daemon=True)
        self.cfg = cfg
        self.out = out
        self.wake = wake
        self._stop_ev = threading.Event()
        self.connected = False
        self.block_ms = 1000
        self.client = None

    def stop(self) -> None:
        self._stop_ev.set()
        client = self.client
        if client is not None:  # wake a blocked XREAD now rather than after block_ms
            try:
                client.connection_pool.disconnect()
            except Exception:  # noqa: BLE001
                pass

    def _put(self, item: tuple) -> None:
        self.out.put(item)
        if self.wake is not None:
            self.wake.set()

    def run(self) -> None:
        P = self.cfg.key_prefix
        errors = redis_errors()
        client = None
        while not self._stop_ev.is_set():
            try:
                if client is None:
                    client = self.client = connect(self.cfg, extra_timeout=self.block_ms / 1000)
                client.set(P + "epoch", uuid.uuid4().hex, nx=True)
                taken = time.time()
                with client.pipeline(transaction=True) as pipe:  # atomic: top id and the hash agree
                    pipe.get(P + "epoch").xrevrange(P + "stream", count=1).hgetall(P + "bans")
                    epoch, top, bans = pipe.execute()
                last = top[0][0] if top else "0-0"
                self.connected = True
                self._put(("snapshot", epoch, bans, taken))
                while not self._stop_ev.is_set():
                    resp = client.xread({P + "stream": last}, count=1000, block=self.block_ms)
                    for _stream, entries in resp or ():
                        if entries:
                            last = entries[-1][0]
                            self._put(("entries", entries))
            except errors as exc:
                if self.connected:
                    self._put(("down", str(exc) or type(exc).__name__))
                self.connected = False
                try:
                    if client is not None:
                        client.close()
                except Exception:  # noqa: BLE001
                    pass
                client = None
                self._stop_ev.wait(self.cfg.retry_interval)
            except Exception:  # noqa: BLE001 - never let the reader die: log, back off, reconnect
                if self._stop_ev.is_set():
                    break
                log.exception("cluster stream reader error; reconnecting")
                self.connected = False
                client = None
                self._stop_ev.wait(self.cfg.retry_interval)
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass


# -- scoring ------------------------------------------------------------------------------------
class ClusterPolicy:
    """The local Policy's interface (observe/note_ban/release/restore/expire/...), scored in Redis.

    `observe` only buffers while Redis is up; `ClusterBridge.on_batch` scores the buffer in one
    call. While Redis is down it is the local Policy, unchanged.
    """

    def __init__(self, local: Policy, bridge: ClusterBridge) -> None:
        self.local = local
        self.bridge = bridge
        self.buffer: list[Event] = []
        self._jail_index = {j.name: n + 1 for n, j in enumerate(local.jails)}
        self._kind_jails: dict[EventKind, str] = {}
        for kind in EventKind:
            idx = [str(self._jail_index[j.name]) for j in local.jails if kind in j.kinds]
            if kind is EventKind.SUCCESS:
                self._kind_jails[kind] = "S"
            elif idx:
                self._kind_jails[kind] = ",".join(idx)

    def __getattr__(self, name: str) -> Any:  # stats, banned, windows, offences, cfg, allow, expire, score...
        return getattr(self.local, name)

    def observe(self, ev: Event) -> Decision | None:
        if not self.bridge.scoring:
            return self.local.observe(ev)
        st = self.local.stats
        st.events += 1
        if ev.ip in self.local.allow:
            st.allowlisted += 1
            return None
        if ev.ip in self.local.banned:
            st.while_banned += 1
            return None
        if ev.kind in self._kind_jails:
            self.buffer.append(ev)
        return None

    def note_ban(self, ip: str) -> None:
        self.local.note_ban(ip)

    def release(self, ip: str) -> None:
        self.local.release(ip)

    def restore(self, events) -> None:
        self.local.restore(events)

    def score_args(self, events: list[Event], now: float) -> list:
        cfg, bridge = self.local.cfg, self.bridge
        args: list = [bridge.prefix, bridge.node, f"{now:.3f}", bridge.cfg.stream_maxlen, cfg.bantime,
                      cfg.bantime_factor, "" if cfg.max_bantime is None else cfg.max_bantime, cfg.offence_memory,
                      len(self.local.jails)]
        for j in self.local.jails:
            if "bantime" in j.cfg.model_fields_set:
                bt = "perm" if j.cfg.bantime is None else repr(float(j.cfg.bantime))
            else:
                bt = ""
            args += [j.name, j.cfg.findtime, j.cfg.threshold, bt, "1" if j.cfg.reset_on_success else "0"]
        seq = bridge.seq
        for ev in events:
            args += [ev.ip, self._kind_jails[ev.kind], f"{ev.time:.6f}", repr(float(ev.weight)), ev.filter,
                     f"{bridge.node}.{next(seq)}"]
        return args


# -- the bridge ---------------------------------------------------------------------------------
@dataclass
class ClusterStats:
    scored: int = 0  # events scored in Redis
    cluster_bans: int = 0  # bans decided by the cluster score on this node
    local_bans: int = 0  # bans decided locally (Redis away) and queued
    published: int = 0  # outbox entries accepted by Redis
    stale: int = 0  # outbox entries Redis refused as older than what it holds
    applied_bans: int = 0  # bans from other nodes applied here
    applied_unbans: int = 0
    duplicates: int = 0  # entries this node already held (idempotent skip)
    superseded: int = 0  # entries older than what this node holds
    malformed: int = 0  # stream entries that could not be parsed (skipped)
    allowlisted: int = 0  # automatic bans from other nodes of addresses allow-listed here
    snapshots: int = 0
    dropped_by_snapshot: int = 0
    reseeds: int = 0
    outages: int = 0
    errors: int = 0


class ClusterBridge:
    """Everything Redis for one daemon; every method runs on the daemon's thread except the reader."""

    def __init__(self, cfg: ClusterConfig, daemon: Daemon) -> None:
        self.cfg = cfg
        self.daemon = daemon
        self.store: Store = daemon.store
        self.node = cfg.node_name
        self.prefix = cfg.key_prefix
        self.stats = ClusterStats()
        self.seq = itertools.count(int(time.time() * 1000) % 10**12)
        self.client = connect(cfg)
        self.scripts_ready = False
        self._score = self.client.register_script(SCORE_LUA)
        self._publish = self.client.register_script(PUBLISH_LUA)
        self._hdel_if = self.client.register_script(HDEL_IF_LUA)
        self.queue: queue.Queue = queue.Queue()
        self.reader = StreamReader(cfg, self.queue)
        self.redis_ok = False  # main connection answers (scoring, publishing)
        self.synced = False  # the reader's latest snapshot is applied
        self._warned = False
        self._retry_at = 0.0
        self._last_heartbeat = 0.0
        self._last_gc = time.time()
        self._errors = redis_errors()
        self._jail_csv = ",".join(j for j in daemon.cfg.policy.jails)
        self._create_tables()
        self.policy: ClusterPolicy | None = None
        last = self.store.get_meta(CONTROL_META)
        self._control = int(last) if last is not None else self.store.last_request_id()
        self.store.set_meta(CONTROL_META, str(self._control))

    # -- sqlite: outbox and the id of the ban this node holds per address -----------------
    def _create_tables(self) -> None:
        c = self.store.conn
        c.execute("CREATE TABLE IF NOT EXISTS cluster_outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                  "op TEXT NOT NULL, ip TEXT NOT NULL, id TEXT NOT NULL, payload TEXT NOT NULL, time REAL)")
        c.execute("CREATE TABLE IF NOT EXISTS cluster_bans (ip TEXT PRIMARY KEY, id TEXT NOT NULL, "
                  "origin TEXT, created REAL)")

    def _held(self, ip: str) -> tuple[str, float] | None:
        row = self.store.conn.execute("SELECT id, created FROM cluster_bans WHERE ip = ?", (ip,)).fetchone()
        return (row[0], row[1]) if row else None

    def _hold(self, ip: str, ban_id: str, origin: str, created: float) -> None:
        self.store.conn.execute("INSERT OR REPLACE INTO cluster_bans (ip, id, origin, created) VALUES (?, ?, ?, ?)",
                                (ip, ban_id, origin, created))

    def _enqueue(self, op: str, ip: str, ban_id: str, payload: str) -> None:
        self.store.conn.execute("INSERT INTO cluster_outbox (op, ip, id, payload, time) VALUES (?, ?, ?, ?, ?)",
                                (op, ip, ban_id, payload, time.time()))

    def outbox_size(self) -> int:
        return self.store.conn.execute("SELECT count(*) FROM cluster_outbox").fetchone()[0]

    def _pending_ips(self) -> set[str]:
        return {r[0] for r in self.store.conn.execute("SELECT DISTINCT ip FROM cluster_outbox")}

    def _new_id(self) -> str:
        return f"{self.node}:{uuid.uuid4().hex[:16]}"

    def publish_ban(self, ban: Ban, ban_id: str | None = None) -> str:
        """Queue a ban this node made (or holds) for the cluster; it becomes the ban's id here."""
        ban_id = ban_id or self._new_id()
        self._hold(ban.ip, ban_id, self.node, ban.created)
        self._enqueue("ban", ban.ip, ban_id, ban_payload(ban, ban_id, self.node))
        return ban_id

    def publish_unban(self, ip: str, at: float, op: str = "unban") -> None:
        if op == "unban":
            self.store.conn.execute("DELETE FROM cluster_bans WHERE ip = ?", (ip,))
        self._enqueue(op, ip, self._new_id(), repr(float(at)))

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def scoring(self) -> bool:
        """Score in Redis (else locally): the main connection works and the snapshot is applied."""
        return self.redis_ok and self.synced

    def start(self) -> None:
        self.reader.start()
        # wait briefly for the first snapshot so a node that starts with Redis up scores cluster-wide
        deadline = time.monotonic() + max(1.0, 2 * self.cfg.socket_timeout)
        while time.monotonic() < deadline and self.queue.empty():
            time.sleep(0.01)
        self.housekeeping(time.time())
        if not self.synced:
            self._down("no answer at start")

    def close(self) -> None:
        self.reader.stop()
        self.reader.join(timeout=self.reader.block_ms / 1000 + self.cfg.socket_timeout + 2)
        try:
            if self.redis_ok:
                self.client.delete(self.prefix + "node:" + self.node)
        except self._errors:
            pass
        try:
            self.client.close()
        except Exception:  # noqa: BLE001
            pass

    def _down(self, why: str) -> None:
        self.redis_ok = False
        self._retry_at = time.monotonic() + self.cfg.retry_interval
        if not self._warned:
            self._warned = True
            self.stats.outages += 1
            log.warning("cluster: Redis at %s unreachable (%s): detecting and banning on this node alone, "
                        "queuing bans to publish until it is back", redacted(self.cfg.redis_url), why)

    def _up(self) -> None:
        self.redis_ok = True
        if self._warned:
            self._warned = False
            log.warning("cluster: Redis at %s is back; publishing %d queued entries",
                        redacted(self.cfg.redis_url), self.outbox_size())

    # -- the daemon's batch -----------------------------------------------------------------
    def on_batch(self, new_bans: list[Ban], now: float) -> list[Ban]:
        """Score the buffered events in Redis; returns the batch's bans (local ones queued)."""
        pol = self.policy
        assert pol is not None
        out: list[Ban] = []
        for ban in new_bans:  # decided by the local policy: Redis was away
            self.publish_ban(ban)
            self.stats.local_bans += 1
            out.append(ban)
        if not pol.buffer:
            return out
        events, pol.buffer = pol.buffer, []
        try:
            if len(events) <= SCORE_CHUNK:
                results = [self._score(args=pol.score_args(events, round(now, 3)))]
            else:  # short scripts, so Redis never blocks the other nodes long; still one round trip
                with self.client.pipeline(transaction=False) as pipe:
                    for k in range(0, len(events), SCORE_CHUNK):
                        self._score(args=pol.score_args(events[k:k + SCORE_CHUNK], round(now, 3)), client=pipe)
                    results = pipe.execute()
            payloads = [p for r in results for p in r[0]]
        except self._errors as exc:
            self._down(str(exc) or type(exc).__name__)
            from ..daemon import ban_from_decision

            pol.local.stats.events -= len(events)  # observe() counts them again
            for ev in events:
                d = pol.local.observe(ev)
                if d is not None:
                    ban = ban_from_decision(d, now)
                    self.publish_ban(ban)
                    self.stats.local_bans += 1
                    out.append(ban)
            return out
        self.stats.scored += len(events)
        pol.local.restore(events)  # keep the local windows warm for when Redis goes away
        for payload in payloads:
            try:
                ban, ban_id, origin = parse_ban(payload)
            except (ValueError, TypeError) as exc:
                self.stats.errors += 1
                log.error("cluster: bad ban from the score script: %s", exc)
                continue
            pol.local.note_ban(ban.ip)
            pol.local.stats.decisions += 1
            self._hold(ban.ip, ban_id, origin, ban.created)
            self.stats.cluster_bans += 1
            out.append(ban)
        return out

    # -- housekeeping -----------------------------------------------------------------------
    def housekeeping(self, now: float) -> None:
        self._publish_control()
        self._drain()
        if not self.redis_ok and time.monotonic() >= self._retry_at and self.reader.connected:
            try:
                self.client.ping()
                self._up()
            except self._errors as exc:
                self._down(str(exc) or type(exc).__name__)
        if self.redis_ok:
            self._flush()
        if now - self._last_heartbeat >= self.cfg.heartbeat_interval:
            self._heartbeat(now)
        if now - self._last_gc >= max(self.daemon.cfg.daemon.prune_interval, 10.0):
            self._last_gc = now
            self._gc(now)

    def _publish_control(self) -> None:
        """What the CLI did (ban, unban, unban --all, ban --from-file) goes to the cluster."""
        reqs = self.store.requests_after(self._control)
        if not reqs:
            return
        with self.store.transaction():
            for req in reqs:
                self._control = req.id
                if req.action == "ban" and req.target:
                    ban = self.store.get_ban(req.target)
                    held = self._held(req.target)
                    if ban is not None and (held is None or held[1] != ban.created):
                        self.publish_ban(ban)
                elif req.action == "unban" and req.target:
                    self.publish_unban(req.target, req.time)
                elif req.action == "unban_all":
                    self.store.conn.execute("DELETE FROM cluster_bans")
                    self.publish_unban("*", req.time, op="unban_all")
                elif req.action == "sync":  # a batch ban (--from-file): publish what the cluster lacks
                    for ban in self.store.active_bans(time.time()):
                        held = self._held(ban.ip)
                        if held is None or held[1] != ban.created:
                            self.publish_ban(ban)
            self.store.set_meta(CONTROL_META, str(self._control))

    def _flush(self) -> None:
        while True:
            rows = self.store.conn.execute(
                "SELECT seq, op, ip, id, payload FROM cluster_outbox ORDER BY seq LIMIT ?", (FLUSH_BATCH,)
            ).fetchall()
            if not rows:
                return
            pcfg = self.daemon.cfg.policy
            try:
                with self.client.pipeline(transaction=False) as pipe:
                    for _seq, op, ip, ban_id, payload in rows:
                        self._publish(args=[self.prefix, self.cfg.stream_maxlen, op, ip, ban_id, self.node, payload,
                                            pcfg.offence_memory, UNBAN_MEMORY, self._jail_csv], client=pipe)
                    results = pipe.execute()
            except self._errors as exc:
                self._down(str(exc) or type(exc).__name__)
                return
            self.stats.published += sum(1 for r in results if r == 1)
            self.stats.stale += sum(1 for r in results if r != 1)
            self.store.conn.execute("DELETE FROM cluster_outbox WHERE seq <= ?", (rows[-1][0],))

    def _drain(self) -> None:
        """Apply what the reader delivered, in order, in one transaction."""
        items = []
        try:
            while True:
                items.append(self.queue.get_nowait())
        except queue.Empty:
            pass
        if not items:
            return
        now = time.time()
        with self.store.transaction():
            for item in items:
                kind = item[0]
                if kind == "snapshot":
                    self._apply_snapshot(item[1], item[2], item[3], now)
                elif kind == "entries":
                    for entry_id, fields in item[1]:
                        self._apply_entry(entry_id, fields, now)
                elif kind == "down":
                    self.synced = False
                    self._down(item[1])

    def _apply_snapshot(self, epoch: str | None, bans: dict[str, str], taken: float, now: float) -> None:
        self.stats.snapshots += 1
        known = self.store.get_meta(EPOCH_META)
        cluster: dict[str, tuple[Ban, str, str]] = {}
        for ip, payload in bans.items():
            try:
                cluster[ip] = parse_ban(payload)
            except (ValueError, TypeError):
                self.stats.malformed += 1
        for ban, ban_id, origin in cluster.values():
            self._apply_ban(ban, ban_id, origin, now)
        pending = self._pending_ips()
        if known != epoch:
            # a first join, or Redis lost its data: what this node holds goes (back) to the cluster
            self.stats.reseeds += 1
            republished = 0
            for ban in self.store.active_bans(now):
                if ban.ip in cluster or ban.ip in pending:
                    continue
                held = self._held(ban.ip)
                self.publish_ban(ban, held[0] if held and held[1] == ban.created else None)
                republished += 1
            if known is not None:
                log.warning("cluster: Redis lost its state (new epoch); re-publishing %d bans held here", republished)
        else:
            # same Redis: a ban it no longer has was lifted while this node was away
            origins = dict(self.store.conn.execute("SELECT ip, origin FROM cluster_bans"))
            for ban in self.store.active_bans(now):
                if ban.ip in cluster or ban.ip in pending or ban.ip not in origins:
                    continue  # (not in origins: never shared, made before fleet mode: keep)
                if origins[ban.ip] == self.node and ban.created >= taken - SNAPSHOT_MARGIN:
                    continue  # decided here while the snapshot was read: its stream entry follows
                self._remove(ban.ip, now, now)
                self.stats.dropped_by_snapshot += 1
        self.store.set_meta(EPOCH_META, epoch or "")
        self.synced = True
        if not self.redis_ok:
            try:
                self.client.ping()
                self._up()
            except self._errors as exc:
                self._down(str(exc) or type(exc).__name__)

    def _apply_entry(self, entry_id: str, fields: dict, now: float) -> None:
        try:
            op = fields.get("op")
            if op == "ban":
                ban, ban_id, origin = parse_ban(fields["ban"])
                if ban.ip != _canonical_ip(fields.get("ip")):
                    raise ValueError("ip mismatch")
                self._apply_ban(ban, ban_id, origin, now)
            elif op in ("unban", "unban_all"):
                at = _num(float(fields["at"]), "at")
                if op == "unban":
                    self._apply_unban(_canonical_ip(fields.get("ip")), at, now)
                else:
                    for ban in self.store.active_bans(0):
                        self._apply_unban(ban.ip, at, now)
            else:
                raise ValueError(f"unknown op {op!r}")
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            self.stats.malformed += 1
            if self.stats.malformed <= 10 or self.stats.malformed % 1000 == 0:
                log.warning("cluster: skipped malformed stream entry %s (%s; %d so far)", entry_id, exc,
                            self.stats.malformed)

    def _apply_ban(self, ban: Ban, ban_id: str, origin: str, now: float) -> None:
        if ban.expires is not None and ban.expires <= now:
            return
        if not ban.manual and ban.ip in self.daemon.allow:  # this node's allow-list (loopback, own host)
            self.stats.allowlisted += 1
            return
        held = self._held(ban.ip)
        local = self.store.get_ban(ban.ip)
        if local is not None and held is not None and held[0] == ban_id:
            self.stats.duplicates += 1
            return
        if local is not None and (local.created, held[0] if held else "") > (ban.created, ban_id):
            self.stats.superseded += 1
            return
        self.store.put_ban(ban, now)
        self._hold(ban.ip, ban_id, origin, ban.created)
        d = self.daemon
        if d.policy is not None:
            d.policy.note_ban(ban.ip)
        try:
            d.enforcer.ban(ban, now)
        except Exception:  # noqa: BLE001 - kept in the store; the enforcer's next sync retries
            self.stats.errors += 1
            log.exception("enforcer failed to ban %s (from %s)", ban.ip, origin)
        self.stats.applied_bans += 1
        log.info("cluster: %s banned %s until %s (%s)", origin, ban.ip,
                 "forever" if ban.expires is None else time.strftime("%H:%M:%S", time.localtime(ban.expires)),
                 ban.reason)

    def _apply_unban(self, ip: str, at: float, now: float) -> None:
        local = self.store.get_ban(ip)
        if local is not None and local.created > at:
            self.stats.superseded += 1
            return
        if local is None:
            if self.daemon.policy is not None:
                self.daemon.policy.release(ip)
            return
        self._remove(ip, at, now)
        self.stats.applied_unbans += 1
        log.info("cluster: unbanned %s", ip)

    def _remove(self, ip: str, at: float, now: float) -> None:
        self.store.remove_ban(ip, now)
        self.store.mark_cleared(ip, at)
        self.store.conn.execute("DELETE FROM cluster_bans WHERE ip = ?", (ip,))
        d = self.daemon
        if d.policy is not None:
            d.policy.release(ip)
        try:
            d.enforcer.unban(ip)
        except Exception:  # noqa: BLE001
            self.stats.errors += 1
            log.exception("enforcer failed to unban %s", ip)

    # -- heartbeat, status, gc --------------------------------------------------------------
    def in_sync(self) -> bool:
        return self.redis_ok and self.synced and self.reader.connected and self.queue.empty() \
            and self.outbox_size() == 0

    def view(self, now: float) -> dict:
        return {"node": self.node, "redis": redacted(self.cfg.redis_url), "connected": self.redis_ok,
                "in_sync": self.in_sync(), "outbox": self.outbox_size(), "heartbeat": now, "pid": os.getpid(),
                "stats": asdict(self.stats)}

    def _heartbeat(self, now: float) -> None:
        self._last_heartbeat = now
        view = self.view(now)
        self.store.set_meta(STATUS_META, json.dumps(view))
        if not self.redis_ok:
            return
        try:
            ttl = max(1, math.ceil(self.cfg.node_timeout))
            with self.client.pipeline(transaction=False) as pipe:
                pipe.set(self.prefix + "node:" + self.node, json.dumps(view), ex=ttl)
                pipe.zadd(self.prefix + "nodes", {self.node: now})
                pipe.zremrangebyscore(self.prefix + "nodes", "-inf", now - 7 * 86400)
                pipe.execute()
        except self._errors as exc:
            self._down(str(exc) or type(exc).__name__)

    def _gc(self, now: float) -> None:
        """Expired bans and old unbans leave the shared hashes (compare-and-delete, so no race)."""
        if not self.redis_ok:
            return
        try:
            P = self.prefix
            for ip, payload in self.client.hscan_iter(P + "bans", count=1000):
                try:
                    exp = json.loads(payload).get("expires")
                except (ValueError, AttributeError):
                    exp = 0
                if exp is not None and not (isinstance(exp, (int, float)) and exp > now):
                    self._hdel_if(keys=[P + "bans"], args=[ip, payload])
            for ip, at in self.client.hscan_iter(P + "unbans", count=1000):
                try:
                    old = float(at) < now - UNBAN_MEMORY
                except ValueError:
                    old = True
                if old:
                    self._hdel_if(keys=[P + "unbans"], args=[ip, at])
        except self._errors as exc:
            self._down(str(exc) or type(exc).__name__)
        self.store.conn.execute("DELETE FROM cluster_bans WHERE ip NOT IN (SELECT ip FROM bans)")


def attach(daemon: Daemon) -> ClusterBridge:
    """Fleet mode for a daemon whose policy is set up: wraps its policy and starts the reader."""
    assert daemon.cfg.cluster is not None and daemon.policy is not None
    bridge = ClusterBridge(daemon.cfg.cluster, daemon)
    bridge.policy = ClusterPolicy(daemon.policy, bridge)
    daemon.policy = bridge.policy  # type: ignore[assignment]
    bridge.start()
    return bridge


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
