"""Diagnose
========

Detectors: functions of the statistics history that return :class:`~lit_probe.Finding` objects. They run
on the host at log steps, never on the training hot path. Each detector declares the statistics it
``requires``; the thresholds are documented, typed defaults in :class:`Thresholds`.

A finding is reported once per (layer, signal, kind) until it clears (the condition stops holding).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from .errors import ProbeConfigError
from .findings import Finding
from .history import Derived, nonfinite_flags
from .selection import check_thresholds_keys

#: Layers with fewer units than this are not judged for dead units.
MIN_UNITS = 4
#: Affine and normalisation outputs (Linear, Conv, BatchNorm, ...) are pre-activations: a unit that is never
#: positive is dead only for a ReLU that may follow, so they are reported only when this fraction is reached.
AFFINE_DEAD_FRACTION = 0.99

__all__ = ["Thresholds", "Diagnoser", "find_nonfinite", "find_exploding", "find_vanishing", "find_dead"]


@dataclass(frozen=True)
class Thresholds:
    """Detector thresholds. Every field can be overridden with ``FeatureProbe(thresholds={...})``.

    Attributes:
        dead_fraction: a layer is *dead* when at least this fraction of its units (channels for conv-like
            outputs, features for linear/sequence outputs) never fired (was never positive) over
            ``dead_window`` training steps. Default 0.5.
        dead_window: the window, in training steps, over which a unit must fire at least once. Default 20.
        exploding_absmax: an activation or gradient whose largest absolute value exceeds this is
            *exploding*. Default 1e6.
        exploding_growth: ... or whose largest absolute value exceeds this factor times the layer's running
            median of it (once ``min_history`` steps are known). Default 1000.
        growth_window: steps in that running median. Default 50.
        min_history: steps of history before the growth rule applies. Default 5.
        vanishing_ratio: a layer's gradient is *vanishing* when its L2 norm stays below this fraction of the
            largest gradient norm among the probed layers (median over ``vanishing_window`` measured
            steps). Default 1e-4.
        vanishing_window: measured steps in that median. Default 5.
    """

    dead_fraction: float = 0.5
    dead_window: int = 20
    exploding_absmax: float = 1e6
    exploding_growth: float = 1e3
    growth_window: int = 50
    min_history: int = 5
    vanishing_ratio: float = 1e-4
    vanishing_window: int = 5

    @classmethod
    def from_dict(cls, overrides: Mapping[str, float] | None) -> "Thresholds":
        """Defaults with ``overrides`` applied; unknown keys and out-of-range values raise."""
        overrides = dict(overrides or {})
        check_thresholds_keys(overrides, [f.name for f in fields(cls)])
        def coerce(k: str, v: object) -> object:  # 20.0 -> 20 for integer thresholds (YAML), never bools
            if isinstance(getattr(cls, k), int) and isinstance(v, float) and v.is_integer():
                return int(v)
            return v

        t = cls(**{k: coerce(k, v) for k, v in overrides.items()})
        t.validate()
        return t

    def validate(self) -> None:
        def num(name: str, lo: float, hi: float = math.inf, lo_open: bool = True, integer: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and int(v) != v):
                kind = "an integer" if integer else "a number"
                raise ProbeConfigError(f"Threshold {name!r} must be {kind}, got {v!r}.")
            if not (v > lo if lo_open else v >= lo) or v > hi or v != v:
                rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
                raise ProbeConfigError(f"Threshold {name!r}={v!r} is out of range {rng}.")

        num("dead_fraction", 0.0, 1.0)
        num("dead_window", 1, lo_open=False, integer=True)
        num("exploding_absmax", 0.0)
        num("exploding_growth", 1.0)
        num("growth_window", 1, lo_open=False, integer=True)
        num("min_history", 1, lo_open=False, integer=True)
        num("vanishing_ratio", 0.0, 1.0)
        num("vanishing_window", 1, lo_open=False, integer=True)

    def to_dict(self) -> dict:
        return asdict(self)


class Diagnoser:
    """Runs every detector over newly arrived steps and remembers which findings are active.

    Args:
        names: layer name per slot.
        signals: signal (``"activation"``/``"gradient"``) per slot.
        thresholds: the thresholds.
        dead_slots: slots judged for dead units.
    """

    def __init__(self, names: Sequence[str], signals: Sequence[str], thresholds: Thresholds,
                 dead_slots: Sequence[int] = (), affine_slots: Sequence[int] = ()) -> None:
        self.names = list(names)
        self.signals = list(signals)
        self.t = thresholds
        self.dead_slots = set(dead_slots)
        self.affine_slots = set(affine_slots)
        self.active: set[tuple[int, str]] = set()
        self.nonfinite_active: dict[str, bool] = {"activation": False, "gradient": False}
        self._absmax: dict[int, deque] = {}
        self._ratio: dict[int, deque] = {}
        self.skipped_steps: list[int] = []
        self.dead_fraction_latest: dict[int, float] = {}

    def _emit(self, slot: int, kind: str, step: int, value: float, threshold: float, message: str,
              stat: str, extra: dict | None = None) -> Finding:
        return Finding(step=int(step), layer=self.names[slot], signal=self.signals[slot], kind=kind,
                       value=float(value), threshold=float(threshold), message=message, stat=stat,
                       extra=extra or {})

    def update(self, d: Derived, units: Mapping[int, np.ndarray] | None = None,
               first_seen: Mapping[int, int] | None = None) -> list[Finding]:
        """Findings among the steps of ``d`` (and the unit windows at its last step)."""
        out: list[Finding] = []
        for i in range(len(d)):
            if _skipped(d, i):
                self.skipped_steps.append(int(d.steps[i]))
            out += find_nonfinite(self, d, i)
            out += find_exploding(self, d, i)
            out += find_vanishing(self, d, i)
        if units and len(d):
            out += find_dead(self, int(d.steps[-1]), units, first_seen or {})
        order = {"nonfinite": 0, "exploding": 1, "vanishing": 2, "dead": 3}
        return sorted(out, key=lambda f: (f.step, f.signal != "activation", order.get(f.kind, 9)))

    def state_dict(self) -> dict:
        return {"active": [[s, k] for s, k in sorted(self.active)],
                "nonfinite_active": dict(self.nonfinite_active),
                "absmax": {int(s): [float(x) for x in q] for s, q in self._absmax.items()},
                "ratio": {int(s): [float(x) for x in q] for s, q in self._ratio.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        self.active = {(int(s), str(k)) for s, k in state.get("active", [])}
        self.nonfinite_active.update(state.get("nonfinite_active", {}))
        self._absmax = {int(s): deque(v, maxlen=self.t.growth_window) for s, v in state.get("absmax", {}).items()}
        self._ratio = {int(s): deque(v, maxlen=self.t.vanishing_window) for s, v in state.get("ratio", {}).items()}


def _skipped(d: Derived, i: int) -> bool:
    return bool(np.nanmax(d.get("skipped")[i], initial=0) == 1)


def find_nonfinite(dg: Diagnoser, d: Derived, i: int) -> list[Finding]:
    """NaN/Inf: the FIRST layer where they appeared (forward order for activations, backward order for
    gradients), at the exact step. Requires: min, max (measured every step)."""
    flags = nonfinite_flags(d)[i]
    skipped = _skipped(d, i)
    out = []
    for signal in ("activation", "gradient"):
        hit = [s for s in range(len(flags)) if flags[s] and dg.signals[s] == signal]
        if signal == "gradient" and skipped:
            hit = []  # GradScaler skipped this step: inf gradients by design, not a bug
        if not hit:
            dg.nonfinite_active[signal] = False
            continue
        if dg.nonfinite_active[signal]:
            continue
        dg.nonfinite_active[signal] = True
        order = [s for s in d.order[i] if s in hit] if i < len(d.order) else []
        first = order[0] if order else hit[0]
        count = d.get("nonfinite")[i, first]
        others = [dg.names[s] for s in (order or hit) if s != first]
        where = "forward" if signal == "activation" else "backward"
        msg = (f"Non-finite values (NaN/Inf) first appeared in the {signal} of `{dg.names[first]}` at step "
               f"{int(d.steps[i])} (first in {where} order")
        msg += f"; also in {len(others)} later layer(s): {', '.join(others[:5])}{', ...' if len(others) > 5 else ''})" \
            if others else ")"
        out.append(dg._emit(first, "nonfinite", d.steps[i], count if count == count else 1.0, 0.0, msg + ".",
                            "nonfinite", {"downstream": others}))
    return out


def find_exploding(dg: Diagnoser, d: Derived, i: int) -> list[Finding]:
    """Absolute bound on absmax, or growth over the layer's running median. Requires: absmax (every step)."""
    t = dg.t
    absmax = d.get("absmax")[i]
    calls = d.get("calls")[i]
    skipped = _skipped(d, i)
    out = []
    for s in range(len(absmax)):
        a = absmax[s]
        if not calls[s] > 0 or not np.isfinite(a) or (skipped and dg.signals[s] == "gradient"):
            continue
        q = dg._absmax.setdefault(s, deque(maxlen=t.growth_window))
        med = float(np.median(q)) if len(q) >= t.min_history else math.nan
        over_abs = a > t.exploding_absmax
        over_growth = med == med and med > 0 and a > t.exploding_growth * med
        key = (s, "exploding")
        if over_abs or over_growth:
            if key not in dg.active:
                dg.active.add(key)
                thr = t.exploding_absmax if over_abs else t.exploding_growth * med
                why = (f"above the bound {t.exploding_absmax:.3g}" if over_abs else
                       f"{a / med:.3g}x its running median {med:.3g}")
                out.append(dg._emit(s, "exploding", d.steps[i], a, thr,
                                    f"`{dg.names[s]}` {dg.signals[s]} is exploding at step {int(d.steps[i])}: "
                                    f"max |value| {a:.3g}, {why}.", "absmax", {"median": med}))
            continue  # exploded values do not enter the median
        dg.active.discard(key)
        q.append(float(a))
    return out


def find_vanishing(dg: Diagnoser, d: Derived, i: int) -> list[Finding]:
    """Gradient L2 norm far below the largest probed layer's, persistently. Requires: l2 (full steps)."""
    t = dg.t
    l2 = d.get("l2")[i]
    grad = [s for s in range(len(l2)) if dg.signals[s] == "gradient" and np.isfinite(l2[s])]
    if len(grad) < 2 or _skipped(d, i):
        return []
    top = max(l2[s] for s in grad)
    if not top > 0:
        return []
    out = []
    for s in grad:
        q = dg._ratio.setdefault(s, deque(maxlen=t.vanishing_window))
        q.append(float(l2[s] / top))
        key = (s, "vanishing")
        med = float(np.median(q))
        if len(q) >= t.vanishing_window and med < t.vanishing_ratio:
            if key not in dg.active:
                dg.active.add(key)
                size = "exactly zero" if med == 0 else f"{med:.3g}x the largest probed layer's"
                out.append(dg._emit(s, "vanishing", d.steps[i], med, t.vanishing_ratio,
                                    f"`{dg.names[s]}` gradient is vanishing at step {int(d.steps[i])}: its norm "
                                    f"is {size} (median of {len(q)} measured steps).",
                                    "grad_norm_ratio", {"rms": float(d.get('rms')[i, s])}))
        elif med >= 10 * t.vanishing_ratio:  # hysteresis: a ratio hovering at the threshold is one finding
            dg.active.discard(key)
    return out


def find_dead(dg: Diagnoser, step: int, units: Mapping[int, np.ndarray],
              first_seen: Mapping[int, int]) -> list[Finding]:
    """Units that never fired over the window. Requires: the per-unit last-fired steps."""
    t = dg.t
    out = []
    for s, last in units.items():
        if s not in dg.dead_slots or last.size < MIN_UNITS:
            continue  # a head with 1-3 outputs (regression, logits) has no meaningful dead fraction
        fs = first_seen.get(s, step)
        dead_from = np.maximum(last, fs) + t.dead_window
        dead = dead_from <= step
        frac = float(dead.mean())
        dg.dead_fraction_latest[s] = frac
        key = (s, "dead")
        thr = max(t.dead_fraction, AFFINE_DEAD_FRACTION) if s in dg.affine_slots else t.dead_fraction
        if frac >= thr:
            if key not in dg.active:
                dg.active.add(key)
                k = max(1, math.ceil(thr * last.size))
                when = int(np.sort(dead_from)[k - 1])
                out.append(dg._emit(s, "dead", min(when, step), frac, thr,
                                    f"`{dg.names[s]}`: {frac:.0%} of its {last.size} units never fired over "
                                    f"{t.dead_window} steps (dead from step {min(when, step)}).", "dead_fraction",
                                    {"units": int(last.size), "dead_units": int(dead.sum())}))
        else:
            dg.active.discard(key)
    return out
