"""FeatureProbe under DDP on CPU (gloo, 2 processes): ``ddp_spawn`` and ``ddp`` (script re-launch).

The training runs in a standalone script started with ``subprocess.run(..., timeout=...)``: a deadlock
becomes a test failure instead of a hung suite, and the ``ddp`` launcher (which re-runs the script for
rank 1) and the ``ddp_spawn`` launcher (which pickles the trainer and its callbacks) both work as they do
for users. Every rank writes what it saw to ``rank<r>.json``; rank 0 writes the probe's files.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lit_probe import FeatureProbe
from lit_probe.hooks import hook_snapshot
from models import Classifier, make_loader, mlp, trainer

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

SCRIPT = textwrap.dedent('''
    import json, os, sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    from datetime import timedelta

    os.environ["LIT_PROBE_TEST_PACKAGE"] = {pkg!r}
    import {pkg} as pl
    import torch
    from {pkg}.strategies import DDPStrategy
    from torch import nn

    from lit_probe import FeatureProbe
    from lit_probe.hooks import hook_snapshot
    from models import Classifier, make_loader

    OUT = {out!r}


    class Poison(nn.Module):
        """Divides by zero when told to (rank 1, step 5 only)."""

        def __init__(self):
            super().__init__()
            self.armed = False

        def forward(self, x):
            return x / 0 if self.armed else x


    class Net(Classifier):
        def __init__(self):
            torch.manual_seed(0)
            super().__init__(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), Poison(), nn.Linear(32, 4)))

        def training_step(self, batch, batch_idx):
            self.net[2].armed = self.global_rank == 1 and self.global_step == 5
            return super().training_step(batch, batch_idx)


    class Report(pl.Callback):
        """Runs in every rank (spawned or re-launched): records what the probe saw there."""

        def setup(self, trainer, pl_module, stage):
            self.before = hook_snapshot(pl_module)

        def on_train_start(self, trainer, pl_module):
            self.wrapped = type(trainer.model).__name__

        def teardown(self, trainer, pl_module, stage):
            probe = next(c for c in trainer.callbacks if isinstance(c, FeatureProbe))
            steps, values = probe.session.history.window()
            from lit_probe.history import STATS

            rec = dict(rank=trainer.global_rank, world=trainer.world_size, global_step=trainer.global_step,
                       hooks_clean=hook_snapshot(pl_module) == self.before, points=probe.points,
                       steps=steps.tolist(), calls=values[:, :, STATS.index("calls")].tolist(),
                       count=values[:, :, STATS.index("count")].tolist(),
                       findings=[f.to_dict() for f in probe.findings],
                       wrapped=self.wrapped)
            with open(os.path.join(OUT, f"rank{{trainer.global_rank}}.json"), "w") as fh:
                json.dump(rec, fh)


    def main(strategy_name):
        probe = FeatureProbe(probes=["net.0", "net.2", "net.3"], save_dir=OUT, figure_every_n_steps=None,
                             log_every_n_steps=5)
        strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60),
                               start_method="spawn") if strategy_name == "ddp_spawn" else \\
            DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60))
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=10, logger=False,
                             callbacks=[probe, Report()],
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False,
                             num_sanity_val_steps=0, default_root_dir=OUT)
        trainer.fit(Net(), make_loader(n=512, batch_size=16))


    if __name__ == "__main__":
        main(sys.argv[1])
''')


def _run(tmp_path: Path, strategy: str, pkg: str = "pytorch_lightning") -> tuple[dict, dict, list[dict]]:
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT.format(repo=str(REPO), tests=str(TESTS), out=str(out), pkg=pkg))
    dist_vars = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run([sys.executable, str(script), strategy], cwd=str(tmp_path), env=env,
                              capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired as err:  # a deadlock (or a hopelessly overloaded machine)
        pytest.fail(f"DDP run did not finish in {err.timeout} s:\n{(err.stderr or b'')[-3000:]!r}")
    assert proc.returncode == 0, proc.stderr[-5000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    lines = (out / "findings.jsonl").read_text().splitlines()
    return ranks[0], ranks[1], [json.loads(x) for x in lines]


@pytest.mark.ddp
@pytest.mark.parametrize("pkg", ["pytorch_lightning", "lightning.pytorch"])
@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp"])
def test_ddp_nan_on_rank1_is_found_by_rank0(tmp_path, strategy, pkg):
    pytest.importorskip(pkg)
    r0, r1, findings = _run(tmp_path, strategy, pkg)
    for r, rec in enumerate((r0, r1)):
        assert rec["rank"] == r and rec["world"] == 2 and rec["global_step"] == 10
        assert rec["wrapped"] == "DistributedDataParallel"  # the model really was wrapped
        assert rec["hooks_clean"], f"rank {r} kept probe hooks after fit"
        assert rec["points"] == ["net.0", "net.2", "net.3"]  # the user's names, no `module.` prefix
        assert rec["steps"] == list(range(10))
        # every rank measured: each step's statistics combine one call (16 samples) from each of the 2 ranks
        assert all(row[0] == 2 for row in rec["calls"]), rec["calls"]
        assert all(row[0] == 2 * 16 * 32 for row in rec["count"]), rec["count"]
    # rank 0 saw rank 1's NaN (through the cross-rank reduction) and wrote it to disk, at the right place
    nonfinite = [(f["layer"], f["signal"], f["step"]) for f in findings if f["kind"] == "nonfinite"]
    assert ("net.2", "activation", 5) in nonfinite, findings
    assert nonfinite[0] == ("net.2", "activation", 5), nonfinite  # the first layer, at the exact step
    first = next(f for f in findings if f["kind"] == "nonfinite")
    assert first["ranks"] == [1], first  # only rank 1 divided by zero
    assert (first["batch"], first["epoch"]) == (5, 0), first  # 16 batches per rank and epoch: batch 5 of epoch 0
    assert "5 (rank 1 · batch 5 of epoch 0)" in (tmp_path / "out" / "summary.md").read_text()
    assert all(not f["layer"].startswith("module.") for f in findings)
    assert [f["step"] for f in r0["findings"] if f["kind"] == "nonfinite"][:1] == [5]
    assert (tmp_path / "out" / "summary.md").exists()


def test_probe_pickles_before_and_after_fit(tmp_path):
    p = FeatureProbe(probes=["net.0", "net.2"], thresholds={"dead_window": 7}, figure_every_n_steps=None,
                     save_dir=str(tmp_path / "probe"))
    q = pickle.loads(pickle.dumps(p))
    assert q.probes == ["net.0", "net.2"] and q.thresholds.dead_window == 7 and q.state_key == p.state_key
    model = Classifier(mlp())
    before = hook_snapshot(model)
    trainer(tmp_path, callbacks=[p], max_steps=3).fit(model, make_loader())
    assert hook_snapshot(model) == before
    q = pickle.loads(pickle.dumps(p))  # after fit: no session, handles, threads or device tensors travel
    assert q.session is None and q.points == ["net.0", "net.2"]
