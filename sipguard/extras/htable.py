"""Mirror bans into Kamailio's `ipban` htable, so `$sht(ipban=>$si) != $null` drops a banned source
in the SIP layer too (`[htable] enabled = true`), beside the kernel enforcer.

Talks Kamailio's JSON-RPC (module jsonrpcs): over its UNIX datagram socket (`unix:PATH`, the
module's default transport with `kamailio_rpc.sock` in run_dir), its FIFO (`fifo:PATH`) or HTTP
through xhttp (`http://HOST:PORT/RPC`). Kamailio 5.6 commands used (htable module docs, section 6):

* `htable.setxi TABLE KEY VALUE EXPIRE` - set with a per-item expiry (seconds) for timed bans;
* `htable.seti TABLE KEY VALUE` + `htable.setex TABLE KEY 0` - a permanent ban (expire 0 = never,
  whatever the table's autoexpire);
* `htable.delete TABLE KEY` on unban and expiry;
* `htable.dump TABLE` on start and each resync: entries holding sipguard's `value` that the store
  no longer bans are deleted (Kamailio's own pike entries, set to 1 by the script, are left alone
  unless `value` is 1 too), and every ban is set again with its remaining time.

Replies come back into `[htable] reply_dir` (default /run/sipguard: the unit's RuntimeDirectory),
a directory only sipguard writes, whose group (`reply_group`, default kamailio) lets a Kamailio
running as its own user answer; reply paths have random names and the group's mode bits only, never
a predictable name in /tmp (which a PrivateTmp unit would not even share with Kamailio). For the
FIFO transport Kamailio's `modparam("jsonrpcs", "fifo_reply_dir", "/run/sipguard/")` must name it.

Only single addresses go into the table: `$sht(ipban=>$si)` is an exact-key lookup, so network
bans (CIDRs) are left to the kernel enforcer and counted as skipped.

User bans (the office policy, `Ban.user`: one user at one address, never in the kernel) go into a second
table, `[htable] user_table` (default `userban`), keyed `USER@ADDRESS` as the script's
`$sht(userban=>$fU@$si)` looks it up before authentication (403). The user is attacker text: it is only
ever a key of that table (sent as a JSON string, bounded by the event's CAPTURE_CHARS); it never names
an address. The same `value` marks sipguard's entries there; a resync makes the table hold exactly the
user bans in force.
"""

from __future__ import annotations

import grp
import itertools
import json
import logging
import math
import os
import secrets
import socket
import stat
import tempfile
import time
import urllib.request
from typing import TYPE_CHECKING, Any

from ..enforce.base import EnforcedEntry, SyncReport
from ..errors import SipguardError
from ..model import Ban, user_key

if TYPE_CHECKING:
    from ..config import HtableConfig

log = logging.getLogger("sipguard.htable")

DGRAM_MAX = 1 << 20


class RpcError(SipguardError):
    pass


def _unlink(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        os.unlink(path)


class ReplyDir:
    """Where Kamailio's answers come back: a directory sipguard owns, writable by nobody else, whose
    group (`group`, e.g. kamailio; setgid so every reply path inherits it) lets Kamailio reach it.

    Reply paths get unpredictable names (96 random bits), are created exclusively (a FIFO's name
    cannot be pre-created by anyone, the directory being sipguard's alone), carry the group's mode
    bits only (0660 socket, 0620 FIFO) and are removed after each call. Prepared on first use: a
    missing directory is created 0750; a directory that is not sipguard's, a symlink, or writable
    by its group or others is refused.
    """

    def __init__(self, path: str | None, group: str = "") -> None:
        self.given = path
        self.group = group
        self.path = path or ""
        self._gid: int | None = None
        self._ready = False
        self._private: str | None = None

    def prepare(self) -> None:
        if self._ready:
            return
        if not self.given:  # no directory named: a private one, answerable only by our own user
            self._private = self.path = tempfile.mkdtemp(prefix="sipguard-rpc-")
            self._ready = True
            return
        path = self.path
        try:
            os.makedirs(path, mode=0o750, exist_ok=True)
            st = os.lstat(path)
        except OSError as exc:
            raise RpcError(f"[htable] reply_dir {path}: {exc}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise RpcError(f"[htable] reply_dir {path}: not a directory (or a symlink)")
        if st.st_uid != os.geteuid():
            raise RpcError(f"[htable] reply_dir {path}: owned by uid {st.st_uid}, not by sipguard (uid {os.geteuid()})")
        if st.st_mode & 0o022:
            raise RpcError(f"[htable] reply_dir {path}: mode {stat.S_IMODE(st.st_mode):04o}: writable by others")
        gid = None
        if self.group:
            try:
                gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                log.warning("[htable] reply_group %r: no such group; reply paths keep the group of %s",
                            self.group, path)
        if gid is not None and st.st_gid != gid:
            try:
                os.chown(path, -1, gid)
            except PermissionError:
                raise RpcError(f"[htable] reply_dir {path}: cannot give it group {self.group} (sipguard must be in "
                               f"that group, e.g. SupplementaryGroups={self.group} in its unit)") from None
        self._gid = gid if gid is not None else st.st_gid
        # group may enter, never write; new reply paths inherit the group. Only when it is not so already:
        # the packaged unit makes it 2750 itself (RuntimeDirectoryMode=) and its RestrictSUIDSGID=yes
        # refuses any chmod that sets the setgid bit (EPERM; found in the installed-host test)
        if stat.S_IMODE(os.lstat(path).st_mode) != 0o2750:
            try:
                os.chmod(path, 0o2750)
            except PermissionError:
                raise RpcError(f"[htable] reply_dir {path}: cannot make it mode 2750 (setgid); a unit with "
                               f"RestrictSUIDSGID=yes must create it so: RuntimeDirectoryMode=2750") from None
        self._ready = True

    def new_path(self, kind: str) -> str:
        self.prepare()
        # letters, digits and _ only (jsonrpcs refuses other reply names); short: AF_UNIX paths < 108 bytes
        return os.path.join(self.path, f"sg_{secrets.token_hex(12)}_{kind}")

    def hand_over(self, path: str, mode: int) -> None:
        """Give a fresh reply path the directory's group and `mode`."""
        if self._gid is not None and os.lstat(path).st_gid != self._gid:
            os.chown(path, -1, self._gid)
        os.chmod(path, mode)

    def close(self) -> None:
        if self._private:
            try:
                os.rmdir(self._private)
            except OSError:
                pass
            self._private = None
            self._ready = False


class JsonRpc:
    """A minimal Kamailio JSON-RPC client (one request at a time). Replies over the datagram socket
    and the FIFO come back into `reply_dir` (see ReplyDir); without one, into a private directory
    only a Kamailio running as sipguard's own user can reach."""

    def __init__(self, url: str, timeout: float = 2.0, reply_dir: str | None = None, reply_group: str = "") -> None:
        self.url = url
        self.timeout = timeout
        self.replies = ReplyDir(reply_dir, reply_group)
        self._ids = itertools.count(1)
        if url.startswith("unix:"):
            self.kind, self.path = "unix", url[5:]
        elif url.startswith("fifo:"):
            self.kind, self.path = "fifo", url[5:]
        elif url.startswith(("http://", "https://")):
            self.kind, self.path = "http", url
        else:
            raise SipguardError(f"[htable] rpc: {url!r}: expected unix:PATH, fifo:PATH or http://HOST:PORT/RPC")

    def call(self, method: str, *params: Any) -> Any:
        req = {"jsonrpc": "2.0", "method": method, "params": list(params), "id": next(self._ids)}
        try:
            raw = getattr(self, f"_{self.kind}")(req)
        except RpcError:
            raise
        except (OSError, ValueError) as exc:
            raise RpcError(f"kamailio rpc {self.url}: {method}: {exc}") from None
        try:
            reply = json.loads(raw)
        except (ValueError, RecursionError):
            raise RpcError(f"kamailio rpc {self.url}: {method}: not JSON: {raw[:200]!r}") from None
        if "error" in reply:
            err = reply["error"]
            raise RpcError(f"kamailio rpc {method}: {err.get('code')} {err.get('message')}")
        return reply.get("result")

    def _unix(self, req: dict) -> bytes:
        me = self.replies.new_path("sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.bind(me)
            self.replies.hand_over(me, 0o660)  # Kamailio (its group) may answer; nobody else
            s.settimeout(self.timeout)
            s.sendto(json.dumps(req).encode(), self.path)
            data, _ = s.recvfrom(DGRAM_MAX)
            return data
        finally:
            s.close()
            _unlink(me)

    def _fifo(self, req: dict) -> bytes:
        reply_path = self.replies.new_path("fifo")
        os.mkfifo(reply_path, 0o600)  # fails if the name exists: nobody can pre-create it
        try:
            self.replies.hand_over(reply_path, 0o620)  # we read, Kamailio (its group) writes
            body = json.dumps({**req, "reply_name": os.path.basename(reply_path)}).encode() + b"\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            try:
                os.write(fd, body)
            finally:
                os.close(fd)
            rfd = os.open(reply_path, os.O_RDONLY | os.O_NONBLOCK)
            chunks = []
            deadline = time.monotonic() + self.timeout
            got = False
            try:
                while time.monotonic() < deadline:
                    try:
                        b = os.read(rfd, 65536)
                    except BlockingIOError:
                        b = None
                    if b:
                        chunks.append(b)
                        got = True
                    elif b == b"" and got:
                        break  # writer closed
                    else:
                        time.sleep(0.01)
            finally:
                os.close(rfd)
            if not chunks:
                raise RpcError(f"kamailio rpc {self.url}: no reply in {self.timeout:.1f}s (Kamailio's jsonrpcs "
                               f"fifo_reply_dir must be {self.replies.path}/ and its user in group "
                               f"{self.replies.group or 'of that directory'})")
            return b"".join(chunks)
        finally:
            _unlink(reply_path)

    def _http(self, req: dict) -> bytes:
        r = urllib.request.Request(self.path, data=json.dumps(req).encode(),
                                   headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(r, timeout=self.timeout) as resp:  # noqa: S310 - operator's URL
            return resp.read(DGRAM_MAX)


def dump_keys(result: Any) -> dict[str, Any]:
    """Key -> value from an `htable.dump` result (a list of slots with `slot` item lists)."""
    out: dict[str, Any] = {}
    if isinstance(result, dict):
        result = [result]
    for slot in result or []:
        items = slot.get("slot", []) if isinstance(slot, dict) else []
        for it in items:
            if isinstance(it, dict) and "name" in it:
                out[str(it["name"])] = it.get("value")
    return out


class HtableEnforcer:
    """The Enforcer protocol over Kamailio's htable (see the module doc)."""

    name = "htable"

    def __init__(self, cfg: HtableConfig, rpc: JsonRpc | None = None) -> None:
        self.cfg = cfg
        self.rpc = rpc or JsonRpc(cfg.rpc, cfg.timeout, cfg.reply_dir, cfg.reply_group)
        self.table = cfg.table
        self.skipped_networks = 0

    def _set(self, ban: Ban, now: float) -> bool:
        if "/" in ban.ip:
            self.skipped_networks += 1
            return False
        if ban.expires is None:
            self.rpc.call("htable.seti", self.table, ban.ip, self.cfg.value)
            self.rpc.call("htable.setex", self.table, ban.ip, 0)
            return True
        left = ban.expires - now
        if left <= 0:
            return False
        self.rpc.call("htable.setxi", self.table, ban.ip, self.cfg.value, max(1, math.ceil(left)))
        return True

    def refuses(self, ip: str) -> str | None:
        return None  # a network is skipped (exact-key lookups), never refused: the kernel holds it

    def ban(self, ban: Ban, now: float) -> None:
        self._set(ban, now)

    def ban_many(self, bans: list[Ban], now: float) -> None:
        for ban in bans:
            self._set(ban, now)

    def unban(self, ip: str) -> None:
        if "/" in ip:
            return
        try:
            self.rpc.call("htable.delete", self.table, ip)
        except RpcError as exc:
            if "not found" not in str(exc).lower():
                raise

    def current(self) -> dict[str, Any]:
        return dump_keys(self.rpc.call("htable.dump", self.table))

    # -- user bans ([htable] user_table) --------------------------------------------------------
    holds_users = True

    def _set_user(self, ban: Ban, now: float) -> bool:
        if ban.user is None or "/" in ban.ip:
            return False
        key, table = user_key(ban.user, ban.ip), self.cfg.user_table
        if ban.expires is None:
            self.rpc.call("htable.seti", table, key, self.cfg.value)
            self.rpc.call("htable.setex", table, key, 0)
            return True
        left = ban.expires - now
        if left <= 0:
            return False
        self.rpc.call("htable.setxi", table, key, self.cfg.value, max(1, math.ceil(left)))
        return True

    def ban_users(self, bans: list[Ban], now: float) -> None:
        for ban in bans:
            self._set_user(ban, now)

    def unban_user(self, ip: str, user: str) -> None:
        try:
            self.rpc.call("htable.delete", self.cfg.user_table, user_key(user, ip))
        except RpcError as exc:
            if "not found" not in str(exc).lower():
                raise

    def sync_users(self, bans: list[Ban], now: float) -> None:
        table = self.cfg.user_table
        have = dump_keys(self.rpc.call("htable.dump", table))
        want = {user_key(b.user, b.ip): b for b in bans
                if b.user is not None and (b.expires is None or b.expires > now)}
        for key, value in have.items():
            if key not in want and value == self.cfg.value:
                try:
                    self.rpc.call("htable.delete", table, key)
                except RpcError as exc:
                    if "not found" not in str(exc).lower():
                        raise
        for ban in want.values():
            self._set_user(ban, now)

    def sync(self, bans: list[Ban], now: float) -> SyncReport:
        have = self.current()
        want = {b.ip: b for b in bans if "/" not in b.ip and (b.expires is None or b.expires > now)}
        removed = 0
        for key, value in have.items():
            if key not in want and value == self.cfg.value:
                self.unban(key)
                removed += 1
        added = 0
        for ban in want.values():
            if self._set(ban, now) and ban.ip not in have:
                added += 1
        return SyncReport(added=added, removed=removed, repaired=0)

    def entries(self) -> list[EnforcedEntry]:
        return [EnforcedEntry(k, None) for k in sorted(self.current())]

    def close(self) -> None:
        self.rpc.replies.close()
