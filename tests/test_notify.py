"""sipguard/notify.py and the daemon's READY=1 / STOPPING=1, against a real AF_UNIX datagram socket
named in $NOTIFY_SOCKET (what systemd gives a Type=notify unit), a path and an abstract name."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from sipguard import notify
from sipguard.actions import manual_ban
from sipguard.addresses import AllowList
from sipguard.config import Config
from sipguard.enforce.dryrun import DryRunEnforcer
from sipguard.store import Store
from sipguard.wiring import build_daemon


@pytest.fixture
def listener(tmp_path, monkeypatch):
    """A bound datagram socket, its path in $NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield s
    s.close()


def test_nothing_sent_outside_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready() is False and notify.stopping() is False


def test_ready_and_stopping_reach_the_socket(listener):
    assert notify.ready("hello") is True
    assert listener.recv(4096) == b"READY=1\nSTATUS=hello"
    assert notify.stopping() is True
    assert listener.recv(4096) == b"STOPPING=1"


def test_abstract_socket(monkeypatch):
    name = f"sipguard-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(b"\0" + name.encode())
        s.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.ready() is True
        assert s.recv(4096) == b"READY=1"


def test_a_gone_socket_never_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-here"))
    assert notify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert notify.ready() is False


def test_daemon_is_ready_only_with_its_bans_enforced_and_says_stopping(tmp_path, listener):
    log = tmp_path / "kamailio.log"
    log.touch()
    cfg = Config.model_validate({"allowlist": {"include_host_addresses": False}, "daemon": {"control_interval": 0.05}})
    store = Store.open_state_dir(tmp_path / "state")
    # a ban in force before the daemon starts: READY=1 must come after it is back in the enforcer
    manual_ban(store, "198.18.7.1", 3600, "manual", AllowList([], include_host=False))
    enforcer = DryRunEnforcer()
    daemon = build_daemon(cfg, store, enforcer, logs=[str(log)])
    got: list[tuple[bytes, set[str], bool]] = []

    def receive():
        for _ in range(2):
            try:
                data = listener.recv(4096)
            except OSError:
                return
            got.append((data, {e.ip for e in enforcer.entries()}, daemon.ready.is_set()))

    rx = threading.Thread(target=receive, daemon=True)
    rx.start()
    t = threading.Thread(target=daemon.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    assert got, "no READY=1 from the daemon"
    data, enforced, following = got[0]
    assert data.startswith(b"READY=1\n") and b"STATUS=bans restored; following " in data, data
    assert "198.18.7.1" in enforced and following  # the ban was in the kernel (here: dry run) and the log followed
    daemon.stop()
    t.join(10)
    rx.join(10)
    assert not t.is_alive()
    assert [g[0] for g in got[1:]] == [b"STOPPING=1"]
    store.close()
