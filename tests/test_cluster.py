"""Fleet mode: three (or four) daemons sharing one real redis-server, each with its own state dir,
log file and dry-run enforcer.

The redis-server is this test's own: 127.0.0.1, a free port, its own temp dir, no persistence, and it
is stopped by its PID. Nothing here touches the host's kernel: the one test with real kernel backends
(the office's user ban across daemons) runs each `sipguard run` in a network namespace of its own
(PID-unique `sgf-` names, deleted afterwards), with redis-server and Kamailio's RPC on UNIX sockets.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from sipguard.actions import manual_ban, manual_unban
from sipguard.addresses import AllowList
from sipguard.config import Config
from sipguard.wiring import build_daemon
from sipguard.enforce.dryrun import DryRunEnforcer
from sipguard.model import Event, EventKind
from sipguard.store import Store
from waiting import wait_for

REDIS = shutil.which("redis-server")
if REDIS is None:
    if os.geteuid() == 0:  # CI runs as root after `make setup` installed it: never skip there
        pytest.fail("redis-server is not installed (the Makefile's APT_PACKAGES install it)", pytrace=False)
    pytest.skip("redis-server is not installed", allow_module_level=True)

ALLOW = AllowList([], include_host=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private redis-server: 127.0.0.1 only, own dir, no persistence; killed by PID."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "redis"
        self.dir.mkdir(exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.proc is None
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
             "--appendonly", "no", "--protected-mode", "yes", "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=2)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def syslog(text: str) -> str:
    return f"{datetime.now().strftime('%b %d %H:%M:%S')} edge kamailio[4242]: {text}\n"


def auth_failed(ip: str) -> str:
    return syslog(f"NOTICE: <script>: auth failed for user 1000 from {ip}:5060 method REGISTER")


def success(ip: str) -> str:
    return syslog(f"NOTICE: <script>: REGISTER success for user 1000 from {ip}:5060")




def cluster_cfg(url: str, name: str, prefix: str = "sgtest:") -> dict:
    return {"allowlist": {"include_host_addresses": False}, "daemon": {"control_interval": 0.05},
            "enforce": {"backend": "dryrun"},
            "cluster": {"redis_url": url, "node_name": name, "key_prefix": prefix, "heartbeat_interval": 0.2,
                        "node_timeout": 3, "socket_timeout": 0.5, "retry_interval": 0.2}}


class Node:
    """One sipguard daemon on a thread: its own log file, state dir and dry-run enforcer."""

    def __init__(self, tmp: Path, url: str, name: str) -> None:
        self.name = name
        self.dir = tmp / name
        self.dir.mkdir(exist_ok=True)
        self.log = self.dir / "kamailio.log"
        self.log.touch()
        self.raw_cfg = cluster_cfg(url, name)
        self.cfg = Config.model_validate(self.raw_cfg)
        self.enforcer = DryRunEnforcer()
        self.store: Store | None = None
        self.daemon: Daemon | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> Node:
        self.store = Store.open_state_dir(self.dir / "state")
        self.daemon = build_daemon(self.cfg, self.store, self.enforcer, logs=[str(self.log)])
        self.thread = threading.Thread(target=self.daemon.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.daemon.ready.is_set())
        return self

    def stop(self) -> None:
        if self.thread is None:
            return
        self.daemon.stop()
        self.thread.join(15)
        assert not self.thread.is_alive()
        self.store.close()
        self.thread = None

    @property
    def bridge(self):
        return self.daemon.parts.fleet

    def write(self, *lines: str) -> None:
        with self.log.open("a") as f:
            f.write("".join(lines))

    def enforced(self) -> set[str]:
        return {e.ip for e in self.enforcer.entries()}

    def cli_store(self) -> Store:
        return Store.open_state_dir(self.dir / "state")

    def ban_rows(self, ip: str) -> list[tuple]:
        with _Closing(self.cli_store()) as st:
            return st.conn.execute("SELECT action, expires FROM ban_log WHERE ip = ? ORDER BY id", (ip,)).fetchall()

    def config_file(self) -> Path:
        p = self.dir / "sipguard.toml"
        c = self.raw_cfg["cluster"]
        p.write_text(
            '[enforce]\nbackend = "dryrun"\n[allowlist]\ninclude_host_addresses = false\n'
            f'[cluster]\nredis_url = "{c["redis_url"]}"\nnode_name = "{c["node_name"]}"\n'
            f'key_prefix = "{c["key_prefix"]}"\nsocket_timeout = 0.5\n')
        return p


class _Closing:
    def __init__(self, store: Store) -> None:
        self.store = store

    def __enter__(self) -> Store:
        return self.store

    def __exit__(self, *exc) -> None:
        self.store.close()


@pytest.fixture
def fleet(tmp_path, redis_server):
    nodes = [Node(tmp_path, redis_server.url, f"edge{i}").start() for i in (1, 2, 3)]
    try:
        wait_for(lambda: all(n.bridge.in_sync() for n in nodes))
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def all_enforce(nodes, ip: str) -> bool:
    return all(ip in n.enforced() for n in nodes)


def none_enforce(nodes, ip: str) -> bool:
    return not any(ip in n.enforced() for n in nodes)


# -- scoring ------------------------------------------------------------------------------------
def test_spray_across_three_nodes_bans_on_all(fleet):
    ip = "198.18.10.1"
    for n in fleet:  # one failure per node: under every node's threshold of 3
        n.write(auth_failed(ip))
        wait_for(lambda: n.bridge.stats.scored >= 1)
    wait_for(lambda: all_enforce(fleet, ip), timeout=15)  # (speed is the bench's; here: it happens)
    # the ban book writes the kernel first and the store in the batch's transaction after it
    wait_for(lambda: all(n.store.get_ban(ip) is not None for n in fleet))
    bans = [n.store.get_ban(ip) for n in fleet]
    assert len({(b.created, b.expires) for b in bans}) == 1  # the same absolute expiry everywhere
    assert bans[0].reason.startswith("auth:") and bans[0].score == 3 and not bans[0].manual
    assert 3590 < bans[0].expires - bans[0].created <= 3600
    assert sum(n.bridge.stats.cluster_bans for n in fleet) == 1  # decided once, cluster-wide
    time.sleep(0.3)
    for n in fleet:
        assert [a for a, _ in n.ban_rows(ip)] == ["ban"]  # applied once on every node


def test_two_failures_over_two_nodes_do_not_ban_and_success_resets(fleet):
    a, b, c = fleet
    ip = "198.18.10.2"
    a.write(auth_failed(ip))
    b.write(auth_failed(ip))
    wait_for(lambda: a.bridge.stats.scored + b.bridge.stats.scored >= 2)
    time.sleep(0.3)
    assert none_enforce(fleet, ip)
    c.write(success(ip))  # a success anywhere clears the cluster score of reset_on_success jails
    wait_for(lambda: c.bridge.stats.scored >= 1)
    a.write(auth_failed(ip))
    wait_for(lambda: a.bridge.stats.scored >= 2)
    time.sleep(0.3)
    assert none_enforce(fleet, ip)
    b.write(auth_failed(ip), auth_failed(ip))
    wait_for(lambda: all_enforce(fleet, ip))


def test_scorer_interface_is_explicit():
    """ClusterPolicy offers the Scorer interface itself (no __getattr__ proxy), like Policy."""
    import inspect

    from sipguard.cluster import ClusterPolicy
    from sipguard.policy import Policy, Scorer

    assert "__getattr__" not in vars(ClusterPolicy)
    members = [n for n in vars(Scorer) if not n.startswith("_")]
    assert {"observe", "note_ban", "release", "restore", "expire", "score", "banned", "stats", "max_findtime",
            "windows"} <= set(members)
    pol = Policy(Config().policy, ALLOW)
    for name in members:
        want = vars(Scorer)[name]
        assert hasattr(pol, name), name
        assert name in vars(ClusterPolicy), name  # its own, not inherited or proxied
        if callable(want):
            params = list(inspect.signature(want).parameters)
            assert list(inspect.signature(getattr(ClusterPolicy, name)).parameters) == params, name
            assert list(inspect.signature(getattr(Policy, name)).parameters)[:len(params)] == params, name


def test_redis_failing_mid_batch_decides_locally_counting_each_event_once(tmp_path, redis_server):
    node = Node(tmp_path, redis_server.url, "edge1")
    store = Store.open_state_dir(node.dir / "state")
    d = build_daemon(node.cfg, store, node.enforcer, logs=[str(node.log)])
    d.setup()
    try:
        bridge = d.parts.fleet
        assert bridge.scoring and d.parts.scorer is bridge.policy
        now = time.time()
        for ip in ("198.18.17.1", "198.18.17.2"):
            for k in range(3):  # buffered for Redis: nothing decided here
                assert d.parts.scorer.observe(Event(now + k, ip, "auth-failure", EventKind.AUTH_FAILURE, 1.0)) is None
            if ip == "198.18.17.2":
                redis_server.stop()  # the second batch's score call fails
            bans = d.step([])  # the batch: scored in Redis (or locally), through the ban book, stored
            assert [(b.ip, b.score, b.reason) for b in bans] == [(ip, 3.0, "auth:auth-failure")]
        assert not bridge.scoring
        assert bridge.stats.scored == 3 and bridge.stats.cluster_bans == 1 and bridge.stats.local_bans == 1
        assert bridge.outbox_size() == 1  # the local ban waits for Redis
        st = d.parts.scorer.stats
        assert (st.events, st.decisions) == (6, 2)  # each event and each ban counted once
        assert {"198.18.17.1", "198.18.17.2"} <= d.parts.scorer.banned
    finally:
        d.parts.follower.close()
        bridge.close()
        store.close()


# -- ban sharing --------------------------------------------------------------------------------
def test_manual_ban_and_unban_propagate_within_a_second(fleet):
    a, b, c = fleet
    ip = "198.18.10.3"
    with _Closing(a.cli_store()) as st:
        t0 = time.monotonic()
        ban = manual_ban(st, ip, 7200, "manual", ALLOW)
    wait_for(lambda: all_enforce(fleet, ip), timeout=2)
    assert time.monotonic() - t0 < 1.0
    for n in (b, c):
        got = n.store.get_ban(ip)
        assert got.manual and got.expires == ban.expires and got.created == ban.created
    # unban on another node, through the real CLI
    r = subprocess.run([sys.executable, "-m", "sipguard", "--config", str(b.config_file()), "--state-dir",
                        str(b.dir / "state"), "unban", ip], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    t0 = time.monotonic()
    wait_for(lambda: none_enforce(fleet, ip), timeout=2)
    assert time.monotonic() - t0 < 1.0
    assert all(n.store.get_ban(ip) is None for n in fleet)
    # its old events do not count any more: one new failure is not three
    a.write(auth_failed(ip))
    time.sleep(0.4)
    assert none_enforce(fleet, ip)


def test_cli_ban_from_file_is_published(fleet, tmp_path):
    a, b, c = fleet
    f = tmp_path / "list.txt"
    f.write_text("198.18.11.1\n198.18.11.0/30\n# comment\n203.0.113.9\n")
    r = subprocess.run([sys.executable, "-m", "sipguard", "--config", str(c.config_file()), "--state-dir",
                        str(c.dir / "state"), "ban", "--from-file", str(f), "--for", "1h"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    want = {"198.18.11.1", "198.18.11.0/30", "203.0.113.9"}
    wait_for(lambda: all(want <= n.enforced() for n in fleet), timeout=3)


def test_redis_outage_bans_meanwhile_reach_every_node(fleet, redis_server, caplog):
    a, b, c = fleet
    caplog.set_level(logging.WARNING, logger="sipguard.cluster")
    redis_server.stop()
    wait_for(lambda: not any(n.bridge.scoring for n in fleet), timeout=5)
    auto, manual = "198.18.12.1", "198.18.12.2"
    a.write(auth_failed(auto) * 3)  # a alone: local scoring still bans
    wait_for(lambda: auto in a.enforced())
    with _Closing(b.cli_store()) as st:
        manual_ban(st, manual, 3600, "manual", ALLOW)
    wait_for(lambda: manual in b.enforced())
    for i in range(20):  # many lines while Redis is away: still only one warning per node
        c.write(auth_failed(f"198.18.13.{i}"))
    time.sleep(0.6)
    assert a.bridge.outbox_size() >= 1 and b.bridge.outbox_size() >= 1
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 3, [r.getMessage() for r in unreachable]  # one per node
    redis_server.start()  # empty: it lost everything; the nodes re-publish what they hold
    wait_for(lambda: all_enforce(fleet, auto) and all_enforce(fleet, manual), timeout=10)
    wait_for(lambda: all(n.bridge.in_sync() for n in fleet), timeout=5)
    for ip in (auto, manual):
        assert len({(n.store.get_ban(ip).created, n.store.get_ban(ip).expires) for n in fleet}) == 1
        for n in fleet:
            assert [x for x, _ in n.ban_rows(ip)] == ["ban"]  # none applied twice
    assert redis_server.client().hlen("sgtest:bans") == 2
    # and the cluster scores again
    ip = "198.18.12.3"
    for n in fleet:
        n.write(auth_failed(ip))
    wait_for(lambda: all_enforce(fleet, ip))


def test_late_joiner_and_restarted_node_converge(fleet, tmp_path, redis_server):
    a, b, c = fleet
    with _Closing(a.cli_store()) as st:
        ban = manual_ban(st, "198.18.14.1", 3600, "manual", ALLOW)
        manual_ban(st, "198.18.14.2", 3600, "manual", ALLOW)
    wait_for(lambda: all_enforce(fleet, "198.18.14.2"))
    c.stop()
    with _Closing(a.cli_store()) as st:  # while c is down: one unban, one new ban
        manual_unban(st, "198.18.14.2")
        manual_ban(st, "198.18.14.3", 600, "manual", ALLOW)
    wait_for(lambda: "198.18.14.3" in b.enforced() and "198.18.14.2" not in b.enforced())
    d = Node(tmp_path, redis_server.url, "edge4").start()
    c.enforcer = DryRunEnforcer()
    c.start()
    try:
        for n in (c, d):
            wait_for(lambda: {"198.18.14.1", "198.18.14.3"} <= n.enforced() and "198.18.14.2" not in n.enforced())
            assert n.store.get_ban("198.18.14.1").expires == ban.expires
        assert c.store.get_ban("198.18.14.2") is None
    finally:
        d.stop()


def test_malformed_stream_entries_are_skipped_and_counted(fleet, redis_server):
    r = redis_server.client()
    r.xadd("sgtest:stream", {"op": "ban", "ip": "198.18.15.1", "ban": "{not json"})
    r.xadd("sgtest:stream", {"op": "ban", "ip": "not-an-ip", "ban": json.dumps({"ip": "not-an-ip"})})
    r.xadd("sgtest:stream", {"op": "explode"})
    r.xadd("sgtest:stream", {"op": "unban", "ip": "198.18.15.1", "at": "yesterday"})
    r.xadd("sgtest:stream", {"op": "ban", "ip": "198.18.15.2",
                             "ban": json.dumps({"ip": "198.18.15.2", "created": "now", "id": "x", "origin": "y"})})
    wait_for(lambda: all(n.bridge.stats.malformed >= 5 for n in fleet))
    with _Closing(fleet[0].cli_store()) as st:
        manual_ban(st, "198.18.15.3", 3600, "manual", ALLOW)
    wait_for(lambda: all_enforce(fleet, "198.18.15.3"))
    assert all(n.thread.is_alive() for n in fleet)
    assert none_enforce(fleet, "198.18.15.1") and none_enforce(fleet, "198.18.15.2")


def test_status_shows_the_cluster(fleet):
    a = fleet[0]
    wait_for(lambda: a.store.get_meta("cluster_status") is not None)
    r = subprocess.run([sys.executable, "-m", "sipguard", "--config", str(a.config_file()), "--state-dir",
                        str(a.dir / "state"), "status", "--json"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)["cluster"]
    assert info["reachable"] and info["node"] == "edge1"
    nodes = {n["node"]: n for n in info["nodes"]}
    assert set(nodes) == {"edge1", "edge2", "edge3"}
    assert all(n["alive"] and n["in_sync"] and n["age"] < 3 for n in nodes.values())
    assert info["this_node"]["in_sync"]
    r = subprocess.run([sys.executable, "-m", "sipguard", "--config", str(a.config_file()), "--state-dir",
                        str(a.dir / "state"), "status"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "edge2" in r.stdout and "in sync" in r.stdout


def test_no_cluster_section_means_standalone(tmp_path):
    cfg = Config.model_validate({"allowlist": {"include_host_addresses": False}})
    assert cfg.cluster is None
    store = Store.open_state_dir(tmp_path / "state")
    log = tmp_path / "k.log"
    log.touch()
    d = build_daemon(cfg, store, DryRunEnforcer(), logs=[str(log)])
    d.setup()
    try:
        assert d.parts.fleet is None and type(d.parts.scorer).__name__ == "Policy"
    finally:
        d.parts.follower.close()
        store.close()


def test_cluster_config_validation():
    from sipguard.errors import ConfigError
    from sipguard.config import load_config

    for url in ("redis://h:6379/0", "rediss://:pw@h:6380/1", "unix:///run/redis.sock",
                "redis+sentinel://:pw@s1:26379,s2:26379/mymaster/0"):
        assert Config.model_validate({"cluster": {"redis_url": url}}).cluster.redis_url == url
    assert Config.model_validate({"cluster": {"redis_url": "redis://h"}}).cluster.node_name == socket.gethostname()
    with pytest.raises(Exception, match="unsupported scheme"):
        Config.model_validate({"cluster": {"redis_url": "http://h:6379"}})
    del ConfigError, load_config


def test_outbox_survives_a_restart_while_redis_is_away(fleet, redis_server):
    a, b, c = fleet
    redis_server.stop()
    wait_for(lambda: not a.bridge.scoring)
    with _Closing(a.cli_store()) as st:
        manual_ban(st, "198.18.16.1", 3600, "manual", ALLOW)
    wait_for(lambda: a.bridge.outbox_size() == 1)
    a.stop()  # the queued ban lives in a's SQLite, not in memory
    a.enforcer = DryRunEnforcer()
    redis_server.start()
    a.start()
    wait_for(lambda: all_enforce(fleet, "198.18.16.1"), timeout=10)
    wait_for(lambda: a.bridge.outbox_size() == 0 and all(n.bridge.in_sync() for n in fleet))
    for n in fleet:
        assert [x for x, _ in n.ban_rows("198.18.16.1")] == ["ban"]


# -- the office policy in fleet mode (issue 17): shared successes, user bans on the stream -------------
def htable_rpc(tables: dict[str, dict[str, int]], req: dict) -> dict:
    """Kamailio's htable JSON-RPC methods the mirror calls, on in-memory tables: the reply to `req`."""
    method, params = req["method"], req["params"]
    t = tables.setdefault(params[0], {})
    result = None
    if method in ("htable.setxi", "htable.seti"):
        t[params[1]] = params[2]
    elif method == "htable.delete":
        t.pop(params[1], None)
    elif method == "htable.dump":
        result = [{"slot": [{"name": k, "value": v} for k, v in list(t.items())]}]
    return {"jsonrpc": "2.0", "result": result, "id": req["id"]}


class FakeKamailio:
    """Kamailio's JSON-RPC over HTTP (jsonrpcs through xhttp), its htables in memory: 127.0.0.1, a free
    port, a thread of this test; stopped by `close`."""

    def __init__(self) -> None:
        import http.server

        self.tables: dict[str, dict[str, int]] = {"ipban": {}, "userban": {}}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                body = json.dumps(htable_rpc(outer.tables, req)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/RPC"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


SECRET = "office-fleet-secret"
USER_BANTIME = 12  # seconds: long enough for `list`, `why` and `unban --user` on a loaded machine, short to expire


def office_node(tmp: Path, url: str, name: str, kamailio: FakeKamailio, **extra) -> Node:
    node = Node(tmp, url, name)
    node.raw_cfg["cluster"]["secret"] = SECRET
    node.raw_cfg["htable"] = {"enabled": True, "rpc": kamailio.url, "reply_dir": str(tmp / name / "rpc")}
    node.raw_cfg["policy"] = {"office": {"user_bantime": USER_BANTIME}}
    for section, values in extra.items():
        node.raw_cfg.setdefault(section, {}).update(values)
    node.cfg = Config.model_validate(node.raw_cfg)
    node.kamailio = kamailio
    return node


def user_failed(user: str, ip: str) -> str:
    return syslog(f"NOTICE: <script>: auth failed for user {user} from {ip}:5060 method REGISTER")


def user_success(user: str, ip: str) -> str:
    return syslog(f"NOTICE: <script>: REGISTER success for user {user} from {ip}:5060")


def cli(node: Node, *args: str) -> str:
    """A CLI command on `node`'s state dir, in this process (typer's runner: no interpreter start)."""
    from typer.testing import CliRunner

    from sipguard.cli.app import app

    r = CliRunner().invoke(app, ["--state-dir", str(node.dir / "state"), *args])
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture
def office_fleet(tmp_path, redis_server):
    kams = [FakeKamailio() for _ in range(3)]
    nodes: list[Node] = []
    try:
        for i, k in enumerate(kams, 1):
            extra = {"allowlist": {"cidrs": ["198.18.47.0/24"]}, "cluster": {"own_addresses": ["198.18.48.1"]}} \
                if i == 3 else {}
            nodes.append(office_node(tmp_path, redis_server.url, f"edge{i}", k, **extra).start())
        wait_for(lambda: all(n.bridge.in_sync() for n in nodes))
        yield nodes
    finally:
        for n in nodes:
            n.stop()
        for k in kams:
            k.close()


OFFICE_IP = "198.18.46.1"


def test_office_success_on_one_node_failures_on_another_user_ban_on_every_node(office_fleet, redis_server):
    """Node edge1 sees the office's successes, edge2 only the stale phone's failures: the fleet bans user
    `stale` at that address (not the address: edge2 alone would have), the user ban travels on the stream,
    signed, and every node holds it in its store (`list`, `why`) and its Kamailio htable, never its kernel;
    `unban --user` on edge3 lifts it everywhere; a second one expires on every node at its one instant."""
    a, b, c = office_fleet
    a.write(user_success("alice", OFFICE_IP), user_success("bob", OFFICE_IP))
    wait_for(lambda: a.bridge.stats.scored >= 2)
    b.write(*(user_failed("stale", OFFICE_IP) for _ in range(4)))
    key = f"stale@{OFFICE_IP}"
    wait_for(lambda: all(key in n.kamailio.tables["userban"] for n in office_fleet), timeout=15)
    wait_for(lambda: all(n.store.active_user_bans(time.time()) for n in office_fleet))
    bans = [n.store.active_user_bans(time.time()) for n in office_fleet]
    assert all([(x.ip, x.user, x.reason) for x in bs] == [(OFFICE_IP, "stale", "office_user:auth-failure")]
               for bs in bans)
    assert len({(bs[0].created, bs[0].expires) for bs in bans}) == 1  # one instant, fleet-wide
    assert all(n.store.get_ban(OFFICE_IP) is None and OFFICE_IP not in n.enforced() for n in office_fleet)
    assert all(n.kamailio.tables["ipban"] == {} for n in office_fleet)  # the office keeps working
    assert [n.bridge.stats.applied_user_bans for n in office_fleet] == [1, 0, 1]  # edge2 claimed it
    raw = redis_server.client().xrange("sgtest:stream")
    entry = [f for _, f in raw if f.get("op") == "userban"]
    assert len(entry) == 1 and "sig" in json.loads(entry[0]["ban"])
    assert "stale" not in json.dumps(redis_server.client().keys("sgtest:s:*"))  # only its keyed hash
    # `list` and `why` on another node show it (the user escaped)
    assert "stale" in cli(c, "list") and "user ban: user stale at this address only" in cli(c, "why", OFFICE_IP)
    # unban --user on edge3: lifted on every node
    out = cli(c, "unban", OFFICE_IP, "--user", "stale")
    assert f"lifted the user ban of stale at {OFFICE_IP}" in out
    wait_for(lambda: all(key not in n.kamailio.tables["userban"] for n in office_fleet), timeout=15)
    wait_for(lambda: all(not n.store.active_user_bans(time.time()) for n in office_fleet))
    assert [n.bridge.stats.applied_user_unbans for n in office_fleet] == [1, 1, 0]
    # a second user ban (USER_BANTIME) expires everywhere on time
    b.write(*(user_failed("stale2", OFFICE_IP) for _ in range(3)))
    key2 = f"stale2@{OFFICE_IP}"
    wait_for(lambda: all(key2 in n.kamailio.tables["userban"] for n in office_fleet), timeout=15)
    wait_for(lambda: all(n.store.active_user_bans(time.time()) for n in office_fleet))
    (ub,) = c.store.active_user_bans(time.time())
    assert ub.user == "stale2" and ub.expires - ub.created == USER_BANTIME
    wait_for(lambda: all(key2 not in n.kamailio.tables["userban"] for n in office_fleet), timeout=USER_BANTIME + 10)
    assert time.time() >= ub.expires
    assert all(not n.store.active_user_bans(time.time()) and n.store.get_ban(OFFICE_IP) is None for n in office_fleet)


def test_fleet_user_bans_pass_the_guard_rails_and_the_signature(office_fleet, redis_server):
    """User bans put on the stream by hand (signed with the fleet's secret unless said): the address part
    passes edge3's guard rails (allow-list, own address, max prefix; a network is no user ban), a user with
    a control character is refused, an unsigned one too; each is counted and none is applied."""
    from sipguard.cluster.signing import Signer
    from sipguard.cluster.wire import ban_dict
    from sipguard.cluster.signing import user_ban_parts
    from sipguard.model import Ban

    a, b, c = office_fleet
    r = redis_server.client()
    signer = Signer(SECRET, "sgtest:")
    now = time.time()

    def put(ip: str, user: str, n: int, sign: Signer | None = signer) -> None:
        d = ban_dict(Ban(ip, "office_user:auth-failure", now, now + 60, 3.0), f"edge9:x{n}", "edge9")
        d["user"] = user
        if sign is not None:
            d["sig"] = sign.tag("userban", *user_ban_parts(d))
        r.xadd("sgtest:stream", {"op": "userban", "ip": ip, "id": d["id"], "origin": "edge9",
                                  "ban": json.dumps(d, separators=(",", ":"))})

    before = dict(vars(c.bridge.stats))
    put("198.18.47.5", "u1", 1)  # allow-listed on edge3
    put("198.18.48.1", "u2", 2)  # edge3's own address
    put("198.0.0.0/8", "u3", 3)  # wider than max_prefix_v4
    put("198.18.49.0/24", "u4", 4)  # a network: no user ban
    put("198.18.50.1", "bad\x1buser", 5)  # a control character in the user
    put("198.18.50.2", "u6", 6, Signer("not-the-secret", "sgtest:"))  # forged
    put("198.18.50.3", "u7", 7, None)  # unsigned
    put("198.18.50.4", "good", 8)  # the one that is fine
    # (the ban book puts it in Kamailio first, then the bridge counts it and the chunk's transaction stores it)
    wait_for(lambda: "good@198.18.50.4" in c.kamailio.tables["userban"]
             and c.bridge.stats.applied_user_bans > before["applied_user_bans"]
             and any(x.user == "good" for x in c.store.active_user_bans(time.time())), timeout=15)
    s = c.bridge.stats
    # (each at least once: a reader that reconnects under load may read an entry twice, never apply it)
    assert s.allowlisted - before["allowlisted"] >= 1 and s.own_address - before["own_address"] >= 1
    assert s.too_wide - before["too_wide"] >= 1
    assert s.malformed - before["malformed"] >= 2  # the network, the control character
    assert s.unverified - before["unverified"] >= 2
    assert s.applied_user_bans - before["applied_user_bans"] >= 1
    assert list(c.kamailio.tables["userban"]) == ["good@198.18.50.4"]
    assert [(x.ip, x.user) for x in c.store.active_user_bans(time.time())] == [("198.18.50.4", "good")]
    wait_for(lambda: "good@198.18.50.4" in a.kamailio.tables["userban"])  # edge1 has no such allow-list ...
    assert "u1@198.18.47.5" in a.kamailio.tables["userban"]  # ... so it holds that one
    assert all(not n.enforced() for n in office_fleet)  # never the kernel


def test_user_bans_reach_a_late_joiner_and_survive_an_outage(office_fleet, redis_server):
    """A node that was down when a user ban was made gets it from the shared user-ban hash with its
    snapshot; a user ban decided by a node's local Policy while Redis is away waits in its outbox and
    reaches the others when Redis is back."""
    a, b, c = office_fleet
    c.stop()
    a.write(user_success("alice", OFFICE_IP))
    wait_for(lambda: a.bridge.stats.scored >= 1)
    b.write(*(user_failed("stale", OFFICE_IP) for _ in range(3)))
    key = f"stale@{OFFICE_IP}"
    wait_for(lambda: key in a.kamailio.tables["userban"], timeout=15)
    c.start()
    wait_for(lambda: key in c.kamailio.tables["userban"], timeout=15)  # from the snapshot
    assert [(x.user, x.reason) for x in c.store.active_user_bans(time.time())] == [("stale", "office_user:auth-failure")]
    assert OFFICE_IP not in c.enforced()
    # Redis away: b decides alone (it sees the office's success itself), the user ban waits in its outbox
    redis_server.stop()
    wait_for(lambda: not b.bridge.redis_ok or not b.bridge.reader.connected, timeout=15)
    other = "198.18.46.2"
    b.write(user_success("carol", other), *(user_failed("old-phone", other) for _ in range(3)))
    wait_for(lambda: b.store.active_user_bans(time.time()) and any(
        x.user == "old-phone" for x in b.store.active_user_bans(time.time())), timeout=15)
    assert b.bridge.outbox_size() >= 1 and other not in b.enforced()
    redis_server.start()
    key2 = f"old-phone@{other}"
    wait_for(lambda: all(key2 in n.kamailio.tables["userban"] for n in office_fleet), timeout=20)
    assert all(other not in n.enforced() and n.store.get_ban(other) is None for n in office_fleet)


def test_a_user_unban_made_while_a_node_was_away_reaches_it_with_its_snapshot(office_fleet, redis_server):
    """`unban --user` on one node while another is stopped: the stopped node, started again, finds the
    user ban gone from the shared hash with a signed tombstone newer than its ban, and lifts it (its
    Kamailio entry too); a tombstone that does not verify lifts nothing."""
    a, b, c = office_fleet
    a.write(user_success("alice", OFFICE_IP))
    wait_for(lambda: a.bridge.stats.scored >= 1)
    b.write(*(user_failed("stale", OFFICE_IP) for _ in range(3)))
    key = f"stale@{OFFICE_IP}"
    wait_for(lambda: all(key in n.kamailio.tables["userban"] for n in office_fleet), timeout=15)
    c.stop()
    cli(a, "unban", OFFICE_IP, "--user", "stale")
    wait_for(lambda: key not in a.kamailio.tables["userban"] and key not in b.kamailio.tables["userban"], timeout=15)
    st = Store.open_state_dir(c.dir / "state", readonly=True)
    assert [x.user for x in st.active_user_bans(time.time())] == ["stale"]  # c missed it
    st.close()
    c.start()
    wait_for(lambda: c.bridge.in_sync() and not c.store.active_user_bans(time.time()), timeout=15)
    wait_for(lambda: key not in c.kamailio.tables["userban"], timeout=15)
    assert c.bridge.stats.dropped_by_snapshot >= 1
    # a forged tombstone (a Redis writer without the secret) over another held user ban lifts nothing
    other = "198.18.46.3"
    a.write(user_success("bob", other))
    wait_for(lambda: a.bridge.stats.scored >= 2)
    b.write(*(user_failed("old", other) for _ in range(3)))
    wait_for(lambda: any(x.user == "old" for x in c.store.active_user_bans(time.time())), timeout=15)
    c.stop()
    r = redis_server.client()
    prefix = c.cfg.cluster.key_prefix
    field = next(f for f in r.hkeys(prefix + "ubans") if f.startswith(other + "|"))
    r.hdel(prefix + "ubans", field)
    r.hset(prefix + "uunbans", field, f"{time.time():.6f}|forged-id|edge1|AAAAAAAAAAAAAAAAAAAAAA")
    c.start()
    wait_for(lambda: c.bridge.in_sync(), timeout=15)
    time.sleep(1.0)
    assert [x.user for x in c.store.active_user_bans(time.time())] == ["old"]


# -- the same with real daemons, each in a network namespace of its own with a real kernel backend ------
class DgramKamailio:
    """Kamailio's JSON-RPC over its UNIX datagram socket (jsonrpcs), the htables in memory: a thread of
    this test on a socket in its temp dir (reachable from every namespace: it is a path); `close` stops it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.tables: dict[str, dict[str, int]] = {"ipban": {}, "userban": {}}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                data, addr = self.sock.recvfrom(65536)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            req = json.loads(data)
            try:
                self.sock.sendto(json.dumps(htable_rpc(self.tables, req)).encode(), addr)
            except OSError:
                pass

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        self.sock.close()


def _kernel_entries(backend: str) -> set[str]:
    from sipguard.config import EnforceConfig
    from sipguard.enforce import make_enforcer

    e = make_enforcer(EnforceConfig(backend=backend))
    try:
        return {x.ip for x in e.entries()}
    finally:
        e.close()


@pytest.mark.parametrize("backend", ["nftables"])
def test_office_user_ban_across_daemons_in_namespaces_never_reaches_their_kernels(tmp_path, backend):
    """Two `sipguard run` daemons, each in a network namespace of its own (PID-unique names) with the real
    nftables backend, one redis-server on a UNIX socket, each daemon's Kamailio htable on a UNIX datagram
    socket: edge1 sees an office's success, edge2 its stale phone's failures. Both Kamailio htables get the
    user ban; neither kernel set holds the office's address, while an attacker's address banned on edge1
    is in both kernels (the kernel path works)."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("needs root (network namespaces, netfilter)", pytrace=False)
        pytest.skip("needs root")
    import redis

    from tests.lab.netns import Netns
    from tests.netns_util import ns_call

    sock = tmp_path / "redis.sock"
    rproc = subprocess.Popen(
        [REDIS, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700", "--dir", str(tmp_path),
         "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = redis.Redis(unix_socket_path=str(sock), decode_responses=True, socket_timeout=5)
    kams: list[DgramKamailio] = []
    tag = f"sgf-{os.getpid() % 100000}-of"
    try:
        wait_for(lambda: sock.exists() and r.ping(), timeout=10)
        with Netns(f"{tag}1") as ns1, Netns(f"{tag}2") as ns2:
            nodes = []
            for i, ns in ((1, ns1), (2, ns2)):
                d = tmp_path / f"edge{i}"
                d.mkdir()
                kam = DgramKamailio(d / "kamailio.sock")
                kams.append(kam)
                (d / "kamailio.log").touch()
                (d / "sipguard.toml").write_text(
                    f'[enforce]\nbackend = "{backend}"\n[allowlist]\ninclude_host_addresses = false\n'
                    f'[daemon]\ncontrol_interval = 0.05\n'
                    f'[htable]\nenabled = true\nrpc = "unix:{kam.path}"\nreply_dir = "{d / "rpc"}"\nreply_group = ""\n'
                    f'[cluster]\nredis_url = "unix://{sock}"\nnode_name = "edge{i}"\nkey_prefix = "sgns:"\n'
                    f'secret = "{SECRET}"\nheartbeat_interval = 0.2\nsocket_timeout = 1\nretry_interval = 0.2\n')
                (d / "sipguard.toml").chmod(0o600)  # (it holds the fleet's secret)
                err = open(d / "daemon.err", "ab")
                env = {**os.environ, "PYTHONPATH": os.getcwd()}
                env.pop("SIPGUARD_CONFIG", None)
                ns.popen(sys.executable, "-m", "sipguard", "--config", str(d / "sipguard.toml"), "--state-dir",
                         str(d / "state"), "run", "--from-start", "--log", str(d / "kamailio.log"),
                         stdout=subprocess.DEVNULL, stderr=err, env=env)
                err.close()
                nodes.append((ns, d, kam))

            def in_sync(name: str) -> bool:
                v = r.get(f"sgns:node:{name}")
                return bool(v) and json.loads(v).get("in_sync") is True

            wait_for(lambda: in_sync("edge1") and in_sync("edge2"), timeout=30)
            (ns1, d1, k1), (ns2, d2, k2) = nodes
            with (d1 / "kamailio.log").open("a") as f:
                f.write(user_success("alice", OFFICE_IP) + user_success("bob", OFFICE_IP))
                f.write("".join(auth_failed("198.18.70.9") for _ in range(3)))  # an attacker: a kernel ban
            wait_for(lambda: r.zcard(f"sgns:s:{OFFICE_IP}:office_ok") == 2, timeout=15)
            with (d2 / "kamailio.log").open("a") as f:
                f.write("".join(user_failed("stale", OFFICE_IP) for _ in range(5)))
            key = f"stale@{OFFICE_IP}"
            wait_for(lambda: key in k1.tables["userban"] and key in k2.tables["userban"], timeout=20)
            wait_for(lambda: all("198.18.70.9" in ns_call(ns.name, _kernel_entries, backend) for ns in (ns1, ns2)),
                     timeout=20)
            for ns, _d, kam in nodes:
                held = ns_call(ns.name, _kernel_entries, backend)
                assert OFFICE_IP not in held, held  # the office keeps working: never in the kernel
                assert OFFICE_IP not in kam.tables["ipban"]
            assert r.hget("sgns:bans", OFFICE_IP) is None and r.hlen("sgns:ubans") == 1
    finally:
        for k in kams:
            k.close()
        r.close()
        rproc.kill()
        rproc.wait(10)
