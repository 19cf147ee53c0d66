"""The same model, data and injected bug driven by four training loops: plain PyTorch, Lightning Fabric (one
process, or DDP with ``python loops.py fabric-ddp OUT``), and a ``Trainer`` of either Lightning package.

The bug: ``net.2`` (a :class:`Poison` after ``Linear``/``ReLU``) divides by zero at step :data:`BUG_STEP`, so the
first incident's cause is a non-finite activation of ``net.2`` at that step, whatever drives the loop.
Each runner returns the probe's findings and writes the probe's files to ``out``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

BUG_STEP = 6
STEPS = 10
PROBES = ["net.**"]
#: Options every loop uses: figures every 5 steps, all of them drawn (no timeout), so the files can be compared.
OPTIONS = dict(figure_every_n_steps=5, figure_wait_s=None, max_figure_layers=None, log_to_wandb=False,
               log_every_n_steps=5)


class Poison(nn.Module):
    """Divides by zero on its ``BUG_STEP``-th training call (one call per step in every loop here)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == BUG_STEP + 1:
                return x / 0
        return x


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), Poison(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def loader(batch_size: int = 16) -> DataLoader:
    """:data:`STEPS` batches of 16 samples (of ``batch_size`` per process under DDP)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * 16, 16, generator=g)
    y = torch.randint(0, 4, (STEPS * 16,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def run_plain(out: Path) -> list:
    from lit_probe import ProbeRun

    model = Model()
    opt = optimizer(model)
    with ProbeRun(model, PROBES, optimizers=[opt], save_dir=str(out), **OPTIONS) as run:
        for x, y in loader():
            with run.step(batch=x):
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
    return run.findings


def run_fabric(out: Path, devices: int = 1, strategy: str = "auto") -> list:
    from lightning.fabric import Fabric

    from lit_probe.fabric import probe_fabric

    fabric = Fabric(accelerator="cpu", devices=devices, strategy=strategy)
    fabric.launch()
    model = Model()
    opt = optimizer(model)
    model, opt = fabric.setup(model, opt)
    data = fabric.setup_dataloaders(loader(batch_size=16 // devices))
    with probe_fabric(fabric, model, PROBES, optimizers=[opt], save_dir=str(out), **OPTIONS) as run:
        for x, y in data:
            with run.step(batch=x):
                loss = nn.functional.cross_entropy(model(x), y)
                fabric.backward(loss)
                opt.step()
                opt.zero_grad()
    return run.findings


def run_trainer(out: Path, package: str) -> list:
    pl = importlib.import_module("lightning.pytorch" if package == "lightning" else package)
    FeatureProbe = importlib.import_module(f"lit_probe.{package}").FeatureProbe

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return optimizer(self)

    probe = FeatureProbe(probes=PROBES, save_dir=str(out), **OPTIONS)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, callbacks=[probe], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(out.parent), num_sanity_val_steps=0)
    trainer.fit(Module(), loader())
    return probe.findings


if __name__ == "__main__":  # python loops.py fabric-ddp OUT: Fabric's ddp launcher re-runs this for rank 1
    import json
    import warnings

    warnings.simplefilter("ignore")
    kind, out = sys.argv[1], Path(sys.argv[2])
    assert kind == "fabric-ddp", kind
    found = run_fabric(out, devices=2, strategy="ddp")
    rank = int(torch.distributed.get_rank()) if torch.distributed.is_initialized() else 0
    (out.parent / f"rank{rank}.json").write_text(json.dumps([f.to_dict() for f in found]))
