"""One family's filter table as iptables-save shows it (`Table`), and moving tables in and out of the kernel.

`parse_save` reads iptables-save / iptables-restore text; `Table.dump` writes it back in a stable order;
`strip_sipguard` takes sipguard's hook chains and set matches out of a table; `canonical` spells rendered
rules the way iptables itself does (through a scratch network namespace); `restore_table` replaces one
family's filter table in one iptables-restore call. Only `restore_table` changes the current namespace's
tables; nothing here deletes ipsets or nftables tables of the enforcer.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field

from ..errors import SipguardError
from ..netfilter import Tools
from .tools import TIMEOUT, first_lines, run, unshare_works

BUILTIN = ("INPUT", "FORWARD", "OUTPUT")
OUR_CHAINS = ("CHECK_TCP", "ICMP", "PRIVATE", "PSD", "SERVICES")  # the chains the baseline templates define


@dataclass
class Table:
    """One family's filter table as iptables-save shows it: chain → (policy or None, rules)."""

    present: bool = False
    chains: dict[str, tuple[str | None, list[str]]] = field(default_factory=dict)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Table) and self.normal() == other.normal()

    def normal(self) -> dict[str, tuple[str | None, list[str]]]:
        """A missing table is a table of empty ACCEPT built-ins (that is what the kernel does)."""
        if self.present:
            return {k: (p, list(r)) for k, (p, r) in self.chains.items()}
        return {c: ("ACCEPT", []) for c in BUILTIN}

    def dump(self) -> str:
        """iptables-restore text, built-ins first, then the other chains sorted (stable for diffs)."""
        chains = self.normal()
        order = [c for c in BUILTIN if c in chains] + sorted(c for c in chains if c not in BUILTIN)
        lines = ["*filter"]
        lines += [f":{c} {chains[c][0] or '-'} [0:0]" for c in order]
        for c in order:
            lines += [f"-A {c} {r}" for r in chains[c][1]]
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"


def parse_save(text: str) -> Table:
    """Parse `iptables-save -t filter` (or restore text) output; ignores comments and counters."""
    t = Table()
    in_filter = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            in_filter = line == "*filter"
            t.present = t.present or in_filter
            continue
        if not in_filter:
            continue
        if line == "COMMIT":
            in_filter = False
        elif line.startswith(":"):
            name, policy = (line[1:].split() + ["-"])[:2]
            t.chains[name] = (None if policy == "-" else policy, t.chains.get(name, (None, []))[1])
        else:
            line = re.sub(r"^\[\d+:\d+\]\s+", "", line)
            m = re.match(r"^-A\s+(\S+)\s*(.*)$", line)
            if not m:
                raise SipguardError(f"cannot read this iptables rule: {line!r}")
            policy, rules = t.chains.setdefault(m.group(1), (None, []))
            rules.append(m.group(2))
    return t


def is_hook_chain(name: str, hook: str) -> bool:
    """The hook chain itself or one of its sub-chains (HOOK-..., HOOK_...): the enforcer's, never replaced."""
    return name == hook or name.startswith(hook + "-") or name.startswith(hook + "_")


def targets(rule: str) -> set[str]:
    """The chains or targets a rule jumps or goes to (-j / -g)."""
    return set(re.findall(r"(?:^|\s)-[jg]\s+(\S+)", rule))


def strip_sipguard(t: Table, hook: str, set_prefix: str) -> Table:
    """The table without sipguard's hook chains, jumps to them, or rules matching sipguard's sets."""
    if not t.present:
        return Table()
    out = Table(present=True)
    for name, (policy, rules) in t.chains.items():
        if is_hook_chain(name, hook):
            continue
        kept = [r for r in rules if not any(is_hook_chain(x, hook) for x in targets(r))
                and not re.search(rf"--match-set\s+{re.escape(set_prefix)}-", r)]
        out.chains[name] = (policy, kept)
    return out


def canonical(tools: Tools, fam: int, text: str) -> Table:
    """The rules as iptables itself spells them: loaded into a scratch network namespace, read back.

    This also validates them (a bad rule fails here, before the real table is touched). Without the
    privilege to create a namespace, the rendered text is used as it is.
    """
    if not unshare_works():
        return parse_save(text)
    r = run(["unshare", "--net", "sh", "-c", '"$0" && "$1" -t filter', tools.restore(fam), tools.save(fam)],
            input=text, check=False)
    if r.returncode != 0:
        raise SipguardError(f"the IPv{fam} rules were refused ({tools.restore(fam)}): {first_lines(r.stderr)}; "
                            "the firewall was left as it was")
    return parse_save(r.stdout)


def restore_table(tools: Tools, fam: int, table: Table) -> None:
    """Replace the filter table with `table` in one iptables-restore call (atomic)."""
    if table.present:
        text = table.dump()
    else:
        text = Table().dump()  # empty ACCEPT built-ins; a table that did not exist is then deleted below
    r = run([tools.restore(fam)], input=text, check=False)
    if r.returncode != 0:
        raise SipguardError(f"{tools.restore(fam)} failed: {first_lines(r.stderr or r.stdout)}")
    if not table.present and tools.flavour == "nft" and shutil.which("nft"):
        subprocess.run(["nft", "delete", "table", "ip" if fam == 4 else "ip6", "filter"],
                       capture_output=True, timeout=TIMEOUT)
