"""The baseline firewall: rules/baseline-v4.rules and -v6.rules, rendered from [firewall], applied atomically.

One module per idea, each importing only its siblings below it:
- `tools`: running iptables (errors, iptables-save text, TARPIT, scratch namespaces); which binaries comes
  from sipguard/netfilter.py, shared with the enforcer's hook;
- `hostenv`: the machine (default route interface, interface addresses) → `Env`;
- `templates`: `render`, the templates filled from [firewall] and `Env` (pure);
- `tables`: the iptables-save model (`Table`, `parse_save`, `strip_sipguard`, `canonical`, `restore_table`);
- `state`: STATE/firewall/ (lock, atomic writes, the pending confirmation);
- `guard`: the SSH guard and apply's warnings;
- `lifecycle`: plan, apply, confirm, revert_if_unconfirmed, show, remove, dry_run.

Comparisons are made on iptables' own spelling of the rules: the rendered text is loaded into a scratch
network namespace (`unshare --net`) and read back with iptables-save, so "in sync" means what the
kernel holds is what the config asks for. Nothing here runs iptables outside the current network
namespace except that scratch one, and nothing here deletes the enforcer's ipsets or nftables table
(`sipguard firewall remove` asks sipguard.enforce.remove_all for that).

This file only re-exports the names other modules and tests use; code looks a name up in the module that
defines it, so that is where a test patches it (e.g. `hostenv.interface_addresses`, `lifecycle.render`).
"""

from __future__ import annotations

from ..netfilter import Tools
from .guard import ssh_guard, ssh_warning
from .hostenv import Env, resolve_env
from .lifecycle import Family, apply, confirm, dry_run, plan, remove, revert_if_unconfirmed, show
from .tables import Table, parse_save, strip_sipguard
from .templates import render

__all__ = ["Env", "Family", "Table", "Tools", "apply", "confirm", "dry_run", "parse_save", "plan", "remove", "render",
           "resolve_env", "revert_if_unconfirmed", "show", "ssh_guard", "ssh_warning", "strip_sipguard"]
