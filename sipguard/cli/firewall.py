"""`sipguard firewall ...`: the baseline firewall (sipguard/firewall/, rules/baseline-v*.rules).

`remove` undoes both sides: the firewall's tables (sipguard.firewall.remove), then the enforcer's sets and
hook (sipguard.enforce.remove_all); the firewall package itself never deletes the enforcer's sets.
`remove-hook` is the enforcer's part alone (what the Debian package's prerm runs on `apt remove`: an applied
baseline firewall stays, since removing it could open the host).

Everything printed goes out line by line escaped (`_lines`), and is never cut.

Registered as the `firewall` verb by sipguard/cli/verbs.py's table (built when a command asks for it); the global
options (--config, --state-dir) live in sipguard/cli/app.py's `ctx`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

firewall_app = typer.Typer(
    no_args_is_help=True,
    help="The baseline firewall (default-DROP INPUT, SIP/RTP/SSH services, ICMP limits, PSD): "
         "apply, show, remove, confirm.",
)


def _ctx():
    from .app import ctx

    return ctx


def _state_dir() -> Path:
    from ..config import resolve_state_dir

    c = _ctx()
    return resolve_state_dir(c.cfg, c.state_dir)


def _lines(text: str) -> str:
    """Text for the operator, each line escaped (sipguard.text.printable): rules read back from the
    kernel and names from the config reach the terminal as text, never as control sequences."""
    from ..text import printable

    return "\n".join(printable(line) for line in str(text).split("\n"))


def _warn(msg: str) -> None:
    print(_lines(msg), file=sys.stderr, flush=True)


def _echo(msg: str) -> None:
    print(_lines(msg), flush=True)


@firewall_app.command("apply")
def apply_cmd(
    confirm_timeout: Annotated[Optional[int], typer.Option(
        "--confirm-timeout", min=1, max=86400, metavar="N",
        help="revert to the previous rules after N seconds unless `sipguard firewall confirm` runs")] = None,
    force: Annotated[bool, typer.Option("--force", help="apply even if the current SSH client would be cut off")]
    = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the rendered rules, change nothing")] = False,
) -> None:
    """Apply the baseline firewall atomically (prints the changes; a second apply changes nothing)."""
    from .. import firewall

    c = _ctx()
    cfg = c.cfg
    if dry_run:
        sys.stdout.write(_lines(firewall.dry_run(cfg)))
        return
    firewall.apply(cfg, _state_dir(), force=force, confirm_timeout=confirm_timeout,
                   ssh_connection=os.environ.get("SSH_CONNECTION"), echo=_echo, warn=_warn,
                   config_path=c.config_path)


@firewall_app.command("show")
def show_cmd() -> None:
    """Installed rules vs what the config asks for: 'in sync' (exit 0) or a diff (exit 1)."""
    from .. import firewall

    in_sync, text = firewall.show(_ctx().cfg)
    _echo(text)
    if not in_sync:
        raise typer.Exit(1)


@firewall_app.command("remove")
def remove_cmd() -> None:
    """Restore the filter tables saved before the first apply; remove sipguard's chains and sets."""
    from .. import firewall
    from ..enforce import remove_all

    cfg = _ctx().cfg
    firewall.remove(cfg, _state_dir(), echo=_echo, warn=_warn)  # the tables: the firewall's part
    for msg in remove_all(cfg.enforce):  # the sets and the ban hook: the enforcer's part
        _echo(msg)


@firewall_app.command("remove-hook")
def remove_hook_cmd() -> None:
    """Remove only sipguard's ban hook chain and sets (kernel bans); an applied baseline firewall stays."""
    from ..enforce import remove_all

    for msg in remove_all(_ctx().cfg.enforce):
        _echo(msg)


@firewall_app.command("confirm")
def confirm_cmd() -> None:
    """Keep the rules of an `apply --confirm-timeout` (cancels the automatic revert)."""
    from .. import firewall

    _echo(firewall.confirm(_state_dir()))


@firewall_app.command("revert-if-unconfirmed", hidden=True)
def revert_cmd(token: Annotated[str, typer.Argument()]) -> None:
    """Internal: the detached process `apply --confirm-timeout` starts."""
    from .. import firewall

    c = _ctx()
    state = c.state_dir or _state_dir()
    firewall.revert_if_unconfirmed(Path(state), token)
