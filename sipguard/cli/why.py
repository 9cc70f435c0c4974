"""`sipguard why ADDRESS [--json]`: the answer to "why is this address banned?" (or why not).

It reads, it never changes anything: the store (the ban, its evidence, its history, the events in
each jail's window, the fleet's origin), the config (jails, thresholds, escalation, the allow-list)
and the kernel (the configured enforcer's `contains`: asked, not assumed). `explain` builds the
answer as a `WhyReport` (pydantic), whose `--json` form is documented in the README from the same
model (`schema_doc`); the text form is printed with every value from a log or from another node
escaped (`clean`: control characters as \\xNN) and never as rich markup, and nothing in it is cut.
(`clean` is this module's own stand-in for `sipguard.text.printable`, the same rule: C0, DEL and C1 as
\\xNN, any other character Python does not call printable as \\uNNNN.)

Evidence lines are attacker text (User-Agents, From users): shown literally, never interpreted.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Annotated, Optional, Union, get_args, get_origin

import typer
from pydantic import BaseModel, ConfigDict, Field

from ..addresses import AllowList, networks_holding, parse_target
from ..config import Config, JailConfig, format_duration
from ..errors import SipguardError
from ..model import Ban, Event, EventKind, Evidence, evidence_of
from ..policy import Policy
from ..text import printable
from .app import _iso, app, ctx

if TYPE_CHECKING:
    from ..enforce.base import Enforcer
    from ..store import HistoryEntry, Store


def clean(text: object) -> str:
    """`text` as it may reach a terminal: sipguard.text's escaping rule (visible escapes, never cut)."""
    return printable("" if text is None else str(text))


SHOWN_EVENTS = 20
"""Events listed per jail in the text form (the newest; --json lists every one)."""


# -- the answer, as data (the --json schema) --------------------------------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WhyEvent(_Model):
    time: Optional[str] = Field(description="when it happened (ISO 8601 UTC, the log's time)")
    filter: str = Field(description="the filter that matched")
    kind: str = Field(description="the event kind (flood, scanner, auth_failure, ...)")
    weight: float = Field(description="what it adds to the score")


class WhyEvidence(_Model):
    time: Optional[str] = Field(description="when the record was logged")
    filter: str = Field(description="the filter that matched it")
    weight: float = Field(description="what it added to the score")
    text: str = Field(description="the record's text as Kamailio printed it (attacker text; at most 512 characters)")
    cut: bool = Field(description="true when the record was longer and `text` ends with an ellipsis")


class WhyArithmetic(_Model):
    jail: str = Field(description="the jail that banned")
    findtime: float = Field(description="the jail's window, seconds")
    threshold: float = Field(description="the score that bans")
    events: list[WhyEvent] = Field(description="the stored events of the jail's kinds inside the window "
                                               "that ended with the ban")
    sum: float = Field(description="their weights added up")
    score: float = Field(description="the score the ban recorded when it was decided")


class WhyEscalation(_Model):
    offence: int = Field(description="this ban's offence number (1 = first within offence_memory)")
    earlier: list[Optional[str]] = Field(description="times of the earlier automatic bans that made it a repeat")
    bantime: float = Field(description="[policy] bantime, seconds")
    factor: float = Field(description="[policy] bantime_factor")
    max_bantime: Optional[float] = Field(description="[policy] max_bantime, seconds (null: no cap)")
    jail_bantime: bool = Field(description="true when the jail fixes its own ban time (no escalation)")
    duration: Optional[float] = Field(description="the ban time this gives, seconds (null: permanent)")
    formula: str = Field(description="the arithmetic in words, e.g. '1h x 2^2 = 4h (cap 7d)'")


class WhyFleet(_Model):
    origin: Optional[str] = Field(description="the fleet node that decided the ban")
    this_node: bool = Field(description="true when that node is this one")
    id: str = Field(description="the ban's fleet id")
    reason: Optional[str] = Field(description="the reason that node published")
    score: float = Field(description="the score that node published")
    own_evidence: list[WhyEvidence] = Field(description="a ban another node decided: this node's own records of "
                                                        "its jail in the window that ended with it, oldest first "
                                                        "(the record texts kept with recent events; [policy] "
                                                        "evidence_lines at most; empty when this node decided it)")


class WhyBan(_Model):
    reason: Optional[str] = Field(description="the ban's reason: JAIL:FILTER, manual, blocklist:NAME, adopted, ...")
    jail: Optional[str] = Field(description="the jail of an automatic ban (null otherwise)")
    filter: Optional[str] = Field(description="the filter whose event completed it (null otherwise)")
    manual: bool = Field(description="made by the operator (sipguard ban) or a blocklist")
    created: Optional[str] = Field(description="since when (ISO 8601 UTC)")
    expires: Optional[str] = Field(description="until when (null: permanent)")
    remaining: Optional[float] = Field(description="seconds left (null: permanent)")
    score: float = Field(description="the score recorded with the ban")
    offence: int = Field(description="its offence number")
    refused: Optional[str] = Field(description="why the enforcer cannot hold it (null: enforced)")
    evidence: list[WhyEvidence] = Field(description="the records that decided it, oldest first ([policy] "
                                                    "evidence_lines of them at most)")
    arithmetic: Optional[WhyArithmetic] = Field(description="the score arithmetic (automatic bans)")
    escalation: Optional[WhyEscalation] = Field(description="how its ban time came about (automatic bans)")
    fleet: Optional[WhyFleet] = Field(description="the fleet ban this node holds for it (null: not shared)")


class WhyKernel(_Model):
    backend: str = Field(description="the configured enforcer")
    checked: bool = Field(description="true when the kernel was asked")
    held: Optional[bool] = Field(description="whether the kernel's set holds the address (null: not checked)")
    error: Optional[str] = Field(description="why it could not be checked")
    covering: dict[str, Optional[bool]] = Field(description="CIDR bans covering the address -> whether the "
                                                            "kernel holds each")


class WhyPast(_Model):
    time: Optional[str] = Field(description="when")
    action: str = Field(description="ban, unban, expire or delist; userban, userunban or userexpire for a user "
                                    "ban (the office policy; its reason then ends with user=USER)")
    reason: Optional[str] = Field(description="the ban's reason")
    score: float = Field(description="its score")
    offence: int = Field(description="its offence number")
    manual: bool = Field(description="made by hand or a blocklist")
    expires: Optional[str] = Field(description="the end it had (null: permanent)")
    evidence: list[WhyEvidence] = Field(description="the records kept with that ban (ban rows only)")


class WhyJail(_Model):
    name: str = Field(description="the jail")
    kinds: list[str] = Field(description="the event kinds it scores")
    findtime: float = Field(description="its window, seconds")
    threshold: float = Field(description="the score that bans")
    score: float = Field(description="the score of the stored events in the window ending now (as the policy "
                                     "adds them: a success clears reset_on_success jails)")
    distance: float = Field(description="how much more score bans (0: at or over the threshold)")
    events: list[WhyEvent] = Field(description="the stored events of its kinds in the window ending now")


class WhyUserBan(_Model):
    user: str = Field(description="the user (attacker text: the From user as Kamailio printed it, at most 64 "
                                  "characters)")
    reason: Optional[str] = Field(description="office_user:FILTER")
    created: Optional[str] = Field(description="since when (ISO 8601 UTC)")
    expires: Optional[str] = Field(description="until when (null: permanent)")
    score: float = Field(description="that user's failures counted there")
    evidence: list[WhyEvidence] = Field(description="the records that decided it, oldest first")


class WhyReport(_Model):
    ip: str = Field(description="the address or CIDR asked about, canonical")
    now: Optional[str] = Field(description="when this answer was made")
    banned: bool = Field(description="a ban is in force in the store")
    ban: Optional[WhyBan] = Field(description="that ban (null when not banned)")
    covered_by: list[str] = Field(description="CIDR bans in force that cover the address")
    kernel: WhyKernel = Field(description="what the kernel holds, asked now")
    allowlisted: bool = Field(description="an allow-list entry covers it (never banned automatically)")
    allowlist: list[str] = Field(description="the allow-list entries that cover it")
    history: list[WhyPast] = Field(description="its ban history, oldest first ([store] history_retention)")
    jails: list[WhyJail] = Field(description="every jail's window ending now")
    would_ban: bool = Field(description="whether the events in the windows now would ban it (were it not banned)")
    next_duration: Optional[float] = Field(description="the ban time a new automatic ban would get (the next "
                                                       "offence, or the jail's own bantime), seconds (null: "
                                                       "permanent)")
    user_bans: list[WhyUserBan] = Field(description="user bans in force at the address (the office policy: one "
                                                    "user refused by Kamailio's userban htable, never the kernel)")


# -- building it -------------------------------------------------------------------------------------
def _event(e: Event) -> WhyEvent:
    return WhyEvent(time=_iso(e.time), filter=e.filter, kind=e.kind.value, weight=e.weight)


def _evidence(items: Iterable[Evidence]) -> list[WhyEvidence]:
    return [WhyEvidence(time=_iso(e.time), filter=e.filter, weight=e.weight, text=e.text, cut=e.cut) for e in items]


def _finite(v: float) -> float:
    return v if v == v and v not in (float("inf"), float("-inf")) else 0.0


def _jail_events(events: list[Event], jail: JailConfig, since: float, until: float) -> list[Event]:
    """The events a jail counts in [since, until]: its kinds, after the last success when it resets on one."""
    out: list[Event] = []
    kinds = set(jail.kinds)
    for e in events:
        if not since <= e.time <= until:
            continue
        if e.kind is EventKind.SUCCESS and jail.reset_on_success:
            out.clear()
        elif e.kind in kinds:
            out.append(e)
    return out


def _escalation(cfg: Config, policy: Policy, ban: Ban, jail: JailConfig | None,
                history: list[HistoryEntry]) -> WhyEscalation:
    pc = cfg.policy
    earlier = [h.time for h in history if h.action == "ban" and not h.manual
               and ban.created - pc.offence_memory <= h.time < ban.created - 1e-6]
    own = jail is not None and "bantime" in jail.model_fields_set
    if own:
        duration = jail.bantime  # type: ignore[union-attr]
        formula = f"the jail's own bantime {format_duration(duration)} (no escalation)"
    else:
        duration = policy.ban_duration(ban.offence)
        cap = "no cap" if pc.max_bantime is None else f"cap {format_duration(pc.max_bantime)}"
        formula = (f"{format_duration(pc.bantime)} x {pc.bantime_factor:g}^{ban.offence - 1} = "
                   f"{format_duration(duration)} ({cap})")
    return WhyEscalation(offence=ban.offence, earlier=[_iso(t) for t in earlier], bantime=pc.bantime,
                         factor=pc.bantime_factor, max_bantime=pc.max_bantime, jail_bantime=own,
                         duration=duration, formula=formula)


def _kernel(enforcer: Enforcer | None, backend: str, ip: str, covering: list[str], error: str | None) -> WhyKernel:
    if enforcer is None:
        return WhyKernel(backend=backend, checked=False, held=None, covering={c: None for c in covering},
                         error=error or "the dryrun backend holds nothing outside the daemon's memory")
    try:
        held = enforcer.contains(ip)
        cover: dict[str, Optional[bool]] = {c: enforcer.contains(c) for c in covering}
    except Exception as exc:  # noqa: BLE001 - no permission, no kernel support: say so, never guess
        return WhyKernel(backend=backend, checked=False, held=None, covering={c: None for c in covering},
                         error=str(exc) or type(exc).__name__)
    return WhyKernel(backend=backend, checked=True, held=held, covering=cover, error=None)


def explain(store: Store, cfg: Config, allow: AllowList, ip: str, now: float,
            enforcer: Enforcer | None, kernel_error: str | None = None) -> WhyReport:
    """Everything `why` says about `ip` (canonical), from the store, the config and the kernel
    (`enforcer`'s `contains`; None: not asked, because of `kernel_error` or a dryrun backend)."""
    pc = cfg.policy
    jails = dict(pc.jails)
    policy = Policy(pc, allow, store.offence_history(now - pc.offence_memory))
    horizon = max((j.findtime for j in jails.values()), default=0.0)

    ban = store.get_ban(ip)
    if ban is not None and ban.expires is not None and not ban.expires > now:
        ban = None  # over (the daemon tidies it up)
    history = store.ban_history(ip)
    evidence = store.evidence_of(ip)
    covering: list[str] = []
    if "/" not in ip:
        nets = [b for b in store.network_bans() if b.expires is None or b.expires > now]
        covering = networks_holding(ip, [b.ip for b in nets])

    why_ban: WhyBan | None = None
    if ban is not None:
        jail_name, _, filt = (ban.reason or "").partition(":")
        jail = jails.get(jail_name) if filt and not ban.manual else None
        kept = evidence.get(ban.created, [])
        arithmetic = escalation = None
        counted: list[Event] = []
        if jail is not None:
            anchor = kept[-1].time if kept else ban.created
            counted = _jail_events(store.events_of(ip, anchor - jail.findtime), jail, anchor - jail.findtime,
                                   anchor)
            arithmetic = WhyArithmetic(jail=jail_name, findtime=jail.findtime, threshold=jail.threshold,
                                       events=[_event(e) for e in counted], sum=sum(e.weight for e in counted),
                                       score=_finite(ban.score))
            escalation = _escalation(cfg, policy, ban, jail, history)
        origin = store.fleet_origin(ip)
        fleet = None
        if origin is not None:
            me = cfg.cluster.node_name if cfg.cluster is not None else None
            own: list[Evidence] = []
            if origin.origin != me and jail is not None and pc.evidence_lines:  # the records stay with that node
                own = [evidence_of(e) for e in counted if e.text][-pc.evidence_lines:]
            fleet = WhyFleet(origin=origin.origin, this_node=origin.origin == me, id=origin.id, reason=ban.reason,
                             score=_finite(ban.score), own_evidence=_evidence(own))
        why_ban = WhyBan(reason=ban.reason, jail=jail_name if jail is not None else None,
                         filter=filt if jail is not None else None, manual=ban.manual, created=_iso(ban.created),
                         expires=_iso(ban.expires), remaining=ban.remaining(now), score=_finite(ban.score),
                         offence=ban.offence, refused=ban.refused, evidence=_evidence(kept),
                         arithmetic=arithmetic, escalation=escalation, fleet=fleet)

    past = []
    for h in history:
        if ban is not None and h.action == "ban" and abs(h.time - ban.created) < 1e-6:
            kept = evidence.get(ban.created, [])
        elif h.action == "ban":  # the evidence group stored for this ban (its created is at or before the row)
            near = [c for c in evidence if c <= h.time + 1e-6 and h.time - c < 3600]
            kept = evidence.get(max(near), []) if near else []
        else:
            kept = []
        past.append(WhyPast(time=_iso(h.time), action=h.action, reason=h.reason, score=_finite(h.score),
                            offence=h.offence, manual=h.manual, expires=_iso(h.expires), evidence=_evidence(kept)))

    recent = store.events_of(ip, now - horizon)
    policy.restore(recent)
    scores = policy.score(ip, now)
    why_jails = []
    for name, j in jails.items():
        counted = _jail_events(recent, j, now - j.findtime, now)
        score = scores.get(name, 0.0)
        why_jails.append(WhyJail(name=name, kinds=[k.value for k in j.kinds], findtime=j.findtime,
                                 threshold=j.threshold, score=score, distance=max(0.0, j.threshold - score),
                                 events=[_event(e) for e in counted]))
    allowed = ip in allow
    would = not allowed and any(j.score >= j.threshold for j in why_jails)
    offences = len([t for t in policy.offences.get(ip, ()) if t >= now - pc.offence_memory])
    over = [jails[j.name] for j in why_jails if j.score >= j.threshold]
    if over and "bantime" in over[0].model_fields_set:  # the first jail to ban fixes its own ban time
        next_duration = over[0].bantime
    else:
        next_duration = policy.ban_duration(offences + 1)
    backend = cfg.enforce.backend
    user_bans = [WhyUserBan(user=b.user or "", reason=b.reason, created=_iso(b.created), expires=_iso(b.expires),
                            score=_finite(b.score), evidence=_evidence(store.evidence_of(b.key).get(b.created, [])))
                 for b in store.user_bans_of(ip) if b.expires is None or b.expires > now]
    return WhyReport(ip=ip, now=_iso(now), banned=ban is not None, ban=why_ban, covered_by=covering,
                     user_bans=user_bans,
                     kernel=_kernel(enforcer, backend, ip, covering, kernel_error), allowlisted=allowed,
                     allowlist=[] if "/" in ip else networks_holding(ip, [str(n) for n in allow.networks]),
                     history=past, jails=why_jails, would_ban=would,
                     next_duration=next_duration)


# -- the --json schema, documented from the model -----------------------------------------------------
def _type_name(annotation: object) -> tuple[str, type[BaseModel] | None]:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Union:
        inner = [a for a in args if a is not type(None)]
        name, model = _type_name(inner[0])
        return f"{name} or null", model
    if origin is list:
        name, model = _type_name(args[0])
        return f"array of {f'({name})' if ' or ' in name else name}", model
    if origin is dict:
        name, model = _type_name(args[1])
        return f"object of {f'({name})' if ' or ' in name else name}", model
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "object", annotation
    names: dict[object, str] = {str: "string", float: "number", int: "integer", bool: "boolean"}
    return names.get(annotation, str(annotation)), None


def schema_doc(model: type[BaseModel] = WhyReport, indent: str = "") -> list[str]:
    """The README's `why --json` schema: one line per key, nested objects indented under their key."""
    lines: list[str] = []
    for key, f in model.model_fields.items():
        name, inner = _type_name(f.annotation)
        lines.append(f"{indent}- `{key}` ({name}): {f.description}")
        if inner is not None:
            lines += schema_doc(inner, indent + "  ")
    return lines


# -- the text form ---------------------------------------------------------------------------------
def _seconds(v: float | None) -> str:
    return format_duration(v)


def render(r: WhyReport, write: Callable[[str], object]) -> None:
    """The one-screen answer, every value from outside escaped, nothing cut."""
    def line(text: str = "") -> None:
        write(text + "\n")

    k = r.kernel
    if k.checked:
        kernel = f"kernel ({clean(k.backend)}): {'holds it' if k.held else 'does NOT hold it'}"
    else:
        kernel = f"kernel ({clean(k.backend)}): not checked: {clean(k.error)}"
    b = r.ban
    if b is not None:
        line(f"{r.ip}: BANNED (store: yes; {kernel})")
        left = "permanent" if b.remaining is None else f"{_seconds(b.remaining)} left"
        line(f"  reason {clean(b.reason)} ({'manual' if b.manual else 'automatic'}), offence {b.offence}, "
             f"score {b.score:g}")
        line(f"  since {b.created}, until {b.expires or 'never'} ({left})")
        if b.refused:
            line(f"  refused by the enforcer: {clean(b.refused)}")
        if b.fleet is not None:
            f = b.fleet
            who = "this node" if f.this_node else f"node {clean(f.origin)}"
            line(f"  fleet: decided by {who} (fleet id {clean(f.id)}); published reason {clean(f.reason)}, "
                 f"score {f.score:g}")
        a = b.arithmetic
        if a is not None:
            line(f"  score: jail {clean(a.jail)}, {len(a.events)} events in the {_seconds(a.findtime)} window that "
                 f"ended with the ban, threshold {a.threshold:g}:")
            for e in a.events:
                line(f"    {e.time}  {clean(e.filter)}  +{e.weight:g}")
            line(f"    = {a.sum:g} {'>=' if a.sum >= a.threshold else '<'} {a.threshold:g} "
                 f"(score recorded with the ban: {a.score:g})")
            if b.fleet is not None and a.sum < a.score:
                line("    (the fleet's score: the other nodes' events make up the rest)")
        if b.evidence:
            line(f"  evidence ({len(b.evidence)} records that counted, oldest first):")
            for ev in b.evidence:
                line(f"    {ev.time}  {clean(ev.filter)}  {clean(ev.text)}" + ("  [cut]" if ev.cut else ""))
        elif b.fleet is not None and not b.fleet.this_node:
            own = b.fleet.own_evidence
            line(f"  evidence: node {clean(b.fleet.origin)} keeps the records that decided it; this node's own "
                 + (f"({len(own)}, oldest first):" if own else "records of it: none"))
            for ev in own:
                line(f"    {ev.time}  {clean(ev.filter)}  {clean(ev.text)}" + ("  [cut]" if ev.cut else ""))
        elif not b.manual:
            line("  evidence: none kept (made before evidence was kept, or from records read before a restart "
                 "that were no longer kept with their events)")
        e = b.escalation
        if e is not None:
            earlier = f"after {len(e.earlier)} earlier automatic bans ({', '.join(t or '?' for t in e.earlier)})" \
                if e.earlier else "a first offence"
            line(f"  ban time: offence {e.offence}, {earlier}: {clean(e.formula)}")
    else:
        line(f"{r.ip}: not banned (store: no; {kernel})")
    for u in r.user_bans:
        line(f"  user ban: user {clean(u.user)} at this address only ({clean(u.reason)}, Kamailio's htable, "
             f"not the kernel), since {u.created}, until {u.expires or 'never'}")
        for ev in u.evidence:
            line(f"    {ev.time}  {clean(ev.filter)}  {clean(ev.text)}" + ("  [cut]" if ev.cut else ""))
    for c in r.covered_by:
        held = k.covering.get(c)
        line(f"  covered by the CIDR ban {c}" + ("" if held is None else f" (kernel: {'holds it' if held else 'NOT held'})"))
    line("  allow-list: " + (f"covered by {', '.join(r.allowlist)} (never banned automatically)"
                             if r.allowlisted and r.allowlist else
                             "covered (never banned automatically)" if r.allowlisted else "not covered"))
    earlier = [p for p in r.history]
    if earlier:
        line(f"  history ({len(earlier)} changes, oldest first):")
        for p in earlier:
            end = "" if p.action != "ban" else f", until {p.expires or 'never'}"
            line(f"    {p.time}  {p.action}  {clean(p.reason)}  offence {p.offence}"
                 f"{', manual' if p.manual else ''}{end}")
            if b is None or p.time != b.created:
                for ev in p.evidence:
                    line(f"      {ev.time}  {clean(ev.filter)}  {clean(ev.text)}" + ("  [cut]" if ev.cut else ""))
    line("  jails now (stored events in each window ending now):")
    for j in r.jails:
        state = "reaches the threshold" if j.distance == 0 else f"{j.distance:g} more to a ban"
        line(f"    {clean(j.name)}: score {j.score:g} of {j.threshold:g} in {_seconds(j.findtime)} "
             f"({len(j.events)} events): {state}")
        shown = j.events[-SHOWN_EVENTS:]
        if len(j.events) > len(shown):
            line(f"      ({len(j.events) - len(shown)} earlier events not listed; --json lists every one)")
        for ev in shown:
            line(f"      {ev.time}  {clean(ev.filter)}  +{ev.weight:g}")
    if r.allowlisted:
        line("  would be banned again now: no (allow-listed)")
    elif r.would_ban:
        line(f"  would be banned again now: yes, the events in the window are enough "
             f"(for {_seconds(r.next_duration)})")
    else:
        line("  would be banned again now: no, no jail's window reaches its threshold")


@app.command()
def why(
    address: Annotated[str, typer.Argument(help="IP address or CIDR")],
    as_json: Annotated[bool, typer.Option("--json", help="the answer as JSON (schema: README, `why`)")] = False,
) -> None:
    """Why an address is banned (or not): store and kernel, jail, score arithmetic, evidence, history."""
    try:
        ip = parse_target(address)
    except ValueError as exc:
        raise SipguardError(str(exc)) from None
    cfg = ctx.cfg
    store = ctx.store(readonly=True)
    enforcer = None
    if cfg.enforce.backend != "dryrun":
        from ..enforce import make_enforcer

        try:
            enforcer = make_enforcer(cfg.enforce)
        except SipguardError as exc:  # (auto: no kernel enforcer here) the rest is still worth saying
            return _emit(explain(store, cfg, ctx.allow(), ip, time.time(), None, str(exc)), as_json)
    try:
        report = explain(store, cfg, ctx.allow(), ip, time.time(), enforcer)
    finally:
        if enforcer is not None:
            enforcer.close()
    _emit(report, as_json)


def _emit(report: WhyReport, as_json: bool) -> None:
    if as_json:  # every control character and every non-ASCII one escaped: no terminal interprets any
        sys.stdout.write(json.dumps(report.model_dump(mode="json"), indent=2, ensure_ascii=True) + "\n")
    else:
        render(report, sys.stdout.write)
