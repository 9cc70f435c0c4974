"""`sipguard run`: wires sources → formats → filters → policy → store/enforcer in one loop.

Holds no detection logic of its own. Each read batch is processed, enforced, then committed
together with the source positions in one transaction, so a crash re-reads at most one batch
and never counts a line twice.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .addresses import AllowList
from .config import Config
from .enforce import Enforcer
from .filters import FilterSet
from .formats import RecordParser
from .model import Ban, Decision, Line
from .pipeline import Pipeline
from .policy import Policy
from .sources import FileFollower, Follower, LineBatch, SourcePosition
from .store import Store

log = logging.getLogger("sipguard.daemon")

READ_BUDGET = 2 << 20
"""Bytes read per batch: bounds the memory one batch takes (every line of a flood can be an
event) while keeping commits rare (a batch is ~10,000 lines)."""


def kamailio_pid_alive(pid: int, names: frozenset[str] = frozenset({"kamailio"})) -> bool:
    """True when PID is a running process named like Kamailio (guards stderr-format logs)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return comm in names


@dataclass
class DaemonStats:
    started: float = field(default_factory=time.time)
    lines: int = 0
    records: int = 0
    events: int = 0
    bans: int = 0
    unbans: int = 0
    expired: int = 0
    errors: int = 0


def _counters(stats: object) -> dict:
    """Any stage's counters (a Counter, a dict or a dataclass with as_dict) as a plain dict."""
    as_dict = getattr(stats, "as_dict", None)
    return dict(as_dict()) if callable(as_dict) else dict(stats)  # type: ignore[call-overload]


def ban_from_decision(d: Decision, now: float) -> Ban:
    return Ban(ip=d.ip, reason=d.reason, created=now, expires=None if d.duration is None else now + d.duration,
               score=d.score, offence=d.offence, manual=False)


class Daemon:
    """One running sipguard: build with a validated Config, then `run()` until `stop()`."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        enforcer: Enforcer,
        logs: list[str] | None = None,
        from_start: bool | None = None,
        filters: FilterSet | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.enforcer = enforcer
        self.logs = list(logs or cfg.sources.logs)
        self.from_start = cfg.sources.from_start if from_start is None else from_start
        self.filters = filters or FilterSet.load(
            cfg.filters.directories, enabled=cfg.filters.enabled, disabled=cfg.filters.disabled
        )
        self.allow = AllowList(cfg.allowlist.cidrs, include_host=cfg.allowlist.include_host_addresses)
        self.stats = DaemonStats()
        self._stop = threading.Event()
        self._programs = frozenset(cfg.sources.programs)
        pid_alive = (lambda pid: kamailio_pid_alive(pid, self._programs)) if cfg.sources.verify_pid else None
        self.parsers = {
            path: RecordParser(cfg.sources.format, pid_alive=pid_alive, programs=self._programs)
            for path in self.logs
        }
        self.pipeline = Pipeline(self.parsers, self.filters)  # sparse over literal hits (pipeline.py)
        self.policy: Policy | None = None
        self.follower: Follower | None = None
        self._last_control = 0
        self._last_prune = 0.0
        self._last_status = 0.0
        self._last_resync = 0.0
        self.cluster = None  # fleet mode ([cluster]): sipguard/cluster.py's ClusterBridge
        from .integrations import Integrations  # metrics, htable, blocklists, journal: no-ops unless configured

        self.integrations = Integrations.attach(self)

    # -- lifecycle ---------------------------------------------------------------------------
    def stop(self, *_: object) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def setup(self) -> None:
        """Restore state: offences, windows, bans in force (into the enforcer), positions."""
        now = time.time()
        pc = self.cfg.policy
        self.policy = Policy(pc, self.allow, self.store.offence_history(now - pc.offence_memory))
        self._expire(now)
        self.policy.restore(self.store.recent_events(now - self.policy.max_findtime))
        if self.cfg.cluster is not None:  # scores in Redis, shares bans (wraps self.policy)
            from .cluster import attach

            self.cluster = attach(self)
        active = self.store.active_bans(now)
        for ban in active:
            self.policy.note_ban(ban.ip)
        report = self.enforcer.sync(active, now)
        self._last_resync = now
        log.info("restored %d bans (enforcer %s: +%d -%d, %d repaired)", len(active), self.enforcer.name,
                 report.added, report.removed, report.repaired)
        saved = self.store.positions()
        positions = {p: SourcePosition(p, s.dev, s.inode, s.offset) for p, s in saved.items() if p in self.logs}
        follower = FileFollower(self.logs, positions=positions, from_start=self.from_start,
                                max_line=self.cfg.sources.max_line,
                                read_budget=max(READ_BUDGET, self.cfg.sources.max_line + 1))
        follower.start()
        follower = self.integrations.wrap_follower(follower)
        self.follower = follower  # set only once started: "following" means the end is pinned
        self._last_control = self.store.last_request_id()
        if self.cfg.sources.format == "stderr":  # auto-detected stderr sources warn when first seen
            log.warning("following Kamailio stderr (-E) output: it has no timestamps and copies CR/LF from "
                        "SIP messages into the log; records are checked against live Kamailio PIDs, but "
                        "syslog (log_stderror=no) is the safe choice")
        log.info("following %s with %d filters (%s)", ", ".join(self.logs), len(self.filters.names),
                 ", ".join(self.filters.names))

    def run(self, max_seconds: float | None = None) -> DaemonStats:
        self.setup()
        assert self.follower is not None
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        interval = self.cfg.daemon.control_interval
        poll = self.follower.poll_batch  # whole read buffers (LineBatch): most lines are never parsed
        try:
            while not self._stop.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                try:
                    self.step(poll(interval))
                except Exception:  # noqa: BLE001 - the daemon never dies on one bad batch
                    self.stats.errors += 1
                    log.exception("error while processing a batch; continuing")
                    time.sleep(min(interval, 1.0))
        finally:
            self.write_status(time.time(), running=False)
            self.follower.close()
            self.integrations.close()
            if self.cluster is not None:
                self.cluster.close()
        return self.stats

    # -- one batch ---------------------------------------------------------------------------
    def step(self, lines: list[Line] | LineBatch) -> list[Ban]:
        """Process a batch of lines, apply new bans, commit, then housekeeping."""
        assert self.policy is not None and self.follower is not None
        now = time.time()
        parsed = self.pipeline.batch(lines, now)  # flushed: a batch's records end with it
        events = parsed.events
        self.stats.lines += len(lines)
        self.stats.records += parsed.records
        self.stats.events += len(events)
        new_bans: list[Ban] = []
        for ev in events:
            decision = self.policy.observe(ev)
            if decision is not None:
                new_bans.append(ban_from_decision(decision, now))
        if self.cluster is not None:  # one Redis call scores the batch cluster-wide
            new_bans = self.cluster.on_batch(new_bans, now)
        for ban in new_bans:  # the kernel first: that is what stops the attack
            try:
                self.enforcer.ban(ban, now)
            except Exception:  # noqa: BLE001 - kept in the store; the next sync retries
                self.stats.errors += 1
                log.exception("enforcer failed to ban %s", ban.ip)
            log.warning("banned %s for %s (%s, score %.1f, offence %d)", ban.ip,
                        "ever" if ban.expires is None else f"{ban.expires - now:.0f}s", ban.reason,
                        ban.score, ban.offence)
        if lines or events:
            with self.store.transaction():
                if events:
                    self.store.add_events(events)
                for ban in new_bans:
                    self.store.put_ban(ban, now)
                self.store.save_positions(self.follower.positions().values())
                self.integrations.in_transaction(now)
        self.integrations.on_batch(lines, events, new_bans, now)
        self.stats.bans += len(new_bans)
        self.housekeeping(now)
        return new_bans

    def housekeeping(self, now: float) -> None:
        self._apply_control(now)
        if self.cluster is not None:
            self.cluster.housekeeping(now)
        self.integrations.tick(now)
        self._expire(now)
        if now - self._last_resync >= self.cfg.enforce.resync_interval:
            # repairs flushed sets / deleted hook rules and re-arms bans longer than the kernel's
            # timeout cap (ipset: ~24.8 days), so they never lapse while the daemon runs
            self._last_resync = now
            try:
                report = self.enforcer.sync(self.store.active_bans(now), now)
                if report.added or report.removed or report.repaired:
                    log.warning("enforcer resync: +%d -%d, %d repaired", report.added, report.removed,
                                report.repaired)
            except Exception:  # noqa: BLE001 - retried at the next interval
                self.stats.errors += 1
                log.exception("enforcer resync failed")
        if now - self._last_prune >= self.cfg.daemon.prune_interval:
            self._last_prune = now
            sc = self.cfg.store
            self.store.prune(now, max(sc.event_retention, self.policy.max_findtime if self.policy else 0),
                             sc.max_events, sc.history_retention)
            if self.policy:
                self.policy.expire(now)
        if now - self._last_status >= 2.0:
            self.write_status(now)

    def _apply_control(self, now: float) -> None:
        """Mirror what the CLI did (ban/unban) into the policy and this process's enforcer."""
        for req in self.store.requests_after(self._last_control):
            self._last_control = req.id
            if req.action == "ban" and req.target:
                ban = self.store.get_ban(req.target)
                if ban is not None:
                    self.policy.note_ban(ban.ip)
                    self.enforcer.ban(ban, now)
            elif req.action == "unban" and req.target:
                self.policy.release(req.target)
                self.enforcer.unban(req.target)
                self.stats.unbans += 1
            elif req.action in ("unban_all", "sync"):
                active = self.store.active_bans(now)
                keep = {b.ip for b in active}
                for ip in list(self.policy.banned - keep):
                    self.policy.release(ip)
                for ip in keep:
                    self.policy.note_ban(ip)
                self.enforcer.sync(active, now)

    def _expire(self, now: float) -> None:
        expired = self.store.expired_bans(now)
        if not expired:
            return
        with self.store.transaction():
            for ban in expired:
                self.store.remove_ban(ban.ip, now, action="expire")
        for ban in expired:
            if self.policy is not None:
                self.policy.release(ban.ip)
            try:
                self.enforcer.unban(ban.ip)
            except Exception:  # noqa: BLE001
                self.stats.errors += 1
                log.exception("enforcer failed to unban %s", ban.ip)
            log.info("ban on %s expired", ban.ip)
        self.stats.expired += len(expired)

    def write_status(self, now: float, running: bool = True) -> None:
        """A heartbeat for `sipguard status`: counters of every stage, as JSON in the store."""
        self._last_status = now
        parse: dict[str, int] = {}
        for p in self.parsers.values():
            for k, v in _counters(p.stats).items():
                if isinstance(v, int):
                    parse[k] = parse.get(k, 0) + v
        status = {
            "pid": os.getpid(),
            "running": running,
            "heartbeat": now,
            "logs": self.logs,
            "enforcer": self.enforcer.name,
            "daemon": asdict(self.stats),
            "sources": _counters(self.follower.stats) if self.follower else {},
            "formats": parse,
            "filters": _counters(self.filters.stats),
            "policy": asdict(self.policy.stats) if self.policy else {},
        }
        self.store.set_meta("status", json.dumps(status))
