"""The daemon's doorbell (sipguard/doorbell.py): a ring ends the loop's wait; it never fails a command."""

from __future__ import annotations

import os
import stat
import threading
import time

from sipguard.doorbell import SOCKET_NAME, Doorbell, bell_path, ring
from sipguard.sources import FileFollower
from waiting import wait_for


def _bell(state, calls):  # noqa: ANN001, ANN202
    bell = Doorbell(state / SOCKET_NAME, lambda: calls.append(time.monotonic()))
    bell.start(None)  # type: ignore[arg-type]
    return bell


def test_a_ring_calls_wake_and_the_socket_is_private(tmp_path):
    calls: list[float] = []
    bell = _bell(tmp_path, calls)
    try:
        mode = stat.S_IMODE(os.stat(tmp_path / SOCKET_NAME).st_mode)
        assert mode & 0o077 == 0  # only the owner of the state rings
        assert ring(str(tmp_path / "sipguard.db")) is True
        wait_for(lambda: len(calls) == 1, timeout=2)
        for _ in range(50):  # a flood: each ring only ends a wait
            ring(str(tmp_path / "sipguard.db"))
        wait_for(lambda: len(calls) >= 2, timeout=2)
    finally:
        bell.close()
    assert not (tmp_path / SOCKET_NAME).exists()
    assert ring(str(tmp_path / "sipguard.db")) is False  # nobody there any more: no error either


def test_a_state_dir_too_long_for_sockaddr_un_still_rings(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    assert len(str(deep / SOCKET_NAME)) > 108
    calls: list[float] = []
    bell = _bell(deep, calls)
    try:
        assert ring(str(deep / "sipguard.db")) is True
        wait_for(lambda: calls, timeout=2)
    finally:
        bell.close()


def test_a_file_in_the_way_is_said_and_left_alone(tmp_path, caplog):
    (tmp_path / SOCKET_NAME).write_text("not a socket")
    bell = _bell(tmp_path, [])
    bell.close()
    assert (tmp_path / SOCKET_NAME).read_text() == "not a socket"
    assert "no doorbell" in caplog.text
    assert bell_path(":memory:") is None


def test_wake_ends_a_followers_wait_at_once(tmp_path):
    log = tmp_path / "k.log"
    log.touch()
    f = FileFollower([str(log)])
    f.start()
    try:
        threading.Timer(0.2, f.wake).start()
        t0 = time.monotonic()
        assert len(f.poll_batch(10.0)) == 0
        assert time.monotonic() - t0 < 5.0  # woken, not the 10 s timeout
    finally:
        f.close()
