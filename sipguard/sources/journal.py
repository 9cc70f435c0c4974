"""The journal as a source: one `journalctl --follow --output=json --all` child process, selecting the
configured units (`-u`) and syslog identifiers (`-t`), read on a thread; its JSON lines (one entry
per line) are handed out as whole lines of the source `journal:<matches>`. Selecting is not trusting:
`-t` matches what any sender writes, and `-u` also shows systemd's own messages about the unit; which
entries are Kamailio's is decided from journald's own fields by formats/journal.py (JournalTrust).

A restart resumes exactly after the last entry handed out (`--after-cursor`): the caller gives the
saved cursors at construction and saves what `cursors()` returns together with what it derived from
the lines (the daemon: in the batch's transaction), so no entry is lost or read twice.

Never parses an entry (formats/journal.py does) and never touches the store.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping

from .lines import LineBatch

log = logging.getLogger("sipguard.journal")

MAX_QUEUE = 200_000  # lines buffered between journalctl and the daemon before the reader waits


def source_key(units: Iterable[str], identifiers: Iterable[str]) -> str:
    parts = [f"unit={u}" for u in units] + [f"id={i}" for i in identifiers]
    return "journal:" + ",".join(parts)


class JournalFollower:
    """A journalctl child process read on a thread; `drain()` hands out its lines."""

    def __init__(self, units: list[str], identifiers: list[str], cursors: Mapping[str, str] | None = None,
                 journalctl: str = "journalctl", from_start: bool = False) -> None:
        self.units = list(units)
        self.identifiers = list(identifiers)
        self.key = source_key(self.units, self.identifiers)
        self.sources = [self.key]
        self.journalctl = journalctl
        self.from_start = from_start
        self.stats: Counter[str] = Counter({"lines": 0, "restarts": 0, "errors": 0})
        self._queue: list[tuple[bytes, str | None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self.cursor: str | None = (cursors or {}).get(self.key) or None  # where the saved state ends
        self._read_cursor = self.cursor  # last cursor read from journalctl (restart point)
        self._handed_cursor = self.cursor  # last cursor handed out by drain()

    def _match_args(self) -> list[str]:
        argv = []
        for u in self.units:
            argv += ["--unit", u]
        for i in self.identifiers:
            argv += ["--identifier", i]
        return argv

    def argv(self, cursor: str | None) -> list[str]:
        argv = [self.journalctl, "--follow", "--output=json", "--all", "--no-pager", "--quiet",
                *self._match_args()]
        if cursor:
            argv += ["--after-cursor", cursor]
        else:
            argv += ["--lines=all"]
        return argv

    def _tail_cursor(self) -> str | None:
        """The cursor of the newest matching entry now (None: there is none yet)."""
        p = subprocess.run([self.journalctl, "--output=json", "--lines=1", "--no-pager", "--quiet",
                            *self._match_args()], capture_output=True, timeout=30)
        lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
        return _cursor_of(lines[-1]) if lines else None

    def start(self) -> None:
        """Start following. A first start pins the journal's end *before* returning (as the file
        follower does), so an entry written right after start() is never lost."""
        if self.cursor is None and not self.from_start:
            self._read_cursor = self._tail_cursor()
        self._spawn(self._read_cursor)
        self._thread = threading.Thread(target=self._run, name="journal", daemon=True)
        self._thread.start()

    def _spawn(self, cursor: str | None) -> None:
        self._proc = subprocess.Popen(self.argv(cursor), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, env={**os.environ, "SYSTEMD_COLORS": "0"})

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            proc = self._proc
            assert proc is not None and proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip(b"\n")
                if not line:
                    continue
                cursor = _cursor_of(line)
                while not self._stop.is_set():
                    with self._lock:
                        if len(self._queue) < MAX_QUEUE:
                            self._queue.append((line, cursor))
                            break
                    time.sleep(0.01)
                if cursor:
                    self._read_cursor = cursor
                if self._stop.is_set():
                    break
            if self._stop.is_set():
                break
            rc = proc.wait()
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            self.stats["errors"] += 1
            log.error("journalctl exited (%s): %s; restarting in %.1fs", rc, err[:300], backoff)
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, 30.0)
            self.stats["restarts"] += 1
            self._spawn(self._read_cursor)

    def drain(self) -> LineBatch:
        """Every line read since the last call, as one segment of whole lines (one entry each)."""
        with self._lock:
            items, self._queue = self._queue, []
        if not items:
            return LineBatch([])
        for _, c in reversed(items):
            if c:
                self._handed_cursor = c
                break
        self.stats["lines"] += len(items)
        return LineBatch([(self.key, 0, b"\n".join([data for data, _ in items]) + b"\n")])

    def pending(self) -> bool:
        return bool(self._queue)

    def cursors(self) -> dict[str, str]:
        """Per source, the cursor of the last entry handed out by drain() (what a restart resumes
        after), for the caller to save with what it derived from those lines."""
        return {self.key: self._handed_cursor} if self._handed_cursor else {}

    def close(self) -> None:
        self._stop.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._thread is not None:
            self._thread.join(5)
        if proc is not None:
            for fh in (proc.stdout, proc.stderr):
                if fh:
                    fh.close()


_CURSOR = re.compile(rb'"__CURSOR"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _cursor_of(line: bytes) -> str | None:
    m = _CURSOR.search(line)
    return m.group(1).decode("utf-8", errors="replace") if m else None
