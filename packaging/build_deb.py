"""Build the Debian package dist/sipguard_<version>~deb<N>_<arch>.deb in a clean root of that distribution.

`make deb` (the machine's own distribution) and `make deb DIST=bookworm|trixie` run this. The way sbuild
and pbuilder build in a chroot: a cached debootstrap root of the target (packaging/rootfs.py) is unpacked,
a virtual environment is made inside it at its final path /opt/sipguard with that distribution's Python
(3.11 on 12, 3.13 on 13) and sipguard with the wheels it needs installed into it; the config file, the man
page and the bash completion are generated there from the code (packaging/gen_conffile.py, gen_docs.py);
then the tree is staged with the units (systemd/, ExecStart=/usr/bin/sipguard), the examples, the
maintainer scripts (packaging/debian/) and assembled by the target's own `dpkg-deb --build`.

It never boots the root and touches nothing outside the cache dir and dist/ (pip inside the root reaches
PyPI through the host's network, with the host's CA bundle bound in read-only).

    python3 packaging/build_deb.py [--dist bookworm|trixie] [--out dist]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rootfs  # noqa: E402  (packaging/rootfs.py, stdlib only)

REPO = Path(__file__).resolve().parent.parent
DEB = REPO / "packaging" / "debian"
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"
UNITS = ("sipguard.service", "sipguard-firewall.service")
SKIP = {".git", ".venv", "dist", "build", "__pycache__", ".pytest_cache", ".hypothesis", "bench"}
MAINTAINER = "sipguard maintainers <sipguard@example.org>"


def host_dist() -> str:
    osr = Path("/etc/os-release").read_text()
    m = re.search(r"^VERSION_CODENAME=(\w+)", osr, re.M)
    if not m or m.group(1) not in rootfs.DISTS:
        raise SystemExit(f"this machine is not one of {sorted(rootfs.DISTS)}: name one with --dist")
    return m.group(1)


def project_version() -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    return m.group(1)


def _copy_source(dest: Path) -> None:
    def ignore(_d, names):
        return [n for n in names if n in SKIP or n.endswith((".pyc", ".deb"))]

    shutil.copytree(REPO, dest, ignore=ignore, symlinks=True)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r


def unit_text(name: str) -> str:
    """The packaged unit: the source unit with ExecStart= on /usr/bin/sipguard (pip installs keep theirs)."""
    text = (REPO / "systemd" / name).read_text()
    return text.replace("/usr/local/bin/sipguard", "/usr/bin/sipguard")


def control(version: str, arch: str, pyver: str, size_kb: int) -> str:
    major, minor = pyver.split(".")
    nextpy = f"{major}.{int(minor) + 1}"
    return f"""Package: sipguard
Version: {version}
Architecture: {arch}
Maintainer: {MAINTAINER}
Installed-Size: {size_kb}
Depends: python{pyver}, python3 (>= {pyver}~), python3 (<< {nextpy}), libc6, iptables, ipset
Recommends: kamailio, nftables
Suggests: rsyslog
Section: net
Priority: optional
Homepage: https://github.com/sipguard/sipguard
Description: bans the sources that attack a Kamailio SIP server
 sipguard follows what Kamailio logs (a log file or the journal of
 kamailio.service), detects scanners, password guessers, floods and malformed
 traffic with filters kept as data, scores each source in a policy and bans
 attackers in the kernel (ipset with an iptables hook chain, or nftables).
 .
 The daemon runs as sipguard.service in a hardened sandbox. The baseline
 firewall (sipguard firewall apply) is never applied by the package itself.
 .
 This package bundles its Python dependencies in a virtual environment under
 /opt/sipguard.
"""


def changelog(version: str) -> bytes:
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))))
    text = f"""sipguard ({version}) unstable; urgency=medium

  * Package built from the sipguard source tree (packaging/build_deb.py).

 -- {MAINTAINER}  {date}
"""
    return gzip.compress(text.encode(), 9, mtime=0)


def build(dist: str, out: Path) -> Path:
    t0 = time.monotonic()
    tar = rootfs.ensure(dist, "build")
    work = Path(tempfile.mkdtemp(prefix=f"build-{dist}-", dir=rootfs.cache_dir()))
    try:
        root = rootfs.unpack(tar, work / "root")
        _copy_source(root / "var" / "tmp" / "src")
        (root / "var" / "tmp" / "out").mkdir()
        binds = [f"{HOST_CA}:/etc/ssl/certs/host-ca.crt"] if Path(HOST_CA).exists() else []
        env = {"PIP_CERT": "/etc/ssl/certs/host-ca.crt"} if binds else {}
        env.update({"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_COMPILE": "1", "PYTHONDONTWRITEBYTECODE": "1"})
        print(f"[deb] {dist}: venv at /opt/sipguard and pip install inside the root", file=sys.stderr, flush=True)
        rootfs.nspawn_pipe(root, """
cd /var/tmp/src
python3 -m venv /opt/sipguard
/opt/sipguard/bin/pip install -q --no-compile /var/tmp/src
/opt/sipguard/bin/pip uninstall -q -y pip
# only sipguard's own command: the dependencies' console scripts are not this package's interface
find /opt/sipguard/bin -type f ! -name sipguard -delete
rm -f /opt/sipguard/.gitignore  # Python 3.13's venv writes one
# the C extension built here (python-iptables): stripped as Debian ships objects
find /opt/sipguard/lib -name '*.so' ! -path '*.libs/*' -exec strip --strip-unneeded --remove-section=.comment --remove-section=.note {} +
O=/var/tmp/out
/opt/sipguard/bin/python3 packaging/gen_conffile.py > $O/sipguard.toml
/opt/sipguard/bin/python3 packaging/gen_docs.py man > $O/sipguard.8
/opt/sipguard/bin/python3 packaging/gen_docs.py bash > $O/sipguard.bash
/opt/sipguard/bin/sipguard --version > $O/version
python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' > $O/pyver
dpkg --print-architecture > $O/arch
""", binds=binds, env=env, timeout=1200)
        o = root / "var" / "tmp" / "out"
        pyver = (o / "pyver").read_text().strip()
        arch = (o / "arch").read_text().strip()
        version = f"{project_version()}~deb{rootfs.DISTS[dist]}"
        pkg = work / "pkg"
        (pkg / "opt").mkdir(parents=True)
        shutil.move(str(root / "opt" / "sipguard"), pkg / "opt" / "sipguard")
        for d in list((pkg / "opt" / "sipguard").rglob("__pycache__")):
            shutil.rmtree(d)
        _stage(pkg, o, dist)
        size_kb = sum(p.lstat().st_size for p in pkg.rglob("*") if not p.is_dir()) // 1024
        debian = pkg / "DEBIAN"
        debian.mkdir()
        (debian / "control").write_text(control(version, arch, pyver, size_kb))
        (debian / "conffiles").write_text("/etc/sipguard/sipguard.toml\n")
        for s in ("postinst", "prerm", "postrm"):
            shutil.copy(DEB / s, debian / s)
            (debian / s).chmod(0o755)
        sums = []
        for p in sorted(pkg.rglob("*")):
            rel = p.relative_to(pkg)
            if p.is_file() and not p.is_symlink() and rel.parts[0] not in ("DEBIAN", "etc"):
                sums.append(f"{hashlib.md5(p.read_bytes()).hexdigest()}  {rel}")
        (debian / "md5sums").write_text("\n".join(sums) + "\n")
        bindir = pkg / "opt" / "sipguard" / "bin"
        for p in pkg.rglob("*"):  # dirs and commands 0755, other files 0644, all root's (--root-owner-group)
            if p.is_symlink():
                continue
            p.chmod(0o755 if p.is_dir() or p.parent == bindir
                    or (p.parent.name == "DEBIAN" and p.name in ("postinst", "prerm", "postrm")) else 0o644)
        # the target's own dpkg-deb assembles it
        shutil.move(str(pkg), root / "var" / "tmp" / "pkg")
        name = f"sipguard_{version}_{arch}.deb"
        rootfs.nspawn_pipe(root, f"dpkg-deb --root-owner-group -Zxz --build /var/tmp/pkg /var/tmp/out/{name} >/dev/null")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(o / name, out / name)
        print(f"[deb] {out / name} ({(out / name).stat().st_size // 1_000_000} MB, Python {pyver}) "
              f"in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        return out / name
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _stage(pkg: Path, o: Path, dist: str) -> None:
    def put(rel: str, data: bytes | str, mode: int = 0o644) -> None:
        p = pkg / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        p.chmod(mode)

    (pkg / "usr" / "bin").mkdir(parents=True)
    os.symlink("/opt/sipguard/bin/sipguard", pkg / "usr" / "bin" / "sipguard")
    unitdir = "usr/lib/systemd/system" if dist != "bookworm" else "lib/systemd/system"
    for u in UNITS:
        put(f"{unitdir}/{u}", unit_text(u))
    put("etc/sipguard/sipguard.toml", (o / "sipguard.toml").read_bytes())
    put("usr/share/man/man8/sipguard.8.gz", gzip.compress((o / "sipguard.8").read_bytes(), 9, mtime=0))
    put("usr/share/bash-completion/completions/sipguard", (o / "sipguard.bash").read_bytes())
    doc = "usr/share/doc/sipguard"
    put(f"{doc}/copyright", (DEB / "copyright").read_text())
    put(f"{doc}/changelog.gz", changelog(f"{project_version()}~deb{rootfs.DISTS[dist]}"))
    put(f"{doc}/README.md.gz", gzip.compress((REPO / "README.md").read_bytes(), 9, mtime=0))
    ex = REPO / "examples" / "kamailio"
    for f in sorted(ex.rglob("*")):
        if f.is_file():
            put(f"{doc}/examples/kamailio/{f.relative_to(ex)}", f.read_bytes())
    for f in sorted((DEB / "examples").iterdir()):
        put(f"{doc}/examples/{f.name}", f.read_bytes())
    put("usr/share/lintian/overrides/sipguard", (DEB / "lintian-overrides").read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dist", default=os.environ.get("DIST") or None, choices=sorted(rootfs.DISTS))
    ap.add_argument("--out", default=str(REPO / "dist"))
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("building in a root file system needs root (debootstrap, systemd-nspawn)")
    print(build(a.dist or host_dist(), Path(a.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
