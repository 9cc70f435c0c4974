"""Store: bans survive reopen, events are bounded, positions and control requests round-trip."""

from sipguard.model import Ban, Event, EventKind
from sipguard.store import Store


def test_bans_survive_reopen(tmp_path):
    s = Store.open_state_dir(tmp_path)
    with s.transaction():
        s.put_ban(Ban("198.18.2.1", "auth:auth-failure", 100.0, 3700.0, 3.0, 2, False), now=100.0)
        s.put_ban(Ban("2001:db8::5", "manual", 100.0, None, 0.0, 1, True), now=100.0)
    s.close()
    s = Store.open_state_dir(tmp_path)
    bans = {b.ip: b for b in s.active_bans(now=200.0)}
    assert bans["198.18.2.1"].expires == 3700.0 and bans["198.18.2.1"].offence == 2
    assert bans["2001:db8::5"].expires is None and bans["2001:db8::5"].manual
    assert [b.ip for b in s.expired_bans(now=4000.0)] == ["198.18.2.1"]
    assert s.offence_history(0) == {"198.18.2.1": [100.0]}  # manual bans don't escalate
    assert s.remove_ban("198.18.2.1", now=4000.0, action="expire").ip == "198.18.2.1"
    assert s.get_ban("198.18.2.1") is None
    assert [h["action"] for h in s.history()] == ["expire", "ban", "ban"]


def test_transaction_is_all_or_nothing(tmp_path):
    s = Store.open_state_dir(tmp_path)
    try:
        with s.transaction():
            s.add_events([Event(1.0, "198.18.2.2", "x", EventKind.PROBE, 1.0)])
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert s.count_events() == 0


def test_recent_events_skip_cleared(tmp_path):
    s = Store.open_state_dir(tmp_path)
    s.add_events([Event(t, "198.18.2.3", "auth-failure", EventKind.AUTH_FAILURE, 1.0) for t in (10, 20, 30)])
    s.add_events([Event(25, "198.18.2.4", "auth-failure", EventKind.AUTH_FAILURE, 1.0)])
    s.mark_cleared("198.18.2.3", 20)
    got = [(e.ip, e.time) for e in s.recent_events(since=0)]
    assert got == [("198.18.2.4", 25), ("198.18.2.3", 30)]


def test_prune_bounds_events(tmp_path):
    s = Store.open_state_dir(tmp_path)
    s.add_events([Event(float(i), f"198.19.{i // 256 % 256}.{i % 256}", "f", EventKind.PROBE, 1.0)
                  for i in range(5000)])
    s.prune(now=5000.0, event_retention=1000.0, max_events=10_000, history_retention=1e9)
    assert s.count_events() == 1000  # times 4000..4999 are kept
    s.prune(now=5000.0, event_retention=1e9, max_events=1000, history_retention=1e9)
    s.add_events([Event(6000.0, "198.18.2.9", "f", EventKind.PROBE, 1.0)] * 2000)
    s.prune(now=6000.0, event_retention=1e9, max_events=1000, history_retention=1e9)
    assert s.count_events() == 1000


def test_positions_and_control(tmp_path):
    s = Store.open_state_dir(tmp_path)

    class P:
        path, dev, inode, offset = "/var/log/kamailio.log", 2049, 1234, 5678

    s.save_positions([P()])
    assert s.positions()["/var/log/kamailio.log"].offset == 5678
    assert s.last_request_id() == 0
    s.request("ban", "198.18.2.5", note="x")
    s.request("unban", "198.18.2.5")
    reqs = s.requests_after(0)
    assert [(r.action, r.target) for r in reqs] == [("ban", "198.18.2.5"), ("unban", "198.18.2.5")]
    assert reqs[0].payload == {"note": "x"}
    assert s.requests_after(reqs[-1].id) == []


def test_wal_mode(tmp_path):
    s = Store.open_state_dir(tmp_path)
    assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
