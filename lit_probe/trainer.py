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

__all__ = ["check_strategy", "strategy_gather", "tensor_parallel_size", "is_last_batch", "scaler_scale"]

#: Strategies the probe refuses, and why: each wraps the model's modules or parameters in a way the probe's
#: names, hooks or parameter norms do not follow (``ModelParallelStrategy``, FSDP2 and tensor parallelism, is
#: supported).
UNSUPPORTED_STRATEGIES = {
    "FSDPStrategy": "FSDP1 flattens each wrapped module's parameters into one FlatParameter, so a layer's own "
                    "weights and gradients are not its tensors any more",
    "DeepSpeedStrategy": "DeepSpeed partitions parameters and gradients into its own flat buffers (ZeRO) and "
                         "runs the optimizer step itself",
    "XLA": "XLA traces the step lazily: the probe's per-step reductions would force graph breaks",
}
_WORKS = ("It works on one device, with DDP (`strategy='ddp'`, `'ddp_spawn'`, `'ddp_notebook'`, "
          "`'ddp_find_unused_parameters_true'`) and with `ModelParallelStrategy` (FSDP2's `fully_shard` and tensor "
          "parallelism's `parallelize_module` in `configure_model`), on CPU and GPU; see the README's "
          "compatibility table.")


def check_strategy(trainer: Any) -> None:
    """A ``ProbeConfigError`` under a strategy whose module wrapping the probe does not follow (a Trainer's or a
    Fabric's), naming what works instead."""
    names = [c.__name__ for c in type(getattr(trainer, "strategy", None)).__mro__]
    for word, why in UNSUPPORTED_STRATEGIES.items():
        hit = next((n for n in names if word in n), None)
        if hit is not None:
            extra = (" For sharded data parallelism use `ModelParallelStrategy` with `fully_shard` (FSDP2) in "
                     "`configure_model`: the probe measures it exactly." if word != "XLA" else "")
            raise ProbeConfigError(f"lit_probe does not support the {type(trainer.strategy).__name__} strategy: "
                                   f"{why}.{extra} {_WORKS}")


def tensor_parallel_size(trainer: Any) -> int:
    """The size of the tensor-parallel dimension of a ``ModelParallelStrategy``'s device mesh (1 otherwise): the
    ranks of one such group see the same samples (:func:`lit_probe.stats.merge_ranks`)."""
    mesh = getattr(getattr(trainer, "strategy", None), "_device_mesh", None)
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if mesh is None or "tensor_parallel" not in names:
        return 1
    return int(mesh["tensor_parallel"].size())


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
