"""Background rendering: one bounded worker thread that turns snapshots into PNGs and hands them to sinks.

* :class:`RenderWorker` -- a bounded job queue and ONE non-daemon worker thread, started lazily on the
  first :meth:`~RenderWorker.submit`. A full queue drops the job and counts it (training never blocks);
  a job that raises is recorded and never kills the thread; :meth:`~RenderWorker.close` drains, stops and
  joins the thread (idempotent), and a later submit starts a fresh thread, so one probe object can serve
  several ``fit`` calls. Picklable when idle (the thread, lock and queue are not part of its state).
* :class:`FigureRenderer` -- the orchestration: per layer, draws the requested figure kinds
  (:data:`FIGURE_KINDS`) from CPU numpy snapshots on the worker thread with matplotlib's Agg canvas
  (:mod:`lit_probe.figures`), keeps one :class:`~lit_probe.figures.ColorScale` per (layer, figure), and
  calls ``sink.write_png(layer, figure, png, step)`` on every sink.

Only numpy arrays cross into the worker (never tensors). This module imports neither lightning nor wandb.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import threading
import time
import traceback
from typing import Any, Callable, Sequence

import numpy as np

from lit_probe.figures import (
    ColorScale,
    feature_grid,
    figure_to_png,
    health_timeline,
    histograms,
    robust_range,
)

__all__ = ["FIGURE_KINDS", "TIMELINE_LAYER", "FigureRenderer", "RenderWorker"]

log = logging.getLogger(__name__)

#: Figure kinds a :class:`FigureRenderer` can draw; also the figure names used in file names and W&B keys.
FIGURE_KINDS: tuple[str, ...] = ("activations", "gradients", "histograms", "timeline")
#: The pseudo layer name the timeline figure is written under.
TIMELINE_LAYER = "_all"
_MAX_ERRORS = 100


class RenderWorker:
    """A bounded queue served by one lazily started, non-daemon worker thread.

    ``max_queue`` bounds the jobs accepted but not yet finished (queued plus the one running), so memory
    held by pending snapshots is bounded too.

    Attributes:
        dropped: jobs refused because the queue was full, or discarded by a :meth:`close` that timed out.
        completed: jobs that finished (successfully or not).
        errors: one line per failed job (capped at 100 entries; ``error_count`` keeps counting).
        error_count: total number of failed jobs.

    Args:
        max_queue: maximum number of accepted, unfinished jobs (>= 1).
        name: the worker thread's name.

    Raises:
        ValueError: when ``max_queue < 1``.
    """

    def __init__(self, max_queue: int = 16, name: str = "lit-probe-render") -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.max_queue = int(max_queue)
        self.name = name
        self.dropped = 0
        self.completed = 0
        self.error_count = 0
        self.errors: list[str] = []
        self._init_runtime()

    # -- runtime state (never pickled) ------------------------------------------------------------
    def _init_runtime(self) -> None:
        self._cond = threading.Condition()
        self._jobs: collections.deque[Callable[[], None]] = collections.deque()
        self._pending = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_cond", "_jobs", "_pending", "_stopping", "_thread", "_pid"):
            state.pop(key, None)
        state["errors"] = list(self.errors)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # -- public API ------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """Whether the worker thread is running."""
        t = self._thread
        return t is not None and t.is_alive()

    @property
    def pending(self) -> int:
        """Jobs accepted and not yet finished."""
        return self._pending

    def submit(self, job: Callable[[], None]) -> bool:
        """Queue ``job`` without blocking; start the worker thread if none runs.

        Args:
            job: a callable with no arguments, run once on the worker thread.

        Returns:
            ``True`` when accepted; ``False`` when the queue is full (``dropped`` is incremented).
        """
        if os.getpid() != self._pid:  # forked child: the parent's thread and lock are not ours
            self._init_runtime()
        with self._cond:
            if self._pending >= self.max_queue:
                self.dropped += 1
                return False
            self._pending += 1
            self._jobs.append(job)
            self._stopping = False
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=False)
                self._thread.start()
            self._cond.notify_all()
        return True

    def drain(self, timeout: float | None = 60.0) -> bool:
        """Wait until every accepted job has finished.

        Args:
            timeout: seconds to wait at most; ``None`` waits forever.

        Returns:
            ``True`` when nothing is pending any more, ``False`` on timeout (or when called from a job).
        """
        if threading.current_thread() is self._thread:
            return self._pending <= 1
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending > 0:
                if self._thread is None or not self._thread.is_alive():
                    # nobody will finish them (should not happen; e.g. after a fork): restart a worker
                    if self._jobs:
                        self._thread = threading.Thread(target=self._run, name=self.name, daemon=False)
                        self._thread.start()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining if remaining is None else min(remaining, 1.0))
        return True

    def close(self, timeout: float | None = 60.0) -> bool:
        """Drain, stop and join the worker thread. Idempotent; a later :meth:`submit` starts a new thread.

        Jobs still queued when ``timeout`` runs out are discarded and counted in ``dropped``.

        Args:
            timeout: seconds to wait for the jobs and then for the thread; ``None`` waits forever.

        Returns:
            ``True`` when no worker thread is left alive.
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError("RenderWorker.close() called from its own worker thread")
        start = time.monotonic()
        self.drain(timeout)
        with self._cond:
            thread = self._thread
            if self._jobs:
                n = len(self._jobs)
                self._jobs.clear()
                self._pending -= n
                self.dropped += n
                self._cond.notify_all()
            self._stopping = True
            self._cond.notify_all()
        if thread is not None:
            remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - start)) + 1.0
            thread.join(remaining)
            if thread.is_alive():
                msg = f"render thread {self.name!r} did not stop within {timeout}s (a job is still running)"
                self._record_error(msg, None)
                return False
        return True

    # -- worker ----------------------------------------------------------------------------------
    def _record_error(self, msg: str, exc: BaseException | None) -> None:
        self.error_count += 1
        if len(self.errors) < _MAX_ERRORS:
            self.errors.append(msg)
        if self.error_count == 1:
            if exc is not None:
                tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                log.warning("lit_probe: figure job failed (later ones only counted): %s\n%s", msg, tb)
            else:
                log.warning("lit_probe: %s", msg)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if not self._jobs:
                    # forget ourselves under the lock, so a submit() racing with our exit starts a new thread
                    if self._thread is threading.current_thread():
                        self._thread = None
                    return
                job = self._jobs.popleft()
            try:
                job()
            except Exception as exc:  # a failing job must never kill the worker
                name = getattr(job, "__qualname__", None) or type(job).__name__
                self._record_error(f"{name}: {type(exc).__name__}: {exc}", exc)
            finally:
                job = None  # release snapshots before waiting for the next job
                with self._cond:
                    self._pending -= 1
                    self.completed += 1
                    self._cond.notify_all()


def _sample_view(arr: np.ndarray, layout: str) -> tuple[np.ndarray, int | None]:
    """What the feature grid shows of a snapshot: the first sample, or all samples for ``[n, F]``.

    Returns:
        ``(values, channel_axis)`` for :func:`~lit_probe.figures.feature_grid`.
    """
    if arr.ndim == 1:
        return arr[None, :], 1
    if arr.ndim == 2:  # [n, F]: samples x features
        return arr, 1
    if arr.ndim == 3:
        return (arr[0], 1) if layout == "channels_last" else (arr[0], 0)
    return arr[0], None


def _shape_text(arr: np.ndarray, shape: Sequence[int] | None) -> str:
    if shape is not None:
        return "shape " + "x".join(str(int(s)) for s in shape)
    return "snapshot " + "x".join(str(int(s)) for s in arr.shape)


class FigureRenderer:
    """Draw probe figures off the training thread and hand the PNGs to sinks.

    One job per :meth:`submit_layer` call (all requested figure kinds of that layer), so ``max_queue``
    counts layers. Each finished PNG goes to every sink as ``sink.write_png(layer, figure, png, step)``;
    a sink that raises is recorded in :attr:`errors` and the other sinks still get the image.

    Args:
        sinks: objects with ``write_png(layer, figure, png, step)``.
        figures: kinds to draw, from :data:`FIGURE_KINDS`.
        max_channels: channel / feature cap of the feature grids.
        max_queue: pending jobs before new ones are dropped (and counted in :attr:`dropped`).
        dpi: PNG resolution (100 gives ~900 px wide grids).
        bins: histogram bins.

    Raises:
        ValueError: for an unknown figure kind or a non-positive cap.
    """

    def __init__(
        self,
        sinks: list,
        figures: tuple[str, ...] = FIGURE_KINDS,
        max_channels: int = 64,
        max_queue: int = 16,
        *,
        dpi: int = 100,
        bins: int = 60,
    ) -> None:
        figures = tuple(figures)
        unknown = [f for f in figures if f not in FIGURE_KINDS]
        if unknown:
            raise ValueError(f"unknown figure kind(s) {unknown}; choose from {list(FIGURE_KINDS)}")
        if max_channels < 1:
            raise ValueError(f"max_channels must be >= 1, got {max_channels}")
        self.sinks = list(sinks)
        self.figures = figures
        self.max_channels = int(max_channels)
        self.dpi = int(dpi)
        self.bins = int(bins)
        self._worker = RenderWorker(max_queue=max_queue)
        self._scales: dict[tuple[str, str], ColorScale] = {}

    # -- submission (training thread) ------------------------------------------------------------
    def submit_layer(
        self,
        step: int,
        layer: str,
        activation: np.ndarray | None,
        gradient: np.ndarray | None,
        dead: np.ndarray | None = None,
        *,
        layout: str = "auto",
        shape: Sequence[int] | None = None,
    ) -> bool:
        """Queue the figures of one layer at one step.

        Args:
            step: the trainer's global step (used in titles, file names and W&B steps).
            layer: the probe path (module name).
            activation: :func:`~lit_probe.snapshots.snapshot_tensor` of the output: ``[n, C, H, W]``,
                ``[n, C, L]``, ``[n, F]`` or ``[n, T, F]``; ``None`` to skip activation figures.
            gradient: the same for the gradient w.r.t. the output; ``None`` to skip gradient figures.
            dead: boolean mask over channels/features of dead units, marked on the activation grid.
            layout: the snapshot's layout (``"channels_last"`` makes a 3-D snapshot ``[n, T, F]``).
            shape: the full tensor's shape, for titles (defaults to the snapshot's).

        Returns:
            ``True`` when a job was queued; ``False`` when dropped (full queue) or nothing to draw.
        """
        kinds = [k for k in ("activations", "gradients", "histograms") if k in self.figures]
        if not kinds or (activation is None and gradient is None):
            return False
        act = None if activation is None else np.array(activation, dtype=np.float32, copy=True)
        grad = None if gradient is None else np.array(gradient, dtype=np.float32, copy=True)
        dmask = None if dead is None else np.array(dead, dtype=bool, copy=True).reshape(-1)
        shp = None if shape is None else tuple(int(s) for s in shape)
        job = functools.partial(
            self._render_layer, int(step), str(layer), act, grad, dmask, layout, shp, kinds
        )
        return self._worker.submit(job)

    def submit_timeline(
        self,
        step: int,
        layers: Sequence[str],
        steps: np.ndarray,
        act_rms: np.ndarray,
        grad_rms: np.ndarray,
        dead_fraction: np.ndarray,
        findings: Sequence[tuple[str, int, str]],
    ) -> bool:
        """Queue the health timeline (figure ``"timeline"``, layer ``"_all"``); arrays are copied now.

        Args:
            step: the trainer's global step.
            layers: layer names (rows).
            steps: global step of each column.
            act_rms: ``[len(layers), len(steps)]`` activation RMS, NaN = no data.
            grad_rms: same shape, gradient RMS.
            dead_fraction: same shape, dead fraction in ``[0, 1]``.
            findings: ``(layer, step, kind)`` triples.

        Returns:
            ``True`` when queued; ``False`` when dropped or ``"timeline"`` is not requested.
        """
        if "timeline" not in self.figures:
            return False
        args = (
            list(layers),
            np.array(steps, copy=True),
            np.array(act_rms, dtype=np.float64, copy=True),
            np.array(grad_rms, dtype=np.float64, copy=True),
            np.array(dead_fraction, dtype=np.float64, copy=True),
            [tuple(f) for f in findings],
        )
        job = functools.partial(self._render_timeline, int(step), *args)
        return self._worker.submit(job)

    def submit_gradcam(self, step: int, layer: str, overlays: np.ndarray, labels: Sequence[str]) -> bool:
        """Queue a Grad-CAM figure (``overlays``: ``[n, H, W, 3]`` in ``[0, 1]``), named ``"gradcam"``."""
        from lit_probe.figures import gradcam_grid

        ov = np.array(overlays, dtype=np.float32, copy=True)
        title = f"{layer} \u00b7 Grad-CAM \u00b7 step {int(step)}"
        job = functools.partial(self._draw, str(layer), "gradcam", int(step),
                                functools.partial(gradcam_grid, ov, title=title, labels=list(labels)))
        return self._worker.submit(job)

    def drain(self, timeout: float | None = 60.0) -> bool:
        """Wait for every queued figure to be written. Returns ``False`` on timeout."""
        return self._worker.drain(timeout)

    def close(self, timeout: float | None = 60.0) -> bool:
        """Drain and join the worker thread (idempotent; a later submit starts a new one)."""
        return self._worker.close(timeout)

    def flush_sinks(self) -> None:
        """Call ``flush()`` on every sink that has one (e.g. a deferred :class:`~lit_probe.sinks.WandbSink`).

        Call this from the training thread (e.g. at a log step), not from the worker.
        """
        for sink in self.sinks:
            flush = getattr(sink, "flush", None)
            if callable(flush):
                try:
                    flush()
                except Exception as exc:  # a sink must never break training
                    msg = f"{type(sink).__name__}.flush: {type(exc).__name__}: {exc}"
                    self._worker._record_error(msg, exc)

    @property
    def dropped(self) -> int:
        """Jobs dropped because the queue was full."""
        return self._worker.dropped

    @property
    def errors(self) -> list[str]:
        """Failures of figure jobs and sinks (capped list)."""
        return self._worker.errors

    @property
    def worker(self) -> RenderWorker:
        """The underlying :class:`RenderWorker`."""
        return self._worker

    # -- worker thread ---------------------------------------------------------------------------
    def _scale(self, layer: str, figure: str, symmetric: bool) -> ColorScale:
        key = (layer, figure)
        sc = self._scales.get(key)
        if sc is None:
            sc = self._scales[key] = ColorScale(symmetric=symmetric)
        return sc

    def _emit(self, layer: str, figure: str, png: bytes, step: int) -> None:
        for sink in self.sinks:
            try:
                sink.write_png(layer, figure, png, step)
            except Exception as exc:  # one failing sink must not starve the others
                msg = f"{type(sink).__name__}.write_png({layer!r}, {figure!r}): {type(exc).__name__}: {exc}"
                self._worker._record_error(msg, exc)

    def _draw(self, layer: str, figure: str, step: int, make: Callable[[], Any]) -> None:
        try:
            png = figure_to_png(make(), dpi=self.dpi)
        except Exception as exc:
            self._worker._record_error(f"drawing {figure!r} of {layer!r}: {type(exc).__name__}: {exc}", exc)
            return
        self._emit(layer, figure, png, step)

    def _render_layer(
        self,
        step: int,
        layer: str,
        act: np.ndarray | None,
        grad: np.ndarray | None,
        dead: np.ndarray | None,
        layout: str,
        shape: tuple[int, ...] | None,
        kinds: list[str],
    ) -> None:
        if "activations" in kinds and act is not None:
            view, axis = _sample_view(act, layout)
            title = f"{layer} · activations · step {step} · {_shape_text(act, shape)}"
            vr = self._scale(layer, "activations", False).update(*robust_range(view, diverging=False))
            self._draw(layer, "activations", step, lambda: feature_grid(
                view, title=title, vrange=vr, dead=dead, max_channels=self.max_channels, channel_axis=axis))
        if "gradients" in kinds and grad is not None:
            view, axis = _sample_view(grad, layout)
            title = f"{layer} · gradients · step {step} · {_shape_text(grad, shape)}"
            vr = self._scale(layer, "gradients", True).update(*robust_range(view, diverging=True))
            self._draw(layer, "gradients", step, lambda: feature_grid(
                view, title=title, diverging=True, vrange=vr, max_channels=self.max_channels,
                channel_axis=axis))
        if "histograms" in kinds:
            panels = []
            if act is not None:
                panels.append((f"activation ({_shape_text(act, shape)})", act))
            if grad is not None:
                panels.append((f"gradient ({_shape_text(grad, shape)})", grad))
            if panels:
                title = f"{layer} · histograms · step {step}"
                self._draw(layer, "histograms", step, lambda: histograms(panels, title=title, bins=self.bins))

    def _render_timeline(
        self,
        step: int,
        layers: list[str],
        steps: np.ndarray,
        act_rms: np.ndarray,
        grad_rms: np.ndarray,
        dead_fraction: np.ndarray,
        findings: list[tuple[str, int, str]],
    ) -> None:
        title = f"layer health · {len(layers)} layers · up to step {step}"
        self._draw(TIMELINE_LAYER, "timeline", step, lambda: health_timeline(
            layers, steps, act_rms, grad_rms, dead_fraction, findings, title=title))
