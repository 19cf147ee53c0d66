"""Figures of findings over a window (dead units) show the step the window completed, or, when the flight recorder
no longer holds it, the step the rule fired (issue 21) — not the step after.

A ReLU that never fires (the Linear before it has its bias at -100): by the oracle, its units are never positive
from step 0 on, so with ``dead_window=20`` its window completes at step 20.

* reads every step (``log_every_n_steps=1``): the rule fires at step 20, the recorder holds step 20: the figure
  of ``net.1`` shows step 20;
* reads every 5 steps: the rule fires at the read of step 24; step 20 is gone (the recorder keeps 3 steps): the
  figure shows step 24, the step the rule fired (before: step 25).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import zoo
from lit_probe import FeatureProbe, read_record
from models import Classifier, make_loader, make_trainer, mlp

WINDOW = 20


class _Watched(Classifier):
    oracle: Any = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.oracle.begin_step(int(self.global_step))
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("log_every,expected", [(1, "window"), (5, "read")])
def test_dead_figure_shows_the_step_of_its_window_or_of_its_read(log_every, expected, tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = mlp(depth=2)
    with torch.no_grad():
        net[0].bias.fill_(-100.0)
    model = _Watched(net, lr=0.05)
    orc = model.oracle = zoo.Oracle(model, units=True, include=lambda p: p.startswith("net.")).attach()
    probe = FeatureProbe(probes=["net.**"], save_dir=str(tmp_path / "probe"), figure_every_n_steps=1000,
                         figure_wait_s=None, log_to_wandb=False, figures=("activations",),
                         thresholds={"dead_window": WINDOW})
    steps = 30
    try:
        make_trainer(tmp_path, max_steps=steps, callbacks=[probe], log_every_n_steps=log_every).fit(
            model, make_loader())
    finally:
        orc.detach()
    # the oracle: never positive from step 0, so the window of WINDOW steps after step 0 completes at step WINDOW
    assert orc.dead_fraction("net.1", 0, WINDOW + 1) == 1.0
    dead = next(f for f in probe.findings if f.kind == "dead" and f.layer == "net.1")
    assert dead.step == WINDOW, dead
    read = next(s for s in range(steps) if (s + 1) % log_every == 0 and s >= WINDOW)  # the read that fires
    want = WINDOW if expected == "window" else read
    figures = [r for r in read_record(tmp_path / "probe").figures
               if r["layer"] == "net.1" and r["figure"] == "activations"]
    shown = sorted({int(r["step"]) for r in figures})
    assert want in shown, (shown, want)
    assert not [s for s in shown if s not in (0, want)], shown  # not the step after, nor any other
