"""The verb table: every `sipguard` verb, the module of sipguard/cli/ that registers it, and the line
`sipguard --help` shows for it. Data only: it imports nothing.

sipguard/cli/app.py's root group reads it so that a command imports only the module of the verb it
runs (`sipguard list` never imports `why`'s pydantic models or `run`'s wiring) and `--help` lists
every verb without importing any of them. A verb's help line here is the first paragraph of its
command's docstring (of its Typer's `help` for a group); tests/test_cli_verbs.py checks that the two
agree and that every verb a module registers is in the table.
"""

from __future__ import annotations

from typing import NamedTuple, Optional


class Verb(NamedTuple):
    module: str
    """the module of sipguard.cli whose import registers the verb on `app`"""
    help: str
    """the first paragraph of the verb's help, line breaks included, as `sipguard --help` lists it"""
    group: Optional[str] = None
    """for a group of verbs (`firewall ...`): the name of the module's typer.Typer holding them"""


VERBS: dict[str, Verb] = {
    "run": Verb("run", "Run the daemon in the foreground (systemd runs this)."),
    "status": Verb("run", "What the daemon is doing: heartbeat, counters, bans."),
    "check-config": Verb("run", "Validate the config and every filter; print a summary."),
    "scan": Verb("logs", "Offline: apply filters and policy to whole files in their own time; print the bans."),
    "test-filter": Verb("logs", "Like fail2ban-regex: per filter, lines matched and missed, samples, ignored lines, "
                                "time."),
    "list": Verb("bans", "Bans in force (with --kernel: beside the kernel's own entries and their timeouts)."),
    "ban": Verb("bans", "Ban an address or network by hand (or every one in a file, in one batch), or one user "
                        "at one\naddress (--user)."),
    "unban": Verb("bans", "Lift a ban (or all of them)."),
    "import": Verb("ops", "Ban a blocklist's entries (reason blocklist:NAME); entries gone from the list are "
                          "unbanned."),
    "report": Verb("ops", "Write a self-contained HTML report: attacks over time per filter, top sources and "
                          "networks, bans."),
    "doctor": Verb("doctor", "Check this host end to end: logs, log contract, rate limits, kernel hook and sets, "
                             "state, fleet."),
    "why": Verb("why", "Why an address is banned (or not): store and kernel, jail, score arithmetic, evidence, "
                       "history."),
    "firewall": Verb("firewall", "The baseline firewall (default-DROP INPUT, SIP/RTP/SSH services, ICMP limits, "
                                 "PSD): apply, show, remove, confirm.", group="firewall_app"),
}
