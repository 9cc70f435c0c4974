"""Address parsing and the allow-list: what a filter captured becomes one canonical address.

Never guesses: text that is not a valid IPv4/IPv6 address yields None (and is counted by
the caller), so a malformed capture can never ban something else.

The hot paths (the allow-list, the fleet's guard rails on a 100,000-ban burst) use integer forms
instead of `ipaddress` objects: `network_key` (a CIDR or address as family, network as int, prefix
length) and `NetworkSet` (a prefix lookup: "does this address or CIDR overlap any of these networks"
in one set lookup per distinct prefix length). They agree with `ipaddress` for every v4 and v6
address and CIDR (tests/test_guard_fast.py checks it on random ones).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from functools import lru_cache

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=8192)  # a storm's busy sources; a spray of unique ones misses anyway (~180 B each)
def normalize_ip(text: str) -> str | None:
    """Canonical text of an address as Kamailio prints $si, or None when invalid.

    Accepts ``1.2.3.4``, ``2001:db8::1``, ``[2001:db8::1]``, a zone suffix ``fe80::1%eth0``
    (dropped: a zone never crosses the host) and IPv4-mapped IPv6 ``::ffff:1.2.3.4``
    (returned as ``1.2.3.4``, since that is the sender the kernel sees on a v4 socket).
    """
    if not text or len(text) > 64:
        return None
    if text[0] == "[" and text[-1] == "]":
        text = text[1:-1]
    if "%" in text:
        text = text.split("%", 1)[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_unspecified:
        return None  # 0.0.0.0 / :: never sent a packet: banning it means nothing
    return str(addr)


def parse_target(text: str) -> str:
    """An address or CIDR given by an operator, canonical; ValueError with a clear reason."""
    text = text.strip()
    if "/" in text:
        net = ipaddress.ip_network(text, strict=False)
        if net.prefixlen == net.max_prefixlen:
            return str(net.network_address)
        return str(net)
    ip = normalize_ip(text)
    if ip is None:
        raise ValueError(f"not an IP address or CIDR: {text!r}")
    return ip


def networks_holding(ip: str, cidrs: Iterable[str]) -> list[str]:
    """The CIDRs among `cidrs` (in their order) that contain the address `ip` (canonical text)."""
    addr = ipaddress.ip_address(ip)
    return [c for c in cidrs if addr in ipaddress.ip_network(c, strict=False)]


def is_global(ip: str) -> bool:
    """True for a globally routable address: not private, loopback, link-local, documentation, ...;
    False for anything that does not parse."""
    try:
        return ipaddress.ip_address(ip).is_global
    except ValueError:
        return False


def _proc_host_addresses() -> set[str] | None:
    """The kernel's own list of local addresses of this network namespace, from /proc (stdlib only,
    no netlink library to import): IPv4 `/32 host LOCAL` entries of fib_trie, IPv6 if_inet6."""
    try:
        with open("/proc/net/fib_trie") as f:
            trie = f.read()
    except OSError:
        return None
    found: set[str] = set()
    last = None
    for line in trie.splitlines():
        s = line.strip()
        if s.startswith("|-- "):
            last = s[4:]
        elif s.startswith("/32 host LOCAL") and last:
            ip = normalize_ip(last)
            if ip:
                found.add(ip)
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                parts = line.split()
                if parts and len(parts[0]) == 32:
                    found.add(str(ipaddress.IPv6Address(bytes.fromhex(parts[0]))))
    except (OSError, ValueError):
        pass  # no IPv6 in this kernel
    return found


def host_addresses() -> set[str]:
    """This host's own addresses (no privileges needed): we never ban ourselves."""
    found = _proc_host_addresses()
    if found is not None:
        return found
    found = set()
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for msg in ipr.get_addr():
                addr = msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")
                if addr:
                    ip = normalize_ip(addr)
                    if ip:
                        found.add(ip)
    except Exception:  # noqa: BLE001 - no netlink (container, sandbox): fall back below
        pass
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            ip = normalize_ip(str(info[4][0]))
            if ip:
                found.add(ip)
    except OSError:
        pass
    return found


_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_BITS = {4: 32, 6: 128}


def network_key(text: str) -> tuple[int, int, int]:
    """(4 or 6, network as int, prefix length) of a CIDR (host bits dropped, as `network` does) or of
    an address (/32, /128): the same network `network(text)` names; ValueError when invalid."""
    if isinstance(text, str) and text.isascii():
        addr, slash, plen = text.partition("/")
        version = 6 if ":" in addr else 4
        try:
            value = int.from_bytes(socket.inet_pton(_AF[version], addr), "big")
        except OSError:
            value = -1
        bits = _BITS[version]
        if value >= 0 and (not slash or (plen.isdigit() and int(plen) <= bits)):
            p = int(plen) if slash else bits
            return version, value >> (bits - p) << (bits - p), p
    net = network(text)  # the rare forms (a netmask after the slash, a zone): ipaddress decides
    return net.version, int(net.network_address), net.prefixlen


class NetworkSet:
    """Networks (CIDRs or addresses) for overlap lookups: `overlaps(target)` is True when the address
    or CIDR `target` shares an address with any of them (an address: it lies in one; a network: one
    holds it or lies in it), the same answer as `ipaddress`'s `overlaps` against each, in one set
    lookup per distinct prefix length rather than a loop over the networks."""

    def __init__(self, nets: Iterable[str | IPNetwork] = ()) -> None:
        self._by_len: dict[int, dict[int, set[int]]] = {4: {}, 6: {}}  # version -> prefix len -> prefixes
        self._cut: dict[tuple[int, int, int], frozenset[int]] = {}  # (version, len, shorter len) -> cut prefixes
        self._lens: dict[int, list[int]] = {4: [], 6: []}  # the prefix lengths present, per version
        self.add_all(nets)

    def add_all(self, nets: Iterable[str | IPNetwork]) -> None:
        for n in nets:
            self.add(n)

    def add(self, net: str | IPNetwork) -> None:
        version, value, plen = network_key(net if isinstance(net, str) else str(net))
        self._by_len[version].setdefault(plen, set()).add(value >> (_BITS[version] - plen))
        self._cut.clear()
        self._lens = {v: sorted(d) for v, d in self._by_len.items()}

    def __len__(self) -> int:
        return sum(len(s) for d in self._by_len.values() for s in d.values())

    def overlaps(self, target: str) -> bool:
        """Whether the address or CIDR `target` overlaps one of the networks; ValueError when invalid."""
        return self.overlaps_key(*network_key(target))

    def overlaps_key(self, version: int, value: int, plen: int) -> bool:
        """`overlaps` for a target given as `network_key` gives it."""
        by_len = self._by_len[version]
        bits = _BITS[version]
        for p in self._lens[version]:
            if p <= plen:  # a network at least as wide as the target: holds it when the prefixes agree
                if value >> (bits - p) in by_len[p]:
                    return True
            else:  # a narrower one: lies inside the target when its first `plen` bits are the target's
                cut = self._cut.get((version, p, plen))
                if cut is None:
                    cut = self._cut[(version, p, plen)] = frozenset(x >> (p - plen) for x in by_len[p])
                if value >> (bits - plen) in cut:
                    return True
        return False


class AllowList:
    """CIDRs that are never banned. Lookups are cached per address."""

    ALWAYS = ("127.0.0.0/8", "::1/128")

    def __init__(self, cidrs: Iterable[str], include_host: bool = True) -> None:
        nets: list[IPNetwork] = [ipaddress.ip_network(c, strict=False) for c in self.ALWAYS]
        nets += [ipaddress.ip_network(c, strict=False) for c in cidrs]
        if include_host:
            nets += [ipaddress.ip_network(a) for a in host_addresses()]
        self.networks: tuple[IPNetwork, ...] = tuple(dict.fromkeys(nets))
        self._set = NetworkSet(self.networks)  # an address or network lookup: one set lookup per prefix length
        self._cache: dict[str, bool] = {}

    def __contains__(self, target: str) -> bool:
        hit = self._cache.get(target)
        if hit is None:
            hit = self._lookup(target)
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[target] = hit
        return hit

    def _lookup(self, target: str) -> bool:
        """An address in one of the networks, or a network overlapping one; False for what does not parse."""
        try:
            if "/" in target:
                return self._set.overlaps(target)
            v6 = ":" in target
            n = int.from_bytes(socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, target.split("%")[0]))
        except (ValueError, OSError):
            return False
        version = 6 if v6 else 4
        return self._set.overlaps_key(version, n, _BITS[version])


# -- address families and networks (enforcers, metrics, reports) -----------------------------
def classify(ip: str) -> tuple[int, bool]:
    """(4 or 6, is a network) of a canonical address or CIDR."""
    if "/" in ip:
        net = ipaddress.ip_network(ip, strict=False)
        if net.prefixlen == net.max_prefixlen:
            return net.version, False
        return net.version, True
    return (6 if ":" in ip else 4), False  # canonical text: the colon tells the family


def family_label(ip: str) -> str:
    """ipv4 / ipv6 for addresses, net4 / net6 for networks."""
    try:
        if "/" in ip:
            return "net4" if ipaddress.ip_network(ip, strict=False).version == 4 else "net6"
        return "ipv4" if ipaddress.ip_address(ip).version == 4 else "ipv6"
    except ValueError:
        return "unknown"


def network_of(ip: str) -> str:
    """The /24 (IPv4) or /64 (IPv6) an address or network belongs to."""
    try:
        if "/" in ip:
            net = ipaddress.ip_network(ip, strict=False)
            plen = 24 if net.version == 4 else 64
            return str(net.supernet(new_prefix=plen)) if net.prefixlen > plen else str(net)
        a = ipaddress.ip_address(ip)
        return str(ipaddress.ip_network(f"{a}/{24 if a.version == 4 else 64}", strict=False))
    except ValueError:
        return ip


# -- the address values other stages need (kernel encodings, interval sets, config checks) ----------
def network(text: str) -> IPNetwork:
    """The network a CIDR (or a single address, as /32 or /128) names; ValueError when invalid."""
    return ipaddress.ip_network(text, strict=False)


def address_from_packed(raw: bytes) -> tuple[str, int]:
    """(canonical text, maximum prefix length) of a packed IPv4 or IPv6 address (4 or 16 bytes)."""
    a = ipaddress.ip_address(raw)
    return str(a), a.max_prefixlen


def range_target(lo: str, hi: str) -> str:
    """An address range as one CIDR when it is exactly one network, else `lo-hi`."""
    nets = list(ipaddress.summarize_address_range(ipaddress.ip_address(lo), ipaddress.ip_address(hi)))
    return str(nets[0]) if len(nets) == 1 else f"{lo}-{hi}"


def address_text(text: str) -> str:
    """The canonical text of an address; ValueError when invalid."""
    return str(ipaddress.ip_address(text))

