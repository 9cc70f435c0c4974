"""Config: defaults with no file, and bad files name the file, the key/line and the reason."""

from pathlib import Path

import pytest

from sipguard.config import Config, format_duration, load_config, parse_duration
from sipguard.errors import ConfigError
from sipguard.model import EventKind


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "sipguard.toml"
    p.write_text(text)
    return p


def test_defaults_without_file(tmp_path, monkeypatch):
    monkeypatch.delenv("SIPGUARD_CONFIG", raising=False)
    cfg = load_config(None, required=False) if not Path("/etc/sipguard/sipguard.toml").exists() else Config()
    jails = cfg.policy.jails
    assert jails["auth"].threshold == 3 and jails["auth"].findtime == 600 and jails["auth"].reset_on_success
    assert jails["malformed"].threshold == 5 and jails["malformed"].findtime == 60
    assert jails["scanner"].threshold == 1 and jails["flood"].threshold == 1
    assert cfg.policy.bantime == 3600 and cfg.policy.bantime_factor == 2 and cfg.policy.max_bantime == 7 * 86400


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_valid_file_and_jail_merge(tmp_path):
    p = write(tmp_path, """
[policy]
bantime = "2h"
max_bantime = "permanent"
[policy.jails.auth]
threshold = 5
[policy.jails.probe]
enabled = false
[policy.jails.custom]
kinds = ["probe", "auth_failure"]
findtime = "1h"
threshold = 20
bantime = "1d"
[allowlist]
cidrs = ["203.0.113.0/24", "2001:db8::/32"]
""")
    cfg = load_config(p)
    assert cfg.policy.bantime == 7200 and cfg.policy.max_bantime is None
    assert cfg.policy.jails["auth"].threshold == 5
    assert cfg.policy.jails["auth"].findtime == 600  # kept from the default
    assert "probe" not in cfg.policy.jails
    assert cfg.policy.jails["custom"].kinds == [EventKind.PROBE, EventKind.AUTH_FAILURE]
    assert cfg.allowlist.cidrs == ["203.0.113.0/24", "2001:db8::/32"]


@pytest.mark.parametrize(
    "text, where, reason",
    [
        ("[policy]\nbogus = 1\n", "line 2: policy.bogus", "unknown key"),
        ("[policy]\nbantime = \"soon\"\n", "line 2: policy.bantime", "bad duration"),
        ("[policy]\nbantime_factor = \"x\"\n", "policy.bantime_factor", "number"),
        ("[allowlist]\ncidrs = [\"10.0.0.300/8\"]\n", "allowlist.cidrs", "invalid CIDR"),
        ("[sources]\nformat = \"xml\"\n", "sources.format", "auto"),
        ("[policy.jails.auth]\nkinds = [\"success\"]\n", "policy.jails.auth.kinds", "clear scores"),
        ("[policy\nx=1\n", "sipguard.toml:1", "invalid TOML"),
        ("unknown_top = 1\n", "unknown_top", "unknown key"),
    ],
)
def test_bad_config_names_file_key_reason(tmp_path, text, where, reason):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert msg.startswith(str(p)), msg
    assert where in msg, msg
    assert reason in msg, msg


def test_durations():
    assert parse_duration("30s") == 30
    assert parse_duration("10m") == 600
    assert parse_duration("2h") == 7200
    assert parse_duration("7d") == 604800
    assert parse_duration(90) == 90
    assert parse_duration("permanent", allow_permanent=True) is None
    for bad in ("", "-1s", "0", "1y", "permanent", True):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert format_duration(3600) == "1h" and format_duration(None) == "permanent"
    assert format_duration(90) == "1m30s"
