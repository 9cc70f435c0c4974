"""The SQLite memory of every stage: events, bans, ban history, source positions, CLI requests,
the fleet's outbox and held ban ids, and the queries behind `sipguard report`.

The only module that runs SQL (sqlite-utils over one WAL database): every table is created here
and every statement is one of its named methods, so no other module touches the connection. It
decides nothing: it keeps what the policy decided and what the sources read, in one transaction
per batch so a restart neither loses nor double-counts a line.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import sqlite_utils

from .model import Ban, Event, EventKind

SCHEMA_VERSION = 1
DB_NAME = "sipguard.db"


@dataclass(frozen=True, slots=True)
class Position:
    """Where a followed file was read up to (same shape as the sources' SourcePosition): the file's
    identity, the offset, and the fingerprint of the content there (digests of its first bytes and of
    the bytes before the offset; "" for a position saved before fingerprints)."""

    path: str
    dev: int
    inode: int
    offset: int
    head: str = ""
    tail: str = ""


@dataclass(frozen=True, slots=True)
class ControlRequest:
    """A CLI action the running daemon must mirror (ban, unban, unban_all)."""

    id: int
    time: float
    action: str
    target: str | None
    payload: dict


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One thing the fleet must still publish to Redis (cluster_outbox), in `seq` order."""

    seq: int
    op: str  # ban | unban | unban_all
    ip: str
    id: str
    payload: str  # the ban json, or the unban time


@dataclass(frozen=True, slots=True)
class HeldBan:
    """The fleet id of the ban this node holds for an address (cluster_bans)."""

    id: str
    created: float


class SourceActivity(NamedTuple):
    """A source's events in a report period: how many, which filters, first and last time."""

    ip: str
    events: int
    filters: list[str]
    first: float
    last: float


class BanLogEntry(NamedTuple):
    """One row of the ban history as the report counts it."""

    time: float
    action: str
    reason: str | None
    manual: bool


class Store:
    """One database file in the state directory; safe for the daemon and the CLI at once (WAL)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        self.conn = conn
        if self.path != ":memory:":
            self.db.enable_wal()
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=10000")
        self._create()

    @classmethod
    def open_state_dir(cls, state_dir: str | Path) -> Store:
        return cls(Path(state_dir) / DB_NAME)

    def close(self) -> None:
        self.conn.close()

    # -- schema ---------------------------------------------------------------------------
    def _create(self) -> None:
        db = self.db
        if "events" not in db.table_names():
            db["events"].create(
                {"id": int, "time": float, "ip": str, "filter": str, "kind": str, "weight": float}, pk="id"
            )
            db["events"].create_index(["time"])
            db["events"].create_index(["ip", "time"])
        if "bans" not in db.table_names():
            db["bans"].create(
                {"ip": str, "reason": str, "score": float, "created": float, "expires": float,
                 "offence": int, "manual": int},
                pk="ip",
                not_null={"reason", "created"},
            )
        if "ban_log" not in db.table_names():
            db["ban_log"].create(
                {"id": int, "time": float, "action": str, "ip": str, "reason": str, "score": float,
                 "expires": float, "offence": int, "manual": int},
                pk="id",
            )
            db["ban_log"].create_index(["ip", "time"])
            db["ban_log"].create_index(["time"])
        if "positions" not in db.table_names():
            db["positions"].create({"path": str, "dev": int, "inode": int, "offset": int, "head": str, "tail": str},
                                   pk="path")
        elif "head" not in db["positions"].columns_dict:  # a database from before fingerprints: "" = none
            db["positions"].add_column("head", str)
            db["positions"].add_column("tail", str)
        if "control" not in db.table_names():
            db["control"].create(
                {"id": int, "time": float, "action": str, "target": str, "payload": str}, pk="id"
            )
        if "cleared" not in db.table_names():
            db["cleared"].create({"ip": str, "time": float}, pk="ip")
        # fleet mode ([cluster]): what to publish, and the fleet id of the ban held per address
        self.conn.execute("CREATE TABLE IF NOT EXISTS cluster_outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                          "op TEXT NOT NULL, ip TEXT NOT NULL, id TEXT NOT NULL, payload TEXT NOT NULL, time REAL)")
        self.conn.execute("CREATE TABLE IF NOT EXISTS cluster_bans (ip TEXT PRIMARY KEY, id TEXT NOT NULL, "
                          "origin TEXT, created REAL)")
        if "meta" not in db.table_names():
            db["meta"].create({"key": str, "value": str}, pk="key")
            db["meta"].insert({"key": "schema", "value": str(SCHEMA_VERSION)})
        if "refused" not in db["bans"].columns_dict:  # a database from before refusals: same rows, new column
            db["bans"].add_column("refused", str)

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE … COMMIT: one batch of events, bans and positions, all or nothing.

        Nested use joins the outer transaction.
        """
        if self.conn.in_transaction:
            yield
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- events ---------------------------------------------------------------------------
    def add_events(self, events: Iterable[Event]) -> None:
        self.conn.executemany(
            "INSERT INTO events (time, ip, filter, kind, weight) VALUES (?, ?, ?, ?, ?)",
            ((e.time, e.ip, e.filter, e.kind.value, e.weight) for e in events),
        )

    def recent_events(self, since: float) -> list[Event]:
        """Events newer than `since`, minus those from before an unban of their source."""
        rows = self.conn.execute(
            "SELECT e.time, e.ip, e.filter, e.kind, e.weight FROM events e "
            "LEFT JOIN cleared c ON c.ip = e.ip "
            "WHERE e.time >= ? AND (c.time IS NULL OR e.time > c.time) ORDER BY e.time, e.id",
            (since,),
        )
        return [Event(t, ip, f, EventKind(k), w) for t, ip, f, k, w in rows]

    def count_events(self) -> int:
        return self.conn.execute("SELECT count(*) FROM events").fetchone()[0]

    def mark_cleared(self, ip: str, when: float) -> None:
        """Events up to `when` no longer count for `ip` (after an unban)."""
        self.conn.execute("INSERT OR REPLACE INTO cleared (ip, time) VALUES (?, ?)", (ip, when))

    # -- bans -----------------------------------------------------------------------------
    def put_ban(self, ban: Ban, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.conn.execute(
            "INSERT OR REPLACE INTO bans (ip, reason, score, created, expires, offence, manual, refused) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (ban.ip, ban.reason, ban.score, ban.created, ban.expires, ban.offence, int(ban.manual), ban.refused),
        )
        self._log("ban", ban, now)

    def _log(self, action: str, ban: Ban, now: float) -> None:
        self.conn.execute(
            "INSERT INTO ban_log (time, action, ip, reason, score, expires, offence, manual) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (now, action, ban.ip, ban.reason, ban.score, ban.expires, ban.offence, int(ban.manual)),
        )

    def remove_ban(self, ip: str, now: float | None = None, action: str = "unban") -> Ban | None:
        now = time.time() if now is None else now
        ban = self.get_ban(ip)
        if ban is None:
            return None
        self.conn.execute("DELETE FROM bans WHERE ip = ?", (ip,))
        self._log(action, ban, now)
        return ban

    def get_ban(self, ip: str) -> Ban | None:
        row = self.conn.execute(
            "SELECT ip, reason, created, expires, score, offence, manual, refused FROM bans WHERE ip = ?", (ip,)
        ).fetchone()
        return _ban(row) if row else None

    def active_bans(self, now: float | None = None) -> list[Ban]:
        now = time.time() if now is None else now
        rows = self.conn.execute(
            "SELECT ip, reason, created, expires, score, offence, manual, refused FROM bans "
            "WHERE expires IS NULL OR expires > ? ORDER BY created, ip",
            (now,),
        )
        return [_ban(r) for r in rows]

    def expired_bans(self, now: float) -> list[Ban]:
        rows = self.conn.execute(
            "SELECT ip, reason, created, expires, score, offence, manual, refused FROM bans "
            "WHERE expires IS NOT NULL AND expires <= ?",
            (now,),
        )
        return [_ban(r) for r in rows]

    def offence_history(self, since: float) -> dict[str, list[float]]:
        """Times of automatic bans per source since `since`: the policy escalates on them."""
        out: dict[str, list[float]] = {}
        rows = self.conn.execute(
            "SELECT ip, time FROM ban_log WHERE action = 'ban' AND manual = 0 AND time >= ? ORDER BY time",
            (since,),
        )
        for ip, t in rows:
            out.setdefault(ip, []).append(t)
        return out

    def history(self, limit: int = 100) -> list[dict]:
        rows = self.conn.execute(
            "SELECT time, action, ip, reason, expires, offence, manual FROM ban_log ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        keys = ("time", "action", "ip", "reason", "expires", "offence", "manual")
        return [dict(zip(keys, r)) for r in rows]

    def set_ban_expiries(self, expiries: Mapping[str, float]) -> int:
        """Move the end of these bans (ip -> new `expires`) and nothing else: the ban book after a step
        of the wall clock. Not a new ban, so no history row (and no offence); how many rows changed."""
        if not expiries:
            return 0
        cur = self.conn.executemany("UPDATE bans SET expires = ? WHERE ip = ?",
                                    ((end, ip) for ip, end in expiries.items()))
        return cur.rowcount

    # -- positions ------------------------------------------------------------------------
    def positions(self) -> dict[str, Position]:
        rows = self.conn.execute("SELECT path, dev, inode, offset, head, tail FROM positions")
        return {p: Position(p, d, i, o, h or "", t or "") for p, d, i, o, h, t in rows}

    def save_positions(self, positions: Iterable[object]) -> None:
        """Accepts anything with path, dev, inode and offset, and a fingerprint in head and tail when
        it has one (the sources' SourcePosition)."""
        self.conn.executemany(
            "INSERT OR REPLACE INTO positions (path, dev, inode, offset, head, tail) VALUES (?, ?, ?, ?, ?, ?)",
            ((p.path, p.dev, p.inode, p.offset, getattr(p, "head", ""), getattr(p, "tail", ""))  # type: ignore[attr-defined]
             for p in positions),
        )

    # -- control: CLI → daemon -------------------------------------------------------------
    def request(self, action: str, target: str | None = None, **payload: object) -> None:
        self.conn.execute(
            "INSERT INTO control (time, action, target, payload) VALUES (?, ?, ?, ?)",
            (time.time(), action, target, json.dumps(payload)),
        )

    def requests_after(self, last_id: int) -> list[ControlRequest]:
        rows = self.conn.execute(
            "SELECT id, time, action, target, payload FROM control WHERE id > ? ORDER BY id", (last_id,)
        )
        return [ControlRequest(i, t, a, tg, json.loads(p or "{}")) for i, t, a, tg, p in rows]

    def last_request_id(self) -> int:
        return self.conn.execute("SELECT coalesce(max(id), 0) FROM control").fetchone()[0]

    # -- cluster: the fleet's outbox (what to publish) and the ban ids held here ------------
    def outbox_add(self, op: str, ip: str, ban_id: str, payload: str, now: float | None = None) -> None:
        """Queue one ban/unban for Redis; it stays until `outbox_delete_upto` (so a restart loses nothing)."""
        self.conn.execute("INSERT INTO cluster_outbox (op, ip, id, payload, time) VALUES (?, ?, ?, ?, ?)",
                          (op, ip, ban_id, payload, time.time() if now is None else now))

    def outbox_next(self, limit: int) -> list[OutboxEntry]:
        """The oldest `limit` queued entries, oldest first."""
        rows = self.conn.execute(
            "SELECT seq, op, ip, id, payload FROM cluster_outbox ORDER BY seq LIMIT ?", (limit,))
        return [OutboxEntry(*r) for r in rows]

    def outbox_delete_upto(self, seq: int) -> None:
        """Forget the entries up to and including `seq` (they were published)."""
        self.conn.execute("DELETE FROM cluster_outbox WHERE seq <= ?", (seq,))

    def outbox_size(self) -> int:
        return self.conn.execute("SELECT count(*) FROM cluster_outbox").fetchone()[0]

    def outbox_ips(self) -> set[str]:
        """Addresses with something still queued to publish."""
        return {r[0] for r in self.conn.execute("SELECT DISTINCT ip FROM cluster_outbox")}

    def hold(self, ip: str, ban_id: str, origin: str, created: float) -> None:
        """Remember which fleet ban (id, origin node, created) this node holds for `ip`."""
        self.conn.execute("INSERT OR REPLACE INTO cluster_bans (ip, id, origin, created) VALUES (?, ?, ?, ?)",
                          (ip, ban_id, origin, created))

    def held(self, ip: str) -> HeldBan | None:
        row = self.conn.execute("SELECT id, created FROM cluster_bans WHERE ip = ?", (ip,)).fetchone()
        return HeldBan(row[0], row[1]) if row else None

    def release_held(self, ip: str) -> None:
        self.conn.execute("DELETE FROM cluster_bans WHERE ip = ?", (ip,))

    def release_all_held(self) -> None:
        self.conn.execute("DELETE FROM cluster_bans")

    def held_origins(self) -> dict[str, str]:
        """ip → the node that made the fleet ban held for it."""
        return dict(self.conn.execute("SELECT ip, origin FROM cluster_bans"))

    def gc_held(self) -> int:
        """Drop held ids whose ban is gone from `bans` (expired or removed); how many went."""
        return self.conn.execute("DELETE FROM cluster_bans WHERE ip NOT IN (SELECT ip FROM bans)").rowcount

    # -- report: the figures of `sipguard report` -------------------------------------------
    def first_activity(self, since: float) -> float | None:
        """The time of the first event or ban-history row at or after `since` (None: nothing)."""
        return self.conn.execute(
            "SELECT min(time) FROM (SELECT min(time) AS time FROM events WHERE time >= ? "
            "UNION ALL SELECT min(time) FROM ban_log WHERE time >= ?)", (since, since)).fetchone()[0]

    def event_counts(self, step: float, since: float) -> list[tuple[int, str, int]]:
        """Events since `since` per (time bucket of `step` seconds: int(time / step), filter): count."""
        return self.conn.execute(
            "SELECT CAST(time / ? AS INTEGER) AS b, filter, count(*) FROM events "
            "WHERE time >= ? GROUP BY b, filter", (step, since)).fetchall()

    def top_sources(self, since: float, limit: int) -> list[SourceActivity]:
        """The `limit` sources with the most events since `since` (most first, then by address)."""
        rows = self.conn.execute(
            "SELECT ip, count(*) AS n, group_concat(DISTINCT filter), min(time), max(time) "
            "FROM events WHERE time >= ? GROUP BY ip ORDER BY n DESC, ip LIMIT ?", (since, limit))
        return [SourceActivity(ip, n, sorted((flts or "").split(",")), t0, t1) for ip, n, flts, t0, t1 in rows]

    def events_per_source(self, since: float) -> dict[str, int]:
        return dict(self.conn.execute("SELECT ip, count(*) FROM events WHERE time >= ? GROUP BY ip", (since,)))

    def bans_per_source(self, since: float) -> dict[str, int]:
        """How many times each source was banned (ban history action 'ban') since `since`."""
        return dict(self.conn.execute(
            "SELECT ip, count(*) FROM ban_log WHERE action = 'ban' AND time >= ? GROUP BY ip", (since,)))

    def ban_log_since(self, since: float) -> list[BanLogEntry]:
        rows = self.conn.execute("SELECT time, action, reason, manual FROM ban_log WHERE time >= ?", (since,))
        return [BanLogEntry(t, a, r, bool(m)) for t, a, r, m in rows]

    # -- pruning --------------------------------------------------------------------------
    def prune(self, now: float, event_retention: float, max_events: int, history_retention: float) -> int:
        """Keep the database bounded: old events, old history, old control rows go."""
        with self.transaction():
            n = self.conn.execute("DELETE FROM events WHERE time < ?", (now - event_retention,)).rowcount
            over = self.count_events() - max_events
            if over > 0:
                n += self.conn.execute(
                    "DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY id LIMIT ?)", (over,)
                ).rowcount
            self.conn.execute("DELETE FROM ban_log WHERE time < ?", (now - history_retention,))
            self.conn.execute("DELETE FROM control WHERE time < ?", (now - 86400,))
            self.conn.execute("DELETE FROM cleared WHERE time < ?", (now - event_retention,))
        return n

    # -- journal cursors ------------------------------------------------------------------------
    JOURNAL_CURSOR = "journal_cursor:"  # meta key prefix of a journal source's saved cursor

    def journal_cursors(self) -> dict[str, str]:
        """Every journal source's saved cursor: source key -> cursor of the last entry stored."""
        rows = self.conn.execute("SELECT key, value FROM meta WHERE key LIKE ?", (self.JOURNAL_CURSOR + "%",))
        return {k[len(self.JOURNAL_CURSOR):]: v for k, v in rows if v}

    def save_journal_cursors(self, cursors: dict[str, str]) -> None:
        """Inside the batch's transaction: where each journal source's stored entries end."""
        self.conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                              ((self.JOURNAL_CURSOR + k, v) for k, v in cursors.items() if v))

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def stats(self) -> dict[str, int]:
        q = self.conn.execute
        return {
            "events": q("SELECT count(*) FROM events").fetchone()[0],
            "bans": q("SELECT count(*) FROM bans").fetchone()[0],
            "refused": q("SELECT count(*) FROM bans WHERE refused IS NOT NULL").fetchone()[0],
            "history": q("SELECT count(*) FROM ban_log").fetchone()[0],
        }


def _ban(row: tuple) -> Ban:
    ip, reason, created, expires, score, offence, manual, refused = row
    return Ban(ip=ip, reason=reason, created=created, expires=expires, score=score or 0.0,
               offence=offence or 1, manual=bool(manual), refused=refused)
