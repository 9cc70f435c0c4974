"""The `sipguard` typer app: the app object, the global options and context, output consoles and the
option parsers every verb module shares.

Verb modules (`run`, `logs`, `bans`, `ops`, `firewall`) register their commands on `app`; this module
imports none of them. It holds no logic of sipguard's stages.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from .. import __version__
from ..addresses import AllowList
from ..config import Config, load_config, parse_duration, resolve_state_dir
from ..errors import SipguardError

if TYPE_CHECKING:
    from ..store import Store

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="sipguard: bans the sources that attack a Kamailio SIP server, from what Kamailio logs.",
    pretty_exceptions_enable=False,
)


class _LazyConsole:
    """A rich Console made on first print: `scan --json` and friends never pay for importing rich."""

    def __init__(self, **kw: object) -> None:
        self._kw = kw
        self._console = None

    def print(self, *objects: object, **kw: object) -> None:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._kw)
        self._console.print(*objects, **kw)


def Table(*args, **kw):  # noqa: ANN201, N802 - rich's Table, imported on first use
    from rich.table import Table as _Table

    return _Table(*args, **kw)


out = _LazyConsole(highlight=False, soft_wrap=True)
err = _LazyConsole(stderr=True, highlight=False, soft_wrap=True)


class _Ctx:
    config_path: Optional[Path] = None
    state_dir: Optional[Path] = None
    _cfg: Optional[Config] = None

    @property
    def cfg(self) -> Config:
        if self._cfg is None:
            self._cfg = load_config(self.config_path)
        return self._cfg

    def store(self) -> Store:
        from ..store import Store

        state = resolve_state_dir(self.cfg, self.state_dir)
        try:
            return Store.open_state_dir(state)
        except Exception as exc:  # noqa: BLE001 - permission, read-only fs, corrupt file
            raise SipguardError(f"cannot open the state database in {state}: {exc}") from None

    def allow(self) -> AllowList:
        c = self.cfg.allowlist
        return AllowList(c.cidrs, include_host=c.include_host_addresses)


ctx = _Ctx()


def _version(value: bool) -> None:
    if value:
        print(f"sipguard {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", envvar="SIPGUARD_CONFIG",
                                                   help="TOML config (default /etc/sipguard/sipguard.toml)")] = None,
    state_dir: Annotated[Optional[Path], typer.Option("--state-dir", envvar="SIPGUARD_STATE_DIR",
                                                      help="state directory (default /var/lib/sipguard)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    ctx.config_path = config
    ctx.state_dir = state_dir
    ctx._cfg = None
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _duration_option(value: str | None) -> float | None | str:
    if value is None:
        return "policy"
    try:
        return parse_duration(value, allow_permanent=True)
    except ValueError as exc:
        raise SipguardError(f"--for: {exc}") from None


# -- shared by the verbs that change bans ---------------------------------------------------------
def _kernel_enforcer():
    """The enforcer [enforce] names, or None with backend = "dryrun" (the CLI then only writes the store)."""
    from ..enforce import make_enforcer

    if ctx.cfg.enforce.backend == "dryrun":
        return None
    return make_enforcer(ctx.cfg.enforce)



def entry() -> None:
    """Console-script entry: every SipguardError is one line and exit code 1."""
    try:
        app(standalone_mode=True)
    except SipguardError as exc:
        err.print(f"sipguard: error: {exc}", markup=False)
        sys.exit(1)
    except OSError as exc:  # permissions, missing files: still one line, not a traceback
        err.print(f"sipguard: error: {exc}", markup=False)
        sys.exit(1)

