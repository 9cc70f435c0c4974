"""Cached Debian root file systems (debootstrap, kept as tar.zst) for building and testing the package.

What it is for: `packaging/build_deb.py` builds the .deb inside a clean root of the target distribution
(the way sbuild/pbuilder do), and `tests/lab/container.py` boots one with systemd as PID 1. Both ask
`ensure(dist, flavour)` for a tar of a root; the first call runs debootstrap (~40 s) and apt inside the
root, later calls find the tar in the cache and return at once.

The cache dir is $SIPGUARD_BUILD_CACHE, else /var/cache/sipguard-build as root, else
$XDG_CACHE_HOME/sipguard-build. A tar's name carries a hash of the package list that made it, so a changed
list builds a new one. Nothing here boots anything or touches the host's network configuration: apt and
debootstrap inside a root use the host's network as any package build does.

Stdlib only: the build runs before any virtual environment exists.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIRROR = os.environ.get("SIPGUARD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DISTS = {"bookworm": "12", "trixie": "13"}
BASE = ["systemd", "systemd-sysv", "dbus", "ca-certificates"]
FLAVOURS = {
    # the build root: a venv at /opt/sipguard and python-iptables' C extension
    "build": ["python3-venv", "python3-dev", "gcc", "libc6-dev"],
    # the test root: what an operator's Kamailio host has, plus what sipguard's package depends on
    # (so `apt-get install ./sipguard.deb` inside the booted container needs no network)
    # (redis-server: the fleet's Redis, started by the test inside the container; disabled at boot)
    "test": ["kamailio", "iptables", "ipset", "nftables", "iproute2", "procps", "python3", "less", "redis-server"],
}


def cache_dir() -> Path:
    env = os.environ.get("SIPGUARD_BUILD_CACHE")
    if env:
        d = Path(env)
    elif os.geteuid() == 0:
        d = Path("/var/cache/sipguard-build")
    else:
        d = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sipguard-build"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _log(msg: str) -> None:
    print(f"[rootfs] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def nspawn_pipe(root: Path, script: str, *, binds: list[str] = (), env: dict[str, str] | None = None,
                timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a shell script inside *root* (not booted; the host's network, like a package build)."""
    cmd = ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "--pipe", "-D", str(root)]
    cmd += [f"--bind-ro={b}" if not b.startswith("rw:") else f"--bind={b[3:]}" for b in binds]
    for k, v in (env or {}).items():
        cmd.append(f"--setenv={k}={v}")
    cmd += ["/bin/sh", "-ec", script]
    return _run(cmd, timeout=timeout, stdin=subprocess.DEVNULL)


def tar_path(dist: str, flavour: str) -> Path:
    if dist not in DISTS:
        raise ValueError(f"unknown distribution {dist!r}: one of {sorted(DISTS)}")
    pkgs = " ".join(BASE + FLAVOURS[flavour])
    tag = hashlib.sha256(f"{MIRROR} {pkgs}".encode()).hexdigest()[:10]
    return cache_dir() / f"{dist}-{flavour}-{tag}.tar.zst"


def unpack(tar: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=False)
    _run(["tar", "--zstd", "-xpf", str(tar), "-C", str(dest), "--numeric-owner"], timeout=300)
    return dest


def ensure(dist: str, flavour: str) -> Path:
    """The cached tar of a *dist* root with the *flavour*'s packages; built on first use."""
    out = tar_path(dist, flavour)
    if out.exists():
        return out
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"{dist}-{flavour}-", dir=cache_dir()))
    try:
        root = work / "root"
        _log(f"debootstrap {dist} ({flavour}) into {root}")
        _run(["debootstrap", "--variant=minbase", "--include=" + ",".join(BASE), dist, str(root), MIRROR],
             timeout=1200)
        pkgs = " ".join(FLAVOURS[flavour])
        # policy-rc.d: packages install without starting services (the root is not booted anyway)
        nspawn_pipe(root, f"""
printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends {pkgs} >/dev/null
apt-get clean
rm -f /usr/sbin/policy-rc.d
rm -rf /var/lib/apt/lists/*
""", timeout=1200)
        tmp = out.with_suffix(".part")
        _run(["tar", "--zstd", "-cpf", str(tmp), "-C", str(root), "--numeric-owner", "--one-file-system", "."],
             timeout=600)
        tmp.rename(out)
        _log(f"cached {out.name} ({out.stat().st_size // 1_000_000} MB) in {time.monotonic() - t0:.0f} s")
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":  # python3 packaging/rootfs.py bookworm test
    print(ensure(sys.argv[1], sys.argv[2]))
