"""Stats
=====

The hot path: reductions of activations and gradients into a small, preallocated ring buffer on the
tensor's device. Nothing here reads a value back to the host, branches on a tensor value, or allocates
memory that grows with the number of steps. The host reads the whole buffer in one copy per log step
(:meth:`StatBuffer.read`).

Two tiers of work per observed tensor:

* **sentinel** (every training step): ``min`` and ``max`` in one fused pass (``torch.aminmax``). That
  alone catches non-finite values (NaN and Inf propagate through min/max exactly) and explosions
  (``absmax``), at the exact step, in every probed layer.
* **full** (every ``every_n_steps`` steps): also the sum and the L2 norm, the per-channel maximum that
  feeds the dead-unit windows (activations), and the counts of non-finite and of non-zero values. The
  two counts need a written temporary, so they are taken on the first samples of the batch, at least
  ``COUNT_CAP`` elements (the whole tensor when it is smaller): zero fractions are estimated from a large
  sample, while the non-finite *flag* (from min/max) always covers every element.

Device columns of the ring buffer, per (step row, slot):

========== ======================================= =================
column     meaning                                  combine over calls
========== ======================================= =================
nonfinite  count of NaN/Inf elements                add
nonzero    count of non-zero elements               add
sum        sum of the elements                      add
l2         Euclidean norm of the elements           hypot
min        minimum                                  min
max        maximum                                  max
========== ======================================= =================

The host keeps, per (row, slot), the number of calls, of elements and of full calls, and the order in
which slots were first seen in the step (forward order for activations, backward order for gradients).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["COLUMNS", "StatBuffer", "HostRows", "channel_dim_for"]

COLUMNS = ("nonfinite", "nonzero", "sum", "l2", "min", "max")
_NF, _NZ, _SUM, _L2, _MIN, _MAX = range(6)
_FLOATS = (torch.float32, torch.float64)
#: Elements (at least) over which the non-finite and non-zero counts are taken on full steps.
COUNT_CAP = 65536


def channel_dim_for(ndim: int, conv_like: bool) -> int:
    """The dimension that holds units: 1 for conv-like outputs ([N, C, ...]), else the last one."""
    if ndim <= 1:
        return 0
    if ndim >= 4 or (ndim == 3 and conv_like):
        return 1
    return ndim - 1


@dataclass
class HostRows:
    """What the host knows of some step rows, after one device-to-host copy.

    ``dev`` is ``[n, slots, 6]`` (the device columns), the others are ``[n, slots]``.
    """

    steps: np.ndarray
    dev: np.ndarray
    calls: np.ndarray
    numel: np.ndarray
    full: np.ndarray
    order: list[list[int]]
    counted: np.ndarray  # [n, slots] elements the counts (nonfinite, nonzero) were taken over
    scale: np.ndarray  # [n, 2] loss scale at step start / end (NaN when no scaler)


class StatBuffer:
    """Ring buffer of per-step statistics for ``slots`` observed streams (layer x signal).

    Args:
        slots: number of streams.
        rows: ring capacity in steps; the owner must :meth:`read` before it wraps.
    """

    def __init__(self, slots: int, rows: int) -> None:
        self.slots = slots
        self.rows = max(2, int(rows))
        self.device: torch.device | None = None
        self._buf: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None
        self._step_t: torch.Tensor | None = None
        self.calls = np.zeros((self.rows, slots), dtype=np.int64)
        self.numel = np.zeros((self.rows, slots), dtype=np.int64)
        self.full = np.zeros((self.rows, slots), dtype=np.int64)
        self.counted = np.zeros((self.rows, slots), dtype=np.int64)
        self.steps = np.full(self.rows, -1, dtype=np.int64)
        self.order: list[list[int]] = [[] for _ in range(self.rows)]
        # per-slot channel state (dead-unit windows): last step each unit fired, first step it was seen
        self.last_fired: dict[int, torch.Tensor] = {}
        self.first_seen: dict[int, int] = {}
        self._bad_channels: set[int] = set()
        self.row = 0
        self.step = -1
        self._pending: list[int] = []  # rows written since the last read, oldest first
        self._zero_pending = False

    # ------------------------------------------------------------------ step control (host only)
    def begin_step(self, step: int) -> None:
        """Start a new row for ``step`` (no-op if ``step`` is the current one, e.g. gradient accumulation)."""
        if step == self.step and self._pending:
            return
        if len(self._pending) >= self.rows:
            raise RuntimeError("StatBuffer overflow: read() must be called before the ring wraps")
        self.step = step
        self.row = (self._pending[-1] + 1) % self.rows if self._pending else self.row
        r = self.row
        self.calls[r] = 0
        self.numel[r] = 0
        self.full[r] = 0
        self.counted[r] = 0
        self.order[r] = []
        self.steps[r] = step
        self._pending.append(r)
        if self._buf is not None:
            self._reset_row(r)
        else:
            self._zero_pending = True

    @property
    def pending(self) -> int:
        """Rows written since the last :meth:`read`."""
        return len(self._pending)

    def _reset_row(self, r: int) -> None:
        buf = self._buf
        assert buf is not None
        buf[r, :, :_L2 + 1].zero_()
        buf[r, :, _MIN].fill_(math.inf)
        buf[r, :, _MAX].fill_(-math.inf)
        self._scale[r].fill_(math.nan)  # type: ignore[index]
        self._step_t.fill_(float(self.step))  # type: ignore[union-attr]

    def _alloc(self, device: torch.device) -> None:
        with torch.inference_mode(False):  # buffers made inside validation must stay usable in training
            self._alloc_on(device)

    def _alloc_on(self, device: torch.device) -> None:
        self.device = device
        self._buf = torch.zeros((self.rows, self.slots, len(COLUMNS)), dtype=torch.float32, device=device)
        self._scale = torch.full((self.rows, 2), math.nan, dtype=torch.float32, device=device)
        self._step_t = torch.zeros((), dtype=torch.float32, device=device)
        self.last_fired = {s: t.to(device) for s, t in self.last_fired.items()}  # restored from a checkpoint
        if self._zero_pending:
            for r in self._pending:
                self._reset_row(r)
            self._zero_pending = False

    # ------------------------------------------------------------------ hot path
    def observe(self, slot: int, t: torch.Tensor, full: bool, channel_dim: int | None = None) -> None:
        """Reduce ``t`` into the current row. ``channel_dim`` set: also track per-unit activity."""
        if self._buf is None:
            self._alloc(t.device)
        if not self._pending:
            return
        r = self.row
        buf = self._buf
        assert buf is not None
        if t.device != self.device:
            t = t.to(self.device, non_blocking=True)  # model-parallel: keep the one buffer
        if t.dtype not in _FLOATS:
            t = t.float()  # statistics in float32: fp16/bf16 sums overflow or lose precision
        if t.dim() == 0:
            t = t.reshape(1)
        first = self.calls[r, slot] == 0
        if first:
            self.order[r].append(slot)
        self.calls[r, slot] += 1
        self.numel[r, slot] += t.numel()
        row = buf[r, slot]
        if first:
            torch.aminmax(t, out=(row[_MIN], row[_MAX]))
        else:
            mn, mx = torch.aminmax(t)
            torch.minimum(row[_MIN], mn, out=row[_MIN])
            torch.maximum(row[_MAX], mx, out=row[_MAX])
        if not full:
            return
        self.full[r, slot] += 1
        dims = tuple(range(t.dim()))
        n = t.numel()
        head = t if n <= COUNT_CAP or t.dim() < 2 else t[:max(1, -(-COUNT_CAP * t.shape[0] // n))]
        self.counted[r, slot] += head.numel()
        hdims = tuple(range(head.dim()))
        if first and self.full[r, slot] == 1:
            torch.sum(head.mul(0).nan_to_num_(1.0), dim=hdims, out=row[_NF])  # 0 if finite, NaN*0/Inf*0 -> 1
            if channel_dim is not None:
                torch.sum(head.sign().abs_(), dim=hdims, out=row[_NZ])
            torch.sum(t, dim=dims, out=row[_SUM])
            torch.linalg.vector_norm(t, out=row[_L2])
        else:
            row[_NF] += head.mul(0).nan_to_num_(1.0).sum()
            if channel_dim is not None:
                row[_NZ] += head.sign().abs_().sum()
            row[_SUM] += t.sum()
            torch.hypot(row[_L2], torch.linalg.vector_norm(t), out=row[_L2])
        if channel_dim is not None and slot not in self._bad_channels:
            self._track_units(slot, t, channel_dim)

    def _track_units(self, slot: int, t: torch.Tensor, cdim: int) -> None:
        # per-unit maximum: reduce the contiguous trailing dims first (fast), then the rest
        if cdim == t.dim() - 1:
            per_unit = t.reshape(-1, t.shape[-1]).amax(0)
        else:
            per_unit = t.flatten(cdim + 1).amax(-1) if t.dim() > cdim + 1 else t
            per_unit = per_unit.reshape(-1, t.shape[cdim]).amax(0) if cdim > 0 else per_unit
        last = self.last_fired.get(slot)
        if last is None:
            with torch.inference_mode(False):
                last = torch.full((per_unit.numel(),), float(self.step), dtype=torch.float32,
                                  device=self.device)
            self.last_fired[slot] = last
            self.first_seen[slot] = self.step
        elif last.numel() != per_unit.numel():  # the unit count changes between calls: no per-unit tracking
            self._bad_channels.add(slot)
            self.last_fired.pop(slot, None)
            return
        # NaN is "not known", never "did not fire": a NaN step must not make every unit look dead later
        fired = (per_unit > 0).logical_or_(per_unit.isnan())
        torch.where(fired, self._step_t, last, out=last)  # type: ignore[arg-type]

    def record_scale(self, scale: torch.Tensor | float | None, end: bool) -> None:
        """Record the loss scale in force (GradScaler) for the current step (device copy, no sync)."""
        if self._scale is None or not self._pending or scale is None:
            return
        self._scale[self.row, int(end)].copy_(scale if isinstance(scale, torch.Tensor) else torch.tensor(scale),
                                               non_blocking=True)

    # ------------------------------------------------------------------ cold path
    def read(self) -> tuple[HostRows, dict[int, np.ndarray]]:
        """Copy every row written since the last read, and the unit windows, to the host in ONE copy."""
        rows = list(self._pending)
        # the current row stays open (gradient accumulation may add to it) only if the caller says so
        n = len(rows)
        slots = self.slots
        unit_slots = sorted(self.last_fired)
        if self._buf is None or n == 0:
            empty = np.zeros((0, slots, len(COLUMNS)), dtype=np.float32)
            host = HostRows(np.zeros(0, np.int64), empty, np.zeros((0, slots), np.int64),
                            np.zeros((0, slots), np.int64), np.zeros((0, slots), np.int64), [],
                            np.zeros((0, slots), np.int64), np.zeros((0, 2), np.float32))
            self._pending = []
            return host, {}
        idx = torch.as_tensor(rows, device=self.device)
        parts = [self._buf.index_select(0, idx).reshape(-1), self._scale.index_select(0, idx).reshape(-1)]  # type: ignore[union-attr]
        parts += [self.last_fired[s] for s in unit_slots]
        flat = torch.cat(parts).cpu().numpy()  # the one device->host copy
        off = n * slots * len(COLUMNS)
        dev = flat[:off].reshape(n, slots, len(COLUMNS))
        scale = flat[off:off + 2 * n].reshape(n, 2)
        off += 2 * n
        units = {}
        for s in unit_slots:
            k = self.last_fired[s].numel()
            units[s] = flat[off:off + k].copy()
            off += k
        host = HostRows(self.steps[rows].copy(), dev, self.calls[rows].copy(), self.numel[rows].copy(),
                        self.full[rows].copy(), [list(self.order[r]) for r in rows], self.counted[rows].copy(),
                        scale)
        self._pending = []
        return host, units

    def release(self) -> None:
        """Drop the device buffers (after a run); a later step allocates them again."""
        self._buf = self._scale = self._step_t = None
        self.device = None
        self.last_fired = {}
        self._pending = []
        self.step = -1

    def state_dict(self) -> dict:
        """Unit windows as plain lists (weights_only-safe)."""
        return {"last_fired": {int(s): t.detach().cpu().tolist() for s, t in self.last_fired.items()},
                "first_seen": {int(s): int(v) for s, v in self.first_seen.items()}}

    def load_state_dict(self, state: dict, device: torch.device | None = None) -> None:
        dev = device or self.device or torch.device("cpu")
        self.last_fired = {int(s): torch.tensor(v, dtype=torch.float32, device=dev)
                           for s, v in state.get("last_fired", {}).items()}
        self.first_seen = {int(s): int(v) for s, v in state.get("first_seen", {}).items()}

    def to(self, device: torch.device) -> None:
        """Move the unit windows (e.g. restored from a checkpoint) to the training device."""
        self.last_fired = {s: t.to(device) for s, t in self.last_fired.items()}
