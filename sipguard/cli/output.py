"""How every table the CLI prints is written: `--output table|plain|json|csv`, one implementation.

A verb describes its columns once (`Column`: a key for JSON, a header for people) and hands rows to
the writer `open_rows()` returns, one at a time; the writer never cuts a value and holds at most a
block of rows (BLOCK) in memory, so 100k rows print in bounded memory in every mode:

* `json`: a JSON array streamed one object per row (`{key: value}`, values as given: numbers stay
  numbers, None is null); control characters arrive as JSON's own `\\uXXXX` escapes.
* `csv`: RFC 4180, a header row then the rows; cells escaped with sipguard.text.printable (a CSV
  opened with `cat` is terminal output too).
* `plain`: header and rows in aligned columns separated by two spaces, no box drawing, for grep,
  awk and sort. Widths come from the caller (known up front, e.g. from the store's summary) or from
  the first block of rows; a later, wider value pushes the rest of its row right, it is never cut.
  The last column is never padded.
* `table` (the default on a terminal): a rich table per block of rows (header on the first, no
  outer edge, so a row starts with its first value). Column widths are sipguard's, not rich's: all
  values whole when they fit, else the widest columns narrowed (those not marked `whole` before
  addresses and times), none below MIN_COLUMN, and a narrowed value folds over more lines
  (`overflow="fold"`), never "…". A terminal too narrow even for that (a phone's SSH) shows each
  row as `header: value` lines. Sent to a pipe or a file, the table is as wide as its rows.

Cells are data: every string is escaped with sipguard.text.printable and handed to rich as a
`Text` (markup from data is never interpreted). `output_format()` turns `--output`/`--json` into
a mode: a table on a terminal, plain columns when stdout is a pipe or a file.

This module formats only: it reads nothing of sipguard's state and imports no stage.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from ..errors import SipguardError
from ..text import printable

OUTPUTS = ("table", "plain", "json", "csv")
BLOCK = 1000
"""Rows held at a time (to size plain columns without known widths; one rich table in `table`)."""
MIN_COLUMN = 8
"""The narrowest a table column gets on a terminal; narrower than that, a block is shown by rows."""


def output_format(output: str | None, as_json: bool = False, stream: TextIO | None = None) -> str:
    """--output (or --json, its short form): a table on a terminal, plain columns when piped."""
    if output is not None and output not in OUTPUTS:
        raise SipguardError(f"--output: expected one of {', '.join(OUTPUTS)}, not {output!r}")
    if as_json:
        if output not in (None, "json"):
            raise SipguardError(f"--json and --output {output}: choose one")
        return "json"
    if output is None:
        s = stream or sys.stdout
        try:
            tty = s.isatty()
        except (AttributeError, ValueError):
            tty = False
        return "table" if tty else "plain"
    return output


@dataclass(frozen=True)
class Column:
    """One column: `key` names it in JSON, `header` for people; `width` a known minimum width (plain);
    `whole`: never wrapped at a space on a terminal (an address, a time); `right`: numbers."""

    key: str
    header: str | None = None
    width: int = 0
    whole: bool = False
    right: bool = False

    @property
    def title(self) -> str:
        return self.key if self.header is None else self.header


def cell(value: Any) -> str:
    """A value as a cell people read: None is empty, a list is comma-joined, all of it escaped."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return printable(", ".join("" if v is None else str(v) for v in value))
    if isinstance(value, float):
        return f"{value:g}"
    return printable(str(value))


class Rows:
    """The writer of one table; use as a context manager (or call `close()`): `row(values)` per row,
    values in column order. `count` is the number of rows written."""

    def __init__(self, columns: Sequence[Column], fmt: str, stream: TextIO | None = None,
                 title: str | None = None, console: Any = None) -> None:
        if fmt not in OUTPUTS:
            raise SipguardError(f"--output: expected one of {', '.join(OUTPUTS)}, not {fmt!r}")
        self.columns = list(columns)
        self.fmt = fmt
        self.stream = stream or sys.stdout
        self.title = title
        self.count = 0
        self._console = console
        self._held: list[list[Any]] = []
        self._widths: list[int] | None = None
        self._layout: list[int] | None = None
        self._started = False
        self._closed = False
        if fmt == "csv":
            import csv

            self._csv = csv.writer(self.stream, lineterminator="\n")
            self._csv.writerow([c.title for c in self.columns])
        elif fmt == "json":
            self.stream.write("[")
        elif fmt == "plain" and all(c.width for c in self.columns[:-1]):
            self._widths = [max(c.width, len(c.title)) for c in self.columns]
            self._write_plain([c.title for c in self.columns])

    # -- rows -------------------------------------------------------------------------------------
    def row(self, values: Sequence[Any]) -> None:
        if len(values) != len(self.columns):
            raise ValueError(f"{len(values)} values for {len(self.columns)} columns")
        self.count += 1
        if self.fmt == "json":
            obj = {c.key: _json_value(v) for c, v in zip(self.columns, values)}
            self.stream.write(("" if self.count == 1 else ", ") + json.dumps(obj))
        elif self.fmt == "csv":
            self._csv.writerow([cell(v) for v in values])
        elif self.fmt == "plain" and self._widths is not None:
            self._write_plain([cell(v) for v in values])
        else:
            self._held.append([cell(v) for v in values])
            if len(self._held) >= BLOCK:
                self._flush()

    def rows(self, many: Iterable[Sequence[Any]]) -> None:
        for values in many:
            self.row(values)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.fmt == "json":
            self.stream.write("]\n")
        elif self.fmt in ("plain", "table"):
            self._flush(final=True)
        self.stream.flush()

    def __enter__(self) -> Rows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plain ------------------------------------------------------------------------------------
    def _write_plain(self, cells: Sequence[str]) -> None:
        widths = self._widths or []
        last = len(cells) - 1
        parts = []
        for i, (c, col) in enumerate(zip(cells, self.columns)):
            if i == last and not col.right:
                parts.append(c)
            elif col.right:
                parts.append(c.rjust(widths[i]))
            else:
                parts.append(c.ljust(widths[i]))
        self.stream.write("  ".join(parts).rstrip(" ") + "\n")

    def _flush(self, final: bool = False) -> None:
        held, self._held = self._held, []
        if self.fmt == "plain":
            if self._widths is None:  # sized from the first block; later rows push right if wider
                self._widths = [max([c.width, len(c.title), *(len(r[i]) for r in held)])
                                for i, c in enumerate(self.columns)]
                self._write_plain([c.title for c in self.columns])
            for r in held:
                self._write_plain(r)
            return
        if not held and self._started:
            return
        self._table(held)

    # -- table ------------------------------------------------------------------------------------
    def _table(self, held: list[list[str]]) -> None:
        """One block of a table: the first block on a terminal is a rich Table; later blocks, and
        a table sent to a pipe or a file, are drawn by `_lines` in the same layout (rich takes about
        a millisecond a row, too slow for 100k), so the columns line up throughout."""
        first = not self._started
        self._started = True
        if self._widths is None:
            self._widths = [max([c.width, len(c.title), *(len(r[i]) for r in held)])
                            for i, c in enumerate(self.columns)]
        console = self._get_console()
        if first:
            if self.title:
                from rich.text import Text

                console.print(Text(printable(self.title)), soft_wrap=True)
            self._layout = self._min_widths(console.width)
        if self._layout is None:  # too narrow for columns side by side: one "header: value" line per cell
            from rich.text import Text

            for r in held:
                for c, v in zip(self.columns, r):
                    console.print(Text(f"{c.title}: {v}"), soft_wrap=False, overflow="fold")
                console.print(Text("-" * min(20, console.width)))
            return
        if first and console.is_terminal:
            self._rich_table(console, held, self._layout)
            return
        write = console.file.write
        if first:
            write(self._join([c.title for c in self.columns], self._layout, " ┃ ") + "\n")
            write("━╇━".join("━" * w for w in self._layout) + "\n")
        for r in held:
            write(self._lines(r, self._layout))
        console.file.flush()

    def _rich_table(self, console: Any, held: list[list[str]], widths: list[int]) -> None:
        from rich.table import Table
        from rich.text import Text

        table = Table(expand=False, show_edge=False, pad_edge=False)
        for c, w in zip(self.columns, widths):
            # fold: a long value goes on over more lines, it never ends in "…"
            table.add_column(Text(c.title), justify="right" if c.right else "left", overflow="fold", width=w)
        for r in held:
            table.add_row(*(Text(v) for v in r))
        console.print(table)

    def _join(self, cells: Sequence[str], widths: Sequence[int], sep: str = " │ ") -> str:
        return sep.join(c.rjust(w) if col.right else c.ljust(w)
                        for c, w, col in zip(cells, widths, self.columns)).rstrip(" ")

    def _lines(self, cells: Sequence[str], widths: Sequence[int]) -> str:
        """One row in the table's layout: a value wider than its column folds over more lines."""
        if all(len(c) <= w for c, w in zip(cells, widths)):
            return self._join(cells, widths) + "\n"
        parts = [[c[i:i + w] for i in range(0, len(c), w)] or [""] for c, w in zip(cells, widths)]
        out = []
        for n in range(max(len(p) for p in parts)):
            out.append(self._join([p[n] if n < len(p) else "" for p in parts], widths) + "\n")
        return "".join(out)

    def _min_widths(self, width: int) -> list[int] | None:
        """Each column's width on a `width`-column terminal: every value whole when that fits; else the
        widest columns narrowed first (those not marked `whole` before addresses and times), none below
        MIN_COLUMN, a narrowed value folding over more lines. None when not even that fits: rich would
        then shrink columns to nothing, and a cut value is worse than a layout by rows."""
        w = list(self._widths or [])
        room = width - 3 * (len(w) - 1)  # " │ " between two cells, no outer edge
        for group in ([i for i, c in enumerate(self.columns) if not c.whole],
                      [i for i, c in enumerate(self.columns) if c.whole]):
            if sum(w) <= room:
                break
            # the widest cap on this group's columns (none below MIN_COLUMN) at which the table fits
            lo, hi = MIN_COLUMN, max([MIN_COLUMN, *(w[i] for i in group)])
            while lo < hi:
                cap = (lo + hi + 1) // 2
                if sum(min(x, cap) if i in group else x for i, x in enumerate(w)) <= room:
                    lo = cap
                else:
                    hi = cap - 1
            w = [min(x, lo) if i in group else x for i, x in enumerate(w)]
        return None if sum(w) > room else w

    def _get_console(self) -> Any:
        """The caller's console, or one on the stream: a terminal's width, or for a pipe or a file
        (`--output table` asked for) as wide as the rows, so that nothing folds."""
        if self._console is None:
            from rich.console import Console

            try:
                tty = self.stream.isatty()
            except (AttributeError, ValueError):
                tty = False
            wide = None if tty else sum(self._widths or [80]) + 3 * len(self.columns)
            self._console = Console(file=self.stream, highlight=False, markup=False, emoji=False, width=wide)
        return self._console


def _json_value(v: Any) -> Any:
    """A value as JSON can carry it: a float that is no finite number is null."""
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return None
    return v


def open_rows(columns: Sequence[Column], fmt: str, stream: TextIO | None = None, title: str | None = None,
              console: Any = None) -> Rows:
    """The writer of one table in `fmt` (see the module docstring); `console`: a rich Console to print
    tables on (tests give one with a fixed width and force_terminal)."""
    return Rows(columns, fmt, stream=stream, title=title, console=console)


def print_rows(columns: Sequence[Column], rows: Iterable[Sequence[Any]], fmt: str, stream: TextIO | None = None,
               title: str | None = None) -> int:
    """Every row of `rows` written in `fmt`; the number written."""
    with open_rows(columns, fmt, stream=stream, title=title) as w:
        w.rows(rows)
    return w.count
