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


def test_cluster_tables_have_their_columns(tmp_path):
    s = Store.open_state_dir(tmp_path)
    cols = {t: [r[1] for r in s.conn.execute(f"PRAGMA table_info({t})")] for t in ("cluster_outbox", "cluster_bans")}
    assert cols == {"cluster_outbox": ["seq", "op", "ip", "id", "payload", "time"],
                    "cluster_bans": ["ip", "id", "origin", "created"]}


def test_cluster_outbox_in_order_and_survives_reopen(tmp_path):
    s = Store.open_state_dir(tmp_path)
    s.outbox_add("ban", "198.18.2.10", "n1:a", '{"ip":"198.18.2.10"}', now=1.0)
    s.outbox_add("unban", "198.18.2.11", "n1:b", "2.0", now=2.0)
    s.outbox_add("unban_all", "*", "n1:c", "3.0", now=3.0)
    s.close()
    s = Store.open_state_dir(tmp_path)
    assert s.outbox_size() == 3 and s.outbox_ips() == {"198.18.2.10", "198.18.2.11", "*"}
    first = s.outbox_next(2)
    assert [(e.op, e.ip, e.id, e.payload) for e in first] == [("ban", "198.18.2.10", "n1:a", '{"ip":"198.18.2.10"}'),
                                                              ("unban", "198.18.2.11", "n1:b", "2.0")]
    assert first[0].seq < first[1].seq
    s.outbox_delete_upto(first[-1].seq)
    assert [e.id for e in s.outbox_next(10)] == ["n1:c"] and s.outbox_size() == 1
    s.outbox_delete_upto(s.outbox_next(10)[-1].seq)
    assert s.outbox_size() == 0 and s.outbox_next(10) == [] and s.outbox_ips() == set()


def test_cluster_held_ban_ids(tmp_path):
    s = Store.open_state_dir(tmp_path)
    assert s.held("198.18.2.20") is None
    s.hold("198.18.2.20", "n1:a", "n1", 100.0)
    s.hold("198.18.2.21", "n2:b", "n2", 200.0)
    s.hold("198.18.2.20", "n3:c", "n3", 300.0)  # a newer ban replaces the one held
    assert (s.held("198.18.2.20").id, s.held("198.18.2.20").created) == ("n3:c", 300.0)
    assert s.held_origins() == {"198.18.2.20": "n3", "198.18.2.21": "n2"}
    s.release_held("198.18.2.21")
    assert s.held("198.18.2.21") is None and s.held_origins() == {"198.18.2.20": "n3"}
    s.put_ban(Ban("198.18.2.22", "manual", 400.0, None, manual=True), now=400.0)
    s.hold("198.18.2.22", "n1:d", "n1", 400.0)
    assert s.gc_held() == 1  # 198.18.2.20 has no ban in `bans`; 198.18.2.22 has
    assert s.held_origins() == {"198.18.2.22": "n1"}
    s.release_all_held()
    assert s.held_origins() == {}


def test_report_queries(tmp_path):
    s = Store.open_state_dir(tmp_path)
    assert s.first_activity(0) is None
    s.add_events([Event(1000.0, "198.18.2.30", "auth-failure", EventKind.AUTH_FAILURE, 1.0),
                  Event(1070.0, "198.18.2.30", "scanner-ua", EventKind.SCANNER, 1.0),
                  Event(1130.0, "198.18.2.31", "auth-failure", EventKind.AUTH_FAILURE, 1.0),
                  Event(500.0, "198.18.2.32", "auth-failure", EventKind.AUTH_FAILURE, 1.0)])
    s.put_ban(Ban("198.18.2.30", "scanner:scanner-ua", 1070.0, 4670.0), now=1070.0)
    s.remove_ban("198.18.2.30", now=1200.0)
    s.put_ban(Ban("198.18.2.30", "manual", 1300.0, None, manual=True), now=1300.0)
    assert s.first_activity(900.0) == 1000.0 and s.first_activity(1100.0) == 1130.0
    assert sorted(s.event_counts(60, 900.0)) == [(16, "auth-failure", 1), (17, "scanner-ua", 1),
                                                 (18, "auth-failure", 1)]
    top = s.top_sources(900.0, 10)
    assert [(t.ip, t.events, t.filters, t.first, t.last) for t in top] == [
        ("198.18.2.30", 2, ["auth-failure", "scanner-ua"], 1000.0, 1070.0), ("198.18.2.31", 1, ["auth-failure"], 1130.0, 1130.0)]
    assert [t.ip for t in s.top_sources(900.0, 1)] == ["198.18.2.30"]
    assert s.events_per_source(900.0) == {"198.18.2.30": 2, "198.18.2.31": 1}
    assert s.bans_per_source(0) == {"198.18.2.30": 2}
    assert [(e.time, e.action, e.reason, e.manual) for e in s.ban_log_since(1100.0)] == [
        (1200.0, "unban", "scanner:scanner-ua", False), (1300.0, "ban", "manual", True)]


def test_active_bans_narrowed_in_sql(tmp_path):
    """`list`'s --reason/--jail, --since and --manual/--auto are the store's query: a jail matches its
    reasons (`sip` -> `sip:auth`), never a longer jail name (`si` or `sip_` are not prefixes of `sip:`)."""
    s = Store.open_state_dir(tmp_path)
    with s.transaction():
        s.put_bans([Ban("198.18.3.1", "sip:auth", 100.0, None, 1.0, 1, False),
                    Ban("198.18.3.2", "sip", 200.0, None, 1.0, 1, False),
                    Ban("198.18.3.3", "sipx:auth", 300.0, None, 1.0, 1, False),
                    Ban("198.18.3.4", "manual", 400.0, None, 0.0, 1, True),
                    Ban("198.18.3.5", "blocklist:a_b%", 500.0, 9000.0, 0.0, 1, False)], now=100.0)

    def ips(**kw):
        return [b.ip for b in s.iter_active_bans(1000.0, **kw)]

    assert ips(reason="sip") == ["198.18.3.1", "198.18.3.2"]
    assert ips(reason="si") == [] and ips(reason="sip_") == [] and ips(reason="sip%") == []
    assert ips(reason="blocklist") == ["198.18.3.5"] and ips(reason="blocklist:a_b%") == ["198.18.3.5"]
    assert ips(since=300.0) == ["198.18.3.3", "198.18.3.4", "198.18.3.5"]
    assert ips(manual=True) == ["198.18.3.4"] and len(ips(manual=False)) == 4
    assert s.count_active_bans(1000.0, reason="sip", since=150.0) == 1
    assert ips(reason="blocklist", since=0.0) == ["198.18.3.5"]
    assert s.count_active_bans(10_000.0, reason="blocklist") == 0  # expired is not in force
