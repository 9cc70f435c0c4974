"""`sipguard run`: the loop, and only the loop: poll → pipeline → scorer → ban book → commit → hooks.

The composition root (sipguard/wiring.py) builds every part from the validated config and hands them
over as one `Parts`; the daemon creates nothing and decides nothing itself. Each read batch goes
through the pipeline (sipguard/pipeline.py: only lines holding a trigger literal are parsed), is
scored, its bans applied through the ban book (kernel first), then committed together with the source
positions in one transaction, so a crash re-reads at most one batch and never counts a line twice.
A batch is either committed or read again: when its transaction fails (a full disk, an I/O error) the
daemon keeps it (its events, its positions; the ban book keeps its ban rows queued), reads nothing
more, and retries it with a bounded backoff until it lands; it says so once (a warning, `stalled` and
`store_errors` in `status`, a metric) and once more when it caught up. The saved positions never pass
an event that is not in the store, so a stop during the fault re-reads the held batch at the next start.
Between batches: steps of the wall clock (sipguard/clock.py: the bans keep their real time), CLI
requests, hooks (fleet, blocklists), expiries, the resync, pruning and the status heartbeat.

The loop waits in the follower's poll for at most `control_interval`, and nothing in it spins: new log
lines end the wait (inotify after a quiet spell; during a steady stream the follower paces itself to
one batch per 50 ms, sipguard/sources/pace.py), and so does everything else the loop serves, through the follower's
`wake` (called from other threads): a CLI command's ring (sipguard/doorbell.py), an entry from the
fleet's stream (sipguard/cluster/reader.py), `stop`. So a CLI ban is mirrored (and published to the
fleet) at once and another node's ban is applied at once; the tick only bounds what nothing announces
(expiries, a CLI command whose ring was lost). While the ban book holds queued rows beyond one
transaction's slice (a fleet burst: the kernel first, the store after, sipguard/bans.py) the loop does
not wait at all; a stop stores what is still queued.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

from .bans import POLICY, BanBook, ban_from_decision
from .clock import CLOCK_META, ClockRef, ClockWatch, Step, describe
from .config import Config
from .filters import FilterSet
from .formats import Parser
from .model import Ban, Event
from .notify import ready as notify_ready
from .notify import stopping as notify_stopping
from .pipeline import Pipeline
from .policy import Policy, Scorer
from .sources import Follower, LineBatch, SourcePosition
from .store import Store

log = logging.getLogger("sipguard.daemon")

CONTROL_CURSOR = "control_cursor"
"""Store meta key: the last CLI control request this daemon mirrored (kept across restarts)."""
RETRY_FIRST = 0.1
RETRY_MAX = 5.0
"""A batch the store refused is tried again after RETRY_FIRST seconds, doubling up to RETRY_MAX."""


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
    clock_steps: int = 0  # steps of the wall clock the bans were moved for
    store_errors: int = 0  # batch commits the store refused (each retried until it landed)
    stalled: bool = False  # a batch is held because the store refuses it: nothing more is read
    last_store_error: str = ""


@dataclass(frozen=True, slots=True)
class _Unstored:
    """A batch read and scored whose transaction has not committed yet: what the commit must store
    (events, the positions just past its lines) and what the hooks hear once it has."""

    lines_by_source: dict[str, int]
    events: list[Event]
    bans: list[Ban]
    read_time: float
    positions: list[SourcePosition]

    def then(self, later: _Unstored) -> _Unstored:
        """This batch and a later one, stored together (the later one's positions)."""
        lines = dict(self.lines_by_source)
        for src, n in later.lines_by_source.items():
            lines[src] = lines.get(src, 0) + n
        return _Unstored(lines, self.events + later.events, self.bans + later.bans, self.read_time,
                         later.positions)


@dataclass(frozen=True, slots=True)
class BatchReport:
    """What one batch did, for the hooks: lines per source, events, the bans it decided."""

    lines_by_source: dict[str, int]
    events: list[Event]
    bans: list[Ban]
    read_time: float
    skipped: dict[str, int]
    losses: dict[str, int] = field(default_factory=dict)  # loss notices so far (formats/losses.py)


class Hook(Protocol):
    """A part that rides along the loop (metrics, blocklists, the fleet): it sees each batch, and may
    change bans between batches, through the ban book only."""

    def start(self, book: BanBook) -> None: ...

    def on_batch(self, report: BatchReport) -> None: ...

    def tick(self, now: float, book: BanBook) -> None: ...

    def close(self) -> None: ...


@dataclass
class Parts:
    """Everything the loop drives, built once by the composition root."""

    cfg: Config
    store: Store
    follower: Follower
    parsers: Mapping[str, Parser]  # per source (the pipeline's; their counters go to `status`)
    pipeline: Pipeline
    filters: FilterSet
    scorer: Scorer
    policy: Policy  # the local policy (the scorer, or the one the fleet's scorer falls back on)
    book: BanBook
    enforcer_name: str
    logs: list[str]
    hooks: Sequence[Hook] = ()
    fleet: Hook | None = None  # the fleet bridge when [cluster] is set (also among the hooks)
    batch_scorer: Callable[[float], list[tuple[str, list[Ban]]]] | None = None  # the fleet's batch score
    save_extra: Callable[[], None] | None = None  # inside each batch transaction (journal cursors)
    warnings: list[str] = field(default_factory=list)  # said once at start
    clock: ClockWatch = field(default_factory=ClockWatch)  # tells steps of the wall clock (sipguard/clock.py)
    on_store: Callable[[bool, int], None] | None = None  # told (stalled, store errors so far) when either changes


def _counters(stats: object) -> dict:
    """Any stage's counters (a Counter, a dict or a dataclass with as_dict) as a plain dict."""
    as_dict = getattr(stats, "as_dict", None)
    return dict(as_dict()) if callable(as_dict) else dict(stats)  # type: ignore[call-overload]


_PARSER_SKIPS = ("garbage", "forged", "invalid_utf8", "truncated", "other_program",
                 "untrusted_stderr", "json_invalid", "unsafe_json")  # the last three: formats/ since issue 12
_SOURCE_SKIPS = ("too_long", "errors")


class Daemon:
    """One running sipguard: `run()` until `stop()`. Built by `sipguard.wiring.build_daemon`."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.cfg = parts.cfg
        self.stats = DaemonStats()
        self.ready = threading.Event()  # set once the sources are followed (their ends pinned)
        self._stop = threading.Event()
        self._last_control = 0
        self._last_prune = 0.0
        self._last_status = 0.0
        self._last_resync = 0.0
        self._clock_retrying = False  # a step's moved bans could not be stored yet
        self._last_check = float("-inf")  # monotonic: a step of the wall clock never delays the drift check
        self._check_every = parts.cfg.enforce.check_interval
        self._unstored: _Unstored | None = None  # the batch the store refused, held until it lands
        self._retry_in = 0.0  # seconds before the held batch is tried again
        self._stalled_at = 0.0

    # -- lifecycle ---------------------------------------------------------------------------
    def stop(self, *_: object) -> None:
        self._stop.set()
        # the loop's wait ends now, not at its control_interval tick (from a thread of its own: a signal
        # handler may interrupt the loop while it holds the lock that waking takes)
        threading.Thread(target=self.parts.follower.wake, name="sipguard-stop", daemon=True).start()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def setup(self) -> None:
        """Restore state (expiries, the scorer's windows, the bans in force into the kernel), then
        start following."""
        p = self.parts
        now = self.clock_at_start(time.time())
        p.book.expire(now)
        p.book.commit(now)
        p.scorer.restore(p.store.iter_recent_events(now - p.policy.max_findtime))  # streamed
        saved = p.store.get_meta(CONTROL_CURSOR) or p.store.get_meta("cluster_control")  # (older fleet nodes)
        # CLI requests made while the daemon was down are mirrored too (the fleet publishes them)
        self._last_control = int(saved) if saved is not None else p.store.last_request_id()
        for hook in p.hooks:
            hook.start(p.book)
        report = p.book.restore(now)
        self._last_resync = now
        log.info("restored %d bans (enforcer %s: +%d -%d, %d repaired)", len(p.book.held(now)), p.enforcer_name,
                 report.added, report.removed, report.repaired)
        p.follower.start()
        self.ready.set()  # "following" means the end is pinned
        for w in p.warnings:
            log.warning("%s", w)
        log.info("following %s with %d filters (%s)", ", ".join(p.logs) or "the journal", len(p.filters.names),
                 ", ".join(p.filters.names))

    def run(self, max_seconds: float | None = None) -> DaemonStats:
        p = self.parts
        self.setup()
        # systemd (Type=notify): started only now, so units ordered after sipguard.service (kamailio)
        # start behind the restored bans; outside systemd nothing is sent (sipguard/notify.py)
        notify_ready(f"bans restored; following {', '.join(p.logs) or 'the journal'}")
        try:
            deadline = None if max_seconds is None else time.monotonic() + max_seconds
            interval = self.cfg.daemon.control_interval
            while not self._stop.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                try:
                    if self._unstored is not None:  # the store refused a batch: nothing more is read
                        if self._stop.wait(self._retry_in):
                            break
                        self.retry()
                    else:  # (the ban book stored a slice and holds more: round again at once)
                        self.step(p.follower.poll_batch(0.0 if p.book.behind else interval))
                except Exception:  # noqa: BLE001 - the daemon never dies on one bad batch
                    self.stats.errors += 1
                    log.exception("error while processing a batch; continuing")
                    time.sleep(min(interval, 1.0))
        finally:
            notify_stopping()
            if self._unstored is not None and not self.retry(housekeeping=False):
                log.warning("stopping with %d events read but not stored: the next start reads their lines again",
                            len(self._unstored.events))
            self._store_queued()
            try:
                self.write_status(time.time(), running=False)
            except Exception:  # noqa: BLE001 - a store that refuses writes: the heartbeat goes stale
                log.warning("could not store the final status")
            p.follower.close()
            for hook in p.hooks:
                try:
                    hook.close()
                except Exception:  # noqa: BLE001
                    log.exception("closing %s failed", type(hook).__name__)
        return self.stats

    def _store_queued(self) -> None:
        """At stop: what the ban book still holds queued (the tail of a burst) goes to the store, in its
        short transactions (bounded; what does not land is adopted from the kernel at the next start)."""
        book = self.parts.book
        book.hold(False)
        for _ in range(1000):
            if not book.pending:
                return
            try:
                book.commit(time.time())
            except Exception:  # noqa: BLE001 - the kernel holds them; the next start adopts them
                log.warning("stopping with %d ban changes not stored: the next start adopts them from the kernel",
                            book.pending)
                return

    # -- one batch ---------------------------------------------------------------------------
    def step(self, lines: list | LineBatch) -> list[Ban]:
        """Process a batch of lines, apply new bans, commit, then housekeeping."""
        p = self.parts
        now = time.time()
        parsed = p.pipeline.batch(lines, now)  # flushed: a batch's records end with it
        events = parsed.events
        self.stats.lines += parsed.lines
        self.stats.records += parsed.records
        self.stats.events += len(events)
        decided: list[Ban] = []
        observe = p.scorer.observe
        for ev in events:
            decision = observe(ev)
            if decision is not None:
                decided.append(ban_from_decision(decision, now))
        batches: list[tuple[str, list[Ban]]] = [(POLICY, decided)]
        if p.batch_scorer is not None:  # the fleet: one Redis call scores the batch cluster-wide
            batches += p.batch_scorer(now)
        new_bans: list[Ban] = []
        for cause, bans in batches:
            for ban in p.book.ban(bans, now, cause):
                new_bans.append(ban)
                log.warning("banned %s for %s (%s, score %.1f, offence %d)",
                            ban.ip if ban.user is None else f"user {ban.user!r} at {ban.ip} (Kamailio only)",
                            "ever" if ban.expires is None else f"{ban.expires - now:.0f}s", ban.reason,
                            ban.score, ban.offence)
        held, self._unstored = self._unstored, None
        store = bool(lines or events or p.book.pending or held is not None)
        batch = _Unstored(self._lines_by_source(lines), events, new_bans, now,
                          list(p.follower.positions().values()) if store else [])
        if held is not None:  # a batch the store refused comes first (run() reads nothing meanwhile)
            batch = held.then(batch)
        if store and not self._commit(batch, now):
            self._unstored = batch
            return new_bans
        self._landed(batch, now)
        return new_bans

    def retry(self, housekeeping: bool = True) -> bool:
        """Try the held batch again; True when it landed (then its hooks and housekeeping run)."""
        batch = self._unstored
        if batch is None:
            return True
        now = time.time()
        if not self._commit(batch, now):
            if now - self._last_status >= 2.0:
                try:  # a heartbeat saying so, if the store takes this much
                    self.write_status(now)
                except Exception:  # noqa: BLE001 - said once already
                    self._last_status = now
            return False
        self._unstored = None
        if housekeeping:
            self._landed(batch, now)
        return True

    def _commit(self, batch: _Unstored, now: float) -> bool:
        """One transaction: the batch's events, the ban book's queued rows, the positions just past the
        batch's lines (and the journal's cursors). False when the store refused it: the book keeps its
        rows queued, the caller keeps the batch."""
        p = self.parts
        try:
            with p.store.transaction():
                if batch.events:
                    p.store.add_events(batch.events)
                p.book.write(now)
                p.store.save_positions(batch.positions)
                if p.save_extra is not None:
                    p.save_extra()
        except Exception as e:  # noqa: BLE001 - disk full, I/O error, a lock held too long: held and retried
            p.book.failed()
            self._store_failed(e, len(batch.events))
            return False
        except BaseException:
            p.book.failed()
            raise
        p.book.written()
        if self.stats.stalled:
            self._caught_up()
        return True

    def _store_failed(self, e: Exception, events: int) -> None:
        first: BaseException = e
        while first.__context__ is not None:  # the error itself, not a ROLLBACK that failed after it
            first = first.__context__
        self.stats.store_errors += 1
        self.stats.last_store_error = f"{type(first).__name__}: {first}"
        self._retry_in = min(RETRY_MAX, self._retry_in * 2) if self._retry_in else RETRY_FIRST
        if not self.stats.stalled:
            self.stats.stalled = True
            self._stalled_at = time.monotonic()
            log.warning("the store refused a batch (%s): holding its %d events and reading nothing more; retrying "
                        "every %.0fs at most until it lands (nothing read is lost)", self.stats.last_store_error,
                        events, RETRY_MAX)
        if self.parts.on_store is not None:
            self.parts.on_store(True, self.stats.store_errors)

    def _caught_up(self) -> None:
        self.stats.stalled = False
        self._retry_in = 0.0
        log.warning("the store takes writes again: the held batch is stored after %.1fs; caught up, nothing lost "
                    "(%d failed commits so far)", time.monotonic() - self._stalled_at, self.stats.store_errors)
        if self.parts.on_store is not None:
            self.parts.on_store(False, self.stats.store_errors)

    def _landed(self, batch: _Unstored, now: float) -> None:
        """A batch is stored: the hooks hear it, then housekeeping."""
        p = self.parts
        if p.hooks:
            report = BatchReport(batch.lines_by_source, batch.events, batch.bans, batch.read_time, self.skipped(),
                                 p.pipeline.losses.stats.as_dict())
            for hook in p.hooks:
                hook.on_batch(report)
        self.stats.bans += len(batch.bans)
        self.housekeeping(now)

    @staticmethod
    def _lines_by_source(lines: list | LineBatch) -> dict[str, int]:
        out: dict[str, int] = {}
        if isinstance(lines, LineBatch):
            for src, _off, data in lines.segments:
                out[src] = out.get(src, 0) + data.count(b"\n") + (data[-1:] not in (b"\n", b""))
        else:
            for line in lines:
                out[line.source] = out.get(line.source, 0) + 1
        return out

    # -- between batches ---------------------------------------------------------------------
    def housekeeping(self, now: float) -> None:
        p = self.parts
        book = p.book
        stepped = self.watch_clock(now)
        if stepped is None:  # the wall clock stepped and the moved bans are not stored yet: nothing expires
            return
        now = stepped
        control = self._last_control
        for req in p.store.requests_after(control):
            self._last_control = req.id
            book.apply_request(req, now)
        if self._last_control != control:
            try:
                with p.store.transaction():  # what the requests changed, and that they were mirrored
                    book.write(now)
                    p.store.set_meta(CONTROL_CURSOR, str(self._last_control))
            except Exception:  # noqa: BLE001 - mirrored again after a restart; the kernel has them now
                book.failed()
                self._last_control = control
                self.stats.errors += 1
                log.exception("could not store the CLI requests' changes; retrying")
            else:
                book.written()
        for hook in p.hooks:
            hook.tick(now, book)
        book.expire(now)
        if now - self._last_resync >= self.cfg.enforce.resync_interval:
            # repairs flushed sets / deleted hook rules and re-arms bans longer than the kernel's
            # timeout cap (ipset: ~24.8 days), so they never lapse while the daemon runs
            self._last_resync = now
            report = book.resync(now)
            if report.added or report.removed or report.repaired:
                log.warning("enforcer resync: +%d -%d, %d repaired", report.added, report.removed, report.repaired)
        mono = time.monotonic()
        if mono - self._last_check >= self._check_every and book.enforcer is not None:
            # the cheap check (sets, member counts, hook rules): a flushed set or a deleted jump is whole
            # again in seconds; a repair that fails (a broken tool) is tried less often, up to resync_interval
            self._last_check = mono
            every = self.cfg.enforce.check_interval
            drift = book.enforcer.drift(time.time())
            if drift:
                errors = book.stats.kernel_errors
                self._last_resync = now
                r = book.resync(now)
                failed = book.stats.kernel_errors > errors
                log.warning("enforcer drift: %s; full resync: %s", "; ".join(drift),
                            "failed" if failed else f"+{r.added} -{r.removed}, {r.repaired} repaired")
                if failed:
                    every = min(self.cfg.enforce.resync_interval, 2 * self._check_every)
            self._check_every = every
        try:
            book.commit(now)
        except Exception:  # noqa: BLE001 - kept queued: the next transaction that commits writes it
            self.stats.errors += 1
            log.exception("could not store ban changes; retrying with the next batch")
        self.stats.unbans = book.stats.unbans
        self.stats.expired = book.stats.expired
        if now - self._last_prune >= self.cfg.daemon.prune_interval:
            self._last_prune = now
            sc = self.cfg.store
            p.store.prune(now, max(sc.event_retention, p.policy.max_findtime), sc.max_events, sc.history_retention)
            p.scorer.expire(now)
        if now - self._last_status >= 2.0:
            self.write_status(now)

    # -- steps of the wall clock --------------------------------------------------------------
    def watch_clock(self, now: float) -> float | None:
        """Each loop, before anything compares a ban's end with `now`: when the wall clock stepped
        (against the monotonic clock) since the last look, the bans made before the step end that
        much later in the store (the kernel's relative timeouts did not move), the daemon's own
        timers move too, one warning says so and a resync re-arms what the kernel holds otherwise.

        Returns the `now` to go on with (read again after a step), or None when the moved bans could
        not be stored (tried again at the next loop; until then nothing expires on the stepped clock).
        """
        p = self.parts
        step = p.clock.look()
        if step is None:
            return now
        if not self._move_bans(step, p.clock.after(step)):
            return None
        p.clock.accept(step)
        d = step.seconds
        self._last_prune += d
        self._last_status += d
        now = p.clock.now()
        self._last_resync = now
        p.book.resync(now)
        return now

    def clock_at_start(self, now: float) -> float:
        """At start, before any expiry: a step of the wall clock while the daemon was down (same boot,
        told by the reference the last run saved) moves the bans as a step seen running does, except
        that a ban the kernel still holds ends when its kernel entry ends (the kernel counted the real
        time, and a ban the CLI made after the step is already in the new clock). Saves this run's
        reference; returns the `now` to start with."""
        p = self.parts
        ref = p.clock.ref
        step = p.clock.since(ClockRef.loads(p.store.get_meta(CLOCK_META)))
        if step is None:
            p.store.set_meta(CLOCK_META, ref.dumps())
            return now
        self._move_bans(step, ref, kernel=True, strict=True)
        return p.clock.now()

    def _move_bans(self, step: Step, ref: ClockRef, *, kernel: bool = False, strict: bool = False) -> bool:
        """Move the bans for `step` through the ban book, with the clock reference `ref` in the same
        transaction. In fleet mode a step back leaves the bans of other nodes on their absolute end
        (the fleet's clock): no ban is ended sooner than either clock says."""
        p = self.parts
        keep: set[str] = set()
        if step.seconds < 0 and self.cfg.cluster is not None:
            node = self.cfg.cluster.node_name
            keep = {ip for ip, origin in p.store.held_origins().items() if origin != node}
        try:
            moved = p.book.clock_stepped(step.seconds, p.clock.now(), made_after=p.clock.made_after(step),
                                         keep=keep, kernel=kernel,
                                         also=lambda: p.store.set_meta(CLOCK_META, ref.dumps()))
        except Exception:
            if strict:
                raise
            self.stats.errors += 1
            if not self._clock_retrying:  # said once, not at every loop
                log.exception("the wall clock stepped %s; could not store the bans moved with it, retrying",
                              describe(step.seconds))
            self._clock_retrying = True
            return False
        self._clock_retrying = False
        self.stats.clock_steps += 1
        log.warning("the wall clock stepped %s against the monotonic clock%s: the ends of %d bans moved with it, "
                    "so each lasts its real time%s", describe(step.seconds),
                    "" if step.since is not None else " while sipguard was stopped", len(moved),
                    f"; {len(keep)} bans from other fleet nodes keep their end" if keep else "")
        return True

    # -- what it reports ---------------------------------------------------------------------
    def parse_counters(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for parser in self.parts.parsers.values():
            for k, v in _counters(parser.stats).items():
                if isinstance(v, int):
                    out[k] = out.get(k, 0) + v
        return out

    def skipped(self) -> dict[str, int]:
        """Lines skipped or rejected so far, by reason (parsers, sources, filters)."""
        parse = self.parse_counters()
        out = {k: parse.get(k, 0) for k in _PARSER_SKIPS}
        src = _counters(self.parts.follower.stats)
        for k in _SOURCE_SKIPS:  # too_long: lines of files (sources) and journal entries (parsers)
            out[k] = int(parse.get(k, 0) or 0) + int(src.get(k, 0) or 0)
        out["invalid_ip"] = int(_counters(self.parts.filters.stats).get("invalid_ip", 0) or 0)
        return out

    def write_status(self, now: float, running: bool = True) -> None:
        """A heartbeat for `sipguard status`: counters of every stage, as JSON in the store."""
        p = self.parts
        self._last_status = now
        status = {
            "pid": os.getpid(),
            "running": running,
            "heartbeat": now,
            "logs": p.logs,
            "enforcer": p.enforcer_name,
            "daemon": asdict(self.stats),
            "sources": _counters(p.follower.stats),
            "formats": self.parse_counters(),
            "filters": _counters(p.filters.stats),
            "losses": p.pipeline.losses.stats.as_dict(),
            "policy": asdict(p.policy.stats),
            "bans": asdict(p.book.stats),
        }
        p.store.set_meta("status", json.dumps(status))
