"""configs/*.yaml parse with LightningCLI, compose, and run; `--trainer.callbacks` as JSON works."""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

import pytest
import yaml
from lit_probe import FeatureProbe
from lit_probe.demo import DemoCNN, ShapesDataModule, pl

LightningCLI = importlib.import_module(f"{pl.__name__}.cli").LightningCLI  # the demo's package's CLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROBE_CONFIGS = ["probe.yaml", "probe_versioned_wandb.yaml", "probe_large_model.yaml"]

pytestmark = [pytest.mark.filterwarnings("ignore::lit_probe.callback.ProbeWarning"),
              pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")]


def _cli(args: list[str], run: bool = False) -> LightningCLI:
    return LightningCLI(DemoCNN, ShapesDataModule, run=run, args=args, save_config_callback=None)


def _probe(cli: LightningCLI) -> FeatureProbe:
    probes = [c for c in cli.trainer.callbacks if isinstance(c, FeatureProbe)]
    assert len(probes) == 1, cli.trainer.callbacks
    return probes[0]


def _init_args(name: str) -> dict:
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    (cb,) = [c for c in cfg["trainer"]["callbacks"] if c["class_path"] == "lit_probe.FeatureProbe"]
    return cb["init_args"]


def _assert_configured(probe: FeatureProbe, init_args: dict) -> None:
    for key, value in init_args.items():
        got = getattr(probe, key)
        if key == "thresholds":
            got = None if got.to_dict() == FeatureProbe().thresholds.to_dict() else got.to_dict()
        if isinstance(got, tuple):
            got = list(got)
        if value is None and got == []:  # list arguments given as null are stored as []
            got = None
        assert got == value, (key, got, value)


def test_every_config_file_is_tested():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(PROBE_CONFIGS + ["demo.yaml"])


@pytest.mark.parametrize("name", PROBE_CONFIGS)
def test_probe_config_parses(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = _cli(["--config", str(CONFIGS / name), f"--trainer.default_root_dir={tmp_path}"])
    _assert_configured(_probe(cli), _init_args(name))
    if name == "probe_versioned_wandb.yaml":
        names = [type(lg).__name__ for lg in cli.trainer.loggers]
        assert names == ["WandbLogger", "CSVLogger"]
        assert cli.trainer.loggers[0]._offline is True
        assert _probe(cli).mode == "versioned" and _probe(cli).max_versions == 5


def test_probe_yaml_writes_every_init_arg_with_its_default():
    init_args = _init_args("probe.yaml")
    from lit_probe.config import RENAMED

    params = inspect.signature(FeatureProbe.__init__).parameters
    expected = {k: p.default for k, p in params.items() if k != "self" and k not in RENAMED}  # deprecated names
    assert set(init_args) == set(expected)
    for key, default in expected.items():
        if key == "probes":  # None: only ProbeMixin declarations; the file probes every top-level module
            assert init_args[key] == ["*"]
            continue
        if isinstance(default, tuple):
            default = list(default)
        assert init_args[key] == default, key


def test_signature_is_visible_without_building_anything():
    """A fresh interpreter: `inspect.signature` and `help()` see the arguments of a real class."""
    import subprocess
    import sys

    code = ("import inspect, lit_probe, lit_probe.lightning as L; sig = inspect.signature(lit_probe.FeatureProbe); "
            "print(list(sig.parameters)[:3], lit_probe.FeatureProbe.__module__, "
            "list(inspect.signature(L.FeatureProbe).parameters)[0])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["['probes',", "'signals',", "'full_stats_every_n_steps']", "lit_probe.packages",
                                  "probes"]


def test_old_argument_names_still_work_with_a_deprecation_warning(tmp_path):
    from lit_probe.errors import ProbeConfigError

    with pytest.warns(DeprecationWarning, match="every_n_steps` is now called `full_stats_every_n_steps"):
        p = FeatureProbe(probes=["net"], every_n_steps=7, mode="versioned", flight_recorder_steps=9)
    assert (p.full_stats_every_n_steps, p.figure_files, p.history_csv_steps) == (7, "versioned", 9)
    assert (p.every_n_steps, p.mode, p.flight_recorder_steps) == (7, "versioned", 9)
    with pytest.raises(ProbeConfigError, match="`mode` \\(now `figure_files`\\)"):
        with pytest.warns(DeprecationWarning):
            FeatureProbe(probes=["net"], mode="append")
    with pytest.raises(ProbeConfigError, match="not both"):
        FeatureProbe(probes=["net"], every_n_steps=7, full_stats_every_n_steps=3)


def test_demo_config_parses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = _cli(["--config", str(CONFIGS / "demo.yaml")])
    assert isinstance(cli.model, DemoCNN) and cli.model.bug == "none"
    assert isinstance(cli.datamodule, ShapesDataModule)
    assert 0 < cli.trainer.max_steps <= 200


@pytest.mark.parametrize("build", ["resnet18", "vit", "bert"])
def test_large_model_config_works_on_any_model(build):
    """The first two levels of the module tree, whatever the model: a CNN, a ViT, a transformer."""
    import torch
    import torchvision

    from lit_probe.selection import resolve

    nets = {"resnet18": lambda: torchvision.models.resnet18(weights=None),
            "vit": lambda: torchvision.models.VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=4),
            "bert": lambda: torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(32, 2, 64), 2)}

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nets[build]()

    model = Wrapper()
    probe = FeatureProbe(**_init_args("probe_large_model.yaml"))
    names = [n for n, _ in resolve(model, probe.probes)]
    children = [f"backbone.{n}" for n, _ in model.backbone.named_children()]
    assert names == ["backbone"] + children
    assert probe.every_n_steps > FeatureProbe().every_n_steps
    assert len(probe.figures) < len(FeatureProbe().figures)


def test_composed_demo_and_probe_configs_run_fit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = _cli(["fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / "probe.yaml"),
                "--trainer.max_steps=3", f"--trainer.default_root_dir={tmp_path}",
                "--trainer.enable_progress_bar=false"], run=True)
    probe = _probe(cli)
    _assert_configured(probe, _init_args("probe.yaml"))
    assert cli.trainer.global_step == 3
    assert probe.points == ["stem", "block1", "block2", "block3", "pool", "deep", "head"]
    assert probe.out_dir == tmp_path / "probe"
    assert (tmp_path / "probe" / "summary.md").is_file()
    assert (tmp_path / "probe" / "block2" / "activations.png").is_file()  # figure step 0
    assert probe.findings == []


def test_versioned_wandb_config_runs_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    try:
        cli = _cli(["fit", "--config", str(CONFIGS / "demo.yaml"), "--config",
                    str(CONFIGS / "probe_versioned_wandb.yaml"), "--trainer.max_steps=2",
                    f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
                    "--trainer.callbacks.init_args.figures=[timeline]"], run=True)
    finally:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    probe = _probe(cli)
    assert probe.mode == "versioned"
    assert list((tmp_path / "lit_probe_runs" / "wandb").glob("offline-run-*"))
    assert list((tmp_path / "lit_probe_runs" / "probe").glob("_all/timeline_step*.png")) or \
        list(tmp_path.rglob("timeline_step*.png"))


def test_callbacks_as_json_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    callbacks = [{"class_path": "lit_probe.FeatureProbe",
                  "init_args": {"probes": ["block2.act", "block3.*"], "every_n_steps": 5, "mode": "versioned",
                                "thresholds": {"dead_fraction": 0.9}, "figure_every_n_steps": None,
                                "save_dir": str(tmp_path / "p")}}]
    args = ["--config", str(CONFIGS / "demo.yaml"), f"--trainer.callbacks={json.dumps(callbacks)}",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2", "--trainer.enable_progress_bar=false"]
    probe = _probe(_cli(args))
    assert probe.probes == ["block2.act", "block3.*"] and probe.every_n_steps == 5 and probe.mode == "versioned"
    assert probe.thresholds.dead_fraction == 0.9 and probe.figure_every_n_steps is None
    cli = _cli(["fit", *args], run=True)
    probe = _probe(cli)
    assert probe.points == ["block2.act", "block3.conv", "block3.bn", "block3.norm_div", "block3.act"]
    assert (tmp_path / "p" / "summary.md").is_file()


def test_the_documented_cli_command_runs_again_and_again(tmp_path, monkeypatch):
    """`python examples/train_cli.py fit --config configs/demo.yaml --config configs/probe_versioned_wandb.yaml`
    twice in one directory: the saved config.yaml is overwritten, not refused."""
    import runpy

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    main = runpy.run_path(str(CONFIGS.parent / "examples" / "train_cli.py"))["main"]
    args = ["fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / "probe_versioned_wandb.yaml"),
            "--trainer.max_steps=2", "--trainer.enable_progress_bar=false",
            "--trainer.callbacks.init_args.figure_every_n_steps=null"]
    try:
        for _ in range(2):
            cli = main(args)
            assert cli.trainer.global_step == 2
    finally:
        import wandb

        if wandb.run is not None:
            wandb.finish()
