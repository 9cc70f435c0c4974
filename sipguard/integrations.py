"""The operator-facing extras a running daemon carries, wired in through a handful of hooks.

`Integrations.attach(daemon)` (from `Daemon.__init__`) wraps the daemon's enforcer: first a
`Fanout` to the Kamailio htable enforcer when `[htable] enabled`, then the metrics wrapper when
`[metrics] listen` is set. The daemon then calls:

* `wrap_follower(follower)` in setup: adds the journal sources of `[sources] journal*`;
* `on_batch(...)` after each batch is enforced: metrics;
* `in_transaction(now)` inside each batch's transaction: the journal cursors;
* `tick(now)` in housekeeping: blocklist refreshes;
* `close()` when the run ends.

With none of those sections configured every hook is a cheap no-op.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import BlocklistConfig
    from .daemon import Daemon
    from .model import Ban, Event

log = logging.getLogger("sipguard.integrations")

JOURNAL_CURSOR = "journal_cursor:"
"""Store meta key prefix of a journal source's saved cursor (`journal_cursor:<source>`)."""


class Integrations:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.metrics = None
        self.htable = None
        self.journal = None  # the JournalFollower, when configured
        self._cursors: dict[str, str] = {}  # journal cursors as saved in the store
        self.refresher = None

    @classmethod
    def attach(cls, daemon: Daemon) -> Integrations:
        self = cls(daemon)
        cfg = daemon.cfg
        if cfg.htable.enabled:
            from .htable import Fanout, HtableEnforcer

            self.htable = HtableEnforcer(cfg.htable)
            daemon.enforcer = Fanout(daemon.enforcer, [self.htable])
        if cfg.metrics.listen:
            from .metrics import MeteredEnforcer, Metrics, skipped_counters

            self.metrics = Metrics()
            daemon.enforcer = MeteredEnforcer(daemon.enforcer, self.metrics)
            self.metrics.skipped_from(lambda: skipped_counters(daemon))
            self.metrics.serve(cfg.metrics.listen)
        if cfg.blocklists:
            from .blocklists import BlocklistRefresher

            self.refresher = BlocklistRefresher(list(cfg.blocklists), self._blocklist_result)
        return self

    # -- hooks -------------------------------------------------------------------------------
    def wrap_follower(self, follower: Any) -> Any:
        cfg = self.daemon.cfg.sources
        if not (cfg.journal or cfg.journal_identifiers):
            return follower
        from .formats import JournalParser
        from .sources import JournalFollower, MultiFollower, source_key

        key = source_key(cfg.journal, cfg.journal_identifiers)
        saved = self.daemon.store.get_meta(JOURNAL_CURSOR + key)
        self._cursors = {key: saved} if saved else {}
        self.journal = JournalFollower(cfg.journal, cfg.journal_identifiers, cursors=dict(self._cursors),
                                       journalctl=cfg.journalctl, from_start=self.daemon.from_start)
        for key in self.journal.sources:
            self.daemon.parsers[key] = JournalParser(programs=None)
        self.journal.start()
        log.info("following the journal: %s", ", ".join(self.journal.sources))
        return MultiFollower(follower, self.journal)

    def on_batch(self, lines: list, events: list[Event], bans: list[Ban], read_time: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_batch(lines, events, bans, read_time, time.time())

    def in_transaction(self, now: float) -> None:
        if self.journal is not None:  # the cursor of the last entry handed out, with the batch's events
            for key, cursor in self.journal.cursors().items():
                if self._cursors.get(key) != cursor:
                    self.daemon.store.set_meta(JOURNAL_CURSOR + key, cursor)
                    self._cursors[key] = cursor

    def tick(self, now: float) -> None:
        if self.refresher is not None:
            self.refresher.tick(now)

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
        if self.metrics is not None:
            self.metrics.close()

    # -- blocklists (on the daemon's thread) -------------------------------------------------
    def _blocklist_result(self, bl: BlocklistConfig, entries: list[str] | None, error: str | None) -> None:
        if error is not None or entries is None:
            log.error("blocklist %s not refreshed (bans unchanged): %s", bl.name, error)
            return
        from .blocklists import apply_blocklist

        d = self.daemon
        now = time.time()
        res = apply_blocklist(d.store, bl.name, entries, d.allow, d.enforcer, now=now, bantime=bl.bantime,
                              notify_daemon=False)
        if d.policy is not None:
            for ip in res.added_ips:
                d.policy.note_ban(ip)
            for ip in res.removed_ips:
                d.policy.release(ip)
        if self.metrics is not None and res.skipped_allowlisted:
            self.metrics.blocklist_skipped.labels(bl.name).inc(len(res.skipped_allowlisted))
        log.warning("blocklist %s: %d listed, +%d -%d, %d allow-listed skipped", bl.name, res.listed, res.added,
                    res.removed, len(res.skipped_allowlisted))
