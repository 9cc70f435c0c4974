"""The fleet's signatures: an HMAC-SHA256 tag on everything a node writes to Redis that another node acts on.

Bans and unbans (the stream entries, a node's lists of bans on the stream, and the values of the
shared ban set), user bans and their unbans
(the office policy), the weighted events a node adds to the score keys (an office's successes among
them) and the offences behind an escalation each carry a tag computed here, by a
node, under `[cluster] secret` (or `secret_file`). The secret never goes to Redis and no Redis script
ever computes a tag: whoever can only write to Redis cannot make one, so what they write decides
nothing (`sipguard/cluster/README.md`, "Signatures").

Every tag covers the key prefix and what the value means (its kind and every field), in one canonical
encoding (each part typed and length-prefixed), so a tag can never be moved to another fleet, another
address, another jail or another kind of entry. Tags are HMAC-SHA-256 truncated to 128 bits, base64url (22 characters).

Rotation: a node signs with the current secret and also accepts tags made with `secret_previous`
until `secret_previous_until` (the overlap while the fleet's nodes get the new secret one by one).

Pure: nothing here talks to Redis, the store or the kernel.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Sequence

TAG_CHARS = 22  # 16 bytes, base64url without padding


class Signer:
    """Signs and verifies the fleet's values under one secret (and, during a rotation, older ones).

    Without a secret (`secret=None`) it signs nothing (`tag` returns "") and `verify` accepts every
    value: the fleet works as before and the bridge warns at start that any Redis writer can ban.
    """

    def __init__(self, secret: str | None, prefix: str, previous: Sequence[str] = (),
                 previous_until: float | None = None) -> None:
        self._key = None if secret is None else secret.encode("utf-8")
        self._previous = [p.encode("utf-8") for p in previous]
        # keyed once: each tag copies the two keyed SHA-256 states (scoring signs every event, a burst
        # verifies 100,000 bans: a quarter of what `hmac.new` or `hmac.digest` costs per tag)
        self._pads = {k: _keyed(k) for k in ([] if self._key is None else [self._key, *self._previous])}
        self._until = previous_until
        self.prefix = prefix
        self._heads: dict[str, str] = {}  # kind -> the encoded prefix and kind every message of it starts with
        self._user_key: bytes | None = None  # `keyed_hash`'s key, derived once

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def _message(self, kind: str, parts: Sequence[object]) -> bytes:
        head = self._heads.get(kind)
        if head is None:
            head = self._heads[kind] = ",".join(_framed(_encode(p)) for p in (self.prefix, kind))
        if kind == "ban" and len(parts) == 9:
            msg = _ban_message(head, *parts)
            if msg is not None:
                return msg
        out = [head]
        for p in parts:  # (the common types inline: a burst verifies 100,000 bans; `_encode` decides the rest)
            tp = type(p)
            if tp is str:
                t = "s" + p  # type: ignore[operator]
            elif tp is float:
                t = "d" + repr(p)
            elif p is None:
                t = "n"
            elif tp is bool:
                t = "t" if p else "f"
            else:
                t = _encode(p)
            out.append(f"{len(t)}:{t}")
        return ",".join(out).encode("utf-8", "surrogatepass")

    def _tag(self, key: bytes, msg: bytes) -> str:
        inner, outer = self._pads[key]
        i = inner.copy()
        i.update(msg)
        o = outer.copy()
        o.update(i.digest())  # = hmac.digest(key, msg, "sha256") (tests/test_guard_fast.py compares them)
        return binascii.b2a_base64(o.digest()[:16], newline=False)[:TAG_CHARS].translate(_URLSAFE).decode("ascii")

    def tag(self, kind: str, *parts: object) -> str:
        """The tag of a value of `kind` made of `parts` (strings and numbers), or "" without a secret."""
        if self._key is None:
            return ""
        return self._tag(self._key, self._message(kind, parts))

    def keyed_hash(self, value: str) -> str:
        """A user's name as the fleet knows it (the office policy): 16 hex digits of BLAKE2b keyed with a
        key derived from the current secret (plain BLAKE2b without one), the same on every node that holds
        that secret; whoever reads Redis cannot try names against it. (During a rotation nodes on
        different current secrets hash a user differently: an office's success seen on one of them is
        not an office for the other until the rotation ends.)"""
        key = self._user_key
        if key is None:
            key = self._user_key = b"" if self._key is None else hashlib.sha256(
                b"sipguard user hash\0" + self.prefix.encode("utf-8", "surrogatepass") + b"\0" + self._key).digest()
        return hashlib.blake2b(value.encode("utf-8", "surrogatepass"), key=key, digest_size=8).hexdigest()

    def keys_now(self, now: float | None = None) -> list[bytes]:
        """The secrets whose tags are accepted at `now`: the current one, and the previous ones
        during the overlap."""
        if self._key is None:
            return []
        now = time.time() if now is None else now
        if self._previous and self._until is not None and now <= self._until:
            return [self._key, *self._previous]
        return [self._key]

    def verify(self, tag: object, kind: str, *parts: object, now: float | None = None) -> bool:
        """True when `tag` was made by a node holding an accepted secret for exactly this value
        (always True without a secret)."""
        if self._key is None:
            return True
        if not isinstance(tag, str) or len(tag) != TAG_CHARS:
            return False
        msg = self._message(kind, parts)
        if not self._previous:  # (no rotation under way: one key, no list)
            return hmac.compare_digest(self._tag(self._key, msg), tag)
        return any(hmac.compare_digest(self._tag(k, msg), tag) for k in self.keys_now(now))


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _keyed(key: bytes) -> tuple[hashlib._Hash, hashlib._Hash]:
    """The HMAC-SHA-256 states after the key's inner and outer pad (RFC 2104), to copy per tag."""
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    return hashlib.sha256(key.translate(_IPAD)), hashlib.sha256(key.translate(_OPAD))


_BLOCK = 64  # SHA-256's block size
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


def _ban_message(head: str, ip: object, reason: object, created: object, expires: object, score: object,
                 offence: object, manual: object, ban_id: object, origin: object) -> bytes | None:
    """The message of a ban as nodes write it (`ban_parts`: text, text, float, float or null, float,
    int, bool, text, text) in one format, the same bytes as the generic encoding; None for any other
    shape (the generic encoding then decides)."""
    if not (type(ip) is str and type(reason) is str and type(created) is float and type(score) is float
            and type(offence) is int and type(manual) is bool and type(ban_id) is str and type(origin) is str):
        return None
    if type(expires) is float:
        e = "d" + repr(expires)
    elif expires is None:
        e = "n"
    else:
        return None
    c, sc, o = repr(created), repr(score), str(offence)
    return (f"{head},{len(ip) + 1}:s{ip},{len(reason) + 1}:s{reason},{len(c) + 1}:d{c},{len(e)}:{e},"
            f"{len(sc) + 1}:d{sc},{len(o) + 1}:i{o},1:{'t' if manual else 'f'},{len(ban_id) + 1}:s{ban_id},"
            f"{len(origin) + 1}:s{origin}").encode("utf-8", "surrogatepass")


def _framed(t: str) -> str:
    return f"{len(t)}:{t}"


def _encode(p: object) -> str:
    """One part of a signed message, typed so that "1.0", 1.0, 1 and true never sign alike."""
    if isinstance(p, str):
        return "s" + p
    if p is None:
        return "n"
    if p is True or p is False:
        return "t" if p else "f"
    if type(p) is int:
        return "i" + str(p)
    if type(p) is float:
        return "d" + repr(p)
    return "j" + json.dumps(p, allow_nan=True, sort_keys=True)


# -- what is signed, one function per kind (the same on the signing and the verifying side) ---------------
def ban_parts(d: dict) -> tuple:
    """The signed fields of a ban json (everything but its tag), in a fixed order."""
    return (d.get("ip"), d.get("reason"), d.get("created"), d.get("expires"), d.get("score"), d.get("offence"),
            d.get("manual"), d.get("id"), d.get("origin"))


def bulk_parts(origin: str, payload: str) -> tuple:
    """The signed fields of a bulk stream entry (kind "bans"): the node it came from and the list of
    bans exactly as it was written (one tag for the whole list)."""
    return (origin, payload)


def unban_parts(op: str, ip: str, ban_id: str, origin: str, at: str) -> tuple:
    """The signed fields of an unban stream entry (`at` as the text carried on the stream)."""
    return (op, ip, ban_id, origin, at)


def user_ban_parts(d: dict) -> tuple:
    """The signed fields of a user ban json (the office policy): a ban's, then the user (kind "userban",
    so an address ban's tag never verifies as a user ban's nor the other way round)."""
    return (*ban_parts(d), d.get("user"))


def user_unban_parts(ip: str, user: str, ban_id: str, origin: str, at: str) -> tuple:
    """The signed fields of a user unban stream entry (kind "userunban")."""
    return ("userunban", ip, user, ban_id, origin, at)


def event_parts(ip: str, jail: str, uid: str, weight: str, at: str) -> tuple:
    """The signed fields of one scored event in a score key (`at`: its time as "%.6f")."""
    return (ip, jail, uid, weight, at)


def offence_parts(ip: str, ban_id: str, at: str) -> tuple:
    """The signed fields of one offence (an automatic ban) in an offence key (`at`: "%.6f")."""
    return (ip, ban_id, at)
