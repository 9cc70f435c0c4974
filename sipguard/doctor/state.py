"""Doctor checks of sipguard's own state: the state directory, the database (`PRAGMA quick_check`
through the store, which owns every SQL statement) and the daemon's heartbeat (the `status` meta
key the daemon writes, as `sipguard status` reads it).

The database is opened read-only; nothing is created, migrated or written.
"""

from __future__ import annotations

import json
import os

from ..config import format_duration
from ..store import DB_NAME, NoDatabase, Store, database_error
from .base import HEARTBEAT_STALE, Finding, Host, ok, printable, problem

RESET_DB = ("systemctl stop sipguard; mv {db} {db}.corrupt; systemctl start sipguard (a new database; the "
            "bans still in the kernel sets are adopted at start)")


def check_state_dir(host: Host) -> list[Finding]:
    """The state directory exists (or can be made) and the daemon can write it."""
    d = host.state_dir
    name = printable(d)
    if not d.exists():
        parent = next((p for p in d.parents if p.exists()), None)
        if parent is not None and os.access(parent, os.W_OK | os.X_OK):
            return [ok("state-dir", f"{name} does not exist yet; sipguard creates it (0750) at its first start")]
        return [problem("state-dir", f"{name} does not exist and cannot be made",
                        f"mkdir -p {name} && chmod 0750 {name} (or set state_dir / --state-dir)")]
    if not d.is_dir():
        return [problem("state-dir", f"{name} is not a directory", f"rm {name} (or set state_dir elsewhere)")]
    if not os.access(d, os.W_OK | os.X_OK):
        return [problem("state-dir", f"{name} is not writable here (read-only file system or permissions)",
                        f"chown root: {name} && chmod 0750 {name}; in a systemd sandbox keep "
                        f"StateDirectory=sipguard (systemd/sipguard.service)")]
    try:
        st = os.statvfs(d)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    if free is not None and free < 64 << 20:
        return [problem("state-dir", f"{name}: only {free >> 20} MiB free: the store stalls when the disk is full",
                        f"free space on the file system of {name}", free_bytes=free)]
    return [ok("state-dir", f"{name}: writable" + (f", {free >> 20} MiB free" if free is not None else ""),
               free_bytes=free)]


def _store(host: Host) -> tuple[Store | None, Finding | None]:
    def make() -> tuple[Store | None, Finding | None]:
        db = host.state_dir / DB_NAME
        try:
            return Store.open_state_dir(host.state_dir, readonly=True), None
        except NoDatabase:
            return None, problem("database", f"no database in {printable(host.state_dir)} yet",
                                 "systemctl start sipguard (it creates the database)")
        except Exception as exc:  # noqa: BLE001 - a corrupt file, a foreign owner, permissions
            msg = database_error(exc) or str(exc)
            return None, problem("database", f"{printable(db)} cannot be opened: {printable(msg)}",
                                 RESET_DB.format(db=db))
    return host.cached("store", make)


def check_database(host: Host) -> list[Finding]:
    """The database opens and SQLite's quick_check finds it whole."""
    store, bad = _store(host)
    if bad is not None:
        return [bad]
    assert store is not None
    db = printable(store.path)
    try:
        result = store.quick_check()
    except Exception as exc:  # noqa: BLE001 - sqlite3.DatabaseError: malformed
        msg = database_error(exc) or str(exc)
        return [problem("database", f"{db}: quick_check failed: {printable(msg)}", RESET_DB.format(db=store.path))]
    if result != ["ok"]:
        return [problem("database", f"{db}: damaged: {printable('; '.join(result[:3]))}",
                        RESET_DB.format(db=store.path), faults=result)]
    try:
        stats = store.stats()
    except Exception as exc:  # noqa: BLE001 - a file of another program: no such table
        msg = database_error(exc) or str(exc)
        return [problem("database", f"{db}: not sipguard's database: {printable(msg)}", RESET_DB.format(db=store.path))]
    return [ok("database", f"{db}: quick_check ok; {stats['bans']} bans, {stats['events']} events stored", **stats)]


def check_heartbeat(host: Host) -> list[Finding]:
    """The daemon's heartbeat in the store is fresh (a running daemon writes it every few seconds)."""
    store, bad = _store(host)
    if store is None:
        if bad is not None and "no database" not in bad.message:
            return [problem("heartbeat", "the heartbeat cannot be read: the database cannot be opened",
                            "see the database check")]
        return [problem("heartbeat", "no database, so no heartbeat: the daemon is not running with this state "
                        "directory", "systemctl enable --now sipguard")]
    try:
        raw = store.get_meta("status")
        st = json.loads(raw) if raw else {}
    except Exception as exc:  # noqa: BLE001 - damaged database or JSON
        return [problem("heartbeat", f"cannot read the heartbeat: {printable(exc)}", "see the database check")]
    if not st:
        return [problem("heartbeat", "the daemon never ran with this state directory",
                        "systemctl enable --now sipguard")]
    beat = st.get("heartbeat")
    if not isinstance(beat, (int, float)):
        return [problem("heartbeat", "the heartbeat has no time", "systemctl restart sipguard")]
    age = host.now - beat
    if not st.get("running"):
        return [problem("heartbeat", f"the daemon stopped {format_duration(max(age, 1))} ago",
                        "systemctl start sipguard; journalctl -u sipguard -n 50 says why it stopped", age=age)]
    if age > HEARTBEAT_STALE:
        return [problem("heartbeat", f"the daemon's last heartbeat is {format_duration(max(age, 1))} old (pid "
                        f"{st.get('pid')}): it is stuck or was killed",
                        "systemctl restart sipguard; journalctl -u sipguard -n 50", age=age, pid=st.get("pid"))]
    return [ok("heartbeat", f"the daemon (pid {st.get('pid')}, enforcer {st.get('enforcer')}) beat "
               f"{max(age, 0):.1f}s ago", age=age, pid=st.get("pid"))]
