"""The fleet's stream reader: a process of its own that follows the ban stream and checks what it reads.

The reading and the checking run in a child process (`main` / `follow`, started by `StreamReader` as
`python -c ...` with this very sipguard first on its path), with its own Redis connection: XREAD
BLOCK and its reply's parsing, each entry's json, its tag (`signing.py`) and its bounds
(`wire.check_entry`; a node's bulk list: one tag for all its bans), and the same for every value of
the shared ban set at each (re)connect
(`wire.check_shared`). It hands the daemon checked tuples of plain values, a whole XREAD reply per
message, marshalled through a pipe; so the daemon's own thread only applies them (the guard rails, the
ban book's kernel batch, the store): a 100,000-ban burst is checked on one core while it is applied
on the other, and detection keeps its share of the daemon's thread.

It reads Redis (writing only the `epoch` key, when Redis has none: a new epoch tells every node that
Redis lost its data). It never touches the store, the policy or the enforcer. In the daemon,
`StreamReader` is a thread that starts the process, relays its messages to the bridge's queue and
wakes the loop (`wake`, the follower's), so an entry is applied the moment XREAD returns it, not at the
loop's next tick. The process ends with the reader (`stop`: SIGTERM to its PID) or when the daemon's
process is gone, and is started again if it dies; when it cannot be started at all the same reading
runs on the relay's thread. The config and the secret go to it through its stdin (never a command
line, never Redis).
"""

from __future__ import annotations

import logging
import marshal
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

from .connection import connect, describe_error, redis_errors

if TYPE_CHECKING:
    from ..config import ClusterConfig

log = logging.getLogger("sipguard.cluster")

XREAD_COUNT = 2000
"""Entries per XREAD: one reply per chunk the bridge applies (APPLY_BATCH); a single entry still
returns at once (XREAD BLOCK answers as soon as one is there). After a reply with bulk entries (a
node's lists of bans) fewer are asked for, so a reply holds about this many bans whatever the entries
are. The replies are parsed by hiredis (a dependency), in the reader's process."""

PROTOCOL = 1  # of the messages between the reader's process and the daemon (marshalled plain values)
_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding this sipguard package
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
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._conn: Connection | None = None  # the pipe from the reader's process, while it runs
        self._reading = threading.Lock()  # held by whoever takes messages off the pipe (relay or `pump`)

    def stop(self) -> None:
        self._stop_ev.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()  # (its own child, by its PID: a blocked XREAD ends now; the relay sees the pipe close)

    def _put(self, item: tuple, wake: bool = True) -> None:
        self.out.put(item)
        if wake and self.wake is not None:
            self.wake()

    def pump(self) -> None:
        """On the daemon's thread, before it applies: take what the reader's process has written to the
        pipe and the relay has not taken yet (an awake loop needs no other thread's turn for it)."""
        conn, lock = self._conn, self._reading
        if conn is None or not lock.acquire(blocking=False):
            return
        try:
            while conn.poll(0):
                msg = marshal.loads(conn.recv_bytes())
                if not self._on_message(msg, wake=False):
                    return
        except (EOFError, OSError, ValueError, TypeError):
            return  # (the relay sees the same and says so)
        finally:
            lock.release()

    def run(self) -> None:
        secrets = self.cfg.secrets()
        while not self._stop_ev.is_set():
            with self._lock:
                if self._stop_ev.is_set():
                    break
                try:
                    proc, conn = self._start(secrets)
                except (OSError, ValueError, pickle.PicklingError):
                    log.exception("cluster: could not start the stream reader's process; reading the stream "
                                  "on a thread of the daemon instead (slower for a burst)")
                    proc = conn = None
                else:
                    self._proc, self.pid = proc, proc.pid
            if proc is None:
                self._in_thread(secrets)
                return
            try:
                self._relay(conn)
            finally:
                conn.close()
                _end(proc)
            if self._stop_ev.is_set():
                break
            why = f"the stream reader's process ended (exit code {proc.returncode})"
            log.warning("cluster: %s; starting it again", why)
            if self.connected:
                self.connected = False
                self._put(("down", why))
            self._stop_ev.wait(self.cfg.retry_interval)

    def _start(self, secrets: tuple) -> tuple[subprocess.Popen, Connection]:
        """The reader's process: this python, this sipguard (its directory first on the path), the
        config and the secret through its stdin, its messages through a pipe of their own."""
        r, w = os.pipe()
        try:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
            proc = subprocess.Popen([sys.executable, "-c", "from sipguard.cluster.reader import main; main()",
                                     str(w)], stdin=subprocess.PIPE, pass_fds=(w,), env=env, close_fds=True)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        try:
            assert proc.stdin is not None
            proc.stdin.write(pickle.dumps((self.cfg, secrets, self.block_ms, os.getpid())))
            proc.stdin.close()
        except BaseException:
            os.close(r)
            _end(proc)
            raise
        return proc, Connection(r, writable=False)

    def _in_thread(self, secrets: tuple) -> None:
        """The fallback: `follow` on this thread (same checks, on the daemon's GIL) until `stop`."""
        relay = self

        class Direct:
            def send_bytes(self, data: bytes) -> None:
                relay._on_message(marshal.loads(data))

        self.pid = os.getpid()
        follow(self.cfg, secrets, Direct(), self.block_ms, os.getppid(), alive=lambda: not self._stop_ev.is_set())

    def _relay(self, conn) -> None:  # noqa: ANN001 - a multiprocessing Connection
        """The process's messages until its pipe closes: states kept here, the rest to the bridge."""
        if not conn.poll(START_WAIT):
            log.warning("cluster: the stream reader's process did not start within %.0f s", START_WAIT)
            return
        try:  # its first message says which protocol it speaks; then `pump` may share the reading
            if not self._on_message(marshal.loads(conn.recv_bytes())):
                return
        except (EOFError, OSError, ValueError, TypeError):
            return
        self._conn = conn
        try:
            while True:
                try:
                    conn.poll(None)  # (until a message or the end; the daemon's `pump` may take it first)
                    with self._reading:
                        while conn.poll(0):
                            msg = marshal.loads(conn.recv_bytes())  # (from this node's own reader process)
                            if not self._on_message(msg):
                                return
                except (EOFError, OSError):
                    return
                except (ValueError, TypeError):  # (never: the process is this module's own)
                    log.exception("cluster: unreadable message from the stream reader's process")
                    return
        finally:
            self._conn = None

    def _on_message(self, msg: tuple, wake: bool = True) -> bool:
        """One message of the reader: a state kept here, or an item for the bridge; False: stop reading."""
        kind = msg[0]
        if kind == "hello":
            if msg[1:] != (PROTOCOL,):  # (sipguard was upgraded under a running daemon: restart it)
                log.error("cluster: the stream reader's process runs another sipguard version; restart the daemon")
                return False
            self.started.set()
        elif kind == "connected":
            self.connected = True
            self.started.set()
        elif kind == "error":
            _, self.last_error, was_connected = msg
            self.connected = False
            self.started.set()
            if was_connected:
                self._put(("down", self.last_error), wake)
        elif kind == "disconnected":
            self.connected = False
        elif kind == "log":
            log.log(msg[1], "cluster: %s", msg[2])
        else:
            self._put(msg, wake)
        return True


def follow(cfg: ClusterConfig, secrets: tuple, conn, block_ms: int, parent: int,  # noqa: ANN001
           alive: Callable[[], bool] | None = None) -> None:
    """The reader's process: follow the stream, check every entry, send the results through `conn`
    (a whole XREAD reply per message); reconnect after `retry_interval` when Redis fails; end when the
    pipe closes or the daemon's process (`parent`) is gone (or, on a thread, when `alive` says so)."""
    if alive is None:
        def alive() -> bool:
            return os.getppid() == parent

    from .signing import Signer
    from .wire import check_reply, check_shared

    def send(msg: tuple) -> None:  # marshal: plain values only, a sixth of pickle's time
        conn.send_bytes(marshal.dumps(msg))

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # (a terminal's ^C is the daemon's to handle)
    current, previous, until = secrets
    signer = Signer(current, cfg.key_prefix, previous, until)
    P = cfg.key_prefix
    errors = redis_errors()
    client = None
    connected = False
    try:
        send(("hello", PROTOCOL))
        while alive():
            try:
                if client is None:
                    client = connect(cfg, extra_timeout=block_ms / 1000)
                    # the reply as hiredis gives it, the fields paired below: redis-py's own XREAD callback
                    # (a Python loop per entry) took a quarter of this process's CPU in a burst
                    client.set_response_callback("XREAD", _raw)
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
                count = XREAD_COUNT
                while alive():
                    resp = client.xread({P + "stream": last}, count=count, block=block_ms)
                    for _stream, entries in (resp.items() if isinstance(resp, dict) else resp or ()):
                        if entries:
                            last = entries[-1][0]
                            now = time.time()
                            checked = check_reply(entries, signer, now)
                            for k in range(0, len(checked), XREAD_COUNT):
                                send(("checked", checked[k:k + XREAD_COUNT]))
                            # bulk entries (a node's lists): fewer per reply, about XREAD_COUNT bans each
                            count = max(1, XREAD_COUNT * len(entries) // max(len(checked), len(entries)))
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


def _raw(response, **_options):  # noqa: ANN001, ANN202 - a redis-py response callback
    return response


def _end(proc: subprocess.Popen) -> None:
    """Stop the reader's process (this module's own child, by its PID) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def main() -> None:
    """The reader's process (`StreamReader._start` runs it): the config from stdin, then `follow`."""
    from ..process import tune_gc

    conn = Connection(int(sys.argv[1]), readable=False)
    cfg, secrets, block_ms, parent = pickle.load(sys.stdin.buffer)
    tune_gc()  # (a burst: 2,000 checked entries per reply, made and dropped)
    follow(cfg, secrets, conn, block_ms, parent)
