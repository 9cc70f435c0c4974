"""A small, fast ipset netlink client for the bulk paths: batched add/delete, dumps, headers.

pyroute2's IPSet does the set management and single adds (sipguard.enforce.ipset); its pure-Python
attribute encoder needs about 9 s for 100,000 entries, so batches are encoded here with `struct`
and sent as ipset's own bulk form (one IPSET_CMD_ADD/DEL message whose IPSET_ATTR_ADT nests many
entries; the same messages `ipset restore` sends). Dumps are decoded here too for the same reason.
No process is spawned.

Batches are cut by encoded size, never by entry count: IPSET_ATTR_ADT's length field is 16 bits
(65,535 bytes with its header: ~1,489 IPv6 entries, ~2,047 IPv4 ones), and the message must fit the
socket's send buffer. Each entry carries its own line number, so when the kernel refuses one (a /0,
a null address) it names it (IPSET_ATTR_LINENO in the error it sends back, after applying the entries
before it): that entry is reported and the rest of the batch is sent again; an error that names no
entry and is not about the set as a whole is narrowed down by halving the batch.

Everything acts on the network namespace of the calling process.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ..addresses import address_from_packed, network

NETLINK_NETFILTER = 12
NFNL_SUBSYS_IPSET = 6
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_DUMP = 0x300
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

IPSET_PROTOCOL = 7
CMD_PROTOCOL, CMD_CREATE, CMD_DESTROY, CMD_FLUSH = 1, 2, 3, 4
CMD_LIST, CMD_ADD, CMD_DEL, CMD_TEST, CMD_HEADER = 7, 9, 10, 11, 12
# top-level attributes
A_PROTOCOL, A_SETNAME, A_TYPENAME, A_REVISION, A_FAMILY, A_FLAGS, A_DATA, A_ADT, A_LINENO = 1, 2, 3, 4, 5, 6, 7, 8, 9
# attributes inside DATA
D_IP, D_CIDR, D_TIMEOUT, D_LINENO = 1, 3, 6, 9
D_MAXELEM, D_ELEMENTS, D_REFERENCES = 19, 24, 25
IPADDR_IPV4, IPADDR_IPV6 = 1, 2
ERR_EXIST = 4103  # IPSET_ERR_EXIST: (for a test) the entry is not in the set

NLA_MAX_LEN = 0xFFFF  # a netlink attribute's length field is 16 bits, header included
ADT_BUDGET = 60_000
"""Bytes of entries nested in one IPSET_ATTR_ADT: below NLA_MAX_LEN with a margin (the kernel took
65,516 bytes of IPv6 entries in one message; 1,363 IPv6 or 1,875 IPv4 entries fit in this budget)."""
MSG_OVERHEAD = 128  # netlink + nfgenmsg headers, protocol, set name and line number attributes

ERRORS = {
    errno.ENOENT: "the set does not exist",
    errno.EPERM: "permission denied (needs root / CAP_NET_ADMIN)",
    errno.EPROTONOSUPPORT: "the kernel has no ip_set support",
    4097: "ipset protocol error",
    4098: "set type not supported by the kernel",
    4099: "the kernel's maximum number of sets is reached",
    4100: "set is in use (referenced by a rule)",
    4101: "set name already exists",
    4102: "set type mismatch",
    4103: "element already exists / not in the set",
    4104: "invalid CIDR prefix length",
    4106: "address family mismatch",
    4107: "the set has no timeout support",
    4108: "set is referenced",
    4352: "the set is full (raise [enforce] maxelem)",
}


SET_ERRORS = frozenset({errno.ENOENT, errno.EPERM, errno.EACCES, errno.EPROTONOSUPPORT, errno.ENOMEM,
                        errno.ENOBUFS, errno.EMSGSIZE, 4098, 4099, 4102, 4107, 4352})
"""Errors about the set or the kernel as a whole (no such set, no permission, the set is full, ...):
every entry would fail the same way, so a batch stops there and raises instead of going on."""


def reason_of(code: int) -> str:
    return ERRORS.get(code) or (os.strerror(code) if code < 4096 else f"ipset error {code}")


class IpsetNetlinkError(OSError):
    def __init__(self, code: int, what: str, lineno: int = 0) -> None:
        self.code = code
        self.lineno = lineno  # the entry of a batch the kernel refused (its IPSET_ATTR_LINENO), 0 = none named
        super().__init__(code, f"{what}: {reason_of(code)}")


@dataclass
class AdtResult:
    """What a batch did: entries the kernel took, and those it refused, with the reason."""

    sent: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (address or CIDR, why)


@dataclass(frozen=True, slots=True)
class SetHeader:
    name: str
    typename: str
    family: int  # socket.AF_INET / AF_INET6
    timeout: bool  # entries carry timeouts
    maxelem: int
    elements: int
    references: int


def _attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * ((4 - n % 4) % 4)


def _attrs(buf: bytes, offset: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
    end = len(buf) if end is None else end
    while offset + 4 <= end:
        n, kind = struct.unpack_from("=HH", buf, offset)
        if n < 4:
            break
        yield kind & NLA_TYPE_MASK, buf[offset + 4: offset + n]
        offset += (n + 3) & ~3


def _setname(name: str) -> bytes:
    return _attr(A_SETNAME, name.encode() + b"\0")


_V4_TIMED = struct.Struct("=HHHHHH4sHHIHHI")  # DATA{IP{IPADDR_IPV4}, TIMEOUT, LINENO}: 32 bytes, no padding


def encode_entry(ip: str, timeout: int | None, lineno: int = 0) -> tuple[int, bytes]:
    """(family, DATA attribute) for an address or CIDR with an optional timeout (0 = permanent)."""
    if timeout is not None and "/" not in ip and ":" not in ip:  # the bulk case: one pack, the same bytes
        return socket.AF_INET, _V4_TIMED.pack(
            32, A_DATA | NLA_F_NESTED, 12, D_IP | NLA_F_NESTED, 8, IPADDR_IPV4 | NLA_F_NET_BYTEORDER,
            socket.inet_pton(socket.AF_INET, ip), 8, D_TIMEOUT | NLA_F_NET_BYTEORDER, socket.htonl(timeout),
            8, D_LINENO, lineno)
    return _encode_entry(ip, timeout, lineno)


def _encode_entry(ip: str, timeout: int | None, lineno: int = 0) -> tuple[int, bytes]:
    if "/" in ip:
        net = network(ip)
        v6, packed, cidr = net.version == 6, net.network_address.packed, net.prefixlen
    else:  # a canonical address: inet_pton is C speed (bulk loads encode 100,000 of these)
        v6 = ":" in ip
        packed, cidr = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, ip), None
    if not v6:
        fam, inner = socket.AF_INET, _attr(IPADDR_IPV4 | NLA_F_NET_BYTEORDER, packed)
    else:
        fam, inner = socket.AF_INET6, _attr(IPADDR_IPV6 | NLA_F_NET_BYTEORDER, packed)
    body = _attr(D_IP | NLA_F_NESTED, inner)
    if cidr is not None:
        body += _attr(D_CIDR, bytes([cidr]))
    if timeout is not None:
        body += _attr(D_TIMEOUT | NLA_F_NET_BYTEORDER, struct.pack(">I", timeout))
    body += _attr(D_LINENO, struct.pack("=I", lineno))
    return fam, _attr(A_DATA | NLA_F_NESTED, body)


class IpsetNetlink:
    """One NETLINK_NETFILTER socket in the current network namespace."""

    def __init__(self) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except OSError as exc:
            raise IpsetNetlinkError(exc.errno or errno.EPROTONOSUPPORT, "netfilter netlink socket") from None
        self.sock.bind((0, 0))
        self.sock.settimeout(30.0)  # the kernel always answers; never hang forever
        for opts, size in (((SO_RCVBUFFORCE, socket.SO_RCVBUF), 8 << 20), ((SO_SNDBUFFORCE, socket.SO_SNDBUF), 1 << 20)):
            for opt in opts:
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, opt, size)
                    break
                except OSError:
                    continue
        # the kernel refuses a message longer than the send buffer less 32 bytes (netlink_sendmsg)
        sndbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self.adt_budget = max(1024, min(ADT_BUDGET, sndbuf - 32 - MSG_OVERHEAD))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    # -- plumbing ------------------------------------------------------------------------------
    def _send(self, cmd: int, family: int, attrs: bytes, flags: int) -> int:
        self.seq += 1
        nfgen = struct.pack("=BBH", family, 0, 0)
        body = nfgen + _attr(A_PROTOCOL, bytes([IPSET_PROTOCOL])) + attrs
        hdr = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_IPSET << 8) | cmd, flags, self.seq, 0)
        self.sock.send(hdr + body)
        return self.seq

    def _replies(self, seq: int, what: str) -> Iterator[bytes]:
        """Payloads (after nfgenmsg) of the answers to `seq`, until ACK / DONE; errors raise."""
        while True:
            data = self.sock.recv(1 << 20)
            off = 0
            while off + 16 <= len(data):
                length, mtype, flags, mseq, _pid = struct.unpack_from("=IHHII", data, off)
                if length < 16:
                    return
                msg = data[off + 16: off + length]
                off += (length + 3) & ~3
                if mseq != seq:
                    continue
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", msg, 0)[0]
                    if code:
                        raise IpsetNetlinkError(code, what, _echoed_lineno(msg[4:]))
                    return
                if mtype == NLMSG_DONE:
                    return
                yield msg[4:]

    def request(self, cmd: int, attrs: bytes, what: str, family: int = socket.AF_INET,
                flags: int = NLM_F_REQUEST | NLM_F_ACK) -> list[bytes]:
        return list(self._replies(self._send(cmd, family, attrs, flags), what))

    # -- queries -------------------------------------------------------------------------------
    def protocol(self) -> int:
        for msg in self.request(CMD_PROTOCOL, b"", "ipset protocol"):
            for kind, val in _attrs(msg):
                if kind == A_PROTOCOL:
                    return val[0]
        return 0

    def header(self, name: str) -> SetHeader | None:
        """The set's type and limits, None when there is no such set."""
        try:
            msgs = self.request(CMD_HEADER, _setname(name), f"ipset {name}")
        except IpsetNetlinkError as exc:
            if exc.code == errno.ENOENT:
                return None
            raise
        typename, family, timeout, maxelem, elements, refs = "", 0, False, 0, 0, 0
        # HEADER names the type; LIST with the header flag adds the create options and counts
        for msg in msgs + self._list_msgs(name, header_only=True):
            for kind, val in _attrs(msg):
                if kind == A_TYPENAME:
                    typename = val.rstrip(b"\0").decode()
                elif kind == A_FAMILY:
                    family = val[0]
                elif kind == A_DATA:
                    for k, v in _attrs(val):
                        if k == D_TIMEOUT:
                            timeout = True
                        elif k == D_MAXELEM:
                            maxelem = struct.unpack(">I", v)[0]
                        elif k == D_ELEMENTS:
                            elements = struct.unpack(">I", v)[0]
                        elif k == D_REFERENCES:
                            refs = struct.unpack(">I", v)[0]
        fam = {2: socket.AF_INET, 10: socket.AF_INET6}.get(family, family)
        return SetHeader(name, typename, fam, timeout, maxelem, elements, refs)

    def _list_msgs(self, name: str, header_only: bool = False) -> list[bytes]:
        attrs = _setname(name)
        if header_only:
            attrs += _attr(A_FLAGS, struct.pack(">I", 1 << 2))  # IPSET_FLAG_LIST_HEADER
        return self.request(CMD_LIST, attrs, f"ipset list {name}", flags=NLM_F_REQUEST | NLM_F_DUMP)

    def dump(self, name: str) -> dict[str, int]:
        """{address or CIDR: timeout seconds (0 = permanent)} of a hash:ip / hash:net set."""
        out: dict[str, int] = {}
        for msg in self._list_msgs(name):
            for kind, val in _attrs(msg):
                if kind != A_ADT:
                    continue
                for k, data in _attrs(val):
                    if k != A_DATA:
                        continue
                    addr = None
                    cidr = None
                    timeout = 0
                    for dk, dv in _attrs(data):
                        if dk == D_IP:
                            for ak, av in _attrs(dv):
                                addr = address_from_packed(av)
                        elif dk == D_CIDR:
                            cidr = dv[0]
                        elif dk == D_TIMEOUT:
                            timeout = struct.unpack(">I", dv)[0]
                    if addr is None:
                        continue
                    text, max_prefixlen = addr
                    key = f"{text}/{cidr}" if cidr is not None and cidr != max_prefixlen else text
                    out[key] = timeout
        return out

    def test(self, name: str, ip: str) -> bool:
        """Whether set `name` holds `ip` (`ipset test`: IPSET_CMD_TEST; a CIDR is tested as that network).
        False when there is no such set."""
        family, data = encode_entry(ip, None)
        try:
            self.request(CMD_TEST, _setname(name) + data, f"ipset test {name}", family=family)
        except IpsetNetlinkError as exc:
            if exc.code in (ERR_EXIST, errno.ENOENT):
                return False
            raise
        return True

    # -- changes -------------------------------------------------------------------------------
    def adt_many(self, name: str, entries: Iterable[tuple[str, int | None]], delete: bool = False) -> AdtResult:
        """Add (replacing timeouts, like `ipset -exist add`) or delete entries, in messages cut by size.

        Deleting an absent entry is not an error. An entry the kernel refuses (or that is not an address
        at all) is left out and reported in the result; the others are applied. An error about the set as
        a whole (SET_ERRORS) raises IpsetNetlinkError; the entries before it may have been applied.
        """
        cmd = CMD_DEL if delete else CMD_ADD
        what = f"ipset {'del' if delete else 'add'} {name}"
        result = AdtResult()
        chunk: list[tuple[int, str, bytes]] = []  # (line number, entry, encoded DATA attribute)
        size = 0
        family = socket.AF_INET
        budget = self.adt_budget
        for lineno, (ip, timeout) in enumerate(entries, 1):
            try:
                fam, data = encode_entry(ip, None if delete else timeout, lineno)
            except (OSError, ValueError) as exc:  # inet_pton / ip_network: not an address
                result.failed.append((ip, f"not an address or CIDR ({exc})"))
                continue
            if chunk and size + len(data) > budget:
                self._adt_chunk(cmd, name, family, chunk, what, result)
                chunk, size = [], 0
            family = fam
            chunk.append((lineno, ip, data))
            size += len(data)
        if chunk:
            self._adt_chunk(cmd, name, family, chunk, what, result)
        return result

    def _adt_chunk(self, cmd: int, name: str, family: int, chunk: list[tuple[int, str, bytes]], what: str,
                   result: AdtResult) -> None:
        """Send one message's worth; on a refused entry, report it and send the rest again."""
        while chunk:
            try:
                self._adt(cmd, name, family, [d for _, _, d in chunk], what)
            except IpsetNetlinkError as exc:
                if exc.code in SET_ERRORS:
                    raise
                at = next((i for i, (no, _, _) in enumerate(chunk) if no == exc.lineno), None) if exc.lineno else None
                if at is not None:  # the kernel applied the entries before it
                    result.sent += at
                    result.failed.append((chunk[at][1], reason_of(exc.code)))
                    chunk = chunk[at + 1:]
                    continue
                if exc.code == 4097:  # a protocol error naming no entry is about the message: never halve it
                    raise
                if len(chunk) == 1:
                    result.failed.append((chunk[0][1], reason_of(exc.code)))
                    return
                half = len(chunk) // 2  # no entry named: halve (adds and deletes may be sent twice)
                self._adt_chunk(cmd, name, family, chunk[:half], what, result)
                self._adt_chunk(cmd, name, family, chunk[half:], what, result)
                return
            result.sent += len(chunk)
            return

    def _adt(self, cmd: int, name: str, family: int, batch: list[bytes], what: str) -> None:
        payload = b"".join(batch)
        if len(payload) + 4 > NLA_MAX_LEN:  # never: adt_many cuts by size
            raise IpsetNetlinkError(errno.EMSGSIZE, what)
        attrs = _setname(name) + _attr(A_LINENO, struct.pack("=I", 0)) + _attr(A_ADT | NLA_F_NESTED, payload)
        self.request(cmd, attrs, what, family=family)


def _echoed_lineno(echo: bytes) -> int:
    """IPSET_ATTR_LINENO of the request the kernel echoes in an error (0 when it names no entry)."""
    if len(echo) < 20:
        return 0
    length = struct.unpack_from("=I", echo, 0)[0]
    for kind, val in _attrs(echo, 20, min(length, len(echo))):
        if kind == A_LINENO and len(val) >= 4:
            return struct.unpack_from("=I", val, 0)[0]
    return 0


def ipset_available() -> bool:
    """True when the kernel answers ipset's protocol query in this namespace."""
    try:
        nl = IpsetNetlink()
    except OSError:
        return False
    try:
        return nl.protocol() >= 6
    except OSError:
        return False
    finally:
        nl.close()
