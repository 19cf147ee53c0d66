"""Trainer
=======

What the adapters read from a Lightning ``Trainer`` or ``Fabric`` (duck-typed: the same for ``lightning.pytorch``,
``pytorch_lightning`` and ``lightning.fabric``): the strategy (supported or not, and its all-gather for cross-rank
statistics), the loss scale of a GradScaler, where a step ends.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ProbeConfigError

__all__ = ["check_strategy", "strategy_gather", "is_last_batch", "scaler_scale"]

#: Strategies whose module wrapping the probe does not follow yet (sharded parameters and outputs).
UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel", "XLA")


def check_strategy(trainer: Any) -> None:
    """A ``ProbeConfigError`` under a strategy whose module wrapping the probe does not follow (a Trainer's or a
    Fabric's)."""
    name = type(getattr(trainer, "strategy", None)).__name__
    if any(word in name for word in UNSUPPORTED_STRATEGIES):
        raise ProbeConfigError(
            f"lit_probe does not support the {name} strategy yet: sharded modules and outputs are not followed. "
            "It works on one device and with DDP (`strategy='ddp'`, `'ddp_spawn'`, `'ddp_notebook'`, "
            "`'ddp_find_unused_parameters_true'`), on CPU and GPU; see the README's compatibility table.")


def strategy_gather(strategy: Any) -> Any:
    """Every rank's packed statistics through a Lightning or Fabric strategy's ``all_gather`` (two collectives:
    sizes, data)."""
    import torch

    device = strategy.root_device

    def gather(vec: np.ndarray) -> list[np.ndarray]:
        t = torch.as_tensor(vec, dtype=torch.float64).to(device)
        sizes = strategy.all_gather(torch.tensor([t.numel()], device=device)).reshape(-1).cpu().tolist()
        padded = torch.zeros(int(max(sizes)), dtype=torch.float64, device=device)
        padded[:t.numel()] = t
        rows = strategy.all_gather(padded).reshape(len(sizes), -1).cpu().numpy()
        return [rows[r, :int(n)] for r, n in enumerate(sizes)]

    return gather


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
