"""Filters: compile `filters/*.toml` once and turn a Kamailio Record into at most one Event.

Never takes an address from anywhere but the capture group `ip` of a regex (anchored by the shipped
filters at the Kamailio-printed end of the message), and never returns an address normalize_ip refused.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, overload

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator

from sipguard.addresses import normalize_ip
from sipguard.config import read_toml
from sipguard.errors import ConfigError
from sipguard.model import Event, EventKind, Record

log = logging.getLogger("sipguard.filters")

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
    EventKind.AUTH_FAILURE: 3, EventKind.PROBE: 4, EventKind.SUCCESS: 5,
}

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
    multiline: Annotated[bool, Strict()] = False
    """False (the default and every shipped filter): a record spanning several physical lines never
    matches, because its later lines may be SIP text an attacker copied into the log (stderr, journal)."""

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


class Verdict(NamedTuple):
    """What one filter says about one text, for `sipguard test-filter`: `(filter, ip, result)`.

    `result` is one of: matched, missed, ignored, invalid_ip, prefilter (no trigger literal, not
    tried), multiline (record spans lines; the filter refuses those). `ip` is the normalised
    address when matched or ignored, the raw capture when invalid_ip, else None.
    """

    filter: str
    ip: str | None
    result: str


class VerdictDetail(NamedTuple):
    """A Verdict with the regexes that decided it (`explain(..., detail=True)`), for the corpus runner.

    `regex` is the index in the filter's `regex` list of the regex whose capture gave `ip` (matched,
    ignored, invalid_ip: the last one tried), else None; `ignore` the index in its `ignore` list of the
    first ignore regex that rejected the text (result ignored), else None.
    """

    filter: str
    ip: str | None
    result: str
    regex: int | None = None
    ignore: int | None = None

    @property
    def verdict(self) -> Verdict:
        return Verdict(self.filter, self.ip, self.result)


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
    """Compile a validated spec; a bad regex or one without a named group `ip` is a ConfigError."""

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
        return rx

    return CompiledFilter(
        name=spec.name,
        kind=spec.kind,
        weight=float(spec.weight),
        prefilter=tuple(spec.prefilter),
        regexes=tuple(comp("regex", i, p, True) for i, p in enumerate(spec.regex)),
        ignores=tuple(comp("ignore", i, p, False) for i, p in enumerate(spec.ignore)),
        multiline=spec.multiline,
        description=spec.description,
        path=path,
        enabled=spec.enabled,
    )


class FilterSet:
    """The active filters in a stable order (attack kinds first, then by name), compiled once."""

    def __init__(self, filters: Iterable[CompiledFilter], available: Iterable[CompiledFilter] = ()) -> None:
        self.filters: tuple[CompiledFilter, ...] = tuple(
            sorted(filters, key=lambda f: (_KIND_ORDER[f.kind], f.name)))
        names = [f.name for f in self.filters]
        if len(set(names)) != len(names):
            raise ValueError("duplicate filter names")
        self.available: tuple[CompiledFilter, ...] = tuple(available) or self.filters
        self.stats: dict[str, int] = {
            "records": 0, "skipped": 0, "events": 0, "ignored": 0, "invalid_ip": 0, "multiline": 0,
        }
        self.hits: dict[str, int] = dict.fromkeys(names, 0)
        self._search_literals = self._compute_search_literals()
        self._candidates: dict[int, tuple[CompiledFilter, ...]] = {}

    @classmethod
    def load(
        cls,
        dirs: Sequence[Path | str],
        enabled: Sequence[str] | None = None,
        disabled: Sequence[str] = (),
    ) -> FilterSet:
        """Every `*.toml` of `dirs`; a later directory's filter replaces an earlier one of the same name.

        Missing directories are skipped (user override directories are optional). `enabled`, when
        given, is the exact list of active filters (overriding each file's `enabled`); `disabled`
        then removes names. Unknown names are a ConfigError.
        """
        found: dict[str, CompiledFilter] = {}
        for d in dirs:
            d = Path(d)
            if not d.exists():
                continue
            if not d.is_dir():
                raise ConfigError(str(d), None, "filter directory is not a directory")
            here: dict[str, Path] = {}
            for path in sorted(d.glob("*.toml")):
                spec, text = load_spec(path)
                if spec.name in here:
                    raise ConfigError(str(path), "name", f"filter {spec.name!r} is also defined in {here[spec.name]}")
                here[spec.name] = path
                found[spec.name] = compile_spec(spec, str(path), text)
        specs_enabled = {n for n, f in found.items() if f.enabled}
        where = ", ".join(str(d) for d in dirs) or "(no filter directories)"
        for key, names in (("enabled", enabled or ()), ("disabled", disabled)):
            for n in names:
                if n not in found:
                    raise ConfigError(where, key, f"unknown filter {n!r} (known: {', '.join(sorted(found))})")
        active = set(enabled) if enabled is not None else specs_enabled
        active -= set(disabled)
        return cls((found[n] for n in active), available=found.values())

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.filters]

    @property
    def triggers(self) -> tuple[str, ...]:
        """Every prefilter literal of the active filters (a buffer without any can be skipped,
        provided `triggers_complete`)."""
        return tuple(dict.fromkeys(lit for f in self.filters for lit in f.prefilter))

    @property
    def triggers_complete(self) -> bool:
        """True when every active filter has a prefilter, so `triggers` covers every possible match."""
        return all(f.prefilter for f in self.filters)

    @property
    def search_literals(self) -> tuple[bytes, ...] | None:
        """Byte literals whose absence from a one-line record proves no filter can match it, or None
        when that shortcut is not sound (a filter without prefilter, or one accepting multi-line
        records). Readers use it to skip lines without parsing them (`trigger_lines`)."""
        return self._search_literals

    def _compute_search_literals(self) -> tuple[bytes, ...] | None:
        if not self.filters or not self.triggers_complete or any(f.multiline for f in self.filters):
            return None
        if any("\ufffd" in t for t in self.triggers):
            return None  # U+FFFD can stand for any undecodable byte: only a decoded line shows it
        return search_literals(self.triggers)

    def candidates(self, mask: int) -> tuple[CompiledFilter, ...]:
        """The active filters, in order, whose prefilter can pass on a one-line record holding the
        search literals of `mask` (bit i: `search_literals[i]`, as `trigger_lines` reports them).

        Every prefilter literal contains a search literal, so a filter left out cannot match:
        `match(record, now, candidates(mask))` is `match(record, now)` with fewer literal checks.
        """
        got = self._candidates.get(mask)
        if got is None:
            lits = self._search_literals or ()
            present = [lit for i, lit in enumerate(lits) if mask >> i & 1]
            got = tuple(f for f in self.filters
                        if any(s in p.encode() for p in f.prefilter for s in present))
            if len(self._candidates) < 4096:
                self._candidates[mask] = got
        return got

    def match(self, record: Record, now: float, pool: tuple[CompiledFilter, ...] | None = None) -> Event | None:
        """The first active filter's Event for this record, or None. `pool` narrows the filters
        tried to `candidates(...)` (same result, fewer checks)."""
        text = record.text
        stats = self.stats
        stats["records"] += 1
        multiline = "\n" in text
        tried = False
        for f in self.filters if pool is None else pool:
            pf = f.prefilter
            if pf:
                for lit in pf:
                    if lit in text:
                        break
                else:
                    continue
            if multiline and not f.multiline:
                continue
            tried = True
            for rx in f.regexes:
                m = rx.search(text)
                if m is None:
                    continue
                raw = m.group("ip")
                ip = normalize_ip(raw) if raw else None
                if ip is None:
                    stats["invalid_ip"] += 1
                    continue
                if f.ignores and any(ig.search(text) for ig in f.ignores):
                    stats["ignored"] += 1
                    break
                stats["events"] += 1
                self.hits[f.name] += 1
                t = record.time
                return Event(now if t is None else t, ip, f.name, f.kind, f.weight)
        if not tried:
            stats["multiline" if multiline else "skipped"] += 1
        return None

    @overload
    def explain(self, text: str | Record, include_inactive: bool = False,
                *, detail: Literal[False] = False) -> list[Verdict]: ...
    @overload
    def explain(self, text: str | Record, include_inactive: bool = False,
                *, detail: Literal[True]) -> list[VerdictDetail]: ...

    def explain(self, text: str | Record, include_inactive: bool = False,
                *, detail: bool = False) -> list[Verdict] | list[VerdictDetail]:
        """Per filter, what it makes of `text`: the data behind `sipguard test-filter`.

        Same decisions as `match` (which it never slows: it is a separate walk). With `detail`,
        VerdictDetails that also name the regex and ignore indexes that decided (the corpus runner's
        per-regex coverage)."""
        if isinstance(text, Record):
            text = text.text
        pool = self.available if include_inactive else self.filters
        pool = tuple(sorted(pool, key=lambda f: (_KIND_ORDER[f.kind], f.name)))
        multiline = "\n" in text
        out: list[VerdictDetail] = []
        for f in pool:
            if f.prefilter and not any(lit in text for lit in f.prefilter):
                out.append(VerdictDetail(f.name, None, "prefilter"))
                continue
            if multiline and not f.multiline:
                out.append(VerdictDetail(f.name, None, "multiline"))
                continue
            verdict = VerdictDetail(f.name, None, "missed")
            for i, rx in enumerate(f.regexes):
                m = rx.search(text)
                if m is None:
                    continue
                raw = m.group("ip")
                ip = normalize_ip(raw) if raw else None
                if ip is None:
                    verdict = VerdictDetail(f.name, raw, "invalid_ip", i)
                    continue
                ignored = next((j for j, ig in enumerate(f.ignores) if ig.search(text)), None)
                verdict = VerdictDetail(f.name, ip, "matched" if ignored is None else "ignored", i, ignored)
                break
            out.append(verdict)
        return out if detail else [v.verdict for v in out]


def search_literals(literals: Iterable[str]) -> tuple[bytes, ...]:
    """The byte strings to search for: one per literal, minus those another one already finds.

    A literal holding a newline can never be inside a one-line record, so it is not searched.
    """
    lits = sorted({t.encode() for t in literals if "\n" not in t}, key=len)
    out: list[bytes] = []
    for lit in lits:
        if not any(o in lit for o in out):
            out.append(lit)
    return tuple(out)


def trigger_starts(buf: bytes, literals: tuple[bytes, ...], start: int = 0, end: int | None = None) -> list[int]:
    """Sorted start offsets of the newline-separated lines of `buf[start:end]` holding any literal."""
    return trigger_lines(buf, literals, start, end)[0]


def trigger_lines(buf: bytes, literals: tuple[bytes, ...], start: int = 0, end: int | None = None
                  ) -> tuple[list[int], list[int]]:
    """The lines of `buf[start:end]` holding any literal: their sorted start offsets, and for each
    the bitmask of the literals it holds (bit i: `literals[i]`, see `FilterSet.candidates`).

    One Hyperscan pass finds every literal at once (SIMD, several GB/s); without Hyperscan (not
    installed, or a CPU it does not support) one C-speed `bytes.find` pass per literal. Both are
    far faster than a regex alternation, which tries every alternative at almost every byte.
    """
    if end is None:
        end = len(buf)
    hs = _hyperscan(literals) if literals else None
    if hs is None:
        return _trigger_lines_find(buf, literals, start, end)
    db, scratch = hs
    hits: list[tuple[int, int]] = []
    add = hits.append
    view = memoryview(buf)[start:end] if start or end != len(buf) else buf
    db.scan(view, match_event_handler=lambda i, _from, to, _flags, _ctx: add((to, i)), scratch=scratch)
    # hits ascend by end offset: a new line starts at the first hit past the current line's end
    starts: list[int] = []
    masks: list[int] = []
    rfind, find = buf.rfind, buf.find
    line_end = -1
    for e, i in hits:
        e += start
        if e <= line_end:
            masks[-1] |= 1 << i
            continue
        starts.append(rfind(b"\n", start, e) + 1 or start)
        masks.append(1 << i)
        line_end = find(b"\n", e, end)
        if line_end < 0:
            line_end = end
    return starts, masks


def _trigger_lines_find(buf: bytes, literals: tuple[bytes, ...], start: int, end: int
                        ) -> tuple[list[int], list[int]]:
    """`trigger_lines` without Hyperscan: one `bytes.find` pass per literal, jumping to the next
    line after each hit."""
    found: dict[int, int] = {}
    find, rfind = buf.find, buf.rfind
    for bit, lit in enumerate(literals):
        b = 1 << bit
        i = find(lit, start, end)
        while i >= 0:
            ls = rfind(b"\n", start, i) + 1 or start
            found[ls] = found.get(ls, 0) | b
            e = find(b"\n", i + len(lit), end)
            if e < 0:
                break
            i = find(lit, e + 1, end)
    starts = sorted(found)
    return starts, [found[x] for x in starts]


_HS_DBS: dict[tuple[bytes, ...], object] = {}
_HS_BROKEN: list[str] = []  # why Hyperscan is not used (import or compile error), once
_HS_LOCAL = threading.local()  # per thread: {literals: Scratch}; a scratch serves one scan at a time


def _hyperscan(literals: tuple[bytes, ...]) -> tuple[Any, Any] | None:
    """(database, this thread's scratch space) for `literals`, or None without Hyperscan."""
    db = _hyperscan_db(literals)
    if db is None:
        return None
    scratches = getattr(_HS_LOCAL, "scratches", None)
    if scratches is None:
        scratches = _HS_LOCAL.scratches = {}
    scratch = scratches.get(literals)
    if scratch is None or scratch.database is not db:
        import hyperscan

        if len(scratches) > 16:
            scratches.clear()
        scratch = scratches[literals] = hyperscan.Scratch(db)
    return db, scratch


def _hyperscan_db(literals: tuple[bytes, ...]) -> object | None:
    """A compiled Hyperscan block-mode database of `literals` (cached), or None without Hyperscan."""
    db = _HS_DBS.get(literals)
    if db is not None or _HS_BROKEN:
        return db
    if os.environ.get("SIPGUARD_NO_HYPERSCAN"):
        _HS_BROKEN.append("disabled by SIPGUARD_NO_HYPERSCAN")
        return None
    try:
        import hyperscan

        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        db.compile(expressions=list(literals), ids=list(range(len(literals))), elements=len(literals),
                   flags=0, literal=True)
    except Exception as exc:  # ImportError, or a CPU/library Hyperscan rejects: bytes.find still works
        _HS_BROKEN.append(f"{type(exc).__name__}: {exc}")
        log.info("Hyperscan unavailable (%s); searching literals with bytes.find", exc)
        return None
    if len(_HS_DBS) > 16:
        _HS_DBS.clear()
    _HS_DBS[literals] = db
    return db


def shipped_dir() -> Path:
    """The filters shipped with the source tree (`<repo>/filters`)."""
    return Path(__file__).resolve().parent.parent.parent / "filters"
