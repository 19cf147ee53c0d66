"""The hot path never reads a value back to the host on steps that do not log (untimed; counts calls)."""

from __future__ import annotations

import os
import sys

import pytest
import pytorch_lightning as pl
import torch

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
