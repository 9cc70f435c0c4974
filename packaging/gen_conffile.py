"""Write /etc/sipguard/sipguard.toml for the Debian package from the config model (sipguard/config.py).

Every option of every section is present, commented out, with its default and the comment the model
carries beside it; a file with every `# key = value` line uncommented loads to the same defaults
(tests/test_installed.py checks both). Defaults computed at start (the log sources, the shipped filter
directory, the node name) are shown as comments that say so, not as values.

    python packaging/gen_conffile.py > sipguard.toml
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from sipguard import __version__ as VERSION  # noqa: N812
from sipguard.config import BlocklistConfig, ClusterConfig, Config, JailConfig, OfficeConfig

# options whose default is decided when the daemon starts: shown, never written as a value
COMPUTED = {
    ("sources", "logs"): "chosen at start when no source is configured (see `sipguard status`): "
                         "/var/log/kamailio.log if it exists, else the journal of kamailio.service, "
                         "else /var/log/syslog",
    ("filters", "directories"): 'the shipped filters, then "/etc/sipguard/filters.d" (later ones override '
                                'earlier ones by name)',
    ("cluster", "node_name"): "this host's name",
}
EXAMPLES = {
    ("sources", "logs"): ["/var/log/kamailio.log"],
    ("filters", "directories"): ["/etc/sipguard/filters.d"],
    ("cluster", "redis_url"): "redis://127.0.0.1:6379/0",
    ("cluster", "node_name"): "sip1",
    ("blocklists", "name"): "spamhaus-drop",
    ("blocklists", "url"): "https://www.spamhaus.org/drop/drop.txt",
}


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, Path):
        v = str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if hasattr(v, "value"):  # an enum
        return toml_value(v.value)
    raise TypeError(f"no TOML form for {v!r}")


def field_comments(cls: type) -> dict[str, str]:
    """The `# ...` beside each field in the model's source (and comment-only lines right below it)."""
    out: dict[str, str] = {}
    last = None
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"^    (\w+): .*?  # (.*)$", line)
        if m:
            last = m.group(1)
            out[last] = m.group(2).strip()
            continue
        m = re.match(r"^    #\s+(.*)$", line)
        if m and last:
            out[last] += " " + m.group(1).strip()
            continue
        last = None
    return out


def _doc(cls: type) -> str:
    return inspect.getdoc(cls).splitlines()[0] if inspect.getdoc(cls) else ""


def section(name: str, model: type[BaseModel], values: dict[str, Any] | None, *, header: str | None = None,
            skip: tuple[str, ...] = ()) -> list[str]:
    out = ["", f"# {_doc(model)}", f"# {header or '[' + name + ']'}"]
    comments = field_comments(model)
    top = name.split(".")[0]
    for fname, field in model.model_fields.items():
        if field.exclude or fname in skip:
            continue
        note = comments.get(fname)
        key = (top, fname)
        if note:
            out.append(f"#   ({note})")
        if key in COMPUTED:
            out.append(f"#   default: {COMPUTED[key]}; e.g.")
            out.append(f"# {fname} = {toml_value(EXAMPLES[key])}")
            continue
        if values is not None:
            v = values[fname]
        elif field.is_required():
            ex = EXAMPLES.get(key)
            out.append(f"#   required{'; e.g.' if ex is not None else ''}")
            out.append(f"# {fname} = {toml_value(ex)}" if ex is not None else f"#   {fname}: required")
            continue
        else:
            v = field.get_default(call_default_factory=True)
        if v is None:
            out.append(f"#   {fname}: not set by default")
            continue
        out.append(f"# {fname} = {toml_value(v)}")
    return out


def render() -> str:
    cfg = Config()
    data = cfg.model_dump()
    lines = [
        f"# /etc/sipguard/sipguard.toml: sipguard {VERSION}'s configuration (TOML).",
        "#",
        "# Every option is listed with its default, commented out: an empty file behaves the same.",
        "# Uncomment and change what you need, then `sudo sipguard check-config` (or `sipguard status`)",
        "# and `sudo systemctl restart sipguard`. Durations take s/m/h/d/w suffixes (\"90s\", \"1h\", \"7d\").",
        "# Reference: /usr/share/doc/sipguard/README.md; examples: /usr/share/doc/sipguard/examples/.",
        "",
        "# Where the database and runtime files live (the unit sets $SIPGUARD_STATE_DIR, which wins).",
        '# state_dir = "/var/lib/sipguard"',
    ]
    for name, field in Config.model_fields.items():
        if name in ("state_dir", "path", "cluster", "blocklists"):
            continue
        model = field.annotation
        if name == "policy":
            # the jails are tables of their own: [policy.jails.NAME]
            lines += section("policy", model, data["policy"], skip=("jails", "office"))
            # the office policy: a table of its own, [policy.office]
            lines += section("policy", OfficeConfig, data["policy"]["office"], header="[policy.office]")
            for jname, jail in cfg.policy.jails.items():
                # a counting jail: the distinct-jail options (distinct, prefixes, max_values) do not apply to it
                only_distinct = () if jail.distinct is not None else ("distinct", "prefixes", "max_values")
                lines += section("policy", JailConfig, jail.model_dump(), header=f"[policy.jails.{jname}]",
                                 skip=only_distinct)
            lines += [
                "",
                "# A distinct jail counts distinct values of a named capture instead of events (none by default):",
                "# distinct destinations dialled per source is toll-fraud probing (README: fraud probes).",
                "# An example (remove the '## ' to use it; the options are those of the jails above, plus these):",
                "## [policy.jails.fraud]",
                '## kinds = ["dial", "probe"]',
                '## distinct = "dest"           # the capture counted; default none (a counting jail)',
                '## prefixes = ["+", "00"]      # only values starting so count; default [] (every value)',
                "## max_values = 100            # distinct values kept per source (default)",
                '## findtime = "1h"',
                "## threshold = 5",
            ]
            continue
        lines += section(name, model, data[name])
    lines += section("cluster", ClusterConfig, None)
    lines.append("#   (the whole [cluster] table is optional: without it the node runs standalone)")
    lines += section("blocklists", BlocklistConfig, None, header="[[blocklists]]")
    lines.append("#   (any number of [[blocklists]] tables; none by default)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
