"""The Prometheus endpoint: what the daemon read, matched, decided and enforced, and how fast.

Off unless `[metrics] listen = "HOST:PORT"`. The daemon hands each processed batch to
`observe_batch`; every enforcer call goes through `MeteredEnforcer` (bans, unbans, errors, and
the set of bans in force by family and reason); skipped/garbage line counters come with each
batch (`MetricsHook`). Each `Metrics` has its own registry, so several daemons in one
process (tests) never share figures.

Ban latency is "log line written → enforcer returned": the line's own timestamp when the format
carries sub-second precision (ISO-8601 with microseconds, the journal), else the time the
daemon read the line's batch (which then measures sipguard's own part only).

In fleet mode the hook also reads, once a second, the view the fleet bridge keeps in the store
(`cluster_status`) and exports it: `sipguard_fleet_in_sync`, `sipguard_fleet_outbox` (changes
queued to publish) and `sipguard_fleet_lag_seconds` (how long this node has been out of sync; 0
while in sync). The endpoint has no authentication: `serve` warns when it listens on anything but
loopback. `examples/grafana/sipguard.json` is a dashboard of these series.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..addresses import AllowList, normalize_ip
from ..addresses import family_label as family
from ..model import Ban

if TYPE_CHECKING:
    from ..enforce.base import EnforcedEntry, Enforcer, SyncReport
    from ..model import Event

log = logging.getLogger("sipguard.metrics")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# how far a record's own timestamp may lie from the read time and still count as "when it was written"
_PLAUSIBLE = 3600.0
FLEET_META = "cluster_status"  # sipguard.cluster.status.STATUS_META (not imported: standalone never loads the fleet)
FLEET_EVERY = 1.0  # seconds between readings of the fleet view
FLEET_REFUSED = ("unverified", "malformed", "too_wide", "allowlisted", "own_address", "redis_server",
                 "forged_events")  # sipguard.cluster.status.REFUSED (a test keeps the two equal)
FLEET_STALE = 60.0  # a fleet view older than this is not this daemon's (a database from an earlier fleet run)



def reason_label(ban: Ban) -> str:
    """Bounded label values: the jail of an automatic ban, blocklist:NAME, or 'manual'."""
    if ban.reason.startswith("blocklist:"):
        return ban.reason
    if ban.manual:
        return "manual"
    return ban.reason.split(":", 1)[0] or "unknown"


def write_time(event_time: float, read_time: float) -> float:
    """When the line was written: its record time if precise and plausible, else the read time."""
    if event_time != int(event_time) and read_time - _PLAUSIBLE <= event_time <= read_time + 1.0:
        return min(event_time, read_time)
    return read_time


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.lines = Counter("sipguard_lines_read", "Physical lines read, per source", ["source"], registry=r)
        self.matched = Counter("sipguard_lines_matched", "Records a filter matched, per filter", ["filter"],
                               registry=r)
        self.events = Counter("sipguard_events", "Events (filter hits), per kind", ["kind"], registry=r)
        self.bans = Counter("sipguard_bans", "Bans applied, per reason", ["reason"], registry=r)
        self.unbans = Counter("sipguard_unbans", "Bans lifted (unban, expiry, dropped off a blocklist)", registry=r)
        self.enforcer_errors = Counter("sipguard_enforcer_errors", "Enforcer calls that raised", ["enforcer", "op"],
                                       registry=r)
        self.blocklist_skipped = Counter("sipguard_blocklist_skipped", "Blocklist entries skipped (allow-listed)",
                                         ["list"], registry=r)
        self.latency = Histogram("sipguard_ban_latency_seconds",
                                 "Log line written (or read) to ban set in the enforcer", buckets=LATENCY_BUCKETS,
                                 registry=r)
        self._lock = threading.Lock()
        self._active: dict[str, tuple[str, str, float | None]] = {}  # ip -> (family, reason, expires)
        self._skipped: dict[str, int] = {}
        self._losses: dict[str, int] = {}  # loss notices of journald / rsyslog (formats/losses.py)
        self._store = (False, 0)  # (a batch is held because the store refuses it, refused commits so far)
        self._fleet: tuple[bool, int, float] | None = None  # (in sync, outbox, seconds out of sync); None: no fleet
        self._fleet_refused: dict[str, int] = {}  # what this node refused from the fleet, by kind
        r.register(_Collector(self))
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None

    # -- the daemon's hooks ------------------------------------------------------------------
    def observe_batch(self, lines_by_source: dict[str, int], events: Iterable[Event], bans: Iterable[Ban],
                      read_time: float, done: float | None = None) -> None:
        """One processed batch: lines per source, matches per filter, events per kind, ban latency."""
        done = time.time() if done is None else done
        for src, n in lines_by_source.items():
            self.lines.labels(src).inc(n)
        first: dict[str, float] = {}
        per_filter: dict[str, int] = {}
        per_kind: dict[str, int] = {}
        for ev in events:
            per_filter[ev.filter] = per_filter.get(ev.filter, 0) + 1
            per_kind[ev.kind.value] = per_kind.get(ev.kind.value, 0) + 1
            first.setdefault(ev.ip, ev.time)
        for f, n in per_filter.items():
            self.matched.labels(f).inc(n)
        for k, n in per_kind.items():
            self.events.labels(k).inc(n)
        for ban in bans:
            t = first.get(ban.ip)
            written = read_time if t is None else write_time(t, read_time)
            self.latency.observe(max(0.0, done - written))

    def set_skipped(self, counters: dict[str, int]) -> None:
        """The daemon's skipped-line counters by reason, as of its last batch."""
        with self._lock:
            self._skipped = dict(counters)

    def set_losses(self, counters: dict[str, int]) -> None:
        """The loss notices seen so far (LossStats.as_dict), as of the daemon's last batch."""
        with self._lock:
            self._losses = dict(counters)

    def losses(self) -> dict[str, int]:
        with self._lock:
            return dict(self._losses)

    def skipped(self) -> dict[str, int]:
        with self._lock:
            return dict(self._skipped)

    def set_store(self, stalled: bool, errors: int) -> None:
        """The daemon's store health: whether a refused batch is held (reading stalled), refusals so far."""
        with self._lock:
            self._store = (stalled, errors)

    def store(self) -> tuple[bool, int]:
        with self._lock:
            return self._store

    def set_fleet(self, view: tuple[bool, int, float] | None, refused: dict[str, int] | None = None) -> None:
        """This node's fleet view (in sync or not, changes queued to publish, seconds out of sync), or None
        when there is no fleet (no series are served then); `refused`: what it refused from the fleet, by kind."""
        with self._lock:
            self._fleet_refused = dict(refused or {})
            self._fleet = view

    def fleet_refused(self) -> dict[str, int]:
        with self._lock:
            return dict(self._fleet_refused)

    def fleet(self) -> tuple[bool, int, float] | None:
        with self._lock:
            return self._fleet

    # -- bans in force (kept by MeteredEnforcer) ---------------------------------------------
    def _add(self, bans: Iterable[Ban]) -> None:
        with self._lock:
            for b in bans:
                self._active[b.ip] = (family(b.ip), reason_label(b), b.expires)

    def _remove(self, ip: str) -> bool:
        with self._lock:
            return self._active.pop(ip, None) is not None

    def _replace(self, bans: Iterable[Ban]) -> int:
        with self._lock:
            new = {b.ip: (family(b.ip), reason_label(b), b.expires) for b in bans}
            gone = len(self._active.keys() - new.keys())
            self._active = new
            return gone

    def active_counts(self, now: float | None = None) -> dict[tuple[str, str], int]:
        now = time.time() if now is None else now
        out: dict[tuple[str, str], int] = {}
        with self._lock:
            items = list(self._active.values())
        for fam, reason, exp in items:
            if exp is None or exp > now:
                out[(fam, reason)] = out.get((fam, reason), 0) + 1
        return out

    # -- HTTP ------------------------------------------------------------------------------
    def serve(self, listen: str) -> tuple[str, int]:
        """Start the /metrics endpoint on HOST:PORT ([v6]:port too); returns the bound address."""
        from prometheus_client import start_http_server

        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        server, thread = start_http_server(int(port), addr=host, registry=self.registry)
        self._server, self._thread = server, thread
        self.address = server.server_address[:2]
        bound = normalize_ip(str(self.address[0]))
        shown = f"[{self.address[0]}]" if ":" in str(self.address[0]) else str(self.address[0])
        log.info("metrics on http://%s:%d/metrics", shown, self.address[1])
        if bound is None or bound not in AllowList((), include_host=False):  # 0.0.0.0, ::, a routable address
            log.warning("the metrics endpoint listens on %s:%d, not on loopback: it has no authentication, "
                        "so anyone who can reach that port reads it; allow only your Prometheus in the firewall "
                        "(or listen on 127.0.0.1 behind a proxy)", shown, self.address[1])
        return self.address

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Collector:
    """Figures computed at scrape time: bans in force, skipped lines, the store's health."""

    def __init__(self, m: Metrics) -> None:
        self.m = m

    def describe(self) -> list:
        return []

    def collect(self):
        g = GaugeMetricFamily("sipguard_active_bans", "Bans in force, by family and reason",
                              labels=["family", "reason"])
        for (fam, reason), n in sorted(self.m.active_counts().items()):
            g.add_metric([fam, reason], n)
        yield g
        c = CounterMetricFamily("sipguard_lines_skipped", "Lines skipped or rejected, by reason", labels=["reason"])
        for reason, n in sorted(self.m.skipped().items()):
            c.add_metric([reason], n)
        yield c
        losses = self.m.losses()
        yield CounterMetricFamily("sipguard_log_lines_lost", "Lines journald or rsyslog say they dropped before "
                                  "sipguard could read them (their rate-limit notices)", value=losses.get("lost", 0))
        c = CounterMetricFamily("sipguard_log_loss_notices", "Rate-limit notices of journald / rsyslog seen",
                                labels=["origin"])
        for origin in ("journald", "rsyslog"):
            c.add_metric([origin], losses.get(origin, 0))
        yield c
        stalled, errors = self.m.store()
        yield GaugeMetricFamily("sipguard_store_stalled", "1 while a batch the store refused is held and retried "
                                "(nothing more is read until it lands)", value=int(stalled))
        yield CounterMetricFamily("sipguard_store_errors", "Batch commits the store refused (each retried)",
                                  value=errors)
        fleet = self.m.fleet()
        if fleet is not None:
            in_sync, outbox, lag = fleet
            yield GaugeMetricFamily("sipguard_fleet_in_sync", "1 while this node is in sync with the fleet "
                                    "(connected, nothing queued, stream caught up)", value=int(in_sync))
            yield GaugeMetricFamily("sipguard_fleet_outbox", "Ban changes queued to publish to the fleet", value=outbox)
            yield GaugeMetricFamily("sipguard_fleet_lag_seconds", "Seconds this node has been out of sync with the "
                                    "fleet (0 while in sync)", value=lag)
            c = CounterMetricFamily("sipguard_fleet_refused", "Bans, unbans and events from the fleet this node "
                                    "refused (unsigned or forged, too wide, allow-listed, its own or its Redis "
                                    "servers' addresses), by kind", labels=["kind"])
            refused = self.m.fleet_refused()
            for kind in FLEET_REFUSED:
                c.add_metric([kind], refused.get(kind, 0))
            yield c


class MeteredEnforcer:
    """Wraps the daemon's enforcer: counts bans, unbans and errors, keeps the set in force."""

    def __init__(self, inner: Enforcer, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics
        self.name = inner.name

    def _call(self, op: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:
            self.metrics.enforcer_errors.labels(self.name, op).inc()
            raise

    def refuses(self, ip: str) -> str | None:
        return self.inner.refuses(ip)

    def ban(self, ban: Ban, now: float) -> None:
        self._call("ban", self.inner.ban, ban, now)
        self.metrics._add([ban])
        self.metrics.bans.labels(reason_label(ban)).inc()

    def ban_many(self, bans: list[Ban], now: float) -> None:
        self._call("ban_many", self.inner.ban_many, bans, now)
        self.metrics._add(bans)
        per: dict[str, int] = {}
        for b in bans:
            per[reason_label(b)] = per.get(reason_label(b), 0) + 1
        for reason, n in per.items():
            self.metrics.bans.labels(reason).inc(n)

    def unban(self, ip: str) -> None:
        self._call("unban", self.inner.unban, ip)
        if self.metrics._remove(ip):
            self.metrics.unbans.inc()

    def sync(self, bans: list[Ban], now: float) -> SyncReport:
        report = self._call("sync", self.inner.sync, bans, now)
        gone = self.metrics._replace(bans)
        if gone:
            self.metrics.unbans.inc(gone)
        return report

    def entries(self) -> list[EnforcedEntry]:
        return self._call("entries", self.inner.entries)

    def drift(self, now: float) -> list[str]:
        return self.inner.drift(now)

    def close(self) -> None:
        self.inner.close()


class MetricsHook:
    """The daemon's hook for `[metrics]`: each batch's figures into the registry."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._read_fleet = 0.0  # monotonic time of the last reading of the fleet view
        self._in_sync_since: float | None = None  # when this node was last seen in sync

    def start(self, book: Any) -> None:
        pass

    def on_batch(self, report: Any) -> None:  # daemon.BatchReport
        self.metrics.observe_batch(report.lines_by_source, report.events, report.bans, report.read_time)
        self.metrics.set_skipped(report.skipped)
        self.metrics.set_losses(report.losses)

    def tick(self, now: float, book: Any) -> None:
        """Once a second: the fleet view the bridge keeps in the store (fleet mode only)."""
        mono = time.monotonic()
        if mono - self._read_fleet < FLEET_EVERY:
            return
        self._read_fleet = mono
        try:
            raw = book.store.get_meta(FLEET_META)
            view = json.loads(raw) if raw else None
        except Exception:  # noqa: BLE001 - a busy or failing store: the figures wait for the next tick
            return
        beat = view.get("heartbeat") if isinstance(view, dict) else None
        if not isinstance(beat, (int, float)) or now - beat > FLEET_STALE:
            self.metrics.set_fleet(None)  # standalone (or a view left by an earlier fleet run): no series
            return
        in_sync = bool(view.get("in_sync"))
        if in_sync or self._in_sync_since is None:
            self._in_sync_since = now
        outbox = view.get("outbox")
        stats = view.get("stats") if isinstance(view.get("stats"), dict) else {}
        refused = {k: v for k in FLEET_REFUSED
                   if isinstance(v := stats.get(k), int) and not isinstance(v, bool) and v >= 0}
        self.metrics.set_fleet((in_sync, outbox if isinstance(outbox, int) else 0,
                                0.0 if in_sync else max(0.0, now - self._in_sync_since)), refused)

    def close(self) -> None:
        self.metrics.close()
