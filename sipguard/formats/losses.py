"""Lines lost on the way, said out loud: the notices journald and rsyslog write when their rate limits
drop a sender's lines, recognised in what sipguard follows, counted, and warned about once with the fix.

Between Kamailio and sipguard a storm can lose lines before sipguard could read them: journald's
per-service limit (`RateLimitIntervalSec`/`RateLimitBurst`, lifted for one unit by its
`LogRateLimitIntervalSec=0`), rsyslog's imuxsock/imjournal limits. Both say so:

* journald, an entry of its own (`_TRANSPORT=driver`, which no client can set; `MESSAGE_ID`
  a596d6fe7bfa4994828e72309e95d61e; `N_DROPPED`; `OBJECT_SYSTEMD_UNIT`) that `journalctl -u UNIT`
  shows beside the unit's lines: ``Suppressed 25 messages from kamailio.service``. In the journal's
  JSON only an entry with journald's own fields counts; a lookalike is counted as `untrusted`.
  Through syslog (a file): ``systemd-journald[26]: Suppressed 25 messages from kamailio.service``.
* rsyslog, an internal message (`rsyslogd-2177:` in a file), as 8.2302 writes it:
  ``imuxsock[pid: 87, name: /usr/sbin/kamailio]: 90 messages lost due to rate-limiting (10 allowed
  within 2 seconds)`` and ``imuxsock[pid: 87, name: ...] from <host:kamailio>: begin to drop messages due
  to rate-limiting`` (tests/data/real/rsyslog-ratelimit.log), and the older ``imuxsock begins to drop
  messages from pid 87 due to rate-limiting`` / ``imuxsock lost 123 messages from pid 87 due to
  rate-limiting``; imjournal's alike.

A text line cannot prove who wrote it (see the README: what a file source cannot prove); the shipped
rsyslog snippet writes only rsyslog's own internal messages and journald's (by its credentials) beside
Kamailio's. A notice never bans or unbans anything: it is counted and warned about.

`LossNotices.scan` looks at whole segments of raw lines (a few `bytes.find` per megabyte) before they
are parsed; the pipeline calls it for every LineBatch. Never raises on input.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

log = logging.getLogger("sipguard")

JOURNAL_DROPPED = "a596d6fe7bfa4994828e72309e95d61e"
"""journald's MESSAGE_ID for "Suppressed N messages from UNIT" (SD_MESSAGE_JOURNAL_DROPPED)."""

_NEEDLES = (JOURNAL_DROPPED.encode(), b"Suppressed ", b"due to rate-limiting")
_MAX_LINE = 1 << 16  # a notice is short; a longer line is not one (and is not parsed here)

_HEAD = r"^(?:[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d|\d{4}-\d\d-\d\dT[0-9:.]{8,20}(?:Z|[+-]\d\d:?\d\d)?) \S{1,255} "
"""A syslog line's head (traditional or ISO time, host): the program that follows is the line's own."""
_JOURNALD_TEXT = re.compile(_HEAD + r"systemd-journald(?:\[\d{1,10}\])?: Suppressed (\d{1,12}) messages from "
                            r"(\S{1,256})$")
_RSYSLOGD = r"rsyslogd(?:-\d{1,6})?(?:\[\d{1,10}\])?: "  # rsyslogd, rsyslogd-2177 (the message's error code)
_MODULE = r"(imuxsock|imjournal)(?:\[[^\]\n]{0,600}\])?"  # imuxsock[pid: 87, name: /usr/sbin/kamailio] (8.2302)
_RSYSLOG_LOST = re.compile(_HEAD + _RSYSLOGD + r"(?:" + _MODULE + r": (\d{1,12}) messages lost due to rate-limiting"
                           r"(?: \(\d{1,12} allowed within \d{1,12} seconds\))?|"
                           r"(imuxsock|imjournal) lost (\d{1,12}) messages from pid \d{1,10} due to rate-limiting)$")
_RSYSLOG_BEGIN = re.compile(_HEAD + _RSYSLOGD + _MODULE + r"(?: from <[^>\n]{0,600}>)?:? begins? to drop messages"
                            r"(?: from pid \d{1,10})? due to rate-limiting$")

FIXES = {
    "journald": ("journald's rate limit dropped lines of %s: install examples/systemd/kamailio.service.d/"
                 "sipguard-ratelimit.conf (LogRateLimitIntervalSec=0 for Kamailio alone) as "
                 "/etc/systemd/system/kamailio.service.d/, then systemctl daemon-reload && systemctl restart "
                 "kamailio"),
    "rsyslog": ("rsyslog's %s rate limit dropped lines: set SysSock.RateLimit.Interval=\"0\" where /etc/rsyslog.conf "
                "loads imuxsock (imjournal: ratelimit.interval=\"0\"), then systemctl restart rsyslog "
                "(examples/kamailio/rsyslog-kamailio.conf)"),
}


@dataclass(slots=True)
class LossStats:
    notices: int = 0  # loss notices seen (trusted ones)
    lost: int = 0  # lines they say were dropped (a "begin to drop" notice says no number)
    journald: int = 0  # notices from journald
    rsyslog: int = 0  # notices from rsyslog
    untrusted: int = 0  # journal entries that look like journald's notice but lack its own fields

    def as_dict(self) -> dict[str, int]:
        # (dataclasses.asdict deep-copies: this runs for every batch the daemon reports to its hooks)
        return {name: getattr(self, name) for name in self.__slots__}


class LossNotices:
    """Counts the loss notices of the lines it is shown; warns once per origin (journald, rsyslog)."""

    def __init__(self) -> None:
        self.stats = LossStats()
        self._warned: set[str] = set()

    def scan(self, data: bytes) -> None:
        """Every notice in `data` (whole lines, newline-separated)."""
        if not any(n in data for n in _NEEDLES):
            return
        seen: set[int] = set()
        for needle in _NEEDLES:
            at = data.find(needle)
            while at >= 0:
                start = data.rfind(b"\n", 0, at) + 1
                end = data.find(b"\n", at)
                end = len(data) if end < 0 else end
                if start not in seen:
                    seen.add(start)
                    if end - start <= _MAX_LINE:
                        self._line(data[start:end].rstrip(b"\r"))
                at = data.find(needle, end)

    def _line(self, raw: bytes) -> None:
        if raw[:1] == b"{":
            self._journal_entry(raw)
            return
        text = raw.decode("utf-8", "replace")
        m = _JOURNALD_TEXT.match(text)
        if m:
            self._count("journald", int(m.group(1)), m.group(2))
            return
        m = _RSYSLOG_LOST.match(text)
        if m:
            self._count("rsyslog", int(m.group(2) or m.group(4)), m.group(1) or m.group(3))
            return
        m = _RSYSLOG_BEGIN.match(text)
        if m:
            self._count("rsyslog", 0, m.group(1))

    def _journal_entry(self, raw: bytes) -> None:
        try:
            entry = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return
        if not isinstance(entry, dict) or entry.get("MESSAGE_ID") != JOURNAL_DROPPED:
            return
        if entry.get("_TRANSPORT") != "driver":  # only journald writes driver entries
            self.stats.untrusted += 1
            return
        try:
            n = int(entry.get("N_DROPPED", 0))
        except (TypeError, ValueError):
            n = 0
        unit = entry.get("OBJECT_SYSTEMD_UNIT")
        self._count("journald", max(0, n), unit if isinstance(unit, str) else "a unit")

    def _count(self, origin: str, n: int, what: str) -> None:
        st = self.stats
        st.notices += 1
        st.lost += n
        if origin == "journald":
            st.journald += 1
        else:
            st.rsyslog += 1
        if origin not in self._warned:
            self._warned.add(origin)
            log.warning("lines lost before sipguard could read them (%s lines in this notice; counted in "
                        "`sipguard status` and the metric sipguard_log_lines_lost): " + FIXES[origin],
                        n if n else "an unknown number of", ascii(what)[1:-1][:256])
