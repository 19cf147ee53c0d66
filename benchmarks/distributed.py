"""What the probe costs on several processes: DDP and FSDP2 (``ModelParallelStrategy`` + ``fully_shard``), CPU/gloo.

Run (it launches its own processes; ``--devices`` of them, one torch thread each by default)::

    python benchmarks/distributed.py                      # DDP and FSDP2, 2 processes: ~6 min on 2 idle cores
    python benchmarks/distributed.py --strategies fsdp2 --rounds 3 --steps 300 --json dist.json

Method (as ``overhead.py``): one process group, every fit a real ``Trainer(...).fit(...)`` with a fresh model
(same seed) and a fresh Trainer, the variants interleaved round by round (baseline, probe, probe with
``on_finding="raise"``, baseline, ...), the probe in its DEFAULT configuration (figures, parameters, flight
recorder; figures every 100 steps here so a short fit has some) on resnet18's 8 residual blocks, 32x32 inputs,
batch 16 per process. Timed on rank 0: the whole training loop (first batch start to the last batch end, every
callback, log and figure step included) and the median step. The ratio of a variant is its loop time over the
mean of the baseline fits around it. ``raise`` adds one small all-reduce per step (the per-step alarm must be
entered by every rank, :meth:`lit_probe.run.ProbeRun.end_step`); its row against ``probe`` is that cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import timedelta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategies", default="ddp,fsdp2", help="comma-separated: ddp, fsdp2")
    p.add_argument("--devices", type=int, default=2, help="processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=200, help="training steps per fit")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=16, help="per process")
    p.add_argument("--variants", default="probe,probe_raise", help="besides the baseline: probe, probe_raise")
    p.add_argument("--json", default=None, help="write every fit's numbers here (rank 0)")
    p.add_argument("--out", default=None, help="probe output directory (default: a temp dir)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = _args(argv)
    import tempfile

    import torch
    import torchvision
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
    from torch import nn

    from lit_probe import FeatureProbe

    torch.set_num_threads(a.threads)
    out_root = a.out or tempfile.mkdtemp(prefix="lit_probe_dist_")

    class Data(torch.utils.data.Dataset):
        def __init__(self, n: int) -> None:
            g = torch.Generator().manual_seed(0)
            self.x = torch.randn(n, 3, a.size, a.size, generator=g)
            self.y = torch.randint(0, 10, (n,), generator=g)

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int):
            return self.x[i], self.y[i]

    class Net(L.LightningModule):
        def __init__(self, shard: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torchvision.models.resnet18(weights=None, num_classes=10)
            self.shard = shard

        def configure_model(self) -> None:
            if not self.shard:
                return
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net.layer1, self.net.layer2, self.net.layer3, self.net.layer4):
                for block in layer:
                    fully_shard(block, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.ends: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.ends.append(time.perf_counter())

    blocks = [f"net.layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    loader = torch.utils.data.DataLoader(Data(a.batch * a.devices * a.steps), batch_size=a.batch)

    def fit(strategy_name: str, variant: str, k: int) -> dict:
        clock = Clock()
        callbacks: list = [clock]
        if variant != "baseline":
            callbacks.append(FeatureProbe(probes=blocks, save_dir=os.path.join(out_root, f"{strategy_name}_{k}"),
                                          figure_every_n_steps=100,
                                          on_finding="raise" if variant == "probe_raise" else "warn"))
        if strategy_name == "ddp":
            strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=300))
        else:
            strategy = ModelParallelStrategy(data_parallel_size=a.devices, tensor_parallel_size=1,
                                             timeout=timedelta(seconds=300))
        trainer = L.Trainer(accelerator="cpu", devices=a.devices, strategy=strategy, max_steps=a.steps,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
                            default_root_dir=out_root)
        t0 = time.perf_counter()
        trainer.fit(Net(shard=strategy_name == "fsdp2"), loader)
        total = time.perf_counter() - t0
        steps = [e - s for s, e in zip(clock.starts, clock.ends)]
        return dict(strategy=strategy_name, variant=variant, fit_s=total,
                    loop_s=clock.ends[-1] - clock.starts[0], median_step_ms=1e3 * statistics.median(steps),
                    steps=len(steps), rank=trainer.global_rank)

    variants = ["baseline"] + [v for v in a.variants.split(",") if v]
    fits: list[dict] = []
    for strategy_name in [s for s in a.strategies.split(",") if s]:
        k = 0
        for _ in range(a.rounds):
            for v in variants:
                fits.append(fit(strategy_name, v, k))
                k += 1
        fits.append(fit(strategy_name, "baseline", k))  # a baseline after the last probed fit too
    if fits and fits[0]["rank"] != 0:
        return
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, {a.devices} processes x "
          f"{a.threads} torch thread(s), torch {torch.__version__}, lightning {L.__version__}, resnet18 "
          f"{a.size}x{a.size} batch {a.batch}/process, {a.steps} steps/fit, {a.rounds} round(s), load "
          f"{os.getloadavg()[0]:.2f}")
    print("\n| strategy | variant | loop ratio (mean) | median step ratio | loop s | median step ms |")
    print("|---|---|---:|---:|---:|---:|")
    summary = []
    for strategy_name in dict.fromkeys(f["strategy"] for f in fits):
        rows = [f for f in fits if f["strategy"] == strategy_name]
        for v in variants[1:]:
            ratios, step_ratios = [], []
            for i, f in enumerate(rows):
                if f["variant"] != v:
                    continue
                around = [rows[j] for j in (i - 1, i + 1, i - 2, i + 2) if 0 <= j < len(rows)
                          and rows[j]["variant"] == "baseline"][:2]
                base = statistics.mean(b["loop_s"] for b in around)
                ratios.append(f["loop_s"] / base)
                step_ratios.append(f["median_step_ms"] / statistics.mean(b["median_step_ms"] for b in around))
            mine = [f for f in rows if f["variant"] == v]
            summary.append(dict(strategy=strategy_name, variant=v, loop_ratio=statistics.mean(ratios),
                                step_ratio=statistics.mean(step_ratios)))
            print(f"| {strategy_name} | {v} | {statistics.mean(ratios):.3f}x | {statistics.mean(step_ratios):.3f}x | "
                  f"{statistics.mean(f['loop_s'] for f in mine):.1f} | "
                  f"{statistics.mean(f['median_step_ms'] for f in mine):.1f} |")
        base = [f for f in rows if f["variant"] == "baseline"]
        print(f"| {strategy_name} | baseline | 1 | 1 | {statistics.mean(f['loop_s'] for f in base):.1f} | "
              f"{statistics.mean(f['median_step_ms'] for f in base):.1f} |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(args=vars(a), fits=fits, summary=summary), fh, indent=1)


if __name__ == "__main__":
    main()
