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


# -- the Grafana dashboard: every query names a metric and label the exporter really exports ---------
import json as _json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from sipguard.errors import ConfigError  # noqa: E402
from sipguard.model import Event, EventKind  # noqa: E402

DASHBOARD = Path(__file__).resolve().parents[1] / "examples" / "grafana" / "sipguard.json"
TARGET_LABELS = {"instance", "job"}  # added by Prometheus to every series it scrapes, not by the exporter
PROMQL_WORDS = {"sum", "min", "max", "avg", "count", "rate", "irate", "increase", "histogram_quantile", "by",
                "without", "label_values", "topk", "bottomk", "delta", "deriv", "abs", "clamp_min", "on",
                "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool"}
_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<range>\[[^\]]*\])|(?P<num>\d+(?:\.\d+)?)'
                    r'|(?P<id>[A-Za-z_:][A-Za-z0-9_:]*)|(?P<op>=~|!~|!=|[=(){},/*+<>^%-]))')


def tokens(expr: str) -> list[tuple[str, str]]:
    """(kind, text) of a PromQL expression; grafana's $variables are taken as they come ($__rate_interval
    only appears inside a range, $instance only inside a matcher's string)."""
    out, pos = [], 0
    expr = expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        assert m and m.end() > pos, f"cannot read {expr[pos:]!r} in {expr!r}"
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def parse_promql(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """([(metric, labels its matchers name)], labels named by `by (...)` / `without (...)`)."""
    toks = tokens(expr)
    metrics: list[tuple[str, set[str]]] = []
    grouping: set[str] = set()
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        if kind == "id" and text in ("by", "without"):
            assert toks[i + 1] == ("op", "("), expr
            j = i + 2
            while toks[j] != ("op", ")"):
                if toks[j][0] == "id":
                    grouping.add(toks[j][1])
                j += 1
            i = j + 1
            continue
        if kind == "id" and text not in PROMQL_WORDS:
            assert toks[i + 1 : i + 2] != [("op", "(")], f"unknown function {text} in {expr!r}"
            labels: set[str] = set()
            if toks[i + 1 : i + 2] == [("op", "{")]:
                j = i + 2
                while toks[j] != ("op", "}"):
                    if toks[j][0] == "id":
                        assert toks[j + 1][0] == "op" and toks[j + 2][0] == "str", f"bad matcher in {expr!r}"
                        labels.add(toks[j][1])
                        j += 3
                    else:
                        j += 1
                i = j
            metrics.append((text, labels))
        i += 1
    return metrics, grouping


def test_the_promql_tokenizer_finds_metrics_and_labels():
    m, g = parse_promql('histogram_quantile(0.9, sum by (le) (rate(x_bucket{instance=~"$instance", a="b"}'
                        '[$__rate_interval])))')
    assert m == [("x_bucket", {"instance", "a"})] and g == {"le"}
    m, g = parse_promql("sum(rate(a_sum[5m])) / sum(rate(a_count[5m]))")
    assert [n for n, _ in m] == ["a_sum", "a_count"] and g == set()
    with pytest.raises(AssertionError):
        parse_promql("sum(rtae(x[5m]))")  # a misspelt function is not taken for a metric


def scrape_text(m) -> str:
    """One scrape of `m`'s endpoint on a free loopback port (closed afterwards)."""
    addr = m.serve("127.0.0.1:0")
    try:
        with urllib.request.urlopen(f"http://{addr[0]}:{addr[1]}/metrics", timeout=5) as resp:
            return resp.read().decode()
    finally:
        m.close()


def exposition() -> dict[str, set[str]]:
    """Every sample name the exporter serves over HTTP, with its label names, after a little traffic."""
    from sipguard.extras.metrics import MeteredEnforcer, Metrics, MetricsHook

    class Failing(DryRunEnforcer):
        def unban(self, ip):
            raise RuntimeError("kernel says no")

    m = Metrics()
    hook = MetricsHook(m)
    enf = MeteredEnforcer(Failing(), m)
    now = time.time()
    ban = Ban("198.18.0.9", "auth:auth-failure", now, now + 60)
    enf.ban(ban, now)
    with pytest.raises(RuntimeError):
        enf.unban("198.18.0.9")
    m.observe_batch({"/var/log/kamailio.log": 10}, [Event(now - 0.25, "198.18.0.9", "auth-failure",
                                                          EventKind.AUTH_FAILURE, 1.0)], [ban], now)
    m.set_skipped({"garbage": 1, "too_long": 2})
    m.blocklist_skipped.labels("apiban").inc()
    fleet_view = _json.dumps({"in_sync": False, "outbox": 3, "heartbeat": now})
    hook.tick(now, types.SimpleNamespace(store=types.SimpleNamespace(get_meta=lambda key: fleet_view)))
    text = scrape_text(m)
    out: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def test_every_grafana_query_names_an_exported_metric_and_label():
    exported = exposition()
    dash = _json.loads(DASHBOARD.read_text())
    exprs = []
    for p in dash["panels"]:
        exprs += [t["expr"] for t in p.get("targets", [])]
    for v in dash["templating"]["list"]:
        q = v.get("query")
        if isinstance(q, dict):
            lv = re.fullmatch(r"label_values\((\w+), (\w+)\)", q["query"])
            assert lv, q
            assert lv.group(1) in exported and lv.group(2) in exported[lv.group(1)] | TARGET_LABELS
    assert len(exprs) >= 15
    used = set()
    for e in exprs:
        metrics, grouping = parse_promql(e)
        assert metrics, e
        for name, labels in metrics:
            assert name in exported, f"{name} is not exported (query {e!r}); exported: {sorted(exported)}"
            assert labels <= exported[name] | TARGET_LABELS, (e, labels - exported[name])
            used.add(name)
        for label in grouping:
            assert all(label in exported[n] | TARGET_LABELS for n, _ in metrics), (e, label)
    # what the dashboard is for: lines read and matched, events by kind, bans by reason, ban latency
    # quantiles, skipped lines, enforcer errors, fleet lag
    for name in ("sipguard_lines_read_total", "sipguard_lines_matched_total", "sipguard_events_total",
                 "sipguard_bans_total", "sipguard_ban_latency_seconds_bucket", "sipguard_lines_skipped_total",
                 "sipguard_enforcer_errors_total", "sipguard_fleet_lag_seconds"):
        assert name in used, name
    assert any("histogram_quantile(0.99," in e for e in exprs)


def test_a_query_of_a_metric_nobody_exports_is_caught():
    exported = exposition()
    for bad in ('sum by (kind) (rate(sipguard_event_total[5m]))', 'sum by (filter) (rate(sipguard_events_total[5m]))',
                'rate(sipguard_bans_total{jail="auth"}[5m])'):
        metrics, grouping = parse_promql(bad)
        ok = all(n in exported and ls <= exported[n] | TARGET_LABELS and
                 all(g in exported[n] | TARGET_LABELS for g in grouping) for n, ls in metrics)
        assert not ok, bad


def test_fleet_lag_counts_the_time_out_of_sync():
    from sipguard.extras.metrics import FLEET_META, Metrics, MetricsHook

    from sipguard.cluster.status import STATUS_META

    assert FLEET_META == STATUS_META
    m = Metrics()
    hook = MetricsHook(m)
    view = {"in_sync": True, "outbox": 0, "heartbeat": 1000.0}
    book = types.SimpleNamespace(store=types.SimpleNamespace(get_meta=lambda key: _json.dumps(view)))
    hook.tick(1000.0, book)
    assert m.fleet() == (True, 0, 0.0)
    view.update(in_sync=False, outbox=5, heartbeat=1029.0)
    hook._read_fleet = 0.0  # the next tick reads again (once a second otherwise)
    hook.tick(1030.0, book)
    assert m.fleet() == (False, 5, 30.0)
    hook._read_fleet = 0.0
    hook.tick(1030.0 + 120, book)  # the view is stale: a database left by an earlier fleet run
    assert m.fleet() is None
    assert Metrics().fleet() is None  # standalone: no fleet series at all


# -- [metrics] listen ----------------------------------------------------------------------------------
def test_listen_port_out_of_range_is_a_config_error_naming_file_line_and_reason(tmp_path):
    from sipguard.config import load_config

    conf = tmp_path / "sipguard.toml"
    conf.write_text('[enforce]\nbackend = "dryrun"\n\n[metrics]\nlisten = "127.0.0.1:99999"\n')
    with pytest.raises(ConfigError) as exc:
        load_config(conf)
    assert str(exc.value) == (f"{conf}: line 5: metrics.listen: port 99999 out of range: ports are 1-65535 "
                              f"(0: any free port)")
    conf.write_text('[metrics]\nlisten = "localhost"\n')
    with pytest.raises(ConfigError, match=r"line 2: metrics.listen: bad address 'localhost': expected HOST:PORT"):
        load_config(conf)
    conf.write_text('[metrics]\nlisten = "300.1.1.1:9108"\n')
    with pytest.raises(ConfigError, match=r"bad address '300.1.1.1'"):
        load_config(conf)
    for good in ("127.0.0.1:9108", "[::1]:9108", "localhost:9108", "0.0.0.0:9108", ""):
        conf.write_text(f'[metrics]\nlisten = "{good}"\n')
        assert load_config(conf).metrics.listen == good


def test_loopback_listen_does_not_warn(caplog):
    from sipguard.extras.metrics import Metrics

    m = Metrics()
    with caplog.at_level(logging.INFO, logger="sipguard.metrics"):
        m.serve("127.0.0.1:0")
    m.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def _serve_and_scrape(listen: str, url_host: str) -> tuple[list[str], int]:
    from sipguard.extras.metrics import Metrics

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(f"{r.levelname} {r.getMessage()}")  # type: ignore[method-assign]
    logging.getLogger("sipguard.metrics").addHandler(handler)
    m = Metrics()
    try:
        addr = m.serve(listen)
        with urllib.request.urlopen(f"http://{url_host}:{addr[1]}/metrics", timeout=5) as resp:
            status = resp.status
    finally:
        m.close()
    return records, status


@pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"), reason="needs root (a network namespace)")
def test_non_loopback_listen_works_but_warns(tmp_path):
    from netns_util import ns_call
    from tests.lab.netns import Netns

    with Netns(f"sge-{os.getpid() % 100000}docm") as ns:
        ns.ip("link", "add", "v0", "type", "veth", "peer", "name", "v1")
        ns.add_addr("v0", "198.18.71.1/24")
        ns.ip("link", "set", "v0", "up")
        ns.ip("link", "set", "v1", "up")
        for listen, host in (("198.18.71.1:0", "198.18.71.1"), ("0.0.0.0:0", "127.0.0.1")):
            records, status = ns_call(ns.name, _serve_and_scrape, listen, host)
            assert status == 200
            warned = [r for r in records if r.startswith("WARNING")]
            assert len(warned) == 1 and "no authentication" in warned[0] and "not on loopback" in warned[0], records


def test_fleet_refusals_are_exported_by_kind():
    """What the node refused from the fleet (the bridge's counters in its status view) is a counter by kind."""
    from sipguard.cluster.status import REFUSED
    from sipguard.extras.metrics import FLEET_REFUSED, Metrics, MetricsHook

    assert FLEET_REFUSED == REFUSED
    m = Metrics()
    hook = MetricsHook(m)
    view = {"in_sync": True, "outbox": 0, "heartbeat": 1000.0,
            "stats": {"unverified": 4, "too_wide": 2, "forged_events": "x", "own_address": True, "applied": 9}}
    hook.tick(1000.0, types.SimpleNamespace(store=types.SimpleNamespace(get_meta=lambda key: _json.dumps(view))))
    assert m.fleet_refused() == {"unverified": 4, "too_wide": 2}  # garbage values are not figures
    text = scrape_text(m)
    got = {s.labels["kind"]: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
           if s.name == "sipguard_fleet_refused_total"}
    assert got == {k: {"unverified": 4, "too_wide": 2}.get(k, 0) for k in REFUSED}
