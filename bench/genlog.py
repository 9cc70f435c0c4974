"""Realistic Kamailio logs of any size, in traditional syslog format, for the benchmarks.

Built from the line kinds real Kamailio 5.6 prints (tests/data/real/*.log, tests/corpus/*.txt and the
xlog lines of examples/kamailio/kamailio.cfg): about 5% attack lines (pike blocks, malformed requests,
scanner User-Agents, password guessing, extension scanning) from many distinct sources in
198.18.0.0/15 and 2001:db8::/32, the rest ordinary noise (script routing lines, acc, tm, usrloc,
registrar, sl, dialog, core notices) plus the legitimate challenge/REGISTER-success pairs every
phone's registration leaves, from private addresses.

    python bench/genlog.py OUT.log [--lines 500000] [--seed 1] [--attack-ratio 0.05]

Deterministic for a seed. `generate()` is the library form (the benchmarks use it to write
logs with current timestamps, and one-attack-line helpers for ban latency).
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import sys
import time
from collections.abc import Iterator

HOST = "sip1"
PIDS = (23866, 23867, 23868, 23869, 23870, 23871, 23872, 23873)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
METHODS = ("REGISTER", "INVITE", "OPTIONS", "SUBSCRIBE")
SCANNER_UAS = ("friendly-scanner", "sipvicious", "sipcli/v1.8", "VaxSIPUserAgent/3.1", "pplsip",
               "sundayddr", "iWar", "sip-scan", "SIPScan", "PortSIP VoIP SDK 11.2")
DOMAIN = "sip.example.net"


def syslog_stamp(t: float) -> str:
    """`Nov 30 03:01:56` (rsyslog's traditional format pads a one-digit day with a space)."""
    tm = time.localtime(t)
    return f"{_MONTHS[tm.tm_mon - 1]} {tm.tm_mday:2d} {tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d}"


def attacker_address(rng: random.Random, v6_share: float = 0.2) -> str:
    """A random documentation-range source: 198.18.0.0/15 (v4) or 2001:db8::/32 (v6)."""
    if rng.random() < v6_share:
        return str(ipaddress.IPv6Address((0x20010DB8 << 96) | rng.getrandbits(96)))
    return str(ipaddress.IPv4Address((198 << 24) | (18 << 16) | rng.getrandbits(17)))


def attacker_address_n(n: int) -> str:
    """The n-th distinct source (n < 131072 is IPv4 in 198.18.0.0/15, then IPv6 in 2001:db8::/32)."""
    if n < (1 << 17):
        return str(ipaddress.IPv4Address((198 << 24) | (18 << 16) | n))
    return str(ipaddress.IPv6Address((0x20010DB8 << 96) | (n + 1)))


# ---------------------------------------------------------------------------------------- attacks
def auth_failed(ip: str, port: int, rng: random.Random) -> str:
    return (f"NOTICE: <script>: auth failed for user {rng.randint(100, 9999)} from {ip}:{port} "
            f"method {rng.choice(('REGISTER', 'REGISTER', 'INVITE'))}")


def unknown_user(ip: str, port: int, rng: random.Random) -> str:
    return f"NOTICE: <script>: unknown user {rng.randint(100, 99999)} from {ip}:{port} method REGISTER"


def challenge(ip: str, port: int, rng: random.Random) -> str:
    return f"NOTICE: <script>: auth challenge for user {rng.randint(100, 9999)} from {ip}:{port} method REGISTER"


def scanner(ip: str, port: int, rng: random.Random) -> str:
    return f"WARNING: <script>: Blocked scanner UA '{rng.choice(SCANNER_UAS)}' from {ip}:{port}"


def pike(ip: str, port: int, rng: random.Random) -> str:
    if rng.random() < 0.5:
        return (f"WARNING: pike [pike_funcs.c:135]: pike_check_ipaddr(): PIKE - BLOCKing ip {ip}, "
                f"node=0x7f{rng.getrandbits(36):09x}")
    m = rng.choice(METHODS)
    return f"ALERT: <script>: ALERT: pike block {m} from sip:{rng.randint(100, 999)}@{DOMAIN} (IP:{ip}:{port})"


def malformed(ip: str, port: int, rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"ERROR: <script>: Malformed SIP request from {ip}:{port}"
    return (f"ERROR: <core> [core/receive.c:376]: receive_msg(): core parsing of SIP message failed "
            f"({ip}:{port}/1)")


# (line maker, share of attack sources, burst length range)
ATTACKS = (
    (auth_failed, 0.30, (2, 20)),
    (unknown_user, 0.20, (2, 30)),
    (challenge, 0.10, (1, 15)),
    (scanner, 0.15, (1, 3)),
    (pike, 0.12, (1, 3)),
    (malformed, 0.13, (1, 8)),
)


# ---------------------------------------------------------------------------------------- noise
def _lan(rng: random.Random) -> str:
    return f"10.{rng.randint(0, 3)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"


def _callid(rng: random.Random) -> str:
    return f"{rng.getrandbits(64):016x}@{_lan(rng)}"


def _ext(rng: random.Random) -> int:
    return rng.randint(1000, 1999)


def _n_script_route(rng):
    m = rng.choice(("INVITE", "BYE", "ACK", "CANCEL", "OPTIONS", "NOTIFY", "PRACK", "UPDATE"))
    return (f"INFO: <script>: {m} sip:{_ext(rng)}@{DOMAIN} from sip:{_ext(rng)}@{DOMAIN} "
            f"call-id {_callid(rng)} relayed to {_lan(rng)}:5060")


def _n_script_dialog(rng):
    return f"INFO: <script>: in-dialog {rng.choice(('BYE', 'ACK', 're-INVITE', 'UPDATE'))} " \
           f"loose-routed, call-id {_callid(rng)}"


def _n_script_location(rng):
    return f"INFO: <script>: lookup location sip:{_ext(rng)}@{DOMAIN}: {rng.randint(1, 3)} contact(s)"


def _n_acc(rng):
    code, reason = rng.choice(((200, "OK"), (200, "OK"), (200, "OK"), (486, "Busy Here"),
                               (487, "Request Terminated"), (480, "Temporarily Unavailable")))
    return (f"NOTICE: acc [acc.c:317]: acc_log_request(): ACC: transaction answered: "
            f"timestamp={1764460000 + rng.randint(0, 999999)};method=INVITE;from_tag={rng.getrandbits(32):08x};"
            f"to_tag={rng.getrandbits(32):08x};call_id={_callid(rng)};code={code};reason={reason};"
            f"src_user={_ext(rng)};src_domain={DOMAIN};src_ip={_lan(rng)};dst_ouser={_ext(rng)};"
            f"dst_user={_ext(rng)};dst_domain={_lan(rng)}")


def _n_tm(rng):
    return rng.choice((
        "ERROR: tm [t_fwd.c:1487]: t_send_branch(): sending request on branch 0 failed",
        "ERROR: tm [tm.c:1523]: _w_t_relay_to(): t_forward_noack failed",
        f"WARNING: tm [t_reply.c:1412]: t_should_relay_response(): negative reply on branch 0 of "
        f"call-id {_callid(rng)}",
        "NOTICE: tm [t_lookup.c:1469]: t_newtran(): transaction already in process",
        f"ERROR: tm [ut.h:352]: uri2dst2(): no corresponding socket found for \"{_lan(rng)}\" af 2 (udp)",
    ))


def _n_usrloc(rng):
    return rng.choice((
        f"INFO: usrloc [dlist.c:581]: get_all_mem_ucontacts(): expired contact of sip:{_ext(rng)}@{DOMAIN} "
        f"removed",
        f"WARNING: usrloc [ucontact.c:1248]: update_ucontact(): contact of sip:{_ext(rng)}@{DOMAIN} "
        f"changed address to sip:{_ext(rng)}@{_lan(rng)}:5060",
        f"INFO: registrar [save.c:620]: test_max_contacts(): too many contacts for AOR sip:{_ext(rng)}@{DOMAIN}",
    ))


def _n_core(rng):
    return rng.choice((
        f"ERROR: <core> [core/tcp_read.c:1505]: tcp_read_req(): error reading - c: 0x7f{rng.getrandbits(36):09x} "
        f"r: 0x7f{rng.getrandbits(36):09x} (-1)",
        f"WARNING: <core> [core/tcp_main.c:1298]: tcpconn_main_timeout(): connection to {_lan(rng)}:5060 timed out",
        "ERROR: <core> [core/parser/parse_from.c:83]: parse_from_uri(): failed to parse From uri",
        "WARNING: sanity [sanity.c:1120]: check_parse_uris(): invalid From header or uri",
        f"INFO: <core> [core/udp_server.c:{rng.randint(100, 200)}]: probe_max_receive_buffer(): SO_RCVBUF is "
        f"finally 425984 on fd {rng.randint(5, 20)}",
        "ERROR: sl [sl_funcs.c:415]: sl_reply_error(): stateless error reply used: I'm terribly sorry, "
        "server error occurred (1/SL)",
        f"WARNING: dialog [dlg_handlers.c:1619]: dlg_onroute(): unable to find dialog for BYE with route "
        f"param '{rng.getrandbits(32):08x}' [{rng.randint(1000, 9999)}:{rng.randint(1000, 9999)}] and "
        f"call-id '{_callid(rng)}'",
        f"INFO: rtpengine [rtpengine.c:2801]: rtpp_function_call(): proxy reply: offer for call-id "
        f"{_callid(rng)} ok",
        "ERROR: <core> [core/parser/parse_fline.c:259]: parse_first_line(): parse_first_line: bad message (offset: 0)",
    ))


# (maker, weight): ordinary traffic of a small PBX edge
NOISE = (
    (_n_script_route, 30), (_n_script_dialog, 15), (_n_script_location, 8), (_n_acc, 20),
    (_n_tm, 8), (_n_usrloc, 7), (_n_core, 12),
)


def generate(
    lines: int = 500_000,
    *,
    seed: int = 1,
    attack_ratio: float = 0.05,
    legit_ratio: float = 0.01,
    start: float | None = None,
    rate: float = 50.0,
    v6_share: float = 0.2,
) -> Iterator[str]:
    """Yield `lines` log lines (no newline), timestamps from `start` at `rate` lines/s of log time.

    `attack_ratio` of the lines come from attack bursts (sources drawn at random, bursts spread
    through the file); `legit_ratio` are the challenge/success pairs of phones registering.
    """
    rng = random.Random(seed)
    if start is None:
        start = time.mktime((2025, 11, 30, 3, 0, 0, 0, 0, -1))
    n_attack = int(lines * attack_ratio)
    # Attack bursts: (position, source, maker) entries, spread at random through the file.
    slots: list[tuple[int, str, int, object]] = []
    makers = [a[0] for a in ATTACKS]
    weights = [a[1] for a in ATTACKS]
    while len(slots) < n_attack:
        k = rng.choices(range(len(ATTACKS)), weights)[0]
        lo, hi = ATTACKS[k][2]
        ip = attacker_address(rng, v6_share)
        port = rng.choice((5060, 5060, 5061, rng.randint(1024, 65535)))
        pos = rng.randrange(lines)
        for _ in range(min(rng.randint(lo, hi), n_attack - len(slots))):
            slots.append((min(pos, lines - 1), ip, port, makers[k]))
            pos += rng.randint(1, 40)
    slots.sort(key=lambda s: s[0])
    noise_makers = [m for m, _ in NOISE]
    noise_weights = [w for _, w in NOISE]
    noise_pick = rng.choices(noise_makers, noise_weights, k=4096)
    si = 0
    pending_success: list[tuple[str, int, int]] = []
    stamp_t, stamp = -1, ""
    for i in range(lines):
        t = int(start + i / rate)
        if t != stamp_t:
            stamp_t, stamp = t, syslog_stamp(t)
        if si < len(slots) and slots[si][0] <= i:
            _, ip, port, maker = slots[si]
            si += 1
            msg = maker(ip, port, rng)  # type: ignore[operator]
        elif pending_success and rng.random() < 0.3:
            user, lan, port = pending_success.pop()
            msg = f"NOTICE: <script>: REGISTER success for user {user} from {lan}:{port}"
        elif rng.random() < legit_ratio / 2:
            user, lan, port = _ext(rng), _lan(rng), 5060
            pending_success.append((str(user), lan, port))
            msg = f"NOTICE: <script>: auth challenge for user {user} from {lan}:{port} method REGISTER"
        else:
            msg = noise_pick[rng.getrandbits(12)](rng)
        yield f"{stamp} {HOST} kamailio[{PIDS[i & 7]}]: {msg}"


def write_log(path: str, lines: int = 500_000, **kw: object) -> int:
    """Write a generated log to `path`; returns its size in bytes."""
    size = 0
    with open(path, "w", encoding="utf-8", buffering=1 << 20) as f:
        batch: list[str] = []
        for line in generate(lines, **kw):  # type: ignore[arg-type]
            batch.append(line)
            if len(batch) >= 8192:
                text = "\n".join(batch) + "\n"
                size += len(text)
                f.write(text)
                batch.clear()
        if batch:
            text = "\n".join(batch) + "\n"
            size += len(text)
            f.write(text)
    return size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output file ('-' for stdout)")
    ap.add_argument("--lines", type=int, default=500_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--attack-ratio", type=float, default=0.05)
    ap.add_argument("--legit-ratio", type=float, default=0.01)
    ap.add_argument("--rate", type=float, default=50.0, help="lines per second of log time")
    ap.add_argument("--now", action="store_true", help="timestamps start now (default: a fixed date)")
    a = ap.parse_args(argv)
    kw = dict(seed=a.seed, attack_ratio=a.attack_ratio, legit_ratio=a.legit_ratio, rate=a.rate,
              start=time.time() if a.now else None)
    if a.out == "-":
        for line in generate(a.lines, **kw):  # type: ignore[arg-type]
            sys.stdout.write(line + "\n")
        return 0
    size = write_log(a.out, a.lines, **kw)
    print(f"{a.out}: {a.lines} lines, {size / 1e6:.1f} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
