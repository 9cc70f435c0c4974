"""The composition root: builds every part of a running sipguard from the validated config, once.

`build_daemon` makes the sources (files and journal behind one batch interface), the parsers, the
filters, the doorbell (CLI rings end the loop's wait), the policy (local, or the fleet's), the enforcer stack (the kernel enforcer, then the htable
mirror, then metrics: composed here, never swapped in later), the ban book and the hooks, and hands
them to the `Daemon`, which only loops. Nothing else constructs these parts for a daemon, and no part
is replaced after it is built. Optional parts are imported only when the config asks for them.

`choose_sources` decides what to follow when `[sources]` names nothing (an installed daemon finding
Kamailio's log by itself): `/var/log/kamailio.log` if it exists, else the journal of
`kamailio.service` if the journal has entries of it, else `/var/log/syslog`. The roots it looks in
(`SourceRoots`) are injectable for tests; the choice and its reason are logged at start and saved
for `sipguard status` (store meta `sources`).
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .addresses import AllowList
from .bans import WRITE_SLICE, BanBook, BanListener
from .config import Config, SourcesConfig, running_as_root, trusted_program
from .daemon import Daemon, Hook, Parts
from .doorbell import Doorbell, bell_path
from .enforce.base import Enforcer
from .filters import FilterSet
from .formats import JournalTrust, RecordParser
from .pipeline import Pipeline
from .policy import Policy, Scorer
from .sources import FileFollower, Follower, SourcePosition
from .store import Store

log = logging.getLogger("sipguard.wiring")

READ_BUDGET = 2 << 20
"""Bytes read per batch: bounds the memory one batch takes (every line of a flood can be an
event) while keeping commits rare (a batch is ~10,000 lines)."""

STDERR_WARNING = ("following Kamailio stderr (-E) output: plain text has no timestamps and copies CR/LF from "
                  "SIP messages into the log, so whole records can be forged; it is read only with [sources] "
                  "trust_plain_stderr = true, records checked against live Kamailio PIDs; Kamailio's JSON log "
                  "engine (--log-engine=json:UM) or syslog (log_stderror=no) is the safe choice")


def kamailio_pid_alive(pid: int, names: frozenset[str] = frozenset({"kamailio"})) -> bool:
    """True when PID is a running process named like Kamailio (guards stderr-format logs)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return comm in names


@dataclass(frozen=True)
class SourceRoots:
    """Where `choose_sources` looks: the log directory and the journalctl to ask (tests inject theirs)."""

    log_dir: Path = Path("/var/log")
    journalctl: str | None = None  # None: [sources] journalctl (as root: the trusted system one)
    unit: str = "kamailio.service"

    @classmethod
    def from_env(cls) -> SourceRoots:
        """The defaults, or $SIPGUARD_LOG_DIR and $SIPGUARD_JOURNALCTL (as root a trusted program only)."""
        journalctl = os.environ.get("SIPGUARD_JOURNALCTL") or None
        if journalctl is not None and running_as_root():
            journalctl = trusted_program(journalctl)
        return cls(Path(os.environ.get("SIPGUARD_LOG_DIR") or "/var/log"), journalctl)


@dataclass(frozen=True)
class SourceChoice:
    """What the daemon follows and why (`reason` is for people: the start log and `status`)."""

    logs: list[str]
    journal: list[str] = field(default_factory=list)
    identifiers: list[str] = field(default_factory=list)
    reason: str = ""
    chosen_by: str = "config"  # "config", "command line" or "default"

    def describe(self) -> str:
        parts = list(self.logs) + [f"the journal of {u}" for u in self.journal]
        parts += [f"the journal entries of identifier {i}" for i in self.identifiers]
        return ", ".join(parts) or "nothing"


def journal_has(journalctl: str, unit: str, timeout: float = 10.0) -> tuple[bool, str]:
    """Whether the journal holds an entry of `unit` (`journalctl -u UNIT -n 1`), with why not."""
    try:
        p = subprocess.run([journalctl, "--unit", unit, "--lines=1", "--output=cat", "--no-pager", "--quiet"],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"{journalctl} could not be run ({exc})"
    if p.returncode != 0:
        err = p.stderr.decode(errors="replace").strip().splitlines()
        return False, f"journalctl failed: {err[-1] if err else p.returncode}"
    if not p.stdout.strip():
        return False, f"the journal has no entries of {unit}"
    return True, f"the journal has entries of {unit}"


def _journalctl_for(sc: SourcesConfig, roots: SourceRoots) -> str | None:
    if roots.journalctl is not None:
        return roots.journalctl
    if not running_as_root():
        return sc.journalctl
    try:
        return trusted_program(sc.journalctl, default_name="journalctl")
    except ValueError:
        return None


def choose_sources(sc: SourcesConfig, roots: SourceRoots | None = None,
                   cli_logs: list[str] | None = None) -> SourceChoice:
    """The sources to follow: the command line's logs, the config's [sources], or the default chain."""
    roots = roots or SourceRoots()
    if cli_logs:
        return SourceChoice(list(cli_logs), list(sc.journal), list(sc.journal_identifiers),
                            "--log on the command line", "command line")
    if sc.chosen:
        return SourceChoice(list(sc.logs), list(sc.journal), list(sc.journal_identifiers),
                            "named in [sources]", "config")
    kamailio_log = roots.log_dir / "kamailio.log"
    if kamailio_log.exists():
        return SourceChoice([str(kamailio_log)], reason=f"no [sources] configured and {kamailio_log} exists",
                            chosen_by="default")
    journalctl = _journalctl_for(sc, roots)
    has, why = (False, "no trusted journalctl in the system path") if journalctl is None else \
        journal_has(journalctl, roots.unit)
    if has:
        return SourceChoice([], [roots.unit], reason=f"no [sources] configured, {kamailio_log} does not exist "
                            f"and {why}", chosen_by="default")
    syslog = roots.log_dir / "syslog"
    return SourceChoice([str(syslog)], reason=f"no [sources] configured, {kamailio_log} does not exist and "
                        f"{why}", chosen_by="default")


def journal_trust(sc: SourcesConfig, units: list[str]) -> JournalTrust:
    """Which journal entries are Kamailio's: the followed units, or its executables run as its users."""
    uids: list[int] = []
    for user in sc.journal_users:
        if user.isdigit():
            uids.append(int(user))
            continue
        try:
            uids.append(pwd.getpwnam(user).pw_uid)
        except KeyError:
            log.warning("[sources] journal_users: no user %r on this host; entries of its processes are "
                        "not trusted", user)
    if sc.journal_users and not uids:
        uids = [-1]  # names only, none known here: no executable's entry is trusted
    return JournalTrust.of(units, sc.journal_executables, uids)


def load_filters(cfg: Config) -> FilterSet:
    return FilterSet.load(cfg.filters.directories, enabled=cfg.filters.enabled, disabled=cfg.filters.disabled)


def allow_list(cfg: Config) -> AllowList:
    return AllowList(cfg.allowlist.cidrs, include_host=cfg.allowlist.include_host_addresses)


def build_daemon(cfg: Config, store: Store, kernel: Enforcer, logs: list[str] | None = None,
                 from_start: bool | None = None, filters: FilterSet | None = None,
                 roots: SourceRoots | None = None) -> Daemon:
    """Every part of `sipguard run` over `store` and the kernel enforcer `kernel`."""
    now = time.time()
    roots = roots or SourceRoots.from_env()
    choice = choose_sources(cfg.sources, roots, logs)
    log.info("sources: %s (%s)", choice.describe(), choice.reason)
    store.set_meta("sources", json.dumps({**asdict(choice), "described": choice.describe()}))
    logs = list(choice.logs)
    from_start = cfg.sources.from_start if from_start is None else from_start
    filters = filters or load_filters(cfg)
    allow = allow_list(cfg)
    programs = frozenset(cfg.sources.programs)
    pid_alive = (lambda pid: kamailio_pid_alive(pid, programs)) if cfg.sources.verify_pid else None
    parsers: dict = {path: RecordParser(cfg.sources.format, pid_alive=pid_alive, programs=programs,
                                        trust_plain_stderr=cfg.sources.trust_plain_stderr)
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
    if choice.journal or choice.identifiers:
        from .formats import JournalParser
        from .sources import JournalFollower, MultiFollower

        journalctl = sc.journalctl  # validated with the config when [sources] names the journal
        if choice.chosen_by == "default":
            journalctl = _journalctl_for(sc, roots) or sc.journalctl
        journal = JournalFollower(choice.journal, choice.identifiers, cursors=store.journal_cursors(),
                                  journalctl=journalctl, from_start=from_start)
        trust = journal_trust(sc, choice.journal)
        for key in journal.sources:
            parsers[key] = JournalParser(max_line=sc.max_line, trust=trust,
                                         trust_plain_stderr=sc.trust_plain_stderr)
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
    book = BanBook(store, enforcer, scorer, listeners, write_slice=WRITE_SLICE)

    if cfg.blocklists:
        from .extras.blocklists import BlocklistHook

        hooks.append(BlocklistHook(list(cfg.blocklists), store, allow, metrics))

    parts = Parts(cfg=cfg, store=store, follower=follower, parsers=parsers, pipeline=pipeline, filters=filters,
                  scorer=scorer,
                  policy=policy, book=book, enforcer_name=kernel.name, logs=logs, hooks=hooks, fleet=fleet,
                  batch_scorer=None if fleet is None else fleet.score_batch, save_extra=save_extra,
                  warnings=warnings, on_store=None if metrics is None else metrics.set_store)
    return Daemon(parts)
