"""The filter set: the active filters in a stable order, turning a Kamailio Record into at most one
Event (`match`), and saying per filter what it makes of a text (`explain`, for test-filter).

A record is matched whole, every physical line of it (a User-Agent with a CR/LF, journalctl's
continuation lines), the address anchored at its end, where Kamailio prints `$si`. A filter's
prefilter literals are looked for in the record's first line only, which is where Kamailio's own
head (level, `<script>:`, the message's first words) is: so a record whose first line holds none of
the search literals cannot match, which is what lets readers skip such lines (`search_literals`).

Never takes an address from anywhere but the capture group `ip` of a regex (anchored by the shipped
filters at the Kamailio-printed end of the message), and never returns an address normalize_ip refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, NamedTuple, overload

from ..addresses import normalize_ip
from ..config import check_trusted, trusted_as_installed
from ..errors import ConfigError
from ..model import CAPTURE_CHARS, Event, Record
from .search import search_literals
from .spec import _KIND_ORDER, CompiledFilter, compile_spec, load_spec

_JSON_UNSAFE = frozenset(b'"\\<>[]():')  # escaped by the JSON engine, or added by the classic head


class Verdict(NamedTuple):
    """What one filter says about one text, for `sipguard test-filter`: `(filter, ip, result)`.

    `result` is one of: matched, missed, ignored, invalid_ip, prefilter (no trigger literal on the
    record's first line, not tried), multiline (record spans lines; the filter says `multiline =
    false`). `ip` is the normalised address when matched or ignored, the raw capture when
    invalid_ip, else None.
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
        self._json_safe = all(
            all(32 <= b < 127 and b not in _JSON_UNSAFE for b in lit) and lit.decode() not in "<script>"
            for lit in self._search_literals or ())
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
        then removes names. Unknown names are a ConfigError. Running as root, a directory or file
        that root does not own or others can write is a ConfigError too (config.check_trusted; the
        shipped filters are trusted as installed).
        """
        found: dict[str, CompiledFilter] = {}
        for d in dirs:
            d = Path(d)
            if not d.exists():
                continue
            if not d.is_dir():
                raise ConfigError(str(d), None, "filter directory is not a directory")
            shipped = trusted_as_installed(d)
            if not shipped:
                check_trusted(d, "filter directory")
            here: dict[str, Path] = {}
            for path in sorted(d.glob("*.toml")):
                if not shipped:
                    check_trusted(path, "filter file")
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
        """Byte literals whose absence from a record's first line proves no filter can match the
        record, or None when that shortcut is not sound (a filter without prefilter). Readers use it
        to skip lines without parsing them (`trigger_lines`)."""
        return self._search_literals

    @property
    def json_safe(self) -> bool:
        """True when every search literal, if on the first line of a record decoded from Kamailio's
        JSON engine (formats/kjson.py), is also in the raw JSON line: plain ASCII text without the
        characters the engine escapes or the classic head adds (`"\\<>[]():`, control bytes) and not
        part of `script` (the `<script>` a decoded script line starts with). Else a reader must
        parse every JSON line."""
        return self._json_safe

    def _compute_search_literals(self) -> tuple[bytes, ...] | None:
        if not self.filters or not self.triggers_complete:
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
        nl = text.find("\n")
        multiline = nl >= 0
        head = text[:nl] if multiline else text
        tried = refused = False
        for f in self.filters if pool is None else pool:
            pf = f.prefilter
            if pf:
                for lit in pf:
                    if lit in head:
                        break
                else:
                    continue
            if multiline and not f.multiline:
                refused = True
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
                if f.captures:  # counting keys for distinct jails (attacker text, bounded, never an address)
                    caps = tuple((k, v[:CAPTURE_CHARS]) for k, v in m.groupdict().items() if k != "ip" and v)
                    return Event(now if t is None else t, ip, f.name, f.kind, f.weight, text, caps)
                return Event(now if t is None else t, ip, f.name, f.kind, f.weight, text)  # text: the evidence
        if not tried:
            stats["multiline" if refused else "skipped"] += 1
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
        nl = text.find("\n")
        multiline = nl >= 0
        head = text[:nl] if multiline else text
        out: list[VerdictDetail] = []
        for f in pool:
            if f.prefilter and not any(lit in head for lit in f.prefilter):
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
