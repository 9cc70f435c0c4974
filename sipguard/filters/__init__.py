"""Filters: `filters/*.toml` compiled once, turning a Kamailio Record into at most one Event.

`spec.py` validates and compiles one filter file, refusing what `check.py`'s static checks find (nested
unbounded quantifiers, an address not anchored at the end of the record); `filterset.py` holds the active filters
(`FilterSet.match`, `explain`, the candidate filters of a line's literals); `search.py` finds the
lines holding a filter's prefilter literals (Hyperscan or bytes.find); `corpus.py` reads and runs
the corpus grammar (tests/corpus/README.md) for the tests and `sipguard test-filter --corpus`.
Never takes an address from anywhere but the capture group `ip` of a regex, and never returns an
address normalize_ip refused.
"""

from __future__ import annotations

from .filterset import FilterSet, Verdict, VerdictDetail
from .search import search_literals, trigger_lines
from .spec import MACROS, CompiledFilter, FilterSpec, compile_spec, expand_macros, load_spec, shipped_dir

__all__ = ["MACROS", "CompiledFilter", "FilterSet", "FilterSpec", "Verdict", "compile_spec", "expand_macros",
           "VerdictDetail", "load_spec", "search_literals", "shipped_dir", "trigger_lines"]
