"""Network-namespace helpers for the kernel enforcer tests (names prefixed `sge-`).

Nothing here touches the host's own firewall: every netfilter command runs in a namespace made
here (`ip netns exec`, or a forked child that entered it with setns), and the namespaces are
deleted again even when a test fails. Namespaces themselves come from tests/lab/netns.py.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import socket
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tests.lab.netns import Netns, enter

SERVER4, PEER4 = "198.18.64.1", "198.18.64.2"
SERVER6, PEER6 = "2001:db8:64::1", "2001:db8:64::2"
PORT = 5060


def sh(*argv: str, ns: str | None = None, check: bool = True, timeout: float = 60,
       input: str | None = None) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()} {p.stdout.strip()}")
    return p


def ns_call(ns: str, fn: Callable, *args, timeout: float = 60, **kwargs):
    """Run fn(*args) in a forked child inside `ns`; return its result (exceptions re-raised)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            enter(ns)
            result = ("ok", fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001
            result = ("err", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        try:
            data = pickle.dumps(result)
        except Exception as exc:  # noqa: BLE001
            data = pickle.dumps(("err", f"unpicklable result: {exc}"))
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"ns_call({fn.__name__}) took more than {timeout}s")
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            chunk = os.read(r, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        try:
            if not chunks:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    status, value = pickle.loads(b"".join(chunks))
    if status == "err":
        raise AssertionError(f"in namespace {ns}: {value}")
    return value


@dataclass
class Pair:
    server: str
    peer: str


@contextlib.contextmanager
def netns_pair(tag: str) -> Iterator[Pair]:
    """Two namespaces joined by a veth pair: server 198.18.64.1 / 2001:db8:64::1, peer .2 / ::2."""
    uid = f"{os.getpid() % 100000}{tag}"
    va, vb = f"sge{uid}a"[:15], f"sge{uid}b"[:15]
    with Netns(f"sge-{uid}-s") as server, Netns(f"sge-{uid}-p") as peer:
        sh("ip", "link", "add", va, "netns", server.name, "type", "veth", "peer", "name", vb, "netns", peer.name)
        for ns, dev, a4, a6 in ((server, va, SERVER4, SERVER6), (peer, vb, PEER4, PEER6)):
            ns.add_addr(dev, f"{a4}/24")
            ns.ip("-6", "addr", "add", f"{a6}/64", "dev", dev, "nodad")
            ns.ip("link", "set", dev, "up")
        yield Pair(server.name, peer.name)


# -- traffic -----------------------------------------------------------------------------------
def _serve(ready_w: int) -> None:
    """UDP and TCP echo on port 5060, IPv4 and IPv6 (dual-stack sockets); runs until killed."""
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    udp.bind(("::", PORT))
    tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("::", PORT))
    tcp.listen(64)
    os.write(ready_w, b"1")
    os.close(ready_w)
    while True:
        ready, _, _ = select.select([udp, tcp], [], [], 5)
        for s in ready:
            if s is udp:
                data, addr = udp.recvfrom(2048)
                udp.sendto(data, addr)
            else:
                conn, _ = tcp.accept()
                conn.settimeout(1)
                try:
                    conn.sendall(conn.recv(2048))
                except OSError:
                    pass
                conn.close()


@contextlib.contextmanager
def listener(ns: str) -> Iterator[int]:
    """A forked echo server in `ns` (killed on exit)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            enter(ns)
            signal.alarm(600)  # never outlive the test run
            _serve(w)
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
        finally:
            os._exit(0)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 10)
        assert ready and os.read(r, 1) == b"1", "listener did not start"
        yield pid
    finally:
        os.close(r)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)


def _probe_one(dst: str, proto: str, timeout: float) -> bool:
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    token = os.urandom(8)
    if proto == "udp":
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            end = time.monotonic() + timeout
            s.sendto(token, (dst, PORT))
            while time.monotonic() < end:
                try:
                    data = s.recv(2048)
                except OSError:
                    return False
                if data == token:
                    return True
            return False
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((dst, PORT))
            s.sendall(token)
            return s.recv(2048) == token
        except OSError:
            return False


def _probe_all(targets: list[tuple[str, str]], timeout: float) -> dict[tuple[str, str], bool]:
    out: dict[tuple[str, str], bool] = {}
    threads = []
    for dst, proto in targets:
        t = threading.Thread(target=lambda d=dst, p=proto: out.__setitem__((d, p), _probe_one(d, p, timeout)))
        t.start()
        threads.append(t)
    for t in threads:
        t.join(timeout + 5)
    return out


ALL = [(SERVER4, "udp"), (SERVER4, "tcp"), (SERVER6, "udp"), (SERVER6, "tcp")]


def probe(peer_ns: str, targets: list[tuple[str, str]] = ALL, timeout: float = 0.5) -> dict[tuple[str, str], bool]:
    """Which (server address, proto) pairs answer from the peer namespace, probed in parallel."""
    return ns_call(peer_ns, _probe_all, targets, timeout, timeout=timeout + 20)
