"""Several sources behind one Follower: the log files and the journal, polled as one.

Each poll is one LineBatch holding the files' segments and the journal's, so the pipeline reads
both sparsely; paced as the files are (pace.py): journal entries of a steady stream go out together,
at most one batch per the files' batch interval. Never parses a line and never touches the store.
"""

from __future__ import annotations

import logging
import time

from ..model import Line
from .files import FileFollower
from .journal import JournalFollower
from .lines import LineBatch, SourcePosition
from .pace import Pacer

log = logging.getLogger("sipguard.sources")


class MultiFollower:
    """The daemon's file follower plus the journal, behind the Follower interface."""

    SLICE = 0.05

    def __init__(self, files: FileFollower, journal: JournalFollower) -> None:
        self.files = files
        self.journal = journal
        self._pacer = Pacer(files.batch_interval)
        self._interrupted = False

    @property
    def stats(self) -> dict[str, int]:
        out = dict(self.files.stats)
        for k, v in self.journal.stats.items():
            out[f"journal_{k}"] = v
        return out

    def poll_batch(self, timeout: float) -> LineBatch:
        """The files' lines and the journal's, waiting up to `timeout` seconds for the first ones
        (the files in slices, so a journal entry never waits for the whole timeout)."""
        deadline = time.monotonic() + max(0.0, timeout)
        if not self._interrupted:
            self._pacer.hold(deadline)
        while True:
            if self.journal.pending():
                return self._handed(self._with_journal(self.files.poll_batch(0)))
            left = deadline - time.monotonic()
            out = self.files.poll_batch(min(self.SLICE, max(0.0, left)))
            if out or left <= self.SLICE or self._interrupted:
                self._interrupted = False
                return self._handed(self._with_journal(out))

    def _handed(self, out: LineBatch) -> LineBatch:
        self._pacer.handed(bool(out), self.files.backlog or self.journal.pending())
        return out

    def wake(self) -> None:
        """End the current (or the next) poll's wait now (safe from any thread)."""
        self._interrupted = True
        self._pacer.poke()
        self.files.wake()

    def poll(self, timeout: float) -> list[Line]:
        return list(self.poll_batch(timeout))

    def _with_journal(self, files: LineBatch) -> LineBatch:
        journal = self.journal.drain()
        if not journal:
            return files
        return LineBatch(files.segments + journal.segments)

    def start(self) -> None:
        self.files.start()
        self.journal.start()
        log.info("following the journal: %s", ", ".join(self.journal.sources))

    def positions(self) -> dict[str, SourcePosition]:
        """The files' positions (the journal's cursors come from `journal.cursors()`)."""
        return self.files.positions()

    def close(self) -> None:
        self.files.close()
        self.journal.close()
