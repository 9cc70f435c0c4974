"""The data that crosses stage boundaries: Line -> Record -> Event -> Decision -> Ban.

Immutable values, no behaviour; no stage may pass dicts to the next one instead. The per-line
types (Line, Record, Event) are NamedTuples: a scan or a scanner storm builds millions of them, and
a tuple is built at half the cost of a frozen dataclass.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import NamedTuple


class Line(NamedTuple):
    """One complete physical line (newline stripped) as a source read it.

    `offset` is the byte offset just past the line's newline in `source`, so a store of
    offsets can resume exactly after it.
    """

    source: str
    data: bytes
    offset: int = 0


class Record(NamedTuple):
    """One Kamailio log record, parsed from one or more physical lines.

    `text` is the message after the syslog / stderr prefix (what Kamailio itself printed,
    level and module marker included, e.g. ``NOTICE: <script>: auth failed ...``);
    continuation lines are joined to it with ``\\n``. `time` is epoch seconds or None when
    the format carries no timestamp (Kamailio's stderr).
    """

    text: str
    time: float | None = None
    host: str | None = None
    program: str | None = None
    pid: int | None = None
    rank: int | None = None
    source: str = ""


class EventKind(str, Enum):
    """What a filter says happened; the policy scores per (ip, kind)."""

    FLOOD = "flood"
    MALFORMED = "malformed"
    SCANNER = "scanner"
    AUTH_FAILURE = "auth_failure"
    PROBE = "probe"  # challenge sent / unknown user: harmless once, suspicious in bulk
    DIAL = "dial"  # an INVITE dialled a destination (captured): counted only by distinct jails
    SUCCESS = "success"  # clears the source's auth-failure / probe score


class Event(NamedTuple):
    """A filter hit: `ip` is the normalised source address Kamailio printed as $si.

    `text` is the matched record's text (a reference to the Record's own string, never a copy; an
    event read back from the store has the capped text it keeps for the newest events, else ""): the
    evidence a ban keeps.

    `captures` holds the regex's other named groups as (name, value) pairs, e.g. ("dest", "+4420..."):
    attacker text, at most CAPTURE_CHARS characters each, used only as a counting key by distinct jails
    (policy.py), never as an address; () for most filters and for an event read back from the store.
    """

    time: float
    ip: str
    filter: str
    kind: EventKind
    weight: float
    text: str = ""
    captures: tuple[tuple[str, str], ...] = ()


CAPTURE_CHARS = 64


def checked_user(v: object) -> str:
    """A user ban's user: 1 to CAPTURE_CHARS printable characters (a control or format character refuses
    it: it is attacker text, and never silently becomes another user); else ValueError."""
    if not isinstance(v, str) or not 1 <= len(v) <= CAPTURE_CHARS or not v.isprintable() \
            or any(unicodedata.category(c) == "Cf" for c in v):
        raise ValueError("bad user")
    return v
"""The longest captured value an Event carries (longer ones are cut to this: still a key, bounded)."""


class Evidence(NamedTuple):
    """One record that counted towards a ban, as the ban keeps it: the event's time, filter and weight,
    and the record's text, at most EVIDENCE_CHARS long (`cut`: it was longer and ends with an ellipsis).
    Attacker text: printed escaped, never interpreted."""

    time: float
    filter: str
    weight: float
    text: str
    cut: bool = False


EVIDENCE_CHARS = 512
"""The longest evidence text kept (characters); a longer record is cut to this, marked `cut`."""


def user_key(user: str, ip: str) -> str:
    """The key of a user ban, USER@ADDRESS (Kamailio's `$fU@$si`, the htable mirror's key)."""
    return f"{user}@{ip}"


def capture(ev: Event, name: str) -> str | None:
    """The value of one named capture of `ev`, None when it has none."""
    for k, v in ev.captures:
        if k == name:
            return v
    return None


def evidence_of(ev: Event) -> Evidence:
    """The evidence an event leaves: its text capped at EVIDENCE_CHARS (no copy when shorter)."""
    text = ev.text
    if len(text) <= EVIDENCE_CHARS:
        return Evidence(ev.time, ev.filter, ev.weight, text)
    return Evidence(ev.time, ev.filter, ev.weight, text[:EVIDENCE_CHARS - 1] + "\u2026", True)


@dataclass(frozen=True, slots=True)
class Decision:
    """What the policy decided for one event: ban `ip` for `duration` seconds (None = permanent)."""

    ip: str
    reason: str
    score: float
    duration: float | None
    offence: int
    time: float
    evidence: tuple[Evidence, ...] = ()  # the last records that counted, oldest first
    user: str | None = None  # a user ban (the office policy): only this user at `ip`; None: the address


@dataclass(frozen=True, slots=True)
class Ban:
    """A ban as stored and enforced. `expires` is epoch seconds, None when permanent."""

    ip: str
    reason: str
    created: float
    expires: float | None
    score: float = 0.0
    offence: int = 1
    manual: bool = False
    refused: str | None = None  # why the enforcer cannot hold it (e.g. an ipset and a /0); None: enforced
    # the records that decided it (policy bans; stored beside the ban, never compared, never published)
    evidence: tuple[Evidence, ...] = field(default=(), compare=False, repr=False)
    # a user ban (the office policy): only this user at `ip` is refused, by Kamailio (htable mirror), never
    # the address in the kernel. Attacker text (the From user, at most CAPTURE_CHARS): printed escaped,
    # a key for Kamailio only; it never decides which address the kernel bans. None: a ban of the address.
    user: str | None = None

    @property
    def key(self) -> str:
        """What identifies the ban: the address, or USER@ADDRESS for a user ban (the htable key)."""
        return self.ip if self.user is None else user_key(self.user, self.ip)

    def with_refusal(self, why: str | None) -> Ban:
        """The same ban, marked refused by the enforcer (None: enforceable)."""
        return replace(self, refused=why)

    def remaining(self, now: float) -> float | None:
        """Seconds left (>= 0), None when permanent."""
        if self.expires is None:
            return None
        return max(0.0, self.expires - now)
