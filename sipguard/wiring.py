"""The composition root: builds every part of a running sipguard from the validated config, once.

`build_daemon` makes the sources (files and journal behind one batch interface), the parsers, the
filters, the doorbell (CLI rings end the loop's wait), the policy (local, or the fleet's), the enforcer stack (the kernel enforcer, then the htable
mirror, then metrics: composed here, never swapped in later), the ban book and the hooks, and hands
them to the `Daemon`, which only loops. Nothing else constructs these parts for a daemon, and no part
is replaced after it is built. Optional parts are imported only when the config asks for them.
"""

from __future__ import annotations

import time
from pathlib import Path

from .addresses import AllowList
from .bans import BanBook, BanListener
from .config import Config
from .daemon import Daemon, Hook, Parts
from .doorbell import Doorbell, bell_path
from .enforce.base import Enforcer
from .filters import FilterSet
from .formats import RecordParser
from .pipeline import Pipeline
from .policy import Policy, Scorer
from .sources import FileFollower, Follower, SourcePosition
from .store import Store

READ_BUDGET = 2 << 20
"""Bytes read per batch: bounds the memory one batch takes (every line of a flood can be an
event) while keeping commits rare (a batch is ~10,000 lines)."""

STDERR_WARNING = ("following Kamailio stderr (-E) output: it has no timestamps and copies CR/LF from SIP "
                  "messages into the log; records are checked against live Kamailio PIDs, but syslog "
                  "(log_stderror=no) is the safe choice")


def kamailio_pid_alive(pid: int, names: frozenset[str] = frozenset({"kamailio"})) -> bool:
    """True when PID is a running process named like Kamailio (guards stderr-format logs)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return comm in names


def load_filters(cfg: Config) -> FilterSet:
    return FilterSet.load(cfg.filters.directories, enabled=cfg.filters.enabled, disabled=cfg.filters.disabled)


def allow_list(cfg: Config) -> AllowList:
    return AllowList(cfg.allowlist.cidrs, include_host=cfg.allowlist.include_host_addresses)


def build_daemon(cfg: Config, store: Store, kernel: Enforcer, logs: list[str] | None = None,
                 from_start: bool | None = None, filters: FilterSet | None = None) -> Daemon:
    """Every part of `sipguard run` over `store` and the kernel enforcer `kernel`."""
    now = time.time()
    logs = list(logs or cfg.sources.logs)
    from_start = cfg.sources.from_start if from_start is None else from_start
    filters = filters or load_filters(cfg)
    allow = allow_list(cfg)
    programs = frozenset(cfg.sources.programs)
    pid_alive = (lambda pid: kamailio_pid_alive(pid, programs)) if cfg.sources.verify_pid else None
    parsers: dict = {path: RecordParser(cfg.sources.format, pid_alive=pid_alive, programs=programs)
                     for path in logs}
    warnings = [STDERR_WARNING] if cfg.sources.format == "stderr" else []

    # the enforcer stack: kernel, then the htable mirror, then metrics around both
    enforcer: Enforcer = kernel
    hooks: list[Hook] = []
    if cfg.htable.enabled:
        from .enforce.stack import EnforcerStack
        from .extras.htable import HtableEnforcer

        enforcer = EnforcerStack(kernel, [HtableEnforcer(cfg.htable)])
    metrics = None
    if cfg.metrics.listen:
        from .extras.metrics import MeteredEnforcer, Metrics, MetricsHook

        metrics = Metrics()
        enforcer = MeteredEnforcer(enforcer, metrics)
        metrics.serve(cfg.metrics.listen)
        hooks.append(MetricsHook(metrics))

    # the sources: files, and the journal beside them, behind one batch interface
    saved = store.positions()
    positions = {p: SourcePosition(p, s.dev, s.inode, s.offset, s.head, s.tail) for p, s in saved.items() if p in logs}
    follower: Follower = FileFollower(logs, positions=positions, from_start=from_start,
                                      max_line=cfg.sources.max_line,
                                      read_budget=max(READ_BUDGET, cfg.sources.max_line + 1))
    save_extra = None
    sc = cfg.sources
    if sc.journal or sc.journal_identifiers:
        from .formats import JournalParser
        from .sources import JournalFollower, MultiFollower

        journal = JournalFollower(sc.journal, sc.journal_identifiers, cursors=store.journal_cursors(),
                                  journalctl=sc.journalctl, from_start=from_start)
        for key in journal.sources:
            parsers[key] = JournalParser(programs=None, max_line=sc.max_line)
        follower = MultiFollower(follower, journal)

        def save_extra() -> None:  # the journal's cursors, in the batch's transaction
            store.save_journal_cursors(journal.cursors())

    pipeline = Pipeline(parsers, filters)  # sparse over literal hits, for files and journal alike

    # what else ends the loop's wait: a CLI command's ring (the doorbell) and the fleet's stream reader
    bell = bell_path(store.path)
    if bell is not None:
        hooks.append(Doorbell(bell, follower.wake))

    pc = cfg.policy
    policy = Policy(pc, allow, store.offence_history(now - pc.offence_memory))
    scorer: Scorer = policy
    listeners: list[BanListener] = []
    fleet = None
    if cfg.cluster is not None:  # scores in Redis and shares bans; redis is imported only here
        from .cluster import ClusterBridge

        fleet = ClusterBridge(cfg.cluster, pc, store, allow, policy, cfg.daemon.prune_interval,
                              max_bans=cfg.cluster.max_bans or cfg.enforce.maxelem, wake=follower.wake)
        scorer = fleet.policy
        listeners.append(fleet)
        hooks.append(fleet)
    book = BanBook(store, enforcer, scorer, listeners)

    if cfg.blocklists:
        from .extras.blocklists import BlocklistHook

        hooks.append(BlocklistHook(list(cfg.blocklists), store, allow, metrics))

    parts = Parts(cfg=cfg, store=store, follower=follower, parsers=parsers, pipeline=pipeline, filters=filters,
                  scorer=scorer,
                  policy=policy, book=book, enforcer_name=kernel.name, logs=logs, hooks=hooks, fleet=fleet,
                  batch_scorer=None if fleet is None else fleet.score_batch, save_extra=save_extra,
                  warnings=warnings, on_store=None if metrics is None else metrics.set_store)
    return Daemon(parts)
