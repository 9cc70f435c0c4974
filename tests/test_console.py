"""The operator's console: output that never cuts, and attacker text printed as text.

Hostile strings (ANSI and OSC sequences, rich markup, newlines, bidi overrides, 10 KB values, full-length
IPv6 addresses) go through every verb that prints data — `list` (every --output, piped and on a
pseudo-terminal 40 and 80 columns wide), `ban`'s confirmation, `status`, the fleet's status lines,
`test-filter`, `scan` (and its progress bar) — and through the daemon's own log. Every CLI run uses a
`backend = "dryrun"` config: nothing here touches the host's kernel.
"""

from __future__ import annotations

import csv
import fcntl
import gzip
import io
import json
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipguard.cli.output import BLOCK, Column, open_rows, output_format
from sipguard.text import EscapingFormatter, clip, printable

ROOT = Path(__file__).resolve().parents[1]
V6 = "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"  # 39 characters, the longest an address gets
LINK = "[link=https://evil.example]click[/link]"
OSC = "\x1b]0;pwn\x07"
HOSTILE = f"{LINK} [/x] [bold]b {OSC}\x1b[2J\x1b[31mred\r\nINFO forged\u202egnp.exe\x7f\x9b"
# what a terminal must never receive from data: an escape sequence, a CR/LF inside a line, BEL, DEL, C1, bidi
RAW = re.compile("\x1b\\]|\x1b\\[2J|\x1b\\[31m|\x07|\r(?!\n)|\x7f|\x9b|\u202e")
HEAD = "2026-11-30T02:08:09.376964+00:00 sip1 kamailio[23875]: "


# -- the escaping rule --------------------------------------------------------------------------
def test_printable_escapes_every_control_and_keeps_the_rest():
    assert printable("198.18.0.1 sip:auth") == "198.18.0.1 sip:auth"
    assert printable(OSC) == "\\x1b]0;pwn\\x07"
    assert printable("a\r\nb\tc\x00\x7f\x85\x9b") == "a\\x0d\\x0ab\\x09c\\x00\\x7f\\x85\\x9b"
    assert printable("\u202eabc\u2066\u200f\u2028") == "\\u202eabc\\u2066\\u200f\\u2028"
    assert printable("héllo ünïcode 日本") == "héllo ünïcode 日本"  # printable text is never touched
    assert printable(LINK) == LINK  # markup is the printer's business: the text stays as it is
    long = "x" * 10_000 + "\x1b"
    assert printable(long) == "x" * 10_000 + "\\x1b"  # never cut
    assert printable(None) == "" and printable(5) == "5"


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_printable_output_is_always_printable_and_never_shorter(s):
    p = printable(s)
    assert p.isprintable() and len(p) >= len(s)
    assert printable(p) == p  # escaping twice changes nothing
    if s.isprintable():
        assert p == s


def test_clip_marks_what_it_leaves_out():
    assert clip("short", 10) == "short"
    c = clip("a" * 500 + "\x1b", 400)
    assert c.startswith("a" * 400) and c.endswith("…[+104 chars]") and "\x1b" not in c


def test_sipguards_own_log_lines_cannot_be_forged_or_coloured():
    buf = io.StringIO()
    h = logging.StreamHandler(buf)
    h.setFormatter(EscapingFormatter("%(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("sipguard.test-console")
    log.addHandler(h)
    log.propagate = False
    try:
        log.warning("cluster: %s banned %s (%s)", "node\nINFO sipguard.daemon: forged", V6, HOSTILE)
        try:
            raise ValueError("bad \x1b[31m value\r")
        except ValueError:
            log.exception("error with %s", OSC)
    finally:
        log.removeHandler(h)
    text = buf.getvalue()
    assert not RAW.search(text), repr(text)
    lines = text.splitlines()
    assert lines[0].startswith("WARNING sipguard.test-console: cluster: node\\x0aINFO sipguard.daemon: forged")
    assert not any(ln.startswith("INFO") for ln in lines)
    assert V6 in lines[0] and LINK in lines[0]
    assert "bad \\x1b[31m value\\x0d" in text


# -- the output module --------------------------------------------------------------------------
COLS = [Column("ip", whole=True), Column("reason"), Column("created", whole=True), Column("n", right=True)]
ROWS = [[V6, HOSTILE, "2026-12-01T20:05:14Z", 3], ["198.18.0.1", "x" * 10_000, "2026-12-01T20:05:15Z", 12]]


def _render(fmt, rows=ROWS, **kw):
    buf = io.StringIO()
    with open_rows(COLS, fmt, stream=buf, **kw) as w:
        w.rows(rows)
    return buf.getvalue()


def test_plain_is_aligned_columns_with_every_value_whole():
    out = _render("plain")
    lines = out.splitlines()
    assert len(lines) == 3 and lines[0].split() == ["ip", "reason", "created", "n"]
    assert lines[1].startswith(V6 + "  ") and lines[2].startswith("198.18.0.1" + " " * (len(V6) - 10 + 2))
    assert "x" * 10_000 in lines[2] and "…" not in out and "─" not in out and "│" not in out
    assert not RAW.search(out)
    assert printable(HOSTILE) in lines[1]


def test_csv_and_json_carry_the_values_whole():
    rows = list(csv.reader(io.StringIO(_render("csv"))))
    assert rows[0] == ["ip", "reason", "created", "n"]
    assert rows[1] == [V6, printable(HOSTILE), "2026-12-01T20:05:14Z", "3"]
    assert rows[2][1] == "x" * 10_000
    data = json.loads(_render("json"))
    assert data[0] == {"ip": V6, "reason": HOSTILE, "created": "2026-12-01T20:05:14Z", "n": 3}
    assert not RAW.search(_render("json"))  # json.dumps escapes the controls itself
    assert json.loads(_render("json", rows=[])) == []


def _cells(text: str, col: int) -> list[str]:
    """The fragments of column `col` of a rich table, per line (a folded value spans several)."""
    return [ln.split("│")[col].strip() for ln in text.splitlines() if ln.count("│") == len(COLS) - 1]


def test_a_terminal_too_narrow_for_the_columns_shows_rows():
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=30, force_terminal=True, color_system=None)
    _render("table", console=console)
    out = buf.getvalue()
    assert "…" not in out and not RAW.search(out) and "│" not in out
    flat = out.replace("\n", "")  # a value wider than the terminal folds over lines, whole
    assert f"ip: {V6}reason: " in flat and printable(HOSTILE) in flat and "x" * 10_000 in flat and "created: 2026-12-01T20:05:15Z" in out


@pytest.mark.parametrize("width", [40, 60, 80, 120, 200])
def test_a_table_on_a_terminal_folds_but_never_cuts(width):
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=True, color_system=None, markup=True)
    assert _render("table", console=console, title=f"[bold]{LINK}[/bold]") == ""  # all on the console
    out = buf.getvalue()
    assert "…" not in out and not RAW.search(out), out
    assert f"[bold]{LINK}[/bold]" in out  # the title is text too
    ips = "".join(_cells(out, 0))
    assert V6 in ips and "198.18.0.1" in ips
    reasons = "".join(_cells(out, 1)).replace(" ", "")
    assert printable(HOSTILE).replace(" ", "") in reasons and "x" * 10_000 in reasons
    times = "".join(_cells(out, 2))
    assert "2026-12-01T20:05:14Z" in times and "2026-12-01T20:05:15Z" in times


@pytest.mark.parametrize("terminal", [True, False])
def test_a_long_table_keeps_one_layout_across_blocks(terminal):
    """The first block on a terminal is rich's, the rest (and a table sent to a file) sipguard's own
    drawing in the same widths: columns line up from the first row to the last, values whole."""
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=100, force_terminal=terminal, color_system=None) if terminal else None
    rows = [[f"198.18.{i // 256}.{i % 256}", "sip:auth", "2026-12-01T20:05:14Z", i] for i in range(BLOCK + 50)]
    rows[BLOCK + 7] = [V6, HOSTILE, "2026-12-01T20:05:15Z", 1]  # a wide value in a later block
    out = _render("table", rows=rows, console=console) if not terminal else \
        (_render("table", rows=rows, console=console), buf.getvalue())[1]
    body = [ln for ln in out.splitlines() if ln.count("│") == 3]
    assert {ln.index("│") for ln in body} == {body[0].index("│")}, "columns move between blocks"
    ips = [ln.split("│")[0].strip() for ln in body]
    assert all(f"198.18.{i // 256}.{i % 256}" in ips for i in range(BLOCK + 50) if i != BLOCK + 7)
    assert V6 in "".join(ips) and "…" not in out and not RAW.search(out)
    assert printable(HOSTILE).replace(" ", "") in "".join(ln.split("│")[1].strip() for ln in body).replace(" ", "")


def test_rows_are_held_a_block_at_a_time():
    held = []

    class Probe(io.StringIO):
        pass

    buf = Probe()
    with open_rows([Column("ip"), Column("reason")], "plain", stream=buf) as w:
        for i in range(BLOCK * 5 + 3):
            w.row([f"198.18.{i // 256 % 256}.{i % 256}", "r"])
            held.append(len(w._held))
    assert max(held) < BLOCK and w.count == BLOCK * 5 + 3
    assert len(buf.getvalue().splitlines()) == BLOCK * 5 + 4


def test_output_format_defaults_and_errors():
    from sipguard.errors import SipguardError

    assert output_format(None, stream=io.StringIO()) == "plain"
    assert output_format(None, True) == "json" and output_format("csv") == "csv"
    with pytest.raises(SipguardError, match="--output: expected one of"):
        output_format("yaml")
    with pytest.raises(SipguardError, match="choose one"):
        output_format("csv", True)


# -- the CLI, piped and on a pseudo-terminal ----------------------------------------------------
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SIPGUARD_CONFIG", "COLUMNS", "LINES")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["TERM"] = "xterm-256color"
    return env


@pytest.fixture
def cli(tmp_path):
    cfg = tmp_path / "sipguard.toml"
    # dryrun: these tests run in the host's network namespace and must never touch its firewall
    cfg.write_text('[allowlist]\ninclude_host_addresses = false\n[enforce]\nbackend = "dryrun"\n')
    base = [sys.executable, "-m", "sipguard", "--config", str(cfg), "--state-dir", str(tmp_path / "state")]

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([*base, *args], capture_output=True, text=True, env=_env(), timeout=60)
        if check:
            assert p.returncode == 0, (p.stdout, p.stderr)
        return p

    run.base = base  # type: ignore[attr-defined]
    return run


def on_pty(argv: list[str], cols: int = 80, stderr_pipe: bool = False, timeout: float = 60) -> tuple[str, str]:
    """Run argv with stdout (and stderr unless `stderr_pipe`) on a pseudo-terminal `cols` wide; its output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, cols, 0, 0))
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave,
                         stderr=subprocess.PIPE if stderr_pipe else slave, env=_env(), close_fds=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 0.5)
            if r:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed its end
                    break
                if not data:
                    break
                chunks.append(data)
            elif p.poll() is not None:
                break
        err = p.stderr.read().decode() if stderr_pipe and p.stderr else ""
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)
        os.close(master)
    assert p.returncode == 0, (b"".join(chunks), err)
    return b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n"), err


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_ban_confirmation_prints_a_hostile_reason_literally(cli):
    p = cli("ban", V6, "--for", "2h", "--reason", HOSTILE)
    assert p.stdout == f"banned {V6} for 2h ({printable(HOSTILE)})\n", p.stdout
    p = cli("ban", "198.18.0.7", "--reason", "[/x]")  # a closing tag that opens nothing crashes nothing
    assert "(manual)" not in p.stdout and "[/x]" in p.stdout
    assert json.loads(cli("list", "--json").stdout)[0]["reason"] == HOSTILE  # stored as given


def test_ban_confirmation_on_a_terminal(cli):
    text, _ = on_pty([*cli.base, "ban", V6, "--for", "1h", "--reason", HOSTILE], cols=40)
    plain = ANSI.sub("", text)
    assert not RAW.search(plain), repr(plain)
    assert f"banned {V6} for 1h ({printable(HOSTILE)})" in plain.replace("\n", "")


def test_firewall_output_is_printed_line_by_line_escaped(capsys):
    from sipguard.cli.firewall import _echo, _warn

    _echo(f"-A SIPGUARD -m comment --comment \"{OSC}{LINK}\" -j DROP\nin sync")
    _warn(f"the rules of {V6}\x1b[2J")
    got = capsys.readouterr()
    assert not RAW.search(got.out + got.err)
    assert got.out == f"-A SIPGUARD -m comment --comment \"{printable(OSC)}{LINK}\" -j DROP\nin sync\n"
    assert got.err == f"the rules of {V6}\\x1b[2J\n"


def _hostile_bans(cli):
    cli("ban", V6, "--for", "2h", "--reason", HOSTILE)
    cli("ban", "198.18.0.7", "--for", "1h", "--reason", "x" * 10_000)
    cli("ban", "198.18.4.0/24", "--for", "permanent")


def test_list_piped_shows_every_full_value_in_plain_columns(cli, tmp_path):
    _hostile_bans(cli)
    p = cli("list")
    assert not RAW.search(p.stdout) and "…" not in p.stdout and "│" not in p.stdout
    lines = p.stdout.splitlines()
    assert lines[0].split()[:4] == ["ip", "reason", "created", "expires"]
    by_ip = {ln.split()[0]: ln for ln in lines[1:]}
    assert set(by_ip) == {V6, "198.18.0.7", "198.18.4.0/24"}
    assert printable(HOSTILE) in by_ip[V6] and "x" * 10_000 in by_ip["198.18.0.7"]
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ  \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", by_ip[V6])
    # `> f` is the same as `| cat`
    f = tmp_path / "list.txt"
    with f.open("w") as fh:
        subprocess.run([*cli.base, "list"], stdout=fh, env=_env(), timeout=60, check=True)
    written = f.read_text().splitlines()
    assert [ln.split()[0] for ln in written] == [ln.split()[0] for ln in lines]  # same rows, same order
    assert printable(HOSTILE) in written[1 + list(by_ip).index(V6)] and not RAW.search(f.read_text())
    # awk can take a column
    awk = subprocess.run(["awk", "NR > 1 {print $1}"], input=p.stdout, capture_output=True, text=True, timeout=10)
    assert sorted(awk.stdout.split()) == sorted([V6, "198.18.0.7", "198.18.4.0/24"])
    rows = list(csv.DictReader(io.StringIO(cli("list", "--output", "csv").stdout)))
    assert {r["ip"] for r in rows} == {V6, "198.18.0.7", "198.18.4.0/24"}
    assert {r["reason"] for r in rows} >= {printable(HOSTILE), "x" * 10_000}
    assert {b["ip"] for b in json.loads(cli("list", "--output", "json").stdout)} == set(by_ip)
    assert cli("list", "--output", "yaml", check=False).returncode == 1


@pytest.mark.parametrize("cols", [40, 80])
def test_list_on_a_terminal_is_a_table_that_never_cuts(cli, cols):
    _hostile_bans(cli)
    text, _ = on_pty([*cli.base, "list"], cols=cols)
    plain = ANSI.sub("", text)
    assert not RAW.search(plain), repr(plain[:2000])
    assert "…" not in plain and "3 bans in force" in plain
    if cols == 40:
        assert V6 in plain  # by rows: the address on a line of its own
    else:
        assert "┃" in plain or "│" in plain
        body = [ln for ln in plain.splitlines() if ln.count("│") == 6]  # 7 columns
        cells = [ln.split("│")[0].strip() for ln in body]
        joined = "".join(cells)
        assert V6 in joined and "198.18.4.0/24" in joined
        reasons = "".join(ln.split("│")[1].strip() for ln in body)
        assert printable(HOSTILE).replace(" ", "") in reasons.replace(" ", "") and "x" * 10_000 in reasons


def test_list_filters(cli):
    _hostile_bans(cli)
    cli("ban", "2001:db8::7", "--for", "1h", "--reason", "blocklist:apiban")

    def ips(*args):
        return {b["ip"] for b in json.loads(cli("list", "--json", *args).stdout)}

    assert ips("198.18.4.9") == {"198.18.4.0/24"}  # an address finds the network that holds it
    assert ips("198.18.0.0/16") == {"198.18.0.7", "198.18.4.0/24"}  # a CIDR finds what lies inside
    assert ips("2001:db8::/32") == {V6, "2001:db8::7"}
    assert ips("--reason", "blocklist") == {"2001:db8::7"} == ips("--jail", "blocklist")
    assert ips("--reason", "blocklist:apiban") == {"2001:db8::7"} and ips("--reason", "blocklist:other") == set()
    assert ips("--manual") == {V6, "198.18.0.7", "198.18.4.0/24", "2001:db8::7"} and ips("--auto") == set()
    assert ips("--since", "1h") == ips() and ips("--since", "2099-01-01T00:00:00Z") == set()
    assert cli("list", "--count").stdout == "4\n"
    assert cli("list", "--count", "198.18.0.0/15").stdout == "2\n"
    assert json.loads(cli("list", "--count", "--json", "--reason", "manual").stdout) == {"count": 1}
    assert cli("list", "--count", "--auto").stdout == "0\n"
    for bad, needle in ((["not-an-address"], "not an IP address"), (["--since", "yesterday-ish"], "--since")):
        p = cli("list", *bad, check=False)
        assert p.returncode == 1 and needle in p.stderr


def test_status_prints_stored_values_literally(cli, tmp_path):
    cli("ban", V6, "--reason", HOSTILE)
    sys.path.insert(0, str(ROOT))
    from sipguard.store import Store

    store = Store.open_state_dir(tmp_path / "state")
    store.set_meta("status", json.dumps({"running": True, "heartbeat": time.time(), "pid": 1,
                                         "enforcer": f"dryrun {LINK}", "logs": [f"/var/log/k{OSC}.log", V6],
                                         "filters": {f"evil{OSC}": 1}}))
    store.close()
    for text in (cli("status").stdout, ANSI.sub("", on_pty([*cli.base, "status"], cols=40)[0])):
        assert not RAW.search(text), repr(text)
        assert f"dryrun {LINK}" in text and f"/var/log/k{printable(OSC)}.log, {V6}" in text
        assert f"evil{printable(OSC)}=1" in text


def test_status_output_modes(cli, tmp_path):
    """`status --output json|csv|plain`: the same facts; csv rows are the JSON's leaves, values whole."""
    cli("ban", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", "--reason", HOSTILE)
    info = json.loads(cli("status", "--output", "json").stdout)
    assert set(info) == set(json.loads(cli("status", "--json").stdout)) and info["bans"] == 1
    rows = dict(csv.reader(io.StringIO(cli("status", "--output", "csv").stdout)))
    assert rows.pop("key") == "value" and rows["bans"] == "1" and rows["daemon"] == "not running"
    assert rows["database"] == info["database"] and "source_choice.reason" in rows
    assert "bans in force: 1" in cli("status", "--output", "plain").stdout
    p = cli("status", "--output", "xml", check=False)
    assert p.returncode == 1 and "--output" in p.stderr


def test_fleet_status_lines_print_node_names_literally(capsys):
    from sipguard.cli.app import out
    from sipguard.cluster.status import cluster_lines

    info = {"node": f"edge{OSC}\n[red]x[/red]", "redis": "redis://127.0.0.1:6379", "reachable": True, "bans": 1,
            "this_node": {"heartbeat": time.time(), "in_sync": True},
            "nodes": [{"node": f"{LINK}\x1b[2J", "alive": True, "in_sync": True, "age": 0.5}]}
    for line in cluster_lines(info):
        out.print(line)
    text = capsys.readouterr().out
    assert not RAW.search(text), repr(text)
    assert f"edge{printable(OSC)}\\x0a[red]x[/red]" in text and f"{LINK}\\x1b[2J" in text


# -- test-filter and scan -----------------------------------------------------------------------
def _attack_log(tmp_path: Path, n: int = 12) -> Path:
    log = tmp_path / "kamailio.log"
    lines = []
    for i in range(n):
        ua = f"friendly-scanner {OSC}{LINK}\x1b[2J\u202e" + ("y" * 10_000 if i == 0 else "")
        lines.append(f"{HEAD}WARNING: <script>: Blocked scanner UA '{ua}' from [{V6}]:5060\n")
    lines.append(f"{HEAD}nothing to see {OSC}{LINK} here\n")
    log.write_text("".join(lines))
    return log


def test_test_filter_prints_log_lines_escaped_and_marks_long_ones(cli, tmp_path):
    log = _attack_log(tmp_path)
    p = cli("test-filter", str(log), "--show-missed")
    assert not RAW.search(p.stdout), repr(p.stdout[:3000])
    assert f"{V6}  <-  " in p.stdout and printable(f"{OSC}{LINK}\x1b[2J\u202e") in p.stdout
    assert re.search(r" …\[\+\d+ chars\]", p.stdout)  # the 10 KB line: a sample, and it says so
    assert f"nothing to see {printable(OSC)}{LINK} here" in p.stdout
    table = [ln for ln in p.stdout.splitlines() if ln.startswith("scanner-ua ")]
    assert table and table[0].split()[1] == "12"
    data = json.loads(cli("test-filter", str(log), "--output", "json").stdout)
    assert {"filter": "scanner-ua", "matched": 12, "missed": 1, "ignored": 0} in data
    text, _ = on_pty([*cli.base, "test-filter", str(log), "--show-missed"], cols=60)
    assert not RAW.search(ANSI.sub("", text)) and "…\n" not in text


def test_scan_shows_full_addresses_piped_and_on_a_terminal(cli, tmp_path):
    log = _attack_log(tmp_path)
    p = cli("scan", str(log))
    assert not RAW.search(p.stdout) and "…" not in p.stdout
    assert re.search(rf"^{re.escape(V6)}  +scanner-ua +\d+ +\d", p.stdout, re.M), p.stdout
    assert p.stderr == ""  # no progress bar when piped
    rows = list(csv.DictReader(io.StringIO(cli("scan", str(log), "--output", "csv").stdout)))
    assert rows[0]["ip"] == V6 and rows[0]["filters"] == "scanner-ua"
    assert json.loads(cli("scan", str(log), "--output", "json").stdout)["bans"][0]["ip"] == V6
    text, _ = on_pty([*cli.base, "scan", str(log)], cols=40)
    assert V6 in ANSI.sub("", text) and "…" not in text


def test_scan_progress_bar_on_a_terminal_only(cli, tmp_path):
    gz = tmp_path / "old.log.gz"
    with gzip.open(gz, "wt") as f:
        f.write(_attack_log(tmp_path).read_text())
    piped = cli("scan", str(gz))
    assert piped.stderr == "" and V6 in piped.stdout
    text, _ = on_pty([*cli.base, "scan", str(gz)], cols=100)  # stdout and stderr a terminal
    assert "scanning" in text
    assert re.search(r"\d+(\.\d+)?/\d+(\.\d+)? [kM]?B", ANSI.sub("", text)), repr(text)
    out, err = on_pty([*cli.base, "scan", str(gz)], cols=100, stderr_pipe=True)  # stderr piped: no bar
    assert err == "" and "scanning" not in out and V6 in out


# -- the daemon's own log -----------------------------------------------------------------------
def test_the_daemons_log_lines_escape_data(cli, tmp_path):
    log = tmp_path / "k\nINFO sipguard.daemon: forged\x1b[31m.log"  # a path is data too
    log.write_text(_attack_log(tmp_path).read_text())
    p = cli("run", "--dry-run", "--from-start", "--log", str(log), "--max-seconds", "3")
    assert not RAW.search(p.stderr), repr(p.stderr)
    assert not any(ln.startswith("INFO sipguard.daemon: forged") for ln in p.stderr.splitlines())
    assert "k\\x0aINFO sipguard.daemon: forged\\x1b[31m.log" in p.stderr
    assert V6 in p.stderr  # the ban it made, address whole


def test_list_json_keys_are_the_documented_ones(cli):
    """README's `list --json` paragraph names every key a row has, no more, no less."""
    readme = (ROOT / "README.md").read_text()
    para = readme[readme.index("`list --json` prints an array of bans"):]
    para = para[:para.index("`list` streams")]
    para = para[:para.index("a stored time no calendar holds")]
    documented = set(re.findall(r"`([a-z_]+)`", para)) - {"null", "true"}
    cli("ban", "198.18.0.7", "--reason", "manual")
    (row,) = json.loads(cli("list", "--json").stdout)
    assert set(row) == documented - {"kernel", "kernel_only"}, (set(row), documented)
    assert {"kernel", "kernel_only"} <= documented
