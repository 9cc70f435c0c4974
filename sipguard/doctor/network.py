"""Doctor checks of what sipguard talks to and must never ban: the fleet's Redis (reachable, this
node in sync), Kamailio's htable RPC socket, and the allow-list (this host's own addresses, read
with pyroute2, and the management networks).

Read-only: Redis gets a PING and the reads `sipguard status` makes; Kamailio gets one RPC that
lists its htables; nothing is written anywhere.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..addresses import AllowList, network, normalize_ip
from .base import Finding, Host, ok, printable, problem, skipped, warning


def check_redis(host: Host) -> list[Finding]:
    """[cluster]: Redis answers, and this node's daemon says it is in sync with the fleet."""
    c = host.cfg.cluster
    if c is None:
        return [skipped("redis", "no [cluster]: standalone")]
    from ..cluster import cluster_status, connect, redacted, redis_errors

    url = redacted(c.redis_url)
    try:
        client = connect(c)
        try:
            client.ping()
        finally:
            client.close()
    except redis_errors() as exc:
        return [problem("redis", f"Redis {url} unreachable: {printable(exc) or type(exc).__name__}",
                        "systemctl status redis-server on the Redis host; check [cluster] redis_url, the password "
                        "and that this host may connect (its firewall, Redis' bind and protected-mode)", url=url)]
    out = [ok("redis", f"Redis {url} answers", url=url)]
    from .state import _store

    store, _ = _store(host)
    if store is None:
        out.append(skipped("fleet", "no database: the fleet view of this node is unknown"))
        return out
    info = cluster_status(c, store, host.now)
    me = info.get("this_node") or {}
    beat = me.get("heartbeat", 0)
    if not me or host.now - beat > max(10.0, 3 * c.heartbeat_interval):
        out.append(problem("fleet", f"node {c.node_name}: its daemon has not reported to the fleet recently",
                           "systemctl status sipguard (see the heartbeat check)", node=c.node_name))
    elif not me.get("in_sync"):
        out.append(problem("fleet", f"node {c.node_name}: NOT in sync ({me.get('outbox', 0)} changes queued to "
                           f"publish)", "journalctl -u sipguard | grep -i redis: the node catches up by itself "
                           "once Redis takes its writes; a queue that keeps growing means Redis refuses them",
                           node=c.node_name, outbox=me.get("outbox")))
    else:
        out.append(ok("fleet", f"node {c.node_name}: in sync", node=c.node_name))
    gone = [n["node"] for n in info.get("nodes", []) if not n.get("alive")]
    if gone:
        out.append(warning("fleet", f"nodes seen but gone (heartbeat expired): {', '.join(map(printable, gone))}",
                           "check sipguard on those hosts (a node taken out for good leaves the list when its key "
                           "expires)", gone=gone))
    return out


def check_htable(host: Host) -> list[Finding]:
    """[htable] enabled: Kamailio's JSON-RPC socket is there and knows the table."""
    h = host.cfg.htable
    if not h.enabled:
        return [skipped("htable", "[htable] not enabled")]
    from ..extras.htable import JsonRpc, RpcError

    if h.rpc.startswith(("unix:", "fifo:")):
        path = Path(h.rpc[5:])
        want = stat.S_ISSOCK if h.rpc.startswith("unix:") else stat.S_ISFIFO
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            return [problem("htable", f"{printable(path)}: {exc.strerror or exc}",
                            "load jsonrpcs in kamailio.cfg with modparam(\"jsonrpcs\", \"transport\", 6) (datagram "
                            "and FIFO), restart Kamailio, and point [htable] rpc at its socket "
                            "(examples/kamailio/kamailio.cfg)", rpc=h.rpc)]
        if not want(mode):
            return [problem("htable", f"{printable(path)} is not a {'socket' if h.rpc.startswith('unix:') else 'FIFO'}",
                            "point [htable] rpc at jsonrpcs' kamailio_rpc.sock (or its FIFO)", rpc=h.rpc)]
    try:
        tables = JsonRpc(h.rpc, h.timeout).call("htable.listTables")
    except RpcError as exc:
        return [problem("htable", f"Kamailio does not answer on {printable(h.rpc)}: {printable(exc)}",
                        "systemctl status kamailio; check jsonrpcs' transport and the socket's permissions",
                        rpc=h.rpc)]
    names = {t.get("name") for t in tables if isinstance(t, dict)} if isinstance(tables, list) else set()
    if h.table not in names:
        return [problem("htable", f"Kamailio has no htable {h.table!r} (it has {', '.join(sorted(map(str, names))) or 'none'})",
                        f"modparam(\"htable\", \"htable\", \"{h.table}=>size=16;autoexpire=0;\") in kamailio.cfg, "
                        f"then restart Kamailio", rpc=h.rpc)]
    return [ok("htable", f"Kamailio answers on {printable(h.rpc)} and has htable {h.table}", rpc=h.rpc)]


def own_addresses() -> list[str]:
    """This host's addresses in this network namespace, from the kernel over netlink (pyroute2)."""
    from pyroute2 import IPRoute

    found: list[str] = []
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            ip = normalize_ip(addr) if addr else None
            if ip and ip not in found:
                found.append(ip)
    return found


def _covered(cidr: str, allowed: list[str]) -> bool:
    net = network(cidr)
    return any(net.version == a.version and net.subnet_of(a) for a in map(network, allowed))  # type: ignore[arg-type]


def check_allowlist(host: Host) -> list[Finding]:
    """This host's own addresses and the management networks are never banned."""
    a = host.cfg.allowlist
    out: list[Finding] = []
    try:
        mine = own_addresses()
    except Exception as exc:  # noqa: BLE001 - no netlink here (a sandbox)
        mine = []
        out.append(warning("allowlist", f"cannot list this host's addresses over netlink: {printable(exc)}",
                           "run sipguard doctor as root on the host itself"))
    plain = AllowList(a.cidrs, include_host=False)
    exposed = [ip for ip in mine if ip not in plain]
    if exposed and not a.include_host_addresses:
        out.append(problem("allowlist", f"this host's own addresses can be banned: {', '.join(exposed)}",
                           "set [allowlist] include_host_addresses = true (or add them to [allowlist] cidrs)",
                           addresses=exposed))
    elif mine:
        out.append(ok("allowlist", f"this host's {len(mine)} addresses are never banned", addresses=mine))
    mgmt = host.cfg.firewall.management_cidrs
    missing = [c for c in mgmt if not _covered(c, ["127.0.0.0/8", "::1/128", *a.cidrs])]
    if missing:
        out.append(problem("allowlist", f"management networks not in the allow-list: {', '.join(missing)}: a "
                           f"mistyped password from there bans the operator",
                           "add them to [allowlist] cidrs: cidrs = [" + ", ".join(f'"{c}"' for c in
                                                                              [*a.cidrs, *missing]) + "]",
                           missing=missing))
    elif mgmt:
        out.append(ok("allowlist", f"management networks allow-listed: {', '.join(mgmt)}"))
    elif not a.cidrs:
        out.append(warning("allowlist", "no management network is allow-listed",
                           "set [allowlist] cidrs (and [firewall] management_cidrs) to your management networks"))
    ssh = host.env.get("SSH_CONNECTION", "").split()
    client = normalize_ip(ssh[0]) if ssh else None
    if client is not None and client not in AllowList(a.cidrs, include_host=a.include_host_addresses):
        out.append(warning("allowlist", f"you are connected from {client}, which is not allow-listed",
                           f"add \"{client}/32\" (or its network) to [allowlist] cidrs" if ":" not in client
                           else f"add \"{client}/128\" (or its network) to [allowlist] cidrs", client=client))
    return out
