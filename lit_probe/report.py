"""Report
======

:func:`write_report` turns what a probed run leaves in its save directory into ONE self-contained HTML file,
``<save_dir>/report.html``: every image inlined as a ``data:`` URI, the CSS inline, no network access, no
script from the web (one small inline script only records, for tests and curious readers, how many images
decoded and whether a script error happened). It opens from disk in any browser.

It reads one thing: the run record (:class:`~lit_probe.record.RunRecord`, ``run.json``): findings, incidents,
streams in execution order, notes, and the figure index (which file shows which layer, figure and step; ``_at``
the step that fired, ``_before`` the last one before it). A run still going or killed has a record with
``status: running`` up to its last write; the page says so. Figures listed in the index but gone from disk are
left out.

The page, in order: a header (run dir, counts, the summary's notes); the incidents (cause layer, step, kind,
signal, advice, the layers reached after) and a table of every finding; the health timeline; for each layer
with a finding its figures before and at the finding side by side; an index of every layer linking to its
latest figures (above :data:`MAX_INLINE_LAYERS` layers only the layers with findings and the first
:data:`MAX_INLINE_LAYERS` are inlined, the rest listed by name).

Nothing here imports torch, matplotlib or Lightning.
"""

from __future__ import annotations

import base64
import html
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

from .findings import ADVICE, KINDS, origin_text
from .record import RunRecord, read_record
from .sinks import atomic_write_text, safe_name
from .vocab import TIMELINE_LAYER

__all__ = ["write_report", "REPORT_NAME", "MAX_INLINE_LAYERS"]

#: The report's file name inside the save directory.
REPORT_NAME = "report.html"
#: With more probed layers than this, only the layers with findings and the first this many get figures.
MAX_INLINE_LAYERS = 200
#: Figures larger than this are linked (relative path), not inlined.
MAX_INLINE_BYTES = 8 * 1024 * 1024

_FIGURE_ORDER = ("activations", "gradients", "histograms", "gradcam", "parameters")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CODE_SPAN = re.compile(r"`([^`]+)`")
_BOLD_SPAN = re.compile(r"\*\*([^*]+)\*\*")
_MAX_LAYERS_SHOWN = 8  # an incident's later layers beyond this are collapsed


# ----------------------------------------------------------------------------------------------------------
# what the run left
# ----------------------------------------------------------------------------------------------------------
@dataclass
class _Png:
    path: Path
    step: int  # the step the file shows (from the record's figure index)


@dataclass
class _Figure:
    """The files of one figure of one layer."""

    name: str
    versions: list[_Png] = field(default_factory=list)  # sorted by step; unversioned last
    before: list[_Png] = field(default_factory=list)
    at: list[_Png] = field(default_factory=list)  # ``_at``: drawn from the step of the first severe finding

    def latest(self) -> Optional[_Png]:
        return self.versions[-1] if self.versions else None

    def at_or_after(self, step: int) -> Optional[_Png]:
        """The ``_at`` file (the step that fired), else the first file at or after ``step``, else the latest."""
        if self.at:
            return self.at[-1]
        return next((p for p in self.versions if p.step >= step), None) or self.latest()

    def before_step(self, step: int) -> Optional[_Png]:
        """A ``_before`` file, else the newest file before ``step``."""
        if self.before:
            return self.before[-1]
        earlier = [p for p in self.versions if p.step < step]
        return earlier[-1] if earlier else None


@dataclass
class _Incident:
    number: int  # 1.. in order of the cause's step (anchors)
    label: str  # the id shown: the run's incident id, else ``number``
    kind: str
    signal: str
    step: int
    layer: str
    later: list[tuple[str, Optional[int]]]  # (layer, first step) reached after the cause
    count: int
    cause: Optional[dict[str, Any]]
    consequences: list[str] = field(default_factory=list)  # findings the cause explains (findings.Incident)


def _kind_rank(kind: str) -> int:
    return KINDS.index(kind) if kind in KINDS else len(KINDS)


def _first_steps(rows: list[dict[str, Any]]) -> dict[str, int]:
    first: dict[str, int] = {}
    for r in sorted(rows, key=lambda r: int(r.get("step", 0))):
        first.setdefault(str(r.get("layer", "")), int(r.get("step", 0)))
    return first


def _incidents(record: RunRecord) -> list[_Incident]:
    """The record's incidents (grouped by :mod:`lit_probe.findings` during the run), with their findings."""
    by_id: dict[int, list[dict[str, Any]]] = {}
    for r in record.findings:
        by_id.setdefault(int(r.get("incident", -1)), []).append(r)
    out: list[_Incident] = []
    for item in record.incidents:
        members = by_id.get(int(item["id"]), [])
        first = _first_steps(members)
        layer = str(item["layer"])
        cause = next((m for m in members if m.get("cause")), None)
        out.append(_Incident(0, str(item["id"]), str(item["kind"]), str(item["signal"]), int(item["step"]), layer,
                             [(x, first.get(x)) for x in item.get("layers", []) if x != layer],
                             int(item.get("count", len(members))), cause,
                             [str(c) for c in item.get("consequences", [])]))
    out.sort(key=lambda i: (i.step, _kind_rank(i.kind)))
    for n, inc in enumerate(out, 1):
        inc.number = n
    return out


def _figures(save_dir: Path, record: RunRecord) -> dict[str, dict[str, _Figure]]:
    """Per layer (``_all``: the timeline), its figures from the record's index, in the figure kinds' order."""
    layers: dict[str, dict[str, _Figure]] = {}
    for row in record.figures:
        path = save_dir / str(row["file"])
        if not path.is_file():
            continue
        fig = layers.setdefault(str(row["layer"]), {}).setdefault(str(row["figure"]), _Figure(str(row["figure"])))
        {"before": fig.before, "at": fig.at}.get(str(row.get("tag", "")), fig.versions).append(
            _Png(path, int(row["step"])))
    for figs in layers.values():
        for fig in figs.values():
            for lst in (fig.versions, fig.before, fig.at):
                lst.sort(key=lambda p: p.step)
    return {layer: dict(sorted(figs.items(), key=lambda kv: (
        _FIGURE_ORDER.index(kv[0]) if kv[0] in _FIGURE_ORDER else len(_FIGURE_ORDER), kv[0])))
        for layer, figs in layers.items()}


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ----------------------------------------------------------------------------------------------------------
# HTML pieces
# ----------------------------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _md(text: str) -> str:
    """Escape ``text``, then render its `code` and **bold** spans."""
    out = _CODE_SPAN.sub(r"<code>\1</code>", _e(text).replace("&#x27;", "'"))
    return _BOLD_SPAN.sub(r"<b>\1</b>", out)


def _num(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return _e(value if value is not None else "")
    if isinstance(value, (int, float)):
        return _e(f"{value:.4g}")
    return _e(value)


def _png_size(data: bytes) -> Optional[tuple[int, int]]:
    if len(data) >= 24 and data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR":
        w, h = struct.unpack(">II", data[16:24])
        return int(w), int(h)
    return None


class _Images:
    """Inlines each PNG once; a second use of the same file links to the first."""

    def __init__(self, save_dir: Path) -> None:
        self.save_dir = save_dir
        self.first_id: dict[Path, str] = {}
        self.inlined = 0
        self.bytes = 0

    def figure(self, png: _Png, caption: str, alt: str, css: str = "fig") -> str:
        cap = f"<figcaption>{caption}</figcaption>"
        key = png.path.resolve()
        if key in self.first_id:
            return (f'<figure class="{css} dup"><a class="dup-link" href="#{self.first_id[key]}">shown above</a>'
                    f"{cap}</figure>")
        try:
            data = png.path.read_bytes()
        except OSError as err:
            return f'<figure class="{css} missing"><p>cannot read {_e(png.path.name)}: {_e(err)}</p>{cap}</figure>'
        size = _png_size(data)
        if size is None:
            return f'<figure class="{css} missing"><p>{_e(png.path.name)} is not a PNG</p>{cap}</figure>'
        if len(data) > MAX_INLINE_BYTES:
            rel = os.path.relpath(png.path, self.save_dir)
            return (f'<figure class="{css} missing"><p>{_e(png.path.name)} is too large to inline '
                    f"({len(data) // 1024} KiB): <code>{_e(rel)}</code></p>{cap}</figure>")
        self.inlined += 1
        self.bytes += len(data)
        ident = f"img-{self.inlined}"
        self.first_id[key] = ident
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        return (f'<figure class="{css}"><img id="{ident}" src="{uri}" alt="{_e(alt)}" width="{size[0]}" '
                f'height="{size[1]}">{cap}</figure>')


def _caption(figure: str, png: _Png, what: str = "") -> str:
    """``<b>figure</b> · what · step N`` (the step the image shows)."""
    return " · ".join([f"<b>{_e(figure)}</b>", *([_e(what)] if what else []), _e(f"step {png.step}")])


_CSS = """
:root { --fg:#1d232b; --muted:#5d6875; --line:#d9dee4; --bg:#f6f7f9; --card:#fff; --err:#b3261e;
        --warn:#9a6700; --acc:#0b5cad; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
       color:var(--fg); background:var(--bg); }
main { max-width:1360px; margin:0 auto; padding:20px 28px 60px; }
h1 { font-size:26px; margin:6px 0 4px; } h2 { font-size:20px; margin:34px 0 10px;
     border-bottom:2px solid var(--line); padding-bottom:4px; } h3 { font-size:16px; margin:18px 0 6px; }
code, .mono { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace;
              font-size:0.92em; }
code { background:#eef1f4; padding:1px 4px; border-radius:3px; overflow-wrap:anywhere; }
a { color:var(--acc); }
.meta { color:var(--muted); margin:0 0 8px; } .meta code { background:none; padding:0; }
nav { position:sticky; top:0; background:var(--bg); padding:8px 0; border-bottom:1px solid var(--line);
      z-index:1; } nav a { margin-right:16px; }
.banner { background:#fdecea; border:1px solid #f3b7b2; color:#6b1610; padding:8px 12px; border-radius:6px;
          margin:8px 0; }
.notes { margin:6px 0; padding-left:20px; color:#333; }
.card { background:var(--card); border:1px solid var(--line); border-left:5px solid var(--warn);
        border-radius:6px; padding:12px 16px; margin:12px 0; }
.card.error { border-left-color:var(--err); }
.card h3 { margin:0 0 6px; } .badge { display:inline-block; font-size:12px; font-weight:600; padding:1px 8px;
        border-radius:10px; color:#fff; background:var(--warn); margin-right:6px; vertical-align:2px; }
.badge.error { background:var(--err); }
.advice { background:#f2f6fb; border-radius:4px; padding:6px 10px; margin:8px 0 4px; }
.muted { color:var(--muted); }
table { border-collapse:collapse; background:var(--card); width:100%; font-size:14px; }
th, td { border:1px solid var(--line); padding:4px 8px; text-align:left; vertical-align:top; }
th { background:#eef1f4; } td.layer-cell code { white-space:nowrap; }
td.num { text-align:right; font-variant-numeric:tabular-nums; }
tr.cause td { font-weight:600; }
.figs { display:flex; flex-wrap:wrap; gap:14px; align-items:flex-start; }
.pair { display:grid; grid-template-columns:1fr 1fr; gap:14px; margin:8px 0 16px; }
figure { margin:0; background:var(--card); border:1px solid var(--line); border-radius:6px; padding:6px; }
figure.fig { max-width:440px; } .pair figure.fig { max-width:none; }
figure img { display:block; max-width:100%; height:auto; }
figcaption { font-size:13px; color:var(--muted); margin-top:4px; }
figure.missing p, figure.dup a { margin:30px 10px; display:block; color:var(--muted); }
.layer-index { columns:4 220px; padding-left:18px; font-size:14px; }
.layer { border-top:1px solid var(--line); padding-top:4px; }
details > summary { cursor:pointer; color:var(--acc); }
footer { margin-top:40px; color:var(--muted); font-size:13px; }
"""

# records, for tests and readers, how many images decoded and whether a script error happened
_STATUS_SCRIPT = """<script>
(function () {
  var b = document.body; b.dataset.errors = "0";
  window.onerror = function () { b.dataset.errors = String(+b.dataset.errors + 1); };
  window.addEventListener("load", function () {
    var ok = 0, broken = 0, imgs = document.images;
    for (var i = 0; i < imgs.length; i++) {
      if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; } else { broken++; }
    }
    b.dataset.imagesTotal = String(imgs.length); b.dataset.imagesLoaded = String(ok);
    b.dataset.imagesBroken = String(broken); b.dataset.ready = "1";
  });
})();
</script>"""


def _anchor(layer: str) -> str:
    return "layer-" + safe_name(layer)


def _finding_anchor(layer: str) -> str:
    return "at-" + safe_name(layer)


def _origin(cause: Optional[dict[str, Any]]) -> str:
    """`` (rank 1 · batch 5 of epoch 0)`` from the cause finding's record row, or ``""``."""
    if not cause:
        return ""
    text = origin_text(cause.get("ranks") or [], cause.get("batch"), cause.get("epoch"))
    return f" ({_e(text)})" if text else ""


def _incident_html(inc: _Incident, has_figs: set[str]) -> str:
    severe = inc.kind in ("nonfinite", "exploding")
    css = " error" if severe else ""
    parts = [f'<div class="card{css}" id="incident-{inc.number}">',
             f'<h3><span class="badge{css}">{_e(inc.kind)}</span>#{_e(inc.label)} · {_e(inc.kind)} {_e(inc.signal)} '
             f"at <code>{_e(inc.layer)}</code>, step {inc.step}{_origin(inc.cause)}</h3>"]
    c = inc.cause
    if c is not None:
        msg = c.get("message") or ""
        detail = f"{_e(c.get('stat') or 'value')} = {_num(c.get('value'))} (threshold {_num(c.get('threshold'))})"
        parts.append(f"<p>{_md(str(msg)) + ' · ' if msg else ''}<span class='muted'>{detail}</span></p>")
    advice = ADVICE.get(inc.kind, "")
    if advice:
        parts.append(f'<p class="advice"><b>What to do:</b> {_md(advice)}</p>')
    if inc.later:
        items = ", ".join(f"<code>{_e(layer)}</code>" + (f" (step {s})" if s is not None else "")
                          for layer, s in inc.later)
        head = f"then reached {len(inc.later)} more layer(s)"
        if len(inc.later) > _MAX_LAYERS_SHOWN:
            parts.append(f"<details><summary>{head}</summary><p>{items}</p></details>")
        else:
            parts.append(f"<p>{head}: {items}</p>")
    if inc.consequences:
        parts.append("<p><b>Consequences</b> (grouped under this cause, not separate problems):</p><ul>"
                     + "".join(f"<li>{_md(c)}</li>" for c in inc.consequences) + "</ul>")
    foot = [f"{inc.count} finding(s)"]
    if inc.layer in has_figs:
        foot.append(f'<a href="#{_finding_anchor(inc.layer)}">figures of <code>{_e(inc.layer)}</code></a>')
    parts.append(f'<p class="muted">{" · ".join(foot)}</p></div>')
    return "\n".join(parts)


def _findings_table(rows: list[dict[str, Any]]) -> str:
    head = ("incident", "step", "layer", "signal", "kind", "value", "threshold", "severity", "message")
    out = ["<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in sorted(rows, key=lambda r: (int(r.get("step", 0)), _kind_rank(str(r.get("kind"))))):
        css = ' class="cause"' if r.get("cause") else ""
        out.append(
            f"<tr{css}><td class='num'>{_e(r.get('incident', ''))}</td>"
            f"<td class='num'>{_e(r.get('step', ''))}</td>"
            f"<td class='layer-cell'><code>{_e(r.get('layer', ''))}</code></td><td>{_e(r.get('signal', ''))}</td>"
            f"<td>{_e(r.get('kind', ''))}</td><td class='num'>{_num(r.get('value'))}</td>"
            f"<td class='num'>{_num(r.get('threshold'))}</td><td>{_e(r.get('severity', ''))}</td>"
            f"<td>{_md(str(r.get('message', '')))}</td></tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------------------
def _build(save_dir: Path, record: RunRecord, title: Optional[str]) -> str:
    rows = record.findings
    incidents = _incidents(record)
    order = {n: i for i, n in enumerate(record.stream_order())}
    layer_figs = _figures(save_dir, record)
    tl = layer_figs.pop(TIMELINE_LAYER, {}).get("timeline")
    timeline = tl.latest() if tl else None
    # execution order: a stream's place, a module's place is its first stream's
    layers = sorted(layer_figs, key=lambda n: (order.get(n, len(order)), _natural(n)))
    finding_layers = sorted(_first_steps(rows), key=lambda n: (_first_steps(rows)[n], order.get(n, len(order))))
    n_files = sum(len(f.versions) + len(f.before) + len(f.at) for figs in layer_figs.values() for f in figs.values())
    notes = record.note_lines()

    images = _Images(save_dir)
    page: list[str] = []
    # a probe's save dir is usually `<run>/probe`: name the run too
    name = f"{save_dir.parent.name}/{save_dir.name}" if save_dir.name == "probe" and save_dir.parent.name \
        else save_dir.name
    title = title or f"lit-probe report: {name}"
    counts = (f"{len(rows)} finding(s) in {len(incidents)} incident(s) · {len(layers)} layer(s) with figures · "
              f"{n_files + (timeline is not None)} figure file(s)")
    page.append(f"<h1>{_e(title)}</h1>")
    page.append(f'<p class="meta">run dir <code>{_e(save_dir)}</code><br>{_e(counts)}</p>')
    if record.status_line():
        page.append(f'<div class="banner">{_e(record.status_line())}</div>')
    items = [_md(n) for n in notes]
    try:
        others = sorted(p.name for p in save_dir.iterdir() if p.is_file() and p.suffix in (".csv", ".md", ".json")
                        and not p.name.startswith("."))
    except OSError:
        others = []
    if others:  # relative links: the files next to the report, no network
        items.append("files: " + ", ".join(f'<a href="{_e(quote(n))}">{_e(n)}</a>' for n in others))
    if items:
        page.append('<ul class="notes">' + "".join(f"<li>{n}</li>" for n in items) + "</ul>")
    page.append('<nav><a href="#incidents">Incidents</a><a href="#findings">All findings</a>'
                '<a href="#timeline">Timeline</a><a href="#at-findings">Figures at the findings</a>'
                '<a href="#layers">Layers</a></nav>')

    # incidents and findings first
    page.append(f'<section id="incidents"><h2>Incidents ({len(incidents)})</h2>')
    if not incidents:
        page.append("<p>No findings: every probed layer stayed within the thresholds.</p>")
    page += [_incident_html(inc, set(layer_figs)) for inc in incidents]
    page.append("</section>")
    page.append(f'<section id="findings"><h2>All findings ({len(rows)})</h2>')
    if rows:
        page.append(f"<details{' open' if len(rows) <= 30 else ''}><summary>{len(rows)} finding(s), by step"
                    f"</summary>{_findings_table(rows)}</details>")
    else:
        page.append('<p class="muted">none</p>')
    page.append("</section>")

    # the health timeline
    page.append('<section id="timeline"><h2>Health timeline</h2>')
    if timeline is not None:
        page.append(images.figure(timeline, _caption("timeline", timeline), "health timeline of all probed layers",
                                  css="wide"))
    else:
        page.append('<p class="muted">No timeline: the run ended before one was drawn, or the timeline figure is '
                    "off.</p>")
    page.append("</section>")

    # before / at the finding, per layer with a finding
    page.append('<section id="at-findings"><h2>Figures at the findings</h2>')
    if not finding_layers:
        page.append('<p class="muted">No findings.</p>')
    first = _first_steps(rows)
    for layer in finding_layers:
        step = first[layer]
        kinds = sorted({f"{r.get('kind')} {r.get('signal')}" for r in rows if str(r.get("layer")) == layer})
        page.append(f'<div class="layer" id="{_finding_anchor(layer)}"><h3><code>{_e(layer)}</code> · '
                    f"{_e(', '.join(kinds))} from step {step}</h3>")
        found = layer_figs.get(layer)
        if not found:
            page.append('<p class="muted">no figures for this layer</p></div>')
            continue
        for name, fig in found.items():
            at = fig.at_or_after(step)
            before = fig.before_step(step)
            if at is None and before is None:
                continue
            if before is not None:
                left = images.figure(before, _caption(name, before, "before"), f"{layer} {name} before the finding")
            else:
                left = '<figure class="fig missing"><p>no figure from before the finding was kept</p></figure>'
            if at is not None and at in fig.at:
                cap = _caption(name, at, "at the step that fired")
            else:
                cap = _caption(name, at, "at/after the finding") if at is not None else ""
            right = images.figure(at, cap, f"{layer} {name}") if at else \
                '<figure class="fig missing"><p>no figure from the finding on</p></figure>'
            page.append(f'<div class="pair">{left}{right}</div>')
        page.append("</div>")
    page.append("</section>")

    # every layer
    inline = [n for n in layers if n in first] + [n for n in layers if n not in first][:MAX_INLINE_LAYERS]
    inline_set = set(inline)
    page.append(f'<section id="layers"><h2>Layers ({len(layers)})</h2>')
    if not layers:
        page.append('<p class="muted">No layer figures in this directory.</p>')
    page.append('<ul class="layer-index">' + "".join(
        (f'<li><a href="#{_anchor(n)}"><code>{_e(n)}</code></a>' if n in inline_set else f"<li><code>{_e(n)}</code>")
        + (' <span class="badge error">finding</span>' if n in first else "") + "</li>" for n in layers) + "</ul>")
    if len(inline) < len(layers):
        page.append(f"<p class='muted'>{len(layers)} layers, more than {MAX_INLINE_LAYERS}: figures are inlined for "
                    f"the layers with findings and the first {MAX_INLINE_LAYERS} others; the other "
                    f"{len(layers) - len(inline)} are listed by name only (their PNGs are in this directory).</p>")
    for layer in [n for n in layers if n in inline_set]:
        page.append(f'<div class="layer" id="{_anchor(layer)}"><h3><code>{_e(layer)}</code></h3><div class="figs">')
        for name, fig in layer_figs[layer].items():
            latest = fig.latest()
            if latest is not None:
                page.append(images.figure(latest, _caption(name, latest), f"{layer} {name}"))
        page.append("</div></div>")
    page.append("</section>")
    page.append(f"<footer>Written by lit-probe on {_e(time.strftime('%Y-%m-%d %H:%M:%S'))}; {images.inlined} "
                f"image(s) inlined ({images.bytes // 1024} KiB). One self-contained file: no network access.</footer>")

    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>{_STATUS_SCRIPT}\n<main>\n"
            + "\n".join(page) + "\n</main></body></html>\n")


def write_report(save_dir: str | os.PathLike[str], *, title: str | None = None,
                 record: RunRecord | None = None) -> Path:
    """Write ``<save_dir>/report.html``: one self-contained page of a probed run's findings and figures.

    Reads the run record (``run.json``, or ``record`` when the run passes its own) and the figure PNGs its index
    lists, and inlines every image as a ``data:`` URI, so the file opens from disk with no network access.

    Args:
        save_dir: the probe's save directory (``FeatureProbe(save_dir=...)``, by default
            ``<default_root_dir>/probe``).
        title: the page title; default ``"lit-probe report: <directory name>"`` (``<run>/probe`` for a
            directory named ``probe``).

    Returns:
        The path of the written ``report.html``.

    Raises:
        FileNotFoundError: ``save_dir`` does not exist, or holds no ``run.json``.
        NotADirectoryError: ``save_dir`` is not a directory.
        OSError: the report cannot be written.
    """
    root = Path(save_dir)
    if not root.exists():
        raise FileNotFoundError(f"no such directory: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    root = root.resolve()
    path = root / REPORT_NAME
    atomic_write_text(path, _build(root, record if record is not None else read_record(root), title))
    return path
