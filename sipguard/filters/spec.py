"""Filter specs: one `filters/*.toml` file as written (FilterSpec), validated, and compiled once
(CompiledFilter).

Never loads a file that is not a valid filter: unknown keys, wrong types, a bad regex, a regex
without the named group `ip`, a regex with nested unbounded quantifiers (catastrophic backtracking)
and a regex whose address is not anchored at the end of the record (unless the file says
`unanchored = true` with a `reason`) are ConfigErrors naming the file, the key or line, the regex and
the reason (the static checks are check.py's). Never matches a record (FilterSet does).

Named captures: every named group of a regex other than `ip` (lower-case names, e.g. `(?P<dest>...)`
for a dialled number, `(?P<user>...)`) travels with the event as a counting key (`CompiledFilter.captures`,
`Event.captures`) for distinct jails; it is never an address.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator

from ..config import SHIPPED_FILTERS, read_toml
from ..errors import ConfigError
from ..model import EventKind
from .check import anchor_problem, nested_quantifier, parse

# Macros expanded in `regex` and `ignore` before compiling. <ADDR> is deliberately permissive
# (normalize_ip decides validity) but can never contain a space, so a shape anchored at the end
# of the message captures exactly the token Kamailio printed there.
MACROS = {
    "<ADDR>": r"(?:\[[0-9A-Fa-f:.]{2,45}(?:%[0-9A-Za-z_.\-]{1,32})?\]"
              r"|[0-9A-Fa-f:.]{2,45}(?:%[0-9A-Za-z_.\-]{1,32})?)",
    "<PORT>": r"\d{1,5}",
}

# Evaluation order: attacks before probes before success, so a record that fits an attack shape
# can never be read as a success that clears its sender's score.
_KIND_ORDER = {
    EventKind.FLOOD: 0, EventKind.MALFORMED: 1, EventKind.SCANNER: 2,
    EventKind.AUTH_FAILURE: 3, EventKind.PROBE: 4, EventKind.DIAL: 5, EventKind.SUCCESS: 6,
}

CAPTURE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
"""The names a regex's groups other than `ip` may have: they travel with the event (Event.captures) as
counting keys for distinct jails (`distinct = "user"`, `"dest"`)."""

StrictStr = Annotated[str, Strict()]
NonEmptyStr = Annotated[str, Strict(), Field(min_length=1, max_length=4096)]


class FilterSpec(BaseModel):
    """One filter file as written; unknown keys and wrong types are errors, not surprises."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Strict(), Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]
    description: StrictStr = ""
    kind: EventKind
    weight: Annotated[float, Field(ge=0.0, le=1e6)] = 1.0
    prefilter: list[NonEmptyStr] = []
    regex: Annotated[list[NonEmptyStr], Field(min_length=1)]
    ignore: list[NonEmptyStr] = []
    enabled: Annotated[bool, Strict()] = True
    multiline: Annotated[bool, Strict()] = True
    """True (the default and every shipped filter): a record spanning several physical lines (a
    User-Agent with a CR/LF, journalctl's continuation lines) is matched whole; its later lines may be
    SIP text an attacker copied into the log, which is why the address must be anchored at the
    record's end (Kamailio's own text) and the prefilter literals are looked for on its first line.
    False: such a record never matches this filter."""
    unanchored: Annotated[bool, Strict()] = False
    """True: the regexes' address need not be anchored at the end of the record (check.py); the file
    must then say why in `reason`."""
    reason: Annotated[str, Strict(), Field(max_length=4096)] = ""

    @field_validator("weight", mode="before")
    @classmethod
    def _weight_is_number(cls, v: object) -> object:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError("must be a number")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("must be finite")
        return v


@dataclass(frozen=True, slots=True)
class CompiledFilter:
    """A FilterSpec with its regexes compiled: what `FilterSet` runs."""

    name: str
    kind: EventKind
    weight: float
    prefilter: tuple[str, ...]
    regexes: tuple[re.Pattern[str], ...]
    ignores: tuple[re.Pattern[str], ...]
    multiline: bool
    description: str
    path: str
    enabled: bool = True  # the file's own `enabled`; FilterSet.load's arguments can override it
    captures: tuple[str, ...] = ()  # named groups besides `ip` in any regex: they travel with the event


def expand_macros(pattern: str) -> str:
    for macro, body in MACROS.items():
        pattern = pattern.replace(macro, body)
    return pattern


def _key_line(text: str, key: str) -> int | None:
    """Line number of `key = ...` in a TOML text, to point an operator at it (best effort)."""
    rx = re.compile(rf"^[ \t]*{re.escape(key)}[ \t]*=", re.M)
    m = rx.search(text)
    return text.count("\n", 0, m.start()) + 1 if m else None


def _where(text: str, loc: Sequence[object]) -> str:
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    if not key:
        return "(top level)"
    line = _key_line(text, str(loc[0]))
    return f"{key} (line {line})" if line else key


def load_spec(path: Path) -> tuple[FilterSpec, str]:
    """Parse and validate one filter file; ConfigError names the file, the key or line, the reason."""
    text, data = read_toml(path)
    try:
        spec = FilterSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        reason = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        if err["type"] == "missing":
            reason = "required key is missing"
        raise ConfigError(str(path), _where(text, err["loc"]), reason) from None
    return spec, text


def compile_spec(spec: FilterSpec, path: str, text: str = "") -> CompiledFilter:
    """Compile a validated spec; a bad regex, one without a named group `ip` or one check.py refuses is
    a ConfigError."""

    def comp(key: str, i: int, pattern: str, need_ip: bool) -> re.Pattern[str]:
        where = f"{key}[{i}]"
        line = _key_line(text, key) if text else None
        if line:
            where += f" (line {line})"
        try:
            rx = re.compile(expand_macros(pattern))
        except re.error as e:
            raise ConfigError(path, where, f"invalid regex: {e}") from None
        if need_ip and "ip" not in rx.groupindex:
            raise ConfigError(path, where, "regex has no named group 'ip' (?P<ip>...)")
        for name in rx.groupindex:
            if need_ip and name != "ip" and not CAPTURE_NAME.match(name):
                raise ConfigError(path, where, f"named group {name!r}: a capture besides 'ip' is a counting "
                                  "key and needs a lower-case name (a-z, 0-9, _), e.g. (?P<dest>...)")
        return rx

    def where(key: str, i: int | None = None) -> str:
        line = _key_line(text, key) if text else None
        loc = key if i is None else f"{key}[{i}]"
        return f"{loc} (line {line})" if line else loc

    if spec.unanchored and not spec.reason.strip():
        raise ConfigError(path, where("unanchored"), "unanchored = true needs a reason = \"...\" saying why "
                          "the address cannot be anchored where Kamailio prints $si")
    if spec.reason and not spec.unanchored:
        raise ConfigError(path, where("reason"), "reason is read only with unanchored = true")
    regexes = tuple(comp("regex", i, p, True) for i, p in enumerate(spec.regex))
    ignores = tuple(comp("ignore", i, p, False) for i, p in enumerate(spec.ignore))
    # the static checks, once every regex compiles (check.py)
    for key, patterns in (("regex", spec.regex), ("ignore", spec.ignore)):
        for i, pattern in enumerate(patterns):
            tree = parse(expand_macros(pattern))
            problem = nested_quantifier(tree, MACROS)
            if problem is None and key == "regex" and not spec.unanchored:
                problem = anchor_problem(tree, "ip", MACROS)
            if problem is not None:
                raise ConfigError(path, where(key, i), f"'{pattern}': {problem}")
    return CompiledFilter(
        name=spec.name,
        kind=spec.kind,
        weight=float(spec.weight),
        prefilter=tuple(spec.prefilter),
        regexes=regexes,
        ignores=ignores,
        multiline=spec.multiline,
        description=spec.description,
        path=path,
        enabled=spec.enabled,
        captures=tuple(dict.fromkeys(n for rx in regexes for n in rx.groupindex if n != "ip")),
    )


def shipped_dir() -> Path:
    """The shipped filters: `<repo>/filters` in a source tree, the package data of an installed wheel."""
    return SHIPPED_FILTERS
