"""Injected training bugs with known ground truth: the probe must name the layer, the signal, the kind and
the step (real ``Trainer.fit`` on CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lit_probe import FeatureProbe
from models import Classifier, make_loader, mlp, trainer


def fit(tmp_path, module, probe, steps, n=None, **kw):
    loader = make_loader(n=n or 16 * steps, batch_size=16)
    t = trainer(tmp_path, callbacks=[probe], max_steps=steps, **kw)
    t.fit(module, loader)
    return t


def kinds(findings, kind):
    return [f for f in findings if f.kind == kind]


@pytest.mark.parametrize("every_n_steps", [1, 10])
def test_large_negative_bias_is_dead_at_that_layer(tmp_path, every_n_steps):
    torch.manual_seed(0)
    net = mlp(depth=3)
    with torch.no_grad():
        net[2].bias.fill_(-100.0)  # the second Linear: its ReLU (net.3) never fires
    probe = FeatureProbe(probes=["net.*"], save_dir=str(tmp_path / "p"), every_n_steps=every_n_steps)
    with pytest.warns(Warning):
        fit(tmp_path, Classifier(net), probe, steps=30)
    dead = {f.layer: f for f in kinds(probe.findings, "dead")}
    # only the ReLU is judged: the Linear before it returns pre-activations (negative is not dead there)
    assert "net.3" in dead and "net.2" not in dead, probe.findings
    assert dead["net.3"].value == 1.0 and dead["net.3"].signal == "activation"
    assert dead["net.3"].step <= 30
    assert "net.1" not in dead and "net.0" not in dead  # the layers before it stay alive
    lines = (tmp_path / "p" / "findings.jsonl").read_text().splitlines()
    assert any(json.loads(line)["layer"] == "net.3" and json.loads(line)["kind"] == "dead" for line in lines)


class ScaleAt(Classifier):
    """Multiplies the weight of ``net[idx]`` by ``factor`` just before step ``k``."""

    def __init__(self, net, idx, k, factor):
        super().__init__(net, lr=0.0)
        self.idx, self.k, self.factor = idx, k, factor

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step == self.k:
            with torch.no_grad():
                self.net[self.idx].weight.mul_(self.factor)


def test_weight_scaled_by_1e6_is_exploding_from_that_step(tmp_path):
    torch.manual_seed(0)
    probe = FeatureProbe(probes=["net.*"], save_dir=str(tmp_path / "p"), on_finding="warn")
    with pytest.warns(Warning):
        fit(tmp_path, ScaleAt(mlp(depth=3), idx=2, k=12, factor=1e6), probe, steps=20)
    first = kinds(probe.findings, "exploding")[0]
    assert (first.layer, first.signal, first.step) == ("net.2", "activation", 12), probe.findings
    assert not [f for f in kinds(probe.findings, "exploding") if f.step < 12]


class NaNAt(nn.Module):
    def __init__(self, dim, k):
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.k = k
        self.step = 0

    def forward(self, x):
        y = self.lin(x)
        if self.step == self.k:
            y = y / torch.zeros_like(y[:1])  # a real division by zero inside this module
        return y


class StepAware(Classifier):
    def training_step(self, batch, batch_idx):
        for m in self.modules():
            if isinstance(m, NaNAt):
                m.step = self.global_step
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("log_every", [1, 50])
def test_nan_is_nonfinite_at_that_layer_and_step_first(tmp_path, log_every):
    torch.manual_seed(0)
    net = mlp(depth=3)
    net[2] = NaNAt(32, k=9)
    probe = FeatureProbe(probes=["net.*"], save_dir=str(tmp_path / "p"), every_n_steps=10,
                         log_every_n_steps=log_every)
    with pytest.warns(Warning):
        fit(tmp_path, StepAware(net), probe, steps=15)
    nf = kinds(probe.findings, "nonfinite")
    assert nf, probe.findings
    assert (nf[0].layer, nf[0].signal, nf[0].step) == ("net.2", "activation", 9)
    assert probe.findings[0] == nf[0]  # the first finding reported is the root cause
    grads = [f for f in nf if f.signal == "gradient"]
    assert grads and grads[0].step == 9


@pytest.mark.parametrize("act, depth", [(nn.Sigmoid, 10), (nn.Tanh, 30)], ids=["sigmoid-10", "tanh-30"])
@pytest.mark.parametrize("every_n_steps", [1, 10])  # 10 is the default
def test_deep_saturating_mlp_is_vanishing_at_early_layers(tmp_path, every_n_steps, act, depth):
    """Default thresholds: judged from step 100, over 20 measured steps in a row."""
    torch.manual_seed(0)
    net = mlp(depth=depth, hidden=32, act=act)
    probe = FeatureProbe(probes=["type:Linear"], save_dir=str(tmp_path / "p"), every_n_steps=every_n_steps,
                         figure_every_n_steps=None)
    with pytest.warns(Warning):
        fit(tmp_path, Classifier(net, lr=0.01), probe, steps=320, n=16 * 40)
    van = {f.layer for f in kinds(probe.findings, "vanishing")}
    assert {"net.0", "net.2"} <= van, probe.findings
    last = f"net.{2 * depth}"
    assert last not in van and f"net.{2 * depth - 2}" not in van  # the late layers are fine
    assert all(f.signal == "gradient" for f in kinds(probe.findings, "vanishing"))
    # ground truth from plain PyTorch: the first layer's per-element gradient is tiny against the median layer's
    x, y = next(iter(make_loader(n=64, batch_size=64)))
    outs = {}

    def keep_grad(module, inputs, out, k):
        out.register_hook(lambda g: outs.__setitem__(k, g))  # returns None: the output is untouched

    hooks = [net[i].register_forward_hook(lambda m, i_, o, k=i: keep_grad(m, i_, o, k))
             for i in range(0, 2 * depth + 1, 2)]
    nn.functional.cross_entropy(net(x), y).backward()
    for h in hooks:
        h.remove()
    rms = {k: float(g.pow(2).mean().sqrt()) for k, g in outs.items()}
    median = sorted(rms.values())[len(rms) // 2]
    assert rms[0] < 1e-3 * median


def test_healthy_model_trained_100_steps_has_no_finding(tmp_path, recwarn):
    torch.manual_seed(0)
    probe = FeatureProbe(probes=["net.*"], save_dir=str(tmp_path / "p"), every_n_steps=1)
    fit(tmp_path, Classifier(mlp(depth=3), lr=0.05), probe, steps=100)
    assert probe.findings == []
    assert "No findings" in (tmp_path / "p" / "summary.md").read_text()
    assert (tmp_path / "p" / "findings.jsonl").read_text() == ""


def test_healthy_cnn_every_leaf_has_no_finding(tmp_path):
    from models import TinyCNN

    torch.manual_seed(0)
    probe = FeatureProbe(probes=["net.**"], save_dir=str(tmp_path / "p"), every_n_steps=1)
    loader = make_loader(n=16 * 60, batch_size=16, image=(3, 8, 8))
    t = trainer(tmp_path, callbacks=[probe], max_steps=60)
    t.fit(Classifier(TinyCNN(), lr=0.05), loader)
    assert probe.findings == []
