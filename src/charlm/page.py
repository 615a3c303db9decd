"""The inspect page (charlm.inspect): one HTML file with its style, script and data inline.

The data travel as JSON, the cell states as one signed byte per unit and symbol (each unit scaled by its
largest magnitude), so the file grows linearly with the text; the script draws the symbols. A Content
Security Policy forbids every request, so the page works offline and cannot call out.
"""

from __future__ import annotations

import base64
import html
import json
from string import Template

import numpy as np

from charlm.metrics import POSITION_COLUMNS, position_cells

MAX_BITS = 8.0  # the shading's darkest: surprisal at or beyond 8 bits


def cells_payload(cells: np.ndarray | None) -> tuple[str, list[float]]:
    """(predicted symbols, units) floats -> base64 of int8, unit-major, and each unit's scale."""
    if cells is None:
        return "", []
    scale = np.maximum(np.abs(cells).max(0), 1e-12)
    q = np.round(cells / scale * 127).astype(np.int8).T.copy()
    return base64.b64encode(q.tobytes()).decode("ascii"), [round(float(s), 4) for s in scale]


def table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(model, reading, tracked: list[dict], title: str) -> str:
    """The page for a Reading of `model` (charlm.api.Model), with the tracked units of charlm.inspect."""
    kind, vocab = model.kind, model.vocab.symbols
    cells, scales = cells_payload(reading.cells)
    index = model.vocab.index
    data = {
        "names": vocab, "shown": [kind.show(s) for s in vocab], "ids": [index[s] for s in reading.symbols],
        "bits": [round(float(b), 4) for b in reading.bits], "guesses": reading.guesses.ravel().tolist(),
        "probs": [round(float(p), 4) for p in reading.probs.ravel()], "rank": reading.rank.tolist(),
        "top": reading.guesses.shape[1], "maxBits": MAX_BITS, "cells": cells, "scales": scales,
        "units": 0 if reading.cells is None else reading.cells.shape[1], "tracked": tracked,
    }
    positions = table(list(POSITION_COLUMNS), position_cells(reading.positions))
    if reading.cells is None:
        units = f"<p>{html.escape(type(model.net).__name__)} exposes no per-step states (no <code>cell_states</code>): no cell strips.</p>"
    else:
        units = table(["strip", "unit", "tracks", "r"], [[str(i + 1), str(t["unit"]), t["property"], f"{t['r']:+.2f}"]
                                                         for i, t in enumerate(tracked)])
    figure = kind.figures(reading.mean_bits * np.log(2))[kind.headline]
    summary = (f"{len(reading.symbols) - 1:,} {kind.unit} predicted by {type(model.net).__name__}: "
               f"mean {reading.mean_bits:.4f} bits per {kind.unit[:-1]} ({kind.headline} {figure:.4f})")
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")  # no `</script>` inside the data
    return PAGE.substitute(title=html.escape(title), summary=html.escape(summary), positions=positions, units=units,
                           data=payload, max_bits=f"{MAX_BITS:g}")


PAGE = Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
body { font: 15px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 70em; padding: 0 1em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
#text { font: 15px/1 ui-monospace, monospace; margin: 1em 0; }
.s { display: inline-block; vertical-align: top; outline: none; cursor: default; }
.s:focus .c, .s:hover .c { box-shadow: 0 0 0 2px #222; }
.c { display: block; white-space: pre; padding: 2px 0; min-width: .6em; text-align: center; }
.u { display: block; height: 5px; }
.eol { color: #888; }
#tip { position: fixed; display: none; background: #fff; border: 1px solid #888; padding: .4em .6em; font-size: 13px;
       box-shadow: 0 2px 6px rgba(0,0,0,.2); pointer-events: none; z-index: 1; }
#tip table { margin-top: .3em; } #tip .true { font-weight: bold; }
table { border-collapse: collapse; } td, th { padding: .15em .7em; text-align: right; border-bottom: 1px solid #ddd; }
td:first-child, th:first-child { text-align: left; }
.legend { display: inline-block; width: 12em; height: .8em; vertical-align: middle; margin: 0 .4em;
          background: linear-gradient(to right, hsl(8 85% 100%), hsl(8 85% 50%)); border: 1px solid #ccc; }
.cold { background: linear-gradient(to right, rgb(178,24,43), #fff, rgb(33,102,172)); }
</style></head><body>
<h1>$title</h1>
<p id="summary">$summary</p>
<p>Surprisal: 0 <span class="legend"></span> $max_bits+ bits. Hover or focus a symbol (Tab, then the arrow keys) for
the model's guesses. <span id="strips-help"></span></p>
<p id="pick" hidden><label>Unit for the last strip: <input id="unit" type="number" min="0" value="0"></label>
  <span id="unit-label"></span> &nbsp; activation: &minus; <span class="legend cold"></span> +</p>
<div id="text" role="document" aria-label="the text, shaded by surprisal"></div>
<div id="tip" role="tooltip"></div>
<h2>Where the bits go</h2>
$positions
<h2>Cells that track the text</h2>
$units
<script id="data" type="application/json">$data</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const N = D.ids.length, P = N - 1, text = document.getElementById("text"), tip = document.getElementById("tip");
const cells = D.cells ? Int8Array.from(atob(D.cells), ch => ch.charCodeAt(0)) : null;
const strips = cells ? D.tracked.map(t => t.unit).concat([D.tracked.length ? D.tracked[0].unit : 0]) : [];
const shade = b => "hsl(8 85% " + (100 - 50 * Math.min(b / D.maxBits, 1)).toFixed(1) + "%)";
const warmth = v => v >= 0 ? "rgba(33,102,172," + (v / 127).toFixed(3) + ")" : "rgba(178,24,43," + (-v / 127).toFixed(3) + ")";
const spans = [];
const frag = document.createDocumentFragment();
for (let i = 0; i < N; i++) {
  const s = document.createElement("span"), c = document.createElement("span"), shown = D.shown[D.ids[i]];
  s.className = "s"; s.tabIndex = 0; s.dataset.i = i; c.className = "c";
  c.textContent = shown === "\\n" ? "\\u21b5" : shown;
  if (shown === "\\n") c.classList.add("eol");
  if (i > 0) c.style.background = shade(D.bits[i - 1]);
  s.appendChild(c);
  for (let k = 0; k < strips.length; k++) { const u = document.createElement("span"); u.className = "u"; s.appendChild(u); }
  frag.appendChild(s); spans.push(s);
  if (shown === "\\n") frag.appendChild(document.createElement("br"));
}
text.appendChild(frag);
function paint(k, unit) {
  for (let i = 0; i < N; i++) spans[i].children[1 + k].style.background = i < P ? warmth(cells[unit * P + i]) : "transparent";
}
if (cells) {
  strips.forEach((u, k) => paint(k, u));
  document.getElementById("strips-help").textContent = "Strips under the text: " + D.tracked.map((t, k) =>
    (k + 1) + ". unit " + t.unit + " (" + t.property + ")").join(", ") + (D.tracked.length ? ", " : "") +
    (strips.length) + ". the unit picked below; blue is positive, red negative.";
  const pick = document.getElementById("pick"), input = document.getElementById("unit");
  pick.hidden = false; input.max = D.units - 1; input.value = strips[strips.length - 1];
  document.getElementById("unit-label").textContent = "(" + D.units + " units, layer by layer)";
  input.addEventListener("input", () => {
    const u = Number(input.value);
    if (Number.isInteger(u) && u >= 0 && u < D.units) { strips[strips.length - 1] = u; paint(strips.length - 1, u); }
  });
}
const esc = s => s.replace(/&/g, "&amp;").replace(/</g, "&lt;");
function show(span) {
  const i = Number(span.dataset.i), name = D.names[D.ids[i]];
  let h = "<b>" + esc(JSON.stringify(name)) + "</b>";
  if (i === 0) h += ": the first symbol, given, not predicted";
  else {
    const j = i - 1;
    h += ": " + D.bits[j].toFixed(2) + " bits, rank " + D.rank[j] + "<table>";
    for (let k = 0; k < D.top; k++) {
      const g = D.guesses[j * D.top + k];
      h += "<tr" + (g === D.ids[i] ? ' class="true"' : "") + "><td>" + esc(JSON.stringify(D.names[g])) + "</td><td>" +
           (100 * D.probs[j * D.top + k]).toFixed(1) + " %</td></tr>";
    }
    h += "</table>";
  }
  if (cells && i < P) h += [...new Set(strips)].map(u => "unit " + u + ": " + (cells[u * P + i] / 127 * D.scales[u]).toFixed(2)).join(", ");
  tip.innerHTML = h; tip.style.display = "block";
  const r = span.getBoundingClientRect();
  tip.style.left = Math.min(r.left, window.innerWidth - tip.offsetWidth - 8) + "px";
  tip.style.top = (r.bottom + tip.offsetHeight + 8 < window.innerHeight ? r.bottom + 4 : r.top - tip.offsetHeight - 4) + "px";
}
const target = e => e.target.closest ? e.target.closest(".s") : null;
text.addEventListener("mouseover", e => { const s = target(e); if (s) show(s); });
text.addEventListener("focusin", e => { const s = target(e); if (s) show(s); });
text.addEventListener("mouseleave", () => { tip.style.display = "none"; });
text.addEventListener("focusout", () => { tip.style.display = "none"; });
text.addEventListener("keydown", e => {
  const s = target(e), step = {ArrowRight: 1, ArrowLeft: -1}[e.key];
  if (s && step) { const next = spans[Number(s.dataset.i) + step]; if (next) { next.focus(); e.preventDefault(); } }
});
</script></body></html>
""")
