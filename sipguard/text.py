"""Attacker text is text: the one escaping rule for every string sipguard shows that it did not write
itself (log lines, User-Agents, From and URIs, ban reasons from an operator, a blocklist or another
fleet node, node names, list names, file names).

`printable(s)` returns `s` with every character a terminal could act on shown as a visible escape:
C0 controls (ESC, CR, LF, TAB, BEL, ...), DEL and C1 (0x80-0x9f) as `\\xNN`; every other character
Python does not call printable (bidi overrides and isolates U+202A-U+202E, U+2066-U+2069, U+200E/F,
U+061C, line and paragraph separators, zero-width and other format characters, unassigned and
private-use code points, surrogates) as `\\uNNNN` or `\\UNNNNNNNN`. Nothing else is changed: an
address, a reason or a time keeps every character; `printable` never cuts. Printable text passes
through unchanged (a plain ASCII string is returned as is, at the cost of one `isprintable()`).

`clip(s, limit)` is for the places that show a sample of a long value (a log line in
`test-filter`): the escaped text, and when it is longer than `limit` its first `limit` characters
followed by a visible marker naming how many were left out; never a silent cut.

Markup is the printer's business, not this module's: text from data is handed to rich as a `Text`
or with `markup=False` (sipguard/cli/output.py), never formatted into a markup string.

`EscapingFormatter` is the `logging.Formatter` of sipguard's own log: the message and the exception
text of every record are escaped the same way, so a newline, CR or ESC inside data can neither
forge a second log line nor colour the operator's terminal.

Imports nothing of sipguard: any module may use it.
"""

from __future__ import annotations

import logging

__all__ = ["printable", "clip", "EscapingFormatter"]


def _escape(ch: str) -> str:
    o = ord(ch)
    if o < 0x100:
        return f"\\x{o:02x}"
    if o < 0x10000:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


# Precomputed for the characters most seen in hostile lines; every other one is computed on demand.
_TABLE = {c: _escape(chr(c)) for c in (*range(0x20), *range(0x7F, 0xA1), 0xAD)}


def printable(s: str) -> str:
    """`s` with every non-printable character (controls incl. ESC, CR, LF, DEL, C1, bidi overrides,
    format characters) as a visible `\\xNN` / `\\uNNNN` escape; everything else unchanged, never cut.
    A value that is not a str (None, a number) is shown as its str()."""
    if not isinstance(s, str):
        s = "" if s is None else str(s)
    if s.isprintable():
        return s
    out = []
    for ch in s:
        if ch.isprintable():
            out.append(ch)
        else:
            esc = _TABLE.get(ord(ch))
            out.append(esc if esc is not None else _escape(ch))
    return "".join(out)


def clip(s: str, limit: int) -> str:
    """`printable(s)`, and if that is longer than `limit` characters, its first `limit` characters and
    a marker ` …[+N chars]` saying how many more there were: a long value is shown as a sample, and
    says so. For samples of log text only: addresses, reasons and times are never clipped."""
    p = printable(s)
    if limit < 0 or len(p) <= limit:
        return p
    return f"{p[:limit]} …[+{len(p) - limit} chars]"


class EscapingFormatter(logging.Formatter):
    """A Formatter whose every line is one line: the formatted message (with its arguments, which
    may carry data from a log or the fleet) and any exception or stack text are escaped with
    `printable`. A traceback's own newlines are kept as newlines (sipguard wrote those), but each
    of its lines is escaped."""

    def format(self, record: logging.LogRecord) -> str:
        # a copy whose message (msg % args, which may carry data from a log or the fleet) is escaped
        # before the format string places it; the caller's record is left as it was
        escaped = logging.makeLogRecord(record.__dict__)
        escaped.msg = printable(record.getMessage())
        escaped.args = None
        return super().format(escaped)

    def formatException(self, ei) -> str:  # noqa: ANN001, N802 - logging's signature
        return "\n".join(printable(line) for line in super().formatException(ei).split("\n"))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - logging's name
        return "\n".join(printable(line) for line in super().formatStack(stack_info).split("\n"))
