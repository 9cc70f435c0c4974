"""`sipguard report`: a self-contained HTML page, rendered by a real headless Chromium."""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from sipguard.model import Ban, Event, EventKind
from sipguard.report import build_report, network_of
from sipguard.store import Store


def _fill(store: Store, now: float) -> None:
    evs = []
    for i in range(40):
        t = now - 3 * 3600 + i * 250
        evs.append(Event(t, f"198.51.100.{i % 5}", "auth-failure", EventKind.AUTH_FAILURE, 1.0))
        if i % 4 == 0:
            evs.append(Event(t + 5, "2001:db8:1:2::7", "scanner-ua", EventKind.SCANNER, 1.0))
        if i % 3 == 0:
            evs.append(Event(t + 9, "203.0.113.9", "pike-block", EventKind.FLOOD, 1.0))
    evs.append(Event(now - 60, "</script><b>x", "auth-failure", EventKind.AUTH_FAILURE, 1.0))  # never markup
    with store.transaction():
        store.add_events(evs)
        for i, ip in enumerate(["198.51.100.0", "203.0.113.9", "2001:db8:1:2::7"]):
            store.put_ban(Ban(ip, ["auth:auth-failure", "flood:pike-block", "scanner:scanner-ua"][i],
                              now - 3600 + i * 600, now + 3600), now - 3600 + i * 600)
        store.put_ban(Ban("192.0.2.0/24", "blocklist:apiban", now - 100, None, manual=True), now - 100)
        store.remove_ban("203.0.113.9", now - 50)


def test_build_report_figures(tmp_path):
    store = Store.open_state_dir(tmp_path)
    now = time.time()
    _fill(store, now)
    d = build_report(store, since=now - 86400, now=now)
    assert d["totals"]["bans"] == 4 and d["totals"]["unbans"] == 1 and d["totals"]["active"] == 3
    assert (d["sources"][0]["ip"], d["sources"][0]["events"], d["sources"][0]["bans"]) == ("203.0.113.9", 14, 1)
    nets = {n["network"]: n for n in d["networks"]}
    assert nets["198.51.100.0/24"]["events"] == 40 and nets["198.51.100.0/24"]["sources"] == 5
    assert nets["2001:db8:1:2::/64"]["events"] == 10
    assert sum(d["filters"]["pike-block"]) == 14
    assert set(d["bans_time"]) == {"auth", "flood", "scanner", "blocklist:apiban"}
    assert network_of("2001:db8::1") == "2001:db8::/64" and network_of("10.1.2.3") == "10.1.2.0/24"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None and not os.environ.get("CI"), reason="chromium not installed")
def test_report_renders_in_chromium(tmp_path):
    chrome = _chromium()
    assert chrome, "chromium is in the Makefile's APT_PACKAGES"
    state = tmp_path / "state"
    store = Store.open_state_dir(state)
    _fill(store, time.time())
    store.close()
    out = tmp_path / "report.html"
    p = subprocess.run([sys.executable, "-m", "sipguard", "--state-dir", str(state), "report", "-o", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    page = out.read_text()
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing fetched from anywhere
    assert "</script><b>" not in page
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1200,900"]
    dom = subprocess.run([chrome, *flags, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120)
    assert 'data-rendered="true"' in dom.stdout, dom.stderr[-2000:]
    assert len(re.findall(r'<rect [^>]*class="bar"', dom.stdout)) > 20
    assert "198.51.100.0/24" in dom.stdout and "2001:db8:1:2::/64" in dom.stdout
    assert "&lt;/script&gt;&lt;b&gt;x" in dom.stdout  # the odd "address" is shown as text
    shot = tmp_path / "report.png"
    subprocess.run([chrome, *flags, f"--screenshot={shot}", out.as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
    keep = os.environ.get("SIPGUARD_ARTEFACTS")
    if keep:
        shutil.copy(shot, os.path.join(keep, "report.png"))


LONG6 = "2001:db8:ffff:ffff:ffff:ffff:ffff:fff1"  # 39 characters: the longest an IPv6 address prints


def _counts_from_db(store: Store, since: float) -> tuple[int, int]:
    """(events, bans) in the store since `since`, read the way the report does not: row by row."""
    events = sum(1 for _ in store.iter_recent_events(since))
    bans = sum(1 for e in store.ban_log_since(since) if e.action == "ban")
    return events, bans


def test_headline_figures_equal_the_charts_and_the_database(tmp_path):
    """Events and bans dated after the report's time (a log clock ahead) are counted, not dropped."""
    store = Store.open_state_dir(tmp_path)
    now = time.time()
    _fill(store, now)
    with store.transaction():  # a log clock 2 hours ahead of the host
        store.add_events([Event(now + 7200 + i, "198.18.5.5", "auth-failure", EventKind.AUTH_FAILURE, 1.0)
                          for i in range(7)])
        store.put_ban(Ban("198.18.5.5", "auth:auth-failure", now + 7200, now + 10800), now + 7200)
    d = build_report(store, since=now - 86400, now=now)
    events, bans = _counts_from_db(store, now - 86400)
    assert events == 40 + 10 + 14 + 1 + 7 and bans == 5
    assert d["totals"]["events"] == sum(sum(v) for v in d["filters"].values()) == events
    assert d["totals"]["bans"] == sum(sum(v) for v in d["bans_time"].values()) == bans
    assert d["totals"]["active"] == sum(d["active"].values())
    assert d["totals"]["sources"] == len(store.events_per_source(now - 86400))
    assert d["late"] == {"events": 7, "bans": 1}
    assert d["filters"]["auth-failure"][-1] >= 7  # in the last column
    assert all(len(v) == len(d["buckets"]) for v in [*d["filters"].values(), *d["bans_time"].values()])


def test_one_minute_of_data_still_has_a_time_axis(tmp_path):
    store = Store.open_state_dir(tmp_path)
    now = time.time()
    with store.transaction():
        store.add_events([Event(now - 50 + i, "198.18.1.1", "pike-block", EventKind.FLOOD, 1.0) for i in range(5)])
    d = build_report(store, since=now - 86400, now=now)
    assert d["step"] == 60 and 30 <= len(d["buckets"]) <= 32
    assert d["totals"]["events"] == 5 and sum(d["filters"]["pike-block"]) == 5


@pytest.mark.skipif(_chromium() is None and not os.environ.get("CI"), reason="chromium not installed")
def test_long_ipv6_labels_are_not_clipped_and_late_events_are_named(tmp_path):
    chrome = _chromium()
    assert chrome, "chromium is in the Makefile's APT_PACKAGES"
    state = tmp_path / "state"
    store = Store.open_state_dir(state)
    now = time.time()
    with store.transaction():  # one minute of data, the busiest source a long IPv6 address, 3 events "ahead"
        store.add_events([Event(now - 60 + i, LONG6, "scanner-ua", EventKind.SCANNER, 1.0) for i in range(20)])
        store.add_events([Event(now - 30, "198.18.0.1", "pike-block", EventKind.FLOOD, 1.0)])
        store.add_events([Event(now + 3600, LONG6, "scanner-ua", EventKind.SCANNER, 1.0) for _ in range(3)])
        store.put_ban(Ban(LONG6, "scanner:scanner-ua", now - 50, now + 3600), now - 50)
        store.put_ban(Ban("198.18.9.0/24", "blocklist:" + "x" * 40, now - 40, None, manual=True), now - 40)
    store.close()
    out = tmp_path / "report.html"
    p = subprocess.run([sys.executable, "-m", "sipguard", "--state-dir", str(state), "report", "-o", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "(24 events, 2 bans)" in p.stdout
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1200,900"]
    dom = subprocess.run([chrome, *flags, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120)
    assert 'data-rendered="true"' in dom.stdout, dom.stderr[-2000:]
    charts = re.findall(r'<svg [^>]*data-label-width="(\d+)"[^>]*>(.*?)</svg>', dom.stdout, re.S)
    assert charts
    for width, body in charts:
        for x, text in re.findall(r'<text x="([\d.]+)"[^>]*class="label"[^>]*>([^<]*)</text>', body):
            assert float(x) >= int(width) > 0, (x, width, text)  # the label's start (x - width) is inside
    assert any(LONG6 in body for _, body in charts)
    widths = [int(w) for w, body in charts if "blocklist:" + "x" * 40 in body]
    assert widths and max(widths) > 184  # the old fixed layout (labels ending at x=184) cut it off
    assert "3 events are dated after this report was made" in dom.stdout
    bars = re.findall(r'<rect [^>]*class="bar"', dom.stdout)
    assert len(bars) >= 4
