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

Only single addresses go into the table: `$sht(ipban=>$si)` is an exact-key lookup, so network
bans (CIDRs) are left to the kernel enforcer and counted as skipped.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import socket
import stat
import tempfile
import time
import urllib.request
from typing import TYPE_CHECKING, Any

from ..enforce.base import EnforcedEntry, SyncReport
from ..errors import SipguardError
from ..model import Ban

if TYPE_CHECKING:
    from ..config import HtableConfig
    from ..enforce.base import Enforcer

log = logging.getLogger("sipguard.htable")

DGRAM_MAX = 1 << 20


class RpcError(SipguardError):
    pass


class JsonRpc:
    """A minimal Kamailio JSON-RPC client (one request at a time)."""

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        self.url = url
        self.timeout = timeout
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
        except ValueError:
            raise RpcError(f"kamailio rpc {self.url}: {method}: not JSON: {raw[:200]!r}") from None
        if "error" in reply:
            err = reply["error"]
            raise RpcError(f"kamailio rpc {method}: {err.get('code')} {err.get('message')}")
        return reply.get("result")

    def _unix(self, req: dict) -> bytes:
        tmp = tempfile.mkdtemp(prefix="sipguard-rpc-")
        me = os.path.join(tmp, "c.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.bind(me)
            os.chmod(me, 0o666)  # kamailio may run as another user: it must be able to answer
            s.settimeout(self.timeout)
            s.sendto(json.dumps(req).encode(), self.path)
            data, _ = s.recvfrom(DGRAM_MAX)
            return data
        finally:
            s.close()
            try:
                os.unlink(me)
            finally:
                os.rmdir(tmp)

    def _fifo(self, req: dict) -> bytes:
        reply_name = f"sipguard_reply_{os.getpid()}_{req['id']}"
        reply_path = os.path.join("/tmp", reply_name)  # jsonrpcs' fifo_reply_dir default
        os.mkfifo(reply_path, 0o666)
        os.chmod(reply_path, 0o666)
        try:
            body = json.dumps({**req, "reply_name": reply_name}).encode() + b"\n"
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
                raise RpcError(f"kamailio rpc {self.url}: no reply in {self.timeout:.1f}s")
            return b"".join(chunks)
        finally:
            if stat.S_ISFIFO(os.lstat(reply_path).st_mode):
                os.unlink(reply_path)

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
        self.rpc = rpc or JsonRpc(cfg.rpc, cfg.timeout)
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
        pass
