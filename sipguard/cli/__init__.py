"""The `sipguard` command: one app (`app.py`: the typer app, the global options, the shared option
parsers) and one module per group of verbs, which parse arguments and call the stages.

Importing this package registers every verb: `run` (run, status, check-config), `logs` (scan,
test-filter), `bans` (list, ban, unban), `ops` (import, report), `doctor`, `why`, `firewall` (the
baseline firewall).
"""

from __future__ import annotations

from . import run, logs, bans, ops  # noqa: F401 - each registers its verbs on `app`
from . import doctor  # noqa: F401 - `sipguard doctor`
from . import why  # noqa: F401 - `sipguard why`
from .app import app, entry
from .firewall import firewall_app

app.add_typer(firewall_app, name="firewall")

__all__ = ["app", "entry"]
