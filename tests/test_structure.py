"""The shape of the house, checked from the source text (nothing is imported or run):

* no import cycle among sipguard's modules, counting `if TYPE_CHECKING:` imports and imports inside
  functions (every `import` statement anywhere in a module is an edge);
* only the store touches the database (no `.conn` / `.db` outside sipguard/store.py, no sqlite import);
* no `__getattr__` anywhere (interfaces are written out, not proxied);
* nobody replaces another object's attributes: no assignment to an attribute of a parameter (other than
  `self`/`cls`) and none two attributes deep (`a.b.c = ...`, `self.x.y = ...`), except the object's
  own counters (`self.stats.x += 1`);
* one module for address parsing (`ipaddress` is imported by sipguard/addresses.py only), one for
  iptables flavour detection (sipguard/netfilter.py), the stage folders, and docstrings that are true.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "sipguard"


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


MODS = modules()


def _is_pkg(name: str) -> bool:
    return MODS.get(name, Path()).name == "__init__.py"


def imports_of(name: str, path: Path) -> set[str]:
    """Every sipguard module `name` imports, wherever the import statement stands."""
    tree = ast.parse(path.read_text())
    here = name if _is_pkg(name) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("sipguard"):
                    found.add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                if node.level > 1:
                    base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("sipguard"):
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.add(sub if sub in MODS else mod)
    return {m for m in found if m in MODS and m != name}


def test_no_import_cycles():
    graph = {name: imports_of(name, path) for name, path in MODS.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _trees():
    for name, path in MODS.items():
        yield name, path, ast.parse(path.read_text())


def test_only_the_store_touches_the_database():
    bad = []
    for name, path, tree in _trees():
        if name == "sipguard.store":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("conn", "db"):
                bad.append(f"{path.name}:{node.lineno}: .{node.attr}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(n.split(".")[0] in ("sqlite3", "sqlite_utils") for n in names):
                    bad.append(f"{path.name}:{node.lineno}: imports {names}")
    assert not bad, bad


def test_no_getattr_proxies():
    bad = [f"{p.relative_to(PKG)}:{n.lineno}" for _, p, t in _trees() for n in ast.walk(t)
           if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"]
    assert not bad, bad


def _depth(target: ast.expr) -> tuple[int, str | None]:
    """(attribute depth, base name) of an assignment target such as a.b.c (depth 2, 'a')."""
    d = 0
    while isinstance(target, ast.Attribute):
        d += 1
        target = target.value
    return d, (target.id if isinstance(target, ast.Name) else None)


def test_nobody_replaces_another_objects_attributes():
    """Allowed: an object's own attributes and counters, the fields of a module's private state record
    handed to its own helpers (a parameter annotated with a class of the same module), and objects a
    function built itself (`rule = iptc.Rule(); rule.target.x = ...`)."""
    bad = []
    for _, path, tree in _trees():
        own_classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            params = set()
            for a in fn.args.args + fn.args.kwonlyargs:
                ann = ast.unparse(a.annotation).strip("'\"") if a.annotation is not None else ""
                if a.arg not in ("self", "cls") and ann not in own_classes:
                    params.add(a.arg)
            built = {t.id for n in ast.walk(fn) if isinstance(n, ast.Assign) and isinstance(n.value, (ast.Call, ast.IfExp))
                     for t in n.targets if isinstance(t, ast.Name)}
            for node in ast.walk(fn):
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
                for t in targets:
                    if not isinstance(t, ast.Attribute):
                        continue
                    depth, base = _depth(t)
                    own_counter = (depth == 2 and base == "self" and isinstance(t.value, ast.Attribute)
                                   and t.value.attr == "stats")
                    if (depth == 1 and base in params) or (depth >= 2 and not own_counter and base not in built):
                        bad.append(f"{path.relative_to(PKG)}:{node.lineno}: {ast.unparse(t)}")
    assert not bad, "\n".join(bad)


def test_address_parsing_and_iptables_flavour_live_in_one_module_each():
    ipaddr = [name for name, _, tree in _trees() for n in ast.walk(tree)
              if isinstance(n, ast.Import) and any(a.name == "ipaddress" for a in n.names)]
    assert set(ipaddr) <= {"sipguard.addresses"}, ipaddr
    flavour = [name for name, path, _ in _trees() if name != "sipguard.netfilter"
               and ('"-V"' in path.read_text() or "'-V'" in path.read_text())]
    assert not flavour, flavour
    assert "sipguard.netfilter" in MODS


@pytest.mark.parametrize("folder", ["sources", "formats", "filters", "enforce", "firewall", "cluster", "cli",
                                    "extras"])
def test_stage_folders(folder):
    assert (PKG / folder / "__init__.py").is_file()


def test_the_one_way_modules_exist():
    for name in ("policy", "bans", "store", "wiring", "daemon", "pipeline", "addresses", "model"):
        assert f"sipguard.{name}" in MODS, name
    assert (PKG / "enforce" / "base.py").is_file() and (PKG / "cluster" / "README.md").is_file()


def test_enforcer_backends_import_only_the_base():
    for backend in ("ipset", "nftables", "dryrun"):
        deps = imports_of(f"sipguard.enforce.{backend}", MODS[f"sipguard.enforce.{backend}"])
        siblings = {d for d in deps if d.startswith("sipguard.enforce")}
        allowed = {"sipguard.enforce.base", "sipguard.enforce.hook", "sipguard.enforce.ipsetnl"}
        assert siblings <= allowed and "sipguard.enforce" not in siblings, (backend, siblings)
        other = {"ipset", "nftables", "dryrun"} - {backend}
        assert not any(d.rsplit(".", 1)[-1] in other for d in siblings), (backend, siblings)


UNTRUE = ["holds no detection logic", "holds no logic of its own", "shared by the CLI and the daemon",
          "Integrations.attach", "wraps its policy"]


def test_no_docstring_says_what_is_no_longer_true():
    bad = [(p.relative_to(PKG), s) for _, p, t in _trees() for s in UNTRUE if s in (ast.get_docstring(t) or "")]
    assert not bad, bad


def test_only_the_ban_book_changes_the_banned_set():
    """`note_ban` / `release` are called by the ban book; besides it only by the policy on itself (a
    decision marks its source at once), the fleet's policy on the local one it wraps, and scan's
    offline replay (which simulates bans in log time and changes none)."""
    allowed = {"sipguard.bans", "sipguard.policy", "sipguard.cluster.scoring", "sipguard.scan"}
    callers = {name for name, _, tree in _trees() for n in ast.walk(tree)
               if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("note_ban", "release")
               and not (isinstance(n.func.value, ast.Name) and n.func.value.id == "lock")}
    assert callers <= allowed, callers - allowed
