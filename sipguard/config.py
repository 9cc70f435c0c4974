"""The one TOML config file, validated by pydantic: every setting has a default.

A bad file raises ConfigError naming the file, the key (and line when we can find it) and the
reason, before any other stage starts; nothing here touches the kernel or the database.

Files a root daemon can trust (like sshd's StrictModes): running as root, the config file, and (through
`check_trusted`, called by the filter loader) every filter directory and filter file, must be owned by
root and writable by nobody else, and so must each directory above them (a sticky one such as /tmp
may be world-writable); the shipped filters are trusted as installed. A program the config names
(`[sources] journalctl`) must then be an absolute path to such a file. Anyone else could otherwise
replace a regex or a weight, or the program root runs. The fleet's secret (`[cluster] secret_file`)
must also be private: readable by its owner only (and, as root, trusted like the config); a `secret`
written in the config itself needs a config file that is not world-readable.
"""

from __future__ import annotations

import math
import os
import re
import stat
import tomllib
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from .addresses import address_text, network
from .errors import ConfigError
from .model import EventKind

DEFAULT_CONFIG = Path("/etc/sipguard/sipguard.toml")
DEFAULT_STATE_DIR = Path("/var/lib/sipguard")
SHIPPED_FILTERS = Path(__file__).resolve().parent.parent / "filters"
if not SHIPPED_FILTERS.is_dir():  # installed as a wheel: filters are package data
    SHIPPED_FILTERS = Path(__file__).resolve().parent / "data" / "filters"
SHIPPED_RULES = SHIPPED_FILTERS.parent / "rules"

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")

MAX_DURATION = 36525 * 86400.0
"""The longest duration any setting or ban takes: 100 years (36525d). Anything longer is `permanent`
where that is allowed, an error elsewhere, so every time sipguard computes stays a real date."""


def parse_duration(value: Any, allow_permanent: bool = False) -> float | None:
    """'30s', '10m', '2h', '7d', '1w' or a number of seconds; 'permanent' → None when allowed.

    A duration is positive, finite and at most MAX_DURATION (100 years); the error says so.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 10m, 2h, 7d")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an integer beyond any float
            seconds = math.inf
    elif isinstance(value, str):
        if value.strip().lower() in ("permanent", "forever", "never"):
            if allow_permanent:
                return None
            raise ValueError("'permanent' is not allowed here")
        m = _DURATION.match(value)
        if not m:
            raise ValueError(f"bad duration {value!r}: expected like 30s, 10m, 2h, 7d")
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    else:
        raise ValueError("expected a duration like 30s, 10m, 2h, 7d")
    if math.isnan(seconds):
        raise ValueError("bad duration: not a number")
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    if seconds > MAX_DURATION:
        raise ValueError("too long: at most 100 years (36525d)"
                         + ("; use 'permanent' for no end" if allow_permanent else ""))
    return seconds


_SHOWN_MAX = 100 * MAX_DURATION  # 10,000 years: as far as a calendar goes


def format_duration(seconds: float | None) -> str:
    """Short human form of a duration; 'permanent' for None, 'out of range' for a value that is no
    duration (negative, infinite, not a number, beyond any calendar: a database written by
    something else)."""
    if seconds is None:
        return "permanent"
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or not 0 <= seconds <= _SHOWN_MAX:
        return "out of range"
    seconds = int(round(seconds))
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    if seconds >= 3600:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


Duration = Annotated[float, BeforeValidator(parse_duration)]
MaybePermanent = Annotated[float | None, BeforeValidator(lambda v: parse_duration(v, allow_permanent=True))]


def _cidr(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a CIDR string like 203.0.113.0/24")
    try:
        return str(network(value.strip()))
    except ValueError as exc:
        raise ValueError(f"invalid CIDR {value!r}: {exc}") from None


CIDR = Annotated[str, BeforeValidator(_cidr)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, defer_build=True)


DEFAULT_KAMAILIO_EXECUTABLES = ["/usr/sbin/kamailio", "/usr/local/sbin/kamailio"]
SOURCE_KEYS = frozenset({"logs", "journal", "journal_identifiers"})
"""Naming any of these in [sources] says which sources to follow; naming none lets the daemon choose
(sipguard/wiring.py `choose_sources`: /var/log/kamailio.log, else the journal of kamailio.service,
else /var/log/syslog)."""


class SourcesConfig(Section):
    """Which files and journal entries to follow and how to read them."""

    logs: list[str] = []  # none of logs/journal/journal_identifiers set: the daemon chooses (see SOURCE_KEYS)
    format: Literal["auto", "syslog", "traditional", "iso", "short-iso", "journal", "rfc5424", "stderr", "json"] = "auto"
    from_start: bool = False
    programs: list[str] = ["kamailio"]  # syslog program names of files (a path's basename counts too)
    verify_pid: bool = True
    # plain `kamailio -E` text (and stderr JSON with raw fields) lets an attacker forge whole records:
    # read only when the operator accepts that risk (formats/records.py); prefer --log-engine=json
    trust_plain_stderr: bool = False
    max_line: int = Field(1 << 20, ge=1024)
    journal: list[str] = []  # systemd units to follow through the journal, e.g. ["kamailio.service"]
    journal_identifiers: list[str] = []  # ... or syslog identifiers (journalctl -t), e.g. ["kamailio"]
    # An entry is Kamailio's only by what journald sets itself (formats/journal.py): its _SYSTEMD_UNIT is
    # one of `journal`, or its _EXE one of these run as one of `journal_users` (names or uids; [] = any).
    journal_executables: list[str] = Field(default_factory=lambda: list(DEFAULT_KAMAILIO_EXECUTABLES))
    journal_users: list[str] = ["kamailio"]
    journalctl: str = "journalctl"  # the journalctl binary (journal sources); as root an absolute path

    @property
    def chosen(self) -> bool:
        """Whether the config says which sources to follow (else the daemon chooses)."""
        return bool(self.model_fields_set & SOURCE_KEYS)

    @field_validator("journalctl")
    @classmethod
    def _journalctl_trusted(cls, value: str, info: ValidationInfo) -> str:
        """As root with journal sources, the program must be one root can trust (`trusted_program`)."""
        if running_as_root() and (info.data.get("journal") or info.data.get("journal_identifiers")):
            return trusted_program(value, default_name="journalctl")
        return value


class FiltersConfig(Section):
    """Filter directories (later ones override earlier ones by name) and selection."""

    directories: list[Path] = Field(default_factory=lambda: [SHIPPED_FILTERS, Path("/etc/sipguard/filters.d")])
    enabled: list[str] | None = None
    disabled: list[str] = []


class JailConfig(Section):
    """fail2ban's jail: events of these kinds, summed inside findtime, ban at threshold.

    A distinct jail (`distinct = "dest"`) counts instead the distinct values of that named capture of
    its filters' regexes (Event.captures) per source inside findtime: distinct users tried from one
    source is enumeration, distinct destinations dialled is fraud probing. `prefixes` narrows what
    counts to values starting with one of them (international prefixes, premium ranges); at most
    `max_values` values are kept per source (attacker text, kept hashed), so a spray stays bounded.
    """

    kinds: list[EventKind]
    findtime: Duration
    threshold: float = Field(gt=0)
    reset_on_success: bool = False
    bantime: MaybePermanent | None = None  # None: the policy's escalating ban time
    distinct: str | None = Field(None, pattern=r"^[a-z][a-z0-9_]{0,31}$")  # count distinct values of this capture
    prefixes: list[Annotated[str, Field(min_length=1, max_length=32)]] = []  # distinct jail: only values starting so
    max_values: int = Field(100, ge=1, le=10_000)  # distinct jail: values kept per source

    @model_validator(mode="after")
    def _distinct(self) -> "JailConfig":
        if self.distinct is None:
            if self.prefixes or "max_values" in self.model_fields_set:
                raise ValueError("prefixes and max_values are read only with distinct = \"<capture>\"")
            return self
        if self.threshold > self.max_values:
            raise ValueError(f"threshold {self.threshold:g} can never be reached with max_values {self.max_values}")
        return self

    @field_validator("kinds")
    @classmethod
    def _no_success(cls, kinds: list[EventKind]) -> list[EventKind]:
        if EventKind.SUCCESS in kinds:
            raise ValueError("'success' events clear scores; they cannot be scored")
        if not kinds:
            raise ValueError("a jail needs at least one event kind")
        return kinds


def _default_jails() -> dict[str, JailConfig]:
    return {
        "flood": JailConfig(kinds=[EventKind.FLOOD], findtime=60, threshold=1),
        "scanner": JailConfig(kinds=[EventKind.SCANNER], findtime=600, threshold=1),
        "auth": JailConfig(kinds=[EventKind.AUTH_FAILURE], findtime=600, threshold=3, reset_on_success=True),
        "malformed": JailConfig(kinds=[EventKind.MALFORMED], findtime=60, threshold=5),
        "probe": JailConfig(kinds=[EventKind.PROBE], findtime=600, threshold=10, reset_on_success=True),
    }


OFFICE_JAILS = ("office_users", "office_rate")
"""The names of the office policy's own address jails (sipguard/policy.py): no [policy.jails] table may take them."""


class OfficeConfig(Section):
    """The office policy (issue 17): many users behind one NAT address, one of them failing forever.

    Once an address has had a successful REGISTER for some user within `success_within`, an auth failure
    from it for ANOTHER user (the filters' `user` capture) is counted per (address, user) instead of in the
    address's auth jails: `user_threshold` failures of that user inside `user_findtime` ban that user at that
    address only (a user ban: not in the kernel, enforced by Kamailio through the htable mirror), for
    `user_bantime`. The address itself is banned only when the failures say an attack comes from behind it:
    `distinct_users` distinct failing users inside `findtime` (the `office_users` distinct jail) or `rate`
    failures inside `findtime` whatever the users (the `office_rate` jail). An auth failure without a user
    capture, or from an address without a recent success for another user, is scored as before.
    """

    enabled: bool = True
    success_within: Duration = 3600  # a success for another user this recent makes the address an office
    user_threshold: float = Field(3, gt=0)  # failures of one user at one office address ...
    user_findtime: Duration = 600  # ... inside this: a ban of that user at that address
    user_bantime: Duration = 3600
    distinct_users: int = Field(5, ge=2, le=10_000)  # distinct failing users inside findtime: the address banned
    rate: float = Field(30, gt=0)  # failures inside findtime, whatever the users: the address banned
    findtime: Duration = 600
    max_users: int = Field(100, ge=1, le=10_000)  # successful users remembered per address (least recent go first)


class PolicyConfig(Section):
    """Ban times: bantime for a first offence, times factor per repeat, capped at max_bantime."""

    bantime: Duration = 3600
    bantime_factor: float = Field(2.0, ge=1.0, le=1000.0, allow_inf_nan=False)
    max_bantime: MaybePermanent = 7 * 86400
    offence_memory: Duration = 30 * 86400
    max_tracked: int = Field(200_000, ge=100)  # sources scored at once per jail; least recently active go first
    evidence_lines: int = Field(5, ge=0, le=100)  # records kept with each ban (sipguard why); 0 = none
    jails: dict[str, JailConfig] = Field(default_factory=_default_jails)
    office: OfficeConfig = Field(default_factory=OfficeConfig)

    @model_validator(mode="after")
    def _office_names(self) -> "PolicyConfig":
        taken = sorted(set(OFFICE_JAILS) & set(self.jails)) if self.office.enabled else []
        if taken:
            raise ValueError(f"jail name {taken[0]!r} is the office policy's own ([policy.office]); pick another")
        return self

    @field_validator("jails", mode="before")
    @classmethod
    def _merge_jails(cls, value: Any) -> Any:
        """A [policy.jails.auth] table only has to name what it changes; `enabled = false` drops it."""
        if not isinstance(value, dict):
            return value
        merged: dict[str, Any] = {k: v.model_dump(exclude_unset=True) for k, v in _default_jails().items()}
        for name, table in value.items():
            if isinstance(table, dict) and table.get("enabled", True) is False:
                merged.pop(name, None)
                continue
            if isinstance(table, dict):
                table = {k: v for k, v in table.items() if k != "enabled"}
            if name in merged and isinstance(table, dict):
                merged[name] = {**merged[name], **table}
            else:
                merged[name] = table
        return merged


class AllowConfig(Section):
    """Never banned: loopback and this host's addresses always, plus these CIDRs."""

    cidrs: list[CIDR] = []
    include_host_addresses: bool = True


class StoreConfig(Section):
    """How much history the SQLite database keeps (it must stay bounded under a spray)."""

    event_retention: Duration = 86400
    max_events: int = Field(2_000_000, ge=1000)
    history_retention: Duration = 90 * 86400


class EnforceConfig(Section):
    """Which enforcer makes the kernel drop banned sources, and how (see sipguard/enforce/)."""

    backend: Literal["auto", "dryrun", "ipset", "nftables"] = "auto"  # auto: ipset as root with ip_set, else nftables
    action: Literal["DROP", "REJECT"] = "DROP"  # what the hook rules do with a banned source's packets
    iptables: Literal["auto", "nft", "legacy"] = "auto"  # ipset backend: which iptables to program (auto: detect)
    set_prefix: str = Field("sipguard", pattern=r"^[A-Za-z0-9_.-]{1,25}$")  # ipsets PREFIX-v4/-v6/-net4/-net6
    chain: str = Field("SIPGUARD", pattern=r"^[A-Za-z0-9_-]{1,28}$")  # iptables hook chain, jumped to first
    nft_table: str = Field("sipguard", pattern=r"^[A-Za-z0-9_]{1,32}$")  # nftables backend: table inet NAME
    maxelem: int = Field(1_000_000, ge=1024, le=1 << 28)  # max entries per set (ipset maxelem, nft size)
    hook_forward: bool = False  # also jump from FORWARD (routed traffic), not only INPUT
    resync_interval: Duration = 3600  # daemon re-checks sets/hooks and re-arms bans beyond the kernel's timeout cap
    check_interval: Duration = 5  # daemon's cheap drift check (sets, member counts, hook rules); a full resync on drift


class DaemonConfig(Section):
    """Loop timings of `sipguard run`."""

    control_interval: Duration = 0.25
    prune_interval: Duration = 60


def _port_or_range(value: Any) -> str:
    """5060 or "10000-20000" (also "10000:20000") → "5060" / "10000:20000" (iptables syntax)."""
    if isinstance(value, bool):
        raise ValueError("expected a port number or a range like 10000-20000")
    if isinstance(value, int):
        lo = hi = value
    elif isinstance(value, str) and re.fullmatch(r"\s*\d{1,5}\s*([-:]\s*\d{1,5}\s*)?", value):
        parts = re.split(r"[-:]", value)
        lo, hi = int(parts[0]), int(parts[-1])
    else:
        raise ValueError(f"bad port {value!r}: expected a number or a range like 10000-20000")
    if not (1 <= lo <= hi <= 65535):
        raise ValueError(f"bad port {value!r}: ports are 1-65535, low-high")
    return str(lo) if lo == hi else f"{lo}:{hi}"


def _rate(value: Any) -> str:
    """"6/min", "10/s", "20/second" → iptables' canonical "6/min", "10/sec" (limit and hashlimit)."""
    m = re.fullmatch(r"\s*(\d{1,6})\s*/\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*", str(value))
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"bad rate {value!r}: expected like 6/min, 10/sec, 100/hour")
    unit = {"s": "sec", "second": "sec", "m": "min", "minute": "min", "h": "hour"}.get(m.group(2), m.group(2))
    return f"{int(m.group(1))}/{unit}"


Port = Annotated[int, Field(ge=1, le=65535)]
PortOrRange = Annotated[str, BeforeValidator(_port_or_range)]
Rate = Annotated[str, BeforeValidator(_rate)]


class FirewallConfig(Section):
    """The baseline firewall of `sipguard firewall apply` (rules/baseline-v4.rules, -v6.rules)."""

    public_interface: str = Field("", pattern=r"^(|any|[A-Za-z0-9_.:@+-]{1,15})$")  # "": default route's; "any": all
    sip_udp: list[Port] = [5060]  # SIP over UDP
    sip_tcp: list[Port] = [5060]  # SIP over TCP
    sip_tls: list[Port] = [5061]  # SIP over TLS (TCP)
    websocket: list[Port] = []  # SIP over WebSocket, ws and wss (TCP), e.g. [8080, 8443]
    rtp: list[PortOrRange] = ["10000-20000"]  # media (UDP): rtpengine's default range; [] = none
    ssh_port: int = Field(22, ge=0, le=65535)  # 0 = no SSH rule at all (console access only)
    management_cidrs: list[CIDR] = []  # SSH only from these; empty = from anywhere, rate-limited
    ssh_rate: Rate = "6/min"  # new SSH connections per source (per /64 in IPv6) when open to all
    extra_tcp: list[PortOrRange] = []  # more inbound TCP services, e.g. [53] on a DNS server
    extra_udp: list[PortOrRange] = []  # more inbound UDP services, e.g. [53, 123] on a DNS/NTP server
    icmp_echo: bool = True  # answer ping (echo requests, rate-limited below)
    icmp_rate: Rate = "10/sec"  # echo requests accepted, all sources together
    icmp_burst: int = Field(10, ge=1, le=10000)  # ... with this burst
    psd: bool = True  # answer a random few unsolicited probes (REJECT/TARPIT) to slow scanners down
    psd_rate: Rate = "20/sec"  # at most this many probes handed to PSD (its REJECTs go to maybe-spoofed sources)
    spoof_filter: Literal["auto", "on", "off"] = "auto"  # drop private/bogon sources on the public interface
    spoof_sources_v4: list[CIDR] = ["0.0.0.0/8", "10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
                                    "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4"]  # what the spoof filter drops
    spoof_sources_v6: list[CIDR] = ["::1/128", "::ffff:0:0/96", "fc00::/7", "fec0::/10"]  # never fe80::/10 (ND)
    tarpit: Literal["auto", "never"] = "auto"  # PSD's TARPIT (xtables-addons) when available, else REJECT/DROP
    allow_6in4: bool = False  # accept IPv6-in-IPv4 tunnels (protocol 41) on the public interface
    dhcpv6_client: bool = True  # accept DHCPv6 server replies (udp 547 → 546 from link-local)
    ipv6: bool = True  # also manage ip6tables; false leaves the IPv6 firewall as it is
    iptables: Literal["auto", "nft", "legacy"] = "auto"  # auto: [enforce] iptables if set, else `iptables -V`


def _listen(value: Any) -> str:
    """"" (off), "HOST:PORT" or "[V6]:PORT": the port 1-65535 (0: any free one), the host an address or
    a name (checked here, so a bad value is a config error naming the line, never a bind failure at start)."""
    if not isinstance(value, str):
        raise ValueError("expected \"HOST:PORT\", e.g. \"127.0.0.1:9108\"")
    text = value.strip()
    if not text:
        return ""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([0-9.]+|[A-Za-z0-9.-]+):(\d+)", text)
    if m is None:
        raise ValueError(f"bad address {value!r}: expected HOST:PORT, e.g. \"127.0.0.1:9108\" or \"[::1]:9108\"")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port {int(port)} out of range: ports are 1-65535 (0: any free port)")
    if re.fullmatch(r"[0-9.]+", host) or m.group(1):
        try:
            address_text(host)
        except ValueError:
            raise ValueError(f"bad address {host!r} in {value!r}") from None
    return text


class MetricsConfig(Section):
    """The Prometheus endpoint (sipguard/extras/metrics.py): off unless `listen` is set. The endpoint
    has no authentication: an address other than loopback is allowed, with a warning at start."""

    listen: Annotated[str, BeforeValidator(_listen)] = ""  # "127.0.0.1:9108", "[::1]:9108", "0.0.0.0:9108"


class HtableConfig(Section):
    """Mirror bans into Kamailio's `ipban` htable over JSON-RPC (sipguard/extras/htable.py), beside the kernel."""

    enabled: bool = False
    rpc: str = "unix:/run/kamailio/kamailio_rpc.sock"  # unix:DGRAM-SOCKET | fifo:PATH | http://HOST:PORT/RPC
    table: str = Field("ipban", pattern=r"^[A-Za-z0-9_]{1,64}$")
    user_table: str = Field("userban", pattern=r"^[A-Za-z0-9_]{1,64}$")  # user bans (office policy), USER@ADDRESS
    value: int = 2  # what $sht(ipban=>$si) is set to (the script's pike block sets 1: resync leaves those alone)
    timeout: Duration = 2.0  # per RPC call
    # where Kamailio's replies come back (sipguard's own directory; the FIFO transport needs Kamailio's
    # jsonrpcs fifo_reply_dir to name it) and the group that lets Kamailio, running as its own user, answer
    reply_dir: str = Field("/run/sipguard", pattern=r"^/")
    reply_group: str = "kamailio"  # "" = the directory's own group


class BlocklistConfig(Section):
    """A blocklist fetched from `url` every `refresh` (sipguard/extras/blocklists.py); bans say blocklist:NAME."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,40}$")
    url: str
    refresh: Duration = 3600
    format: Literal["auto", "text", "json"] = "auto"
    bantime: MaybePermanent | None = None  # None: until the entry drops off the list (or "permanent")
    max_entries: int = Field(1_000_000, ge=1)  # distinct entries: reading stops and the list is refused past it
    max_bytes: int = Field(64 << 20, ge=1024, le=1 << 30)  # the same for the list's size
    allow_private: bool = False  # redirects may lead to loopback, link-local and private addresses too



def _redis_url(value: Any) -> str:
    """redis://, rediss://, unix:// (what redis-py's from_url takes) or redis+sentinel:// / rediss+sentinel://."""
    if not isinstance(value, str) or "://" not in value:
        raise ValueError("expected a URL like redis://host:6379/0")
    scheme = value.split("://", 1)[0].lower()
    if scheme not in ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel"):
        raise ValueError(f"unsupported scheme {scheme!r}: use redis://, rediss://, unix:// or redis+sentinel://")
    return value


def _hostname() -> str:
    import socket

    return socket.gethostname() or "sipguard"


class ClusterConfig(Section):
    """Fleet mode (sipguard/cluster/): scores and bans shared by every node through one Redis."""

    redis_url: Annotated[str, BeforeValidator(_redis_url), Field(repr=False)]  # redis://[:pw@]host:6379/0, rediss://, unix://,
    #                          redis+sentinel://[:pw@]s1:26379,s2:26379/MASTER[/db]
    node_name: str = Field(default_factory=_hostname, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    key_prefix: str = Field("sipguard:", pattern=r"^[A-Za-z0-9_.:{}-]{0,64}$")
    heartbeat_interval: Duration = 2.0  # how often a node refreshes its heartbeat key
    node_timeout: Duration = 10.0  # heartbeat key TTL: a node not heard from this long is gone
    socket_timeout: Duration = 1.0  # per Redis call (and connect); a slow Redis never stalls detection long
    retry_interval: Duration = 1.0  # while Redis is unreachable: how often to try again
    stream_maxlen: int = Field(100_000, ge=100)  # ban stream entries kept (approximate trim)
    # signing (sipguard/cluster/signing.py): every ban, unban and scored event carries an HMAC-SHA256 under
    # this secret (never sent to Redis); without one, anyone who can write to the Redis can ban fleet-wide
    secret: str | None = Field(None, min_length=16, max_length=4096, repr=False)
    secret_file: Path | None = None  # the secret in a file (first line), root-owned and mode 0600/0400 as root
    secret_previous: list[str] = Field([], repr=False)  # rotation: still accepted (never signed with) ...
    secret_previous_until: float | None = None  # ... until this time (epoch seconds or ISO 8601): the overlap
    # guard rails (sipguard/cluster/guard.py) on every ban from the fleet, manual or not
    max_prefix_v4: int = Field(16, ge=0, le=32)  # a fleet CIDR wider than /16 is refused
    max_prefix_v6: int = Field(48, ge=0, le=128)  # ... and wider than /48
    own_addresses: list[CIDR] = []  # more addresses of this node never banned from the fleet (NAT, VIPs)
    wait_replicas: int = Field(0, ge=0, le=16)  # publish: keep an entry queued until this many replicas have it
    max_bans: int | None = Field(None, ge=1)  # the most fleet bans a node holds; default [enforce] maxelem

    @field_validator("secret_previous_until", mode="before")
    @classmethod
    def _until(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                v = datetime.fromisoformat(v.strip())
            except ValueError:
                raise ValueError(f"bad time {v!r}: expected ISO 8601 like 2026-12-31T00:00:00Z") from None
        if isinstance(v, datetime):  # a TOML datetime, or the text above; no zone = UTC
            return (v if v.tzinfo else v.replace(tzinfo=timezone.utc)).timestamp()
        if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
            return v
        raise ValueError("expected a time (ISO 8601 or epoch seconds)")

    @model_validator(mode="after")
    def _one_secret(self) -> ClusterConfig:
        if self.secret is not None and self.secret_file is not None:
            raise ValueError("give secret or secret_file, not both")
        if self.secret_previous and self.secret_previous_until is None:
            raise ValueError("secret_previous needs secret_previous_until (when the rotation's overlap ends)")
        if self.secret_previous and self.secret is None and self.secret_file is None:
            raise ValueError("secret_previous needs the new secret (secret or secret_file) to sign with")
        return self

    @field_validator("secret_previous")
    @classmethod
    def _previous(cls, v: list[str]) -> list[str]:
        if any(len(s) < 16 for s in v):
            raise ValueError("a secret is at least 16 characters")
        return v

    @field_validator("secret_file")
    @classmethod
    def _secret_file(cls, v: Path | None) -> Path | None:
        if v is not None:
            read_secret_file(v)  # readable, not empty, and (as root) trusted and private
        return v

    def secrets(self) -> tuple[str | None, list[str], float | None]:
        """(the secret to sign with or None, previous secrets still accepted, until when)."""
        current = self.secret
        if current is None and self.secret_file is not None:
            current = read_secret_file(self.secret_file)
        return current, list(self.secret_previous), self.secret_previous_until


class Config(Section):
    state_dir: Path | None = None
    sources: SourcesConfig = Field(default_factory=SourcesConfig)
    filters: FiltersConfig = Field(default_factory=FiltersConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    allowlist: AllowConfig = Field(default_factory=AllowConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    enforce: EnforceConfig = Field(default_factory=EnforceConfig)
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    firewall: FirewallConfig = Field(default_factory=FirewallConfig)
    cluster: ClusterConfig | None = None  # [cluster]: fleet mode through Redis; absent = standalone
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    htable: HtableConfig = Field(default_factory=HtableConfig)
    blocklists: list[BlocklistConfig] = []
    path: Path | None = Field(None, exclude=True)

    @field_validator("state_dir", mode="before")
    @classmethod
    def _state_dir(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, str):
            raise ValueError("expected a directory path")
        return v


def _line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """Best-effort line number of a dotted key in TOML text (for a friendlier error)."""
    lines = text.splitlines()
    section: list[str] = []
    keys = [str(p) for p in loc if not isinstance(p, int)]
    if not keys:
        return None
    for no, raw in enumerate(lines, 1):
        s = raw.strip()
        if s.startswith("["):
            section = [p.strip().strip('"') for p in s.strip("[]").split(".")]
            continue
        m = re.match(r'^"?([A-Za-z0-9_-]+)"?\s*=', s)
        if m and section + [m.group(1)] == keys[: len(section) + 1] and len(keys) <= len(section) + 1:
            return no
        if m and section + [m.group(1)] == keys:
            return no
    # A whole section that is wrong: point at its header.
    for no, raw in enumerate(lines, 1):
        s = raw.strip()
        if s.startswith("[") and [p.strip().strip('"') for p in s.strip("[]").split(".")] == keys:
            return no
    return None


# -- files a root daemon can trust ----------------------------------------------------------------------

SYSTEM_PATH = ("/usr/bin", "/bin", "/usr/sbin", "/sbin")
"""Where a program named without a path is looked up when running as root (never $PATH)."""


def running_as_root() -> bool:
    return os.geteuid() == 0


def _owner(uid: int) -> str:
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _writable_by(mode: int) -> str:
    who = [w for w, bit in (("group", stat.S_IWGRP), ("world", stat.S_IWOTH)) if mode & bit]
    return " and ".join(who) + f"-writable (mode {stat.S_IMODE(mode):04o})"


def untrusted(path: Path, what: str = "the file") -> str | None:
    """Why a process running as root must not trust `path`, or None: `path` (symlinks followed) must be
    owned by root and not group- or world-writable, and so must every directory above it, both as
    written and as resolved, except that a world-writable directory with the sticky bit (/tmp) is
    allowed above it (nobody else can replace root's entries there)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"cannot check {what}: {exc.strerror or exc}"
    if st.st_uid != 0:
        return f"{what} is owned by {_owner(st.st_uid)}, not root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} is {_writable_by(st.st_mode)}"
    absolute = Path(os.path.abspath(path))
    seen: set[Path] = set()
    for parent in [*absolute.parents, *Path(os.path.realpath(path)).parents]:
        if parent in seen:
            continue
        seen.add(parent)
        try:
            pst = os.stat(parent)
        except OSError as exc:
            return f"cannot check its directory {parent}: {exc.strerror or exc}"
        if pst.st_uid != 0:
            return f"its directory {parent} is owned by {_owner(pst.st_uid)}, not root"
        if pst.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not pst.st_mode & stat.S_ISVTX:
            return f"its directory {parent} is {_writable_by(pst.st_mode)}"
    return None


def trusted_as_installed(path: Path) -> bool:
    """True for the shipped filters' directory (trusted as the package was installed)."""
    try:
        return Path(path).resolve() == SHIPPED_FILTERS.resolve()
    except OSError:
        return False


def check_trusted(path: Path, what: str) -> None:
    """Running as root, refuse (ConfigError) a file or directory `untrusted` finds a reason against."""
    if not running_as_root():
        return
    why = untrusted(path, f"the {what}")
    if why is not None:
        raise ConfigError(str(path), None, f"refused (running as root): {why}; a root daemon uses only "
                          f"files that root owns and nobody else can write (chown root, chmod go-w)")


def trusted_program(value: str, default_name: str | None = None) -> str:
    """The absolute path of a program a root process may run, or ValueError with the reason.

    `value` must be an absolute path to an executable `untrusted` finds nothing against; only the
    key's default name (`default_name`) may be given bare, and is then looked up in SYSTEM_PATH.
    """
    path = Path(value)
    if not path.is_absolute():
        if default_name is None or value != default_name:
            raise ValueError(f"{value!r}: a program run as root must be an absolute path")
        found = next((Path(d) / value for d in SYSTEM_PATH if os.access(Path(d) / value, os.X_OK)), None)
        if found is None:
            raise ValueError(f"{value!r} not found in {', '.join(SYSTEM_PATH)}: give its absolute path")
        path = found
    if not path.is_file() or not os.access(path, os.X_OK):
        raise ValueError(f"{str(path)!r} is not an executable file")
    why = untrusted(path, "the program")
    if why is not None:
        raise ValueError(f"{str(path)!r} refused (running as root): {why}")
    return str(path)


def read_secret_file(path: Path) -> str:
    """The first line of a secret file; ValueError when unreadable, empty, too short, or (as root) not owned
    by root or readable or writable by anyone else (like ssh's private keys)."""
    try:
        st = os.stat(path)
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the secret file {str(path)!r}: {getattr(exc, 'strerror', None) or exc}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"the secret file {str(path)!r} is readable or writable by others "
                         f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 it")
    if running_as_root():
        why = untrusted(path, "the secret file")
        if why is not None:
            raise ValueError(f"{str(path)!r} refused (running as root): {why}")
    secret = (text.splitlines() or [""])[0].strip()
    if len(secret) < 16:
        raise ValueError(f"the secret in {str(path)!r} is shorter than 16 characters")
    return secret


def read_toml(path: Path) -> tuple[str, dict[str, Any]]:
    """The text and the parsed table of a TOML file (config or filter); ConfigError on bad input."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), None, f"cannot read: {exc}") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(str(path), int(m.group(1)) if m else None, f"invalid TOML: {exc}") from None


def load_config(path: str | Path | None = None, *, required: bool | None = None) -> Config:
    """Read and validate the config; with no file at the default path, return the defaults.

    `path` None means $SIPGUARD_CONFIG or the default; an explicitly named file must exist.
    """
    explicit = path is not None or "SIPGUARD_CONFIG" in os.environ
    p = Path(path or os.environ.get("SIPGUARD_CONFIG") or DEFAULT_CONFIG)
    if required is None:
        required = explicit
    if not p.exists():
        if required:
            raise ConfigError(str(p), None, "config file not found")
        return Config()
    check_trusted(p, "config file")
    text, data = read_toml(p)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        key = ".".join(str(x) for x in loc)
        line = _line_of(text, loc)
        where = f"line {line}: {key}" if line else key
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        raise ConfigError(str(p), where, msg) from None
    if cfg.cluster is not None and cfg.cluster.secret is not None and os.stat(p).st_mode & stat.S_IROTH:
        raise ConfigError(str(p), "cluster.secret", "the config file holds the fleet's secret and is world-readable "
                          f"(mode {stat.S_IMODE(os.stat(p).st_mode):04o}): chmod o-r it, or use secret_file")
    cfg.path = p
    return cfg


def resolve_state_dir(cfg: Config, cli_value: str | Path | None = None) -> Path:
    """--state-dir, then $SIPGUARD_STATE_DIR, then the config's state_dir, then the default."""
    if cli_value:
        return Path(cli_value)
    if os.environ.get("SIPGUARD_STATE_DIR"):
        return Path(os.environ["SIPGUARD_STATE_DIR"])
    return cfg.state_dir or DEFAULT_STATE_DIR
