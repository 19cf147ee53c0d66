"""What figures cost: render times, and what drawing does to the training thread (thread vs process backend).

To run: python benchmarks/figures.py [--json PATH] [--steps 200] [--figure-every 50] [--layers 6] [--fit]

Sections:

* ``render`` -- the time to render (build the figure and encode the PNG) a 64-channel grid, a 512-channel
  grid, a 50-layer x 2,000-step and a 400-layer x 1,000-step health timeline (goal for the latter: < 2 s).
* ``loop`` -- a plain training loop (a deep, narrow MLP: ~10 ms per step, mostly Python and small kernels, as
  a Lightning step is), every ``--figure-every`` steps ``--layers`` layers' snapshots (2 x 64 x 16 x 16) and
  the timeline are submitted to a :class:`~lit_probe.render.FigureRenderer`: once without figures (the
  baseline), then once per backend, same seed and schedule. Reported per backend, as ratios over the
  baseline's median step: the steps that ran while figures were being drawn (median and 90th percentile),
  the ``--after`` steps right after a figure step (median and worst), and the training thread's cost of the
  figure step itself (that step minus a baseline step; and the submit calls alone). The process backend's
  first figure step also starts the drawing process; it is reported on its own and left out of the rest.
* ``fit`` (with ``--fit``) -- a small CNN fitted with FeatureProbe (every leaf probed, figures every
  ``--figure-every`` steps), figure-step and after-figure-step ratios, per backend.

Runs with ``torch.set_num_threads(1)``. On a shared machine, run it when the CPU is as idle as you can get it:
the drawing process competes for a core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    big_layers = [f"blocks.{i}.mlp" for i in range(400)]
    big_steps = np.concatenate([np.arange(10), np.arange(1, 991) * 10])
    big = np.exp(rng.standard_normal((400, 1000)))
    return {
        "grid_64ch_s": _time(lambda: figure_to_png(feature_grid(g64, title="64 channels"))),
        "grid_512ch_s": _time(lambda: figure_to_png(
            feature_grid(g512, title="512 channels", max_channels=512))),
        "timeline_50x2000_s": _time(lambda: figure_to_png(health_timeline(
            layers, steps, act, act * 1e-3, np.zeros((50, 2000)), [("layer3", 500, "dead")]))),
        "timeline_400x1000_s": _time(lambda: figure_to_png(health_timeline(
            big_layers, big_steps, big, big * 1e-3, np.zeros((400, 1000)),
            [("blocks.7.mlp", 500, "dead", "activation"),
             ("blocks.300.mlp", 4000, "exploding", "gradient")]))),
    }


class _NullSink:
    """Counts the PNGs and when the last one arrived (no disk: the sink's own cost is not measured here)."""

    def __init__(self) -> None:
        self.n = 0
        self.last = 0.0

    def write_png(self, layer: str, figure: str, png: bytes, step: int) -> None:
        self.n += 1
        self.last = time.perf_counter()


def _mlp(depth: int = 56, width: int = 128) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def loop_costs(backend: str, steps: int, every: int, n_layers: int, after: int,
               baseline_ms: float | None = None) -> dict[str, Any]:
    """One training loop with figures submitted to a renderer of ``backend`` (``"none"``: no figures, the
    baseline); see the module docstring."""
    from lit_probe.render import FigureRenderer

    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(64, 128)
    y = torch.randint(0, 10, (64,))
    rng = np.random.default_rng(0)
    snaps = [np.maximum(rng.standard_normal((2, 64, 16, 16)), 0).astype(np.float32) for _ in range(n_layers)]
    grads = [rng.standard_normal((2, 64, 16, 16)).astype(np.float32) * 1e-3 for _ in range(n_layers)]
    names = [f"block{i}" for i in range(n_layers)]
    sink = _NullSink()
    r = None if backend == "none" else FigureRenderer([sink], max_queue=4 * (n_layers + 1), backend=backend)
    hist_steps: list[int] = []
    step_s: list[float] = []
    drawing: list[bool] = []  # figures were being drawn during the step
    submit_s: dict[int, float] = {}
    t_start = time.perf_counter()
    try:
        for step in range(steps):
            busy = r is not None and r.pending > 0
            t0 = time.perf_counter()
            _train_step(model, opt, x, y)
            if r is not None and step % every == 0 and step > 0:
                ts = time.perf_counter()
                for i in range(n_layers):
                    r.submit_layer(step, names[i], snaps[i], grads[i], shape=(32, 256, 16, 16))
                hist_steps.append(step)
                k = len(hist_steps)
                act = np.exp(rng.standard_normal((n_layers, k)))
                r.submit_timeline(step, names, np.array(hist_steps), act, act * 1e-3, np.zeros((n_layers, k)),
                                  [])
                submit_s[step] = time.perf_counter() - ts
            step_s.append(time.perf_counter() - t0)
            drawing.append(busy)
        train_s = time.perf_counter() - t_start
        t_drain = time.perf_counter()
        if r is not None:
            r.drain(600)
        drain_s = time.perf_counter() - t_drain
    finally:
        ok = True if r is None else r.close(timeout=60)
    warm = [t for s, t in enumerate(step_s) if s > 2]
    med = statistics.median(warm)
    out: dict[str, Any] = {"backend": backend, "median_step_ms": med * 1e3, "train_s": train_s}
    if r is None:
        return out
    base = (baseline_ms / 1e3) if baseline_ms else med
    fig_steps = sorted(submit_s)
    rest = fig_steps[1:] or fig_steps  # the process backend's first figure step also starts the process
    busy_t = [t for s, t in enumerate(step_s) if drawing[s] and s not in submit_s and s > 2]
    after_r = [step_s[s + d] / base for s in rest for d in range(1, after + 1) if s + d < len(step_s)]
    out.update({
        "backend_in_use": r.backend_in_use,
        "steps_while_drawing": len(busy_t),
        "while_drawing_median_ratio": statistics.median(busy_t) / base if busy_t else float("nan"),
        "while_drawing_p90_ratio": float(np.percentile(busy_t, 90)) / base if busy_t else float("nan"),
        "after_figure_step_median_ratio": statistics.median(after_r),
        "after_figure_step_worst_ratio": max(after_r),
        "figure_step_cost_ms": statistics.median(step_s[s] - base for s in rest) * 1e3,
        "submit_ms": statistics.median(submit_s[s] for s in rest) * 1e3,
        "first_figure_step_ms": step_s[fig_steps[0]] * 1e3,
        "figures_written": sink.n,
        "drain_after_training_s": drain_s,
        "skipped": r.skipped_count,
        "closed_cleanly": ok,
    })
    return out


class _Stamp:
    """Lightning callbacks: the first stamps the batch start, the last records the step time."""

    @staticmethod
    def make(shared: dict, last: bool):
        import pytorch_lightning as pl

        class Stamp(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if not last:
                    shared["t0"] = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if last:
                    step = trainer.global_step - 1
                    shared.setdefault("times", {})[step] = time.perf_counter() - shared["t0"]

        return Stamp()


def fit_costs(backend: str, steps: int, every: int, after: int) -> dict[str, float]:
    """FeatureProbe on a small CNN, with the renderer's backend forced to ``backend``."""
    import pytorch_lightning as pl

    import lit_probe.render as render
    from lit_probe import FeatureProbe

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from models import Classifier, TinyCNN, make_loader

    original = render.FigureRenderer

    class Forced(original):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **k: Any) -> None:
            k["backend"] = backend
            super().__init__(*a, **k)

    render.FigureRenderer = Forced  # the callback imports it from lit_probe.render when fit starts
    torch.manual_seed(0)
    shared: dict = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            probe = FeatureProbe(probes=["net.**"], figure_every_n_steps=every, save_dir=tmp)
            trainer = pl.Trainer(default_root_dir=tmp, max_steps=steps, logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, accelerator="cpu",
                                 callbacks=[_Stamp.make(shared, False), probe, _Stamp.make(shared, True)])
            t0 = time.perf_counter()
            trainer.fit(Classifier(TinyCNN()), make_loader(n=16 * steps, image=(3, 32, 32)))
            wall = time.perf_counter() - t0
    finally:
        render.FigureRenderer = original
    times = shared["times"]
    fig = sorted(s for s in times if s % every == 0 and s > 0)
    near = {s + d for s in fig for d in range(after + 1)}
    plain = [t for s, t in times.items() if s not in near and s > 2]
    med = statistics.median(plain)
    later = fig[1:] or fig
    after_r = [times[s + d] / med for s in later for d in range(1, after + 1) if s + d in times]
    return {"backend": backend, "median_step_ms": med * 1e3,
            "figure_step_ratio": statistics.median(times[s] for s in later) / med,
            "after_figure_step_median_ratio": statistics.median(after_r),
            "after_figure_step_worst_ratio": max(after_r), "fit_wall_s": wall}


def _table(rows: list[dict[str, Any]]) -> str:
    keys = [k for k in rows[0] if k != "backend"]
    out = ["| measure | " + " | ".join(str(r["backend"]) for r in rows) + " |",
           "| --- | " + " | ".join("---:" for _ in rows) + " |"]
    for k in keys:
        cells = []
        for r in rows:
            v = r[k]
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--figure-every", type=int, default=50)
    ap.add_argument("--layers", type=int, default=6, help="layers submitted per figure step (loop section)")
    ap.add_argument("--after", type=int, default=5, help="steps after a figure step that are compared")
    ap.add_argument("--backends", default="thread,process")
    ap.add_argument("--no-render", action="store_true", help="skip the render-time section")
    ap.add_argument("--fit", action="store_true", help="also fit a small CNN with FeatureProbe per backend")
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res: dict[str, Any] = {"load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if not args.no_render:
        res["render"] = render_times()
        print("| render | s |\n| --- | ---: |")
        for k, v in res["render"].items():
            print(f"| {k} | {v:.3f} |")
        print()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    base = loop_costs("none", args.steps, args.figure_every, args.layers, args.after)
    res["loop_baseline"] = base
    res["loop"] = [loop_costs(b, args.steps, args.figure_every, args.layers, args.after,
                              base["median_step_ms"]) for b in backends]
    print(f"training loop, {args.layers} layers + timeline every {args.figure_every} steps, {args.steps} "
          f"steps; ratios are over the median step without figures ({base['median_step_ms']:.2f} ms):")
    print(_table(res["loop"]))
    if args.fit:
        res["fit"] = [fit_costs(b, args.steps, args.figure_every, args.after) for b in backends]
        print("\nFeatureProbe fit (TinyCNN, every leaf probed):")
        print(_table(res["fit"]))
    if res["load_average"]:
        print(f"\nload average at the start: {', '.join(f'{x:.2f}' for x in res['load_average'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
