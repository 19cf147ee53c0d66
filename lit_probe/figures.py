"""Pure drawing: numpy arrays in, :class:`matplotlib.figure.Figure` out.

Everything here uses matplotlib's object-oriented API only (``Figure`` + ``FigureCanvasAgg``): no
``pyplot``, no ``matplotlib.use()``. Rendering therefore works with ``DISPLAY`` unset and with
``MPLBACKEND`` pointing at a GUI backend, never changes the user's backend and never registers a figure
with pyplot (``pyplot.get_fignums()`` is unchanged). Functions here are safe to call from one background
thread (each call works on its own figure) and never touch global warning filters.

Figures:

* :func:`feature_grid` -- one sample's channels tiled into one image (``[C, H, W]``), or a heatmap for
  ``[C, L]`` / ``[rows, features]`` arrays. Requires: a float array. Preview: a square-ish mosaic with a
  colour bar, dead units crossed out in red (tiles framed and crossed, heatmap rows / columns framed and
  hatched); NaN, +Inf/-Inf and far outliers in their own colours, named with their counts in a legend; the
  colour range comes from the finite, non-outlier values.
* :func:`histogram` / :func:`histograms` -- value distributions with a log count axis; NaN, +Inf, -Inf
  and exact zeros are counted and printed beside the bins.
* :func:`health_timeline` -- layers x steps heatmaps of activation RMS, gradient RMS and dead fraction on
  a true step axis, each finding marked at its step on the panel of its signal, a legend for every colour
  and marker.
* :func:`gradcam_grid` -- Grad-CAM overlays with captions and a 0..1 colour bar.

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
from matplotlib.collections import LineCollection, PatchCollection
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import NullLocator

__all__ = [
    "DEAD_GID",
    "OUTLIER_GAP",
    "OUTLIER_MAX_FRACTION",
    "ColorScale",
    "feature_grid",
    "figure_to_png",
    "gradcam_grid",
    "health_timeline",
    "histogram",
    "histograms",
    "robust_range",
]

# Colours chosen to be absent from the colour maps they are drawn over. Special cells, per map:
# NaN; "high" = +Inf or a finite value far above the range (an outlier, see _inliers); "low" likewise.
_SEQ_CMAP = "viridis"
_DIV_CMAP = "RdBu_r"
_BAD_SEQ = "#ff00ff"  # magenta: NaN on viridis
_BAD_DIV = "#00d000"  # green: NaN on red-blue
_SPECIAL: dict[bool, dict[str, tuple[str, str]]] = {  # diverging -> kind -> (colour, colour name)
    False: {"nan": (_BAD_SEQ, "magenta"), "high": ("#ffffff", "white"), "low": ("#00e5ff", "cyan")},
    True: {"nan": (_BAD_DIV, "green"), "high": ("#ffd400", "yellow"), "low": ("#00e5ff", "cyan")},
}
_PAD = "#8c8c8c"  # separator between tiles (mid grey: in neither map, unlike black or white)
_DEAD = "#ff1a1a"
_GRID_WIDTH_IN = 9.0  # 900 px at dpi 100
#: Outliers: the largest magnitudes of a map, at most :data:`OUTLIER_MAX_FRACTION` of its cells, that sit above
#: a gap of at least this factor between consecutive magnitudes (``1e19`` cells among values around 1). They
#: take no part in the colour range and are drawn in the "high"/"low" colour when outside it.
OUTLIER_GAP = 1e4
#: At most this fraction of a map's cells (and at least one) can be outliers; more is the map's real range.
OUTLIER_MAX_FRACTION = 0.05
#: The ``gid`` of the artist that marks dead units on a feature grid (crossed tiles, hatched rows / columns).
DEAD_GID = "dead-units"


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


def fmt(x: float) -> str:
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


def _inliers(finite: np.ndarray) -> np.ndarray:
    """Mask of the values that are not outliers (see :data:`OUTLIER_GAP`).

    A layer whose outputs explode in a few cells (``1e19`` among values around 1) would otherwise stretch any
    percentile range as soon as those cells are more than 0.5 % of the map, and draw the rest in one colour.
    Only the top :data:`OUTLIER_MAX_FRACTION` of the magnitudes are looked at: the lowest gap of at least
    :data:`OUTLIER_GAP` between two consecutive ones separates the outliers from the rest. A continuous heavy
    tail has no such gap, and a map that exploded in most of its cells keeps its exploded range (that is then
    the truth of the map). Exact zeros are never outliers.

    Args:
        finite: a 1-D array of finite values.
    """
    keep = np.ones(finite.shape, dtype=bool)
    mag = np.abs(finite)
    cap = max(1, int(OUTLIER_MAX_FRACTION * finite.size))
    if finite.size < 2 or cap + 1 > finite.size:
        cap = finite.size - 1
    if cap < 1:
        return keep
    top = np.sort(np.partition(mag, finite.size - cap - 1)[finite.size - cap - 1:])
    top = top[top > 0]
    if top.size < 2:
        return keep
    with np.errstate(divide="ignore"):
        gaps = np.flatnonzero(top[1:] >= top[:-1] * OUTLIER_GAP)
    if gaps.size == 0:
        return keep
    return mag <= top[gaps[0]]


def _robust_range(values: np.ndarray, *, diverging: bool, pct: float = 99.5) -> tuple[float, float]:
    """A colour range that ignores outliers: percentiles of the finite values that are not outliers.

    Outliers (see :func:`_inliers`: the few largest magnitudes above a gap of :data:`OUTLIER_GAP`) are left
    out before the percentiles are taken, so a few exploded cells cannot flatten the map.

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
    keep = _inliers(finite)
    if not keep.all():
        finite = finite[keep]
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

    Computed over finite values only, after leaving out outliers (at most 5 % of the values, above a gap of
    :data:`OUTLIER_GAP` from the rest), so neither NaN/Inf nor a few ``1e19`` cells move it.

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

    def range_for(self, lo: float, hi: float, *, max_ratio: float = 100.0) -> tuple[float, float, bool]:
        """The range to draw new data with: the kept scale, unless the data is far off it.

        Data whose span is more than ``max_ratio`` times wider, or narrower, than the kept scale (a layer
        that exploded at this step, or whose values collapsed) is drawn with its own range, and the kept scale
        is left as it was: one exploded step must not flatten every later image of the layer (the scale only
        widens), and a collapsed map must not become one colour. Otherwise this is :meth:`update`.

        Args:
            lo: smallest value of the new data (robust; non-finite values are ignored).
            hi: largest value of the new data.
            max_ratio: how far the spans may differ before the data gets its own range (> 1).

        Returns:
            ``(lo, hi, shared)``: the range (``lo < hi``) and whether it is the kept scale.
        """
        cur = self.range
        if cur is not None and math.isfinite(lo) and math.isfinite(hi) and hi > lo:
            nlo, nhi = float(lo), float(hi)
            if self.symmetric:
                m = max(abs(nlo), abs(nhi))
                nlo, nhi = -m, m
            span_new, span_cur = nhi - nlo, cur[1] - cur[0]
            if span_new > max_ratio * span_cur or span_new * max_ratio < span_cur:
                return nlo, nhi, False
        out = self.update(lo, hi)
        return out[0], out[1], True

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
def _special_masks(data: np.ndarray, lo: float, hi: float) -> dict[str, np.ndarray]:
    """Masks of the cells drawn in a special colour: ``nan``, ``high`` (+Inf or an outlier above ``hi``),
    ``low`` (-Inf or an outlier below ``lo``), plus ``high_outlier`` / ``low_outlier`` (the finite part).

    An outlier is a finite value that :func:`_inliers` rejects; one inside ``[lo, hi]`` (e.g. a fixed range
    that already covers it) is drawn normally.
    """
    finite = np.isfinite(data)
    out = {"nan": np.isnan(data), "pos": np.isposinf(data), "neg": np.isneginf(data)}
    hi_out = np.zeros(data.shape, dtype=bool)
    lo_out = np.zeros(data.shape, dtype=bool)
    if finite.any():
        vals = data[finite].astype(np.float64, copy=False)
        outl = ~_inliers(vals)
        if outl.any():
            idx = np.flatnonzero(finite.reshape(-1))[outl]
            v = vals[outl]
            hi_out.reshape(-1)[idx[v > hi]] = True
            lo_out.reshape(-1)[idx[v < lo]] = True
    out["high_outlier"], out["low_outlier"] = hi_out, lo_out
    out["high"] = out["pos"] | hi_out
    out["low"] = out["neg"] | lo_out
    return out


def _rgba_image(
    data: np.ndarray,
    norm: mcolors.Normalize,
    cmap: Colormap,
    pad_mask: np.ndarray | None,
    special: dict[str, np.ndarray] | None = None,
    palette: dict[str, tuple[str, str]] | None = None,
) -> np.ndarray:
    """Map ``data`` to RGBA bytes: finite cells through ``cmap``, special cells in their colours.

    Non-finite cells get the cmap's bad colour unless ``special``/``palette`` (from :func:`_special_masks`,
    :data:`_SPECIAL`) give NaN, high and low cells their own colours; padding is drawn in ``_PAD``.
    """
    bad = ~np.isfinite(data)
    safe = np.where(bad, 0.0, data)
    rgba = cmap(norm(safe), bytes=True)
    if bad.any():
        rgba[bad] = np.array(mcolors.to_rgba(cmap.get_bad(), 1.0)) * 255
    if special is not None and palette is not None:
        for key in ("nan", "high", "low"):
            m = special[key]
            if m.any():
                rgba[m] = np.array(mcolors.to_rgba(palette[key][0], 1.0)) * 255
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


def _integer_ticks(axis, n: int) -> None:
    """Integer ticks only on an image axis of ``n`` cells (cells sit at 0..n-1)."""
    from matplotlib.ticker import MaxNLocator

    if n <= 10:
        axis.set_ticks(list(range(n)))
    else:
        axis.set_major_locator(MaxNLocator(nbins=10, integer=True, steps=[1, 2, 5, 10]))


def _special_legend(
    fig: Figure, special: dict[str, np.ndarray], palette: dict[str, tuple[str, str]], data: np.ndarray,
    n_dead: int,
) -> None:
    """A figure legend naming each special colour present: NaN, +Inf/high, -Inf/low outliers, dead."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list = []
    n_nan = int(special["nan"].sum())
    if n_nan:
        handles.append(Patch(facecolor=palette["nan"][0], edgecolor="black", label=f"NaN: {n_nan:,}"))
    for key, inf_name, out_key, word in (("high", "+Inf", "pos", "above"), ("low", "-Inf", "neg", "below")):
        parts = []
        n_inf = int(special[out_key].sum())
        if n_inf:
            parts.append(f"{inf_name}: {n_inf:,}")
        om = special[f"{key}_outlier"]
        n_out = int(om.sum())
        if n_out:
            ext = float(data[om].max() if key == "high" else data[om].min())
            parts.append(f"outliers far {word} the range: {n_out:,} (to {fmt(ext)})")
        if parts:
            handles.append(Patch(facecolor=palette[key][0], edgecolor="black", label=" · ".join(parts)))
    if n_dead:
        handles.append(Line2D([], [], color=_DEAD, lw=1.5, label=f"dead: {n_dead}"))
    if handles:  # in the strip the caller keeps free under the image (:func:`_legend_rows` rows)
        fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 3),
                   fontsize=8, frameon=False, handlelength=1.2)


def _legend_rows(special: dict[str, np.ndarray], n_dead: int) -> int:
    """How many rows :func:`_special_legend` takes (3 entries a row; 0 when it draws nothing)."""
    n = int(bool(special["nan"].any())) + int(n_dead > 0)
    n += int(bool(special["pos"].any() or special["high_outlier"].any()))
    n += int(bool(special["neg"].any() or special["low_outlier"].any()))
    return -(-n // 3)


def feature_grid(
    values: np.ndarray,
    *,
    title: str,
    diverging: bool = False,
    vrange: tuple[float, float] | None = None,
    dead: np.ndarray | None = None,
    max_channels: int = 64,
    channel_axis: int | None = None,
    note: str | None = None,
) -> Figure:
    """Draw one sample's feature maps as a single image.

    ``[C, H, W]`` arrays are tiled (at most ``max_channels`` channels, rows x cols near square, 1-pixel
    grey separators) and drawn with ONE ``imshow``; ``[C, L]`` and ``[rows, features]`` arrays are drawn
    as a heatmap with integer ticks only (a one-row ``[1, F]`` layer gets the single tick 0). Arrays with
    more than 3 dimensions are reduced to ``[C, H, W]`` by taking the middle slice of each extra leading
    spatial dimension.

    Colours: one global range (``vrange``, or :func:`robust_range` of the data: 0.5-99.5 percentiles of the
    finite values that are not outliers) is used and stated in the subtitle and the colour bar; values just
    outside it are clipped to the end colours (the colour bar's triangular ends). Cells that are not on the
    scale keep their own colours, named in a legend under the image with their counts: NaN (magenta;
    green on the diverging map), +Inf or outliers far above the range (white; yellow on the diverging map),
    -Inf or outliers far below it (cyan). Outliers are the few largest magnitudes (at most 5 % of the cells)
    separated from the rest by a factor of at least :data:`OUTLIER_GAP`, so a map with a few ``1e19`` cells
    shows the finite bulk with its own structure and the exploded cells in the "high" colour, never a field
    of one colour.

    Requires: a real-valued array with at least one element.

    Args:
        values: ``[C, H, W]``, ``[C, L]`` or ``[rows, features]`` array.
        title: first title line; the caller puts layer, figure kind, step and what the data covers in it.
        diverging: gradient view: red-blue colour map centred at 0 with a symmetric range.
        vrange: fixed colour range (from a :class:`ColorScale`); symmetrised when ``diverging``.
        dead: boolean mask over the units (``[C]`` channels or features, as many as the tensor has on its
            unit axis; the first ``max_channels`` are shown): each dead one is crossed out in red -- a red frame
            and cross on its tile, a red frame and hatch over its whole row or column of a heatmap.
        max_channels: cap on tiles (``[C, H, W]``) / channel rows (``[C, L]``) / feature columns.
        channel_axis: for 2-D arrays, the axis that holds the units: ``0`` when rows are channels (``[C, L]``
            from a 1-D conv), ``1`` (also ``None``) when columns are features (``[samples or tokens,
            features]``). The caller takes it from :func:`lit_probe.vocab.unit_dim`; it is never guessed.
        note: extra text for the subtitle (e.g. where ``vrange`` comes from).

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

    cmap = _cmap(_DIV_CMAP if diverging else _SEQ_CMAP, _BAD_DIV if diverging else _BAD_SEQ)
    palette = _SPECIAL[bool(diverging)]
    dead_mask = None if dead is None else np.asarray(dead, dtype=bool).reshape(-1)

    info: list[str] = []
    if arr.ndim == 3:
        c_total = arr.shape[0]
        arr = arr[:max_channels]
        shown = arr.shape[0]
        kind = "tiles"
    else:
        channel_axis = 0 if channel_axis == 0 else 1
        c_total = arr.shape[channel_axis]
        arr = arr[:max_channels] if channel_axis == 0 else arr[:, :max_channels]
        shown = arr.shape[channel_axis]
        kind = "rows" if channel_axis == 0 else "cols"
    if dead_mask is not None:
        dead_mask = dead_mask[:shown] if dead_mask.shape[0] >= shown else None
    n_nan, n_pos, n_neg = _nonfinite_counts(arr)

    if vrange is not None and all(math.isfinite(float(v)) for v in vrange) and vrange[1] > vrange[0]:
        lo, hi = float(vrange[0]), float(vrange[1])
        range_note = "fixed range"
    else:
        lo, hi = _robust_range(arr, diverging=diverging)
        range_note = "range 0.5-99.5 pct" if not diverging else "range ±99.5 pct |g|"
    if diverging:
        m = max(abs(lo), abs(hi))
        lo, hi = -m, m
    norm = mcolors.Normalize(vmin=lo, vmax=hi, clip=True)
    fr = _finite_range(arr)
    special = _special_masks(arr, lo, hi)
    n_outliers = int(special["high_outlier"].sum() + special["low_outlier"].sum())

    if shown < c_total:
        unit = "channels" if kind != "cols" else "features"
        info.append(f"showing {shown}/{c_total} {unit}")
    if note:
        info.append(note)
    info.append(f"{range_note} [{fmt(lo)}, {fmt(hi)}]")
    if fr is not None:
        info.append(f"data [{fmt(fr[0])}, {fmt(fr[1])}]")
    nf = _nonfinite_text(n_nan, n_pos, n_neg)
    if nf:
        info.append(f"non-finite: {nf}")
    if n_outliers:
        info.append(f"{n_outliers} outlier(s) off the scale")
    if dead_mask is not None and dead_mask.any():
        info.append(f"dead (red): {int(dead_mask.sum())}/{shown}")

    if kind == "tiles":
        c, h, w = arr.shape
        grid_r, grid_c = _grid_shape(c)
        sep = 1 if max(h, w) < 64 else 2
        mosaic, pad = _tile(arr, grid_r, grid_c, sep)
        img = _rgba_image(mosaic, norm, cmap, pad, _special_masks(mosaic, lo, hi), palette)
        aspect_hw = img.shape[0] / img.shape[1]
        fig_w = _GRID_WIDTH_IN
        fig_h = min(max(fig_w * 0.85 * aspect_hw + 1.2, 3.5), 14.0)
    else:
        img = _rgba_image(arr, norm, cmap, None, special, palette)
        n_r, n_c = arr.shape
        fig_w = _GRID_WIDTH_IN
        fig_h = min(max(2.0 + 0.12 * n_r, 3.5), 9.0)

    # fixed layout (inches), not constrained layout: that measured every text and tick label several times
    # over and was half of the drawing time of a figure step
    n_dead = int(dead_mask.sum()) if dead_mask is not None else 0
    top = 0.62  # suptitle and subtitle
    bottom = 0.12 + 0.24 * _legend_rows(special, n_dead)
    if kind == "tiles":
        left, right = 0.4, 1.05  # row numbers; colour bar, its ticks and its label
        bottom += 0.28  # the x label
        top += 0.15  # column numbers
    else:
        left, right = 0.7, 1.05
        bottom += 0.55  # tick labels and x label
    avail_w, avail_h = fig_w - left - right, fig_h - top - bottom
    if kind == "tiles":  # the image box itself (aspect "equal"), centred; the colour bar right beside it
        k = min(avail_w / img.shape[1], avail_h / img.shape[0])
        box_w, box_h = img.shape[1] * k, img.shape[0] * k
        x0, y0 = left + (avail_w - box_w) / 2, bottom + (avail_h - box_h) / 2
    else:
        box_w, box_h, x0, y0 = avail_w, avail_h, left, bottom
    fig = Figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes((x0 / fig_w, y0 / fig_h, box_w / fig_w, box_h / fig_h))
    cb_h = 0.85 * box_h
    cax = fig.add_axes(((x0 + box_w + 0.1) / fig_w, (y0 + (box_h - cb_h) / 2) / fig_h, 0.14 / fig_w, cb_h / fig_h),
                       label="<colorbar>")
    if kind == "tiles":
        ax.imshow(img, interpolation="nearest", aspect="equal")
        step_h, step_w = h + sep, w + sep
        # tiles are numbered by their row (the first channel of it, left) and their column (top): 16 tick labels
        # instead of a boxed number per tile, which was half of the grid's drawing time
        every = -(-max(grid_r, grid_c) // 16)
        cols = list(range(0, grid_c, every))
        rows = list(range(0, grid_r, every))
        ax.set_xticks([sep + q * step_w + (w - 1) / 2 for q in cols], [str(q) for q in cols])
        ax.set_yticks([sep + r * step_h + (h - 1) / 2 for r in rows], [str(r * grid_c) for r in rows])
        ax.xaxis.tick_top()
        ax.tick_params(length=0, pad=2, labelsize=6 if grid_c > 8 else 7)
        ax.set_xlabel(f"channel = row's number (left) + column's (top), {grid_c} to a row", fontsize=8)
        if dead_mask is not None and dead_mask.any():
            segs: list = []
            for i in np.flatnonzero(dead_mask):
                r, q = divmod(int(i), grid_c)
                x0 = sep + q * step_w - 0.5
                y0 = sep + r * step_h - 0.5
                segs += _box_segments(x0, y0, x0 + w, y0 + h, cross=True)
            ax.add_collection(LineCollection(segs, colors=_DEAD, linewidths=1.3, gid=DEAD_GID))
    else:
        ax.imshow(img, interpolation="nearest", aspect="auto")
        n_r, n_c = arr.shape
        if kind == "rows":
            ax.set_ylabel("channel")
            ax.set_xlabel("position")
        else:
            ax.set_ylabel("sample / token")
            ax.set_xlabel("feature")
        _integer_ticks(ax.yaxis, n_r)
        _integer_ticks(ax.xaxis, n_c)
        ax.set_xlim(-0.5, n_c - 0.5)
        ax.set_ylim(n_r - 0.5, -0.5)
        if dead_mask is not None and dead_mask.any():
            # each dead unit's whole row (channels) or column (features: every token of it) framed and hatched
            boxes = [Rectangle((-0.5, i - 0.5), n_c, 1.0) if kind == "rows"
                     else Rectangle((i - 0.5, -0.5), 1.0, n_r) for i in np.flatnonzero(dead_mask)]
            ax.add_collection(PatchCollection(boxes, facecolors="none", edgecolors=_DEAD, linewidths=1.3,
                                              hatch="xx", gid=DEAD_GID))
        ax.tick_params(labelsize=7)

    sm = ScalarMappable(norm=mcolors.Normalize(vmin=lo, vmax=hi), cmap=cmap)
    cb = fig.colorbar(sm, cax=cax, extend="both")
    cb.ax.tick_params(labelsize=7)
    cb.set_label("gradient (0 = white)" if diverging else "activation", fontsize=8)
    _special_legend(fig, special, palette, arr, n_dead)
    fig.suptitle(title, fontsize=11, y=1.0 - 0.08 / fig_h, va="top")
    # an explicit y: matplotlib does not measure the axes' tick labels to place the title
    ax.set_title(" · ".join(info), fontsize=8, color="#b00000" if (nf or n_outliers) else "black", y=1.0,
                 pad=14 if kind == "tiles" else 6)  # above the column numbers of a tile grid
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
        ax.yaxis.set_minor_locator(NullLocator())  # unlabelled, and most of a histogram's drawing time
        ax.set_ylim(0.7, max(float(counts.max()), 1.0) * 2.0)
        ax.set_xlim(edges[0], edges[-1])
        if lo < 0 < hi:
            ax.axvline(0.0, color="black", lw=0.6, alpha=0.5)
    else:
        ax.set_yscale("log")
        ax.yaxis.set_minor_locator(NullLocator())
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
            f"min = {fmt(float(finite.min()))}",
            f"max = {fmt(float(finite.max()))}",
            f"mean = {fmt(float(finite.mean()))}",
            f"std = {fmt(float(finite.std()))}",
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
    ax.set_title(label + suffix, fontsize=9, color="#b00000" if nonfinite else "black", loc="left", y=1.0)


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
    # fixed layout (inches): the statistics box at the right of each panel, its title above, its x label below
    fig_w, fig_h = 9.0, 1.0 + 2.6 * n
    top, left, right, above, below = 0.45, 0.75, 2.05, 0.3, 0.5
    slot = (fig_h - top - 0.05) / n
    fig = Figure(figsize=(fig_w, fig_h))
    for i, (label, vals) in enumerate(panels):
        y = fig_h - top - (i + 1) * slot + below
        ax = fig.add_axes((left / fig_w, y / fig_h, (fig_w - left - right) / fig_w, (slot - above - below) / fig_h))
        _draw_histogram(ax, vals, label, bins, colors[i % len(colors)])
    fig.suptitle(title, fontsize=11, y=1.0 - 0.1 / fig_h, va="top")
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
_MAX_COLS = 500  # step bins of the timeline's x axis
_MAX_ROWS = 120  # layer rows drawn; more layers are grouped in blocks
_MAX_ROW_LABELS = 40
_NO_DATA = "#c8c8c8"  # grey: no value
_ACT_OVER = "#ffffff"  # +Inf activation RMS (viridis has no white)
_GRAD_OVER = "#00ff00"  # +Inf gradient RMS (magma has no green)
_FINDING_STYLE = {
    "dead": ("X", "#ff1a1a"),
    "exploding": ("^", "#ff8c00"),
    "vanishing": ("v", "#00bcd4"),
    "nonfinite": ("*", "#ff00ff"),
    "non_finite": ("*", "#ff00ff"),
}
_PANELS = ("activation", "gradient", "dead")


def _block_reduce(a: np.ndarray, k: int, how: str) -> np.ndarray:
    """Reduce columns of ``a`` ([L, S]) in blocks of ``k`` ignoring NaN (all-NaN block -> NaN).

    ``how``: ``"max"``, ``"mean"`` or ``"gmean"`` (geometric mean of non-negative values: any +Inf gives
    +Inf, otherwise any 0 gives 0). Implemented without ``np.nanmean`` so no RuntimeWarning (and no
    thread-unsafe warning filter) is needed.
    """
    if k <= 1:
        return a
    n_l, n_s = a.shape
    n_b = math.ceil(n_s / k)
    padded = np.full((n_l, n_b * k), np.nan, dtype=np.float64)
    padded[:, :n_s] = a
    return _reduce_groups(padded.reshape(n_l, n_b, k), how)


def _reduce_groups(blocks: np.ndarray, how: str) -> np.ndarray:
    """Reduce the last axis of ``blocks`` ignoring NaN (all-NaN -> NaN); see :func:`_block_reduce`."""
    valid = ~np.isnan(blocks)
    cnt = valid.sum(axis=-1)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if how == "max":
            out = np.where(valid, blocks, -np.inf).max(axis=-1)
        elif how == "gmean":
            pos = np.where(valid, np.abs(blocks), 1.0)
            any_inf = (valid & np.isposinf(pos)).any(axis=-1)
            any_zero = (valid & (pos == 0)).any(axis=-1)
            logs = np.where(valid & (pos > 0) & np.isfinite(pos), np.log(np.where(pos > 0, pos, 1.0)), 0.0)
            out = np.exp(logs.sum(axis=-1) / np.maximum(cnt, 1))
            out = np.where(any_zero, 0.0, out)
            out = np.where(any_inf, np.inf, out)
        else:
            out = np.where(valid, blocks, 0.0).sum(axis=-1) / np.maximum(cnt, 1)
    out = np.asarray(out, dtype=np.float64)
    out[cnt == 0] = np.nan
    return out


def _step_edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges on the step axis: each log step's cell is centred on it and reaches halfway to its
    neighbours (the first and last cells reach half a step beyond the first and last log step)."""
    s = steps.astype(np.float64)
    edges = np.empty(s.size + 1, dtype=np.float64)
    edges[1:-1] = (s[:-1] + s[1:]) / 2.0
    edges[0] = s[0] - 0.5
    edges[-1] = s[-1] + 0.5
    return np.maximum.accumulate(edges)


def _bin_columns(
    data: np.ndarray, steps: np.ndarray, edges: np.ndarray, n_bins: int, how: str
) -> np.ndarray:
    """Resample ``[rows, steps]`` onto ``n_bins`` equal step bins spanning ``edges[0]..edges[-1]``.

    A bin that holds log steps gets their reduction (``how``, NaN ignored); a bin holding none gets the value
    of the cell that covers its centre, so every bin shows the log step it belongs to on the true axis.
    """
    n_r, n_s = data.shape
    x0, x1 = float(edges[0]), float(edges[-1])
    width = (x1 - x0) / n_bins
    centres = x0 + (np.arange(n_bins) + 0.5) * width
    cover = np.clip(np.searchsorted(edges, centres, side="right") - 1, 0, n_s - 1)
    out = data[:, cover].astype(np.float64, copy=True)
    b = np.clip(((steps.astype(np.float64) - x0) / width).astype(np.int64), 0, n_bins - 1)
    counts = np.bincount(b, minlength=n_bins)
    order = np.argsort(b, kind="stable")  # columns grouped by bin, in step order
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    single = np.flatnonzero(counts == 1)
    if single.size:
        out[:, single] = data[:, order[starts[single]]]
    multi = np.flatnonzero(counts > 1)
    if multi.size:
        # pad the columns of each crowded bin to the largest count with NaN, then reduce
        groups = np.full((n_r, multi.size, int(counts.max())), np.nan, dtype=np.float64)
        for gi, bi in enumerate(multi):
            cols = order[starts[bi]:starts[bi] + counts[bi]]
            groups[:, gi, : cols.size] = data[:, cols]
        out[:, multi] = _reduce_groups(groups, how)
    return out


def _log_panel_data(a: np.ndarray) -> tuple[np.ma.MaskedArray, float, float, bool, bool]:
    """Prepare an RMS panel for a log colour scale: NaN masked (grey), zeros pushed below vmin (black),
    +Inf pushed above vmax (the panel's "over" colour). Returns ``(data, vmin, vmax, has_zero, has_inf)``."""
    data = np.array(a, dtype=np.float64)
    pos = data[np.isfinite(data) & (data > 0)]
    if pos.size:
        vmin, vmax = float(pos.min()), float(pos.max())
    else:
        vmin, vmax = 1e-8, 1.0
    if not vmax > vmin:
        vmin, vmax = vmin / 10.0, vmax * 10.0
    has_zero = bool(np.any(np.isfinite(data) & (data <= 0)))
    has_inf = bool(np.any(np.isposinf(data)))
    data[np.isfinite(data) & (data <= 0)] = vmin * 1e-3  # drawn in the "under" colour
    data[np.isposinf(data)] = vmax * 1e3  # drawn in the "over" colour
    data[np.isneginf(data)] = vmin * 1e-3
    return np.ma.masked_invalid(data), vmin, vmax, has_zero, has_inf


def _finding_panel(kind: str, signal: str) -> int:
    """Which timeline panel a finding is marked on: dead -> dead fraction, gradient -> gradient RMS,
    everything else (activation non-finite / exploding / vanishing) -> activation RMS."""
    if kind.lower() == "dead":
        return 2
    return 1 if signal.lower().startswith("grad") else 0


def health_timeline(
    layers: list[str],
    steps: np.ndarray,
    act_rms: np.ndarray,
    grad_rms: np.ndarray,
    dead_fraction: np.ndarray,
    findings: Sequence[tuple],
    *,
    title: str = "",
) -> Figure:
    """Draw layers x steps heatmaps of activation RMS, gradient RMS and dead fraction, findings marked.

    The x axis is the true global step: each log step's cell is centred on its step and reaches halfway to
    its neighbours, so unevenly spaced log steps (every step at first, then every N) take the width they
    span, and tick labels are real step numbers. The columns are resampled onto at most 500 equal step bins;
    a bin holding several log steps shows their geometric mean (dead fraction: their maximum), and the title
    says so. More than 120 layers are grouped into blocks of consecutive layers the same way (title says so).

    Cells: RMS panels use a log colour scale; grey = no value (the layer was not measured at that step, or
    its RMS was NaN), black = RMS exactly 0, white (activation) / green (gradient) = RMS +Inf; dead fraction
    runs 0..1 (grey = not known yet). A legend above the panels explains the cell colours and the finding
    markers: each finding is drawn at its exact step on its layer's row, on the panel of its signal --
    activation findings (non-finite, exploding) on the activation RMS panel, gradient findings (non-finite,
    exploding, vanishing) on the gradient panel, ``dead`` on the dead-fraction panel. Unknown layers are
    ignored. 400 layers x 1,000 steps draw in well under 2 s.

    Requires: ``[len(layers), len(steps)]`` arrays, NaN where there is no data.

    Args:
        layers: layer names, top to bottom.
        steps: the global step of each column (non-decreasing).
        act_rms: activation RMS per layer and step.
        grad_rms: gradient RMS per layer and step.
        dead_fraction: fraction of dead units per layer and step, in ``[0, 1]``.
        findings: ``(layer, step, kind, signal)`` tuples, kinds such as ``"dead"``, ``"exploding"``,
            ``"vanishing"``, ``"nonfinite"``, signals ``"activation"`` / ``"gradient"``; 3-tuples
            ``(layer, step, kind)`` are read as activation findings.
        title: figure title (first line); a second line states any grouping of rows or columns.

    Returns:
        A new :class:`~matplotlib.figure.Figure`.

    Raises:
        ValueError: when the array shapes do not match ``(len(layers), len(steps))``.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator, StrMethodFormatter

    steps = np.asarray(steps).reshape(-1)
    n_l, n_s = len(layers), int(steps.shape[0])
    arrays = []
    for name, a in (("act_rms", act_rms), ("grad_rms", grad_rms), ("dead_fraction", dead_fraction)):
        a = np.asarray(a, dtype=np.float64)
        if a.shape != (n_l, n_s):
            raise ValueError(f"{name} has shape {a.shape}, expected {(n_l, n_s)} (layers x steps)")
        arrays.append(a)
    act, grad, dead = arrays
    if n_s:
        order = np.argsort(steps, kind="stable")
        if np.any(order != np.arange(n_s)):
            steps, act, grad, dead = steps[order], act[:, order], grad[:, order], dead[:, order]

    # rows: group consecutive layers when there are too many to draw one row each
    kr = max(1, math.ceil(n_l / _MAX_ROWS))
    if kr > 1:
        act, grad, dead = (_block_reduce(x.T, kr, how).T for x, how in
                           ((act, "gmean"), (grad, "gmean"), (dead, "max")))
    n_rows = act.shape[0]
    notes: list[str] = []
    if kr > 1:
        notes.append(f"rows: {n_rows} blocks of {kr} consecutive layers")

    # columns: true step axis, resampled onto equal step bins
    n_bins = 0
    if n_s:
        edges = _step_edges(steps)
        n_bins = _MAX_COLS
        act = _bin_columns(act, steps, edges, n_bins, "gmean")
        grad = _bin_columns(grad, steps, edges, n_bins, "gmean")
        dead = _bin_columns(dead, steps, edges, n_bins, "max")
        x0, x1 = float(edges[0]), float(edges[-1])
        width = (x1 - x0) / n_bins
        crowded = int(np.bincount(np.clip(((steps - x0) / width).astype(np.int64), 0, n_bins - 1)).max())
        if crowded > 1:
            notes.append(f"columns: {n_bins} bins of {fmt(width)} steps (up to {crowded} log steps each)")
    if notes:
        notes.append("grouped cells: geometric mean of RMS, max of dead fraction")

    a_data, a_lo, a_hi, a_zero, a_inf = _log_panel_data(act)
    g_data, g_lo, g_hi, g_zero, g_inf = _log_panel_data(grad)
    log_cmap_a = _cmap("viridis", _NO_DATA).with_extremes(under="black", over=_ACT_OVER)
    log_cmap_g = _magma_without_black().with_extremes(bad=_NO_DATA, under="black", over=_GRAD_OVER)
    panels = [
        ("activation RMS (log)", a_data, mcolors.LogNorm(a_lo, a_hi, clip=False), log_cmap_a, a_zero, a_inf,
         "white"),
        ("gradient RMS (log)", g_data, mcolors.LogNorm(g_lo, g_hi, clip=False), log_cmap_g, g_zero, g_inf,
         "green"),
        ("dead fraction", np.ma.masked_invalid(np.clip(dead, 0.0, 1.0)), mcolors.Normalize(0.0, 1.0),
         _cmap("Reds", _NO_DATA), False, False, ""),
    ]

    label_every = max(1, math.ceil(n_rows / _MAX_ROW_LABELS))
    label_fs = max(4.0, min(9.0, 240.0 / max(math.ceil(n_rows / label_every), 1)))
    layer_index = {name: i for i, name in enumerate(layers)}
    if kr > 1:
        row_labels = [f"{layers[i * kr]} (+{min(kr, n_l - i * kr) - 1})" for i in range(n_rows)]
    else:
        row_labels = list(layers)
    ticks = list(range(0, n_rows, label_every))
    if n_rows and ticks[-1] != n_rows - 1:  # always name the last row
        if n_rows - 1 - ticks[-1] < label_every / 2 and len(ticks) > 1:
            ticks[-1] = n_rows - 1
        else:
            ticks.append(n_rows - 1)

    # findings -> panel -> kind -> [(step, row)]
    pts: list[dict[str, list[tuple[float, float]]]] = [{}, {}, {}]
    for f in findings:
        try:
            lname, fstep, fkind = f[0], int(f[1]), str(f[2])
            fsig = str(f[3]) if len(f) > 3 else "activation"
        except (TypeError, ValueError, IndexError):
            continue
        row = layer_index.get(lname)
        if row is None or n_s == 0:
            continue
        pts[_finding_panel(fkind, fsig)].setdefault(fkind, []).append((float(fstep), float(row // kr)))

    # one legend for every colour and marker
    handles: list = [Patch(facecolor=_NO_DATA, edgecolor="black",
                           label="no value (not measured, or RMS NaN)")]
    if a_zero or g_zero:
        handles.append(Patch(facecolor="black", edgecolor="black", label="RMS = 0"))
    if a_inf:
        handles.append(Patch(facecolor=_ACT_OVER, edgecolor="black", label="activation RMS = +Inf"))
    if g_inf:
        handles.append(Patch(facecolor=_GRAD_OVER, edgecolor="black", label="gradient RMS = +Inf"))
    seen: dict[str, list[int]] = {}
    for pi, panel_pts in enumerate(pts):
        for kind_name in panel_pts:
            seen.setdefault(kind_name, []).append(pi)
    for kind_name, panels_of in seen.items():
        marker, color = _FINDING_STYLE.get(kind_name.lower(), ("o", "#ffffff"))
        on = "/".join(_PANELS[i] for i in panels_of)
        n = sum(len(pts[i][kind_name]) for i in panels_of)
        handles.append(Line2D([], [], ls="", marker=marker, markersize=8, markerfacecolor=color,
                              markeredgecolor="black", label=f"{kind_name} ({on} panel): {n}"))
    if not seen:
        handles.append(Line2D([], [], ls="", marker="", label="no findings"))

    # fixed layout (inches): constrained layout would measure the ~150 tick labels many times over
    head = title or f"layer health: {n_l} layers x {n_s} log steps"
    suptitle = head + ("\n" + " · ".join(notes) if notes else "")
    ncol = min(4, len(handles))
    fig_w = 12.0
    panel_h = min(max(1.1, 0.06 * n_rows + 0.6), 3.6)
    gap = 0.42  # panel title
    top = 0.35 + 0.2 * suptitle.count("\n") + 0.1
    bottom = 0.55 + 0.22 * math.ceil(len(handles) / ncol) + 0.1
    fig_h = top + 3 * (panel_h + gap) + bottom
    longest = max((len(row_labels[i]) for i in ticks), default=1)
    left = min(max(longest * label_fs * 0.62 / 72.0 + 0.2, 0.5), 4.0)
    right = 1.05
    fig = Figure(figsize=(fig_w, fig_h))
    axes: list = []
    caxes: list = []
    for i in range(3):
        y = fig_h - top - (i + 1) * (panel_h + gap)
        rect = (left / fig_w, y / fig_h, (fig_w - left - right) / fig_w, panel_h / fig_h)
        axes.append(fig.add_axes(rect, sharex=axes[0] if axes else None))
        caxes.append(fig.add_axes(((fig_w - right + 0.12) / fig_w, y / fig_h, 0.13 / fig_w, panel_h / fig_h)))

    for ax, cax, (label, data, norm, cmap, has_zero, has_inf, inf_name), panel_pts in zip(axes, caxes, panels,
                                                                                           pts):
        if n_bins:
            im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm,
                           extent=(x0, x1, n_rows - 0.5, -0.5))
            extend = "neither" if label == "dead fraction" else "both"
            cb = fig.colorbar(im, cax=cax, extend=extend)
            cb.ax.tick_params(labelsize=7)
        else:
            cax.set_axis_off()
            ax.text(0.5, 0.5, "no data yet", transform=ax.transAxes, ha="center", va="center")
        note = ("grey = no value" + (", black = 0" if has_zero else "")
                + (f", {inf_name} = +Inf" if has_inf else ""))
        ax.set_title(f"{label}  ({note})", fontsize=9, loc="left")
        ax.set_yticks(ticks)
        ax.set_yticklabels([row_labels[i] for i in ticks], fontsize=label_fs)
        for kind_name, xy in panel_pts.items():
            marker, color = _FINDING_STYLE.get(kind_name.lower(), ("o", "#ffffff"))
            xs, ys = zip(*xy)
            ax.scatter(xs, ys, marker=marker, s=70, c=color, edgecolors="black", linewidths=0.9,
                       zorder=3, clip_on=False)
        if n_bins:
            ax.set_xlim(x0, x1)
        ax.set_ylim(n_rows - 0.5, -0.5)
        if ax is not axes[-1]:
            ax.tick_params(axis="x", labelbottom=False)

    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.05 / fig_h), fontsize=8, ncol=ncol,
               frameon=False, handlelength=1.4, columnspacing=1.5)
    axes[-1].xaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
    axes[-1].xaxis.set_major_formatter(StrMethodFormatter("{x:.0f}"))
    axes[-1].tick_params(axis="x", labelsize=7)
    axes[-1].set_xlabel("global step (each cell centred on its log step)", fontsize=8)
    fig.suptitle(suptitle, fontsize=11 if not notes else 10, y=1.0 - 0.08 / fig_h, va="top")
    return fig


def _magma_without_black() -> Colormap:
    """``magma`` without its darkest fifth, so black can mean "RMS = 0" on the gradient panel."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    return ListedColormap(colormaps["magma"](np.linspace(0.2, 1.0, 256)), name="magma_from_0.2")


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


def gradcam_grid(
    overlays: np.ndarray,
    *,
    title: str,
    labels: Sequence[str] | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
) -> Figure:
    """Grad-CAM overlays side by side, each with its caption, and one colour bar for the weights.

    Requires: overlays made by :func:`lit_probe.gradcam.overlay` (a CAM in ``[0, 1]`` colour-mapped with
    ``cmap`` and blended over the image with weight ``alpha``); the colour bar shows that map from 0 to 1.

    Args:
        overlays: ``[n, H, W, 3]`` RGB in ``[0, 1]``.
        title: figure title (layer, step).
        labels: one caption per image, e.g. ``"sample 0 · class 3"``; missing ones become ``"sample i"``.
        cmap: the colour map the CAMs were drawn with (for the colour bar).
        alpha: the blend weight used by the overlay (stated on the colour bar).

    Returns:
        A new :class:`~matplotlib.figure.Figure`.
    """
    from matplotlib import colormaps

    overlays = np.asarray(overlays)
    n = int(overlays.shape[0])
    fig = Figure(figsize=(2.6 * max(n, 1) + 1.2, 3.3), dpi=100, layout="constrained")
    axes = fig.subplots(1, max(n, 1), squeeze=False)[0]
    for i, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            continue
        ax.imshow(np.clip(overlays[i], 0.0, 1.0), interpolation="nearest")
        label = labels[i] if labels is not None and i < len(labels) and labels[i] else f"sample {i}"
        ax.set_title(str(label), fontsize=9)
    sm = ScalarMappable(norm=mcolors.Normalize(0.0, 1.0), cmap=colormaps[cmap])
    cb = fig.colorbar(sm, ax=list(axes), shrink=0.9, pad=0.01, fraction=0.04)
    cb.set_label(f"Grad-CAM weight (blended {alpha:.0%} over the image)", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=11)
    return fig
