"""What figures cost: render times, and the training step at figure steps against the median step.

To run: python benchmarks/figures.py [--json PATH] [--steps 60] [--figure-every 10]

Prints the time to render (build the figure and encode the PNG) a 64-channel grid, a 512-channel grid and a
50-layer x 2,000-step health timeline, then fits a small CNN with FeatureProbe (every leaf probed, figures every
``--figure-every`` steps) and compares the step time at figure steps with the median step time
(goal: at most 1.5x; rendering runs on a background thread, the training thread only copies the snapshot).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from lit_probe import FeatureProbe
from lit_probe.figures import feature_grid, figure_to_png, health_timeline


def _time(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def render_times() -> dict[str, float]:
    rng = np.random.default_rng(0)
    g64 = rng.standard_normal((64, 16, 16)).astype(np.float32)
    g512 = rng.standard_normal((512, 8, 8)).astype(np.float32)
    layers = [f"layer{i}" for i in range(50)]
    steps = np.arange(2000)
    act = np.abs(rng.standard_normal((50, 2000)))
    return {
        "grid_64ch_s": _time(lambda: figure_to_png(feature_grid(g64, title="64 channels"))),
        "grid_512ch_s": _time(lambda: figure_to_png(feature_grid(g512, title="512 channels", max_channels=512))),
        "timeline_50x2000_s": _time(lambda: figure_to_png(
            health_timeline(layers, steps, act, act * 1e-3, np.zeros((50, 2000)), [("layer3", 500, "dead")]))),
    }


class _Stamp(pl.Callback):
    """First in the callback list: stamps the batch start. Last: records the step time."""

    def __init__(self, shared: dict, last: bool) -> None:
        self.shared = shared
        self.last = last

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.last:
            self.shared["t0"] = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.last:
            self.shared.setdefault("times", {})[trainer.global_step - 1] = time.perf_counter() - self.shared["t0"]


def figure_step_ratio(steps: int, every: int) -> dict[str, float]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from models import Classifier, TinyCNN, make_loader

    torch.manual_seed(0)
    shared: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        probe = FeatureProbe(probes=["net.**"], figure_every_n_steps=every, save_dir=tmp)
        trainer = pl.Trainer(default_root_dir=tmp, max_steps=steps, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                             callbacks=[_Stamp(shared, False), probe, _Stamp(shared, True)])
        trainer.fit(Classifier(TinyCNN()), make_loader(n=16 * steps, image=(3, 32, 32)))
    times = shared["times"]
    fig = [t for s, t in times.items() if s % every == 0 and s > 0]
    other = [t for s, t in times.items() if s % every != 0 and s > 2]
    med, f = statistics.median(other), statistics.median(fig)
    return {"median_step_s": med, "figure_step_s": f, "figure_step_ratio": f / med,
            "worst_step_after_figure_step_ratio": max(times.get(s + 1, 0) for s in times if s % every == 0) / med}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--figure-every", type=int, default=10)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    res = render_times()
    res.update(figure_step_ratio(args.steps, args.figure_every))
    print("| measure | value |\n| --- | ---: |")
    for k, v in res.items():
        print(f"| {k} | {v:.3f} |")
    print(f"figure step / median step: {res['figure_step_ratio']:.2f}x (goal <= 1.5x: "
          f"{'PASS' if res['figure_step_ratio'] <= 1.5 else 'MISS'})")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
