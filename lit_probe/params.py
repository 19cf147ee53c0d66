"""Params
======

The parameter signal: per probed module that owns parameters, the norm of its weights, of their gradients and
of the optimizer's update, measured around each optimizer step with fused multi-tensor norms
(``torch._foreach_norm``: one call per optimizer step for all of them, not a kernel per parameter) and added
to the :class:`~lit_probe.stats.StatBuffer`'s parameter ring (same row, same one copy per log step).

* :meth:`ParamWatch.before_step` (Lightning's ``on_before_optimizer_step``: gradients unscaled under AMP, before
  clipping): ``||W||`` and ``||grad||`` of the optimizer's probed parameters, and the largest ``|element|`` of
  both (one more fused call, ``ord=inf``: it cannot overflow, so it tells a float32 norm that overflowed from
  a NaN/Inf element), every step; on full-statistics steps also a copy of those parameters.
* after the step (a ``register_step_post_hook`` on each optimizer, so it also runs under manual optimisation and
  with several optimizers): ``||W_after - W_before||`` from that copy, which is freed at once.

A module's parameters are its own (``recurse=False``) unless ``scope="recursive"``. Parameters with
``requires_grad=False`` are frozen by the user: not measured, said once (:attr:`ParamWatch.frozen`).

**Sharded parameters** (FSDP2's ``fully_shard``, tensor parallelism's ``parallelize_module``: ``DTensor``
parameters and gradients): each rank measures its local shard (``to_local()``; no gather of the full tensor) and
the cross-rank merge adds the sums of squares (:func:`lit_probe.stats.merge_ranks`), so a norm is that of the
whole tensor, exactly as on one process. A replica must count once: when the statistics are merged over
processes, the ranks tell each other at fit start (one all-gather) which piece of each parameter they hold
(:func:`piece`: a plain tensor is a replica of the whole, as under DDP; a ``DTensor`` holds the piece its mesh
coordinates along its sharded dimensions name), and only the first rank holding a piece adds its sums of squares
(:func:`contributes`). The largest ``|element|`` is merged by a maximum, which replicas do not change, so every
rank's non-finite element counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .stats import PARAM_COLUMNS, StatBuffer
from .vocab import local_tensor as local

__all__ = ["ParamWatch", "PARAM_SCOPES", "contributes", "piece"]

PARAM_SCOPES = ("own", "recursive")
_W, _G, _D, _WMAX, _GMAX = range(len(PARAM_COLUMNS))
#: Values per module copied for the parameter histograms of a figure step.
HIST_VALUES = 20000


def _stack(norms: Sequence[torch.Tensor]) -> torch.Tensor:
    """0-d norms (of any floating dtypes) as one float32 vector."""
    if len({n.dtype for n in norms}) > 1:
        norms = [n.float() for n in norms]
    return torch.stack(list(norms)).float()


class _FiniteCheck:
    """Whether every 0-d norm of some groups is finite, read off CUDA only (where it does not wait): the norms
    are copied into a float32 tensor that shares its memory with a numpy array, so the read is numpy's, with no
    tensor-to-host call."""

    def __init__(self) -> None:
        self._host = np.empty(0, np.float32)
        self._buf = torch.from_numpy(self._host)

    def __call__(self, *groups: Sequence[torch.Tensor]) -> bool:
        norms = [n for g in groups for n in g]
        if not norms:
            return True
        k = len(norms)
        if self._host.size < k:
            self._host = np.empty(k, np.float32)
            self._buf = torch.from_numpy(self._host)
        with torch.no_grad():
            self._buf[:k].copy_(torch.stack(norms))
        return bool(np.isfinite(self._host[:k]).all())


def _absmax(tensors: list[torch.Tensor], device: torch.device, fused: bool) -> torch.Tensor:
    """The largest |element| of each tensor, as one float32 vector on ``device`` (NaN where a NaN is). On CUDA one
    fused ``_foreach_norm(ord=inf)``; elsewhere ``aminmax`` per tensor (the CPU ``ord=inf`` norm is ~13x slower:
    61 ms against 4.6 ms for resnet18's weights and gradients, one thread)."""
    if fused and device.type == "cuda":
        return _stack(torch._foreach_norm(tensors, ord=float("inf")))
    values = [x.coalesce().values() if x.is_sparse else x for x in tensors]
    zero = torch.zeros((), device=device)
    pairs = [torch.aminmax(v) if v.numel() else (zero, zero) for v in values]  # an empty shard: 0
    lo = _stack([p[0].to(device) for p in pairs])
    hi = _stack([p[1].to(device) for p in pairs])
    return torch.maximum(lo.abs(), hi.abs())  # NaN propagates


def piece(p: torch.Tensor) -> int:
    """Which piece of its whole tensor ``p`` holds on this rank, as a number: 0 for a plain tensor (a replica of
    the whole), for a ``DTensor`` its coordinates along the mesh dimensions it is sharded on. Two ranks with the
    same number hold the same elements (replicas: DDP, a tensor-parallel rank's copy of a data-parallel shard)."""
    placements = getattr(p, "placements", None)
    if placements is None:
        return 0
    coordinate = p.device_mesh.get_coordinate()
    if coordinate is None:  # this rank holds no piece of it
        return -1
    return 1 + sum((c + 1) * 1024 ** d for d, (c, pl) in enumerate(zip(coordinate, placements)) if not
                   pl.is_replicate())


def contributes(pieces: list[np.ndarray], rank: int) -> np.ndarray:
    """Per parameter: whether ``rank`` is the first rank holding its piece (``pieces``: every rank's
    :func:`piece` numbers, in rank order), so that the sums of squares added over ranks count each element once."""
    table = np.stack(pieces)  # [ranks, params]
    mine = table[rank]
    first = np.array([int(np.flatnonzero(table[:, k] == mine[k])[0]) for k in range(table.shape[1])])
    return (first == rank) & (mine >= 0)


class _Plan:
    """One optimizer's share of the probed parameters: unique tensors and, per (parameter, module) pair, its
    index into them and the module's row."""

    def __init__(self, params: list[nn.Parameter], pair_param: list[int], pair_module: list[int]) -> None:
        self.params = params
        self.pair_param = np.asarray(pair_param, dtype=np.int64)
        self.pair_module = np.asarray(pair_module, dtype=np.int64)
        self.device_index: dict[Any, tuple[Any, ...]] = {}
        self.before: list[torch.Tensor] | None = None
        self.spare: tuple[list, list[torch.Tensor]] | None = None  # CPU: the kept copy (what it copies, the copy)
        self.copied: list[int] = []
        self.one_device: bool | None = None
        self.sharded = any(hasattr(p, "placements") for p in params)  # DTensors: measure local shards
        self.silent: torch.Tensor | None = None  # per parameter: True where this rank adds no sum of squares


class ParamWatch:
    """Parameter statistics of the probed modules that own parameters.

    Args:
        modules: ``(name, module)`` pairs (the probed modules, in registration order).
        buffer: the session's buffer; its parameter ring gets one row per module in :attr:`names`.
        scope: ``"own"`` (a module's own parameters) or ``"recursive"`` (its whole subtree).
    """

    def __init__(self, modules: Sequence[tuple[str, nn.Module]], buffer: StatBuffer, scope: str = "own") -> None:
        if scope not in PARAM_SCOPES:
            raise ValueError(f"scope must be one of {PARAM_SCOPES}, got {scope!r}")
        self.buffer = buffer
        self._finite = _FiniteCheck()  # off CUDA: whether the step's norms are finite (the max-abs is measured if not)
        self.names: list[str] = []
        self.owned: list[list[nn.Parameter]] = []
        self.frozen: list[str] = []
        for name, m in modules:
            ps = list(m.parameters(recurse=scope == "recursive"))
            live = [p for p in ps if p.requires_grad]
            if ps and not live:
                self.frozen.append(name)
            if live:
                self.names.append(name)
                self.owned.append(live)
        self.numel = np.array([sum(p.numel() for p in ps) for ps in self.owned], dtype=np.int64)
        buffer.ensure_params(len(self.names))
        self._plans: dict[int, _Plan] = {}
        self._handles: list[Any] = []
        self.groups = np.zeros(len(self.names), dtype=np.int64)  # (optimizer, group) id per module
        self.lrs = np.full(len(self.names), np.nan)  # that group's current learning rate
        self._group_of: list[tuple[int, int]] = [(-1, -1)] * len(self.names)
        self.orphans: list[str] = []  # modules whose parameters are in no optimizer
        self.hist: dict[int, tuple[np.ndarray, np.ndarray | None]] | None = None
        self._optimizers: list[Any] = []

    def __len__(self) -> int:
        return len(self.names)

    # ------------------------------------------------------------------ binding
    def bind(self, optimizers: Sequence[torch.optim.Optimizer],
             gather: Callable[[np.ndarray], list[np.ndarray]] | None = None) -> None:
        """Map the parameters onto ``optimizers`` (fit start) and hook each optimizer's step (removable).
        ``gather``: the statistics are merged over processes (the session's all-gather, entered here by every
        rank once): which rank adds each parameter's sums of squares (:func:`contributes`)."""
        self.remove()
        where: dict[int, tuple[int, int]] = {}
        for o, opt in enumerate(optimizers):
            for g, group in enumerate(opt.param_groups):
                for p in group["params"]:
                    where.setdefault(id(p), (o, g))
        for o, opt in enumerate(optimizers):
            uniq: dict[int, int] = {}
            params: list[nn.Parameter] = []
            pair_param, pair_module = [], []
            for m, ps in enumerate(self.owned):
                for p in ps:
                    if where.get(id(p), (-1,))[0] != o:
                        continue
                    if id(p) not in uniq:
                        uniq[id(p)] = len(params)
                        params.append(p)
                    pair_param.append(uniq[id(p)])
                    pair_module.append(m)
            if params:
                self._plans[id(opt)] = _Plan(params, pair_param, pair_module)
                self._handles.append(opt.register_step_post_hook(self._post_hook))
        for m, ps in enumerate(self.owned):
            biggest = max(ps, key=lambda p: p.numel())
            self._group_of[m] = where.get(id(biggest), (-1, -1))
            self.groups[m] = self._group_of[m][0] * 10000 + self._group_of[m][1]
            if all(id(p) not in where for p in ps):
                self.orphans.append(self.names[m])
        self._optimizers = list(optimizers)
        self.update_lrs()
        if gather is not None:
            self._share_out(gather)

    def _share_out(self, gather: Callable[[np.ndarray], list[np.ndarray]]) -> None:
        """Every rank's pieces of the planned parameters (one all-gather): a replica adds no sum of squares."""
        import torch.distributed as dist

        plans = list(self._plans.values())
        mine = np.array([piece(p) for plan in plans for p in plan.params], dtype=np.float64)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        pieces = [x[1:] for x in gather(np.concatenate([[len(mine)], mine]))]  # never an empty tensor
        if len(pieces) <= 1 or not len(mine) or any(len(x) != len(mine) for x in pieces):
            return
        adds = contributes([x.astype(np.int64) for x in pieces], rank)
        k = 0
        for plan in plans:
            silent = ~adds[k:k + len(plan.params)]
            k += len(plan.params)
            if silent.any():
                plan.silent = torch.as_tensor(silent, device=local(plan.params[0]).device)

    def update_lrs(self) -> None:
        """The current learning rate of each module's (largest parameter's) group (schedulers change it)."""
        for m, (o, g) in enumerate(self._group_of):
            try:
                lr = self._optimizers[o].param_groups[g]["lr"] if o >= 0 else np.nan
                self.lrs[m] = float(lr)
            except (IndexError, KeyError, TypeError, ValueError, AttributeError):
                self.lrs[m] = np.nan

    def remove(self) -> None:
        """Remove the optimizer hooks and drop every copy (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._plans = {}
        self.hist = None

    def release(self) -> None:
        """:meth:`remove`, and drop every reference to the model's parameters and optimizers (names stay)."""
        self.remove()
        self.owned = [[] for _ in self.names]
        self._optimizers = []

    # ------------------------------------------------------------------ around the optimizer step
    def _index(self, plan: _Plan, keep: np.ndarray,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """For the kept (parameter, module) pairs: parameter indices and module rows on ``device`` (cached), and
        the module rows on the host."""
        key = (device, keep.tobytes())
        hit = plan.device_index.get(key)
        if hit is None:
            if len(plan.device_index) > 16:
                plan.device_index.clear()
            mods = plan.pair_module[keep]
            hit = plan.device_index[key] = (torch.as_tensor(plan.pair_param[keep], device=device),
                                            torch.as_tensor(mods, device=device), mods)
        return hit[0], hit[1], hit[2]

    @torch.no_grad()
    def before_step(self, optimizer: Any, full: bool) -> None:
        """``||W||`` and ``||grad||`` of ``optimizer``'s probed parameters; with ``full``, a copy for the update."""
        plan = self._plans.get(id(getattr(optimizer, "optimizer", optimizer)))  # LightningOptimizer wraps
        if plan is None or not plan.params:
            return
        params = [local(p) for p in plan.params] if plan.sharded else plan.params
        device = params[0].device
        if plan.one_device is None:
            plan.one_device = all(p.device == device for p in params)
        if not plan.one_device:  # model-parallel: norms per device, then one device
            wn = [torch.linalg.vector_norm(p.detach()).to(device) for p in params]
        else:
            wn = torch._foreach_norm(params)  # under no_grad: no graph, no detach per tensor
        has_grad = np.array([p.grad is not None for p in plan.params])
        every = np.ones(len(params), bool)
        self._add(plan, _W, _stack(wn), every, device)
        grads = [local(p.grad) for p in plan.params if p.grad is not None]
        fused = plan.one_device and not any(g.is_sparse or g.device != device for g in grads)
        if grads:
            if not fused:
                gn = [torch.linalg.vector_norm(g.coalesce().values() if g.is_sparse else g).to(device)
                      for g in grads]
            else:
                gn = torch._foreach_norm(grads)
            self._add(plan, _G, self._spread(plan, _stack(gn), has_grad, device), has_grad, device)
        # the largest |element| of weights and gradients, in one fused call: finite exactly when the elements are.
        # It tells only what a norm cannot (an overflowed norm over finite elements, where a NaN/Inf is): off CUDA,
        # where it costs several passes over every parameter, it is measured only at a step where some norm is not
        # finite (reading the norms there costs nothing to wait for); otherwise its columns stay "not measured"
        if device.type == "cuda" or not self._finite(wn, gn if grads else ()):
            mx = _absmax(list(params) + grads, device, fused)
            self._add(plan, _WMAX, mx[:len(params)], every, device, square=False)
            if grads:
                self._add(plan, _GMAX, self._spread(plan, mx[len(params):], has_grad, device), has_grad, device,
                          square=False)
        if full and has_grad.any():
            plan.copied = [k for k in np.flatnonzero(has_grad)]
            srcs = [params[k] for k in plan.copied]
            if plan.one_device and device.type == "cpu" and hasattr(torch, "_foreach_copy_"):
                # the CPU returns a fresh copy's pages to the system and faults them in again at every full step
                # (~2 GB/s): one copy kept for the run instead, refilled in place (the same peak memory)
                key = [(k, srcs[j].shape, srcs[j].dtype) for j, k in enumerate(plan.copied)]
                if plan.spare is None or plan.spare[0] != key:
                    plan.spare = (key, [torch.empty_like(t, memory_format=torch.preserve_format) for t in srcs])
                torch._foreach_copy_(plan.spare[1], srcs)
                plan.before = list(plan.spare[1])
            else:
                plan.before = torch._foreach_mul(srcs, 1.0)  # fused copy
        if self.hist is not None:
            self._histograms(plan)

    def _spread(self, plan: _Plan, values: torch.Tensor, where: np.ndarray, device: torch.device) -> torch.Tensor:
        """``values`` (one per True of ``where``) as one value per unique parameter (0 elsewhere)."""
        if where.all():
            return values
        key = ("spread", device, where.tobytes())
        idx = plan.device_index.get(key)
        if idx is None:  # cached: no host-to-device copy per step
            idx = plan.device_index[key] = (torch.as_tensor(np.flatnonzero(where), device=device),)
        out = torch.zeros(len(plan.params), dtype=torch.float32, device=device)
        return out.index_copy_(0, idx[0], values)

    def _add(self, plan: _Plan, column: int, norms: torch.Tensor, measured: np.ndarray,
             device: torch.device, square: bool = True) -> None:
        """Add the squared ``norms`` (one per unique parameter, those ``measured``) to their modules' rows (with
        ``square=False``, the values themselves: the max-abs columns, combined by a maximum)."""
        keep = measured[plan.pair_param]
        if keep.any():
            pidx, midx, mods = self._index(plan, keep, device)
            values = norms.float().square() if square else norms.float()
            if square and plan.silent is not None:  # a replica's share is another rank's (NaN included)
                values = values.masked_fill(plan.silent, 0.0)
            self.buffer.observe_params(column, midx, mods, values[pidx])

    @torch.no_grad()
    def _post_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        plan = self._plans.get(id(optimizer))
        if plan is None or plan.before is None:
            return
        before, plan.before = plan.before, None
        params = [local(plan.params[k]) for k in plan.copied]
        torch._foreach_sub_(before, params)  # in place: W_before - W_after, no new memory
        dn = torch._foreach_norm(before)
        del before
        measured = np.zeros(len(plan.params), bool)
        measured[plan.copied] = True
        device = local(plan.params[0]).device
        self._add(plan, _D, self._spread(plan, _stack(dn), measured, device), measured, device)

    def end_step(self) -> None:
        """Drop copies whose optimizer step never came (a GradScaler skip: no update measured)."""
        for plan in self._plans.values():
            plan.before = None

    # ------------------------------------------------------------------ figures
    def request_histograms(self) -> None:
        """At the next optimizer step, copy up to :data:`HIST_VALUES` weights and gradients per module."""
        self.hist = {}

    @torch.no_grad()
    def histograms_only(self, optimizer: Any) -> None:
        """A step whose norms are not measured (see :meth:`ProbeSession.before_optimizer_step`): only the
        histograms a figure step asked for (:meth:`request_histograms`), if any."""
        plan = self._plans.get(id(getattr(optimizer, "optimizer", optimizer)))
        if self.hist is not None and plan is not None and plan.params:
            self._histograms(plan)

    def take_histograms(self) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """``name -> (weights, gradients or None)`` copied since :meth:`request_histograms`."""
        hist, self.hist = self.hist, None
        return {self.names[m]: v for m, v in sorted((hist or {}).items())}

    def _histograms(self, plan: _Plan) -> None:
        assert self.hist is not None
        for m in sorted(set(plan.pair_module.tolist())):
            if m in self.hist:
                continue
            ps = self.owned[m]
            total = int(self.numel[m])
            stride = max(1, -(-total // HIST_VALUES))

            def sample(ts: list[torch.Tensor]) -> np.ndarray:
                flat = torch.cat([local(t).detach().reshape(-1) for t in ts])[::stride]
                return flat.to(device="cpu", dtype=torch.float32, copy=True).numpy()

            grads = [p.grad for p in ps if p.grad is not None and not p.grad.is_sparse]
            self.hist[m] = (sample(list(ps)), sample(grads) if len(grads) == len(ps) else None)
