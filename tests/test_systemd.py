"""The systemd units pass `systemd-analyze verify` (syntax, known keys and values, executables).

The units name /usr/local/bin/sipguard, which a test machine may not have: each unit is copied to a
temp dir with ExecStart pointing at a stub executable there (same arguments), and verify runs on the
copies. `systemd-analyze verify` exits 0 even for unknown keys or unparsable values, so every line it
prints about our files is a failure; a deliberately broken copy proves the check catches errors.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
NAMES = ("sipguard.service", "sipguard-firewall.service")

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def _copy(tmp: Path, mutate=None) -> list[Path]:
    stub = tmp / "bin" / "sipguard"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    out = []
    for name in NAMES:
        text = (UNITS / name).read_text()
        assert "/usr/local/bin/sipguard " in text, f"{name}: ExecStart should run /usr/local/bin/sipguard"
        text = text.replace("/usr/local/bin/sipguard", str(stub))
        if mutate:
            text = mutate(name, text)
        p = tmp / name
        p.write_text(text)
        out.append(p)
    return out


def _verify(paths: list[Path]) -> list[str]:
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, paths)],
                       capture_output=True, text=True, timeout=60)
    lines = (r.stdout + r.stderr).splitlines()
    ours = [ln for ln in lines if any(str(p) in ln or p.name in ln for p in paths)]
    if r.returncode != 0:
        ours.append(f"exit code {r.returncode}: " + "; ".join(lines[-5:]))
    return ours


def test_units_verify_clean(tmp_path):
    problems = _verify(_copy(tmp_path))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("bad", ["ProtectSytem=strict", "ProtectSystem=stric", "Restart=sometimes",
                                 "Type=simplex"])
def test_verify_catches_errors(tmp_path, bad):
    key = bad.split("=")[0].replace("Sytem", "System")

    def mutate(name, text):
        if name != "sipguard.service":
            return text
        lines = [ln for ln in text.splitlines() if not ln.startswith(key + "=")]
        i = lines.index("[Service]")
        return "\n".join(lines[: i + 1] + [bad] + lines[i + 1:]) + "\n"

    assert _verify(_copy(tmp_path, mutate)), f"verify did not notice {bad!r}"


def test_missing_executable_is_caught(tmp_path):
    paths = _copy(tmp_path)
    (tmp_path / "bin" / "sipguard").unlink()
    assert _verify(paths)


def test_service_contract():
    text = (UNITS / "sipguard.service").read_text()
    for needle in ("ExecStart=/usr/local/bin/sipguard run", "Restart=on-failure", "ProtectSystem=strict",
                   "StateDirectory=sipguard", "NoNewPrivileges=yes", "ReadOnlyPaths=/var/log",
                   "CAP_NET_ADMIN", "After="):
        assert needle in text, needle
    assert "rsyslog.service" in text and "kamailio.service" in text
    fw = (UNITS / "sipguard-firewall.service").read_text()
    assert "firewall apply" in fw and "Type=oneshot" in fw


def test_packaged_units_verify_clean(tmp_path):
    """The .deb's units (packaging/build_deb.py: ExecStart=/usr/bin/sipguard) verify as cleanly."""
    import sys

    sys.path.insert(0, str(UNITS.parent / "packaging"))
    import build_deb

    stub = tmp_path / "bin" / "sipguard"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    paths = []
    for name in NAMES:
        text = build_deb.unit_text(name)
        assert "/usr/bin/sipguard " in text and "/usr/local/bin" not in text, name
        p = tmp_path / name
        p.write_text(text.replace("/usr/bin/sipguard", str(stub)))
        paths.append(p)
    problems = _verify(paths)
    assert not problems, "\n".join(problems)


def test_service_never_pulls_in_the_baseline_firewall():
    """Starting sipguard.service (the package's postinst does) must not apply the baseline firewall."""
    text = (UNITS / "sipguard.service").read_text()
    for key in ("Wants=", "Requires=", "BindsTo=", "Requisite="):
        assert not any(ln.startswith(key) and "sipguard-firewall" in ln for ln in text.splitlines()), key
    assert "Before=kamailio.service" in text
