"""Pure drawing: numpy arrays in, :class:`matplotlib.figure.Figure` out.

Everything here uses matplotlib's object-oriented API only (``Figure`` + ``FigureCanvasAgg``): no
``pyplot``, no ``matplotlib.use()``. Rendering therefore works with ``DISPLAY`` unset and with
``MPLBACKEND`` pointing at a GUI backend, never changes the user's backend and never registers a figure
with pyplot (``pyplot.get_fignums()`` is unchanged). Functions here are safe to call from one background
thread (each call works on its own figure) and never touch global warning filters.

Figures:

* :func:`feature_grid` -- one sample's channels tiled into one image (``[C, H, W]``), or a heatmap for
  ``[C, L]`` / ``[rows, features]`` arrays. Requires: a float array. Preview: a square-ish mosaic with a
  colour bar, dead channels framed and crossed in red, non-finite pixels in a distinct colour.
* :func:`histogram` / :func:`histograms` -- value distributions with a log count axis; NaN, +Inf, -Inf
  and exact zeros are counted and printed beside the bins.
* :func:`health_timeline` -- layers x steps heatmaps of activation RMS, gradient RMS and dead fraction
  with findings marked.

This module imports neither torch, lightning nor wandb.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from matplotlib import colors as mcolors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import Colormap
from matplotlib.figure import Figure

__all__ = [
    "ColorScale",
    "feature_grid",
    "figure_to_png",
    "health_timeline",
    "histogram",
    "histograms",
    "robust_range",
]

# Colours chosen to be absent from the colour maps they are drawn over.
_SEQ_CMAP = "viridis"
_DIV_CMAP = "RdBu_r"
_BAD_SEQ = "#ff00ff"  # magenta: NaN / Inf on viridis
_BAD_DIV = "#00d000"  # green: NaN / Inf on red-blue
_PAD = "#3a3a3a"  # separator between tiles
_DEAD = "#ff1a1a"
_GRID_WIDTH_IN = 9.0  # 900 px at dpi 100
_MAX_TILE_LABELS = 64


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _cmap(name: str, bad: str) -> Colormap:
    """Return a copy of a registered colour map with its "bad" colour set (never mutates the registry)."""
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad=bad)


def _nonfinite_counts(values: np.ndarray) -> tuple[int, int, int]:
    """Count NaN, +Inf and -Inf entries of ``values``.

    Args:
        values: any float array.

    Returns:
        ``(n_nan, n_posinf, n_neginf)``.
    """
    if values.size == 0 or not np.issubdtype(values.dtype, np.floating):
        return 0, 0, 0
    n_nan = int(np.count_nonzero(np.isnan(values)))
    n_pos = int(np.count_nonzero(np.isposinf(values)))
    n_neg = int(np.count_nonzero(np.isneginf(values)))
    return n_nan, n_pos, n_neg


def _nonfinite_text(n_nan: int, n_pos: int, n_neg: int) -> str:
    parts = [f"{n} {name}" for n, name in ((n_nan, "NaN"), (n_pos, "+Inf"), (n_neg, "-Inf")) if n]
    return ", ".join(parts)


def _fmt(x: float) -> str:
    """Compact number formatting for titles and labels."""
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    ax = abs(x)
    if ax >= 1e4 or ax < 1e-3:
        return f"{x:.2e}"
    return f"{x:.4g}"


def _finite_range(values: np.ndarray) -> tuple[float, float] | None:
    """Min and max over finite entries, or ``None`` when there are none."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    return float(finite.min()), float(finite.max())


def _robust_range(values: np.ndarray, *, diverging: bool, pct: float = 99.5) -> tuple[float, float]:
    """A colour range that ignores a handful of outliers.

    Args:
        values: any float array (non-finite entries are ignored).
        diverging: return a range symmetric around 0.
        pct: upper percentile kept (the lower one is ``100 - pct``).

    Returns:
        ``(lo, hi)`` with ``lo < hi``.
    """
    finite = values[np.isfinite(values)].astype(np.float64, copy=False)
    if finite.size == 0:
        return (-1.0, 1.0) if diverging else (0.0, 1.0)
    if diverging:
        m = float(np.percentile(np.abs(finite), pct))
        if not m > 0:
            m = float(np.abs(finite).max())
        if not m > 0:
            m = 1.0
        return -m, m
    lo, hi = (float(v) for v in np.percentile(finite, [100.0 - pct, pct]))
    if not hi > lo:
        lo, hi = float(finite.min()), float(finite.max())
    if not hi > lo:
        pad = abs(lo) * 0.5 or 1.0
        lo, hi = lo - pad, hi + pad
    return lo, hi


def robust_range(values: np.ndarray, *, diverging: bool = False) -> tuple[float, float]:
    """The default colour range of :func:`feature_grid`: 0.5-99.5 percentiles (or ±99.5 pct of ``|v|``).

    Feed it to :meth:`ColorScale.update` to keep one layer's images on one scale.

    Args:
        values: any float array (non-finite entries are ignored).
        diverging: return a range symmetric around 0.

    Returns:
        ``(lo, hi)`` with ``lo < hi``; ``(0, 1)`` / ``(-1, 1)`` when nothing is finite.
    """
    return _robust_range(np.asarray(values, dtype=np.float64), diverging=diverging)


def _grid_shape(n: int) -> tuple[int, int]:
    """Rows and columns of a near-square grid holding ``n`` tiles (cols >= rows)."""
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    return rows, cols


# ----------------------------------------------------------------------------------------------
# colour scale
# ----------------------------------------------------------------------------------------------
class ColorScale:
    """A fixed colour range per (layer, figure), so successive images of one layer compare by eye.

    The range is taken from the first values seen and only widened (never narrowed) when later values
    leave it; each widening adds 10 % head-room so a slowly growing signal does not change the scale at
    every step. Plain attributes only, so instances pickle.

    Args:
        symmetric: keep the range symmetric around 0 (gradient / diverging views).
    """

    def __init__(self, symmetric: bool = False) -> None:
        self.symmetric = symmetric
        self.lo: float | None = None
        self.hi: float | None = None

    def update(self, lo: float, hi: float) -> tuple[float, float]:
        """Fold a new value range into the scale.

        Args:
            lo: smallest value of the new data (non-finite values are ignored).
            hi: largest value of the new data.

        Returns:
            The (possibly widened) fixed range ``(lo, hi)`` to draw with; always ``lo < hi``.
        """
        lo_f = float(lo) if math.isfinite(lo) else None
        hi_f = float(hi) if math.isfinite(hi) else None
        if lo_f is not None and hi_f is not None and lo_f > hi_f:
            lo_f, hi_f = hi_f, lo_f
        if self.symmetric:
            m = max((abs(v) for v in (lo_f, hi_f) if v is not None), default=None)
            lo_f, hi_f = (None, None) if m is None else (-m, m)
        if self.lo is None or self.hi is None:
            if lo_f is None or hi_f is None:
                return (-1.0, 1.0) if self.symmetric else (0.0, 1.0)
            if not hi_f > lo_f:
                pad = abs(lo_f) * 0.5 or 1.0
                lo_f, hi_f = lo_f - pad, hi_f + pad
            self.lo, self.hi = lo_f, hi_f
            return self.lo, self.hi
        span = self.hi - self.lo
        if lo_f is not None and lo_f < self.lo:
            self.lo = lo_f - 0.1 * (span + (self.lo - lo_f))
        if hi_f is not None and hi_f > self.hi:
            self.hi = hi_f + 0.1 * (span + (hi_f - self.hi))
        if self.symmetric:
            m = max(abs(self.lo), abs(self.hi))
            self.lo, self.hi = -m, m
        return self.lo, self.hi

    @property
    def range(self) -> tuple[float, float] | None:
        """The current range, or ``None`` before the first finite update."""
        if self.lo is None or self.hi is None:
            return None
        return self.lo, self.hi

    def __repr__(self) -> str:
        return f"ColorScale(symmetric={self.symmetric}, range={self.range})"


# ----------------------------------------------------------------------------------------------
# feature grid
# ----------------------------------------------------------------------------------------------
def _rgba_image(
    data: np.ndarray, norm: mcolors.Normalize, cmap: Colormap, pad_mask: np.ndarray | None
) -> np.ndarray:
    """Map ``data`` to RGBA with non-finite pixels in the cmap's bad colour and padding in ``_PAD``."""
    bad = ~np.isfinite(data)
    safe = np.where(bad, 0.0, data)
    rgba = cmap(norm(safe), bytes=True)
    if bad.any():
        rgba[bad] = np.array(mcolors.to_rgba(cmap.get_bad(), 1.0)) * 255
    if pad_mask is not None:
        rgba[pad_mask] = np.array(mcolors.to_rgba(_PAD)) * 255
    return rgba


def _tile(values: np.ndarray, rows: int, cols: int, sep: int) -> tuple[np.ndarray, np.ndarray]:
    """Tile ``[C, H, W]`` into one ``[rows*(H+sep)+sep, cols*(W+sep)+sep]`` mosaic plus a padding mask."""
    c, h, w = values.shape
    out_h, out_w = rows * (h + sep) + sep, cols * (w + sep) + sep
    mosaic = np.zeros((out_h, out_w), dtype=np.float32)
    pad = np.ones((out_h, out_w), dtype=bool)
    full = np.zeros((rows * cols, h, w), dtype=np.float32)
    full[:c] = values
    present = np.zeros((rows * cols,), dtype=bool)
    present[:c] = True
    # [rows, cols, h, w] -> place with strides
    block = full.reshape(rows, cols, h, w)
    view = mosaic[sep:, sep:].reshape(rows, h + sep, cols, w + sep)[:, :h, :, :w]
    view[...] = block.transpose(0, 2, 1, 3)
    pview = pad[sep:, sep:].reshape(rows, h + sep, cols, w + sep)[:, :h, :, :w]
    pview[...] = ~present.reshape(rows, 1, cols, 1)
    return mosaic, pad


def _box_segments(x0: float, y0: float, x1: float, y1: float, cross: bool) -> list:
    segs = [[(x0, y0), (x1, y0)], [(x1, y0), (x1, y1)], [(x1, y1), (x0, y1)], [(x0, y1), (x0, y0)]]
    if cross:
        segs += [[(x0, y0), (x1, y1)], [(x0, y1), (x1, y0)]]
    return segs


def feature_grid(
    values: np.ndarray,
    *,
    title: str,
    diverging: bool = False,
    vrange: tuple[float, float] | None = None,
    dead: np.ndarray | None = None,
    max_channels: int = 64,
    channel_axis: int | None = None,
) -> Figure:
    """Draw one sample's feature maps as a single image.

    ``[C, H, W]`` arrays are tiled (at most ``max_channels`` channels, rows x cols near square, 1-pixel
    dark separators) and drawn with ONE ``imshow``; ``[C, L]`` and ``[rows, features]`` arrays are drawn
    as a heatmap. Arrays with more than 3 dimensions are reduced to ``[C, H, W]`` by taking the middle
    slice of each extra leading spatial dimension. One global colour range is used (``vrange``, or a
    robust 0.5-99.5 percentile range of the data) and stated in the subtitle and the colour bar; values
    outside it are clipped (the colour bar's triangular ends show that). Non-finite values are drawn in a
    distinct colour (magenta, or green on the diverging map) and counted in the subtitle.

    Requires: a real-valued array with at least one element.

    Args:
        values: ``[C, H, W]``, ``[C, L]`` or ``[rows, features]`` array.
        title: first title line; the caller puts layer, figure kind, step and shape in it.
        diverging: gradient view: red-blue colour map centred at 0 with a symmetric range.
        vrange: fixed colour range (from a :class:`ColorScale`); symmetrised when ``diverging``.
        dead: boolean mask over channels (``[C]``) or features: each dead one gets a red frame (and a red
            cross for tiles).
        max_channels: cap on tiles (``[C, H, W]``) / channel rows (``[C, L]``) / feature columns.
        channel_axis: for 2-D arrays, ``0`` when rows are channels (``[C, L]`` from a 1-D conv), ``1`` when
            columns are features (``[samples or tokens, features]``). ``None``: rows when ``dead`` matches
            only the first dimension, otherwise columns.

    Returns:
        A new :class:`~matplotlib.figure.Figure` (not registered with pyplot).

    Raises:
        ValueError: for a 0-D/1-D or empty array, or ``max_channels < 1``.
    """
    arr = np.asarray(values)
    if max_channels < 1:
        raise ValueError(f"max_channels must be >= 1, got {max_channels}")
    if arr.ndim < 2 or arr.size == 0:
        raise ValueError(f"feature_grid needs a non-empty array with >= 2 dims, got shape {arr.shape}")
    if np.iscomplexobj(arr):
        arr = np.abs(arr)
    arr = arr.astype(np.float32, copy=False)
    while arr.ndim > 3:  # [C, D, H, W] -> middle depth slice
        arr = arr[:, arr.shape[1] // 2]

    n_nan, n_pos, n_neg = _nonfinite_counts(arr)
    cmap = _cmap(_DIV_CMAP if diverging else _SEQ_CMAP, _BAD_DIV if diverging else _BAD_SEQ)
    dead_mask = None if dead is None else np.asarray(dead, dtype=bool).reshape(-1)

    info: list[str] = []
    if arr.ndim == 3:
        c_total = arr.shape[0]
        arr = arr[:max_channels]
        shown = arr.shape[0]
        data_for_range = arr
        kind = "tiles"
    else:
        if channel_axis is None:
            rows_match = dead_mask is not None and dead_mask.shape[0] == arr.shape[0]
            cols_match = dead_mask is not None and dead_mask.shape[0] == arr.shape[1]
            channel_axis = 0 if rows_match and not cols_match else 1
        channel_axis = 0 if channel_axis == 0 else 1
        c_total = arr.shape[channel_axis]
        arr = arr[:max_channels] if channel_axis == 0 else arr[:, :max_channels]
        shown = arr.shape[channel_axis]
        data_for_range = arr
        kind = "rows" if channel_axis == 0 else "cols"
    if dead_mask is not None:
        dead_mask = dead_mask[:shown] if dead_mask.shape[0] >= shown else None

    if vrange is not None and all(math.isfinite(float(v)) for v in vrange) and vrange[1] > vrange[0]:
        lo, hi = float(vrange[0]), float(vrange[1])
        range_note = "fixed range"
    else:
        lo, hi = _robust_range(data_for_range, diverging=diverging)
        range_note = "range 0.5-99.5 pct" if not diverging else "range ±99.5 pct |g|"
    if diverging:
        m = max(abs(lo), abs(hi))
        lo, hi = -m, m
    norm = mcolors.Normalize(vmin=lo, vmax=hi, clip=True)
    fr = _finite_range(data_for_range)

    if shown < c_total:
        unit = "channels" if kind != "cols" else "features"
        info.append(f"showing {shown}/{c_total} {unit}")
    info.append(f"{range_note} [{_fmt(lo)}, {_fmt(hi)}]")
    if fr is not None:
        info.append(f"data [{_fmt(fr[0])}, {_fmt(fr[1])}]")
    nf = _nonfinite_text(n_nan, n_pos, n_neg)
    if nf:
        info.append(f"non-finite ({'green' if diverging else 'magenta'}): {nf}")
    if dead_mask is not None and dead_mask.any():
        info.append(f"dead (red): {int(dead_mask.sum())}/{shown}")

    if kind == "tiles":
        c, h, w = arr.shape
        grid_r, grid_c = _grid_shape(c)
        sep = 1 if max(h, w) < 64 else 2
        mosaic, pad = _tile(arr, grid_r, grid_c, sep)
        img = _rgba_image(mosaic, norm, cmap, pad)
        aspect_hw = img.shape[0] / img.shape[1]
        fig_w = _GRID_WIDTH_IN
        fig_h = min(max(fig_w * 0.85 * aspect_hw + 1.2, 3.5), 14.0)
    else:
        img = _rgba_image(arr, norm, cmap, None)
        n_r, n_c = arr.shape
        fig_w = _GRID_WIDTH_IN
        fig_h = min(max(2.0 + 0.12 * n_r, 3.5), 9.0)

    fig = Figure(figsize=(fig_w, fig_h), layout="constrained")
    ax = fig.add_subplot()
    if kind == "tiles":
        ax.imshow(img, interpolation="nearest", aspect="equal")
        ax.set_xticks([])
        ax.set_yticks([])
        step_h, step_w = h + sep, w + sep
        if c <= _MAX_TILE_LABELS:
            fs = 7 if grid_c <= 8 else 5
            for i in range(c):
                r, q = divmod(i, grid_c)
                ax.text(
                    sep + q * step_w + 0.3,
                    sep + r * step_h + 0.3,
                    str(i),
                    fontsize=fs,
                    color="white",
                    va="top",
                    ha="left",
                    bbox={"boxstyle": "square,pad=0.05", "fc": "black", "ec": "none", "alpha": 0.55},
                )
        else:
            ax.set_xlabel(f"channel = row x {grid_c} + column", fontsize=8)
        if dead_mask is not None and dead_mask.any():
            segs: list = []
            for i in np.flatnonzero(dead_mask):
                r, q = divmod(int(i), grid_c)
                x0 = sep + q * step_w - 0.5
                y0 = sep + r * step_h - 0.5
                segs += _box_segments(x0, y0, x0 + w, y0 + h, cross=True)
            ax.add_collection(LineCollection(segs, colors=_DEAD, linewidths=1.3))
    else:
        ax.imshow(img, interpolation="nearest", aspect="auto")
        n_r, n_c = arr.shape
        if kind == "rows":
            ax.set_ylabel("channel")
            ax.set_xlabel("position")
        else:
            ax.set_ylabel("sample / token")
            ax.set_xlabel("feature")
        if dead_mask is not None and dead_mask.any():
            segs = []
            for i in np.flatnonzero(dead_mask):
                if kind == "rows":
                    segs += _box_segments(-0.5, i - 0.5, n_c - 0.5, i + 0.5, cross=False)
                else:
                    segs += _box_segments(i - 0.5, -0.5, i + 0.5, n_r - 0.5, cross=False)
            ax.add_collection(LineCollection(segs, colors=_DEAD, linewidths=1.3))
        ax.tick_params(labelsize=7)

    sm = ScalarMappable(norm=mcolors.Normalize(vmin=lo, vmax=hi), cmap=cmap)
    cb = fig.colorbar(sm, ax=ax, shrink=0.85, pad=0.01, extend="both", fraction=0.04)
    cb.ax.tick_params(labelsize=7)
    cb.set_label("gradient (0 = white)" if diverging else "activation", fontsize=8)
    fig.suptitle(title, fontsize=11)
    ax.set_title(" · ".join(info), fontsize=8, color="#b00000" if nf else "black")
    return fig


# ----------------------------------------------------------------------------------------------
# histograms
# ----------------------------------------------------------------------------------------------
def _draw_histogram(ax, values: np.ndarray, label: str, bins: int, color: str) -> None:
    """Draw one histogram panel into ``ax`` (log counts, non-finite and zero counts written beside)."""
    flat = np.asarray(values).reshape(-1)
    if np.iscomplexobj(flat):
        flat = np.abs(flat)
    flat = flat.astype(np.float64, copy=False)
    n_total = int(flat.size)
    n_nan, n_pos, n_neg = _nonfinite_counts(flat)
    finite = flat[np.isfinite(flat)]
    n_zero = int(np.count_nonzero(finite == 0))

    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        if not hi > lo:
            pad = abs(lo) * 0.05 or 0.5
            lo, hi = lo - pad, hi + pad
        counts, edges = np.histogram(finite, bins=bins, range=(lo, hi))
        ax.stairs(counts, edges, fill=True, color=color, alpha=0.85)
        ax.set_yscale("log")
        ax.set_ylim(0.7, max(float(counts.max()), 1.0) * 2.0)
        ax.set_xlim(edges[0], edges[-1])
        if lo < 0 < hi:
            ax.axvline(0.0, color="black", lw=0.6, alpha=0.5)
    else:
        ax.set_yscale("log")
        ax.set_ylim(0.7, 10)
        ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center", va="center",
                fontsize=11, color="#b00000")
    ax.set_ylabel("count (log)", fontsize=8)
    ax.set_xlabel("value", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, which="major", axis="y", alpha=0.25)

    nonfinite = n_nan + n_pos + n_neg
    lines = [
        f"n = {n_total:,}",
        f"zeros = {n_zero:,} ({(n_zero / n_total * 100) if n_total else 0.0:.1f}%)",
        f"NaN = {n_nan:,}",
        f"+Inf = {n_pos:,}",
        f"-Inf = {n_neg:,}",
    ]
    if finite.size:
        lines += [
            f"min = {_fmt(float(finite.min()))}",
            f"max = {_fmt(float(finite.max()))}",
            f"mean = {_fmt(float(finite.mean()))}",
            f"std = {_fmt(float(finite.std()))}",
        ]
    ax.text(
        1.02,
        1.0,
        "\n".join(lines),
        transform=ax.transAxes,
        ha="left",
        va="top",
        fontsize=8,
        family="monospace",
        color="#b00000" if nonfinite else "black",
        bbox={"boxstyle": "round,pad=0.3", "fc": "#fff0f0" if nonfinite else "#f4f4f4", "ec": "#999999"},
    )
    suffix = f"  [{_nonfinite_text(n_nan, n_pos, n_neg)}]" if nonfinite else ""
    ax.set_title(label + suffix, fontsize=9, color="#b00000" if nonfinite else "black", loc="left")


def histograms(
    panels: Sequence[tuple[str, np.ndarray]], *, title: str, bins: int = 60
) -> Figure:
    """Draw several histograms stacked in one figure (e.g. a layer's activation and gradient).

    Args:
        panels: ``(label, values)`` pairs, one axes each, top to bottom.
        title: figure title (layer, step, shapes).
        bins: number of bins over the finite range of each panel.

    Returns:
        A new :class:`~matplotlib.figure.Figure`.

    Raises:
        ValueError: when ``panels`` is empty or ``bins < 1``.
    """
    if not panels:
        raise ValueError("histograms needs at least one panel")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    colors = ("#3b6fb6", "#c8553d", "#2a9d8f", "#8a5a9e")
    n = len(panels)
    fig = Figure(figsize=(9.0, 1.0 + 2.6 * n), layout="constrained")
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    for i, ((label, vals), ax) in enumerate(zip(panels, axes)):
        _draw_histogram(ax, vals, label, bins, colors[i % len(colors)])
    fig.suptitle(title, fontsize=11)
    return fig


def histogram(values: np.ndarray, *, title: str, bins: int = 60) -> Figure:
    """Draw the distribution of ``values`` with a log-count axis.

    NaN, +Inf and -Inf never crash the drawing and are never silently dropped: they are counted and
    printed in a box beside the bins (in red when present), together with ``n``, the number and fraction
    of exact zeros, and min/max/mean/std of the finite values. The bins span the finite range.

    Requires: any real array (may be empty or all non-finite).

    Args:
        values: array of any shape (flattened).
        title: figure title (layer, figure, step, shape).
        bins: number of bins.

    Returns:
        A new :class:`~matplotlib.figure.Figure`.

    Raises:
        ValueError: when ``bins < 1``.
    """
    return histograms([("values", values)], title=title, bins=bins)


# ----------------------------------------------------------------------------------------------
# health timeline
# ----------------------------------------------------------------------------------------------
_MAX_COLS = 600  # timeline columns after block reduction
_FINDING_STYLE = {
    "dead": ("X", "#ff1a1a"),
    "exploding": ("^", "#ff8c00"),
    "vanishing": ("v", "#00bcd4"),
    "nonfinite": ("*", "#ff00ff"),
    "non_finite": ("*", "#ff00ff"),
}


def _block_reduce(a: np.ndarray, k: int, how: str) -> np.ndarray:
    """Reduce columns of ``a`` ([L, S]) in blocks of ``k`` ignoring NaN (all-NaN block -> NaN).

    Implemented without ``np.nanmean`` so no RuntimeWarning (and no thread-unsafe warning filter) is needed.
    """
    if k <= 1:
        return a
    n_l, n_s = a.shape
    n_b = math.ceil(n_s / k)
    padded = np.full((n_l, n_b * k), np.nan, dtype=np.float64)
    padded[:, :n_s] = a
    blocks = padded.reshape(n_l, n_b, k)
    valid = ~np.isnan(blocks)
    cnt = valid.sum(axis=2)
    if how == "max":
        filled = np.where(valid, blocks, -np.inf)
        out = filled.max(axis=2)
    else:
        filled = np.where(valid, blocks, 0.0)
        with np.errstate(invalid="ignore", over="ignore"):
            out = filled.sum(axis=2) / np.maximum(cnt, 1)
    out = out.astype(np.float64)
    out[cnt == 0] = np.nan
    return out


def _log_panel_data(a: np.ndarray) -> tuple[np.ma.MaskedArray, float, float, bool]:
    """Prepare an RMS panel for a log colour scale: NaN masked (grey), zeros pushed below vmin (black)."""
    data = np.array(a, dtype=np.float64)
    pos = data[np.isfinite(data) & (data > 0)]
    if pos.size:
        vmin, vmax = float(pos.min()), float(pos.max())
    else:
        vmin, vmax = 1e-8, 1.0
    if not vmax > vmin:
        vmin, vmax = vmin / 10.0, vmax * 10.0
    has_zero = bool(np.any(np.isfinite(data) & (data <= 0)))
    data[np.isfinite(data) & (data <= 0)] = vmin * 1e-3  # drawn in the "under" colour
    data[np.isposinf(data)] = vmax * 1e3  # drawn in the "over" colour
    data[np.isneginf(data)] = vmin * 1e-3
    return np.ma.masked_invalid(data), vmin, vmax, has_zero


def health_timeline(
    layers: list[str],
    steps: np.ndarray,
    act_rms: np.ndarray,
    grad_rms: np.ndarray,
    dead_fraction: np.ndarray,
    findings: list[tuple[str, int, str]],
    *,
    title: str = "",
) -> Figure:
    """Draw layers x steps heatmaps of activation RMS, gradient RMS and dead fraction, findings marked.

    RMS panels use a log colour scale (grey = no data, black = exactly 0, white = +Inf); dead fraction
    runs 0..1. With more than 600 steps, columns are averaged in blocks (dead fraction takes the block
    maximum so short deaths stay visible) and the subtitle says so. Layer labels shrink, and are thinned
    beyond ~60 layers, so 50+ layers x 2,000+ steps stay legible. Findings ``(layer, step, kind)`` are
    drawn on every panel at their block; unknown layers are ignored.

    Requires: ``[len(layers), len(steps)]`` arrays, NaN where there is no data.

    Args:
        layers: layer names, top to bottom.
        steps: the global step of each column (non-decreasing).
        act_rms: activation RMS per layer and step.
        grad_rms: gradient RMS per layer and step.
        dead_fraction: fraction of dead units per layer and step, in ``[0, 1]``.
        findings: ``(layer, step, kind)`` triples, kinds such as ``"dead"``, ``"exploding"``,
            ``"vanishing"``, ``"nonfinite"``.
        title: figure title.

    Returns:
        A new :class:`~matplotlib.figure.Figure`.

    Raises:
        ValueError: when the array shapes do not match ``(len(layers), len(steps))``.
    """
    steps = np.asarray(steps).reshape(-1)
    n_l, n_s = len(layers), int(steps.shape[0])
    arrays = []
    for name, a in (("act_rms", act_rms), ("grad_rms", grad_rms), ("dead_fraction", dead_fraction)):
        a = np.asarray(a, dtype=np.float64)
        if a.shape != (n_l, n_s):
            raise ValueError(f"{name} has shape {a.shape}, expected {(n_l, n_s)} (layers x steps)")
        arrays.append(a)
    act, grad, dead = arrays

    k = max(1, math.ceil(n_s / _MAX_COLS)) if n_s else 1
    act_r = _block_reduce(act, k, "mean")
    grad_r = _block_reduce(grad, k, "mean")
    dead_r = _block_reduce(dead, k, "max")
    n_cols = act_r.shape[1] if n_s else 0

    panel_h = min(max(1.6, 0.075 * n_l + 1.0), 5.5)
    fig = Figure(figsize=(12.0, 3 * panel_h + 1.0), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True, squeeze=False)[:, 0]

    grey = "#c8c8c8"
    panels = []
    a_data, a_lo, a_hi, a_zero = _log_panel_data(act_r)
    g_data, g_lo, g_hi, g_zero = _log_panel_data(grad_r)
    log_cmap_a = _cmap("viridis", grey).with_extremes(under="black", over="white")
    log_cmap_g = _cmap("magma", grey).with_extremes(under="black", over="#00ff00")
    a_norm = mcolors.LogNorm(a_lo, a_hi, clip=False)
    g_norm = mcolors.LogNorm(g_lo, g_hi, clip=False)
    panels.append(("activation RMS (log)", a_data, a_norm, log_cmap_a, a_zero))
    panels.append(("gradient RMS (log)", g_data, g_norm, log_cmap_g, g_zero))
    d = np.ma.masked_invalid(np.clip(dead_r, 0.0, 1.0))
    panels.append(("dead fraction", d, mcolors.Normalize(0.0, 1.0), _cmap("Reds", grey), False))

    label_every = max(1, math.ceil(n_l / 60))
    label_fs = max(4.0, min(9.0, 320.0 / max(math.ceil(n_l / label_every), 1)))
    layer_index = {name: i for i, name in enumerate(layers)}

    # findings -> (col, row, kind)
    pts: dict[str, list[tuple[float, float]]] = {}
    for f in findings:
        try:
            lname, fstep, fkind = f[0], int(f[1]), str(f[2])
        except (TypeError, ValueError, IndexError):
            continue
        row = layer_index.get(lname)
        if row is None or n_s == 0:
            continue
        col = int(np.searchsorted(steps, fstep, side="left"))
        col = min(max(col, 0), n_s - 1) // k
        pts.setdefault(fkind, []).append((col, row))

    for ax, (label, data, norm, cmap, has_zero) in zip(axes, panels):
        if n_cols:
            im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
            extend = "neither" if label == "dead fraction" else "both"
            cb = fig.colorbar(im, ax=ax, pad=0.01, fraction=0.03, extend=extend)
            cb.ax.tick_params(labelsize=7)
        else:
            ax.text(0.5, 0.5, "no data yet", transform=ax.transAxes, ha="center", va="center")
        note = "  (grey = no data" + (", black = 0" if has_zero else "") + ")"
        ax.set_title(label + note, fontsize=9, loc="left")
        ticks = list(range(0, n_l, label_every))
        ax.set_yticks(ticks)
        ax.set_yticklabels([layers[i] for i in ticks], fontsize=label_fs)
        for kind_name, xy in pts.items():
            marker, color = _FINDING_STYLE.get(kind_name.lower(), ("o", "#ffffff"))
            xs, ys = zip(*xy)
            ax.scatter(xs, ys, marker=marker, s=70, c=color, edgecolors="black", linewidths=0.9,
                       label=kind_name, zorder=3, clip_on=False)
        if n_cols:
            ax.set_xlim(-0.5, n_cols - 0.5)
        ax.set_ylim(n_l - 0.5, -0.5)

    if pts:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside upper right", fontsize=8, title="findings",
                   title_fontsize=8, ncol=min(5, len(pts)))
    # x ticks in steps
    if n_cols:
        n_ticks = min(10, n_cols)
        tick_cols = np.unique(np.linspace(0, n_cols - 1, n_ticks).round().astype(int))
        axes[-1].set_xticks(tick_cols)
        axes[-1].set_xticklabels([str(int(steps[min(c * k, n_s - 1)])) for c in tick_cols], fontsize=7)
    axes[-1].set_xlabel("global step" + (f" (columns = mean of {k} log steps; dead = max)" if k > 1 else ""),
                        fontsize=8)
    fig.suptitle(title or f"layer health: {n_l} layers x {n_s} log steps", fontsize=11)
    return fig


# ----------------------------------------------------------------------------------------------
# PNG
# ----------------------------------------------------------------------------------------------
def figure_to_png(fig: Figure, dpi: int = 100) -> bytes:
    """Render ``fig`` to PNG bytes with the Agg canvas and release the figure.

    Args:
        fig: a figure made by this module (or any ``Figure`` not managed by pyplot).
        dpi: output resolution; a 9-inch-wide grid gives 900 px at 100 dpi.

    Returns:
        The PNG file content.
    """
    canvas = FigureCanvasAgg(fig)
    buf = io.BytesIO()
    try:
        # print_png draws once; print_figure would draw twice (a layout pass, then the real one).
        fig.set_dpi(dpi)
        canvas.print_png(buf, metadata={"Software": "lit_probe"})
    finally:
        fig.clear()
        canvas.renderer = None  # drop the Agg buffer now, not at the next GC cycle
    return buf.getvalue()


def gradcam_grid(overlays: np.ndarray, *, title: str, labels: Sequence[str] | None = None) -> Figure:
    """Grad-CAM overlays side by side.

    Args:
        overlays: ``[n, H, W, 3]`` RGB in ``[0, 1]`` (see :func:`lit_probe.gradcam.overlay`).
        title: figure title (layer, step).
        labels: one caption per image (e.g. the class explained).
    """
    n = int(overlays.shape[0])
    fig = Figure(figsize=(2.6 * n + 0.4, 3.0), dpi=100)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for i, ax in enumerate(axes):
        ax.imshow(np.clip(overlays[i], 0.0, 1.0), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if labels is not None and i < len(labels):
            ax.set_title(labels[i], fontsize=9)
    fig.suptitle(title, fontsize=11)
    return fig
