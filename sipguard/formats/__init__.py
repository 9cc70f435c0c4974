"""Log formats: turn the physical lines a source read into Kamailio Records.

`records.py` reads log files (syslog in its on-disk forms, journalctl text, Kamailio stderr) and
joins continuation lines; `journal.py` reads journalctl's JSON entries. Both have the `Parser` shape
the pipeline feeds; `losses.py` recognises the notices journald and rsyslog write when their rate
limits drop lines (the pipeline counts them). Never decides what is an attack and never raises on
input: unknown text is counted and skipped.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..model import Line, Record
from .journal import JournalParser, JournalTrust, message_text
from .records import FORMATS, MAX_RANKS, MAX_RECORD_CHARS, ParserStats, RecordParser

__all__ = ["FORMATS", "MAX_RANKS", "MAX_RECORD_CHARS", "JournalParser", "JournalTrust", "Parser", "ParserStats", "RecordParser",
           "message_text"]


class Parser(Protocol):
    """What the pipeline feeds: lines of its sources in order, in; completed Records, out.

    `feed` returns the records a line completed, `flush` every pending one (end of a batch or of the
    input). `stats` is a mapping of integer counters (`lines` among them: the lines fed).
    """

    stats: Any

    def feed(self, line: Line) -> list[Record]: ...

    def flush(self) -> list[Record]: ...
