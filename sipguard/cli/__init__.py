"""The `sipguard` command: one app (`app.py`: the typer app, the global options, the shared option
parsers), the verb table (`verbs.py`) and one module per group of verbs, which parse arguments and
call the stages.

The verbs: `run` (run, status, check-config), `logs` (scan, test-filter), `bans` (list, ban, unban),
`ops` (import, report), `doctor`, `why`, `firewall` (the baseline firewall). Importing this package
imports none of their modules: the app's root group imports the module of the verb a command runs
when it runs (so `sipguard list` pays neither for `why`'s pydantic models nor for `run`'s wiring), and
`sipguard --help` lists every verb from the table.
"""

from __future__ import annotations

from .app import app, entry

__all__ = ["app", "entry"]
