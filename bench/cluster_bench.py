"""Fleet-mode benchmark: ban propagation between daemons in separate processes, each enforcing into
the ipsets of its own network namespace; a 100,000-ban burst; idle CPU; the cluster scoring ceiling.

Needs root, ipset, iptables and redis-server (CI has them). Every kernel change happens in network
namespaces made here and deleted at the end, even on failure (tests/lab/netns.py: `sgl-cb<pid>-hub`
holds a redis-server on 198.18.0.1, `sgl-cb<pid>-c<n>` one node each on 198.18.0.10+n); the host's own
firewall, routes and interfaces are never touched. In each node's namespace three processes run:
`sipguard run` (ipset enforcer, the default `[daemon] control_interval`), a poller that reads the
node's kernel sets over netlink every millisecond (until the sample reached its node) and reports each change with its
CLOCK_MONOTONIC time (one clock for every namespace), and an agent that makes CLI bans and unbans
(sipguard.actions, as `sipguard ban` does: kernel, store, ring the daemon) without a process start
per command.

A latency is measured kernel to kernel: from the ban (or the unban) being in the deciding node's set
to it being in every other node's set. Manual bans and unbans come from the agents; automatic bans
from a spray of auth failures over three nodes' logs (the third failure decides), which an agent
then unbans. The burst: 100,000 signed bans written onto the stream at once (as another node's
blocklist import would be: framed beforehand and written by `redis-cli --pipe`, appended with XADD
or each through the publish script), timed until the receiving node's kernel holds them all, while
auth failures from IPv6 sources are written into that node's log, their own ban latency (log line
written -> in the kernel) measured meanwhile (the v6 set stays small enough to read each time); with
a fleet of 1 (the writer standing for the importing node: one receiver, as on an edge of its own) and
of 3 (three receivers sharing this machine's CPUs).
Scoring: N processes on the host, each scoring batches of 1000 events in a private redis-server on
127.0.0.1 (no kernel).

The fleet runs with a `[cluster] secret` (the recommended set-up: every ban and unban signed and
verified, every fleet ban through the guard rails). The burst's entries are signed beforehand with
sipguard's own signing module, as a node signs them, so the receivers verify every one of them (a
receiver that skipped any as unverified or malformed fails the run).

    python bench/cluster_bench.py [--bans 60] [--nodes 3,10] [--burst 100000] [--burst-nodes 1,3] [--burst-repeat 3]
                                  [--seconds 5] [--scoring 1,3,10] [--idle 10] [--json FILE] [--no-write]
                                  [--out DIR]

Prints the results and replaces the "## Cluster" section of bench/RESULTS.md (with --out: writes it
to DIR/cluster.md and the json to DIR/cluster.json, and leaves bench/RESULTS.md alone).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import multiprocessing
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
PY = sys.executable
PORT = 6379
HUB_IP = "198.18.0.1"
SECRET = "cluster-bench-secret-0123456789"  # the fleet's [cluster] secret (a bench's own, in a 0600 config)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def ms(v: float) -> str:
    return f"{v * 1000:.1f} ms"


# -- the poller: one per node namespace ---------------------------------------------------------
def poll_main(prefix: str, interval: float, small: int) -> None:
    """Report changes of the node's kernel sets on stdout: `+ ip t`, `- ip t` (a set of up to `small`
    entries is read whole each time) and `n SET count t` when its size changes. Reads the sets every
    `interval` seconds while armed (`arm` / `disarm` lines on stdin), so that idle pollers leave the
    CPU to the daemons between samples; `watch + IP` / `watch - IP` arms it for IP's set alone until IP
    is in it / gone from it. Each command is answered (`armed` / `disarmed`) after one read."""
    import select

    from sipguard.enforce.ipsetnl import IpsetNetlink

    nl = IpsetNetlink()
    names = [f"{prefix}-v4", f"{prefix}-v6"]
    held: dict[str, set[str]] = {n: set() for n in names}
    counts: dict[str, int] = {n: -1 for n in names}
    out = sys.stdout
    armed = False
    every = interval
    watch: tuple[str, str] | None = None
    sets = names
    end = time.monotonic() + 3600  # bounded: an hour at most
    while time.monotonic() < end:
        ready, _, _ = select.select([sys.stdin], [], [], every if armed else 60.0)
        answer = None
        if ready:
            cmd = sys.stdin.readline()
            if not cmd:
                return
            words = cmd.split()
            armed = bool(words) and words[0] in ("arm", "watch")
            watch = (words[1], words[2]) if armed and words[0] == "watch" else None
            every = float(words[1]) if words[:1] == ["arm"] and len(words) > 1 else interval
            sets = names if watch is None else [names[1] if ":" in watch[1] else names[0]]
            answer = "armed" if armed else "disarmed"
        if not armed and answer is None:
            continue
        t = time.monotonic()
        lines = []
        for name in sets:
            try:
                head = nl.header(name)
            except Exception:  # noqa: BLE001 - not made yet
                head = None
            n = 0 if head is None else head.elements
            if n != counts[name]:
                counts[name] = n
                lines.append(f"n {name} {n} {t:.6f}")
            if n <= small and (n or held[name]):
                now = set(nl.dump(name)) if n else set()
                lines += [f"+ {ip} {t:.6f}" for ip in now - held[name]]
                lines += [f"- {ip} {t:.6f}" for ip in held[name] - now]
                held[name] = now
            if watch is not None and (watch[1] in held[name]) == (watch[0] == "+"):
                armed, watch = False, None  # seen: this poller rests while the others look
        if answer is not None:
            lines.append(answer)
        if lines:
            out.write("\n".join(lines) + "\n")
            out.flush()


# -- the agent: CLI bans and unbans in a node's namespace ----------------------------------------
def agent_main(config: str, state: str) -> None:
    """Reads `ban IP` / `unban IP` lines; each is what `sipguard ban/unban` does; answers `ok`."""
    from sipguard.actions import manual_ban, manual_unban
    from sipguard.addresses import AllowList
    from sipguard.config import load_config
    from sipguard.enforce import make_enforcer
    from sipguard.store import Store

    cfg = load_config(config)
    allow = AllowList([], include_host=False)
    for line in sys.stdin:
        verb, ip = line.split()
        store = Store.open_state_dir(state)
        enforcer = make_enforcer(cfg.enforce)
        try:
            if verb == "ban":
                manual_ban(store, ip, 3600, "bench", allow, enforcer=enforcer)
            else:
                manual_unban(store, ip, enforcer)
        finally:
            enforcer.close()
            store.close()
        sys.stdout.write("ok\n")
        sys.stdout.flush()


# -- the driver --------------------------------------------------------------------------------
class Node:
    """One node: its namespace, daemon, poller and agent (all stopped by PID with the namespace)."""

    def __init__(self, lab, tmp: Path, idx: int, prefix: str, interval: float, first: int) -> None:  # noqa: ANN001
        self.name = f"edge{idx}"
        self.addr = f"198.18.0.{first + idx}"  # (each fleet its own namespaces: nothing left by another)
        self.ns = lab.add_client(self.addr)
        self.dir = tmp / f"{prefix.rstrip(':')}-{self.name}"
        self.dir.mkdir()
        self.log = self.dir / "kamailio.log"
        self.log.touch()
        self.state = self.dir / "state"
        self.config = self.dir / "sipguard.toml"
        self.config.write_text(
            '[enforce]\nbackend = "ipset"\nset_prefix = "sgb"\nchain = "SGBENCH"\n'
            '[allowlist]\ninclude_host_addresses = false\n'
            f'[cluster]\nredis_url = "redis://{HUB_IP}:{PORT}/0"\nnode_name = "{self.name}"\n'
            f'key_prefix = "{prefix}"\nsecret = "{SECRET}"\n')
        self.config.chmod(0o600)  # (a secret in the config: not world-readable)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.daemon = self.ns.popen(PY, "-m", "sipguard", "--config", str(self.config), "--state-dir",
                                    str(self.state), "run", "--log", str(self.log), env=env,
                                    stdout=open(self.dir / "daemon.out", "w"), stderr=subprocess.STDOUT)
        self.poller = self.ns.popen(PY, __file__, "--poll", "sgb", "--interval", str(interval), env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.answers = 0
        self.agent = self.ns.popen(PY, __file__, "--agent", str(self.config), str(self.state), env=env,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.appear: dict[str, float] = {}
        self.gone: dict[str, float] = {}
        self.counts: dict[str, list[tuple[int, float]]] = {"sgb-v4": [], "sgb-v6": []}
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.poller.stdout:
            parts = line.split()
            with self.lock:
                if parts[0] in ("armed", "disarmed"):
                    self.answers += 1
                elif parts[0] == "+":
                    self.appear[parts[1]] = float(parts[2])
                    self.gone.pop(parts[1], None)
                elif parts[0] == "-":
                    self.gone[parts[1]] = float(parts[2])
                elif parts[0] == "n":
                    self.counts[parts[1]].append((int(parts[2]), float(parts[3])))

    def tell(self, cmd: str) -> int:
        with self.lock:
            n = self.answers
        self.poller.stdin.write(cmd + "\n")
        self.poller.stdin.flush()
        return n

    def cli(self, verb: str, ip: str) -> None:
        self.agent.stdin.write(f"{verb} {ip}\n")
        self.agent.stdin.flush()
        if self.agent.stdout.readline().strip() != "ok":
            raise RuntimeError(f"{self.name}: {verb} {ip} failed (see {self.dir}/daemon.out)")

    def write(self, text: str) -> float:
        with self.log.open("a") as f:
            f.write(text)
        return time.monotonic()

    def cpu(self) -> float:
        """CPU seconds (user + system) of the daemon process so far, its stream reader's process
        (its child) included."""
        total = 0.0
        for pid in [self.daemon.pid, *children(self.daemon.pid)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def reached(self, v4: int, since: float) -> float | None:
        with self.lock:
            for n, t in self.counts["sgb-v4"]:
                if n >= v4 and t >= since:
                    return t
        return None


def children(pid: int) -> list[int]:
    """The child processes of `pid` (from /proc: each of its threads' children)."""
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                out += [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def auth_failed(ip: str) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    stamp = datetime.now().strftime("%b %d %H:%M:%S")
    return f"{stamp} edge kamailio[4242]: NOTICE: <script>: auth failed for user 1000 from {host}:5060 method REGISTER\n"


def wait(cond, timeout: float, what: str) -> None:  # noqa: ANN001
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise RuntimeError(f"{what}: not within {timeout}s")
        time.sleep(0.002)


def spread(nodes: list[Node], ip: str, origin: Node | None, table: str) -> float:
    """Seconds from `ip` changing in the origin's kernel (the first node's, when None) to every node."""
    def seen(n: Node) -> float | None:
        with n.lock:
            return (n.appear if table == "appear" else n.gone).get(ip)

    try:
        wait(lambda: all(seen(n) is not None for n in nodes), 10, f"{ip} on every node ({table})")
    except RuntimeError:
        for n in nodes:
            print(n.name, "seen" if seen(n) is not None else "MISSING", n.daemon.poll(), file=sys.stderr)
            if seen(n) is None:
                print((n.dir / "daemon.out").read_text()[-3000:], file=sys.stderr)
        raise
    times = {n.name: seen(n) for n in nodes}
    t0 = times[origin.name] if origin is not None else min(times.values())
    return max(0.0, max(times.values()) - t0)  # (0: the others were there first: the script shares before
    #                                              the deciding node's own kernel call)


def start_fleet(lab, tmp: Path, count: int, prefix: str, r, first: int) -> list[Node]:  # noqa: ANN001
    interval = 0.001
    nodes = [Node(lab, tmp, i, prefix, interval, first) for i in range(1, count + 1)]

    def in_sync() -> bool:
        for n in nodes:
            raw = r.get(prefix + "node:" + n.name)
            if raw is None or not json.loads(raw).get("in_sync"):
                return False
        return True

    try:
        wait(in_sync, 180, f"{count} nodes in sync")
    except RuntimeError:
        for n in nodes:
            print(n.name, r.get(prefix + "node:" + n.name), file=sys.stderr)
            print((n.dir / "daemon.out").read_text()[-2000:], file=sys.stderr)
        raise
    return nodes


def arm(nodes: list[Node], on: bool | str = True, every: float | None = None) -> None:
    """Every poller reads its sets continuously, every `every` seconds (or stops; or, given `+ IP` /
    `- IP`, reads IP's set until IP is there / gone), once it answered."""
    cmd = f"watch {on}" if isinstance(on, str) else ("arm" + (f" {every}" if every else "")) if on else "disarm"
    before = [n.tell(cmd) for n in nodes]

    def answered() -> bool:
        for n, b in zip(nodes, before):
            with n.lock:
                if n.answers <= b:
                    return False
        return True

    wait(answered, 10, "the pollers")


def bench_latency(nodes: list[Node], count: int, net: int) -> dict[str, list[float]]:
    res: dict[str, list[float]] = {"manual ban": [], "manual unban": [], "automatic ban": [],
                                   "unban of an automatic ban": []}
    k = len(nodes)
    for i in range(count):
        origin, other = nodes[i % k], nodes[(i + 1) % k]
        ip = f"198.19.{net}.{i + 1}"
        time.sleep(random.uniform(0.02, 0.1))  # never phase-locked with the daemons' loops
        arm(nodes, f"+ {ip}")
        origin.cli("ban", ip)
        res["manual ban"].append(spread(nodes, ip, origin, "appear"))
        time.sleep(random.uniform(0.02, 0.1))
        arm(nodes, f"- {ip}")
        other.cli("unban", ip)
        res["manual unban"].append(spread(nodes, ip, other, "gone"))
    for i in range(count):
        ip = f"198.19.{net + 20}.{i + 1}"
        a, b, c = random.sample(nodes, 3) if k >= 3 else (nodes[i % k], nodes[(i + 1) % k], nodes[i % k])
        a.write(auth_failed(ip))
        b.write(auth_failed(ip))
        time.sleep(0.2 + random.uniform(0, 0.1))  # the first two are scored
        arm(nodes, f"+ {ip}")
        c.write(auth_failed(ip))
        res["automatic ban"].append(spread(nodes, ip, c, "appear"))
        d = random.choice(nodes)
        time.sleep(random.uniform(0.02, 0.1))
        arm(nodes, f"- {ip}")
        d.cli("unban", ip)
        res["unban of an automatic ban"].append(spread(nodes, ip, d, "gone"))
    return res


def idle_cpu(nodes: list[Node], seconds: float) -> list[float]:
    time.sleep(1.0)
    before = [n.cpu() for n in nodes]
    time.sleep(seconds)
    return [(n.cpu() - b) / seconds for n, b in zip(nodes, before)]


def _resp(*args: str) -> bytes:
    """One Redis command in the protocol's own framing (what `redis-cli --pipe` sends as it is)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode("utf-8", "surrogatepass")
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def bench_burst(nodes: list[Node], r, sock: Path, prefix: str, size: int, via: str, tmp: Path) -> dict:  # noqa: ANN001
    """`size` bans onto the stream at once, the time until the receiving node's kernel holds them all,
    and its own ban latency meanwhile. The entries are signed and framed beforehand, then written by
    `redis-cli --pipe` (C: the arrival as fast as Redis takes it, no Python writer sharing the CPU with
    the receiver). What a node's import writes: bulk entries of BULK_BANS bans, one tag each (the
    bridge's `_flush`); `via` "publish": through the publish script (EVALSHA), as the importing node
    calls it (the shared set and the stream); "stream": appended to the stream as the script appends
    them (XADD), so the receiver is what is timed; "single": 100,000 separate entries, one per ban (the
    shape of bans decided one by one, or of a node of an older version's import)."""
    from sipguard.cluster.bridge import BULK_BANS, UNBAN_MEMORY
    from sipguard.cluster.scripts import PUBLISH_LUA
    from sipguard.cluster.signing import Signer, bulk_parts
    from sipguard.cluster.wire import ban_payload, bulk_payload
    from sipguard.config import PolicyConfig
    from sipguard.model import Ban

    jails = ",".join(PolicyConfig().jails)
    first_addr = int(ipaddress.ip_address("198.18.1.0"))  # (never 198.18.0.0/24: the nodes and their Redis)

    recv = nodes[min(1, len(nodes) - 1)]
    arm([recv], every=0.005)  # (5 ms: the poller leaves the receiver's CPU to the receiver)
    with recv.lock:
        base = recv.counts["sgb-v4"][-1][0] if recv.counts["sgb-v4"] else 0
    sha = r.script_load(PUBLISH_LUA)
    now = time.time()
    signer = Signer(SECRET, prefix)  # signed as a node signs its import (bridge.publish_ban / _flush)
    at = f"{now:.6f}"
    feed = tmp / f"burst-{prefix.strip(':')}.resp"
    with feed.open("wb") as f:
        run: list[tuple[str, str, str]] = []
        for i in range(size):
            ip = str(ipaddress.ip_address(first_addr + i))
            ban = Ban(ip=ip, reason="import", created=now, expires=now + 3600, score=0.0, offence=1, manual=True)
            bid = f"import:{i:08x}"
            payload = ban_payload(ban, bid, "import", signer)
            if via == "single":
                f.write(_resp("XADD", prefix + "stream", "MAXLEN", "~", "200000", "*", "op", "ban", "ip", ip,
                              "id", bid, "origin", "import", "ban", payload))
                continue
            run.append((ip, bid, payload))
            if len(run) < BULK_BANS and i < size - 1:
                continue
            listed = bulk_payload([p for _, _, p in run])
            tag = signer.tag("bans", *bulk_parts("import", listed))
            if via == "publish":  # (manual bans: no offence member; each ban json carries its tag)
                f.write(_resp("EVALSHA", sha, "0", prefix, "200000", "bans", "", f"import:b{i:08x}", "import", listed,
                              "86400", str(UNBAN_MEMORY), jails, tag, "", "", "0", repr(now),
                              *[x for ip_, bid_, p in run for x in (ip_, bid_, p, "", at)]))
            else:
                f.write(_resp("XADD", prefix + "stream", "MAXLEN", "~", "200000", "*", "op", "bans", "origin",
                              "import", "id", f"import:b{i:08x}", "bans", listed, "sig", tag, "skip", ""))
            run = []
    entries = size if via == "single" else -(-size // BULK_BANS)
    own: list[float] = []
    stop = threading.Event()

    def own_bans() -> None:  # auth failures into the receiver's log during the burst
        i = 0
        while not stop.is_set() and i < 400:
            i += 1
            ip = f"2001:db8:77::{i:x}"
            t = recv.write(auth_failed(ip) * 3)
            end = time.monotonic() + 10
            while time.monotonic() < end:
                with recv.lock:
                    seen = recv.appear.get(ip)
                if seen is not None:
                    own.append(seen - t)
                    break
                time.sleep(0.001)
            stop.wait(0.05)

    c0 = recv.cpu()
    writer = threading.Thread(target=own_bans, daemon=True)
    writer.start()
    time.sleep(0.3)  # (a few of its own bans before the burst)
    t0 = time.monotonic()
    with feed.open("rb") as f:
        piped = subprocess.run(["redis-cli", "-s", str(sock), "--pipe"], stdin=f, capture_output=True, text=True,
                               timeout=300)
    t1 = time.monotonic()
    if piped.returncode != 0 or f"errors: 0, replies: {entries}" not in piped.stdout:
        raise RuntimeError(f"redis-cli --pipe: {piped.stdout.strip()} {piped.stderr.strip()}")
    feed.unlink()
    wait(lambda: recv.reached(base + size, t0) is not None, 120, "the burst on the receiver")
    done = recv.reached(base + size, t0)
    recv_cpu = recv.cpu() - c0  # (its own bans' work too, a few hundred)
    first = next(t for n, t in recv.counts["sgb-v4"] if n > base and t >= t0)
    time.sleep(0.5)
    stop.set()
    writer.join(15)
    arm([recv], False)
    stats = json.loads(r.get(prefix + "node:" + recv.name) or "{}").get("stats", {})
    if stats.get("unverified") or stats.get("malformed"):
        raise RuntimeError(f"the receiver skipped burst entries: {stats}")
    return {"inject": t1 - t0, "applied": done - t0, "after_inject": done - t1, "first": first - t0,
            "recv_cpu": recv_cpu, "own": own, "size": size, "nodes": len(nodes), "via": via,
            "unverified": stats.get("unverified"), "malformed": stats.get("malformed")}


def score_worker(port: int, tmp: str, name: str, seconds: float, start_at: float, q) -> None:  # noqa: ANN001
    from sipguard.config import Config
    from sipguard.enforce.dryrun import DryRunEnforcer
    from sipguard.model import Event, EventKind
    from sipguard.store import Store
    from sipguard.wiring import build_daemon

    logging.disable(logging.CRITICAL)
    d = Path(tmp) / name
    d.mkdir()
    (d / "k.log").touch()
    cfg = Config.model_validate({
        "allowlist": {"include_host_addresses": False}, "enforce": {"backend": "dryrun"},
        "cluster": {"redis_url": f"redis://127.0.0.1:{port}/0", "node_name": name, "key_prefix": "sgscore:",
                    "socket_timeout": 5.0}})  # (a loaded machine's pauses are no outage: throughput is measured)
    store = Store.open_state_dir(d / "state")
    dm = build_daemon(cfg, store, DryRunEnforcer(), logs=[str(d / "k.log")])
    dm.setup()
    k = int(name.rsplit("-", 1)[1])
    fleet, scorer = dm.parts.fleet, dm.parts.scorer
    while time.time() < start_at:
        time.sleep(0.001)
    stop_at = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < stop_at:
        now = time.time()
        for j in range(1000):
            i = n + j
            # every 20th from a few repeat offenders (they get banned), the rest a spray of new sources
            ip = f"{20 + k}.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}" if i % 20 else f"10.200.{k}.{i % 50}"
            scorer.observe(Event(now, ip, "auth-failed", EventKind.AUTH_FAILURE, 1.0))
        fleet.score_batch(now)
        n += 1000
    ok = fleet.redis_ok
    q.put((fleet.stats.scored, ok))
    fleet.close()
    dm.parts.follower.close()
    store.close()


def bench_scoring(seconds: float, procs: int) -> float | None:
    exe = shutil.which("redis-server")
    tmp = Path(tempfile.mkdtemp(prefix="sipguard-score-bench-"))
    port = free_port()
    redis = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp), "--save", "",
                              "--appendonly", "no", "--loglevel", "warning"], stdout=subprocess.DEVNULL)
    try:
        import redis as redis_py

        r = redis_py.Redis(host="127.0.0.1", port=port)
        wait(lambda: _pings(r), 10, "redis-server")
        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        start_at = time.time() + 3.0 + 0.3 * procs
        ps = [ctx.Process(target=score_worker, args=(port, str(tmp), f"score{procs}-{k}", seconds, start_at, q))
              for k in range(procs)]
        for p in ps:
            p.start()
        got = [q.get(timeout=120 + seconds) for _ in ps]
        for p in ps:
            p.join(30)
        if not all(ok for _n, ok in got):  # reported as such, never a figure from a run that fell back
            print(f"scoring with {procs} processes: Redis timed out (the node fell back to local scoring)",
                  file=sys.stderr)
            return None
        return sum(n for n, _ok in got) / seconds
    finally:
        redis.kill()
        redis.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def _pings(r) -> bool:  # noqa: ANN001
    try:
        return bool(r.ping())
    except Exception:  # noqa: BLE001
        return False


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bans", type=int, default=60, help="bans of each kind timed per fleet size")
    ap.add_argument("--nodes", default="3,10", help="fleet sizes (each a fleet of its own)")
    ap.add_argument("--burst", type=int, default=100_000, help="bans of the burst; 0: none")
    ap.add_argument("--burst-nodes", default="1,3", help="nodes of the burst's fleets (each a fleet of its own; "
                    "1: the one receiving node, the writer standing for the importing node)")
    ap.add_argument("--burst-via", default="stream,publish,single",
                    help="how the burst is written (stream, publish: bulk entries as a node's import; single: an "
                         "entry per ban)")
    ap.add_argument("--burst-repeat", type=int, default=3, help="runs of each burst (the median is reported)")
    ap.add_argument("--seconds", type=float, default=5.0, help="per scoring run")
    ap.add_argument("--scoring", default="1,3,10", help="processes of the scoring runs; empty: none")
    ap.add_argument("--json", help="also write the results as json to this file")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds the idle CPU is measured over")
    ap.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    ap.add_argument("--out", help="write the Cluster section (cluster.md) and the json (cluster.json) into this "
                    "directory instead of bench/RESULTS.md (which is then left alone)")
    ap.add_argument("--poll", help=argparse.SUPPRESS)
    ap.add_argument("--interval", type=float, default=0.001, help=argparse.SUPPRESS)
    ap.add_argument("--agent", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        args.no_write = True
        args.json = args.json or str(Path(args.out) / "cluster.json")
    if args.poll:
        return poll_main(args.poll, args.interval, 5000)
    if args.agent:
        return agent_main(*args.agent)
    if os.geteuid() != 0 or shutil.which("ipset") is None or shutil.which("redis-server") is None:
        sys.exit("needs root, ipset and redis-server (network namespaces with kernel sets)")
    from tests.lab.netns import Lab

    sizes = [int(x) for x in args.nodes.split(",") if x]
    lat: dict[int, dict[str, list[float]]] = {}
    cpu: dict[int, list[float]] = {}
    bursts: dict[str, dict] = {}
    tmp = Path(tempfile.mkdtemp(prefix="sipguard-cluster-bench-"))
    import redis as redis_py

    try:
        with Lab(f"cb{os.getpid() % 100000}") as lab:
            sock = tmp / "redis.sock"
            lab.hub.popen(shutil.which("redis-server"), "--port", str(PORT), "--bind", HUB_IP, "--unixsocket",
                          str(sock), "--unixsocketperm", "700", "--dir", str(tmp), "--save", "", "--appendonly",
                          "no", "--protected-mode", "no", "--loglevel", "warning", stdout=subprocess.DEVNULL)
            r = redis_py.Redis(unix_socket_path=str(sock), decode_responses=True)
            wait(lambda: sock.exists() and _pings(r), 10, "redis-server in the hub")
            for k, count in enumerate(sizes):
                prefix = f"cb{count}:"
                nodes = start_fleet(lab, tmp, count, prefix, r, 10 + 20 * k)
                try:
                    lat[count] = bench_latency(nodes, args.bans, 200 + k)  # (the burst: 198.18.1.0 up)
                    print(count, "nodes:", {w: f"p50 {ms(statistics.median(v))} p99 {ms(pct(v, 99))}"
                                            for w, v in lat[count].items()}, flush=True)
                    cpu[count] = idle_cpu(nodes, args.idle)
                    print(count, "nodes: idle CPU", cpu[count], flush=True)
                finally:
                    stop_fleet(nodes)
            runs = [(via, int(n)) for n in args.burst_nodes.split(",") if n for via in args.burst_via.split(",")]
            j, first = 0, 70
            for via, count in runs if args.burst else ():
                for _ in range(max(1, args.burst_repeat)):  # (each time a fresh fleet: the run varies a lot here)
                    prefix = f"cbb{j}:"
                    if first + count > 250:
                        raise SystemExit("too many burst runs for the lab's addresses (198.18.0.70-250)")
                    # (new addresses, so new namespaces: never the kernel sets another run filled)
                    nodes = start_fleet(lab, tmp, count, prefix, r, first)
                    j, first = j + 1, first + count
                    try:
                        b = bench_burst(nodes, r, sock, prefix, args.burst, via, tmp)
                        bursts.setdefault(f"{via}/{count}", []).append(b)
                        print("burst", via, count, {k: v for k, v in b.items() if k != "own"}, flush=True)
                    finally:
                        stop_fleet(nodes)
        score = {int(k): bench_scoring(args.seconds, int(k)) for k in args.scoring.split(",") if k}
        redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(args, lat, cpu, bursts, score, redis_version)
    res = {"latency": {str(c): {w: {"samples": len(v), "p50": statistics.median(v), "p95": pct(v, 95),
                                    "p99": pct(v, 99), "max": max(v)} for w, v in per.items()}
                       for c, per in lat.items()},
           "idle_cpu": {str(c): v for c, v in cpu.items()},
           "burst": {key: _burst_summary(runs) for key, runs in bursts.items()},
           "scoring": {str(k): v for k, v in score.items()}, "secret": True, "load": os.getloadavg()}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


def _burst_summary(runs: list[dict]) -> dict:
    """The repeats of one burst: the median run's figures (by the time to have them all), each run's,
    and the own bans of all runs together."""
    mid = sorted(runs, key=lambda b: b["applied"])[(len(runs) - 1) // 2]
    own = [x for b in runs for x in b["own"]]
    return {k: v for k, v in mid.items() if k != "own"} | {
        "runs": [{k: v for k, v in b.items() if k != "own"} for b in runs],
        "own_samples": len(own), "own_p50": statistics.median(own) if own else None,
        "own_p99": pct(own, 99) if own else None}


def stop_fleet(nodes: list[Node]) -> None:
    """Say what the daemons warned about (Redis timeouts, store errors), then stop this fleet's
    processes by PID (the namespaces go with the lab)."""
    for n in nodes:
        warned = [ln for ln in (n.dir / "daemon.out").read_text().splitlines()
                  if ("WARNING" in ln or "ERROR" in ln) and " banned " not in ln]
        if warned:
            print(n.name, f"{len(warned)} warnings:", *warned[:4], sep="\n  ", file=sys.stderr)
    for n in nodes:
        for p in (n.agent, n.poller, n.daemon):
            try:
                p.terminate()
                p.wait(20)
            except Exception:  # noqa: BLE001
                p.kill()
                p.wait(5)


def report(args, lat: dict, cpu: dict, bursts: dict, score: dict, redis_version: str) -> None:  # noqa: ANN001
    load = os.getloadavg()
    text = [
        "## Cluster",
        "",
        f"`bench/cluster_bench.py` ({datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, load average {load[0]:.1f} at the end, Python "
        f"{platform.python_version()}, redis-server {redis_version.removeprefix('v=')}): each node is "
        "`sipguard run` in a process and a network namespace of its own, enforcing into its own ipsets, "
        "with a `[cluster] secret` (every ban and unban signed and verified, every fleet ban through the "
        "guard rails; the burst's entries signed as a node signs them); "
        "Redis in another namespace, over TCP; the default `[daemon] control_interval`. A latency is from "
        "the change being in the deciding node's kernel set to it being in every other node's, read by a "
        "poller in each namespace every 1 ms (only while the sample has not reached its node).",
        "",
        "| propagation, kernel to kernel | nodes | samples | p50 | p95 | p99 | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for count, res in lat.items():
        for what, v in res.items():
            text.append(f"| {what} | {count} | {len(v)} | {ms(statistics.median(v))} | {ms(pct(v, 95))} | "
                        f"{ms(pct(v, 99))} | {ms(max(v))} |")
    text += ["", "| idle daemon (after the bans, nothing arriving) | nodes | CPU per node, mean | max |", "|---|---|---|---|"]
    for count, v in cpu.items():
        text.append(f"| CPU of one core | {count} | {statistics.mean(v) * 100:.2f} % | {max(v) * 100:.2f} % |")
    if bursts:
        from sipguard.cluster.bridge import BULK_BANS

        how = {"stream": f"an import: {BULK_BANS} bans per entry, appended to the stream (XADD)",
               "publish": f"an import: {BULK_BANS} bans per entry, through the publish script",
               "single": "one entry per ban, appended to the stream (XADD)"}
        text += ["", f"| burst: {args.burst:,} signed bans written at once (redis-cli --pipe) | nodes receiving | "
                 "runs | written | first in the receiver's kernel | all in its kernel, from the first written: "
                 "median (each run) | ... after the last was written | the receiver's CPU (daemon and reader) | "
                 "its own bans meanwhile (log line -> kernel): samples, p50, p99 |", "|---|---|---|---|---|---|---|---|---|"]
        for runs in bursts.values():
            b = _burst_summary(runs)
            each = ", ".join(f"{x['applied']:.2f}" for x in runs)
            own = (f"{b['own_samples']}, {ms(b['own_p50'])}, {ms(b['own_p99'])}" if b["own_samples"] else "none")
            text.append(f"| {how[b['via']]} | {b['nodes']} | {len(runs)} | {b['inject']:.2f} s | {b['first']:.2f} s | "
                        f"{b['applied']:.2f} s ({each}) | {b['after_inject']:.2f} s | {b['recv_cpu']:.2f} s | {own} |")
    text += ["", "| cluster scoring (processes, batches of 1000 events: 95% a spray of new sources) | events scored "
             "in Redis /s |", "|---|---|"]
    for k, v in score.items():
        text.append(f"| {k} node{'s' if k > 1 else ''} at once (total) | "
                    + ("Redis timed out: no figure" if v is None else f"{v:,.0f}") + " |")
    text.append("")
    print("\n".join(text))
    if args.out:
        (Path(args.out) / "cluster.md").write_text("\n".join(text))
        print(f"wrote {Path(args.out) / 'cluster.md'} (bench/RESULTS.md left alone)")
    if not args.no_write:
        old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
        if "## Cluster\n" in old:  # replace our own section, leave the others' tables alone
            head, _, rest = old.partition("## Cluster\n")
            nxt = rest.find("\n## ")
            old = head.rstrip("\n") + "\n\n" + (rest[nxt + 1:] if nxt >= 0 else "")
        RESULTS.write_text(old.rstrip("\n") + "\n\n" + "\n".join(text))
        print(f"wrote the Cluster section of {RESULTS}")


if __name__ == "__main__":
    main()
