"""The ipset enforcer: bans live in kernel ipsets with per-entry timeouts; one iptables hook chain
drops what they hold.

Sets (PREFIX = [enforce] set_prefix):
  PREFIX-v4 hash:ip inet, PREFIX-v6 hash:ip inet6     single addresses
  PREFIX-net4 hash:net inet, PREFIX-net6 hash:net inet6  CIDR bans
all created with `timeout 0` (entries carry their own timeout; 0 = permanent) and maxelem.

An entry's timeout is the ban's remaining time, so the kernel lifts it on time even when the
daemon is down; bans longer than the kernel cap (IPSET_MAX_TIMEOUT, ~24.8 days) are armed with
the cap and re-armed by `sync`. Single bans are one netlink message (pyroute2 IPSet); batches
are ipset's bulk messages (ipsetnl), cut by size. The sets and the hook are created on first use.

What an ipset cannot hold is refused, never raised from a batch: a /0 (hash:net takes prefixes 1 to
32 / 128), the null address (hash:ip refuses 0.0.0.0 and ::), and any entry the kernel refused once
(logged once, counted in `SyncReport.failed`, left out from then on); everything else is applied.
`drift` reads the sets' headers (member counts) and the hook rules: one iptables-save per family on
nf_tables hosts, no dump (a header counting more than expected may be expired entries the kernel's
garbage collector has not reached, which on a big set takes up to a minute or two: that set is then
listed, at most once a minute, before it is called drift).
"""

from __future__ import annotations

import errno
import logging
import socket

from ..errors import SipguardError
from ..addresses import classify
from ..model import Ban
from ..netfilter import has_iptables
from .base import IPSET_MAX_TIMEOUT, EnforcedEntry, Ledger, SyncReport, count_problem, kernel_timeout, needs_rearm
from .hook import IptablesHook, plans, problems
from .ipsetnl import SET_ERRORS, IpsetNetlink, IpsetNetlinkError

MAX_REMEMBERED = 10_000  # entries the kernel refused, remembered so they are not sent (and logged) again
RECOUNT_EVERY = 60.0  # seconds: a set's header counting more than expected is checked by a listing this often

log = logging.getLogger("sipguard.enforce")


class IpsetEnforcer:
    name = "ipset"

    def __init__(self, cfg) -> None:  # cfg: EnforceConfig
        self.cfg = cfg
        p = cfg.set_prefix
        self.sets = {
            (4, False): f"{p}-v4", (6, False): f"{p}-v6",
            (4, True): f"{p}-net4", (6, True): f"{p}-net6",
        }
        self.maxelem = cfg.maxelem
        self.ledger = Ledger(tuple(self.sets.values()))
        self.kernel_refused: dict[str, str] = {}  # entry -> why the kernel refused it
        self._listed: dict[str, float] = {}  # set -> when drift last listed it
        self._ready = False
        self._nl: IpsetNetlink | None = None
        self._ipset = None  # pyroute2 IPSet, opened on first use
        self._hook: IptablesHook | None = None

    # -- plumbing ------------------------------------------------------------------------------
    @property
    def nl(self) -> IpsetNetlink:
        if self._nl is None:
            try:
                self._nl = IpsetNetlink()
                self._nl.protocol()
            except OSError as exc:
                self._nl = None
                raise SipguardError(f"ipset: the kernel has no usable ip_set support ({exc}); "
                                    "load it (modprobe ip_set) or set [enforce] backend = \"nftables\"") from None
        return self._nl

    @property
    def ipset(self):
        if self._ipset is None:
            from pyroute2 import IPSet

            self.nl  # noqa: B018 - a clear error first when ip_set is missing
            try:
                self._ipset = IPSet()
            except Exception as exc:  # noqa: BLE001
                raise SipguardError(f"ipset: cannot open netlink: {exc}") from None
        return self._ipset

    @property
    def hook(self) -> IptablesHook:
        if self._hook is None:
            sets = {4: (self.sets[4, False], self.sets[4, True]), 6: (self.sets[6, False], self.sets[6, True])}
            self._hook = IptablesHook(self.cfg.iptables, plans(self.cfg.chain, sets, self.cfg.action,
                                                                 self.cfg.hook_forward))
        return self._hook

    def refuses(self, ip: str) -> str | None:
        """Why an ipset cannot hold `ip`: a /0 (hash:net takes prefixes 1 to 32 / 128), the null address
        (hash:ip refuses it), an entry the kernel refused before; None when it can."""
        if ip.endswith("/0"):
            return "an ipset cannot hold a /0 network"
        if ip in ("0.0.0.0", "::"):
            return "an ipset cannot hold the null address"
        return self.kernel_refused.get(ip)  # (the kernel refused it before)

    def _set_of(self, ip: str) -> tuple[str, int, bool]:
        why = self.refuses(ip)
        if why is not None:
            raise SipguardError(f"{ip}: {why.removeprefix('an ')}")
        try:
            version, is_net = classify(ip)
        except ValueError as exc:
            raise SipguardError(f"{ip}: not an address or CIDR ({exc})") from None
        return self.sets[version, is_net], version, is_net

    def _sorted(self, bans: list[Ban], now: float) -> tuple[dict[str, list[tuple[str, int]]], list[tuple[str, str]]]:
        """({set: [(entry, kernel timeout)]} of the bans still in force, [(entry, why)] refused here)."""
        groups: dict[str, list[tuple[str, int]]] = {n: [] for n in self.sets.values()}
        refused: list[tuple[str, str]] = []
        for ban in bans:
            timeout = kernel_timeout(ban, now, IPSET_MAX_TIMEOUT)
            if timeout is None:
                continue
            try:
                name = self._set_of(ban.ip)[0]
            except SipguardError as exc:
                refused.append((ban.ip, str(exc).removeprefix(f"{ban.ip}: ")))
                continue
            groups[name].append((ban.ip, timeout))
        return groups, refused

    def _refused(self, name: str | None, failed: list[tuple[str, str]], by: str) -> int:
        """Remember and log (once per entry) what `by` (the kernel, or this backend) refused in set `name`;
        returns how many."""
        new = [(ip, why) for ip, why in failed if ip not in self.kernel_refused]
        for ip, why in failed:
            if name is not None:
                self.ledger.drop(name, ip)
            if len(self.kernel_refused) < MAX_REMEMBERED:
                self.kernel_refused[ip] = why
        if new:
            shown = ", ".join(f"{ip} ({why})" for ip, why in new[:5]) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
            log.warning("ipset%s: %s refused %d %s: %s; the others are applied", f" {name}" if name else "", by,
                        len(new), "entry" if len(new) == 1 else "entries", shown)
        return len(failed)

    def ensure(self) -> int:
        """Create missing sets, then fix the hook; returns the number of repairs made.

        When the hook cannot be set up, sets created here are destroyed again (nothing changes).
        """
        repaired = 0
        created: list[str] = []
        for (version, is_net), name in self.sets.items():
            try:
                head = self.nl.header(name)
            except IpsetNetlinkError as exc:
                raise SipguardError(f"ipset {name}: {exc}") from None
            stype = "hash:net" if is_net else "hash:ip"
            family = socket.AF_INET if version == 4 else socket.AF_INET6
            if head is None:
                try:
                    self.ipset.create(name, stype=stype, family=family, exclusive=False, timeout=0,
                                      maxelem=self.maxelem)
                except Exception as exc:  # noqa: BLE001 - pyroute2 raises its own types
                    self._undo(created)
                    raise SipguardError(f"cannot create ipset {name} ({stype}): {exc}") from None
                created.append(name)
                repaired += 1
                continue
            if head.typename != stype or head.family != family or not head.timeout:
                self._undo(created)
                raise SipguardError(
                    f"ipset {name} exists as {head.typename} family {'inet6' if head.family == 10 else 'inet'}"
                    f"{'' if head.timeout else ' without timeout support'}; sipguard needs {stype} "
                    f"family {'inet' if version == 4 else 'inet6'} timeout 0: destroy it or change [enforce] set_prefix")
            if head.maxelem and head.maxelem != self.maxelem:
                log.warning("ipset %s has maxelem %d, config says %d (re-create the set to change it)",
                            name, head.maxelem, self.maxelem)
        try:
            repaired += self.hook.ensure()
        except SipguardError:
            self._undo(created)
            raise
        self._ready = True
        return repaired

    def _undo(self, created: list[str]) -> None:
        for name in created:
            try:
                self.ipset.destroy(name)
            except Exception:  # noqa: BLE001
                log.warning("could not destroy ipset %s again", name)

    def _ensure_once(self) -> None:
        if not self._ready:
            self.ensure()

    # -- Enforcer ------------------------------------------------------------------------------
    def ban(self, ban: Ban, now: float) -> None:
        timeout = kernel_timeout(ban, now, IPSET_MAX_TIMEOUT)
        if timeout is None:
            return
        name, version, is_net = self._set_of(ban.ip)
        self._ensure_once()
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        self.ledger.put(name, ban.ip, timeout, now)
        for attempt in (1, 2):
            try:
                self.ipset.add(name, ban.ip, family=family, exclusive=False, timeout=timeout,
                               etype="net" if is_net else "ip")
                return
            except Exception as exc:  # noqa: BLE001
                code = getattr(exc, "code", None)
                if attempt == 1 and code == errno.ENOENT:  # somebody destroyed the set: re-create
                    self._ready = False
                    self.ensure()
                    continue
                if code is not None and code not in SET_ERRORS:  # this entry: the kernel will not hold it
                    self._refused(name, [(ban.ip, _reason(exc))], "the kernel")
                raise SipguardError(f"ipset add {name} {ban.ip}: {_reason(exc)}") from None

    def ban_many(self, bans: list[Ban], now: float) -> None:
        groups, refused = self._sorted(bans, now)
        if refused:
            self._refused(None, refused, "sipguard")
        if not any(groups.values()):
            return
        self._ensure_once()
        for name, entries in groups.items():
            if not entries:
                continue
            head = self.nl.header(name)
            if head is not None and head.elements + len(entries) > (head.maxelem or self.maxelem):
                current = self.nl.dump(name)
                new = sum(1 for ip, _ in entries if ip not in current)
                if head.elements + new > (head.maxelem or self.maxelem):
                    raise SipguardError(f"ipset {name} would hold {head.elements + new} entries, more than its "
                                        f"maxelem {head.maxelem}: raise [enforce] maxelem (and re-create the set)")
        done: list[tuple[str, list[tuple[str, int]]]] = []
        for name, entries in groups.items():
            if not entries:
                continue
            for ip, t in entries:
                self.ledger.put(name, ip, t, now)
            try:
                result = self.nl.adt_many(name, entries)
            except IpsetNetlinkError as exc:
                for n, sent in done + [(name, entries)]:  # best effort: take this batch out again
                    try:
                        self.nl.adt_many(n, sent, delete=True)
                    except OSError:
                        pass
                    for ip, _ in sent:
                        self.ledger.drop(n, ip)
                raise SipguardError(f"ipset add to {name}: {exc}") from None
            if result.failed:
                self._refused(name, result.failed, "the kernel")
            done.append((name, entries))

    def unban(self, ip: str) -> None:
        if self.refuses(ip) is not None:  # never in a set: nothing to lift
            return
        name, version, is_net = self._set_of(ip)
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        try:
            self.ipset.delete(name, ip, family=family, exclusive=False, etype="net" if is_net else "ip")
        except Exception as exc:  # noqa: BLE001
            if getattr(exc, "code", None) in (errno.ENOENT, 4103):  # no set / not in it: nothing to lift
                self.ledger.drop(name, ip)
                return
            raise SipguardError(f"ipset del {name} {ip}: {_reason(exc)}") from None
        self.ledger.drop(name, ip)

    def sync(self, bans: list[Ban], now: float) -> SyncReport:
        groups, refused = self._sorted(bans, now)
        failed = self._refused(None, refused, "sipguard") if refused else 0
        # what the kernel must hold from now on, even when what follows fails (drift then retries)
        self.ledger.reset({name: {ip: (None if t == 0 else now + t) for ip, t in entries}
                           for name, entries in groups.items()})
        repaired = self.ensure()
        kernel = self._dump()
        add: dict[str, list[tuple[str, int]]] = {}
        added = rearmed = 0
        wanted: set[str] = set()
        for name, entries in groups.items():
            for ip, t in entries:
                wanted.add(ip)
                have = kernel.get(ip)
                if have is not None and not needs_rearm(have, t):
                    continue
                if have is None:
                    added += 1
                else:
                    rearmed += 1
                add.setdefault(name, []).append((ip, t))
        remove: dict[str, list[tuple[str, None]]] = {}
        for ip in kernel.keys() - wanted:
            try:
                name = self.sets[classify(ip)]
            except ValueError:
                continue
            remove.setdefault(name, []).append((ip, None))
        try:
            for name, entries in add.items():
                result = self.nl.adt_many(name, entries)
                if result.failed:
                    failed += self._refused(name, result.failed, "the kernel")
                    added -= sum(1 for ip, _ in result.failed if ip not in kernel)
                    rearmed -= sum(1 for ip, _ in result.failed if ip in kernel)
            for name, entries in remove.items():
                result = self.nl.adt_many(name, entries, delete=True)
                if result.failed:  # left in the kernel: drift sees it
                    log.warning("ipset %s: could not remove %s", name,
                                ", ".join(f"{ip} ({why})" for ip, why in result.failed[:5]))
        except IpsetNetlinkError as exc:
            raise SipguardError(f"ipset sync: {exc}") from None
        removed = sum(len(v) for v in remove.values())
        if added or removed or repaired or rearmed or failed:
            log.info("ipset sync: +%d -%d, %d re-armed, %d repaired, %d refused", added, removed, rearmed,
                     repaired, failed)
        return SyncReport(added=added, removed=removed, repaired=repaired + rearmed, failed=failed)

    def drift(self, now: float) -> list[str]:
        """The sets exist with the member counts the ledger expects, the hook chain is whole and the
        first rule of INPUT (and FORWARD with hook_forward): set headers and the rule listing (a set
        whose header counts more than expected is listed, at most once a minute)."""
        if not self.ledger.known:
            return ["the kernel was not synced yet"]
        out: list[str] = []
        try:
            for name in self.sets.values():
                head = self.nl.header(name)
                if head is None:
                    out.append(f"ipset {name} missing")
                    continue
                bounds = self.ledger.bounds(name, now)
                count = head.elements
                if count > bounds[1]:
                    # the header also counts expired entries the garbage collector has not reached yet:
                    # list the set (live entries only), at most once a minute, before calling it drift
                    if now - self._listed.get(name, 0.0) < RECOUNT_EVERY:
                        continue
                    self._listed[name] = now
                    count = len(self.nl.dump(name))
                wrong = count_problem(f"ipset {name}", count, bounds)
                if wrong:
                    out.append(wrong)
        except (SipguardError, OSError) as exc:
            out.append(f"cannot read the ipsets: {exc}")
        try:
            for plan in self.hook.plans:
                out += [f"iptables IPv{plan.version}: {w}" for w in problems(plan, self.hook.observe(plan))]
        except SipguardError as exc:
            out.append(f"cannot read the iptables hook: {exc}")
        return out

    def _dump(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name in self.sets.values():
            try:
                out.update(self.nl.dump(name))
            except IpsetNetlinkError as exc:
                if exc.code != errno.ENOENT:
                    raise SipguardError(f"ipset list {name}: {exc}") from None
        return out

    def entries(self) -> list[EnforcedEntry]:
        return [EnforcedEntry(ip, float(t) if t else None) for ip, t in sorted(self._dump().items())]

    def contains(self, ip: str) -> bool:
        """The kernel's answer to `ipset test SET IP` (netlink IPSET_CMD_TEST) for the set `ip` belongs in."""
        if ip.endswith("/0") or ip in ("0.0.0.0", "::"):
            return False  # never in a set
        name = self._set_of(ip)[0]
        try:
            return self.nl.test(name, ip)
        except IpsetNetlinkError as exc:
            raise SipguardError(f"ipset test {name} {ip}: {exc}") from None

    def close(self) -> None:
        if self._ipset is not None:
            try:
                self._ipset.close()
            except Exception:  # noqa: BLE001
                pass
            self._ipset = None
        if self._nl is not None:
            self._nl.close()
            self._nl = None

    def remove(self) -> list[str]:
        """Uninstall (not used by the daemon): take the hook out, then destroy the sets that exist.

        What is absent is skipped without a word (no iptables, no ip_set in the kernel, a set that is not
        there); a failure is reported, not raised. One line per thing removed or that could not be.
        """
        msgs: list[str] = []
        if has_iptables():
            try:
                msgs += self.hook.remove()
            except SipguardError as exc:
                msgs.append(f"iptables hook {self.cfg.chain}: cannot remove: {exc}")
        try:
            present = [name for name in self.sets.values() if self.nl.header(name) is not None]
        except (SipguardError, OSError):  # no ip_set here (or no permission to ask): no sets of ours to see
            return msgs
        for name in present:
            try:
                self.ipset.destroy(name)
                msgs.append(f"ipset {name}: destroyed")
            except Exception as exc:  # noqa: BLE001 - pyroute2 raises its own types
                msgs.append(f"ipset {name}: cannot destroy: {_reason(exc)}")
        return msgs


def _reason(exc: Exception) -> str:
    from .ipsetnl import ERRORS

    code = getattr(exc, "code", None)
    if code in ERRORS:
        return ERRORS[code]
    return str(exc)


__all__ = ["IpsetEnforcer"]
