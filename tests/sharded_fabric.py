"""A Lightning Fabric loop under Fabric's ``ModelParallelStrategy`` (FSDP2 ``fully_shard``, 2 CPU processes, gloo),
probed through :func:`lit_probe.fabric.probe_fabric`, for tests/test_sharded.py. ``python sharded_fabric.py OUT``.

Rank 1 puts a NaN into its input at step 5. Every rank writes what the probe found and the hooks left.
"""

from __future__ import annotations

import json
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import torch  # noqa: E402
from lightning.fabric import Fabric  # noqa: E402
from lightning.fabric.strategies import ModelParallelStrategy  # noqa: E402
from torch import nn  # noqa: E402

from lit_probe.fabric import probe_fabric  # noqa: E402

OUT = sys.argv[1]
torch.set_num_threads(1)


def parallelize(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh["data_parallel"])
    fully_shard(model, mesh=mesh["data_parallel"])
    return model


def main() -> None:
    fabric = Fabric(accelerator="cpu", devices=2,
                    strategy=ModelParallelStrategy(parallelize, data_parallel_size=2, tensor_parallel_size=1))
    fabric.launch()
    torch.manual_seed(0)
    model = fabric.setup(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)))
    opt = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1))
    run = probe_fabric(fabric, model, ["**"], optimizers=[opt], save_dir=os.path.join(OUT, "probe"),
                       figure_every_n_steps=None, log_every_n_steps=5)
    g = torch.Generator().manual_seed(fabric.global_rank)
    with run:
        for step in range(10):
            x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
            if step == 5 and fabric.global_rank == 1:
                x[0, 0] = float("nan")
            with run.step(batch_index=step, epoch=0):
                loss = nn.functional.cross_entropy(model(x), y)
                fabric.backward(loss)
                opt.step()
                opt.zero_grad()
    def from_probe(hook) -> bool:  # FSDP2 keeps hooks of its own on the modules: count lit_probe's
        target = getattr(hook, "__self__", None) or getattr(hook, "func", None) or hook
        return any((getattr(x, "__module__", "") or "").startswith("lit_probe") for x in (target, type(target)))

    dicts = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    left = sum(from_probe(h) for m in model.module.modules() for d in dicts for h in getattr(m, d).values())
    left += sum(from_probe(h) for d in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")
                for h in getattr(opt.optimizer, d).values())
    with open(os.path.join(OUT, f"rank{fabric.global_rank}.json"), "w") as fh:
        json.dump(dict(findings=[f.to_dict() for f in run.findings], hooks_left=left), fh)


if __name__ == "__main__":
    main()
