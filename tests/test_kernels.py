"""How many aten ops the probe dispatches per probed tensor (counted, never timed).

A ``TorchDispatchMode`` records every aten op of one forward + backward of a small model; an op is the probe's
when a frame of the ``lit_probe`` package is on the Python stack when it is dispatched (the forward hooks and
the gradient hooks run as Python frames, the model's own forward and backward ops have none), so no
"with minus without" subtraction is needed. Ops are counted per *observed tensor*: one per floating output of
a probed module call plus one per gradient of such an output.

The bounds below are today's counts (see "Bounds"); tighten them as the hot path gets leaner. Run with ``-s`` to
see each case's count and its ops.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lit_probe
from lit_probe import ProbeSession

LIT_PROBE_DIR = str(Path(lit_probe.__file__).resolve().parent)

# ---------------------------------------------------------------------------------------------------------
# Bounds: aten ops dispatched by the probe per observed tensor, on the MLP below (Linear + ReLU, [8, 32]).
#   *_ALL counts every aten op, views included (select / detach / view: no kernel, but host time);
#   *_COMPUTE counts the ops that are not views (a kernel each on a GPU).
# Counts per observed tensor (torch 2.14, CPU). Before the stats rewrite (80c9497): sentinel 6.0 ops (detach,
# select x4, aminmax.out), reused module 8.0, bf16 7.0 with a full-size float32 copy, full 19.0. Now: sentinel
# 2.0 (detach, aminmax; the 0-d results are folded into the ring by ~5 ops per STEP, not per tensor), reused 2.0,
# bf16 2.0 with no copy, full 19.0 (compute 10.5). The bounds are these counts: a change that adds ops fails here.
# ---------------------------------------------------------------------------------------------------------
SENTINEL_ALL_OPS_PER_TENSOR = 2.0
SENTINEL_COMPUTE_OPS_PER_TENSOR = 1.0
FULL_ALL_OPS_PER_TENSOR = 19.0
FULL_COMPUTE_OPS_PER_TENSOR = 10.5
REUSED_ALL_OPS_PER_TENSOR = 2.0
REUSED_COMPUTE_OPS_PER_TENSOR = 1.0
BF16_SENTINEL_ALL_OPS_PER_TENSOR = 2.0
BF16_SENTINEL_COMPUTE_OPS_PER_TENSOR = 1.0


# ---------------------------------------------------------------------------------------------------------
# Instruments
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Op:
    name: str
    is_view: bool
    probe: bool  # dispatched from inside lit_probe
    in_dtype: Optional[torch.dtype]  # of the first tensor argument
    in_numel: int
    out_dtype: Optional[torch.dtype]  # of the first tensor output
    out_numel: int


def _first_tensor(obj: Any) -> Optional[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (list, tuple)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def _from_probe() -> bool:
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_filename.startswith(LIT_PROBE_DIR):
            return True
        f = f.f_back
    return False


class OpLog(TorchDispatchMode):
    """Records every aten op dispatched while active (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Op] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        tin = _first_tensor(args)
        tout = _first_tensor(out)
        self.ops.append(Op(str(func), bool(getattr(func, "is_view", False)), _from_probe(),
                           tin.dtype if tin is not None else None, tin.numel() if tin is not None else 0,
                           tout.dtype if tout is not None else None, tout.numel() if tout is not None else 0))
        return out

    @property
    def probe_ops(self) -> list[Op]:
        return [o for o in self.ops if o.probe]


def count_observed(model: nn.Module, names: list[str], step_fn: Any) -> int:
    """Tensors a probe on ``names`` observes in ``step_fn()``: floating outputs, plus their gradients."""
    n = [0]
    handles = []

    def fwd(mod: nn.Module, inp: Any, out: Any) -> None:
        outs = out if isinstance(out, (list, tuple)) else [out]
        for t in outs:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                n[0] += 1 + int(t.requires_grad)

    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(fwd))
    try:
        step_fn()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    return n[0]


# ---------------------------------------------------------------------------------------------------------
# The one place that knows ProbeSession's API (it may change: adapt here only)
# ---------------------------------------------------------------------------------------------------------


def make_session(model: nn.Module, probes: list[str]) -> Any:
    """A session on ``probes`` (hooks attached, not collecting), statistics every 10 steps, no warm-up."""
    kwargs: dict[str, Any] = {"every_n_steps": 10}
    if "full_warmup_steps" in inspect.signature(ProbeSession.__init__).parameters:
        kwargs["full_warmup_steps"] = 0
    session = ProbeSession.from_model(model, probes, **kwargs)
    session.open()
    return session


def begin_step(session: Any, step: int, full: bool) -> None:
    """Start training step ``step``: ``full`` statistics, or the sentinel (min/max) only."""
    if "full" in inspect.signature(session.begin_step).parameters:
        session.begin_step(step, full=full)
    else:  # multiples of every_n_steps (10) take full statistics
        session.begin_step(step * 10 if full else step * 10 + 1)


def end_step(session: Any) -> None:
    session.end_step()


def close_session(session: Any) -> None:
    session.flush()
    session.close()


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mlp(blocks: int = 4, width: int = 32) -> Net:
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return Net(nn.Sequential(*layers))


class Reused(nn.Module):
    """``shared`` runs twice per forward."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.shared = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.shared(torch.relu(self.shared(self.inp(x))))))


def _step_fn(model: nn.Module, x: torch.Tensor, autocast: bool = False) -> Any:
    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = model(x)
        y.float().square().mean().backward()

    return run


def measure(model: nn.Module, probes: list[str], full: bool, x: torch.Tensor,
            autocast: bool = False) -> tuple[list[Op], int]:
    """The probe's ops in one (warm) step, and the number of tensors it observed."""
    torch.manual_seed(0)
    run = _step_fn(model, x, autocast)
    session = make_session(model, probes)
    log = OpLog()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        try:
            observed = count_observed(model, list(session.names), run)  # not collecting yet
            for step, warm_full in enumerate((True, False)):  # buffers and unit windows are made here
                begin_step(session, step, warm_full)
                run()
                end_step(session)
            model.zero_grad(set_to_none=True)
            begin_step(session, 2, full)
            with log:
                run()
            end_step(session)
        finally:
            close_session(session)
    # a hook that raises is disabled with a RuntimeWarning (and would count fewer ops)
    assert not [w for w in caught if "lit_probe" in str(w.message)], [str(w.message) for w in caught]
    model.zero_grad(set_to_none=True)
    return log.probe_ops, observed


def per_tensor(ops: list[Op], observed: int) -> tuple[float, float]:
    assert observed > 0
    return len(ops) / observed, sum(not o.is_view for o in ops) / observed


def _summary(ops: list[Op]) -> str:
    counts: dict[str, int] = {}
    for o in ops:
        counts[o.name] = counts.get(o.name, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------

X = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))


def test_counter_sees_forward_and_backward_and_attributes_the_probe() -> None:
    model = mlp(2)
    log = OpLog()
    with log:
        _step_fn(model, X)()
    names = {o.name for o in log.ops}
    assert "aten.addmm.default" in names and "aten.mm.default" in names  # forward and backward
    assert not log.probe_ops  # no probe attached: nothing is attributed to lit_probe
    ops, observed = measure(model, ["net.**"], False, X)
    assert observed == 2 * 4  # 4 modules, an output and a gradient each
    assert any("aminmax" in o.name for o in ops)


def test_sentinel_step_ops_per_tensor() -> None:
    ops, observed = measure(mlp(4), ["net.**"], False, X)
    all_ops, compute = per_tensor(ops, observed)
    msg = f"{all_ops:.2f} ops/tensor ({compute:.2f} compute): {_summary(ops)}"
    print("sentinel:", msg)
    assert all_ops <= SENTINEL_ALL_OPS_PER_TENSOR, msg
    assert compute <= SENTINEL_COMPUTE_OPS_PER_TENSOR, msg


def test_full_step_ops_per_tensor() -> None:
    ops, observed = measure(mlp(4), ["net.**"], True, X)
    all_ops, compute = per_tensor(ops, observed)
    msg = f"{all_ops:.2f} ops/tensor ({compute:.2f} compute): {_summary(ops)}"
    print("full:", msg)
    assert all_ops <= FULL_ALL_OPS_PER_TENSOR, msg
    assert compute <= FULL_COMPUTE_OPS_PER_TENSOR, msg
    sentinel, _ = measure(mlp(4), ["net.**"], False, X)
    assert len(ops) > len(sentinel)  # full statistics do take more


def test_reused_module_ops_per_tensor() -> None:
    model = Reused()
    ops, observed = measure(model, ["shared"], False, X)
    assert observed == 4  # two calls: two outputs, two gradients
    all_ops, compute = per_tensor(ops, observed)
    msg = f"{all_ops:.2f} ops/tensor ({compute:.2f} compute): {_summary(ops)}"
    print("reused:", msg)
    assert all_ops <= REUSED_ALL_OPS_PER_TENSOR, msg
    assert compute <= REUSED_COMPUTE_OPS_PER_TENSOR, msg


def _fp32_copies_of_bf16(ops: list[Op]) -> list[Op]:
    """Ops that make a float32 tensor as large as their bf16 input (a full-size upcast)."""
    return [o for o in ops if o.in_dtype == torch.bfloat16 and o.out_dtype == torch.float32
            and o.out_numel == o.in_numel and o.in_numel > 1]


def test_bf16_autocast_sentinel_ops_per_tensor() -> None:
    model = mlp(4)
    ops, observed = measure(model, ["net.**"], False, X, autocast=True)
    assert observed == 2 * 8
    assert any(o.in_dtype == torch.bfloat16 for o in ops)  # the probe did observe bf16 tensors
    all_ops, compute = per_tensor(ops, observed)
    msg = f"{all_ops:.2f} ops/tensor ({compute:.2f} compute): {_summary(ops)}"
    print("bf16 sentinel:", msg)
    assert all_ops <= BF16_SENTINEL_ALL_OPS_PER_TENSOR, msg
    assert compute <= BF16_SENTINEL_COMPUTE_OPS_PER_TENSOR, msg


def test_bf16_sentinel_makes_no_full_size_float32_copy() -> None:
    model = mlp(4)
    ops, observed = measure(model, ["net.**"], False, X, autocast=True)
    copies = _fp32_copies_of_bf16(ops)
    assert not copies, f"{len(copies)} full-size bf16 -> float32 copies for {observed} tensors: {_summary(copies)}"
