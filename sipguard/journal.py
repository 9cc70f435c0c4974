"""Follow Kamailio through the systemd journal instead of a file (`[sources] journal`).

One `journalctl --follow --output=json --all` process per daemon, matching the configured units
(`-u`) and syslog identifiers (`-t`); its JSON lines are handed to the daemon as Lines of the
source `journal:<matches>`, and `JournalParser` builds Records straight from the entry's fields
(MESSAGE, __REALTIME_TIMESTAMP with microseconds, _PID/SYSLOG_PID, SYSLOG_IDENTIFIER, _HOSTNAME):
no timestamp or prefix parsing. MESSAGE arrives as an array of bytes when it holds a CR or other
control characters; it is decoded like any other message.

The journal cursor of the last entry handed out is saved in the store (meta
`journal_cursor:<source>`) in the same transaction as the batch's events, so a restart resumes
exactly after it (`--after-cursor`), neither losing nor re-reading an entry.

Kamailio logging to syslog (its default, `log_stderror=no`) reaches the journal one record per
entry (`_TRANSPORT=syslog`), which an attacker cannot split. Kamailio run with `-E` logs to stderr,
and the journal then cuts its output at every LF, including LFs copied from SIP messages: such
stdout entries are accepted only with Kamailio's ` rank(pid) LEVEL:` prefix naming the entry's own
_PID, and counted as `forged` otherwise (still: prefer syslog).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from .model import Line, Record
from .sources import FileFollower, LineBatch

log = logging.getLogger("sipguard.journal")

META_PREFIX = "journal_cursor:"
_STDERR_PREFIX = re.compile(r"^\s*(\d+)\((\d+)\) ")
MAX_QUEUE = 200_000  # lines buffered between journalctl and the daemon before the reader waits


def source_key(units: Iterable[str], identifiers: Iterable[str]) -> str:
    parts = [f"unit={u}" for u in units] + [f"id={i}" for i in identifiers]
    return "journal:" + ",".join(parts)


def message_text(value: Any) -> str | None:
    """MESSAGE as text: a string, or journalctl's array of byte values (CR, binary), or None."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        try:
            return bytes(value).decode("utf-8", errors="replace")
        except (TypeError, ValueError):
            return None
    return None


class JournalParser:
    """RecordParser's counterpart for journal JSON entries (same feed/flush/stats shape)."""

    def __init__(self, programs: frozenset[str] | None = None) -> None:
        self.programs = programs
        self.stats: Counter[str] = Counter({"lines": 0, "records": 0, "garbage": 0, "forged": 0,
                                            "other_program": 0, "binary_message": 0})

    def feed(self, line: Line) -> list[Record]:
        st = self.stats
        st["lines"] += 1
        try:
            entry = json.loads(line.data)
        except (ValueError, UnicodeDecodeError):
            st["garbage"] += 1
            return []
        if not isinstance(entry, dict):
            st["garbage"] += 1
            return []
        raw = entry.get("MESSAGE")
        text = message_text(raw)
        if text is None:
            st["garbage"] += 1
            return []
        if isinstance(raw, list):
            st["binary_message"] += 1
        text = text.rstrip("\r\n")
        program = entry.get("SYSLOG_IDENTIFIER") or entry.get("_COMM")
        if self.programs is not None and program not in self.programs:
            st["other_program"] += 1
            return []
        pid = _int(entry.get("_PID")) or _int(entry.get("SYSLOG_PID"))
        rank = None
        if entry.get("_TRANSPORT") == "stdout":  # kamailio -E: the stream is cut at every LF
            m = _STDERR_PREFIX.match(text)
            if not m or (pid is not None and int(m.group(2)) != pid):
                st["forged"] += 1
                return []
            rank, pid, text = int(m.group(1)), int(m.group(2)), text[m.end():]
        ts = _int(entry.get("__REALTIME_TIMESTAMP"))
        st["records"] += 1
        return [Record(text=text, time=None if ts is None else ts / 1e6, host=entry.get("_HOSTNAME"),
                       program=program, pid=pid, rank=rank, source=line.source)]

    def flush(self) -> list[Record]:
        return []


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


class JournalFollower:
    """A journalctl child process read on a thread; `drain()` hands out its lines."""

    def __init__(self, units: list[str], identifiers: list[str], store: Any = None, journalctl: str = "journalctl",
                 from_start: bool = False) -> None:
        self.units = list(units)
        self.identifiers = list(identifiers)
        self.key = source_key(self.units, self.identifiers)
        self.sources = [self.key]
        self.store = store
        self.journalctl = journalctl
        self.from_start = from_start
        self.stats: Counter[str] = Counter({"lines": 0, "restarts": 0, "errors": 0})
        self._queue: list[tuple[bytes, str | None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self.cursor: str | None = store.get_meta(META_PREFIX + self.key) if store is not None else None
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

    def drain(self) -> list[Line]:
        with self._lock:
            items, self._queue = self._queue, []
        if not items:
            return []
        for _, c in reversed(items):
            if c:
                self._handed_cursor = c
                break
        self.stats["lines"] += len(items)
        return [Line(self.key, data, 0) for data, _ in items]

    def pending(self) -> bool:
        return bool(self._queue)

    def save_cursors(self) -> None:
        """Called inside the batch's transaction: the cursor of the last entry handed out."""
        if self.store is not None and self._handed_cursor and self._handed_cursor != self.cursor:
            self.store.set_meta(META_PREFIX + self.key, self._handed_cursor)
            self.cursor = self._handed_cursor

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


class MultiFollower:
    """The daemon's file follower plus the journal, behind the follower's batch interface."""

    SLICE = 0.05

    def __init__(self, files: FileFollower, journal: JournalFollower) -> None:
        self.files = files
        self.journal = journal

    @property
    def stats(self) -> dict[str, int]:
        out = dict(self.files.stats)
        for k, v in self.journal.stats.items():
            out[f"journal_{k}"] = v
        return out

    def start(self) -> None:
        self.files.start()
        self.journal.start()
        log.info("following the journal: %s", ", ".join(self.journal.sources))

    def poll_batch(self, timeout: float) -> LineBatch:
        """The files' read buffers as they are (their lines stay unparsed unless they hold a trigger
        literal), then the journal's entries, one segment per journal source."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            if self.journal.pending():
                return self._with_journal(self.files.poll_batch(0))
            left = deadline - time.monotonic()
            batch = self.files.poll_batch(min(self.SLICE, max(0.0, left)))
            if len(batch) or left <= self.SLICE:
                return self._with_journal(batch)

    def _with_journal(self, batch: LineBatch) -> LineBatch:
        lines = self.journal.drain()
        if not lines:
            return batch
        return LineBatch([*batch.segments, (self.journal.key, 0, b"\n".join(ln.data for ln in lines) + b"\n")])

    def positions(self) -> dict:
        return self.files.positions()

    def close(self) -> None:
        self.files.close()
        self.journal.close()
