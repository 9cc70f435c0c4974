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


# -- bounded reading: redirects, errors without the list's text, max_entries and bytes (issue 16, item 10) --

import json as _json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sipguard.extras.blocklists import (  # noqa: E402
    BlocklistRefresher, Limits, _decoded, _parse, _Redirects, load_blocklist,
)

SECRET = "s3cr3t-root:$y$j9T$0123456789"


class _Routes:
    """An HTTP server on 127.0.0.1 (ephemeral port), started by the test: each path answers as
    `routes` says, ("body", bytes) or ("redirect", url) or ("stream", n_lines) or ("status", code);
    `hits` counts requests per path, `sent` the bytes a stream wrote before the client went away."""

    def __init__(self):
        outer = self
        self.routes: dict[str, tuple] = {}
        self.hits: dict[str, int] = {}
        self.sent: dict[str, int] = {}

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self):
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                kind, arg = outer.routes.get(self.path, ("status", 404))
                if kind == "redirect":
                    self.send_response(302)
                    self.send_header("Location", arg)
                    self.end_headers()
                elif kind == "status":
                    self.send_response(arg)
                    self.end_headers()
                    self.wfile.write(f"<html>{SECRET}</html>".encode())
                elif kind == "body":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(arg)))
                    self.end_headers()
                    self.wfile.write(arg)
                elif kind == "stream":  # no Content-Length: the client only knows the size by reading
                    self.send_response(200)
                    self.end_headers()
                    sent = 0
                    try:
                        for i in range(arg):
                            line = f"198.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}\n".encode()
                            self.wfile.write(line)
                            sent += len(line)
                    except OSError:
                        pass
                    outer.sent[self.path] = sent

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def routes():
    with _Routes() as srv:
        srv.routes["/list"] = ("body", b"198.51.100.1\n198.51.100.2\n")
        yield srv


def _refused(url: str, words: str, limits: Limits = Limits()) -> str:
    with pytest.raises(BlocklistError) as e:
        load_blocklist(url, limits=limits)
    msg = str(e.value)
    assert words in msg, msg
    assert SECRET not in msg
    return msg


def test_redirect_to_a_public_looking_path_on_the_same_server_is_followed_when_allowed(routes) -> None:
    routes.routes["/r"] = ("redirect", f"{routes.base}/list")
    routes.routes["/r2"] = ("redirect", "/r")  # relative, and two hops
    assert load_blocklist(f"{routes.base}/r2", limits=Limits(allow_private=True)) == ["198.51.100.1", "198.51.100.2"]
    assert routes.hits["/list"] == 1


@pytest.mark.parametrize("target, words", [
    ("{base}/list", "redirect to 127.0.0.1 refused: 127.0.0.1 is not a public address"),
    ("http://localhost:{port}/list", "redirect to localhost refused: "),  # the name resolves to loopback
    ("http://[::ffff:127.0.0.1]:{port}/list", "is not a public address"),
    ("http://0.0.0.0:{port}/list", "0.0.0.0 is not a public address"),
    ("http://10.255.255.1/list", "redirect to 10.255.255.1 refused: 10.255.255.1 is not a public address"),
    ("http://192.168.255.1/list", "192.168.255.1 is not a public address"),
    ("http://169.254.169.254/latest/meta-data/", "redirect to 169.254.169.254 refused"),
    ("http://[fe80::1]/x", "fe80::1 is not a public address"),
])
def test_redirect_to_loopback_link_local_or_private_is_refused(routes, target: str, words: str) -> None:
    routes.routes["/r"] = ("redirect", target.format(base=routes.base, port=routes.port))
    t0 = time.monotonic()
    msg = _refused(f"{routes.base}/r", words)
    assert msg.startswith(f"{routes.base}/r: redirect to ")
    assert "allow_private = true" in msg
    assert time.monotonic() - t0 < 5  # refused before any connection, not after a timeout
    assert routes.hits.get("/list", 0) == 0


@pytest.mark.parametrize("target", ["ftp://127.0.0.1/list", "file:///etc/passwd", "gopher://127.0.0.1/x"])
def test_redirect_to_another_scheme_is_refused_even_when_private_is_allowed(routes, target: str) -> None:
    routes.routes["/r"] = ("redirect", target)
    msg = _refused(f"{routes.base}/r", "(only http and https)", Limits(allow_private=True))
    assert "root:" not in msg


def test_redirects_are_bounded(routes) -> None:
    routes.routes["/loop"] = ("redirect", f"{routes.base}/loop")
    for i in range(8):
        routes.routes[f"/c{i}"] = ("redirect", f"{routes.base}/c{i + 1}")
    routes.routes["/c8"] = ("body", b"198.51.100.9\n")
    _refused(f"{routes.base}/loop", "cannot fetch: HTTP status 30", Limits(allow_private=True))
    _refused(f"{routes.base}/c0", "cannot fetch: HTTP status 302", Limits(allow_private=True))
    assert routes.hits.get("/c8", 0) == 0


def test_the_connection_of_a_redirect_is_checked_too() -> None:
    """A name that resolved to a public address when the redirect was checked and to a private one
    when connecting (DNS rebinding) is refused at the connection: it only goes to checked addresses."""
    guard = _Redirects("http://list.example/x", allow_private=False)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        with pytest.raises(BlocklistError, match="redirect to 127.0.0.1 refused: 127.0.0.1 is not a public"):
            guard.connect(("127.0.0.1", srv.getsockname()[1]), 2.0)
        open_guard = _Redirects("http://list.example/x", allow_private=True)
        open_guard.connect(("127.0.0.1", srv.getsockname()[1]), 2.0).close()


def test_http_errors_and_bad_bodies_never_show_the_text(routes, tmp_path) -> None:
    _refused(f"{routes.base}/missing", "cannot fetch: HTTP status 404")
    routes.routes["/text"] = ("body", f"198.51.100.1\n{SECRET}\n".encode())
    assert _refused(f"{routes.base}/text", "").endswith("/text:2: not an IP address or CIDR")
    routes.routes["/json"] = ("body", _json.dumps({"ipaddress": ["198.51.100.1", SECRET]}, indent=1).encode())
    assert _refused(f"{routes.base}/json", "").endswith("/json:4: entry 1: not an IP address or CIDR")
    routes.routes["/json2"] = ("body", _json.dumps({"ipaddress": [{"k": SECRET}]}).encode())
    assert _refused(f"{routes.base}/json2", "").endswith("/json2:1: entry 0 is not a string")
    routes.routes["/json3"] = ("body", b'{"ipaddress": ["198.51.100.1" ' + SECRET.encode() + b"]}")
    assert "/json3:1: invalid JSON: Expecting ',' delimiter" in _refused(f"{routes.base}/json3", "")
    # a local file a root process can read: the same (sipguard import /etc/shadow tells nothing)
    secret = tmp_path / "shadow"
    secret.write_text(f"{SECRET}:19000:0:99999:7:::\n")
    p = _cli(tmp_path, "import", str(secret))
    assert p.returncode == 1 and p.stderr.strip() == f"sipguard: error: {secret}:1: not an IP address or CIDR", p.stderr


def test_reading_stops_past_max_entries(routes) -> None:
    """The server streams 2,000,000 lines; the client stops after max_entries + 1 distinct entries."""
    routes.routes["/big"] = ("stream", 2_000_000)
    msg = _refused(f"{routes.base}/big", "more than max_entries = 1000 entries (reading stopped at line 1001); refused",
                   Limits(max_entries=1000))
    wait_for(lambda: "/big" in routes.sent, timeout=20.0)
    total = sum(len(f"198.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}\n") for i in range(2_000_000))
    assert routes.sent["/big"] < total // 3, (routes.sent["/big"], total, msg)


def test_reading_stops_past_max_bytes(routes, tmp_path) -> None:
    body = b"".join(f"198.51.{i >> 8 & 255}.{i & 255}\n".encode() for i in range(120_000))  # ~2 MiB
    routes.routes["/sized"] = ("body", body)  # with Content-Length: refused before reading
    _refused(f"{routes.base}/sized", "/sized: larger than 1 MiB; refused", Limits(max_bytes=1 << 20))
    routes.routes["/stream"] = ("stream", 200_000)  # without: refused once 1 MiB was read
    _refused(f"{routes.base}/stream", "/stream: larger than 1 MiB; refused", Limits(max_bytes=1 << 20))
    f = tmp_path / "big.txt"
    f.write_bytes(body)
    _refused(str(f), f"{f}: larger than 1 MiB; refused", Limits(max_bytes=1 << 20))
    assert len(load_blocklist(str(f), limits=Limits(max_bytes=4 << 20))) == 65536  # distinct /16 of 198.51


def test_a_60_mb_list_is_refused_in_bounded_memory(tmp_path) -> None:
    """The issue's figure: a 60 MB list took 874 MB RSS before its refusal. Read in pieces, the
    refusal past max_entries costs what max_entries entries cost (measured in a child process)."""
    big = tmp_path / "big.txt"
    with big.open("w") as fh:
        line_no = 0
        while fh.tell() < 60_000_000:
            fh.write("".join(f"2001:db8:{(i >> 16) & 0xffff:x}:{i & 0xffff:x}::1\n" for i in range(line_no, line_no + 50_000)))
            line_no += 50_000
    # the child's own peak (VmHWM: ru_maxrss would count the pytest process it was forked from)
    code = ("import sys\n"
            "from sipguard.extras.blocklists import BlocklistError, Limits, load_blocklist\n"
            "try:\n    load_blocklist(sys.argv[1], limits=Limits(max_entries=int(sys.argv[2])))\n"
            "except BlocklistError as e:\n    print(e)\n"
            "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n")
    for max_entries, bound_mb in ((10_000, 80), (1_000_000, 260)):
        p = subprocess.run([sys.executable, "-c", code, str(big), str(max_entries)], capture_output=True, text=True,
                           timeout=120)
        out = p.stdout.splitlines()
        assert p.returncode == 0 and f"more than max_entries = {max_entries} entries" in out[0], (p.stdout, p.stderr)
        assert int(out[1]) < bound_mb * 1024, f"{int(out[1]) // 1024} MB peak for max_entries = {max_entries}"


def test_cli_import_honours_the_caps(tmp_path, routes) -> None:
    lst = tmp_path / "many.txt"
    lst.write_text("".join(f"198.51.{i >> 8}.{i & 255}\n" for i in range(1500)))
    p = _cli(tmp_path, "import", str(lst), "--max-entries", "1000")
    assert p.returncode == 1 and "more than max_entries = 1000 entries" in p.stderr, p.stderr
    conf = ('[enforce]\nbackend = "dryrun"\n[[blocklists]]\nname = "many"\nurl = "https://list.example/x"\n'
            "max_entries = 1200\n")
    p = _cli(tmp_path, "import", str(lst), cfg=conf)  # the configured list of that name: its max_entries
    assert p.returncode == 1 and "more than max_entries = 1200 entries" in p.stderr, p.stderr
    p = _cli(tmp_path, "import", str(lst), "--max-entries", "1500", "--json", cfg=conf)
    assert p.returncode == 0 and _json.loads(p.stdout)["added"] == 1500, p.stderr
    # redirects: refused by default, followed with --allow-private (or the configured list's allow_private)
    routes.routes["/r"] = ("redirect", f"{routes.base}/list")
    p = _cli(tmp_path, "import", f"{routes.base}/r", "--list", "web")
    assert p.returncode == 1 and "redirect to 127.0.0.1 refused" in p.stderr, p.stderr
    p = _cli(tmp_path, "import", f"{routes.base}/r", "--list", "web", "--allow-private", "--json")
    assert p.returncode == 0 and _json.loads(p.stdout)["added"] == 2, p.stderr
    conf = ('[enforce]\nbackend = "dryrun"\n[[blocklists]]\nname = "web"\nurl = "https://list.example/x"\n'
            "allow_private = true\n")
    p = _cli(tmp_path, "import", f"{routes.base}/r", "--list", "web", "--json", cfg=conf)
    assert p.returncode == 0 and _json.loads(p.stdout)["kept"] == 2, p.stderr


def test_the_daemons_refresher_uses_the_lists_limits(routes) -> None:
    routes.routes["/r"] = ("redirect", f"{routes.base}/list")
    cfgs = Config.model_validate({"blocklists": [
        {"name": "strict", "url": f"{routes.base}/r"},
        {"name": "inside", "url": f"{routes.base}/r", "allow_private": True},
        {"name": "small", "url": f"{routes.base}/list", "max_entries": 1},
    ]}).blocklists
    r = BlocklistRefresher(cfgs)
    r.tick(0.0)
    got: dict = {}
    wait_for(lambda: got.update({c.name: (e, err) for c, e, err in r.tick(1.0)}) or len(got) == 3, timeout=10.0)
    assert got["inside"] == (["198.51.100.1", "198.51.100.2"], None)
    assert got["strict"][0] is None and "redirect to 127.0.0.1 refused" in got["strict"][1]
    assert got["small"][0] is None and "more than max_entries = 1 entries" in got["small"][1]


# -- the reader in pieces decides exactly as the whole-text parser did ------------------------------------

def _reference(text: str, origin: str) -> list[str] | None:
    """The old parser (json.loads / splitlines over the whole text): the entries, or None if refused."""
    try:
        body = text.lstrip("\ufeff")
        first = body.lstrip()[:1]
        if first in ("{", "["):
            data = _json.loads(body)
            items = data.get("ipaddress") if isinstance(data, dict) else data
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                return None
            raw = [i.strip() for i in items]
        else:
            raw = [ln.split("#", 1)[0].split(";", 1)[0].strip() for ln in body.splitlines()]
        out: dict[str, None] = {}
        from sipguard.addresses import parse_target
        for item in raw:
            if item or first in ("{", "["):
                out[parse_target(item)] = None
        return list(out)
    except (ValueError, AttributeError):
        return None


ITEMS = ["198.51.100.1", "2001:db8::1", "203.0.113.0/24", " 198.51.100.2 ", "bad", "", "1.2.3.4/33"]
json_values = st.recursive(st.one_of(st.sampled_from(ITEMS), st.integers(), st.none(), st.booleans(),
                                     st.text(max_size=5)),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
                           max_leaves=12)
documents = st.one_of(
    st.lists(st.sampled_from(ITEMS), max_size=8).map(lambda xs: _json.dumps(xs)),
    st.tuples(st.fixed_dictionaries({"ipaddress": st.lists(st.sampled_from(ITEMS), max_size=8)},
                                    optional={"ID": json_values, "z": json_values}),
              st.sampled_from([None, 1])).map(lambda d: _json.dumps(d[0], indent=d[1])),
    json_values.map(_json.dumps),
    st.tuples(st.lists(st.sampled_from(ITEMS + ["# c", "; c", "198.51.100.3 # x", "\r", "\u2028", "\ufeff", "é"]),
                       max_size=8),
              st.sampled_from(["\n", "\r\n", "\r"])).map(lambda x: x[1].join(x[0])),
    st.text(alphabet='{}[]",: \n\\u01a9.', max_size=30),
)


@settings(max_examples=600, deadline=None)
@given(documents, st.lists(st.integers(1, 7), min_size=1, max_size=12))
def test_reading_in_pieces_decides_like_reading_whole(text: str, cuts: list[int]) -> None:
    data = text.encode("utf-8")
    pieces, i = [], 0  # bytes cut anywhere, also inside a UTF-8 sequence
    for n in cuts * 50:
        if i >= len(data):
            break
        pieces.append(data[i:i + n])
        i += n
    if i < len(data):
        pieces.append(data[i:])
    want = _reference(text, "x")
    try:
        got = _parse(_decoded(pieces, "x"), "x", "auto", None)
    except BlocklistError as exc:
        assert want is None, (text, exc)
        assert str(exc).startswith("x:"), exc
        return
    assert got == want, text
