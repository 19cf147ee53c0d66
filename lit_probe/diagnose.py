"""Diagnose
========

Detectors: pure functions of (state, new statistics) -> (state, findings). They run on the host at log steps,
never on the training hot path; :func:`diagnose` runs them all over the rows of one flush. The state
(:class:`Diagnosis`) is a value: ``diagnose`` returns a new one and never changes the one it was given. The
thresholds are documented, typed defaults in :class:`Thresholds`.

A finding is reported once per (stream, signal, kind) until it clears (the condition stops holding). Each
detector's docstring says what it requires of the statistics.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from .findings import Finding
from .history import Derived, nonfinite_flags
from .selection import check_thresholds_keys
from .errors import ProbeConfigError

#: Streams with fewer units than this are not judged for dead units (a head with 1-3 outputs).
MIN_UNITS = 4
#: Streams with fewer units than this (but at least MIN_UNITS) are dead only when this fraction of them is: in a
#: squeeze-excitation bottleneck of 8 units, 4 may be dead in a healthy model (RegNet, measured).
SMALL_UNITS = 16
SMALL_DEAD_FRACTION = 0.9

__all__ = ["Thresholds", "Diagnosis", "diagnose", "find_nonfinite", "find_exploding", "find_vanishing",
           "find_dead"]


@dataclass(frozen=True)
class Thresholds:
    """Detector thresholds. Every field can be overridden with ``FeatureProbe(thresholds={...})``.

    Attributes:
        dead_fraction: a ReLU-like stream (ReLU, ReLU6, or a container returning one) is *dead* when at least
            this fraction of its units (channels of conv-like outputs, features of linear/sequence outputs)
            was never positive over ``dead_window`` training steps; streams of fewer than 16 units need at least
            0.9, streams of fewer than 4 are not judged. Other layers are not judged: a SiLU, GELU, identity or
            linear output is negative without being dead. Default 0.5.
        dead_window: the window, in training steps, over which a unit must fire at least once. Default 20.
        exploding_absmax: an activation or gradient whose largest absolute value exceeds this is
            *exploding*. Default 1e6.
        exploding_growth: ... or whose largest absolute value exceeds this factor times the stream's running
            median of it (once ``min_history`` steps are known). Default 1000.
        growth_window: steps in that running median. Default 50.
        min_history: steps of history before the growth rule applies. Default 5.
        vanishing_ratio: a gradient stream is *vanishing* when the largest gradient norm at or below it (itself
            and the streams computed before it in the forward pass) stays below this fraction of the step's
            largest gradient norm, on ``vanishing_window`` measured steps in a row (see
            :func:`find_vanishing`). Default 1e-4.
        vanishing_window: measured (full-statistics) steps in a row. Default 5.
        vanishing_min_step: no vanishing judgement before this training step. Default 0.
    """

    dead_fraction: float = 0.5
    dead_window: int = 20
    exploding_absmax: float = 1e6
    exploding_growth: float = 1e3
    growth_window: int = 50
    min_history: int = 5
    vanishing_ratio: float = 1e-4
    vanishing_window: int = 5
    vanishing_min_step: int = 0

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
        num("vanishing_min_step", 0, lo_open=False, integer=True)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Diagnosis:
    """What the detectors remember between flushes (a value: :func:`diagnose` returns a new one).

    Attributes:
        active: ``(slot, kind)`` findings currently active (reported once until they clear).
        nonfinite_active: per signal, whether non-finite values were present at the last row.
        absmax: per slot, the last ``growth_window`` finite, non-exploded absmax values.
        small: per gradient slot, how many consecutive measured steps it was below the vanishing ratio.
        skipped_steps: steps the GradScaler skipped (inf gradients by design).
        dead_latest: per judged slot, the dead fraction at the last flush (only once its window was seen).
    """

    active: set = field(default_factory=set)
    nonfinite_active: dict = field(default_factory=lambda: {"activation": False, "gradient": False})
    absmax: dict = field(default_factory=dict)
    small: dict = field(default_factory=dict)
    skipped_steps: list = field(default_factory=list)
    dead_latest: dict = field(default_factory=dict)

    def copy(self) -> "Diagnosis":
        return copy.deepcopy(self)

    def state_dict(self) -> dict:
        return {"active": [[int(s), k] for s, k in sorted(self.active)],
                "nonfinite_active": dict(self.nonfinite_active),
                "absmax": {int(s): [float(x) for x in q] for s, q in self.absmax.items()},
                "small": {int(s): int(v) for s, v in self.small.items()},
                "skipped_steps": [int(x) for x in self.skipped_steps]}

    @classmethod
    def from_state(cls, state: Mapping) -> "Diagnosis":
        return cls(active={(int(s), str(k)) for s, k in state.get("active", [])},
                   nonfinite_active={"activation": False, "gradient": False, **state.get("nonfinite_active", {})},
                   absmax={int(s): list(v) for s, v in state.get("absmax", {}).items()},
                   small={int(s): int(v) for s, v in state.get("small", {}).items()},
                   skipped_steps=list(state.get("skipped_steps", [])))


@dataclass(frozen=True)
class Streams:
    """What the detectors know of each slot: its stream name, signal, and whether it is judged for death."""

    names: Sequence[str]
    signals: Sequence[str]
    dead_judged: Sequence[bool]

    def emit(self, slot: int, kind: str, step: int, value: float, threshold: float, message: str, stat: str,
             extra: dict | None = None) -> Finding:
        return Finding(step=int(step), layer=self.names[slot], signal=self.signals[slot], kind=kind,
                       value=float(value), threshold=float(threshold), message=message, stat=stat,
                       extra=extra or {})


def diagnose(state: Diagnosis, d: Derived, units: Mapping[int, np.ndarray] | None,
             first_seen: Mapping[int, int] | None, names: Sequence[str], signals: Sequence[str],
             dead_judged: Sequence[bool], t: Thresholds) -> tuple[Diagnosis, list[Finding]]:
    """Run every detector over the rows of ``d`` (and the unit windows at its last step).

    Returns:
        the new state and the new findings, ordered by step, then activation before gradient, then the
        order in which the streams ran (forward order for activations, backward order for gradients).
    """
    st = state.copy()
    streams = Streams(names, signals, dead_judged)
    out: list[Finding] = []
    for i in range(len(d)):
        if _skipped(d, i):
            st.skipped_steps.append(int(d.steps[i]))
        st, f = find_nonfinite(st, d, i, streams)
        out += f
        st, f = find_exploding(st, d, i, streams, t)
        out += f
        st, f = find_vanishing(st, d, i, streams, t)
        out += f
    if units and len(d):
        st, f = find_dead(st, int(d.steps[-1]), units, first_seen or {}, streams, t)
        out += f
    position = {}  # (step, stream, signal) -> place in that step's execution order
    for i in range(len(d)):
        for k, slot in enumerate(d.order[i] if i < len(d.order) else []):
            position.setdefault((int(d.steps[i]), names[slot], signals[slot]), k)
    rank = {"nonfinite": 0, "exploding": 1, "vanishing": 2, "dead": 3}
    return st, sorted(out, key=lambda f: (f.step, f.signal != "activation",
                                          position.get((f.step, f.layer, f.signal), 1e9), rank.get(f.kind, 9)))


def _skipped(d: Derived, i: int) -> bool:
    return bool(np.nanmax(d.get("skipped")[i], initial=0) == 1)


def find_nonfinite(st: Diagnosis, d: Derived, i: int, streams: Streams) -> tuple[Diagnosis, list[Finding]]:
    """NaN/Inf: the FIRST stream where they appeared (forward order for activations, backward order for
    gradients), at the exact step. Requires: min, max (measured every step)."""
    flags = nonfinite_flags(d)[i]
    skipped = _skipped(d, i)
    out = []
    for signal in ("activation", "gradient"):
        hit = [s for s in np.flatnonzero(flags) if streams.signals[s] == signal]
        if signal == "gradient" and skipped:
            hit = []  # GradScaler skipped this step: inf gradients by design, not a bug
        if not hit:
            st.nonfinite_active[signal] = False
            continue
        if st.nonfinite_active[signal]:
            continue
        st.nonfinite_active[signal] = True
        order = [s for s in d.order[i] if s in set(hit)] if i < len(d.order) else []
        first = order[0] if order else hit[0]
        count = d.get("nonfinite")[i, first]
        others = [streams.names[s] for s in (order or hit) if s != first]
        where = "forward" if signal == "activation" else "backward"
        msg = (f"Non-finite values (NaN/Inf) first appeared in the {signal} of `{streams.names[first]}` at step "
               f"{int(d.steps[i])} (first in {where} order")
        msg += f"; also in {len(others)} later stream(s): {', '.join(others[:5])}{', ...' if len(others) > 5 else ''})" \
            if others else ")"
        out.append(streams.emit(first, "nonfinite", d.steps[i], count if count == count else 1.0, 0.0, msg + ".",
                                "nonfinite", {"downstream": others}))
    return st, out


def find_exploding(st: Diagnosis, d: Derived, i: int, streams: Streams,
                   t: Thresholds) -> tuple[Diagnosis, list[Finding]]:
    """Absolute bound on absmax, or growth over the stream's running median. Requires: absmax (every step)."""
    absmax = d.get("absmax")[i]
    calls = d.get("calls")[i]
    skipped = _skipped(d, i)
    out = []
    for s in np.flatnonzero((calls > 0) & np.isfinite(absmax)):
        a = float(absmax[s])
        if skipped and streams.signals[s] == "gradient":
            continue
        q = st.absmax.setdefault(int(s), [])
        med = float(np.median(q)) if len(q) >= t.min_history else math.nan
        over_abs = a > t.exploding_absmax
        over_growth = med == med and med > 0 and a > t.exploding_growth * med
        key = (int(s), "exploding")
        if over_abs or over_growth:
            if key not in st.active:
                st.active.add(key)
                thr = t.exploding_absmax if over_abs else t.exploding_growth * med
                why = (f"above the bound {t.exploding_absmax:.3g}" if over_abs else
                       f"{a / med:.3g}x its running median {med:.3g}")
                out.append(streams.emit(s, "exploding", d.steps[i], a, thr,
                                        f"`{streams.names[s]}` {streams.signals[s]} is exploding at step "
                                        f"{int(d.steps[i])}: max |value| {a:.3g}, {why}.", "absmax",
                                        {"median": med}))
            continue  # exploded values do not enter the median
        st.active.discard(key)
        q.append(a)
        if len(q) > t.growth_window:
            del q[0]
    return st, out


def find_vanishing(st: Diagnosis, d: Derived, i: int, streams: Streams,
                   t: Thresholds) -> tuple[Diagnosis, list[Finding]]:
    """The gradient reaching the input end is tiny. Requires: l2 (full steps) and the backward order.

    For a gradient stream s, the *envelope* E(s) is the largest gradient L2 norm among s and the streams
    computed before it in the forward pass (at or after it in backward order). s is vanishing when
    E(s) / (the largest gradient norm of the step) stays below ``vanishing_ratio`` on ``vanishing_window``
    measured steps in a row. A branch whose gradient is small by design (LayerScale, attention q/k, a
    squeeze-excitation pool, a small head) has a normal gradient on the path below it, so its envelope is
    normal; a vanishing stack has every stream below it small. Exact zeros (E = 0) are blocked, not vanishing:
    the dead detector's case.
    """
    l2 = d.get("l2")[i]
    step = int(d.steps[i])
    if _skipped(d, i):
        return st, []
    order = [s for s in (d.order[i] if i < len(d.order) else []) if streams.signals[s] == "gradient"
             and np.isfinite(l2[s])]
    if len(order) < 3:
        return st, []
    values = l2[order]
    top = float(values.max())
    if not top > 0:
        return st, []
    envelope = np.maximum.accumulate(values[::-1])[::-1]  # E at each backward position: max over the rest
    out = []
    for s, e in zip(order, envelope):
        s = int(s)
        key = (s, "vanishing")
        ratio = float(e / top)
        if e == 0 or ratio >= 10 * t.vanishing_ratio:  # blocked, or clearly healthy (hysteresis)
            st.small[s] = 0
            st.active.discard(key)
            continue
        if ratio < t.vanishing_ratio:
            st.small[s] = st.small.get(s, 0) + 1
        if st.small.get(s, 0) >= t.vanishing_window and step >= t.vanishing_min_step and key not in st.active:
            st.active.add(key)
            out.append(streams.emit(s, "vanishing", step, ratio, t.vanishing_ratio,
                                    f"`{streams.names[s]}` gradient is vanishing at step {step}: the largest "
                                    f"gradient norm at or below it is {ratio:.3g}x the step's largest, on "
                                    f"{st.small[s]} measured steps in a row.", "grad_envelope_ratio",
                                    {"l2": float(l2[s]), "envelope": float(e), "top": top}))
    return st, out


def find_dead(st: Diagnosis, step: int, units: Mapping[int, np.ndarray], first_seen: Mapping[int, int],
              streams: Streams, t: Thresholds) -> tuple[Diagnosis, list[Finding]]:
    """ReLU-like units never positive over the window. Requires: the per-unit last-fired steps."""
    out = []
    for s, last in units.items():
        if s >= len(streams.dead_judged) or not streams.dead_judged[s] or last.size < MIN_UNITS:
            continue
        fs = first_seen.get(s, step)
        if step - fs + 1 < t.dead_window:
            continue  # the window has not been seen yet: no verdict, no dead fraction
        dead_from = np.maximum(last, fs) + t.dead_window
        dead = dead_from <= step
        frac = float(dead.mean())
        st.dead_latest[s] = frac
        key = (s, "dead")
        thr = max(t.dead_fraction, SMALL_DEAD_FRACTION) if last.size < SMALL_UNITS else t.dead_fraction
        if frac >= thr:
            if key not in st.active:
                st.active.add(key)
                k = max(1, math.ceil(thr * last.size))
                when = min(int(np.sort(dead_from)[k - 1]), step)
                since = max(when - t.dead_window, 0)
                out.append(streams.emit(s, "dead", when, frac, thr,
                                        f"`{streams.names[s]}`: {frac:.0%} of its {last.size} units were never "
                                        f"positive over {t.dead_window} steps (dead from step {when}).",
                                        "dead_fraction", {"units": int(last.size), "dead_units": int(dead.sum()),
                                                         "since": since}))
        else:
            st.active.discard(key)
    return st, out
