#!/usr/bin/env python3
"""Capture tests/data/real/{traditional,iso}-path-ident.log and journal-path-ident.json: Kamailio
logging under the syslog identifier `/usr/sbin/kamailio`, as Debian 13's stock `kamailio.service`
does (it starts `/usr/sbin/kamailio` and sets no `log_name`, so openlog() gets argv[0]).

Run as root from the repository root::

    PYTHONPATH=. .venv/bin/python -m tests.lab.capture_path_ident [traditional iso journal]

`journal`: Kamailio runs as user kamailio (like the stock unit's User=kamailio) inside the PID and
mount namespaces of a private systemd-journald (tests/lab/journald.py) and the lab's hub network
namespace; the file is what `journalctl -o json --identifier=/usr/sbin/kamailio` printed.

The same lab and scenario as `tests.lab.capture_real_logs` (every attacker of
tests/data/real/README.md from its own address), with two differences only: the example config
without its `log_name="kamailio"` line, and Kamailio started as `/usr/sbin/kamailio`.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import EXAMPLE_DIR
from .capture_real_logs import DOMAIN, OUT_DIR, PROXY, SCENARIO, play
from .kamailio import Kamailio
from .netns import Lab

KAMAILIO = "/usr/sbin/kamailio"
FORMATS = {"traditional": "RSYSLOG_TraditionalFileFormat", "iso": "RSYSLOG_FileFormat", "journal": None}


class PathKamailio(Kamailio):
    """Kamailio started by its absolute path (argv[0] = /usr/sbin/kamailio)."""

    def kamailio_argv(self, cfg: Path) -> list[str]:
        argv = super().kamailio_argv(cfg)
        argv[0] = KAMAILIO
        return argv


def config_without_log_name(workdir: Path) -> Path:
    text = (EXAMPLE_DIR / "kamailio.cfg").read_text()
    lines = [ln for ln in text.splitlines(keepends=True) if not ln.startswith("log_name=")]
    assert len(lines) == len(text.splitlines()) - 1, "the example config has one log_name line"
    out = workdir / "kamailio-no-log-name.cfg"
    out.write_text("".join(lines))
    return out


def capture_journal(verbose: bool = True) -> Path:
    import os
    import pwd
    import subprocess

    from .journald import PrivateJournald
    from .kamailio import prepare_config

    kam = pwd.getpwnam("kamailio")
    with tempfile.TemporaryDirectory(prefix="sgl-capj-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        cfg = prepare_config(work, PROXY, DOMAIN, cfg=config_without_log_name(work))
        run = work / "run"
        run.mkdir()
        os.chown(run, kam.pw_uid, kam.pw_gid)
        with Lab("capj", proxy_ip=PROXY) as lab, PrivateJournald() as j:
            proc = j.popen(KAMAILIO, "-DD", "-f", str(cfg), "-Y", str(run), "-P", str(run / "kamailio.pid"),
                           "-w", str(work), user="kamailio", netns=lab.hub.name, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 10
                while f"{PROXY}:5060" not in lab.hub.run("ss", "-lunH", check=False).stdout:
                    assert time.monotonic() < deadline and proc.poll() is None, "kamailio did not start"
                    time.sleep(0.1)
                time.sleep(1.0)
                play(lab, SCENARIO, "journal", verbose)
                time.sleep(1.0)
            finally:
                proc.terminate()  # nsenter passes it on; the namespace's end stops the rest
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            time.sleep(1.0)
            p = subprocess.run([str(j.journalctl), "--output=json", "--all", "--no-pager", "--quiet",
                                f"--identifier={KAMAILIO}"], capture_output=True, check=True, timeout=60)
        out = OUT_DIR / "journal-path-ident.json"
        out.write_bytes(p.stdout)
    return out


def capture(name: str, verbose: bool = True) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    if name == "journal":
        return capture_journal(verbose)
    with tempfile.TemporaryDirectory(prefix="sgl-capp-") as tmp:
        logfile = Path(tmp) / f"{name}.log"
        cfg = config_without_log_name(Path(tmp))
        with Lab("capp", proxy_ip=PROXY) as lab:
            with PathKamailio(lab.hub, PROXY, logmode="rsyslog", template=FORMATS[name], logfile=logfile,
                              domain=DOMAIN, cfg=cfg):
                time.sleep(1.0)
                play(lab, SCENARIO, name, verbose)
                time.sleep(1.0)
        out = OUT_DIR / f"{name}-path-ident.log"
        shutil.copyfile(logfile, out)
    return out


def main(argv: list[str]) -> int:
    for n in argv or list(FORMATS):
        path = capture(n)
        print(f"wrote {path} ({sum(1 for _ in path.open('rb'))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
