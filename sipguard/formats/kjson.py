"""Kamailio's JSON log engine (`kamailio --log-engine=json[:FLAGS]`, core since 5.5): one record's
JSON text in, the Kamailio text the filters read out (`LEVEL: <script>: message`, as the classic
engine prints it), with the PID, rank and time the record carries.

The forms Debian 12's Kamailio 5.6.3 writes (seen by running it, tests/data/real/json-*.log):

- stderr (`-E`): `{ "idx": 3, "pid": 21638, "level": "WARNING", "module": "xlog", "file": "xlog.c",
  "line": 282, "function": "", ["callid": "...",] "logprefix": "...", "message": "...\\n" }`
- syslog (rsyslog file, the journal): the same without `idx`/`pid` (the syslog header has the PID)
- CEE (flag `U`): `{"time":"...Z","proc":{"id":"PID","tid":N},"pri":"LEVEL","subsys":"module",
  "file":{"name":..,"line":..},"native":{"function":..},"msg":"...","pname":..,"appname":..,
  "hostname":..}`, after `@cee: ` through syslog.

Why a hand-written scanner for the first two forms, not `json.loads`: 5.6.3 escapes `message`
(quotes, backslashes, CR/LF and other control bytes) but writes `callid` (flag `c`) and `logprefix`
(the `log_prefix` setting; Debian's commented example holds `$ci`) raw. Those are attacker text
(the Call-ID), so a real record can be invalid JSON, carry extra keys — extra `message` keys with
another address among them — or even a CR/LF. DEL and 8-bit bytes pass raw (a line need not be
UTF-8), and flag `a` makes 5.6.3 write invalid JSON on every line (an extra quote after the
function's value). So the record is read from both ends, where only Kamailio writes: the head
(`level`, `module`, `file`, `line`, `function`, and `idx`/`pid`) is matched from the first byte
with a regex that admits no quote or backslash in a value, and the message is the JSON string that
ends the record (`..., "message": "..." }`): going back from its closing quote to the first quote
not escaped by a backslash, which is its opening quote because Kamailio escaped every quote inside;
that literal alone goes to `json.loads`. What lies between is never read, only compared with what
Kamailio writes when no raw field holds text: a record with a `callid` field or a non-empty log
prefix says `raw` (on stderr, where no syslog daemon frames records, raw text can split a record
in two, so its reader treats such a source as plain stderr: forgeable).
The CEE form has no raw field (the `msg` value is escaped, the other values are Kamailio's own), so
it goes to `json.loads` whole; `@cee: ` lines that do not parse are invalid.

An attacker-made record (a Call-ID holding a whole fake record) can therefore neither choose the
message read (the last one, Kamailio's) nor hide it. Never raises on input: what cannot be read is
`None` (the caller counts it).
"""

from __future__ import annotations

import calendar
import json
import re
from typing import NamedTuple

# the head of the stderr and syslog forms; flag `a` prefixes every key with "kamailio."
_K = r'"(?:kamailio\.)?'
_HEAD = re.compile(
    r'\{ ' + _K + r'(?:idx": (\d{1,6}), ' + _K + r'pid": (\d{1,10}), ' + _K + r')?'
    r'level": "([A-Z]{1,16})", ' + _K + r'module": "([^"\\]{0,64})", ' + _K + r'file": "([^"\\]{0,256})", '
    + _K + r'line": (\d{1,9}), ' + _K + r'function": "([^"\\]{0,128})"'
)
# what Kamailio writes between the head and the message when no raw field holds text (flag `a`
# adds a stray quote in 5.6.3; flag `j` wraps an empty prefix; flag `p` drops it)
_CLEAN_MIDDLES = frozenset({
    "", ', "logprefix": ""', ', "kamailio.logprefix": ""', '", "kamailio.logprefix": ""',
    ', "logprefix": { "text": "" }', ', "kamailio.logprefix": { "text": "" }',
})
_MESSAGE_KEYS = ('"message": ', '"kamailio.message": ')
_JTEXT = ('"message": { "text": ', '"kamailio.message": { "text": ')
_CEE_TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(\.\d{1,9})?Z")

SCRIPT_MODULE = "xlog"
"""The module name script lines (xlog) carry; printed `<script>` like the classic engine does."""


class Decoded(NamedTuple):
    """One JSON record as the filters read it: `text` as the classic engine prints it (`LEVEL:
    <script>: message`, `LEVEL: <core> [file:line]: function(): message`), `raw` when a raw field
    (callid, logprefix) holds text."""

    text: str
    pid: int | None
    rank: int | None
    time: float | None
    host: str | None
    raw: bool


def is_json_message(text: str) -> bool:
    """Whether a message (after any syslog header) is a JSON engine record; cheap, on the first bytes."""
    return text[:2] == '{ ' or text[:8] == '{"time":' or text[:6] == "@cee: "


def is_stderr_head(text: str) -> bool:
    """Whether a physical line starts like a record of the stderr form (`{ "idx": ` or CEE)."""
    return text[:9] == '{ "idx": ' or text[:18] == '{ "kamailio.idx": ' or text[:8] == '{"time":'


def decode(text: str) -> Decoded | None:
    """The record in `text` (one JSON engine record, trailing whitespace allowed), or None when it
    is not one Kamailio could have written in full (cut by rsyslog at 8 KB, invalid, ...)."""
    if text[:6] == "@cee: ":
        return _cee(text[6:])
    if text[:8] == '{"time":':
        return _cee(text)
    m = _HEAD.match(text)
    if m is None:
        return None
    s = text.rstrip()
    if s.endswith('" } }'):  # flag j: "message": { "text": "..." }
        close, keys = len(s) - 5, _JTEXT
    elif s.endswith('" }'):
        close, keys = len(s) - 3, _MESSAGE_KEYS
    else:
        return None
    start = m.end()
    k = close
    while k > start and s[k - 1] == "\\":
        k -= 1
    if (close - k) % 2:  # an escaped quote: the record was cut inside its message
        return None
    i = close
    while True:
        i = s.rfind('"', start, i)
        if i < 0:
            return None
        k = i
        while k > start and s[k - 1] == "\\":
            k -= 1
        if (i - k) % 2 == 0:
            break
    before = s[start:i]
    for key in keys:
        if before.endswith(key):
            middle = before[: -len(key)].rstrip(", ")
            break
    else:
        return None
    try:
        message = json.loads(s[i:close + 1], strict=False)
    except (ValueError, RecursionError):
        return None
    if not isinstance(message, str):
        return None
    if message[-1:] == "\n":
        message = message[:-1]
    idx, pid, level, module, file, line, func = m.groups()
    raw = middle not in _CLEAN_MIDDLES  # a callid field (flag c), or a log prefix with text
    return Decoded(classic(level, module, file, line, func, message), None if pid is None else int(pid),
                   None if idx is None else int(idx), None, None, raw)


def classic(level: str, module: str, file: str, line: object, func: str, message: str) -> str:
    """The text the classic engine prints for these fields (what every filter is written for)."""
    if module == SCRIPT_MODULE and file == "xlog.c":
        return f"{level}: <script>: {message}"
    where = "<core>" if module == "core" else module
    fn = f"{func}(): " if func else ""
    return f"{level}: {where} [{file}:{line}]: {fn}{message}"


def _cee(body: str) -> Decoded | None:
    try:
        d = json.loads(body, strict=False)
    except (ValueError, RecursionError):  # (nested deeper than Python's recursion: a forged line, invalid)
        return None
    if not isinstance(d, dict):
        return None
    msg, pri, subsys = d.get("msg"), d.get("pri"), d.get("subsys")
    f, native, proc = d.get("file"), d.get("native"), d.get("proc")
    if not (isinstance(msg, str) and isinstance(pri, str) and pri.isalpha() and isinstance(subsys, str)
            and isinstance(f, dict) and isinstance(native, dict) and isinstance(proc, dict)):
        return None
    name, line, func = f.get("name"), f.get("line"), native.get("function")
    if not (isinstance(name, str) and isinstance(line, int) and isinstance(func, str)):
        return None
    if msg[-1:] == "\n":
        msg = msg[:-1]
    pid = proc.get("id")
    try:
        pid = int(pid) if isinstance(pid, (str, int)) and not isinstance(pid, bool) else None
    except ValueError:
        pid = None
    host = d.get("hostname")
    return Decoded(classic(pri, subsys, name, line, func, msg), pid, None, _cee_time(d.get("time")),
                   host if isinstance(host, str) else None, False)


def _cee_time(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    m = _CEE_TIME.fullmatch(value)
    if m is None:
        return None
    y, mo, d, hh, mi, ss, frac = m.groups()
    try:
        t = float(calendar.timegm((int(y), int(mo), int(d), int(hh), int(mi), int(ss))))
    except (ValueError, OverflowError):
        return None
    return t + float(frac) if frac else t
