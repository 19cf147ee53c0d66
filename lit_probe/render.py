"""Drawing off the training process: snapshots go to a drawing process, PNGs come back and go to the sinks.

* :class:`FigureRenderer` -- the orchestration the callback uses. Each ``submit_*`` call is one *job* (all
  requested figure kinds of one layer at one step, the health timeline, or a Grad-CAM grid). Only numpy arrays
  and a few small arguments make up a job. With ``backend="process"`` (the default) the jobs are drawn in a
  separate Python process, started lazily on the first submit: matplotlib then never holds the training
  process's GIL, so training steps run at full speed while figures are drawn. The training thread only copies
  the snapshot and appends the job to a queue; two light daemon threads of the training process feed the child
  (``lit-probe-render-send``) and take its PNGs back (``lit-probe-render``), calling
  ``sink.write_png(layer, figure, png, step)`` on every sink -- sinks stay in the training process (a W&B run
  cannot be used from another process). ``backend="thread"`` draws on one worker thread of the training
  process instead (:class:`RenderWorker`); the process backend falls back to it, with one log warning, when no
  process can be started (restricted environments).
* :class:`RenderWorker` -- a bounded job queue and ONE non-daemon worker thread, started lazily on the
  first :meth:`~RenderWorker.submit`; joined on :meth:`~RenderWorker.close`.

How the child is started: ``sys.executable -c <bootstrap>`` through :mod:`subprocess` -- a fresh
interpreter, like multiprocessing's "spawn" (never ``fork``: the training process has torch threads), but
without re-running the user's ``__main__`` script in the child (multiprocessing's spawn does that, so a
training script without an ``if __name__ == "__main__":`` guard would start a second training run). The
bootstrap registers ``lit_probe`` as a bare namespace, so the child imports :mod:`lit_probe.render` and
:mod:`lit_probe.figures` (numpy + matplotlib) and never torch or Lightning. Jobs and results travel as
length-prefixed pickles over the child's stdin/stdout; the child's own prints go to stderr. The child
ignores SIGINT (the training process decides), runs at a lower priority (``nice`` +5) and exits on a stop
message, when its stdin closes or when its parent is gone.

Bounded and accounted: at most ``max_queue`` jobs are accepted and not yet written to the sinks; a job
refused because of that, cancelled by :meth:`FigureRenderer.close` when its time bound runs out, or whose
drawing failed is listed in :attr:`FigureRenderer.skipped` (layer, figure, step, reason) and summarised by
:meth:`FigureRenderer.skipped_summary`. ``close`` always ends the child (stop message, then terminate / kill)
and joins the threads.

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
import functools
import logging
import os
import pickle
import sys
import threading
import time
import traceback
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator, Sequence, Tuple

import numpy as np

from lit_probe.figures import (
    ColorScale,
    _fmt,
    feature_grid,
    figure_to_png,
    gradcam_grid,
    health_timeline,
    histograms,
    robust_range,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["BACKENDS", "FIGURE_KINDS", "SKIP_REASONS", "TIMELINE_LAYER", "FigureRenderer", "RenderWorker",
           "SkippedFigure", "coverage_text"]

log = logging.getLogger(__name__)

#: Figure kinds a :class:`FigureRenderer` can draw; also the figure names used in file names and W&B keys.
FIGURE_KINDS: tuple[str, ...] = ("activations", "gradients", "histograms", "timeline", "parameters")
#: The pseudo layer name the timeline figure is written under.
TIMELINE_LAYER = "_all"
#: Where figures are drawn: a separate process (default) or a thread of the training process.
BACKENDS: tuple[str, ...] = ("process", "thread")
#: Why a figure was not drawn (:attr:`SkippedFigure.reason`).
SKIP_REASONS: tuple[str, ...] = ("queue full", "fit end timeout", "error")
_MAX_ERRORS = 100
_MAX_SKIPPED = 10_000
_MAX_CRASHES = 3  # unexpected deaths of the drawing process before the renderer draws in a thread
_CHILD_NICE = 5
#: (layer, figure, step, make): ``make()`` builds the figure (where the drawing happens).
_Maker = Tuple[str, str, int, Callable[[], "Figure"]]


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

    def submit(self, job: Callable[[], None], *, front: bool = False) -> bool:
        """Queue ``job`` without blocking; start the worker thread if none runs.

        Args:
            job: a callable with no arguments, run once on the worker thread.
            front: run it before every job still queued, and accept it even when the queue is full.

        Returns:
            ``True`` when accepted; ``False`` when the queue is full (``dropped`` is incremented).
        """
        if os.getpid() != self._pid:  # forked child: the parent's thread and lock are not ours
            self._init_runtime()
        with self._cond:
            if self._pending >= self.max_queue and not front:
                self.dropped += 1
                return False
            self._pending += 1
            if front:
                self._jobs.appendleft(job)
            else:
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


# ---------------------------------------------------------------------------------------------------
# what a figure covers
# ---------------------------------------------------------------------------------------------------
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
        layout: ``"channels_last"`` when the last dimension holds the features of a >= 3-D snapshot.
        part: ``"all"`` (a histogram: every value of the snapshot) or ``"grid"`` (the feature grid: the first
            sample, or all rows of an ``[n, F]`` snapshot, at most ``max_channels`` channels, the middle depth
            slice of 5-D tensors).
        max_channels: the grid's channel cap (``part="grid"``).

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
    last = len(snap) == 2 or layout == "channels_last"
    axis = len(snap) - 1 if last else 1
    c, c_total = snap[axis], full[axis]
    unit = "features" if last else "channels"
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
        parts.append(f"middle slice of depth {snap[2]}")
    return ", ".join(parts) + f" (tensor {tensor})"


# ---------------------------------------------------------------------------------------------------
# jobs and the drawing side (runs in the child process, or on the worker thread)
# ---------------------------------------------------------------------------------------------------
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


@dataclasses.dataclass
class _Job:
    """One unit of drawing: ``kind`` in ``{"layer", "timeline", "gradcam"}``, numpy/str/int ``args``."""

    id: int
    kind: str
    args: tuple
    figures: list[tuple[str, str, int]]  # (layer, figure, step) it should produce


@dataclasses.dataclass
class _Result:
    """What drawing one job gave: PNGs, failures and the colour scales it touched."""

    pngs: list[tuple[str, str, int, bytes]]
    failures: list[tuple[str, str, int, str, str]]  # layer, figure, step, message, traceback
    scales: dict[tuple[str, str], tuple[bool, float | None, float | None]]


class _Drawer:
    """Turns jobs into PNGs with matplotlib's Agg canvas; owns the colour scales of the side that draws.

    Args:
        dpi: PNG resolution.
        bins: histogram bins.
        max_channels: channel cap of the feature grids.
        scales: the colour scales to use and update (shared with the renderer for the thread backend).
    """

    def __init__(self, dpi: int, bins: int, max_channels: int,
                 scales: dict[tuple[str, str], ColorScale] | None = None) -> None:
        self.dpi = int(dpi)
        self.bins = int(bins)
        self.max_channels = int(max_channels)
        self.scales: dict[tuple[str, str], ColorScale] = {} if scales is None else scales
        self._touched: set[tuple[str, str]] = set()

    def run_safely(self, job: _Job) -> _Result:
        """:meth:`run`, with a failure of the job itself reported as a failure of each of its figures."""
        try:
            return self.run(job)
        except Exception as exc:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            return _Result([], [(layer, fig, step, f"{job.kind} job: {type(exc).__name__}: {exc}", tb)
                                for layer, fig, step in job.figures], {})

    def run(self, job: _Job) -> _Result:
        """Draw every figure of ``job``; a figure that raises is reported, the others are still drawn."""
        self._touched = set()
        pngs: list[tuple[str, str, int, bytes]] = []
        failures: list[tuple[str, str, int, str, str]] = []
        makers = {"layer": self._layer, "timeline": self._timeline, "gradcam": self._gradcam,
                  "parameters": self._parameters}[job.kind]
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
        return _Result(pngs, failures, scales)

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
        return (lo, hi), f"own range: far off this layer's scale [{_fmt(kept[0])}, {_fmt(kept[1])}]"

    def _layer(self, step: int, layer: str, act: np.ndarray | None, grad: np.ndarray | None,
               dead: np.ndarray | None, layout: str, shape: tuple[int, ...] | None,
               kinds: list[str]) -> Iterator[_Maker]:
        mc = self.max_channels

        def grid(arr: np.ndarray, figure: str, diverging: bool) -> Figure:
            view, axis = _sample_view(arr, layout)
            cov = coverage_text(arr.shape, shape, layout, part="grid", max_channels=mc)
            title = f"{layer} · {figure} · step {step} · {cov}"
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
                return histograms(panels, title=f"{layer} · histograms · step {step}", bins=self.bins)

            yield layer, "histograms", step, hist

    def _timeline(self, step: int, layers: list[str], steps: np.ndarray, act_rms: np.ndarray,
                  grad_rms: np.ndarray, dead_fraction: np.ndarray, findings: list[tuple]) -> Iterator[_Maker]:
        title = f"layer health · {len(layers)} layers · up to step {step}"
        yield TIMELINE_LAYER, "timeline", step, lambda: health_timeline(
            layers, steps, act_rms, grad_rms, dead_fraction, findings, title=title)

    def _parameters(self, step: int, layer: str, weights: np.ndarray, grads: np.ndarray | None,
                    numel: int) -> Iterator[_Maker]:
        def hist() -> Figure:
            every = "" if weights.size >= numel else f" (every {-(-numel // max(weights.size, 1)):,}th)"
            panels = [(f"weights: {weights.size:,} of {numel:,} values{every}", weights)]
            if grads is not None:
                panels.append((f"parameter gradients: {grads.size:,} of {numel:,} values{every}", grads))
            return histograms(panels, title=f"{layer} · parameters · step {step}", bins=self.bins)

        yield layer, "parameters", step, hist

    def _gradcam(self, step: int, layer: str, overlays: np.ndarray, labels: list[str]) -> Iterator[_Maker]:
        title = f"{layer} · Grad-CAM · step {step}"
        yield layer, "gradcam", step, lambda: gradcam_grid(overlays, title=title, labels=labels)


# ---------------------------------------------------------------------------------------------------
# the child process
# ---------------------------------------------------------------------------------------------------
def _write_frame(f: IO[bytes], obj: Any) -> None:
    """Write one length-prefixed pickle and flush."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(len(data).to_bytes(8, "little"))
    f.write(data)
    f.flush()


def _read_frame(f: IO[bytes]) -> Any:
    """Read one length-prefixed pickle; ``None`` at end of stream."""
    head = f.read(8)
    if len(head) < 8:
        return None
    n = int.from_bytes(head, "little")
    data = f.read(n)
    if len(data) < n:
        return None
    return pickle.loads(data)


def _watch_parent(parent: int) -> None:
    """Exit the child when its parent is gone (its stdin may stay open in the parent's forked children)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(0)


def _child_main(parent: int) -> None:
    """Entry point of the drawing process: read jobs from stdin, write results to stdout, until "stop"."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent decides
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints go to stderr, never into the protocol
    try:
        os.nice(_CHILD_NICE)
    except (OSError, AttributeError):
        pass
    threading.Thread(target=_watch_parent, args=(parent,), name="lit-probe-watch", daemon=True).start()
    try:
        init = _read_frame(inp)
        if init is None:
            return
        scales = {}
        for key, (sym, lo, hi) in init.pop("scales", {}).items():
            sc = ColorScale(symmetric=sym)
            sc.lo, sc.hi = lo, hi
            scales[key] = sc
        drawer = _Drawer(scales=scales, **init)
        _write_frame(out, ("ready", os.getpid()))
        while True:
            job = _read_frame(inp)
            if job is None or job == "stop":
                break
            _write_frame(out, ("done", job.id, drawer.run_safely(job)))
    except (BrokenPipeError, OSError):  # the parent went away
        pass
    finally:
        try:
            out.close()
        except OSError:
            pass


_BOOTSTRAP = """\
import sys, types
sys.path[:0] = {paths!r}
_pkg = types.ModuleType("lit_probe"); _pkg.__path__ = [{pkg!r}]; sys.modules["lit_probe"] = _pkg
from lit_probe.render import _child_main
_child_main({parent!r})
"""


def _child_command() -> list[str]:
    """The command line of the drawing process (``sys.executable -c <bootstrap>``)."""
    if not sys.executable:
        raise RuntimeError("sys.executable is not set (embedded interpreter)")
    pkg_dir = os.path.dirname(os.path.abspath(__file__))
    paths = [p for p in sys.path if isinstance(p, str)]
    return [sys.executable, "-c", _BOOTSTRAP.format(paths=paths, pkg=pkg_dir, parent=os.getpid())]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # one thread per library in the child: drawing needs none, and the training process needs the cores
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    return env


# ---------------------------------------------------------------------------------------------------
# the renderer
# ---------------------------------------------------------------------------------------------------
_RUNTIME = ("_lock", "_cond", "_inflight", "_delivering", "_outbox", "_next_id", "_pid", "_proc", "_sender",
            "_threads", "_stopping", "_child_ready", "_worker", "_local", "_active")


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
            process can be started) or ``"thread"`` (one worker thread of this process).

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
        self.sinks = list(sinks)
        self.figures = figures
        self.max_channels = int(max_channels)
        self.max_queue = int(max_queue)
        self.dpi = int(dpi)
        self.bins = int(bins)
        self.backend = backend
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
        self._inflight: dict[int, _Job] = {}
        self._delivering: set[int] = set()
        self._outbox: collections.deque[_Job] = collections.deque()
        self._next_id = 0
        self._pid = os.getpid()
        self._proc: Any = None
        self._sender: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._child_ready = False
        self._worker: RenderWorker | None = None
        self._local: _Drawer | None = None
        self._active = "thread" if (self.backend == "thread" or self._fallback_reason) else "process"

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
    ) -> bool:
        """Queue the figures of one layer at one step (arrays are copied now).

        Args:
            step: the trainer's global step (used in titles, file names and W&B steps).
            layer: the probe path (module name).
            activation: :func:`~lit_probe.snapshots.snapshot_tensor` of the output: ``[n, C, H, W]``,
                ``[n, C, L]``, ``[n, F]`` or ``[n, T, F]``; ``None`` to skip activation figures.
            gradient: the same for the gradient w.r.t. the output; ``None`` to skip gradient figures.
            dead: boolean mask over channels/features of dead units, marked on the activation grid.
            layout: the snapshot's layout (``"channels_last"`` makes a 3-D snapshot ``[n, T, F]``).
            shape: the full tensor's shape: titles say which part of it a figure shows.

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
        return self._submit("layer", (step, layer, act, grad, dmask, layout, shp, kinds), figs)

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
                urgent: bool = False) -> bool:
        self._check_fork()
        with self._lock:
            if len(self._inflight) >= self.max_queue and not urgent:
                self.dropped += 1
                self._skip_locked(figures, "queue full")
                return False
            job = _Job(self._next_id, kind, args, figures)
            self._next_id += 1
            self._inflight[job.id] = job
            if self._active == "process":
                if urgent:
                    self._outbox.appendleft(job)
                else:
                    self._outbox.append(job)
                self._ensure_sender_locked()
                self._cond.notify_all()
                return True
        self._thread_submit(job, front=urgent)
        return True

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
        cur = threading.current_thread()
        if cur in self._threads:
            return True
        w = self._worker
        return w is not None and w._thread is cur

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
            while self._inflight:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(0.5 if remaining is None else min(remaining, 0.5))
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
                _end_process(proc, grace=0.0)
        ok = True
        if sender is not None:
            sender.join(remaining(1.0))
        with self._lock:
            proc = self._proc
        if proc is not None:
            _end_process(proc, grace=min(remaining(0.2) or 2.0, 2.0))
        for t in list(self._threads):
            t.join(remaining(1.0))
            if t.is_alive():
                ok = False
                self._record_error(f"render thread {t.name!r} did not stop within {timeout}s "
                                   "(a sink is busy)", None)
        worker = self._worker
        if worker is not None:
            if not worker.close(remaining(0.5)):
                ok = False
                for e in worker.errors:
                    self._record_error(e, None)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._proc = None
            self._sender = None
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
        for reason in SKIP_REASONS + tuple(sorted({r for r, _ in agg} - set(SKIP_REASONS))):
            steps = sorted(s for r, s in agg if r == reason)
            if not steps:
                continue
            if len(steps) <= 3:
                for s in steps:
                    n, layers = agg[(reason, s)]
                    lines.append(f"{_count(n, 'figure')} of {_count(len(layers), 'layer')} at step {s} "
                                 f"not drawn: {reason}")
            else:
                n = sum(agg[(reason, s)][0] for s in steps)
                layers = set().union(*(agg[(reason, s)][1] for s in steps))
                lines.append(f"{_count(n, 'figure')} of {_count(len(layers), 'layer')} at {len(steps)} steps "
                             f"({steps[0]} to {steps[-1]}) not drawn: {reason}")
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

    # -- delivery (lit-probe-render thread, or the worker thread) -----------------------------------
    def _emit(self, layer: str, figure: str, png: bytes, step: int) -> None:
        for sink in self.sinks:
            try:
                sink.write_png(layer, figure, png, step)
            except Exception as exc:  # one failing sink must not starve the others
                msg = f"{type(sink).__name__}.write_png({layer!r}, {figure!r}): {type(exc).__name__}: {exc}"
                self._record_error(msg, exc)

    def _complete(self, job_id: int, result: _Result) -> None:
        """Write a finished job's PNGs to the sinks, record its failures, retire it."""
        with self._lock:
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

    # -- thread backend ----------------------------------------------------------------------------
    def _thread_submit(self, job: _Job, front: bool = False) -> None:
        with self._lock:
            if self._worker is None:
                self._worker = RenderWorker(max_queue=2 * self.max_queue + 2, name="lit-probe-render")
            worker = self._worker
        # refusal cannot happen in practice: the jobs in flight are bounded by max_queue already
        if not worker.submit(functools.partial(self._run_here, job.id), front=front):
            with self._cond:
                if self._inflight.pop(job.id, None) is not None:
                    self.dropped += 1
                    self._skip_locked(job.figures, "queue full")
                self._cond.notify_all()

    def _run_here(self, job_id: int) -> None:
        with self._lock:
            job = self._inflight.get(job_id)
            if job is None:  # cancelled
                return
            if self._local is None:
                self._local = _Drawer(self.dpi, self.bins, self.max_channels, scales=self._scales)
            drawer = self._local
        result = drawer.run_safely(job)
        result.scales = {}  # the thread backend draws with self._scales itself
        self._complete(job_id, result)

    def _fall_back_locked(self, reason: str) -> None:
        """Draw in a thread from now on; hand the jobs not yet drawn to it (caller holds the lock)."""
        first = self._fallback_reason is None
        self._fallback_reason = reason
        self._active = "thread"
        self._outbox.clear()
        if first:
            log.warning("lit_probe: could not start the drawing process (%s); figures are drawn in a thread "
                        "of the training process instead, which slows training steps while it draws", reason)
        for jid in sorted(self._inflight):
            if jid not in self._delivering:
                self._thread_submit(self._inflight[jid])

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

    def _start_child(self) -> Any:
        import subprocess

        return subprocess.Popen(_child_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                env=_child_env(), close_fds=True)

    def _send_loop(self) -> None:
        me = threading.current_thread()
        proc = None
        try:
            try:
                proc = self._start_child()
            except Exception as exc:
                with self._lock:
                    self._fall_back_locked(f"{type(exc).__name__}: {exc}")
                return
            with self._lock:
                if self._proc is not None and self._proc is not proc:  # pragma: no cover - defensive
                    _end_process(self._proc, grace=0.0)
                self._proc = proc
                self._child_ready = False
                init = {"dpi": self.dpi, "bins": self.bins, "max_channels": self.max_channels,
                        "scales": {k: (v.symmetric, v.lo, v.hi) for k, v in self._scales.items()}}
                recv = threading.Thread(target=self._recv_loop, args=(proc,), name="lit-probe-render",
                                        daemon=True)
                self._threads.append(recv)
            recv.start()
            _write_frame(proc.stdin, init)
            while True:
                with self._cond:
                    while not self._outbox and not self._stopping and self._proc is proc:
                        self._cond.wait()
                    job = self._outbox.popleft() if self._outbox and self._proc is proc else None
                if job is None:
                    break
                _write_frame(proc.stdin, job)
            _write_frame(proc.stdin, "stop")
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
                msg = _read_frame(proc.stdout)
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
        _end_process(proc, grace=2.0)
        rc = proc.returncode
        with self._cond:
            if self._proc is proc:
                self._proc = None
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

    # -- compatibility -----------------------------------------------------------------------------
    @property
    def worker(self) -> RenderWorker | None:
        """The :class:`RenderWorker` of the thread backend (``None`` while drawing in a process)."""
        return self._worker


def _copy_scale(sc: ColorScale) -> ColorScale:
    out = ColorScale(symmetric=sc.symmetric)
    out.lo, out.hi = sc.lo, sc.hi
    return out


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _end_process(proc: Any, grace: float) -> None:
    """Wait ``grace`` seconds for ``proc`` to exit, then terminate, then kill; always reap it."""
    import subprocess

    if grace > 0:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        except OSError:
            pass
