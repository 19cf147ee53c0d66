"""A Lightning Fabric training loop with lit-probe: ``probe_fabric`` wires a ``ProbeRun`` to the Fabric (its
loggers, rank zero writing, statistics merged across processes under Fabric DDP).

The model has a bug: a division by zero in ``net.2`` at step 5 (NaN/Inf from there, found at that layer and step).

To run: python examples/fabric_loop.py [--out lit_probe_runs/fabric_loop] [--steps 12] [--devices 1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from lightning.fabric import Fabric
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_probe.fabric import probe_fabric


class DivideAt(nn.Module):
    """Divides by zero on its 6th training call (step 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += self.training
        return x / 0 if self.calls == 6 else x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("lit_probe_runs/fabric_loop"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()
    fabric = Fabric(accelerator="cpu", devices=args.devices)
    fabric.launch()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), DivideAt(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model, opt = fabric.setup(model, opt)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16 * args.steps, 16, generator=g), torch.randint(0, 4, (16 * args.steps,),
                                                                                     generator=g))
    loader = fabric.setup_dataloaders(DataLoader(data, batch_size=16))
    with probe_fabric(fabric, model, ["*"], optimizers=[opt], save_dir=str(args.out / "probe"),
                      figure_every_n_steps=None, log_every_n_steps=4) as run:
        for x, y in loader:
            with run.step(batch=x):
                fabric.backward(nn.functional.cross_entropy(model(x), y))
                opt.step()
                opt.zero_grad()
    if fabric.is_global_zero:
        for inc in run.incidents:
            print(f"incident: {inc.kind} {inc.signal} at {inc.layer}, step {inc.step}")
        print(f"files: {args.out / 'probe'}")


if __name__ == "__main__":
    main()
