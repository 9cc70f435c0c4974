"""Fleet mode over TLS and through Sentinel, for real (issue 14, part 2).

* TLS: a `redis-server` of this test's own with TLS only (Debian's redis 7), its certificate signed by
  a throwaway CA that the test makes with `openssl`; the nodes connect through `rediss://` with
  certificate (and host name) verification and share bans; a node given another CA is refused with
  a clear error (in its log and in `sipguard status`) and bans nothing it did not decide itself.
* Sentinel: a master, a replica and three sentinels (Debian's `redis-sentinel`), all on loopback
  ports; two nodes reach the master through `redis+sentinel://`. Bans are made before, during and
  after the master is killed; the sentinels promote the replica, the nodes follow it, and no ban is
  lost or applied twice on any node.

Every server is started by the test on 127.0.0.1 with free ports in its own temp dir, without
persistence, and killed by its PID afterwards. Nothing here touches the kernel (dry-run enforcers).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sipguard.actions import manual_ban
from sipguard.addresses import AllowList
from test_cluster import REDIS, Node, _Closing, auth_failed, free_port
from waiting import wait_for

OPENSSL = shutil.which("openssl")
SENTINEL = shutil.which("redis-sentinel")
for _tool, _pkg in ((OPENSSL, "openssl"), (SENTINEL, "redis-sentinel")):
    if _tool is None:
        if os.geteuid() == 0:  # CI runs as root after `make setup` installed it: never skip there
            pytest.fail(f"{_pkg} is not installed (the Makefile's APT_PACKAGES install it)", pytrace=False)
        pytest.skip(f"{_pkg} is not installed", allow_module_level=True)

SECRET = "tls-and-sentinel-secret-0123"
PREFIX = "sgtest:"
ALLOW = AllowList([], include_host=False)


class Proc:
    """A server process of this test: started with argv, killed by its PID."""

    def __init__(self, argv: list[str], port: int, log: Path) -> None:
        self.argv, self.port, self.log = argv, port, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> Proc:
        assert self.proc is None
        with self.log.open("ab") as f:
            self.proc = subprocess.Popen(self.argv, stdout=f, stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


def wait_port(port: int, proc: Proc, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.proc is not None and proc.proc.poll() is None, proc.log.read_text()[-2000:]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"port {port} did not open")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> Path:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
            "-days", "1", "-subj", f"/CN={name}", cwd=d)
    return d / f"{name}.pem"


def make_server_cert(d: Path, ca: str) -> tuple[Path, Path]:
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "1", "-extfile", "ext.cnf", cwd=d)
    os.chmod(d / "server.key", 0o600)
    return d / "server.pem", d / "server.key"


class SecretNode(Node):
    def __init__(self, tmp: Path, url: str, name: str, **cluster) -> None:
        super().__init__(tmp, url, name)
        self.raw_cfg["cluster"].update({"secret": SECRET, **cluster})
        from sipguard.config import Config

        self.cfg = Config.model_validate(self.raw_cfg)


def status_text(node: Node) -> str:
    p = node.dir / "sipguard.toml"
    p.write_text(f'[enforce]\nbackend = "dryrun"\n[cluster]\nredis_url = "{node.raw_cfg["cluster"]["redis_url"]}"\n'
                 f'node_name = "{node.name}"\nkey_prefix = "{PREFIX}"\nsocket_timeout = 0.5\n')
    r = subprocess.run([sys.executable, "-m", "sipguard", "--config", str(p), "--state-dir", str(node.dir / "state"),
                        "status"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


# -- TLS --------------------------------------------------------------------------------------------
@pytest.fixture
def tls_redis(tmp_path):
    d = tmp_path / "tls"
    d.mkdir()
    ca = make_ca(d, "ca")
    cert, key = make_server_cert(d, "ca")
    other_ca = make_ca(d, "other-ca")
    port = free_port()
    server = Proc([REDIS, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", str(cert),
                   "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
                   "--dir", str(d), "--save", "", "--appendonly", "no", "--loglevel", "warning"], port,
                  d / "redis.log").start()
    try:
        wait_port(port, server)
        yield port, ca, other_ca
    finally:
        server.kill()


def test_tls_with_certificate_verification(tmp_path, tls_redis, caplog):
    port, ca, other_ca = tls_redis
    url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    nodes = [SecretNode(tmp_path, url, f"edge{i}").start() for i in (1, 2)]
    try:
        wait_for(lambda: all(n.bridge.in_sync() for n in nodes), timeout=10)
        a, b = nodes
        with _Closing(a.cli_store()) as st:
            manual_ban(st, "198.18.40.1", 3600, "over tls", ALLOW)
        wait_for(lambda: "198.18.40.1" in b.enforced(), timeout=5)
        for n in nodes:  # cluster scoring over TLS too
            n.write(auth_failed("198.18.40.2"))
            wait_for(lambda: n.bridge.stats.scored >= 1)
        nodes[0].write(auth_failed("198.18.40.2"))
        wait_for(lambda: all("198.18.40.2" in n.enforced() for n in nodes), timeout=5)
        assert "in sync" in status_text(a)
        # a node that trusts another CA: refused, with a clear reason, in its log and in status
        caplog.set_level(logging.WARNING, logger="sipguard.cluster")
        bad_url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={other_ca}"
        bad = SecretNode(tmp_path, bad_url, "edge3").start()
        try:
            assert not bad.bridge.in_sync() and not bad.bridge.scoring
            warnings = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
            assert any("TLS certificate verification failed" in w for w in warnings), warnings
            text = status_text(bad)
            assert "Redis unreachable from here: TLS certificate verification failed" in text, text
            assert "198.18.40.1" not in bad.enforced()  # it heard nothing from the fleet
            bad.write(auth_failed("198.18.40.3") * 3)  # and still protects itself
            wait_for(lambda: "198.18.40.3" in bad.enforced(), timeout=5)
        finally:
            bad.stop()
    finally:
        for n in nodes:
            n.stop()


# -- Sentinel ---------------------------------------------------------------------------------------
class SentinelSet:
    """A master, a replica and three sentinels, all on loopback ports of this test's own."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "sentinel"
        self.dir.mkdir()
        self.ports = {"a": free_port(), "b": free_port()}
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.servers: dict[str, Proc] = {}
        self.sentinels: list[Proc] = []

    def _server(self, name: str, replica_of: int | None = None) -> Proc:
        d = self.dir / name
        d.mkdir(exist_ok=True)
        argv = [REDIS, "--port", str(self.ports[name]), "--bind", "127.0.0.1", "--dir", str(d), "--save", "",
                "--appendonly", "no", "--loglevel", "warning", "--repl-diskless-sync", "yes",
                "--repl-diskless-sync-delay", "0"]
        if replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(replica_of)]
        return Proc(argv, self.ports[name], d / "redis.log")

    def start(self) -> None:
        for name, of in (("a", None), ("b", self.ports["a"])):
            self.servers[name] = self._server(name, of).start()
            wait_port(self.ports[name], self.servers[name])
        wait_for(lambda: self.info(self.ports["b"]).get("master_link_status") == "up", timeout=10)
        for k, port in enumerate(self.sentinel_ports):
            conf = self.dir / f"sentinel{k}.conf"
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                            f"sentinel monitor mymaster 127.0.0.1 {self.ports['a']} 2\n"
                            "sentinel down-after-milliseconds mymaster 2000\n"
                            "sentinel failover-timeout mymaster 3000\n"
                            "sentinel parallel-syncs mymaster 1\n")
            s = Proc([SENTINEL, str(conf)], port, self.dir / f"sentinel{k}.log").start()
            self.sentinels.append(s)
            wait_port(port, s)
        wait_for(lambda: all(self.sentinel_sees_everyone(p) for p in self.sentinel_ports), timeout=20)

    def client(self, port: int):
        import redis

        return redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=2)

    def info(self, port: int) -> dict:
        try:
            c = self.client(port)
            try:
                return c.info("replication")
            finally:
                c.close()
        except Exception:  # noqa: BLE001 - not up yet
            return {}

    def sentinel_sees_everyone(self, port: int) -> bool:
        try:
            c = self.client(port)
            try:
                m = c.execute_command("SENTINEL", "MASTER", "mymaster")
                d = dict(zip(m[0::2], m[1::2])) if isinstance(m, list) else m
                return int(d.get("num-slaves", 0)) >= 1 and int(d.get("num-other-sentinels", 0)) >= 2
            finally:
                c.close()
        except Exception:  # noqa: BLE001
            return False

    def master_port(self) -> int | None:
        for p in self.sentinel_ports:
            try:
                c = self.client(p)
                try:
                    return int(c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")[1])
                finally:
                    c.close()
            except Exception:  # noqa: BLE001
                continue
        return None

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/mymaster/0"

    def restart_as_replica(self, name: str, of: int) -> None:
        self.servers[name].kill()
        self.servers[name] = self._server(name, of).start()
        wait_port(self.ports[name], self.servers[name])

    def stop(self) -> None:
        for p in [*self.sentinels, *self.servers.values()]:
            p.kill()


@pytest.fixture
def sentinel_set(tmp_path):
    s = SentinelSet(tmp_path)
    try:
        s.start()
        yield s
    finally:
        s.stop()


def test_sentinel_failover_loses_nothing_and_applies_nothing_twice(tmp_path, sentinel_set):
    s = sentinel_set
    a = SecretNode(tmp_path, s.url, "edge1", wait_replicas=1)
    b = SecretNode(tmp_path, s.url, "edge2", wait_replicas=1)
    nodes = [a.start(), b.start()]
    made: list[str] = []
    try:
        wait_for(lambda: all(n.bridge.in_sync() for n in nodes), timeout=10)

        def ban_on(node: Node, ip: str) -> None:
            with _Closing(node.cli_store()) as st:
                manual_ban(st, ip, 3600, "failover", ALLOW)
            made.append(ip)

        # before
        for k in range(5):
            ban_on(nodes[k % 2], f"198.18.41.{k}")
        a.write(auth_failed("198.18.41.100") * 3)  # an automatic ban too
        made.append("198.18.41.100")
        wait_for(lambda: all(set(made) <= n.enforced() for n in nodes), timeout=5)
        # during: bans keep coming from both nodes while the master is killed and the replica promoted
        old = s.ports["a"]
        assert s.master_port() == old
        stop = threading.Event()
        errors: list[BaseException] = []

        def keep_banning() -> None:
            k = 0
            try:
                while not stop.is_set() and k < 200:
                    ban_on(nodes[k % 2], f"198.18.42.{k}")
                    k += 1
                    time.sleep(0.05)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        t = threading.Thread(target=keep_banning)
        t.start()
        try:
            time.sleep(0.5)
            # the replica lags (stopped, 24 MB behind): what the master takes meanwhile is not replicated
            # when it dies, so the nodes must publish it again to the promoted replica
            replica = s.servers["b"].proc
            replica.send_signal(signal.SIGSTOP)
            try:
                junk = s.client(old)  # more than the sockets hold: later writes wait in the master's buffer
                try:
                    for k in range(3):
                        junk.set(f"junk:{k}", "x" * (8 << 20))
                finally:
                    junk.close()
                time.sleep(0.3)  # (well under the sentinels' 2 s down-after: the replica stays electable)
                s.servers["a"].kill()  # the master dies mid-run
            finally:
                replica.send_signal(signal.SIGCONT)
            at_kill = len(made)
            wait_for(lambda: s.master_port() == s.ports["b"], timeout=30)
            at_promotion = len(made)
            time.sleep(0.5)
        finally:
            stop.set()
            t.join(10)
        assert not errors, errors
        s.restart_as_replica("a", s.ports["b"])  # the old master comes back, as the sentinels' replica
        # after
        for k in range(5):
            ban_on(nodes[k % 2], f"198.18.43.{k}")
        b.write(auth_failed("198.18.43.100") * 3)
        made.append("198.18.43.100")
        wait_for(lambda: all(set(made) <= n.enforced() for n in nodes), timeout=30)
        wait_for(lambda: all(n.bridge.in_sync() for n in nodes), timeout=30)
        new = s.client(s.ports["b"])
        try:
            shared = set(new.hkeys(PREFIX + "bans"))
        finally:
            new.close()
        assert set(made) <= shared, sorted(set(made) - shared)  # the new master holds every ban
        for n in nodes:
            for ip in made:
                assert [x for x, _ in n.ban_rows(ip)] == ["ban"], (n.name, ip)  # applied once, never lifted
            assert n.bridge.stats.unverified == 0 and n.bridge.stats.dropped_by_snapshot == 0
        assert at_promotion - at_kill >= 5  # bans were made while there was no master
        assert all(n.bridge.stats.outages >= 1 for n in nodes)  # both nodes lost the master and followed
    finally:
        for n in nodes:
            n.stop()
