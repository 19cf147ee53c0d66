"""One sharded training run under Lightning's ``ModelParallelStrategy`` on CPU (gloo), for tests/test_sharded.py.

``python sharded_train.py OUT PKG MODE WORLD [BUG] [RESUME]``: ``MODE`` is ``fsdp`` (FSDP2 ``fully_shard`` on the
data-parallel mesh), ``tp`` (``parallelize_module``: a column-wise then a row-wise Linear on the tensor-parallel
mesh) or ``2d`` (both: data-parallel 2 x tensor-parallel 2). ``BUG``: ``nan`` (rank 1 divides one layer's output by
zero at step 5), ``dead`` (a ReLU behind a bias of -10: dead units), ``none``. ``RESUME``: ``save`` (fit 6 steps
and save a checkpoint) or ``load`` (resume from it to 10 steps).

The oracle, independent of the probe: at every optimizer step each rank gathers the full tensors of the probed
modules' own parameters (``DTensor.full_tensor()``: plain PyTorch) and writes their norms, their gradients' norms
and the update ratio; every rank writes the hooks it kept. Rank 0 writes the probe's findings.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

OUT, PKG, MODE, WORLD = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
BUG = sys.argv[5] if len(sys.argv) > 5 else "none"
RESUME = sys.argv[6] if len(sys.argv) > 6 else ""
sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]

import importlib  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(1)
pl = importlib.import_module(PKG)
strategies = importlib.import_module(f"{PKG}.strategies")

from lit_probe import FeatureProbe  # noqa: E402
from lit_probe.hooks import hook_snapshot  # noqa: E402

NAN_RANK, NAN_STEP = 1, 5
PROBED_PARAMS = ["net.0", "net.2", "net.4"]


class Poison(nn.Module):
    """Divides by zero when armed (rank 1, step 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / 0 if self.armed else x


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), Poison(), nn.Linear(16, 4))
        if BUG == "dead":
            with torch.no_grad():
                self.net[0].bias.fill_(-10.0)  # every unit of net.1 below zero: dead from the first step

    def configure_model(self) -> None:
        mesh = self.device_mesh
        if MODE in ("tp", "2d"):
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            parallelize_module(self.net, mesh["tensor_parallel"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        if MODE in ("fsdp", "2d"):
            from torch.distributed.fsdp import fully_shard

            for m in self.net:
                if isinstance(m, nn.Linear):
                    fully_shard(m, mesh=mesh["data_parallel"])
            fully_shard(self.net, mesh=mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        self.net[3].armed = BUG == "nan" and self.global_rank == NAN_RANK and self.global_step == NAN_STEP
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(512, 16, generator=g)
        y = torch.randint(0, 4, (512,), generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
              "_load_state_dict_pre_hooks")


def _from_probe(hook) -> bool:
    """Whether a hook callable is lit_probe's (a function, a bound method or a callable object of it)."""
    target = getattr(hook, "__self__", None) or getattr(hook, "func", None) or hook
    return (getattr(type(target), "__module__", "") or "").startswith("lit_probe") or \
        (getattr(target, "__module__", "") or "").startswith("lit_probe")


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Oracle(pl.Callback):
    """Plain PyTorch: the full tensors' norms at each optimizer step, and what the probe left on each rank."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, list[float]]] = {}
        self.before: dict[str, list[torch.Tensor]] = {}

    def on_fit_start(self, trainer, pl_module):  # before the probe's (this callback comes first), after
        self.hooks_before = hook_snapshot(pl_module)  # configure_model (FSDP2 and TP add hooks of their own)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        row = {}
        for name in PROBED_PARAMS:
            ps = list(pl_module.get_submodule(name).parameters(recurse=False))
            w = [_full(p.detach()).double() for p in ps]
            g = [_full(p.grad.detach()).double() for p in ps]
            self.before[name] = w
            row[name] = [float(torch.sqrt(sum((x ** 2).sum() for x in w))),
                         float(torch.sqrt(sum((x ** 2).sum() for x in g)))]
        self.steps[trainer.global_step] = row

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        row = self.steps[trainer.global_step - 1]
        for name in PROBED_PARAMS:
            ps = list(pl_module.get_submodule(name).parameters(recurse=False))
            after = [_full(p.detach()).double() for p in ps]
            d = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after, self.before[name])))
            row[name].append(float(d) / row[name][0])

    def teardown(self, trainer, pl_module, stage):
        probe = next(c for c in trainer.callbacks if isinstance(c, FeatureProbe))
        # FSDP2 registers state-dict hooks of its own at its lazy init (the first forward): compare the others, and
        # count every hook whose callable comes from lit_probe
        lazy = ("_load_state_dict_pre_hooks", "_state_dict_hooks")
        after = hook_snapshot(pl_module)
        changed = {name: {d: (self.hooks_before.get(name, {}).get(d), keys) for d, keys in hooks.items()
                          if d not in lazy and self.hooks_before.get(name, {}).get(d) != keys}
                   for name, hooks in after.items()}
        owned = [(name, d) for name, m in pl_module.named_modules() for d in HOOK_DICTS
                 for h in getattr(m, d, {}).values() if _from_probe(h)]
        owned += [("optimizer", d) for o in trainer.optimizers for d in ("_optimizer_step_pre_hooks",
                                                                          "_optimizer_step_post_hooks")
                  for h in getattr(getattr(o, "optimizer", o), d, {}).values() if _from_probe(h)]
        rec = dict(rank=trainer.global_rank, world=trainer.world_size, global_step=trainer.global_step,
                   changed={k: str(v) for k, v in changed.items() if v}, owned=owned,
                   oracle={str(k): v for k, v in self.steps.items()}, points=probe.points,
                   findings=[f.to_dict() for f in probe.findings], strategy=type(trainer.strategy).__name__,
                   units={probe.session.slot_names[s]: int(u.size) for s, u in probe.session.units.items()}
                   if probe.session is not None else {},
                   split=[probe.session.slot_names[s] for s in np.flatnonzero(probe.session.units_split)]
                   if probe.session is not None else [])
        with open(os.path.join(OUT, f"rank{trainer.global_rank}{RESUME}.json"), "w") as fh:
            json.dump(rec, fh)


def main() -> None:
    dp, tp = {"fsdp": (WORLD, 1), "tp": (1, WORLD), "2d": (2, WORLD // 2)}[MODE]
    probe = FeatureProbe(probes=["net.**"], save_dir=os.path.join(OUT, "probe"), log_every_n_steps=5,
                         full_stats_every_n_steps=1, figure_every_n_steps=None,
                         thresholds={"dead_window": 4})
    strategy = strategies.ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp,
                                                timeout=timedelta(seconds=90))
    ckpt = os.path.join(OUT, "ckpt")
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy,
                         max_steps=6 if RESUME == "save" else 10, logger=False, callbacks=[Oracle(), probe],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=OUT)
    trainer.fit(Net(), ckpt_path=ckpt if RESUME == "load" else None)
    if RESUME == "save":
        trainer.save_checkpoint(ckpt)


if __name__ == "__main__":
    main()
