"""The fleet's stream reader: one thread with its own Redis connection that follows the ban stream.

It reads Redis (writing only the `epoch` key, when Redis has none: a new epoch tells every node that
Redis lost its data) and hands what it read to the daemon loop through a queue, then wakes the loop
(`wake`, the follower's), so an entry is applied the moment XREAD returns it, not at the loop's next
tick. It never touches the store, the policy or the enforcer: the bridge applies everything on the
daemon's thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from .connection import connect, describe_error, redis_errors

if TYPE_CHECKING:
    from ..config import ClusterConfig

log = logging.getLogger("sipguard.cluster")

XREAD_COUNT = 2000
"""Entries per XREAD: one reply per chunk the bridge applies (APPLY_BATCH); a single entry still
returns at once (XREAD BLOCK answers as soon as one is there). The replies are parsed by hiredis
(a dependency): pure-Python parsing took as much CPU per entry as verifying it, under the GIL the
applying thread needs."""


class StreamReader(threading.Thread):
    """Follows the ban stream with its own connection; everything goes to the daemon loop as items:

    ("tombstones", {ip: tombstone}) and ("snapshot", epoch, {ip: json}, taken_at) on every (re)connect, then ("entries", [(id, fields)]),
    ("down", reason) when the connection is lost.
    """

    def __init__(self, cfg: ClusterConfig, out: queue.Queue, wake: Callable[[], None] | None = None) -> None:
        super().__init__(name=f"sipguard-cluster-{cfg.node_name}", daemon=True)
        self.cfg = cfg
        self.out = out
        self.wake = wake
        self._stop_ev = threading.Event()
        self.connected = False
        self.last_error: str | None = None  # why the last connection failed (passwords scrubbed)
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
            self.wake()

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
                    pipe.get(P + "epoch").xrevrange(P + "stream", count=1).hgetall(P + "bans").hgetall(P + "unbans")
                    epoch, top, bans, unbans = pipe.execute()
                last = top[0][0] if top else "0-0"
                self.connected = True
                self._put(("tombstones", unbans))  # the signed unbans the snapshot may drop a ban on
                self._put(("snapshot", epoch, bans, taken))
                while not self._stop_ev.is_set():
                    resp = client.xread({P + "stream": last}, count=XREAD_COUNT, block=self.block_ms)
                    for _stream, entries in resp or ():
                        if entries:
                            last = entries[-1][0]
                            self._put(("entries", entries))
            except errors as exc:
                self.last_error = describe_error(exc, self.cfg.redis_url)
                if self.connected:
                    self._put(("down", self.last_error))
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
