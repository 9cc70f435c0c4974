"""Enforcers: what turns bans into something that drops packets.

`base` holds the protocol and shared types; each backend is a module of its own (`ipset` with its
`hook` and `ipsetnl` helpers, `nftables`, `dryrun`) and imports only `base`. This package's face
re-exports `base` and chooses a backend (`make_enforcer`), importing the chosen one only; `remove_all`
(uninstall: `sipguard firewall remove`) imports both kernel backends, since either may be installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import (IPSET_MAX_TIMEOUT, SYNC_TOLERANCE, EnforcedEntry, Enforcer, SyncReport, kernel_timeout,
                   needs_rearm)

if TYPE_CHECKING:
    from ..config import EnforceConfig


def make_enforcer(cfg: EnforceConfig | str | None = None, state_dir: str | None = None) -> Enforcer:
    """The enforcer [enforce] names; 'auto' = ipset+iptables as root with ip_set, else nftables.

    Building one touches nothing: sets and hook rules are created on the first ban or sync.
    """
    from ..config import EnforceConfig
    from ..errors import SipguardError

    if cfg is None:
        cfg = EnforceConfig()
    elif isinstance(cfg, str):
        cfg = EnforceConfig(backend=cfg)  # type: ignore[arg-type]
    backend = cfg.backend
    if backend == "dryrun":
        from .dryrun import DryRunEnforcer

        return DryRunEnforcer()
    if backend == "auto":
        backend = detect_backend()
    if backend == "ipset":
        from .ipset import IpsetEnforcer

        return IpsetEnforcer(cfg)
    if backend == "nftables":
        from .nftables import NftablesEnforcer

        return NftablesEnforcer(cfg)
    raise SipguardError(f"unknown enforcer backend {backend!r}")


def remove_all(cfg: EnforceConfig | None = None) -> list[str]:
    """Uninstall every kernel backend's sets and hook, whichever is installed: the ipset backend (its
    iptables hook, then its sets), then the nftables one (its table). Absent ones are skipped; a failure is
    one line in the result, never an exception. One line per thing removed or that could not be.
    """
    from ..config import EnforceConfig
    from .ipset import IpsetEnforcer
    from .nftables import NftablesEnforcer

    cfg = cfg or EnforceConfig()
    msgs: list[str] = []
    for backend in (IpsetEnforcer(cfg), NftablesEnforcer(cfg)):
        try:
            msgs += backend.remove()
        finally:
            backend.close()
    return msgs


def detect_backend() -> str:
    """ipset when root with ip_set and some iptables; else nftables when nft exists; else an error."""
    import os
    import shutil

    from ..errors import SipguardError

    if os.geteuid() == 0:
        from .ipsetnl import ipset_available

        has_iptables = bool(shutil.which("iptables-restore") or shutil.which("iptables-nft-restore")
                            or shutil.which("iptables-legacy"))
        if has_iptables and ipset_available():
            return "ipset"
    if shutil.which("nft"):
        return "nftables"
    raise SipguardError("no kernel enforcer available (needs root with ip_set and iptables, or nft); "
                        "set [enforce] backend = \"dryrun\" to decide and record without enforcing")


__all__ = ["IPSET_MAX_TIMEOUT", "SYNC_TOLERANCE", "EnforcedEntry", "Enforcer", "SyncReport", "detect_backend",
           "kernel_timeout", "make_enforcer", "needs_rearm", "remove_all"]
