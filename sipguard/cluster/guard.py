"""Local guard rails on every ban that comes from the fleet, manual or not, signed or not.

A signature says a node of this fleet made a ban; it does not make the ban safe here. Before the
bridge hands a fleet ban to the ban book, `FleetGuard.refusal` says why this node must not hold it:

* it is in this node's allow-list, or a network that overlaps one of the allow-list's networks
  (the local allow-list wins over every entry from the fleet, `manual` included);
* it is a network wider than `[cluster] max_prefix_v4` / `max_prefix_v6` (default /16, /48);
* it covers one of this node's own addresses (the kernel's list, pyroute2's, `[cluster]
  own_addresses`) or one of its Redis / Sentinel servers' addresses (resolved at start and whenever
  the bridge learns a new master): a node that bans its Redis can never hear the unban.

The same rails apply to the address of a user ban from the fleet (the office policy: one user at one
address, enforced by Kamailio, never the kernel); the bridge refuses a user ban of a network besides.

Refusals are counted by reason and logged rate-limited (`Throttle`). A refusal is a few integer
operations and set lookups (`sipguard.addresses.network_key` / `NetworkSet`, no `ipaddress` object per
ban): a 100,000-ban burst passes the guard in a fraction of a second. Pure apart from resolving the
servers' names (`resolve`); nothing here touches the store, the kernel or Redis.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..addresses import AllowList, IPNetwork, NetworkSet, host_addresses, network, network_key, normalize_ip

if TYPE_CHECKING:
    from ..config import ClusterConfig


class FleetGuard:
    """Why a ban from the fleet must not be applied on this node (`refusal`), or None."""

    def __init__(self, cfg: ClusterConfig, allow: AllowList, own: Iterable[str] | None = None,
                 servers: Iterable[str] = ()) -> None:
        self.allow = allow
        self.max_prefix = {4: cfg.max_prefix_v4, 6: cfg.max_prefix_v6}
        mine = set(host_addresses() if own is None else own)
        self._own: list[IPNetwork] = [network(a) for a in sorted(mine)] + [network(c) for c in cfg.own_addresses]
        self._servers: list[IPNetwork] = []
        self._own_set = NetworkSet(self._own)
        self._server_set = NetworkSet()
        self.add_servers(servers)

    def add_servers(self, addresses: Iterable[str]) -> None:
        """Redis or Sentinel servers this node talks to (addresses): never banned from the fleet."""
        for a in addresses:
            ip = normalize_ip(a)
            if ip is not None:
                net = network(ip)
                if net not in self._servers:
                    self._servers.append(net)
                    self._server_set.add(net)

    @property
    def servers(self) -> list[str]:
        return [str(n.network_address) for n in self._servers]

    def refusal(self, target: str) -> str | None:
        """The reason (a short word, also the counter's name) this node refuses a fleet ban of `target`
        (a canonical address or CIDR), or None."""
        try:
            key = network_key(target)
        except (ValueError, TypeError):
            return "malformed"
        if "/" in target and key[2] < self.max_prefix[key[0]]:
            return "too_wide"
        if target in self.allow:  # an allow-listed address, or a network overlapping an allow-listed one
            return "allowlisted"
        if self._own_set.overlaps_key(*key):
            return "own_address"
        if self._server_set.overlaps_key(*key):
            return "redis_server"
        return None


def resolve(hosts: Iterable[str]) -> set[str]:
    """Every address the names (or addresses) resolve to now; names that do not resolve are skipped."""
    found: set[str] = set()
    for h in hosts:
        ip = normalize_ip(h)
        if ip is not None:
            found.add(ip)
            continue
        try:
            for info in socket.getaddrinfo(h, None, proto=socket.IPPROTO_TCP):
                a = normalize_ip(str(info[4][0]))
                if a:
                    found.add(a)
        except (OSError, UnicodeError):
            pass
    return found


class Throttle:
    """Rate-limited warnings: the first `burst` of a kind, then at most one per `every` seconds,
    each saying how many there were in all."""

    def __init__(self, log: logging.Logger, burst: int = 10, every: float = 60.0) -> None:
        self.log = log
        self.burst = burst
        self.every = every
        self._count: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def warn(self, kind: str, msg: str, *args: object) -> bool:
        n = self._count[kind] = self._count.get(kind, 0) + 1
        mono = time.monotonic()
        if n > self.burst and mono - self._last.get(kind, -1e18) < self.every:
            return False
        self._last[kind] = mono
        self.log.warning(msg + " (%d so far)", *args, n)
        return True
