"""The journal source: a real systemd-journald in a private mount+PID namespace, followed through
journalctl, with the cursor persisted so a restart resumes exactly."""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from sipguard.config import Config
from sipguard.wiring import build_daemon
from sipguard.enforce.dryrun import DryRunEnforcer
from sipguard.formats import JournalParser, message_text
from sipguard.model import Line
from sipguard.store import Store
from waiting import wait_for

JOURNALD = "/lib/systemd/systemd-journald"


def _entry(**kw) -> Line:
    return Line("journal:id=kamailio", json.dumps(kw).encode(), 0)


def test_parser_builds_records():
    p = JournalParser(trust_plain_stderr=True)  # plain `kamailio -E` text is read only so since issue 12
    text = "NOTICE: <script>: auth failed for user a\rb from 198.18.0.10:5060 method REGISTER"
    [r] = p.feed(_entry(MESSAGE=list(text.encode()), __REALTIME_TIMESTAMP="1796008463136064",
                        SYSLOG_IDENTIFIER="kamailio", _PID="77", _TRANSPORT="journal", _HOSTNAME="edge"))
    assert (r.text, r.time, r.pid, r.program, r.host) == (text, 1796008463.136064, 77, "kamailio", "edge")
    assert p.stats["binary_message"] == 1
    # kamailio -E under systemd: stdout lines must carry rank(pid) of the entry's own process
    [r2] = p.feed(_entry(MESSAGE=" 1(77) NOTICE: <script>: x", _PID="77", _TRANSPORT="stdout"))
    assert (r2.text, r2.rank) == ("NOTICE: <script>: x", 1)
    assert p.feed(_entry(MESSAGE="NOTICE: <script>: auth failed ... from 1.2.3.4:5060", _PID="77",
                         _TRANSPORT="stdout")) == []
    assert p.feed(_entry(MESSAGE=" 1(99) NOTICE: forged", _PID="77", _TRANSPORT="stdout")) == []
    assert p.stats["forged"] == 2
    assert p.feed(Line("j", b"{not json", 0)) == [] and p.stats["garbage"] == 1
    assert message_text(None) is None


class RealJournal:
    """systemd-journald as PID 1 of a private PID+mount namespace. Its sockets and journal files are
    bind-mounted from a temp dir, so this process writes and reads them; nothing of the host's
    journal is touched (private tmpfs over /run/systemd, bind over /run/log, own cgroup2 mount)."""

    def __init__(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="sgo-journal-"))
        self.sock = self.tmp / "sock"
        self.jdir = self.tmp / "log"
        self.sock.mkdir()
        self.jdir.mkdir()
        self.proc = None
        self.pid = None

    def __enter__(self):
        script = self.tmp / "run.sh"
        script.write_text(f"""set -e
mount -t tmpfs -o mode=755,size=4m sgo-run /run/systemd
mkdir -p /run/systemd/journal
mount --bind {self.sock} /run/systemd/journal
mount --bind {self.jdir} /run/log
if [ -d /var/log/journal ]; then mount -t tmpfs -o size=1m sgo-vlj /var/log/journal; fi
mount -t tmpfs -o size=1m sgo-cg /sys/fs/cgroup
mount -t cgroup2 none /sys/fs/cgroup
exec {JOURNALD}
""")
        self.proc = subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "--propagation", "private",
                                      "sh", str(script)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.tmp / "journald.err", "wb"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if (self.sock / "socket").exists() and (self.sock / "dev-log").exists():
                break
            if self.proc.poll() is not None:
                raise RuntimeError("journald did not start: " + (self.tmp / "journald.err").read_text())
            time.sleep(0.05)
        else:
            self.__exit__()
            raise RuntimeError("journald sockets missing")
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        self.pid = int(kids[0])  # journald's PID in our namespace (unshare's forked child)
        self.journalctl = self.tmp / "journalctl"
        self.journalctl.write_text(f'#!/bin/sh\nexec journalctl --directory={self.jdir}/journal "$@"\n')
        self.journalctl.chmod(0o755)
        return self

    def __exit__(self, *exc):
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)  # PID 1 of its namespace: the namespace ends with it
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def syslog(self, text: str, ident: str = "kamailio") -> None:
        """Like Kamailio's syslog(3): a datagram to /dev/log (local0.notice)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.sendto(f"<133>{time.strftime('%b %d %H:%M:%S')} {ident}[4242]: {text}".encode(), str(self.sock / "dev-log"))
        s.close()

    def native(self, text: str, ident: str = "kamailio") -> None:
        """The journal's native protocol (a CR stays in MESSAGE: journalctl -o json shows bytes)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.sendto(f"MESSAGE={text}\nSYSLOG_IDENTIFIER={ident}\nPRIORITY=5\n".encode(), str(self.sock / "socket"))
        s.close()




def _auth(ip: str, user: str = "100") -> str:
    return f"NOTICE: <script>: auth failed for user {user} from {ip}:5060 method REGISTER"


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(JOURNALD), reason="needs root and systemd-journald")
def test_follows_real_journal_and_resumes_at_cursor(tmp_path):
    with RealJournal() as j:
        j.syslog(_auth("198.18.9.9"))  # before sipguard's first start: not read (from_start = false)
        time.sleep(0.3)
        cfg = Config.model_validate({"allowlist": {"include_host_addresses": False},
                                     "daemon": {"control_interval": 0.05},
                                     "sources": {"logs": [], "journal_identifiers": ["kamailio"],
                                                 "journalctl": str(j.journalctl)}})

        def start():
            store = Store.open_state_dir(tmp_path / "st")
            enf = DryRunEnforcer()
            d = build_daemon(cfg, store, enf, logs=[])
            th = threading.Thread(target=d.run, daemon=True)
            th.start()
            wait_for(lambda: d.ready.is_set(), timeout=10.0)
            return d, th, store, enf

        def stop(d, th, store):
            d.stop()
            th.join(10)
            assert not th.is_alive()
            store.close()

        d, th, store, enf = start()
        try:
            time.sleep(0.5)  # journalctl is at the end of the journal
            j.syslog(_auth("198.18.9.1"))
            j.native(_auth("198.18.9.1", "a\rb"))  # MESSAGE as a byte array
            j.syslog("NOTICE: <script>: REGISTER success for user 7 from 198.18.9.5:5060", ident="other-daemon")
            j.syslog(_auth("198.18.9.1"))
            wait_for(lambda: {e.ip for e in enf.entries()} == {"198.18.9.1"}, timeout=10.0)
            wait_for(lambda: store.count_events() == 3, timeout=5.0)  # the kernel comes first, the store next
            assert store.count_events() == 3
        finally:
            stop(d, th, store)
        # written while sipguard is down: read after the restart, nothing before it again
        j.syslog(_auth("198.18.9.2"))
        j.syslog(_auth("198.18.9.2"))
        j.syslog(_auth("198.18.9.2"))
        d, th, store, enf = start()
        try:
            wait_for(lambda: "198.18.9.2" in {e.ip for e in enf.entries()}, timeout=10.0)
            time.sleep(0.3)
            assert store.count_events() == 6
            ips = [r[0] for r in store.conn.execute("SELECT ip FROM events ORDER BY id")]
            assert ips == ["198.18.9.1"] * 3 + ["198.18.9.2"] * 3
            assert store.get_meta("journal_cursor:journal:id=kamailio").startswith("s=")
        finally:
            stop(d, th, store)
