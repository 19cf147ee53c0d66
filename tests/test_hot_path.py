"""The hot path never reads a value back to the host on steps that do not log (untimed; counts calls)."""

from __future__ import annotations

import os
import sys

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

import lit_probe
from lit_probe import FeatureProbe
from models import Classifier, TinyCNN, make_loader, trainer

PKG = os.path.dirname(lit_probe.__file__)


class SyncCounter(pl.Callback):
    """Counts host reads made from lit_probe code, per training step."""

    def __init__(self):
        self.step = None
        self.by_step: dict[int, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.global_step

    def hit(self):
        f = sys._getframe(2)
        while f is not None:
            if f.f_code.co_filename.startswith(PKG):
                self.by_step[self.step] = self.by_step.get(self.step, 0) + 1
                return
            f = f.f_back


@pytest.mark.parametrize("every_n_steps", [1, 3])
def test_no_host_read_on_steps_that_do_not_log(tmp_path, monkeypatch, every_n_steps):
    counter = SyncCounter()
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, **k):
            counter.hit()
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    probe = FeatureProbe(probes=["net.**"], every_n_steps=every_n_steps, log_every_n_steps=4,
                         figure_every_n_steps=None, save_dir=str(tmp_path / "p"))
    # the counter runs first so that it knows the step before the probe's hooks fire
    t = trainer(tmp_path, callbacks=[counter, probe], max_steps=12)
    t.fit(Classifier(TinyCNN()), make_loader(n=16 * 12, image=(3, 8, 8)))
    log_steps = {3, 7, 11}
    reads = {s: n for s, n in counter.by_step.items() if s not in log_steps}
    assert reads == {}, f"lit_probe read tensors on non-logging steps: {reads}"
    assert any(counter.by_step.get(s) for s in log_steps)  # the one copy per log step is seen
    assert len(probe.session.history) == 12


class _Split(nn.Module):
    """One autograd node, two outputs (``output_nr`` 0 and 1)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.chunk(2, dim=1)


class _Token(nn.Module):
    """Returns its parameter: a leaf output, no autograd node (a tensor hook)."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.p


class _Nodes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.split, self.ident = nn.Linear(8, 8), _Split(), nn.Identity()
        self.mid, self.token, self.out = nn.Linear(4, 4), _Token(), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.split(self.inp(x))
        h = self.mid(self.ident(a))  # Identity returns `a` itself: two modules, one node output
        h += b * self.token(x)  # in place after `mid`: its gradient is the one of its own output
        h.mul_(3.0)
        return self.out(torch.tanh(h))


def test_gradient_hooks_on_autograd_nodes_are_the_tensor_hooks_gradients():
    """The gradient hooks sit on the outputs' autograd nodes (a multi-output node, an output shared by two modules,
    an in-place op after the module) or, for a leaf output, on the tensor (removed when the next step begins: a
    parameter outlives the step): each stream's gradient statistics over 3 steps are those of plain
    ``Tensor.register_hook`` hooks (the oracle, registered by this test), and the parameter keeps no hook."""
    from lit_probe import ProbeSession
    from lit_probe.history import STATS

    torch.manual_seed(0)
    model = _Nodes()
    names = ["inp", "split", "ident", "mid", "token", "out"]
    oracle: dict[str, list[torch.Tensor]] = {}

    leaves: list = []

    def fwd(name):
        def hook(module, inputs, output):
            for t in (output if isinstance(output, tuple) else (output,)):
                h = t.register_hook(lambda g, name=name: oracle[name].append(g.detach().clone()))
                if t.is_leaf:
                    leaves.append(h)
        return hook

    handles = [model.get_submodule(n).register_forward_hook(fwd(n)) for n in names]
    session = ProbeSession.from_model(model, names, every_n_steps=1).open()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    want: list[dict[str, tuple[float, float, float, int]]] = []
    try:
        for step in range(1, 4):
            oracle = {n: [] for n in names}
            session.begin_step(step, full=True)
            model(torch.randn(5, 8)).square().mean().backward()
            session.end_step()
            opt.step()
            opt.zero_grad()
            for h in leaves:  # the oracle's hook on the parameter must not outlive the step either
                h.remove()
            leaves.clear()
            want.append({n: (min(g.min().item() for g in gs), max(g.max().item() for g in gs),
                             sum(g.square().sum().item() for g in gs) ** 0.5, len(gs)) for n, gs in oracle.items()})
        session.flush()
        _, v = session.history.window()
        assert v.shape[0] == 3
        for k, row in enumerate(want):
            for n, (mn, mx, l2, calls) in row.items():
                got = v[k, session.slot_of(n, "gradient")]
                assert got[STATS.index("calls")] == calls, (n, k)
                assert got[STATS.index("min")] == pytest.approx(mn, rel=1e-5, abs=1e-7), (n, k)
                assert got[STATS.index("max")] == pytest.approx(mx, rel=1e-5, abs=1e-7), (n, k)
                assert got[STATS.index("l2")] == pytest.approx(l2, rel=1e-4), (n, k)
        assert len(model.token.p._backward_hooks) == 1  # this step's only
        session.close()
        assert not model.token.p._backward_hooks  # none of the probe's hooks is left on the parameter
    finally:
        session.close()
        for h in handles:
            h.remove()
