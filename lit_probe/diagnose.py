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
import functools
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np

from .findings import KINDS, Finding, listed
from .history import PARAM_STATS, Derived, nonfinite_flags
from .selection import check_thresholds_keys
from .errors import ProbeConfigError
from .vocab import CALL_SEP

#: Streams with fewer units than this (and at least ``Thresholds.dead_min_units``) are judged against
#: ``Thresholds.dead_fraction_small`` instead of ``dead_fraction``.
SMALL_UNITS = 16
#: The default of ``Thresholds.dead_fraction_small``: in a squeeze-excitation bottleneck of 8 units, 4 may be dead
#: in a healthy model (RegNet, measured).
SMALL_DEAD_FRACTION = 0.9
#: The default of ``Thresholds.dead_min_units``: a head with 1-3 outputs is not judged.
MIN_UNITS = 4

__all__ = ["Thresholds", "Diagnosis", "ParamModules", "diagnose", "alarm_bounds", "find_nonfinite",
           "find_exploding", "find_vanishing", "find_dead", "find_param_nonfinite", "find_not_learning",
           "find_lr_too_high", "dead_units"]

_DEFAULT_DEAD_FRACTION = 0.5

#: The update-ratio rules need at least this many modules with a measured ratio at a step (a median).
MIN_PARAM_MODULES = 3
#: A module whose weights start at (near) zero: at its first measured step ``||W|| == 0``, or its update ratio
#: is above this (its weights are below 1/100 of that step's update: a zero-initialised bias, a LayerScale).
ZERO_START_RATIO = 100.0
#: ... has its update ratio judged (and counted in the medians) only from this many steps after that step on:
#: before, its weights are the sum of its first few updates and the ratio is about 1/t by construction.
ZERO_START_STEPS = 10
#: The largest float32 sum of squares is 3.4e38: a float32 L2 norm overflows to inf beyond about this, even when
#: every element is finite.
FLOAT32_NORM_MAX = 1.8446744e19


@dataclass(frozen=True)
class Thresholds:
    """Detector thresholds. Every field can be overridden with ``FeatureProbe(thresholds={...})``.

    Attributes:
        dead_fraction: a ReLU-like stream (ReLU, ReLU6, or a container returning one) is *dead* when at least
            this fraction of its units (channels of conv-like outputs, features of linear/sequence outputs)
            was never positive over ``dead_window`` training steps. Other layers are not judged: a SiLU, GELU,
            identity or linear output is negative without being dead. Default 0.5.
        dead_fraction_small: the same fraction for streams of ``dead_min_units`` to 15 units (a healthy RegNet
            squeeze-excitation bottleneck has 4 of 8 units dead). Default 0.9 — but when ``dead_fraction`` is
            overridden (``thresholds={"dead_fraction": 0.25}``) and this one is not, it follows
            ``dead_fraction``: the fraction a user sets applies to every stream, small ones included. Set both to
            judge small streams differently.
        dead_min_units: streams of fewer units than this are not judged dead at all. Default 4.
        dead_window: the window, in measured steps, over which a unit must fire at least once. The units of a
            judged stream are measured on every training step it runs (not only on full-statistics steps), so
            for a stream that runs every step this is the last ``dead_window`` training steps; no verdict before
            ``dead_window + 1`` measured steps. Default 20.
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
        not_learning_ratio: a module with parameters is *not learning* when its update ratio
            ``||W_after - W_before|| / ||W_before||`` stays below this fraction of the step's median over the
            probed modules (or is exactly 0 while its gradient is not), on ``update_window`` measured steps in a
            row: a parameter group with ``lr=0``, parameters the optimizer does not update. Default 1e-3.
        lr_too_high_ratio: a module's learning rate is *too high* when its update ratio stays above this on
            ``update_window`` measured steps in a row (each step moves the weights by their own size).
            Default 1.0. A module whose weights start at (near) zero (``||W|| == 0``, or a ratio above
            ``ZERO_START_RATIO`` = 100, at its first measured step: a zero-initialised bias) is not judged by
            either update-ratio rule, nor counted in their medians, for ``ZERO_START_STEPS`` (10) steps: until
            then its weights are the sum of its first updates and its ratio is about 1/t by construction.
        lr_group_spread: ... or, when its parameter group has a higher learning rate than the other probed
            modules' groups, when its update ratio is above this many times the median of the modules outside
            its group on ``lr_group_window`` measured steps in a row. Default 10.
        update_window: measured (full-statistics) steps in a row for the two rules above. Default 5.
        lr_group_window: measured steps in a row for the group rule. Default 3.
    """

    dead_fraction: float = _DEFAULT_DEAD_FRACTION
    #: ``None`` (not given) becomes a number at construction: 0.9, or ``dead_fraction`` when that is not 0.5
    dead_fraction_small: float | None = None
    dead_min_units: int = MIN_UNITS
    dead_window: int = 20
    exploding_absmax: float = 1e6
    exploding_growth: float = 1e3
    growth_window: int = 50
    min_history: int = 5
    vanishing_ratio: float = 1e-4
    vanishing_window: int = 5
    vanishing_min_step: int = 0
    not_learning_ratio: float = 1e-3
    lr_too_high_ratio: float = 1.0
    lr_group_spread: float = 10.0
    update_window: int = 5
    lr_group_window: int = 3

    def __post_init__(self) -> None:
        if self.dead_fraction_small is None:  # not given: follows an overridden dead_fraction
            small = SMALL_DEAD_FRACTION if self.dead_fraction == _DEFAULT_DEAD_FRACTION else self.dead_fraction
            object.__setattr__(self, "dead_fraction_small", small)

    @classmethod
    def from_dict(cls, overrides: Mapping[str, float] | None) -> "Thresholds":
        """Defaults with ``overrides`` applied; unknown keys and out-of-range values raise. A ``dead_fraction``
        given without ``dead_fraction_small`` applies to small streams too (even when it equals the default)."""
        overrides = dict(overrides or {})
        check_thresholds_keys(overrides, [f.name for f in fields(cls)])
        if "dead_fraction" in overrides and "dead_fraction_small" not in overrides:
            overrides["dead_fraction_small"] = overrides["dead_fraction"]

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
        num("dead_fraction_small", 0.0, 1.0)
        num("dead_min_units", 1, lo_open=False, integer=True)
        num("dead_window", 1, lo_open=False, integer=True)
        num("exploding_absmax", 0.0)
        num("exploding_growth", 1.0)
        num("growth_window", 1, lo_open=False, integer=True)
        num("min_history", 1, lo_open=False, integer=True)
        num("vanishing_ratio", 0.0, 1.0)
        num("vanishing_window", 1, lo_open=False, integer=True)
        num("vanishing_min_step", 0, lo_open=False, integer=True)
        num("not_learning_ratio", 0.0, 1.0)
        num("lr_too_high_ratio", 0.0)
        num("lr_group_spread", 1.0)
        num("update_window", 1, lo_open=False, integer=True)
        num("lr_group_window", 1, lo_open=False, integer=True)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Diagnosis:
    """What the detectors remember between flushes (a value: :func:`diagnose` returns a new one).

    Attributes:
        active: ``(slot, kind)`` findings currently active (reported once until they clear).
        nonfinite_active: per signal (and ``"weight"``, ``"param_grad"``), whether non-finite values were present
            at the last row.
        absmax: per slot, the last ``growth_window`` finite, non-exploded absmax values.
        small: per gradient slot, how many consecutive measured steps it was below the vanishing ratio.
        skipped_steps: steps the GradScaler skipped (inf gradients by design).
        dead_latest: per judged slot, the dead fraction at the last flush (only once its window was seen).
    """

    active: set = field(default_factory=set)
    nonfinite_active: dict = field(default_factory=lambda: {"activation": False, "gradient": False,
                                                             "weight": False, "param_grad": False})
    absmax: dict = field(default_factory=dict)
    small: dict = field(default_factory=dict)
    skipped_steps: list = field(default_factory=list)
    dead_latest: dict = field(default_factory=dict)
    #: parameter rules: findings active per (module, kind); consecutive measured steps per (module, rule)
    param_active: set = field(default_factory=set)
    param_runs: dict = field(default_factory=dict)
    #: modules whose first measured step was seen; of those, the ones whose weights started at (near) zero, with
    #: that step (their update ratio is not judged before ``ZERO_START_STEPS`` steps later)
    param_seen: set = field(default_factory=set)
    param_zero_start: dict = field(default_factory=dict)

    def copy(self) -> "Diagnosis":
        """A deep copy, made field by field (:func:`_copied`): about 3x faster than ``copy.deepcopy`` on the
        running absmax lists of every stream (one copy per log step)."""
        out = copy.copy(self)
        for f in fields(self):
            setattr(out, f.name, _copied(getattr(self, f.name)))
        return out

    def state_dict(self) -> dict:
        return {"active": [[int(s), k] for s, k in sorted(self.active)],
                "nonfinite_active": dict(self.nonfinite_active),
                "absmax": {int(s): [float(x) for x in q] for s, q in self.absmax.items()},
                "small": {int(s): int(v) for s, v in self.small.items()},
                "skipped_steps": [int(x) for x in self.skipped_steps],
                "param_active": [[int(m), k] for m, k in sorted(self.param_active)],
                "param_runs": [[int(m), k, int(v)] for (m, k), v in sorted(self.param_runs.items())],
                "version": 2,
                "param_seen": sorted(int(m) for m in self.param_seen),
                "param_zero_start": {int(m): int(v) for m, v in self.param_zero_start.items()}}

    @classmethod
    def from_state(cls, state: Mapping) -> "Diagnosis":
        return cls(active={(int(s), str(k)) for s, k in state.get("active", [])},
                   nonfinite_active={"activation": False, "gradient": False, "weight": False, "param_grad": False,
                                     **state.get("nonfinite_active", {})},
                   param_active={(int(m), str(k)) for m, k in state.get("param_active", [])},
                   param_runs={(int(m), str(k)): int(v) for m, k, v in state.get("param_runs", [])},
                   absmax={int(s): list(v) for s, v in state.get("absmax", {}).items()},
                   small={int(s): int(v) for s, v in state.get("small", {}).items()},
                   skipped_steps=list(state.get("skipped_steps", [])),
                   # version 1 (no version key): no first steps known; a module is judged as before
                   param_seen={int(m) for m in state.get("param_seen", [])},
                   param_zero_start={int(m): int(v) for m, v in state.get("param_zero_start", {}).items()})


@dataclass(frozen=True)
class Streams:
    """What the detectors know of each slot: its stream name, signal, and whether it is judged for death."""

    names: Sequence[str]
    signals: Sequence[str]
    dead_judged: Sequence[bool]

    @functools.cached_property
    def gradient(self) -> np.ndarray:
        """Per slot: whether it is a gradient stream (a mask, for the detectors' vectorised selections)."""
        return np.array([s == "gradient" for s in self.signals], dtype=bool)

    def emit(self, slot: int, kind: str, step: int, value: float, threshold: float, message: str, stat: str,
             extra: dict | None = None) -> Finding:
        return Finding(step=int(step), layer=self.names[slot], signal=self.signals[slot], kind=kind,
                       value=float(value), threshold=float(threshold), message=message, stat=stat,
                       extra=extra or {})


@dataclass(frozen=True)
class ParamModules:
    """What the parameter detectors know of each module with parameters (rows of ``Derived.params``)."""

    names: Sequence[str]
    groups: np.ndarray  # the (optimizer, parameter group) id of each module's largest parameter
    lrs: np.ndarray  # that group's learning rate now

    def emit(self, m: int, kind: str, step: int, value: float, threshold: float, message: str, stat: str,
             extra: dict | None = None) -> Finding:
        return Finding(step=int(step), layer=self.names[m], signal="parameter", kind=kind, value=float(value),
                       threshold=float(threshold), message=message, stat=stat, extra=extra or {})


_ATOMS = (int, float, str, bool, type(None), np.float64, np.float32, np.int64, np.bool_)


def _copied(v: object) -> object:
    """A deep copy of ``v`` for the containers the state holds (dicts, lists, sets, tuples of immutable values):
    immutable values are shared, containers copied; anything else by ``copy.deepcopy``."""
    t = type(v)
    if t in _ATOMS:
        return v
    if t is list:
        return [x if type(x) in _ATOMS else _copied(x) for x in v]  # type: ignore[attr-defined]
    if t is dict:
        return {k: x if type(x) in _ATOMS else _copied(x) for k, x in v.items()}  # type: ignore[attr-defined]
    if t in (set, frozenset, tuple) and all(type(x) in _ATOMS or (type(x) is tuple and all(
            type(y) in _ATOMS for y in x)) for x in v):  # type: ignore[attr-defined]
        return t(v) if t is not tuple else v
    return copy.deepcopy(v)


def diagnose(state: Diagnosis, d: Derived, units: Mapping[int, np.ndarray] | None,
             first_seen: Mapping[int, int] | None, names: Sequence[str], signals: Sequence[str],
             dead_judged: Sequence[bool], t: Thresholds,
             params: ParamModules | None = None,
             unit_steps: Mapping[int, Sequence[int]] | None = None,
             grad_reference: Mapping[int, tuple[float, float]] | None = None) -> tuple[Diagnosis, list[Finding]]:
    """Run every detector over the rows of ``d`` (and the unit windows at its last step; ``unit_steps``: the
    steps each unit slot was measured on, see :func:`find_dead`; ``grad_reference``: per step, the model's
    input-end and largest parameter-gradient norms, see :func:`find_vanishing`).

    Returns:
        the new state and the new findings, ordered by step, then activation, gradient, parameter, then the
        order in which the streams ran (forward order for activations, backward order for gradients, module
        order for parameters).
    """
    st = state.copy()
    streams = Streams(names, signals, dead_judged)
    out: list[Finding] = []
    settled = _exploding_in_bulk(st, d, streams, t)  # the streams no row of this read makes explode, all at once
    mask = np.zeros(d.values.shape[1] if len(d) else 0, bool)
    mask[[s for s in settled if s < len(mask)]] = True
    for i in range(len(d)):
        if _skipped(d, i):
            st.skipped_steps.append(int(d.steps[i]))
        st, f = find_nonfinite(st, d, i, streams)
        out += f
        st, f = find_exploding(st, d, i, streams, t, mask)
        out += f
        st, f = find_vanishing(st, d, i, streams, t, params, grad_reference)
        out += f
        if params is not None and d.params is not None and len(params.names):
            for detector in (find_param_nonfinite, find_lr_too_high, find_not_learning):
                st, f = detector(st, d, i, params, t)
                out += f
    if units and len(d):
        st, f = find_dead(st, int(d.steps[-1]), units, first_seen or {}, streams, t, unit_steps)
        out += _attach_blocked(f, _blocked(d, streams, params), d, streams) if f else []
    if not out:
        return st, out
    position = {}  # (step, stream, signal) -> place in that step's execution order
    for i in range(len(d)):
        for k, slot in enumerate(d.order[i] if i < len(d.order) else []):
            position.setdefault((int(d.steps[i]), names[slot], signals[slot]), k)
    for m, name in enumerate(params.names if params is not None else ()):
        for step in d.steps:
            position.setdefault((int(step), name, "parameter"), m)
    rank = {kind: k for k, kind in enumerate(KINDS)}  # the one order of kinds (findings.KINDS)
    signal_rank = {"activation": 0, "gradient": 1, "parameter": 2}
    return st, sorted(out, key=lambda f: (f.step, signal_rank.get(f.signal, 3),
                                          position.get((f.step, f.layer, f.signal), 1e9), rank.get(f.kind, 9)))


def _blocked(d: Derived, streams: Streams, params: ParamModules | None) -> list[str]:
    """The probed streams and modules no gradient reaches at the last measured row of ``d``: gradient L2 norm (or
    parameter-gradient norm) exactly 0 while others are not. What dead units do to the layers before them (and
    what the vanishing and not-learning rules leave to the dead rule)."""
    out: list[str] = []
    l2 = d.get("l2")
    rows = [i for i in range(len(d)) if np.isfinite(l2[i]).any()]
    if rows:
        i = rows[-1]
        grad = np.array([sig == "gradient" for sig in streams.signals[:l2.shape[1]]], bool)
        row = np.where(grad, l2[i, :len(grad)], np.nan)
        if np.nanmax(row, initial=0) > 0:
            out += [streams.names[s] for s in np.flatnonzero(row == 0)]
    if params is not None and d.params is not None and len(d) and len(params.names):
        g = _param_column(d, len(d) - 1, "param_grad_norm")
        if np.nanmax(g, initial=0) > 0:
            out += [params.names[m] for m in np.flatnonzero(g == 0) if m < len(params.names)]
    return list(dict.fromkeys(out))


def _attach_blocked(dead: list[Finding], blocked: list[str], d: Derived, streams: Streams) -> list[Finding]:
    """Each blocked stream or module goes to the nearest dead stream after it in forward order (the one whose units
    starve it); one whose forward position is not known goes to none."""
    fwd: dict[str, int] = {}
    for row in d.order:
        for s in row:
            if streams.signals[s] == "activation":
                fwd.setdefault(streams.names[s], len(fwd))
    mine: dict[int, list[str]] = {}
    for b in blocked:
        at = fwd.get(b, fwd.get(b.split(CALL_SEP, 1)[0]))
        after = [(fwd[f.layer], k) for k, f in enumerate(dead) if f.layer in fwd and at is not None and fwd[f.layer] > at]
        if after:
            mine.setdefault(min(after)[1], []).append(b)
    at_step = int(d.steps[-1]) if len(d) else -1
    return [_with_blocked(f, mine.get(k, []), at_step) for k, f in enumerate(dead)]


def _with_blocked(f: Finding, mine: list[str], step: int) -> Finding:
    """A dead finding with the streams its units starve of gradient (``extra["blocked"]``, said in the message)."""
    if not mine:
        return f
    msg = (f"{f.message} No gradient at all reaches {len(mine)} probed stream(s)/module(s) at step {step} "
           f"({listed(mine, 5)}): what dead units do to the layers before them.")
    return replace(f, message=msg, extra={**f.extra, "blocked": mine})


def _skipped(d: Derived, i: int) -> bool:
    """Whether GradScaler skipped row ``i``'s optimizer step (worked out for every row at once, once)."""
    rows = d.memo.get("skipped")
    if rows is None:
        with np.errstate(invalid="ignore"):
            rows = d.memo["skipped"] = np.nanmax(d.get("skipped"), axis=1, initial=0) == 1 if len(d) \
                else np.zeros(0, bool)
    return bool(rows[i])


def find_nonfinite(st: Diagnosis, d: Derived, i: int, streams: Streams) -> tuple[Diagnosis, list[Finding]]:
    """NaN/Inf: the FIRST stream where they appeared (forward order for activations, backward order for
    gradients), at the exact step. Requires: min, max (measured every step)."""
    flags = nonfinite_flags(d)[i]
    if not flags.any():  # the common row: nothing non-finite, no stream left in the state's "active" either
        st.nonfinite_active["activation"] = st.nonfinite_active["gradient"] = False
        return st, []
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
        msg += f"; also in {len(others)} later stream(s): {listed(others, 5)})" \
            if others else ")"
        out.append(streams.emit(first, "nonfinite", d.steps[i], count if count == count else 1.0, 0.0, msg + ".",
                                "nonfinite", {"downstream": others}))
    return st, out


def find_exploding(st: Diagnosis, d: Derived, i: int, streams: Streams,
                   t: Thresholds, settled: Collection[int] = ()) -> tuple[Diagnosis, list[Finding]]:
    """Absolute bound on absmax, or growth over the stream's running median. Requires: absmax (every step).
    ``settled``: streams :func:`_exploding_in_bulk` has already taken through every row of ``d``."""
    absmax = d.get("absmax")[i]
    calls = d.get("calls")[i]
    skipped = _skipped(d, i)
    out = []
    todo = (calls > 0) & np.isfinite(absmax)
    if isinstance(settled, np.ndarray):  # a mask over the slots (diagnose: made once per read)
        todo[:len(settled)] &= ~settled[:len(todo)]
    elif settled:
        todo[[s for s in settled if s < len(todo)]] = False
    for s in np.flatnonzero(todo):
        a = float(absmax[s])
        if skipped and streams.signals[s] == "gradient":
            continue
        q = st.absmax.setdefault(int(s), [])
        med = _running_median(q, t)
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


def _exploding_in_bulk(st: Diagnosis, d: Derived, streams: Streams, t: Thresholds) -> set[int]:
    """What :func:`find_exploding` does row by row, for every stream at once where no row of ``d`` explodes and
    its running window is full (the common case: a read of a long, healthy training). For each such stream the
    ``k``-th value it measured in ``d`` is judged against the median of the ``growth_window`` values before it
    (the last ones kept and this read's earlier ones): the same values, in the same order, as the row loop. When
    none crosses a bound its window becomes the last ``growth_window`` values and the stream is returned
    (settled); a stream with an explosion in this read, or a short window, is left to the row loop."""
    w = int(t.growth_window)
    n = len(d)
    if n < 2 or w < t.min_history or not st.absmax:
        return set()
    absmax = d.get("absmax")
    calls = d.get("calls")
    k = min(absmax.shape[1], len(streams.signals))
    valid = (calls[:, :k] > 0) & np.isfinite(absmax[:, :k])
    skipped = np.array([_skipped(d, i) for i in range(n)], bool)
    if skipped.any():  # GradScaler skipped: gradient values of that row are not judged (nor kept)
        grad = np.array([sig == "gradient" for sig in streams.signals[:k]], bool)
        valid &= ~(skipped[:, None] & grad[None, :])
    full_rows = valid.all(axis=0)
    cand = [s for s in range(k) if len(st.absmax.get(s, ())) == w]
    settled: set[int] = set()
    # the streams measured on every row: one median call for all of them
    whole = [s for s in cand if full_rows[s]]
    if whole:
        vals = absmax[:, whole].T.astype(np.float64)  # [S, n]
        hist = np.array([st.absmax[s] for s in whole], np.float64)  # [S, w]
        win = np.lib.stride_tricks.sliding_window_view(np.concatenate([hist, vals], axis=1), w, axis=1)[:, :n]
        med = np.median(win, axis=2)  # [S, n]: the window before each value
        over = _crosses(vals, med, t)
        for j, s in enumerate(whole):
            if not over[j].any():
                st.absmax[s] = np.concatenate([hist[j], vals[j]])[-w:].tolist()
                st.active.discard((s, "exploding"))
                settled.add(s)
    for s in cand:
        if full_rows[s]:
            continue
        v = absmax[valid[:, s], s].astype(np.float64)
        if not len(v):
            settled.add(s)  # nothing to judge or keep in this read
            continue
        hist1 = np.asarray(st.absmax[s], np.float64)
        allv = np.concatenate([hist1, v])
        med1 = np.median(np.lib.stride_tricks.sliding_window_view(allv, w)[:len(v)], axis=1)
        if not _crosses(v, med1, t).any():
            st.absmax[s] = allv[-w:].tolist()
            st.active.discard((s, "exploding"))
            settled.add(s)
    return settled


def _crosses(values: np.ndarray, median: np.ndarray, t: Thresholds) -> np.ndarray:
    """Where :func:`find_exploding`'s two bounds are crossed: the absolute one, or growth over a positive median."""
    return (values > t.exploding_absmax) | ((median > 0) & (values > t.exploding_growth * median))


def _running_median(q: Sequence[float], t: Thresholds) -> float:
    """The growth rule's reference: the median of a stream's kept absmax values (NaN before ``min_history``)."""
    if len(q) < t.min_history:
        return math.nan
    # sorted() of a short list of Python floats: ~30x faster than np.median on a list (one call per stream and
    # row of a log step), and the same value (the mean of the two middle values for an even count)
    v = sorted(q)
    k = len(v) // 2
    return float(v[k]) if len(v) % 2 else (v[k - 1] + v[k]) / 2.0


def alarm_bounds(st: Diagnosis, t: Thresholds, slots: int) -> np.ndarray:
    """Per slot, the largest |value| the exploding rule allows on the next step: ``exploding_absmax``, or the
    growth rule's ``exploding_growth`` x the stream's running median once known. The per-step alarm
    (:meth:`~lit_probe.session.ProbeSession.sentinel_alarm`) checks min/max against it between flushes."""
    b = np.full(slots, float(t.exploding_absmax))
    for s, q in st.absmax.items():
        med = _running_median(q, t)
        if s < slots and med > 0:  # NaN > 0 is False
            b[s] = min(b[s], t.exploding_growth * med)
    return b


def find_vanishing(st: Diagnosis, d: Derived, i: int, streams: Streams, t: Thresholds,
                   pm: ParamModules | None = None,
                   reference: Mapping[int, tuple[float, float]] | None = None) -> tuple[Diagnosis, list[Finding]]:
    """The gradient reaching the input end is tiny. Requires: l2 (full steps) and the backward order; and, to
    be independent of the probe list, the model's parameter-gradient reference (``reference``: per step, the
    input end's and the largest per-module parameter-gradient norm of the whole model, probed or not; see
    :mod:`lit_probe.gradref`) and the probed modules' parameter-gradient norms (``Derived.params``).

    For a gradient stream s, the *envelope* is the largest of two ratios:

    * the stream envelope: the largest gradient L2 norm among s and the probed streams computed before it in the
      forward pass (at or after it in backward order), over the step's largest probed gradient norm (needs at
      least 3 measured gradient streams);
    * the parameter envelope: the largest parameter-gradient norm among the probed modules of those streams and
      the model's input end (its first modules with parameters, probed or not), over the largest per-module
      parameter-gradient norm of the whole model.

    The envelope is the parameter envelope where a probed module with parameters is at or below s and no probed
    module's parameter gradient is normal on the model's scale (a probe list of the first layers alone, or of one
    layer: the probed streams have no normal top of their own, so the stream envelope would say nothing), else the
    larger of the two (a stream whose own gradient is near the probed top's is not vanishing, even above a part
    of the model whose gradients vanished: the Sigmoid under a healthy head in ``lit-probe demo --bug vanishing``).
    Either way it is never below the input end's ratio: with a normal gradient at the input end nothing is
    vanishing. s is vanishing when the envelope stays below ``vanishing_ratio`` on ``vanishing_window`` measured
    steps in a row. A branch whose gradient is small by design (LayerScale, attention q/k, a squeeze-excitation pool, a
    small head) has a normal gradient on the path below it, so its envelope is normal; a vanishing stack has
    every stream below it small, down to the input end. The parameter envelope is what keeps that true when the
    probes cover no normal path below a branch (``type:Linear`` on BERT: layer 0's query and key had nothing
    below them) and what judges a single probed layer. Exact zeros (a stream envelope of 0) are blocked, not
    vanishing: the dead detector's case.
    """
    measured = d.memo.get("l2_rows")  # the rows with any L2 measured (full steps), worked out once per read
    if measured is None:
        measured = d.memo["l2_rows"] = np.isfinite(d.get("l2")).any(axis=1) if len(d) else np.zeros(0, bool)
    if not measured[i]:
        return st, []
    l2 = d.get("l2")[i]
    step = int(d.steps[i])
    if _skipped(d, i):
        return st, []
    row = d.order[i] if i < len(d.order) else []
    if not len(row):
        return st, []
    row = np.asarray(row, dtype=np.int64)  # the step's slots in execution order: its gradients' measured L2
    order = row[streams.gradient[row] & np.isfinite(l2[row])].tolist()
    if not order:
        return st, []
    ref = reference.get(step) if reference else None
    # the parameter envelope: the input end's and the probed modules' parameter-gradient norms, as a fraction of
    # the largest per-module parameter-gradient norm of the whole model (NaN: not known at this step)
    penv = np.full(len(order), np.nan)
    base = math.nan
    if ref is not None and ref[1] > 0 and math.isfinite(ref[0]) and math.isfinite(ref[1]):
        base = float(ref[0] / ref[1])
        own = np.full(len(order), np.nan)
        if pm is not None and d.params is not None and len(pm.names):
            row = {name: m for m, name in enumerate(pm.names)}
            g = _param_column(d, i, "param_grad_norm")
            for k, s in enumerate(order):
                m = row.get(streams.names[s].split(CALL_SEP, 1)[0])
                if m is not None and m < len(g) and np.isfinite(g[m]):
                    own[k] = g[m] / ref[1]
        below = np.fmax.accumulate(own[::-1])[::-1]  # the probed modules at or below each stream
        penv = np.fmax(below, base)
        has_own = np.isfinite(below)
        # the probes reach a part of the model whose parameter gradients are normal on the model's own scale: then
        # the probed streams' largest gradient is a normal one too, and a stream whose own gradient (or one below
        # it) is near it is not vanishing, whatever the parameters below it show
        reaches_top = bool(np.isfinite(own).any() and np.nanmax(own) >= 10 * t.vanishing_ratio)
    else:
        has_own = np.zeros(len(order), bool)
        reaches_top = False
    values = l2[order]
    top = float(values.max())
    if len(order) >= 3 and top > 0:
        senv = np.maximum.accumulate(values[::-1])[::-1] / top  # E at each backward position: max over the rest
    else:
        senv = np.full(len(order), np.nan)
    out = []
    for k, s in enumerate(order):
        s = int(s)
        key = (s, "vanishing")
        se, pe = float(senv[k]), float(penv[k])
        if se != se and not has_own[k]:
            # no stream envelope (fewer than 3 streams) and no parameters of its own or below: no verdict
            st.small[s] = 0
            st.active.discard(key)
            continue
        # the parameter envelope where probed parameters are at or below s (it has the model's own scale: a probe
        # list of the first layers alone has no top of its own); else the stream envelope, never below the input end
        ratio = pe if has_own[k] and not reaches_top else float(np.fmax(se, pe))
        blocked = (se == 0 and not has_own[k]) or pe == 0  # exact zeros: no gradient reaches it (dead units)
        if blocked or ratio >= 10 * t.vanishing_ratio:  # blocked, or clearly healthy (hysteresis)
            st.small[s] = 0
            st.active.discard(key)
            continue
        if ratio < t.vanishing_ratio:
            st.small[s] = st.small.get(s, 0) + 1
        if st.small.get(s, 0) >= t.vanishing_window and step >= t.vanishing_min_step and key not in st.active:
            st.active.add(key)
            parts = []
            if se == se:
                parts.append(f"the largest gradient norm at or below it is {se:.3g}x the step's largest")
            if pe == pe:
                parts.append(f"the largest parameter-gradient norm at or below it, down to the model's input end, "
                             f"is {pe:.3g}x the model's largest")
            out.append(streams.emit(s, "vanishing", step, ratio, t.vanishing_ratio,
                                    f"`{streams.names[s]}` gradient is vanishing at step {step}: "
                                    f"{'; '.join(parts)}, on {st.small[s]} measured steps in a row.",
                                    "grad_envelope_ratio",
                                    {k: v for k, v in (("l2", float(l2[s])), ("envelope", se * top), ("top", top),
                                                       ("stream_ratio", se), ("param_ratio", pe),
                                                       ("input_end_ratio", base)) if v == v}))
    return st, out


def dead_units(last: np.ndarray, step: int, first_seen: int, window: int,
               measured: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
    """Which units were never positive on the last ``window`` measured steps up to ``step``.

    Args:
        last: per unit, the last step it was positive (its first-seen step when it never was: a unit is never
            called dead on fewer measured steps than the window, so that first step counts as "fired").
        measured: the steps the units were measured on (ascending); ``None``: every step from ``first_seen``.

    Returns:
        ``(dead, dead_from, seen)``: the dead mask, per unit the step from which it is dead (``inf``: not dead
        yet), and whether the window has been measured (``window + 1`` measured steps since ``first_seen``:
        before, no verdict).
    """
    last = np.maximum(np.asarray(last, np.float64), first_seen)
    if measured is None:
        dead_from = last + window
        seen = step - first_seen >= window
    else:
        obs = np.asarray(measured, np.float64)
        obs = obs[obs <= step]
        j = np.searchsorted(obs, last, side="right") + window - 1  # the window-th measured step after `last`
        dead_from = obs[np.minimum(j, len(obs) - 1)] if len(obs) else np.full(last.shape, np.inf)
        dead_from = np.where(j < len(obs), dead_from, np.inf)
        seen = len(obs) >= window + 1
    return dead_from <= step, dead_from, bool(seen)


def find_dead(st: Diagnosis, step: int, units: Mapping[int, np.ndarray], first_seen: Mapping[int, int],
              streams: Streams, t: Thresholds,
              unit_steps: Mapping[int, Sequence[int]] | None = None) -> tuple[Diagnosis, list[Finding]]:
    """ReLU-like units never positive on the last ``dead_window`` measured steps: at least ``dead_fraction`` of
    them, or ``dead_fraction_small`` in a stream of fewer than 16 units; streams of fewer than ``dead_min_units``
    units are not judged. Requires: the per-unit last-fired steps and, in ``unit_steps``, the steps the units
    were measured on (the session measures the judged streams on every step they run; without it, every step
    from the first seen one is taken as measured). No verdict before ``dead_window + 1`` measured steps."""
    out = []
    for s, last in units.items():
        if s >= len(streams.dead_judged) or not streams.dead_judged[s] or last.size < t.dead_min_units:
            continue
        fs = first_seen.get(s, step)
        measured = None if unit_steps is None else unit_steps.get(s)
        dead, dead_from, seen = dead_units(last, step, fs, t.dead_window, measured)
        if not seen:
            continue  # the window has not been measured yet: no verdict, no dead fraction
        frac = float(dead.mean())
        st.dead_latest[s] = frac
        key = (s, "dead")
        small = SMALL_DEAD_FRACTION if t.dead_fraction_small is None else t.dead_fraction_small
        thr = small if last.size < SMALL_UNITS else t.dead_fraction
        if frac >= thr:
            if key not in st.active:
                st.active.add(key)
                k = max(1, math.ceil(thr * last.size))
                when = int(min(np.sort(dead_from)[k - 1], step))
                # the onset: the first step on which the dead units no longer fired (the stream's first step for
                # units that never fired); incidents keep a dead finding whose onset precedes an instability
                raw = np.asarray(last, np.float64)[dead]
                since = int(np.where(raw <= fs, fs, raw + 1).min()) if raw.size else max(when - t.dead_window + 1, 0)
                every = measured is None or (len(measured) and measured[-1] - measured[0] + 1 == len(measured))
                on = "steps" if every else "steps it ran"
                out.append(streams.emit(s, "dead", when, frac, thr,
                                        f"`{streams.names[s]}`: {frac:.0%} of its {last.size} units were never "
                                        f"positive on the last {t.dead_window} {on} (measured on each; dead from "
                                        f"step {when}).",
                                        "dead_fraction", {"units": int(last.size), "dead_units": int(dead.sum()),
                                                         "since": since}))
        else:
            st.active.discard(key)
    return st, out


# ---------------------------------------------------------------------- parameters (Derived.params)
def _param_column(d: Derived, i: int, stat: str) -> np.ndarray:
    assert d.params is not None
    return d.params[i, :, PARAM_STATS.index(stat)]


def find_param_nonfinite(st: Diagnosis, d: Derived, i: int, pm: ParamModules,
                         t: Thresholds) -> tuple[Diagnosis, list[Finding]]:
    """Non-finite weights (before the step's update) or parameter gradients, judged by their elements: a NaN
    norm (only a NaN element makes a sum of squares NaN) or a non-finite largest |element|; the first module in
    module order, at the exact step. A float32 norm that overflows to inf while every element is finite (the
    sum of squares passes 3.4e38: elements beyond ~1e19) is not non-finite: it is reported as ``exploding``
    (value: the largest |element|). Requires: weight and gradient norms and max-abs (every optimizer step).
    Gradients of a step the GradScaler skipped are not judged."""
    out = []
    step = int(d.steps[i])
    assert d.params is not None
    has_absmax = d.params.shape[-1] >= len(PARAM_STATS)
    for key, stat, amax_stat, what in (("weight", "weight_norm", "weight_absmax", "weights"),
                                       ("param_grad", "param_grad_norm", "param_grad_absmax", "parameter gradients")):
        v = _param_column(d, i, stat)
        measured = _measured(d, i, stat)
        if has_absmax:
            a = _param_column(d, i, amax_stat)
            a_measured = _measured(d, i, amax_stat)
            with np.errstate(invalid="ignore"):
                bad = measured & (np.isnan(v) | (a_measured & ~np.isfinite(a)))
                # no max-abs at that step (an older writer): the norm is all there is
                bad |= measured & ~a_measured & ~np.isfinite(v)
                overflow = measured & a_measured & ~bad & ~np.isfinite(v) & np.isfinite(a)
        else:
            bad, overflow = measured & ~np.isfinite(v), np.zeros(len(v), bool)
        hit = [int(m) for m in np.flatnonzero(bad)]
        over = [int(m) for m in np.flatnonzero(overflow)]
        if key == "param_grad" and _skipped(d, i):
            hit, over = [], []
        when = "before that step's update" if key == "weight" else "unscaled, before clipping"
        okey = key + "_overflow"
        if not over:
            st.nonfinite_active[okey] = False
        elif not st.nonfinite_active.get(okey):
            st.nonfinite_active[okey] = True
            first, others = over[0], [pm.names[m] for m in over[1:]]
            big = float(a[first])
            msg = (f"`{pm.names[first]}` {what} are exploding at step {step} ({when}): their float32 norm "
                   f"overflows (the sum of squares passes 3.4e38, a norm beyond {FLOAT32_NORM_MAX:.3g}); the largest "
                   f"|element| is {big:.3g}, finite (not NaN/Inf)")
            msg += f"; also in {len(others)} later module(s): {listed(others, 5)})" if others else ""
            out.append(pm.emit(first, "exploding", step, big, FLOAT32_NORM_MAX, msg + ".",
                               amax_stat, {"downstream": others, "norm": "overflow"}))
        if not hit:
            st.nonfinite_active[key] = False
            continue
        if st.nonfinite_active.get(key):
            continue
        st.nonfinite_active[key] = True
        first, others = hit[0], [pm.names[m] for m in hit[1:]]
        msg = f"Non-finite {what} (NaN/Inf elements) in `{pm.names[first]}` at step {step} ({when}"
        msg += f"; also in {len(others)} later module(s): {listed(others, 5)})" \
            if others else ")"
        # value: how many modules (a number in every sink: W&B tables need one type per column)
        out.append(pm.emit(first, "nonfinite", step, float(len(hit)), 0.0, msg + ".",
                           "nonfinite_weights" if key == "weight" else "nonfinite_param_grads",
                           {"downstream": others}))
    return st, out


def _zero_start(st: Diagnosis, d: Derived, i: int) -> np.ndarray:
    """Per module, whether its update ratio is not judged at row ``i``: its weights started at (near) zero
    (``||W|| == 0``, or a ratio above ``ZERO_START_RATIO``, at its first measured step) less than
    ``ZERO_START_STEPS`` steps ago. Updates the state at each module's first measured step (idempotent)."""
    w = _param_column(d, i, "weight_norm")
    r = _param_column(d, i, "update_ratio")
    step = int(d.steps[i])
    for m in np.flatnonzero(np.isfinite(w)):
        m = int(m)
        if m in st.param_seen:
            continue
        st.param_seen.add(m)
        if w[m] == 0 or (r[m] == r[m] and r[m] > ZERO_START_RATIO):
            st.param_zero_start[m] = step
    young = np.zeros(len(w), bool)
    for m, since in st.param_zero_start.items():
        if m < len(young) and step < since + ZERO_START_STEPS:
            young[m] = True
    return young


def _measured(d: Derived, i: int, stat: str) -> np.ndarray:
    """Where a parameter statistic was measured at row ``i`` (a NaN there is a measured NaN)."""
    assert d.params is not None
    if d.params_measured is None:
        return ~np.isnan(d.params[i, :, PARAM_STATS.index(stat)])
    return d.params_measured[i, :, PARAM_STATS.index(stat)]


def _run(st: Diagnosis, m: int, rule: str, hold: bool) -> int:
    key = (m, rule)
    st.param_runs[key] = st.param_runs.get(key, 0) + 1 if hold else 0
    return st.param_runs[key]


def find_not_learning(st: Diagnosis, d: Derived, i: int, pm: ParamModules,
                      t: Thresholds) -> tuple[Diagnosis, list[Finding]]:
    """Update ratio far below the step's median over the probed modules (or exactly 0 while the gradient is
    not) on ``update_window`` measured steps in a row. A module whose gradient is exactly 0 is blocked (no
    gradient reaches it: dead units after it), not judged. Also a module whose weights are still exactly 0 past
    the zero-start guard while its gradient is not (a zero-initialised LoRA/adapter up-projection or branch that
    never moves: it has no update ratio, ``||W|| = 0``), on ``update_window`` measured steps in a row. Requires:
    update ratios (full steps), weight and gradient norms."""
    r = _param_column(d, i, "update_ratio")
    g = _param_column(d, i, "param_grad_norm")
    w = _param_column(d, i, "weight_norm")
    young = _zero_start(st, d, i)
    ok = np.isfinite(r) & ~young
    with np.errstate(invalid="ignore"):
        still_zero = _measured(d, i, "update_ratio") & (w == 0) & (g > 0) & ~young
    with_median = ok.sum() >= MIN_PARAM_MODULES
    if (not with_median and not still_zero.any()) or _skipped(d, i):
        return st, []
    med = float(np.median(r[ok])) if with_median else math.nan
    step = int(d.steps[i])
    out = []
    for m in np.flatnonzero((ok & with_median) | still_zero):
        m = int(m)
        # no gradient at all reaches it (dead units downstream): blocked, the dead detector's case, not judged
        blocked = not g[m] > 0
        zero = (r[m] == 0 or bool(still_zero[m])) and not blocked
        low = not blocked and (zero or r[m] < t.not_learning_ratio * med)
        n = _run(st, m, "not_learning", low)
        key = (m, "not_learning")
        if not low:
            st.param_active.discard(key)
            continue
        if n >= t.update_window and key not in st.param_active:
            st.param_active.add(key)
            lr = pm.lrs[m] if m < len(pm.lrs) else np.nan
            why = (f"its weights are still exactly 0 (zero-initialised, never moved: a LoRA/adapter up-projection "
                   f"or a zero-initialised branch that stays zero) though its gradient norm is {g[m]:.3g}"
                   if still_zero[m] else
                   f"its weights did not change at all though its gradient norm is {g[m]:.3g}" if zero else
                   f"its update ratio ||dW||/||W|| is {r[m]:.3g}, {med / max(r[m], 1e-300):.3g}x below the "
                   f"median {med:.3g} of the probed layers")
            lr_txt = " (its parameter group has lr=0)" if lr == 0 else \
                (f" (its parameter group's lr: {lr:.3g})" if lr == lr else " (its parameters are in no optimizer)")
            value = 0.0 if still_zero[m] else float(r[m])
            thr = t.not_learning_ratio * med if med == med else 0.0
            out.append(pm.emit(m, "not_learning", step, value, thr,
                               f"`{pm.names[m]}` is not learning at step {step}: {why}, on {n} measured steps in "
                               f"a row{lr_txt}.", "update_ratio", {"median": med, "lr": float(lr)}))
    return st, out


def find_lr_too_high(st: Diagnosis, d: Derived, i: int, pm: ParamModules,
                     t: Thresholds) -> tuple[Diagnosis, list[Finding]]:
    """Update ratio above ``lr_too_high_ratio`` on ``update_window`` measured steps in a row; or, for a module
    whose parameter group has a higher learning rate than the other probed modules' groups, above
    ``lr_group_spread`` x the median of the modules outside its group on ``lr_group_window`` steps in a row.
    Requires: update ratios (full steps) and each module's group and learning rate."""
    r = _param_column(d, i, "update_ratio")
    young = _zero_start(st, d, i)
    for m in np.flatnonzero(young & np.isfinite(r)):  # started at zero, recently: runs do not start yet
        _run(st, int(m), "lr_abs", False)
        _run(st, int(m), "lr_group", False)
    ok = np.isfinite(r) & ~young
    if not ok.any() or _skipped(d, i):
        return st, []
    step = int(d.steps[i])
    groups = np.asarray(pm.groups)
    lrs = np.asarray(pm.lrs, dtype=np.float64)
    out = []
    refs: dict[int, tuple[float, float]] = {}  # per group: median ratio and lr of the modules outside it
    for g in np.unique(groups[ok]):
        outside = ok & (groups != g)
        ref = float(np.median(r[outside])) if outside.sum() >= MIN_PARAM_MODULES else math.nan
        lr_out = lrs[outside][np.isfinite(lrs[outside])]
        refs[int(g)] = (ref, float(np.median(lr_out)) if lr_out.size else math.nan)
    for m in np.flatnonzero(ok):
        m = int(m)
        ref, ref_lr = refs[int(groups[m])]
        higher_lr = lrs[m] == lrs[m] and ref_lr == ref_lr and lrs[m] > ref_lr
        grp = bool(higher_lr and ref > 0 and r[m] > t.lr_group_spread * ref)
        n_abs = _run(st, m, "lr_abs", bool(r[m] > t.lr_too_high_ratio))
        n_grp = _run(st, m, "lr_group", grp)
        key = (m, "lr_too_high")
        fire_abs, fire_grp = n_abs >= t.update_window, n_grp >= t.lr_group_window
        if not (n_abs or n_grp):
            st.param_active.discard(key)
            continue
        if (fire_abs or fire_grp) and key not in st.param_active:
            st.param_active.add(key)
            if fire_grp:
                msg = (f"`{pm.names[m]}`'s learning rate looks too high at step {step}: its update ratio "
                       f"||dW||/||W|| is {r[m]:.3g}, {r[m] / ref:.3g}x the median {ref:.3g} of the layers outside "
                       f"its parameter group (lr {lrs[m]:.3g} vs {ref_lr:.3g}), on {n_grp} measured steps in a row.")
                thr = t.lr_group_spread * ref
            else:
                msg = (f"`{pm.names[m]}`'s learning rate looks too high at step {step}: each optimizer step moves "
                       f"its weights by {r[m]:.3g}x their norm, on {n_abs} measured steps in a row.")
                thr = t.lr_too_high_ratio
            out.append(pm.emit(m, "lr_too_high", step, float(r[m]), thr, msg, "update_ratio",
                               {"reference": ref, "lr": float(lrs[m]), "reference_lr": ref_lr}))
    return st, out
