"""The fleet's stream reader: a process of its own that follows the ban stream and checks what it reads.

The reading and the checking run in a child process (`follow`, started with multiprocessing's "spawn"
by `StreamReader`), with its own Redis connection: XREAD BLOCK and its reply's parsing, each entry's
json, its tag (`signing.py`) and its bounds (`wire.check_entry`), and the same for every value of the
shared ban set at each (re)connect (`wire.check_shared`). It hands the daemon checked tuples of plain
values, a whole XREAD reply per message, marshalled through a pipe; so the daemon's own thread only
applies them (the guard rails, the ban book's kernel batch, the store): a 100,000-ban burst is verified on one core
while it is applied on the other, and detection keeps its share of the daemon's thread.

It reads Redis (writing only the `epoch` key, when Redis has none: a new epoch tells every node that
Redis lost its data). It never touches the store, the policy or the enforcer. In the daemon,
`StreamReader` is a thread that starts the process, relays its messages to the bridge's queue and
wakes the loop (`wake`, the follower's), so an entry is applied the moment XREAD returns it, not at the
loop's next tick. The process ends with the reader (`stop`), when the daemon's process is gone, or is
started again if it dies. The secret goes to it through the pipe multiprocessing starts it with (never
a command line, never Redis).
"""

from __future__ import annotations

import logging
import marshal
import multiprocessing
import os
import queue
import signal
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
(a dependency), in the reader's process."""

PROTOCOL = 1  # of the messages between the reader's process and the daemon (marshalled plain values)
START_WAIT = 30.0  # seconds the reader's process may take to start (python and sipguard's imports) before it is retried


class StreamReader(threading.Thread):
    """Follows the ban stream through its process; everything goes to the daemon loop as items:

    ("tombstones", {ip: tombstone}) and ("checked_snapshot", epoch, [(ip, checked)], taken_at) on every
    (re)connect, then ("checked", [(entry id, checked)]) (`wire.check_entry`'s tuples), ("down", reason)
    when the connection is lost.
    """

    def __init__(self, cfg: ClusterConfig, out: queue.Queue, wake: Callable[[], None] | None = None) -> None:
        super().__init__(name=f"sipguard-cluster-{cfg.node_name}", daemon=True)
        self.cfg = cfg
        self.out = out
        self.wake = wake
        self._stop_ev = threading.Event()
        self.started = threading.Event()  # the process answered once (the bridge's start waits for it)
        self.connected = False
        self.last_error: str | None = None  # why the last connection failed (passwords scrubbed)
        self.block_ms = 1000
        self.pid: int | None = None  # the reader process's
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._lock = threading.Lock()

    def stop(self) -> None:
        self._stop_ev.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.is_alive():
            proc.terminate()  # (a blocked XREAD ends now; the relay sees the pipe close)

    def _put(self, item: tuple) -> None:
        self.out.put(item)
        if self.wake is not None:
            self.wake()

    def run(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # (never fork a daemon that has threads)
        secrets = self.cfg.secrets()
        while not self._stop_ev.is_set():
            recv_end, send_end = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=follow, args=(self.cfg, secrets, send_end, self.block_ms, os.getpid()),
                               name=f"sipguard-reader-{self.cfg.node_name}", daemon=True)
            with self._lock:
                if self._stop_ev.is_set():
                    break
                proc.start()
                self._proc, self.pid = proc, proc.pid
            send_end.close()
            try:
                self._relay(recv_end)
            finally:
                recv_end.close()
                if proc.is_alive():
                    proc.terminate()
                proc.join(5)
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
            if self._stop_ev.is_set():
                break
            why = f"the stream reader's process ended (exit code {proc.exitcode})"
            log.warning("cluster: %s; starting it again", why)
            if self.connected:
                self.connected = False
                self._put(("down", why))
            self._stop_ev.wait(self.cfg.retry_interval)

    def _relay(self, conn) -> None:  # noqa: ANN001 - a multiprocessing Connection
        """The process's messages until its pipe closes: states kept here, the rest to the bridge."""
        if not conn.poll(START_WAIT):
            log.warning("cluster: the stream reader's process did not start within %.0f s", START_WAIT)
            return
        while True:
            try:
                msg = marshal.loads(conn.recv_bytes())  # (from this node's own reader process)
            except (EOFError, OSError):
                return
            except (ValueError, TypeError):  # (never: the process is this module's own)
                log.exception("cluster: unreadable message from the stream reader's process")
                return
            kind = msg[0]
            if kind == "hello":
                if msg[1:] != (PROTOCOL,):  # (sipguard was upgraded under a running daemon: restart it)
                    log.error("cluster: the stream reader's process runs another sipguard version; restart the daemon")
                    return
                self.started.set()
            elif kind == "connected":
                self.connected = True
                self.started.set()
            elif kind == "error":
                _, self.last_error, was_connected = msg
                self.connected = False
                self.started.set()
                if was_connected:
                    self._put(("down", self.last_error))
            elif kind == "disconnected":
                self.connected = False
            elif kind == "log":
                log.log(msg[1], "cluster: %s", msg[2])
            else:
                self._put(msg)


def follow(cfg: ClusterConfig, secrets: tuple, conn, block_ms: int, parent: int) -> None:  # noqa: ANN001
    """The reader's process: follow the stream, check every entry, send the results through `conn`
    (a whole XREAD reply per message); reconnect after `retry_interval` when Redis fails; end when the
    pipe closes or the daemon's process (`parent`) is gone."""
    from .signing import Signer
    from .wire import check_entry, check_shared

    def send(msg: tuple) -> None:  # marshal: plain values only, a sixth of pickle's time
        conn.send_bytes(marshal.dumps(msg))

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (a terminal's ^C is the daemon's to handle)
    current, previous, until = secrets
    signer = Signer(current, cfg.key_prefix, previous, until)
    P = cfg.key_prefix
    errors = redis_errors()
    client = None
    connected = False
    try:
        send(("hello", PROTOCOL))
        while os.getppid() == parent:
            try:
                if client is None:
                    client = connect(cfg, extra_timeout=block_ms / 1000)
                client.set(P + "epoch", uuid.uuid4().hex, nx=True)
                taken = time.time()
                with client.pipeline(transaction=True) as pipe:  # atomic: top id and the hash agree
                    pipe.get(P + "epoch").xrevrange(P + "stream", count=1).hgetall(P + "bans").hgetall(P + "unbans")
                    epoch, top, bans, unbans = pipe.execute()
                last = top[0][0] if top else "0-0"
                connected = True
                send(("connected",))
                send(("tombstones", unbans))  # the signed unbans the snapshot may drop a ban on
                now = time.time()
                send(("checked_snapshot", epoch, [(ip, check_shared(v, signer, now)) for ip, v in bans.items()],
                           taken))
                while os.getppid() == parent:
                    resp = client.xread({P + "stream": last}, count=XREAD_COUNT, block=block_ms)
                    for _stream, entries in resp or ():
                        if entries:
                            last = entries[-1][0]
                            now = time.time()
                            send(("checked", [(eid, check_entry(fields, signer, now)) for eid, fields in entries]))
            except (BrokenPipeError, EOFError):
                raise  # (the daemon is gone or stopping)
            except errors as exc:
                send(("error", describe_error(exc, cfg.redis_url), connected))
                connected = False
                _close(client)
                client = None
                time.sleep(cfg.retry_interval)
            except Exception as exc:  # noqa: BLE001 - never let the reader die: say so, back off, reconnect
                send(("log", logging.ERROR, f"stream reader error ({type(exc).__name__}: {exc}); reconnecting"))
                send(("disconnected",))
                connected = False
                _close(client)
                client = None
                time.sleep(cfg.retry_interval)
    except (BrokenPipeError, EOFError, OSError):
        pass  # the daemon is gone or stopping
    finally:
        _close(client)


def _close(client) -> None:  # noqa: ANN001
    if client is not None:
        try:
            client.close()
        except Exception:  # noqa: BLE001
            pass
