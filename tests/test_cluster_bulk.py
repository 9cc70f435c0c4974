"""A node's lists of bans on the fleet stream: bulk entries (op "bans"), one tag for the whole list.

Three daemons (threads, dry-run enforcers) with one `[cluster] secret` share a redis-server of this
test's own (tests/test_cluster_security.py's fixtures: 127.0.0.1, a free port, stopped by its PID).
A list banned on one node (an import) goes out as bulk entries of up to BULK_BANS and reaches every
other node; a bulk entry written straight into Redis without the secret, with a wrong one, or with its
list, origin or tag changed changes nothing; a signed one still passes each node's guard rails and
bounds, ban by ban; the publish script's `skip` (the bans it refused as stale) is honoured; while a
node of an older version is heard from, lists go out one entry per ban. Nothing touches the kernel.
"""

from __future__ import annotations

import json
import math
import time

import pytest

from sipguard.actions import manual_ban_many
from sipguard.cluster.bridge import BULK_BANS, BULK_MIN, UNBAN_MEMORY, WIRE, _wire_of
from sipguard.cluster.scripts import PUBLISH_LUA
from sipguard.cluster.signing import Signer, bulk_parts
from sipguard.cluster.wire import BULK_MAX, ban_payload, bulk_payload, check_bulk, check_entry, check_reply
from sipguard.model import Ban
from test_cluster import _Closing, all_enforce
from test_cluster_security import (DANGEROUS, PREFIX, SECRET, WRONG, fleet, redis_server,  # noqa: F401 - fixtures
                                   enforced_anywhere, sync_marker)
from waiting import wait_for


def signed_bans(ips: list[str], secret: str | None = SECRET, origin: str = "edge9", created: float | None = None
                ) -> list[str]:
    now = time.time() if created is None else created
    signer = None if secret is None else Signer(secret, PREFIX)
    return [ban_payload(Ban(ip=ip, reason="list", created=now, expires=now + 3600, manual=True),
                        f"{origin}:{k:08x}", origin, signer) for k, ip in enumerate(ips)]


def bulk_fields(payloads: list[str], secret: str | None = SECRET, origin: str = "edge9", skip: str = "",
                prefix: str = PREFIX) -> dict:
    payload = bulk_payload(payloads)
    tag = "" if secret is None else Signer(secret, prefix).tag("bans", *bulk_parts(origin, payload))
    return {"op": "bans", "origin": origin, "id": f"{origin}:bulk", "bans": payload, "sig": tag, "skip": skip}


def stream_ops(r) -> list[str]:  # noqa: ANN001
    return [fields["op"] for _id, fields in r.xrange(PREFIX + "stream")]


def test_a_list_goes_out_as_bulk_entries_and_reaches_every_node(fleet, redis_server):
    a, b, c = fleet
    wait_for(a.bridge._bulk_ok, timeout=10)  # (every node's heartbeat says it reads bulk entries)
    r = redis_server.client()
    before = len(stream_ops(r))
    ips = [f"198.18.50.{i}" for i in range(1, 251)] + [f"2001:db8:50::{i:x}" for i in range(1, 201)]
    with _Closing(a.cli_store()) as st:
        manual_ban_many(st, ips, 3600, "list")
    wait_for(lambda: all(all_enforce([b, c], ip) for ip in ips), timeout=15)
    ops = stream_ops(r)[before:]
    assert ops == ["bans"] * math.ceil(len(ips) / BULK_BANS), ops  # one entry per BULK_BANS, none per ban
    for _id, fields in r.xrange(PREFIX + "stream")[before:]:
        assert len(fields["sig"]) == 22 and fields["origin"] == "edge1" and fields["skip"] == ""
    for n in (b, c):
        st = n.bridge.stats
        assert st.unverified == 0 and st.malformed == 0
        assert st.applied_bans >= len(ips)
        # (the store follows the kernel: a burst is stored in slices after it is enforced)
        wait_for(lambda n=n: {x.ip for x in n.store.active_bans()} >= set(ips), timeout=10)
    assert a.bridge.stats.published >= len(ips) and a.bridge.stats.stale == 0
    # the shared set holds each ban on its own, signed: what a node reads at start
    for ip in ips[:5] + ips[-5:]:
        assert json.loads(r.hget(PREFIX + "bans", ip))["sig"]


def test_forged_and_tampered_bulk_entries_change_nothing(fleet, redis_server):
    r = redis_server.client()
    ips = [f"198.18.51.{i}" for i in range(1, 21)]
    good = signed_bans(ips)
    forged = [
        bulk_fields(signed_bans(ips, None), None),  # no secret at all
        bulk_fields(signed_bans(ips, WRONG), WRONG),  # another fleet's
        bulk_fields(good, SECRET, prefix="other:"),  # signed for another key prefix
        {**bulk_fields(good), "origin": "edge2"},  # the tag moved to another node's name
        {**bulk_fields(good[:10]), "bans": bulk_payload(good)},  # a list grown under a tag of its first half
        {**bulk_fields(good), "sig": ""},
    ]
    for fields in forged:
        r.xadd(PREFIX + "stream", fields)
    sync_marker(fleet, "198.18.51.99")
    for ip in ips:
        assert not enforced_anywhere(fleet, ip), ip
    for n in fleet:
        assert n.bridge.stats.unverified >= len(forged)
        assert all(n.store.get_ban(ip) is None for ip in ips)
    assert all(n.thread.is_alive() for n in fleet)


def test_a_signed_bulk_entry_passes_the_guard_rails_and_bounds_ban_by_ban(fleet, redis_server):
    """What a node of the fleet (or a leaked secret) publishes in a list is held to the same rails as
    a single entry: the allow-list, max_prefix, the node's own addresses, the bounds."""
    r = redis_server.client()
    ok = ["198.18.52.1", "2001:db8:52::1"]
    wide = ["10.0.0.0/8", "2001:db8::/32"]
    bad = json.loads(signed_bans(["198.18.52.2"])[0])
    bad["created"] = 1e300
    payloads = signed_bans(DANGEROUS + wide) + [json.dumps(bad), "[]", json.dumps({"ip": 7})] + signed_bans(ok)
    r.xadd(PREFIX + "stream", bulk_fields(payloads))
    sync_marker(fleet, "198.18.52.99")
    a, b, c = fleet
    for n in fleet:
        assert all(ip in n.enforced() for ip in ok)
        st = n.bridge.stats
        assert st.unverified == 0
        assert st.too_wide >= 4 and st.allowlisted >= 4 and st.own_address >= 2
        assert st.malformed >= 3  # created 1e300, a list for a ban, an address that is a number
    for ip in DANGEROUS + wide + ["198.18.52.2"]:
        assert not enforced_anywhere(fleet, ip), ip


def test_the_publish_script_skips_what_it_refuses_and_nodes_honour_it(redis_server):
    """A ban of a list that loses to what the shared set holds (a newer ban of the same address) is
    not stored by the script and listed in `skip`; the nodes apply the others only."""
    r = redis_server.client()
    script = r.register_script(PUBLISH_LUA)
    now = time.time()
    newer = signed_bans(["198.18.53.2"], created=now, origin="edge8")[0]
    r.hset(PREFIX + "bans", "198.18.53.2", newer)
    ips = ["198.18.53.1", "198.18.53.2", "198.18.53.3"]
    payloads = signed_bans(ips, created=now - 60)
    fields = bulk_fields(payloads)
    args = [PREFIX, 1000, "bans", "", fields["id"], "edge9", fields["bans"], 3600, UNBAN_MEMORY, "sip", fields["sig"],
            "", "", "0", repr(now)]
    for ip, p in zip(ips, payloads):
        args += [ip, json.loads(p)["id"], p, "", ""]
    assert script(args=args) == 2
    assert r.hget(PREFIX + "bans", "198.18.53.2") == newer  # the newer one stays
    assert json.loads(r.hget(PREFIX + "bans", "198.18.53.1"))["created"] == now - 60
    ((eid, flat),) = [(e, [x for kv in f.items() for x in kv]) for e, f in r.xrange(PREFIX + "stream")]
    assert dict(zip(flat[::2], flat[1::2]))["skip"] == "2"
    checked = check_reply([(eid, flat)], Signer(SECRET, PREFIX), time.time())
    assert [c[1][1] for c in checked] == ["198.18.53.1", "198.18.53.3"]
    assert script(args=args) == 0  # published again (a retry): nothing wins twice, no stream entry
    assert r.xlen(PREFIX + "stream") == 1


def test_while_an_older_node_is_heard_from_lists_go_out_one_entry_per_ban(fleet, redis_server):
    a, b, c = fleet
    r = redis_server.client()
    # a node of an older version: its heartbeat says nothing of `wire` (it skips bulk entries)
    r.set(PREFIX + "node:old1", json.dumps({"node": "old1", "heartbeat": time.time()}), ex=3)
    r.zadd(PREFIX + "nodes", {"old1": time.time()})
    wait_for(lambda: not a.bridge._bulk_ok(), timeout=10)
    before = len(stream_ops(r))
    ips = [f"198.18.54.{i}" for i in range(1, 31)]
    with _Closing(a.cli_store()) as st:
        manual_ban_many(st, ips, 3600, "list")
    wait_for(lambda: all(all_enforce([b, c], ip) for ip in ips), timeout=10)
    assert stream_ops(r)[before:] == ["ban"] * len(ips)
    # once it is gone (its heartbeat expired), lists go out in bulk again
    r.delete(PREFIX + "node:old1")
    wait_for(a.bridge._bulk_ok, timeout=10)
    before = len(stream_ops(r))
    ips = [f"198.18.55.{i}" for i in range(1, 31)]
    with _Closing(a.cli_store()) as st:
        manual_ban_many(st, ips, 3600, "list")
    wait_for(lambda: all(all_enforce([b, c], ip) for ip in ips), timeout=10)
    assert stream_ops(r)[before:] == ["bans"]


def test_a_short_list_goes_out_one_entry_per_ban(fleet, redis_server):
    a, b, c = fleet
    wait_for(a.bridge._bulk_ok, timeout=10)
    r = redis_server.client()
    before = len(stream_ops(r))
    ips = [f"198.18.56.{i}" for i in range(1, BULK_MIN)]
    with _Closing(a.cli_store()) as st:
        manual_ban_many(st, ips, 3600, "list")
    wait_for(lambda: all(all_enforce([b, c], ip) for ip in ips), timeout=10)
    assert stream_ops(r)[before:] == ["ban"] * len(ips)


# -- check_bulk, without a fleet ----------------------------------------------------------------------
SIGNER = Signer(SECRET, PREFIX)


def test_check_bulk_refuses_malformed_lists_whole():
    now = time.time()
    good = signed_bans(["198.18.57.1", "198.18.57.2"])
    assert [c[1] for c in check_bulk(bulk_fields(good), SIGNER, now)] == ["198.18.57.1", "198.18.57.2"]
    cases = [
        bulk_fields(good, skip="x"),
        bulk_fields(good, skip="1,,2"),
        {**bulk_fields(good), "bans": 7},
        {**bulk_fields(good), "bans": None},
        {**bulk_fields(good), "skip": ["1"]},
    ]
    big = bulk_fields(signed_bans(["198.18.58.1"]) * (BULK_MAX + 1))
    cases.append(big)
    obj = json.dumps({"ip": "198.18.57.1"})
    cases.append({"op": "bans", "origin": "edge9", "bans": obj,
                  "sig": SIGNER.tag("bans", *bulk_parts("edge9", obj)), "skip": ""})  # signed, but no list
    for fields in cases:
        out = check_bulk(fields, SIGNER, now)
        assert len(out) == 1 and out[0][0] == "malformed", (fields.get("skip"), out)
    unsigned = check_bulk(bulk_fields(good, WRONG), SIGNER, now)
    assert unsigned == [("unverified", "")]
    assert check_bulk(bulk_fields(good, skip="1,2"), SIGNER, now) == []
    # the daemon's own path for an entry it reads itself: the same tuples, as one "bulk" item
    assert check_entry(bulk_fields(good), SIGNER, now) == ("bulk", check_bulk(bulk_fields(good), SIGNER, now))


def test_check_bulk_during_a_rotation():
    now = time.time()
    old = "the-old-fleet-secret-0123456789"
    during = Signer(SECRET, PREFIX, [old], now + 60)
    after = Signer(SECRET, PREFIX, [old], now - 1)
    fields = bulk_fields(signed_bans(["198.18.59.1"], old), old)
    assert check_bulk(fields, during, now)[0][0] == "ban"
    assert check_bulk(fields, after, now) == [("unverified", "")]


@pytest.mark.parametrize("n", [1, 99, 100, 101, 250])
def test_check_reply_lists_every_ban_of_a_bulk_entry_in_order(n):
    now = time.time()
    ips = [f"198.18.60.{i % 250 + 1}" if i < 250 else f"2001:db8:60::{i:x}" for i in range(n)]
    flat = [x for kv in bulk_fields(signed_bans(ips)).items() for x in kv]
    single = signed_bans(["198.18.61.1"])[0]
    entries = [("1-0", ["op", "ban", "ip", "198.18.61.1", "id", "edge9:00000000", "origin", "edge9", "ban", single]),
               ("2-0", flat), ("3-0", ["op", "unban", "ip", "198.18.61.1"])]
    out = check_reply(entries, SIGNER, now)
    assert [eid for eid, _ in out] == ["1-0"] + ["2-0"] * n + ["3-0"]
    assert [c[1] for _, c in out[1:-1]] == ips
    assert out[-1][1][0] == "malformed"


def test_what_a_heartbeat_says_it_reads():
    """A heartbeat is anyone's to write: whatever it holds, the answer is a number and never a crash
    (anything but a plain int `wire` of 2 or more keeps lists one entry per ban)."""
    assert _wire_of(json.dumps({"node": "a", "wire": WIRE})) == WIRE
    assert _wire_of(json.dumps({"node": "a"})) == 1  # (an older version says nothing)
    for bad in ("", "not json", "[]", "7", "null", json.dumps({"wire": "2"}), json.dumps({"wire": 2.0}),
                json.dumps({"wire": True}), "[" * 100_000 + "]" * 100_000, '{"wire": ' * 50_000, b"\xff\xfe", None):
        assert _wire_of(bad) < WIRE, bad
