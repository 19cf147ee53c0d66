"""Fabric
======

:func:`probe_fabric`: a :class:`~lit_probe.run.ProbeRun` wired to a Lightning ``Fabric``: its loggers, rank zero
writing, its strategy's all-gather for statistics across processes (Fabric DDP), and the GradScaler of its
mixed precision. The loop calls the run's verbs::

    fabric = L.Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    model, opt = fabric.setup(model, opt)
    with probe_fabric(fabric, model, ["layer1", "layer3.*"], optimizers=[opt]) as run:
        for x, y in loader:
            with run.step(batch=x):
                loss = loss_fn(model(x), y)
                fabric.backward(loss)
                opt.step()
                opt.zero_grad()

Nothing here imports Lightning: the Fabric object is duck-typed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from .run import ProbeRun
from .trainer import check_strategy, strategy_gather, tensor_parallel_size

__all__ = ["probe_fabric"]


def probe_fabric(fabric: Any, model: Any, probes: Optional[Sequence[str]] = None, *,
                 optimizers: Sequence[Any] = (), **options: Any) -> ProbeRun:
    """A :class:`~lit_probe.run.ProbeRun` over ``model`` (the module or what ``fabric.setup`` returned; names are
    relative to your module) for a loop driven by ``fabric``.

    Args:
        fabric: a launched ``lightning.fabric.Fabric``.
        model: the model (a ``_FabricModule`` is unwrapped to your module).
        probes: module paths and patterns, as for :class:`~lit_probe.FeatureProbe`.
        optimizers: the optimizers (Fabric's wrappers are fine), for the parameter signal; their steps are hooked.
        **options: the options of :class:`~lit_probe.FeatureProbe` (``save_dir`` defaults to the first logger's
            ``log_dir``/probe, else ``./probe``).
    """
    check_strategy(fabric)
    if type(model).__name__ == "_FabricModule":
        model = model.module
    many = fabric.world_size > 1
    strategy = fabric.strategy
    log_dir = next((getattr(lg, "log_dir", None) for lg in fabric.loggers if getattr(lg, "log_dir", None)), None)
    scaler = getattr(getattr(strategy, "precision", None), "scaler", None)
    return ProbeRun(model, probes, optimizers=optimizers, loggers=list(fabric.loggers), loss_scale=scaler,
                    gather=strategy_gather(strategy) if many else None, tensor_parallel=tensor_parallel_size(fabric),
                    reduce_any=(lambda d: strategy.reduce_boolean_decision(d, all=False)) if many else None,
                    is_zero=fabric.is_global_zero, default_save_dir=str(Path(log_dir or ".") / "probe"), loop="fabric",
                    **options)
