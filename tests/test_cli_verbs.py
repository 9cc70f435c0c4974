"""The verb table (sipguard/cli/verbs.py) and the lazy root group (sipguard/cli/app.py's `_Verbs`):
`--help` lists every verb with its own help text without importing a verb module, a command imports
only the module of its verb, and the table agrees with what the modules register."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import typer.main

from sipguard.cli.verbs import VERBS

ROOT = Path(__file__).resolve().parents[1]
VERB_MODULES = sorted({f"sipguard.cli.{v.module}" for v in VERBS.values()})


def _python(code: str, *args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100", "TERM": "dumb"}
    env.pop("SIPGUARD_CONFIG", None)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          cwd=tmp, timeout=60)


# runs the command in-process, then prints which sipguard.cli modules it imported (last line, JSON)
_RUN = """
import json, sys
pre = sys.argv[1]
for m in filter(None, pre.split(",")):
    __import__(m)
sys.argv = ["sipguard", *sys.argv[2:]]
from sipguard.cli import entry
try:
    entry()
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.startswith("sipguard.cli."))))
"""


def _run(tmp: Path, *args: str, preload: list[str] = ()) -> tuple[str, set[str]]:
    p = _python(_RUN, ",".join(preload), *args, tmp=tmp)
    assert p.returncode == 0, p.stderr
    out, _, mods = p.stdout.rstrip("\n").rpartition("\n")
    return out, set(json.loads(mods))


def _full_group():
    for m in VERB_MODULES:
        importlib.import_module(m)
    from sipguard.cli import app

    return typer.main.get_command(app)


def test_the_table_names_every_verb_the_modules_register_with_its_own_help():
    group = _full_group()
    from sipguard.cli import app

    registered = {c.name or typer.main.get_command_name(c.callback.__name__): c.callback.__module__
                  for c in app.registered_commands}
    for name, module in registered.items():
        assert name in VERBS, f"{name} is registered by {module} but not in sipguard/cli/verbs.py"
        assert module == f"sipguard.cli.{VERBS[name].module}", (name, module, VERBS[name])
    for name, verb in VERBS.items():
        cmd = group.get_command(None, name)
        assert cmd is not None and not cmd.hidden, name
        assert cmd.help.split("\n\n")[0].strip() == verb.help, (name, cmd.help, verb.help)


def test_help_lists_every_verb_and_imports_no_verb_module(tmp_path):
    out, mods = _run(tmp_path, "--help")
    assert not mods & set(VERB_MODULES), mods
    for name in VERBS:
        assert f" {name} " in out, name
    # the same text as when every verb's command is built from its module
    full, _ = _run(tmp_path, "--help", preload=VERB_MODULES)
    assert out == full
    bare, mods = _run(tmp_path)  # no arguments: the help too
    assert bare.rstrip() == out.rstrip() and not mods & set(VERB_MODULES)


def test_a_command_imports_only_its_verbs_module(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[allowlist]\ninclude_host_addresses = false\n")
    state = tmp_path / "state"
    state.mkdir()
    out, mods = _run(tmp_path, "--config", str(cfg), "--state-dir", str(state), "list", "--json")
    assert json.loads(out) == []
    assert mods & set(VERB_MODULES) == {"sipguard.cli.bans"}, mods
    assert "sipguard.cli.why" not in mods and "sipguard.cli.doctor" not in mods
    _, mods = _run(tmp_path, "--config", str(cfg), "scan", "--json", str(cfg))
    assert mods & set(VERB_MODULES) == {"sipguard.cli.logs"}, mods
    out, mods = _run(tmp_path, "firewall", "--help")
    assert mods & set(VERB_MODULES) == {"sipguard.cli.firewall"}, mods
    assert " apply " in out and " confirm " in out


def test_a_verb_module_imported_first_is_not_registered_twice(tmp_path):
    """A test (or bench) that imported a verb module before running the app gets the same commands."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[allowlist]\ninclude_host_addresses = false\n")
    state = tmp_path / "state"
    state.mkdir()
    out, mods = _run(tmp_path, "--config", str(cfg), "--state-dir", str(state), "list", "--json",
                     preload=["sipguard.cli.bans", "sipguard.cli.why"])
    assert json.loads(out) == []


def test_a_mistyped_verb_is_suggested_from_the_whole_table(tmp_path):
    p = _python(_RUN, "", "lst", tmp=tmp_path)
    assert "No such command 'lst'" in p.stderr and "Did you mean 'list'" in p.stderr, p.stderr
    p = _python(_RUN, "", "firewal", "show", tmp=tmp_path)
    assert "Did you mean 'firewall'" in p.stderr, p.stderr
