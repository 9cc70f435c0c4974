"""The SQLite memory of every stage: events, bans, ban history, source positions, CLI requests.

The only module that writes SQLite (sqlite-utils over one WAL database). It decides nothing:
it keeps what the policy decided and what the sources read, in one transaction per batch so a
restart neither loses nor double-counts a line.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from .model import Ban, Event, EventKind

SCHEMA_VERSION = 1
DB_NAME = "sipguard.db"


@dataclass(frozen=True, slots=True)
class Position:
    """Where a followed file was read up to (same shape as the sources' SourcePosition)."""

    path: str
    dev: int
    inode: int
    offset: int


@dataclass(frozen=True, slots=True)
class ControlRequest:
    """A CLI action the running daemon must mirror (ban, unban, unban_all)."""

    id: int
    time: float
    action: str
    target: str | None
    payload: dict


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
            db["positions"].create({"path": str, "dev": int, "inode": int, "offset": int}, pk="path")
        if "control" not in db.table_names():
            db["control"].create(
                {"id": int, "time": float, "action": str, "target": str, "payload": str}, pk="id"
            )
        if "cleared" not in db.table_names():
            db["cleared"].create({"ip": str, "time": float}, pk="ip")
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

    # -- positions ------------------------------------------------------------------------
    def positions(self) -> dict[str, Position]:
        rows = self.conn.execute("SELECT path, dev, inode, offset FROM positions")
        return {p: Position(p, d, i, o) for p, d, i, o in rows}

    def save_positions(self, positions: Iterable[object]) -> None:
        """Accepts anything with path, dev, inode and offset (the sources' SourcePosition)."""
        self.conn.executemany(
            "INSERT OR REPLACE INTO positions (path, dev, inode, offset) VALUES (?, ?, ?, ?)",
            ((p.path, p.dev, p.inode, p.offset) for p in positions),  # type: ignore[attr-defined]
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
