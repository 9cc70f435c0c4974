"""The firewall's own files under STATE/firewall/: the lock, atomic writes, the pending confirmation.

Files: `lock` (flock: one apply / confirm / revert / remove at a time), `before-v4.rules` / `-v6.rules` (the
tables before the first apply, for `remove`), `applied.json` (the flavour and families of the last apply),
`pending.json` with `prev-TOKEN-v*.rules` (an apply waiting for `confirm`), `confirmed-TOKEN` markers and
`revert.log`. Only files in that directory; never a netfilter table.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Iterator

from ..errors import SipguardError


def fw_dir(state_dir: Path) -> Path:
    """STATE/firewall, created (mode 0700) when missing."""
    d = Path(state_dir) / "firewall"
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise SipguardError(f"cannot create {d}: {exc}") from None
    return d


@contextlib.contextmanager
def locked(d: Path) -> Iterator[None]:
    """Hold the firewall directory's lock (exclusive flock on d/lock) for the block."""
    with open(d / "lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and rename: a reader sees the old or the new text, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_pending(d: Path) -> dict | None:
    """The apply waiting for confirmation (pending.json), None when there is none."""
    try:
        return json.loads((d / "pending.json").read_text())
    except (OSError, ValueError):
        return None


def drop_pending(d: Path, token: str | None = None) -> None:
    """Forget the pending apply (only if it is `token`'s, when given) and its saved previous tables."""
    p = read_pending(d)
    if p and (token is None or p.get("token") == token):
        (d / "pending.json").unlink(missing_ok=True)
        for fam in (4, 6):
            (d / f"prev-{p.get('token')}-v{fam}.rules").unlink(missing_ok=True)
