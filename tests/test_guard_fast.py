"""The fast checkers of the fleet's apply path against their reference, on random v4 and v6 input.

Each fast checker replaced one written with `ipaddress` objects (or `hmac`): `network_key` against
`ipaddress.ip_network`, `NetworkSet.overlaps` (and so `AllowList` and `FleetGuard.refusal`) against a
loop of `overlaps` over the networks, `wire.canonical_ip`'s shortcut against `parse_target`, the
signer's precomputed HMAC states against `hmac.digest`, its inlined message encoding against the
generic `_encode`, the ipset netlink encoder's one-pack IPv4 entry against its attribute-by-attribute
encoding. Every case must give the same answer (or the same refusal to answer).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sipguard.addresses import AllowList, NetworkSet, network_key, normalize_ip, parse_target
from sipguard.cluster.guard import FleetGuard
from sipguard.cluster.signing import Signer, _encode, _keyed
from sipguard.cluster.wire import canonical_ip, parse_ban
from sipguard.config import ClusterConfig

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

v4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
v6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
# addresses near each other, so that random networks overlap often (not only in theory)
near4 = st.integers(0, 2**12).map(lambda i: ipaddress.IPv4Address(0xC6120000 + i * 37))
near6 = st.integers(0, 2**12).map(lambda i: ipaddress.IPv6Address((0x20010DB8 << 96) + (i << 100) + i))


@st.composite
def cidr(draw, addrs=st.one_of(v4, v6, near4, near6)) -> str:  # noqa: ANN001
    """A CIDR as text (host bits often set), or a plain address."""
    a = draw(addrs)
    if draw(st.booleans()):
        return str(a)
    plen = draw(st.integers(0, a.max_prefixlen))
    return f"{a}/{plen}"


def reference_overlaps(target: str, nets: list[str]) -> bool:
    t = ipaddress.ip_network(target, strict=False)
    return any(t.version == n.version and t.overlaps(n)  # type: ignore[arg-type]
               for n in (ipaddress.ip_network(c, strict=False) for c in nets))


def reference_allowed(target: str, nets: list[str]) -> bool:
    """AllowList's lookup as it was written with ipaddress (subnet either way, containment)."""
    try:
        t = ipaddress.ip_network(target, strict=False)
    except ValueError:
        return False
    ns = [ipaddress.ip_network(c, strict=False) for c in (*AllowList.ALWAYS, *nets)]
    return any(t.version == n.version and (t.subnet_of(n) or n.subnet_of(t)) for n in ns)  # type: ignore[arg-type]


@SETTINGS
@given(cidr())
def test_network_key_is_ip_network(text):
    net = ipaddress.ip_network(text, strict=False)
    assert network_key(text) == (net.version, int(net.network_address), net.prefixlen)


@SETTINGS
@given(st.text(alphabet="0123456789abcdef:./%x ", max_size=24))
def test_network_key_refuses_what_ip_network_refuses(text):
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        with pytest.raises(ValueError):
            network_key(text)
        return
    assert network_key(text) == (net.version, int(net.network_address), net.prefixlen)


@SETTINGS
@given(cidr(), st.lists(cidr(), max_size=12))
def test_network_set_overlaps_like_ipaddress(target, nets):
    assert NetworkSet(nets).overlaps(target) == reference_overlaps(target, nets)


@SETTINGS
@given(st.lists(cidr(), max_size=8), st.lists(cidr(), min_size=1, max_size=20))
def test_network_set_added_one_by_one(nets, targets):
    s = NetworkSet()
    for k, n in enumerate(nets):
        s.add(n)
        for t in targets:  # (its cut sets are rebuilt after every add)
            assert s.overlaps(t) == reference_overlaps(t, nets[:k + 1])


@SETTINGS
@given(st.one_of(cidr(), st.text(alphabet="0123456789abcdef:./", max_size=20)), st.lists(cidr(), max_size=8))
def test_allow_list_lookup_is_the_reference(target, nets):
    assert (target in AllowList(nets, include_host=False)) == reference_allowed(target, nets)


@SETTINGS
@given(cidr(), st.lists(cidr(), max_size=5), st.lists(cidr(), max_size=5), st.lists(cidr(), max_size=3))
def test_guard_refusal_is_the_reference(target, allow, own, servers):
    cfg = ClusterConfig(redis_url="redis://127.0.0.1:1/0", node_name="n1")
    servers = [str(ipaddress.ip_network(s, strict=False).network_address) for s in servers]
    servers = [a for a in servers if normalize_ip(a) is not None]  # (0.0.0.0, :: are no server's address)
    guard = FleetGuard(cfg, AllowList(allow, include_host=False), own=[], servers=servers)
    own_guard = FleetGuard(cfg.model_copy(update={"own_addresses": own}), AllowList(allow, include_host=False),
                           own=[], servers=servers)
    try:
        canon = parse_target(target)
    except ValueError:  # (0.0.0.0, ::: no fleet ban reaches the guard with them)
        assume(False)
    net = ipaddress.ip_network(canon, strict=False)
    for g, own_nets in ((guard, []), (own_guard, own)):
        if "/" in canon and net.prefixlen < {4: cfg.max_prefix_v4, 6: cfg.max_prefix_v6}[net.version]:
            want = "too_wide"
        elif reference_allowed(canon, allow):
            want = "allowlisted"
        elif reference_overlaps(canon, own_nets):
            want = "own_address"
        elif reference_overlaps(canon, servers):
            want = "redis_server"
        else:
            want = None
        assert g.refusal(canon) == want


@SETTINGS
@given(st.one_of(v4.map(str), v6.map(str), v6.map(lambda a: a.exploded), near6.map(str),
                 v4.map(lambda a: f"::ffff:{a}"), v4.map(lambda a: f"::{a}"), cidr(),
                 st.text(alphabet="0123456789abcdef:./ ", max_size=20), st.sampled_from(["0.0.0.0", "::", "::1"])))
def test_canonical_ip_shortcut_is_parse_target(text):
    try:
        want = parse_target(text)
    except ValueError:
        with pytest.raises(ValueError):
            canonical_ip(text)
        return
    assert canonical_ip(text) == want


@SETTINGS
@given(st.binary(max_size=200), st.binary(max_size=300))
def test_precomputed_hmac_states_are_hmac(key, msg):
    inner, outer = _keyed(key)
    i = inner.copy()
    i.update(msg)
    o = outer.copy()
    o.update(i.digest())
    assert o.digest() == hmac.digest(key, msg, hashlib.sha256)


parts = st.one_of(st.text(max_size=30), st.floats(allow_nan=True), st.integers(-2**70, 2**70), st.booleans(),
                  st.none(), st.lists(st.integers(), max_size=3))


@SETTINGS
@given(st.lists(parts, max_size=10), st.sampled_from(["ban", "unban", "ev"]))
def test_inlined_message_encoding_is_the_generic_one(values, kind):
    s = Signer("a-secret-of-sixteen-chars", "sg:")
    generic = ",".join(f"{len(t)}:{t}" for t in map(_encode, ("sg:", kind, *values))).encode("utf-8", "surrogatepass")
    assert s._message(kind, values) == generic


ban_shaped = st.tuples(st.text(max_size=40), st.text(max_size=60), st.floats(allow_nan=True), st.one_of(
    st.none(), st.floats(allow_nan=True), st.integers(0, 10)), st.one_of(st.floats(allow_nan=True), st.integers(0, 9)),
    st.one_of(st.integers(-2**70, 2**70), st.floats()), st.one_of(st.booleans(), st.none()), st.text(max_size=40),
    st.one_of(st.text(max_size=20), st.none()))


@SETTINGS
@given(ban_shaped)
def test_ban_message_is_the_generic_one(values):
    s = Signer("a-secret-of-sixteen-chars", "sg:")
    generic = ",".join(f"{len(t)}:{t}" for t in map(_encode, ("sg:", "ban", *values))).encode("utf-8", "surrogatepass")
    assert s._message("ban", values) == generic


def test_a_huge_integer_on_the_wire_is_malformed_not_a_crash():
    """(checked_number on an int of hundreds of digits raised OverflowError, which no caller caught)"""
    payload = ('{"ip":"198.18.0.1","reason":"x","created":1,"expires":null,"score":' + "9" * 400 +
               ',"offence":1,"manual":false,"id":"a:1","origin":"a"}')
    with pytest.raises(ValueError):
        parse_ban(payload)


@SETTINGS
@given(v4, st.one_of(st.none(), st.integers(0, 2**32 - 1)), st.integers(0, 2**32 - 1))
def test_ipset_entry_encoding_is_the_generic_one(addr, timeout, lineno):
    from sipguard.enforce.ipsetnl import _encode_entry, encode_entry

    assert encode_entry(str(addr), timeout, lineno) == _encode_entry(str(addr), timeout, lineno)
