"""The parameter signal (issue 15): weight norms, parameter-gradient norms and update ratios per module, and the
detectors built on them, checked against a plain-PyTorch oracle and injected bugs with known answers."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import pytorch_lightning as pl
from lit_probe import FeatureProbe
from models import Classifier, make_loader, mlp, trainer

IMAGE = (3, 32, 32)


class Oracle(pl.Callback):
    """Plain PyTorch: per module with own parameters, ||W|| and ||grad|| in on_before_optimizer_step (summed
    over the optimizers of a step), ||W_after - W_before|| / ||W_before|| after the step."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.steps: dict[int, dict[str, dict[str, float]]] = {}
        self._before: dict[str, list[torch.Tensor]] = {}

    def _own(self, pl_module, name):
        return [p for p in pl_module.get_submodule(name).parameters(recurse=False) if p.requires_grad]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        rec = self.steps.setdefault(trainer.global_step, {})
        for n in self.names:
            ps = [p for p in self._own(pl_module, n) if id(p) in ids]
            if not ps:
                continue
            r = rec.setdefault(n, {"w2": 0.0, "g2": 0.0})
            r["w2"] += sum(float(p.detach().double().square().sum()) for p in ps)
            r["g2"] += sum(float(p.grad.double().square().sum()) for p in ps if p.grad is not None)
            self._before[n] = (trainer.global_step, [p.detach().clone() for p in self._own(pl_module, n)])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for n, (step, before) in self._before.items():
            d2 = sum(float((p.detach().double() - b.double()).square().sum())
                     for p, b in zip(self._own(pl_module, n), before))
            r = self.steps[step][n]
            r["ratio"] = math.sqrt(d2) / math.sqrt(r["w2"])
        self._before = {}


def _probe(**kw) -> FeatureProbe:
    kw.setdefault("figure_every_n_steps", None)
    kw.setdefault("every_n_steps", 1)
    return FeatureProbe(**kw)


def test_norms_and_update_ratios_match_the_oracle(tmp_path):
    torch.manual_seed(0)
    net = mlp(depth=3)
    names = [f"net.{i}" for i in (0, 2, 4, 6)]
    oracle = Oracle(names)
    p = _probe(probes=["net.*"], log_every_n_steps=3)
    t = trainer(tmp_path, callbacks=[oracle, p], max_steps=7)
    t.fit(Classifier(net, optimizer="adam", lr=1e-2), make_loader(n=7 * 16))
    assert not t.optimizers[0]._optimizer_step_post_hooks  # nothing left behind on the optimizer
    assert all(ps == [] for ps in p.session.params.owned)  # no reference to the model's parameters kept
    last = oracle.steps[6]
    sc = p.session.latest_scalars()
    assert p.findings == []
    for n in names:
        short = n
        assert sc[f"{short}/weight_norm"] == pytest.approx(math.sqrt(last[n]["w2"]), rel=1e-5)
        assert sc[f"{short}/param_grad_norm"] == pytest.approx(math.sqrt(last[n]["g2"]), rel=1e-5)
        assert sc[f"{short}/update_ratio"] == pytest.approx(last[n]["ratio"], rel=1e-4)
    assert not any(k.startswith("net.1/weight") for k in sc)  # a ReLU owns no parameters


def test_scalars_reach_the_loggers(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    torch.manual_seed(0)
    p = _probe(probes=["net.0", "net.2"], log_every_n_steps=2)
    t = trainer(tmp_path, callbacks=[p], max_steps=4, logger=CSVLogger(str(tmp_path / "csv")), log_every_n_steps=2)
    t.fit(Classifier(mlp(depth=2)), make_loader(n=64))
    header = open(os.path.join(t.logger.log_dir, "metrics.csv")).readline().strip().split(",")
    for stat in ("weight_norm", "param_grad_norm", "update_ratio"):
        assert f"probe/net.0/{stat}" in header and f"probe/net.2/{stat}" in header


def test_signals_without_parameter_measure_no_parameters(tmp_path):
    torch.manual_seed(0)
    p = _probe(probes=["net.*"], signals=("activation", "gradient"))
    trainer(tmp_path, callbacks=[p], max_steps=3).fit(Classifier(mlp(depth=2)), make_loader(n=48))
    assert p.session.params is None
    assert not any(k.endswith("weight_norm") for k in p.session.latest_scalars())


# ------------------------------------------------------------------------------------------ injected bugs
class ResNetModule(Classifier):
    """torchvision resnet18 (random weights) with per-group learning rates for ``layer3``."""

    def __init__(self, layer3_lr_factor: float = 1.0, optimizer: str = "adam", lr: float = 1e-3,
                 nan_weight_at: int | None = None) -> None:
        torch.manual_seed(0)
        super().__init__(torchvision.models.resnet18(num_classes=4), lr=lr, optimizer=optimizer)
        self.factor = layer3_lr_factor
        self.nan_weight_at = nan_weight_at

    def configure_optimizers(self):
        l3 = [p for n, p in self.net.named_parameters() if n.startswith("layer3.")]
        rest = [p for n, p in self.net.named_parameters() if not n.startswith("layer3.")]
        groups = [{"params": rest}, {"params": l3, "lr": self.lr * self.factor}]
        if self.optimizer == "adam":
            return torch.optim.Adam(groups, lr=self.lr)
        return torch.optim.SGD(groups, lr=self.lr, momentum=0.9)

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step == self.nan_weight_at:
            with torch.no_grad():
                self.net.layer2[0].conv1.weight[0, 0, 0, 0] = float("nan")


def _fit_resnet(tmp_path, module, steps=8, **kw):
    p = _probe(probes=["net.**"], log_every_n_steps=4, **kw)
    trainer(tmp_path, callbacks=[p], max_steps=steps).fit(
        module, make_loader(n=steps * 8, image=IMAGE, batch_size=8, classes=4))
    return p


def _param_findings(p, kind):
    return [f for f in p.findings if f.signal == "parameter" and f.kind == kind]


LAYER3 = {f"net.layer3.{b}.{m}" for b in (0, 1) for m in ("conv1", "bn1", "conv2", "bn2")} | \
    {"net.layer3.0.downsample.0", "net.layer3.0.downsample.1"}


@pytest.mark.parametrize("optimizer,lr", [("adam", 1e-3), ("sgd", 0.01)])
def test_a_parameter_group_with_lr_0_is_not_learning(tmp_path, optimizer, lr):
    with pytest.warns(Warning, match="not learning"):
        p = _fit_resnet(tmp_path, ResNetModule(0.0, optimizer, lr))
    found = _param_findings(p, "not_learning")
    assert {f.layer for f in found} == LAYER3, sorted(f.layer for f in found)
    assert all(f.step == 4 for f in found)  # update_window=5 measured steps: 0..4
    assert all("lr=0" in f.message for f in found)
    assert [f for f in p.findings if f.kind != "not_learning"] == []


@pytest.mark.parametrize("optimizer,lr", [("adam", 1e-3), ("sgd", 0.01)])
def test_a_parameter_group_with_lr_x100_is_too_high_for_those_layers(tmp_path, optimizer, lr):
    with pytest.warns(Warning):
        p = _fit_resnet(tmp_path, ResNetModule(100.0, optimizer, lr), steps=6)
    found = _param_findings(p, "lr_too_high")
    layers = {f.layer for f in found}
    assert layers and layers <= LAYER3, sorted(layers)
    convs = {n for n in LAYER3 if ".conv" in n}
    assert convs <= layers, sorted(layers)  # every 3x3 conv of the group
    assert min(f.step for f in found) == 2  # lr_group_window=3 measured steps: 0..2
    first = [f for f in p.findings if f.cause][0]
    assert first.kind == "lr_too_high" and first.layer in LAYER3  # before anything explodes


def test_the_same_lr_in_two_groups_is_silent(tmp_path):
    p = _fit_resnet(tmp_path, ResNetModule(1.0, "adam", 1e-3))
    assert p.findings == [], [f.message for f in p.findings]


def test_a_nan_in_one_weight_is_found_at_that_layer_and_step(tmp_path):
    k = 3
    with pytest.warns(Warning):
        p = _fit_resnet(tmp_path, ResNetModule(1.0, "adam", 1e-3, nan_weight_at=k), steps=6)
    weights = [f for f in _param_findings(p, "nonfinite") if f.stat == "nonfinite_weights"]
    assert [(f.layer, f.step) for f in weights] == [("net.layer2.0.conv1", k)]
    grads = [f for f in _param_findings(p, "nonfinite") if f.stat == "nonfinite_param_grads"]
    assert grads and grads[0].step == k
    cause = [f for f in p.findings if f.cause][0]
    assert (cause.layer, cause.step, cause.kind) == ("net.layer2.0.conv1", k, "nonfinite")


# ------------------------------------------------------------------------------------------ Lightning's ways
class FailsAt(Classifier):
    def training_step(self, batch, batch_idx):
        if self.global_step == 3:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_an_exception_leaves_no_optimizer_hook_behind(tmp_path):
    torch.manual_seed(0)
    p = _probe(probes=["net.*"], log_every_n_steps=2)
    t = trainer(tmp_path, callbacks=[p], max_steps=8)
    with pytest.raises(RuntimeError, match="boom"):
        t.fit(FailsAt(mlp(depth=2)), make_loader(n=128))
    assert not t.optimizers[0]._optimizer_step_post_hooks
    assert "net.0/update_ratio" in p.session.latest_scalars()


def test_frozen_parameters_are_said_once_and_not_reported(tmp_path, caplog):
    torch.manual_seed(0)
    net = mlp(depth=3)
    for q in net[0].parameters():
        q.requires_grad_(False)
    p = _probe(probes=["net.*"], log_every_n_steps=2)
    with caplog.at_level("WARNING", logger="lit_probe"):
        trainer(tmp_path, callbacks=[p], max_steps=8).fit(Classifier(net), make_loader(n=128))
    said = [r.getMessage() for r in caplog.records if "frozen" in r.getMessage()]
    assert len(said) == 1 and "net.0" in said[0]
    assert p.findings == []
    assert not any(k.startswith("net.0/") and "weight" in k for k in p.session.latest_scalars())


def test_gradient_accumulation_measures_the_accumulated_gradient(tmp_path):
    torch.manual_seed(0)
    names = ["net.0", "net.2", "net.4"]
    oracle = Oracle(names)
    p = _probe(probes=names, log_every_n_steps=1)
    trainer(tmp_path, callbacks=[oracle, p], max_steps=3, accumulate_grad_batches=2).fit(
        Classifier(mlp(depth=2)), make_loader(n=96))
    sc = p.session.latest_scalars()
    for n in names:
        assert sc[f"{n}/param_grad_norm"] == pytest.approx(math.sqrt(oracle.steps[2][n]["g2"]), rel=1e-5)
        assert sc[f"{n}/update_ratio"] == pytest.approx(oracle.steps[2][n]["ratio"], rel=1e-4)


class TwoOptimizers(pl.LightningModule):
    """Manual optimisation with two optimisers (a GAN-like alternation); the second one has lr=0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.a = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.b = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        oa, ob = self.optimizers()
        loss_a = self.a(x).square().mean()
        oa.zero_grad()
        self.manual_backward(loss_a)
        oa.step()
        loss_b = nn.functional.cross_entropy(self.b(self.a(x).detach()), y)
        ob.zero_grad()
        self.manual_backward(loss_b)
        ob.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.a.parameters(), lr=0.05), torch.optim.SGD(self.b.parameters(), lr=0.0)


def test_manual_optimisation_with_two_optimisers(tmp_path):
    names = ["a.0", "a.2", "b.0", "b.2"]
    oracle = Oracle(names)
    p = _probe(probes=["a.*", "b.*"], log_every_n_steps=1)
    with pytest.warns(Warning, match="not learning"):
        trainer(tmp_path, callbacks=[oracle, p], max_steps=16).fit(TwoOptimizers(), make_loader(n=16 * 8))
    sc = p.session.latest_scalars()
    for n in ("a.0", "a.2"):
        assert sc[f"{n}/update_ratio"] > 0
    for n in ("b.0", "b.2"):
        assert sc[f"{n}/update_ratio"] == 0.0
    found = {f.layer for f in _param_findings(p, "not_learning")}
    assert found == {"b.0", "b.2"}
    # the first optimizer's step of the last batch, measured by the oracle in the same hook
    last_a = max(s for s in oracle.steps if "a.0" in oracle.steps[s])
    assert sc["a.0/weight_norm"] == pytest.approx(math.sqrt(oracle.steps[last_a]["a.0"]["w2"]), rel=1e-5)


def test_the_model_is_unchanged_by_the_parameter_signal(tmp_path):
    """Bit-identical losses and weights with and without the probe (all signals) on 6 seeded steps."""
    def run(with_probe):
        torch.manual_seed(0)
        net = mlp(depth=3)
        module = Classifier(net, optimizer="adam", lr=1e-2)
        cbs = [_probe(probes=["net.*"], log_every_n_steps=2)] if with_probe else []
        trainer(tmp_path / str(with_probe), callbacks=cbs, max_steps=6).fit(module, make_loader(n=96))
        return module.losses, [q.detach().clone() for q in net.parameters()]

    la, wa = run(False)
    lb, wb = run(True)
    assert la == lb
    assert all(torch.equal(x, y) for x, y in zip(wa, wb))


def test_parameter_histograms_are_drawn_at_figure_steps(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    p = FeatureProbe(probes=["net.0", "net.2"], figure_every_n_steps=2, figures=("parameters",),
                     save_dir=str(tmp_path / "probe"), figure_wait_s=None)
    trainer(tmp_path, callbacks=[p], max_steps=3).fit(Classifier(mlp(depth=2)), make_loader(n=48))
    for n in ("net.0", "net.2"):
        with Image.open(tmp_path / "probe" / n / "parameters.png") as im:
            arr = np.asarray(im.convert("RGB"))
        assert im.size[0] > 300 and arr.std() > 5


def test_plain_pytorch_loop_with_the_session():
    """The README's loop outside Lightning: lr=0 for the last layer is found, the others learn."""
    from lit_probe import ProbeSession

    torch.manual_seed(0)
    model = mlp(depth=3)
    opt = torch.optim.SGD([{"params": [q for m in list(model)[:-1] for q in m.parameters()]},
                           {"params": model[6].parameters(), "lr": 0.0}], lr=0.05)
    loader = make_loader(n=8 * 16)
    found = []
    with ProbeSession.from_model(model, ["**"], signals=("activation", "gradient", "parameter"),
                                 every_n_steps=1) as session:
        session.bind_optimizers([opt])
        for step, (x, y) in enumerate(loader):
            session.begin_step(step)
            nn.functional.cross_entropy(model(x), y).backward()
            session.before_optimizer_step(opt)
            opt.step()
            opt.zero_grad()
            session.end_step()
            found += session.flush()
    assert [(f.layer, f.kind, f.step) for f in found] == [("6", "not_learning", 4)]
    sc = session.latest_scalars()
    assert sc["6/update_ratio"] == 0.0 and sc["0/update_ratio"] > 0
    assert not opt._optimizer_step_post_hooks  # closed: the step hook is gone


def test_parameter_findings_are_not_drawn_on_the_activation_timeline(tmp_path):
    from lit_probe.findings import Finding

    torch.manual_seed(0)
    p = _probe(probes=["net.*"], log_every_n_steps=2)
    trainer(tmp_path, callbacks=[p], max_steps=4).fit(Classifier(mlp(depth=2)), make_loader(n=64))
    fake = [Finding(step=1, layer="net.0", signal="parameter", kind="not_learning", value=0.0, threshold=1e-3),
            Finding(step=1, layer="net.1", signal="activation", kind="dead", value=1.0, threshold=0.5)]
    tl = p.session.timeline(fake)
    assert tl is not None and tl.marks == [("net.1", 1, "dead", "activation")]


def test_parameter_scalars_and_histograms_reach_an_offline_wandb_run(wandb_offline):
    import glob

    from pytorch_lightning.loggers import WandbLogger
    from test_sinks import _history_rows, _only_run_dir

    tmp_path = wandb_offline
    torch.manual_seed(0)
    logger = WandbLogger(project="t", save_dir=str(tmp_path), offline=True)
    p = FeatureProbe(probes=["net.0", "net.2"], figure_every_n_steps=2, figures=("parameters",),
                     save_dir=str(tmp_path / "probe"), figure_wait_s=None, log_every_n_steps=2)
    trainer(tmp_path, callbacks=[p], max_steps=4, logger=logger, log_every_n_steps=2).fit(
        Classifier(mlp(depth=2)), make_loader(n=64))
    logger.experiment.finish()
    run_dir = _only_run_dir(tmp_path)
    rows = _history_rows(run_dir)
    keys = {k for r in rows for k in r}
    assert {"probe/net.0/weight_norm", "probe/net.0/param_grad_norm", "probe/net.0/update_ratio"} <= keys
    media = glob.glob(os.path.join(run_dir, "files", "media", "images", "probe", "**", "*.png"), recursive=True)
    assert any("net.0" in m and "parameters" in m for m in media), media
