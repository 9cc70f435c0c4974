"""The `sipguard` typer app: the app object, the global options and context, the output consoles, the
log format and the option parsers every verb module shares (tables: sipguard/cli/output.py).

Verb modules (`run`, `logs`, `bans`, `ops`, `doctor`, `why`, `firewall`) register their commands on `app`;
this module imports none of them at import time. Its root group (`_Verbs`) imports the one module of the
verb a command runs, named by sipguard/cli/verbs.py's table, and builds only that verb's command; `--help`
lists the table's help lines without importing any verb module. A verb module imported before the app
runs (a test, an older `from . import x`) has its commands there from the start. It holds no logic of
sipguard's stages. Values shown to the operator are printed literally (never as markup) with control
characters escaped (sipguard.text), and never cut; so are the lines of sipguard's own log
(EscapingFormatter).
"""

from __future__ import annotations

import gc
import importlib
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from .. import __version__
from ..addresses import AllowList
from ..config import Config, load_config, parse_duration, resolve_state_dir
from ..errors import SipguardError
from ..text import EscapingFormatter, printable
from .output import OUTPUTS, output_format  # noqa: F401 - the verbs' shared --output parser
from .verbs import VERBS

if TYPE_CHECKING:
    from ..store import Store


class _Verbs(TyperGroup):
    """The root group: the verbs of sipguard/cli/verbs.py, each module imported (and its commands built)
    when one of its verbs is asked for; commands already registered on `app` (a test imported the
    module) are there from the start. While the help is drawn, a verb not loaded yet is a stand-in
    command holding the table's help line, so `sipguard --help` imports no verb module."""

    _listing = False

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return [*VERBS, *(name for name in self.commands if name not in VERBS)]

    def get_command(self, ctx: typer.Context, cmd_name: str):  # noqa: ANN201 - a click command or None
        cmd = self.commands.get(cmd_name)
        if cmd is None and cmd_name in VERBS:
            if self._listing:
                return TyperCommand(name=cmd_name, help=VERBS[cmd_name].help)
            self._load(cmd_name)
            cmd = self.commands.get(cmd_name)
        return cmd

    def _load(self, name: str) -> None:
        """Import the verb's module (the collector paused, as for sipguard's own start-up) and build its
        commands with typer's own builders, as typer builds an eagerly registered command."""
        from typer.main import get_command_from_info, get_command_name, get_group_from_info
        from typer.models import TyperInfo

        verb = VERBS[name]
        paused = gc.isenabled()
        gc.disable()
        try:
            module = importlib.import_module(f"{__package__}.{verb.module}")
        finally:
            if paused:
                gc.enable()
        opts = {"pretty_exceptions_short": app.pretty_exceptions_short, "rich_markup_mode": app.rich_markup_mode}
        if verb.group is not None:
            self.add_command(get_group_from_info(TyperInfo(getattr(module, verb.group), name=name),
                                                 suggest_commands=app.suggest_commands, **opts), name)
            return
        for info in app.registered_commands:
            verb_name = info.name or get_command_name(info.callback.__name__)
            if VERBS.get(verb_name, verb).module == verb.module and verb_name not in self.commands:
                self.add_command(get_command_from_info(info, **opts), verb_name)

    def format_help(self, ctx: typer.Context, formatter) -> None:  # noqa: ANN001 - click's HelpFormatter
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def resolve_command(self, ctx: typer.Context, args: list[str]):  # noqa: ANN201 - click's triple
        try:
            return super().resolve_command(ctx, args)
        except Exception as exc:  # click's "No such command": suggest from the table, not the loaded verbs
            message = getattr(exc, "message", None)
            names = self.list_commands(ctx)
            if args and args[0] not in names and isinstance(message, str) and "Did you mean" not in message:
                from difflib import get_close_matches

                near = get_close_matches(args[0], names)
                if near:
                    exc.message = f"{message.rstrip('.')}. Did you mean {', '.join(map(repr, near))}?"
            raise


app = typer.Typer(
    cls=_Verbs,
    add_completion=False,
    no_args_is_help=True,
    help="sipguard: bans the sources that attack a Kamailio SIP server, from what Kamailio logs.",
    pretty_exceptions_enable=False,
)


class _LazyConsole:
    """A rich Console made on first print (`scan --json` and friends never pay for importing rich)
    that prints text literally: markup is off unless a caller passes `markup=True` for a string it
    wrote itself, and every str it is given is escaped with sipguard.text.printable first (a value
    from data can neither style the output nor reach the terminal as a control sequence). Rich
    renderables (a Table, a Text) are printed as they are: sipguard/cli/output.py builds them from
    escaped Text cells."""

    def __init__(self, **kw: object) -> None:
        self._kw = {"markup": False, "emoji": False, **kw}
        self._console = None

    @property
    def console(self):  # noqa: ANN201 - rich's Console, made on first use
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._kw)
        return self._console

    def print(self, *objects: object, **kw: object) -> None:
        self.console.print(*(printable(o) if isinstance(o, str) else o for o in objects), **kw)

    def print_lines(self, text: str) -> None:
        """A message of several lines sipguard wrote (an error naming data): each line escaped."""
        for line in str(text).split("\n"):
            self.print(line)


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

    def store(self, readonly: bool = False) -> Store:
        """The state database; `readonly` for the verbs that only look (status, list, report): they
        then work on a read-only state directory and never create or migrate anything. With no
        database yet, it is made as any verb makes it, when the directory allows (else one error)."""
        from ..store import NoDatabase, Store, StoreError

        state = resolve_state_dir(self.cfg, self.state_dir)
        try:
            try:
                return Store.open_state_dir(state, readonly=readonly)
            except NoDatabase as missing:
                try:
                    return Store.open_state_dir(state)
                except Exception as exc:  # noqa: BLE001 - a read-only or foreign directory
                    raise StoreError(f"{missing}, and it cannot be made here: {exc}") from None
        except StoreError:
            raise
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
    state_dir: Annotated[Optional[Path], typer.Option("--state-dir", envvar="SIPGUARD_STATE_DIR", readable=False,
                                                      help="state directory (default /var/lib/sipguard)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    ctx.config_path = config
    ctx.state_dir = state_dir
    ctx._cfg = None
    handler = logging.StreamHandler(sys.stderr)
    # sipguard's own log: data in a message (a reason, a node name, a path) is escaped, one record a line
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


OUT_OF_RANGE = "out of range"
UNKNOWN = "unknown"


def _iso(ts: float | None) -> str | None:
    """UTC ISO-8601 of an epoch time; None stays None; a time no calendar holds (huge, infinite,
    negative beyond year 1) is OUT_OF_RANGE and one that is no number UNKNOWN, never an error."""
    if ts is None:
        return None
    if ts != ts:  # NaN: the store's reading of NULL or text
        return UNKNOWN
    try:
        return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError, TypeError):
        return OUT_OF_RANGE


def _duration_option(value: str | None) -> float | None | str:
    if value is None:
        return "policy"
    try:
        return parse_duration(value, allow_permanent=True)  # at most 100 years, or permanent
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
        err.print_lines(f"sipguard: error: {exc}")
        sys.exit(1)
    except OSError as exc:  # permissions, missing files: still one line, not a traceback
        err.print_lines(f"sipguard: error: {exc}")
        sys.exit(1)
    except Exception as exc:  # a database error the store did not name (corrupt file, read-only disk)
        from ..store import database_error

        msg = database_error(exc)
        if msg is None:
            raise
        err.print_lines(f"sipguard: error: {msg}")
        sys.exit(1)

