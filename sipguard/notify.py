"""Tell systemd how `sipguard run` is doing (`Type=notify`): READY=1 once the bans are in the kernel,
the hooks started and the sources followed; STOPPING=1 when it shuts down.

The sd_notify protocol (sd_notify(3), "Notes": a stable interface other implementations may speak)
is one datagram of `KEY=VALUE` lines sent to the AF_UNIX socket named in $NOTIFY_SOCKET (a path, or
`@name` in the abstract namespace). Without $NOTIFY_SOCKET (run outside systemd, or by a unit that is
not Type=notify) nothing is sent and nothing fails. Written here instead of depending on a package:
`sdnotify` (PyPI) has had no release since 2017 and `systemd-python` is a C extension that would
need libsystemd's headers in the package's build root, for these few lines.

A send that fails (the socket gone, a full queue) is logged once and never stops the daemon: systemd
then reports the unit as failing to start (its TimeoutStartSec), which is the operator's clue.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("sipguard.notify")

_warned = False


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):  # abstract namespace: a leading NUL byte
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock:... and other forms systemd may use: not for us


def notify(state: str) -> bool:
    """Send *state* (e.g. "READY=1\\nSTATUS=...") to $NOTIFY_SOCKET; False when there is none or it failed."""
    global _warned
    value = os.environ.get("NOTIFY_SOCKET", "")
    if not value:
        return False
    addr = _address(value)
    if addr is None:
        if not _warned:
            log.warning("NOTIFY_SOCKET=%r: not an AF_UNIX path; systemd is not told the daemon is ready", value)
            _warned = True
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), addr)
        return True
    except OSError as exc:
        if not _warned:
            log.warning("cannot notify systemd at %s: %s", value, exc)
            _warned = True
        return False


def ready(status: str = "") -> bool:
    """READY=1, with a STATUS= line (`systemctl status` shows it) when given."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def stopping() -> bool:
    return notify("STOPPING=1")
