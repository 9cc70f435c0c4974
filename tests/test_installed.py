"""The Debian package, installed on a real systemd host (issue 13), and what it ships.

Without root (always): the generated conffile lists every option with its default and, uncommented,
loads to those defaults; the man page and completion name every command; the packaged units run
/usr/bin/sipguard; the maintainer scripts never touch the baseline firewall's unit.

As root (`make test` in CI), for Debian 12 and then 13: `packaging/build_deb.py` builds that
distribution's .deb in a clean root (cached, packaging/rootfs.py), lintian has no error on it, and a
container with systemd as PID 1 (tests/lab/container.py) in a lab namespace (tests/lab/netns.py, hub
198.18.0.1) runs Kamailio from that Debian as kamailio.service with the example config, logging to the
journal (no rsyslog). Then, in that container:

1. `apt-get install ./sipguard.deb`: sipguard.service is active, with no config written by the test,
   following the journal of kamailio.service (`sipguard status`);
2. SIPVicious and the e2e scenario's senders (tests/e2e/scenario.py) attack from their own namespaces:
   each attacker is in the container's kernel set within 2 s of its decisive log line (the journal's own
   timestamp of the Nth line naming it: never later than the real decisive one) and its packets are
   dropped; the phone's requests are all answered and it is never banned; the address injected into
   attacker-controlled text is never banned;
3. `systemctl restart`: bans back and enforced; `systemctl stop`: kernel bans stay, a short one expires
   on time; with the sets and hook removed while stopped, `systemctl start` (Type=notify: the daemon's
   READY=1) returns with the bans already back in the kernel; `kill -9` of the main process: systemd
   restarts it, no ban lost, detection goes on;
   then what an operator turns on in /etc/sipguard/sipguard.toml (README, step 4), under the packaged
   unit plus only its packaged htable drop-in (SupplementaryGroups=kamailio): the htable mirror against
   the real kamailio.service (user kamailio): the bans in force in Kamailio's ipban table after the
   restart, a `sipguard ban` there and a `sipguard unban` gone within 2 s each (kamcmd through
   Kamailio's ctl socket), no htable error counted or logged (a call that waited its timeout is one),
   no reply path left; `[metrics] listen`: /metrics from the unit on 127.0.0.1; `[cluster]` with a
   secret_file and Debian's redis-server in the container: `status` in sync, the manual ban on the
   fleet stream, signed; then all of it turned off again;
4. `sipguard firewall apply --force` with sipguard-firewall.service enabled, then a reboot (power off,
   the namespace's netfilter wiped as a new kernel has it, boot): when kamailio.service starts (a
   drop-in records the kernel's state from ExecStartPre) the baseline rules and the bans are in place;
5. an upgrade from the previous package (the same tree, a lower version) keeps bans and state;
6. `apt-get remove` leaves no sipguard chain or set in the kernel and says how to remove the baseline;
   `purge` leaves no state and no config;
and `systemd-analyze security` scores sipguard.service beside fail2ban's and crowdsec's Debian units in
the same container (the table README shows is printed with -s).

SIPGUARD_INSTALLED_WRITE_SOURCES=1 runs step 1's source assertion against a unit drop-in naming the
journal source, for a tree without the automatic source selection (say so when you use it).
Timings (first run with the rootfs build, cached runs) are printed with -s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "packaging"))
import build_deb  # noqa: E402
import gen_conffile  # noqa: E402
import gen_docs  # noqa: E402

DISTS = ("bookworm", "trixie")
MAX_BAN_LATENCY = 2.0


# -- without root ---------------------------------------------------------------------------------
def _uncommented(text: str, skip_tables: tuple[str, ...] = ("cluster", "blocklists")) -> str:
    """The conffile with every `# [table]` and `# key = value` line uncommented (optional tables kept out)."""
    out, skipping = [], False
    for line in text.splitlines():
        m = re.match(r"^# (\[\[?[a-z_.]+\]\]?)$", line)
        if m:
            name = m.group(1).strip("[]").split(".")[0]
            skipping = name in skip_tables
            if not skipping:
                out.append(m.group(1))
            continue
        m = re.match(r"^# ([a-z_]+ = .*)$", line)
        if m and not skipping:
            out.append(m.group(1))
    return "\n".join(out) + "\n"


def test_conffile_lists_every_option_with_its_default(tmp_path, monkeypatch):
    from sipguard.config import BlocklistConfig, ClusterConfig, Config, load_config

    text = gen_conffile.render()
    for name, field in Config.model_fields.items():
        if field.exclude:
            continue
        model = {"cluster": ClusterConfig, "blocklists": BlocklistConfig}.get(name, field.annotation)
        if not hasattr(model, "model_fields"):
            assert f"# {name} = " in text, name
            continue
        assert re.search(rf"^# \[\[?{name}\]\]?$", text, re.M), f"no [{name}] table"
        for key in model.model_fields:
            if (name, key) == ("policy", "jails"):  # written as [policy.jails.NAME] tables
                assert re.search(r"^# \[policy\.jails\.auth\]$", text, re.M)
                continue
            assert re.search(rf"^# {key} = |^#   {key}: ", text, re.M), f"{name}.{key} missing"
    p = tmp_path / "all.toml"
    p.write_text(_uncommented(text))
    from sipguard.config import resolve_state_dir

    monkeypatch.delenv("SIPGUARD_STATE_DIR", raising=False)
    cfg = load_config(p)
    assert resolve_state_dir(cfg) == resolve_state_dir(Config())  # the example value is the effective default
    loaded = cfg.model_dump(exclude={"state_dir"})
    defaults = Config().model_dump(exclude={"state_dir"})
    for computed in gen_conffile.COMPUTED:
        if computed[0] in loaded and computed[0] != "cluster":
            loaded[computed[0]].pop(computed[1]), defaults[computed[0]].pop(computed[1])
    assert loaded == defaults
    # the optional tables, uncommented too, are valid
    p.write_text(_uncommented(text, skip_tables=()))
    cfg = load_config(p)
    assert cfg.cluster is not None and cfg.blocklists[0].name == "spamhaus-drop"


def test_conffile_check_catches_a_wrong_default(monkeypatch):
    """The round trip above fails when the file says another value than the model (it can fail)."""
    from sipguard.config import Config

    real = gen_conffile.render
    monkeypatch.setattr(gen_conffile, "render", lambda: real().replace("# bantime = 3600.0", "# bantime = 60.0"))
    text = gen_conffile.render()
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.toml"
        p.write_text(_uncommented(text))
        from sipguard.config import load_config

        assert load_config(p).policy.bantime != Config().policy.bantime


def test_man_page_and_completion_name_every_command():
    man, bash = gen_docs.man(), gen_docs.bash()
    assert man.startswith(".TH SIPGUARD 8 ")
    for path, _cmd in gen_docs._commands(gen_docs.tree()):
        words = " ".join(path)
        assert f".B sipguard {gen_docs._roff(words)}" in man, words
        assert f'"{words}")' in bash, words
    assert "remove\\-hook" in man and "--confirm-timeout" in bash


def test_packaged_units_run_usr_bin():
    for name in build_deb.UNITS:
        text = build_deb.unit_text(name)
        assert "/usr/local/bin" not in text
        assert re.search(r"^ExecStart=/usr/bin/sipguard ", text, re.M), name
    assert "ExecStart=/usr/bin/sipguard run" in build_deb.unit_text("sipguard.service")
    assert "Wants=sipguard-firewall" not in build_deb.unit_text("sipguard.service")


def test_maintainer_scripts():
    deb = REPO / "packaging" / "debian"
    for s in ("postinst", "prerm", "postrm"):
        subprocess.run(["sh", "-n", str(deb / s)], check=True)
        text = "\n".join(ln for ln in (deb / s).read_text().splitlines() if not ln.lstrip().startswith("#"))
        # the baseline firewall is never applied, enabled or removed by the package
        assert not re.search(r"(enable|start|restart)\W+'?sipguard-firewall", text), s
        assert "firewall apply" not in text and "firewall remove\n" not in text
    assert "firewall remove-hook" in (deb / "prerm").read_text()
    assert "sipguard firewall remove\\` " in (deb / "prerm").read_text()  # the message names the verb
    assert "rm -rf /var/lib/sipguard" in (deb / "postrm").read_text()


# -- as root: the container proof ----------------------------------------------------------------
def _need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, systemd-nspawn, network namespaces)")
    missing = [t for t in ("debootstrap", "systemd-nspawn", "lintian", "svmap", "nsenter") if not shutil.which(t)]
    if missing:
        pytest.fail(f"missing tools (make apt installs them): {missing}")


TIMINGS: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module")
def debs():
    """One .deb per distribution: built now (or SIPGUARD_TEST_DEB_<DIST> names one already built)."""
    _need_root()
    out = {}
    for dist in DISTS:
        given = os.environ.get(f"SIPGUARD_TEST_DEB_{dist.upper()}")
        t0 = time.monotonic()
        out[dist] = Path(given) if given else build_deb.build(dist, REPO / "dist")
        TIMINGS.setdefault(dist, {})["build_deb"] = time.monotonic() - t0
    yield out
    for dist, t in TIMINGS.items():
        print(f"\n[timings {dist}] " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()))


@pytest.mark.root
@pytest.mark.parametrize("dist", DISTS)
def test_lintian_no_errors(debs, dist):
    r = subprocess.run(["lintian", "--fail-on", "error", "--tag-display-limit", "0", str(debs[dist])],
                       capture_output=True, text=True, timeout=300)
    tags = [ln for ln in r.stdout.splitlines() if ln[:2] in ("E:", "W:")]
    assert r.returncode == 0 and not [t for t in tags if t.startswith("E:")], "\n".join(tags)
    assert not [t for t in tags if t.startswith("W:")], "\n".join(tags)


@pytest.mark.root
@pytest.mark.parametrize("dist", DISTS)
def test_installed_on_a_real_systemd_host(debs, dist):
    from tests.lab.container import InstalledHost

    with InstalledHost(dist, debs[dist], tag=f"i{dist[0]}{os.getpid() % 100000}") as h:
        TIMINGS.setdefault(dist, {}).update(h.container.timings)
        h.check_all(fallback_sources=os.environ.get("SIPGUARD_INSTALLED_WRITE_SOURCES") == "1")
        TIMINGS[dist].update(h.timings)
        if dist == "bookworm":
            print("\n" + h.security)


@pytest.mark.root
def test_installed_with_debians_stock_kamailio_config(debs):
    """Debian 13's stock kamailio.cfg (no log_name: the identifier is /usr/sbin/kamailio) plus only our
    scanner xlog line: the installed daemon, with no config written, bans a scanner and a malformed sender."""
    from tests.lab.container import InstalledHost

    with InstalledHost("trixie", debs["trixie"], tag=f"is{os.getpid() % 100000}", stock_config=True) as h:
        h.step_install(fallback_sources=os.environ.get("SIPGUARD_INSTALLED_WRITE_SOURCES") == "1")
        h.step_attack_stock()


def test_conffile_distinct_jail_example_is_valid(tmp_path):
    """The conffile's commented distinct-jail example, with its '## ' removed, is a jail sipguard loads."""
    from sipguard.config import load_config

    text = gen_conffile.render()
    example = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert example and example[0] == "[policy.jails.fraud]", example
    p = tmp_path / "fraud.toml"
    p.write_text("\n".join(example) + "\n")
    jail = load_config(p).policy.jails["fraud"]
    assert (jail.distinct, jail.prefixes, jail.threshold, jail.max_values) == ("dest", ["+", "00"], 5, 100)
