"""Filters checked at load (sipguard/filters/check.py): nested unbounded quantifiers and an address not
anchored where Kamailio prints $si are refused, naming the file, the regex and the offending part
(issue 16, item 11). A table of good and bad patterns, then the same through filter files."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from sipguard.errors import ConfigError
from sipguard.filters import MACROS, FilterSet, expand_macros, shipped_dir
from sipguard.filters.check import anchor_problem, nested_quantifier, parse, unparse

# pattern -> the offending part the error names (None: the pattern passes)
NESTED = [
    (r"(a+)+$", "(a+)+"),
    (r"^x (\w+\s?)*$", r"(\w+\s?)*"),
    (r"(?:a{1,3})+", "(?:a{1,3})+"),
    (r"(?:x.*)+y", "(?:x.*)+"),
    (r"(?:a|b+)*c", "b+"),
    (r"((?:a+)b)+", "(a+b)+"),  # shown as re parses it
    (r"(\d+\.?){2,}x", r"(\d+\.?){2,}"),
    (r"(?:a*)*", "(?:a*)*"),
    (r"(?=(?:a+)+b)", "(?:a+)+"),
    (r"(?:a+){2,5}", "(?:a+){2,5}"),
    (r"(?:a+)*?", "(?:a+)*?"),
    (r"(?:(?P<ip><ADDR>) )+$", "(?:(?P<ip><ADDR>) )+"),
    # an inner repeat that cannot be backtracked into, bounded nesting, optional groups: fine
    (r"(?:a++)+", None),
    (r"(?>a+)+", None),
    (r"(?:a{1,3}){1,3}", None),
    (r"^[A-Z]+: (?:.* )?<script>: x", None),
    (r"a+b+c*", None),
    (r"(?:ab)+", None),
    (r"(?:a+)?b", None),
]

ANCHOR = [
    (r"(?P<ip><ADDR>)", "does not reach the end of the record"),
    (r"from (?P<ip><ADDR>)", "does not reach the end of the record"),
    (r"from (?P<ip><ADDR>):<PORT>", "does not reach the end of the record"),
    (r"(?P<ip><ADDR>).*$", ".* can match a varying number of spaces"),
    (r"from (?P<ip><ADDR>) .+ x$", ".+ can match a varying number of spaces"),
    (r"(?P<ip><ADDR>)(?: x)?$", "(?: x)? can match a varying number of spaces"),
    (r"(?P<ip><ADDR>)(?: x| y z)$", "(?:x|y z) can match a varying number of spaces"),
    (r"(?P<ip><ADDR>)[^x]+$", "[^x]+ can match a varying number of spaces"),
    (r"(?P<ip><ADDR>)\s+x$", r"\s+ can match a varying number of spaces"),
    (r"(?m)(?P<ip><ADDR>)$", "does not reach the end of the record"),
    (r"(?P<ip><ADDR>)\b", "does not reach the end of the record"),
    (r"(?=(?P<ip><ADDR>) x) y$", "does not reach the end of the record"),
    (r"(?:(?P<ip><ADDR>) ){2}$", "inside the repeated part (?:(?P<ip><ADDR>) ){2}"),
    (r"(?<=(?P<ip>\d\d\d))x$", r"inside the lookaround (?<=(?P<ip>\d\d\d))"),
    (r"(?!(?P<ip>x))y$", "inside the lookaround"),
    (r"(?P<ip><ADDR>) (\w{1,9}) \2$", "can match a varying number of spaces"),  # a backreference
    # anchored: the address is a fixed number of spaces from the end
    (r"(?P<ip><ADDR>)$", None),
    (r"boom from (?P<ip><ADDR>):<PORT>$", None),
    (r"(?P<ip><ADDR>) \S+$", None),
    (r"(?P<ip><ADDR>) [^ ]+ method [A-Z]{1,32}\Z", None),
    (r"(?P<ip><ADDR>)(?: x| y)$", None),
    (r"^x (?=.* from (?P<ip><ADDR>):<PORT>$)", None),
    (r"(?P<ip><ADDR>)(?=\s\d+$)", None),
    (r"\((?P<ip><ADDR>):<PORT>/\d{1,2}\)$", None),
    (r"(?P<ip><ADDR>)\s{2}x$", None),
    (r"(?P<ip><ADDR>)(?: x){3}$", None),
    (r"(?P<ip><ADDR>)(?:, node=(?:0x[0-9a-f]{1,16}|\(nil\)))$", None),
    (r"(?m:x$)(?P<ip><ADDR>)$", None),
    (r"(?P<ip><ADDR>)(?i: X)$", None),
]


@pytest.mark.parametrize("pattern, part", NESTED)
def test_nested_quantifiers_table(pattern: str, part: str | None) -> None:
    problem = nested_quantifier(parse(expand_macros(pattern)), MACROS)
    if part is None:
        assert problem is None, problem
    else:
        assert problem is not None and problem.startswith("nested quantifiers: ") and part in problem, problem


@pytest.mark.parametrize("pattern, words", ANCHOR)
def test_anchor_table(pattern: str, words: str | None) -> None:
    problem = anchor_problem(parse(expand_macros(pattern)), "ip", MACROS)
    if words is None:
        assert problem is None, problem
    else:
        assert problem is not None and words in problem, problem


def test_the_refused_nested_shapes_really_backtrack() -> None:
    """The nested shape the check refuses is the one that blows up; its possessive form does not."""
    text = "a" * 24 + "!"
    t0 = time.perf_counter()
    re.search(r"^(a+)+$", text)
    slow = time.perf_counter() - t0
    t0 = time.perf_counter()
    re.search(r"^(?:a++)+$", text)
    fast = time.perf_counter() - t0
    assert slow > 50 * fast and slow > 0.05, (slow, fast)


def test_every_shipped_regex_passes(shipped: FilterSet) -> None:
    for f in shipped.filters:
        for rx in f.regexes:
            tree = parse(rx.pattern)
            assert nested_quantifier(tree, MACROS) is None, (f.name, rx.pattern)
            assert anchor_problem(tree, "ip", MACROS) is None, (f.name, rx.pattern)


@pytest.mark.parametrize("pattern", [p for p, _ in NESTED + ANCHOR])
def test_the_part_shown_is_the_same_regex(pattern: str) -> None:
    """What errors show is rebuilt from the parse: it compiles to a regex that matches alike."""
    tree = parse(expand_macros(pattern))
    names = {v: k for k, v in tree.state.groupdict.items()}
    a, b = re.compile(expand_macros(pattern)), re.compile(unparse(tree, names))
    for text in ("", "x", "a b", "aab!", "from 198.18.0.5:5060 x", "198.18.0.5 y z", "1.1 x x x", "ab ab"):
        ma, mb = a.search(text), b.search(text)
        assert (ma and ma.span()) == (mb and mb.span()), (pattern, text)


# -- through filter files ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped() -> FilterSet:
    return FilterSet.load([shipped_dir()])


def _filter(regex: str, extra: str = "", ignore: str | None = None) -> str:
    lines = ['name = "mine"', 'kind = "auth_failure"', 'prefilter = ["boom"]',
             f"regex = ['boom x', '{regex}']"]
    if ignore is not None:
        lines.append(f"ignore = ['{ignore}']")
    return "\n".join(lines) + "\n" + extra


def _load_error(tmp_path: Path, text: str) -> ConfigError:
    (tmp_path / "mine.toml").write_text(text)
    with pytest.raises(ConfigError) as e:
        FilterSet.load([shipped_dir(), tmp_path])
    return e.value


def test_unanchored_operator_filter_is_refused_naming_file_regex_and_part(tmp_path: Path) -> None:
    # regex[0] 'boom x' has no group ip: that is the existing check, so use a valid first regex
    text = _filter("boom from (?P<ip><ADDR>)").replace("'boom x'", "'boom (?P<ip><ADDR>)$'")
    err = _load_error(tmp_path, text)
    msg = str(err)
    assert msg.startswith(f"{tmp_path / 'mine.toml'}: regex[1] (line 4): 'boom from (?P<ip><ADDR>)': "), msg
    assert "not anchored where Kamailio prints $si" in msg and "unanchored" not in msg.split(": ", 3)[2]


def test_catastrophic_operator_filter_is_refused(tmp_path: Path) -> None:
    text = _filter(r"boom (a+)+ (?P<ip><ADDR>)$").replace("'boom x'", "'boom (?P<ip><ADDR>)$'")
    msg = str(_load_error(tmp_path, text))
    assert "regex[1] (line 4): 'boom (a+)+ (?P<ip><ADDR>)$': nested quantifiers: (a+)+ repeats" in msg, msg


def test_ignore_regexes_are_checked_for_nesting_too(tmp_path: Path) -> None:
    text = _filter(r"boom (?P<ip><ADDR>)$", ignore=r"(\w+ ?)*x").replace("'boom x', ", "")
    msg = str(_load_error(tmp_path, text))
    assert r"ignore[0] (line 5): '(\w+ ?)*x': nested quantifiers: (\w+ ?)*" in msg, msg


def test_unanchored_needs_a_reason_and_waives_only_the_anchor(tmp_path: Path) -> None:
    base = _filter("boom from (?P<ip><ADDR>)").replace("'boom x', ", "")
    msg = str(_load_error(tmp_path, base + "unanchored = true\n"))
    assert "unanchored (line 5): unanchored = true needs a reason" in msg, msg
    msg = str(_load_error(tmp_path, base + 'reason = "x"\n'))
    assert "reason (line 5): reason is read only with unanchored = true" in msg, msg
    (tmp_path / "mine.toml").write_text(base + 'unanchored = true\nreason = "the app prints the address first"\n')
    fs = FilterSet.load([shipped_dir(), tmp_path])
    assert "mine" in fs.names
    # ... but never the backtracking check
    bad = _filter(r"boom (a+)+ (?P<ip><ADDR>)").replace("'boom x', ", "")
    msg = str(_load_error(tmp_path, bad + 'unanchored = true\nreason = "x"\n'))
    assert "nested quantifiers" in msg, msg


def test_a_shipped_name_replaced_by_an_unanchored_filter_is_refused(tmp_path: Path) -> None:
    """The issue's case: an operator filter with a shipped name whose address is the first one anywhere."""
    text = ('name = "auth-failure"\nkind = "auth_failure"\nprefilter = ["auth failed for user"]\n'
            "regex = ['auth failed for user .*?(?P<ip><ADDR>)']\n")
    msg = str(_load_error(tmp_path, text))
    assert "regex[0] (line 4)" in msg and "not anchored" in msg, msg
