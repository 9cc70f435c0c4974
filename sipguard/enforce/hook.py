"""The iptables hook: one chain (SIPGUARD) jumped to first from INPUT (and FORWARD), whose rules
drop sources found in the sipguard ipsets.

The rules are defined once, as data (`RuleSpec`), and rendered two ways:
- iptables-restore text, applied with `iptables-restore --noflush` on hosts whose iptables is the
  nf_tables variant (one transaction per family);
- python-iptables (libiptc) Rule objects on legacy hosts, with autocommit off and one commit.

`IptablesHook.ensure()` compares what the kernel holds with what the specs say and rewrites only
when they differ, so calling it often is cheap and it repairs a deleted rule or jump.
Which flavour (nf_tables or legacy) and which binaries come from sipguard/netfilter.py, the same answer
the baseline firewall gets. Everything acts on the network namespace of the calling process.
"""

from __future__ import annotations

import logging
import re
import subprocess
from dataclasses import dataclass

from ..errors import SipguardError
from ..netfilter import Tools, choose_flavour, legacy_tables, tools_for

log = logging.getLogger("sipguard.enforce")

REJECT_WITH = {4: "icmp-port-unreachable", 6: "icmp6-port-unreachable"}


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """`-m set --match-set SET src -j TARGET` (no match when set is None)."""

    target: str
    match_set: str | None = None
    reject_with: str | None = None

    def restore_args(self) -> str:
        parts = []
        if self.match_set:
            parts.append(f"-m set --match-set {self.match_set} src")
        parts.append(f"-j {self.target}")
        if self.reject_with:
            parts.append(f"--reject-with {self.reject_with}")
        return " ".join(parts)

    def iptc_rule(self, version: int):  # -> iptc.Rule / iptc.Rule6
        import iptc

        rule = iptc.Rule() if version == 4 else iptc.Rule6()
        if self.match_set:
            m = rule.create_match("set")
            m.match_set = [self.match_set, "src"]
        rule.target = iptc.Target(rule, self.target)
        if self.reject_with:
            rule.target.reject_with = self.reject_with
        return rule

    @staticmethod
    def key_of_iptc(rule) -> str:
        """The restore_args text of a libiptc rule we could have written; '?' for anything else."""
        if rule.protocol not in (None, "ip", "all", "0") or rule.in_interface or rule.out_interface:
            return "?"
        if rule.src.split("/")[0] not in ("0.0.0.0", "::") or rule.dst.split("/")[0] not in ("0.0.0.0", "::"):
            return "?"
        parts = []
        for m in rule.matches:
            params = m.get_all_parameters()
            if m.name != "set" or list(params) != ["match-set"]:
                return "?"
            parts.append("-m set --match-set " + " ".join(params["match-set"]))
        tname = rule.target.name if rule.target else ""
        parts.append(f"-j {tname}")
        for k, v in rule.target.get_all_parameters().items() if rule.target else ():
            parts.append(f"--{k} " + " ".join(v))
        return " ".join(parts)


@dataclass(frozen=True)
class FamilyPlan:
    version: int  # 4 or 6
    chain: str
    rules: tuple[RuleSpec, ...]  # the chain's content, in order
    hooks: tuple[str, ...]  # built-in chains that must jump to `chain` first
    unhooks: tuple[str, ...]  # built-in chains that must not jump to it

    @property
    def jump(self) -> RuleSpec:
        return RuleSpec(self.chain)


def plans(chain: str, sets: dict[int, tuple[str, str]], action: str, hook_forward: bool) -> list[FamilyPlan]:
    """One plan per family; sets = {4: (ip set, net set), 6: (...)}."""
    out = []
    for version, names in sorted(sets.items()):
        rw = REJECT_WITH[version] if action == "REJECT" else None
        rules = tuple(RuleSpec(action, s, rw) for s in names)
        hooks = ("INPUT", "FORWARD") if hook_forward else ("INPUT",)
        unhooks = () if hook_forward else ("FORWARD",)
        out.append(FamilyPlan(version, chain, rules, hooks, unhooks))
    return out


@dataclass
class Observed:
    chain_exists: bool
    chain_rules: list[str]
    builtin: dict[str, list[str]]  # INPUT/FORWARD → rule keys in order


def problems(plan: FamilyPlan, seen: Observed) -> list[str]:
    """What is wrong, one short phrase per repair needed (empty: nothing to do)."""
    out = []
    want = [r.restore_args() for r in plan.rules]
    if not seen.chain_exists:
        out.append(f"chain {plan.chain} missing")
    elif seen.chain_rules != want:
        out.append(f"chain {plan.chain} rules differ")
    jump = plan.jump.restore_args()
    for hook in plan.hooks:
        keys = seen.builtin.get(hook, [])
        if not keys or keys[0] != jump or keys.count(jump) != 1:
            out.append(f"{hook} does not jump to {plan.chain} first")
    for hook in plan.unhooks:
        if jump in seen.builtin.get(hook, []):
            out.append(f"{hook} jumps to {plan.chain}")
    return out


# -- running iptables --------------------------------------------------------------------------
def _run(argv: list[str], stdin: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SipguardError(f"{argv[0]} not found: install iptables (or choose [enforce] backend = \"nftables\")") from None
    except subprocess.TimeoutExpired:
        raise SipguardError(f"{argv[0]} did not finish in {timeout:.0f}s") from None


# -- the hook ----------------------------------------------------------------------------------
class IptablesHook:
    """The hook chain and its jumps, in the flavour [enforce] iptables names ("auto": sipguard.netfilter's
    detection, the same the baseline firewall uses)."""

    def __init__(self, flavour: str, plans_: list[FamilyPlan]) -> None:
        self.flavour = choose_flavour(flavour)
        self.plans = plans_
        self._tools: Tools | None = None

    @property
    def tools(self) -> Tools:
        """The nf_tables variant's iptables-save / -restore (the legacy path goes through libiptc instead)."""
        if self._tools is None:
            self._tools = tools_for("nft")
        return self._tools

    def ensure(self) -> int:
        """Make every family's chain and jumps right; returns the number of repairs made."""
        repaired = 0
        for plan in self.plans:
            seen = self.observe(plan)
            wrong = problems(plan, seen)
            if wrong:
                log.info("iptables (%s, IPv%d): repairing: %s", self.flavour, plan.version, "; ".join(wrong))
                self.apply(plan, seen)
                repaired += len(wrong)
        return repaired

    def observe(self, plan: FamilyPlan) -> Observed:
        return self._observe_nft(plan) if self.flavour == "nft" else self._observe_iptc(plan)

    def apply(self, plan: FamilyPlan, seen: Observed) -> None:
        if self.flavour == "nft":
            self._apply_restore(plan, seen)
        else:
            self._apply_iptc(plan, seen)

    def remove(self) -> list[str]:
        """Take the hook out (jumps, then the chain); the sets stay. For uninstall and tests.

        A family without the chain or a jump to it is left untouched (on legacy, a family whose filter
        table does not exist is not even opened: libiptc would create it). One line per family changed.
        """
        done = []
        for plan in self.plans:
            if self.flavour == "legacy" and "filter" not in legacy_tables(plan.version):
                continue
            seen = self.observe(plan)
            jump = plan.jump.restore_args()
            if not seen.chain_exists and not any(jump in keys for keys in seen.builtin.values()):
                continue
            if self.flavour == "nft":
                lines = ["*filter"]
                for hook, keys in seen.builtin.items():
                    lines += [f"-D {hook} {jump}"] * keys.count(jump)
                if seen.chain_exists:
                    lines += [f"-F {plan.chain}", f"-X {plan.chain}"]
                lines.append("COMMIT")
                self._restore(plan.version, "\n".join(lines) + "\n")
            else:
                self._apply_iptc(plan, seen, remove=True)
            done.append(f"iptables hook {plan.chain} (IPv{plan.version}, {self.flavour}): removed")
        return done

    # -- nf_tables variant: iptables-save / iptables-restore --noflush ------------------------
    def _observe_nft(self, plan: FamilyPlan) -> Observed:
        tool = self.tools.save(plan.version)
        p = _run([tool, "-t", "filter"])
        if p.returncode != 0:
            raise SipguardError(f"{tool}: {(p.stderr or p.stdout).strip()}")
        seen = Observed(False, [], {"INPUT": [], "FORWARD": []})
        for ln in p.stdout.splitlines():
            if ln.startswith(f":{plan.chain} "):
                seen.chain_exists = True
            m = re.match(r"^-A (\S+) (.*)$", ln)
            if not m:
                continue
            chain, args = m.group(1), m.group(2).strip()
            if chain == plan.chain:
                seen.chain_rules.append(args)
            elif chain in seen.builtin:
                seen.builtin[chain].append(args)
        return seen

    def _apply_restore(self, plan: FamilyPlan, seen: Observed) -> None:
        jump = plan.jump.restore_args()
        lines = ["*filter", f":{plan.chain} - [0:0]"]  # declaring a chain with --noflush flushes it
        lines += [f"-A {plan.chain} {r.restore_args()}" for r in plan.rules]
        for hook in plan.hooks + plan.unhooks:
            lines += [f"-D {hook} {jump}"] * seen.builtin.get(hook, []).count(jump)
        for hook in plan.hooks:
            lines.append(f"-I {hook} 1 {jump}")
        lines.append("COMMIT")
        self._restore(plan.version, "\n".join(lines) + "\n")

    def _restore(self, version: int, text: str) -> None:
        tool = self.tools.restore(version)
        p = _run([tool, "--noflush"], stdin=text)
        if p.returncode != 0:
            raise SipguardError(f"{tool} failed (nothing changed): {(p.stderr or p.stdout).strip()}")

    # -- legacy: python-iptables, autocommit off, one commit -----------------------------------
    def _table(self, version: int):
        try:
            import iptc
        except Exception as exc:  # noqa: BLE001 - libiptc / xtables missing
            raise SipguardError(f"python-iptables cannot load libiptc: {exc}") from None
        try:
            table = iptc.Table(iptc.Table.FILTER) if version == 4 else iptc.Table6(iptc.Table6.FILTER)
            table.autocommit = False
            table.refresh()
        except Exception as exc:  # noqa: BLE001 - iptc raises its own error types
            raise SipguardError(f"iptables-legacy (IPv{version}) filter table: {exc}") from None
        return table

    def _observe_iptc(self, plan: FamilyPlan) -> Observed:
        import iptc

        table = self._table(plan.version)
        seen = Observed(table.is_chain(plan.chain), [], {})
        if seen.chain_exists:
            seen.chain_rules = [RuleSpec.key_of_iptc(r) for r in iptc.Chain(table, plan.chain).rules]
        for hook in ("INPUT", "FORWARD"):
            seen.builtin[hook] = [RuleSpec.key_of_iptc(r) for r in iptc.Chain(table, hook).rules]
        return seen

    def _apply_iptc(self, plan: FamilyPlan, seen: Observed, remove: bool = False) -> None:
        import iptc

        table = self._table(plan.version)
        jump = plan.jump.restore_args()
        try:
            for hook in ("INPUT", "FORWARD"):
                chain = iptc.Chain(table, hook)
                for rule in [r for r in chain.rules if RuleSpec.key_of_iptc(r) == jump]:
                    chain.delete_rule(rule)
            if remove:
                if table.is_chain(plan.chain):
                    iptc.Chain(table, plan.chain).flush()
                    table.delete_chain(plan.chain)
            else:
                if not table.is_chain(plan.chain):
                    table.create_chain(plan.chain)
                chain = iptc.Chain(table, plan.chain)
                chain.flush()
                for spec in plan.rules:
                    chain.append_rule(spec.iptc_rule(plan.version))
                for hook in plan.hooks:
                    iptc.Chain(table, hook).insert_rule(plan.jump.iptc_rule(plan.version), 0)
            table.commit()
        except Exception as exc:  # noqa: BLE001 - nothing is committed: drop the cached handle
            try:
                table.refresh()
            except Exception:  # noqa: BLE001
                pass
            raise SipguardError(f"iptables-legacy (IPv{plan.version}) failed (nothing changed): {exc}") from None
