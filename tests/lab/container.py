"""A Debian container with systemd as PID 1 (systemd-nspawn) in a lab network namespace.

What it is for: tests/test_installed.py and `make demo-host` install the sipguard .deb on a real
systemd host (Kamailio as kamailio.service logging to the journal) and attack it from other
namespaces. The flags and why each one is needed are in ../shared/notes/real-systemd.md:
`--register=no --keep-unit` (no machined here), `--network-namespace-path` (the lab's hub namespace:
the container's kernel sets are that namespace's), `--capability=CAP_NET_ADMIN`, `--system-call-filter=bpf`
(IPAddressDeny= enforced), the v1 cgroup controllers remounted read-write before systemd starts
(MemoryMax=, TasksMax=, DevicePolicy= enforced), `--kill-signal=SIGRTMIN+3`, `--console=read-only`.

The root file system comes from packaging/rootfs.py's cache (`test` flavour: Kamailio, iptables, ipset,
nftables, Python, all from that Debian) and is unpacked to a copy per container. Commands run inside
with `nsenter --all` into the container's PID 1, with a clean environment.

Cleanup, even on failure (`close()` is idempotent and `__exit__` always calls it): poweroff inside,
SIGTERM then SIGKILL of nspawn (by PID), the container's cgroup subtrees removed depth-first,
/run/systemd/nspawn/propagate/NAME, the root copy. The network namespaces belong to the caller's
:class:`~tests.lab.netns.Lab`. Nothing here touches the host's firewall, routes or interfaces.

    with Lab(tag) as lab, Container("bookworm", lab.hub, name=f"sgl{tag}") as c:
        c.sh("systemctl is-active kamailio")
"""

from __future__ import annotations

import importlib.util
import json
import re
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from . import REPO_ROOT
from .netns import Netns

_spec = importlib.util.spec_from_file_location("sipguard_rootfs", REPO_ROOT / "packaging" / "rootfs.py")
rootfs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rootfs)

CGROUP_HIERARCHIES = ("systemd", "unified", "memory", "pids", "devices")
CLEAN_ENV = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "SYSTEMD_PAGER=",
             "SYSTEMD_COLORS=0"]
# nspawn bind-mounts a container boot ID over /proc/sys/kernel/random/boot_id; a unit with
# ProtectKernelTunables=, ProtectControlGroups= or ProtectProc= gets a fresh /proc view with the kernel's
# boot ID instead, and `journalctl --follow` there (sipguard's journal source) then waits for entries of
# a boot that never logs (found booting the hardened unit). On a real host there is one boot ID: the
# kernel's. Unmounting nspawn's makes the container the same.
BOOT = "umount /proc/sys/kernel/random/boot_id 2>/dev/null; " \
       "for c in memory pids devices; do mount -o remount,bind,rw /sys/fs/cgroup/$c 2>/dev/null; done; " \
       "exec /lib/systemd/systemd"


def _own_cgroup(hierarchy: str) -> Path | None:
    """This process's cgroup directory in *hierarchy* (a v1 controller, name=systemd, or unified)."""
    base = Path("/sys/fs/cgroup") / hierarchy
    if not base.is_dir():
        return None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        num, ctrls, path = line.split(":", 2)
        names = ctrls.split(",")
        if (hierarchy == "unified" and num == "0") or hierarchy in names or f"name={hierarchy}" in names:
            return base / path.lstrip("/")
    return None


class Container:
    """Debian *dist* (bookworm, trixie) booted with systemd in namespace *netns*."""

    def __init__(self, dist: str, netns: Netns, name: str, *, boot_timeout: float = 60):
        if not name.replace("-", "").isalnum() or len(name) > 40:
            raise ValueError(f"bad container name {name!r}")
        self.dist, self.netns, self.name, self.boot_timeout = dist, netns, name, boot_timeout
        self.work = rootfs.cache_dir() / f"run-{name}"
        self.root = self.work / "root"
        self.log = self.work / "console.log"
        self.proc: subprocess.Popen | None = None
        self.pid1: int | None = None
        self.cgroups: list[Path] = []
        self.timings: dict[str, float] = {}
        self.boots = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> "Container":
        try:
            self.create()
            self.boot()
            return self
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def create(self) -> None:
        t0 = time.monotonic()
        tar = rootfs.ensure(self.dist, "test")
        self.timings["rootfs_ready"] = time.monotonic() - t0
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        t1 = time.monotonic()
        rootfs.unpack(tar, self.root)
        self.timings["unpack"] = time.monotonic() - t1
        (self.root / "etc" / "hostname").write_text(self.name + "\n")
        # no getty on a console nobody reads
        for unit in ("console-getty.service", "getty@.service", "systemd-networkd-wait-online.service"):
            link = self.root / "etc" / "systemd" / "system" / unit
            link.unlink(missing_ok=True)
            link.symlink_to("/dev/null")

    def _cgroup_shell(self) -> list[str]:
        """A shell that moves itself into NAME subtrees of our cgroups, then execs nspawn."""
        moves = []
        self.cgroups = []
        for h in CGROUP_HIERARCHIES:
            own = _own_cgroup(h)
            if own is None:
                continue
            d = own / self.name
            self.cgroups.append(d)
            moves.append(f"mkdir -p {d} && echo $$ > {d}/cgroup.procs")
        return moves

    def boot(self) -> None:
        if self.proc is not None:
            raise RuntimeError("already running")
        argv = ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "-D", str(self.root),
                f"--machine={self.name}", f"--network-namespace-path=/run/netns/{self.netns.name}",
                "--capability=CAP_NET_ADMIN", "--system-call-filter=bpf", "--kill-signal=SIGRTMIN+3",
                "--console=read-only", "/bin/sh", "-c", BOOT]
        moves = self._cgroup_shell()
        script = " && ".join(moves + ['exec "$@"']) if moves else 'exec "$@"'
        t0 = time.monotonic()
        logf = open(self.log, "ab")
        try:
            self.proc = subprocess.Popen(["/bin/sh", "-c", script, "sh", *argv], stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            logf.close()
        self.boots += 1
        self.pid1 = self._find_pid1(t0 + 20)
        state = self.wait_running(t0 + self.boot_timeout)
        self.timings[f"boot{self.boots}"] = time.monotonic() - t0
        if state not in ("running", "degraded"):
            raise RuntimeError(f"{self.name}: system state {state!r} after boot\n{self.console_tail()}")

    def _find_pid1(self, deadline: float) -> int:
        """The container's PID 1: the process (below nspawn) running systemd."""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nspawn exited ({self.proc.returncode})\n{self.console_tail()}")
            for pid in self._descendants(self.proc.pid):
                try:
                    exe = os.readlink(f"/proc/{pid}/exe")
                except OSError:
                    continue
                if exe.endswith("/systemd") and "nspawn" not in exe:
                    return pid
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: no systemd PID 1 found\n{self.console_tail()}")

    @staticmethod
    def _descendants(pid: int) -> list[int]:
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            for task in Path(f"/proc/{p}/task").glob("*") if Path(f"/proc/{p}/task").exists() else []:
                try:
                    kids = [int(x) for x in (task / "children").read_text().split()]
                except OSError:
                    continue
                out += kids
                todo += kids
        return out

    def wait_running(self, deadline: float) -> str:
        state = ""
        while time.monotonic() < deadline:
            r = self.sh("systemctl is-system-running", check=False, timeout=10)
            state = r.stdout.strip()
            if state in ("running", "degraded", "maintenance"):
                return state
            time.sleep(0.1)
        return state

    def poweroff(self, timeout: float = 30) -> int | None:
        """Shut the container down cleanly (systemctl poweroff), falling back to signals by PID."""
        if self.proc is None:
            return None
        if self.proc.poll() is None and self.pid1:
            self.sh("systemctl poweroff --no-block", check=False, timeout=10)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(timeout=10)
        rc = self.proc.returncode
        self.proc, self.pid1 = None, None
        self._remove_cgroups()
        shutil.rmtree(Path("/run/systemd/nspawn/propagate") / self.name, ignore_errors=True)
        return rc

    def reboot(self) -> float:
        """A reboot: power off, the namespace's netfilter state wiped (as a new kernel would have it),
        boot again. Returns the seconds from the boot start to a running system."""
        self.poweroff()
        self.netns.run("sh", "-c", "iptables -F; iptables -X; iptables-legacy -F 2>/dev/null; "
                                   "iptables-legacy -X 2>/dev/null; ipset destroy 2>/dev/null; nft flush ruleset",
                       check=False)
        t0 = time.monotonic()
        self.boot()
        return time.monotonic() - t0

    def _signal(self, sig: int) -> None:
        try:
            os.kill(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _remove_cgroups(self) -> None:
        for top in self.cgroups:
            if not top.exists():
                continue
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                try:
                    d.rmdir()
                except OSError:
                    pass
            try:
                top.rmdir()
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.poweroff()
        finally:
            self._remove_cgroups()
            shutil.rmtree(Path("/run/systemd/nspawn/propagate") / self.name, ignore_errors=True)
            shutil.rmtree(self.work, ignore_errors=True)

    # -- inside ----------------------------------------------------------------------------------
    def cmd(self, *argv: str) -> list[str]:
        if not self.pid1:
            raise RuntimeError("container not running")
        return ["nsenter", "--target", str(self.pid1), "--all", *CLEAN_ENV, *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(self.cmd(*argv), capture_output=True, text=True, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"in {self.name}: {' '.join(argv)} -> {r.returncode}\n{r.stdout[-3000:]}\n"
                               f"{r.stderr[-3000:]}")
        return r

    def sh(self, script: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run("/bin/sh", "-c", script, check=check, timeout=timeout)

    def put(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Write a file into the root (from outside; the root is a plain directory)."""
        p = self.root / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        p.chmod(mode)

    def console_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


# -- the installed package on a Kamailio host (tests/test_installed.py, `make demo-host`) -------------
KAMAILIO_PROBE = """[Service]
# sipguard's test: the kernel's state when Kamailio starts (ExecStartPre runs before it takes traffic)
ExecStartPre=+/bin/sh -c 'date +%%s.%%N > /run/sgtest-kam.time; iptables-save > /run/sgtest-kam.rules 2>&1; ipset list -o save > /run/sgtest-kam.sets 2>&1; nft list ruleset > /run/sgtest-kam.nft 2>&1; true'
"""
SOURCES_FALLBACK = """[Service]
Environment=SIPGUARD_CONFIG=/etc/sipguard/test-sources.toml
"""
METRICS_PORT = 9108
# what an operator adds to /etc/sipguard/sipguard.toml (README: "Installing on a Kamailio host") to turn
# on the htable mirror, the Prometheus port and the fleet's Redis (all defaults otherwise)
OPERATOR_TOML = f"""
# added by the operator
[metrics]
listen = "127.0.0.1:{METRICS_PORT}"

[htable]
enabled = true

[cluster]
redis_url = "redis://127.0.0.1:6379/0"
node_name = "edge1"
secret_file = "/etc/sipguard/fleet.secret"
"""
# the unit drop-in the package ships for the htable mirror (/usr/share/doc/sipguard/examples/)
HTABLE_DROPIN = "/etc/systemd/system/sipguard.service.d/htable.conf"
MIRROR_BUDGET = 2.0  # a ban (and an unban) in Kamailio's htable within this; a call's timeout is 2 s


class InstalledHost:
    """A lab (hub 198.18.0.1 = the container's namespace) + a booted container with Kamailio running
    as kamailio.service with the example config (journal only), ready for the .deb."""

    def __init__(self, dist: str, deb: Path, tag: str, echo=print, stock_config: bool = False):
        from .netns import Lab

        self.dist, self.deb, self.echo, self.stock = dist, Path(deb), echo, stock_config
        self.lab = Lab(tag)
        self.container: Container | None = None
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []

    def __enter__(self) -> "InstalledHost":
        try:
            self.lab.__enter__()
            self.lab.hub.sysctl("net.unix.max_dgram_qlen", "512")
            self.container = Container(self.dist, self.lab.hub, name=f"sgc{self.lab.tag}")
            self.container.create()
            self._prepare_root()
            self.container.boot()
            self._wait_kamailio()
            return self
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self.container is not None:
                self.container.close()
        finally:
            self.lab.close()

    # -- setup -----------------------------------------------------------------------------------
    def _prepare_root(self) -> None:
        from .kamailio import prepare_config

        c = self.container
        if self.stock:  # Debian's own kamailio.cfg, plus only our scanner xlog line (its sanity line is stock)
            cfg = (c.root / "etc/kamailio/kamailio.cfg").read_text()
            anchor = "\t\t# silent drop for scanners - uncomment next line if want to reply\n"
            if cfg.count(anchor) != 1:
                raise RuntimeError("Debian's kamailio.cfg changed: no single scanner branch to add the xlog to")
            cfg = cfg.replace(anchor, anchor + "\t\txlog(\"L_WARN\", \"Blocked scanner UA '$ua' from $si:$sp\\n\");\n")
            c.put("/etc/kamailio/kamailio.cfg", cfg)
        else:  # the example config, listening on the hub address, its db_text tables in /etc/kamailio
            with tempfile.TemporaryDirectory() as d:
                cfg = prepare_config(Path(d), self.lab.proxy_ip).read_text()
                cfg = cfg.replace(f"text://{Path(d) / 'dbtext'}", "text:///etc/kamailio/dbtext")
                c.put("/etc/kamailio/kamailio.cfg", cfg)
                for f in (Path(d) / "dbtext").iterdir():
                    c.put(f"/etc/kamailio/dbtext/{f.name}", f.read_bytes())
        c.put("/etc/systemd/system/kamailio.service.d/sgtest-probe.conf", KAMAILIO_PROBE)
        # Debian's redis-server.service is enabled by its package: the fleet step starts it, no boot does
        (c.root / "etc/systemd/system/multi-user.target.wants/redis-server.service").unlink(missing_ok=True)
        shutil.copy(self.deb, c.root / "var" / "tmp" / self.deb.name)
        # the units whose sandboxes README compares (their Debian packages' unit files)
        for unit in ("fail2ban.service", "crowdsec.service"):
            src = REPO_ROOT / "packaging" / "debian" / "compare" / unit
            if src.exists():
                c.put(f"/etc/systemd/system/{unit}", src.read_text())

    def _wait_kamailio(self, timeout: float = 30) -> None:
        c = self.container
        if not self.stock:
            c.sh("chown -R kamailio:kamailio /etc/kamailio/dbtext")
        c.sh("systemctl restart kamailio.service", timeout=60)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "5060" in c.sh("ss -lun", check=False).stdout:
                return
            time.sleep(0.2)
        raise RuntimeError("kamailio.service not listening:\n" + self.journal("kamailio.service", 40))

    # -- inside helpers --------------------------------------------------------------------------
    def sg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.container.run("sipguard", *args, check=check, timeout=60)

    def journal(self, unit: str, n: int = 60) -> str:
        return self.container.sh(f"journalctl -b -u {unit} -n {n} --no-pager -o short-iso", check=False).stdout

    def active(self, unit: str) -> str:
        return self.container.run("systemctl", "is-active", unit, check=False).stdout.strip()

    def main_pid(self, unit: str = "sipguard.service") -> int:
        return int(self.container.run("systemctl", "show", "-p", "MainPID", "--value", unit).stdout.strip() or 0)

    def kernel_bans(self) -> set[str]:
        from tests.e2e.scenario import kernel_bans

        return kernel_bans(self.lab.hub.name)

    def db_bans(self) -> set[str]:
        rows = json.loads(self.sg("list", "--json").stdout or "[]")
        return {r.get("target") or r.get("ip") or r.get("address") for r in rows}

    def wait_active(self, unit: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.active(unit)
            if state == "active":
                return state
            time.sleep(0.1)
        return state

    def kamailio_lines(self) -> list[tuple[float, str]]:
        """(journal timestamp, message) of every kamailio.service entry of this boot."""
        out = self.container.sh("journalctl -b -u kamailio.service -o json --no-pager", check=False).stdout
        lines = []
        for raw in out.splitlines():
            try:
                e = json.loads(raw)
            except ValueError:
                continue
            msg = e.get("MESSAGE")
            if isinstance(msg, list):
                msg = bytes(msg).decode(errors="replace")
            lines.append((int(e["__REALTIME_TIMESTAMP"]) / 1e6, msg or ""))
        return lines

    # -- the steps -------------------------------------------------------------------------------
    def check_all(self, fallback_sources: bool = False) -> None:
        self.step_install(fallback_sources)
        self.security = self.security_table()
        self.echo(f"[{self.dist}] systemd-analyze security, this container:\n{self.security}")
        banned = self.step_attack()
        self.step_restarts(banned)
        self.step_operator_features(banned)
        self.step_reboot(banned)
        self.step_upgrade(banned)
        self.step_remove_purge()

    def _t(self, name: str, t0: float) -> None:
        self.timings[name] = time.monotonic() - t0
        self.echo(f"[{self.dist}] {name}: {self.timings[name]:.1f} s")

    def step_install(self, fallback_sources: bool) -> None:
        c, t0 = self.container, time.monotonic()
        assert not (c.root / "etc" / "sipguard").exists()
        if fallback_sources:  # a tree without the automatic source choice: the journal named in a drop-in
            c.put("/etc/sipguard/test-sources.toml", '[sources]\njournal = ["kamailio.service"]\n')
            c.put("/etc/systemd/system/sipguard.service.d/sgtest-sources.conf", SOURCES_FALLBACK)
            self.notes.append("source assertion ran against a written config (SIPGUARD_INSTALLED_WRITE_SOURCES=1)")
        r = c.sh(f"DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
                 f"/var/tmp/{self.deb.name} 2>&1", timeout=180)
        self.install_output = r.stdout
        state = self.wait_active("sipguard.service")
        assert state == "active", f"sipguard.service {state}\n{r.stdout[-2000:]}\n{self.journal('sipguard.service')}"
        assert self.active("sipguard-firewall.service") == "inactive", "the package started the baseline firewall"
        assert c.run("systemctl", "is-enabled", "sipguard-firewall.service", check=False).stdout.strip() != "enabled"
        assert c.run("readlink", "-f", "/usr/bin/sipguard").stdout.strip() == "/opt/sipguard/bin/sipguard"
        exe = c.run("systemctl", "show", "-p", "ExecStart", "--value", "sipguard.service").stdout
        assert "path=/usr/bin/sipguard" in exe, exe
        # following the journal of kamailio.service, with no config written by the test
        deadline = time.monotonic() + 15
        status = ""
        while time.monotonic() < deadline:
            status = self.sg("status", check=False).stdout
            if "daemon: running" in status:
                break
            time.sleep(0.3)
        assert "daemon: running" in status, status + self.journal("sipguard.service")
        if not fallback_sources:  # the final behaviour: the choice and its reason are in the status
            assert "kamailio.service" in status, f"not following the journal of kamailio.service:\n{status}"
        else:  # the attack step below proves the journal is followed
            self.echo(f"[{self.dist}] NOTE: status not checked for the automatic source choice (fallback config)")
        # nothing but the package's own conffile (and the fallback's, when asked for)
        etc = sorted(p.name for p in (c.root / "etc" / "sipguard").iterdir())
        assert etc == sorted(["sipguard.toml", "filters.d"] + (["test-sources.toml"] if fallback_sources else [])), etc
        assert (c.root / "usr/share/man/man8/sipguard.8.gz").exists()
        self._t("install", t0)

    def step_attack(self) -> set[str]:
        from tests.e2e.scenario import FAKE, PHONE_IP, KernelWatcher, PacketTap, Phone, attacks
        from .sip import SipClient

        t0 = time.monotonic()
        hub = self.lab.hub.name
        watcher = KernelWatcher(hub, max_seconds=300)
        watcher.start()
        tap = PacketTap(hub, max_seconds=300)  # on br0: what reached the container and what it answered
        tap.start()
        phone = Phone(self.lab.add_client(PHONE_IP), PHONE_IP, max_seconds=300)
        phone.start()
        problems: list[str] = []
        banned: set[str] = set()
        attacks_run = []
        try:
            assert phone.registered.wait(10), f"phone not registered: {phone.results} {phone.error}"
            from sipguard.config import Config

            default_jails = set(Config().policy.jails)  # the installed daemon runs on the defaults
            for a in attacks():
                if a.jail not in default_jails:  # e.g. the scenario's own fraud jail: not a default
                    self.echo(f"[{self.dist}] {a.key}: skipped (jail {a.jail!r} is not in the default policy)")
                    continue
                attacks_run.append(a)
                ns = self.lab.add_client(a.ip)
                a.started = time.time()
                a.output = a.run(None, ns, a.ip)
                a.kernel = watcher.wait_for(a.ip, 8)
                if a.kernel is None:
                    problems.append(f"{a.key} ({a.ip}) not in the kernel set: {a.output[-300:]}")
                    continue
                banned.add(a.ip)
                mine = [ts for ts, msg in self.kamailio_lines() if re.search(rf"\b{re.escape(a.ip)}\b", msg)
                        and ts >= a.started - 1]
                if len(mine) >= a.threshold:
                    a.decisive = mine[a.threshold - 1]
                lat = a.latency_decisive
                self.echo(f"[{self.dist}] {a.key:16} {a.ip}: in the kernel set "
                          f"{'%.2f s' % lat if lat is not None else '?'} after its decisive line")
                if lat is None or lat > 2.0:
                    problems.append(f"{a.key}: latency {lat} (decisive line found: {len(mine)} lines)")
                with SipClient(self.lab.proxy_ip, netns=ns.name, local_ip=a.ip, timeout=0.7) as s:
                    if s.options() is not None:
                        problems.append(f"{a.key}: {a.ip} is banned but still answered")
        finally:
            phone.stop()
            watcher.stop()
            tap.stop()
        if phone.unanswered:
            t_bad = phone.unanswered[0][0]
            seen = [f"{ts:.2f} {m[:160]}" for ts, m in self.kamailio_lines() if t_bad - 3 <= ts <= t_bad + 6][-40:]
            seen.append(f"on br0 since then: {tap.count_from(PHONE_IP, after=t_bad - 0.05)} packets from the phone, "
                        f"{tap.count_to(PHONE_IP, after=t_bad - 0.05)} to it")
            seen.append(self.container.sh("iptables -L SIPGUARD -v -n -x; iptables -L INPUT -v -n -x | head -5; "
                                          "ipset list | grep -v '^198'; ss -uanm; kamcmd pike.top ALL 2>&1 | head -40; "
                                          "kamcmd htable.dump ipban 2>&1 | head -40",
                                          check=False).stdout)
            seen.append("attacks started: " + ", ".join(f"{a.key}@{a.started:.1f}" for a in attacks_run))
            seen.append(self.container.sh("journalctl -b --no-pager -n 30 -p warning", check=False).stdout)
            report = (f"the phone was not answered {len(phone.unanswered)}x: {phone.unanswered[:5]}; "
                      f"of {len(phone.results)}; Kamailio's lines naming it: {seen}; "
                      f"kernel sets: {sorted(self.kernel_bans())}")
            t_last_bad = phone.unanswered[-1][0]
            answered_after = [r for r in phone.results if r[0] > t_last_bad and r[2] is not None]
            in_kernel = PHONE_IP in self.kernel_bans() or PHONE_IP in watcher.first_seen
            in_htable = PHONE_IP in self.container.sh("kamcmd htable.dump ipban 2>&1", check=False).stdout
            if in_kernel or in_htable or not answered_after:
                problems.append(report)  # sipguard's doing, or the phone never came back: a failure
            else:
                # Seen in ~4 of 10 runs inside the container only (never in tests/e2e on the same lab):
                # Kamailio answers nothing from the phone for 10-30 s during svcrack or the flood, while
                # no set, no rule and no htable entry holds the phone and its packets reach the bridge.
                # Not sipguard's doing (checked above), so it is reported, not failed; the phone must be
                # answered again afterwards.
                self.echo(f"[{self.dist}] NOTE: {report}")
        if PHONE_IP in watcher.first_seen or FAKE in watcher.first_seen:
            problems.append(f"phone or injected address banned: {sorted(watcher.first_seen)}")
        assert not problems, "\n".join(problems) + "\n" + self.journal("sipguard.service", 30)
        assert banned <= self.db_bans()
        self._t("attack", t0)
        return banned

    def step_attack_stock(self) -> None:
        """Debian 13's stock config (identifier /usr/sbin/kamailio): a scanner and a malformed sender."""
        from tests.e2e.scenario import a_malformed, sipvicious

        t0 = time.monotonic()
        for ip, run in (("198.18.0.10", lambda ns, ip: sipvicious(ns, "svmap", ["-t", "0.5", self.lab.proxy_ip])),
                        # the stock sanity check logs 4 of a_malformed's 6 requests: twice is past the threshold 5
                        ("198.18.0.14", lambda ns, ip: a_malformed(None, ns, ip) + a_malformed(None, ns, ip))):
            ns = self.lab.add_client(ip)
            out = run(ns, ip)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and ip not in self.kernel_bans():
                time.sleep(0.1)
            lines = [m for _, m in self.kamailio_lines() if ip in m]
            assert ip in self.kernel_bans(), (f"{ip} not banned with the stock config: {out[-200:]}\n"
                                              f"kamailio lines: {lines[-5:]}\n" + self.sg("status").stdout)
            assert self._dropped(ip)
        self._t("attack_stock", t0)

    def _dropped(self, ip: str) -> bool:
        from .sip import SipClient

        ns = self.lab.clients[ip]
        with SipClient(self.lab.proxy_ip, netns=ns.name, local_ip=ip, timeout=0.7) as s:
            return s.options() is None

    def step_restarts(self, banned: set[str]) -> None:
        c, t0 = self.container, time.monotonic()
        c.run("systemctl", "restart", "sipguard.service", timeout=60)
        assert self.wait_active("sipguard.service") == "active"
        assert banned <= self.kernel_bans() and all(self._dropped(ip) for ip in banned)
        # stop: kernel bans stay and a short one expires on time
        self.sg("ban", "198.18.0.77", "--for", "4s", "--reason", "short")
        assert "198.18.0.77" in self.kernel_bans()
        c.run("systemctl", "stop", "sipguard.service", timeout=60)
        left = self.kernel_bans()
        assert banned <= left and "198.18.0.77" in left, left
        time.sleep(5.5)
        left = self.kernel_bans()
        assert "198.18.0.77" not in left and banned <= left, left
        # Type=notify: `systemctl start` returns once the daemon said READY=1, i.e. with the bans back in
        # the kernel. With its sets and hook removed while it is stopped, they must be there at once.
        self.sg("firewall", "remove-hook")
        assert not banned & self.kernel_bans()
        t1 = time.monotonic()
        c.run("systemctl", "start", "sipguard.service", timeout=150)
        self.timings["start_notify"] = time.monotonic() - t1
        assert self.active("sipguard.service") == "active"
        left = self.kernel_bans()
        assert banned <= left, f"systemctl start returned before the bans were back: {sorted(banned - left)}"
        status = c.run("systemctl", "show", "-p", "StatusText", "--value", "sipguard.service").stdout
        assert status.startswith("bans restored; following "), status
        # kill -9: systemd restarts it (Restart=on-failure), nothing lost, detection goes on
        pid = self.main_pid()
        c.run("kill", "-9", str(pid))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.main_pid() in (0, pid):
            time.sleep(0.2)
        assert self.main_pid() not in (0, pid), self.journal("sipguard.service")
        assert self.wait_active("sipguard.service") == "active"
        assert banned <= self.db_bans() and banned <= self.kernel_bans()
        from tests.e2e.scenario import sipvicious

        ip = "198.18.0.41"  # an address no scenario attack uses: banned only if detection goes on
        assert ip not in self.kernel_bans()
        ns = self.lab.add_client(ip)
        sipvicious(ns, "svmap", ["-t", "0.5", self.lab.proxy_ip], timeout=20)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and ip not in self.kernel_bans():
            time.sleep(0.1)
        assert ip not in banned and ip in self.kernel_bans(), "no detection after the kill -9 restart\n" + self.journal("sipguard.service")
        banned.add(ip)
        self._t("restart_stop_kill", t0)

    # -- the operator's optional features under the installed unit's sandbox -------------------------
    def htable_value(self, ip: str) -> str | None:
        """The value of *ip* in Kamailio's ipban htable (kamcmd, through Kamailio's own ctl socket)."""
        r = self.container.run("kamcmd", "htable.get", "ipban", ip, check=False, timeout=10)
        m = re.search(r"value:\s*(\S+)", r.stdout)
        if m:
            return m.group(1)
        if "doesn't exist" in r.stdout + r.stderr or "not found" in (r.stdout + r.stderr).lower():
            return None
        raise RuntimeError(f"kamcmd htable.get ipban {ip}: {r.returncode}\n{r.stdout}\n{r.stderr}")

    def _until(self, what, deadline_s: float) -> float | None:
        """Seconds until what() is true (polled), None if not within *deadline_s*."""
        t0 = time.monotonic()
        while True:
            if what():
                return time.monotonic() - t0
            if time.monotonic() - t0 > deadline_s:
                return None
            time.sleep(0.02)

    def metrics(self) -> str:
        return self.container.run("python3", "-c", "import urllib.request,sys; sys.stdout.write(urllib.request."
                                  f"urlopen('http://127.0.0.1:{METRICS_PORT}/metrics', timeout=5).read().decode())",
                                  timeout=20).stdout

    def step_operator_features(self, banned: set[str]) -> None:
        """What an operator turns on in /etc/sipguard/sipguard.toml, under the installed (unchanged) unit:
        the htable mirror against the real kamailio.service (running as user kamailio), the Prometheus
        port, and the fleet through a Redis in the container with a secret_file. Put back afterwards."""
        import secrets

        c, t0 = self.container, time.monotonic()
        conf = c.root / "etc/sipguard/sipguard.toml"
        original = conf.read_text()
        unit_before = c.run("systemctl", "cat", "sipguard.service").stdout
        # the operator's steps (README): the secret, the config tables, the packaged drop-in for the mirror
        c.put("/etc/sipguard/fleet.secret", secrets.token_hex(24) + "\n", 0o600)
        c.put("/etc/sipguard/sipguard.toml", original + OPERATOR_TOML, 0o644)
        c.sh(f"install -D -m 0644 /usr/share/doc/sipguard/examples/sipguard-htable.conf {HTABLE_DROPIN}")
        c.run("systemctl", "start", "redis-server.service", timeout=60)
        assert self._until(lambda: c.run("redis-cli", "ping", check=False).stdout.strip() == "PONG", 10) is not None
        self.sg("check-config")
        c.run("systemctl", "daemon-reload")
        since = c.run("date", "+%Y-%m-%d %H:%M:%S").stdout.strip()
        c.run("systemctl", "restart", "sipguard.service", timeout=150)
        try:
            assert self.active("sipguard.service") == "active", self.journal("sipguard.service")
            # the sandbox of the installed unit is as packaged: only the drop-in's group was added
            props = c.run("systemctl", "show", "sipguard.service", "-p", "SupplementaryGroups", "-p", "ProtectSystem",
                          "-p", "PrivateTmp", "-p", "CapabilityBoundingSet", "-p", "RestrictAddressFamilies").stdout
            assert "SupplementaryGroups=kamailio" in props and "ProtectSystem=strict" in props, props
            assert "PrivateTmp=yes" in props and "cap_dac_override" not in props.lower(), props
            self._check_htable(banned)
            self._check_metrics()
            self._check_fleet()
            log = c.run("journalctl", "-u", "sipguard.service", "--since", since, "--no-pager", "-o", "cat").stdout
            bad = [ln for ln in log.splitlines() if re.search(r"htable|rpc|no reply|timed? ?out|redis|fleet", ln, re.I)
                   and re.search(r"warn|error|fail|cannot|refus|unreach", ln, re.I)]
            assert not bad, "\n".join(bad)
        finally:  # the operator turns it all off again: the later steps run on the package's defaults
            c.put("/etc/sipguard/sipguard.toml", original, 0o644)
            c.sh(f"rm -f {HTABLE_DROPIN} /etc/sipguard/fleet.secret; rmdir {Path(HTABLE_DROPIN).parent} || true")
            c.run("systemctl", "daemon-reload")
            c.run("systemctl", "restart", "sipguard.service", timeout=150, check=False)
            c.run("systemctl", "stop", "redis-server.service", timeout=60, check=False)
        assert c.run("systemctl", "cat", "sipguard.service").stdout == unit_before
        assert self.active("sipguard.service") == "active"
        self._t("htable_metrics_fleet", t0)

    def _check_htable(self, banned: set[str]) -> None:
        # at start the mirror dumped the table and set every ban in force (its resync)
        ips = sorted(ip for ip in banned if "/" not in ip)
        assert self._until(lambda: all(self.htable_value(ip) == "2" for ip in ips), 5) is not None, \
            {ip: self.htable_value(ip) for ip in ips}
        ip = "198.18.0.88"
        assert self.htable_value(ip) is None
        # timed from the CLI's return (the ban is in the store then; the CLI's own start-up, ~1 s of Python,
        # is reported beside it): the daemon's part, the kernel and then the RPC calls
        t0 = time.monotonic()
        self.sg("ban", ip, "--for", "1h", "--reason", "htable-check")
        cli_s = time.monotonic() - t0
        ban_s = self._until(lambda: self.htable_value(ip) == "2", 5)
        assert ip in self.kernel_bans()
        assert ban_s is not None and ban_s < MIRROR_BUDGET, f"not in Kamailio's htable within {MIRROR_BUDGET} s: {ban_s}"
        t0 = time.monotonic()
        self.sg("unban", ip)
        cli_u = time.monotonic() - t0
        unban_s = self._until(lambda: self.htable_value(ip) is None, 5)
        assert unban_s is not None and unban_s < MIRROR_BUDGET, f"still in Kamailio's htable: {unban_s}"
        assert ip not in self.kernel_bans()
        self.timings["htable_ban"], self.timings["htable_unban"] = ban_s, unban_s
        self.echo(f"[{self.dist}] htable mirror: ban in Kamailio's table {ban_s:.2f} s after `sipguard ban` "
                  f"returned ({cli_s:.2f} s the command), unban gone {unban_s:.2f} s after `sipguard unban` "
                  f"returned ({cli_u:.2f} s)")
        # Kamailio answered every call into /run/sipguard: nothing left there, nothing in /tmp
        st = self.container.run("stat", "-c", "%U:%G %a", "/run/sipguard").stdout.split()
        assert st == ["root:kamailio", "2750"], st
        left = self.container.sh("ls -A /run/sipguard; find /tmp /var/tmp -name 'sg_*' -o -name 'sipguard-rpc-*'").stdout.split()
        assert not left, left

    def _check_metrics(self) -> None:
        text = self.metrics()
        names = {m.group(1).removesuffix("_total") for m in re.finditer(r"^# TYPE (sipguard_\w+) ", text, re.M)}
        assert {"sipguard_lines_read", "sipguard_active_bans", "sipguard_fleet_in_sync"} <= names, sorted(names)
        # no mirror call failed (a call that waited its timeout is an RpcError, counted here)
        errors = [ln for ln in text.splitlines() if ln.startswith("sipguard_enforcer_errors_total{")
                  and not ln.rstrip().endswith(" 0.0")]
        assert not errors, errors
        self.echo(f"[{self.dist}] metrics on 127.0.0.1:{METRICS_PORT}: {len(names)} sipguard_ families")

    def _check_fleet(self) -> None:
        c = self.container
        ok = self._until(lambda: "cluster: node edge1 via redis://127.0.0.1:6379/0: in sync" in self.sg("status").stdout,
                         15)
        status = self.sg("status").stdout
        assert ok is not None and re.search(r"^\s+edge1: last heartbeat -?[\d.]+s ago, in sync$", status, re.M), \
            status + "\n" + self.journal("sipguard.service", 60)
        ip = "198.18.0.89"
        self.sg("ban", ip, "--for", "1h", "--reason", "fleet-check")
        entry: dict = {}

        def published() -> bool:  # redis-cli's raw output: one field or value a line
            out = c.run("redis-cli", "XRANGE", "sipguard:stream", "-", "+").stdout.splitlines()
            for ln in out:
                if ln.startswith("{") and f'"ip":"{ip}"' in ln:
                    entry.update(json.loads(ln))
                    return True
            return False

        assert self._until(published, 5) is not None, c.run("redis-cli", "XRANGE", "sipguard:stream", "-", "+").stdout
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", entry.get("sig") or ""), entry  # signed (HMAC-SHA256, 128 bits)
        assert entry.get("manual") is True and entry.get("origin") == "edge1", entry
        self.sg("unban", ip)
        self.echo(f"[{self.dist}] fleet: status in sync via 127.0.0.1:6379, the manual ban on the stream, signed")

    def step_reboot(self, banned: set[str]) -> None:
        c, t0 = self.container, time.monotonic()
        r = self.sg("firewall", "apply", "--force")
        assert "INPUT" in c.sh("iptables -S INPUT").stdout
        c.run("systemctl", "enable", "sipguard-firewall.service")
        boot = c.reboot()
        self.timings["reboot_boot"] = boot
        assert self.wait_active("kamailio.service") == "active", self.journal("kamailio.service")
        rules = (c.root / "run").exists() and c.sh("cat /run/sgtest-kam.rules /run/sgtest-kam.nft", check=False).stdout
        sets = c.sh("cat /run/sgtest-kam.sets", check=False).stdout
        assert ":INPUT DROP" in rules or "policy drop" in rules, f"baseline not in place when Kamailio started:\n{rules}"
        missing = [ip for ip in banned if ip not in sets and ip not in rules]
        assert not missing, f"bans not in the kernel when Kamailio started: {missing}\n{sets[-1500:]}"
        assert self.active("sipguard.service") == "active"
        assert all(self._dropped(ip) for ip in sorted(banned)[:3])
        self.firewall_output = r.stdout
        self._t("firewall_reboot", t0)

    def step_upgrade(self, banned: set[str]) -> None:
        """From the previous package (this one repacked with a lower version) to this one."""
        c, t0 = self.container, time.monotonic()
        c.sh(f"""set -e
cd /var/tmp && rm -rf prev && dpkg-deb -R {self.deb.name} prev
sed -i 's/^Version: \\(.*\\)$/Version: \\1~prev/' prev/DEBIAN/control
dpkg-deb --root-owner-group -Zgzip -z1 -b prev prev.deb >/dev/null
""", timeout=180)
        # down to the previous version first (its maintainer scripts see an upgrade too), then up again
        c.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y --allow-downgrades /var/tmp/prev.deb 2>&1",
             timeout=180)
        assert self.wait_active("sipguard.service") == "active"
        before = self.db_bans()
        assert banned <= before
        c.sh(f"DEBIAN_FRONTEND=noninteractive apt-get install -y /var/tmp/{self.deb.name} 2>&1", timeout=180)
        assert self.wait_active("sipguard.service") == "active"
        assert before <= self.db_bans() and banned <= self.kernel_bans()
        ver = c.run("dpkg-query", "-W", "-f=${Version}", "sipguard").stdout
        assert "~prev" not in ver, ver
        self._t("upgrade", t0)

    def step_remove_purge(self) -> None:
        c, t0 = self.container, time.monotonic()
        r = c.sh("DEBIAN_FRONTEND=noninteractive apt-get remove -y sipguard 2>&1", timeout=180)
        assert "sipguard firewall remove" in r.stdout, r.stdout
        assert self.active("sipguard.service") != "active"
        sets = c.sh("ipset list -n", check=False).stdout.split()
        assert not [s for s in sets if s.startswith("sipguard")], sets
        chains = [ln for ln in c.sh("iptables-save; ip6tables-save", check=False).stdout.splitlines()
                  if re.search(r"\bSIPGUARD\b", ln)]
        assert not chains, chains
        assert "inet sipguard" not in c.sh("nft list tables", check=False).stdout
        # the baseline firewall stays (removing it could open the host)
        assert ":INPUT DROP" in c.sh("iptables-save", check=False).stdout
        assert (c.root / "var/lib/sipguard").exists() and (c.root / "etc/sipguard/sipguard.toml").exists()
        c.sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y sipguard 2>&1", timeout=180)
        for p in ("var/lib/sipguard", "var/lib/private/sipguard", "etc/sipguard", "opt/sipguard"):
            assert not (c.root / p).exists(), p
        self._t("remove_purge", t0)

    def security_table(self) -> str:
        """`systemd-analyze security` of sipguard's, fail2ban's and crowdsec's units, one container."""
        c = self.container
        rows = []
        for unit in ("sipguard.service", "fail2ban.service", "crowdsec.service"):
            r = c.run("systemd-analyze", "security", "--no-pager", unit, check=False)
            m = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", r.stdout + r.stderr)
            rows.append(f"| {unit} | {m.group(1)} {m.group(2)} |" if m else f"| {unit} | (not analysed) |")
        return "| unit | `systemd-analyze security` |\n|---|---|\n" + "\n".join(rows)
