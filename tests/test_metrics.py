"""The Prometheus endpoint of a running daemon (dry-run enforcer), scraped over HTTP."""

import threading
import urllib.request
from datetime import datetime, timezone

from prometheus_client.parser import text_string_to_metric_families

from sipguard.actions import manual_unban
from sipguard.config import Config
from sipguard.wiring import build_daemon
from sipguard.enforce.dryrun import DryRunEnforcer
from sipguard.extras.metrics import family, reason_label, write_time
from sipguard.model import Ban
from sipguard.store import Store
from waiting import wait_for


def metrics_hook(d):
    """The daemon's MetricsHook (the composition root adds it when the config asks for it)."""
    from sipguard.extras.metrics import MetricsHook

    return next(h for h in d.parts.hooks if isinstance(h, MetricsHook))


def iso_line(text: str, pid: int = 4242) -> str:
    ts = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    return f"{ts} edge kamailio[{pid}]: {text}\n"




def scrape(addr) -> dict:
    with urllib.request.urlopen(f"http://{addr[0]}:{addr[1]}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_helpers():
    assert family("198.51.100.7") == "ipv4" and family("2001:db8::1") == "ipv6"
    assert family("198.51.100.0/24") == "net4"
    assert reason_label(Ban("1.2.3.4", "auth:auth-failure", 0, None)) == "auth"
    assert reason_label(Ban("1.2.3.4", "my reason", 0, None, manual=True)) == "manual"
    assert reason_label(Ban("1.2.3.4", "blocklist:apiban", 0, None, manual=True)) == "blocklist:apiban"
    assert write_time(100.25, 101.0) == 100.25  # precise record time
    assert write_time(100.0, 101.0) == 101.0  # whole seconds: the read time
    assert write_time(5000.5, 101.0) == 101.0  # implausible (future): the read time


def test_metrics_move_with_traffic(tmp_path):
    log = tmp_path / "kamailio.log"
    log.touch()
    cfg = Config.model_validate({"allowlist": {"include_host_addresses": False},
                                 "daemon": {"control_interval": 0.05},
                                 "sources": {"format": "auto"},
                                 "metrics": {"listen": "127.0.0.1:0"}})
    store = Store.open_state_dir(tmp_path / "state")
    d = build_daemon(cfg, store, DryRunEnforcer(), logs=[str(log)])
    addr = metrics_hook(d).metrics.address
    th = threading.Thread(target=d.run, daemon=True)
    th.start()
    try:
        wait_for(lambda: d.ready.is_set())
        m0 = scrape(addr)
        assert val(m0, "sipguard_lines_read_total", source=str(log)) == 0
        with log.open("a") as f:
            f.write(iso_line("WARNING: <script>: Blocked scanner UA 'friendly-scanner' from 198.18.7.1:5060"))
            for _ in range(2):
                f.write(iso_line("NOTICE: <script>: auth failed for user 100 from 2001:db8::77:5060 method REGISTER"))
            f.write("this is not a kamailio line at all\n")
        wait_for(lambda: val(scrape(addr), "sipguard_lines_read_total", source=str(log)) >= 4)
        m1 = scrape(addr)
        assert val(m1, "sipguard_lines_matched_total", filter="scanner-ua") == 1
        assert val(m1, "sipguard_lines_matched_total", filter="auth-failure") == 2
        assert val(m1, "sipguard_events_total", kind="scanner") == 1
        assert val(m1, "sipguard_events_total", kind="auth_failure") == 2
        assert val(m1, "sipguard_active_bans", family="ipv4", reason="scanner") == 1
        assert val(m1, "sipguard_bans_total", reason="scanner") == 1
        assert val(m1, "sipguard_ban_latency_seconds_count") == 1
        assert 0 <= val(m1, "sipguard_ban_latency_seconds_sum") < 5
        assert sum(v for (n, lab), v in m1.items() if n == "sipguard_lines_skipped_total") >= 1
        # a third failure bans the IPv6 source; an unban lowers the gauge and counts
        with log.open("a") as f:
            f.write(iso_line("NOTICE: <script>: auth failed for user 100 from 2001:db8::77:5060 method REGISTER"))
        wait_for(lambda: val(scrape(addr), "sipguard_active_bans", family="ipv6", reason="auth") == 1)
        manual_unban(Store.open_state_dir(tmp_path / "state"), "198.18.7.1")
        wait_for(lambda: val(scrape(addr), "sipguard_unbans_total") == 1)
        m2 = scrape(addr)
        assert val(m2, "sipguard_active_bans", family="ipv4", reason="scanner") == 0
        assert val(m2, "sipguard_bans_total", reason="auth") == 1
        assert val(m2, "sipguard_ban_latency_seconds_count") == 2
        assert val(m2, "sipguard_enforcer_errors_total", enforcer="dryrun", op="ban") == 0
    finally:
        d.stop()
        th.join(10)
        store.close()
    assert not th.is_alive()


class _Broken(DryRunEnforcer):
    def ban(self, ban, now):
        raise OSError("kernel said no")


def test_enforcer_errors_counted(tmp_path):
    log = tmp_path / "kamailio.log"
    log.touch()
    cfg = Config.model_validate({"allowlist": {"include_host_addresses": False},
                                 "daemon": {"control_interval": 0.05}, "metrics": {"listen": "127.0.0.1:0"}})
    store = Store.open_state_dir(tmp_path / "state")
    d = build_daemon(cfg, store, _Broken(), logs=[str(log)])
    th = threading.Thread(target=d.run, daemon=True)
    th.start()
    try:
        wait_for(lambda: d.ready.is_set())
        with log.open("a") as f:
            f.write(iso_line("WARNING: <script>: Blocked scanner UA 'sipvicious' from 198.18.7.2:5060"))
        addr = metrics_hook(d).metrics.address
        wait_for(lambda: val(scrape(addr), "sipguard_enforcer_errors_total", enforcer="dryrun", op="ban") == 1)
    finally:
        d.stop()
        th.join(10)
        store.close()
