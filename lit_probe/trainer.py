"""Trainer
=======

What the callback reads from a Lightning ``Trainer`` (duck-typed: the same for ``lightning.pytorch`` and
``pytorch_lightning``): the strategy (supported or not, and its all-gather for cross-rank statistics), the loss
scale of a GradScaler, where a step ends, the images of a batch; and findings as checkpoint-safe primitives.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ProbeConfigError
from .findings import Finding

__all__ = ["NoTrainer", "check_strategy", "strategy_gather", "finding_state", "first_images", "is_last_batch",
           "scaler_scale"]

#: Strategies whose module wrapping the probe does not follow yet (sharded parameters and outputs).
UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel", "XLA")


class NoTrainer:
    """A stand-in trainer for the last flush at fit end (nothing left to stop)."""

    should_stop = False


def check_strategy(trainer: Any) -> None:
    name = type(getattr(trainer, "strategy", None)).__name__
    if any(word in name for word in UNSUPPORTED_STRATEGIES):
        raise ProbeConfigError(
            f"lit_probe does not support the {name} strategy yet: sharded modules and outputs are not followed. "
            "It works on one device and with DDP (`strategy='ddp'`, `'ddp_spawn'`, `'ddp_notebook'`, "
            "`'ddp_find_unused_parameters_true'`), on CPU and GPU; see the README's compatibility table.")


def strategy_gather(trainer: Any) -> Any:
    """Every rank's packed statistics through ``trainer.strategy.all_gather`` (two collectives: sizes, data)."""
    import torch

    strategy = trainer.strategy
    device = strategy.root_device

    def gather(vec: np.ndarray) -> list[np.ndarray]:
        t = torch.as_tensor(vec, dtype=torch.float64).to(device)
        sizes = strategy.all_gather(torch.tensor([t.numel()], device=device)).reshape(-1).cpu().tolist()
        padded = torch.zeros(int(max(sizes)), dtype=torch.float64, device=device)
        padded[:t.numel()] = t
        rows = strategy.all_gather(padded).reshape(len(sizes), -1).cpu().numpy()
        return [rows[r, :int(n)] for r, n in enumerate(sizes)]

    return gather


def finding_state(f: Finding) -> dict:
    """A Finding as checkpoint-safe primitives (loads with ``weights_only=True``)."""
    return {"step": int(f.step), "layer": f.layer, "signal": f.signal, "kind": f.kind, "value": float(f.value),
            "threshold": float(f.threshold), "message": f.message, "stat": f.stat, "incident": int(f.incident),
            "cause": bool(f.cause)}


def first_images(batch: Any, n: int) -> Any:
    """The first ``[N, C, H, W]`` floating tensor of a batch (images), its first ``n`` samples."""
    from .hooks import iter_tensors

    for t in iter_tensors(batch):
        if t.dim() == 4 and t.shape[1] in (1, 3, 4):
            return t[:n].detach()
    return None


def is_last_batch(trainer: Any, batch_idx: int) -> bool:
    n = trainer.num_training_batches
    return isinstance(n, int) and batch_idx + 1 >= n


def scaler_scale(trainer: Any) -> Any:
    """The GradScaler's scale tensor (a device tensor: reading it costs no host sync), if any."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return None
    import torch

    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, torch.Tensor) else None
