"""Sources: complete lines out of Kamailio's logs, as bytes, exactly once.

`lines.py` cuts bytes into lines (LineBatch, SourcePosition); `files.py` reads log files live
(FileFollower, through rotation, truncation and restarts) or whole (read_file, read_chunks);
`identity.py` tells which file a position belongs to by its content (fingerprints, logrotate's names
for rotated generations); `journal.py` follows the systemd journal through journalctl; `multi.py`
polls files and journal as one; `pace.py` paces both (while lines keep coming, one batch per
interval, so a writer appending a line at a time does not cost the daemon a batch per line). Every
live source hands out LineBatches through the `Follower` interface.

Nothing here knows what Kamailio is: never decodes, parses or filters a line, and never touches
the store (callers persist positions and cursors).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from .files import STAT_KEYS, FileFollower, read_chunks, read_file
from .journal import JournalFollower, source_key
from .lines import CHUNK, MAX_LINE, LineBatch, SourcePosition
from .multi import MultiFollower

__all__ = ["CHUNK", "MAX_LINE", "STAT_KEYS", "FileFollower", "Follower", "JournalFollower", "LineBatch",
           "MultiFollower", "SourcePosition", "read_chunks", "read_file", "source_key"]


class Follower(Protocol):
    """A live source as the daemon uses it: poll batches of whole lines, save positions, close."""

    @property
    def stats(self) -> Mapping[str, int]: ...

    def start(self) -> None:
        """Pin where reading begins (the end, or the saved position) and start watching."""
        ...

    def poll_batch(self, timeout: float) -> LineBatch:
        """Complete lines available now, waiting up to `timeout` seconds for the first ones."""
        ...

    def wake(self) -> None:
        """End the current (or the next) poll's wait now, from any thread (the daemon's other inputs)."""
        ...

    def positions(self) -> dict[str, SourcePosition]:
        """Per file, the position just past the last line handed out (to save with the batch)."""
        ...

    def close(self) -> None: ...
