"""Address normalisation and the allow-list."""

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
