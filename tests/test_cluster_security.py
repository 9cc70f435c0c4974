"""Fleet mode against a stranger who can write to its Redis (issue 14, part 2).

Three daemons (threads, dry-run enforcers, their own state dirs) share one real redis-server of this
test's own (127.0.0.1, a free port, no persistence, stopped by its PID), all with one `[cluster]
secret`. Entries are then written straight into Redis, as anyone with access to it could: bans and
unbans without a signature or signed with a wrong secret, bans of 0.0.0.0/0, ::/0, loopback, the
node's own address and an allow-listed address (manual or not), events in the score keys, a shared
ban with `created: 1e300`, malformed heartbeats. None of it may change anything on any node; what a
node of the fleet itself publishes still passes the local guard rails (a /8 is refused). Passwords in
the Redis URL never appear in a log, `status`, the store or the heartbeat. Nothing here touches the
kernel.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sipguard.actions import manual_ban
from sipguard.addresses import AllowList, host_addresses
from sipguard.cluster.connection import redacted, scrub
from sipguard.cluster.guard import FleetGuard
from sipguard.cluster.signing import Signer, event_parts, unban_parts
from sipguard.cluster.wire import Unverified, ban_payload, parse_ban, parse_unban, plain_text
from sipguard.config import ClusterConfig, Config, load_config
from sipguard.errors import ConfigError
from sipguard.model import Ban
from test_cluster import REDIS, Node, RedisServer, _Closing, all_enforce, auth_failed  # noqa: F401 (REDIS: skips/fails there)
from waiting import wait_for

SECRET = "fleet-secret-0123456789abcdef"
WRONG = "not-the-fleet-secret-9876543210"
PREFIX = "sgtest:"
OWN = "198.18.97.1"  # every node's configured own address
ALLOWED_NET = "198.18.98.0/24"
ALLOW = AllowList([], include_host=False)


class SecureNode(Node):
    """A test_cluster Node with the fleet's secret, an own address and an allow-list."""

    def __init__(self, tmp: Path, url: str, name: str, **cluster) -> None:
        super().__init__(tmp, url, name)
        self.raw_cfg["cluster"].update({"secret": SECRET, "own_addresses": [OWN], **cluster})
        self.raw_cfg["allowlist"]["cidrs"] = [ALLOWED_NET]
        self.cfg = Config.model_validate(self.raw_cfg)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fleet(tmp_path, redis_server):
    nodes = []
    try:
        for i in (1, 2, 3):
            nodes.append(SecureNode(tmp_path, redis_server.url, f"edge{i}").start())
        wait_for(lambda: all(n.bridge.in_sync() for n in nodes))
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def enforced_anywhere(nodes, ip: str) -> bool:
    return any(ip in n.enforced() for n in nodes)


def stored_anywhere(nodes, ip: str) -> bool:
    return any(n.store.get_ban(ip) is not None for n in nodes)


def forged_ban(ip: str, secret: str | None, manual: bool, created: float | None = None, **extra) -> str:
    now = time.time() if created is None else created
    ban = Ban(ip=ip, reason="forged", created=now, expires=None, score=99.0, offence=1, manual=manual)
    payload = json.loads(ban_payload(ban, f"evil:{ip.replace('/', '_')}{int(manual)}", "evil",
                                     None if secret is None else Signer(secret, PREFIX)))
    payload.update(extra)
    return json.dumps(payload)


def sync_marker(nodes, ip: str) -> None:
    """A real ban published after the forged entries: once every node holds it, every node has read them."""
    with _Closing(nodes[0].cli_store()) as st:
        manual_ban(st, ip, 3600, "marker", ALLOW)
    wait_for(lambda: all_enforce(nodes, ip), timeout=5)


DANGEROUS = ["0.0.0.0/0", "::/0", "127.0.0.1", "::1", OWN, "198.18.98.7", ALLOWED_NET, "198.18.97.0/24"]


# -- forged bans ------------------------------------------------------------------------------------
def test_forged_bans_on_the_stream_and_in_the_shared_set_change_nothing(fleet, redis_server):
    r = redis_server.client()
    targets = DANGEROUS + ["198.18.30.1", "198.18.30.0/24", "2001:db8:30::/48"]
    n = 0
    for ip in targets:
        for secret in (None, WRONG):
            for manual in (False, True):
                payload = forged_ban(ip, secret, manual)
                r.xadd(PREFIX + "stream", {"op": "ban", "ip": ip, "id": "evil:1", "origin": "evil", "ban": payload})
                r.hset(PREFIX + "bans", ip, payload)
                n += 1
    sync_marker(fleet, "198.18.30.99")
    for node in fleet:
        assert node.bridge.stats.unverified >= n
        assert node.bridge.stats.applied_bans == (0 if node is fleet[0] else 1)  # only the marker
    for ip in targets:
        assert not enforced_anywhere(fleet, ip) and not stored_anywhere(fleet, ip), ip
    # a restart reads the shared set (the snapshot): still nothing of it is applied
    fleet[1].restart()
    wait_for(lambda: fleet[1].bridge.in_sync())
    for ip in targets:
        assert not enforced_anywhere(fleet, ip) and not stored_anywhere(fleet, ip), ip
    assert fleet[1].bridge.stats.unverified >= len(targets)
    assert all(n.thread.is_alive() for n in fleet)
    a = fleet[0]
    wait_for(lambda: '"unverified": 0' not in (a.store.get_meta("cluster_status") or '"unverified": 0'))
    out = subprocess.run([sys.executable, "-m", "sipguard", "--config", str(a.config_file()), "--state-dir",
                          str(a.dir / "state"), "status"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "refused from the fleet: unverified=" in out.stdout, out.stdout


def test_signed_bans_of_protected_addresses_are_refused_by_every_other_node(fleet, redis_server):
    """A node of the fleet (or one whose secret leaked) publishes what no node may hold: refused."""
    a, b, c = fleet
    r = redis_server.client()
    for ip in DANGEROUS + ["10.0.0.0/8", "2001:db8::/32"]:
        for manual in (False, True):
            payload = forged_ban(ip, SECRET, manual)
            r.xadd(PREFIX + "stream", {"op": "ban", "ip": ip, "id": "x", "origin": "evil", "ban": payload})
    sync_marker(fleet, "198.18.31.99")
    for ip in DANGEROUS + ["10.0.0.0/8", "2001:db8::/32"]:
        assert not enforced_anywhere(fleet, ip), ip
    for n in fleet:
        st = n.bridge.stats
        assert st.too_wide >= 2 * 4  # 0.0.0.0/0, ::/0, 10.0.0.0/8, 2001:db8::/32; manual or not
        assert st.allowlisted >= 2 * 4  # loopback twice, the allow-listed address and network
        assert st.own_address >= 2 * 2  # the own address and a network covering it
        assert st.unverified == 0


def test_a_list_banned_on_one_node_is_signed_and_reaches_every_other(fleet):
    """`sipguard ban --from-file` (many bans at once: the bridge publishes them in bulk, as it does the
    bans adopted at a start) is signed like a single ban: every other node verifies and holds it all
    (the bulk path once published them unsigned, so a fleet with a secret refused every one)."""
    from sipguard.actions import manual_ban_many

    a, b, c = fleet
    ips = [f"198.18.44.{i}" for i in range(1, 41)]
    with _Closing(a.cli_store()) as st:
        manual_ban_many(st, ips, 3600, "list")
    wait_for(lambda: all(all_enforce([b, c], ip) for ip in ips), timeout=10)
    for n in (b, c):
        assert n.bridge.stats.unverified == 0 and n.bridge.stats.malformed == 0
        # (the store follows the kernel: a list is stored in slices after it is enforced)
        wait_for(lambda n=n: {x.ip for x in n.store.active_bans()} >= set(ips), timeout=10)


def test_a_slash_8_published_by_another_node_is_refused(fleet):
    a, b, c = fleet
    with _Closing(a.cli_store()) as st:
        manual_ban(st, "10.0.0.0/8", 3600, "too wide", ALLOW)  # a's own CLI: a holds it, the others refuse
    wait_for(lambda: "10.0.0.0/8" in a.enforced())
    wait_for(lambda: b.bridge.stats.too_wide >= 1 and c.bridge.stats.too_wide >= 1, timeout=5)
    assert "10.0.0.0/8" not in b.enforced() and "10.0.0.0/8" not in c.enforced()
    with _Closing(a.cli_store()) as st:  # a /16 is the widest accepted by default
        manual_ban(st, "198.19.0.0/16", 3600, "wide", ALLOW)
    wait_for(lambda: all_enforce(fleet, "198.19.0.0/16"))


# -- forged unbans ----------------------------------------------------------------------------------
def test_forged_unbans_change_nothing(fleet, redis_server):
    a, b, c = fleet
    ip = "198.18.32.1"
    with _Closing(a.cli_store()) as st:
        manual_ban(st, ip, 3600, "real", ALLOW)
    wait_for(lambda: all_enforce(fleet, ip))
    r = redis_server.client()
    later = repr(time.time() + 5)
    wrong = Signer(WRONG, PREFIX)
    for op, target in (("unban", ip), ("unban_all", "*")):
        r.xadd(PREFIX + "stream", {"op": op, "ip": target, "id": "evil:u1", "origin": "evil", "at": later})
        r.xadd(PREFIX + "stream", {"op": op, "ip": target, "id": "evil:u2", "origin": "evil", "at": later,
                                   "sig": wrong.tag(op, *unban_parts(op, target, "evil:u2", "evil", later))})
    sync_marker(fleet, "198.18.32.99")
    assert all_enforce(fleet, ip)
    assert all(n.bridge.stats.unverified >= 4 for n in fleet)
    # the stranger deletes the shared ban: a node that comes back and reads the set keeps its ban
    # (a missing entry is an unban only with a signed tombstone)
    c.stop()
    r.hdel(PREFIX + "bans", ip)
    r.hset(PREFIX + "unbans", ip, f"{later}|unban|evil:u3|evil|AAAAAAAAAAAAAAAAAAAAAA")
    c.start()
    wait_for(lambda: c.bridge.in_sync())
    assert c.bridge.stats.dropped_by_snapshot == 0
    assert ip in c.enforced() and c.store.get_ban(ip) is not None
    # while a real unban, signed by a node, still lifts it everywhere
    r2 = subprocess.run([sys.executable, "-m", "sipguard", "--config", str(secure_config_file(b)), "--state-dir",
                         str(b.dir / "state"), "unban", ip], capture_output=True, text=True, timeout=30)
    assert r2.returncode == 0, r2.stderr
    wait_for(lambda: not enforced_anywhere(fleet, ip), timeout=5)


def secure_config_file(node: Node) -> Path:
    p = node.config_file()
    p.write_text(p.read_text() + f'secret = "{SECRET}"\n')
    os.chmod(p, 0o600)
    return p


# -- forged evidence --------------------------------------------------------------------------------
def test_forged_events_in_the_score_keys_decide_nothing(fleet, redis_server):
    a, b, c = fleet
    r = redis_server.client()
    ip = "198.18.33.1"
    now = time.time()
    wrong = Signer(WRONG, PREFIX)
    members = {f"evil.{k}|1.0|": now - k for k in range(3)}  # unsigned
    for k in range(3):  # signed with a wrong secret
        uid, at = f"evil.w{k}", f"{now - k:.6f}"
        members[f"{uid}|1.0|{wrong.tag('ev', *event_parts(ip, 'auth', uid, '1.0', at))}"] = float(at)
    members["evil.big|1e308|"] = now
    r.zadd(f"{PREFIX}s:{ip}:auth", members)
    for k in range(5):  # forged offences (a wrong tag, no tag) would escalate the ban time
        r.zadd(f"{PREFIX}off:{ip}", {f"evil:o{k}|AAAAAAAAAAAAAAAAAAAAAA": now - 60 * k, f"evil:p{k}": now - 61 * k})
    a.write(auth_failed(ip))  # one real failure: with the forged ones, far over the threshold of 3
    wait_for(lambda: a.bridge.stats.scored >= 1)
    time.sleep(0.3)
    assert not enforced_anywhere(fleet, ip) and not stored_anywhere(fleet, ip)
    assert a.bridge.stats.forged_events >= 7
    assert a.bridge.stats.cluster_bans == 0
    left = r.zrange(f"{PREFIX}s:{ip}:auth", 0, -1)
    assert len(left) == 1 and left[0].startswith("edge1.")  # the forged members were removed, the real one kept
    # real events still count: two more (on two other nodes) make three verified ones
    b.write(auth_failed(ip))
    wait_for(lambda: b.bridge.stats.scored >= 1)
    c.write(auth_failed(ip))
    wait_for(lambda: all_enforce(fleet, ip), timeout=5)
    ban = a.store.get_ban(ip)
    assert ban.score == 3.0 and ban.offence == 1  # forged offences did not escalate it
    assert 3590 < ban.expires - ban.created <= 3600
    assert sum(n.bridge.stats.cluster_bans for n in fleet) == 1


def test_a_forged_shared_ban_does_not_stop_scoring(fleet, redis_server):
    """A stranger marks an attacker as banned in the shared set (so the script skips its events):
    the node sees the mark does not verify and scores the events itself."""
    a, b, c = fleet
    r = redis_server.client()
    ip = "198.18.34.1"
    r.hset(PREFIX + "bans", ip, forged_ban(ip, None, manual=True))
    a.write(auth_failed(ip) * 3)
    wait_for(lambda: ip in a.enforced(), timeout=5)
    assert a.store.get_ban(ip).reason.startswith("auth:")


# -- bounds -----------------------------------------------------------------------------------------
def test_created_1e300_and_out_of_bounds_values_are_rejected_without_a_crash(fleet, redis_server, tmp_path):
    a, b, c = fleet
    r = redis_server.client()
    signer = Signer(SECRET, PREFIX)
    bad = {
        "198.18.35.1": {"created": 1e300},
        "198.18.35.2": {"created": time.time() + 3 * 86400},  # days ahead of every clock
        "198.18.35.3": {"expires": time.time() + 200 * 365 * 86400},  # past 100 years
        "198.18.35.4": {"score": float("inf")},
        "198.18.35.5": {"offence": 1.5},
        "198.18.35.6": {"origin": "evil\nnode"},
        "198.18.35.7": {"manual": "yes"},
    }
    for ip, change in bad.items():
        d = json.loads(forged_ban(ip, None, manual=True))
        d.update(change)
        d["sig"] = signer.tag("ban", *(d.get(k) for k in ("ip", "reason", "created", "expires", "score", "offence",
                                                          "manual", "id", "origin")))
        payload = json.dumps(d)
        assert isinstance(d["sig"], str)
        r.xadd(PREFIX + "stream", {"op": "ban", "ip": ip, "id": "x", "origin": "x", "ban": payload})
        r.hset(PREFIX + "bans", ip, payload)
    # signed but with a reason full of terminal escapes: applied, the reason plain text
    d = json.loads(forged_ban("198.18.35.9", SECRET, manual=True))
    d["reason"] = "\x1b[2J\x1b[31mred\r\nfake line\u202e"
    d["sig"] = signer.tag("ban", *(d.get(k) for k in ("ip", "reason", "created", "expires", "score", "offence",
                                                      "manual", "id", "origin")))
    r.xadd(PREFIX + "stream", {"op": "ban", "ip": "198.18.35.9", "id": "x", "origin": "x", "ban": json.dumps(d)})
    sync_marker(fleet, "198.18.35.99")
    wait_for(lambda: all_enforce(fleet, "198.18.35.9"))
    for ip in bad:
        assert not enforced_anywhere(fleet, ip) and not stored_anywhere(fleet, ip), ip
    assert all(n.bridge.stats.malformed >= len(bad) for n in fleet)
    assert b.store.get_ban("198.18.35.9").reason == "[2J[31mredfake line"
    # a restart reads the same values from the shared set: refused again, and `list` works
    b.restart()
    wait_for(lambda: b.bridge.in_sync())
    out = subprocess.run([sys.executable, "-m", "sipguard", "--config", str(b.config_file()), "--state-dir",
                          str(b.dir / "state"), "list", "--json"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    listed = {x["ip"]: x for x in json.loads(out.stdout)}
    assert not set(bad) & set(listed) and "\x1b" not in out.stdout
    assert "198.18.35.9" in listed


def test_json_nested_deeper_than_python_recursion_is_malformed_not_a_stalled_reader(fleet, redis_server):
    """Values nested thousands deep (orjson refuses them, Python's json recurses): on the stream, in a
    bulk entry and in the shared ban and user-ban sets they are counted as malformed; the readers keep
    reading and a restarted node still reads its snapshot (a RecursionError once made the reader's
    process reconnect for ever on such a shared ban)."""
    r = redis_server.client()
    deep = "[" * 2000 + "]" * 2000  # (4,000 characters: under the 4,096 a ban json may have)
    r.xadd(PREFIX + "stream", {"op": "ban", "ip": "198.18.36.1", "id": "x:1", "origin": "x", "ban": deep})
    r.xadd(PREFIX + "stream", {"op": "bans", "origin": "x", "id": "x:2", "bans": deep, "sig": "", "skip": ""})
    r.xadd(PREFIX + "stream", {"op": "userban", "ip": "198.18.36.2", "id": "x:3", "origin": "x", "ban": deep})
    r.hset(PREFIX + "bans", "198.18.36.3", deep)
    r.hset(PREFIX + "ubans", "198.18.36.4|0123456789abcdef", deep)
    sync_marker(fleet, "198.18.36.99")
    for n in fleet[1:]:
        assert n.bridge.stats.malformed >= 2 and n.bridge.reader.connected
    fleet[1].restart()
    wait_for(lambda: fleet[1].bridge.in_sync(), timeout=10)
    assert fleet[1].bridge.stats.malformed >= 1  # (the shared ban, read with the snapshot)
    sync_marker(fleet, "198.18.36.98")
    assert all(n.thread.is_alive() for n in fleet)
    for ip in ("198.18.36.1", "198.18.36.2", "198.18.36.3", "198.18.36.4"):
        assert not enforced_anywhere(fleet, ip)


def test_a_malformed_heartbeat_never_crashes_status(fleet, redis_server):
    a = fleet[0]
    r = redis_server.client()
    r.set(PREFIX + "node:evil1", "{not json")
    r.set(PREFIX + "node:evil2", "[1, 2, 3]")
    r.set(PREFIX + "node:evil3", json.dumps({"outbox": "lots", "in_sync": "yes", "heartbeat": 1e300}))
    r.set(PREFIX + "node:\x1b[2Jevil4\r\n", "null")
    r.set(PREFIX + "node:evil5", "[" * 30000 + "]" * 30000)  # (json nested deeper than Python's recursion)
    r.zadd(PREFIX + "nodes", {"evil1": float("inf"), "evil2": time.time() - 1e-300, "evil3": 1e300,
                              "\x1b[2Jevil4\r\n": time.time(), "evil5": time.time()})
    wait_for(lambda: a.store.get_meta("cluster_status") is not None)
    for args in (["status"], ["status", "--json"]):
        out = subprocess.run([sys.executable, "-m", "sipguard", "--config", str(a.config_file()), "--state-dir",
                              str(a.dir / "state"), *args], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "\x1b" not in out.stdout and "Traceback" not in out.stderr
    info = json.loads(out.stdout)["cluster"]  # (strict JSON: no Infinity)
    json.loads(out.stdout, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    nodes = {n["node"]: n for n in info["nodes"]}
    assert nodes["evil1"]["age"] is None and nodes["evil3"]["in_sync"] is False
    assert nodes["evil3"]["outbox"] is None and "[2Jevil4" in nodes and nodes["evil5"]["in_sync"] is False
    assert nodes["edge1"]["in_sync"] and nodes["edge1"]["alive"]


# -- secrets stay secret ----------------------------------------------------------------------------
def test_passwords_never_appear_in_logs_status_store_or_heartbeat(tmp_path, caplog):
    password = "Pw-user-info-7f3a9c"
    server = RedisServer(tmp_path)
    server.start()
    try:
        r = server.client()
        r.config_set("requirepass", password)
        url = f"redis://:{password}@127.0.0.1:{server.port}/0?password={password}"
        # (redis-py takes ?password= over the user-info; both must be hidden)
        caplog.set_level(logging.DEBUG)
        node = SecureNode(tmp_path, url, "edge1")
        node.start()
        try:
            wait_for(lambda: node.bridge.in_sync())
            with _Closing(node.cli_store()) as st:
                manual_ban(st, "198.18.36.1", 3600, "x", ALLOW)
            wait_for(lambda: node.bridge.stats.published >= 1)
            import redis

            auth = redis.Redis(host="127.0.0.1", port=server.port, password=password, decode_responses=True)
            wait_for(lambda: auth.get(PREFIX + "node:edge1") is not None)
            beat = auth.get(PREFIX + "node:edge1")
            cfg_file = node.dir / "sipguard.toml"
            cfg_file.write_text(f'[enforce]\nbackend = "dryrun"\n[cluster]\nredis_url = "{url}"\n'
                                f'node_name = "edge1"\nkey_prefix = "{PREFIX}"\nsocket_timeout = 0.5\n')
            outs = [subprocess.run([sys.executable, "-m", "sipguard", "--config", str(cfg_file), "--state-dir",
                                    str(node.dir / "state"), *a], capture_output=True, text=True, timeout=30)
                    for a in (["status"], ["status", "--json"])]
            assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
            assert json.loads(outs[1].stdout)["cluster"]["reachable"]
            server.stop()  # the outage warning names the URL
            wait_for(lambda: any("unreachable" in rec.getMessage() for rec in caplog.records), timeout=5)
            down = subprocess.run([sys.executable, "-m", "sipguard", "--config", str(cfg_file), "--state-dir",
                                   str(node.dir / "state"), "status"], capture_output=True, text=True, timeout=30)
        finally:
            node.stop()
    finally:
        server.stop()
    texts = {"logs": "\n".join(rec.getMessage() for rec in caplog.records), "heartbeat": beat,
             "status": outs[0].stdout + outs[0].stderr, "status --json": outs[1].stdout + outs[1].stderr,
             "status (down)": down.stdout + down.stderr}
    state = node.dir / "state"
    texts["store"] = b"".join(p.read_bytes() for p in state.iterdir() if p.is_file()).decode("latin-1")
    assert "***" in texts["heartbeat"] and "***" in texts["status"]
    for where, text in texts.items():
        assert password not in text, where
    assert any("unreachable" in rec.getMessage() for rec in caplog.records)


def test_redaction_of_every_url_form():
    cases = {
        "redis://:s3cret@h:6379/0": "redis://:***@h:6379/0",
        "redis://user:s3cret@h/0": "redis://user:***@h/0",
        "rediss://h:6380/0?password=s3cret&ssl_ca_certs=/etc/ca.pem": "rediss://h:6380/0?password=***&ssl_ca_certs=/etc/ca.pem",
        "redis+sentinel://:s3cret@s1:26379,s2:26379/mymaster/0?sentinel_password=s3cret":
            "redis+sentinel://:***@s1:26379,s2:26379/mymaster/0?sentinel_password=***",
        "unix:///run/redis.sock?password=s3cret": "unix:///run/redis.sock?password=***",
        "redis://h:6379/0": "redis://h:6379/0",
    }
    for url, want in cases.items():
        assert redacted(url) == want
        if "s3cret" in url:
            assert "s3cret" not in scrub(f"Error connecting to {url}: s3cret", url)
    cfg = ClusterConfig(redis_url="redis://:s3cret@h/0", secret="x" * 16)
    assert "s3cret" not in repr(cfg) and "x" * 16 not in repr(cfg)


# -- signatures, rotation, config -------------------------------------------------------------------
def test_signatures_cover_every_field_and_the_prefix():
    s = Signer(SECRET, PREFIX)
    ban = Ban("198.18.37.1", "auth:x", 1_700_000_000.0, 1_700_003_600.0, 3.0, 1, False)
    payload = ban_payload(ban, "edge1:1", "edge1", s)
    assert parse_ban(payload, s, now=1_700_000_001.0)[0] == ban
    for field, value in (("ip", "198.18.37.2"), ("expires", 1_700_007_200.0), ("manual", True), ("origin", "edge2"),
                         ("reason", "auth:y"), ("id", "edge1:2"), ("offence", 2), ("score", 4.0)):
        d = json.loads(payload)
        d[field] = value
        with pytest.raises(Unverified):
            parse_ban(json.dumps(d), s, now=1_700_000_001.0)
    with pytest.raises(Unverified):  # another fleet (prefix) on the same Redis
        parse_ban(payload, Signer(SECRET, "other:"), now=1_700_000_001.0)
    with pytest.raises(Unverified):
        parse_ban(ban_payload(ban, "edge1:1", "edge1"), s)  # unsigned
    assert parse_ban(ban_payload(ban, "edge1:1", "edge1"), Signer(None, PREFIX))[0] == ban  # no secret: as before
    at = "1700000000.5"
    fields = {"op": "unban", "ip": "198.18.37.1", "id": "edge1:u", "origin": "edge1", "at": at,
              "sig": s.tag("unban", *unban_parts("unban", "198.18.37.1", "edge1:u", "edge1", at))}
    assert parse_unban(fields, s, now=1_700_000_001.0)[1] == "198.18.37.1"
    with pytest.raises(Unverified):
        parse_unban({**fields, "ip": "198.18.37.2"}, s, now=1_700_000_001.0)
    assert plain_text("a\x1b[31m\r\nb\u202e" + "x" * 500) == "a[31mb" + "x" * 194


def test_rotation_overlap():
    old, new = "old-secret-0123456789", "new-secret-0123456789"
    t = 1_700_000_000.0
    signed_old = Signer(old, PREFIX).tag("ban", "x")
    signed_new = Signer(new, PREFIX).tag("ban", "x")
    rotating = Signer(new, PREFIX, [old], previous_until=t + 3600)
    assert rotating.tag("ban", "x") == signed_new  # signs with the new secret
    assert rotating.verify(signed_old, "ban", "x", now=t) and rotating.verify(signed_new, "ban", "x", now=t)
    assert not rotating.verify(signed_old, "ban", "x", now=t + 3601)  # the overlap is over
    assert rotating.verify(signed_new, "ban", "x", now=t + 3601)
    assert not Signer(new, PREFIX).verify(signed_old, "ban", "x", now=t)


def test_rotation_overlap_between_running_nodes(tmp_path, redis_server):
    """Mid-rotation: edge1 already signs with the new secret, edge2 still with the old one, each
    accepting the other's during the overlap; edge3's overlap is over: it refuses the old secret."""
    old, new = "old-secret-0123456789", "new-secret-0123456789"
    soon = time.time() + 3600
    a = SecureNode(tmp_path, redis_server.url, "edge1", secret=new, secret_previous=[old], secret_previous_until=soon)
    b = SecureNode(tmp_path, redis_server.url, "edge2", secret=old, secret_previous=[new], secret_previous_until=soon)
    c = SecureNode(tmp_path, redis_server.url, "edge3", secret=new, secret_previous=[old],
                   secret_previous_until=time.time() - 1)
    nodes = [a.start(), b.start(), c.start()]
    try:
        wait_for(lambda: all(n.bridge.in_sync() for n in nodes))
        with _Closing(a.cli_store()) as st:
            manual_ban(st, "198.18.38.1", 3600, "new", ALLOW)
        with _Closing(b.cli_store()) as st:
            manual_ban(st, "198.18.38.2", 3600, "old", ALLOW)
        wait_for(lambda: {"198.18.38.1", "198.18.38.2"} <= a.enforced() & b.enforced(), timeout=5)
        wait_for(lambda: "198.18.38.1" in c.enforced() and c.bridge.stats.unverified >= 1, timeout=5)
        assert "198.18.38.2" not in c.enforced()
        # scoring across the rotation: events signed with either secret count on edge1 and edge2
        a.write(auth_failed("198.18.38.3"))
        wait_for(lambda: a.bridge.stats.scored >= 1)
        b.write(auth_failed("198.18.38.3") * 2)
        wait_for(lambda: all("198.18.38.3" in n.enforced() for n in (a, b)), timeout=5)
        assert a.bridge.stats.forged_events == b.bridge.stats.forged_events == 0
    finally:
        for n in nodes:
            n.stop()


def test_guard_rails_unit():
    cfg = ClusterConfig(redis_url="redis://h/0", own_addresses=["203.0.113.7"])
    g = FleetGuard(cfg, AllowList(["192.0.2.0/24"], include_host=False), own=["198.51.100.1"],
                   servers=["198.18.50.5", "2001:db8:50::5"])
    assert g.refusal("198.18.60.1") is None and g.refusal("198.19.0.0/16") is None
    assert g.refusal("2001:db8:60::/48") is None
    want = {"0.0.0.0/0": "too_wide", "::/0": "too_wide", "10.0.0.0/8": "too_wide", "2001:db8::/47": "too_wide",
            "127.0.0.1": "allowlisted", "127.0.0.0/16": "allowlisted", "192.0.2.9": "allowlisted",
            "192.0.0.0/16": "allowlisted", "192.0.2.128/25": "allowlisted", "198.51.100.1": "own_address",
            "198.51.100.0/24": "own_address", "203.0.113.7": "own_address", "198.18.0.0/16": "redis_server", "198.18.50.0/24": "redis_server",
            "2001:db8:50::/64": "redis_server", "2001:db8:50::5": "redis_server"}
    for target, reason in want.items():
        assert g.refusal(target) == reason, target
    real = FleetGuard(cfg, AllowList([], include_host=False))  # this host's own addresses, from the kernel
    for addr in host_addresses():
        assert real.refusal(addr) in ("own_address", "allowlisted"), addr
    others = [a for a in host_addresses() if not a.startswith("127.") and a != "::1"]
    assert all(real.refusal(a) == "own_address" for a in others), others  # (loopback is allow-listed first)
    wide = FleetGuard(ClusterConfig(redis_url="redis://h/0", max_prefix_v4=8), AllowList([], include_host=False),
                      own=[])
    assert wide.refusal("10.0.0.0/8") is None and wide.refusal("10.0.0.0/7") == "too_wide"


def test_cluster_secret_config(tmp_path):
    f = tmp_path / "secret"
    f.write_text("a-secret-from-a-file-0123\n")
    os.chmod(f, 0o644)
    with pytest.raises(Exception, match="readable or writable by others"):
        ClusterConfig(redis_url="redis://h/0", secret_file=f)
    os.chmod(f, 0o600)
    cfg = ClusterConfig(redis_url="redis://h/0", secret_file=f)
    assert cfg.secrets() == ("a-secret-from-a-file-0123", [], None)
    with pytest.raises(Exception, match="not both"):
        ClusterConfig(redis_url="redis://h/0", secret_file=f, secret="x" * 16)
    with pytest.raises(Exception, match="at least 16"):
        ClusterConfig(redis_url="redis://h/0", secret="short")
    with pytest.raises(Exception, match="secret_previous_until"):
        ClusterConfig(redis_url="redis://h/0", secret="x" * 16, secret_previous=["y" * 16])
    c = ClusterConfig(redis_url="redis://h/0", secret="x" * 16, secret_previous=["y" * 16],
                      secret_previous_until="2026-12-31T00:00:00Z")
    assert c.secrets()[2] == 1798675200.0
    toml = tmp_path / "sipguard.toml"
    toml.write_text(f'[cluster]\nredis_url = "redis://h/0"\nsecret_file = "{tmp_path / "missing"}"\n')
    with pytest.raises(ConfigError, match="cannot read the secret file"):
        load_config(toml)
    toml.write_text(f'[cluster]\nredis_url = "redis://h/0"\nsecret = "{SECRET}"\n')
    os.chmod(toml, 0o644)
    with pytest.raises(ConfigError, match="world-readable"):
        load_config(toml)
    os.chmod(toml, 0o640)
    assert load_config(toml).cluster.secrets()[0] == SECRET


def test_fleet_mode_without_a_secret_warns_at_start(tmp_path, redis_server, caplog):
    caplog.set_level(logging.WARNING, logger="sipguard.cluster")
    node = Node(tmp_path, redis_server.url, "edge1").start()
    try:
        assert any("no [cluster] secret" in r.getMessage() for r in caplog.records)
    finally:
        node.stop()
    caplog.clear()
    node = SecureNode(tmp_path, redis_server.url, "edge2").start()
    try:
        assert not any("no [cluster] secret" in r.getMessage() for r in caplog.records)
    finally:
        node.stop()
