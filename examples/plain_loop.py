"""A plain PyTorch training loop with lit-probe: ``ProbeRun`` gives the same findings, figures, ``run.json``,
``summary.md`` and ``report.html`` as the Lightning callback.

The model has a bug: the second block's bias is -20, so its ReLU never fires (a dead layer, found once its
20-step window has been seen).

To run: python examples/plain_loop.py [--out lit_probe_runs/plain_loop] [--steps 40]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from lit_probe import ProbeRun


def build() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    with torch.no_grad():
        net[2].bias.fill_(-20.0)  # the bug
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("lit_probe_runs/plain_loop"))
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    with ProbeRun(model, ["*"], optimizers=[opt], save_dir=str(args.out / "probe"), figure_every_n_steps=20,
                  log_every_n_steps=10) as run:
        for _ in range(args.steps):
            x, y = torch.randn(32, 32, generator=g), torch.randint(0, 4, (32,), generator=g)
            with run.step(batch=x):
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
    for inc in run.incidents:
        print(f"incident: {inc.kind} {inc.signal} at {inc.layer}, step {inc.step}")
    print(f"report: {args.out / 'probe' / 'report.html'}")


if __name__ == "__main__":
    main()
