"""The ban book: the only code that changes a ban.

Every change of a ban goes through a `BanBook` — an automatic decision, a CLI request, an expiry, a
fleet entry, a blocklist refresh, the reconcile at start — and changes the three places a ban lives,
always in this order:

1. **the kernel** (the enforcer stack: kernel sets, then the htable mirror and metrics): that is what
   stops the attack, so it comes first;
2. **the scorer's banned set** (`note_ban` / `release`), so the source's further events are not scored
   again while it is banned, and its old events do not re-ban it after an unban;
3. **the store**, in the caller's transaction: each change is queued and `write()` puts the queue into
   the open transaction (the daemon's batch transaction, with the batch's events and positions), a
   ban's evidence (the records that decided it, `Ban.evidence`) beside its row;
   `written()` drops what a committed transaction holds. A transaction that fails (disk full, a lock)
   leaves the queue as it was: the rows are written by the next transaction that commits, never lost.
   The daemon's book takes at most `write_slice` queued changes per transaction (whole calls, in
   order), so a burst (100,000 fleet bans) is stored in short transactions after it is in the kernel:
   while the fleet says a burst is under way (`hold`), only HOLD_SLICE per transaction, so the kernel
   gets all of it first; `behind` tells the daemon's loop to come round at once until the queue is
   stored.

A crash between 1 and 3 never loses a ban: at start `restore` adopts every entry found in sipguard's own
kernel sets without a store record, with its remaining kernel timeout, before making the kernel equal to
the store. An unban or expiry interrupted the same way leaves the ban in the store, which `restore`
puts back into the kernel: store and kernel always agree after a restart.

A backend may **refuse** an entry it cannot hold (an ipset cannot hold a `/0`): the ban is stored marked
refused (with the reason), `list`, `status` and metrics show it, and it never stops the daemon. A kernel
error is logged and counted; the ban stays in the store and the next resync retries it.

A step of the wall clock (`clock_stepped`, called by the daemon) is the one change that touches the
store alone, in a transaction of its own: it moves the ends of the bans made before the step by the
step, so each lasts its real time like its kernel entry, whose relative timeout the step did not move;
nothing is banned or lifted, so the scorer and the listeners hear nothing.

Listeners (the fleet's publisher) hear every change inside the same transaction, after the store rows.
The book never decides who is banned: the policy, the operator, the fleet and the blocklists do.

A **user ban** (`Ban.user`, the office policy: one user at one address) takes a path of its own: never
the kernel (the other users behind that address must keep working) but the mirrors that hold user bans
(`EnforcerStack.ban_users`: Kamailio's htable), the scorer's `note_user_ban` / `release_user` when it has
them, and the store's `user_bans` table; it expires and is resynced like the others. Listeners that have
`on_user_bans` / `on_user_unbans` hear them (the fleet stream carries them), in the same transaction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from .enforce.base import SYNC_TOLERANCE, Enforcer, SyncReport
from .enforce.stack import EnforcerStack
from .model import Ban, Decision

if TYPE_CHECKING:
    from .store import ControlRequest, Store

log = logging.getLogger("sipguard.bans")

ADOPTED_REASON = "adopted"
"""Reason of a ban found in sipguard's kernel sets without a store record (a crash between kernel and store)."""


class BannedSet(Protocol):
    """What the book needs of the scorer: the set of sources whose events are not scored."""

    @property
    def banned(self) -> set[str]: ...

    def note_ban(self, ip: str) -> None: ...

    def release(self, ip: str) -> None: ...


class BanListener(Protocol):
    """Hears every change the book makes, inside the transaction that stores it (the fleet publishes).
    A listener may also have `on_user_bans(bans, cause, now)` and `on_user_unbans([(ip, user)], cause, now)`
    to hear user bans (the fleet's bridge has them); one without them does not hear user bans."""

    def on_bans(self, bans: Sequence[Ban], cause: str, now: float) -> None: ...

    def on_unbans(self, ips: Sequence[str], at: float, cause: str, now: float) -> None: ...


# causes: who asked for a change (listeners publish what was not heard from the fleet itself)
POLICY = "policy"  # the local policy decided it
FLEET_SCORE = "fleet-score"  # the fleet's score script decided it (already in the shared set)
FLEET = "fleet"  # another node published it
MANUAL = "manual"  # the CLI (ban, unban, ban --from-file, unban --all)
BLOCKLIST = "blocklist"
EXPIRY = "expiry"
RESTORE = "restore"


WRITE_SLICE = 2000
"""Queued changes per transaction in the daemon (`write_slice`): each stays short (a few ms to 20 ms),
so a CLI command never waits long for the store."""
HOLD_SLICE = 25
"""Queued changes per transaction while a burst is being put into the kernel (`hold`): the store keeps
moving, the kernel goes first."""
HOLD_MAX = 200_000
"""A hold never lets the queue grow past this many changes (a stream that never lets up): beyond it
transactions take whole slices again."""


@dataclass(slots=True)
class BookStats:
    bans: int = 0
    unbans: int = 0
    expired: int = 0
    refused: int = 0
    adopted: int = 0
    kernel_errors: int = 0
    pending: int = 0  # store changes waiting for a transaction that commits


@dataclass(frozen=True, slots=True)
class _Put:
    ban: Ban


@dataclass(frozen=True, slots=True)
class _PutUser:
    ban: Ban  # a user ban (Ban.user set)


@dataclass(frozen=True, slots=True)
class _RemoveUser:
    ip: str
    user: str
    action: str  # userunban | userexpire


@dataclass(frozen=True, slots=True)
class _Remove:
    ip: str
    action: str  # unban | expire | delist
    cleared_at: float | None  # events of `ip` up to this time no longer count (unban); None: keep them
    queued: float = 0.0  # when it was decided (a CLI command stored after it wins over it)


class BanBook:
    """Bans, unbans and expiries in one order (see the module docstring). Single-threaded: the daemon's
    loop (or one CLI command) owns it."""

    def __init__(self, store: Store, enforcer: Enforcer | None, scorer: BannedSet | None = None,
                 listeners: Iterable[BanListener] = (), *, strict: bool = False,
                 write_slice: int | None = None) -> None:
        """`strict` (the CLI): a kernel error is raised and nothing is queued for the store, so a
        command either changes both or neither. The daemon is not strict: it never stops on one ban.
        `write_slice` (the daemon): at most this many queued changes per transaction (None: all, as one
        CLI command stores its whole change at once)."""
        self.strict = strict
        self.store = store
        self.enforcer = enforcer
        self.scorer = scorer
        self.listeners = tuple(listeners)
        self.stats = BookStats()
        # queued store changes, in order (None: one dropped by `_forget`, so the marks below stay true)
        self._pending: list[_Put | _Remove | _PutUser | _RemoveUser | None] = []
        # what the listeners hear, each with the count of changes ever queued when it was heard and how
        # many of them its call queued: a transaction that takes a slice takes its changes in order with
        # what the listeners hear of them (a call's items one to one with its changes can be cut)
        self._heard: list[tuple[str, Sequence, str, float, int, int]] = []
        self._queued = 0  # changes ever queued
        self._done = 0  # changes ever stored (dropped from the front of `_pending`)
        self._removes: dict[str, int] = {}  # address -> queued `_Remove`s of it
        self._slice = write_slice
        self._holding = False
        self._behind = False
        self._marks = (0, 0, 0)  # what the last `write` put into the open transaction
        self._overlay: dict[str, Ban | None] = {}  # the queued state of each address changed, not yet stored
        self._warned_users = False

    # -- changes -----------------------------------------------------------------------------
    def _queue(self, ops: Iterable[_Put | _Remove | _PutUser | _RemoveUser]) -> int:
        n = len(self._pending)
        self._pending.extend(ops)
        n = len(self._pending) - n
        self._queued += n
        return n

    def _hear(self, kind: str, items: Sequence, cause: str, t: float, ops: int = 0) -> None:
        """What the listeners hear of a call that queued the last `ops` changes."""
        self._heard.append((kind, items, cause, t, self._queued, ops))

    def ban(self, bans: Sequence[Ban], now: float, cause: str = POLICY, *, store: bool = True,
            batch: bool = False) -> list[Ban]:
        """Ban each of `bans`: kernel (one batch when several, or with `batch`), scorer, then queued for
        the store.

        `store=False` for a ban the store already holds (a CLI request the daemon mirrors): kernel and
        scorer only. Returns the bans as queued (a refused one carries its reason in `refused`).
        """
        if not bans:
            return []
        users = [b for b in bans if b.user is not None]
        if users:
            self._ban_users(users, now, store, cause)
            bans = [b for b in bans if b.user is None]
            if not bans:
                return users
        out = self._to_kernel(list(bans), now, batch)
        if users:
            out_all = [*users, *out]
        else:
            out_all = out
        if self.scorer is not None:
            for ban in out:
                self.scorer.note_ban(ban.ip)
        queued = 0
        if store:
            queued = self._queue(_Put(b) for b in out)
            for b in out:
                self._overlay[b.ip] = b
        self._hear("ban", out, cause, now, queued)
        self.stats.bans += len(out)
        for ban in out:
            if ban.refused:
                log.warning("%s refused %s (%s): kept in the store, shown as refused", self._name(), ban.ip,
                            ban.refused)
        return out_all

    # -- user bans (the office policy: one user at one address) -------------------------------
    def _ban_users(self, bans: list[Ban], now: float, store: bool, cause: str = POLICY) -> None:
        """User bans never reach the kernel (the office behind the address must keep working): Kamailio's
        htable mirror holds them (`EnforcerStack.ban_users`), the scorer stops scoring that user there,
        the store keeps them, and the listeners with `on_user_bans` hear them (the fleet stream)."""
        mirror = self._user_mirror()
        if mirror is not None:
            try:
                mirror.ban_users(bans, now)
            except Exception:  # noqa: BLE001 - kept in the store; the next resync retries
                self.stats.kernel_errors += 1
                if self.strict:
                    raise
                log.exception("htable mirror failed to hold %d user bans", len(bans))
        elif not self._warned_users:
            self._warned_users = True
            log.warning("user bans (the office policy) are enforced by Kamailio through the htable mirror: "
                        "[htable] enabled = false, so they are stored and listed only")
        note = getattr(self.scorer, "note_user_ban", None)
        for b in bans:
            if note is not None:
                note(b.ip, b.user)
            log.info("user ban: user %r at %s (%s)", b.user, b.ip, b.reason)
        queued = self._queue(_PutUser(b) for b in bans) if store else 0
        self._hear("userban", bans, cause, now, queued)
        self.stats.bans += len(bans)

    def unban_user(self, ip: str, user: str, now: float, *, action: str = "userunban", store: bool = True,
                   cause: str = MANUAL) -> None:
        """Lift the user ban of `user` at `ip`: Kamailio's entry, the scorer, then queued for the store
        (`store=False`: a CLI request the daemon mirrors, the store changed already)."""
        mirror = self._user_mirror()
        if mirror is not None:
            try:
                mirror.unban_user(ip, user)
            except Exception:  # noqa: BLE001 - the next resync removes it
                self.stats.kernel_errors += 1
                if self.strict:
                    raise
                log.exception("htable mirror failed to lift the user ban of %r at %s", user, ip)
        release = getattr(self.scorer, "release_user", None)
        if release is not None:
            release(ip, user)
        queued = self._queue([_RemoveUser(ip, user, action)]) if store else 0
        self._hear("userunban", [(ip, user)], EXPIRY if action == "userexpire" else cause, now, queued)
        if action == "userexpire":
            self.stats.expired += 1
        else:
            self.stats.unbans += 1

    def _user_mirror(self) -> EnforcerStack | None:
        e = self.enforcer
        return e if isinstance(e, EnforcerStack) and e.holds_users else None

    def unban(self, ips: Iterable[str], now: float, cause: str = MANUAL, *, at: float | None = None,
              action: str = "unban", store: bool = True, clear: bool = True) -> list[str]:
        """Lift the bans of `ips`: kernel, scorer, then queued for the store (with `clear`, the events
        before `at` (default now) stop counting, so an unbanned source is not re-banned on them)."""
        ips = list(dict.fromkeys(ips))
        if not ips:
            return []
        at = now if at is None else at
        if len(ips) > 1 and self.enforcer is not None:  # one kernel batch: what stays banned
            lifted = set(ips)
            self._kernel_sync([b for b in self.held(now) if b.ip not in lifted], now)
        elif self.enforcer is not None:
            self._kernel_unban(ips[0])
        queued = 0
        for ip in ips:
            if self.scorer is not None:
                self.scorer.release(ip)
            if store:
                queued += self._queue([_Remove(ip, action, at if clear else None, now)])
                self._removes[ip] = self._removes.get(ip, 0) + 1
                self._overlay[ip] = None
        self._hear("unban", ips, cause, at, queued)
        if action == "expire":
            self.stats.expired += len(ips)
        else:
            self.stats.unbans += len(ips)
        return ips

    def expire(self, now: float) -> list[Ban]:
        """End every ban whose time is over (kernel entries expire by themselves; this tidies up)."""
        users = self.store.expired_user_bans(now)
        gone = {(op.ip, op.user) for op in self._pending if isinstance(op, _RemoveUser)} if users else set()
        for b in users:
            if (b.ip, b.user) not in gone:
                self.unban_user(b.ip, b.user or "", now, action="userexpire")
                log.info("user ban of %r at %s expired", b.user, b.ip)
        expired = [b for b in self.store.expired_bans(now) if not self._removing(b.ip)]
        if expired:
            self.unban([b.ip for b in expired], now, EXPIRY, action="expire", clear=False)
            for b in expired:
                log.info("ban on %s expired", b.ip)
        return expired

    def apply_request(self, req: ControlRequest, now: float) -> None:
        """Mirror what a CLI command did (it changed the store and its own kernel view already). A change
        of the same address still queued here is older than the command's: it is dropped, so it never
        overwrites what the command stored."""
        if req.action == "ban" and req.target:
            ban = self.store.get_ban(req.target)
            target = req.target
            if ban is not None:
                self._forget(lambda ip: ban.created if ip == target else None)
                self.ban([ban], now, MANUAL, store=False)
        elif req.action == "unban" and req.target:
            target, at = req.target, req.time
            self._forget(lambda ip: at if ip == target else None)
            self.unban([req.target], now, MANUAL, at=req.time, store=False)
        elif req.action == "ban_user" and req.target and isinstance(req.payload.get("user"), str):
            got = [b for b in self.store.user_bans_of(req.target) if b.user == req.payload["user"]]
            if got and (got[0].expires is None or got[0].expires > now):
                self.ban(got, now, MANUAL, store=False)
        elif req.action == "unban_user" and req.target and isinstance(req.payload.get("user"), str):
            self.unban_user(req.target, req.payload["user"], now, store=False)
        elif req.action in ("unban_all", "sync"):
            active = self.store.active_bans(now)
            keep = {b.ip for b in active}
            if req.action == "unban_all":
                at = req.time
                self._forget(lambda ip: at)
            else:  # (an import: the rows it stored win over what was queued before them)
                made = {b.ip: b.created for b in active}
                self._forget(made.get)
            gone = [ip for ip in self._banned_in_scorer() if ip not in keep]
            if req.action == "unban_all":
                self._hear("unban_all", [], MANUAL, req.time)
            for ip in gone:
                if self.scorer is not None:
                    self.scorer.release(ip)
            for ban in active:
                if self.scorer is not None:
                    self.scorer.note_ban(ban.ip)
            if req.action == "sync":
                self._hear("ban", active, MANUAL, now)
            self.resync(now)

    def clock_stepped(self, step: float, now: float, *, made_after: tuple[float, float] | None = None,
                      keep: Collection[str] = (), kernel: bool = False,
                      also: Callable[[], None] | None = None) -> list[Ban]:
        """The wall clock jumped `step` seconds (forward when positive) and `now` is in the new clock:
        every ban made before the jump (not `created` within the span `made_after`, new clock; None:
        every one) ends `step` later, so it lasts its real time, as its kernel entry (a relative
        timeout, which the step did not move) does; one over by the old clock and not tidied yet
        stays over. Store rows and queued bans alike.

        `keep`: addresses whose bans keep their absolute end (the fleet's bans from other nodes after a
        step back: never ended sooner than the fleet's clock says). `kernel` (at start, after a step
        while the daemon was down): a ban the kernel holds ends when its entry ends, the moved or the
        unmoved end, whichever the entry's remaining timeout agrees with (within the sync tolerance);
        when it agrees with neither (a ban longer than the kernel's cap), the moved end.

        One transaction of its own (`also` runs inside it: the caller's clock reference); nothing goes
        to the kernel (a resync re-arms what differs) nor to the listeners (nothing was banned or
        lifted). Returns the moved bans.
        """
        left: dict[str, float] = {}
        if kernel and self.enforcer is not None:
            try:
                left = {e.ip: e.timeout for e in self.enforcer.entries() if e.timeout}
            except Exception:  # noqa: BLE001 - nothing installed yet, no permission: the step decides
                log.debug("no kernel timeouts to go by", exc_info=True)
        delta: dict[str, float] = {}
        ends: dict[str, float] = {}
        moved: list[Ban] = []
        for ban in self.held(-math.inf):
            if ban.expires is None or ban.ip in keep or (
                    made_after is not None and made_after[0] <= ban.created <= made_after[1]):
                continue
            end = ban.expires + step
            t = left.get(ban.ip)
            if t is not None:  # where the kernel's entry ends
                k = now + t
                best = end if abs(k - end) <= abs(k - ban.expires) else ban.expires
                if abs(k - best) <= SYNC_TOLERANCE:
                    end = best
            if end != ban.expires:
                delta[ban.ip] = end - ban.expires
                ends[ban.ip] = end
                moved.append(replace(ban, expires=end))
        with self.store.transaction():
            self.store.set_ban_expiries(ends)
            if also is not None:
                also()
        for i, op in enumerate(self._pending):
            if type(op) is _Put and op.ban.ip in delta and op.ban.expires is not None:
                self._pending[i] = _Put(replace(op.ban, expires=op.ban.expires + delta[op.ban.ip]))
        for ip, d in delta.items():
            queued = self._overlay.get(ip)
            if queued is not None and queued.expires is not None:
                self._overlay[ip] = replace(queued, expires=queued.expires + d)
        return moved

    # -- store -------------------------------------------------------------------------------
    def write(self, now: float) -> int:
        """Put the queued changes into the caller's open transaction (all of them, or with `write_slice`
        whole calls up to the slice, in order); returns how many (for `written`)."""
        store = self.store
        n, h, part = self._take()
        run: list[Ban] = []  # consecutive puts go to the store as one statement pair
        evidence: list[Ban] = []
        for op in self._pending[:n]:
            if op is None:
                continue
            if isinstance(op, _Put):
                run.append(op.ban)
                if op.ban.evidence:
                    evidence.append(op.ban)
                continue
            if isinstance(op, _PutUser):
                store.put_user_bans([op.ban], now)
                continue
            if isinstance(op, _RemoveUser):
                store.remove_user_ban(op.ip, op.user, now, action=op.action)
                continue
            if run:
                store.put_bans(run, now)
                run = []
            store.remove_ban(op.ip, now, action=op.action)
            if op.cleared_at is not None:
                store.mark_cleared(op.ip, op.cleared_at)
        if run:
            store.put_bans(run, now)
        if evidence:
            store.add_evidence(evidence)
        heard = self._heard[:h]
        if part:  # (the first `part` items of a call cut by the slice: those whose changes it takes)
            kind, items, cause, t, _mark, _ops = self._heard[h]
            heard.append((kind, items[:part], cause, t, 0, 0))
        for kind, items, cause, t, _mark, _ops in heard:
            for li in self.listeners:
                if kind == "ban":
                    li.on_bans(items, cause, now)  # type: ignore[arg-type]
                elif kind == "unban":
                    li.on_unbans(items, t, cause, now)  # type: ignore[arg-type]
                elif kind in ("userban", "userunban"):  # (listeners without them do not hear user bans)
                    hear = getattr(li, "on_user_bans" if kind == "userban" else "on_user_unbans", None)
                    if hear is not None:
                        hear(items, cause, now)
                else:
                    li.on_unbans(["*"], t, cause, now)
        self._marks = (n, h, part)
        return n

    def _take(self) -> tuple[int, int, int]:
        """(queued changes, whole heard calls, items of the next call) the next transaction takes: all,
        or the changes up to the slice in order with what the listeners hear of them. A call whose
        items are its changes one to one (a ban batch, an unban) is cut at the slice; another one goes
        whole, or waits when the slice has something already."""
        total = len(self._pending)
        limit = None if self._slice is None else (
            HOLD_SLICE if self._holding and total < HOLD_MAX else self._slice)
        if limit is None or total <= limit:
            return total, len(self._heard), 0
        n = h = 0
        done = self._done
        for _kind, items, _cause, _t, mark, ops in self._heard:
            end = mark - done
            if end <= limit:
                h += 1
                n = end
                continue
            start = end - ops
            if ops == len(items) and ops > 0 and start < limit:
                return limit, h, limit - start
            if n == 0 and start <= 0:  # (one call bigger than the slice, not to be cut: whole)
                return end, h + 1, 0
            return max(n, min(start, limit)), h, 0
        return max(n, min(total, limit)), h, 0

    def written(self) -> None:
        """The transaction `write` filled has committed: forget what it held."""
        n, heard, part = self._marks
        for op in self._pending[:n]:
            if type(op) is _Remove:
                self._unqueued_remove(op.ip)
        del self._pending[:n]
        if part:
            kind, items, cause, t, mark, ops = self._heard[heard]
            self._heard[heard] = (kind, items[part:], cause, t, mark, ops - part)
        del self._heard[:heard]
        self._done += n
        self._marks = (0, 0, 0)
        if not self._pending:
            self._overlay.clear()
        self._behind = bool(self._pending or self._heard)
        self.stats.pending = len(self._pending)

    def failed(self) -> None:
        """The transaction `write` filled rolled back: keep everything queued for the next one."""
        self._marks = (0, 0, 0)
        self._behind = False  # (the caller's retry decides when; the daemon loop does not spin on it)
        self.stats.pending = len(self._pending)

    def commit(self, now: float) -> None:
        """One transaction of its own for what is queued (the CLI, start-up, housekeeping)."""
        if not self._pending and not self._heard:
            return
        try:
            with self.store.transaction():
                self.write(now)
        except BaseException:
            self.failed()
            raise
        self.written()

    def hold(self, on: bool) -> None:
        """A burst is being put into the kernel (the fleet's bridge says so while its backlog lasts):
        each transaction takes at most HOLD_SLICE queued changes until `hold(False)`."""
        self._holding = on

    @property
    def behind(self) -> bool:
        """A transaction committed and left queued changes (a slice): the loop should come round now."""
        return self._behind

    def _forget(self, when: Callable[[str], float | None]) -> None:
        """Drop the queued address changes a CLI command made stale: `when(ip)` is the time of the
        command's stored change of `ip` (None: it did not change `ip`); a queued ban created before it
        (one created at the same instant is that very ban, e.g. re-marked refused), or a queued unban
        decided then or before, would overwrite it and goes (only the queued ones: what the listeners
        hear stays); what the book knows of those addresses is the store's again, or what is still
        queued. O(queue): CLI commands only."""
        touched: set[str] = set()
        for i, op in enumerate(self._pending):
            t = type(op)
            if t is _Put:
                ip = op.ban.ip
                limit = when(ip)
                if limit is None or op.ban.created >= limit:
                    continue
            elif t is _Remove:
                ip = op.ip
                limit = when(ip)
                if limit is None or op.queued > limit:
                    continue
            else:
                continue
            self._pending[i] = None
            touched.add(ip)
            if t is _Remove:
                self._unqueued_remove(ip)
        touched.update(ip for ip in self._overlay if when(ip) is not None)  # (stored already: the store has it now)
        if not touched:
            return
        for ip in touched:
            self._overlay.pop(ip, None)
        for op in self._pending:  # the overlay: what is still queued for them, else the store
            if type(op) is _Put and op.ban.ip in touched:
                self._overlay[op.ban.ip] = op.ban
            elif type(op) is _Remove and op.ip in touched:
                self._overlay[op.ip] = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def current(self, ip: str) -> Ban | None:
        """The ban on `ip` as the book knows it (queued changes included), or None."""
        if ip in self._overlay:
            return self._overlay[ip]
        return self.store.get_ban(ip)

    def current_many(self, ips: Iterable[str]) -> dict[str, Ban | None]:
        """`current` of many addresses at once (a fleet batch): queued changes, then the store in a
        few queries for any count."""
        ips = list(dict.fromkeys(ips))
        out: dict[str, Ban | None] = {}
        ask = []
        for ip in ips:
            if ip in self._overlay:
                out[ip] = self._overlay[ip]
            else:
                ask.append(ip)
        stored = self.store.bans_of(ask)
        for ip in ask:
            out[ip] = stored.get(ip)
        return out

    def held(self, now: float) -> list[Ban]:
        """The bans in force as the book knows them: the store's, with queued changes applied."""
        bans = {b.ip: b for b in self.store.active_bans(now)}
        for op in self._pending:
            if isinstance(op, _Put):
                if op.ban.expires is None or op.ban.expires > now:
                    bans[op.ban.ip] = op.ban
            elif isinstance(op, _Remove):
                bans.pop(op.ip, None)
        return sorted(bans.values(), key=lambda b: (b.created, b.ip))

    # -- kernel ------------------------------------------------------------------------------
    def restore(self, now: float) -> SyncReport:
        """At start: adopt kernel entries the store lacks (a crash between kernel and store), then make
        the kernel hold exactly the bans in force and tell the scorer which sources are banned."""
        adopted: list[Ban] = []  # (kernel entries found here are adopted: cause RESTORE)
        held = self.held(now)
        if self.enforcer is not None:
            try:
                in_kernel = self.enforcer.entries()
            except Exception:  # noqa: BLE001 - nothing installed yet, no permission: nothing to adopt
                log.debug("no kernel entries to adopt", exc_info=True)
                in_kernel = []
            known = {b.ip for b in held}
            for e in in_kernel:
                if e.ip in known:
                    continue
                expires = None if e.timeout is None else now + e.timeout
                adopted.append(Ban(ip=e.ip, reason=ADOPTED_REASON, created=now, expires=expires))
        if adopted:
            queued = self._queue(_Put(b) for b in adopted)
            for b in adopted:
                self._overlay[b.ip] = b
            self._hear("ban", adopted, RESTORE, now, queued)
            self.stats.adopted += len(adopted)
            log.warning("adopted %d kernel entries the store did not hold (a stop between kernel and store)",
                        len(adopted))
        active = held + adopted
        # a ban stored by another enforcer (nftables, dry-run, the fleet) may be refused by this one (an
        # ipset and a /0), or no longer: its store row says so from now on (`list`, `status`)
        remarked = [b.with_refusal(why) for b in active if (why := self._refusal(b.ip)) != b.refused]
        if remarked:
            self._queue(_Put(b) for b in remarked)
            for b in remarked:
                self._overlay[b.ip] = b
            refused = [b for b in remarked if b.refused]
            if refused:
                self.stats.refused += len(refused)
                log.warning("%s refuses %d stored %s (%s): kept in the store, shown as refused", self._name(),
                            len(refused), "ban" if len(refused) == 1 else "bans",
                            ", ".join(f"{b.ip}: {b.refused}" for b in refused[:5]))
        if self.scorer is not None:
            for ban in active:
                self.scorer.note_ban(ban.ip)
            note = getattr(self.scorer, "note_user_ban", None)
            if note is not None:
                for ban in self.held_users(now):
                    note(ban.ip, ban.user)
        report = self.resync(now, active)
        self.commit(now)
        return report

    def resync(self, now: float, active: list[Ban] | None = None) -> SyncReport:
        """Make the kernel hold exactly the bans in force (repairs flushes, re-arms long bans)."""
        if self.enforcer is None:
            return SyncReport()
        report = self._kernel_sync(self.held(now) if active is None else active, now)
        mirror = self._user_mirror()
        if mirror is not None:
            try:
                mirror.sync_users(self.held_users(now), now)
            except Exception:  # noqa: BLE001 - retried at the next resync
                self.stats.kernel_errors += 1
                log.exception("htable mirror: user ban resync failed")
        return report

    def held_users(self, now: float) -> list[Ban]:
        """The user bans in force as the book knows them: the store's, with queued changes applied."""
        bans = {(b.ip, b.user): b for b in self.store.active_user_bans(now)}
        for op in self._pending:
            if isinstance(op, _PutUser):
                if op.ban.expires is None or op.ban.expires > now:
                    bans[(op.ban.ip, op.ban.user)] = op.ban
            elif isinstance(op, _RemoveUser):
                bans.pop((op.ip, op.user), None)
        return sorted(bans.values(), key=lambda b: (b.created, b.ip, b.user or ""))

    def _to_kernel(self, bans: list[Ban], now: float, batch: bool) -> list[Ban]:
        out: list[Ban] = []
        ok: list[Ban] = []
        for ban in bans:
            why = self._refusal(ban.ip)
            if why is not None:
                ban = ban.with_refusal(why)
                self.stats.refused += 1
            elif ban.refused:
                ban = ban.with_refusal(None)
            if ban.refused is None:
                ok.append(ban)
            out.append(ban)
        if ok and self.enforcer is not None:
            try:
                if len(ok) == 1 and not batch:
                    self.enforcer.ban(ok[0], now)
                else:
                    self.enforcer.ban_many(ok, now)
            except Exception:  # noqa: BLE001 - kept in the store; the next resync retries
                self.stats.kernel_errors += 1
                if self.strict:
                    raise
                log.exception("%s failed to ban %s", self._name(),
                              ok[0].ip if len(ok) == 1 else f"{len(ok)} addresses")
        return out

    def _kernel_unban(self, ip: str) -> None:
        assert self.enforcer is not None
        try:
            self.enforcer.unban(ip)
        except Exception:  # noqa: BLE001 - the next resync removes it
            self.stats.kernel_errors += 1
            if self.strict:
                raise
            log.exception("%s failed to unban %s", self._name(), ip)

    def _kernel_sync(self, bans: list[Ban], now: float) -> SyncReport:
        assert self.enforcer is not None
        try:
            return self.enforcer.sync([b for b in bans if self._refusal(b.ip) is None], now)
        except Exception:  # noqa: BLE001 - retried at the next resync
            self.stats.kernel_errors += 1
            if self.strict:
                raise
            log.exception("%s: resync failed", self._name())
            return SyncReport()

    def _refusal(self, ip: str) -> str | None:
        """Why the enforcer cannot hold `ip` (a few string and dict lookups: asked each time, so what the
        kernel refused since counts at once)."""
        return None if self.enforcer is None else self.enforcer.refuses(ip)

    def _removing(self, ip: str) -> bool:
        return ip in self._removes

    def _unqueued_remove(self, ip: str) -> None:
        """One queued `_Remove` of `ip` is no longer queued (stored, or dropped by `_forget`)."""
        left = self._removes.get(ip, 0) - 1
        if left > 0:
            self._removes[ip] = left
        else:
            self._removes.pop(ip, None)

    def _banned_in_scorer(self) -> list[str]:
        return [] if self.scorer is None else list(self.scorer.banned)

    def _name(self) -> str:
        return "enforcer" if self.enforcer is None else f"enforcer {self.enforcer.name}"


def ban_from_decision(d: Decision, now: float) -> Ban:
    """The ban a policy decision asks for, starting `now`."""
    return Ban(ip=d.ip, reason=d.reason, created=now, expires=None if d.duration is None else now + d.duration,
               score=d.score, offence=d.offence, manual=False, evidence=d.evidence, user=d.user)
