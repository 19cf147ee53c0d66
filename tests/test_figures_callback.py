"""Figures through a real Trainer.fit: files on disk (both modes), the offline W&B run, TensorBoard."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lit_probe import FeatureProbe
from models import Classifier, TinyCNN, make_loader, trainer


def png_ok(path):
    with Image.open(path) as im:
        im.load()
        arr = np.asarray(im.convert("RGB"))
    assert im.size[0] > 300 and im.size[1] > 200, im.size
    assert arr.std() > 5, "blank image"
    return arr


def fit_with_figures(tmp_path, steps=10, **kw):
    torch.manual_seed(0)
    loggers = kw.pop("loggers", False)
    p = FeatureProbe(probes=["net.conv1", "net.relu", "net.fc"], every_n_steps=1, figure_every_n_steps=5,
                     save_dir=str(tmp_path / "probe"), **kw)
    t = trainer(tmp_path, callbacks=[p], max_steps=steps, logger=loggers)
    t.fit(Classifier(TinyCNN()), make_loader(n=16 * steps, image=(3, 16, 16)))
    return p, t


def test_overwrite_mode_writes_readable_distinct_figures(tmp_path):
    p, _ = fit_with_figures(tmp_path)
    root = tmp_path / "probe"
    a = png_ok(root / "net.conv1" / "activations.png")
    b = png_ok(root / "net.relu" / "activations.png")
    assert a.shape != b.shape or not np.array_equal(a, b)
    for fig in ("gradients", "histograms"):
        png_ok(root / "net.conv1" / f"{fig}.png")
    png_ok(root / "_all" / "timeline.png")
    png_ok(root / "net.fc" / "activations.png")  # linear outputs: a heatmap
    assert not glob.glob(str(root / "**" / "*.tmp"), recursive=True)
    assert not glob.glob(str(root / "**" / "*step*.png"), recursive=True)


def test_versioned_mode_and_max_versions(tmp_path):
    fit_with_figures(tmp_path, steps=16, mode="versioned", max_versions=2)
    files = sorted(os.listdir(tmp_path / "probe" / "net.conv1"))
    acts = [f for f in files if f.startswith("activations_step")]
    # a busy renderer may drop a figure step (counted, never blocking training); the newest 2 written are kept
    assert len(acts) == 2, files
    assert set(acts) <= {f"activations_step{s:06d}.png" for s in (0, 5, 10, 15)}


def test_hostile_layer_names_stay_inside_save_dir(tmp_path):
    class Hostile(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.ModuleDict({"a/b": nn.Linear(16, 16), "a_b": nn.Linear(16, 16)})
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.body["a/b"](x) + self.body["a_b"](x))

    p = FeatureProbe(probes=["re:^net\\.body\\."], every_n_steps=1, figure_every_n_steps=2,
                     save_dir=str(tmp_path / "probe"))
    trainer(tmp_path, callbacks=[p], max_steps=3).fit(Classifier(Hostile()), make_loader())
    assert sorted(p.points) == ["net.body.a/b", "net.body.a_b"]
    dirs = [d for d in os.listdir(tmp_path / "probe") if d.startswith("net.body")]
    assert len(dirs) == 2  # never share a file
    for path in glob.glob(str(tmp_path / "**" / "*.png"), recursive=True):
        assert os.path.realpath(path).startswith(str(tmp_path / "probe"))


def test_figures_in_offline_wandb_run_and_tensorboard(tmp_path, wandb_offline):
    from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    wb = WandbLogger(project="lit-probe-test", save_dir=str(tmp_path), offline=True)
    tb = TensorBoardLogger(str(tmp_path / "tb"))
    p, _ = fit_with_figures(tmp_path, loggers=[wb, tb])
    import wandb

    wandb.finish()
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    imgs = glob.glob(os.path.join(runs[0], "files", "media", "images", "probe", "**", "*.png"), recursive=True)
    assert any("net.conv1" in p and "activations" in p for p in imgs), imgs
    assert any("timeline" in p for p in imgs)
    tables = glob.glob(os.path.join(runs[0], "files", "media", "table", "**", "*.json"), recursive=True)
    events = glob.glob(str(tmp_path / "tb" / "**" / "events.out.tfevents.*"), recursive=True)
    acc = EventAccumulator(os.path.dirname(events[0]), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()["images"]
    assert "probe/net.conv1/activations" in tags and "probe/net.relu/gradients" in tags, tags
    assert bool(tables) == bool(p.findings)  # the findings table exactly when there are findings


def test_figures_off(tmp_path):
    p, _ = fit_with_figures(tmp_path, figures=("timeline",))
    assert not (tmp_path / "probe" / "net.conv1").exists()
    png_ok(tmp_path / "probe" / "_all" / "timeline.png")


def test_gradcam_layers_draw_and_change_nothing(tmp_path):
    def run(with_probe):
        torch.manual_seed(0)
        m = Classifier(TinyCNN())
        cbs = [FeatureProbe(probes=["net.conv1"], gradcam_layers=["net.bn2"], figure_every_n_steps=4,
                            figures=("activations",), num_samples=3, save_dir=str(tmp_path / "probe"))] \
            if with_probe else []
        trainer(tmp_path, callbacks=cbs, max_steps=6).fit(m, make_loader(n=96, image=(3, 16, 16)))
        return m

    m0, m1 = run(False), run(True)
    assert m0.losses == m1.losses
    for (k, a), (_, b) in zip(m0.state_dict().items(), m1.state_dict().items()):
        assert torch.equal(a, b), k  # BatchNorm buffers included: the Grad-CAM pass ran in eval mode
    assert m1.training and all(mod.training for mod in m1.modules())
    arr = png_ok(tmp_path / "probe" / "net.bn2" / "gradcam.png")
    assert arr.shape[1] > arr.shape[0]  # three overlays side by side


def test_gradcam_layers_unknown_path_fails_at_start(tmp_path):
    from lit_probe import ProbeConfigError

    p = FeatureProbe(probes=["net.conv1"], gradcam_layers=["net.bn3"])
    with pytest.raises(ProbeConfigError, match="net.bn2"):
        trainer(tmp_path, callbacks=[p], max_steps=2).fit(Classifier(TinyCNN()), make_loader(image=(3, 8, 8)))


def test_the_last_figure_before_a_nan_is_kept_beside_the_current_one(tmp_path):
    """Overwrite mode: after the NaN finding, `<figure>_before.png` holds the layer's last figure drawn before
    the finding's step; later figures (all NaN) overwrite only `<figure>.png`."""
    from test_bugs import NaNAt, StepAware

    from models import mlp

    torch.manual_seed(0)
    net = mlp(depth=3)
    net[2] = NaNAt(32, k=7)
    p = FeatureProbe(probes=["net.*"], every_n_steps=1, figure_every_n_steps=3, figures=("activations",),
                     save_dir=str(tmp_path / "probe"), log_every_n_steps=5)
    with pytest.warns(Warning):
        trainer(tmp_path, callbacks=[p], max_steps=12).fit(StepAware(net), make_loader(n=192))
    assert (p.findings[0].layer, p.findings[0].step) == ("net.2", 7)
    layer_dir = tmp_path / "probe" / "net.2"
    before = png_ok(layer_dir / "activations_before.png")
    after = png_ok(layer_dir / "activations.png")
    assert before.shape != after.shape or not np.array_equal(before, after)
    magenta = lambda a: ((a[..., 0] > 200) & (a[..., 1] < 60) & (a[..., 2] > 200)).mean()  # noqa: E731
    assert magenta(before) < 0.01 < magenta(after)  # NaN cells only in the figure from after the bug
