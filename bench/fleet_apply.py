"""Profile of a receiving node's fleet apply path: N signed ban entries, applied by the bridge's `tick`
until the enforcer holds them all. With `--via redis` (the default) they are appended to the stream
(XADD, pipelines of 5000, from a thread of this process, as cluster_bench's burst writes them) and
the node's stream reader (its process: XREAD, tags, bounds) hands them to the bridge, timed from the
first written; with `--via queue` the raw entries are handed to the bridge's queue (chunks of 1000)
and checked on the applying thread, in one process (the path before the reader's process); with
`--via checked` they are checked beforehand (as the reader's process does) and only applied: the
daemon's thread's share alone. Dry-run enforcer, or with --ipset the ipset enforcer (netlink) in a
network namespace made here (`sgl-fa<pid>`, with its own redis-server on its loopback, deleted at the
end: the host's kernel is never touched; needs root); a private redis-server on 127.0.0.1, a
`[cluster] secret`.

    python bench/fleet_apply.py [--bans 100000] [--via redis|queue] [--profile] [--ipset]

Prints the time until the enforcer holds them all (`seconds`, wall clock), until the store holds them
too (`stored_seconds`: the ban book stores a burst after the kernel, in slices), the applying thread's
CPU time for both (which the load of other processes on a shared machine inflates less), per entry,
and (with --profile) the top of cProfile.
"""

from __future__ import annotations

import argparse
import cProfile
import ipaddress
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SECRET = "bench-secret-0123456789abcdef"


def signed_entries(n: int, prefix: str, origin: str = "import") -> list[tuple[str, dict]]:
    """N stream entries as a node publishes them (sipguard's own signing and wire modules)."""
    from sipguard.cluster.signing import Signer
    from sipguard.cluster.wire import ban_payload
    from sipguard.model import Ban

    signer = Signer(SECRET, prefix)
    base = int(ipaddress.ip_address("198.18.0.0")) + 65536
    now = time.time()
    out = []
    for i in range(n):
        ip = str(ipaddress.ip_address(base + i))
        ban = Ban(ip=ip, reason="import", created=now, expires=now + 3600, score=0.0, offence=1, manual=True)
        bid = f"{origin}:{i:016x}"
        out.append((f"{i + 1}-0", {"op": "ban", "ip": ip, "id": bid, "origin": origin,
                                   "ban": ban_payload(ban, bid, origin, signer)}))
    return out


def proc_cpu(pid: int | None) -> float:
    """User and system CPU seconds of a process so far (0 without one)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_stream(url: str, prefix: str, n: int, ready, go, done) -> None:  # noqa: ANN001
    """(A process of its own: the writer never takes the applying thread's GIL.) Signs `n` entries, says
    `ready`, waits for `go`, appends them; `done`: when the last pipeline was answered (perf_counter:
    CLOCK_MONOTONIC, one clock for both processes)."""
    import redis as redis_py

    entries = signed_entries(n, prefix)
    r = redis_py.Redis.from_url(url)
    ready.set()
    go.wait(600)
    for k in range(0, len(entries), 5000):
        with r.pipeline(transaction=False) as pipe:
            for _id, fields in entries[k:k + 5000]:
                pipe.xadd(prefix + "stream", fields, maxlen=200_000, approximate=True)
            pipe.execute()
    done.value = time.perf_counter()
    r.close()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bans", type=int, default=100_000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-secret", action="store_true")
    ap.add_argument("--via", choices=("redis", "queue", "checked"), default="redis")
    ap.add_argument("--ipset", action="store_true", help="the ipset enforcer, in a network namespace of its own")
    args = ap.parse_args(argv)
    if not args.ipset:
        return run(args)
    from lab.netns import Netns, in_netns

    with Netns(f"sgl-fa{os.getpid() % 100000}") as ns, in_netns(ns.name):  # (threads and children inherit it)
        args.netns = ns.name
        return run(args)


def run(args: argparse.Namespace) -> dict:
    from test_cluster import RedisServer, cluster_cfg

    from sipguard.config import Config
    from sipguard.enforce import make_enforcer
    from sipguard.enforce.dryrun import DryRunEnforcer
    from sipguard.process import tune_gc
    from sipguard.store import Store
    from sipguard.wiring import build_daemon

    ns = getattr(args, "netns", None)
    if args.ipset and (ns is None or os.stat(f"/run/netns/{ns}").st_ino != os.stat("/proc/self/ns/net").st_ino):
        raise SystemExit("fleet_apply: --ipset runs only inside the network namespace main() makes for it, "
                         "never in the host's (its firewall is never touched)")
    tmp = Path(tempfile.mkdtemp(prefix="sg-apply-"))
    redis = RedisServer(tmp)
    redis.start()
    try:
        raw = cluster_cfg(redis.url, "recv")
        if not args.no_secret:
            raw["cluster"]["secret"] = SECRET
        raw["cluster"]["max_bans"] = args.bans + 1000
        raw["enforce"]["maxelem"] = args.bans + 1000
        if args.ipset:
            raw["enforce"].update(backend="ipset", set_prefix="sgfa", chain="SGFA")
        cfg = Config.model_validate(raw)
        (tmp / "kamailio.log").touch()
        store = Store.open_state_dir(tmp / "state")
        enf = make_enforcer(cfg.enforce, str(tmp / "state")) if args.ipset else DryRunEnforcer()
        daemon = build_daemon(cfg, store, enf, logs=[str(tmp / "kamailio.log")])
        daemon.setup()
        tune_gc()  # (as `sipguard run` does)
        bridge, book = daemon.parts.fleet, daemon.parts.book
        entries = signed_entries(args.bans, cfg.cluster.key_prefix) if args.via != "redis" else []
        prof = cProfile.Profile() if args.profile else None
        writer = None
        if args.via == "redis":  # the writer process signs its entries first, then waits for the start
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            done, ready, go = ctx.Value("d", 0.0), ctx.Event(), ctx.Event()
            writer_proc = ctx.Process(target=write_stream, args=(redis.url, cfg.cluster.key_prefix, args.bans,
                                                                 ready, go, done))
            writer_proc.start()
            ready.wait(600)
            writer = go
        r0 = proc_cpu(bridge.reader.pid)
        t0 = time.perf_counter()
        c0 = time.thread_time()
        if prof:
            prof.enable()
        if args.via == "checked":
            from sipguard.cluster.wire import check_entry

            checked = [(eid, check_entry(f, bridge.signer, time.time())) for eid, f in entries]
            t0 = time.perf_counter()
            c0 = time.thread_time()
            for k in range(0, len(checked), 2000):
                bridge.queue.put(("checked", checked[k:k + 2000]))
        elif args.via == "queue":
            for k in range(0, len(entries), 1000):
                bridge.queue.put(("entries", entries[k:k + 1000]))
        else:
            writer.set()  # (the entries were signed in the writer's process before t0)
        while bridge.stats.applied_bans < args.bans:
            if args.via == "redis" and bridge.queue.empty() and not bridge.in_backlog():
                daemon.parts.follower.poll(1.0)  # (as the daemon waits: its log, until the reader's wake)
            bridge.tick(time.time(), book)
        in_kernel = time.perf_counter() - t0
        while book.pending:  # the store follows in slices (the daemon's loop commits them as it comes round)
            book.commit(time.time())
        stored = time.perf_counter() - t0
        written = None
        if writer is not None:
            writer_proc.join()
            written = done.value - t0
        if prof:
            prof.disable()
        took = in_kernel
        cpu = time.thread_time() - c0  # the applying thread's own CPU (the store's slices too): what the load of others does not add
        reader_cpu = proc_cpu(bridge.reader.pid) - r0
        held = len(enf.entries())
        res = {"bans": args.bans, "via": args.via, "enforcer": "ipset" if args.ipset else "dryrun", "held": held, "seconds": round(took, 3), "stored_seconds": round(stored, 3), "cpu_seconds": round(cpu, 3), "reader_cpu_seconds": round(reader_cpu, 3),
               "written_after": None if written is None else round(written, 3),
               "us_per_entry": round(took / args.bans * 1e6, 1), "cpu_us_per_entry": round(cpu / args.bans * 1e6, 1),
               "apply_batches": bridge.stats.apply_batches, "unverified": bridge.stats.unverified,
               "malformed": bridge.stats.malformed, "load": os.getloadavg()[0]}
        print(res)
        if prof:
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            pstats.Stats(prof).sort_stats("cumtime").print_stats(30)
        daemon.stop()
        for hook in daemon.parts.hooks:
            hook.close()
        daemon.parts.follower.close()
        return res
    finally:
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
