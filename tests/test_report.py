"""``lit_probe.report.write_report`` (the self-contained ``report.html``) on hand-built save directories, and
the page loaded in a real headless Chromium when one is installed (``/usr/bin/chromium``; `.ci/run` installs
it, the browser tests skip without it)."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lit_probe.findings import ADVICE, Finding
from lit_probe.record import RunRecord, read_record
from lit_probe.report import MAX_INLINE_LAYERS, write_report
from lit_probe.sinks import figure_file, safe_name

CAUSE = "block3.norm_div"
REUSED = "layer1.0.relu#1"  # the 2nd call of a reused module: its directory name carries a hash


def _png(path: Path, seed: int, size: tuple[int, int] = (96, 64)) -> None:
    """A small PNG with many colours (a smooth pattern that differs per seed)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 255 // max(w - 1, 1) + 40 * seed) % 256, y * 255 // max(h - 1, 1),
                    ((x + y + 17 * seed) * 3) % 256], axis=-1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb, "RGB").save(path)


def _finding(step, layer, signal, kind, value, threshold, incident=None, cause=None, **kw):
    row = {"step": step, "layer": layer, "signal": signal, "kind": kind, "value": value, "threshold": threshold,
           "message": kw.pop("message", f"{kind} {signal} at {layer} (step {step})"), "stat": kw.pop("stat", "absmax"),
           "severity": "error" if kind in ("nonfinite", "exploding") else "warning", "extra": {}}
    if incident is not None:
        row["incident"] = incident
    if cause is not None:
        row["cause"] = cause
    return row


FINDINGS = [
    # incident ids as lit_probe.findings.group_incidents gives them: from 0, in order of appearance
    _finding(20, REUSED, "activation", "dead", 0.97, 0.9, incident=0, cause=True, stat="frac_zero"),
    _finding(30, CAUSE, "activation", "nonfinite", "nan", 0, incident=1, cause=True, stat="nonfinite",
             message="NaN/Inf <first> in `block3.norm_div` & co"),
    _finding(30, "head", "activation", "nonfinite", "inf", 0, incident=1, cause=False, stat="nonfinite"),
    _finding(31, "block3.pool", "gradient", "nonfinite", "nan", 0, incident=1, cause=False, stat="nonfinite"),
]

def _fig(layer: str, figure: str, step: int, tag: str = "", versioned: bool = False) -> dict:
    name = figure_file(figure, tag=tag, step=step if versioned and not tag else None)
    return {"layer": layer, "figure": figure, "tag": tag, "step": step, "file": f"{safe_name(layer)}/{name}"}


FIGURES = [  # the figure index as the disk sink keeps it: which file shows which layer, figure and step
    _fig("_all", "timeline", 40),
    _fig(CAUSE, "activations", 40), _fig(CAUSE, "activations", 25, "before"),
    _fig(CAUSE, "gradients", 10, versioned=True), _fig(CAUSE, "gradients", 40, versioned=True),
    _fig(REUSED, "activations", 40), _fig("stem", "activations", 40), _fig("stem", "histograms", 40),
    _fig("head", "gradcam", 40),
]


def _record(findings: list[dict], figures: list[dict], **kw) -> RunRecord:
    objs = [Finding.from_dict(f) for f in findings]
    rec = RunRecord(layers=kw.pop("layers", ["stem", REUSED, CAUSE, "head"]), figures=figures, **kw)
    rec.set_findings(objs)
    return rec


@pytest.fixture
def save_dir(tmp_path: Path) -> Path:
    """A realistic save dir: 2 incidents, a timeline, versioned and overwrite figures, one ``_before``."""
    d = tmp_path / "probe"
    d.mkdir()
    for k, row in enumerate(FIGURES):
        _png(d / row["file"], k, (320, 120) if row["figure"] == "timeline" else (96, 64))
    _record(FINDINGS, FIGURES, status="failed", never_ran=["block3.pool"]).save(d)
    return d


def _imgs(page: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]*)"', page)


def test_structure_order_and_self_contained(save_dir: Path) -> None:
    path = write_report(save_dir)
    assert path == save_dir.resolve() / "report.html"
    page = path.read_text()
    # incidents and findings come first, then the timeline, then the figures at the findings, then the layers
    order = [page.index(f'id="{s}"') for s in ("incidents", "findings", "timeline", "at-findings", "layers")]
    assert order == sorted(order)
    incidents = page[page.index('id="incidents"'):page.index('id="findings"')]
    assert re.findall(r"</span>#(\d+) · ", incidents) == ["0", "1"]  # the run's incident ids
    assert incidents.index("dead activation at <code>layer1.0.relu#1</code>, step 20") < \
        incidents.index(f"nonfinite activation at <code>{CAUSE}</code>, step 30")
    assert "then reached 2 more layer(s)" in incidents and "<code>block3.pool</code> (step 31)" in incidents
    assert re.sub(r"`([^`]+)`", r"<code>\1</code>", ADVICE["nonfinite"]) in incidents
    # every image is a decodable inline PNG, and nothing points at the network
    srcs = _imgs(page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:
        Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).verify()
    assert not re.search(r"https?://", page)
    assert "<script src" not in page and "<link" not in page
    # each file inlined once: timeline + 4 cause figures (before, activations, gradients 10 and 40) + reused
    # activations + stem 2 + head gradcam; the layers section links to the figures already shown
    assert len(srcs) == 9
    assert "shown above" in page
    # the summary's notes
    assert 'class="banner">the run ended with an exception' in page
    assert "layers that never ran: <code>block3.pool</code>" in page


def test_before_and_after_side_by_side(save_dir: Path) -> None:
    page = write_report(save_dir).read_text()
    start = page.index(f'id="at-{safe_name(CAUSE)}"')
    at = page[start:page.index('<div class="layer"', start)]
    pairs = re.findall(r'<div class="pair">(.*?)</div>', at, flags=re.S)
    assert len(pairs) == 2  # activations, gradients
    act, grad = pairs
    assert "before · step 25" in act and "at/after the finding · step 40" in act  # the step each image shows
    assert "before · step 10" in grad and "at/after the finding · step 40" in grad  # versioned: picked by step
    assert act.index("before") < act.index("at/after")


def test_escaping_and_layer_dirs_mapped_back(save_dir: Path) -> None:
    page = write_report(save_dir, title="<run> & 'friends'").read_text()
    assert "<first>" not in page and "&lt;first&gt;" in page and "&amp; co" in page
    assert "<title>&lt;run&gt; &amp; &#x27;friends&#x27;</title>" in page
    # the hashed directory of `layer1.0.relu#1` shows under the layer's real name
    assert safe_name(REUSED) != REUSED
    layers = page[page.index('id="layers"'):]
    assert f'<code>{REUSED}</code>' in layers and f'id="layer-{safe_name(REUSED)}"' in layers
    assert f"<code>{safe_name(REUSED)}</code>" not in page


def test_incidents_come_from_the_record(save_dir: Path) -> None:
    rec = read_record(save_dir)
    rec.incidents = [i for i in rec.incidents if i["id"] == 1]  # what the run grouped is what the page shows
    rec.save(save_dir)
    page = write_report(save_dir).read_text()
    incidents = page[page.index('id="incidents"'):page.index('id="findings"')]
    assert "Incidents (1)" in incidents and "layer1.0.relu#1" not in incidents and "#1 · nonfinite" in incidents
    assert "then reached 2 more layer(s)" in incidents and "3 finding(s)" in incidents


def test_report_from_the_record_alone_in_a_fresh_directory(save_dir: Path, tmp_path: Path) -> None:
    """`lit-probe report` on a copy: run.json and the PNGs it lists are all it reads (no summary.md)."""
    fresh = tmp_path / "fresh"
    shutil.copytree(save_dir, fresh)
    assert not (fresh / "summary.md").exists() and not (fresh / "findings.jsonl").exists()
    page = write_report(fresh).read_text()
    assert "Incidents (2)" in page and len(_imgs(page)) == 9


def test_killed_run_partial_files(tmp_path: Path) -> None:
    d = tmp_path / "probe"
    d.mkdir()
    # a run killed while drawing: its record says `running`; one indexed file never reached the disk
    _png(d / safe_name(CAUSE) / "activations.png", 1)
    (d / safe_name(CAUSE) / ".activations.png.x1y2.tmp").write_bytes(b"partial")
    _record([FINDINGS[1]], [_fig(CAUSE, "activations", 30), _fig(CAUSE, "gradients", 30)], status="running").save(d)
    page = write_report(d).read_text()
    assert "had not ended" in page
    assert "No timeline" in page and "Incidents (1)" in page
    assert len(_imgs(page)) == 1
    # nothing at all
    empty = tmp_path / "empty"
    empty.mkdir()
    _record([], [], status="finished").save(empty)
    page = write_report(empty).read_text()
    assert "No findings: every probed layer stayed within the thresholds." in page
    assert "No layer figures" in page and not _imgs(page)
    with pytest.raises(FileNotFoundError, match="run.json"):
        write_report(tmp_path)  # not a save directory


def test_many_layers_inline_only_the_first_and_the_findings(tmp_path: Path) -> None:
    d = tmp_path / "probe"
    n = MAX_INLINE_LAYERS + 5
    names = [f"blocks.{i}" for i in range(n)]
    d.mkdir()
    tiny = io.BytesIO()
    Image.new("RGB", (2, 2), (10, 20, 30)).save(tiny, format="PNG")
    for name in names:
        (d / safe_name(name)).mkdir()
        (d / safe_name(name) / "activations.png").write_bytes(tiny.getvalue())
    finding = _finding(3, names[-1], "gradient", "vanishing", 1e-9, 1e-7, incident=0, cause=True)
    _record([finding], [_fig(n, "activations", 3) for n in names], layers=names).save(d)
    page = write_report(d).read_text()
    assert len(_imgs(page)) == MAX_INLINE_LAYERS + 1  # the layer with the finding, the first 200 others
    assert "listed by name only" in page
    assert f'href="#layer-{safe_name(names[-1])}"' in page and f'href="#layer-{safe_name(names[-2])}"' not in page
    assert page.index("blocks.9<") < page.index("blocks.10<")  # natural order


def test_bad_save_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        write_report(tmp_path / "f")


# ----------------------------------------------------------------------------------------------------------
# a real browser
# ----------------------------------------------------------------------------------------------------------
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


CHROMIUM = _chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium; "
                                                               ".ci/run installs it)")


def _browse(page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    assert CHROMIUM is not None
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=5000",
            *extra, page.as_uri()]
    env = {**os.environ, "HOME": str(tmp)}  # chromium writes crash dumps and caches under $HOME
    return subprocess.run(args, capture_output=True, text=True, timeout=180, env=env, cwd=tmp)


@needs_chromium
def test_report_in_headless_chromium(save_dir: Path, tmp_path: Path) -> None:
    page = write_report(save_dir)
    n_imgs = len(_imgs(page.read_text()))
    res = _browse(page, tmp_path, "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", res.stdout)
    assert body, res.stdout[:2000]
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))
    assert attrs.get("ready") == "1", (attrs, res.stderr[-2000:])
    assert attrs["errors"] == "0"
    assert int(attrs["images-total"]) == n_imgs
    assert attrs["images-loaded"] == str(n_imgs) and attrs["images-broken"] == "0"
    assert f"nonfinite activation at <code>{CAUSE}</code>" in res.stdout

    shot = tmp_path / "shot.png"
    res = _browse(page, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", "--hide-scrollbars")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 2000)
    colours = img.getcolors(maxcolors=1 << 20)
    # text and cards alone give about 3000 colours; the decoded inline figures (smooth gradients) ~75000
    assert colours is not None and len(colours) > 20000, len(colours or [])
