"""Both Lightning packages, first class: ``lightning.pytorch`` and ``pytorch_lightning`` run the same real tests.

Each test takes the package as a parameter and builds its LightningModule, Trainer and LightningCLI from that
package only: Trainer.fit with an injected NaN (the first layer and step are known), a LightningCLI YAML under
each documented ``class_path``, checkpoint resume, and an install that has only one of the two packages
(simulated in a subprocess that blocks the other).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from models import PACKAGES, make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lit_probe
from lit_probe.callback import ProbeCallback
from lit_probe.packages import lightning_packages

REPO = Path(__file__).resolve().parents[1]
#: these tests' Trainer arguments (on top of models.make_trainer's)
SHORT = {"max_steps": 8, "log_every_n_steps": 4}
INSTALLED = lightning_packages()

pytestmark = pytest.mark.filterwarnings("ignore::lit_probe.callback.ProbeWarning")


@pytest.fixture(params=sorted(PACKAGES))
def pkg(request):
    if request.param not in INSTALLED:
        pytest.skip(f"{request.param} is not installed")
    return request.param


def _pl(pkg: str):
    return importlib.import_module(PACKAGES[pkg])


def _loader(n: int = 128, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g)),
                      batch_size=16)


def _module(pkg: str, nan_at: int = -1, dead: bool = False):
    pl = _pl(pkg)

    class Poison(nn.Module):
        def __init__(self):
            super().__init__()
            self.step = -1

        def forward(self, x):
            return x / 0 if self.step == nan_at else x

    class Net(pl.LightningModule):
        def __init__(self, lr: float = 0.05):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), Poison(), nn.Linear(32, 32), nn.ReLU(),
                                     nn.Linear(32, 4))
            if dead:
                with torch.no_grad():
                    self.net[3].bias.fill_(-100.0)  # net.4 (a ReLU) never positive from step 0
            self.lr = lr

        def training_step(self, batch, batch_idx):
            self.net[2].step = self.global_step
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    return Net


def test_each_class_is_a_real_subclass_of_its_package_callback(pkg):
    own = importlib.import_module(f"lit_probe.{pkg}").FeatureProbe
    assert issubclass(own, _pl(pkg).Callback)
    assert isinstance(lit_probe.FeatureProbe(probes=["net"]), _pl(pkg).Callback)  # every installed package
    other = [p for p in INSTALLED if p != pkg]
    for o in other:
        assert not issubclass(own, _pl(o).Callback)


@pytest.mark.parametrize("which", ["auto", "own"])
def test_fit_finds_the_first_nan_layer_and_step(pkg, which, tmp_path):
    cls = lit_probe.FeatureProbe if which == "auto" else importlib.import_module(f"lit_probe.{pkg}").FeatureProbe
    probe = cls(probes=["net.*"], save_dir=str(tmp_path / "p"), figure_every_n_steps=None)
    make_trainer(tmp_path, pkg, **SHORT, callbacks=[probe]).fit(_module(pkg, nan_at=5)(), _loader())
    causes = [(f.layer, f.signal, f.kind, f.step) for f in probe.findings if f.cause]
    assert causes[0] == ("net.2", "activation", "nonfinite", 5), probe.findings
    lines = (tmp_path / "p" / "findings.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["layer"] == "net.2" and json.loads(lines[0])["cause"] is True
    assert all(not m._forward_hooks for m in probe.session.modules or [])


@pytest.mark.parametrize("class_path", ["lit_probe.FeatureProbe", "lit_probe.{pkg}.FeatureProbe"])
def test_lightning_cli_accepts_the_documented_class_paths(pkg, class_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_mod = importlib.import_module(f"{PACKAGES[pkg]}.cli")
    cfg = tmp_path / "probe.yaml"
    cfg.write_text(textwrap.dedent(f"""
        trainer:
          max_steps: 8
          accelerator: cpu
          logger: false
          enable_checkpointing: false
          enable_progress_bar: false
          default_root_dir: {tmp_path}
          callbacks:
            - class_path: {class_path.format(pkg=pkg)}
              init_args:
                probes: ["net.*"]
                figure_every_n_steps: null
                thresholds: {{dead_window: 5}}
                save_dir: {tmp_path / "p"}
        """))
    Net = _module(pkg, nan_at=3)

    class Data(_pl(pkg).LightningDataModule):
        def train_dataloader(self):
            return _loader()

    for _ in range(2):  # the documented command works again and again (config.yaml is overwritten)
        cli = cli_mod.LightningCLI(Net, Data, args=["fit", "--config", str(cfg)],
                                   save_config_kwargs={"overwrite": True})
    (probe,) = [c for c in cli.trainer.callbacks if isinstance(c, ProbeCallback)]
    assert probe.thresholds.dead_window == 5
    assert [(f.layer, f.step) for f in probe.findings if f.cause][0] == ("net.2", 3)


def test_checkpoint_resume_continues_windows_and_findings(pkg, tmp_path):
    pl = _pl(pkg)
    Net = _module(pkg, dead=True)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_train_steps=10)
    p1 = lit_probe.FeatureProbe(probes=["net.*"], save_dir=str(tmp_path / "p"), figure_every_n_steps=None,
                                thresholds={"dead_window": 20}, log_every_n_steps=5)
    make_trainer(tmp_path, pkg, callbacks=[p1, ckpt], max_steps=10, log_every_n_steps=4,
                 enable_checkpointing=True).fit(Net(), _loader(n=320))
    assert not [f for f in p1.findings if f.kind == "dead"]  # 10 steps: the 20-step window is not complete
    p2 = lit_probe.FeatureProbe(probes=["net.*"], save_dir=str(tmp_path / "p"), figure_every_n_steps=None,
                                thresholds={"dead_window": 20}, log_every_n_steps=5)
    make_trainer(tmp_path, pkg, callbacks=[p2], max_steps=25, log_every_n_steps=4).fit(
        Net(), _loader(n=320), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    dead = [f for f in p2.findings if f.kind == "dead"]
    # the window started at step 0 before the checkpoint: dead from step 20 (not 30, as a fresh window would say)
    assert [(f.layer, f.step) for f in dead] == [("net.4", 20)], p2.findings


def test_an_install_with_only_one_package_never_imports_the_other(pkg, tmp_path):
    other = [p for p in PACKAGES if p != pkg]
    code = textwrap.dedent(f"""
        import os, sys
        for name in {other!r}:
            sys.modules[name] = None  # as if not installed
        sys.path.insert(0, {str(REPO / 'tests')!r})
        import lit_probe
        assert not [m for m in ('lightning', 'pytorch_lightning', 'torch') if sys.modules.get(m) is not None]
        os.environ["LIT_PROBE_TEST_PACKAGE"] = {PACKAGES[pkg]!r}  # the package tests/models.py builds on
        import test_packages as tp
        probe = lit_probe.FeatureProbe(probes=["net.*"], figure_every_n_steps=None, save_dir={str(tmp_path)!r})
        tp.make_trainer({str(tmp_path)!r}, {pkg!r}, **tp.SHORT, callbacks=[probe]).fit(
            tp._module({pkg!r}, nan_at=2)(), tp._loader())
        assert probe.findings and probe.findings[0].layer == "net.2"
        loaded = [m for m in {other!r} if sys.modules.get(m) is not None]
        assert not loaded, loaded
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_fsdp_fails_at_fit_start_with_what_works(pkg, tmp_path):
    """Lightning refuses FSDP on CPU ("requires a GPU accelerator"); on a GPU the probe stops at fit start,
    before any hook or step, and says what works. The probe's check runs here on the real strategy object."""
    from types import SimpleNamespace

    pl = _pl(pkg)
    with pytest.raises(ValueError, match="GPU"):
        make_trainer(tmp_path, pkg, **SHORT, devices=2,
                     strategy=pl.strategies.FSDPStrategy(process_group_backend="gloo"))
    probe = lit_probe.FeatureProbe(probes=["net.*"], figure_every_n_steps=None, save_dir=str(tmp_path / "p"))
    model = _module(pkg)()
    fake = SimpleNamespace(strategy=pl.strategies.FSDPStrategy())
    with pytest.raises(lit_probe.ProbeConfigError,
                       match="does not support the FSDPStrategy.*FlatParameter.*ModelParallelStrategy.*fully_shard"):
        probe.on_fit_start(fake, model)
    assert all(not m._forward_hooks for m in model.modules())


def test_deepspeed_is_refused_saying_why_and_what_works(pkg, tmp_path):
    """DeepSpeed needs its package and a GPU; the check reads the strategy's class (and its bases) by name."""
    from types import SimpleNamespace

    DeepSpeedStrategy = type("DeepSpeedStrategy", (), {})
    probe = lit_probe.FeatureProbe(probes=["net.*"], figure_every_n_steps=None, save_dir=str(tmp_path / "p"))
    model = _module(pkg)()
    with pytest.raises(lit_probe.ProbeConfigError, match="MyZero strategy: DeepSpeed partitions.*DDP"):
        probe.on_fit_start(SimpleNamespace(strategy=type("MyZero", (DeepSpeedStrategy,), {})()), model)
    assert all(not m._forward_hooks for m in model.modules())
