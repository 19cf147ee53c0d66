"""Composing figures: what one drawing job is, and how it becomes PNGs.

* :class:`Job` -- one unit of drawing (all requested figure kinds of one layer at one step, the health
  timeline, the parameter histograms of a module, or a Grad-CAM grid): numpy arrays and a few small arguments.
* :class:`Drawer` -- turns jobs into PNGs with :mod:`lit_probe.figures` and matplotlib's Agg canvas, and owns
  the colour scales (:class:`~lit_probe.figures.ColorScale`) of the side that draws.
* :func:`coverage_text` and :func:`sample_view` -- what part of the full tensor a figure shows, and which
  view of a snapshot the feature grid draws. Both take the unit axis from :func:`lit_probe.vocab.unit_dim`,
  the same axis the statistics count units (and dead units) on.

Runs where the drawing happens: in the drawing process (:mod:`lit_probe.drawing`) or on the renderer's drawing
thread (:mod:`lit_probe.render`). Imports numpy, matplotlib (through :mod:`lit_probe.figures`) and the
vocabulary; never torch.
"""

from __future__ import annotations

import dataclasses
import functools
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .figures import (
    ColorScale,
    fmt,
    feature_grid,
    figure_to_png,
    gradcam_grid,
    health_timeline,
    histograms,
    robust_range,
)
from .vocab import TIMELINE_LAYER, unit_dim

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["TIMELINE_LAYER", "Drawer", "Job", "Result", "coverage_text", "sample_view"]

#: The pseudo layer name the timeline figure is written under.
#: (layer, figure, step, make): ``make()`` builds the figure (where the drawing happens).
_Maker = tuple[str, str, int, Callable[[], "Figure"]]


# ---------------------------------------------------------------------------------------------------
# what a figure covers
# ---------------------------------------------------------------------------------------------------
def sample_view(arr: np.ndarray, layout: str) -> tuple[np.ndarray, int | None]:
    """What the feature grid shows of a snapshot: the first sample, or all samples of an ``[n, F]`` one.

    The unit axis is :func:`~lit_probe.vocab.unit_dim` of ``layout``: a 2-D view keeps it as its rows
    (``[C, L]`` of a 1-D conv) or columns (``[T, F]`` of a sequence); a 3-D or larger view gets it first
    (``[C, H, W]`` tiles, also for a channels-last ``[n, H, W, C]`` snapshot).

    Returns:
        ``(values, channel_axis)`` for :func:`~lit_probe.figures.feature_grid` (``None``: tiles over axis 0).
    """
    if arr.ndim == 1:
        return arr[None, :], 1
    if arr.ndim == 2:  # [n, F]: samples x features
        return arr, unit_dim(layout, 2)
    axis = unit_dim(layout, arr.ndim) - 1  # in one sample
    view = arr[0]
    if view.ndim == 2:
        return view, axis
    return (view if axis == 0 else np.moveaxis(view, axis, 0)), None


def _samples_text(n: int, total: int) -> str:
    if n >= total:
        return f"all {total} samples" if total > 1 else "1 sample of 1"
    return f"{n} sample{'s' if n != 1 else ''} of {total}"


def coverage_text(
    snapshot_shape: Sequence[int],
    shape: Sequence[int] | None,
    layout: str = "auto",
    *,
    part: str = "all",
    max_channels: int | None = None,
) -> str:
    """Say what part of the full tensor a figure shows, e.g. ``"first 64 of 512 channels, 1 sample of 32"``.

    Args:
        snapshot_shape: shape of the snapshot (:func:`~lit_probe.snapshots.snapshot_tensor`): ``[n, C, ...]``,
            ``[n, F]`` or ``[n, T, F]``.
        shape: the full tensor's shape (``None``: the snapshot is the whole tensor as far as we know).
        layout: the unit layout (:func:`~lit_probe.vocab.unit_dim` says which dimension holds the units).
        part: ``"all"`` (a histogram: every value of the snapshot) or ``"grid"`` (the feature grid: the first
            sample, or all rows of an ``[n, F]`` snapshot, at most ``max_channels`` units, the middle depth
            slice of 5-D tensors).
        max_channels: the grid's unit cap (``part="grid"``).

    Returns:
        One line, ending with the full tensor's shape in brackets.
    """
    snap = tuple(int(s) for s in snapshot_shape)
    full = tuple(int(s) for s in shape) if shape is not None else snap
    if len(snap) == 1:
        snap = (1,) + snap
    if len(full) == 1:
        full = (1,) + full
    tensor = "x".join(str(s) for s in (shape if shape is not None else snapshot_shape))
    if len(full) != len(snap):
        return f"snapshot {'x'.join(str(s) for s in snap)} of tensor {tensor}"
    n, n_total = snap[0], full[0]
    axis = unit_dim(layout, len(snap))
    c, c_total = snap[axis], full[axis]
    unit = "features" if axis == len(snap) - 1 and len(snap) <= 3 else "channels"
    if part == "grid" and max_channels is not None:
        c = min(c, int(max_channels))
    c_txt = f"all {c_total} {unit}" if c >= c_total else f"first {c} of {c_total} {unit}"
    parts = []
    if part == "grid" and len(snap) > 2:
        parts.append(f"first sample of {n_total}")
    else:
        parts.append(_samples_text(n, n_total))
    parts.append(c_txt)
    if part == "grid" and len(snap) > 4:
        depth = next(d for d in range(1, len(snap)) if d != axis)
        parts.append(f"middle slice of depth {snap[depth]}")
    return ", ".join(parts) + f" (tensor {tensor})"


# ---------------------------------------------------------------------------------------------------
# jobs and the drawing side
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Job:
    """One unit of drawing: ``kind`` in ``{"layer", "timeline", "parameters", "gradcam"}``, numpy/str/int
    ``args`` (the arguments of the :class:`Drawer` method of that kind)."""

    id: int
    kind: str
    args: tuple
    figures: list[tuple[str, str, int]]  # (layer, figure, step) it should produce


@dataclasses.dataclass
class Result:
    """What drawing one job gave: PNGs, failures and the colour scales it touched."""

    pngs: list[tuple[str, str, int, bytes]]
    failures: list[tuple[str, str, int, str, str]]  # layer, figure, step, message, traceback
    scales: dict[tuple[str, str], tuple[bool, float | None, float | None]]


class Drawer:
    """Turns jobs into PNGs with matplotlib's Agg canvas; owns the colour scales of the side that draws.

    Args:
        dpi: PNG resolution.
        bins: histogram bins.
        max_channels: unit cap of the feature grids.
        scales: the colour scales to use and update (shared with the renderer when it draws in a thread).
    """

    def __init__(self, dpi: int, bins: int, max_channels: int,
                 scales: dict[tuple[str, str], ColorScale] | None = None) -> None:
        self.dpi = int(dpi)
        self.bins = int(bins)
        self.max_channels = int(max_channels)
        self.scales: dict[tuple[str, str], ColorScale] = {} if scales is None else scales
        self._touched: set[tuple[str, str]] = set()

    def run_safely(self, job: Job) -> Result:
        """:meth:`run`, with a failure of the job itself reported as a failure of each of its figures."""
        try:
            return self.run(job)
        except Exception as exc:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            return Result([], [(layer, fig, step, f"{job.kind} job: {type(exc).__name__}: {exc}", tb)
                               for layer, fig, step in job.figures], {})

    def run(self, job: Job) -> Result:
        """Draw every figure of ``job``; a figure that raises is reported, the others are still drawn."""
        self._touched = set()
        pngs: list[tuple[str, str, int, bytes]] = []
        failures: list[tuple[str, str, int, str, str]] = []
        makers = {"layer": self.layer, "timeline": self.timeline, "gradcam": self.gradcam,
                  "parameters": self.parameters}[job.kind]
        for layer, figure, step, make in makers(*job.args):
            try:
                png = figure_to_png(make(), dpi=self.dpi)
            except Exception as exc:
                tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                failures.append((layer, figure, step, f"drawing {figure!r} of {layer!r}: "
                                 f"{type(exc).__name__}: {exc}", tb))
            else:
                pngs.append((layer, figure, step, png))
        scales = {k: (sc.symmetric, sc.lo, sc.hi) for k, sc in self.scales.items() if k in self._touched}
        return Result(pngs, failures, scales)

    def _scale(self, layer: str, figure: str, symmetric: bool) -> ColorScale:
        key = (layer, figure)
        sc = self.scales.get(key)
        if sc is None:
            sc = self.scales[key] = ColorScale(symmetric=symmetric)
        self._touched.add(key)
        return sc

    def _range(self, layer: str, figure: str, values: np.ndarray,
               diverging: bool) -> tuple[tuple[float, float] | None, str | None]:
        """The colour range of one image and a note on where it comes from.

        The layer's scale, widened as needed (:meth:`ColorScale.range_for`); the data's own range when it is
        far off that scale (an exploded or collapsed step: the scale is left as it was); a constant or all
        non-finite map keeps the scale (or gets its own when there is none) and never moves it.
        """
        sc = self._scale(layer, figure, symmetric=diverging)
        finite = values[np.isfinite(values)]
        if finite.size == 0 or float(finite.min()) == float(finite.max()):
            return sc.range, None
        lo, hi = robust_range(values, diverging=diverging)
        lo, hi, shared = sc.range_for(lo, hi)
        if shared:
            return (lo, hi), None
        kept = sc.range
        assert kept is not None
        return (lo, hi), f"own range: far off this layer's scale [{fmt(kept[0])}, {fmt(kept[1])}]"

    # -- one maker per job kind: yields (layer, figure, step, make) ---------------------------------
    def layer(self, step: int, layer: str, act: np.ndarray | None, grad: np.ndarray | None,
              dead: np.ndarray | None, layout: str, shape: tuple[int, ...] | None,
              kinds: list[str], source: str = "") -> Iterator[_Maker]:
        """Feature grids of the activation (dead units marked) and the gradient, and their histograms.
        ``source``: whose tensor it is under several processes, said in the titles."""
        mc = self.max_channels
        whose = f" · {source}" if source else ""

        def grid(arr: np.ndarray, figure: str, diverging: bool) -> Figure:
            view, axis = sample_view(arr, layout)
            cov = coverage_text(arr.shape, shape, layout, part="grid", max_channels=mc)
            title = f"{layer} · {figure} · step {step} · {cov}{whose}"
            vr, note = self._range(layer, figure, view, diverging)
            return feature_grid(view, title=title, diverging=diverging, vrange=vr,
                                dead=None if diverging else dead, max_channels=mc, channel_axis=axis,
                                note=note)

        if "activations" in kinds and act is not None:
            yield layer, "activations", step, functools.partial(grid, act, "activations", False)
        if "gradients" in kinds and grad is not None:
            yield layer, "gradients", step, functools.partial(grid, grad, "gradients", True)
        if "histograms" in kinds and (act is not None or grad is not None):
            def hist() -> Figure:
                panels = []
                for name, arr in (("activation", act), ("gradient", grad)):
                    if arr is not None:
                        cov = coverage_text(arr.shape, shape, layout, part="all")
                        panels.append((f"{name}: {cov} · {arr.size:,} values", arr))
                return histograms(panels, title=f"{layer} · histograms · step {step}{whose}", bins=self.bins)

            yield layer, "histograms", step, hist

    def timeline(self, step: int, layers: list[str], steps: np.ndarray, act_rms: np.ndarray,
                 grad_rms: np.ndarray, dead_fraction: np.ndarray, findings: list[tuple]) -> Iterator[_Maker]:
        """The health timeline of every layer."""
        title = f"layer health · {len(layers)} layers · up to step {step}"
        yield TIMELINE_LAYER, "timeline", step, lambda: health_timeline(
            layers, steps, act_rms, grad_rms, dead_fraction, findings, title=title)

    def parameters(self, step: int, layer: str, weights: np.ndarray, grads: np.ndarray | None,
                   numel: int) -> Iterator[_Maker]:
        """Histograms of a module's weights and parameter gradients."""
        def hist() -> Figure:
            every = "" if weights.size >= numel else f" (every {-(-numel // max(weights.size, 1)):,}th)"
            panels = [(f"weights: {weights.size:,} of {numel:,} values{every}", weights)]
            if grads is not None:
                panels.append((f"parameter gradients: {grads.size:,} of {numel:,} values{every}", grads))
            return histograms(panels, title=f"{layer} · parameters · step {step}", bins=self.bins)

        yield layer, "parameters", step, hist

    def gradcam(self, step: int, layer: str, overlays: np.ndarray, labels: list[str]) -> Iterator[_Maker]:
        """A Grad-CAM grid."""
        title = f"{layer} · Grad-CAM · step {step}"
        yield layer, "gradcam", step, lambda: gradcam_grid(overlays, title=title, labels=labels)
