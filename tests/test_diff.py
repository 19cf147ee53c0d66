"""`lit-probe diff` (issue #23): the per-step statistics kept in ``stats.bin`` and where two runs first differ.

Ground truth comes from a plain-PyTorch oracle that never asks the probe: forward hooks recording every probed
module's output at every step of both runs, and the parameters after every optimizer step, compared directly
(``torch.equal``). The first step where an output differs, and there the module whose forward ended first,
is where the diff must say the activations first part; the first step whose update differs, and the first
module (in forward order) it changed, is where the parameter statistics must part.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from models import Classifier, make_trainer, mlp, pl
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_probe import FeatureProbe
from lit_probe.diff import diff_runs, write_diff_html
from lit_probe.statlog import STATS_NAME, StatWriter, read_stats

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEPS = 6


class Oracle(pl.Callback):
    """Every output of the named modules per step (in the order their forwards ended), and every parameter
    after each optimizer step."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.step = -1
        self.outputs: dict[int, list[tuple[str, torch.Tensor]]] = {}
        self.params: dict[int, dict[str, list[torch.Tensor]]] = {}
        self.handles: list = []

    def on_fit_start(self, trainer, pl_module):
        mods = dict(pl_module.named_modules())
        for name in self.names:
            self.handles.append(mods[name].register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, args, output):
            if module.training and torch.is_grad_enabled():
                self.outputs.setdefault(self.step, []).append((name, output.detach().float().clone()))
        return hook

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        mods = dict(pl_module.named_modules())
        self.params[self.step] = {n: [p.detach().clone() for p in mods[n].parameters(recurse=False)]
                                  for n in self.names if list(mods[n].parameters(recurse=False))}

    def on_fit_end(self, trainer, pl_module):
        for h in self.handles:
            h.remove()
        self.handles = []

    on_exception = lambda self, trainer, pl_module, err: self.on_fit_end(trainer, pl_module)


def first_output_difference(a: Oracle, b: Oracle):
    """(step, module): the first step where an output differs, and the module whose forward ended first."""
    for step in sorted(set(a.outputs) & set(b.outputs)):
        for (na, ta), (nb, tb) in zip(a.outputs[step], b.outputs[step]):
            assert na == nb
            if ta.shape != tb.shape or not torch.equal(ta, tb):
                return step, na
    return None


def first_update_difference(a: Oracle, b: Oracle, order: list[str]):
    """(step, module): the first optimizer step after which a module's parameters differ (first in ``order``)."""
    for step in sorted(set(a.params) & set(b.params)):
        for name in order:
            if name in a.params[step] and not all(torch.equal(x, y) for x, y in zip(a.params[step][name],
                                                                                  b.params[step][name])):
                return step, name
    return None


def loader(seed: int = 0, shuffle_seed: int | None = None, n: int = 96) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g)
    shuffle = shuffle_seed is not None
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(shuffle_seed) if shuffle else None)


class Grouped(Classifier):
    """Two parameter groups: ``net.0``/``net.2`` and ``net.4``/``net.6`` (at ``lr * late_lr``)."""

    def __init__(self, net, late_lr: float = 1.0):
        super().__init__(net, lr=0.05)
        self.late_lr = late_lr

    def configure_optimizers(self):
        early = [p for i in (0, 2) for p in self.net[i].parameters()]
        late = [p for i in (4, 6) for p in self.net[i].parameters()]
        return torch.optim.SGD([{"params": early}, {"params": late, "lr": self.lr * self.late_lr}], lr=self.lr,
                               momentum=0.9)


class Autocast(nn.Module):
    """``pre`` -> ``mid`` (under a bf16 autocast region when ``bf16``) -> ``post``."""

    def __init__(self, bf16: bool = False):
        super().__init__()
        self.pre = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.mid = nn.Sequential(nn.Linear(32, 32), nn.ReLU())
        self.post = nn.Linear(32, 4)
        self.bf16 = bf16

    def forward(self, x):
        x = self.pre(x)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            x = self.mid(x)
        return self.post(x.float())


class Crash(Classifier):
    def __init__(self, net, at: int):
        super().__init__(net)
        self.at = at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step == self.at:
            raise RuntimeError("boom")
        return loss


def mlp_net(act_at_3: type = nn.ReLU) -> nn.Sequential:
    torch.manual_seed(0)
    net = mlp(16, 32, 4, depth=3)
    net[3] = act_at_3()
    return net


NAMES = [f"net.{i}" for i in range(7)]


def fit(tmp_path, name: str, model: pl.LightningModule, data: DataLoader, names=NAMES, steps: int = STEPS,
        probes=("net.*",)):
    oracle = Oracle(names)
    probe = FeatureProbe(probes=list(probes), figure_every_n_steps=None, save_dir=str(tmp_path / name))
    trainer = make_trainer(tmp_path / f"{name}_root", max_steps=steps, callbacks=[probe, oracle])
    trainer.fit(model, data)
    return tmp_path / name, oracle


# ---------------------------------------------------------------------------------------------------- tests
def test_same_seed_is_identical(tmp_path):
    a, oa = fit(tmp_path, "a", Classifier(mlp_net()), loader())
    b, ob = fit(tmp_path, "b", Classifier(mlp_net()), loader())
    assert first_output_difference(oa, ob) is None
    d = diff_runs(a, b)
    assert d.identical and not d.differs, d.to_text()
    assert d.verdict().startswith("identical")
    assert set(d.signals) == {"activation", "gradient", "parameter"}
    assert len(d.steps) == STEPS and d.signals["activation"].streams == NAMES
    log = read_stats(a)
    assert not log.torn and not log.partial and list(log.steps) == list(range(STEPS))
    rec = json.loads((a / "run.json").read_text())
    assert rec["stats"]["file"] == STATS_NAME and rec["stats"]["bytes"] == (a / STATS_NAME).stat().st_size


def test_one_activation_changed_first_difference_at_that_layer_step_0(tmp_path):
    a, oa = fit(tmp_path, "a", Classifier(mlp_net()), loader())
    b, ob = fit(tmp_path, "b", Classifier(mlp_net(nn.GELU)), loader())
    assert first_output_difference(oa, ob) == (0, "net.3")
    d = diff_runs(a, b)
    f = d.signals["activation"].first
    assert (f.step, f.stream) == (0, "net.3"), d.to_text()
    assert (d.first.signal, d.first.step, d.first.stream) == ("activation", 0, "net.3")
    # before it in execution order: identical at step 0; after it: different
    act = d.signals["activation"]
    assert not act.differs[:3, 0].any() and act.differs[3:, 0].all()
    assert not d.identical and "first difference: step 0, activation of `net.3`" in d.to_text()


def test_changed_learning_rate_of_one_group_shows_in_its_parameters_first(tmp_path):
    a, oa = fit(tmp_path, "a", Grouped(mlp_net()), loader())
    b, ob = fit(tmp_path, "b", Grouped(mlp_net(), late_lr=3.0), loader())
    params = ["net.0", "net.2", "net.4", "net.6"]
    assert first_update_difference(oa, ob, params) == (0, "net.4")  # the first update it changes: step 0's
    assert first_output_difference(oa, ob) == (1, "net.4")
    d = diff_runs(a, b)
    p = d.signals["parameter"].first
    assert (p.step, p.stream) == (0, "net.4") and "update_ratio" in p.stats, d.to_text()
    assert set(d.signals["parameter"].first_steps()) >= {"net.4", "net.6"}
    assert d.signals["parameter"].first_steps()["net.6"] == 0 and d.signals["parameter"].first_steps()["net.0"] > 0
    f = d.signals["activation"].first
    assert (f.step, f.stream) == (1, "net.4")
    assert d.first.signal == "parameter" and d.first.step == 0


def test_bf16_autocast_region_first_layer_inside_it(tmp_path):
    names = ["pre.0", "pre.1", "mid.0", "mid.1", "post"]

    def model(bf16):
        torch.manual_seed(0)
        return Classifier(Autocast(bf16))

    a, oa = fit(tmp_path, "a", model(False), loader(), names=[f"net.{n}" for n in names], probes=["net.*.*",
                                                                                                   "net.post"])
    b, ob = fit(tmp_path, "b", model(True), loader(), names=[f"net.{n}" for n in names], probes=["net.*.*",
                                                                                                 "net.post"])
    assert first_output_difference(oa, ob) == (0, "net.mid.0")
    d = diff_runs(a, b)
    f = d.signals["activation"].first
    assert (f.step, f.stream) == (0, "net.mid.0"), d.to_text()
    assert not d.signals["activation"].differs[:2, 0].any()


def test_different_data_order_first_layer_at_step_0(tmp_path):
    a, oa = fit(tmp_path, "a", Classifier(mlp_net()), loader(shuffle_seed=0))
    b, ob = fit(tmp_path, "b", Classifier(mlp_net()), loader(shuffle_seed=1))
    assert first_output_difference(oa, ob) == (0, "net.0")
    d = diff_runs(a, b)
    assert (d.signals["activation"].first.step, d.signals["activation"].first.stream) == (0, "net.0")
    assert d.signals["activation"].differs[:, 0].all()


def test_runs_of_different_lengths_and_a_crashed_run(tmp_path):
    a, _ = fit(tmp_path, "a", Classifier(mlp_net()), loader(), steps=10)
    short, _ = fit(tmp_path, "short", Classifier(mlp_net()), loader(), steps=4)
    d = diff_runs(a, short)
    assert not d.differs and not d.identical and list(d.steps) == [0, 1, 2, 3]
    assert "different steps" in d.to_text() and d.verdict().startswith("no difference")
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, "crash", Crash(mlp_net(), at=7), loader(), steps=10)
    crashed = tmp_path / "crash"
    assert json.loads((crashed / "run.json").read_text())["status"] == "failed"
    log = read_stats(crashed)
    assert list(log.steps) == list(range(8)) and log.partial == [7]  # step 7 began, never finished
    d = diff_runs(a, crashed)
    assert not d.differs and list(d.steps) == list(range(7)), d.to_text()
    assert "failed inside step 7" in d.to_text()
    # killed while writing: the torn last chunk is dropped, the log steps before it are whole
    raw = (crashed / STATS_NAME).read_bytes()
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / STATS_NAME).write_bytes(raw[:-10])
    log = read_stats(killed)
    assert log.torn and list(log.steps) == [0, 1, 2, 3, 4]  # up to the last log step (log_every_n_steps=5)
    d = diff_runs(a, killed)
    assert not d.differs and "killed" in d.to_text()


def test_renamed_layer_is_listed_not_skipped(tmp_path):
    class Renamed(nn.Module):
        def __init__(self):
            super().__init__()
            net = mlp_net()
            self.first, self.rest = net[0], net[1:]

        def forward(self, x):
            return self.rest(self.first(x))

    a, _ = fit(tmp_path, "a", Classifier(mlp_net()), loader(), steps=2)
    torch.manual_seed(0)
    b, _ = fit(tmp_path, "b", Classifier(Renamed()), loader(), names=["net.first"], steps=2,
               probes=["net.first", "net.rest.*"])
    d = diff_runs(a, b)
    assert ("activation", "net.0") in d.only_in_a and ("activation", "net.first") in d.only_in_b
    assert ("parameter", "net.0") in d.only_in_a
    assert not d.identical and "only in A" in d.to_text() and "only in B" in d.to_text()


# ---------------------------------------------------------------------------------------------------- units
def _write(path, steps, slots=2, names=None, **kw):
    w = StatWriter(path, **{k: kw.pop(k) for k in ("fresh", "max_bytes") if k in kw})
    vals = np.arange(len(steps) * slots * 3, dtype=np.float32).reshape(len(steps), slots, 3)
    w.append(np.array(steps), vals, ["min", "max", "mean"], names=names or [f"s{k}" for k in range(slots)],
             signals=["activation"] * slots, order=list(range(slots)), **kw)
    return w


def test_statlog_round_trip_growth_resume_and_bound(tmp_path):
    p = tmp_path / STATS_NAME
    _write(p, [0, 1], slots=1)
    w = _write(p, [2, 3], slots=2, fresh=False)  # a stream appears at step 2
    log = read_stats(p)
    assert list(log.steps) == [0, 1, 2, 3] and log.values.shape == (4, 2, 3) and log.names == ["s0", "s1"]
    assert np.isnan(log.values[:2, 1]).all() and log.values[2, 1, 0] == 3
    before = w.size
    _write(p, [3, 4], slots=2, fresh=False)  # resumed: step 3 again, the last row wins
    log = read_stats(p)
    assert list(log.steps) == [0, 1, 2, 3, 4] and log.values[3, 0, 0] == 0 and p.stat().st_size > before
    w = _write(tmp_path / "small.bin", [0], max_bytes=10)
    assert w.stopped_at == 0 and read_stats(tmp_path / "small.bin").chunks == 0
    (tmp_path / "bad.bin").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a lit-probe statistics log"):
        read_stats(tmp_path / "bad.bin")
    # a header that promises more than the file holds is torn, not an error
    with open(p, "ab") as fh:
        fh.write(struct.pack("<4sII", b"CHNK", 10, 1000) + b"{}")
    assert read_stats(p).torn


def test_cli_diff_prints_the_table_and_writes_the_page(tmp_path, capsys):
    from lit_probe.__main__ import _CHANGES, main
    from lit_probe.demo import CHANGES

    assert _CHANGES == CHANGES
    a, _ = fit(tmp_path, "a", Classifier(mlp_net()), loader(), steps=3)
    b, _ = fit(tmp_path, "b", Classifier(mlp_net(nn.GELU)), loader(), steps=3)
    page = tmp_path / "diff.html"
    assert main(["diff", str(a), str(b), "--html", str(page)]) == 1
    out = capsys.readouterr().out
    assert "first difference: step 0, activation of `net.3`" in out and "streams x steps" in out
    html = page.read_text()
    assert "data:image/png;base64," in html and "http" not in html.replace("http-equiv", "")
    assert main(["diff", str(a), str(a), "--html", "-"]) == 0
    assert "identical" in capsys.readouterr().out
    assert main(["diff", str(a), str(b), "--rtol", "10", "--html", "-"]) == 0  # everything within 1000 %
    assert main(["diff", str(a), str(tmp_path / "nope")]) == 2
    write_diff_html(diff_runs(a, a), tmp_path / "same.html")
    assert "identical" in (tmp_path / "same.html").read_text()
