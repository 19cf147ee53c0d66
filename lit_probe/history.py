"""History
=======

The host side of the device/host boundary. :class:`StatBuffer` rows arrive here once per log step (one
copy, optionally reduced across ranks by a callable the callback injects) and become per-step statistics
per (layer, signal), kept in a bounded ring so memory stays flat however long training runs.
"""

from __future__ import annotations

import numpy as np

from .stats import COLUMNS, HostRows

__all__ = ["STATS", "PARAM_STATS", "LOGGED_PARAM_STATS", "History", "Derived", "derive"]

#: Per-step statistics kept for every (layer, signal). NaN means "not measured at that step".
STATS = ("calls", "count", "nonfinite", "zero_fraction", "mean", "rms", "absmax", "min", "max", "l2", "full",
         "skipped")
#: Per-step statistics of every module with parameters (NaN: not measured at that step). The update ratio is
#: ``||W_after - W_before|| / ||W_before||`` of the optimizer step (full-statistics steps). The norms are float32:
#: ``inf`` when the sum of squares overflows (elements beyond ~1.8e19) even where every element is finite; the
#: ``*_absmax`` statistics (largest |element|, every optimizer step) cannot overflow and say which it is.
PARAM_STATS = ("weight_norm", "param_grad_norm", "update_ratio", "weight_absmax", "param_grad_absmax")
#: The parameter statistics logged as scalars (``<module>/<stat>``).
LOGGED_PARAM_STATS = ("weight_norm", "param_grad_norm", "update_ratio")
_I = {name: i for i, name in enumerate(STATS)}
_C = {name: i for i, name in enumerate(COLUMNS)}


class Derived:
    """Per-step statistics for a block of steps: ``values[n, slots, len(STATS)]``; ``params[n, modules,
    len(PARAM_STATS)]`` (``None`` without the parameter signal)."""

    def __init__(self, steps: np.ndarray, values: np.ndarray, order: list[list[int]],
                 params: np.ndarray | None = None, params_measured: np.ndarray | None = None) -> None:
        self.steps = steps
        self.values = values
        self.order = order
        self.params = params
        self.params_measured = params_measured  # [n, modules, len(PARAM_STATS)] where each was measured
        self.memo: dict[str, np.ndarray] = {}  # what the detectors work out of the whole block once (read-only)

    def get(self, stat: str) -> np.ndarray:
        return self.values[:, :, _I[stat]]

    def __len__(self) -> int:
        return len(self.steps)


def derive(rows: HostRows, grad_slots: np.ndarray, unit_slots: np.ndarray) -> Derived:
    """Turn raw buffer rows into statistics. Gradient slots are divided by the loss scale in force."""
    dev = rows.dev.astype(np.float64)
    n, slots = rows.calls.shape
    out = np.full((n, slots, len(STATS)), np.nan)
    calls = rows.calls.astype(np.float64)
    numel = rows.numel.astype(np.float64)
    seen = calls > 0
    full = rows.full > 0
    with np.errstate(all="ignore"):
        scale = rows.scale[:, 0].astype(np.float64) if rows.scale.size else np.full(n, np.nan)
        inv = np.where(np.isfinite(scale) & (scale > 0), 1.0 / scale, 1.0)[:, None] * np.ones((1, slots))
        inv = np.where(grad_slots[None, :], inv, 1.0)
        mn = dev[:, :, _C["min"]] * inv
        mx = dev[:, :, _C["max"]] * inv
        out[:, :, _I["calls"]] = calls
        out[:, :, _I["count"]] = numel
        out[:, :, _I["min"]] = np.where(seen, mn, np.nan)
        out[:, :, _I["max"]] = np.where(seen, mx, np.nan)
        absmax = np.maximum(np.abs(mn), np.abs(mx))
        absmax = np.where(np.isnan(mn) | np.isnan(mx), np.nan, absmax)
        out[:, :, _I["absmax"]] = np.where(seen, absmax, np.nan)
        if rows.minless is not None:  # the min was not measured (watched ReLU-like streams between full steps)
            out[:, :, _I["min"]] = np.where(rows.minless, np.nan, out[:, :, _I["min"]])
        # the count is measured on full steps; the flag (min/max non-finite) on every step: see nonfinite_flags
        counted = np.maximum(rows.counted.astype(np.float64), 1)
        nf = dev[:, :, _C["nonfinite"]] * numel / counted  # exact when the whole tensor was counted
        flagged = seen & ~(np.isfinite(dev[:, :, _C["min"]]) & np.isfinite(dev[:, :, _C["max"]]))
        nf = np.where(flagged, np.maximum(np.round(nf), 1), 0.0)
        out[:, :, _I["nonfinite"]] = np.where(seen & full, nf, np.nan)
        ok = full & seen & (numel > 0)
        out[:, :, _I["mean"]] = np.where(ok, dev[:, :, _C["sum"]] * inv / numel, np.nan)
        l2 = dev[:, :, _C["l2"]] * inv
        out[:, :, _I["l2"]] = np.where(ok, l2, np.nan)
        out[:, :, _I["rms"]] = np.where(ok, l2 / np.sqrt(np.maximum(numel, 1)), np.nan)
        zf = 1.0 - dev[:, :, _C["nonzero"]] / counted
        out[:, :, _I["zero_fraction"]] = np.where(ok & unit_slots[None, :], zf, np.nan)
        out[:, :, _I["full"]] = full
        skipped = (np.isfinite(rows.scale[:, 0]) & np.isfinite(rows.scale[:, 1]) & (rows.scale[:, 1] < rows.scale[:, 0])
                   ) if rows.scale.size else np.zeros(n, bool)
        out[:, :, _I["skipped"]] = skipped[:, None]
    return Derived(rows.steps.copy(), out, rows.order, *derive_params(rows.params))


def derive_params(sq: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """Sums of squares (:data:`~lit_probe.stats.PARAM_COLUMNS`, -1 where not measured) -> the norms and the
    update ratio (NaN where not measured), and where each was measured (a measured NaN is a finding)."""
    if sq is None:
        return None, None
    sq = sq.astype(np.float64)
    if sq.shape[-1] < len(PARAM_STATS):  # rows without the max-abs columns: not measured
        sq = np.concatenate([sq, np.full(sq.shape[:-1] + (len(PARAM_STATS) - sq.shape[-1],), -1.0)], axis=-1)
    measured = sq != -1.0
    with np.errstate(all="ignore"):
        norms = np.sqrt(np.where(measured[..., :3], sq[..., :3], np.nan))
        w, d = norms[..., 0], norms[..., 2]
        # zero weights (a zero-initialised head): not a ratio; nor an overflowed float32 norm (inf)
        ratio = np.where((w > 0) & np.isfinite(w) & np.isfinite(d), d / w, np.nan)
        absmax = np.where(measured[..., 3:], sq[..., 3:], np.nan)
    return np.concatenate([np.stack([w, norms[..., 1], ratio], axis=-1), absmax], axis=-1), measured


def nonfinite_flags(d: Derived) -> np.ndarray:
    """``[n, slots]`` True where a slot saw NaN or Inf at that step (exact, measured every step, judged by the
    elements' min and max, never by a sum or a norm that may overflow). A NaN element makes both NaN, +inf the
    max, -inf the min; a NaN min beside a finite max is a min that was not measured."""
    flags = d.memo.get("nonfinite")
    if flags is None:
        mn, mx, calls = d.get("min"), d.get("max"), d.get("calls")
        with np.errstate(invalid="ignore"):
            flags = d.memo["nonfinite"] = (calls > 0) & (~np.isfinite(mx) | np.isinf(mn))
    return flags


class History:
    """Bounded per-step history of every stream, and the latest measured value of each statistic.

    :meth:`append` keeps :meth:`latest` up to date as rows arrive, so a log step costs O(streams), whatever
    ``capacity`` is and however long training has run; only :meth:`window` (figure steps, the flight
    recorder) reads the ring.

    Args:
        names: one name per slot (a list the owner may extend as new streams appear).
        capacity: steps kept on the host; older steps are dropped (bounded memory).
    """

    def __init__(self, names: list[str], capacity: int = 1000) -> None:
        self.names = names
        self.capacity = max(1, int(capacity))
        self._slots = 0
        self._steps = np.full(self.capacity, -1, dtype=np.int64)
        self._values = np.full((self.capacity, 0, len(STATS)), np.nan, dtype=np.float32)
        self._latest = np.full((0, len(STATS)), np.nan)
        self.params_latest = np.full((0, len(PARAM_STATS)), np.nan)  # per module with parameters
        self._n = 0  # total rows appended
        self._ensure(len(names))

    def _ensure(self, slots: int) -> None:
        if slots <= self._slots:
            return
        grow = slots - self._slots
        self._values = np.concatenate(
            [self._values, np.full((self.capacity, grow, len(STATS)), np.nan, dtype=np.float32)], axis=1)
        self._latest = np.concatenate([self._latest, np.full((grow, len(STATS)), np.nan)], axis=0)
        self._slots = slots

    def append(self, d: Derived) -> None:
        n, slots = d.values.shape[:2]
        self._ensure(slots)
        if d.params is not None and d.params.size:
            if self.params_latest.shape[0] != d.params.shape[1]:
                self.params_latest = np.full((d.params.shape[1], len(PARAM_STATS)), np.nan)
            for row in d.params:
                known = ~np.isnan(row)
                self.params_latest[known] = row[known]
        for i in range(n):
            k = self._n % self.capacity
            self._steps[k] = d.steps[i]
            self._values[k, :slots] = d.values[i]
            self._values[k, slots:] = np.nan
            known = ~np.isnan(d.values[i])
            self._latest[:slots][known] = d.values[i][known]
            self._n += 1

    def __len__(self) -> int:
        return min(self._n, self.capacity)

    def window(self, last: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The kept steps (oldest first) and their values ``[n, slots, len(STATS)]`` (copies)."""
        n = len(self)
        if last is not None:
            n = min(n, last)
        idx = (np.arange(self._n - n, self._n)) % self.capacity
        return self._steps[idx], self._values[idx]

    def latest(self, stat: str) -> np.ndarray:
        """The most recent measured value of ``stat`` for every slot (NaN where never measured); O(slots)."""
        return self._latest[:, _I[stat]]

    def to_csv(self, last: int | None = None) -> str:
        """The kept history as CSV (the flight recorder): step, stream, statistics."""
        steps, values = self.window(last)
        lines = ["step,stream," + ",".join(STATS)]
        for i, s in enumerate(steps):
            for j, name in enumerate(self.names[:values.shape[1]]):
                row = values[i, j]
                if np.isnan(row[0]) or row[0] == 0:
                    continue
                lines.append(f"{int(s)},{name}," + ",".join("" if np.isnan(v) else f"{v:.6g}" for v in row))
        return "\n".join(lines) + "\n"
