"""Doctor checks of what sipguard reads: the followed files (or journal), the log contract, the clock.

`sample` reads the tail of each followed log once (at most `Host.tail_bytes`, never the whole file)
through the same pipeline the daemon uses; `check_logs`, `check_contract` and `check_clock` judge it.
Read-only: files are opened for reading, nothing is written, no position is saved.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..config import format_duration
from ..filters import FilterSet
from ..formats import JournalParser, JournalTrust, RecordParser
from ..model import Line
from ..pipeline import Pipeline
from ..sources import LineBatch
from ..wiring import SourceChoice, SourceRoots, choose_sources, journal_trust
from .base import CLOCK_TOLERANCE, FRESH, Finding, Host, ok, printable, problem, skipped, warning

CONTRACT = {
    "pike-block": "modparam(\"pike\", ...) with the script's  xlog(\"L_ALERT\",\"ALERT: pike block $rm from $fu "
                  "(IP:$si:$sp)\\n\");  (or pike's own 'PIKE - BLOCKing ip' line)",
    "scanner-ua": "xlog(\"L_WARN\", \"Blocked scanner UA '$ua' from $si:$sp\\n\");",
    "malformed": "xlog(\"Malformed SIP request from $si:$sp\\n\");  (and event_route[core:msg-received] "
                 "with received_route_mode=1)",
    "auth-failure": "xlog(\"L_NOTICE\", \"auth failed for user $fU from $si:$sp method $rm\\n\");",
    "auth-challenge": "xlog(\"L_NOTICE\", \"auth challenge for user $fU from $si:$sp method $rm\\n\");",
    "unknown-user": "xlog(\"L_NOTICE\", \"unknown user $fU from $si:$sp method $rm\\n\");",
    "register-success": "xlog(\"L_NOTICE\", \"REGISTER success for user $fU from $si:$sp\\n\");",
    "call-attempt": "xlog(\"L_NOTICE\", \"call attempt to $rU from $si:$sp\\n\");  (every initial INVITE)",
    "call-refused": "xlog(\"L_NOTICE\", \"$rm refused (not authenticated|relay denied|not local) to $rU from "
                    "$si:$sp\\n\");",
    "acl-refused": "xlog(\"L_NOTICE\", \"ACL refused $rm to $rU from $si:$sp\\n\");  (permissions: "
                   "allow_source_address)",
    "secfilter": "xlog(\"L_WARN\", \"secfilter blocked $rm (<verdict>) from $si:$sp\\n\");  (route[SECFILTER])",
}
"""The example config's line each shipped filter reads (README, "Making Kamailio print what sipguard reads")."""

SCRIPT_FILTERS = ("scanner-ua", "malformed", "auth-failure", "auth-challenge", "unknown-user", "register-success",
                  "call-attempt", "call-refused", "acl-refused", "secfilter")
"""Filters that read the example config's own xlog lines (not lines Kamailio prints by itself)."""

ATTACK_ONLY = frozenset({"pike-block", "scanner-ua", "malformed", "auth-failure", "unknown-user", "acl-refused",
                         "secfilter"})
"""Filters whose lines only an attack (or a typo) makes: never seeing them is normal on a quiet host."""


@dataclass
class LogSample:
    """What the tail of one followed log (or journal unit) holds."""

    source: str
    kind: str = "file"  # file | journal
    exists: bool = True
    readable: bool = True
    error: str | None = None
    size: int = 0
    mtime: float | None = None  # file: when it was last written (host clock)
    lines: int = 0  # lines in the tail read
    sampled: int = 0  # the newest lines parsed one by one (at most RECENT_LINES)
    records: int = 0  # records of the configured programs (Kamailio) among them
    other_program: int = 0
    newest: float | None = None  # the newest record timestamp (the log's clock)
    read_time: float | None = None
    matched: dict[str, int] = field(default_factory=dict)  # filter -> records matched inside the window
    last_match: dict[str, float] = field(default_factory=dict)


def _tail(path: Path, limit: int) -> tuple[bytes, bool]:
    """The last `limit` bytes of a file, from a line start; (data, whole file read)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        start = max(0, size - limit)
        f.seek(start)
        data = f.read(limit)
    if start > 0:
        cut = data.find(b"\n")
        data = data[cut + 1:] if cut >= 0 else b""
    return data, start == 0


RECENT_LINES = 5000
"""The newest lines parsed one by one (for the newest timestamp and the share of Kamailio records); the
rest of the tail is only searched for the filters' literals, as the daemon reads."""


def _judge(host: Host, filters: FilterSet, s: LogSample, data: bytes, make_parser) -> None:  # noqa: ANN001
    """Matches per filter over the whole tail (sparse: only lines holding a literal are parsed), and
    records and the newest timestamp from its last RECENT_LINES lines."""
    since = host.now - host.hours * 3600
    if data and not data.endswith(b"\n"):
        data += b"\n"
    s.lines = data.count(b"\n")
    res = Pipeline(make_parser(), filters).batch(LineBatch([(s.source, 0, data)]), host.now)
    for ev in res.events:
        if ev.time < since:
            continue
        s.matched[ev.filter] = s.matched.get(ev.filter, 0) + 1
        s.last_match[ev.filter] = max(s.last_match.get(ev.filter, 0.0), ev.time)
    cut = len(data)
    for _ in range(RECENT_LINES + 1):
        cut = data.rfind(b"\n", 0, cut)
        if cut < 0:
            break
    recent = data[cut + 1:]
    s.sampled = recent.count(b"\n")
    parser = make_parser()
    for rec in Pipeline(parser, sparse=False).records(Line(s.source, ln) for ln in recent.split(b"\n")[:-1]):
        s.records += 1
        if rec.time is not None and (s.newest is None or rec.time > s.newest):
            s.newest = rec.time
    stats = parser.stats  # ParserStats (files) or a Counter (journal): both read as a mapping
    s.other_program = int(stats["other_program"]) if "other_program" in stats else 0


def sample_file(host: Host, filters: FilterSet, path: str) -> LogSample:
    s = LogSample(path)
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        s.exists = s.readable = False
        return s
    except OSError as exc:
        s.readable, s.error = False, exc.strerror or str(exc)
        return s
    s.size, s.mtime = st.st_size, st.st_mtime
    try:
        data, _ = _tail(p, host.tail_bytes)
    except OSError as exc:
        s.readable, s.error = False, exc.strerror or str(exc)
        return s
    s.read_time = host.now
    cfg = host.cfg.sources
    _judge(host, filters, s, data, lambda: RecordParser(cfg.format, programs=cfg.programs, now=lambda: host.now))
    return s


def sample_journal(host: Host, filters: FilterSet, unit: str, identifier: bool, trust: JournalTrust) -> LogSample:
    """The newest entries of one journal unit (or syslog identifier), read with journalctl."""
    s = LogSample(("identifier " if identifier else "unit ") + unit, kind="journal")
    exe = shutil.which(host.cfg.sources.journalctl) or (host.cfg.sources.journalctl
                                                        if os.path.isabs(host.cfg.sources.journalctl) else None)
    if exe is None or not os.access(exe, os.X_OK):
        s.exists = s.readable = False
        s.error = f"{host.cfg.sources.journalctl} not found"
        return s
    argv = [exe, "--output=json", "--all", "--no-pager", "-n", "20000",
            "-t" if identifier else "-u", unit]
    try:
        p = subprocess.run(argv, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        s.readable, s.error = False, str(exc)
        return s
    if p.returncode != 0:
        s.readable, s.error = False, p.stderr.decode("utf-8", "replace").strip()[:300]
        return s
    raw = [ln for ln in p.stdout.split(b"\n") if ln.strip()]
    if raw:
        try:
            newest = json.loads(raw[-1]).get("__REALTIME_TIMESTAMP")
            s.mtime = int(newest) / 1e6 if newest else None
        except (ValueError, TypeError, AttributeError):
            s.mtime = None
    s.exists = bool(raw)
    _judge(host, filters, s, b"\n".join(raw), lambda: JournalParser(max_line=host.cfg.sources.max_line, trust=trust))
    return s


def load_filters(host: Host) -> FilterSet:
    c = host.cfg.filters
    return FilterSet.load(c.directories, enabled=c.enabled, disabled=c.disabled)


def chosen_sources(host: Host) -> SourceChoice:
    """What the daemon follows on this host: the config's [sources], or the default chain it would choose."""
    def make() -> SourceChoice:
        roots = SourceRoots.from_env() if host.root == Path("/") else SourceRoots(host.path("/var/log"))
        return choose_sources(host.cfg.sources, roots)
    return host.cached("sources", make)


def samples(host: Host) -> list[LogSample]:
    """Every followed source's sample, read once per host."""
    def make() -> list[LogSample]:
        filters = load_filters(host)
        choice = chosen_sources(host)
        trust = journal_trust(host.cfg.sources, choice.journal)
        out = [sample_file(host, filters, p) for p in choice.logs]
        out += [sample_journal(host, filters, u, False, trust) for u in choice.journal]
        out += [sample_journal(host, filters, u, True, trust) for u in choice.identifiers]
        return out
    return host.cached("samples", make)


def _ago(host: Host, t: float) -> str:
    d = host.now - t
    return f"{format_duration(d)} ago" if d >= 1 else "just now"


def check_logs(host: Host) -> list[Finding]:
    """Each followed file (or journal unit) exists, is readable and Kamailio wrote it recently."""
    out: list[Finding] = []
    srcs = samples(host)
    if not srcs:
        return [problem("logs", "nothing is followed: [sources] logs and journal are both empty",
                        "set [sources] logs = [\"/var/log/kamailio.log\"] (or journal = [\"kamailio.service\"])")]
    progs = ", ".join(host.cfg.sources.programs)
    for s in srcs:
        name = printable(s.source)
        if s.kind == "journal" and not s.readable:
            out.append(problem("logs", f"journal {name}: cannot be read: {printable(s.error or '?')}",
                               "install systemd's journalctl (or set [sources] journalctl to its path) and run "
                               "sipguard as root or in group systemd-journal", source=s.source))
            continue
        if not s.exists:
            if s.kind == "journal":
                out.append(problem("logs", f"journal {name}: no entries at all",
                                   "check the unit name (systemctl status kamailio) or use journal_identifiers",
                                   source=s.source))
            else:
                out.append(problem("logs", f"{name}: does not exist",
                                   f"make Kamailio log there: cp examples/kamailio/rsyslog-kamailio.conf "
                                   f"/etc/rsyslog.d/10-kamailio.conf && touch {name} && systemctl restart "
                                   f"rsyslog kamailio (or fix [sources] logs)", source=s.source))
            continue
        if not s.readable:
            out.append(problem("logs", f"{name}: cannot be read: {printable(s.error or '?')}",
                               f"run sipguard as root (the unit does), or chgrp adm {name} && chmod g+r {name}",
                               source=s.source))
            continue
        if s.lines == 0:
            out.append(problem("logs", f"{name}: empty: Kamailio has written nothing there",
                               "check the rsyslog rule for Kamailio's facility (examples/kamailio/"
                               "rsyslog-kamailio.conf) and that Kamailio logs to syslog (log_stderror=no)",
                               source=s.source))
            continue
        if s.records == 0:
            out.append(problem("logs", f"{name}: none of the last {s.sampled} lines is a record of {progs}",
                               f"point [sources] logs at Kamailio's own log, or set [sources] programs to the "
                               f"syslog name Kamailio logs under ({s.other_program} lines of other programs "
                               f"were seen)", source=s.source, lines=s.lines))
            continue
        # a file other programs write too (syslog) is fresh only by Kamailio's own newest record
        last = s.newest if (s.other_program and s.newest is not None) or s.mtime is None else s.mtime
        if last is not None and host.now - last > FRESH:
            out.append(problem("logs", f"{name}: last written {_ago(host, last)}: is Kamailio running and logging "
                               f"here?", "systemctl status kamailio rsyslog; a live Kamailio logs every "
                               "registration (examples/kamailio/kamailio.cfg)", source=s.source, last_written=last))
            continue
        out.append(ok("logs", f"{name}: readable, {s.records} Kamailio records in the last {s.sampled} lines, "
                      f"last written {_ago(host, last) if last is not None else 'at an unknown time'}",
                      source=s.source, lines=s.lines, records=s.records, last_written=last))
    return out


def check_contract(host: Host) -> list[Finding]:
    """Which filters' lines (the log contract) were seen in the last `hours`, and which never."""
    srcs = [s for s in samples(host) if s.readable and s.records]
    if not srcs:
        return [skipped("contract", "no readable Kamailio log to look at (see the logs check)")]
    filters = load_filters(host)
    seen: dict[str, int] = {}
    last: dict[str, float] = {}
    for s in srcs:
        for f, n in s.matched.items():
            seen[f] = seen.get(f, 0) + n
        for f, t in s.last_match.items():
            last[f] = max(last.get(f, 0.0), t)
    window = format_duration(host.hours * 3600)
    out: list[Finding] = []
    script = [f for f in filters.names if f in SCRIPT_FILTERS]
    if script and not any(seen.get(f) for f in script):
        out.append(problem("contract", f"none of the example config's xlog lines was seen in the last {window}: "
                           f"Kamailio does not print what sipguard reads",
                           "copy the xlog lines, event_route[core:msg-received] and received_route_mode=1 of "
                           "examples/kamailio/kamailio.cfg into your kamailio.cfg and restart Kamailio (README, "
                           "'Making Kamailio print what sipguard reads')", window_hours=host.hours))
    for f in filters.filters:
        n = seen.get(f.name, 0)
        if n:
            out.append(ok("contract", f"{f.name}: {n} line{'s' if n != 1 else ''} in the last {window}, the last "
                          f"{_ago(host, last[f.name]) if f.name in last else 'at an unknown time'}",
                          filter=f.name, seen=n))
            continue
        line = CONTRACT.get(f.name)
        lits = " or ".join(repr(x) for x in f.prefilter) or "its regex"
        fix = (f"if Kamailio should have printed it, check your kamailio.cfg has {line}" if line
               else f"check that Kamailio prints lines holding {lits} ({f.path})")
        if f.name in ATTACK_ONLY:
            fix += " (normal on a host nobody attacked in that time)"
        out.append(warning("contract", f"{f.name}: never matched in the last {window}", fix, filter=f.name, seen=0))
    return out


def check_clock(host: Host) -> list[Finding]:
    """The log's newest timestamps against the host clock (and the file's own write time)."""
    out: list[Finding] = []
    for s in samples(host):
        if not (s.readable and s.newest is not None):
            continue
        name = printable(s.source)
        ref = s.mtime if s.mtime is not None else host.now
        skew = s.newest - ref
        ahead = s.newest - host.now
        if abs(skew) > CLOCK_TOLERANCE or ahead > CLOCK_TOLERANCE:
            skew = skew if abs(skew) >= ahead else ahead
            what = "ahead of" if skew > 0 else "behind"
            out.append(problem("clock", f"{name}: the newest record is stamped {format_duration(abs(skew))} {what} "
                               f"the time the file was last written (host clock)",
                               "make Kamailio's and rsyslog's clock and time zone the host's (timedatectl; "
                               "restart rsyslog after a TZ change); prefer RSYSLOG_FileFormat (ISO-8601 with "
                               "offset) over the traditional format", source=s.source, skew=round(skew, 3)))
            continue
        out.append(ok("clock", f"{name}: log and host clocks agree (skew {skew:+.1f}s)",
                      source=s.source, skew=round(skew, 3)))
    return out or [skipped("clock", "no record with a timestamp to compare")]
