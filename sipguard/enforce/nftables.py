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
a few milliseconds, 100,000 bans well under a second. An element's timeout is the ban's remaining
time (no element = permanent); to replace the timeout of an element that may already be there,
the batch adds it bare, deletes it and adds it with the new timeout (all in one transaction).
Interval sets refuse overlapping networks: a CIDR inside a banned one is left out of the kernel
(the outer one already drops it), and banning an outer one replaces the inner ones; after the outer
ban ends, `sync` (the daemon runs one each resync_interval) brings inner ones still banned back.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess

from ..addresses import IPNetwork, address_text, classify, network, range_target
from ..errors import SipguardError
from ..model import Ban
from .base import EnforcedEntry, SyncReport, kernel_timeout, needs_rearm

log = logging.getLogger("sipguard.enforce")

NFT_MAX_TIMEOUT = 10 * 365 * 86400  # longer bans are armed for 10 years and re-armed by sync
SETS = {(4, False): "v4", (6, False): "v6", (4, True): "net4", (6, True): "net6"}


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
        self._ready = False

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
        want_sets = {"v4": ["timeout", "ipv4_addr"], "v6": ["timeout", "ipv6_addr"],
                     "net4": ["interval", "timeout", "ipv4_addr"], "net6": ["interval", "timeout", "ipv6_addr"]}
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

    def _script(self, want: dict[str, int], kernel_nets: dict[int, dict[str, float]]) -> tuple[list[str], list[str]]:
        """(network deletions, the batch) that arm `want` (ip → ms, 0 = permanent).

        nft checks interval overlaps against the kernel's current elements, not against deletions
        earlier in the same batch, so inner networks an outer ban replaces go in a batch before.
        """
        pre: list[str] = []
        script: list[str] = []
        for version in (4, 6):
            single = [(ip, ms) for ip, ms in want.items() if classify(ip) == (version, False)]
            script += self._adds(SETS[version, False], single)
            nets = {ip: ms for ip, ms in want.items() if classify(ip) == (version, True)}
            if nets:
                arm, delete = self._net_ops(nets, kernel_nets.get(version, {}), authoritative=False)
                pre += self._deletes(SETS[version, True], delete)
                script += self._adds(SETS[version, True], [(c, nets[c]) for c in arm])
        return pre, script

    # -- Enforcer ------------------------------------------------------------------------------
    def refuses(self, ip: str) -> str | None:
        return None  # interval sets hold every prefix, /0 included

    def ban(self, ban: Ban, now: float) -> None:
        self.ban_many([ban], now)

    def ban_many(self, bans: list[Ban], now: float) -> None:
        want = _wanted(bans, now)
        if not want:
            return
        self._ensure_once()
        kernel_nets: dict[int, dict[str, float]] = {}
        if any("/" in ip for ip in want):
            listed = self._list_sets(("net4", "net6"))
            kernel_nets = {4: listed["net4"], 6: listed["net6"]}
        pre, script = self._script(want, kernel_nets)
        self._apply(pre, "nft: replace inner networks")
        self._apply(script, "nft: ban")

    def unban(self, ip: str) -> None:
        version, is_net = classify(ip)
        name = SETS[version, is_net]
        if is_net:
            if ip not in self._list_sets((name,))[name]:
                return
            script = self._deletes(name, [ip])
        else:  # add-then-delete: never fails on an absent element
            script = [f"add element {self.t} {name} {{ {ip} }}", f"delete element {self.t} {name} {{ {ip} }}"]
        try:
            self._apply(script, "nft: unban")
        except SipguardError as exc:
            if "No such file or directory" in str(exc):  # no table: nothing to lift
                return
            raise

    def sync(self, bans: list[Ban], now: float) -> SyncReport:
        repaired = self.ensure()
        kernel = self._list_sets()
        want = _wanted(bans, now)
        have: dict[str, float] = {}
        for d in kernel.values():
            have.update(d)
        add: dict[str, int] = {}
        added = rearmed = 0
        for ip, ms in want.items():
            if ip in have and not needs_rearm(have[ip], ms):
                continue
            add[ip] = ms
            if ip in have:
                rearmed += 1
            else:
                added += 1
        pre: list[str] = []
        script: list[str] = []
        removed = 0
        for version in (4, 6):
            name = SETS[version, False]
            stale = [ip for ip in kernel[name] if ip not in want]
            script += self._deletes(name, stale)
            script += self._adds(name, [(ip, ms) for ip, ms in add.items() if classify(ip) == (version, False)])
            removed += len(stale)
            name = SETS[version, True]
            nets = {ip: ms for ip, ms in want.items() if classify(ip) == (version, True)}
            arm, delete = self._net_ops(nets, kernel[name], authoritative=True)
            covered = [c for c in nets if c not in arm and c in add]  # inside another banned network
            added -= sum(1 for c in covered if c not in have)
            rearmed -= sum(1 for c in covered if c in have)
            pre += self._deletes(name, delete)
            script += self._adds(name, [(c, nets[c]) for c in arm if c in add])
            removed += len(delete)
        self._apply(pre, "nft: sync (networks)")
        self._apply(script, "nft: sync")
        if added or removed or repaired or rearmed:
            log.info("nftables sync: +%d -%d, %d re-armed, %d repaired", added, removed, rearmed, repaired)
        return SyncReport(added=max(0, added), removed=removed, repaired=repaired + rearmed)

    def entries(self) -> list[EnforcedEntry]:
        out: dict[str, float] = {}
        for d in self._list_sets().values():
            out.update(d)
        return [EnforcedEntry(ip, t if t else None) for ip, t in sorted(out.items())]

    def close(self) -> None:
        pass

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


def _wanted(bans: list[Ban], now: float) -> dict[str, int]:
    """address → kernel timeout (s) of the bans still in force; classify() rejects a bad address."""
    want: dict[str, int] = {}
    for ban in bans:
        secs = _timeout_s(ban, now)
        if secs is not None:
            classify(ban.ip)
            want[ban.ip] = secs
    return want
