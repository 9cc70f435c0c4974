"""Static checks of a filter's regexes, made when a filter file is loaded (the shipped filters and an
operator's alike), over the pattern as `re` itself parses it (`re._parser`):

* **Nested unbounded quantifiers** (`nested_quantifier`): a repeated group (`*`, `+`, `{m,n}` with n > 1)
  that contains another repeat, one of the two unbounded: `(a+)+`, `(\\w+\\s?)*`, `(?:a{1,3})+`. Their
  backtracking on a line that almost matches is exponential (the shape of fail2ban's backtracking
  advisory, GHSA-33wh-ccjc-p397). An inner repeat that cannot be backtracked into (possessive `a++`, or
  inside an atomic group `(?>...)`) does not count.
* **The address anchor** (`anchor_problem`): the text after the capture group `ip` must run to the end
  of the record (`$` or `\\Z`, not under `(?m)`) through a fixed number of spaces: literal text, parts
  that never match a space (`\\S+`, `[^ ]+`, `\\d{1,5}`), whitespace (`\\s`, a literal space) only in
  fixed counts. Then the address is always the same space-separated token counted from the end of the
  record, where Kamailio prints `$si`, and nothing an attacker writes earlier on the line (a User-Agent,
  a From user, a Call-ID) can be taken instead.
  A group `ip` inside a repeat, a lookbehind or a negative lookaround is refused; inside a lookahead its
  tail must reach the end within the lookahead. A filter waives this check with `unanchored = true` and
  a `reason` (spec.py).

Problems are sentences naming the offending part of the pattern (rebuilt from the parse, with the
spec's macros such as `<ADDR>` put back), for spec.py to raise as ConfigErrors. Never matches a record
and never raises on a pattern `re.compile` accepted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from re import _compiler as sre_compile  # type: ignore[attr-defined]
from re import _constants as C  # type: ignore[attr-defined]
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import Any

MAXREPEAT = C.MAXREPEAT
_REPEATS = (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT)
_WHITESPACE = frozenset(ch for ch in map(chr, range(0x3001)) if ch.isspace())  # what `\s` matches

Node = tuple[Any, Any]


def parse(pattern: str, flags: int = 0) -> Any:
    """The parse tree `re` builds for `pattern` (a `re._parser.SubPattern`)."""
    return sre_parse.parse(pattern, flags)


# -- nested quantifiers ------------------------------------------------------------------------------------

def nested_quantifier(tree: Any, macros: Mapping[str, str] | None = None) -> str | None:
    """A sentence naming the first repeated group that holds another repeat, one of them unbounded; or None."""
    found = _nested(list(tree), None)
    if found is None:
        return None
    outer, inner = found
    names = _names(tree)
    return (f"nested quantifiers: {_show(outer, names, macros)} repeats a part that holds "
            f"{_show(inner, names, macros)}, one of them unbounded: backtracking on a line that almost "
            f"matches takes exponential time (make the inner part possessive, e.g. a++, or rewrite it)")


def _nested(items: Iterable[Node], outer: Node | None) -> tuple[Node, Node] | None:
    for node in items:
        op, av = node
        found: tuple[Node, Node] | None = None
        if op in _REPEATS:
            _lo, hi, body = av
            if hi > 1:
                if outer is not None and op is not C.POSSESSIVE_REPEAT and (hi == MAXREPEAT or outer[1][1] == MAXREPEAT):
                    return outer, node
                found = _nested(body, node)
            else:  # ? or {0,1}: not a loop
                found = _nested(body, outer)
        elif op is C.ATOMIC_GROUP:
            found = _nested(av, None)  # never backtracked into from outside
        elif op is C.SUBPATTERN:
            found = _nested(av[3], outer)
        elif op is C.BRANCH:
            for alt in av[1]:
                found = found or _nested(alt, outer)
        elif op in (C.ASSERT, C.ASSERT_NOT):
            found = _nested(av[1], outer)
        elif op is C.GROUPREF_EXISTS:
            found = _nested(av[1], outer) or (_nested(av[2], outer) if av[2] is not None else None)
        if found is not None:
            return found
    return None


# -- the address anchor ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Tail:
    anchored: bool
    spaces: int = 0  # whitespace characters between the group and the end (when anchored)
    culprit: Node | None = None  # the part that makes the count vary (when not anchored)


def anchor_problem(tree: Any, group: str = "ip", macros: Mapping[str, str] | None = None) -> str | None:
    """A sentence saying why the group `group` is not anchored at the end of the record; or None."""
    gid = tree.state.groupdict.get(group)
    if gid is None:
        return f"no group named {group!r}"
    path = _path_to(list(tree), gid, None, tree.state.flags, [])
    if path is None:  # cannot happen for a group the parser numbered
        return f"group {group!r} not found in the pattern"
    names = _names(tree)
    tail: list[tuple[int, Node]] = []
    for items, index, container, flags in reversed(path):
        tail += [(flags, n) for n in items[index + 1:]]
        if container is None:
            break
        op, av = container
        if op in _REPEATS and av[1] > 1:
            return (f"the address group is inside the repeated part {_show(container, names, macros)}: "
                    f"which repetition's address is taken depends on the line")
        if op is C.ASSERT and av[0] < 0 or op is C.ASSERT_NOT:
            return (f"the address group is inside the lookaround {_show(container, names, macros)}, "
                    f"which cannot anchor it at the end of the record")
        if op is C.ASSERT:  # a lookahead: its own text must reach the end
            break
    t = _walk_tail(tail, 0)
    if t.anchored:
        return None
    if t.culprit is not None:
        return (f"the address is not anchored where Kamailio prints $si: after it, "
                f"{_show(t.culprit, names, macros)} can match a varying number of spaces, so text "
                f"earlier on the line could be taken for the address (after the address: literal text, "
                f"parts that never match a space such as \\S+ or [^ ]+, and spaces in fixed numbers, up to $)")
    return ("the address is not anchored where Kamailio prints $si: the text after it does not reach the "
            "end of the record ($), so the first address-like text anywhere on the line can be taken "
            "(end the regex with the text Kamailio prints after $si, then $)")


def _path_to(items: list[Node], gid: int, container: Node | None, flags: int,
             path: list) -> list | None:
    """[(items, index, container, flags)] from the root down to the group `gid` (the last entry's
    items[index] is the group), or None."""
    for i, node in enumerate(items):
        op, av = node
        here = path + [(items, i, container, flags)]
        subs: list[tuple[list[Node], int]] = []
        if op is C.SUBPATTERN:
            if av[0] == gid:
                return here
            subs = [(list(av[3]), (flags | av[1]) & ~av[2])]
        elif op in _REPEATS:
            subs = [(list(av[2]), flags)]
        elif op is C.ATOMIC_GROUP:
            subs = [(list(av), flags)]
        elif op is C.BRANCH:
            subs = [(list(alt), flags) for alt in av[1]]
        elif op in (C.ASSERT, C.ASSERT_NOT):
            subs = [(list(av[1]), flags)]
        elif op is C.GROUPREF_EXISTS:
            subs = [(list(av[1]), flags)] + ([(list(av[2]), flags)] if av[2] is not None else [])
        for sub, sub_flags in subs:
            found = _path_to(sub, gid, node, sub_flags, here)
            if found is not None:
                return found
    return None


def _walk_tail(seq: list[tuple[int, Node]], spaces: int) -> _Tail:
    """Does this sequence (with each node's flags) reach the end of the record through a fixed number
    of whitespace characters?"""
    for k, (flags, node) in enumerate(seq):
        op, av = node
        rest = seq[k + 1:]
        if op is C.AT:
            if av is C.AT_END_STRING or (av is C.AT_END and not flags & re.MULTILINE):
                return _Tail(True, spaces)
            continue  # \b, \B, ^, a multi-line $: zero width, not the end of the record
        if op is C.ASSERT and av[0] > 0:  # a lookahead that reaches the end from here anchors too
            ahead = _walk_tail([(flags, n) for n in av[1]], spaces)
            if ahead.anchored:
                return ahead
            continue
        if op in (C.ASSERT, C.ASSERT_NOT):
            continue  # zero width
        if op is C.SUBPATTERN:
            inner = (flags | av[1]) & ~av[2]
            return _walk_tail([(inner, n) for n in av[3]] + rest, spaces)
        if op is C.ATOMIC_GROUP:
            return _walk_tail([(flags, n) for n in av] + rest, spaces)
        if op is C.BRANCH or op is C.GROUPREF_EXISTS:
            alts = av[1] if op is C.BRANCH else [av[1], av[2] or []]
            results = [_walk_tail([(flags, n) for n in alt] + rest, spaces) for alt in alts]
            bad = next((r for r in results if not r.anchored), None)
            if bad is not None:
                return bad if bad.culprit is not None else _Tail(False)
            if len({r.spaces for r in results}) > 1:
                return _Tail(False, culprit=node)
            return results[0]
        n = _spaces(flags, node)
        if n is None:
            return _Tail(False, culprit=node)
        spaces += n
    return _Tail(False)


def _spaces(flags: int, node: Node) -> int | None:
    r"""How many separators `node` matches when that is fixed, else None. A separator is a character
    that matches only whitespace (a literal space or tab, `\s`, `[ \t]`); a part that never matches
    a space (`\S`, `[^ ]`, `[0-9a-f]`) matches none; one that matches a space or something else (`.`,
    `[^x]`, `[\w ]`) varies."""
    op, av = node
    if op is C.LITERAL:
        return 1 if chr(av) in _WHITESPACE else 0
    if op is C.NOT_LITERAL:
        return 0 if chr(av) == " " else None
    if op is C.ANY:
        return None
    if op is C.IN:
        if _only_whitespace(av):
            return 1
        return None if _class_matches_space(flags, av) else 0
    if op is C.AT or op in (C.ASSERT, C.ASSERT_NOT):
        return 0
    if op in _REPEATS:
        lo, hi, body = av
        n = _seq_spaces(flags, body)
        if n is None:
            return None
        if n == 0:
            return 0
        return n * lo if lo == hi else None
    if op is C.SUBPATTERN:
        return _seq_spaces((flags | av[1]) & ~av[2], av[3])
    if op is C.ATOMIC_GROUP:
        return _seq_spaces(flags, av)
    if op is C.BRANCH or op is C.GROUPREF_EXISTS:
        alts = av[1] if op is C.BRANCH else [av[1], av[2] or []]
        counts = {_seq_spaces(flags, alt) for alt in alts}
        return counts.pop() if len(counts) == 1 else None
    return None  # a backreference: its text is the line's


def _seq_spaces(flags: int, items: Iterable[Node]) -> int | None:
    total = 0
    for node in items:
        n = _spaces(flags, node)
        if n is None:
            return None
        total += n
    return total


def _only_whitespace(items: list[Node]) -> bool:
    return bool(items) and all(
        (op is C.LITERAL and chr(av) in _WHITESPACE)
        or (op is C.CATEGORY and av in (C.CATEGORY_SPACE, C.CATEGORY_UNI_SPACE)) for op, av in items)


_CLASS_CACHE: dict[tuple[int, str], bool] = {}


def _class_matches_space(flags: int, items: list[Node]) -> bool:
    """Whether the class `items` matches a space (compiled as `re` compiles it)."""
    key = (flags, repr(items))
    got = _CLASS_CACHE.get(key)
    if got is None:
        state = sre_parse.State()
        state.flags = flags & ~re.VERBOSE
        rx = sre_compile.compile(sre_parse.SubPattern(state, [(C.IN, items)]), state.flags)
        got = rx.fullmatch(" ") is not None
        if len(_CLASS_CACHE) < 4096:
            _CLASS_CACHE[key] = got
    return got


# -- showing a part of a pattern ---------------------------------------------------------------------------

def _names(tree: Any) -> dict[int, str]:
    return {v: k for k, v in tree.state.groupdict.items()}


_CATEGORY = {
    C.CATEGORY_DIGIT: r"\d", C.CATEGORY_NOT_DIGIT: r"\D", C.CATEGORY_SPACE: r"\s", C.CATEGORY_NOT_SPACE: r"\S",
    C.CATEGORY_WORD: r"\w", C.CATEGORY_NOT_WORD: r"\W",
}
_AT = {C.AT_BEGINNING: "^", C.AT_BEGINNING_STRING: r"\A", C.AT_END: "$", C.AT_END_STRING: r"\Z",
       C.AT_BOUNDARY: r"\b", C.AT_NON_BOUNDARY: r"\B"}
_PLAIN = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 !\"#%&',/:;<=>@_`~")


def _char(c: int, in_class: bool = False) -> str:
    ch = chr(c)
    if ch in _PLAIN or (in_class and ch in ".*+?(){}|$"):
        return ch
    if ch == "-" and not in_class:
        return ch
    if ch == "\t":
        return r"\t"
    if ch == "\n":
        return r"\n"
    if ch == "\r":
        return r"\r"
    if c < 0x20 or c == 0x7F:
        return f"\\x{c:02x}"
    if c > 0x7F:
        return ch
    return "\\" + ch


def _quant(op: Any, lo: int, hi: int) -> str:
    if (lo, hi) == (0, MAXREPEAT):
        q = "*"
    elif (lo, hi) == (1, MAXREPEAT):
        q = "+"
    elif (lo, hi) == (0, 1):
        q = "?"
    elif lo == hi:
        q = f"{{{lo}}}"
    elif hi == MAXREPEAT:
        q = f"{{{lo},}}"
    else:
        q = f"{{{lo},{hi}}}"
    return q + ("?" if op is C.MIN_REPEAT else "+" if op is C.POSSESSIVE_REPEAT else "")


def _atom(items: list[Node]) -> bool:
    """True when `items` shows as one atom a quantifier can follow without a group."""
    return len(items) == 1 and items[0][0] in (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN, C.SUBPATTERN,
                                               C.ATOMIC_GROUP, C.GROUPREF)


def unparse(items: Iterable[Node], names: Mapping[int, str] | None = None) -> str:
    """Regex text for parsed nodes (equivalent to the source, not always spelled alike)."""
    names = names or {}
    items = list(items)
    out = []
    for op, av in items:
        if op is C.LITERAL:
            out.append(_char(av))
        elif op is C.NOT_LITERAL:
            out.append(f"[^{_char(av, True)}]")
        elif op is C.ANY:
            out.append(".")
        elif op is C.IN:
            if len(av) == 1 and av[0][0] is C.CATEGORY and av[0][1] in _CATEGORY:
                out.append(_CATEGORY[av[0][1]])
                continue
            body = ""
            for iop, iav in av:
                if iop is C.NEGATE:
                    body = "^" + body
                elif iop is C.LITERAL:
                    body += "\\" + chr(iav) if chr(iav) in "]\\^-" else _char(iav, True)
                elif iop is C.RANGE:
                    body += f"{_char(iav[0], True)}-{_char(iav[1], True)}"
                elif iop is C.CATEGORY:
                    body += _CATEGORY.get(iav, "")
            out.append(f"[{body}]")
        elif op is C.AT:
            out.append(_AT.get(av, ""))
        elif op is C.BRANCH:
            text = "|".join(unparse(alt, names) for alt in av[1])
            out.append(text if len(items) == 1 else f"(?:{text})")
        elif op is C.SUBPATTERN:
            gid, add, dele, sub = av
            if gid is None:
                flags = "".join(f for f, bit in (("i", re.I), ("m", re.M), ("s", re.S), ("x", re.X))
                                if add & bit)
                minus = "".join(f for f, bit in (("i", re.I), ("m", re.M), ("s", re.S), ("x", re.X))
                                if dele & bit)
                head = f"(?{flags}{'-' + minus if minus else ''}:"
            elif gid in names:
                head = f"(?P<{names[gid]}>"
            else:
                head = "("
            out.append(head + unparse(sub, names) + ")")
        elif op in _REPEATS:
            lo, hi, body = av
            body = list(body)
            text = unparse(body, names)
            out.append((text if _atom(body) else f"(?:{text})") + _quant(op, lo, hi))
        elif op is C.ATOMIC_GROUP:
            out.append(f"(?>{unparse(av, names)})")
        elif op in (C.ASSERT, C.ASSERT_NOT):
            direction, sub = av
            kind = ("=" if op is C.ASSERT else "!") if direction > 0 else ("<=" if op is C.ASSERT else "<!")
            out.append(f"(?{kind}{unparse(sub, names)})")
        elif op is C.GROUPREF:
            out.append(f"(?P={names[av]})" if av in names else f"\\{av}")
        elif op is C.GROUPREF_EXISTS:
            gid, yes, no = av
            out.append(f"(?({gid}){unparse(yes, names)}" + (f"|{unparse(no, names)}" if no else "") + ")")
    return "".join(out)


@lru_cache(maxsize=64)
def _macro_texts(macro: str, body: str) -> tuple[str, ...]:
    tree = parse(body)
    text = unparse(tree)
    return (f"(?:{text})", text)


def _show(node: Node, names: Mapping[int, str], macros: Mapping[str, str] | None) -> str:
    text = unparse([node], names)
    if node[0] is C.BRANCH:
        text = f"(?:{text})"
    for macro, body in (macros or {}).items():
        for form in _macro_texts(macro, body):
            text = text.replace(form, macro)
    return text
