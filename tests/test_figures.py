"""Tests for lit_probe.figures: render real figures, reopen the PNGs with PIL and look at the pixels."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lit_probe.figures import (
    ColorScale,
    feature_grid,
    figure_to_png,
    health_timeline,
    histogram,
    histograms,
    robust_range,
)

REPO = Path(__file__).resolve().parents[1]


def _png(fig, dpi: int = 100) -> Image.Image:
    data = figure_to_png(fig, dpi=dpi)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _drawn(fig, *, panels: int, title: str, width: tuple[int, int] = (800, 1300)) -> np.ndarray:
    """Render ``fig``, check what a reader sees: its title, ``panels`` plot axes (colour bars not counted), a
    PNG of a sensible width that is not blank. Returns its RGB pixels."""
    assert fig.get_suptitle() == title
    plots = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(plots) == panels, [ax.get_label() for ax in fig.axes]
    img = _png(fig)
    assert width[0] <= img.size[0] <= width[1] and 300 <= img.size[1] <= 1500, img.size
    arr = np.asarray(img.convert("RGB")).astype(int)
    assert arr.std() > 10 and len(np.unique(arr.reshape(-1, 3), axis=0)) > 50  # drawn, not a blank canvas
    return arr


def _texts(fig) -> str:
    """All text drawn in a figure (titles, labels, annotations), joined."""
    out = []
    for t in fig.findobj(match=lambda a: hasattr(a, "get_text")):
        try:
            out.append(t.get_text())
        except Exception:
            pass
    return "\n".join(s for s in out if isinstance(s, str))


def _relu_maps(seed: int, c: int = 64, h: int = 16, w: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.maximum(rng.normal(size=(c, h, w)), 0).astype(np.float32)


def _red_pixels(img: Image.Image) -> int:
    a = np.asarray(img.convert("RGB")).astype(int)
    return int(np.count_nonzero((a[..., 0] > 200) & (a[..., 1] < 80) & (a[..., 2] < 80)))


# ---------------------------------------------------------------------------------------------------
# feature_grid
# ---------------------------------------------------------------------------------------------------
def test_grid_64_channels_png_size_mode_and_content():
    fig = feature_grid(_relu_maps(0), title="layer1 · activations · step 3 · shape 8x64x16x16")
    assert fig.canvas.figure is fig
    img = _png(fig)
    assert 800 <= img.size[0] <= 1000, img.size
    assert 400 <= img.size[1] <= 1200, img.size
    assert img.mode in ("RGB", "RGBA")
    arr = np.asarray(img.convert("RGB"))
    assert arr.std() > 10  # not a blank image
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 50


def test_two_layers_give_different_images():
    a = np.asarray(_png(feature_grid(_relu_maps(1), title="a")).convert("RGB"))
    b = np.asarray(_png(feature_grid(_relu_maps(2), title="b")).convert("RGB"))
    assert a.shape == b.shape
    assert np.mean(a != b) > 0.05


def test_title_and_info_are_in_the_figure():
    fig = feature_grid(_relu_maps(0, c=10), title="net.conv1 · activations · step 42 · shape 4x10x16x16")
    text = _texts(fig)
    assert "net.conv1" in text and "step 42" in text and "4x10x16x16" in text
    assert "range" in text  # the colour range is noted


def test_channel_cap_is_noted_and_512_cap_works():
    vals = np.random.default_rng(0).normal(size=(512, 8, 8)).astype(np.float32)
    fig = feature_grid(vals, title="t", max_channels=64)
    assert "showing 64/512" in _texts(fig)
    _png(fig)
    fig = feature_grid(vals, title="t", max_channels=512)
    assert "showing" not in _texts(fig)
    img = _png(fig)
    assert 800 <= img.size[0] <= 1000


def test_nonfinite_values_do_not_crash_and_are_counted():
    vals = _relu_maps(3, c=16)
    vals[0, 0, :3] = np.nan
    vals[1, 1, 1] = np.inf
    vals[2, 2, 2] = -np.inf
    fig = feature_grid(vals, title="t")
    text = _texts(fig)
    assert "3 NaN" in text and "1 +Inf" in text and "1 -Inf" in text
    arr = np.asarray(_png(fig).convert("RGB")).astype(int)
    magenta = (arr[..., 0] > 230) & (arr[..., 1] < 30) & (arr[..., 2] > 230)
    assert magenta.any()  # drawn in a distinct colour


def test_all_nan_grid_renders():
    from lit_probe.figures import _SPECIAL

    vals = np.full((4, 5, 5), np.nan, dtype=np.float32)
    for diverging in (False, True):
        fig = feature_grid(vals, title="all nan", diverging=diverging)
        assert "NaN: 100" in _texts(fig) and "non-finite: 100 NaN" in _texts(fig)
        cb = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert len(cb) == 1 and cb[0].get_ylabel() == ("gradient (0 = white)" if diverging else "activation")
        arr = _drawn(fig, panels=1, title="all nan")
        assert _colour_mask(arr, _SPECIAL[diverging]["nan"][0]).sum() > 1000  # every tile in the NaN colour


def test_dead_channels_are_marked_in_red():
    vals = _relu_maps(4, c=16)
    dead = np.zeros(16, dtype=bool)
    dead[[2, 7]] = True
    vals[dead] = 0
    plain = _png(feature_grid(vals, title="t"))
    marked_fig = feature_grid(vals, title="t", dead=dead)
    assert "dead (red): 2/16" in _texts(marked_fig)
    marked = _png(marked_fig)
    assert _red_pixels(plain) == 0  # viridis has no red
    assert _red_pixels(marked) > 50


def test_gradient_view_is_symmetric_around_zero():
    g = np.random.default_rng(5).normal(size=(8, 6, 6)).astype(np.float32) * 1e-3 + 5e-4
    fig = feature_grid(g, title="g", diverging=True)
    cb_axes = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert cb_axes
    lo, hi = sorted(cb_axes[0].get_ylim())
    assert lo == pytest.approx(-hi)
    _png(fig)


def test_fixed_vrange_is_used():
    vals = _relu_maps(6, c=4)
    fig = feature_grid(vals, title="t", vrange=(0.0, 10.0))
    assert "fixed range [0, 10]" in _texts(fig)
    fig2 = feature_grid(vals, title="t", vrange=(-1.0, 3.0), diverging=True)
    assert "fixed range [-3, 3]" in _texts(fig2)


@pytest.mark.parametrize(
    "shape, kwargs",
    [
        ((8, 64), {}),  # linear: samples x features
        ((128, 64), {}),  # sequence: tokens x features
        ((32, 100), {"channel_axis": 0}),  # conv1d: channels x positions
        ((4, 3, 6, 6), {}),  # conv3d sample: middle depth slice
        ((1, 1), {}),
    ],
)
def test_other_layouts_render(shape, kwargs):
    vals = np.random.default_rng(7).normal(size=shape).astype(np.float32)
    img = _png(feature_grid(vals, title=f"shape {shape}", **kwargs))
    assert 800 <= img.size[0] <= 1000
    assert np.asarray(img.convert("L")).std() > 5


def test_dead_features_on_heatmap_axis_follow_mask_length():
    vals = np.abs(np.random.default_rng(8).normal(size=(8, 20))).astype(np.float32)
    dead = np.zeros(20, dtype=bool)
    dead[3] = True
    assert _red_pixels(_png(feature_grid(vals, title="t", dead=dead))) > 20
    dead_rows = np.zeros(8, dtype=bool)
    dead_rows[1] = True
    assert _red_pixels(_png(feature_grid(vals, title="t", dead=dead_rows, channel_axis=0))) > 20
    # the mask is over the units of the given axis, never guessed from its length
    assert "dead (red)" not in _texts(feature_grid(vals, title="t", dead=dead_rows))


def test_dead_heatmap_units_are_hatched_over_their_whole_row_or_column():
    from lit_probe.figures import DEAD_GID

    vals = np.abs(np.random.default_rng(9).normal(size=(12, 30))).astype(np.float32)
    dead = np.zeros(30, dtype=bool)
    dead[[4, 17]] = True
    fig = feature_grid(vals, title="t", dead=dead, channel_axis=1)
    (marks,) = [c for c in fig.axes[0].collections if c.get_gid() == DEAD_GID]
    assert marks.get_hatch() == "xx"
    boxes = sorted(tuple(np.round(p.get_extents().bounds, 3)) for p in marks.get_paths())
    assert boxes == [(3.5, -0.5, 1.0, 12.0), (16.5, -0.5, 1.0, 12.0)]  # columns 4 and 17, every row
    assert _red_pixels(_png(fig)) > 200


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError):
        feature_grid(np.zeros(5), title="1-d")
    with pytest.raises(ValueError):
        feature_grid(np.zeros((0, 4, 4)), title="empty")
    with pytest.raises(ValueError):
        feature_grid(np.zeros((2, 4, 4)), title="t", max_channels=0)


# ---------------------------------------------------------------------------------------------------
# histograms
# ---------------------------------------------------------------------------------------------------
def test_histogram_counts_nan_and_infinities():
    v = np.random.default_rng(0).normal(size=1000)
    v[:3] = np.nan
    v[3:5] = np.inf
    v[5] = -np.inf
    v[10:110] = 0.0
    fig = histogram(v, title="layer · histograms · step 1")
    text = _texts(fig)
    assert "NaN = 3" in text and "+Inf = 2" in text and "-Inf = 1" in text
    assert "zeros = 100 (10.0%)" in text
    assert "n = 1,000" in text
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    img = _png(fig)
    assert img.size[0] >= 800


@pytest.mark.parametrize(
    "values",
    [
        np.array([]),
        np.full(10, np.nan),
        np.array([np.inf, -np.inf, np.nan]),
        np.zeros(50),
        np.array([1.5]),
        np.array([1e30, -1e30, 0.0]),
    ],
)
def test_histogram_edge_cases_never_crash(values):
    fig = histogram(values, title="edge")
    text = _texts(fig)
    finite = values[np.isfinite(values)]
    assert f"n = {values.size:,}" in text and f"NaN = {int(np.isnan(values).sum())}" in text
    assert ("no finite values" in text) == (finite.size == 0)
    (ax,) = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "value"
    _drawn(fig, panels=1, title="edge")


def test_histograms_two_panels():
    rng = np.random.default_rng(1)
    panels = [("activation", rng.normal(size=500)), ("gradient", rng.normal(size=500) * 1e-5)]
    fig = histograms(panels, title="t")
    assert len([ax for ax in fig.axes if ax.get_yscale() == "log"]) == 2
    _png(fig)
    with pytest.raises(ValueError):
        histograms([], title="t")


# ---------------------------------------------------------------------------------------------------
# timeline
# ---------------------------------------------------------------------------------------------------
def _timeline_inputs(n_layers: int, n_steps: int):
    rng = np.random.default_rng(0)
    layers = [f"model.blocks.{i}.mlp" for i in range(n_layers)]
    steps = np.arange(n_steps) * 10
    act = np.exp(rng.normal(size=(n_layers, n_steps)))
    grad = np.exp(rng.normal(size=(n_layers, n_steps))) * 1e-3
    dead = rng.random((n_layers, n_steps)) * 0.1
    act[:, :5] = np.nan
    grad[1] = 0.0
    dead[2, n_steps // 2 :] = 1.0
    findings = [(layers[2], int(steps[n_steps // 2]), "dead"), (layers[0], int(steps[-1]), "exploding"),
                ("not-a-layer", 0, "dead")]
    return layers, steps, act, grad, dead, findings


def test_health_timeline_large_is_legible_and_fast_enough():
    args = _timeline_inputs(50, 2000)
    t0 = time.perf_counter()
    fig = health_timeline(*args, title="health")
    text = _texts(fig)
    img = _png(fig)
    elapsed = time.perf_counter() - t0
    assert img.size[0] >= 1000
    assert elapsed < 15  # ~1 s on an idle core; generous for a shared machine
    assert "model.blocks.49.mlp" in text and "exploding" in text


def test_health_timeline_small_and_empty():
    def heatmaps(fig):
        return [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]

    small = health_timeline(*_timeline_inputs(3, 4))
    assert [im.get_array().shape[0] for ax in heatmaps(small) for im in ax.images] == [3] * 3  # row per layer
    assert "model.blocks.2.mlp" in _texts(small)
    _drawn(small, panels=6, title="layer health: 3 layers x 4 log steps")  # 3 heatmaps, 3 colour-bar axes
    empty = health_timeline(["a"], np.zeros(0), np.zeros((1, 0)), np.zeros((1, 0)), np.zeros((1, 0)), [])
    assert heatmaps(empty) == [] and _texts(empty).count("no data yet") == 3  # each panel says so
    _drawn(empty, panels=6, title="layer health: 1 layers x 0 log steps")
    all_nan = np.full((2, 3), np.nan)
    nan_fig = health_timeline(["a", "b"], np.arange(3), all_nan, all_nan, all_nan, [])
    assert len(heatmaps(nan_fig)) == 3
    arr = _drawn(nan_fig, panels=6, title="layer health: 2 layers x 3 log steps")
    assert _colour_mask(arr, "#c8c8c8", tol=3).sum() > 1000  # grey = no value


def test_health_timeline_shape_mismatch():
    with pytest.raises(ValueError, match="layers x steps"):
        health_timeline(["a", "b"], np.arange(3), np.zeros((2, 4)), np.zeros((2, 3)), np.zeros((2, 3)), [])


# ---------------------------------------------------------------------------------------------------
# ColorScale, figure_to_png, backend hygiene
# ---------------------------------------------------------------------------------------------------
def test_color_scale_fixed_then_widened_only():
    sc = ColorScale()
    assert sc.update(0.0, 2.0) == (0.0, 2.0)
    assert sc.update(0.5, 1.0) == (0.0, 2.0)  # narrower data: unchanged
    lo, hi = sc.update(0.0, 3.0)
    assert lo == 0.0 and hi >= 3.0
    assert sc.update(float("nan"), float("inf")) == (lo, hi)
    sym = ColorScale(symmetric=True)
    assert sym.update(-1.0, 0.5) == (-1.0, 1.0)
    lo2, hi2 = sym.update(-0.1, 4.0)
    assert lo2 == -hi2 and hi2 >= 4.0
    const = ColorScale()
    lo3, hi3 = const.update(0.0, 0.0)
    assert lo3 < hi3
    assert pickle.loads(pickle.dumps(sym)).range == sym.range


def test_robust_range_ignores_outliers_and_nonfinite():
    v = np.concatenate([np.linspace(0, 1, 10000), [1e6, np.nan, np.inf]])
    lo, hi = robust_range(v)
    assert 0 <= lo < hi < 2
    lo, hi = robust_range(v, diverging=True)
    assert lo == -hi


def test_figure_to_png_releases_the_figure_and_pyplot_is_untouched():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    for _ in range(5):
        fig = feature_grid(_relu_maps(0, c=4), title="t")
        figure_to_png(fig)
        assert fig.axes == []
    assert plt.get_fignums() == before


def test_headless_with_gui_backend_requested(tmp_path):
    """DISPLAY unset and MPLBACKEND=TkAgg: rendering must neither fail nor import pyplot."""
    script = textwrap.dedent(
        f"""
        import sys, importlib.util
        sys.modules["torch"] = None; sys.modules["lightning"] = None
        sys.modules["pytorch_lightning"] = None; sys.modules["wandb"] = None
        spec = importlib.util.spec_from_file_location("figs", {str(REPO / 'lit_probe' / 'figures.py')!r})
        F = importlib.util.module_from_spec(spec); spec.loader.exec_module(F)
        import numpy as np
        png = F.figure_to_png(F.feature_grid(np.random.rand(4, 8, 8), title="t"))
        png += F.figure_to_png(F.histogram(np.array([1.0, np.nan]), title="h"))
        assert png[:4] == b"\\x89PNG"
        assert "matplotlib.pyplot" not in sys.modules, "figures imported pyplot"
        import matplotlib
        assert matplotlib.rcParams._get("backend").lower() == "tkagg", matplotlib.rcParams._get("backend")
        print("OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(MPLBACKEND="TkAgg", MPLCONFIGDIR=str(tmp_path / "mpl"), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout


def test_grid_render_time():
    t0 = time.perf_counter()
    figure_to_png(feature_grid(_relu_maps(0), title="t"))
    assert time.perf_counter() - t0 < 5  # ~0.2 s on an idle core


# ---------------------------------------------------------------------------------------------------
# figures that tell the truth (issue 14)
# ---------------------------------------------------------------------------------------------------
def _rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB")).astype(int)


def _colour_mask(arr: np.ndarray, hex_colour: str, tol: int = 12) -> np.ndarray:
    from matplotlib.colors import to_rgb

    ref = (np.array(to_rgb(hex_colour)) * 255).round().astype(int)
    return np.all(np.abs(arr - ref) <= tol, axis=-1)


def _image_axes(fig):
    return [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]


def _render_at(fig, points):
    """Render ``fig`` to PNG (reopened) and map data points ``(ax, x, y)`` to ``(row, col)`` pixels of it.

    The layout is computed by a first Agg draw at the PNG's dpi; figure_to_png then draws the same layout.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig.set_dpi(100)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    height = canvas.get_width_height()[1]
    pix = []
    for ax, x, y in points:
        px, py = ax.transData.transform((x, y))
        pix.append((int(height - py), int(px)))
    arr = _rgb(_png(fig))
    assert arr.shape[0] == height
    return arr, pix


def _grid_fig(vals, **kw):
    fig = feature_grid(vals, title="t", **kw)
    return fig, _texts(fig)


def test_partly_nan_map_marks_each_kind_and_keeps_the_finite_colours():
    from lit_probe.figures import _SPECIAL

    vals = _relu_maps(3, c=16, h=12, w=12)
    vals[3:6] = np.nan  # three whole channels
    vals[7, :4, :4] = np.inf
    vals[8, 0, :5] = -np.inf
    fig, texts = _grid_fig(vals)
    ax = _image_axes(fig)[0]
    # tile 0 spans data x, y in [1, 13) (1-pixel separators)
    arr, ((top, left), (bottom, right), nan_px) = _render_at(fig, [(ax, 1.0, 1.0), (ax, 12.0, 12.0),
                                                                   (ax, 13 * 3 + 6.0, 6.0)])
    pal = _SPECIAL[False]
    assert "NaN: 432" in texts and "+Inf: 16" in texts and "-Inf: 5" in texts  # the legend names them
    assert "range 0.5-99.5 pct [0, " in texts
    assert _colour_mask(arr, pal["nan"][0]).sum() > 1000
    assert _colour_mask(arr[nan_px[0]:nan_px[0] + 1, nan_px[1]:nan_px[1] + 1], pal["nan"][0]).all()
    assert _colour_mask(arr, pal["high"][0], tol=2).sum() > 50  # +Inf cells in white
    assert _colour_mask(arr, pal["low"][0]).sum() > 10  # -Inf cells in cyan
    # the finite part keeps a real colour range: many viridis colours, not one field
    tile0 = arr[top:bottom, left:right].reshape(-1, 3)
    assert len(np.unique(tile0, axis=0)) > 20
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 2


def test_a_few_exploded_cells_do_not_flatten_the_map():
    vals = _relu_maps(4, c=16, h=12, w=12)
    vals[0, :3, :3] = 1e19  # 21 of 2,304 cells (0.9 %: enough to move a 99.5 percentile)
    vals[5, 2, :] = 1e19
    fig, texts = _grid_fig(vals)
    ax = _image_axes(fig)[0]
    arr, (hot, cold, (top, left), (bottom, right)) = _render_at(
        fig, [(ax, 2.0, 2.0), (ax, 8.0, 8.0), (ax, 1.0, 1.0), (ax, 12.0, 12.0)])
    lo, hi = robust_range(vals)
    assert 0 <= lo < hi < 10
    assert "outliers far above the range: 21 (to 1.00e+19)" in texts
    assert "data [0, 1.00e+19]" in texts
    white = _colour_mask(arr, "#ffffff", tol=2)
    assert white[hot] and not white[cold]  # exploded cells white, the rest of tile 0 on the viridis scale
    tile0 = arr[top:bottom, left:right].reshape(-1, 3)
    assert len(np.unique(tile0, axis=0)) > 20


def test_exploded_gradient_map_uses_its_own_high_and_low_colours():
    from lit_probe.figures import _SPECIAL

    g = np.random.default_rng(2).normal(size=(4, 10, 10)).astype(np.float32)
    g[0, :2, :2] = 1e19
    g[1, :2, :2] = -1e19
    fig, texts = _grid_fig(g, diverging=True)
    cb = [a for a in fig.axes if a.get_label() == "<colorbar>"][0]
    lo, hi = sorted(cb.get_ylim())
    assert lo == pytest.approx(-hi) and hi < 10
    arr = _rgb(_png(fig))
    pal = _SPECIAL[True]
    assert _colour_mask(arr, pal["high"][0]).sum() > 20 and _colour_mask(arr, pal["low"][0]).sum() > 20
    assert "outliers far below the range: 4" in texts


def test_robust_range_with_many_outliers_and_a_mostly_exploded_map():
    v = np.abs(np.random.default_rng(0).normal(size=10_000))
    v[:300] = 1e19  # 3 %
    assert robust_range(v)[1] < 10
    v[:6000] = 1e19  # most of the map exploded: that is the map now
    assert robust_range(v)[1] > 1e18


def test_only_a_few_values_across_a_big_gap_are_outliers():
    from lit_probe.figures import _inliers

    rng = np.random.default_rng(0)
    assert _inliers(np.exp(rng.normal(size=65536) * 2)).all()  # a continuous heavy tail: none
    assert _inliers(np.maximum(rng.normal(size=4096), 0)).all()
    probs = np.full(10, 1e-3)
    probs[3] = 0.99
    assert _inliers(probs).all()  # a softmax peak is the map's range, not an outlier
    relu = np.maximum(rng.normal(size=4096), 0)
    relu[:5] = 1e5
    assert (~_inliers(relu)).sum() == 5
    g = rng.normal(size=1000)
    g[:3] = -1e19  # by magnitude: negative outliers too
    assert list(np.flatnonzero(~_inliers(g))) == [0, 1, 2]
    assert _inliers(np.array([0.0, 1e19])).all() and _inliers(np.array([1.0])).all()


def test_color_scale_range_for_keeps_the_layer_scale_through_an_exploded_step():
    sc = ColorScale()
    assert sc.range_for(0.0, 2.0) == (0.0, 2.0, True)
    lo, hi, shared = sc.range_for(0.0, 1e19)  # exploded step: own range, the scale is untouched
    assert not shared and hi == 1e19 and sc.range == (0.0, 2.0)
    lo, hi, shared = sc.range_for(0.0, 1e-4)  # collapsed step: own range too
    assert not shared and hi == 1e-4 and sc.range == (0.0, 2.0)
    lo, hi, shared = sc.range_for(0.0, 3.0)  # ordinary growth widens the kept scale
    assert shared and hi >= 3.0 and sc.range == (lo, hi)
    sym = ColorScale(symmetric=True)
    sym.range_for(-1.0, 1.0)
    assert sym.range_for(-5e3, 2e3) == (-5e3, 5e3, False)


def test_one_row_layer_has_integer_ticks_only():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = feature_grid(np.random.default_rng(0).normal(size=(1, 20)).astype(np.float32), title="1-d")
    FigureCanvasAgg(fig).draw()
    ax = _image_axes(fig)[0]
    for axis, lim in ((ax.yaxis, ax.get_ylim()), (ax.xaxis, ax.get_xlim())):
        lo, hi = sorted(lim)
        locs = [t for t in axis.get_majorticklocs() if lo <= t <= hi]
        assert locs and all(float(t).is_integer() for t in locs), locs
        labels = [t.get_text() for t in axis.get_ticklabels() if t.get_text()]
        assert all(lab.lstrip("−-").isdigit() for lab in labels), labels
    assert [t for t in ax.get_yticks() if -0.5 <= t <= 0.5] == [0]
    fig2 = feature_grid(np.random.default_rng(1).normal(size=(3, 300)).astype(np.float32), title="wide")
    FigureCanvasAgg(fig2).draw()
    assert all(float(t).is_integer() for t in _image_axes(fig2)[0].get_xticks())


def _uneven_timeline(findings):
    steps = np.array([0, 2, 3, 5, 6, 8, 9, 20, 30, 50])
    layers = ["a", "b", "c"]
    act = np.tile(10.0 ** np.arange(10), (3, 1))  # one distinct colour per column
    grad = act * 1e-3
    dead = np.zeros((3, 10))
    dead[1, 7:] = 1.0
    return health_timeline(layers, steps, act, grad, dead, findings, title="uneven")


def test_timeline_columns_span_their_true_steps():
    fig = _uneven_timeline([])
    ax = fig.axes[0]
    ext = ax.images[0].get_extent()
    assert ext[0] == pytest.approx(-0.5) and ext[1] == pytest.approx(50.5)
    probe = [0, 2, 3, 5, 6, 8, 9, 13, 16, 20, 24, 26, 30, 50]
    arr, pix = _render_at(fig, [(ax, float(s), 1.0) for s in probe])
    colour = {s: tuple(arr[r, c]) for s, (r, c) in zip(probe, pix)}
    # the cell of step 20 spans 14.5..25 (halfway to 9 and to 30); step 9's cell spans 8.5..14.5
    assert colour[16] == colour[20] == colour[24]
    assert colour[13] == colour[9] != colour[20]
    assert colour[26] == colour[30] != colour[20]
    assert len({colour[s] for s in (0, 2, 3, 5, 6, 8, 9, 20, 30, 50)}) == 10


def test_timeline_x_ticks_are_true_integer_steps():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = _uneven_timeline([])
    FigureCanvasAgg(fig).draw()
    ax = [a for a in fig.axes if a.get_xlabel().startswith("global step")][0]
    lo, hi = ax.get_xlim()
    pairs = [(t.get_position()[0], t.get_text()) for t in ax.get_xticklabels()
             if t.get_text() and lo <= t.get_position()[0] <= hi]  # the drawn ones
    assert len(pairs) >= 4
    for pos, text in pairs:
        assert float(pos).is_integer() and int(text) == int(pos)
    assert [text for _, text in pairs] != ["0", "2", "3", "5", "6", "8", "9", "20", "30", "50"]


def test_timeline_markers_sit_at_their_step_on_the_panel_of_their_signal():
    findings = [("a", 5, "nonfinite", "activation"), ("b", 20, "dead", "activation"),
                ("c", 30, "vanishing", "gradient"), ("a", 8, "exploding", "gradient"),
                ("c", 3, "exploding"), ("nope", 1, "dead", "activation")]
    fig = _uneven_timeline(findings)
    panels = [a for a in fig.axes if a.images and a.get_label() != "<colorbar>"]
    assert len(panels) == 3

    def offsets(ax):
        return sorted(tuple(map(float, xy)) for c in ax.collections for xy in c.get_offsets())

    assert offsets(panels[0]) == [(3.0, 2.0), (5.0, 0.0)]  # activation findings (3-tuple = activation)
    assert offsets(panels[1]) == [(8.0, 0.0), (30.0, 2.0)]  # gradient findings
    assert offsets(panels[2]) == [(20.0, 1.0)]  # dead
    text = _texts(fig)
    for label in ("no value (not measured, or RMS NaN)", "nonfinite (activation panel): 1",
                  "exploding (activation/gradient panel): 2", "vanishing (gradient panel): 1",
                  "dead (dead panel): 1"):
        assert label in text, label
    _png(fig)


@pytest.mark.parametrize("steps", [[7], [0, 5, 5, 9], [9, 0, 5, 3], list(range(0, 15000, 3))],
                         ids=["one", "duplicates", "unsorted", "5000-steps"])
def test_timeline_odd_step_lists_render(steps):
    d = np.ones((2, len(steps)))
    d[0, 0] = np.inf
    fig = health_timeline(["a", "b"], np.array(steps), d, d, np.zeros_like(d), [("a", int(steps[-1]), "dead")])
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert lo <= min(steps) and hi >= max(steps)
    _png(fig)


def test_timeline_no_data_cells_are_grey_and_explained():
    steps = np.arange(4)
    act = np.ones((2, 4))
    act[1, 2:] = np.nan
    fig = health_timeline(["a", "b"], steps, act, act, np.zeros((2, 4)), [])
    text = _texts(fig)
    arr, [(r, c)] = _render_at(fig, [(fig.axes[0], 3.0, 1.0)])
    assert _colour_mask(arr[r:r + 1, c:c + 1], "#c8c8c8", tol=3).all()
    assert "no value (not measured, or RMS NaN)" in text and "no findings" in text


def test_timeline_400_layers_by_1000_steps_is_fast_and_says_how_it_groups():
    rng = np.random.default_rng(0)
    n_l, n_s = 400, 1000
    steps = np.concatenate([np.arange(10), np.arange(1, n_s - 9) * 10])
    act = np.exp(rng.normal(size=(n_l, n_s)))
    layers = [f"blocks.{i}.mlp" for i in range(n_l)]
    t0 = time.perf_counter()
    fig = health_timeline(layers, steps, act, act * 1e-3, rng.random((n_l, n_s)) * 0.1,
                          [("blocks.7.mlp", 500, "dead", "activation")], title="big")
    title, text = fig.get_suptitle(), _texts(fig)
    img = _png(fig)
    elapsed = time.perf_counter() - t0
    assert elapsed < 8  # < 1 s on an idle core; generous for a shared machine
    assert "blocks of 4 consecutive layers" in title and "bins of" in title and "geometric mean" in title
    assert 1000 <= img.size[0] <= 1300 and img.size[1] <= 1500
    assert "blocks.396.mlp (+3)" in text


def test_gradcam_grid_has_captions_and_a_weight_colour_bar():
    from lit_probe.figures import gradcam_grid

    ov = np.random.default_rng(0).random((3, 16, 16, 3)).astype(np.float32)
    fig = gradcam_grid(ov, title="layer4 · Grad-CAM · step 7",
                       labels=["sample 0 · class 3", "sample 1 · class 7"])
    cbs = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    assert len(cbs) == 1
    assert sorted(cbs[0].get_ylim()) == [0.0, 1.0] and "Grad-CAM weight" in cbs[0].get_ylabel()
    titles = [a.get_title() for a in fig.axes if a.images]
    assert titles == ["sample 0 · class 3", "sample 1 · class 7", "sample 2"]
    assert "step 7" in fig.get_suptitle()
    img = _png(fig)
    assert np.asarray(img.convert("L")).std() > 5
    _png(gradcam_grid(ov[:1], title="no labels"))
