"""Address normalisation and the allow-list."""

import os
import secrets
import subprocess
import sys

import pytest

from sipguard.addresses import AllowList, normalize_ip, parse_target


@pytest.mark.parametrize("text, want", [
    ("198.18.0.5", "198.18.0.5"),
    ("2001:db8::1", "2001:db8::1"),
    ("[2001:db8::1]", "2001:db8::1"),
    ("2001:DB8:0:0::1", "2001:db8::1"),
    ("fe80::1%eth0", "fe80::1"),
    ("[fe80::1%eth0]", "fe80::1"),
    ("::ffff:198.18.0.5", "198.18.0.5"),
    ("::FFFF:c612:5", "198.18.0.5"),
    ("999.1.1.1", None),
    ("::", None),
    ("0.0.0.0", None),
    ("::ffff:0.0.0.0", None),
    ("198.18.0", None),
    ("", None),
    ("example.com", None),
    ("1.2.3.4 ", None),
    ("x" * 100, None),
])
def test_normalize(text, want):
    assert normalize_ip(text) == want


def test_parse_target():
    assert parse_target("198.18.0.0/15") == "198.18.0.0/15"
    assert parse_target("198.18.0.7/15") == "198.18.0.0/15"
    assert parse_target("198.18.0.7/32") == "198.18.0.7"
    assert parse_target(" 2001:db8::/32 ") == "2001:db8::/32"
    with pytest.raises(ValueError):
        parse_target("nonsense")


def test_allowlist():
    a = AllowList(["203.0.113.0/24", "2001:db8:1::/48"], include_host=False)
    assert "127.0.0.1" in a and "127.5.5.5" in a and "::1" in a
    assert "203.0.113.9" in a and "2001:db8:1::9" in a
    assert "198.18.0.5" not in a and "2001:db8:2::1" not in a
    assert "203.0.0.0/8" in a  # a ban covering an allowed network is refused too
    assert "203.0.113.128/25" in a
    assert "198.18.0.0/15" not in a
    assert "garbage" not in a


def test_allowlist_includes_host_addresses():
    from sipguard.addresses import host_addresses

    a = AllowList([], include_host=True)
    for ip in host_addresses():
        assert ip in a


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace")
def test_host_addresses_from_proc_equal_netlink_view():
    """/proc's list (what sipguard reads) equals pyroute2's netlink dump, secondary addresses included."""
    ns = f"sgx-addr-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    try:
        for cmd in (["link", "set", "lo", "up"], ["addr", "add", "198.18.88.1/24", "dev", "lo"],
                    ["addr", "add", "198.18.88.2/24", "dev", "lo"], ["addr", "add", "198.18.89.7/32", "dev", "lo"],
                    ["addr", "add", "2001:db8:88::1/64", "dev", "lo", "nodad"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True, timeout=30)
        code = "\n".join([
            "from sipguard.addresses import _proc_host_addresses, normalize_ip",
            "from pyroute2 import IPRoute",
            "with IPRoute() as i: nl = {normalize_ip(a.get_attr('IFA_ADDRESS')) for a in i.get_addr()}",
            "print(sorted(_proc_host_addresses()) == sorted(nl), sorted(nl))",
        ])
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                           capture_output=True, text=True, timeout=60)
        assert r.stdout.startswith("True"), r.stdout + r.stderr
        for ip in ("198.18.88.1", "198.18.88.2", "198.18.89.7", "2001:db8:88::1", "127.0.0.1", "::1"):
            assert ip in r.stdout
    finally:
        subprocess.run(["ip", "netns", "del", ns], timeout=30)
