"""Network namespaces with guaranteed cleanup.

Topology built by :class:`Lab`::

    sgl-<tag>-hub   bridge "br0" 198.18.0.1/24  (the proxy lives here)
       |-- veth "v<n>" <-> "eth0" in sgl-<tag>-c<n>  198.18.0.X/24 (one client)
       |-- ...

Each client namespace owns exactly one address, so tools that ignore a bind
address (svwar/svcrack) still send from the address you chose.

Rules enforced here:

* namespace names must start with ``sgl-`` and addresses must lie in
  198.18.0.0/15 (checked, :class:`ValueError` otherwise);
* everything created is deleted in ``__exit__`` even after exceptions;
* processes started through :meth:`Netns.popen` are tracked and stopped by PID
  (SIGTERM, then SIGKILL after a bounded wait) before the namespace goes away.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from typing import Iterator, Sequence

from . import NS_PREFIX, NS_PREFIXES

LAB_NET = ipaddress.ip_network("198.18.0.0/15")
BR0_MAC = "02:53:47:00:00:01"  # the lab bridge's own address (see Lab.__enter__)
CLONE_NEWNET = 0x40000000
_START_NS = os.readlink("/proc/self/ns/net")  # the namespace the test process started in (the host's)


def check_addr(addr: str) -> str:
    """Return *addr* (without prefix length) if it lies in 198.18.0.0/15."""
    ip = ipaddress.ip_address(addr.split("/")[0])
    if ip not in LAB_NET:
        raise ValueError(f"{addr} is outside the lab range {LAB_NET}")
    return str(ip)


def check_name(name: str) -> str:
    """Return *name* if it is an allowed namespace name (a prefix of NS_PREFIXES)."""
    if not name.startswith(NS_PREFIXES) or len(name) > 40 or "/" in name:
        raise ValueError(f"namespace name {name!r} must start with one of {NS_PREFIXES!r}")
    return name


def run(cmd: Sequence[str], check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    """Run a command (list form), capture output, bounded by *timeout*."""
    return subprocess.run(list(cmd), check=check, timeout=timeout,
                          capture_output=True, text=True, **kw)


def list_namespaces() -> list[str]:
    """Names of all network namespaces known to ``ip netns``."""
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def cleanup_stale(prefix: str = NS_PREFIX) -> list[str]:
    """Delete leftover namespaces whose name starts with *prefix* (must be
    ``sgl-...``).  Processes still running inside them are NOT killed (we do
    not know that we started them); deleting the name is always safe."""
    check_name(prefix if prefix.endswith("-") else prefix + "-")
    gone = []
    for name in list_namespaces():
        if name.startswith(prefix):
            run(["ip", "netns", "del", name], check=False)
            gone.append(name)
    return gone


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Stop one process we started: SIGTERM, bounded wait, then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


def kill_pid(pid: int, timeout: float = 5.0) -> None:
    """Stop a process that is not our direct child (e.g. a daemon that wrote a
    pid file) by PID: SIGTERM, poll up to *timeout*, then SIGKILL."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


_libc = None


def _setns(fd: int, nstype: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def enter(name: str) -> None:
    """Move the calling process (a forked, single-threaded child) into namespace *name* for good.

    Fails closed: a missing namespace raises (it is never created here, and never the host's), and
    so does still being in the namespace the test process started in.
    """
    check_name(name)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(fd, CLONE_NEWNET)
    finally:
        os.close(fd)
    if os.readlink("/proc/thread-self/ns/net") == _START_NS:
        raise OSError(f"setns({name}) left the process in the host namespace")


@contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Switch the *calling thread* into network namespace *name* for the
    duration of the block (``None`` = stay).  Sockets created inside the block
    stay in that namespace after it ends: create them here, use them anywhere."""
    if name is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(target, CLONE_NEWNET)
        try:
            yield
        finally:
            _setns(own, CLONE_NEWNET)
    finally:
        os.close(target)
        os.close(own)


class Netns:
    """One network namespace.  Use as a context manager (or call
    :meth:`create`/:meth:`delete`).  Loopback is brought up and
    ``net.unix.max_dgram_qlen`` is raised to 512 (a fresh namespace has 10,
    which loses bursts of syslog datagrams)."""

    def __init__(self, name: str):
        self.name = check_name(name)
        self.procs: list[subprocess.Popen] = []
        self.extra_pids: list[int] = []
        self.created = False

    # -- lifecycle -------------------------------------------------------
    def create(self) -> "Netns":
        if self.name in list_namespaces():
            run(["ip", "netns", "del", self.name], check=False)
        run(["ip", "netns", "add", self.name])
        self.created = True
        self.ip("link", "set", "lo", "up")
        self.sysctl("net.unix.max_dgram_qlen", "512")
        return self

    def delete(self) -> None:
        """Stop tracked processes (by PID) and delete the namespace."""
        for proc in reversed(self.procs):
            try:
                stop_process(proc)
            except Exception:
                pass
        self.procs.clear()
        for pid in reversed(self.extra_pids):
            kill_pid(pid)
        self.extra_pids.clear()
        if self.created:
            run(["ip", "netns", "del", self.name], check=False)
            self.created = False

    def __enter__(self) -> "Netns":
        try:
            return self.create()
        except BaseException:
            self.delete()
            raise

    def __exit__(self, *exc) -> None:
        self.delete()

    # -- helpers ---------------------------------------------------------
    def cmd(self, *argv: str) -> list[str]:
        """Argument vector that runs *argv* inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        """Run a command inside the namespace and wait (bounded)."""
        return run(self.cmd(*argv), check=check, timeout=timeout, **kw)

    def popen(self, *argv: str, **kw) -> subprocess.Popen:
        """Start a background process inside the namespace; it is tracked and
        stopped by PID when the namespace is deleted."""
        proc = subprocess.Popen(self.cmd(*argv), **kw)
        self.procs.append(proc)
        return proc

    def track_pid(self, pid: int) -> None:
        """Remember a PID we started indirectly, to stop it on delete."""
        self.extra_pids.append(pid)

    def ip(self, *args: str) -> subprocess.CompletedProcess:
        """``ip -n NAME ...``"""
        return run(["ip", "-n", self.name, *args])

    def sysctl(self, key: str, value: str) -> None:
        self.run("sysctl", "-q", "-w", f"{key}={value}")

    def add_addr(self, dev: str, cidr: str) -> None:
        check_addr(cidr)
        self.ip("addr", "add", cidr, "dev", dev)


class Lab:
    """A hub namespace with a bridge holding the proxy address, plus any number
    of single-address client namespaces attached to the bridge.

    >>> with Lab("t1") as lab:
    ...     c = lab.add_client("198.18.0.20")
    ...     c.run("ping", "-c1", "-W1", lab.proxy_ip)
    """

    def __init__(self, tag: str, proxy_ip: str = "198.18.0.1", prefixlen: int = 24,
                 prefix: str = NS_PREFIX, hub_name: str | None = None):
        if not tag.replace("-", "").isalnum() or len(tag) > 12:
            raise ValueError("tag must be short and alphanumeric")
        if prefix not in NS_PREFIXES:
            raise ValueError(f"prefix must be one of {NS_PREFIXES!r}")
        self.tag = tag
        self.prefix = prefix
        self.proxy_ip = check_addr(proxy_ip)
        self.prefixlen = prefixlen
        self.hub = Netns(hub_name or f"{prefix}{tag}-hub")
        self.clients: dict[str, Netns] = {}
        self._n = 0

    def __enter__(self) -> "Lab":
        try:
            self.hub.create()
            self.hub.ip("link", "add", "br0", "type", "bridge")
            # a fixed (locally administered) address: a bridge otherwise takes its ports' lowest MAC, so
            # adding a client's port can change it while earlier clients' neighbour entries hold the old
            # one, and those clients go unanswered for seconds (seen as a phone "stall" during attacks)
            self.hub.ip("link", "set", "br0", "address", BR0_MAC)
            self.hub.add_addr("br0", f"{self.proxy_ip}/{self.prefixlen}")
            self.hub.ip("link", "set", "br0", "up")
            return self
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Delete all client namespaces, then the hub (always safe to call)."""
        for ns in list(self.clients.values()):
            try:
                ns.delete()
            except Exception:
                pass
        self.clients.clear()
        self.hub.delete()

    def add_client(self, addr: str) -> Netns:
        """Create namespace ``sgl-<tag>-c<n>`` whose only address is *addr*
        (on ``eth0``), bridged to the proxy.  Returns the :class:`Netns`."""
        addr = check_addr(addr)
        if addr in self.clients:
            return self.clients[addr]
        self._n += 1
        ns = Netns(f"{self.prefix}{self.tag}-c{self._n}")
        self.clients[addr] = ns
        ns.create()
        veth = f"v{self._n}"
        self.hub.ip("link", "add", veth, "type", "veth", "peer", "name", "eth0",
                    "netns", ns.name)
        self.hub.ip("link", "set", veth, "master", "br0")
        self.hub.ip("link", "set", veth, "up")
        ns.add_addr("eth0", f"{addr}/{self.prefixlen}")
        ns.ip("link", "set", "eth0", "up")
        return ns
