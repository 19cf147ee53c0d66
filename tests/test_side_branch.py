"""A zero-initialised side branch that stays zero (issue 21): a LoRA layer ``base(x) + B(A(x))`` with ``B = 0`` at
init, beside a healthy path.

What the data says (plain PyTorch, this model, Adam 1e-2): the gradient reaching the branch's ``A`` output is
``B^T g``, exactly 0 while ``B`` is 0; once ``B`` learns it is 0.04-0.23 of the gradient at the join (steps 1-39).
A stuck branch (``B``'s parameter group at ``lr=0``) keeps it exactly 0: a *blocked* gradient, not a small one, so
no gradient-ratio rule separates it from LayerScale (1e-6 at init) or attention q/k (4e-6 of the step's largest on
BERT) without flagging those. Its signature is in the parameters: ``B``'s weights stay exactly 0 while its
gradient is not, so it has no update ratio (``||W|| = 0``) and the update-ratio rules never saw it. The
``not_learning`` rule now names it; a branch that learns stays silent. Ground truth from a plain-PyTorch run.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_probe import FeatureProbe
from models import Classifier, make_loader, make_trainer

STEPS = 60


class LoRALinear(nn.Module):
    def __init__(self, d: int, rank: int = 4) -> None:
        super().__init__()
        self.base = nn.Linear(d, d)
        self.lora_A = nn.Linear(d, rank, bias=False)
        self.lora_B = nn.Linear(rank, d, bias=False)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x))


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), LoRALinear(64), nn.ReLU(), nn.Linear(64, 4))


def _optimizer(net: nn.Module, b_lr: float) -> torch.optim.Optimizer:
    b = net[2].lora_B.weight
    return torch.optim.Adam([{"params": [p for p in net.parameters() if p is not b]}, {"params": [b], "lr": b_lr}],
                            lr=1e-2)


class _LoRA(Classifier):
    def __init__(self, b_lr: float) -> None:
        super().__init__(_net())
        self.b_lr = b_lr

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return _optimizer(self.net, self.b_lr)


def _plain(b_lr: float) -> tuple[list[float], list[float]]:
    """Per step of the same run in plain PyTorch: ||B|| before the update and ||dL/dB||."""
    net = _net()
    opt = _optimizer(net, b_lr)
    weights, grads = [], []
    batches = list(make_loader())
    for step in range(STEPS):
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        weights.append(float(net[2].lora_B.weight.norm()))
        grads.append(float(net[2].lora_B.weight.grad.norm()))
        opt.step()
    return weights, grads


def _fit(b_lr: float, tmp_path) -> FeatureProbe:
    torch.set_num_threads(1)
    probe = FeatureProbe(probes=["net.**"], figure_every_n_steps=None, log_every_n_steps=10)
    make_trainer(tmp_path, max_steps=STEPS, callbacks=[probe], log_every_n_steps=10).fit(_LoRA(b_lr), make_loader())
    return probe


def test_a_lora_branch_that_stays_zero_is_not_learning(tmp_path):
    weights, grads = _plain(0.0)
    assert max(weights) == 0.0 and min(grads) > 0  # the truth: B never moves, its gradient is not 0
    probe = _fit(0.0, tmp_path)
    stuck = [f for f in probe.findings if f.kind == "not_learning"]
    assert [f.layer for f in stuck] == ["net.2.lora_B"], [(f.kind, f.layer, f.message) for f in probe.findings]
    assert "still exactly 0" in stuck[0].message and "lr=0" in stuck[0].message, stuck[0].message
    assert not [f for f in probe.findings if f.kind == "vanishing"]  # the blocked A output is not "vanishing"


def test_a_lora_branch_that_learns_is_silent(tmp_path):
    weights, _ = _plain(1e-2)
    assert weights[0] == 0.0 and min(weights[1:]) > 0  # the truth: B starts at 0 and moves at once
    probe = _fit(1e-2, tmp_path)
    assert probe.findings == [], [(f.kind, f.layer, f.message) for f in probe.findings]
