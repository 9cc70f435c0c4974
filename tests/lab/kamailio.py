"""Run Kamailio (with examples/kamailio/kamailio.cfg) inside a lab namespace.

Two log modes:

``logmode="rsyslog"``
    A private ``rsyslogd -n`` and Kamailio both run inside a private mount
    namespace (``unshare --mount --propagation private``) entered from the
    network namespace.  That mount namespace gets its own tmpfs ``/dev`` with
    the usual device nodes and ``/dev/log`` -> rsyslog's imuxsock socket, so
    Kamailio's syslog(3) calls reach our rsyslogd and nothing reaches the
    host's logger.  Facility local0 is written to *logfile* with the chosen
    template (``RSYSLOG_TraditionalFileFormat``, ``RSYSLOG_FileFormat``,
    ``RSYSLOG_SyslogProtocol23Format`` or any template string you add).

``logmode="stderr"``
    ``kamailio -E``: Kamailio writes to stderr, redirected to *logfile*.  No
    syslog escaping: CR/LF copied from SIP messages end up as real new lines.

``logmode="journal"``
    Kamailio's syslog(3) calls go to a private systemd-journald
    (``journald=``, a :class:`tests.lab.journald.PrivateJournald`): Kamailio
    runs inside that journald's PID and mount namespaces (``/dev/log`` is
    journald's syslog socket) and in the network namespace *ns*, as *user*
    (Debian's ``User=kamailio``), in the cgroup of *unit* when given
    (``PrivateJournald(units=True)``: journald then records
    ``_SYSTEMD_UNIT=kamailio.service``, as under a real systemd).  Nothing is
    written to *logfile*; ``journal_entries()`` reads what journald stored.

*log_engine* adds ``--log-engine=ENGINE`` (e.g. ``"json:UM"``, Kamailio's JSON
log engine) in every mode.

Usage::

    with Kamailio(lab.hub, lab.proxy_ip, logmode="rsyslog",
                  template="RSYSLOG_FileFormat", logfile=path) as k:
        ...  # k.wait_for("INFO: <core>", timeout=5)

All processes are stopped by PID in ``__exit__`` (Kamailio main process first,
then rsyslogd, then the wrapper shell or ``nsenter``); the temp dir is removed
unless ``keep_workdir=True``.  The journal mode's journald is the caller's to
close (after Kamailio).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from . import EXAMPLE_DIR
from .netns import Netns, check_addr, kill_pid, stop_process

TEMPLATES = ("RSYSLOG_TraditionalFileFormat", "RSYSLOG_FileFormat",
             "RSYSLOG_SyslogProtocol23Format")

# device nodes recreated in the private /dev (name, major, minor)
_DEVICES = [("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
            ("urandom", 1, 9), ("tty", 5, 0)]


def prepare_config(workdir: Path, listen_ip: str, domain: str = "sipguard.test",
                   cfg: Path | None = None, dbtext: Path | None = None,
                   defines: list[str] | None = None) -> Path:
    """Copy the example config and db_text tables into *workdir*, substituting
    the ``#!substdef`` operator settings (listen IP, domain, db URL).
    *defines* adds ``#!define NAME`` lines (e.g. ``WITH_TCP``).
    Returns the path of the written ``kamailio.cfg``."""
    listen_ip = check_addr(listen_ip)
    workdir = Path(workdir)
    cfg = Path(cfg or EXAMPLE_DIR / "kamailio.cfg")
    dbtext = Path(dbtext or EXAMPLE_DIR / "dbtext")
    dbdir = workdir / "dbtext"
    if dbdir.exists():
        shutil.rmtree(dbdir)
    shutil.copytree(dbtext, dbdir)
    text = cfg.read_text()
    subs = {"SG_LISTEN_IP": listen_ip, "SG_DOMAIN": domain, "SG_DBURL": f"text://{dbdir}"}
    for key, val in subs.items():
        pat = re.compile(r'^#!substdef "!%s!.*!g"$' % key, re.M)
        text, n = pat.subn(f'#!substdef "!{key}!{val}!g"', text)
        if n != 1:
            raise ValueError(f"config has no single #!substdef line for {key}")
    for d in defines or []:
        text = text.replace("#!KAMAILIO\n", f"#!KAMAILIO\n#!define {d}\n", 1)
    out = workdir / "kamailio.cfg"
    out.write_text(text)
    return out


def rsyslog_conf(sock: Path, logfile: Path, workdir: Path, template: str,
                 extra_file: Path | None = None) -> str:
    """rsyslog.conf text: imuxsock on *sock* (no rate limiting), local0 ->
    *logfile* with *template*; optionally everything else -> *extra_file*."""
    lines = [
        f'global(workDirectory="{workdir}" maxMessageSize="64k")',
        'module(load="imuxsock" SysSock.Use="off")',
        f'input(type="imuxsock" Socket="{sock}" CreatePath="on" '
        'RateLimit.Interval="0" UseSysTimeStamp="on")',
        f'local0.* action(type="omfile" file="{logfile}" template="{template}")',
    ]
    if extra_file:
        lines.append(f'*.*;local0.none action(type="omfile" file="{extra_file}")')
    return "\n".join(lines) + "\n"


def _wrapper_script(work: Path, conf: Path, sock: Path, kam_argv: list[str]) -> str:
    """Shell script run inside the private mount namespace: private /dev,
    /dev/log -> sock, start rsyslogd (pid file), wait for its socket (bounded),
    start Kamailio in the foreground (-DD) and wait for it."""
    devs = "\n".join(f"mknod -m 666 /dev/{n} c {a} {b}" for n, a, b in _DEVICES)
    kam = " ".join(_shq(a) for a in kam_argv)
    return f"""set -e
mount -t tmpfs -o mode=755,size=1m sgl-dev /dev
{devs}
mkdir -p /dev/shm /dev/pts
mount -t tmpfs -o mode=1777,size=64m sgl-shm /dev/shm
ln -s {sock} /dev/log
rsyslogd -n -f {conf} -i {work}/rsyslogd.pid &
echo $! > {work}/rsyslogd.shellpid
i=0
while [ ! -S {sock} ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
[ -S {sock} ] || {{ echo "rsyslog socket missing" >&2; exit 1; }}
{kam} &
echo $! > {work}/kamailio.pid
wait $!
"""


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _shq(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


class Kamailio:
    """Kamailio in network namespace *ns*, listening on *listen_ip*:5060.

    Parameters: *logmode* ``"rsyslog"``, ``"stderr"`` or ``"journal"`` (with
    *journald*, *unit* and *user*: see the module docstring); *log_engine*
    (``"json:UM"``) for ``--log-engine``; *template* for
    rsyslog mode; *logfile* where the log lines go (appended to); *defines*
    extra ``#!define`` names; *cfg* another config file with the same
    ``#!substdef`` markers (e.g. a copy with ``debug=3``); *keep_workdir*
    keeps the temp dir (config, db_text copy, rsyslog.conf, ``other.log``
    with rsyslog's own messages, ``wrapper.err``) for debugging.
    ``startup_timeout`` bounds the wait for Kamailio's UDP socket."""

    def __init__(self, ns: Netns, listen_ip: str, *, logmode: str = "rsyslog",
                 template: str = "RSYSLOG_TraditionalFileFormat",
                 logfile: str | Path | None = None, domain: str = "sipguard.test",
                 defines: list[str] | None = None, keep_workdir: bool = False,
                 startup_timeout: float = 10.0, cfg: Path | None = None,
                 journald=None, unit: str | None = "kamailio.service", user: str | None = "kamailio",
                 log_engine: str | None = None):
        if logmode not in ("rsyslog", "stderr", "journal"):
            raise ValueError("logmode must be 'rsyslog', 'stderr' or 'journal'")
        if (logmode == "journal") != (journald is not None):
            raise ValueError("logmode 'journal' needs journald= (and only it takes one)")
        if unit is not None and logmode == "journal" and not journald.cgroup:
            raise ValueError("unit= needs PrivateJournald(units=True) (or pass unit=None)")
        if log_engine is not None and not re.fullmatch(r"[a-z]+(:[A-Za-z]*)?", log_engine):
            raise ValueError(f"log_engine {log_engine!r}: expected e.g. 'json:UM'")
        self.ns = ns
        self.listen_ip = check_addr(listen_ip)
        self.logmode = logmode
        self.template = template
        self.domain = domain
        self.defines = defines
        self.keep_workdir = keep_workdir
        self.startup_timeout = startup_timeout
        self.cfg_src = cfg
        self.journald = journald
        self.unit = unit if logmode == "journal" else None
        self.user = user if logmode == "journal" else None
        self.log_engine = log_engine
        self.work = Path(tempfile.mkdtemp(prefix="sgl-kam-"))
        self.logfile = Path(logfile) if logfile else self.work / "kamailio.log"
        self.proc: subprocess.Popen | None = None
        self.kamailio_pid: int | None = None
        self.rsyslog_pid: int | None = None
        self._stderr_fh = None

    # -- lifecycle ----------------------------------------------------------
    def __enter__(self) -> "Kamailio":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def kamailio_argv(self, cfg: Path) -> list[str]:
        pidfile = self.work / ("run" if self.user else "") / "kamailio.main.pid"  # where *user* may write
        argv = ["kamailio", "-DD", "-f", str(cfg), "-P", str(pidfile),
                "-Y", str(self.work / "run"), "-w", str(self.work)]
        if self.logmode == "stderr":
            argv.insert(2, "-E")
        if self.log_engine:
            argv.append(f"--log-engine={self.log_engine}")
        return argv

    def start(self) -> None:
        (self.work / "run").mkdir(exist_ok=True)
        cfg = prepare_config(self.work, self.listen_ip, self.domain, cfg=self.cfg_src,
                             defines=self.defines)
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        if self.logmode == "journal":
            self._start_journal(cfg)
        elif self.logmode == "stderr":
            self._stderr_fh = open(self.logfile, "ab")
            self.proc = self.ns.popen(*self.kamailio_argv(cfg), stdin=subprocess.DEVNULL,
                                      stdout=self._stderr_fh, stderr=self._stderr_fh)
            self.kamailio_pid = self.proc.pid  # ip netns exec execs kamailio
        else:
            sock = self.work / "log.sock"
            conf = self.work / "rsyslog.conf"
            conf.write_text(rsyslog_conf(sock, self.logfile, self.work, self.template,
                                         extra_file=self.work / "other.log"))
            script = self.work / "run.sh"
            script.write_text(_wrapper_script(self.work, conf, sock, self.kamailio_argv(cfg)))
            self._stderr_fh = open(self.work / "wrapper.err", "ab")
            self.proc = self.ns.popen("unshare", "--mount", "--propagation", "private",
                                      "sh", str(script), stdin=subprocess.DEVNULL,
                                      stdout=self._stderr_fh, stderr=self._stderr_fh)
            self.rsyslog_pid = self._read_pid("rsyslogd.shellpid", 5.0)
            if self.rsyslog_pid:
                self.ns.track_pid(self.rsyslog_pid)
            self.kamailio_pid = self._read_pid("kamailio.pid", 5.0)
        if self.kamailio_pid:
            self.ns.track_pid(self.kamailio_pid)
        self._wait_listening()

    def _start_journal(self, cfg: Path) -> None:
        """Kamailio via nsenter into the journald's namespaces (and *unit*'s cgroup), as *user*."""
        self.work.chmod(0o755)  # mkdtemp's 0700: the kamailio user reads its config here
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            for path in (self.work / "run", *(self.work / "dbtext").rglob("*"), self.work / "dbtext"):
                os.chown(path, pw.pw_uid, pw.pw_gid)  # usrloc db_mode 2 writes the location table back
        self._stderr_fh = open(self.work / "wrapper.err", "ab")
        self.proc = self.journald.popen(*self.kamailio_argv(cfg), user=self.user, netns=self.ns.name,
                                        unit=self.unit, stdin=subprocess.DEVNULL, stdout=self._stderr_fh,
                                        stderr=self._stderr_fh)
        # nsenter --pid forks once; its child (sh -> setpriv -> exec) becomes Kamailio's main process
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and self.proc.poll() is None:
            kids = _children(self.proc.pid)
            if kids and _comm(kids[0]) == "kamailio":
                self.kamailio_pid = kids[0]
                break
            time.sleep(0.05)

    def journal_entries(self) -> list[dict]:
        """Every entry of the private journal (journal mode), as `journalctl --output=json` gives it."""
        assert self.journald is not None
        return self.journald.entries()

    def _read_pid(self, name: str, timeout: float) -> int | None:
        path = self.work / name
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                break
            try:
                txt = path.read_text().strip()
                if txt:
                    return int(txt)
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.05)
        return None

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        needle = f"{self.listen_ip}:5060".replace(".", r"\.")
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"kamailio exited early; see {self.work}")
            out = self.ns.run("ss", "-lunH", check=False).stdout
            if re.search(needle, out):
                time.sleep(0.3)  # let the children finish initialising
                return
            time.sleep(0.1)
        raise RuntimeError(f"kamailio not listening after {self.startup_timeout}s; see {self.work}")

    def stop(self) -> None:
        """Stop Kamailio, then rsyslogd (each by PID, bounded), then the
        wrapper; remove the temp dir unless *keep_workdir*."""
        if self.kamailio_pid:
            kill_pid(self.kamailio_pid, timeout=5)
            self.kamailio_pid = None
        if self.rsyslog_pid:
            time.sleep(0.3)  # let rsyslog flush the last datagrams
            kill_pid(self.rsyslog_pid, timeout=5)
            self.rsyslog_pid = None
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        if self._stderr_fh:
            self._stderr_fh.close()
            self._stderr_fh = None
        if not self.keep_workdir:
            shutil.rmtree(self.work, ignore_errors=True)

    # -- helpers --------------------------------------------------------------
    def read_log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float = 5.0, count: int = 1) -> bool:
        """Wait (bounded) until regex *pattern* matches *count* times in the log."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(rx.findall(self.read_log())) >= count:
                return True
            time.sleep(0.1)
        return False
