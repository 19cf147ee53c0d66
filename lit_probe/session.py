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

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .diagnose import Diagnoser, Thresholds
from .findings import Finding
from .history import History, derive
from .hooks import HookRegistry, iter_tensors, warn_once
from .selection import resolve
from .stats import StatBuffer, channel_dim_for

__all__ = ["ProbeSession", "SIGNAL_ACT", "SIGNAL_GRAD"]

SIGNAL_ACT = "activation"
SIGNAL_GRAD = "gradient"
_CONV_WORDS = ("Conv", "BatchNorm", "InstanceNorm", "GroupNorm", "Pool", "Upsample", "PixelShuffle",
               "Dropout2d", "Dropout3d", "Dropout1d", "ReflectionPad", "ReplicationPad", "ZeroPad", "ConstantPad")
_LINEAR_WORDS = ("Linear", "LayerNorm", "Embedding", "MultiheadAttention", "RMSNorm", "Bilinear", "LSTM", "GRU",
                 "RNN", "Transformer")
_NEVER_POSITIVE = ("LogSoftmax", "LogSigmoid")


def _conv_like(module: nn.Module) -> bool:
    """Whether a 3-D output of ``module`` is [N, C, L] (conv-like) rather than [N, T, F] (sequence)."""
    last = None
    for m in module.modules():
        name = type(m).__name__
        if any(w in name for w in _CONV_WORDS):
            last = True
        elif any(w in name for w in _LINEAR_WORDS):
            last = False
    return bool(last)


_AFFINE_WORDS = ("Linear", "Conv", "BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm", "Embedding",
                 "Bilinear")


def _is_affine(module: nn.Module) -> bool:
    name = type(module).__name__
    return not list(module.children()) and any(w in name for w in _AFFINE_WORDS)


def _in_backward() -> bool:
    """True while autograd runs a backward pass (activation checkpointing recomputes forwards there)."""
    try:
        return torch._C._current_graph_task_id() != -1
    except Exception:  # pragma: no cover - older torch
        return False


class ProbeSession:
    """Hooks, device statistics, history and detectors for one run over resolved modules.

    Args:
        modules: ``(name, module)`` pairs to probe (see :func:`lit_probe.selection.resolve`).
        signals: ``"activation"`` and/or ``"gradient"``.
        every_n_steps: full statistics every this many steps (and on each of the first
            ``full_warmup_steps`` steps); min/max (non-finite and exploding checks) are taken every step.
        full_warmup_steps: steps from the start of a run that always take full statistics.
        thresholds: detector thresholds (a :class:`Thresholds` or a dict of overrides).
        history_size: steps of statistics kept on the host.
        ring_rows: steps the device ring holds between two :meth:`flush` calls.
        reduce: optional cross-rank reduction of the packed host statistics (see :class:`History`).
    """

    def __init__(self, modules: Sequence[tuple[str, nn.Module]], *,
                 signals: Sequence[str] = (SIGNAL_ACT, SIGNAL_GRAD), every_n_steps: int = 1,
                 thresholds: Thresholds | Mapping[str, float] | None = None, history_size: int = 1000,
                 ring_rows: int = 64, reduce: Callable[..., Any] | None = None,
                 full_warmup_steps: int = 10) -> None:
        self.names = [n for n, _ in modules]
        self.modules = [m for _, m in modules]
        self.signals = tuple(signals)
        self.every_n_steps = max(1, int(every_n_steps))
        self.full_warmup_steps = max(0, int(full_warmup_steps))
        self.thresholds = thresholds if isinstance(thresholds, Thresholds) else Thresholds.from_dict(thresholds)
        self.want_act = SIGNAL_ACT in self.signals
        self.want_grad = SIGNAL_GRAD in self.signals
        n = len(self.names)
        # slot 2i: activation of layer i, slot 2i+1: its gradient
        self.slot_names = [self.names[i // 2] for i in range(2 * n)]
        self.slot_signals = [SIGNAL_ACT if i % 2 == 0 else SIGNAL_GRAD for i in range(2 * n)]
        self._conv_like = [_conv_like(m) for m in self.modules]
        dead_slots = [2 * i for i, m in enumerate(self.modules) if type(m).__name__ not in _NEVER_POSITIVE]
        # affine / normalisation outputs are pre-activations: "never positive" means dead only for the ReLU
        # that may follow, so they are reported only when (nearly) every unit is
        affine_slots = [2 * i for i, m in enumerate(self.modules) if _is_affine(m)]
        self.buffer = StatBuffer(2 * n, ring_rows)
        self.history = History([f"{self.slot_names[s]}:{self.slot_signals[s]}" for s in range(2 * n)], history_size)
        self.diagnoser = Diagnoser(self.slot_names, self.slot_signals, self.thresholds, dead_slots, affine_slots)
        self.reduce = reduce
        self.registry = HookRegistry()
        self.collecting = False
        self.full = True
        self.step = -1
        self.findings: list[Finding] = []
        self.fired = np.zeros(n, dtype=bool)  # layers whose forward hook ran at least once while collecting
        self.capture: dict[tuple[int, str], Any] | None = None  # figure snapshots, set by the owner
        self.capture_fn: Callable[[int, torch.Tensor], Any] | None = None
        self._grad_hooks_this_step = np.zeros(n, dtype=np.int64)
        self._warned: set = set()
        self.disabled: set[int] = set()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_model(cls, model: nn.Module, probes: Sequence[str], **kwargs: Any) -> "ProbeSession":
        """Resolve ``probes`` against ``model`` and build a session (not yet open)."""
        return cls(resolve(model, probes), **kwargs)

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> "ProbeSession":
        """Attach the hooks (idempotent)."""
        self.registry.attach(self, list(zip(self.names, self.modules)))
        return self

    def close(self) -> None:
        """Stop collecting and remove every hook (idempotent; safe on every way out)."""
        self.collecting = False
        self.capture = None
        self.registry.remove()

    def release(self) -> None:
        """Close and drop every reference to the model and to device memory; the history stays."""
        self.close()
        self.modules = []
        self.capture_fn = None
        self.buffer.release()

    @property
    def is_open(self) -> bool:
        return self.registry.attached

    def __enter__(self) -> "ProbeSession":
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict:  # a session is per process: never pickle modules or device buffers
        raise TypeError("ProbeSession is not picklable; pickle the FeatureProbe before fit instead.")

    # ------------------------------------------------------------------ step control
    def begin_step(self, step: int, full: bool | None = None) -> None:
        """Collect statistics for training step ``step`` until :meth:`end_step`."""
        if step != self.step:
            self._grad_hooks_this_step[:] = 0
            if self.buffer.pending >= self.buffer.rows:
                self.flush()  # ring full: read now rather than lose steps
        self.step = int(step)
        if full is None:  # full statistics on the first steps (bugs of initialisation show at once), then every N
            full = self.step < self.full_warmup_steps or self.step % self.every_n_steps == 0
        self.full = bool(full)
        self.buffer.begin_step(self.step)
        self.collecting = True

    def end_step(self) -> None:
        self.collecting = False

    def record_scale(self, scale: Any, end: bool) -> None:
        """The GradScaler scale in force (start of step) or after its update (end of step)."""
        if self.want_grad:
            if isinstance(scale, torch.Tensor) and self.buffer._buf is None:
                self.buffer._alloc(scale.device)  # no hook has observed yet (first step): keep the scale
            self.buffer.record_scale(scale, end)

    # ------------------------------------------------------------------ hot path (called by hooks)
    @torch.compiler.disable  # under torch.compile: run eagerly, never traced (no recompiles of probe code)
    def _on_output(self, i: int, output: Any) -> None:
        if i in self.disabled:
            return
        self.fired[i] = True
        recompute = _in_backward()  # activation checkpointing re-runs forward inside backward
        first = True
        for t in iter_tensors(output):
            if self.want_act and not recompute:
                cdim = channel_dim_for(t.dim(), self._conv_like[i]) if first else None
                self.buffer.observe(2 * i, t.detach(), self.full, cdim)
                if self.capture is not None and first and (i, SIGNAL_ACT) not in self.capture:
                    self.capture[(i, SIGNAL_ACT)] = self.capture_fn(i, t) if self.capture_fn else None
            if self.want_grad and t.requires_grad and torch.is_grad_enabled():
                if recompute and self._grad_hooks_this_step[i] > 0:
                    pass  # the original forward's output already carries our hook
                else:
                    t.register_hook(self.registry.grad_hook(self, i))
                    if not recompute:
                        self._grad_hooks_this_step[i] += 1
            first = False

    @torch.compiler.disable
    def _on_grad(self, i: int, grad: torch.Tensor) -> None:
        if i in self.disabled or grad is None:
            return
        self.buffer.observe(2 * i + 1, grad.detach(), self.full, None)
        if self.capture is not None and (i, SIGNAL_GRAD) not in self.capture:
            self.capture[(i, SIGNAL_GRAD)] = self.capture_fn(i, grad) if self.capture_fn else None

    def _hook_failed(self, i: int, where: str, err: BaseException) -> None:
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
        if self.reduce is not None:
            host, units = self.reduce(host, units)
        if len(host.steps) == 0:
            return []
        grad_slots = np.array([s == SIGNAL_GRAD for s in self.slot_signals])
        unit_slots = np.array([s == SIGNAL_ACT for s in self.slot_signals])
        d = derive(host, grad_slots, unit_slots)
        self.history.append(d)
        new = self.diagnoser.update(d, units, self.buffer.first_seen)
        self.findings.extend(new)
        self._last_units = units
        return new

    def dead_fractions(self) -> dict[str, float]:
        """Latest dead fraction per layer (layers judged for dead units, at the last flush)."""
        return {self.slot_names[s]: v for s, v in self.diagnoser.dead_fraction_latest.items()}

    def latest_scalars(self) -> dict[str, float]:
        """The most recent measured value of each headline statistic, keyed ``<layer>/<stat>``."""
        out: dict[str, float] = {}
        for s in range(len(self.slot_names)):
            prefix = "act" if self.slot_signals[s] == SIGNAL_ACT else "grad"
            if (prefix == "act" and not self.want_act) or (prefix == "grad" and not self.want_grad):
                continue
            for stat in ("rms", "mean", "absmax", "zero_fraction", "nonfinite"):
                if prefix == "grad" and stat == "zero_fraction":
                    continue
                v = self.history.latest(s, stat)
                if not math.isnan(v):
                    out[f"{self.slot_names[s]}/{prefix}_{stat}"] = v
        for name, v in self.dead_fractions().items():
            out[f"{name}/dead_fraction"] = v
        return out

    def never_fired(self) -> list[str]:
        """Probed layers whose forward hook never ran while collecting (bypassed, compiled away, unused)."""
        return [n for n, f in zip(self.names, self.fired) if not f]

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict(), "diagnoser": self.diagnoser.state_dict(),
                "names": list(self.names)}

    def load_state_dict(self, state: Mapping) -> None:
        if list(state.get("names", [])) != self.names:
            warnings.warn("lit_probe: the checkpoint's probe state is for other layers; starting fresh windows.",
                          UserWarning, stacklevel=2)
            return
        self.buffer.load_state_dict(state.get("buffer", {}))
        self.diagnoser.load_state_dict(state.get("diagnoser", {}))
