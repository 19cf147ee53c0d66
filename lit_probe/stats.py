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
  sample, while the non-finite *flag* (from min/max) always covers every element. The sum and the L2 norm
  are float32 and can overflow while every element is finite: nothing judges "non-finite" by them.
* **units** (every step, for the streams whose dead units are judged, ReLU-like ones:
  ``observe(..., watch_units=True)``): the per-unit maximum, written by one reduction (``amax(..., out=)``)
  straight into a small device ring ``[UNIT_ROWS, units]`` of the stream. On a step without full statistics
  that one reduction *is* the stream's sentinel too: its max is the max of the per-unit maxima (folded in by
  ``commit``, one scatter per step for all such streams), and its min is not measured (a ReLU-like output has
  no negative value; NaN and +inf propagate through the maxima): the min column holds a placeholder and
  :attr:`HostRows.minless` says so. Every ``UNIT_ROWS`` steps (and at a read) the ring becomes each unit's
  last step with a positive value (:attr:`StatBuffer.last_fired`: a few kernels per stream, off the hooks).
  The host keeps the steps on which each stream's units were measured (:attr:`StatBuffer.unit_steps`), so a
  window is counted in measured steps. Other streams track units on full steps only.

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

Parameters (the ``"parameter"`` signal) have a ring of their own in the same buffer and the same copy: per
(step row, module that owns parameters) the sums of squares of its weights (before the optimizer step), of
their gradients, and of the update ``W_after - W_before``, added by one ``index_add_`` per optimizer step from
fused multi-tensor norms, and the largest absolute weight and gradient element (one fused max-abs norm, folded
in by ``scatter_reduce_``), which cannot overflow: it says whether the elements are finite when a float32 sum of
squares overflows (:data:`PARAM_COLUMNS`, :mod:`lit_probe.params`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

__all__ = ["COLUMNS", "PARAM_COLUMNS", "StatBuffer", "HostRows", "RankRows", "pack_rows", "merge_ranks"]

COLUMNS = ("nonfinite", "nonzero", "sum", "l2", "min", "max")
#: Per (row, module with parameters): sums of squares of weights, parameter gradients and the update (added),
#: then the largest |weight| and |gradient| element (max over calls).
PARAM_COLUMNS = ("weight_sq", "grad_sq", "update_sq", "weight_max", "grad_max")
#: The parameter columns combined by a maximum (the others add).
PARAM_MAX_COLUMNS = (3, 4)
#: Version of :meth:`StatBuffer.state_dict` (1: no version key, no ``unit_steps``).
STATE_VERSION = 2
#: Steps the per-unit ring of a watched stream holds before it is folded into the last-fired steps.
UNIT_ROWS = 16
_NF, _NZ, _SUM, _L2, _MIN, _MAX = range(6)
_FLOATS = (torch.float32, torch.float64)
_FMAX = float(np.finfo(np.float64).max)
#: Elements (at least) over which the non-finite and non-zero counts are taken on full steps.
COUNT_CAP = 65536


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
    params: np.ndarray | None = None  # [n, modules, len(PARAM_COLUMNS)], -1 where not measured at that step
    minless: np.ndarray | None = None  # [n, slots] True where the min was not measured (a placeholder is there)

    def first_slots(self, k: int) -> "HostRows":
        """The rows restricted to slots ``[0, k)`` (the buffer keeps spare room for new streams)."""
        return HostRows(self.steps, self.dev[:, :k], self.calls[:, :k], self.numel[:, :k], self.full[:, :k],
                        [[s for s in o if s < k] for o in self.order], self.counted[:, :k], self.scale,
                        self.params, None if self.minless is None else self.minless[:, :k])


class StatBuffer:
    """Ring buffer of per-step statistics for ``slots`` observed streams (layer x signal).

    Args:
        slots: number of streams.
        rows: ring capacity in steps; the owner must :meth:`read` before it wraps.
    """

    def __init__(self, slots: int, rows: int) -> None:
        self.slots = int(slots)
        self.rows = max(2, int(rows))
        self.device: torch.device | None = None
        self._buf: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None
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
        # watched unit slots: a device ring [UNIT_ROWS, units] of each step's per-unit maximum (-inf: not measured)
        # and its row views (made once: no view op in a hook); the ring row of this step, the step of each ring
        # row (device, for the fold), what each slot wrote last ((cycle, row)); the steps each unit slot was
        # measured on (host)
        self._uring: dict[int, torch.Tensor] = {}
        self._uviews: dict[int, list[torch.Tensor]] = {}
        self._ustep: torch.Tensor | None = None
        self._upos = 0
        self._ur = -1
        self._ucycle = 0
        self._uwrote: dict[int, tuple[int, int]] = {}
        self._sent_units: list[int] = []  # watched slots whose sentinel this step is their ring row (commit)
        self._unit_index: dict[tuple, torch.Tensor] = {}
        self._udims: dict[tuple[int, int], tuple[int, ...]] = {}
        self._wplans: dict[int, list] = {}  # slot -> its _watch_plan (shape, dtype, ring views, kernels)
        self._umark: tuple[int, int] | None = None  # (_ucycle, _ur) of the current unit ring row
        self.minless = np.zeros((self.rows, slots), dtype=bool)
        self.unit_steps: dict[int, list[int]] = {}
        #: measured steps kept per unit slot (the session sets it to cover its dead window and ring)
        self.unit_steps_kept = 4096
        self.row = 0
        self.step = -1
        self._pending: list[int] = []  # rows written since the last read, oldest first
        self._sent_min: list[torch.Tensor] = []  # this step's 0-d minima / maxima, folded in by commit()
        self._sent_max: list[torch.Tensor] = []
        self._sent_slot: list[int] = []
        # a full step's sums, L2 norms (0-d, per call) and nonzero counts: folded in by commit() with one index_add_
        # per column, not a row view and an in-place add per tensor
        self._full_slot: list[int] = []
        self._full_sum: list[torch.Tensor] = []
        self._full_l2: list[torch.Tensor] = []
        self._nz_slot: list[int] = []
        self._nz: list[torch.Tensor] = []
        # float32 tensors (the common case) write their min/max straight into a preallocated [2, capacity] buffer
        # (0-d views made once): no list of 0-d results and no stack in commit(); on the CPU it is also host memory
        # (`_shost`, a numpy view), so a full step reads its min/max without a tensor read
        self._sbuf: torch.Tensor | None = None
        self._shost: np.ndarray | None = None
        self._sviews: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._fast_slot: list[int] = []
        self._fast_idx: tuple[list[int], torch.Tensor] | None = None
        self._fast_need = 0
        # this row's host bookkeeping per slot, [calls, numel, full calls, counted]: plain Python in the hooks,
        # written to the numpy arrays by commit() (idempotent: it assigns the row's totals)
        self._tally: dict[int, list[int]] = {}
        self._tally_new = False  # a tally changed since the last commit
        self._dev_key: int | None = None  # Tensor.get_device() of the buffers' device (-1: CPU)
        self._zero_pending = False
        self._blank: torch.Tensor | None = None  # what _reset_row copies into a row
        self._host_views: tuple | None = None  # CPU: the buffers and numpy views of them (peek)
        self.params = 0  # modules with parameters (ensure_params)
        self._pbuf: torch.Tensor | None = None
        self.pmeasured = np.zeros((self.rows, 0, len(PARAM_COLUMNS)), dtype=np.int64)

    def ensure_params(self, modules: int) -> None:
        """Room for the parameter statistics of ``modules`` modules (set once, before the first step)."""
        if modules <= self.params:
            return
        self.params = int(modules)
        self.pmeasured = np.zeros((self.rows, self.params, len(PARAM_COLUMNS)), dtype=np.int64)
        if self._buf is not None:
            with torch.inference_mode(False):
                self._pbuf = torch.zeros((self.rows, self.params, len(PARAM_COLUMNS)), dtype=torch.float32,
                                         device=self.device)

    def ensure_slots(self, slots: int) -> None:
        """Make room for ``slots`` streams (a new module call seen). Grows by half at least, so it happens a few
        times in the first steps of a run, never per step."""
        if slots <= self.slots:
            return
        new = max(slots, self.slots + self.slots // 2 + 8)
        grow = new - self.slots
        for name in ("calls", "numel", "full", "counted", "minless"):
            arr = getattr(self, name)
            setattr(self, name, np.concatenate([arr, np.zeros((self.rows, grow), dtype=arr.dtype)], axis=1))
        if self._buf is not None:
            with torch.inference_mode(False):
                extra = torch.zeros((self.rows, grow, len(COLUMNS)), dtype=torch.float32, device=self.device)
                extra[:, :, _MIN] = math.inf
                extra[:, :, _MAX] = -math.inf
                self._buf = torch.cat([self._buf, extra], dim=1)
        self.slots = new

    # ------------------------------------------------------------------ step control (host only)
    def begin_step(self, step: int) -> None:
        """Start a new row for ``step`` (no-op if ``step`` is the current one, e.g. gradient accumulation)."""
        if step == self.step and self._pending:
            return
        self.commit()  # the previous row's min/max, before the row changes
        if len(self._pending) >= self.rows:
            raise RuntimeError("StatBuffer overflow: read() must be called before the ring wraps")
        self.step = step
        self.row = (self._pending[-1] + 1) % self.rows if self._pending else self.row
        r = self.row
        self._tally = {}
        self.calls[r] = 0
        self.numel[r] = 0
        self.full[r] = 0
        self.counted[r] = 0
        self.order[r] = []
        self.pmeasured[r] = 0
        self.minless[r] = False
        self.steps[r] = step
        self._pending.append(r)
        if self._buf is not None:
            self._reset_row(r)
        else:
            self._zero_pending = True
        self._ur = -1
        if self._uring:
            self._next_unit_row()

    def _next_unit_row(self) -> None:
        """The unit ring row of the current step (folding a full ring first): one fill, no host sync."""
        if self._upos >= UNIT_ROWS:
            self._fold_units(reset=True)
        self._ur = self._upos
        self._umark = (self._ucycle, self._ur)  # what _uwrote holds for a slot written in this row
        self._upos += 1
        assert self._ustep is not None
        self._ustep[self._ur].fill_(float(self.step))

    @property
    def pending(self) -> int:
        """Rows written since the last :meth:`read`."""
        return len(self._pending)

    def _reset_row(self, r: int) -> None:
        buf = self._buf
        assert buf is not None
        blank = self._blank
        if blank is None or blank.shape[0] != buf.shape[1]:  # an empty row: counts and sums 0, min +inf, max -inf
            with torch.inference_mode(False):
                blank = self._blank = torch.zeros(buf.shape[1:], dtype=buf.dtype, device=buf.device)
                blank[:, _MIN] = math.inf
                blank[:, _MAX] = -math.inf
        buf[r].copy_(blank)  # one kernel
        self._scale[r].fill_(math.nan)  # type: ignore[index]
        if self._pbuf is not None:
            self._pbuf[r].zero_()

    def _alloc(self, device: torch.device) -> None:
        with torch.inference_mode(False):  # buffers made inside validation must stay usable in training
            self._alloc_on(device)

    def _alloc_on(self, device: torch.device) -> None:
        self.device = device
        self._dev_key = torch.empty(0, device=device).get_device()
        self._buf = torch.zeros((self.rows, self.slots, len(COLUMNS)), dtype=torch.float32, device=device)
        self._scale = torch.full((self.rows, 2), math.nan, dtype=torch.float32, device=device)
        if self.params:
            self._pbuf = torch.zeros((self.rows, self.params, len(PARAM_COLUMNS)), dtype=torch.float32,
                                     device=device)
        self.last_fired = {s: t.to(device) for s, t in self.last_fired.items()}  # restored from a checkpoint
        if self._zero_pending:
            for r in self._pending:
                self._reset_row(r)
            self._zero_pending = False

    def commit(self) -> None:
        """Fold the step's pending min/max values into the current row (a few kernels, no host sync), and the
        host bookkeeping of its calls."""
        if self._tally_new:  # one assignment per column for every slot (not four numpy item writes per slot)
            self._tally_new = False
            r = self.row
            k = len(self._tally)
            slots = np.fromiter(self._tally.keys(), dtype=np.int64, count=k)
            tally = np.fromiter(chain.from_iterable(self._tally.values()), dtype=np.int64, count=4 * k).reshape(k, 4)
            self.calls[r, slots] = tally[:, 0]
            self.numel[r, slots] = tally[:, 1]
            self.full[r, slots] = tally[:, 2]
            self.counted[r, slots] = tally[:, 3]
        if self._buf is None:
            self._sent_min, self._sent_max, self._sent_slot, self._sent_units = [], [], [], []
            self._fast_slot = []
            self._drop_full()
            return
        row = self._buf[self.row]
        if self._full_slot:
            self._fold_full(row)
        if self._sent_slot:
            k = len(self._sent_slot)
            vals = torch.stack(self._sent_min + self._sent_max).to(torch.float32)
            idx = torch.tensor(self._sent_slot, dtype=torch.int64).to(self.device, non_blocking=True)
            row[:, _MIN].scatter_reduce_(0, idx, vals[:k], "amin")  # NaN propagates, as min/max do
            row[:, _MAX].scatter_reduce_(0, idx, vals[k:], "amax")
        if self._fast_slot:
            k = len(self._fast_slot)
            if self._fast_idx is None or self._fast_idx[0] != self._fast_slot:
                self._fast_idx = (self._fast_slot, torch.tensor(self._fast_slot, dtype=torch.int64).to(
                    self.device, non_blocking=True))
            idx = self._fast_idx[1]
            sbuf = self._sbuf
            assert sbuf is not None
            row[:, _MIN].scatter_reduce_(0, idx, sbuf[0, :k], "amin")
            row[:, _MAX].scatter_reduce_(0, idx, sbuf[1, :k], "amax")
            self._fast_slot = []
        if self._fast_need > len(self._sviews):
            self._grow_sentinel(self._fast_need)
        self._fast_need = 0
        if self._sent_units and self._ur >= 0:
            # watched streams without full statistics: max = the max of their per-unit maxima (one scatter for
            # all); the min column gets a placeholder (the least per-unit maximum), flagged in `minless`
            slots = tuple(self._sent_units)
            views = [self._uviews[s][self._ur] for s in slots]
            key = (slots, tuple(v.numel() for v in views))
            idx = self._unit_index.get(key)
            if idx is None:
                if len(self._unit_index) > 64:
                    self._unit_index.clear()
                idx = self._unit_index[key] = torch.as_tensor(
                    np.repeat(np.asarray(slots, np.int64), [v.numel() for v in views]), device=self.device)
            vals = torch.cat([v.to(torch.float32) for v in views]) if len({v.dtype for v in views}) > 1 \
                else torch.cat(views).to(torch.float32)
            row[:, _MAX].scatter_reduce_(0, idx, vals, "amax")
            row[:, _MIN].scatter_reduce_(0, idx, vals, "amin")
        self._sent_min, self._sent_max, self._sent_slot, self._sent_units = [], [], [], []

    def _fold_full(self, row: torch.Tensor) -> None:
        """Add the staged sums and sums of squares (float64: a float32 square overflows beyond 1.8e19) to the row:
        L2 = sqrt(L2 already in the row ** 2 + the new squares); the nonzero counts likewise."""
        idx = torch.tensor(self._full_slot, dtype=torch.int64).to(self.device, non_blocking=True)
        acc = torch.zeros((row.shape[0], 2), dtype=torch.float64, device=row.device)
        acc[:, 0].index_add_(0, idx, torch.stack(self._full_sum).to(torch.float64))
        acc[:, 1].index_add_(0, idx, torch.stack(self._full_l2).to(torch.float64).square_())
        row[:, _SUM] += acc[:, 0]
        row[:, _L2] = row[:, _L2].to(torch.float64).square_().add_(acc[:, 1]).sqrt_()
        if self._nz_slot:
            idx = torch.tensor(self._nz_slot, dtype=torch.int64).to(self.device, non_blocking=True)
            row[:, _NZ].index_add_(0, idx, torch.stack(self._nz).to(row.dtype))
        self._drop_full()

    def _drop_full(self) -> None:
        self._full_slot, self._full_sum, self._full_l2, self._nz_slot, self._nz = [], [], [], [], []

    def _grow_sentinel(self, need: int) -> None:
        """Room for ``need`` float32 min/max pairs a step (between steps: commit() has read the old buffer)."""
        cap = max(64, need + need // 2)
        with torch.inference_mode(False):
            if self.device is not None and self.device.type == "cpu":
                self._shost = np.zeros((2, cap), np.float32)
                self._sbuf = torch.from_numpy(self._shost)
            else:
                self._shost = None
                self._sbuf = torch.zeros((2, cap), dtype=torch.float32, device=self.device)
            self._sviews = [(self._sbuf[0, i], self._sbuf[1, i]) for i in range(cap)]

    def peek(self) -> tuple[int, torch.Tensor, object] | None:
        """Start copying the current row's min/max to the host without waiting (``on_finding="raise"/"stop"``).

        Returns:
            ``(step, host copy [2 * slots + 1], event)``: the row's min/max per slot and the loss scale in force;
            on CUDA a pinned, non-blocking copy and an event recorded after it (check it a step later:
            :meth:`alarm`); elsewhere a plain copy (``event`` None).
        """
        if self._buf is None or not self._pending:
            return None
        self.commit()
        if self.device is not None and self.device.type == "cpu":  # the buffers are host memory: read them in place
            views = self._host_views
            if views is None or views[0] is not self._buf or views[1] is not self._scale:
                views = self._host_views = (self._buf, self._scale, self._buf.numpy(), self._scale.numpy())
            row = views[2][self.row]
            flat = np.empty(2 * len(row) + 1)
            flat[:-1].reshape(-1, 2)[:] = row[:, _MIN:_MAX + 1]
            flat[-1] = views[3][self.row, 0]
            return self.step, torch.from_numpy(flat), None
        mm = torch.cat([self._buf[self.row, :, _MIN:_MAX + 1].reshape(-1), self._scale[self.row, :1]])  # type: ignore[index]
        if self.device is not None and self.device.type == "cuda":
            host = torch.empty(mm.shape, dtype=mm.dtype, pin_memory=True)
            host.copy_(mm, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return self.step, host, event
        return self.step, mm.to("cpu"), None

    @staticmethod
    def alarm(peeked: tuple[int, torch.Tensor, object], bound: float | np.ndarray,
              grad_slots: np.ndarray | None = None) -> bool:
        """Whether a :meth:`peek` copy shows a non-finite value or one beyond ``bound`` (a number, or one per
        slot: slots beyond it use its last value); ``grad_slots`` are divided by the loss scale in force first
        (a GradScaler's scaled gradients are not an explosion). Waits only for that copy, issued a step earlier
        on CUDA."""
        _, host, event = peeked
        if event is not None:
            event.synchronize()  # type: ignore[attr-defined]
        flat = host.numpy()
        if flat.dtype != np.float64:
            flat = flat.astype(np.float64)
        scale, mm = flat[-1], flat[:-1].reshape(-1, 2)
        n = len(mm)
        if grad_slots is not None and np.isfinite(scale) and scale > 0:
            g = np.zeros(n, bool)
            g[:min(n, len(grad_slots))] = grad_slots[:n]
            mm[g] /= scale
        b = np.asarray(bound, dtype=np.float64).reshape(-1)
        if b.size != n:
            b = np.concatenate([b[:n], np.full(max(0, n - b.size), b[-1])])
        # within the bound and finite: NaN compares False, and an infinite bound still flags an Inf (the largest
        # finite float)
        ok = np.abs(mm).max(axis=1) <= np.minimum(b, _FMAX)
        if ok.all():
            return False
        untouched = (mm[:, 0] == np.inf) & (mm[:, 1] == -np.inf)  # a slot nothing observed this step
        return bool((~ok & ~untouched).any())

    # ------------------------------------------------------------------ hot path
    def observe(self, slot: int, t: torch.Tensor, full: bool, channel_dim: int | None = None,
                watch_units: bool = False, n: int = -1) -> None:
        """Reduce ``t`` into the current row. ``channel_dim`` set: also track per-unit activity on that dimension
        (the caller asks :func:`lit_probe.vocab.unit_dim`, the one owner of the unit axis), on full steps, or on
        every step with ``watch_units`` (the streams judged for dead units: one more reduction per step). ``n``:
        ``t.numel()`` when the caller knows it already."""
        if self._buf is None:
            self._alloc(t.device)
        if not self._pending:
            return
        r = self.row
        buf = self._buf
        assert buf is not None
        if t.get_device() != self._dev_key and t.device != self.device:
            t = t.to(self.device, non_blocking=True)  # model-parallel: keep the one buffer
        if n < 0:
            n = t.numel()
        if n == 1 and t.dim() == 0:
            t = t.reshape(1)
        tally = self._tally.get(slot)
        if tally is None:
            self.order[r].append(slot)
            tally = self._tally[slot] = [1, n, 0, 0]
        else:
            tally[0] += 1
            tally[1] += n
        self._tally_new = True
        track = channel_dim is not None and slot not in self._bad_channels
        if track and watch_units and self._watch_units(slot, t, channel_dim, sentinel=not full):
            return  # a step without full statistics: the per-unit maxima were the sentinel
        # min/max are exact in the tensor's own dtype (bf16/fp16 are never copied to float32 in full); the 0-d
        # results wait in a list and go into the ring in one scatter per step (commit): one kernel per tensor
        k = len(self._fast_slot)
        if k < len(self._sviews) and t.dtype == torch.float32 and not (t.requires_grad and torch.is_grad_enabled()):
            mn, mx = views = self._sviews[k]
            torch.aminmax(t, out=views)
            self._fast_slot.append(slot)
        else:
            if t.dtype == torch.float32:
                self._fast_need = max(self._fast_need, k + 1)
            mn, mx = torch.aminmax(t)
            self._sent_min.append(mn)
            self._sent_max.append(mx)
            self._sent_slot.append(slot)
        if track and full and not watch_units:
            self._track_units(slot, t, channel_dim)  # type: ignore[arg-type]
        if not full:
            return
        native = t.dtype in _FLOATS
        tally[2] += 1
        head = t if n <= COUNT_CAP or t.dim() < 2 else t[:max(1, -(-COUNT_CAP * t.shape[0] // n))]
        tally[3] += head.numel()
        # counts: x - x is 0 where finite and NaN where NaN/Inf, and count_nonzero counts NaN. On the CPU a
        # float32 min/max is in host memory already: both finite means no NaN/Inf anywhere (NaN propagates)
        shost = self._shost
        if shost is None or not self._fast_slot or self._fast_slot[-1] != slot or \
                not (math.isfinite(shost[0, k]) and math.isfinite(shost[1, k])):
            buf[r, slot, _NF] += torch.count_nonzero(head - head)
        if channel_dim is not None:
            self._nz.append(torch.count_nonzero(head))
            self._nz_slot.append(slot)
        acc = None if native else torch.float32  # sums accumulate in float32 without a float32 copy
        self._full_sum.append(t.sum(dtype=acc))
        self._full_l2.append(torch.linalg.vector_norm(t, dtype=acc))
        self._full_slot.append(slot)

    def _unit_start(self, slot: int, units: int) -> torch.Tensor | None:
        """The slot's last-fired steps (made at its first step: every unit at that step), or ``None`` when its
        unit count changed between calls (no per-unit tracking for it from then on)."""
        last = self.last_fired.get(slot)
        if last is None:
            with torch.inference_mode(False):
                last = torch.full((units,), float(self.step), dtype=torch.float32, device=self.device)
            self.last_fired[slot] = last
            self.first_seen[slot] = self.step
            self.unit_steps[slot] = []
        elif last.numel() != units:
            self._bad_channels.add(slot)
            self.last_fired.pop(slot, None)
            self._uring.pop(slot, None)
            self._uviews.pop(slot, None)
            self._wplans.pop(slot, None)
            self.unit_steps.pop(slot, None)
            return None
        return last

    def _measured_units(self, slot: int) -> None:
        steps = self.unit_steps.setdefault(slot, [])
        if not steps or steps[-1] != self.step:
            steps.append(self.step)
            if len(steps) > 2 * self.unit_steps_kept:
                del steps[:-self.unit_steps_kept]

    def _watch_units(self, slot: int, t: torch.Tensor, cdim: int, sentinel: bool) -> bool:
        """Per-unit maximum of ``t`` into the slot's ring row of this step: ONE reduction (``amax(out=)``) for the
        first call of a step. Returns whether that was the sentinel too (``sentinel``, first call: nothing else
        to do for ``t``); the caller takes min/max otherwise."""
        views = self._uviews.get(slot)
        plan = self._wplans.get(slot)
        if plan is None or plan[2] is not views or plan[0] != t.shape or plan[1] is not t.dtype:
            plan = self._watch_plan(slot, t, cdim)
            if plan is None:
                return False
            views = plan[2]
        if self._ur < 0:
            self._next_unit_row()
        view = views[self._ur]  # type: ignore[index]
        mark = self._umark
        first = self._uwrote.get(slot) != mark
        if first and plan[3]:
            mode = plan[4]
            if mode == 1:
                torch.amax(t, plan[5], out=view)
            elif mode == 2:
                # NCHW with a small H x W on the CPU: the strided reduction over (0, 2, 3) is 4-7x slower than
                # the batch first (contiguous slabs), then the few positions (same values, NaN kept)
                torch.amax(torch.amax(t, 0), plan[6], out=view)
            else:
                view.copy_(t)
        else:
            dims = plan[5]
            per_unit = torch.amax(t, dims) if dims else t
            if first:
                view.copy_(per_unit)
            else:  # another call in the same step: the maximum of both (NaN propagates: "not known")
                torch.maximum(view, per_unit.to(view.dtype), out=view)
        if not first:
            return sentinel and bool(self.minless[self.row, slot])
        self._uwrote[slot] = mark
        steps = self.unit_steps.get(slot)  # the steps this slot's units were measured on
        if steps is None:
            steps = self.unit_steps[slot] = []
        if not steps or steps[-1] != self.step:
            steps.append(self.step)
            if len(steps) > 2 * self.unit_steps_kept:
                del steps[:-self.unit_steps_kept]
        if sentinel and not self.minless[self.row, slot]:  # its min/max come from the ring row (commit)
            self.minless[self.row, slot] = True
            self._sent_units.append(slot)
        return sentinel

    def _watch_plan(self, slot: int, t: torch.Tensor, cdim: int) -> list | None:
        """What :meth:`_watch_units` needs of a slot's tensors of one shape and dtype, worked out once (its unit
        ring made if needed): ``[shape, dtype, ring views, same dtype as the ring, mode (0 copy, 1 one amax, 2 the
        batch first), reduced dims, the dims of mode 2's second amax]``; ``None`` when the slot's unit count
        changed (no per-unit tracking for it from then on)."""
        units = t.shape[cdim] if t.dim() else 1
        last = self.last_fired.get(slot)
        if (last is None or last.numel() != units) and self._unit_start(slot, units) is None:
            self._wplans.pop(slot, None)
            return None
        views = self._uviews.get(slot)
        if views is None or views[0].numel() != units:
            with torch.inference_mode(False):
                ring = self._uring[slot] = torch.full((UNIT_ROWS, units), -math.inf, dtype=t.dtype,
                                                      device=self.device)
                views = self._uviews[slot] = list(ring.unbind(0))
                if self._ustep is None:
                    self._ustep = torch.full((UNIT_ROWS, 1), math.nan, dtype=torch.float32, device=self.device)
        key = (t.dim(), cdim)
        dims = self._udims.get(key)
        if dims is None:
            dims = self._udims[key] = tuple(d for d in range(t.dim()) if d != cdim)
        mode = 0
        if dims:
            mode = 2 if cdim == 1 and t.dim() >= 3 and t.is_cpu and \
                1 < t.numel() // max(1, t.shape[0] * t.shape[1]) < 64 else 1
        plan = self._wplans[slot] = [t.shape, t.dtype, views, t.dtype == views[0].dtype, mode, dims,
                                     tuple(d - 1 for d in dims[1:])]
        return plan

    def _track_units(self, slot: int, t: torch.Tensor, cdim: int) -> None:
        """Full steps of a stream not watched every step: the per-unit maximum updates the last-fired steps."""
        if t.dim() <= 1:
            per_unit = t
        elif cdim == t.dim() - 1:
            per_unit = t.reshape(-1, t.shape[-1]).amax(0)
        else:
            per_unit = t.flatten(cdim + 1).amax(-1) if t.dim() > cdim + 1 else t
            per_unit = per_unit.reshape(-1, t.shape[cdim]).amax(0) if cdim > 0 else per_unit
        last = self._unit_start(slot, per_unit.numel())
        if last is None:
            return
        self._measured_units(slot)
        # NaN is "not known", never "did not fire": a NaN step must not make every unit look dead later
        last.masked_fill_(per_unit.le(0).logical_not_(), float(self.step))

    def _fold_units(self, reset: bool = False) -> None:
        """Fold the unit ring rows into :attr:`last_fired` (a few kernels per watched slot, off the hooks, no
        host sync; idempotent). A unit fired at a ring row's step when its maximum there is not <= 0: NaN is "not
        known", never "did not fire", and a row the slot did not write holds -inf. ``reset``: empty the ring."""
        if not self._uring or self._ustep is None:
            return
        rings, lasts = [], []
        for slot, ring in self._uring.items():
            last = self.last_fired.get(slot)
            if last is not None:
                rings.append(ring)
                lasts.append(last)
        if rings:  # every watched slot at once: one cat and four kernels, then one fused maximum per slot
            units = torch.cat(rings, dim=1) if len(rings) > 1 else rings[0]
            stamp = torch.where(units.le(0).logical_not_(), self._ustep, -math.inf).amax(0)
            torch._foreach_maximum_(lasts, list(stamp.split([r.shape[1] for r in rings])))
        if reset:
            empty = torch.full((), -math.inf, dtype=torch.float32, device=self._ustep.device)
            everything = list(self._uring.values())
            torch._foreach_copy_(everything, [empty.expand(r.shape) for r in everything])
            self._upos = 0
            self._ur = -1
            self._ucycle += 1

    def observe_params(self, column: int, modules: torch.Tensor, host_modules: np.ndarray,
                       squares: torch.Tensor) -> None:
        """Add ``squares[k]`` (a sum of squares, e.g. a squared fused norm) to module ``modules[k]``'s
        ``column`` of the current row: one ``index_add_``, no host sync (the max columns,
        :data:`PARAM_MAX_COLUMNS`, take the maximum instead). ``host_modules`` is the same index on the host
        (which modules were measured is host knowledge)."""
        if self._buf is None:
            self._alloc(squares.device)
        if not self._pending or self._pbuf is None:
            return
        if squares.device != self.device:
            squares = squares.to(self.device, non_blocking=True)
        if column in PARAM_MAX_COLUMNS:  # NaN propagates, as in commit()
            self._pbuf[self.row, :, column].scatter_reduce_(0, modules, squares.to(torch.float32), "amax")
        else:
            self._pbuf[self.row, :, column].index_add_(0, modules, squares.to(torch.float32))
        np.add.at(self.pmeasured[self.row, :, column], host_modules, 1)

    def record_scale(self, scale: torch.Tensor | float | None, end: bool) -> None:
        """Record the loss scale in force (GradScaler) for the current step (device copy, no sync). Before any
        hook has observed (the first step) the buffers are made on the scale's device, so the scale is kept."""
        if isinstance(scale, torch.Tensor) and self._buf is None:
            self._alloc(scale.device)
        if self._scale is None or not self._pending or scale is None:
            return
        self._scale[self.row, int(end)].copy_(scale if isinstance(scale, torch.Tensor) else torch.tensor(scale),
                                               non_blocking=True)

    # ------------------------------------------------------------------ cold path
    def read(self) -> tuple[HostRows, dict[int, np.ndarray]]:
        """Copy every row written since the last read, and the unit windows, to the host in ONE copy."""
        self.commit()
        self._fold_units(reset=True)
        rows = list(self._pending)
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
        if self._pbuf is not None:
            parts.append(self._pbuf.index_select(0, idx).reshape(-1))
        parts += [self.last_fired[s] for s in unit_slots]
        flat = torch.cat(parts).cpu().numpy()  # the one device->host copy
        off = n * slots * len(COLUMNS)
        dev = flat[:off].reshape(n, slots, len(COLUMNS))
        scale = flat[off:off + 2 * n].reshape(n, 2)
        off += 2 * n
        params = None
        if self._pbuf is not None:
            k = n * self.params * len(PARAM_COLUMNS)
            raw = flat[off:off + k].reshape(n, self.params, len(PARAM_COLUMNS)).astype(np.float64)
            params = np.where(self.pmeasured[rows] > 0, raw, -1.0)  # -1: not measured (a NaN may be measured)
            off += k
        units = {}
        for s in unit_slots:
            k = self.last_fired[s].numel()
            units[s] = flat[off:off + k].copy()
            off += k
        host = HostRows(self.steps[rows].copy(), dev, self.calls[rows].copy(), self.numel[rows].copy(),
                        self.full[rows].copy(), [list(self.order[r]) for r in rows], self.counted[rows].copy(),
                        scale, params, self.minless[rows].copy())
        self._pending = []
        return host, units

    def release(self) -> None:
        """Drop the device buffers (after a run); a later step allocates them again."""
        self._buf = self._scale = self._pbuf = None
        self._sent_min, self._sent_max, self._sent_slot = [], [], []
        self._drop_full()
        self._sbuf = self._shost = self._fast_idx = None
        self._sviews, self._fast_slot, self._fast_need = [], [], 0
        self.device = None
        self.last_fired = {}
        self._uring, self._uviews, self._ustep, self._uwrote, self._unit_index = {}, {}, None, {}, {}
        self._wplans, self._umark = {}, None
        self._upos, self._ur, self._sent_units = 0, -1, []
        self._pending = []
        self.step = -1

    def state_dict(self) -> dict:
        """Unit windows as plain lists (weights_only-safe), the rows not read yet folded in. Version 2 adds
        ``unit_steps`` (the steps each unit slot was measured on); version 1 (no ``version`` key) loads too: its
        windows count measured steps again from the resume."""
        self._fold_units()
        return {"version": STATE_VERSION,
                "last_fired": {int(s): t.detach().cpu().tolist() for s, t in self.last_fired.items()},
                "first_seen": {int(s): int(v) for s, v in self.first_seen.items()},
                "unit_steps": {int(s): [int(x) for x in v[-self.unit_steps_kept:]]
                               for s, v in self.unit_steps.items()}}

    def load_state_dict(self, state: dict, device: torch.device | None = None) -> None:
        dev = device or self.device or torch.device("cpu")
        self.last_fired = {int(s): torch.tensor(v, dtype=torch.float32, device=dev)
                           for s, v in state.get("last_fired", {}).items()}
        self._wplans = {}  # the plans assumed the windows they were made with
        self.first_seen = {int(s): int(v) for s, v in state.get("first_seen", {}).items()}
        self.unit_steps = {int(s): [int(x) for x in v] for s, v in state.get("unit_steps", {}).items()}
        for s in self.last_fired:
            self.unit_steps.setdefault(s, [])  # version 1: measured steps are counted from the resume

    def to(self, device: torch.device) -> None:
        """Move the unit windows (e.g. restored from a checkpoint) to the training device."""
        self.last_fired = {s: t.to(device) for s, t in self.last_fired.items()}


# ---------------------------------------------------------------------- across ranks (cold path)
def pack_rows(host: HostRows, units: dict[int, np.ndarray]) -> np.ndarray:
    """One rank's rows and unit windows as one float64 vector (for a single all-gather)."""
    n, slots = host.calls.shape
    order = np.full((n, slots), -1.0)
    for i, o in enumerate(host.order):
        order[i, o] = np.arange(len(o))
    params = host.params if host.params is not None else np.zeros((n, 0, len(PARAM_COLUMNS)))
    parts = [np.array([n, slots, len(units), params.shape[1]], np.float64), host.steps.astype(np.float64),
             host.dev.astype(np.float64).ravel(), host.calls.ravel(), host.numel.ravel(), host.full.ravel(),
             host.counted.ravel(), host.scale.astype(np.float64).ravel(), order.ravel(), params.ravel(),
             (host.minless if host.minless is not None else np.zeros((n, slots), bool)).ravel()]
    for s, arr in sorted(units.items()):
        parts += [np.array([s, arr.size], np.float64), arr.astype(np.float64)]
    return np.concatenate([p.astype(np.float64).ravel() for p in parts])


def _unpack_rows(vec: np.ndarray) -> tuple[HostRows, dict[int, np.ndarray]]:
    n, slots, nu, npar = (int(x) for x in vec[:4])
    off = 4

    def take(k: int, shape: tuple[int, ...]) -> np.ndarray:
        nonlocal off
        out = vec[off:off + k].reshape(shape)
        off += k
        return out

    steps = take(n, (n,)).astype(np.int64)
    dev = take(n * slots * len(COLUMNS), (n, slots, len(COLUMNS))).astype(np.float32)
    calls, numel, full, counted = (take(n * slots, (n, slots)).astype(np.int64) for _ in range(4))
    scale = take(2 * n, (n, 2)).astype(np.float32)
    pos = take(n * slots, (n, slots))
    p = len(PARAM_COLUMNS)
    params = take(n * npar * p, (n, npar, p)).copy() if npar else None
    minless = take(n * slots, (n, slots)) > 0
    order = [[int(s) for s in np.argsort(np.where(p >= 0, p, np.inf), kind="stable") if p[s] >= 0] for p in pos]
    units = {}
    for _ in range(nu):
        s, k = (int(x) for x in take(2, (2,)))
        units[s] = take(k, (k,)).astype(np.float32)
    return HostRows(steps, dev, calls, numel, full, order, counted, scale, params, minless), units


def _merge_params(params: list[np.ndarray | None], n: int) -> np.ndarray | None:
    """The parameter rows of every rank: sums of squares add (each rank added only the pieces it holds
    distinctly: :func:`lit_probe.params.contributes`), the largest ``|element|`` is the maximum; -1 (not
    measured) where any rank did not measure."""
    if params[0] is None:
        return None
    stack = np.stack([p[:n] for p in params if p is not None and p.shape == params[0].shape])
    out = stack.sum(0)
    with np.errstate(invalid="ignore"):
        for c in PARAM_MAX_COLUMNS:
            out[..., c] = np.max(stack[..., c], axis=0)
    out[(stack == -1.0).any(0)] = -1.0
    return out


def _combine(hosts: list[HostRows], n: int, slots: int) -> HostRows:
    """Rows of ranks that saw different elements of the same streams (other samples, or other units): counts and
    sums add, norms combine, min/max of min/max, the first-seen order of the first rank first."""
    base = hosts[0]
    dev = np.stack([h.dev[:n, :slots] for h in hosts]).astype(np.float64)
    out = dev[0].copy()
    add = [COLUMNS.index(c) for c in ("nonfinite", "nonzero", "sum")]
    out[..., add] = dev[..., add].sum(0)
    out[..., _L2] = np.sqrt((dev[..., _L2] ** 2).sum(0))
    with np.errstate(invalid="ignore"):
        out[..., _MIN] = np.min(dev[..., _MIN], axis=0)
        out[..., _MAX] = np.max(dev[..., _MAX], axis=0)
    order = []
    for i in range(n):
        seen = list(base.order[i])
        for h in hosts[1:]:
            seen += [s for s in h.order[i] if s not in seen]
        order.append([s for s in seen if s < slots])
    return HostRows(base.steps[:n], out.astype(np.float32),
                    *(sum(getattr(h, f)[:n, :slots] for h in hosts) for f in ("calls", "numel", "full")),
                    order, sum(h.counted[:n, :slots] for h in hosts), base.scale[:n],
                    _merge_params([h.params for h in hosts], n),
                    np.any([h.minless[:n, :slots] for h in hosts if h.minless is not None], axis=0)
                    if any(h.minless is not None for h in hosts) else None)


def _same_elements(hosts: list[HostRows], n: int, slots: int) -> np.ndarray:
    """Per slot: whether every rank of a tensor-parallel group measured bitwise the same values (a replicated
    stream) at every step all of them measured with finite values. A stream whose units are split over the ranks
    (between a column-wise and a row-wise layer) differs."""
    cols = [_SUM, _L2, _MIN, _MAX]
    first = hosts[0].dev[:n, :slots][..., cols]
    same = np.ones(slots, bool)
    for h in hosts[1:]:
        other = h.dev[:n, :slots][..., cols]
        eq = first == other
        # steps both measured, finite on both (a NaN on one rank only is that rank's bug, not a split of units)
        both = (hosts[0].calls[:n, :slots] > 0) & (h.calls[:n, :slots] > 0) \
            & np.isfinite(first).all(-1) & np.isfinite(other).all(-1)
        same &= np.where(both[..., None], eq, True).all(axis=(0, 2))
        same &= (hosts[0].numel[:n, :slots] == h.numel[:n, :slots]).all(0)
    return same


def _replicas_once(hosts: list[HostRows], merged: HostRows, replicated: np.ndarray, n: int, slots: int) -> HostRows:
    """``merged`` with the replicated slots' columns taken from the first rank only (counted once), except what
    a rank's own bug shows: the min/max over the ranks and the largest non-finite count."""
    first = hosts[0]
    rep = np.flatnonzero(replicated[:slots])
    if len(rep) == 0:
        return merged
    dev = np.stack([h.dev[:n, rep] for h in hosts])
    merged.dev[:, rep] = first.dev[:n, rep]
    with np.errstate(invalid="ignore"):
        merged.dev[:, rep, _MIN] = np.min(dev[..., _MIN], axis=0)
        merged.dev[:, rep, _MAX] = np.max(dev[..., _MAX], axis=0)
        merged.dev[:, rep, _NF] = np.max(dev[..., _NF], axis=0)
    for f in ("calls", "numel", "full", "counted"):
        getattr(merged, f)[:, rep] = getattr(first, f)[:n, rep]
    if merged.minless is not None and first.minless is not None:
        merged.minless[:, rep] = first.minless[:n, rep]
    return merged


@dataclass
class RankRows:
    """Which ranks showed what, per merged (row, slot): for naming the rank(s) of a finding.

    Attributes:
        nonfinite: bitmask of the ranks whose elements held a NaN/Inf (min, max or the count).
        top: the rank with the largest ``|element|``.
        sharded_units: per slot, whether its units are split over a tensor-parallel group (joined, not merged).
    """

    nonfinite: np.ndarray
    top: np.ndarray
    sharded_units: np.ndarray

    def ranks(self, row: int, slot: int, kind: str) -> list[int]:
        """The ranks a finding of ``kind`` at (``row``, ``slot``) came from (``[]``: not one rank's)."""
        if kind == "nonfinite":
            mask = int(self.nonfinite[row, slot])
            return [r for r in range(mask.bit_length()) if mask >> r & 1]
        if kind == "exploding":
            return [int(self.top[row, slot])]
        return []


def merge_ranks(vectors: list[np.ndarray], tensor_parallel: int = 1, sharded_units: np.ndarray | None = None,
                partner: np.ndarray | None = None) -> tuple[HostRows, dict[int, np.ndarray], RankRows | None]:
    """Combine every rank's :func:`pack_rows` vector.

    Ranks that saw other samples (DDP, FSDP's data-parallel ranks) merge: counts and sums add, norms combine,
    min/max of min/max, a unit fired if it fired on any rank, the first-seen order of rank 0 first.

    With ``tensor_parallel > 1``, ranks ``[g*tp, (g+1)*tp)`` form a tensor-parallel group (Lightning's
    ``ModelParallelStrategy`` mesh ``(data_parallel, tensor_parallel)``, row-major). They saw the same samples: a
    stream they all measured bitwise the same (replicated: after a row-wise layer's all-reduce) counts once; a
    stream whose values differ holds part of the units on each rank (between a column-wise and a row-wise layer):
    its units are joined in rank order (``[16] + [16]`` -> 32 units) and its element counts add. Once a slot is
    seen split, it stays split (``sharded_units``, updated in place), and so does its ``partner`` (the other
    signal of the same module call: a dead ReLU's outputs are all zero on every rank, its gradients are not).
    Then the groups merge as above.

    Returns:
        the merged rows, the unit windows, and per (row, slot) the ranks of non-finite values and of the largest
        ``|element|`` (``None`` for one vector).
    """
    ranks = [_unpack_rows(v) for v in vectors]
    hosts = [h for h, _ in ranks]
    n = min(len(h.steps) for h in hosts)
    slots = min(h.calls.shape[1] for h in hosts)
    base = hosts[0]
    if n == 0 or len(hosts) == 1:
        return base, ranks[0][1], None
    dev = np.stack([h.dev[:n, :slots] for h in hosts]).astype(np.float64)
    with np.errstate(invalid="ignore"):
        bad = np.isnan(dev[..., _MIN]) | np.isnan(dev[..., _MAX]) | (dev[..., _MAX] == np.inf) \
            | (dev[..., _MIN] == -np.inf) | (dev[..., _NF] > 0)  # an unmeasured row holds min=+inf, max=-inf
        absmax = np.fmax(np.abs(np.where(np.isfinite(dev[..., _MIN]), dev[..., _MIN], 0)),
                         np.abs(np.where(np.isfinite(dev[..., _MAX]), dev[..., _MAX], 0)))
    weights = (1 << np.arange(len(hosts), dtype=np.int64))[:, None, None]
    nonfinite = (bad.astype(np.int64) * weights).sum(0)
    top = np.argmax(absmax, axis=0)
    tp = max(1, int(tensor_parallel))
    split = np.zeros(slots, bool) if sharded_units is None else sharded_units
    if tp > 1 and len(hosts) % tp == 0:
        groups = [list(range(g, g + tp)) for g in range(0, len(hosts), tp)]
        for group in groups:
            split[:slots] |= ~_same_elements([hosts[r] for r in group], n, slots)
        if partner is not None:
            k = min(slots, len(partner))
            other = partner[:k]
            ok = (other >= 0) & (other < slots)
            split[:k] |= np.where(ok, split[np.clip(other, 0, slots - 1)], False)
        merged_groups, unit_groups = [], []
        for group in groups:
            gh = [hosts[r] for r in group]
            merged_groups.append(_replicas_once(gh, _combine(gh, n, slots), ~split, n, slots))
            units_g: dict[int, np.ndarray] = {}
            for s in sorted(set().union(*(ranks[r][1] for r in group))):
                parts = [ranks[r][1][s] for r in group if s in ranks[r][1]]
                units_g[s] = np.concatenate(parts) if s < slots and split[s] else parts[0]
            unit_groups.append(units_g)
        merged = _combine(merged_groups, n, slots) if len(merged_groups) > 1 else merged_groups[0]
        # the parameters: every rank added its distinct pieces once, whatever the group
        merged.params = _merge_params([h.params for h in hosts], n)
        unit_sets = unit_groups
    else:
        merged = _combine(hosts, n, slots)
        unit_sets = [u for _, u in ranks]
    units: dict[int, np.ndarray] = {}
    for u in unit_sets:
        for s, arr in u.items():
            units[s] = arr if s not in units or units[s].shape != arr.shape else np.maximum(units[s], arr)
    return merged, units, RankRows(nonfinite, top, split)
