"""Session
=======

:class:`ProbeSession` is the Lightning-free runtime of one probed run: it owns the hooks
(:class:`~lit_probe.hooks.HookRegistry`), the device statistics (:class:`~lit_probe.stats.StatBuffer`), the
host :class:`~lit_probe.history.History` and the :class:`~lit_probe.diagnose.Diagnoser`. The Lightning
callback drives it; it also works on a bare ``nn.Module``::

    with ProbeSession.from_model(model, ["layer1", "layer3.*"]) as session:
        for step, (x, y) in enumerate(loader):
            session.begin_step(step)
            loss_fn(model(x), y).backward()
            session.end_step()
            findings = session.flush()
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .diagnose import Diagnosis, ParamModules, Thresholds, alarm_bounds, dead_units, diagnose
from .findings import Finding
from .gradref import GradReference
from .history import LOGGED_PARAM_STATS, PARAM_STATS, Derived, History, derive
from .hooks import HookRegistry, iter_tensors, warn_once
from .selection import resolve
from .snapshots import RecentParts, held_part, snapshot_tensor, to_host
from .stats import HostRows, RankRows, StatBuffer, merge_ranks, pack_rows
from .vocab import (ACTIVATION, GRADIENT, MAX_CALLS, PARAMETER, is_relu_like, stream_name, unit_count, unit_dim,
                    unit_layouts)

if TYPE_CHECKING:
    from .params import ParamWatch

__all__ = ["ProbeSession", "LayerSnapshot", "Timeline", "SIGNAL_ACT", "SIGNAL_GRAD"]

SIGNAL_ACT = ACTIVATION
SIGNAL_GRAD = GRADIENT


def _no_graph_task() -> int:  # pragma: no cover - older torch
    return -1


#: the autograd graph task running now, -1 outside a backward pass (activation checkpointing recomputes forwards
#: inside one)
_graph_task_id = getattr(torch._C, "_current_graph_task_id", _no_graph_task)
_set_grad_enabled = torch._C._set_grad_enabled


@dataclass
class LayerSnapshot:
    """What the figures of one stream need at one step: small CPU copies, no tensor references."""

    name: str
    step: int
    activation: np.ndarray | None
    gradient: np.ndarray | None
    dead: np.ndarray | None
    layout: str
    shape: tuple[int, ...] | None
    source: str = ""  #: under several processes, whose tensor it is (said in the figure titles)


@dataclass
class Timeline:
    """The health timeline's data: one row per stream, one column per fully measured step."""

    names: list[str]
    steps: np.ndarray
    act_rms: np.ndarray
    grad_rms: np.ndarray
    dead: np.ndarray
    marks: list[tuple[str, int, str, str]]  # (stream, step, kind, signal)


class ProbeSession:
    """Hooks, device statistics, history and detectors for one run over resolved modules.

    The unit of measurement is a *stream*: one call of one module, one signal. A module called twice in a
    step (torchvision's ``BasicBlock.relu``) gives the streams ``layer1.0.relu`` and ``layer1.0.relu#1``,
    each with its own statistics, dead-unit window and place in execution order (:mod:`lit_probe.vocab`).

    Args:
        modules: ``(name, module)`` pairs to probe (see :func:`lit_probe.selection.resolve`).
        signals: ``"activation"`` and/or ``"gradient"``.
        every_n_steps: full statistics every this many steps (and on each of the first
            ``full_warmup_steps`` steps); min/max (non-finite and exploding checks) are taken every step.
        full_warmup_steps: steps from the start of a run that always take full statistics.
        thresholds: detector thresholds (a :class:`Thresholds` or a dict of overrides).
        history_size: steps of statistics kept on the host.
        ring_rows: steps the device ring holds between two :meth:`flush` calls.
        gather: for several processes: takes this rank's packed statistics (a 1-D float64 array) and returns
            every rank's, in rank order; entered by every rank at the same steps. ``None``: one process.
        root: the model the names are relative to (improves which dimension holds the units of
            element-wise layers: see :func:`lit_probe.vocab.unit_layouts`).
        max_calls: calls of one module per step with a stream of their own (later calls merge into the last).
        param_scope: with the ``"parameter"`` signal, a module's own parameters (``"own"``) or its whole subtree's
            (``"recursive"``); see :mod:`lit_probe.params`.
        tensor_parallel: with ``gather``, the size of a tensor-parallel group (consecutive ranks that see the same
            samples, each a part of some layers' units: see :func:`lit_probe.stats.merge_ranks`); 1 otherwise.
    """

    def __init__(self, modules: Sequence[tuple[str, nn.Module]], *,
                 signals: Sequence[str] = (SIGNAL_ACT, SIGNAL_GRAD), every_n_steps: int = 1,
                 thresholds: Thresholds | Mapping[str, float] | None = None, history_size: int = 1000,
                 ring_rows: int = 64, gather: Callable[[np.ndarray], list[np.ndarray]] | None = None,
                 full_warmup_steps: int = 10, root: nn.Module | None = None, max_calls: int = MAX_CALLS,
                 param_scope: str = "own", tensor_parallel: int = 1) -> None:
        self.names = [n for n, _ in modules]
        self.modules = [m for _, m in modules]
        self.signals = tuple(signals)
        self.every_n_steps = max(1, int(every_n_steps))
        self.full_warmup_steps = max(0, int(full_warmup_steps))
        self.thresholds = thresholds if isinstance(thresholds, Thresholds) else Thresholds.from_dict(thresholds)
        self.want_act = SIGNAL_ACT in self.signals
        self.want_grad = SIGNAL_GRAD in self.signals
        # parameter norms on full-statistics steps only, when the activation or gradient streams watch every step
        # (a NaN/Inf weight shows in its module's output at once, a non-finite parameter gradient in the gradient
        # of that output); every step when they are the only signal
        self.params_every_step = not (self.want_act or self.want_grad)
        self.max_calls = max(1, int(max_calls))
        n = len(self.names)
        self.layouts = unit_layouts(root, self.names, self.modules)
        self._relu_like = [is_relu_like(m) for m in self.modules]
        # streams: slot -> (module index, call, signal); call 0 of every module is made up front, in module order
        self.slot_names: list[str] = []
        self.slot_signals: list[str] = []
        self.slot_module: list[int] = []
        self.slot_call: list[int] = []
        self.dead_judged: list[bool] = []
        self._slots: dict[tuple[int, int, str], int] = {}
        self.buffer = StatBuffer(2 * n, ring_rows)
        # the steps each judged stream's units were measured on: enough for its dead window and a ring of rows
        self.buffer.unit_steps_kept = max(self.buffer.unit_steps_kept, 2 * (self.thresholds.dead_window + ring_rows))
        self.params: ParamWatch | None = None
        if PARAMETER in self.signals:
            from .params import ParamWatch

            self.params = ParamWatch(list(zip(self.names, self.modules)), self.buffer, param_scope)
        # the vanishing rule's reference, whatever is probed: parameter-gradient norms of the whole model
        self.grad_reference = GradReference(root) if root is not None and self.want_grad else None
        self._reference_made = self.grad_reference is not None
        self.history = History(self.slot_names, history_size)
        for i in range(n):
            for signal in (SIGNAL_ACT, SIGNAL_GRAD):
                self._slot(i, 0, signal)
        self.diagnosis = Diagnosis()
        self.gather = gather
        self.tensor_parallel = max(1, int(tensor_parallel))
        #: per slot: its units are split over a tensor-parallel group (joined across ranks, not merged)
        self.units_split = np.zeros(0, bool)
        self.registry = HookRegistry()
        self.collecting = False
        self.full = True
        self.step = -1
        self.findings: list[Finding] = []
        self.fired = np.zeros(n, dtype=bool)  # modules whose forward hook ran at least once while collecting
        self.units: dict[int, np.ndarray] = {}  # per-unit last-fired steps at the last flush
        self.capture: dict[int, tuple[np.ndarray | None, tuple[int, ...]]] | None = None
        self.capture_samples = 1
        self.capture_channels = 64
        self._dead_log: dict[int, list[tuple[int, float]]] = {}
        self._seen_order: dict[int, int] = {}  # slot -> place in execution order (first step it was seen in)
        # plain lists, not arrays: read and written by the hooks (a numpy scalar access costs 5x a list's)
        self._calls = [0] * n  # calls of each module in the current batch
        self._recalls = [0] * n  # ... and in its recomputation (activation checkpointing)
        self._grad_hooks_this_step = [0] * n
        # (slot, output index or None) -> its gradient hook (one object per stream, reused every step)
        self._grad_hook_of: dict[tuple[int, int | None], Any] = {}
        # per (module, call) (key module * max_calls + call): [activation slot, gradient slot, its node pre-hook
        # for output 0, units watched, ndim, unit dim of that ndim]; made at a stream's first call
        self._entries: dict[int, list] = {}
        self._warned: set = set()
        self._peeked: Any = None
        self.disabled: set[int] = set()
        # flight recorder (record_recent): device copies of what figures show (small CPU tensors: held, see
        # RecentParts), for the last three steps; those of a step whose min/max alarmed are pinned (as host arrays)
        # until findings claim them
        self.recent: dict[int, tuple[Any, tuple[int, ...]]] | None = None
        self._record = False
        self._ring: RecentParts | None = None
        self._held_left = 0  # elements the recorder may still hold by reference this step
        self._kept: dict[int, dict] = {}
        self.pinned: dict[int, list[LayerSnapshot]] = {}
        self.pinned_before: tuple[int, list[LayerSnapshot]] | None = None
        # per slot, the bound the per-step alarm uses: the absolute one, or the growth rule's (exploding_growth x
        # the stream's running median of absmax) once known, so a relative explosion alarms at its step too
        self._alarm_bounds: np.ndarray | None = None
        self._grad_mask: np.ndarray | None = None
        # with keep_derived(): every block of per-step statistics read since the last take_derived() (for the
        # run's statistics log); None: not kept
        self._derived: list[Derived] | None = None

    def keep_derived(self, on: bool = True) -> None:
        """Keep every block of per-step statistics :meth:`flush` reads (also the reads of a full ring) until
        :meth:`take_derived`; off: none kept."""
        self._derived = [] if on else None

    def take_derived(self) -> list[Derived]:
        """The blocks read since the last call (oldest first), with :meth:`keep_derived`; else ``[]``."""
        if not self._derived:
            return []
        out, self._derived = self._derived, []
        return out

    def _slot(self, i: int, call: int, signal: str) -> int:
        key = (i, call, signal)
        slot = self._slots.get(key)
        if slot is None:  # a new stream (first steps only): its slot, and room on the device
            slot = len(self.slot_names)
            self._slots[key] = slot
            self.slot_names.append(stream_name(self.names[i], call))
            self.slot_signals.append(signal)
            self.slot_module.append(i)
            self.slot_call.append(call)
            self.dead_judged.append(signal == SIGNAL_ACT and self._relu_like[i])
            self.buffer.ensure_slots(slot + 1)
        return slot

    def slot_of(self, stream: str, signal: str) -> int:
        """The slot of a stream (``"layer1.0.relu#1"``) and signal; ``KeyError`` if it never appeared."""
        for slot, (name, sig) in enumerate(zip(self.slot_names, self.slot_signals)):
            if name == stream and sig == signal:
                return slot
        raise KeyError(f"no {signal} stream {stream!r}; streams: {sorted(set(self.slot_names))[:20]}")

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_model(cls, model: nn.Module, probes: Sequence[str], **kwargs: Any) -> "ProbeSession":
        """Resolve ``probes`` against ``model`` and build a session (not yet open)."""
        return cls(resolve(model, probes), root=model, **kwargs)

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> "ProbeSession":
        """Attach the hooks (idempotent)."""
        self.registry.attach(self, list(zip(self.names, self.modules)))
        return self

    def close(self) -> None:
        """Stop collecting and remove every hook (idempotent; safe on every way out)."""
        self.collecting = False
        self.capture = None
        self.recent, self._kept = None, {}
        if self._ring is not None:
            self._ring.settle()  # no tensor held past the run
        self.registry.remove()
        if self.params is not None:
            self.params.remove()

    def release(self) -> None:
        """Close and drop every reference to the model and to device memory; the history stays."""
        self.close()
        self.modules = []
        self.buffer.release()
        if self.params is not None:
            self.params.release()

    def __enter__(self) -> "ProbeSession":
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict:  # a session is per process: never pickle modules or device buffers
        raise TypeError("ProbeSession is not picklable; pickle the FeatureProbe before fit instead.")

    # ------------------------------------------------------------------ step control
    def begin_step(self, step: int, full: bool | None = None) -> None:
        """Collect statistics for training step ``step`` until :meth:`end_step` (called once per batch:
        with gradient accumulation, several batches share one step and one row)."""
        n = len(self._calls)
        self._calls = [0] * n
        self._recalls = [0] * n
        if self.registry.leaf_handles:
            self.registry.drop_leaf_hooks()
        if step != self.step:
            self._grad_hooks_this_step = [0] * n
            if self._record:
                self.recent = {}
                if self._ring is not None:
                    self._ring.advance()
                    self._held_left = self._ring.HELD_PER_STEP
            if self.buffer.pending >= self.buffer.rows:
                self.flush()  # ring full: read now rather than lose steps
        self.step = int(step)
        if full is None:  # full statistics on the first steps (bugs of initialisation show at once), then every N
            full = self.step < self.full_warmup_steps or self.step % self.every_n_steps == 0
        self.full = bool(full)
        self.buffer.begin_step(self.step)
        self.collecting = True

    def new_batch(self) -> None:
        """A new forward pass within the current step (validation batches): calls are numbered from 0 again."""
        self._calls = [0] * len(self._calls)
        self._recalls = [0] * len(self._recalls)

    def end_step(self) -> None:
        self.collecting = False
        self.buffer.commit()
        if self.params is not None:
            self.params.end_step()
        if self._record and self.recent is not None:
            if self._ring is not None:
                self._ring.settle()
            self._kept[self.step] = self.recent
            # the last three steps: a GPU alarm is read a step later, and the step before the alarmed one is the
            # "before" of its figures
            for old in sorted(self._kept)[:-3]:
                del self._kept[old]

    def record_scale(self, scale: Any, end: bool) -> None:
        """The GradScaler scale in force (start of step) or after its update (end of step)."""
        if self.want_grad:
            self.buffer.record_scale(scale, end)

    def sentinel_alarm(self, bound: float) -> int | None:
        """Called once per step (``on_finding="raise"/"stop"``, the flight recorder): the step that showed a
        non-finite value or an absolute value beyond ``bound`` (or beyond the growth rule's bound of its stream,
        once the stream's running median is known; gradients divided by the loss scale), or ``None``; no
        blocking read. On CUDA the current step's min/max are copied without waiting and the previous step's
        copy is checked (the alarm comes one step later, its step stays exact); on CPU the copy costs nothing to
        wait for and the current step is checked. With :meth:`record_recent`, the alarmed step's figure inputs
        are pinned."""
        alarm = None
        bounds = np.minimum(self._alarm_bounds, bound) if self._alarm_bounds is not None else bound
        grads = self._grad_slots()
        if self._peeked is not None:
            if self.buffer.alarm(self._peeked, bounds, grads):
                alarm = int(self._peeked[0])
            self._peeked = None
        peeked = self.buffer.peek()
        if peeked is not None and peeked[2] is None:  # no device pipeline to keep busy: check it now
            if alarm is None and self.buffer.alarm(peeked, bounds, grads):
                alarm = int(peeked[0])
        else:
            self._peeked = peeked
        if alarm is not None and alarm in self._kept and not self.pinned:
            # the first alarm since findings last claimed the pins: that step's figures, and the step's before it
            # (the "before" of a layer that had no figure yet), as host arrays
            self.pinned[alarm] = self._snapshots(self._kept.pop(alarm), alarm, device=True)
            prev = max((k for k in self._kept if k < alarm), default=None)
            self.pinned_before = None if prev is None else \
                (prev, self._snapshots(self._kept[prev], prev, device=True))
        return alarm

    def claim_pinned(self, step: int | None = None) -> list[LayerSnapshot]:
        """The pinned figure inputs of ``step`` (any pinned step when ``None``); every pin is dropped (see
        :attr:`pinned_before` for the step before)."""
        pins, self.pinned = self.pinned, {}
        if step is None:
            return next(iter(pins.values()), [])
        return pins.get(step, [])

    def claim_recent(self, step: int) -> tuple[int, list[LayerSnapshot]] | None:
        """The flight recorder's figure inputs of ``step`` when it still holds them (the last three steps), else of
        the latest step it holds, as ``(step they show, snapshots)``; that step is dropped. ``None``: the recorder
        is off or holds nothing. For findings of a window (dead units, vanishing gradients) read after their step."""
        if not self._kept:
            return None
        at = int(step) if step in self._kept else max(self._kept)
        return at, self._snapshots(self._kept.pop(at), at, device=True)

    def claim_pinned_before(self) -> tuple[int, list[LayerSnapshot]] | None:
        """``(step, snapshots)`` of the step before the pinned one (when the recorder held it); dropped."""
        before, self.pinned_before = self.pinned_before, None
        return before

    def bind_optimizers(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """The parameter signal: map the probed parameters onto ``optimizers`` and hook their steps (after each
        step: the update). Without the signal, nothing."""
        if self.params is not None:
            self.params.bind(optimizers, gather=self.gather)

    def before_optimizer_step(self, optimizer: Any) -> None:
        """Just before ``optimizer`` updates (gradients final: unscaled, before clipping), on full-statistics steps
        (every step when parameters are the only signal, :attr:`params_every_step`): weight and gradient norms of its
        probed parameters and a copy, for the update ratio after the step."""
        if self.params is not None and self.collecting:
            if self.full or self.params_every_step:
                self.params.before_step(optimizer, self.full)
            else:  # a figure step that is not a full step still gets its parameter histograms
                self.params.histograms_only(optimizer)
        if self.grad_reference is not None and self.collecting and self.full:
            try:
                self.grad_reference.measure(self.step)
            except Exception as err:  # never break training for the reference: the vanishing rule goes without it
                self.grad_reference = None
                warn_once(self._warned, "grad_reference", f"lit_probe: the model's gradient reference failed "
                          f"({type(err).__name__}: {err}); the vanishing rule uses the probed streams only.",
                          RuntimeWarning)

    def take_param_histograms(self) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """Weights and parameter gradients copied at this figure step's optimizer step, per module."""
        return self.params.take_histograms() if self.params is not None else {}

    def record_recent(self, on: bool = True, samples: int = 1, channels: int = 64) -> None:
        """Flight recorder: keep, for the last two steps, a small device copy of what figures show of every
        stream (one small kernel per stream and step), so that :meth:`sentinel_alarm` can pin the figures of
        the very step that showed a NaN/Inf or an explosion (:attr:`pinned`)."""
        self._record = bool(on)
        self.capture_samples = max(1, int(samples))
        self.capture_channels = max(1, int(channels))
        self._ring = RecentParts(samples, channels) if on else None
        self._held_left = RecentParts.HELD_PER_STEP
        if not on:
            self.recent, self._kept, self.pinned, self.pinned_before = None, {}, {}, None

    def request_snapshots(self, samples: int = 1, channels: int = 64) -> None:
        """Copy what the figures need (a few samples and channels per stream) during the current step."""
        self.capture = {}
        self.capture_samples = max(1, int(samples))
        self.capture_channels = max(1, int(channels))
        if self.params is not None:
            self.params.request_histograms()

    # ------------------------------------------------------------------ hot path (called by hooks)
    def _observe_output(self, i: int, output: Any) -> None:
        """The forward hook's body (:attr:`_on_output` is the same, never traced by TorchDynamo)."""
        if i in self.disabled:
            return
        recompute = _graph_task_id() != -1  # activation checkpointing re-runs forward inside backward
        # a recomputed forward (checkpointing) re-runs the calls in their order: its k-th call is the k-th call
        counter = self._recalls if recompute else self._calls
        call = counter[i]
        counter[i] = call + 1
        if call >= self.max_calls:
            call = self.max_calls - 1
        # what the hook needs of this (module, call), looked up once per stream (a few us per tensor saved)
        entry = self._entries.get(i * self.max_calls + call)
        if entry is None:
            entry = self._entry(i, call)
        if type(output) is torch.Tensor and not recompute:  # the common case: one plain tensor, in one call
            n = output.numel()
            if n == 0 or not output.is_floating_point():
                return
            needs_grad = output.requires_grad
            grad_mode = torch.is_grad_enabled()
            act = entry[0]
            if act >= 0:
                ndim = output.dim()
                if entry[4] != ndim:  # the unit axis of this rank (cached per stream)
                    entry[4], entry[5] = ndim, unit_dim(self.layouts[i], ndim)
                # the reductions and copies record no graph: grad mode off around them (thread-local, no
                # dispatch) costs less than a detached view (a tensor made per call)
                off = needs_grad and grad_mode
                if off:
                    _set_grad_enabled(False)
                try:
                    self.buffer.observe(act, output, self.full, entry[5], entry[3], n)
                    if self.capture is not None and act not in self.capture:
                        self._capture(act, i, output)
                    if self.recent is not None and act not in self.recent:
                        self._keep(act, i, output, n)
                finally:
                    if off:
                        _set_grad_enabled(True)
            if needs_grad and grad_mode and self.want_grad:
                self._hook_grad(i, call, entry, output, False)
            return
        self._observe_outputs(i, call, entry, output, recompute)

    _on_output = torch.compiler.disable(_observe_output)  # under torch.compile: run eagerly, never traced

    def _entry(self, i: int, call: int) -> list:
        """A stream's entry, made at its first call: [activation slot, gradient slot, its node pre-hook for
        output 0, units watched, ndim, unit dim of that ndim]."""
        self.fired[i] = True
        act = self._slot(i, call, SIGNAL_ACT) if self.want_act else -1
        entry = self._entries[i * self.max_calls + call] = [act, -1, None, act >= 0 and self.dead_judged[act], -1,
                                                            None]
        return entry

    def _observe_outputs(self, i: int, call: int, entry: list, output: Any, recompute: bool) -> None:
        """Any output (tensors in containers, subclasses) and recomputed forwards: the first floating-point
        tensor is the stream's activation; every tensor that requires grad gets a gradient hook."""
        act = entry[0]
        tensors = ((output,) if output.is_floating_point() and output.numel() > 0 else ()) \
            if isinstance(output, torch.Tensor) else iter_tensors(output)
        first = True
        full = self.full
        grads = self.want_grad and torch.is_grad_enabled()
        for t in tensors:
            needs_grad = t.requires_grad
            if act >= 0 and not recompute:
                if first:
                    ndim = t.dim()
                    if entry[4] != ndim:
                        entry[4], entry[5] = ndim, unit_dim(self.layouts[i], ndim)
                    cdim = entry[5]
                else:
                    cdim = None
                d = t.detach() if needs_grad else t
                # the streams judged for dead units have their units measured on every step (one reduction)
                self.buffer.observe(act, d, full, cdim, entry[3])
                if first and self.capture is not None and act not in self.capture:
                    self._capture(act, i, d)
                if first and self.recent is not None and act not in self.recent:
                    self.recent[act] = self._ring.keep(act, d, self.layouts[i])  # type: ignore[union-attr]
            if grads and needs_grad:
                if recompute and self._grad_hooks_this_step[i] > 0:
                    pass  # the original forward's output already carries our hook
                else:
                    self._hook_grad(i, call, entry, t, recompute)
            first = False

    def _hook_grad(self, i: int, call: int, entry: list, t: torch.Tensor, recompute: bool) -> None:
        """Put the stream's gradient hook on output ``t``: a pre-hook on its autograd node (cheaper to register),
        a tensor hook on a leaf (a returned parameter: removed at the next batch) or a tensor subclass."""
        if entry[1] < 0:  # the gradient stream is made when a gradient first can flow
            entry[1] = self._slot(i, call, SIGNAL_GRAD)
        node = t.grad_fn
        if node is not None and type(t) is torch.Tensor:
            nr = t.output_nr
            hook = entry[2] if nr == 0 else None
            if hook is None:
                hook = self._grad_hook(entry[1], nr)
                if nr == 0:
                    entry[2] = hook
            node.register_prehook(hook)
        else:
            handle = t.register_hook(self._grad_hook(entry[1], None))
            if node is None:
                self.registry.leaf_handles.append(handle)
        if not recompute:
            self._grad_hooks_this_step[i] += 1

    def _grad_hook(self, slot: int, nr: int | None) -> Any:
        """The gradient hook of ``slot`` (one object per stream and output index, reused every step): a node
        pre-hook reading output ``nr``, or a tensor hook (``nr=None``)."""
        hook = self._grad_hook_of.get((slot, nr))
        if hook is None:
            hook = self._grad_hook_of[(slot, nr)] = self.registry.grad_hook(self, slot) if nr is None else \
                self.registry.grad_prehook(self, slot, nr)
        return hook

    def _observe_grad(self, slot: int, grad: torch.Tensor) -> None:
        """The gradient hook's body (:attr:`_on_grad` is the same, never traced by TorchDynamo)."""
        i = self.slot_module[slot]
        if i in self.disabled or grad is None:
            return
        # backward runs without grad mode (no graph is recorded): a detach only under create_graph=True
        if grad.requires_grad:
            grad = grad.detach()
        n = grad.numel()
        self.buffer.observe(slot, grad, self.full, None, False, n)
        if self.capture is not None and slot not in self.capture:
            self._capture(slot, i, grad)
        if self.recent is not None and slot not in self.recent:
            self._keep(slot, i, grad, n)

    _on_grad = torch.compiler.disable(_observe_grad)

    def _keep(self, slot: int, i: int, t: torch.Tensor, n: int) -> None:
        """The flight recorder's entry of ``slot`` for this step: a small tensor of a stream nothing writes to after
        its hook is held by reference, ``(t, None, its version)`` (no kernel); any other a copy of its part
        (:class:`~lit_probe.snapshots.RecentParts`)."""
        ring = self._ring
        assert ring is not None and self.recent is not None
        if slot in ring.held and n <= ring.HELD_NUMEL and self._held_left >= n and type(t) is torch.Tensor:
            try:
                version = t._version
            except RuntimeError:  # an inference tensor has no version counter: copied
                version = -1
            if version >= 0:
                self._held_left -= n
                self.recent[slot] = (t, None, version)
                return
        self.recent[slot] = ring.keep(slot, t, self.layouts[i])

    def _capture(self, slot: int, i: int, t: torch.Tensor) -> None:
        assert self.capture is not None
        self.capture[slot] = (snapshot_tensor(t, self.capture_samples, self.capture_channels,
                                              layout=self.layouts[i]), tuple(t.shape))

    def _hook_failed(self, index: int, where: str, err: BaseException) -> None:
        i = index if where == "forward" else self.slot_module[index]
        self.disabled.add(i)
        warn_once(self._warned, ("hook", i), f"lit_probe: probing `{self.names[i]}` failed in its {where} hook "
                  f"({type(err).__name__}: {err}); this layer is no longer probed, training continues.",
                  RuntimeWarning)

    # ------------------------------------------------------------------ cold path
    def flush(self) -> list[Finding]:
        """Read the device statistics (one copy), update the history, run the detectors.

        Returns:
            the new findings (also appended to :attr:`findings`).
        """
        host, units = self.buffer.read()
        host = host.first_slots(len(self.slot_names))
        ranks: RankRows | None = None
        if self.gather is not None:
            if len(self.units_split) < host.calls.shape[1]:
                self.units_split = np.concatenate(
                    [self.units_split, np.zeros(host.calls.shape[1] - len(self.units_split), bool)])
            host, units, ranks = merge_ranks(self.gather(pack_rows(host, units)), self.tensor_parallel,
                                             self.units_split, self._partners())
        if len(host.steps) == 0:
            return []
        grad_slots = self._grad_slots()[:host.calls.shape[1]]
        d = derive(host, grad_slots, ~grad_slots)
        self.history.append(d)
        if self._derived is not None:
            self._derived.append(d)
        pm = None
        if self.params is not None and len(self.params):
            self.params.update_lrs()
            pm = ParamModules(self.params.names, self.params.groups, self.params.lrs.copy())
        reference = None
        if self.grad_reference is not None:
            reference = self.grad_reference.take(int(x) for x in d.steps)
            self.grad_reference.drop_before(int(d.steps[-1]))
        if self.gather is not None and self._reference_made:  # entered by every rank, even one whose failed
            reference = self._reference_over_ranks(reference or {})
        self.diagnosis, new = diagnose(self.diagnosis, d, units, self.buffer.first_seen, self.slot_names,
                                       self.slot_signals, self.dead_judged, self.thresholds, pm,
                                       unit_steps=self.buffer.unit_steps, grad_reference=reference)
        if ranks is not None:
            new = self._name_ranks(new, host, ranks)
        self.findings.extend(new)
        self.units = units
        seen = self._seen_order
        for row in d.order:  # forward order for activations, then backward order for gradients
            if seen.keys() >= set(row):
                continue  # nothing new in this row (the common case: one set operation, not a loop)
            for slot in row:
                seen.setdefault(int(slot), len(seen))
        self._alarm_bounds = alarm_bounds(self.diagnosis, self.thresholds, len(self.slot_names))
        step = int(host.steps[-1])
        for slot, frac in self.diagnosis.dead_latest.items():
            self._dead_log.setdefault(slot, []).append((step, frac))
        return new

    def _reference_over_ranks(self, mine: dict[int, tuple[float, float]]) -> dict[int, tuple[float, float]] | None:
        """The vanishing rule's reference, the same on every rank (one all-gather): per step measured on every
        rank, the largest input-end and top norms of the ranks (each rank measures its own shard of a sharded
        parameter's gradient: a norm at most sqrt(ranks) below the whole one, far inside the rule's margins).
        Every rank then reaches the same verdict (``on_finding="raise"`` raises on all of them)."""
        assert self.gather is not None
        vec = np.array([len(mine)] + [x for k, (a, b) in sorted(mine.items()) for x in (k, a, b)], np.float64)
        every = [v[1:1 + 3 * int(v[0])].reshape(-1, 3) for v in self.gather(vec)]  # never an empty tensor
        steps = set.intersection(*(set(int(k) for k in v[:, 0]) for v in every)) if every else set()
        if not steps:
            return None
        out = {}
        for k in sorted(steps):
            rows = np.stack([v[v[:, 0] == k][0] for v in every])
            out[k] = (float(np.max(rows[:, 1])), float(np.max(rows[:, 2])))
        return out

    def _partners(self) -> np.ndarray:
        """Per slot, the slot of the other signal of the same module call (-1: none)."""
        out = np.full(len(self.slot_names), -1, np.int64)
        for (i, call, signal), slot in self._slots.items():
            other = self._slots.get((i, call, SIGNAL_GRAD if signal == SIGNAL_ACT else SIGNAL_ACT))
            if other is not None and slot < len(out):
                out[slot] = other
        return out

    def _name_ranks(self, new: list[Finding], host: HostRows, ranks: RankRows) -> list[Finding]:
        """Each non-finite or exploding activation/gradient finding with the rank(s) it appeared on first."""
        slot_of = {(name, signal): s for s, (name, signal) in enumerate(zip(self.slot_names, self.slot_signals))}
        row_of = {int(step): r for r, step in enumerate(host.steps)}
        out = []
        for f in new:
            slot, row = slot_of.get((f.layer, f.signal)), row_of.get(f.step)
            if slot is not None and row is not None and slot < ranks.nonfinite.shape[1]:
                named = ranks.ranks(row, slot, f.kind)
                if named:
                    f = replace(f, ranks=named)
            out.append(f)
        return out

    def _grad_slots(self) -> np.ndarray:
        """Which slots are gradient streams (cached; new streams appear in the first steps only)."""
        if self._grad_mask is None or len(self._grad_mask) != len(self.slot_signals):
            self._grad_mask = np.array([s == SIGNAL_GRAD for s in self.slot_signals], dtype=bool)
        return self._grad_mask

    def dead_fractions(self) -> dict[str, float]:
        """Latest dead fraction per stream judged for dead units (once its window has been seen)."""
        return {self.slot_names[s]: v for s, v in self.diagnosis.dead_latest.items()}

    def latest_scalars(self) -> dict[str, float]:
        """The most recent measured value of each logged statistic, keyed ``<stream>/<prefix>_<stat>``.

        O(streams): reads the history's running latest values, never the ring."""
        from .vocab import LOGGED_STATS, metric_key

        out: dict[str, float] = {}
        for signal in (SIGNAL_ACT, SIGNAL_GRAD):
            if signal not in self.signals:
                continue
            for stat in LOGGED_STATS[signal]:
                values = self.history.latest(stat)
                for s in np.flatnonzero(~np.isnan(values)):
                    if self.slot_signals[s] == signal:
                        out[metric_key(self.slot_names[s], signal, stat)] = float(values[s])
        for name, v in self.dead_fractions().items():
            out[f"{name}/dead_fraction"] = v
        if self.params is not None:
            latest = self.history.params_latest
            for m, name in enumerate(self.params.names[:latest.shape[0]]):
                for k, stat in enumerate(PARAM_STATS):
                    if stat in LOGGED_PARAM_STATS and not np.isnan(latest[m, k]):
                        out[f"{name}/{stat}"] = float(latest[m, k])
        return out

    def take_snapshots(self) -> list[LayerSnapshot]:
        """The figure inputs copied during this step (see :meth:`request_snapshots`), one per stream pair."""
        capture, self.capture = self.capture, None
        return self._snapshots(capture, self.step) if capture else []

    def _snapshots(self, capture: Mapping[int, tuple[Any, tuple[int, ...]]], step: int,
                   device: bool = False) -> list[LayerSnapshot]:
        """One :class:`LayerSnapshot` per stream pair of ``capture`` (slot -> (array, full shape)); ``device``:
        the arrays are :func:`~lit_probe.snapshots.device_part` copies (already sliced), turned into host arrays
        here."""

        def host(entry: Any, slot: int, layout: str) -> np.ndarray | None:
            if entry is None or entry[0] is None:
                return None
            if not device:
                return entry[0]
            if len(entry) == 3:  # held by the flight recorder: the tensor itself, unless it was written to since
                part = held_part(entry, self.capture_samples, self.capture_channels, layout)
                if part is None and self._ring is not None:
                    self._ring.copy_from_now(slot)
                return to_host(part)
            return to_host(entry[0])

        dead = self.dead_masks()
        out = []
        for (i, call, signal), slot in sorted(self._slots.items(), key=lambda kv: kv[1]):
            if signal != SIGNAL_ACT:
                continue
            act = capture.get(slot)
            gslot = self._slots.get((i, call, SIGNAL_GRAD), -1)
            grad = capture.get(gslot)
            if act is None and grad is None:
                continue
            first = act or grad
            shape = tuple(first[0].shape) if first[1] is None else first[1]  # type: ignore[index]
            a, g = host(act, slot, self.layouts[i]), host(grad, gslot, self.layouts[i])
            if a is None and g is None:
                continue
            mask, source = dead.get(slot), ""
            if self.gather is not None:  # only rank 0 draws
                split = slot < len(self.units_split) and bool(self.units_split[slot])
                source = "rank 0's shard of the units" if split else "rank 0's samples"
                if split and mask is not None:  # the joined mask: rank 0's units come first
                    mask = mask[:unit_count(self.layouts[i], shape)]
            out.append(LayerSnapshot(self.slot_names[slot], step, a, g, mask, self.layouts[i], shape, source))
        return out

    def dead_masks(self) -> dict[int, np.ndarray]:
        """Per judged activation stream, which units are dead at the last flush (boolean per unit)."""
        W = self.thresholds.dead_window
        out = {}
        for slot, last in self.units.items():
            if slot < len(self.dead_judged) and self.dead_judged[slot]:
                fs = self.buffer.first_seen.get(slot, self.step)
                out[slot] = dead_units(last, self.step, fs, W, self.buffer.unit_steps.get(slot))[0]
        return out

    def timeline(self, findings: Sequence[Finding] | None = None) -> Timeline | None:
        """The health timeline over the kept history (fully measured steps only), with ``findings`` (default: the
        session's own) as markers; ``None`` before any measured step."""
        from .history import STATS

        if len(self.history) == 0:
            return None
        steps, values = self.history.window()
        full = values[:, :, STATS.index("full")]
        keep = np.nanmax(np.where(np.isnan(full), 0, full), axis=1) == 1 if full.size else np.zeros(0, bool)
        if not keep.any():
            return None
        steps, values = steps[keep], values[keep]
        rms = values[:, :, STATS.index("rms")]
        pairs = sorted(((slot, self._slots.get((i, call, SIGNAL_GRAD)))
                 for (i, call, signal), slot in sorted(self._slots.items(), key=lambda kv: kv[1])
                 if signal == SIGNAL_ACT and (self.fired[i] or not len(self.modules))),
                       key=lambda pair: self.execution_rank(pair[0]))  # a second call beside its module
        names = [self.slot_names[a] for a, _ in pairs]
        width = rms.shape[1]

        def col(slot: int | None) -> np.ndarray:
            return rms[:, slot] if slot is not None and slot < width else np.full(len(steps), np.nan)

        act = np.array([col(a) for a, _ in pairs]).reshape(len(pairs), len(steps))
        grad = np.array([col(g) for _, g in pairs]).reshape(len(pairs), len(steps))
        dead = np.full((len(pairs), len(steps)), np.nan)
        for row, (a, _) in enumerate(pairs):
            for st, frac in self._dead_log.get(a, []):
                dead[row, steps >= st] = frac
        marks = [(f.layer, f.step, f.kind, f.signal) for f in (self.findings if findings is None else findings)
                 if f.signal != PARAMETER]  # the timeline's panels are activations, gradients and dead units
        return Timeline(names, steps, act, grad, dead, marks)

    def execution_rank(self, slot: int) -> tuple[int, int]:
        """Sort key of a slot in execution order: the order its stream first ran (streams never read yet last,
        in slot order)."""
        return (self._seen_order.get(slot, len(self._seen_order) + slot), slot)

    def execution_order(self) -> list[int]:
        """Every slot, in execution order (forward activations, then backward gradients, as first seen)."""
        return sorted(range(len(self.slot_names)), key=self.execution_rank)

    def used_functionally(self, names: Sequence[str]) -> list[str]:
        """Of ``names`` (probed layers that never ran), those whose own parameters got a gradient while training:
        their weights are used functionally (``F.conv1d(x, self.conv1d.weight)``, ``self.dt_proj.weight @ x``:
        Mamba's slow path) rather than by calling the module, which is all a hook sees."""
        got = self.grad_reference.with_gradient if self.grad_reference is not None else set()
        by_name = dict(zip(self.names, self.modules))
        out = []
        for n in names:
            m = by_name.get(n)
            own = list(m.parameters(recurse=False)) if m is not None else []
            if n in got or any(p.grad is not None for p in own):
                out.append(n)
        return out

    def never_fired(self) -> list[str]:
        """Probed layers whose forward hook never ran while collecting (bypassed, compiled away, unused)."""
        return [n for n, f in zip(self.names, self.fired) if not f]

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict(), "diagnosis": self.diagnosis.state_dict(),
                "names": list(self.names), "streams": [list(k) + [v] for k, v in self._slots.items()]}

    def load_state_dict(self, state: Mapping) -> None:
        if list(state.get("names", [])) != self.names:
            warnings.warn("lit_probe: the checkpoint's probe state is for other layers; starting fresh windows.",
                          UserWarning, stacklevel=2)
            return
        # the streams in the order they were made: each gets the slot it had before the checkpoint (streams are
        # made in call order, so a resumed run meets them in the same order anyway)
        for i, call, signal, slot in sorted(state.get("streams", []), key=lambda row: int(row[3])):
            if self._slot(int(i), int(call), str(signal)) != int(slot):
                warnings.warn("lit_probe: the checkpoint's probe streams do not match this model's calls; "
                              "starting fresh windows.", UserWarning, stacklevel=2)
                return
        self.buffer.load_state_dict(state.get("buffer", {}))
        self.diagnosis = Diagnosis.from_state(state.get("diagnosis", {}))
