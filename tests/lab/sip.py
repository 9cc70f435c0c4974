"""A tiny hand-made SIP-over-UDP client for lab tests.

No SIP stack: requests are built as text (so they can be broken on purpose),
sent from a chosen network namespace/address/port, and one reply is read with
a timeout.  Every loop in this module is bounded.

Example::

    with SipClient("198.18.0.1", netns="sgl-x-c1", local_ip="198.18.0.20") as c:
        r = c.register("1000", "sipguard.test", password="secret1000")
        assert r.status == 200

Builders (``build_*``) return ``bytes``; the malformed variants produce the
messages sipguard's tests need (bad CSeq, wrong Content-Length, wrong SIP
version, garbage that fails core parsing).
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import time
from dataclasses import dataclass, field

from .netns import in_netns

DEFAULT_UA = "Yealink SIP-T46S 66.86.0.15"
CRLF = "\r\n"


def md5hex(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def rand_token(n: int = 10) -> str:
    return os.urandom(n).hex()[:n]


@dataclass
class SipResponse:
    """A parsed SIP reply (status line + headers, first value per header)."""
    raw: bytes
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @classmethod
    def parse(cls, data: bytes) -> "SipResponse":
        text = data.decode("utf-8", "replace")
        head = text.split("\r\n\r\n", 1)[0]
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        reason = parts[2] if len(parts) > 2 else ""
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers.setdefault(k.strip().lower(), v.strip())
        return cls(data, status, reason, headers)


def parse_digest_challenge(value: str) -> dict[str, str]:
    """Parse ``Digest realm="x", nonce="y", qop="auth"`` into a dict."""
    if value.lower().startswith("digest"):
        value = value[6:]
    out: dict[str, str] = {}
    i, n = 0, len(value)
    for _ in range(64):  # bounded: at most 64 parameters
        while i < n and value[i] in " ,\t":
            i += 1
        if i >= n:
            break
        eq = value.find("=", i)
        if eq < 0:
            break
        key = value[i:eq].strip().lower()
        i = eq + 1
        if i < n and value[i] == '"':
            end = value.find('"', i + 1)
            end = n if end < 0 else end
            out[key] = value[i + 1:end]
            i = end + 1
        else:
            end = value.find(",", i)
            end = n if end < 0 else end
            out[key] = value[i:end].strip()
            i = end
    return out


def digest_authorization(method: str, uri: str, user: str, realm: str, password: str,
                         nonce: str, qop: str | None = "auth", nc: int = 1,
                         cnonce: str | None = None, opaque: str | None = None,
                         algorithm: str | None = "MD5", omit_cnonce: bool = False,
                         header_name: str = "Authorization") -> str:
    """Return a complete ``Authorization:`` (or Proxy-) header line (no CRLF)
    with a correct RFC 2617 MD5 response.  With *qop* ``auth`` the response
    covers nonce:nc:cnonce:qop; *omit_cnonce* reproduces svcrack's broken
    answer (qop without cnonce/nc) which Kamailio rejects as malformed."""
    ha1 = md5hex(f"{user}:{realm}:{password}")
    ha2 = md5hex(f"{method}:{uri}")
    params = [f'username="{user}"', f'realm="{realm}"', f'nonce="{nonce}"', f'uri="{uri}"']
    if qop:
        cnonce = cnonce or rand_token(16)
        ncs = f"{nc:08x}"
        resp = md5hex(f"{ha1}:{nonce}:{ncs}:{cnonce}:{qop}:{ha2}")
        if omit_cnonce:
            params += [f"qop={qop}"]
        else:
            params += [f"qop={qop}", f"nc={ncs}", f'cnonce="{cnonce}"']
    else:
        resp = md5hex(f"{ha1}:{nonce}:{ha2}")
    params.append(f'response="{resp}"')
    if algorithm:
        params.append(f"algorithm={algorithm}")
    if opaque:
        params.append(f'opaque="{opaque}"')
    return f"{header_name}: Digest " + ", ".join(params)


def build_request(method: str, ruri: str, *, from_uri: str, to_uri: str,
                  local_ip: str, local_port: int = 5060, call_id: str | None = None,
                  cseq: str | int = 1, cseq_method: str | None = None,
                  from_display: str | None = None, from_tag: str | None = None,
                  user_agent: str | None = DEFAULT_UA, contact: str | None = None,
                  expires: int | None = None, max_forwards: int | None = 70,
                  body: str = "", content_length: int | None = None,
                  content_type: str | None = None, sip_version: str = "SIP/2.0",
                  via_branch: str | None = None, extra_headers: list[str] | None = None,
                  raw_header_block: str | None = None) -> bytes:
    """Build one SIP request as bytes.

    All values are inserted verbatim (nothing is escaped), so any field can
    carry test/attack content.  *content_length* overrides the computed length
    (wrong Content-Length), *sip_version* the request-line version, *cseq* may
    be any string (bad CSeq).  *raw_header_block* is inserted as-is after the
    other headers (use it for folded headers or embedded CR/LF)."""
    call_id = call_id or f"{rand_token(16)}@{local_ip}"
    from_tag = from_tag or rand_token(8)
    via_branch = via_branch or "z9hG4bK" + rand_token(12)
    fdisp = f'"{from_display}" ' if from_display is not None else ""
    hdrs = [
        f"{method} {ruri} {sip_version}",
        f"Via: SIP/2.0/UDP {local_ip}:{local_port};branch={via_branch};rport",
    ]
    if max_forwards is not None:
        hdrs.append(f"Max-Forwards: {max_forwards}")
    hdrs += [
        f"From: {fdisp}<{from_uri}>;tag={from_tag}",
        f"To: <{to_uri}>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {cseq_method or method}",
    ]
    if contact:
        hdrs.append(f"Contact: {contact}")
    if expires is not None:
        hdrs.append(f"Expires: {expires}")
    if user_agent is not None:
        hdrs.append(f"User-Agent: {user_agent}")
    if content_type:
        hdrs.append(f"Content-Type: {content_type}")
    for h in extra_headers or []:
        hdrs.append(h)
    text = CRLF.join(hdrs) + CRLF
    if raw_header_block:
        text += raw_header_block
        if not raw_header_block.endswith(CRLF):
            text += CRLF
    clen = len(body.encode()) if content_length is None else content_length
    text += f"Content-Length: {clen}{CRLF}{CRLF}{body}"
    return text.encode()


class SipClient:
    """UDP socket bound in namespace *netns* (``None`` = current) to
    *local_ip*:*local_port*, talking to *server*:*port*.

    Context manager; :meth:`close` releases the socket.  All waits are
    bounded by *timeout* seconds."""

    def __init__(self, server: str, port: int = 5060, *, netns: str | None = None,
                 local_ip: str = "0.0.0.0", local_port: int = 5060,
                 domain: str = "sipguard.test", timeout: float = 2.0):
        self.server, self.port = server, port
        self.netns = netns
        self.local_ip, self.local_port = local_ip, local_port
        self.domain = domain
        self.timeout = timeout
        with in_netns(netns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((local_ip, local_port))
        self.sent = 0

    def __enter__(self) -> "SipClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # -- transport -------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.sock.sendto(data, (self.server, self.port))
        self.sent += 1

    def recv(self, timeout: float | None = None) -> SipResponse | None:
        """Wait up to *timeout* for one datagram; ``None`` on timeout.
        Provisional 1xx replies are skipped (at most 5)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        for _ in range(6):
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data, _ = self.sock.recvfrom(65535)
            except socket.timeout:
                return None
            resp = SipResponse.parse(data)
            if not (100 <= resp.status < 200):
                return resp
        return None

    def drain(self, max_packets: int = 10000, timeout: float = 0.05) -> int:
        """Discard queued replies (bounded); returns how many were read."""
        n = 0
        self.sock.settimeout(timeout)
        for _ in range(max_packets):
            try:
                self.sock.recvfrom(65535)
                n += 1
            except (socket.timeout, BlockingIOError):
                break
        return n

    def request(self, data: bytes, timeout: float | None = None) -> SipResponse | None:
        """Send *data* and return the first final reply (or ``None``)."""
        self.send(data)
        return self.recv(timeout)

    # -- convenience builders ---------------------------------------------
    @property
    def src_ip(self) -> str:
        return self.local_ip if self.local_ip != "0.0.0.0" else "127.0.0.1"

    def _common(self, **kw) -> dict:
        d = dict(local_ip=self.src_ip, local_port=self.local_port)
        d.update(kw)
        return d

    def build_register(self, user: str, domain: str | None = None, *, expires: int = 300,
                       **kw) -> bytes:
        """A REGISTER for ``user@domain`` with a Contact at our address."""
        domain = domain or self.domain
        aor = f"sip:{user}@{domain}"
        kw.setdefault("contact", f"<sip:{user}@{self.src_ip}:{self.local_port}>")
        return build_request("REGISTER", f"sip:{domain}", from_uri=aor, to_uri=aor,
                             expires=expires, **self._common(**kw))

    def build_options(self, ruri: str | None = None, **kw) -> bytes:
        """An OPTIONS to the proxy (no user part: answered '200 Keepalive')."""
        ruri = ruri or f"sip:{self.server}"
        kw.setdefault("from_uri", f"sip:probe@{self.src_ip}")
        kw.setdefault("to_uri", ruri)
        return build_request("OPTIONS", ruri, **self._common(**kw))

    def options(self, **kw) -> SipResponse | None:
        return self.request(self.build_options(**kw))

    def register(self, user: str, domain: str | None = None, password: str | None = None,
                 *, auth_user: str | None = None, qop: bool = True,
                 omit_cnonce: bool = False, expires: int = 300,
                 timeout: float | None = None, **kw) -> SipResponse | None:
        """REGISTER; if challenged (401/407) and *password* is given, answer
        the challenge once with a correct digest (qop=auth with cnonce/nc when
        offered and *qop* is true) and return the final reply.  Without a
        password the challenge reply itself is returned."""
        domain = domain or self.domain
        call_id = kw.pop("call_id", None) or f"{rand_token(16)}@{self.src_ip}"
        from_tag = kw.pop("from_tag", None) or rand_token(8)
        first = self.build_register(user, domain, expires=expires, call_id=call_id,
                                    from_tag=from_tag, cseq=1, **kw)
        resp = self.request(first, timeout)
        if resp is None or password is None or resp.status not in (401, 407):
            return resp
        hname = "WWW-Authenticate" if resp.status == 401 else "Proxy-Authenticate"
        ch = parse_digest_challenge(resp.header(hname) or "")
        offered = [q.strip() for q in ch.get("qop", "").split(",") if q.strip()]
        use_qop = "auth" if (qop and "auth" in offered) else None
        auth = digest_authorization(
            "REGISTER", f"sip:{domain}", auth_user or user, ch.get("realm", domain),
            password, ch.get("nonce", ""), qop=use_qop, opaque=ch.get("opaque"),
            omit_cnonce=omit_cnonce,
            header_name="Authorization" if resp.status == 401 else "Proxy-Authorization")
        extra = list(kw.pop("extra_headers", None) or []) + [auth]
        second = self.build_register(user, domain, expires=expires, call_id=call_id,
                                     from_tag=from_tag, cseq=2, extra_headers=extra, **kw)
        return self.request(second, timeout)

    # -- malformed variants -------------------------------------------------
    def build_bad_cseq(self, **kw) -> bytes:
        """REGISTER whose CSeq number is not an unsigned integer."""
        return self.build_register("1000", cseq="abc", **kw)

    def build_wrong_content_length(self, **kw) -> bytes:
        """OPTIONS to a user with a body shorter than its Content-Length."""
        ruri = f"sip:1000@{self.domain}"
        return self.build_options(ruri=ruri, body="v=0\r\n", content_length=40,
                                  content_type="application/sdp", **kw)

    def build_wrong_version(self, **kw) -> bytes:
        """OPTIONS to a user with request-line version SIP/3.0."""
        return self.build_options(ruri=f"sip:1000@{self.domain}", sip_version="SIP/3.0", **kw)

    @staticmethod
    def build_garbage(n: int = 64, seed: int | None = None) -> bytes:
        """Bytes that look like a request line but fail Kamailio's core parser
        (no headers, broken first line)."""
        rnd = random.Random(seed)
        junk = bytes(rnd.randrange(33, 127) for _ in range(n))
        return b"INVITE " + junk + b"\r\n\r\n"

    def flood_options(self, count: int = 300, max_seconds: float = 5.0, **kw) -> int:
        """Send up to *count* OPTIONS as fast as possible, stopping after
        *max_seconds*; replies are drained.  Returns the number sent."""
        count = max(0, min(int(count), 100000))
        deadline = time.monotonic() + max_seconds
        sent = 0
        for i in range(count):
            if time.monotonic() > deadline:
                break
            self.send(self.build_options(cseq=i + 1, **kw))
            sent += 1
        self.drain(max_packets=count + 10)
        return sent
