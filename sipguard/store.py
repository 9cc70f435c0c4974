"""The SQLite memory of every stage: events (and the text of the newest ones), bans (the office policy's user
bans in a table of their own), ban history, the evidence kept with each ban, source positions, CLI requests,
the fleet's outbox and held ban ids, and the queries behind
`sipguard report` and `sipguard why`.

The only module that runs SQL (the standard sqlite3 module over one WAL database): every table is
created here and every statement is one of its named methods, so no other module touches the
connection. It decides nothing: it keeps what the policy decided and what the sources read, in one
transaction per batch so a restart neither loses nor double-counts a line.

Many processes share the file (the daemon, any number of CLI commands): a writer waits for the write
lock with bounded retries (`BUSY_BUDGET` in all) and then fails with `StoreBusy`, one line for the
operator, never a raw sqlite error. A read-only store (`readonly=True`: `status`, `list`, `report`)
opens the file with `mode=ro`, creates and migrates nothing, and works on a read-only state
directory. A new state directory is made 0750 and a new database 0640 (its -wal and -shm follow the
database's mode) whatever the umask; as root, a state directory or database owned by another user is
refused: its rows would drive a root daemon's bans.

Values read back are never trusted to be sane (a database written by something else): a time that is
no number comes back as NaN, a text that is a BLOB or a number as a str, so every reader can show it
instead of crashing; the report's queries count only rows whose time is a real one (TIME_LIMIT).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from .errors import SipguardError
from .model import EVIDENCE_CHARS, Ban, Event, EventKind, Evidence

log = logging.getLogger("sipguard.store")

SCHEMA_VERSION = 1
DB_NAME = "sipguard.db"
DIR_MODE = 0o750
FILE_MODE = 0o640

BUSY_BUDGET = 10.0
"""Seconds a writer waits in all for the write lock (retrying) before `StoreBusy`."""
_ATTEMPT_MS = 20  # sqlite's own busy wait per attempt; between attempts a short random pause
_PAUSE = 0.005

PRUNE_CHUNK = 20_000
"""Events deleted per prune transaction (a few tens of milliseconds of write lock each)."""

TIME_LIMIT = 1e15
"""Report queries count only rows whose time is a number below this (ages beyond any real clock):
text, infinite or absurd times from a database written by something else are left out, not fatal."""

EVENT_TEXTS = 100_000
"""Recent events whose record text is kept (the newest; successes keep none), each at most
EVIDENCE_CHARS + 1 characters: what a restart gives back to the policy, so a ban it completes shows the
records read before it, and what `why` shows of a ban another fleet node decided. Older texts go in the
transaction that stores newer ones, so a spray of any size holds at most this many (13 MB more in a
1,000,000-source spray of Kamailio's usual lines; about 55 MB at the most)."""
_TEXT_CAP = EVIDENCE_CHARS + 1  # one more than evidence shows: it is still cut (and marked) there

_BAN_COLS = "ip, reason, created, expires, score, offence, manual, refused"
_ACTIVE = "(expires IS NULL OR expires > ?)"

_SCHEMA = (
    'CREATE TABLE IF NOT EXISTS "events" ("id" INTEGER PRIMARY KEY, "time" REAL, "ip" TEXT, "filter" TEXT, '
    '"kind" TEXT, "weight" REAL)',
    'CREATE INDEX IF NOT EXISTS "idx_events_time" ON "events" ("time")',
    'CREATE INDEX IF NOT EXISTS "idx_events_ip_time" ON "events" ("ip", "time")',
    # the record text of the newest EVENT_TEXTS events (id = events.id): evidence across a restart
    'CREATE TABLE IF NOT EXISTS "event_texts" ("id" INTEGER PRIMARY KEY, "text" TEXT)',
    'CREATE TABLE IF NOT EXISTS "bans" ("ip" TEXT PRIMARY KEY, "reason" TEXT NOT NULL, "score" REAL, '
    '"created" REAL NOT NULL, "expires" REAL, "offence" INTEGER, "manual" INTEGER, "refused" TEXT)',
    # the daemon looks for expired bans after every batch: without it each look read every ban (4 ms at
    # 100,000 bans, 20 times a second under a steady stream of lines)
    'CREATE INDEX IF NOT EXISTS "idx_bans_expires" ON "bans" ("expires")',
    'CREATE TABLE IF NOT EXISTS "ban_log" ("id" INTEGER PRIMARY KEY, "time" REAL, "action" TEXT, "ip" TEXT, '
    '"reason" TEXT, "score" REAL, "expires" REAL, "offence" INTEGER, "manual" INTEGER)',
    'CREATE INDEX IF NOT EXISTS "idx_ban_log_ip_time" ON "ban_log" ("ip", "time")',
    'CREATE INDEX IF NOT EXISTS "idx_ban_log_time" ON "ban_log" ("time")',
    'CREATE TABLE IF NOT EXISTS "positions" ("path" TEXT PRIMARY KEY, "dev" INTEGER, "inode" INTEGER, '
    '"offset" INTEGER, "head" TEXT, "tail" TEXT)',
    'CREATE TABLE IF NOT EXISTS "control" ("id" INTEGER PRIMARY KEY, "time" REAL, "action" TEXT, "target" TEXT, '
    '"payload" TEXT)',
    'CREATE TABLE IF NOT EXISTS "cleared" ("ip" TEXT PRIMARY KEY, "time" REAL)',
    # fleet mode ([cluster]): what to publish, and the fleet id of the ban held per address
    "CREATE TABLE IF NOT EXISTS cluster_outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
    "op TEXT NOT NULL, ip TEXT NOT NULL, id TEXT NOT NULL, payload TEXT NOT NULL, time REAL)",
    "CREATE TABLE IF NOT EXISTS cluster_bans (ip TEXT PRIMARY KEY, id TEXT NOT NULL, origin TEXT, created REAL)",
    'CREATE TABLE IF NOT EXISTS "meta" ("key" TEXT PRIMARY KEY, "value" TEXT)',
    # the records that decided each automatic ban (a few per ban, each capped): pruned with the history
    'CREATE TABLE IF NOT EXISTS "evidence" ("ip" TEXT NOT NULL, "created" REAL NOT NULL, "seq" INTEGER NOT NULL, '
    '"time" REAL, "filter" TEXT, "weight" REAL, "text" TEXT, "cut" INTEGER, PRIMARY KEY ("ip", "created", "seq"))',
    # user bans (the office policy): one user at one address, enforced by Kamailio (htable), never the kernel
    'CREATE TABLE IF NOT EXISTS "user_bans" ("ip" TEXT NOT NULL, "user" TEXT NOT NULL, "reason" TEXT NOT NULL, '
    '"score" REAL, "created" REAL NOT NULL, "expires" REAL, "manual" INTEGER NOT NULL DEFAULT 0, '
    'PRIMARY KEY ("ip", "user"))',
)
_TABLES = ("events", "event_texts", "bans", "ban_log", "positions", "control", "cleared", "cluster_outbox", "cluster_bans", "meta",
           "evidence", "user_bans")
_INDEXES = ("idx_events_time", "idx_events_ip_time", "idx_bans_expires", "idx_ban_log_ip_time", "idx_ban_log_time")


class StoreError(SipguardError):
    """The state database cannot be opened, read or written: one line for the operator."""


class StoreBusy(StoreError):
    """Another process held the write lock for longer than the retry budget."""


class NoDatabase(StoreError):
    """A read-only open found no database (nothing was ever stored there)."""


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
    """A CLI action the running daemon must mirror (ban, unban, unban_all, sync, ban_user, unban_user)."""

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


@dataclass(slots=True)
class LockStats:
    """How this connection's write transactions went: the wait for the lock and how long it was held."""

    transactions: int = 0
    retries: int = 0  # BEGIN attempts that found the lock taken
    wait_max: float = 0.0  # seconds
    hold_max: float = 0.0  # seconds
    hold_last: float = 0.0

    def waited(self, seconds: float, retries: int) -> None:
        self.transactions += 1
        self.retries += retries
        self.wait_max = max(self.wait_max, seconds)

    def held(self, seconds: float) -> None:
        self.hold_last = seconds
        self.hold_max = max(self.hold_max, seconds)


class HistoryEntry(NamedTuple):
    """One row of one address's ban history (`sipguard why`): a ban, unban, expiry or delisting."""

    time: float
    action: str
    reason: str | None
    score: float
    expires: float | None
    offence: int
    manual: bool


class FleetOrigin(NamedTuple):
    """The fleet ban held for an address: its fleet id, the node that made it, when."""

    id: str
    origin: str | None
    created: float


class BanSummary(NamedTuple):
    """What `list` needs before it streams the bans in force: how many, and the widest values."""

    count: int
    refused: bool
    ip_width: int
    reason_width: int
    offence_width: int


class Store:
    """One database file in the state directory; safe for the daemon and the CLI at once (WAL)."""

    def __init__(self, path: str | Path, *, readonly: bool = False, busy_budget: float = BUSY_BUDGET) -> None:
        self.path = str(path)
        self.readonly = readonly
        self.busy_budget = busy_budget
        self.lock = LockStats()
        memory = self.path == ":memory:"
        if readonly:
            conn = self._open_readonly()
        else:
            if not memory:
                p = Path(self.path)
                p.parent.mkdir(parents=True, exist_ok=True)
                if not os.access(p if p.exists() else p.parent, os.W_OK):
                    raise StoreError(f"cannot write the state database {p}: it is read-only here (a read-only "
                                     f"file system or no write permission)")
                _create_file(p)
            conn = sqlite3.connect(self.path, timeout=busy_budget, isolation_level=None, check_same_thread=False)
        self.conn = conn  # its busy timeout is the budget: autocommit statements wait as long
        if readonly:
            self._ban_cols = _BAN_COLS if "refused" in self._columns("bans") else _BAN_COLS.replace(
                "refused", "NULL")  # a database from before refusals, read as it is
            return
        if not memory and conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            self._retry(lambda: conn.execute("PRAGMA journal_mode=WAL"), "switch to WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        self._ban_cols = _BAN_COLS
        if not self._schema_complete():
            self._create()

    @classmethod
    def open_state_dir(cls, state_dir: str | Path, *, readonly: bool = False) -> Store:
        """The database of a state directory. Read-write: the directory is made (0750) when missing.
        Read-only: the database must exist. As root, a directory or database another user owns is
        refused either way."""
        d = Path(state_dir)
        db = d / DB_NAME
        if readonly:
            if d.is_dir() and not os.access(d, os.R_OK | os.X_OK):
                raise StoreError(f"cannot read the state directory {d}: Permission denied")
            if not db.exists():
                raise NoDatabase(f"no database in {d} yet (sipguard run or a first ban creates it)")
            _check_owner(d, db)
            return cls(db, readonly=True)
        _make_dir(d)
        _check_owner(d, db)
        return cls(db)

    def close(self) -> None:
        self.conn.close()

    # -- opening --------------------------------------------------------------------------
    def _open_readonly(self) -> sqlite3.Connection:
        """`mode=ro`; on a read-only directory without a -wal file (the daemon stopped cleanly, so
        the main file holds every committed row) SQLite cannot make the -shm file it needs, and
        the file is read as immutable instead."""
        p = Path(self.path)
        if not p.exists():
            raise StoreError(f"no database {p}")
        if not os.access(p, os.R_OK):
            raise StoreError(f"cannot read {p}: permission denied")
        uri = p.resolve().as_uri()
        last: Exception | None = None
        for query in ("?mode=ro", "?mode=ro&immutable=1"):
            if "immutable" in query and Path(self.path + "-wal").exists():
                break  # the log holds rows the main file lacks: immutable would hide them
            try:
                conn = sqlite3.connect(uri + query, uri=True, timeout=self.busy_budget, isolation_level=None,
                                       check_same_thread=False)
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                return conn
            except sqlite3.Error as exc:
                last = exc
        raise StoreError(f"cannot read {p} read-only: {last}")

    def _columns(self, table: str) -> set[str]:
        return {r[1] for r in self.conn.execute(f'PRAGMA table_info("{table}")')}

    def _schema_complete(self) -> bool:
        names = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")}
        return (names.issuperset(_TABLES + _INDEXES) and "refused" in self._columns("bans")
                and "head" in self._columns("positions") and "manual" in self._columns("user_bans"))

    def _create(self) -> None:
        """Every table and index (idempotent, in one transaction: first openers may race)."""
        with self.transaction():
            for ddl in _SCHEMA:
                self.conn.execute(ddl)
            if "refused" not in self._columns("bans"):  # a database from before refusals: same rows, new column
                self.conn.execute('ALTER TABLE "bans" ADD COLUMN "refused" TEXT')
            if "head" not in self._columns("positions"):  # from before fingerprints: "" = none (the inode decides)
                self.conn.execute('ALTER TABLE "positions" ADD COLUMN "head" TEXT')
                self.conn.execute('ALTER TABLE "positions" ADD COLUMN "tail" TEXT')
            if "manual" not in self._columns("user_bans"):  # from before manual user bans: all automatic
                self.conn.execute('ALTER TABLE "user_bans" ADD COLUMN "manual" INTEGER NOT NULL DEFAULT 0')
            self.conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))

    def _retry(self, fn, what: str):  # noqa: ANN001, ANN202 - one statement that needs a lock
        deadline = time.monotonic() + self.busy_budget
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if not _busy(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise self._busy_error(what) from None
                time.sleep(random.uniform(0, _PAUSE))

    def _busy_error(self, what: str) -> StoreBusy:
        return StoreBusy(f"the state database {self.path} stayed locked by another process for "
                         f"{self.busy_budget:g}s (could not {what}); try again")

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE … COMMIT: one batch of events, bans and positions, all or nothing.

        Waiting for the write lock retries for `busy_budget` seconds in all, then raises StoreBusy.
        Nested use joins the outer transaction.
        """
        if self.conn.in_transaction:
            yield
            return
        if self.readonly:
            raise StoreError(f"the state database {self.path} is open read-only")
        self._begin()
        t0 = time.monotonic()
        try:
            yield
        except BaseException:
            if self.conn.in_transaction:  # (SQLite may have rolled back already, e.g. on a full disk)
                self.conn.execute("ROLLBACK")
            self._held(t0)
            raise
        self.conn.execute("COMMIT")
        self._held(t0)

    def _begin(self) -> None:
        conn = self.conn
        start = time.monotonic()
        deadline = start + self.busy_budget
        retries = 0
        conn.execute(f"PRAGMA busy_timeout={_ATTEMPT_MS}")
        try:
            while True:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as exc:
                    if not _busy(exc):
                        raise
                    retries += 1
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise self._busy_error("start a write") from None
                    time.sleep(min(left, random.uniform(0, _PAUSE)))
        finally:
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_budget * 1000)}")
        self.lock.waited(time.monotonic() - start, retries)

    def _held(self, t0: float) -> None:
        held = time.monotonic() - t0
        self.lock.held(held)
        if held > 0.5:
            log.debug("held the write lock for %.2fs", held)

    # -- events ---------------------------------------------------------------------------
    def add_events(self, events: Iterable[Event]) -> None:
        """Store a batch's events, and the record text of those that can be evidence (every kind but a
        success), capped; only the newest EVENT_TEXTS texts stay (the older go in this statement's
        transaction, by id: a range of the primary key, so the cost follows the batch, not the table)."""
        events = events if isinstance(events, list) else list(events)
        if not events:
            return
        q = self.conn.execute
        # ids given here (as SQLite would: one past the largest), so the texts name their events; a text's
        # id is never reused, even after every event was pruned
        base = q("SELECT max(coalesce((SELECT max(id) FROM events), 0), "
                 "coalesce((SELECT max(id) FROM event_texts), 0))").fetchone()[0]  # one statement a batch
        self.conn.executemany(
            "INSERT INTO events (id, time, ip, filter, kind, weight) VALUES (?, ?, ?, ?, ?, ?)",
            ((base + k, e.time, e.ip, e.filter, e.kind.value, e.weight) for k, e in enumerate(events, 1)),
        )
        success = EventKind.SUCCESS
        first = max(0, len(events) - EVENT_TEXTS)  # (a batch larger than that: only its newest)
        texts = [(base + 1 + k, e.text[:_TEXT_CAP]) for k in range(first, len(events))
                 if (e := events[k]).text and e.kind is not success]
        if texts:
            self.conn.executemany("INSERT OR REPLACE INTO event_texts (id, text) VALUES (?, ?)", texts)
            q("DELETE FROM event_texts WHERE id <= ?", (base + len(events) - EVENT_TEXTS,))

    def count_event_texts(self) -> int:
        """How many stored events keep their record text (at most EVENT_TEXTS)."""
        return self.conn.execute("SELECT count(*) FROM event_texts").fetchone()[0]

    def recent_events(self, since: float) -> list[Event]:
        """Events newer than `since`, minus those from before an unban of their source."""
        return list(self.iter_recent_events(since))

    def iter_recent_events(self, since: float) -> Iterator[Event]:
        """`recent_events`, read as they are consumed: a start with a million recent events replays
        them into the policy in bounded memory. Each has the record text kept with it ("" when none)."""
        kinds = {k.value: k for k in EventKind}
        col, first = self._text_col()
        cur = self.conn.execute(
            f"SELECT e.time, e.ip, e.filter, e.kind, e.weight, {col} FROM events e "
            "LEFT JOIN cleared c ON c.ip = e.ip "
            "WHERE e.time >= ? AND (c.time IS NULL OR e.time > c.time) ORDER BY e.time, e.id",
            (*first, since),
        )
        try:
            while rows := cur.fetchmany(10_000):
                for t, ip, f, k, w, text in rows:
                    yield Event(t, ip, f, kinds[k], w, "" if text is None else text if type(text) is str
                                else _text(text) or "")
        finally:
            cur.close()

    def _text_col(self) -> tuple[str, tuple]:
        """The column of an events query (`events e`) giving each event's kept text, and its argument: looked
        up only for ids from the oldest text on (a restart reads a million events at the cost of none)."""
        if self.readonly and "event_texts" not in self._tables():
            return "NULL", ()  # a database from before event texts, read as it is
        first = self.conn.execute("SELECT min(id) FROM event_texts").fetchone()[0]
        if first is None:
            return "NULL", ()
        return "CASE WHEN e.id >= ? THEN (SELECT text FROM event_texts WHERE id = e.id) END", (first,)

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

    def put_bans(self, bans: list[Ban], now: float) -> None:
        """Many `put_ban`s at once (two statements for any number: a 100k ban list, a start)."""
        self.conn.executemany(
            "INSERT OR REPLACE INTO bans (ip, reason, score, created, expires, offence, manual, refused) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(b.ip, b.reason, b.score, b.created, b.expires, b.offence, int(b.manual), b.refused) for b in bans],
        )
        self.conn.executemany(
            "INSERT INTO ban_log (time, action, ip, reason, score, expires, offence, manual) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(now, "ban", b.ip, b.reason, b.score, b.expires, b.offence, int(b.manual)) for b in bans],
        )

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

    # -- user bans (the office policy) -------------------------------------------------------
    def put_user_bans(self, bans: Iterable[Ban], now: float) -> None:
        """Store user bans (Ban.user set), replacing one of the same (address, user); each logged in the
        history with the reason `REASON user=USER`, its evidence kept under the key USER@ADDRESS."""
        rows = [b for b in bans if b.user is not None]
        self.add_evidence([replace(b, ip=b.key) for b in rows if b.evidence])
        self.conn.executemany(
            'INSERT OR REPLACE INTO user_bans (ip, "user", reason, score, created, expires, manual) '
            'VALUES (?, ?, ?, ?, ?, ?, ?)',
            [(b.ip, b.user, b.reason, b.score, b.created, b.expires, int(b.manual)) for b in rows])
        self.conn.executemany(
            "INSERT INTO ban_log (time, action, ip, reason, score, expires, offence, manual) "
            "VALUES (?, 'userban', ?, ?, ?, ?, ?, ?)",
            [(now, b.ip, f"{b.reason} user={b.user}", b.score, b.expires, b.offence, int(b.manual)) for b in rows])

    def remove_user_ban(self, ip: str, user: str, now: float, action: str = "userunban") -> Ban | None:
        got = [b for b in self.user_bans_of(ip) if b.user == user]
        if not got:
            return None
        self.conn.execute('DELETE FROM user_bans WHERE ip = ? AND "user" = ?', (ip, user))
        b = got[0]
        self.conn.execute(
            "INSERT INTO ban_log (time, action, ip, reason, score, expires, offence, manual) VALUES (?, ?, ?, ?, ?, ?, 1, ?)",
            (now, action, ip, f"{b.reason} user={user}", b.score, b.expires, int(b.manual)))
        return b

    def _user_bans(self, where: str, args: tuple, order: str) -> list[Ban]:
        """User bans matching `where` (a database from before user bans: none)."""
        if "user_bans" not in self._tables():
            return []
        rows = self.conn.execute(f'SELECT ip, "user", reason, score, created, expires, manual FROM user_bans WHERE {where} '
                                 f'ORDER BY {order}', args)
        return [_user_ban(r) for r in rows]

    def user_bans_of(self, ip: str) -> list[Ban]:
        """The user bans stored at one address (in force or not), oldest first."""
        return self._user_bans("ip = ?", (ip,), 'created, "user"')

    def active_user_bans(self, now: float) -> list[Ban]:
        """Every user ban in force, oldest first."""
        return self._user_bans(_ACTIVE, (now,), 'created, ip, "user"')

    def expired_user_bans(self, now: float) -> list[Ban]:
        """Every user ban whose time is up, oldest first."""
        return self._user_bans("expires IS NOT NULL AND expires <= ?", (now,), 'created, ip, "user"')

    def get_ban(self, ip: str) -> Ban | None:
        row = self.conn.execute(f"SELECT {self._ban_cols} FROM bans WHERE ip = ?", (ip,)).fetchone()
        return _ban(row) if row else None

    def bans_of(self, ips: Iterable[str]) -> dict[str, Ban]:
        """The stored bans of these addresses (those that have one), in a few queries for any count."""
        return {r[0]: _ban(r) for r in self._rows_of_ips(f"SELECT {self._ban_cols} FROM bans", ips)}

    def _rows_of_ips(self, select: str, ips: Iterable[str]) -> Iterator[tuple]:
        """The rows of `select` (whose first column is `ip`) for these addresses, 500 per query."""
        ips = list(ips)
        for i in range(0, len(ips), 500):
            chunk = ips[i:i + 500]
            yield from self.conn.execute(f"{select} WHERE ip IN ({','.join('?' * len(chunk))})", chunk)

    def active_bans(self, now: float | None = None) -> list[Ban]:
        return list(self.iter_active_bans(now))

    @staticmethod
    def _ban_where(reason: str | None, since: float | None, manual: bool | None) -> tuple[str, tuple]:
        """The SQL of `list`'s filters: a reason, or every reason of a jail or kind (`sip` matches `sip:auth`);
        created at or after `since`; made by hand or not."""
        where, args = [_ACTIVE], []
        if reason is not None:
            where.append("(reason = ? OR substr(reason, 1, length(?) + 1) = ? || ':')")
            args += [reason, reason, reason]
        if since is not None:
            where.append("created >= ?")
            args.append(since)
        if manual is not None:
            where.append("manual = ?" if manual else "(manual = ? OR manual IS NULL)")
            args.append(1 if manual else 0)
        return " AND ".join(where), tuple(args)

    def iter_active_bans(self, now: float | None = None, *, reason: str | None = None, since: float | None = None,
                         manual: bool | None = None) -> Iterator[Ban]:
        """The bans in force, oldest first, read as they are consumed (bounded memory at any count);
        `reason`, `since`, `manual` narrow them (see `_ban_where`)."""
        now = time.time() if now is None else now
        where, args = self._ban_where(reason, since, manual)
        cur = self.conn.execute(f"SELECT {self._ban_cols} FROM bans WHERE {where} ORDER BY created, ip", (now, *args))
        try:
            for row in cur:
                yield _ban(row)
        finally:
            cur.close()

    def count_active_bans(self, now: float | None = None, *, reason: str | None = None, since: float | None = None,
                          manual: bool | None = None) -> int:
        now = time.time() if now is None else now
        where, args = self._ban_where(reason, since, manual)
        return self.conn.execute(f"SELECT count(*) FROM bans WHERE {where}", (now, *args)).fetchone()[0]

    def active_bans_summary(self, now: float) -> BanSummary:
        """Count and widest address, reason and offence of the bans in force (one pass in SQLite)."""
        refused = "refused" if "NULL" not in self._ban_cols else "NULL"
        n, ref, ipw, rw, ow = self.conn.execute(
            f"SELECT count(*), max({refused} IS NOT NULL), max(length(ip)), max(length(reason)), "
            f"max(length(offence)) FROM bans WHERE {_ACTIVE}", (now,)).fetchone()
        return BanSummary(n, bool(ref), ipw or 0, rw or 0, ow or 0)

    def expired_bans(self, now: float) -> list[Ban]:
        rows = self.conn.execute(
            f"SELECT {self._ban_cols} FROM bans WHERE expires IS NOT NULL AND expires <= ?", (now,))
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

    # -- evidence and one address's story (`sipguard why`) ---------------------------------
    def add_evidence(self, bans: Iterable[Ban]) -> None:
        """Store the evidence each ban carries, keyed by the ban (address, created); a ban stored twice
        (a retried transaction, a re-mark) keeps its first rows."""
        self.conn.executemany(
            'INSERT OR IGNORE INTO evidence (ip, created, seq, time, filter, weight, text, cut) '
            'VALUES (?, ?, ?, ?, ?, ?, ?, ?)',
            [(b.ip, b.created, i, e.time, e.filter, e.weight, e.text, int(e.cut))
             for b in bans for i, e in enumerate(b.evidence)])

    def evidence_of(self, ip: str) -> dict[float, list[Evidence]]:
        """Every kept evidence of `ip`'s bans: ban created -> its records, oldest ban and record first."""
        if self.readonly and "evidence" not in self._tables():
            return {}  # a database from before evidence, read as it is
        out: dict[float, list[Evidence]] = {}
        rows = self.conn.execute(
            "SELECT created, time, filter, weight, text, cut FROM evidence WHERE ip = ? ORDER BY created, seq", (ip,))
        for created, t, f, w, text, cut in rows:
            out.setdefault(_time(created), []).append(
                Evidence(_time(t), _text(f) or "", _time(w) if w is not None else 0.0, _text(text) or "", bool(cut)))
        return out

    def count_evidence(self) -> int:
        return self.conn.execute("SELECT count(*) FROM evidence").fetchone()[0]

    def ban_history(self, ip: str, limit: int = 1000) -> list[HistoryEntry]:
        """`ip`'s ban history, oldest first (the newest `limit` rows)."""
        rows = self.conn.execute(
            "SELECT time, action, reason, score, expires, offence, manual FROM "
            "(SELECT id, time, action, reason, score, expires, offence, manual FROM ban_log WHERE ip = ? "
            "ORDER BY id DESC LIMIT ?) ORDER BY id", (ip, limit))
        return [HistoryEntry(_time(t), _text(a) or "", _text(r), _time(sc) if sc is not None else 0.0,
                             None if e is None else _time(e), o if isinstance(o, int) and o else 1, bool(m))
                for t, a, r, sc, e, o, m in rows]

    def events_of(self, ip: str, since: float, limit: int = 10_000) -> list[Event]:
        """`ip`'s stored events newer than `since` that still count (not before an unban), oldest first
        (the newest `limit`), each with the record text kept with it ("" when none)."""
        kinds = {k.value: k for k in EventKind}
        col, first = self._text_col()
        rows = self.conn.execute(
            "SELECT time, ip, filter, kind, weight, text FROM (SELECT e.id, e.time, e.ip, e.filter, e.kind, e.weight, "
            f"{col} AS text FROM events e LEFT JOIN cleared c ON c.ip = e.ip "
            "WHERE e.ip = ? AND e.time >= ? AND (c.time IS NULL OR e.time > c.time) ORDER BY e.time DESC, e.id DESC "
            "LIMIT ?) ORDER BY time, id", (*first, ip, since, limit))
        return [Event(_time(t), i, _text(f) or "", kinds[k], _time(w), _text(x) or "")
                for t, i, f, k, w, x in rows if k in kinds]

    def network_bans(self) -> list[Ban]:
        """Every stored CIDR ban (an address may be banned by one that covers it)."""
        rows = self.conn.execute(f"SELECT {self._ban_cols} FROM bans WHERE ip LIKE '%/%'")
        return [_ban(r) for r in rows]

    def fleet_origin(self, ip: str) -> FleetOrigin | None:
        """The fleet ban this node holds for `ip` (cluster_bans), with the node that made it, or None."""
        row = self.conn.execute("SELECT id, origin, created FROM cluster_bans WHERE ip = ?", (ip,)).fetchone()
        return FleetOrigin(_text(row[0]) or "", _text(row[1]), _time(row[2])) if row else None

    def _tables(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

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

    def outbox_add_many(self, rows: Iterable[tuple[str, str, str, str]], now: float | None = None) -> None:
        """Many `outbox_add`s at once, (op, ip, id, payload) each, in this order."""
        t = time.time() if now is None else now
        self.conn.executemany("INSERT INTO cluster_outbox (op, ip, id, payload, time) VALUES (?, ?, ?, ?, ?)",
                              ((op, ip, ban_id, payload, t) for op, ip, ban_id, payload in rows))

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

    def hold_many(self, rows: Iterable[tuple[str, str, str, float]]) -> None:
        """Many `hold`s at once, (ip, id, origin, created) each: one statement for a fleet batch."""
        self.conn.executemany("INSERT OR REPLACE INTO cluster_bans (ip, id, origin, created) VALUES (?, ?, ?, ?)",
                              rows)

    def held(self, ip: str) -> HeldBan | None:
        row = self.conn.execute("SELECT id, created FROM cluster_bans WHERE ip = ?", (ip,)).fetchone()
        return HeldBan(row[0], row[1]) if row else None

    def held_of(self, ips: Iterable[str]) -> dict[str, HeldBan]:
        """The held fleet ids of these addresses (those that have one), in a few queries for any count."""
        return {r[0]: HeldBan(r[1], r[2]) for r in self._rows_of_ips("SELECT ip, id, created FROM cluster_bans", ips)}

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
            "SELECT min(time) FROM (SELECT min(time) AS time FROM events WHERE time >= ? AND time < ? "
            "UNION ALL SELECT min(time) FROM ban_log WHERE time >= ? AND time < ?)",
            (since, TIME_LIMIT, since, TIME_LIMIT)).fetchone()[0]

    def event_counts(self, step: float, since: float) -> list[tuple[int, str, int]]:
        """Events since `since` per (time bucket of `step` seconds: int(time / step), filter): count."""
        return self.conn.execute(
            "SELECT CAST(time / ? AS INTEGER) AS b, filter, count(*) FROM events "
            "WHERE time >= ? AND time < ? GROUP BY b, filter", (step, since, TIME_LIMIT)).fetchall()

    def top_sources(self, since: float, limit: int) -> list[SourceActivity]:
        """The `limit` sources with the most events since `since` (most first, then by address)."""
        rows = self.conn.execute(
            "SELECT ip, count(*) AS n, group_concat(DISTINCT filter), min(time), max(time) "
            "FROM events WHERE time >= ? AND time < ? GROUP BY ip ORDER BY n DESC, ip LIMIT ?",
            (since, TIME_LIMIT, limit))
        return [SourceActivity(ip, n, sorted((flts or "").split(",")), t0, t1) for ip, n, flts, t0, t1 in rows]

    def events_per_source(self, since: float) -> dict[str, int]:
        return dict(self.conn.execute("SELECT ip, count(*) FROM events WHERE time >= ? AND time < ? GROUP BY ip",
                                      (since, TIME_LIMIT)))

    def bans_per_source(self, since: float) -> dict[str, int]:
        """How many times each source was banned (ban history action 'ban') since `since`."""
        return dict(self.conn.execute(
            "SELECT ip, count(*) FROM ban_log WHERE action = 'ban' AND time >= ? AND time < ? GROUP BY ip",
            (since, TIME_LIMIT)))

    def ban_log_since(self, since: float) -> list[BanLogEntry]:
        rows = self.conn.execute("SELECT time, action, reason, manual FROM ban_log WHERE time >= ? AND time < ?",
                                 (since, TIME_LIMIT))
        return [BanLogEntry(t, a, r, bool(m)) for t, a, r, m in rows]

    # -- pruning --------------------------------------------------------------------------
    def prune(self, now: float, event_retention: float, max_events: int, history_retention: float) -> int:
        """Keep the database bounded: old events (and their texts), old history, old control rows go.

        Events go PRUNE_CHUNK at a time, each chunk its own short transaction, so a big prune (a spray
        ageing out) never holds the write lock long enough to keep a CLI command waiting."""
        n = self._delete_chunks("SELECT id FROM events WHERE time < ? LIMIT ?", (now - event_retention,))
        over = self.count_events() - max_events
        while over > 0:
            with self.transaction():
                k = self.conn.execute("DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY id LIMIT ?)",
                                      (min(over, PRUNE_CHUNK),)).rowcount
            n += k
            over -= k
            if k == 0:
                break
        with self.transaction():
            # the texts of events pruned (the oldest ids; a text outlives no event for long, and EVENT_TEXTS
            # bounds them anyway)
            self.conn.execute("DELETE FROM event_texts WHERE id < coalesce((SELECT min(id) FROM events), "
                              "9223372036854775807)")
            self.conn.execute("DELETE FROM ban_log WHERE time < ?", (now - history_retention,))
            # evidence goes with the history, except that of a ban still in force
            self.conn.execute("DELETE FROM evidence WHERE created < ? AND NOT EXISTS (SELECT 1 FROM bans b "
                              "WHERE b.ip = evidence.ip AND b.created = evidence.created)",
                              (now - history_retention,))
            self.conn.execute("DELETE FROM control WHERE time < ?", (now - 86400,))
            self.conn.execute("DELETE FROM cleared WHERE time < ?", (now - event_retention,))
        return n

    def _delete_chunks(self, select_ids: str, args: tuple) -> int:
        n = 0
        while True:
            with self.transaction():
                k = self.conn.execute(f"DELETE FROM events WHERE id IN ({select_ids})", (*args, PRUNE_CHUNK)).rowcount
            n += k
            if k < PRUNE_CHUNK:
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
            "refused": q("SELECT count(*) FROM bans WHERE refused IS NOT NULL").fetchone()[0]
            if "NULL" not in self._ban_cols else 0,
            "history": q("SELECT count(*) FROM ban_log").fetchone()[0],
        }

    def quick_check(self) -> list[str]:
        """SQLite's `PRAGMA quick_check` (for `sipguard doctor`): ["ok"] when the file is healthy, else
        one line per fault found (at most 20); a file SQLite cannot read at all raises sqlite3.Error."""
        return [str(r[0]) for r in self.conn.execute("PRAGMA quick_check(20)").fetchall()]


def _time(value: object) -> float:
    """A stored time as a float: NaN when it is no number (NULL or text from another writer)."""
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:
            return math.inf
    if isinstance(value, (str, bytes)):
        try:
            return float(value)
        except ValueError:
            pass
    return math.nan


def _text(value: object) -> str | None:
    """A stored text as a str (a BLOB or a number from another writer too); None stays None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _user_ban(row: tuple) -> Ban:
    ip, user, reason, score, created, expires, manual = row
    score = _time(score) if score is not None else 0.0
    return Ban(ip=_text(ip), reason=_text(reason), created=_time(created),  # type: ignore[arg-type]
               expires=None if expires is None else _time(expires), score=score if math.isfinite(score) else 0.0,
               user=_text(user), manual=bool(manual))


def _ban(row: tuple) -> Ban:
    ip, reason, created, expires, score, offence, manual, refused = row
    score = _time(score) if score is not None else 0.0
    return Ban(ip=_text(ip), reason=_text(reason), created=_time(created),  # type: ignore[arg-type]
               expires=None if expires is None else _time(expires), score=score if math.isfinite(score) else 0.0,
               offence=offence if isinstance(offence, int) and offence else 1, manual=bool(manual),
               refused=_text(refused))


def database_error(exc: BaseException) -> str | None:
    """The one line an operator sees for a database error the store raised unnamed, else None."""
    if isinstance(exc, sqlite3.Error):
        return f"the state database: {exc}"
    return None


def _busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def _create_file(path: Path) -> None:
    """A new database file is FILE_MODE whatever the umask (SQLite gives -wal and -shm its mode)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def _make_dir(d: Path) -> None:
    """The state directory, DIR_MODE when this makes it (its parents as the umask says)."""
    if d.is_dir():
        return
    d.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(d, DIR_MODE)
    except FileExistsError:
        return
    os.chmod(d, DIR_MODE)


def _check_owner(d: Path, db: Path) -> None:
    """As root, refuse a state directory or database owned by another user (it would steer our bans)."""
    if os.geteuid() != 0:
        return
    for p in (d, db):
        try:
            uid = p.stat().st_uid
        except FileNotFoundError:
            continue
        if uid != 0:
            raise StoreError(f"{p} is owned by {_user(uid)}, not root: a root sipguard does not use state another "
                             f"user controls (chown it to root, or choose another --state-dir)")


def _user(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"
