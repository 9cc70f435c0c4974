"""Doctor checks of the rate limits that drop Kamailio's lines under a storm: journald's
(journald.conf RateLimitIntervalSec / RateLimitBurst, the Kamailio unit's LogRateLimitIntervalSec /
LogRateLimitBurst) and rsyslog's (imuxsock's SysSock.RateLimit.*, imjournal's ratelimit.*).

A limit is fine when it is off (an interval or burst of 0) or lets at least STORM_RATE lines a
second through. Files are read under `Host.root` (tests use a temp root); nothing is changed.
"""

from __future__ import annotations

import re
from pathlib import Path

from .base import STORM_RATE, Finding, Host, ok, problem, skipped

JOURNALD_DEFAULT = (30.0, 10000)  # systemd 252 (Debian 12): RateLimitIntervalSec=30s, RateLimitBurst=10000
IMUXSOCK_DEFAULT = (0.0, 200)  # rsyslog 8: SysSock.RateLimit.Interval=0 (off), Burst=200
IMJOURNAL_DEFAULT = (600.0, 20000)  # rsyslog 8: ratelimit.interval=600, ratelimit.burst=20000
UNITS = ("kamailio.service",)

_TIME_UNITS = {"": 1, "s": 1, "sec": 1, "second": 1, "seconds": 1, "ms": 0.001, "msec": 0.001, "us": 1e-6,
               "usec": 1e-6, "m": 60, "min": 60, "minute": 60, "minutes": 60, "h": 3600, "hr": 3600,
               "hour": 3600, "hours": 3600}


def _timespan(text: str) -> float | None:
    """systemd's time span ("30s", "1min 30s", "0", "500ms"); None when it does not parse."""
    total, found = 0.0, False
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip().lower()):
        if unit not in _TIME_UNITS:
            return None
        total += float(num) * _TIME_UNITS[unit]
        found = True
    return total if found else None


def _ini(paths: list[Path], section: str, keys: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """Last value of each key in `[section]` over `paths` in order: {key: (value, "file:line")}."""
    out: dict[str, tuple[str, str]] = {}
    for p in paths:
        try:
            text = p.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        current = None
        for no, raw in enumerate(text.splitlines(), 1):
            s = raw.strip()
            if not s or s[0] in "#;":
                continue
            if s.startswith("[") and s.endswith("]"):
                current = s[1:-1].strip()
                continue
            if current != section or "=" not in s:
                continue
            k, v = (x.strip() for x in s.split("=", 1))
            if k in keys:
                out[k] = (v, f"{p}:{no}")
    return out


def _dropins(host: Host, name: str) -> list[Path]:
    """systemd's order for NAME (e.g. journald.conf or kamailio.service): the file, then drop-ins
    sorted by file name over /usr/lib, /lib, /run and /etc (a later /etc one wins on the same name)."""
    base = []
    for d in ("/usr/lib/systemd", "/lib/systemd", "/run/systemd", "/etc/systemd"):
        sub = "system/" if name.endswith(".service") else ""
        base.append(host.path(f"{d}/{sub}{name}"))
    main = [p for p in base if p.is_file()][-1:]
    drop: dict[str, Path] = {}
    for d in ("/usr/lib/systemd", "/lib/systemd", "/run/systemd", "/etc/systemd"):
        sub = "system/" if name.endswith(".service") else ""
        folder = host.path(f"{d}/{sub}{name}.d")
        if folder.is_dir():
            for p in sorted(folder.glob("*.conf")):
                drop[p.name] = p
    return main + [drop[k] for k in sorted(drop)]


def _lets_through(interval: float, burst: int) -> bool:
    return interval <= 0 or burst <= 0 or burst / interval >= STORM_RATE


def _rate(interval: float, burst: int) -> str:
    return f"{burst} lines per {interval:g}s ({burst / interval:.0f}/s)"


def check_journald(host: Host) -> list[Finding]:
    """journald's global limit and the Kamailio unit's own (LogRateLimit* in the unit wins)."""
    conf = _dropins(host, "journald.conf")
    if not conf and not host.path("/run/systemd/journal").exists():
        return [skipped("journald", "no systemd-journald here")]
    g = _ini(conf, "Journal", ("RateLimitIntervalSec", "RateLimitInterval", "RateLimitBurst"))
    iv = g.get("RateLimitIntervalSec") or g.get("RateLimitInterval")
    interval = _timespan(iv[0]) if iv else JOURNALD_DEFAULT[0]
    burst_t = g.get("RateLimitBurst")
    burst = int(burst_t[0]) if burst_t and burst_t[0].isdigit() else JOURNALD_DEFAULT[1]
    where = ", ".join(sorted({w for _, w in (x for x in (iv, burst_t) if x)})) or "the default"
    out: list[Finding] = []
    for unit in UNITS:
        u = _ini(_dropins(host, unit), "Service", ("LogRateLimitIntervalSec", "LogRateLimitBurst"))
        ui, ub = u.get("LogRateLimitIntervalSec"), u.get("LogRateLimitBurst")
        eff_i = _timespan(ui[0]) if ui else interval
        eff_b = int(ub[0]) if ub and ub[0].isdigit() else burst
        src = ", ".join(w for _, w in (x for x in (ui, ub) if x)) or where
        if eff_i is None:
            eff_i = JOURNALD_DEFAULT[0]
        if _lets_through(eff_i, eff_b):
            out.append(ok("journald", f"{unit}: journald lets a storm through "
                          f"({'no limit' if eff_i <= 0 or eff_b <= 0 else _rate(eff_i, eff_b)}; {src})",
                          unit=unit, interval=eff_i, burst=eff_b))
        else:
            out.append(problem(
                "journald", f"{unit}: journald drops Kamailio's lines beyond {_rate(eff_i, eff_b)} ({src}); a storm "
                f"logs {STORM_RATE}/s or more",
                f"mkdir -p /etc/systemd/system/{unit}.d && printf '[Service]\\nLogRateLimitIntervalSec=0\\n' > "
                f"/etc/systemd/system/{unit}.d/sipguard-ratelimit.conf && systemctl daemon-reload && "
                f"systemctl restart {unit}", unit=unit, interval=eff_i, burst=eff_b))
    return out


def _rsyslog_files(host: Host) -> list[Path]:
    main = host.path("/etc/rsyslog.conf")
    if not main.is_file():
        return []
    return [main, *sorted(host.path("/etc/rsyslog.d").glob("*.conf"))]


def _strip_comments(text: str) -> str:
    out = []
    for ln in text.splitlines():
        quoted, cut = False, len(ln)
        for i, ch in enumerate(ln):
            if ch == '"':
                quoted = not quoted
            elif ch == "#" and not quoted:
                cut = i
                break
        out.append(ln[:cut])
    return "\n".join(out)


def _module_params(files: list[Path], module: str) -> tuple[dict[str, str], str | None, dict[str, str]]:
    """(RainerScript params of module(load=MODULE ...), "file:line" of it, legacy $Directives), last wins."""
    params: dict[str, str] = {}
    where = None
    legacy: dict[str, str] = {}
    for p in files:
        try:
            text = _strip_comments(p.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            continue
        for m in re.finditer(r"module\s*\(([^)]*)\)", text, re.S | re.I):
            body = m.group(1)
            args = {k.lower(): v for k, v in re.findall(r'([A-Za-z][\w.]*)\s*=\s*"([^"]*)"', body)}
            if args.get("load", "").lower() == module:
                params.update(args)
                where = f"{p}:{text.count(chr(10), 0, m.start()) + 1}"
        for m in re.finditer(r"^\s*\$(\w+)\s+(\S+)", text, re.M):
            key, value = m.group(1).lower(), m.group(2)
            if key == "modload" and value.lower() == module:
                where = where or f"{p}:{text.count(chr(10), 0, m.start()) + 1}"
            legacy[key] = value
    return params, where, legacy


def _num(v: str | None, default: float) -> float:
    try:
        return float(v) if v is not None else default
    except ValueError:
        return default


def check_rsyslog(host: Host) -> list[Finding]:
    """imuxsock (the syslog socket, Debian's default input) and imjournal limits."""
    files = _rsyslog_files(host)
    if not files:
        return [skipped("rsyslog", "no /etc/rsyslog.conf here")]
    out: list[Finding] = []
    ux, ux_at, legacy = _module_params(files, "imuxsock")
    if ux_at is not None:
        interval = _num(ux.get("syssock.ratelimit.interval", legacy.get("systemlogratelimitinterval")),
                        IMUXSOCK_DEFAULT[0])
        burst = int(_num(ux.get("syssock.ratelimit.burst", legacy.get("systemlogratelimitburst")),
                         IMUXSOCK_DEFAULT[1]))
        if _lets_through(interval, burst):
            out.append(ok("rsyslog", f"imuxsock lets a storm through "
                          f"({'no limit' if interval <= 0 or burst <= 0 else _rate(interval, burst)})",
                          module="imuxsock", interval=interval, burst=burst))
        else:
            out.append(problem(
                "rsyslog", f"rsyslog's imuxsock drops a process's lines beyond {_rate(interval, burst)} "
                f"({ux_at or 'legacy $SystemLogRateLimit*'})",
                f"in {ux_at or '/etc/rsyslog.conf'} write the module line as "
                f"module(load=\"imuxsock\" SysSock.RateLimit.Interval=\"0\") (and drop any "
                f"$SystemLogRateLimitInterval line), then systemctl restart rsyslog",
                module="imuxsock", interval=interval, burst=burst))
    jr, jr_at, legacy = _module_params(files, "imjournal")
    if jr_at is not None:
        interval = _num(jr.get("ratelimit.interval", legacy.get("imjournalratelimitinterval")),
                        IMJOURNAL_DEFAULT[0])
        burst = int(_num(jr.get("ratelimit.burst", legacy.get("imjournalratelimitburst")), IMJOURNAL_DEFAULT[1]))
        if _lets_through(interval, burst):
            out.append(ok("rsyslog", f"imjournal lets a storm through "
                          f"({'no limit' if interval <= 0 or burst <= 0 else _rate(interval, burst)})",
                          module="imjournal", interval=interval, burst=burst))
        else:
            out.append(problem(
                "rsyslog", f"rsyslog's imjournal drops lines beyond {_rate(interval, burst)} ({jr_at})",
                f"in {jr_at} add ratelimit.interval=\"0\" to module(load=\"imjournal\" ...), then systemctl "
                f"restart rsyslog", module="imjournal", interval=interval, burst=burst))
    return out or [skipped("rsyslog", "rsyslog loads neither imuxsock nor imjournal")]
