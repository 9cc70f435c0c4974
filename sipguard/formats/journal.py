"""Journal entries: turn the JSON lines of `journalctl --output=json` into Kamailio Records.

JournalParser builds Records straight from the entry's fields (MESSAGE, __REALTIME_TIMESTAMP with
microseconds, _PID/SYSLOG_PID, SYSLOG_IDENTIFIER, _HOSTNAME): no timestamp or prefix parsing. MESSAGE
arrives as an array of bytes when it holds a CR or other control characters; it is decoded like any
other message.

Kamailio logging to syslog (its default, `log_stderror=no`) reaches the journal one record per
entry (`_TRANSPORT=syslog`), which an attacker cannot split; a MESSAGE that is a record of
Kamailio's JSON log engine (`--log-engine=json...`, kjson.py) is decoded, the filters see its
message as the classic engine prints it, the PID the record's own when it carries one. Kamailio run
with `-E` logs to stderr, and the journal then cuts its output at every LF, including LFs copied
from SIP messages: plain stderr text there is forgeable, so its entries are read only with
`trust_plain_stderr` (counted as `untrusted_stderr` otherwise), and then only with Kamailio's
` rank(pid) LEVEL:` prefix naming the entry's own _PID (`forged` otherwise). JSON engine records
on stdout are read, unless one of them shows a raw field (flag `c`, a log prefix with text), which
makes them as forgeable as plain text (`unsafe_json`, sticky) without `trust_plain_stderr`.

Which entries are Kamailio's (`JournalTrust`): only fields journald sets itself decide, never what
the sender wrote. `_SYSTEMD_UNIT` (from the sender's cgroup: only root puts a process into a system
unit) must be one of Kamailio's units, or `_EXE` (the sender's executable, read by journald from
/proc) one of Kamailio's executables while `_UID` (from the kernel's socket credentials) is one of
Kamailio's users. `SYSLOG_IDENTIFIER` and `_COMM` can be set by any sender (`logger -t kamailio`,
prctl), so they never make an entry Kamailio's: such entries are counted as `untrusted` (and
`other_program`) and skipped. A field journald could not read (the sender exited first) is missing,
so such an entry is not trusted either.

Records are capped like the lines of a file: an entry whose MESSAGE is longer than `max_line` bytes
(`[sources] max_line`) is counted as `too_long` and skipped, and so is a JSON line too long to hold
a MESSAGE within that cap (it is not even decoded), so no filter ever runs over more than max_line.

Never runs journalctl and never raises on input: what is not a JSON object with a MESSAGE is counted
as garbage.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..model import Line, Record
from . import kjson
from .losses import JOURNAL_DROPPED

log = logging.getLogger("sipguard.formats")

MAX_WARNED = 16  # distinct untrusted senders warned about (bounded: each costs one log line, once)
_STDERR_PREFIX = re.compile(r"^\s*(\d+)\((\d+)\) ")
MAX_LINE = 1 << 20  # [sources] max_line's default
JSON_SLACK = 64 << 10  # room for an entry's other fields beside its MESSAGE
JSON_PER_BYTE = 6  # the most JSON text one byte of MESSAGE takes ("\u001b" in a string)


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


@dataclass(frozen=True, slots=True)
class JournalTrust:
    """What makes a journal entry Kamailio's: its unit, or its executable run as one of its users.

    `units`: `_SYSTEMD_UNIT` values (e.g. "kamailio.service"); `executables`: `_EXE` values (e.g.
    "/usr/sbin/kamailio"); `uids`: the `_UID`s an executable's entry must have (empty: any uid,
    which lets any local user run Kamailio's binary with a config of their own).
    """

    units: frozenset[str] = frozenset()
    executables: frozenset[str] = frozenset()
    uids: frozenset[int] = frozenset()

    @classmethod
    def of(cls, units: Iterable[str] = (), executables: Iterable[str] = (), uids: Iterable[int] = ()) -> JournalTrust:
        return cls(frozenset(unit_name(u) for u in units), frozenset(executables), frozenset(uids))

    def trusts(self, entry: dict) -> bool:
        """Whether journald's own fields of `entry` say Kamailio wrote it."""
        unit = entry.get("_SYSTEMD_UNIT")
        if isinstance(unit, str) and unit in self.units:
            return True
        exe = entry.get("_EXE")
        if isinstance(exe, str) and exe in self.executables:
            return not self.uids or _int(entry.get("_UID")) in self.uids
        return False


def unit_name(unit: str) -> str:
    """A unit as journald names it in `_SYSTEMD_UNIT`: `kamailio` is `kamailio.service` (as for
    `journalctl -u`)."""
    return unit if "." in unit else unit + ".service"


class JournalParser:
    """RecordParser's counterpart for journal JSON entries (same feed/flush/stats shape): one line,
    at most one record, nothing pending between lines.

    `trust` decides which entries are Kamailio's (the daemon always gives one); without it (offline
    reading of entries already selected) `programs`, if given, is checked against SYSLOG_IDENTIFIER.
    `trust_plain_stderr`: read plain `kamailio -E` text entries (forgeable; see the module's docstring).
    """

    def __init__(self, programs: frozenset[str] | None = None, max_line: int = MAX_LINE,
                 trust: JournalTrust | None = None, *, trust_plain_stderr: bool = False) -> None:
        self.programs = programs
        self.trust = trust
        self.max_line = max_line
        self._warned: set[tuple] = set()
        self.trust_plain_stderr = trust_plain_stderr
        self._max_json = JSON_PER_BYTE * max_line + JSON_SLACK
        self._raw = False  # a stdout JSON record showed a raw field (sticky)
        self.stats: Counter[str] = Counter({"lines": 0, "records": 0, "garbage": 0, "forged": 0,
                                            "other_program": 0, "untrusted": 0, "binary_message": 0,
                                            "too_long": 0, "json_invalid": 0, "untrusted_stderr": 0,
                                            "unsafe_json": 0, "loss_notice": 0})

    def feed(self, line: Line) -> list[Record]:
        st = self.stats
        st["lines"] += 1
        if len(line.data) > self._max_json:
            st["too_long"] += 1
            return []
        try:
            entry = json.loads(line.data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            st["garbage"] += 1
            return []
        if not isinstance(entry, dict):
            st["garbage"] += 1
            return []
        raw = entry.get("MESSAGE")
        if isinstance(raw, list) and len(raw) > self.max_line:  # one value per byte
            st["too_long"] += 1
            return []
        text = message_text(raw)
        if text is None:
            st["garbage"] += 1
            return []
        if len(text) > self.max_line // 4 and len(text.encode("utf-8", "surrogatepass")) > self.max_line:
            st["too_long"] += 1
            return []
        if isinstance(raw, list):
            st["binary_message"] += 1
        text = text.rstrip("\r\n")
        program = entry.get("SYSLOG_IDENTIFIER") or entry.get("_COMM")
        if entry.get("_TRANSPORT") == "driver" and entry.get("MESSAGE_ID") == JOURNAL_DROPPED:
            st["loss_notice"] += 1  # journald's own "Suppressed N messages": counted by formats/losses.py
            return []
        if self.trust is not None:
            if not self.trust.trusts(entry):
                st["other_program"] += 1
                st["untrusted"] += 1
                self._warn_untrusted(entry)
                return []
        elif self.programs is not None and program not in self.programs:
            st["other_program"] += 1
            return []
        pid = _int(entry.get("_PID")) or (None if self.trust is not None else _int(entry.get("SYSLOG_PID")))
        rank = None
        stdout = entry.get("_TRANSPORT") == "stdout"  # kamailio -E: the stream is cut at every LF
        if text[:1] in "{@" and kjson.is_json_message(text) and (not stdout or kjson.is_stderr_head(text)):
            d = kjson.decode(text)
            if d is None:
                st["json_invalid"] += 1
                return []
            if stdout and (d.raw or self._raw):
                self._raw = True
                if not self.trust_plain_stderr:
                    st["unsafe_json"] += 1
                    return []
            if stdout and d.pid is not None and pid is not None and d.pid != pid:
                st["forged"] += 1
                return []
            text, rank = d.text, d.rank
            pid = d.pid if d.pid is not None else pid
        elif stdout:
            m = _STDERR_PREFIX.match(text)
            if not m or (pid is not None and int(m.group(2)) != pid):
                st["forged"] += 1
                return []
            if not self.trust_plain_stderr:
                st["untrusted_stderr"] += 1
                return []
            rank, pid, text = int(m.group(1)), int(m.group(2)), text[m.end():]
        ts = _int(entry.get("__REALTIME_TIMESTAMP"))
        st["records"] += 1
        return [Record(text=text, time=None if ts is None else ts / 1e6, host=entry.get("_HOSTNAME"),
                       program=program, pid=pid, rank=rank, source=line.source)]

    def _warn_untrusted(self, entry: dict) -> None:
        """Once per sender (unit, executable, uid): say why its entries are skipped, in case it is the
        operator's own Kamailio (run as another user or from another path). Everything printed is
        escaped: a sender names its own executable."""
        who = tuple(str(entry.get(k))[:256] for k in ("_SYSTEMD_UNIT", "_EXE", "_UID"))
        if who in self._warned or len(self._warned) >= MAX_WARNED:
            return
        self._warned.add(who)
        assert self.trust is not None
        log.warning("journal entries of unit %r, executable %r, uid %s are not Kamailio's (trusted: units %s; "
                    "executables %s as uids %s) and are skipped; if this is your Kamailio, add it to [sources] "
                    "journal, journal_executables or journal_users", *who, sorted(self.trust.units) or "none",
                    sorted(self.trust.executables) or "none", sorted(self.trust.uids) or "any")

    def flush(self) -> list[Record]:
        return []


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None
