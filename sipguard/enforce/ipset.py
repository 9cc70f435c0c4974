"""The ipset enforcer: bans live in kernel ipsets with per-entry timeouts; one iptables hook chain
drops what they hold.

Sets (PREFIX = [enforce] set_prefix):
  PREFIX-v4 hash:ip inet, PREFIX-v6 hash:ip inet6     single addresses
  PREFIX-net4 hash:net inet, PREFIX-net6 hash:net inet6  CIDR bans
all created with `timeout 0` (entries carry their own timeout; 0 = permanent) and maxelem.

An entry's timeout is the ban's remaining time, so the kernel lifts it on time even when the
daemon is down; bans longer than the kernel cap (IPSET_MAX_TIMEOUT, ~24.8 days) are armed with
the cap and re-armed by `sync`. Single bans are one netlink message (pyroute2 IPSet); batches
are ipset's bulk messages (ipsetnl). The sets and the hook are created on first use.
"""

from __future__ import annotations

import errno
import logging
import socket

from ..errors import SipguardError
from ..addresses import classify, network
from ..model import Ban
from ..netfilter import has_iptables
from .base import IPSET_MAX_TIMEOUT, EnforcedEntry, SyncReport, kernel_timeout, needs_rearm
from .hook import IptablesHook, plans
from .ipsetnl import IpsetNetlink, IpsetNetlinkError

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
        """A /0 cannot be an ipset entry (hash:net takes prefixes 1 to 32 / 128)."""
        if ip.endswith("/0"):
            return "an ipset cannot hold a /0 network"
        return None

    def _set_of(self, ip: str) -> tuple[str, int, bool]:
        version, is_net = classify(ip)
        if is_net and network(ip).prefixlen == 0:
            raise SipguardError(f"{ip}: ipset cannot hold a /0 network")
        return self.sets[version, is_net], version, is_net

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
                raise SipguardError(f"ipset add {name} {ban.ip}: {_reason(exc)}") from None

    def ban_many(self, bans: list[Ban], now: float) -> None:
        groups: dict[str, list[tuple[str, int]]] = {n: [] for n in self.sets.values()}
        for ban in bans:
            timeout = kernel_timeout(ban, now, IPSET_MAX_TIMEOUT)
            if timeout is not None:
                groups[self._set_of(ban.ip)[0]].append((ban.ip, timeout))
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
            try:
                self.nl.adt_many(name, entries)
            except IpsetNetlinkError as exc:
                for n, sent in done + [(name, entries)]:  # best effort: take this batch out again
                    try:
                        self.nl.adt_many(n, sent, delete=True)
                    except OSError:
                        pass
                raise SipguardError(f"ipset add to {name}: {exc}") from None
            done.append((name, entries))

    def unban(self, ip: str) -> None:
        name, version, is_net = self._set_of(ip)
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        try:
            self.ipset.delete(name, ip, family=family, exclusive=False, etype="net" if is_net else "ip")
        except Exception as exc:  # noqa: BLE001
            if getattr(exc, "code", None) in (errno.ENOENT, 4103):  # no set / not in it: nothing to lift
                return
            raise SipguardError(f"ipset del {name} {ip}: {_reason(exc)}") from None

    def sync(self, bans: list[Ban], now: float) -> SyncReport:
        repaired = self.ensure()
        kernel = self._dump()
        want: dict[str, int] = {}
        for ban in bans:
            t = kernel_timeout(ban, now, IPSET_MAX_TIMEOUT)
            if t is not None:
                self._set_of(ban.ip)  # a /0 raises here, before anything changes
                want[ban.ip] = t
        add: dict[str, list[tuple[str, int]]] = {}
        added = rearmed = 0
        for ip, t in want.items():
            have = kernel.get(ip)
            if have is not None and not needs_rearm(have, t):
                continue
            if have is None:
                added += 1
            else:
                rearmed += 1
            add.setdefault(self._set_of(ip)[0], []).append((ip, t))
        remove: dict[str, list[tuple[str, None]]] = {}
        for ip in kernel.keys() - want.keys():
            remove.setdefault(self._set_of(ip)[0], []).append((ip, None))
        try:
            for name, entries in add.items():
                self.nl.adt_many(name, entries)
            for name, entries in remove.items():
                self.nl.adt_many(name, entries, delete=True)
        except IpsetNetlinkError as exc:
            raise SipguardError(f"ipset sync: {exc}") from None
        removed = sum(len(v) for v in remove.values())
        if added or removed or repaired or rearmed:
            log.info("ipset sync: +%d -%d, %d re-armed, %d repaired", added, removed, rearmed, repaired)
        return SyncReport(added=added, removed=removed, repaired=repaired + rearmed)

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
