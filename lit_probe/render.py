"""The figure queue: snapshots go to a drawing process, PNGs come back and go to the sinks.

:class:`FigureRenderer` is what the output layer uses. Each ``submit_*`` call is one *job*
(:class:`~lit_probe.compose.Job`: all requested figure kinds of one layer at one step, the health timeline, a
module's parameter histograms, or a Grad-CAM grid). Only numpy arrays and a few small arguments make up a job.
The training thread only copies the snapshot and appends the job to the queue; the drawing happens elsewhere:

* ``backend="process"`` (the default): in a separate Python process (:mod:`lit_probe.drawing`), started lazily
  on the first submit, so matplotlib never holds the training process's GIL. Two light daemon threads of the
  training process feed the child (``lit-probe-render-send``) and take its PNGs back (``lit-probe-render``).
* ``backend="thread"``, and the fallback when no process can be started (restricted environments; one log
  warning) or the process keeps dying: one drawing thread of the training process (``lit-probe-render``),
  started when there are jobs and ending when the queue is empty. It takes its jobs from the same queue.

Either way ``sink.write_png(layer, figure, png, step)`` is called on every sink in the training process, on
the ``lit-probe-render`` thread -- sinks stay in the training process (a W&B run cannot be used from another
process).

Bounded and accounted: at most ``max_queue`` jobs are accepted and not yet written to the sinks; a job
refused because of that, cancelled by :meth:`FigureRenderer.close` when its time bound runs out, or whose
drawing failed is listed in :attr:`FigureRenderer.skipped` (layer, figure, step, reason) and summarised by
:meth:`FigureRenderer.skipped_summary`. ``close`` always ends the child (stop message, then terminate / kill)
and joins the threads.

Paced (``share``, the probe's ``figure_share``, 0.1 by default): while training runs the drawing is busy at most
that fraction of the wall time on average -- a token bucket of drawing time, refilled at ``share`` seconds per
second up to ``burst_s`` (2 s), spent by each job's busy time (with the process backend, from the moment the job
is handed to the child, which then gets one job at a time, to its PNGs' return). A job waits in the queue until
its turn; a priority or urgent job never waits for time, and :meth:`FigureRenderer.drain` and
:meth:`FigureRenderer.close` lift the limit while they wait (fit end draws the rest at full speed, within its
bound). Why time and not priority alone: a drawing process at ``nice`` 19 still slows a training beside it (it
shares the caches and memory bandwidth, and with every core in use it takes the cycles a parallel region then
waits for), so the lever is how long it runs. A queue that fills because of it says so in
:meth:`FigureRenderer.skipped_summary`.

Colour scales: one :class:`~lit_probe.figures.ColorScale` per (layer, figure) lives where the drawing happens
(in the child with the process backend) -- computing ranges in the training process would cost it the
percentiles. The child returns the updated ranges with each result; the renderer keeps a mirror in
``_scales`` and hands it to the next child, so scales stay the same across steps, restarts, ``fit`` calls
and pickling.

Picklable at any time (threads, locks, queues and the child are not part of the state) and fork-safe (a
forked copy starts its own child on its first submit). This module imports neither torch, lightning nor wandb.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
import traceback
from typing import Any, Sequence

import numpy as np

from .compose import TIMELINE_LAYER, Drawer, Job, Result
from .drawing import end_process, read_frame, start_child, write_frame
from .figures import ColorScale
from .vocab import FIGURE_KINDS

__all__ = ["BACKENDS", "FIGURE_KINDS", "SKIP_REASONS", "TIMELINE_LAYER", "FigureRenderer", "SkippedFigure"]

log = logging.getLogger(__name__)

#: Where figures are drawn: a separate process (default) or a thread of the training process.
BACKENDS: tuple[str, ...] = ("process", "thread")
#: Why a figure was not drawn (:attr:`SkippedFigure.reason`).
SKIP_REASONS: tuple[str, ...] = ("queue full", "fit end timeout", "error")
_MAX_ERRORS = 100
_MAX_SKIPPED = 10_000
_MAX_CRASHES = 3  # unexpected deaths of the drawing process before the renderer draws in a thread


@dataclasses.dataclass(frozen=True)
class SkippedFigure:
    """A figure that was not drawn.

    Attributes:
        layer: the probe path (``"_all"`` for the timeline).
        figure: the figure kind (``"activations"``, ``"gradients"``, ``"histograms"``, ``"timeline"``,
            ``"gradcam"``).
        step: the global step it would have shown.
        reason: one of :data:`SKIP_REASONS`: ``"queue full"`` (refused at submit: the drawing is behind),
            ``"fit end timeout"`` (cancelled by :meth:`FigureRenderer.close`), ``"error"`` (drawing failed,
            or the drawing process died).
    """

    layer: str
    figure: str
    step: int
    reason: str


_RUNTIME = ("_lock", "_cond", "_inflight", "_delivering", "_outbox", "_next_id", "_pid", "_proc", "_sender",
            "_drawer", "_threads", "_stopping", "_child_ready", "_local", "_active", "_priority", "_pacer",
            "_unpaced", "_sent_at")


class FigureRenderer:
    """Draw probe figures off the training thread -- in a separate process by default -- and hand the PNGs
    to sinks.

    One job per ``submit_*`` call (all requested figure kinds of that layer), so ``max_queue`` counts layers.
    Each finished PNG goes to every sink as ``sink.write_png(layer, figure, png, step)``, called in the
    training process on the ``lit-probe-render`` thread; a sink that raises is recorded in :attr:`errors` and
    the other sinks still get the image. See the module docstring for the process, its threads and the
    colour scales.

    Args:
        sinks: objects with ``write_png(layer, figure, png, step)``.
        figures: kinds to draw, from :data:`FIGURE_KINDS`.
        max_channels: channel / feature cap of the feature grids.
        max_queue: jobs accepted and not yet written before new ones are refused (``"queue full"``).
        dpi: PNG resolution (100 gives ~900 px wide grids).
        bins: histogram bins.
        backend: ``"process"`` (draw in a child process; falls back to ``"thread"`` with one warning when no
            process can be started) or ``"thread"`` (one drawing thread of this process).

    Raises:
        ValueError: for an unknown figure kind or backend, or a non-positive cap.
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
        backend: str = "process",
        wait_when_full: bool = False,
        share: float | None = None,
        burst_s: float = 2.0,
    ) -> None:
        figures = tuple(figures)
        unknown = [f for f in figures if f not in FIGURE_KINDS]
        if unknown:
            raise ValueError(f"unknown figure kind(s) {unknown}; choose from {list(FIGURE_KINDS)}")
        if max_channels < 1:
            raise ValueError(f"max_channels must be >= 1, got {max_channels}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        if share is not None and not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1] or None, got {share!r}")
        if burst_s < 0:
            raise ValueError(f"burst_s must be >= 0, got {burst_s!r}")
        self.sinks = list(sinks)
        self.figures = figures
        self.max_channels = int(max_channels)
        self.max_queue = int(max_queue)
        self.dpi = int(dpi)
        self.bins = int(bins)
        self.backend = backend
        self.wait_when_full = bool(wait_when_full)
        #: the most of the wall time the drawing may be busy on average while training runs (``None``: no limit);
        #: :meth:`drain` and :meth:`close` lift it. Never applied with ``wait_when_full`` (the training waits).
        self.share = None if share is None or wait_when_full else float(share)
        self.burst_s = float(burst_s)
        #: seconds the drawing was held back by :attr:`share` (it waited for its time to accrue).
        self.paced_s = 0.0
        #: jobs refused because the queue was full, or cancelled by :meth:`close`.
        self.dropped = 0
        #: jobs finished (drawn and written, or failed).
        self.completed = 0
        self.error_count = 0
        self._errors: list[str] = []
        self._skipped: list[SkippedFigure] = []
        self._skipped_count = 0
        self._skip_agg: dict[tuple[str, int], tuple[int, set[str]]] = {}
        self._scales: dict[tuple[str, str], ColorScale] = {}
        self._fallback_reason: str | None = None
        self._crashes = 0
        self._init_runtime()

    # -- runtime state (never pickled) ------------------------------------------------------------
    def _init_runtime(self) -> None:
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._inflight: dict[int, Job] = {}
        self._delivering: set[int] = set()
        self._outbox: collections.deque[Job] = collections.deque()  # not yet sent to the child / drawn
        self._priority: set[int] = set()  # ids of jobs that explain a finding: never refused or evicted
        self._next_id = 0
        self._pid = os.getpid()
        self._proc: Any = None
        self._sender: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._child_ready = False
        self._drawer: threading.Thread | None = None  # the drawing thread (thread backend, fallback)
        self._local: Drawer | None = None
        self._active = "thread" if (self.backend == "thread" or self._fallback_reason) else "process"
        self._pacer = None if self.share is None else _Pacer(self.share, self.burst_s)
        self._unpaced = 0  # drain() / close() calls in progress: draw at full speed meanwhile
        self._sent_at: dict[int, float] = {}  # job id -> when it went to the child (paced: one at a time)

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            state = self.__dict__.copy()
            for key in _RUNTIME:
                state.pop(key, None)
            state["_errors"] = list(self._errors)
            state["_skipped"] = list(self._skipped)
            state["_skip_agg"] = {k: (n, set(v)) for k, (n, v) in self._skip_agg.items()}
            state["_fallback_reason"] = None  # another process may well be able to start a child
            state["_scales"] = {k: _copy_scale(v) for k, v in self._scales.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:  # a forked copy: the parent's child, threads and locks are not ours
            self._init_runtime()

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
        priority: bool = False,
        source: str = "",
    ) -> bool:
        """Queue the figures of one layer at one step (arrays are copied now).

        Args:
            step: the trainer's global step (used in titles, file names and W&B steps).
            layer: the probe path (module name).
            activation: :func:`~lit_probe.snapshots.snapshot_tensor` of the output: ``[n, C, H, W]``,
                ``[n, C, L]``, ``[n, F]`` or ``[n, T, F]``; ``None`` to skip activation figures.
            gradient: the same for the gradient w.r.t. the output; ``None`` to skip gradient figures.
            dead: boolean mask of the dead units, one per unit on the unit axis (``ProbeSession.dead_masks``),
                crossed out on the activation grid.
            layout: the snapshot's unit layout; :func:`lit_probe.vocab.unit_dim` says which dimension holds
                the units (a 3-D ``"auto"`` or ``"channels_last"`` snapshot is ``[n, T, F]``,
                ``"channels_first"`` ``[n, C, L]``).
            shape: the full tensor's shape: titles say which part of it a figure shows.
            priority: the figures explain a finding: never refused for a full queue; when the queue is full, the
                newest routine job not yet drawn makes room (it is listed as not drawn), and priority jobs are
                drawn before every routine job not yet handed to the drawing process.
            source: whose tensor it is under several processes (``"rank 0's samples"``, ``"rank 0's shard of the
                units"``), said in the titles.

        Returns:
            ``True`` when a job was queued; ``False`` when refused (queue full: listed in :attr:`skipped`) or
            there is nothing to draw.
        """
        kinds = [k for k in ("activations", "gradients", "histograms") if k in self.figures]
        if not kinds or (activation is None and gradient is None):
            return False
        act = None if activation is None else np.array(activation, dtype=np.float32, copy=True)
        grad = None if gradient is None else np.array(gradient, dtype=np.float32, copy=True)
        dmask = None if dead is None else np.array(dead, dtype=bool, copy=True).reshape(-1)
        shp = None if shape is None else tuple(int(s) for s in shape)
        step, layer = int(step), str(layer)
        figs = [(layer, k, step) for k in kinds
                if (k == "activations" and act is not None) or (k == "gradients" and grad is not None)
                or k == "histograms"]
        if not figs:
            return False
        return self._submit("layer", (step, layer, act, grad, dmask, layout, shp, kinds, str(source)), figs,
                            priority=priority)

    def submit_timeline(
        self,
        step: int,
        layers: Sequence[str],
        steps: np.ndarray,
        act_rms: np.ndarray,
        grad_rms: np.ndarray,
        dead_fraction: np.ndarray,
        findings: Sequence[tuple],
        *,
        urgent: bool = False,
    ) -> bool:
        """Queue the health timeline (figure ``"timeline"``, layer ``"_all"``); arrays are copied now.

        Args:
            step: the trainer's global step.
            layers: layer names (rows).
            steps: global step of each column.
            act_rms: ``[len(layers), len(steps)]`` activation RMS, NaN = no data.
            grad_rms: same shape, gradient RMS.
            dead_fraction: same shape, dead fraction in ``[0, 1]``.
            findings: ``(layer, step, kind, signal)`` tuples (``(layer, step, kind)`` means an activation
                finding), see :func:`~lit_probe.figures.health_timeline`.
            urgent: draw it before every job not yet handed to the drawing process, and accept it even
                when the queue is full (the final timeline at fit end, ahead of a :meth:`close` with a
                time bound).

        Returns:
            ``True`` when queued; ``False`` when refused or ``"timeline"`` is not requested.
        """
        if "timeline" not in self.figures:
            return False
        step = int(step)
        args = (
            step,
            [str(n) for n in layers],
            np.array(steps, copy=True),
            np.array(act_rms, dtype=np.float64, copy=True),
            np.array(grad_rms, dtype=np.float64, copy=True),
            np.array(dead_fraction, dtype=np.float64, copy=True),
            [tuple(f) for f in findings],
        )
        return self._submit("timeline", args, [(TIMELINE_LAYER, "timeline", step)], urgent=urgent)

    def submit_parameters(self, step: int, layer: str, weights: np.ndarray, grads: np.ndarray | None,
                          numel: int) -> bool:
        """Queue the histograms of a module's weights and parameter gradients (figure ``"parameters"``).

        Args:
            step: the trainer's global step.
            layer: the module.
            weights: a sample of its weights (1-D), ``grads``: of their gradients (``None``: none this step).
            numel: how many weights the module has (titles say what the sample covers).

        Returns:
            ``True`` when queued; ``False`` when refused or ``"parameters"`` is not requested.
        """
        if "parameters" not in self.figures:
            return False
        w = np.array(weights, dtype=np.float32, copy=True).reshape(-1)
        g = None if grads is None else np.array(grads, dtype=np.float32, copy=True).reshape(-1)
        step, layer = int(step), str(layer)
        return self._submit("parameters", (step, layer, w, g, int(numel)), [(layer, "parameters", step)])

    def submit_gradcam(self, step: int, layer: str, overlays: np.ndarray,
                       labels: Sequence[str] | None = None) -> bool:
        """Queue a Grad-CAM figure named ``"gradcam"``.

        Args:
            step: the trainer's global step.
            layer: the layer the CAMs were computed at.
            overlays: ``[n, H, W, 3]`` in ``[0, 1]`` (:func:`lit_probe.gradcam.overlay`).
            labels: one caption per image, e.g. ``"sample 0 · class 3"`` (default ``"sample i"``).

        Returns:
            ``True`` when queued; ``False`` when refused.
        """
        ov = np.array(overlays, dtype=np.float32, copy=True)
        labs = [f"sample {i}" for i in range(ov.shape[0])] if labels is None else [str(x) for x in labels]
        step, layer = int(step), str(layer)
        return self._submit("gradcam", (step, layer, ov, labs), [(layer, "gradcam", step)])

    def _submit(self, kind: str, args: tuple, figures: list[tuple[str, str, int]],
                urgent: bool = False, priority: bool = False) -> bool:
        self._check_fork()
        with self._lock:
            if len(self._inflight) >= self.max_queue and not (urgent or priority):
                if not self.wait_when_full:
                    self.dropped += 1
                    self._skip_locked(figures, "queue full")
                    return False
                # nothing may be dropped (figure_wait_s=None): the training thread waits for room
                while len(self._inflight) >= self.max_queue and not self._stopping:
                    self._cond.wait(timeout=1.0)
            if priority and len(self._inflight) >= self.max_queue and not self.wait_when_full:
                self._evict_routine_locked()  # (when nothing may be dropped, the queue grows instead)
            job = Job(self._next_id, kind, args, figures)
            self._next_id += 1
            self._inflight[job.id] = job
            if urgent:  # ahead of everything, and like a priority job never held back by the drawing's share
                self._priority.add(job.id)
                self._outbox.appendleft(job)
            elif priority:  # after the priority jobs already waiting, before every routine one
                self._priority.add(job.id)
                ahead = next((k for k, j in enumerate(self._outbox) if j.id not in self._priority),
                             len(self._outbox))
                self._outbox.insert(ahead, job)
            else:
                self._outbox.append(job)
            self._ensure_thread_locked()
            self._cond.notify_all()
        return True

    def _evict_routine_locked(self) -> None:
        """Make room for a priority job: the newest routine job not yet handed to the drawing process goes (and
        is listed as not drawn, "queue full"); with none waiting, the queue grows by one."""
        for k in range(len(self._outbox) - 1, -1, -1):
            job = self._outbox[k]
            if job.id in self._priority or job.kind == "timeline":
                continue
            del self._outbox[k]
            self._inflight.pop(job.id, None)
            self.dropped += 1
            self._skip_locked(job.figures, "queue full")
            return

    # -- waiting and closing ---------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Jobs accepted and not yet written to the sinks."""
        return len(self._inflight)

    @property
    def backend_in_use(self) -> str:
        """``"process"`` or ``"thread"``: where the next figures are drawn (after any fallback)."""
        return self._active

    @property
    def child_pid(self) -> int | None:
        """The drawing process's id while one runs."""
        proc = self._proc
        return None if proc is None else int(proc.pid)

    def _own_thread(self) -> bool:
        return threading.current_thread() in self._threads

    def drain(self, timeout: float | None = 60.0) -> bool:
        """Wait until every accepted job is drawn and written to the sinks.

        Args:
            timeout: seconds to wait at most; ``None`` waits forever.

        Returns:
            ``True`` when nothing is pending any more, ``False`` on timeout (or when called from a sink).
        """
        self._check_fork()
        if self._own_thread():
            return not self._inflight
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._unpaced += 1  # whoever waits for the figures gets them at full speed
            self._cond.notify_all()
            try:
                while self._inflight:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._cond.wait(0.5 if remaining is None else min(remaining, 0.5))
            finally:
                self._unpaced -= 1
        return True

    def close(self, timeout: float | None = 10.0) -> bool:
        """Wait for the queued figures at most ``timeout`` seconds in all, cancel the rest, stop drawing.

        Figures still queued when the time is up are not drawn: they are counted in :attr:`dropped` and
        listed in :attr:`skipped` with reason ``"fit end timeout"``. The drawing process is always ended (a
        stop message; terminate, then kill, if it does not exit) and reaped, and the renderer's threads are
        joined, so nothing outlives the call. Ending a process or thread that is still busy may take up to
        about 2 s beyond ``timeout``. Idempotent; a later submit starts a new process (or thread), so one
        renderer can serve several ``fit`` calls.

        Args:
            timeout: seconds to wait for queued figures; ``None`` waits for all of them.

        Returns:
            ``True`` when no drawing process or thread is left running.
        """
        self._check_fork()
        if self._own_thread():
            raise RuntimeError("FigureRenderer.close() called from one of its own threads (a sink?)")
        start = time.monotonic()
        deadline = None if timeout is None else start + max(0.0, float(timeout))

        def remaining(floor: float = 0.0) -> float | None:
            return None if deadline is None else max(floor, deadline - time.monotonic())

        self.drain(timeout)
        with self._lock:
            cancelled = [j for jid, j in self._inflight.items() if jid not in self._delivering]
            for j in cancelled:
                del self._inflight[j.id]
                self._skip_locked(j.figures, "fit end timeout")
            self.dropped += len(cancelled)
            self._outbox.clear()
            self._stopping = True
            self._cond.notify_all()
            proc, sender = self._proc, self._sender
        if cancelled:
            n_fig = sum(len(j.figures) for j in cancelled)
            log.warning("lit_probe: %d figure(s) of %d job(s) not drawn: still queued after %.1f s at close",
                        n_fig, len(cancelled), time.monotonic() - start)
            if proc is not None:
                end_process(proc, grace=0.0)
        ok = True
        if sender is not None:
            sender.join(remaining(1.0))
        with self._lock:
            proc = self._proc
        if proc is not None:
            end_process(proc, grace=min(remaining(0.2) or 2.0, 2.0))
        for t in list(self._threads):
            t.join(remaining(1.0))
            if t.is_alive():
                ok = False
                self._record_error(f"render thread {t.name!r} did not stop within {timeout}s "
                                   "(a sink is busy)", None)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._proc = None
            self._sender = None
            self._drawer = None
            self._stopping = False
            self._child_ready = False
            self._delivering.clear()
            self._inflight.clear()
        return ok

    def flush_sinks(self) -> None:
        """Call ``flush()`` on every sink that has one (e.g. a deferred :class:`~lit_probe.sinks.WandbSink`).

        Call this from the training thread (e.g. at a log step), not from a sink.
        """
        for sink in self.sinks:
            flush = getattr(sink, "flush", None)
            if callable(flush):
                try:
                    flush()
                except Exception as exc:  # a sink must never break training
                    self._record_error(f"{type(sink).__name__}.flush: {type(exc).__name__}: {exc}", exc)

    # -- accounting --------------------------------------------------------------------------------
    @property
    def errors(self) -> list[str]:
        """Failures of figures, sinks and the drawing process (capped at 100; ``error_count`` counts all)."""
        return self._errors

    @property
    def skipped(self) -> list[SkippedFigure]:
        """Figures that were not drawn, oldest first (the first 10,000; :attr:`skipped_count` counts all)."""
        return list(self._skipped)

    @property
    def skipped_count(self) -> int:
        """How many figures were not drawn."""
        return self._skipped_count

    def skipped_summary(self) -> list[str]:
        """Human lines about the figures not drawn, one per reason and step (or per reason over many steps).

        Returns:
            e.g. ``["12 figures of 9 layers at step 500 not drawn: queue full"]``; ``[]`` when all were drawn.
        """
        with self._lock:
            agg = {k: (n, set(v)) for k, (n, v) in self._skip_agg.items()}
        lines = []
        why = {}
        if self.share is not None and self.paced_s > 0:  # the queue filled because the drawing was kept to its share
            why["queue full"] = (f"queue full (the drawing is busy at most {self.share * 100:g}% of the time while training "
                                 "runs: figure_share)")
        for reason in SKIP_REASONS + tuple(sorted({r for r, _ in agg} - set(SKIP_REASONS))):
            steps = sorted(s for r, s in agg if r == reason)
            if not steps:
                continue
            if len(steps) <= 3:
                for s in steps:
                    n, layers = agg[(reason, s)]
                    lines.append(f"{_count(n, 'figure')} of {_count(len(layers), 'layer')} at step {s} "
                                 f"not drawn: {why.get(reason, reason)}")
            else:
                n = sum(agg[(reason, s)][0] for s in steps)
                layers = set().union(*(agg[(reason, s)][1] for s in steps))
                lines.append(f"{_count(n, 'figure')} of {_count(len(layers), 'layer')} at {len(steps)} steps "
                             f"({steps[0]} to {steps[-1]}) not drawn: {why.get(reason, reason)}")
        return lines

    def _skip_locked(self, figures: list[tuple[str, str, int]], reason: str) -> None:
        for layer, figure, step in figures:
            self._skipped_count += 1
            if len(self._skipped) < _MAX_SKIPPED:
                self._skipped.append(SkippedFigure(layer, figure, step, reason))
            n, layers = self._skip_agg.get((reason, step), (0, set()))
            layers.add(layer)
            self._skip_agg[(reason, step)] = (n + 1, layers)

    def _record_error(self, msg: str, exc: BaseException | None, tb: str | None = None) -> None:
        with self._lock:
            self.error_count += 1
            first = self.error_count == 1
            if len(self._errors) < _MAX_ERRORS:
                self._errors.append(msg)
        if first:
            if exc is not None:
                tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            if tb:
                log.warning("lit_probe: figure output failed (later failures only counted): %s\n%s", msg, tb)
            else:
                log.warning("lit_probe: %s", msg)

    # -- delivery (the lit-probe-render thread) ---------------------------------------------------
    def _emit(self, layer: str, figure: str, png: bytes, step: int) -> None:
        for sink in self.sinks:
            try:
                sink.write_png(layer, figure, png, step)
            except Exception as exc:  # one failing sink must not starve the others
                msg = f"{type(sink).__name__}.write_png({layer!r}, {figure!r}): {type(exc).__name__}: {exc}"
                self._record_error(msg, exc)

    def _complete(self, job_id: int, result: Result) -> None:
        """Write a finished job's PNGs to the sinks, record its failures, retire it."""
        with self._cond:
            sent = self._sent_at.pop(job_id, None)
            if sent is not None and self._pacer is not None:  # the child drew it alone: busy since it was sent
                self._pacer.spent(time.monotonic() - sent)
                self._cond.notify_all()
            job = self._inflight.get(job_id)
            if job is None:  # cancelled by close() meanwhile: its figures are already listed as skipped
                return
            self._delivering.add(job_id)
            for key, (sym, lo, hi) in result.scales.items():
                sc = self._scales.get(key)
                if sc is None:
                    sc = self._scales[key] = ColorScale(symmetric=sym)
                sc.lo, sc.hi = lo, hi
        try:
            for layer, figure, step, png in result.pngs:
                self._emit(layer, figure, png, step)
            for layer, figure, step, msg, tb in result.failures:
                with self._lock:
                    self._skip_locked([(layer, figure, step)], "error")
                self._record_error(msg, None, tb)
        finally:
            with self._cond:
                self._delivering.discard(job_id)
                self._inflight.pop(job_id, None)
                self.completed += 1
                self._cond.notify_all()

    # -- where the queue goes -----------------------------------------------------------------------
    def _ensure_thread_locked(self) -> None:
        """Start the thread that empties the outbox (the sender to the child, or the drawing thread) if none
        runs (caller holds the lock)."""
        if self._active == "process":
            self._ensure_sender_locked()
            return
        t = self._drawer
        if t is None or not t.is_alive():
            self._stopping = False
            self._threads = [x for x in self._threads if x.is_alive()]
            t = threading.Thread(target=self._draw_loop, name="lit-probe-render", daemon=False)
            self._drawer = t
            self._threads.append(t)
            t.start()

    def _wait_turn_locked(self, ready: Any, gone: Any = lambda: False) -> None:
        """Paced drawing (:attr:`share`): wait (holding the condition) until ``ready()`` and the drawing's time
        allows the next job. A priority job (it explains a finding) and a :meth:`drain` / :meth:`close` in
        progress never wait for time; nothing waits once stopping, ``gone()`` or the outbox is empty."""
        pacer = self._pacer
        if pacer is None:
            return
        while self._outbox and not self._stopping and not gone():
            if not ready():
                self._cond.wait(0.5)
                continue
            if self._unpaced or self._outbox[0].id in self._priority:
                return
            wait = pacer.wait_s()
            if wait <= 0:
                return
            began = time.monotonic()
            self._cond.wait(min(wait, 1.0))
            self.paced_s += time.monotonic() - began

    # -- thread backend ----------------------------------------------------------------------------
    def _draw_loop(self) -> None:
        """Draw the outbox's jobs in this process until it is empty (then the thread ends)."""
        me = threading.current_thread()
        while True:
            with self._cond:
                self._wait_turn_locked(lambda: True)
                job = self._outbox.popleft() if self._outbox and not self._stopping else None
                if job is None:
                    if self._drawer is me:  # under the lock: a racing submit starts a new thread
                        self._drawer = None
                    self._cond.notify_all()
                    return
                if self._local is None:
                    self._local = Drawer(self.dpi, self.bins, self.max_channels, scales=self._scales)
                drawer = self._local
            job_id = job.id
            began = time.monotonic()
            result = drawer.run_safely(job)
            if self._pacer is not None:
                self._pacer.spent(time.monotonic() - began)
            result.scales = {}  # drawn with self._scales itself
            job = None  # release the snapshots before waiting for the next job
            self._complete(job_id, result)

    def _fall_back_locked(self, reason: str) -> None:
        """Draw in a thread from now on; the jobs not yet drawn go to it, those the child had first (caller
        holds the lock)."""
        first = self._fallback_reason is None
        self._fallback_reason = reason
        self._active = "thread"
        if first:
            log.warning("lit_probe: could not start the drawing process (%s); figures are drawn in a thread "
                        "of the training process instead, which slows training steps while it draws", reason)
        queued = {j.id for j in self._outbox}
        handed = [self._inflight[jid] for jid in sorted(self._inflight)
                  if jid not in self._delivering and jid not in queued]
        self._outbox.extendleft(reversed(handed))
        if self._outbox:
            self._ensure_thread_locked()

    # -- process backend ---------------------------------------------------------------------------
    def _ensure_sender_locked(self) -> None:
        s = self._sender
        if s is None or not s.is_alive():
            self._stopping = False
            self._threads = [t for t in self._threads if t.is_alive()]
            t = threading.Thread(target=self._send_loop, name="lit-probe-render-send", daemon=True)
            self._sender = t
            self._threads.append(t)
            t.start()

    def _send_loop(self) -> None:
        me = threading.current_thread()
        proc = None
        try:
            try:
                proc = start_child()
            except Exception as exc:
                with self._lock:
                    self._fall_back_locked(f"{type(exc).__name__}: {exc}")
                return
            with self._lock:
                if self._proc is not None and self._proc is not proc:  # pragma: no cover - defensive
                    end_process(self._proc, grace=0.0)
                self._proc = proc
                self._child_ready = False
                init = {"dpi": self.dpi, "bins": self.bins, "max_channels": self.max_channels,
                        "scales": {k: (v.symmetric, v.lo, v.hi) for k, v in self._scales.items()}}
                recv = threading.Thread(target=self._recv_loop, args=(proc,), name="lit-probe-render",
                                        daemon=True)
                self._threads.append(recv)
            recv.start()
            write_frame(proc.stdin, init)
            while True:
                with self._cond:
                    while not self._outbox and not self._stopping and self._proc is proc:
                        self._cond.wait()
                    # paced: one job at a time at the child, each when the drawing's share of time allows it
                    self._wait_turn_locked(lambda: not self._sent_at, lambda: self._proc is not proc)
                    job = self._outbox.popleft() if self._outbox and self._proc is proc else None
                    if job is not None and self._pacer is not None:
                        self._sent_at[job.id] = time.monotonic()
                if job is None:
                    break
                write_frame(proc.stdin, job)
            write_frame(proc.stdin, "stop")
        except (OSError, ValueError):  # broken pipe: the child died; the receiver reports it
            pass
        finally:
            if proc is not None:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
            with self._cond:
                if self._sender is me:
                    self._sender = None
                    # jobs submitted while this sender was leaving (its child had just died): a new child
                    if self._outbox and not self._stopping and self._active == "process":
                        self._ensure_sender_locked()
                self._cond.notify_all()

    def _recv_loop(self, proc: Any) -> None:
        ready = False
        try:
            while True:
                msg = read_frame(proc.stdout)
                if msg is None:
                    break
                if msg[0] == "ready":
                    ready = True
                    with self._lock:
                        self._child_ready = True
                elif msg[0] == "done":
                    self._complete(msg[1], msg[2])
        except Exception as exc:  # a corrupt stream: treat like a dead child
            self._record_error(f"reading from the drawing process: {type(exc).__name__}: {exc}", exc)
        finally:
            try:
                proc.stdout.close()
            except OSError:
                pass
            self._child_gone(proc, ready)

    def _child_gone(self, proc: Any, ready: bool) -> None:
        """The child's output ended: reap it; if that was not asked for, account for the jobs it had."""
        end_process(proc, grace=2.0)
        rc = proc.returncode
        with self._cond:
            if self._proc is proc:
                self._proc = None
            self._sent_at.clear()
            self._cond.notify_all()  # the sender waits on `self._proc is proc`
            if self._stopping or not self._inflight:
                return
            if not ready:
                self._fall_back_locked(f"it exited with code {rc} before it was ready")
                return
            lost = [j for jid, j in self._inflight.items() if jid not in self._delivering]
            for j in lost:
                del self._inflight[j.id]
                self._skip_locked(j.figures, "error")
            self._outbox.clear()
            self._crashes += 1
            crashes = self._crashes
        self._record_error(f"the drawing process exited unexpectedly (code {rc}); {len(lost)} figure job(s) "
                           f"lost", None)
        with self._cond:
            if crashes >= _MAX_CRASHES and self._active == "process":
                self._fall_back_locked(f"it died {crashes} times")
            self._cond.notify_all()


class _Pacer:
    """A token bucket of drawing time: the drawing may be busy ``share`` of the wall time on average, with bursts
    of up to ``burst_s`` seconds (a figure step of a few layers is drawn at once; a long one is spread out)."""

    def __init__(self, share: float, burst_s: float) -> None:
        self.share, self.burst_s = share, burst_s
        self.tokens = burst_s
        self.t = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst_s, self.tokens + self.share * (now - self.t))
        self.t = now

    def spent(self, busy_s: float) -> None:
        """The drawing was busy ``busy_s`` seconds."""
        self._refill()
        self.tokens -= busy_s

    def wait_s(self) -> float:
        """Seconds until the next job may start (0: now)."""
        self._refill()
        return 0.0 if self.tokens >= 0 else -self.tokens / self.share


def _copy_scale(sc: ColorScale) -> ColorScale:
    out = ColorScale(symmetric=sc.symmetric)
    out.lo, out.hi = sc.lo, sc.hi
    return out


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


