"""A private systemd-journald, with senders that journald can see (their _PID, _UID, _EXE, _COMM).

``PrivateJournald`` starts a shell as PID 1 of new PID + mount + network namespaces
(``unshare --pid --fork --mount-proc --mount --net``, propagation private). In there: a tmpfs ``/dev``
with the usual nodes and ``/dev/log`` -> journald's syslog socket, a tmpfs over ``/run/systemd``
whose ``journal/`` is a directory of ours, ``/run/log`` bound to a directory of ours (the journal
files), our own ``journald.conf`` (``ReadKMSG=no``: the host's kernel log is not copied), a cgroup2
mount (journald wants one), loopback up with 198.18.0.1/32 and 198.18.0.51/32 on it. The shell runs
journald in a loop: killing journald restarts it (``restart()``), SIGUSR2 rotates (``rotate()``).

Processes started with ``run``/``popen`` enter those namespaces (``nsenter``), optionally as another
user (``setpriv``), so journald reads their credentials and /proc entries as for any local process.
With ``units=True`` PID 1 also moves into a cgroup of ours (cgroup v2; this machine binds no
controller there) and a cgroup namespace rooted at it, and ``popen(..., unit="kamailio.service")``
puts a process into ``/system.slice/kamailio.service`` first: journald then records
``_SYSTEMD_UNIT=kamailio.service`` for it, as under a real systemd. The cgroups are removed in
``close()``.
``journalctl`` is a wrapper script reading our journal directory from the host side.
``cleanup_stale(prefix)`` removes what an interrupted run left (its work dir records PID 1).

Everything is stopped by PID in ``close()`` (SIGKILL of the namespace's PID 1 ends every process in
it) and the temporary directory removed, even on failure. Nothing of the host's journal, network or
firewall is touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

JOURNALD = next((p for p in ("/lib/systemd/systemd-journald", "/usr/lib/systemd/systemd-journald")
                 if os.path.exists(p)), "/lib/systemd/systemd-journald")
ADDRESSES = ("198.18.0.1", "198.18.0.51")
_DEVICES = [("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0)]
CONF = """[Journal]
Storage=volatile
ReadKMsg=no
ForwardToSyslog=no
ForwardToWall=no
RateLimitIntervalSec=0
"""


def available() -> bool:
    return os.geteuid() == 0 and os.path.exists(JOURNALD) and all(
        shutil.which(p) for p in ("unshare", "nsenter", "setpriv", "ip"))


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class PrivateJournald:
    def __init__(self, conf: str = CONF, prefix: str = "sgh-jd-", units: bool = False) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        # units: a cgroup namespace rooted at a cgroup of ours (cgroup v2, where this machine binds no
        # controller), so processes put into /system.slice/NAME.service get _SYSTEMD_UNIT=NAME.service
        self.cgroup = f"/{self.tmp.name}" if units else None
        self.tmp.chmod(0o755)  # other users in the namespace (kamailio, nobody) reach the work files
        self.sock = self.tmp / "sock"
        self.jdir = self.tmp / "log"
        self.sock.mkdir()
        self.jdir.mkdir()
        (self.tmp / "journald.conf").write_text(conf)
        self.proc: subprocess.Popen | None = None
        self.init_pid: int | None = None
        self.journalctl = self.tmp / "journalctl"
        self.journalctl.write_text(f'#!/bin/sh\nexec journalctl --directory={self.jdir}/journal "$@"\n')
        self.journalctl.chmod(0o755)

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> PrivateJournald:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        t = self.tmp
        devs = "\n".join(f"mknod -m 666 /dev/{n} c {a} {b}" for n, a, b in _DEVICES)
        addrs = "\n".join(f"ip addr add {a}/32 dev lo" for a in ADDRESSES)
        script = t / "init.sh"
        script.write_text(f"""set -e
mount -t tmpfs -o mode=755,size=1m sgh-dev /dev
{devs}
mkdir -p /dev/shm /dev/pts
mount -t tmpfs -o mode=1777,size=64m sgh-shm /dev/shm
ln -s /run/systemd/journal/dev-log /dev/log
mount -t tmpfs -o mode=755,size=4m sgh-run /run/systemd
mkdir -p /run/systemd/journal
mount --bind {self.sock} /run/systemd/journal
mount --bind {self.jdir} /run/log
mount --bind {t}/journald.conf /etc/systemd/journald.conf
mount -t tmpfs -o size=1m sgh-cg /sys/fs/cgroup
mount -t cgroup2 none /sys/fs/cgroup
ip link set lo up
{addrs}
sysctl -q -w net.unix.max_dgram_qlen=512
""" + self._loop())
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--mount", "--net", "--propagation", "private",
             "sh", str(script)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(t / "init.err", "wb"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            kids = _children(self.proc.pid)
            if kids and self.init_pid is None:
                self.init_pid = kids[0]
                (t / "init.pid").write_text(str(self.init_pid))  # for cleanup_stale after a crash
            if self.init_pid and self.journald_pid() and (self.sock / "dev-log").exists() \
                    and (self.sock / "socket").exists():
                return
            if self.proc.poll() is not None:
                raise RuntimeError("private journald did not start: " + (t / "init.err").read_text())
            time.sleep(0.05)
        raise RuntimeError("private journald: sockets missing; " + (t / "init.err").read_text())

    def _loop(self) -> str:
        t = self.tmp
        loop = f"""while [ ! -e {t}/stop ]; do
  {JOURNALD} &
  echo $! > {t}/journald.nspid
  wait $! || true
  sleep 0.1
done
"""
        if not self.cgroup:
            return loop
        # PID 1 moves into our cgroup, then (exec: still PID 1) into a cgroup namespace rooted there,
        # where a fresh cgroup2 mount shows that cgroup as /
        (t / "loop.sh").write_text(f"set -e\numount /sys/fs/cgroup\nmount -t cgroup2 none /sys/fs/cgroup\n{loop}")
        cg = f"/sys/fs/cgroup{self.cgroup}"
        return f"mkdir {cg}\necho $$ > {cg}/cgroup.procs\nexec unshare --cgroup sh {t}/loop.sh\n"

    def _remove_cgroups(self) -> None:
        """Our cgroups, bottom up, once their processes are gone (bounded retries)."""
        if self.cgroup:
            _remove_cgroup(self.cgroup)

    def journald_pid(self) -> int | None:
        """journald's PID as the host sees it (the child of the namespace's PID 1)."""
        kids = _children(self.init_pid) if self.init_pid else []
        for k in kids:
            try:
                if Path(f"/proc/{k}/comm").read_text().strip().startswith("systemd-journal"):
                    return k
            except OSError:
                pass
        return None

    def restart(self, timeout: float = 10.0) -> None:
        """Stop journald (SIGTERM: it syncs and closes its files) and wait for the loop's new one."""
        self._replace(signal.SIGTERM, timeout)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL journald (no sync: its file stays dirty) and wait for the loop's new one."""
        self._replace(signal.SIGKILL, timeout)

    def _replace(self, sig: int, timeout: float) -> None:
        """End the running journald with `sig` and wait until the loop's new one listens on dev-log."""
        old = self.journald_pid()
        assert old is not None
        (self.sock / "dev-log").unlink(missing_ok=True)
        os.kill(old, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            new = self.journald_pid()
            if new and new != old and (self.sock / "dev-log").exists():
                time.sleep(0.1)
                return
            time.sleep(0.05)
        raise RuntimeError("journald did not come back")

    def rotate(self) -> None:
        """What `journalctl --rotate` asks for: journald archives its files and opens new ones."""
        pid = self.journald_pid()
        assert pid is not None
        files = set(self.files())
        os.kill(pid, signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and set(self.files()) == files:
            time.sleep(0.05)

    def files(self) -> list[Path]:
        return sorted((self.jdir / "journal").rglob("*.journal*"))

    def vacuum(self, keep_files: int = 1) -> subprocess.CompletedProcess:
        """`journalctl --vacuum-files=N`: delete archived journal files, oldest first."""
        return subprocess.run([str(self.journalctl), f"--vacuum-files={keep_files}"], capture_output=True,
                              text=True, timeout=30)

    def close(self) -> None:
        if self.tmp.exists():  # cleanup_stale may have removed it already
            (self.tmp / "stop").touch()
        if self.init_pid:
            try:
                os.kill(self.init_pid, signal.SIGKILL)  # PID 1 of the namespace: everything in it ends
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None
        self.init_pid = None
        self._remove_cgroups()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- processes inside ----------------------------------------------------------------------
    def argv(self, *argv: str, user: str | int | None = None, netns: str | None = None,
             unit: str | None = None) -> list[str]:
        """nsenter into the namespaces (the network one, or the named netns `netns` of a lab); with
        `unit` (needs units=True), first into the cgroup /system.slice/UNIT as systemd would."""
        assert self.init_pid is not None
        cmd = ["nsenter", f"--target={self.init_pid}", "--pid", "--mount",
               f"--net=/run/netns/{netns}" if netns else "--net"]
        if self.cgroup:
            cmd.append("--cgroup")
        if unit is not None:
            assert self.cgroup, "PrivateJournald(units=True) puts processes into units"
            cg = f"/sys/fs/cgroup/system.slice/{unit}"
            cmd += ["sh", "-c", f'mkdir -p {cg} && echo $$ > {cg}/cgroup.procs && exec "$@"', "sh"]
        if user is not None:
            cmd += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"] if isinstance(user, str) \
                else ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
        return cmd + list(argv)

    def run(self, *argv: str, user: str | int | None = None, timeout: float = 30, input: bytes | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*argv, user=user), input=input, capture_output=True, timeout=timeout,
                              check=check)

    def popen(self, *argv: str, user: str | int | None = None, netns: str | None = None,
              unit: str | None = None, **kw) -> subprocess.Popen:  # type: ignore[no-untyped-def]
        return subprocess.Popen(self.argv(*argv, user=user, netns=netns, unit=unit), **kw)

    def entries(self, *args: str) -> list[dict]:
        import json

        p = subprocess.run([str(self.journalctl), "--output=json", "--all", "--no-pager", "--quiet", *args],
                           capture_output=True, timeout=30)
        return [json.loads(ln) for ln in p.stdout.splitlines() if ln.strip()]


def _remove_cgroup(cgroup: str) -> None:
    """The cgroup `/NAME` of a PrivateJournald(units=True) and those below it, bottom up, once their
    processes are gone (bounded retries), seen through a cgroup2 mount of a private mount namespace."""
    script = (f"mount -t cgroup2 none /sys/fs/cgroup || exit 0\n[ -d /sys/fs/cgroup{cgroup} ] || exit 0\n"
              f"for i in $(seq 50); do find /sys/fs/cgroup{cgroup} -depth -type d -exec rmdir {{}} \\; "
              f"2>/dev/null; [ -d /sys/fs/cgroup{cgroup} ] || exit 0; sleep 0.1; done\nexit 1\n")
    subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], timeout=30,
                   capture_output=True)


def cleanup_stale(prefix: str) -> list[str]:
    """Private journalds an interrupted run left behind, made with this *prefix* (their work dirs in the
    temp dir): SIGKILL of each one's namespace PID 1 (only when its command line still names the work
    dir, so a reused PID is never hit) ends every process in it; then its cgroup and dir are removed.
    Only for prefixes a single run owns (the e2e scenario's). Returns the dirs removed."""
    if len(prefix) < 4 or "/" in prefix:
        raise ValueError(f"refusing to clean prefix {prefix!r}")
    gone = []
    for d in sorted(Path(tempfile.gettempdir()).glob(prefix + "*")):
        if not d.is_dir() or not (d / "init.sh").is_file():
            continue
        try:
            pid = int((d / "init.pid").read_text())
            alive = str(d) in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            pid, alive = 0, False
        if alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        _remove_cgroup(f"/{d.name}")
        shutil.rmtree(d, ignore_errors=True)
        gone.append(str(d))
    return gone


_SENDER = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
for raw in sys.stdin:
    mode, ident, text = json.loads(raw)
    if mode == "syslog":  # like syslog(3): local0.notice to /dev/log
        data = f"<133>{time.strftime('%b %d %H:%M:%S')} {ident}[{__import__('os').getpid()}]: {text}".encode()
        path = "/dev/log"
    else:  # the journal's native protocol
        data = f"MESSAGE={text}\nSYSLOG_IDENTIFIER={ident}\nPRIORITY=5\n".encode()
        path = "/run/systemd/journal/socket"
    for _ in range(100):
        try:
            s.sendto(data, path)
            break
        except (ConnectionRefusedError, FileNotFoundError):
            time.sleep(0.05)
    print("ok", flush=True)
"""


class Sender:
    """A long-lived process inside the namespace (optionally as `user`) that sends each line it is
    given to journald: long-lived, so journald reads its _EXE/_COMM from /proc while it runs."""

    def __init__(self, journald: PrivateJournald, user: str | int | None = None,
                 python: str = "/usr/bin/python3") -> None:
        self.proc = journald.popen(python, "-u", "-c", _SENDER, user=user, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.executable = os.path.realpath(python)

    def send(self, text: str, ident: str = "kamailio", mode: str = "syslog") -> None:
        import json

        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps([mode, ident, text]) + "\n").encode())
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == b"ok"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        for fh in (self.proc.stdin, self.proc.stdout):
            if fh:
                fh.close()

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
