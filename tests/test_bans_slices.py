"""The daemon's ban book stores a big change in slices (sipguard/bans.py: `write_slice`, `hold`): each
transaction takes at most a slice of the queued changes, in order, with exactly what the listeners hear
of them; while a burst is being put into the kernel (`hold`) only HOLD_SLICE per transaction; a CLI
command mirrored meanwhile wins over the older changes still queued; the daemon's loop comes round
until the queue is stored, and a stop stores the rest.

Dry-run enforcer, a store on disk in tmp_path, a listener that records what it hears.
"""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

from sipguard import actions
from sipguard.addresses import AllowList
from sipguard.bans import FLEET, HOLD_SLICE, MANUAL, BanBook
from sipguard.enforce.dryrun import DryRunEnforcer
from sipguard.model import Ban
from sipguard.store import Store

NOW = time.time()


class Ears:
    """A listener: every ban and unban it hears, in order."""

    def __init__(self) -> None:
        self.bans: list[str] = []
        self.unbans: list[str] = []

    def on_bans(self, bans, cause, now):  # noqa: ANN001
        self.bans += [b.ip for b in bans]

    def on_unbans(self, ips, at, cause, now):  # noqa: ANN001
        self.unbans += list(ips)


def addrs(n: int, first: str = "198.18.4.0") -> list[str]:
    base = int(ipaddress.ip_address(first))
    return [str(ipaddress.ip_address(base + i)) for i in range(n)]


def fleet_bans(ips: list[str], created: float = NOW) -> list[Ban]:
    return [Ban(ip=ip, reason="fleet", created=created, expires=created + 3600, manual=True) for ip in ips]


def book_on(tmp_path: Path, slice_: int | None = 2000) -> tuple[BanBook, Store, DryRunEnforcer, Ears]:
    store = Store.open_state_dir(tmp_path / "state")
    enf = DryRunEnforcer()
    ears = Ears()
    return BanBook(store, enf, None, [ears], write_slice=slice_), store, enf, ears


def stored(store: Store) -> set[str]:
    return {b.ip for b in store.active_bans(NOW)}


def test_a_big_change_is_stored_in_slices_with_what_the_listeners_hear(tmp_path: Path) -> None:
    book, store, enf, ears = book_on(tmp_path)
    ips = addrs(5000)
    book.ban(fleet_bans(ips), NOW, FLEET, batch=True)
    assert len(enf.entries()) == 5000  # the kernel first, all of it
    sizes = []
    while book.pending:
        book.commit(NOW)
        sizes.append(len(stored(store)))
        assert ears.bans == ips[:len(sizes and ears.bans)]  # heard in order, each once
        assert len(ears.bans) == sizes[-1]  # heard exactly what its transaction stored
    assert sizes == [2000, 4000, 5000]
    assert stored(store) == set(ips) and ears.bans == ips
    assert not book.behind


def test_the_loop_is_told_to_come_round_while_a_slice_is_left(tmp_path: Path) -> None:
    book, store, _enf, _ears = book_on(tmp_path)
    book.ban(fleet_bans(addrs(2500)), NOW, FLEET, batch=True)
    assert not book.behind  # (nothing committed yet: the daemon's next batch stores the first slice)
    book.commit(NOW)
    assert book.behind and book.pending == 500
    book.commit(NOW)
    assert not book.behind and book.pending == 0


def test_a_cli_book_stores_everything_at_once(tmp_path: Path) -> None:
    book, store, _enf, ears = book_on(tmp_path, slice_=None)
    book.ban(fleet_bans(addrs(5000)), NOW, FLEET, batch=True)
    book.commit(NOW)
    assert len(stored(store)) == 5000 and len(ears.bans) == 5000 and book.pending == 0


def test_while_a_burst_goes_to_the_kernel_the_store_takes_a_small_slice(tmp_path: Path) -> None:
    book, store, enf, ears = book_on(tmp_path)
    book.hold(True)
    for k in range(5):  # five chunks of a burst, each a kernel batch
        book.ban(fleet_bans(addrs(2000, f"198.18.{10 + 8 * k}.0")), NOW, FLEET, batch=True)
        book.commit(NOW)
    assert len(enf.entries()) == 10_000
    assert len(stored(store)) == 5 * HOLD_SLICE and len(ears.bans) == 5 * HOLD_SLICE
    book.hold(False)
    while book.pending:
        book.commit(NOW)
    assert len(stored(store)) == 10_000 and len(ears.bans) == 10_000 and len(set(ears.bans)) == 10_000


def test_a_hold_never_lets_the_queue_grow_past_its_bound(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import sipguard.bans as bans

    monkeypatch.setattr(bans, "HOLD_MAX", 3000)
    book, store, _enf, _ears = book_on(tmp_path)
    book.hold(True)
    book.ban(fleet_bans(addrs(4000)), NOW, FLEET, batch=True)
    book.commit(NOW)  # over the bound: a whole slice although the hold is on
    assert len(stored(store)) == 2000
    book.commit(NOW)  # under it again: the hold's small slice
    assert len(stored(store)) == 2000 + HOLD_SLICE


def test_order_is_kept_across_slices(tmp_path: Path) -> None:
    book, store, _enf, ears = book_on(tmp_path)
    ips = addrs(3000)
    book.ban(fleet_bans(ips), NOW, FLEET, batch=True)
    book.unban([ips[2500]], NOW + 1, FLEET)  # queued behind the ban of the same address
    book.ban(fleet_bans([ips[2999]], NOW + 2), NOW + 2, FLEET)  # and a newer ban behind that
    while book.pending:
        book.commit(NOW + 3)
    held = {b.ip: b for b in store.active_bans(NOW + 3)}
    assert ips[2500] not in held and len(held) == 2999
    assert held[ips[2999]].created == NOW + 2
    assert ears.unbans == [ips[2500]] and ears.bans == ips + [ips[2999]]


def test_a_failed_transaction_keeps_the_slice_queued(tmp_path: Path) -> None:
    book, store, _enf, ears = book_on(tmp_path)
    book.ban(fleet_bans(addrs(3000)), NOW, FLEET, batch=True)

    class Refused(Exception):
        pass

    try:
        with store.transaction():
            book.write(NOW)
            raise Refused
    except Refused:
        book.failed()
    assert book.pending == 3000 and not stored(store) and not book.behind
    ears.bans.clear()  # (it heard the rolled-back slice: the fleet's listener writes only inside it)
    while book.pending:
        book.commit(NOW)
    assert len(stored(store)) == 3000 and len(ears.bans) == 3000


def test_a_cli_unban_mirrored_meanwhile_wins_over_the_queued_ban(tmp_path: Path) -> None:
    book, store, enf, _ears = book_on(tmp_path)
    ips = addrs(3000)
    book.hold(True)
    book.ban(fleet_bans(ips), NOW, FLEET, batch=True)
    book.commit(NOW)  # (a small slice: the rest still queued)
    victim, early = ips[2900], ips[5]
    # the operator unbans two of them by hand: one still queued, one stored already
    assert store.get_ban(victim) is None and store.get_ban(early) is not None
    for ip in (victim, early):
        actions.manual_unban(store, ip, DryRunEnforcer(), now=NOW + 1)
    for req in store.requests_after(0):
        book.apply_request(req, NOW + 1)
    assert book.current(victim) is None and book.current(early) is None
    book.hold(False)
    while book.pending:
        book.commit(NOW + 2)
    held = stored(store)
    assert victim not in held and early not in held and len(held) == 2998
    assert not enf.contains(victim) and not enf.contains(early)


def test_a_cli_ban_mirrored_meanwhile_is_not_overwritten_by_an_older_queued_one(tmp_path: Path) -> None:
    book, store, _enf, _ears = book_on(tmp_path)
    ips = addrs(3000)
    book.hold(True)
    book.ban(fleet_bans(ips, created=NOW - 10), NOW, FLEET, batch=True)
    actions.manual_ban(store, ips[2999], None, "by hand", AllowList([]), DryRunEnforcer(), now=NOW)
    for req in store.requests_after(0):
        book.apply_request(req, NOW)
    book.hold(False)
    while book.pending:
        book.commit(NOW)
    ban = store.get_ban(ips[2999])
    assert ban is not None and ban.reason == "by hand" and ban.expires is None
    assert len(stored(store)) == 3000


def test_an_unban_all_mirrored_meanwhile_lifts_the_queued_bans_too(tmp_path: Path) -> None:
    book, store, _enf, _ears = book_on(tmp_path)
    book.hold(True)
    book.ban(fleet_bans(addrs(3000)), NOW, FLEET, batch=True)
    book.commit(NOW)
    actions.unban_all(store, DryRunEnforcer(), now=NOW + 1)
    for req in store.requests_after(0):
        book.apply_request(req, NOW + 1)
    book.hold(False)
    while book.pending:
        book.commit(NOW + 2)
    assert stored(store) == set()


def test_the_daemon_stores_a_queued_burst_by_itself_and_at_stop(tmp_path: Path) -> None:
    import threading

    from sipguard.config import Config
    from sipguard.wiring import build_daemon

    def daemon_with(n: int, name: str):  # noqa: ANN202
        log = tmp_path / f"{name}.log"
        log.touch()
        cfg = Config.model_validate({"enforce": {"backend": "dryrun"}, "daemon": {"control_interval": 1.0}})
        store = Store.open_state_dir(tmp_path / name)
        daemon = build_daemon(cfg, store, DryRunEnforcer(), logs=[str(log)])
        daemon.parts.book.ban(fleet_bans(addrs(n)), time.time(), MANUAL, batch=True)  # (as a burst leaves it)
        return daemon, store

    # by itself: the loop comes round at once while a slice is left (not once per control_interval)
    daemon, store = daemon_with(9000, "a")
    book = daemon.parts.book
    took: list[float] = []

    def watch() -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20 and (book.pending or len(stored(store)) < 9000):
            time.sleep(0.01)
        took.append(time.monotonic() - t0)
        daemon.stop()

    w = threading.Thread(target=watch)
    w.start()
    daemon.run(max_seconds=30)
    w.join()
    assert len(stored(store)) == 9000 and took[0] < 3.0  # (5 slices at one per 1 s tick would be 4 s or more)
    # at stop: what is still queued is stored before the daemon ends
    daemon, store = daemon_with(7000, "b")
    daemon.run(max_seconds=0.01)
    assert daemon.parts.book.pending == 0 and len(stored(store)) == 7000


def test_any_mix_of_changes_ends_the_same_whatever_the_slice(tmp_path: Path) -> None:
    """Random runs of bans, unbans (one and many), user bans and commits: a sliced book (any slice, a
    hold switched on and off) ends with the store and what the listeners heard exactly as a book that
    stores everything at once."""
    import random

    from sipguard.bans import POLICY

    class AllEars(Ears):
        def __init__(self) -> None:
            super().__init__()
            self.seq: list[tuple[str, str]] = []

        def on_bans(self, bans, cause, now):  # noqa: ANN001
            self.seq += [("ban", b.ip) for b in bans]

        def on_unbans(self, ips, at, cause, now):  # noqa: ANN001
            self.seq += [("unban", ip) for ip in ips]

        def on_user_bans(self, bans, cause, now):  # noqa: ANN001
            self.seq += [("userban", f"{b.user}@{b.ip}") for b in bans]

        def on_user_unbans(self, pairs, cause, now):  # noqa: ANN001
            self.seq += [("userunban", f"{u}@{ip}") for ip, u in pairs]

    for seed in range(12):
        rng = random.Random(seed)
        pool = addrs(60, "198.18.90.0")
        books = []
        for name, slice_ in (("whole", None), ("sliced", rng.choice([1, 3, 7, 25]))):
            store = Store.open_state_dir(tmp_path / f"{name}-{seed}")
            ears = AllEars()
            books.append((BanBook(store, DryRunEnforcer(), None, [ears], write_slice=slice_), store, ears))
        steps = []
        t = NOW
        for _ in range(120):
            t += 1.0
            r = rng.random()
            if r < 0.35:
                ips = rng.sample(pool, rng.randint(1, 12))
                steps.append(("ban", ips, t))
            elif r < 0.55:
                steps.append(("unban", rng.sample(pool, rng.randint(1, 3)), t))
            elif r < 0.65:
                steps.append(("user", [rng.choice(pool)], t))
            elif r < 0.75:
                steps.append(("hold", [], rng.random() < 0.5))
            else:
                steps.append(("commit", [], t))
        for book, store, _ears in books:
            for kind, ips, t in steps:
                if kind == "ban":
                    book.ban(fleet_bans(ips, created=t), t, POLICY if len(ips) == 1 else FLEET, batch=True)
                elif kind == "unban":
                    book.unban(ips, t, MANUAL)
                elif kind == "user":
                    book.ban([Ban(ip=ips[0], reason="office", created=t, expires=t + 600, user="alice")], t)
                elif kind == "hold":
                    book.hold(bool(t))
                else:
                    book.commit(t)
            book.hold(False)
            while book.pending:
                book.commit(t)
        (_w, whole, whole_ears), (_s, sliced, sliced_ears) = books
        assert {b.ip: b for b in sliced.active_bans(NOW)} == {b.ip: b for b in whole.active_bans(NOW)}, seed
        assert [(b.ip, b.user) for b in sliced.active_user_bans(NOW)] == \
            [(b.ip, b.user) for b in whole.active_user_bans(NOW)], seed
        assert sliced_ears.seq == whole_ears.seq, seed


def test_changes_no_listener_hears_are_stored_in_slices_too(tmp_path: Path) -> None:
    """The restore's re-marked rows (an enforcer that refuses what the store holds) are queued with
    nothing for the listeners: they are cut anywhere, and all stored."""

    class Refuses(DryRunEnforcer):
        def refuses(self, ip: str) -> str | None:
            return "not here"

    store = Store.open_state_dir(tmp_path / "state")
    store.put_bans(fleet_bans(addrs(4500)), NOW)
    book = BanBook(store, Refuses(), None, [Ears()], write_slice=2000)
    book.restore(NOW)  # (it stores the first slice itself)
    assert book.pending == 2500
    rounds = 0
    while book.pending and rounds < 10:
        book.commit(NOW)
        rounds += 1
    assert rounds == 2
    assert all(b.refused == "not here" for b in store.active_bans(NOW)) and len(store.active_bans(NOW)) == 4500
