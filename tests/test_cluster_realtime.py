"""Fleet mode in real time: what wakes the daemon loop, and what is applied in batches.

Structural, never timed against a p99: with `[daemon] control_interval = 10` a node's loop ticks only
every ten seconds, so anything that lands within a second was woken by its own path (the CLI's ring,
the stream reader, a log line); batching is asserted by counting kernel calls and store
transactions. The latencies themselves are measured by bench/cluster_bench.py.

The redis-server is the test's own (tests/test_cluster.py's RedisServer: 127.0.0.1, a free port, no
persistence, stopped by its PID); dry-run enforcers, nothing touches the kernel.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from sipguard.actions import manual_ban, manual_ban_many, manual_unban
from sipguard.bans import WRITE_SLICE
from sipguard.cluster.bridge import APPLY_BATCH
from sipguard.config import Config
from sipguard.doorbell import ring
from sipguard.enforce.dryrun import DryRunEnforcer
from sipguard.store import Store
from sipguard.wiring import build_daemon
from test_cluster import ALLOW, Node, RedisServer, _Closing, auth_failed, cluster_cfg  # noqa: F401
from test_cluster import redis_server  # noqa: F401 - the fixture
from waiting import wait_for

TICK = 10.0  # the loop's control_interval here: nothing may wait for it


class CountingEnforcer(DryRunEnforcer):
    """A dry-run enforcer that counts its kernel calls (single bans, batches and their sizes); the
    test thread reads it while the daemon's changes it, so every call holds a lock."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.single: list[str] = []
        self.batches: list[int] = []
        self.ready: object = None  # the daemon's `ready` event, to tell calls before/after start
        self.after_ready = 0

    def ban(self, ban, now):  # noqa: ANN001
        with self.lock:
            self.single.append(ban.ip)
            super().ban(ban, now)

    def ban_many(self, bans, now):  # noqa: ANN001
        with self.lock:
            self.batches.append(len(bans))
            if self.ready is not None and self.ready.is_set():
                self.after_ready += 1
            super().ban_many(bans, now)

    def unban(self, ip):  # noqa: ANN001
        with self.lock:
            super().unban(ip)

    def sync(self, bans, now):  # noqa: ANN001
        with self.lock:
            return super().sync(bans, now)

    def entries(self):  # noqa: ANN201
        with self.lock:
            return super().entries()

    def count(self) -> int:
        """How many entries it holds (cheap: the test polls it during a 100k burst)."""
        with self.lock:
            return len(self._entries)


class CountingStore(Store):
    """Counts the store's outermost transactions (each a BEGIN IMMEDIATE ... COMMIT) and the most ban
    rows one of them wrote."""

    transactions = 0
    most_rows = 0
    _rows = 0

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        outer = not self.conn.in_transaction
        if outer:
            self.transactions += 1
            self._rows = 0
        with super().transaction():
            yield
        if outer:
            self.most_rows = max(self.most_rows, self._rows)

    def put_bans(self, bans, now):  # noqa: ANN001
        self._rows += len(bans)
        super().put_bans(bans, now)


class SlowNode(Node):
    """A node whose loop ticks every TICK seconds, with a counting enforcer and store."""

    def __init__(self, tmp, url: str, name: str, **cluster) -> None:  # noqa: ANN001
        super().__init__(tmp, url, name)
        self.raw_cfg = cluster_cfg(url, name)
        self.raw_cfg["daemon"]["control_interval"] = TICK
        self.raw_cfg["cluster"].update(cluster)
        self.cfg = Config.model_validate(self.raw_cfg)
        self.enforcer = CountingEnforcer()

    def start(self) -> SlowNode:
        self.store = CountingStore(self.dir / "state" / "sipguard.db")
        self.daemon = build_daemon(self.cfg, self.store, self.enforcer, logs=[str(self.log)])
        self.enforcer.ready = self.daemon.ready
        self.thread = threading.Thread(target=self.daemon.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.daemon.ready.is_set(), timeout=30)
        return self

    def config_file(self):  # noqa: ANN201
        p = super().config_file()
        p.write_text(p.read_text() + f"[daemon]\ncontrol_interval = {TICK}\n")
        return p


@pytest.fixture
def slow_fleet(tmp_path, redis_server):  # noqa: F811
    nodes = [SlowNode(tmp_path, redis_server.url, f"edge{i}").start() for i in (1, 2, 3)]
    try:
        wait_for(lambda: all(n.bridge.in_sync() for n in nodes), timeout=10)
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def lab_addresses(n: int) -> list[str]:
    base = int(ipaddress.ip_address("198.18.0.0"))
    return [str(ipaddress.ip_address(base + i)) for i in range(n)]


def test_cli_ban_and_unban_reach_every_node_without_the_tick(slow_fleet):
    """A CLI ban rings its node's doorbell (mirrored and published at once); every other node's stream
    reader wakes its loop (applied at once). Either path missing: the ban waits for a 10 s tick."""
    a, b, c = slow_fleet
    ip = "198.18.20.1"
    t0 = time.monotonic()
    with _Closing(a.cli_store()) as st:
        manual_ban(st, ip, 3600, "manual", ALLOW)
    wait_for(lambda: all(ip in n.enforced() for n in slow_fleet), timeout=TICK / 2)
    assert time.monotonic() - t0 < 1.0
    assert all(n.store.get_ban(ip) is not None for n in (b, c))
    # the real CLI in its own process, on another node: the unban travels the same way back
    r = subprocess.run([sys.executable, "-m", "sipguard", "--config", str(b.config_file()), "--state-dir",
                        str(b.dir / "state"), "unban", ip], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    t0 = time.monotonic()
    wait_for(lambda: not any(ip in n.enforced() for n in slow_fleet), timeout=TICK / 2)
    assert time.monotonic() - t0 < 1.0
    assert all(n.store.get_ban(ip) is None for n in slow_fleet)


def test_automatic_ban_reaches_the_other_nodes_without_the_tick(slow_fleet):
    """Log lines wake the deciding node (inotify); the score script's stream entry wakes the others."""
    a, b, c = slow_fleet
    ip = "198.18.20.2"
    a.write(auth_failed(ip))
    b.write(auth_failed(ip))
    wait_for(lambda: a.bridge.stats.scored >= 1 and b.bridge.stats.scored >= 1, timeout=TICK / 2)
    t0 = time.monotonic()
    c.write(auth_failed(ip))
    wait_for(lambda: all(ip in n.enforced() for n in slow_fleet), timeout=TICK / 2)
    assert time.monotonic() - t0 < 1.0
    assert c.bridge.stats.cluster_bans == 1  # decided once, on c, in the batch that scored the third failure


def test_doorbell_rings_only_a_bound_daemon(tmp_path):
    db = tmp_path / "state" / "sipguard.db"
    assert ring(str(db)) is False  # no daemon: the command goes on (the tick mirrors it)
    assert ring(":memory:") is False


def test_shared_set_of_3000_bans_at_start_is_applied_in_batches(tmp_path, redis_server):  # noqa: F811
    seed = SlowNode(tmp_path, redis_server.url, "seed").start()
    late = None
    try:
        ips = lab_addresses(3000)
        with _Closing(seed.cli_store()) as st:
            manual_ban_many(st, ips, 3600, "list")
        r = redis_server.client()
        wait_for(lambda: r.hlen("sgtest:bans") == 3000, timeout=30)
        late = SlowNode(tmp_path, redis_server.url, "late").start()
        wait_for(lambda: len(late.enforced()) == 3000 and late.bridge.synced and late.bridge.queue.empty()
                 and late.store.count_active_bans() == 3000, timeout=30)
        assert late.enforcer.single == []  # never one kernel call per ban
        chunks = math.ceil(3000 / APPLY_BATCH)
        assert sum(late.enforcer.batches) >= 3000
        assert len(late.enforcer.batches) <= chunks + 2  # (+ the restore's sync is not a ban_many)
        assert max(late.enforcer.batches) <= APPLY_BATCH
        assert late.bridge.stats.apply_batches <= chunks + 1
        assert late.store.transactions <= 3 * (chunks + 1) + 5  # short transactions, not one per ban
        # detection did not wait for the whole set: the loop followed the log before the last chunk
        assert late.enforcer.after_ready >= 1
        assert late.store.count_active_bans() == 3000
        assert late.bridge.stats.over_cap == 0
    finally:
        if late is not None:
            late.stop()
        seed.stop()


def test_max_bans_caps_what_a_node_takes_from_the_fleet(tmp_path, redis_server):  # noqa: F811
    seed = SlowNode(tmp_path, redis_server.url, "seed").start()
    small = None
    try:
        with _Closing(seed.cli_store()) as st:
            manual_ban_many(st, lab_addresses(300), 3600, "list")
        r = redis_server.client()
        wait_for(lambda: r.hlen("sgtest:bans") == 300, timeout=30)
        small = SlowNode(tmp_path, redis_server.url, "small", max_bans=100).start()
        wait_for(lambda: small.bridge.synced and small.store.count_active_bans() == 100, timeout=30)
        assert len(small.enforced()) == 100
        assert small.bridge.stats.over_cap == 200
        assert small.store.count_active_bans() == 100
    finally:
        if small is not None:
            small.stop()
        seed.stop()


def test_burst_of_100k_bans_on_the_stream_is_applied_in_batches(slow_fleet):
    """Another node's blocklist import (100,000 bans) arrives on the stream: the receiving nodes apply
    it in kernel batches of at most APPLY_BATCH between their own batches, and store it after, in
    transactions of at most WRITE_SLICE rows."""
    a, b, c = slow_fleet
    n = 100_000
    ips = lab_addresses(n)
    before_b = (len(b.enforcer.batches), b.bridge.stats.apply_batches, b.store.transactions)
    with _Closing(a.cli_store()) as st:
        manual_ban_many(st, ips, 3600, "import")
    t0 = time.monotonic()
    wait_for(lambda: b.enforcer.count() >= n and c.enforcer.count() >= n, timeout=120, interval=0.2)
    took = time.monotonic() - t0  # (reported, not asserted: bench/cluster_bench.py times the burst)
    print(f"100k burst: published by a and applied on b and c in {took:.1f}s")
    for node in (b, c):
        assert node.enforcer.single == []
        batches = node.enforcer.batches
        assert sum(batches) >= n
        assert max(batches) <= APPLY_BATCH
    batches = len(b.enforcer.batches) - before_b[0]
    applied = b.bridge.stats.apply_batches - before_b[1]
    transactions = b.store.transactions - before_b[2]
    assert math.ceil(n / APPLY_BATCH) <= applied <= n / 100  # batches, not one per entry (nor one for all)
    assert batches <= applied + 1
    assert transactions <= 3 * applied + 10
    # the store follows the kernel in short transactions: all of it, never more than a slice at once
    for node in (b, c):
        wait_for(lambda node=node: node.store.count_active_bans() >= n and node.daemon.parts.book.pending == 0,
                 timeout=60, interval=0.2)
        assert node.store.most_rows <= WRITE_SLICE
    # detection kept going on b meanwhile, and b's own ban reaches the others at once
    ip = "198.19.200.1"
    for node in (b, b, b):
        node.write(auth_failed(ip))
    wait_for(lambda: all(ip in x.enforced() for x in slow_fleet), timeout=TICK / 2)


def test_the_stream_reader_is_a_process_of_its_own_and_is_started_again_when_it_dies(slow_fleet):
    """The stream is read and checked (XREAD, json, tag, bounds) in a process of the node's own; the
    daemon's thread applies what it hands over. A reader process that dies is started again, and what
    was published meanwhile still arrives (the new process reads the snapshot and the stream after it)."""
    import os
    import signal

    a, b, c = slow_fleet
    pid = b.bridge.reader.pid
    assert pid is not None and pid != os.getpid()
    assert os.path.exists(f"/proc/{pid}")
    ip = "198.18.30.1"
    with _Closing(a.cli_store()) as st:
        manual_ban(st, ip, 3600, "first", ALLOW)
    wait_for(lambda: ip in b.enforced(), timeout=TICK / 2)
    os.kill(pid, signal.SIGKILL)  # (b's reader process: this test's own node started it)
    ip2 = "198.18.30.2"
    with _Closing(a.cli_store()) as st:
        manual_ban(st, ip2, 3600, "meanwhile", ALLOW)
    wait_for(lambda: b.bridge.reader.pid not in (None, pid) and b.bridge.reader.connected, timeout=30)
    wait_for(lambda: ip2 in b.enforced() and b.bridge.in_sync(), timeout=30)
    assert b.bridge.stats.malformed == 0 and b.bridge.stats.unverified == 0


def test_an_entry_read_as_its_field_list_is_checked_as_its_fields():
    """The reader's process checks XREAD's field-value lists (`wire.check_flat_entry`: ban entries in
    the order nodes write them without a dict): every shape gives what `check_entry` gives its dict."""
    from sipguard.cluster.signing import Signer
    from sipguard.cluster.wire import ban_payload, check_entry, check_flat_entry
    from sipguard.model import Ban

    signer = Signer("s" * 24, "sgtest:")
    now = time.time()
    ban = Ban(ip="198.18.31.7", reason="r", created=now, expires=now + 60, manual=True)
    good = ban_payload(ban, "n1:1", "n1", signer)
    shapes = [
        ["op", "ban", "ip", "198.18.31.7", "id", "n1:1", "origin", "n1", "ban", good],
        ["op", "ban", "ip", "198.18.31.8", "id", "n1:1", "origin", "n1", "ban", good],  # another address
        ["op", "ban", "ip", "198.18.31.7", "id", "n1:1", "origin", "n1", "ban", good[:-3]],  # cut json
        ["op", "ban", "ip", "198.18.31.7", "id", "n1:1", "origin", "n1", "ban", good.replace('"r"', '"x"')],
        ["ip", "198.18.31.7", "op", "ban", "id", "n1:1", "origin", "n1", "ban", good],  # other order
        ["op", "ban", "ip", "198.18.31.7", "ban", good],
        ["op", "ban", "ip", "198.18.31.7", "id", "n1:1", "origin", "n1", "ban"],  # odd length
        ["op", "unban", "ip", "198.18.31.7", "id", "n1:1", "origin", "n1", "at", f"{now:.6f}", "sig", "x" * 22],
        ["op", "nonsense"], [], "not a list", None, {"op": "ban", "ip": "198.18.31.7", "ban": good},
    ]
    for flat in shapes:
        if isinstance(flat, dict):
            fields = flat
        elif isinstance(flat, list):
            it = iter(flat)
            fields = dict(zip(it, it))
        else:
            fields = {}
        assert check_flat_entry(flat, signer, now) == check_entry(fields, signer, now), flat
    assert check_flat_entry(shapes[0], signer, now)[0] == "ban"
    assert check_flat_entry(shapes[1], signer, now)[0] == "malformed"
    assert check_flat_entry(shapes[3], signer, now)[0] == "unverified"


def test_checked_entries_are_what_the_daemon_applies():
    """`wire.check_entry` (run in the reader's process) gives plain tuples: a verified ban as parse_ban
    reads it, unbans with their time; unsigned, wrongly signed, mismatched or malformed entries as
    skips (counted by the bridge), never a ban."""
    from sipguard.cluster.signing import Signer
    from sipguard.cluster.wire import ban_of, ban_payload, check_entry, check_shared, parse_ban
    from sipguard.model import Ban

    signer, other = Signer("s" * 24, "sgtest:"), Signer("t" * 24, "sgtest:")
    now = time.time()
    ban = Ban(ip="198.18.31.1", reason="r\x1b[2J", created=now, expires=now + 60, score=2.0, offence=1, manual=True)
    payload = ban_payload(ban, "edge1:1", "edge1", signer)
    got = check_entry({"op": "ban", "ip": ban.ip, "id": "edge1:1", "origin": "edge1", "ban": payload}, signer, now)
    assert got[0] == "ban" and ban_of(got) == parse_ban(payload, signer, now)
    assert ban_of(got)[0].reason == "r[2J"
    assert check_shared(payload, signer, now) == got
    forged = ban_payload(ban, "edge1:1", "edge1", other)
    assert check_entry({"op": "ban", "ip": ban.ip, "ban": forged}, signer, now) == ("unverified", "")
    assert check_shared(forged, signer, now) == ("unverified", "")
    assert check_entry({"op": "ban", "ip": "198.18.31.2", "ban": payload}, signer, now)[0] == "malformed"
    assert check_entry({"op": "ban", "ip": ban.ip}, signer, now)[0] == "malformed"
    assert check_entry({"op": "nuke"}, signer, now) == ("malformed", "unknown op")
    assert check_entry(["not", "a", "dict"], signer, now)[0] == "malformed"
    assert check_shared("{not json", signer, now)[0] == "malformed"
    assert check_shared('{"ip":"198.18.31.1","created":NaN}', None, now)[0] == "malformed"  # (json's fallback)
    at = repr(now)
    sig = signer.tag("unban", "unban", ban.ip, "edge1:2", "edge1", at)
    assert check_entry({"op": "unban", "ip": ban.ip, "id": "edge1:2", "origin": "edge1", "at": at, "sig": sig},
                       signer, now) == ("unban", ban.ip, now)
    assert check_entry({"op": "unban", "ip": ban.ip, "id": "edge1:2", "origin": "edge1", "at": at, "sig": "x" * 22},
                       signer, now) == ("unverified", "")


def test_the_reader_thread_shadows_nothing_of_threading_thread():
    """StreamReader is a threading.Thread: none of its names may be one Thread's own instances use
    (Python 3.13's Thread keeps its handle in `self._handle`: a method of that name was shadowed by it,
    and the reader's process was restarted forever on Debian 13)."""
    import threading

    from sipguard.cluster.reader import StreamReader

    thread_names = set(vars(threading.Thread())) | {"_handle", "_started", "_ident", "_native_id", "_tstate_lock",
                                                   "_is_stopped", "_target", "_args", "_kwargs", "_name",
                                                   "_daemonic", "_stderr", "_invoke_excepthook"}
    own = {n for n in vars(StreamReader) if not n.startswith("__")}
    assert not own & thread_names, own & thread_names
