"""Gradient reference
==================

What the vanishing rule needs whatever is probed: at each full-statistics optimizer step, the parameter-gradient
norm where the backward pass ends (the model's input end) and the largest per-module parameter-gradient norm of
the whole model. Both come from every module of the model that owns trainable parameters, probed or not, so a
probe list of Linear layers alone (or of one layer) still has a normal reference below it.

* *input end*: the largest own-parameter gradient norm of the first :data:`INPUT_END_MODULES` modules, in
  registration order, that own trainable parameters and got a gradient (an embedding, a stem convolution, a
  ViT's class token and patch projection). In a vanishing stack they are the smallest of the model (1e-7 to
  1e-13 of the largest, measured on a 30-layer tanh MLP and a 15-layer sigmoid stack); in healthy torchvision,
  Hugging Face BERT / GPT-2 models at least 0.17 of it (see README, the vanishing rule).
* *top*: the largest own-parameter gradient norm over the model's modules.

One fused ``torch._foreach_norm`` over the model's gradients per full-statistics step; the two values stay on
the device until :meth:`GradReference.take` copies them with the flush.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from .vocab import local_tensor

__all__ = ["GradReference", "INPUT_END_MODULES"]

#: Modules (with trainable parameters, in registration order) that make up the input end of the model.
INPUT_END_MODULES = 2


class GradReference:
    """Per full-statistics step, ``(input end, top)`` parameter-gradient norms of a whole model.

    Args:
        root: the model (every module under it that owns trainable parameters counts, probed or not).
    """

    def __init__(self, root: nn.Module) -> None:
        self.modules: list[list[nn.Parameter]] = []
        self.names: list[str] = []
        seen: set[int] = set()
        for name, m in root.named_modules():
            own = [p for p in m.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in own)
            if own:
                self.modules.append(own)
                self.names.append(name)
        self._pending: dict[int, torch.Tensor] = {}
        self._had_grad: set[int] = set()

    @property
    def with_gradient(self) -> set[str]:
        """The modules (paths under the root) whose own parameters had a gradient at a measured step."""
        return {self.names[k] for k in self._had_grad}

    def measure(self, step: int) -> None:
        """Measure the current gradients for ``step`` (once per step: later calls at that step do nothing)."""
        if step in self._pending or not self.modules:
            return
        grads: list[torch.Tensor] = []
        owner: list[int] = []
        for k, params in enumerate(self.modules):
            for p in params:
                g = local_tensor(p.grad)  # a DTensor's (FSDP2, tensor parallel) local shard
                if g is None:
                    continue
                if hasattr(g, "to_local"):  # a DTensor shard (FSDP2, tensor parallel): this rank's piece
                    g = g.to_local()
                grads.append(g.coalesce().values() if g.is_sparse else g)
                owner.append(k)
        if not grads:
            return
        self._had_grad.update(owner)
        device = grads[0].device
        norms = torch.stack([n.to(device).float() for n in torch._foreach_norm(grads)])
        present = {k: j for j, k in enumerate(dict.fromkeys(owner))}  # modules with a gradient, in order
        index = torch.tensor([present[k] for k in owner], device=device)
        sq = torch.zeros(len(present), device=device).index_add_(0, index, norms * norms)
        per_module = sq.sqrt()
        self._pending[int(step)] = torch.stack([per_module[:INPUT_END_MODULES].max(), per_module.max()])

    def take(self, steps: Iterable[int] | None = None) -> dict[int, tuple[float, float]]:
        """The measured steps (all, or those in ``steps``) as ``{step: (input end, top)}``, dropped from the
        device (one copy)."""
        keys = sorted(self._pending) if steps is None else sorted(set(int(s) for s in steps) & set(self._pending))
        if not keys:
            return {}
        values = torch.stack([self._pending.pop(k) for k in keys]).detach().cpu().numpy().astype(np.float64)
        return {k: (float(v[0]), float(v[1])) for k, v in zip(keys, values)}

    def drop_before(self, step: int) -> None:
        """Forget steps before ``step`` (never flushed: bounded memory)."""
        for k in [k for k in self._pending if k < step]:
            del self._pending[k]
