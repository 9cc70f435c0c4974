"""The daemon's doorbell: a CLI command that changed the bans rings it, so the running daemon mirrors
the change (and, in fleet mode, publishes it to Redis) at once instead of at its next
`control_interval` tick.

One AF_UNIX datagram socket, `wake.sock` beside the database in the state directory (mode 0600: only
the owner of the state, who can change the bans anyway, rings). What is sent is never read as data: a
ring only ends the daemon loop's current wait, and rings coalesce, so a flood of them costs at most
one extra loop each. Ringing never fails a command: with no daemon (no socket, nobody bound to it, a
full queue) the ring is dropped, and the daemon mirrors the request at its next tick or start anyway.

The daemon side is a `Doorbell` hook (built by sipguard/wiring.py): a thread blocked in `recv` that
calls the loop's wake-up (the follower's `wake`). It touches nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .bans import BanBook

log = logging.getLogger("sipguard.daemon")

SOCKET_NAME = "wake.sock"
_SUN_PATH_MAX = 100  # sockaddr_un holds 108 bytes; longer paths are reached through /proc/self/fd


def bell_path(db_path: str) -> Path | None:
    """The doorbell of the state directory holding the database `db_path` (None for ':memory:')."""
    if not db_path or db_path == ":memory:":
        return None
    return Path(db_path).resolve().parent / SOCKET_NAME


@contextlib.contextmanager
def _addr(path: Path) -> Iterator[str]:
    """A socket address for `path` that fits sockaddr_un: the path itself, or, when it is too long,
    the same file reached through an open descriptor of its directory."""
    if len(os.fsencode(str(path))) <= _SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def ring(db_path: str) -> bool:
    """Wake the daemon that follows the state of `db_path`; True when a daemon's socket took it."""
    path = bell_path(db_path)
    if path is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s, _addr(path) as addr:
            s.setblocking(False)
            s.sendto(b"!", addr)
        return True
    except OSError:  # no daemon, not bound, queue full, not ours: it mirrors at its tick anyway
        return False


class Doorbell:
    """The daemon's end: binds the state directory's `wake.sock` and calls `wake` on every ring.

    A Hook of the daemon (start, on_batch, tick, close); a socket that cannot be bound (a read-only
    state directory) is said once and the daemon goes on with its tick.
    """

    def __init__(self, path: Path, wake: Callable[[], None]) -> None:
        self.path = path
        self.wake = wake
        self.rings = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ino = 0  # the socket file this bell bound (never unlink another run's)

    def start(self, book: BanBook) -> None:
        try:
            self._sock = self._bind()
        except OSError as exc:
            log.warning("no doorbell at %s (%s): CLI changes are mirrored at the control_interval tick",
                        self.path, exc)
            return
        self._thread = threading.Thread(target=self._listen, name="sipguard-doorbell", daemon=True)
        self._thread.start()

    def _bind(self) -> socket.socket:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(f"{self.path} exists and is not a socket")
            os.unlink(self.path)  # a stale socket of an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            old = os.umask(0o177)
            try:
                with _addr(self.path) as addr:
                    sock.bind(addr)
            finally:
                os.umask(old)
            self._ino = os.lstat(self.path).st_ino
        except BaseException:
            sock.close()
            raise
        return sock

    def _listen(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stop.is_set():
            try:
                sock.recv(64)
            except OSError:
                if self._stop.is_set():
                    return
                self._stop.wait(0.1)  # never spin on a broken socket
                continue
            if self._stop.is_set():
                return
            self.rings += 1
            self.wake()

    def on_batch(self, report: object) -> None:
        pass

    def tick(self, now: float, book: BanBook) -> None:
        pass

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._stop.set()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s, _addr(self.path) as addr:
                s.setblocking(False)
                s.sendto(b"", addr)  # ends the blocked recv
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        sock.close()
        try:
            if os.lstat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except OSError:
            pass
