"""The man page sipguard(8) and the bash completion, generated from the CLI itself (sipguard/cli/).

Walks the click command tree typer builds (typer carries its own copy of click, so this duck-types:
a group has `list_commands`, an option has `opts`) from `sipguard.cli.app` (every verb, sub-verb, argument and
option with its help text), so neither can drift from `sipguard --help`.

    python packaging/gen_docs.py man  > sipguard.8
    python packaging/gen_docs.py bash > sipguard          (/usr/share/bash-completion/completions/)
"""

from __future__ import annotations

import datetime
import os
import sys

import typer

from sipguard import __version__
from sipguard.cli import app


def tree():
    return typer.main.get_command(app)


def _is_group(cmd) -> bool:
    return hasattr(cmd, "list_commands")


def _is_option(p) -> bool:
    return getattr(p, "param_type_name", "") == "option"


def _commands(group, prefix: tuple[str, ...] = ()):
    ctx = group.context_class(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        yield prefix + (name,), cmd
        if _is_group(cmd):
            yield from _commands(cmd, prefix + (name,))


def _roff(text: str) -> str:
    text = (text or "").replace("\\", "\\\\").replace("-", "\\-")
    return "\n".join(("\\&" + ln) if ln.startswith((".", "'")) else ln for ln in text.splitlines())


def _params(cmd) -> list[tuple[str, str]]:
    out = []
    for p in cmd.params:
        if getattr(p, "hidden", False):
            continue
        if _is_option(p):
            names = ", ".join(p.opts + p.secondary_opts)
            if not p.is_flag:
                names += " " + (getattr(p, "metavar", None) or (p.name or "value").upper())
            out.append((names, p.help or ""))
        else:
            out.append(((p.metavar or p.name or "").upper(), getattr(p, "help", "") or ""))
    return out


def man() -> str:
    root = tree()
    date = datetime.datetime.fromtimestamp(int(os.environ.get("SOURCE_DATE_EPOCH", "0")) or
                                           datetime.datetime.now().timestamp(), datetime.timezone.utc)
    out = [f'.TH SIPGUARD 8 "{date:%Y-%m-%d}" "sipguard {__version__}" "System Administration"',
           ".SH NAME", "sipguard \\- ban the sources that attack a Kamailio SIP server, from what Kamailio logs",
           ".SH SYNOPSIS", ".B sipguard", "[\\fIGLOBAL OPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
           ".SH DESCRIPTION", _roff(root.help or ""),
           ".PP", _roff("sipguard.service runs `sipguard run`: it follows Kamailio's log (a file or the journal "
                        "of kamailio.service), scores attacking sources with the filters in "
                        "/usr/lib/sipguard's filter directory and /etc/sipguard/filters.d, and bans them in "
                        "the kernel (ipset and an iptables hook chain, or nftables). The baseline firewall is "
                        "never applied by itself: `sipguard firewall apply --confirm-timeout 120`."),
           ".SH GLOBAL OPTIONS"]
    for names, help_ in _params(root):
        out += [".TP", f".B {_roff(names)}", _roff(help_)]
    out.append(".SH COMMANDS")
    for path, cmd in _commands(root):
        out += [".TP", f".B sipguard {_roff(' '.join(path))}", _roff(cmd.help or cmd.short_help or "")]
        for names, help_ in _params(cmd):
            if names == "--help":
                continue
            out += [".RS", ".TP", f".B {_roff(names)}", _roff(help_), ".RE"]
    out += [".SH FILES",
            ".TP", ".I /etc/sipguard/sipguard.toml", "The configuration (every option listed, commented out, "
            "with its default).",
            ".TP", ".I /etc/sipguard/filters.d/", "Local filters (TOML); they override shipped ones by name.",
            ".TP", ".I /var/lib/sipguard/", "State: the SQLite database of events and bans.",
            ".TP", ".I /usr/share/doc/sipguard/examples/", "Kamailio config with the log lines sipguard reads, "
            "rsyslog and journald snippets.",
            ".SH EXIT STATUS", "0 on success, 1 on an error (one line on standard error), 2 on a usage error.",
            ".SH SEE ALSO", ".BR kamailio (8),", ".BR iptables (8),", ".BR ipset (8),", ".BR nft (8),",
            ".BR journalctl (1)", ""]
    return "\n".join(out)


def bash() -> str:
    root = tree()
    cases = []
    top = [p[0] for (p, _c) in _commands(root) if len(p) == 1]
    groups = [p[0] for (p, c) in _commands(root) if len(p) == 1 and _is_group(c)]
    root_opts = [o for p in root.params if _is_option(p) for o in p.opts + p.secondary_opts]
    for path, cmd in _commands(root):
        words = []
        if _is_group(cmd):
            words += [p[-1] for (p, _c) in _commands(cmd) if len(p) == 1]
        words += [o for p in cmd.params if _is_option(p) for o in p.opts + p.secondary_opts]
        words.append("--help")
        cases.append(f'        "{" ".join(path)}") words="{" ".join(words)}" ;;')
    return f"""# bash completion for sipguard {__version__} (generated from the CLI by packaging/gen_docs.py)
_sipguard() {{
    local cur path="" w i words
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        case "$w" in -*) continue ;; esac
        case " {' '.join(top)} " in *" $w "*) path="$w"; continue ;; esac
        case " {' '.join(groups)} " in *" $path "*) [ -n "$path" ] && path="$path $w" ;; esac
    done
    case "$path" in
        "") words="{' '.join(top + root_opts)} --help" ;;
{chr(10).join(cases)}
        *) words="" ;;
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -o default -F _sipguard sipguard
"""


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what not in ("man", "bash"):
        sys.exit("usage: gen_docs.py man|bash")
    sys.stdout.write(man() if what == "man" else bash())
