"""Scale: loading and restoring many bans, memory under a spray of distinct sources, the SQLite
file under the prune policy, and fail2ban's iptables action for comparison."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .common import SIPGUARD, db_offset, log, netns, run, start, stop, wait_for, write_config
from .genlog import attacker_address_n, syslog_stamp
from .latency import fail2ban_confdir


def _set_count(ns: str, name: str) -> int:
    p = run(["ipset", "list", "-t", name], ns=ns, check=False, timeout=30)
    for line in p.stdout.splitlines():
        if line.startswith("Number of entries:"):
            return int(line.split(":")[1])
    return 0


def load_and_restore(work: Path, n: int = 100_000) -> dict:
    """`ban --from-file` of n addresses into an empty kernel, then a restart restoring them into
    another empty kernel (a fresh namespace), both timed as whole processes."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    addrs = work / "addresses.txt"
    addrs.write_text("".join(attacker_address_n(i) + "\n" for i in range(n)))
    state = work / "state"
    cfg = write_config(work / "sipguard.toml")
    res: dict = {"bans": n}
    with netns("load") as ns:
        t = time.perf_counter()
        run([*SIPGUARD, "--config", str(cfg), "--state-dir", str(state), "ban", "--from-file", str(addrs),
             "--for", "1d"], ns=ns, timeout=600)
        res["load_seconds"] = time.perf_counter() - t
        res["load_in_kernel"] = _set_count(ns, "sipguard-v4")
    log(f"ban --from-file {n}: {res['load_seconds']:.2f}s ({res['load_in_kernel']} in the set)")
    logf = work / "kamailio.log"
    logf.write_bytes(b"")
    with netns("restore") as ns:  # an empty kernel: as after a reboot
        t = time.perf_counter()
        d = start([*SIPGUARD, "--config", str(cfg), "--state-dir", str(state), "run", "--log", str(logf)], ns=ns)
        ok = wait_for(lambda: _set_count(ns, "sipguard-v4") >= n, 120, 0.05)
        res["restore_seconds"] = time.perf_counter() - t if ok else None
        res["restore_in_kernel"] = _set_count(ns, "sipguard-v4")
        stop(d)
    log(f"restart restoring {n}: {res['restore_seconds']}s ({res['restore_in_kernel']} in the set)")
    return res


def _spray_log(work: Path, n: int) -> Path:
    """A fresh `work` dir holding `spray.log`: n auth failures, now, each from its own source."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    logf = work / "spray.log"
    stamp = syslog_stamp(time.time())
    with open(logf, "w", buffering=1 << 20) as f:
        for i in range(n):
            f.write(f"{stamp} sip1 kamailio[23866]: NOTICE: <script>: auth failed for user {1000 + i % 9000} "
                    f"from {attacker_address_n(i)}:5060 method REGISTER\n")
    return logf


def spray(work: Path, n: int = 1_000_000, max_events: int = 100_000) -> dict:
    """`sipguard run --dry-run` after n auth failures from n distinct sources (no bans: one event
    each): peak RSS, tracked windows, and the SQLite files under `[store] max_events`."""
    logf = _spray_log(work, n)
    size = logf.stat().st_size
    state = work / "state"
    cfg = write_config(work / "sipguard.toml",
                       f'[store]\nmax_events = {max_events}\n[daemon]\nprune_interval = "2s"\n')
    t = time.perf_counter()
    d = start([*SIPGUARD, "--config", str(cfg), "--state-dir", str(state), "run", "--dry-run", "--from-start",
               "--log", str(logf)])
    try:
        peak_db = 0

        def done() -> bool:
            nonlocal peak_db
            peak_db = max(peak_db, _db_bytes(state))
            return db_offset(state, str(logf)) >= size

        ok = wait_for(done, 600, 0.2)
        took = time.perf_counter() - t
        time.sleep(3)  # one more prune interval
        peak_db = max(peak_db, _db_bytes(state))
        status = _proc_status(d.pid)
        res = {
            "sources": n,
            "processed": ok,
            "seconds": took,
            "peak_rss_mb": status.get("VmHWM", 0) / 1024,
            "rss_mb": status.get("VmRSS", 0) / 1024,
            "max_events": max_events,
            "db_mb": _db_bytes(state) / 1e6,
            "db_peak_mb": peak_db / 1e6,
        }
        from .common import db_status

        st = db_status(state)
        res["policy"] = st.get("policy", {})
    finally:
        stop(d)
    log(f"spray {n}: peak RSS {res['peak_rss_mb']:.0f} MB, db {res['db_mb']:.1f} MB (peak {res['db_peak_mb']:.1f})")
    return res


def restart_memory(work: Path, n: int = 1_000_000) -> dict:
    """A restart of `sipguard run --dry-run` over a store holding n recent events (n auth failures from
    n distinct sources, all inside the jail's findtime): peak RSS of the restarted daemon once it is
    running (the policy's windows replayed from the store), beside the first run's own peak."""
    logf = _spray_log(work, n)
    size = logf.stat().st_size
    state = work / "state"
    cfg = write_config(work / "sipguard.toml", f'[store]\nmax_events = {2 * n}\n')
    argv = [*SIPGUARD, "--config", str(cfg), "--state-dir", str(state), "run", "--dry-run", "--log", str(logf)]
    d = start([*argv, "--from-start"])
    try:
        ok = wait_for(lambda: db_offset(state, str(logf)) >= size, 900, 0.2)
        first = _proc_status(d.pid).get("VmHWM", 0) / 1024
    finally:
        stop(d)
    from .common import db_status

    t = time.perf_counter()
    d = start(argv)
    try:
        started = time.time()
        up = wait_for(lambda: db_status(state).get("running") and db_status(state).get("heartbeat", 0) >= started,
                      600, 0.2)
        took = time.perf_counter() - t
        st = _proc_status(d.pid)
        events = db_status(state).get("policy", {})
    finally:
        stop(d)
    res = {"events": n, "processed": ok, "running": bool(up), "restart_seconds": took,
           "first_peak_rss_mb": first, "restart_peak_rss_mb": st.get("VmHWM", 0) / 1024,
           "tracked": events.get("tracked")}
    log(f"restart with {n} recent events: peak RSS {res['restart_peak_rss_mb']:.0f} MB "
        f"(first run {first:.0f} MB), up in {took:.1f}s")
    return res


def _db_bytes(state: Path) -> int:
    return sum(p.stat().st_size for p in state.glob("sipguard.db*") if p.exists())


def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if v.strip().endswith("kB"):
                out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def fail2ban_iptables(work: Path, n: int = 1000, extrapolate_to: int = 100_000) -> dict:
    """fail2ban's iptables-multiport action (one rule per address): time to load n bans given
    at once (`fail2ban-client set JAIL banip ...`), extrapolated linearly (a lower bound: each
    insert gets slower as the chain grows)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    logf = work / "kamailio.log"
    logf.write_bytes(b"")
    conf = fail2ban_confdir(work, logf, "polling", "iptables-multiport")
    res: dict = {"bans": n}
    with netns("f2bipt") as ns:
        p = start(["fail2ban-client", "-c", str(conf), "-s", str(work / "fail2ban.sock"), "-p",
                   str(work / "fail2ban.pid"), "-f", "-x", "start"], ns=ns)
        if not wait_for(lambda: "Jail 'kam' started" in _read(work / "fail2ban.log"), 60, 0.1):
            raise RuntimeError("fail2ban did not start")
        ips = [attacker_address_n(i) for i in range(n)]
        t = time.perf_counter()
        run(["fail2ban-client", "-s", str(work / "fail2ban.sock"), "set", "kam", "banip", *ips], ns=ns, timeout=900)

        def count() -> int:
            out = run(["iptables", "-w", "-S", "f2b-kam"], ns=ns, check=False).stdout
            return sum(1 for ln in out.splitlines() if ln.startswith("-A f2b-kam -s"))

        ok = wait_for(lambda: count() >= n, 1800, 0.25)
        res["load_seconds"] = time.perf_counter() - t if ok else None
        res["in_kernel"] = count()
        stop(p)
    if res["load_seconds"]:
        res["extrapolated_bans"] = extrapolate_to
        res["extrapolated_seconds"] = res["load_seconds"] * extrapolate_to / n
    log(f"fail2ban iptables {n} bans: {res['load_seconds']}s ({res['in_kernel']} rules)")
    return res


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except OSError:
        return ""


__all__ = ["load_and_restore", "spray", "fail2ban_iptables"]
