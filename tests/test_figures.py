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
    vals = np.full((4, 5, 5), np.nan, dtype=np.float32)
    _png(feature_grid(vals, title="all nan"))
    _png(feature_grid(vals, title="all nan", diverging=True))


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
    assert _red_pixels(_png(feature_grid(vals, title="t", dead=dead_rows))) > 20


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
    _png(fig)


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
    _png(health_timeline(*_timeline_inputs(3, 4)))
    _png(health_timeline(["a"], np.zeros(0), np.zeros((1, 0)), np.zeros((1, 0)), np.zeros((1, 0)), []))
    all_nan = np.full((2, 3), np.nan)
    _png(health_timeline(["a", "b"], np.arange(3), all_nan, all_nan, all_nan, []))


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
