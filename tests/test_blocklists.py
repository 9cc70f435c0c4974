"""Blocklists: parse, apply (bulk, one transaction), import from the CLI, refresh from a local HTTP server."""

import http.server
import json
import subprocess
import sys
import threading

import pytest

from sipguard.addresses import AllowList
from sipguard.extras.blocklists import BlocklistError, apply_blocklist, listed_bans, parse_blocklist
from sipguard.config import Config
from sipguard.wiring import build_daemon
from sipguard.enforce.dryrun import DryRunEnforcer
from sipguard.store import Store
from waiting import wait_for


def blocklist_hook(d):
    """The daemon's BlocklistHook (the composition root adds it when the config asks for it)."""
    from sipguard.extras.blocklists import BlocklistHook

    return next(h for h in d.parts.hooks if isinstance(h, BlocklistHook))

SIPGUARD = [sys.executable, "-m", "sipguard"]


def test_parse_text_and_json():
    text = "# APIBAN\n198.51.100.7\n\n203.0.113.0/24 ; SBL1\n2001:db8::/48  # net\n198.51.100.7\n"
    assert parse_blocklist(text, "x") == ["198.51.100.7", "203.0.113.0/24", "2001:db8::/48"]
    js = json.dumps({"ipaddress": ["198.51.100.8", "2001:db8::9"], "ID": "123"}, indent=1)
    assert parse_blocklist(js, "u") == ["198.51.100.8", "2001:db8::9"]
    assert parse_blocklist('["198.51.100.9"]', "u") == ["198.51.100.9"]


def test_malformed_rejected_with_line():
    with pytest.raises(BlocklistError, match=r"^lst:3: "):
        parse_blocklist("198.51.100.7\n# ok\nnot-an-ip\n", "lst")
    with pytest.raises(BlocklistError, match=r"^u:3: entry 1"):
        parse_blocklist('{"ipaddress": [\n "198.51.100.8",\n "999.1.1.1"\n]}', "u")
    with pytest.raises(BlocklistError, match=r"^u:1: invalid JSON"):
        parse_blocklist('{"ipaddress": [', "u")


def test_apply_adds_removes_skips_allowlisted(tmp_path):
    store = Store.open_state_dir(tmp_path)
    enf = DryRunEnforcer()
    calls = []
    orig = enf.ban_many
    enf.ban_many = lambda bans, now: (calls.append(len(bans)), orig(bans, now))
    allow = AllowList(["192.0.2.0/24"], include_host=False)
    r1 = apply_blocklist(store, "apiban", ["198.51.100.1", "198.51.100.2", "192.0.2.5"], allow, enf, now=1000.0)
    assert (r1.added, r1.removed, r1.skipped_allowlisted) == (2, 0, ["192.0.2.5"])
    assert calls == [2]  # one bulk call
    assert set(listed_bans(store, "apiban")) == {"198.51.100.1", "198.51.100.2"}
    assert {e.ip for e in enf.entries()} == {"198.51.100.1", "198.51.100.2"}
    assert store.get_ban("198.51.100.1").reason == "blocklist:apiban"
    r2 = apply_blocklist(store, "apiban", ["198.51.100.2", "198.51.100.3"], allow, enf, now=1001.0)
    assert (r2.added, r2.removed, r2.kept) == (1, 1, 1)
    assert set(listed_bans(store, "apiban")) == {"198.51.100.2", "198.51.100.3"}
    assert {e.ip for e in enf.entries()} == {"198.51.100.2", "198.51.100.3"}
    assert [h["action"] for h in store.history(10)][0] == "delist"


def test_kernel_error_changes_nothing(tmp_path):
    store = Store.open_state_dir(tmp_path)

    class Boom(DryRunEnforcer):
        def ban_many(self, bans, now):
            raise OSError("no kernel")

    with pytest.raises(OSError):
        apply_blocklist(store, "x", ["198.51.100.1"], AllowList([], include_host=False), Boom())
    assert store.active_bans(0) == []


def _cli(tmp_path, *args, cfg=None):
    conf = tmp_path / "sg.toml"
    conf.write_text(cfg or '[enforce]\nbackend = "dryrun"\n[allowlist]\ncidrs = ["192.0.2.0/24"]\n')
    return subprocess.run([*SIPGUARD, "--config", str(conf), "--state-dir", str(tmp_path / "st"), *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_import(tmp_path):
    lst = tmp_path / "apiban.txt"
    lst.write_text("198.51.100.10\n198.51.100.11\n192.0.2.9\n")
    p = _cli(tmp_path, "import", str(lst), "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert (res["list"], res["added"], res["skipped_allowlisted"]) == ("apiban", 2, ["192.0.2.9"])
    bad = tmp_path / "bad.txt"
    bad.write_text("198.51.100.12\nfoo bar\n")
    p = _cli(tmp_path, "import", str(bad), "--list", "apiban")
    assert p.returncode == 1 and f"{bad}:2:" in p.stderr, p.stderr
    listed = json.loads(_cli(tmp_path, "list", "--json").stdout)
    assert sorted(b["ip"] for b in listed) == ["198.51.100.10", "198.51.100.11"]  # the bad list changed nothing
    lst.write_text("198.51.100.11\n")
    p = _cli(tmp_path, "import", str(lst), "--for", "2h")
    assert p.returncode == 0 and "lifted 1" in p.stdout, p.stdout
    listed = json.loads(_cli(tmp_path, "list", "--json").stdout)
    assert [b["ip"] for b in listed] == ["198.51.100.11"]


class _ListServer:
    """Serves `self.body` on 127.0.0.1 (ephemeral port) from a thread."""

    def __init__(self):
        outer = self
        self.body = b""
        self.status = 200
        self.hits = 0

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits += 1
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/api/banned"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()




def test_daemon_refreshes_from_url(tmp_path):
    with _ListServer() as srv:
        srv.body = json.dumps({"ipaddress": ["198.51.100.20", "198.51.100.21", "192.0.2.1"]}).encode()
        cfg = Config.model_validate({
            "allowlist": {"include_host_addresses": False, "cidrs": ["192.0.2.0/24"]},
            "daemon": {"control_interval": 0.05},
            "blocklists": [{"name": "apiban", "url": srv.url, "refresh": 1}],
        })
        (tmp_path / "k.log").touch()
        store = Store.open_state_dir(tmp_path / "st")
        enf = DryRunEnforcer()
        d = build_daemon(cfg, store, enf, logs=[str(tmp_path / "k.log")])
        th = threading.Thread(target=d.run, daemon=True)
        th.start()
        try:
            ents = lambda: {e.ip for e in enf.entries()}  # noqa: E731
            wait_for(lambda: ents() == {"198.51.100.20", "198.51.100.21"}, timeout=8.0)
            assert "198.51.100.20" in d.parts.policy.banned
            srv.body = b'{"ipaddress": ["198.51.100.21", "not-an-address"]}'  # malformed: nothing changes
            hits = srv.hits
            wait_for(lambda: srv.hits > hits and "apiban" in blocklist_hook(d).refresher.errors, timeout=8.0)
            assert ents() == {"198.51.100.20", "198.51.100.21"}
            assert "api/banned:1: entry 1" in blocklist_hook(d).refresher.errors["apiban"]
            srv.body = b'{"ipaddress": ["198.51.100.21", "198.51.100.22"]}'
            blocklist_hook(d).refresher.due["apiban"] = 0  # don't wait for the retry delay
            wait_for(lambda: ents() == {"198.51.100.21", "198.51.100.22"}, timeout=8.0)
            # the kernel first, the store in the same loop pass right after
            wait_for(lambda: set(listed_bans(store, "apiban")) == {"198.51.100.21", "198.51.100.22"}, timeout=5.0)
            assert set(listed_bans(store, "apiban")) == {"198.51.100.21", "198.51.100.22"}
        finally:
            d.stop()
            th.join(10)
            store.close()
