"""`sipguard report`: one self-contained HTML page from the SQLite history (events + ban_log).

Attacks over time per filter, top offending sources and networks (/24 for IPv4, /64 for IPv6),
bans over time per reason, and totals. The page carries its data as JSON and draws inline SVG
with a few lines of inline JavaScript: no network access, no external file, opens anywhere.
When the charts are drawn the script sets `data-rendered="true"` on <body> (tests look for it).
Events are kept only [store] event_retention (1 day by default); ban history history_retention.

The headline figures are the sums of the charts: an event or ban dated after the report's own time
(a log clock ahead of this host) is counted in the last column and named under the chart, never
dropped. The charts span at least MIN_SPAN (a page with a minute of data still has a time axis), and
bar labels (an IPv6 address, a /64) are measured in the browser and given the room they need.

It reads the history only through the store's named report queries (it never runs SQL itself)
and changes nothing: its only output is the page.
"""

from __future__ import annotations

import html
import json
import time
from datetime import datetime, timezone
from typing import Any

from .addresses import network_of
from . import __version__
from .store import Store

_STEPS = (60, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600, 86400)
MIN_SPAN = 30 * 60  # seconds: the shortest time axis (30 one-minute columns)


def _bucket(span: float) -> int:
    """A bucket size giving at most ~120 columns over `span` seconds."""
    for step in _STEPS:
        if span / step <= 120:
            return step
    return 7 * 86400


def _reason_group(reason: str | None, manual: bool) -> str:
    reason = reason or "?"
    if reason.startswith("blocklist:"):
        return reason
    if manual:
        return "manual"
    return reason.split(":", 1)[0]


def build_report(store: Store, since: float | None = None, now: float | None = None, top: int = 20) -> dict[str, Any]:
    """Everything the page shows, as plain JSON-able data."""
    now = time.time() if now is None else now
    since = now - 7 * 86400 if since is None else since
    first = store.first_activity(since)
    start = max(since, first if first is not None else now - 3600)
    start = max(since, min(start, now - MIN_SPAN))
    step = _bucket(max(now - start, 60))
    b0 = int(start // step)
    nb = int(now // step) - b0 + 1
    late = {"events": 0, "bans": 0}  # dated after `now`: counted in the last column

    def column(b: int, kind: str, n: int) -> int:
        i = b - b0
        if i >= nb:
            late[kind] += n
            return nb - 1
        return max(i, 0)

    filters: dict[str, list[int]] = {}
    for b, flt, n in store.event_counts(step, start):
        filters.setdefault(flt, [0] * nb)[column(b, "events", n)] += n

    bans_per_ip = store.bans_per_source(start)
    sources = [{"ip": s.ip, "events": s.events, "filters": s.filters, "first": s.first, "last": s.last,
                "bans": bans_per_ip.get(s.ip, 0)} for s in store.top_sources(start, top)]

    nets: dict[str, dict[str, Any]] = {}
    for ip, n in store.events_per_source(start).items():
        key = network_of(ip)
        e = nets.setdefault(key, {"network": key, "events": 0, "sources": 0})
        e["events"] += n
        e["sources"] += 1
    networks = sorted(nets.values(), key=lambda e: (-e["events"], e["network"]))[:top]

    bans_time: dict[str, list[int]] = {}
    actions: dict[str, int] = {}
    for t, action, reason, manual in store.ban_log_since(start):
        actions[action] = actions.get(action, 0) + 1
        if action != "ban":
            continue
        bans_time.setdefault(_reason_group(reason, manual), [0] * nb)[column(int(t // step), "bans", 1)] += 1
    active: dict[str, int] = {}
    for b in store.active_bans(now):
        g = _reason_group(b.reason, b.manual)
        active[g] = active.get(g, 0) + 1

    total_events = sum(sum(v) for v in filters.values())
    return {
        "generated": now,
        "since": start,
        "step": step,
        "buckets": [(b0 + i) * step for i in range(nb)],
        "filters": dict(sorted(filters.items())),
        "sources": sources,
        "networks": networks,
        "bans_time": dict(sorted(bans_time.items())),
        "active": dict(sorted(active.items(), key=lambda kv: -kv[1])),
        "late": late,
        "totals": {"events": total_events, "sources": sum(e["sources"] for e in nets.values()),
                   "bans": sum(sum(v) for v in bans_time.values()), "unbans": actions.get("unban", 0),
                   "expired": actions.get("expire", 0), "delisted": actions.get("delist", 0),
                   "active": sum(active.values())},
        "version": __version__,
    }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def render_html(data: dict[str, Any]) -> str:
    blob = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e").replace(
        "&", "\\u0026")
    title = f"sipguard report {_iso(data['generated'])}"
    return _PAGE.replace("%%TITLE%%", html.escape(title)).replace("%%DATA%%", blob).replace(
        "%%SINCE%%", html.escape(_iso(data["since"]))).replace("%%VERSION%%", html.escape(data["version"]))


_PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%%TITLE%%</title>
<style>
 body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
 h1{font-size:22px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 8px}
 .sub{color:#666;margin-bottom:16px}
 .cards{display:flex;gap:12px;flex-wrap:wrap}
 .card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 16px;min-width:110px}
 .card b{display:block;font-size:22px}
 .panel{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px;margin-top:8px}
 .grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,520px),1fr));gap:16px}
 .panel{overflow-x:auto}
 table{border-collapse:collapse;width:100%;font-size:13px} td,th{padding:3px 6px;border-bottom:1px solid #eee;text-align:left;white-space:nowrap}
 .note{color:#8a5a00;font-size:12px;margin-top:4px}
 td.n{text-align:right;font-variant-numeric:tabular-nums}
 .legend span{display:inline-block;margin-right:12px;font-size:12px}
 .legend i{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}
 svg text{font-size:11px;fill:#555}
 .empty{color:#999;font-style:italic}
</style></head>
<body data-rendered="false">
<h1>sipguard report</h1>
<div class="sub">from %%SINCE%% &middot; sipguard %%VERSION%% &middot; <span id="gen"></span></div>
<div class="cards" id="cards"></div>
<h2>Attacks over time, per filter</h2>
<div class="panel"><div id="attacks"></div><div class="legend" id="attacks-legend"></div><div class="note" id="attacks-late"></div></div>
<h2>Bans over time, per reason</h2>
<div class="panel"><div id="bans"></div><div class="legend" id="bans-legend"></div><div class="note" id="bans-late"></div></div>
<div class="grid">
 <div><h2>Top offending sources</h2><div class="panel"><div id="top-sources-chart"></div><table id="top-sources"></table></div></div>
 <div><h2>Top offending networks (/24, /64)</h2><div class="panel"><div id="top-networks-chart"></div><table id="top-networks"></table></div></div>
</div>
<h2>Bans in force, per reason</h2>
<div class="panel"><div id="active"></div></div>
<script id="sipguard-data" type="application/json">%%DATA%%</script>
<script>
(function(){
"use strict";
var D = JSON.parse(document.getElementById("sipguard-data").textContent);
var NS = "http://www.w3.org/2000/svg";
var COLORS = ["#4e79a7","#f28e2b","#e15759","#76b7b2","#59a14f","#edc948","#b07aa1","#ff9da7","#9c755f","#bab0ac"];
function el(tag, attrs, parent, text){
  var e = tag.indexOf("svg:") === 0 ? document.createElementNS(NS, tag.slice(4)) : document.createElement(tag);
  for (var k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  if (parent) parent.appendChild(e);
  return e;
}
function fmtTime(t){ var d = new Date(t*1000); return d.toISOString().slice(D.step >= 86400 ? 5 : 11, D.step >= 86400 ? 10 : 16); }
function legend(id, names){
  var L = document.getElementById(id);
  names.forEach(function(n, i){ var s = el("span", {}, L); el("i", {style:"background:"+COLORS[i%COLORS.length]}, s); s.appendChild(document.createTextNode(n)); });
}
function stacked(id, series, legendId){
  var box = document.getElementById(id), names = Object.keys(series);
  var n = D.buckets.length, W = 1100, H = 220, L = 44, B = 22, T = 8;
  if (!names.length){ el("div", {"class":"empty"}, box, "nothing in this period"); return; }
  var tot = []; for (var i=0;i<n;i++){ var s=0; names.forEach(function(k){ s += series[k][i]; }); tot.push(s); }
  var max = Math.max.apply(null, tot.concat([1])), ticks = Math.min(4, max);
  max = Math.ceil(max / ticks) * ticks;
  var svg = el("svg:svg", {viewBox:"0 0 "+W+" "+(H+B+T), width:"100%", role:"img", "class":"chart"}, box);
  var bw = (W-L)/n;
  for (var g=0; g<=ticks; g++){ var y = T + H - H*g/ticks; el("svg:line", {x1:L, x2:W, y1:y, y2:y, stroke:"#eee"}, svg);
    el("svg:text", {x:L-4, y:y+4, "text-anchor":"end"}, svg, String(max*g/ticks)); }
  for (var i2=0;i2<n;i2++){
    var y0 = T + H;
    names.forEach(function(k, ci){
      var v = series[k][i2]; if (!v) return;
      var h = H * v / max; y0 -= h;
      var r = el("svg:rect", {x:L+i2*bw+0.5, y:y0, width:Math.max(bw-1,1), height:h, fill:COLORS[ci%COLORS.length], "class":"bar"}, svg);
      el("svg:title", {}, r, k+": "+v+" at "+fmtTime(D.buckets[i2]));
    });
  }
  var every = Math.max(1, Math.ceil(n/10));
  for (var i3=0;i3<n;i3+=every) el("svg:text", {x:L+i3*bw, y:T+H+15, "text-anchor": i3+every>=n && i3>0 ? "end" : "start"}, svg, fmtTime(D.buckets[i3]));
  legend(legendId, names);
}
function hbars(id, rows, label, value){
  var box = document.getElementById(id);
  if (!rows.length){ el("div", {"class":"empty"}, box, "none"); return; }
  var rh = 18, H = rows.length*rh + 4, BARS = 330;
  var max = Math.max.apply(null, rows.map(value).concat([1]));
  var svg = el("svg:svg", {viewBox:"0 0 520 "+H, width:"100%", role:"img", "class":"chart"}, box);
  // labels first, measured as the browser draws them: the bars start where the widest one ends
  var widest = 0;
  var texts = rows.map(function(r, i){
    var t = el("svg:text", {x:0, y:i*rh + 14, "text-anchor":"end", "class":"label"}, svg, label(r));
    var len = t.getComputedTextLength ? t.getComputedTextLength() : 0;
    widest = Math.max(widest, len || String(label(r)).length * 7);
    return t;
  });
  var L = Math.ceil(widest) + 10, W = L + BARS + 60;
  svg.setAttribute("viewBox", "0 0 "+W+" "+H);
  svg.setAttribute("width", String(W));  // its own size, shrunk to fit a narrow panel, never blown up
  svg.setAttribute("style", "max-width:100%;height:auto");
  svg.setAttribute("data-label-width", String(Math.ceil(widest)));
  texts.forEach(function(t){ t.setAttribute("x", String(L-6)); });
  rows.forEach(function(r, i){
    var y = i*rh + 2, w = BARS * value(r) / max;
    el("svg:rect", {x:L, y:y+2, width:Math.max(w,1), height:rh-5, fill:COLORS[0], "class":"bar"}, svg);
    el("svg:text", {x:L+w+4, y:y+12}, svg, String(value(r)));
  });
}
function table(id, head, rows){
  var t = document.getElementById(id), tr = el("tr", {}, t);
  head.forEach(function(h){ el("th", {}, tr, h); });
  rows.forEach(function(r){ var tr2 = el("tr", {}, t); r.forEach(function(c){ el("td", typeof c === "number" ? {"class":"n"} : {}, tr2, String(c)); }); });
}
document.getElementById("gen").textContent = "generated " + new Date(D.generated*1000).toISOString().replace("T"," ").slice(0,16) + " UTC, " + (D.step/60) + "-minute buckets";
var C = document.getElementById("cards");
[["events", D.totals.events], ["sources", D.totals.sources], ["bans", D.totals.bans], ["in force", D.totals.active],
 ["unbanned", D.totals.unbans], ["expired", D.totals.expired], ["delisted", D.totals.delisted]].forEach(function(c){
  var d = el("div", {"class":"card"}, C); el("b", {}, d, String(c[1])); d.appendChild(document.createTextNode(c[0])); });
stacked("attacks", D.filters, "attacks-legend");
stacked("bans", D.bans_time, "bans-legend");
if (D.late.events) document.getElementById("attacks-late").textContent = D.late.events + " events are dated after this report was made (is the log's clock ahead of this host?): they are counted in the last column.";
if (D.late.bans) document.getElementById("bans-late").textContent = D.late.bans + " bans are dated after this report was made: they are counted in the last column.";
hbars("top-sources-chart", D.sources.slice(0, 10), function(r){ return r.ip; }, function(r){ return r.events; });
table("top-sources", ["source", "events", "bans", "filters"], D.sources.map(function(s){ return [s.ip, s.events, s.bans, s.filters.join(", ")]; }));
hbars("top-networks-chart", D.networks.slice(0, 10), function(r){ return r.network; }, function(r){ return r.events; });
table("top-networks", ["network", "events", "sources"], D.networks.map(function(n){ return [n.network, n.events, n.sources]; }));
var act = Object.keys(D.active).map(function(k){ return {k:k, v:D.active[k]}; });
hbars("active", act, function(r){ return r.k; }, function(r){ return r.v; });
document.body.setAttribute("data-rendered", "true");
})();
</script>
</body></html>
"""
