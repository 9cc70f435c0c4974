"""The nftables enforcer: one table `inet sipguard` of its own, applied atomically with `nft -f -`.

    table inet sipguard {
        set v4   { type ipv4_addr; flags timeout; size MAXELEM; }
        set v6   { type ipv6_addr; flags timeout; size MAXELEM; }
        set net4 { type ipv4_addr; flags interval,timeout; size MAXELEM; }
        set net6 { type ipv6_addr; flags interval,timeout; size MAXELEM; }
        chain input { type filter hook input priority filter - 10; policy accept;
            ip saddr @v4 drop; ip saddr @net4 drop; ip6 saddr @v6 drop; ip6 saddr @net6 drop }
        (chain forward, the same, with [enforce] hook_forward)
    }

Every change is one `nft -f -` process (one kernel transaction) per call: a single ban costs
a few milliseconds, 100,000 bans well under a second. `nft` cuts its own netlink messages to size
(200,000 elements, IPv4 and IPv6, go in one `nft -f`). An element's timeout is the ban's remaining
time (no element = permanent); to replace the timeout of an element that may already be there,
the batch adds it bare, deletes it and adds it with the new timeout (all in one transaction).
A transaction is all or nothing, so when nft refuses a batch of additions for one element, the batch
is halved until the refused elements are found: they are logged once, counted (`SyncReport.failed`),
refused from then on, and everything else is armed. Deletions stay one transaction.
Interval sets refuse overlapping networks: a CIDR inside a banned one is left out of the kernel
(the outer one already drops it), and banning an outer one replaces the inner ones; after the outer
ban ends, `sync` (the daemon runs one each resync_interval) brings inner ones still banned back.

`drift` asks the kernel over netlink (`NftNetlink` below; `nft list` of a table, even `-t`, even of
one chain, loads every set element first: about a second for 200,000 elements): the table, its sets
and their flags, the chains' hooks and rules, and per set the element count against the ledger. A set
bigger than COUNT_LIMIT is counted every COUNT_EVERY seconds (the kernel's dump of a hash set slows
down with the square of its size: 0.2 s for 100,000 elements, 1.2 s for 200,000) and between counts
probed for a random sample of the elements it must hold (one request, about a millisecond).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from ..addresses import IPNetwork, address_text, classify, network, parse_target, range_target
from ..errors import SipguardError
from ..model import Ban
from .base import EnforcedEntry, Ledger, SyncReport, count_problem, kernel_timeout, needs_rearm

log = logging.getLogger("sipguard.enforce")

NFT_MAX_TIMEOUT = 10 * 365 * 86400  # longer bans are armed for 10 years and re-armed by sync
SETS = {(4, False): "v4", (6, False): "v6", (4, True): "net4", (6, True): "net6"}
WANT_SETS = {"v4": ["timeout", "ipv4_addr"], "v6": ["timeout", "ipv6_addr"],
             "net4": ["interval", "timeout", "ipv4_addr"], "net6": ["interval", "timeout", "ipv6_addr"]}
COUNT_LIMIT = 25_000  # a set up to this size is counted at every drift check (~40 ms at the limit)
COUNT_EVERY = 60.0  # seconds between counts of bigger sets
SAMPLE = 64  # elements probed per big set between counts
MAX_REMEMBERED = 10_000  # elements nft refused, remembered so they are not sent (and logged) again
# nft errors about the table or the kernel, not about one element: every element would fail the same way
WHOLE_BATCH_ERRORS = ("No such file or directory", "Operation not permitted", "Permission denied",
                      "Too many open files", "No space left", "Cannot allocate memory", "did not finish",
                      "nft not found")


def _timeout_s(ban: Ban, now: float) -> int | None:
    """Whole seconds to arm with (nft refuses large values given in ms); 0 = permanent; None = expired."""
    return kernel_timeout(ban, now, NFT_MAX_TIMEOUT)


class NftablesEnforcer:
    name = "nftables"

    def __init__(self, cfg) -> None:  # cfg: EnforceConfig
        self.cfg = cfg
        self.table = cfg.nft_table
        self.t = f"inet {self.table}"
        self.verdict = "drop" if cfg.action == "DROP" else "reject"
        self.hooks = ("input", "forward") if cfg.hook_forward else ("input",)
        self.ledger = Ledger(tuple(SETS.values()))
        self.kernel_refused: dict[str, str] = {}  # element -> why nft refused it
        self._ready = False
        self._nl: NftNetlink | None = None
        self._counted = 0.0  # when the big sets were last counted

    # -- plumbing ------------------------------------------------------------------------------
    def _nft(self, args: list[str], stdin: str | None = None, what: str = "nft") -> str:
        exe = shutil.which("nft")
        if exe is None:
            raise SipguardError("nft not found: install nftables or choose another [enforce] backend")
        try:
            p = subprocess.run([exe, *args], input=stdin, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            raise SipguardError(f"{what}: nft did not finish in 120s") from None
        if p.returncode != 0:
            msg = " ".join((p.stderr or p.stdout).strip().splitlines()[:2])
            raise SipguardError(f"{what} failed (nothing changed): {msg[:400]}")
        return p.stdout

    def _apply(self, script: list[str], what: str) -> None:
        if script:
            self._nft(["-f", "-"], "\n".join(script) + "\n", what)

    def _desired_rules(self) -> list[tuple[str, str]]:
        return [(name, self.verdict) for name in ("v4", "net4", "v6", "net6")]

    def _rule_text(self, set_name: str) -> str:
        proto = "ip" if set_name in ("v4", "net4") else "ip6"
        return f"{proto} saddr @{set_name} {self.verdict}"

    def _observe(self) -> tuple[dict[str, list[str]], dict[str, list[tuple[str, str]]] | None]:
        """(sets: name → flags, chains: name → [(set, verdict)]) or ({}, None) when no table."""
        try:
            out = self._nft(["-t", "-j", "list", "table", "inet", self.table], what="nft list")
        except SipguardError as exc:
            if "No such file or directory" in str(exc):
                return {}, None
            raise
        sets: dict[str, list[str]] = {}
        chains: dict[str, list[tuple[str, str]]] = {}
        hooked: dict[str, bool] = {}
        for obj in json.loads(out).get("nftables", []):
            if "set" in obj:
                s = obj["set"]
                sets[s["name"]] = sorted(s.get("flags", [])) + [s.get("type", "")]
            elif "chain" in obj:
                c = obj["chain"]
                chains[c["name"]] = []
                hooked[c["name"]] = c.get("hook") == c["name"] and c.get("prio") == -10
            elif "rule" in obj:
                r = obj["rule"]
                ref, verdict = "?", "?"
                for e in r.get("expr", []):
                    right = e.get("match", {}).get("right") if isinstance(e, dict) else None
                    if isinstance(right, str) and right.startswith("@"):
                        ref = right[1:]
                    for v in ("drop", "reject", "accept"):
                        if isinstance(e, dict) and v in e:
                            verdict = v
                chains.setdefault(r["chain"], []).append((ref, verdict))
        for name, ok in hooked.items():
            if not ok:
                chains[name] = [("?", "not hooked as expected")]
        return sets, chains

    def ensure(self) -> int:
        """Create / repair the table, sets and chains; returns the number of repairs made."""
        sets, chains = self._observe()
        wrong: list[str] = []
        if chains is None:
            wrong.append(f"table {self.t} missing")
            chains = {}
        want_sets = WANT_SETS
        for name, flags in want_sets.items():
            if name not in sets:
                wrong.append(f"set {name} missing")
            elif sets[name] != flags:
                raise SipguardError(f"nft set {self.t} {name} exists with {sets[name]}, sipguard needs {flags}: "
                                    f"delete it (nft delete table {self.t}) or change [enforce] nft_table")
        for hook in self.hooks:
            if chains.get(hook) != self._desired_rules():
                wrong.append(f"chain {hook} {'missing' if hook not in chains else 'rules differ'}")
        stale = [h for h in ("input", "forward") if h not in self.hooks and h in chains]
        wrong += [f"chain {h} not wanted" for h in stale]
        if wrong:
            log.info("nftables: repairing: %s", "; ".join(wrong))
            n = self.cfg.maxelem
            script = [f"add table {self.t}"]
            for name, flags in want_sets.items():
                typ = flags[-1]
                script.append(f"add set {self.t} {name} {{ type {typ}; flags {','.join(flags[:-1])}; size {n}; }}")
            for hook in self.hooks:
                script.append(f"add chain {self.t} {hook} {{ type filter hook {hook} priority filter - 10; "
                              "policy accept; }")
                script.append(f"flush chain {self.t} {hook}")
                script += [f"add rule {self.t} {hook} {self._rule_text(s)}" for s, _ in self._desired_rules()]
            script += [f"delete chain {self.t} {h}" for h in stale]
            self._apply(script, "nft: set up table")
        self._ready = True
        return len(wrong)

    def _ensure_once(self) -> None:
        if not self._ready:
            self.ensure()

    def _list_sets(self, names: tuple[str, ...] = ("v4", "v6", "net4", "net6")) -> dict[str, dict[str, float]]:
        """{set: {ip or cidr: seconds left (0 = permanent)}} as the kernel has them."""
        out: dict[str, dict[str, float]] = {n: {} for n in names}
        try:
            text = self._nft(["-j", "list", "table", "inet", self.table], what="nft list")
        except SipguardError as exc:
            if "No such file or directory" in str(exc):
                return out
            raise
        for obj in json.loads(text).get("nftables", []):
            s = obj.get("set")
            if not s or s.get("name") not in out:
                continue
            for el in s.get("elem", []):
                left: float = 0
                if isinstance(el, dict) and "elem" in el:
                    left = float(el["elem"].get("expires", 0) or 0)
                    if el["elem"].get("timeout") and not left:
                        left = 0.001  # about to expire
                    el = el["elem"]["val"]
                key = _elem_key(el)
                if key:
                    out[s["name"]][key] = left
        return out

    def _adds(self, set_name: str, items: list[tuple[str, int]]) -> list[str]:
        """add bare + delete + add with timeout: replaces any earlier timeout, in one transaction."""
        if not items:
            return []
        bare = ", ".join(ip for ip, _ in items)
        timed = ", ".join(ip if secs == 0 else f"{ip} timeout {secs}s" for ip, secs in items)
        return [f"add element {self.t} {set_name} {{ {bare} }}",
                f"delete element {self.t} {set_name} {{ {bare} }}",
                f"add element {self.t} {set_name} {{ {timed} }}"]

    def _deletes(self, set_name: str, ips: list[str]) -> list[str]:
        if not ips:
            return []
        return [f"delete element {self.t} {set_name} {{ {', '.join(ips)} }}"]

    @staticmethod
    def _net_ops(want: dict[str, int], kernel: dict[str, float], authoritative: bool) -> tuple[list[str], list[str]]:
        """(networks to arm, kernel networks to delete) keeping an interval set free of overlaps.

        A wanted network inside another wanted one is left out. With `authoritative` (sync) the
        kernel ends up holding exactly the outer wanted networks; otherwise kernel networks inside
        a wanted one are deleted and wanted ones inside a kept kernel network are left out.
        """
        outer: list[IPNetwork] = []
        for c in sorted(want, key=lambda c: network(c).prefixlen):
            n = network(c)
            if not any(n.subnet_of(o) for o in outer):  # type: ignore[arg-type]
                outer.append(n)
        knets = {c: network(c) for c in kernel}
        if authoritative:
            base: list = []
        else:
            base = [k for c, k in knets.items()
                    if not any(k != o and k.subnet_of(o) for o in outer)]  # type: ignore[arg-type]
        arm = [str(o) for o in outer if not any(o != b and o.subnet_of(b) for b in base)]  # type: ignore[arg-type]
        keep = set(arm) | {str(b) for b in base}
        delete = [c for c, k in knets.items() if str(k) not in keep]
        return arm, delete

    def _plan(self, want: dict[str, int], kernel_nets: dict[int, dict[str, float]]
              ) -> tuple[list[tuple[str, str]], list[tuple[str, str, int]]]:
        """(network deletions, additions (set, element, seconds)) that arm `want` (element → seconds,
        0 = permanent) beside what the kernel holds.

        nft checks interval overlaps against the kernel's current elements, not against deletions
        earlier in the same batch, so inner networks an outer ban replaces are deleted in a batch before.
        """
        pre: list[tuple[str, str]] = []
        adds: list[tuple[str, str, int]] = []
        for version in (4, 6):
            name = SETS[version, False]
            adds += [(name, ip, secs) for ip, secs in want.items() if classify(ip) == (version, False)]
            nets = {ip: secs for ip, secs in want.items() if classify(ip) == (version, True)}
            if nets:
                name = SETS[version, True]
                arm, delete = self._net_ops(nets, kernel_nets.get(version, {}), authoritative=False)
                pre += [(name, c) for c in delete]
                adds += [(name, c, nets[c]) for c in arm]
        return pre, adds

    def _delete_script(self, items: list[tuple[str, str]]) -> list[str]:
        by: dict[str, list[str]] = {}
        for name, key in items:
            by.setdefault(name, []).append(key)
        return [line for name, keys in by.items() for line in self._deletes(name, keys)]

    def _add_script(self, items: list[tuple[str, str, int]]) -> list[str]:
        by: dict[str, list[tuple[str, int]]] = {}
        for name, key, secs in items:
            by.setdefault(name, []).append((key, secs))
        return [line for name, keys in by.items() for line in self._adds(name, keys)]

    def _apply_adds(self, adds: list[tuple[str, str, int]], what: str) -> list[tuple[str, str, str]]:
        """Arm `adds` in one transaction; when nft refuses it for some elements, find them by halving
        and arm the rest. Returns the refused ones, [(set, element, why)]. An error about the table or
        the kernel (WHOLE_BATCH_ERRORS), or more refusals than halving can find cheaply, raises."""
        refused: list[tuple[str, str, str]] = []
        budget = [8 * len(adds) + 64]  # elements sent in all, at most

        def arm(part: list[tuple[str, str, int]]) -> None:
            budget[0] -= len(part)
            try:
                self._apply(self._add_script(part), what)
                return
            except SipguardError as exc:
                text = str(exc)
                if len(part) > 1 and (budget[0] < 0 or any(m in text for m in WHOLE_BATCH_ERRORS)):
                    raise
                if len(part) == 1:
                    if any(m in text for m in WHOLE_BATCH_ERRORS):
                        raise
                    refused.append((part[0][0], part[0][1], text.split("(nothing changed): ", 1)[-1][:200]))
                    return
            half = len(part) // 2
            arm(part[:half])
            arm(part[half:])

        if adds:
            arm(adds)
        return refused

    def _refused(self, refused: list[tuple[str, str]], by: str) -> int:
        """Remember and log (once per element) what nft or this backend refused; returns how many."""
        new = [(ip, why) for ip, why in refused if ip not in self.kernel_refused]
        for ip, why in refused:
            if len(self.kernel_refused) < MAX_REMEMBERED:
                self.kernel_refused[ip] = why
        if new:
            shown = ", ".join(f"{ip} ({why})" for ip, why in new[:5]) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
            log.warning("nftables: %s refused %d %s: %s; the others are armed", by, len(new),
                        "element" if len(new) == 1 else "elements", shown)
        return len(refused)

    def _wanted(self, bans: list[Ban], now: float) -> tuple[dict[str, int], list[tuple[str, str]]]:
        """(element → kernel timeout (s) of the bans still in force, [(element, why)] refused)."""
        want: dict[str, int] = {}
        refused: list[tuple[str, str]] = []
        for ban in bans:
            secs = _timeout_s(ban, now)
            if secs is None:
                continue
            why = self.kernel_refused.get(ban.ip)
            if why is None:
                try:
                    classify(ban.ip)
                except ValueError as exc:
                    why = f"not an address or CIDR ({exc})"
            if why is not None:
                refused.append((ban.ip, why))
                continue
            want[ban.ip] = secs
        return want, refused

    # -- Enforcer ------------------------------------------------------------------------------
    def refuses(self, ip: str) -> str | None:
        return self.kernel_refused.get(ip)  # interval sets hold every prefix, /0 included

    def ban(self, ban: Ban, now: float) -> None:
        self.ban_many([ban], now)

    def ban_many(self, bans: list[Ban], now: float) -> None:
        want, bad = self._wanted(bans, now)
        if bad:
            self._refused(bad, "sipguard")
        if not want:
            return
        self._ensure_once()
        kernel_nets: dict[int, dict[str, float]] = {}
        if any("/" in ip for ip in want):
            listed = self._list_sets(("net4", "net6"))
            kernel_nets = {4: listed["net4"], 6: listed["net6"]}
        pre, adds = self._plan(want, kernel_nets)
        self._apply(self._delete_script(pre), "nft: replace inner networks")
        for name, key in pre:
            self.ledger.drop(name, key)
        for name, key, secs in adds:
            self.ledger.put(name, key, secs, now)
        refused = self._apply_adds(adds, "nft: ban")
        for name, key, _ in refused:
            self.ledger.drop(name, key)
        if refused:
            self._refused([(key, why) for _, key, why in refused], "nft")

    def unban(self, ip: str) -> None:
        if ip in self.kernel_refused:  # never armed: nothing to lift
            return
        version, is_net = classify(ip)
        name = SETS[version, is_net]
        if is_net:
            if ip not in self._list_sets((name,))[name]:
                self.ledger.drop(name, ip)
                return
            script = self._deletes(name, [ip])
        else:  # add-then-delete: never fails on an absent element
            script = [f"add element {self.t} {name} {{ {ip} }}", f"delete element {self.t} {name} {{ {ip} }}"]
        try:
            self._apply(script, "nft: unban")
        except SipguardError as exc:
            if "No such file or directory" in str(exc):  # no table: nothing to lift
                self.ledger.drop(name, ip)
                return
            raise
        self.ledger.drop(name, ip)

    def sync(self, bans: list[Ban], now: float) -> SyncReport:
        want, bad = self._wanted(bans, now)
        failed = self._refused(bad, "sipguard") if bad else 0
        held: dict[str, dict[str, float | None]] = {name: {} for name in SETS.values()}
        for ip, secs in want.items():
            version, is_net = classify(ip)
            if not is_net:
                held[SETS[version, False]][ip] = None if secs == 0 else now + secs
        for version in (4, 6):  # the kernel holds the outer networks only
            nets = {ip: secs for ip, secs in want.items() if classify(ip) == (version, True)}
            arm, _ = self._net_ops(nets, {}, authoritative=True)
            held[SETS[version, True]] = {c: None if nets[c] == 0 else now + nets[c] for c in arm}
        self.ledger.reset(held)  # what the kernel must hold from now on, even when what follows fails
        repaired = self.ensure()
        kernel = self._list_sets()
        have: dict[str, float] = {}
        for d in kernel.values():
            have.update(d)
        add: dict[str, int] = {}
        added = rearmed = 0
        for ip, secs in want.items():
            if ip in have and not needs_rearm(have[ip], secs):
                continue
            add[ip] = secs
            if ip in have:
                rearmed += 1
            else:
                added += 1
        deletes: list[tuple[str, str]] = []
        adds: list[tuple[str, str, int]] = []
        removed = 0
        for version in (4, 6):
            name = SETS[version, False]
            stale = [ip for ip in kernel[name] if ip not in want]
            deletes += [(name, ip) for ip in stale]
            adds += [(name, ip, secs) for ip, secs in add.items() if classify(ip) == (version, False)]
            removed += len(stale)
            name = SETS[version, True]
            nets = {ip: secs for ip, secs in want.items() if classify(ip) == (version, True)}
            arm, delete = self._net_ops(nets, kernel[name], authoritative=True)
            covered = [c for c in nets if c not in arm and c in add]  # inside another banned network
            added -= sum(1 for c in covered if c not in have)
            rearmed -= sum(1 for c in covered if c in have)
            deletes += [(name, c) for c in delete]
            adds += [(name, c, nets[c]) for c in arm if c in add]
            removed += len(delete)
        self._apply(self._delete_script(deletes), "nft: sync (deletions)")
        refused = self._apply_adds(adds, "nft: sync")
        if refused:
            for name, key, _ in refused:
                self.ledger.drop(name, key)
            failed += self._refused([(key, why) for _, key, why in refused], "nft")
            added -= sum(1 for _, key, _ in refused if key not in have)
            rearmed -= sum(1 for _, key, _ in refused if key in have)
        if added or removed or repaired or rearmed or failed:
            log.info("nftables sync: +%d -%d, %d re-armed, %d repaired, %d refused", added, removed, rearmed,
                     repaired, failed)
        return SyncReport(added=max(0, added), removed=removed, repaired=repaired + rearmed, failed=failed)

    def drift(self, now: float) -> list[str]:
        """The table, sets, chains and rules are there as `ensure` makes them, and each set holds what
        the ledger expects: netlink reads only (see the module docstring)."""
        if not self.ledger.known:
            return ["the kernel was not synced yet"]
        try:
            if self._nl is None:
                self._nl = NftNetlink(self.table)
            return self._drift(self._nl, now)
        except OSError as exc:
            if self._nl is not None:
                self._nl.close()
                self._nl = None
            return [f"cannot read table {self.t}: {exc}"]

    def _drift(self, nl: NftNetlink, now: float) -> list[str]:
        if not nl.has_table():
            return [f"table {self.t} missing"]
        out: list[str] = []
        sets = nl.sets()
        for name, flags in WANT_SETS.items():
            if name not in sets:
                out.append(f"set {name} missing")
            elif sets[name] != ("interval" in flags, True):
                out.append(f"set {name} has other flags")
        chains, rules = nl.chains(), nl.rules()
        for hook in self.hooks:
            c = chains.get(hook)
            if c is None:
                out.append(f"chain {hook} missing")
            elif c.hook != hook or c.priority != -10:
                out.append(f"chain {hook} not hooked as expected")
            elif rules.get(hook, []) != self._desired_rules():
                out.append(f"chain {hook} rules differ")
        out += [f"chain {h} not wanted" for h in ("input", "forward") if h not in self.hooks and h in chains]
        count_all = now - self._counted >= COUNT_EVERY
        if count_all:
            self._counted = now
        for name, flags in WANT_SETS.items():
            if name not in sets:
                continue
            interval = "interval" in flags
            if count_all or interval or self.ledger.size(name) <= COUNT_LIMIT:
                wrong = count_problem(f"set {name}", nl.count(name, interval), self.ledger.bounds(name, now))
                if wrong:
                    out.append(wrong)
                continue
            probe = self.ledger.sample(name, SAMPLE, now)
            family = socket.AF_INET if name == "v4" else socket.AF_INET6
            found = nl.holds(name, [socket.inet_pton(family, ip) for ip in probe])
            if found < len(probe):
                out.append(f"set {name} lacks {probe[found]} (a sample of {len(probe)} it must hold)")
        return out

    def contains(self, ip: str) -> bool:
        """`nft get element inet TABLE SET { IP }` for the set `ip` belongs in: True when the kernel holds
        exactly that element (an interval set answers with the network that covers an address: only the
        same network counts)."""
        try:
            version, is_net = classify(ip)
        except ValueError as exc:
            raise SipguardError(f"{ip}: not an address or CIDR ({exc})") from None
        set_name = SETS[version, is_net]
        try:
            text = self._nft(["get", "element", "inet", self.table, set_name, f"{{ {ip} }}"],
                             what=f"nft get element {set_name}")
        except SipguardError as exc:
            if "No such file or directory" in str(exc):  # no such element, set or table
                return False
            raise
        m = re.search(r"elements = \{ ([^ ,}]+)", text)
        if m is None:
            return False
        try:
            return parse_target(m.group(1)) == parse_target(ip)
        except ValueError:
            return False

    def entries(self) -> list[EnforcedEntry]:
        out: dict[str, float] = {}
        for d in self._list_sets().values():
            out.update(d)
        return [EnforcedEntry(ip, t if t else None) for ip, t in sorted(out.items())]

    def close(self) -> None:
        if self._nl is not None:
            self._nl.close()
            self._nl = None

    def remove(self) -> list[str]:
        """Uninstall (not used by the daemon): delete the whole table when it exists.

        No nft, or a table that is not there (or cannot be listed), is skipped without a word; a failed
        delete is reported, not raised. One line when something was deleted or could not be.
        """
        if shutil.which("nft") is None:
            return []
        try:
            self._nft(["list", "table", "inet", self.table], what="nft list")
        except SipguardError:
            return []
        try:
            self._apply([f"delete table {self.t}"], "nft: delete table")
        except SipguardError as exc:
            return [f"nft table {self.t}: cannot delete: {exc}"]
        return [f"nft table {self.t}: deleted"]


def _elem_key(el: object) -> str | None:
    if isinstance(el, str):
        return address_text(el)
    if isinstance(el, dict) and "prefix" in el:
        p = el["prefix"]
        return str(network(f"{p['addr']}/{p['len']}"))
    if isinstance(el, dict) and "range" in el:
        lo, hi = el["range"]
        return range_target(lo, hi)
    return None


# -- reading the table over netlink (the drift check) -------------------------------------------
# NFT_MSG_GET* requests and dumps decoded with `struct`; set elements are counted, never decoded (what
# a count costs is the kernel's dump: see the module docstring). Read-only: no message sent here
# changes anything (the table is changed with `nft -f` only).
NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFPROTO_INET = 1
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 0x2, 0x3
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
SO_RCVBUFFORCE = 33

MSG_GETTABLE, MSG_GETCHAIN, MSG_GETRULE, MSG_GETSET, MSG_GETSETELEM = 1, 4, 7, 10, 13
TABLE_NAME = 1
CHAIN_TABLE, CHAIN_NAME, CHAIN_HOOK, CHAIN_POLICY, CHAIN_TYPE = 1, 3, 4, 5, 7
HOOK_HOOKNUM, HOOK_PRIORITY = 1, 2
RULE_TABLE, RULE_CHAIN, RULE_EXPRESSIONS = 1, 2, 4
LIST_ELEM = 1
EXPR_NAME, EXPR_DATA = 1, 2
LOOKUP_SET = 1
IMMEDIATE_DATA = 2
DATA_VERDICT = 2
VERDICT_CODE = 1
SET_TABLE, SET_NAME, SET_FLAGS = 1, 2, 3
SET_F_INTERVAL, SET_F_TIMEOUT = 0x4, 0x10
ELEM_LIST_TABLE, ELEM_LIST_SET, ELEM_LIST_ELEMENTS = 1, 2, 3
ELEM_KEY, ELEM_FLAGS = 1, 3
DATA_VALUE = 1
ELEM_F_INTERVAL_END = 0x1
HOOKS = {1: "input", 2: "forward"}  # NF_INET_LOCAL_IN, NF_INET_FORWARD
VERDICTS = {0: "drop", 1: "accept"}  # NF_DROP, NF_ACCEPT


def _attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * ((4 - n % 4) % 4)


def _str(kind: int, text: str) -> bytes:
    return _attr(kind, text.encode() + b"\0")


def _attrs(buf: bytes, offset: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
    end = len(buf) if end is None else end
    while offset + 4 <= end:
        n, kind = struct.unpack_from("=HH", buf, offset)
        if n < 4:
            break
        yield kind & NLA_TYPE_MASK, buf[offset + 4: offset + n]
        offset += (n + 3) & ~3


def _count_children(buf: bytes) -> int:
    """How many LIST_ELEM attributes `buf` nests (walks the lengths only, decodes nothing)."""
    n = off = 0
    end = len(buf)
    unpack = struct.unpack_from
    while off + 4 <= end:
        length, kind = unpack("=HH", buf, off)
        if length < 4:
            break
        n += (kind & NLA_TYPE_MASK) == LIST_ELEM
        off += (length + 3) & ~3
    return n


def _text(val: bytes) -> str:
    return val.split(b"\0", 1)[0].decode(errors="replace")


class NftNetlinkError(OSError):
    def __init__(self, code: int, what: str) -> None:
        self.code = code
        super().__init__(code, f"{what}: {os.strerror(code)}")


@dataclass(frozen=True, slots=True)
class ChainInfo:
    name: str
    hook: str | None  # "input" / "forward" / None (not a base chain)
    priority: int | None


class NftNetlink:
    """One NETLINK_NETFILTER socket in the current network namespace, for reading one inet table."""

    def __init__(self, table: str) -> None:
        self.table = table
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except OSError as exc:
            raise NftNetlinkError(exc.errno or errno.EPROTONOSUPPORT, "netfilter netlink socket") from None
        self.sock.bind((0, 0))
        self.sock.settimeout(30.0)
        for opt in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, opt, 8 << 20)
                break
            except OSError:
                continue
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def _ask(self, msg: int, attrs: bytes, what: str, dump: bool = True) -> Iterator[bytes]:
        """Attribute bytes (after nfgenmsg) of each answer, until DONE / ACK; errors raise."""
        self.seq += 1
        seq = self.seq
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else NLM_F_ACK)
        body = struct.pack("=BBH", NFPROTO_INET, 0, 0) + attrs
        self.sock.send(struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_NFTABLES << 8) | msg, flags, seq, 0) + body)
        while True:
            data = self.sock.recv(1 << 20)
            off = 0
            while off + 16 <= len(data):
                length, mtype, _flags, mseq, _pid = struct.unpack_from("=IHHII", data, off)
                if length < 16:
                    return
                payload = data[off + 16: off + length]
                off += (length + 3) & ~3
                if mseq != seq:
                    continue
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload, 0)[0]
                    if code:
                        raise NftNetlinkError(code, what)
                    return
                if mtype == NLMSG_DONE:
                    return
                yield payload[4:]

    def _mine(self, attrs: bytes, table_attr: int) -> dict[int, bytes] | None:
        """The top-level attributes of an answer, None when it is about another table."""
        found = dict(_attrs(attrs))
        return found if _text(found.get(table_attr, b"")) == self.table else None

    def has_table(self) -> bool:
        try:
            for _ in self._ask(MSG_GETTABLE, _str(TABLE_NAME, self.table), f"nft table {self.table}", dump=False):
                pass
        except NftNetlinkError as exc:
            if exc.code == errno.ENOENT:
                return False
            raise
        return True

    def sets(self) -> dict[str, tuple[bool, bool]]:
        """{set name: (interval, timeout)} of the table."""
        out: dict[str, tuple[bool, bool]] = {}
        for msg in self._ask(MSG_GETSET, _str(SET_TABLE, self.table), "nft list sets"):
            a = self._mine(msg, SET_TABLE)
            if a is None or SET_NAME not in a:
                continue
            flags = struct.unpack(">I", a[SET_FLAGS][:4])[0] if SET_FLAGS in a else 0
            out[_text(a[SET_NAME])] = (bool(flags & SET_F_INTERVAL), bool(flags & SET_F_TIMEOUT))
        return out

    def chains(self) -> dict[str, ChainInfo]:
        out: dict[str, ChainInfo] = {}
        for msg in self._ask(MSG_GETCHAIN, _str(CHAIN_TABLE, self.table), "nft list chains"):
            a = self._mine(msg, CHAIN_TABLE)
            if a is None or CHAIN_NAME not in a:
                continue
            hook = prio = None
            if CHAIN_HOOK in a:
                h = dict(_attrs(a[CHAIN_HOOK]))
                if HOOK_HOOKNUM in h:
                    hook = HOOKS.get(struct.unpack(">I", h[HOOK_HOOKNUM][:4])[0], "other")
                if HOOK_PRIORITY in h:
                    prio = struct.unpack(">i", h[HOOK_PRIORITY][:4])[0]
            name = _text(a[CHAIN_NAME])
            out[name] = ChainInfo(name, hook, prio)
        return out

    def rules(self) -> dict[str, list[tuple[str, str]]]:
        """{chain: [(set looked up or "?", verdict: drop / accept / reject / "?")]} in rule order."""
        out: dict[str, list[tuple[str, str]]] = {}
        for msg in self._ask(MSG_GETRULE, _str(RULE_TABLE, self.table), "nft list rules"):
            a = self._mine(msg, RULE_TABLE)
            if a is None or RULE_CHAIN not in a:
                continue
            ref, verdict = "?", "?"
            for kind, elem in _attrs(a.get(RULE_EXPRESSIONS, b"")):
                if kind != LIST_ELEM:
                    continue
                e = dict(_attrs(elem))
                name, data = _text(e.get(EXPR_NAME, b"")), e.get(EXPR_DATA, b"")
                if name == "lookup":
                    ref = _text(dict(_attrs(data)).get(LOOKUP_SET, b"?"))
                elif name == "reject":
                    verdict = "reject"
                elif name == "immediate":
                    v = dict(_attrs(dict(_attrs(data)).get(IMMEDIATE_DATA, b""))).get(DATA_VERDICT)
                    code = dict(_attrs(v)).get(VERDICT_CODE) if v else None
                    if code is not None:
                        verdict = VERDICTS.get(struct.unpack(">i", code[:4])[0], "?")
            out.setdefault(_text(a[RULE_CHAIN]), []).append((ref, verdict))
        return out

    def count(self, set_name: str, interval: bool) -> int:
        """Elements of a set the kernel lists (expired ones are not); an interval set counts each range once
        (its end elements are not counted)."""
        n = 0
        attrs = _str(ELEM_LIST_TABLE, self.table) + _str(ELEM_LIST_SET, set_name)
        for msg in self._ask(MSG_GETSETELEM, attrs, f"nft list set {set_name}"):
            for kind, val in _attrs(msg):
                if kind != ELEM_LIST_ELEMENTS:
                    continue
                if not interval:
                    n += _count_children(val)
                    continue
                for k, elem in _attrs(val):
                    if k != LIST_ELEM:
                        continue
                    flags = dict(_attrs(elem)).get(ELEM_FLAGS)
                    if not (flags and struct.unpack(">I", flags[:4])[0] & ELEM_F_INTERVAL_END):
                        n += 1
        return n

    def holds(self, set_name: str, keys: list[bytes]) -> int:
        """How many of `keys` (packed addresses) the set holds before the first it lacks (len(keys): all).

        One request: the kernel answers each element it finds and stops at the first it does not.
        """
        elems = b"".join(_attr(LIST_ELEM | NLA_F_NESTED, _attr(ELEM_KEY | NLA_F_NESTED, _attr(DATA_VALUE, k))) for k in keys)
        attrs = _str(ELEM_LIST_TABLE, self.table) + _str(ELEM_LIST_SET, set_name) + \
            _attr(ELEM_LIST_ELEMENTS | NLA_F_NESTED, elems)
        found = 0
        try:
            for _ in self._ask(MSG_GETSETELEM, attrs, f"nft get element {set_name}", dump=False):
                found += 1
        except NftNetlinkError as exc:
            if exc.code != errno.ENOENT:
                raise
            return found
        return len(keys)
