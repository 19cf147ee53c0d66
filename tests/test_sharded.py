"""FeatureProbe under Lightning's ``ModelParallelStrategy`` on CPU (gloo): FSDP2 (``fully_shard``), tensor
parallelism (``parallelize_module``, column-wise then row-wise) and both (2 x 2), 2 and 4 processes, both Lightning
packages.

Each run is tests/sharded_train.py in its own processes (``subprocess.run(timeout=...)``: a deadlock fails the test
instead of hanging the suite). The oracle is plain PyTorch in the same run: the full tensors of the probed modules'
parameters (``DTensor.full_tensor()``) at every optimizer step, and which hooks are left on every rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lit_probe.statlog import read_stats

TESTS = Path(__file__).resolve().parent
SCRIPT = TESTS / "sharded_train.py"
NAN_RANK, NAN_STEP = 1, 5




def _launch(out: Path, pkg: str, mode: str, world: int, bug: str, resume: str = "") -> list[dict]:
    pytest.importorskip(pkg)
    pytest.importorskip(f"{pkg}.strategies").ModelParallelStrategy  # noqa: B018 (Lightning >= 2.4)
    dist_vars = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    args = [sys.executable, str(SCRIPT), str(out), pkg, mode, str(world), bug] + ([resume] if resume else [])
    try:
        proc = subprocess.run(args, cwd=str(out), env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{mode} run did not finish in {err.timeout} s:\n{(err.stderr or b'')[-3000:]!r}")
    assert proc.returncode == 0, proc.stderr[-5000:]
    return [json.loads((out / f"rank{r}{resume}.json").read_text()) for r in range(world)]


def _check_common(ranks: list[dict], world: int, steps: int) -> None:
    for r, rec in enumerate(ranks):
        assert rec["rank"] == r and rec["world"] == world and rec["global_step"] == steps
        assert rec["strategy"] == "ModelParallelStrategy"
        assert rec["owned"] == [], f"rank {r} kept lit_probe hooks: {rec['owned']}"
        assert rec["changed"] == {}, f"rank {r}: hooks changed by the run: {rec['changed']}"
        assert rec["points"] == ["net.0", "net.1", "net.2", "net.3", "net.4"]  # the user's names


def _check_params(out: Path, oracle: dict, steps: range) -> None:
    """The probe's parameter scalars (rank 0's stats.bin, merged over ranks) against the full tensors' norms."""
    log = read_stats(out / "probe" / "stats.bin")
    assert log.params is not None
    cols = [log.param_stats.index(c) for c in ("weight_norm", "param_grad_norm", "update_ratio")]
    checked = 0
    for step in steps:
        row = list(log.steps).index(step)
        for name, truth in oracle[str(step)].items():
            got = log.params[row, log.param_names.index(name), cols].astype(np.float64)
            np.testing.assert_allclose(got, truth, rtol=1e-5, atol=1e-9, err_msg=f"{name} at step {step}")
            checked += 1
    assert checked == len(steps) * 3


def _check_nan(ranks: list[dict], out: Path) -> None:
    findings = ranks[0]["findings"]
    assert findings, "the NaN was not found"
    assert all(f["step"] >= NAN_STEP for f in findings), [(f["step"], f["layer"], f["kind"]) for f in findings]
    first = findings[0]
    assert (first["step"], first["layer"], first["signal"], first["kind"]) == (NAN_STEP, "net.3", "activation",
                                                                               "nonfinite"), first
    assert first["ranks"] == [NAN_RANK], first  # only rank 1 divided by zero
    assert first["batch"] == NAN_STEP and first["epoch"] == 0  # 64 batches per epoch: batch index = step
    # the record and the summary name the rank too
    record = json.loads((out / "probe" / "run.json").read_text())
    cause = next(f for f in record["findings"] if f["cause"])
    assert cause["ranks"] == [NAN_RANK] and cause["batch"] == NAN_STEP
    assert "rank 1" in (out / "probe" / "summary.md").read_text()


@pytest.mark.ddp
@pytest.mark.parametrize("pkg, mode, world", [("lightning.pytorch", "fsdp", 2), ("pytorch_lightning", "tp", 2)])
def test_sharded_nan_on_one_rank_is_found_there_and_parameters_are_exact(tmp_path, pkg, mode, world):
    ranks = _launch(tmp_path, pkg, mode, world, "nan")
    _check_common(ranks, world, 10)
    _check_nan(ranks, tmp_path)
    _check_params(tmp_path, ranks[0]["oracle"], range(NAN_STEP))  # every step before the NaN wrecks them
    if mode == "tp":
        # between the column-wise net.0 and the row-wise net.2 each rank holds 16 of the 32 units: joined
        assert ranks[0]["units"]["net.0"] == 32 and ranks[0]["units"]["net.1"] == 32, ranks[0]["units"]
        assert set(ranks[0]["split"]) == {"net.0", "net.1"}, ranks[0]["split"]
        assert ranks[0]["units"]["net.2"] == 16  # after the row-wise all-reduce: replicated, counted once


@pytest.mark.ddp
def test_fsdp2_and_tensor_parallel_2x2_dead_units_joined(tmp_path):
    ranks = _launch(tmp_path, "lightning.pytorch", "2d", 4, "dead")
    _check_common(ranks, 4, 10)
    _check_params(tmp_path, ranks[0]["oracle"], range(10))
    dead = [f for f in ranks[0]["findings"] if f["kind"] == "dead"]
    assert [(f["layer"], f["signal"]) for f in dead][:1] == [("net.1", "activation")], ranks[0]["findings"]
    assert dead[0]["extra"]["units"] == 32 and dead[0]["extra"]["dead_units"] == 32, dead[0]["extra"]
    assert dead[0]["ranks"] == []  # a verdict on every rank's merged units
    assert all(f["kind"] != "nonfinite" for f in ranks[0]["findings"])


@pytest.mark.ddp
def test_fsdp2_four_processes_healthy_run_is_silent(tmp_path):
    ranks = _launch(tmp_path, "pytorch_lightning", "fsdp", 4, "none")
    _check_common(ranks, 4, 10)
    assert all(rec["findings"] == [] for rec in ranks), ranks[0]["findings"]
    _check_params(tmp_path, ranks[0]["oracle"], range(10))


@pytest.mark.ddp
def test_fsdp2_resume_keeps_the_probe_state(tmp_path):
    first = _launch(tmp_path, "pytorch_lightning", "fsdp", 2, "dead", "save")
    assert [(f["step"], f["layer"], f["kind"]) for f in first[0]["findings"]][:1] == [(4, "net.1", "dead")]
    second = _launch(tmp_path, "pytorch_lightning", "fsdp", 2, "dead", "load")
    _check_common(second, 2, 10)
    # the finding of the first fit is kept (same step, not found again), and stats.bin goes on from the checkpoint
    assert [(f["step"], f["layer"], f["kind"]) for f in second[0]["findings"]] == \
        [(f["step"], f["layer"], f["kind"]) for f in first[0]["findings"]]
    assert list(read_stats(tmp_path / "probe" / "stats.bin").steps) == list(range(10))
    lines = (tmp_path / "probe" / "findings.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines][:1] == [4]


# ---------------------------------------------------------------------------------------------- the merge, alone
def _rows(values: list[list[float]], units: dict[int, np.ndarray], nan_at: tuple[int, int] | None = None,
          params: np.ndarray | None = None):
    """One rank's rows: one step, a stream per list of elements (its own elements, as a hook would reduce them)."""
    from lit_probe.stats import COLUMNS, HostRows, pack_rows

    dev = np.zeros((1, len(values), len(COLUMNS)), np.float32)
    for s, v in enumerate(values):
        a = np.asarray(v, np.float64)
        if nan_at is not None and nan_at[0] == s:
            a[nan_at[1]] = np.nan
        dev[0, s] = [np.isnan(a).sum(), (a != 0).sum(), a.sum(), np.sqrt((a ** 2).sum()), a.min(), a.max()]
    k = len(values)
    ones = np.ones((1, k), np.int64)
    sizes = np.array([[len(v) for v in values]], np.int64)
    host = HostRows(np.array([3]), dev, ones, sizes, ones, [list(range(k))], sizes.copy(),
                    np.full((1, 2), np.nan, np.float32), params, np.zeros((1, k), bool))
    return pack_rows(host, units)


def test_tensor_parallel_merge_joins_split_units_and_counts_replicas_once():
    """Two tensor-parallel ranks: stream 0 holds other units on each rank (split), stream 1 is replicated (the same
    values on both): split units are joined and their elements add; a replica counts once; a NaN on one rank is
    kept (and named) even in a replicated stream; parameters' sums of squares add, their max-abs is the max."""
    from lit_probe.stats import merge_ranks

    split0, split1 = [1.0, 0.0, 2.0], [0.0, 0.0, 5.0]
    rep = [1.0, -2.0, 3.0, 0.5]
    p0 = np.array([[[4.0, 1.0, 0.25, 2.0, 0.5]]])  # one module: weight_sq, grad_sq, update_sq, weight_max, grad_max
    p1 = np.array([[[9.0, 0.0, 0.0, 3.0, 0.1]]])  # rank 1 holds the other half of it (rank 1 adds 0 for a replica)
    a = _rows([split0, rep], {0: np.array([3.0, -1.0, 3.0], np.float32)}, params=p0)
    b = _rows([split1, rep], {0: np.array([-1.0, -1.0, 3.0], np.float32)}, params=p1)
    split = np.zeros(2, bool)
    host, units, ranks = merge_ranks([a, b], tensor_parallel=2, sharded_units=split)
    assert split.tolist() == [True, False]
    assert units[0].tolist() == [3.0, -1.0, 3.0, -1.0, -1.0, 3.0]  # 6 units, rank 0's first
    assert host.numel[0].tolist() == [6, 4]  # the replica's 4 elements, once
    np.testing.assert_allclose(host.dev[0, 0, 3], np.sqrt(1 + 4 + 25))  # L2 over both ranks' units
    np.testing.assert_allclose(host.dev[0, 1, 3], np.sqrt(1 + 4 + 9 + 0.25))  # the replica's L2, not x sqrt(2)
    np.testing.assert_allclose(host.params[0, 0], [13.0, 1.0, 0.25, 3.0, 0.5])
    assert ranks is not None and ranks.ranks(0, 0, "nonfinite") == []
    assert ranks.ranks(0, 0, "exploding") == [1]  # |5| on rank 1
    # a NaN on rank 1 only, in the replicated stream: kept, and it is rank 1's
    c = _rows([split1, rep], {0: np.array([-1.0, -1.0, 3.0], np.float32)}, nan_at=(1, 2), params=p1)
    host, _, ranks = merge_ranks([a, c], tensor_parallel=2, sharded_units=split)
    assert np.isnan(host.dev[0, 1, 4]) or np.isnan(host.dev[0, 1, 5])
    assert host.dev[0, 1, 0] == 1  # one non-finite element, counted once
    assert ranks.ranks(0, 1, "nonfinite") == [1]
    assert split.tolist() == [True, False]  # a NaN on one rank does not make a replica look split


def test_data_parallel_merge_adds_samples_and_names_ranks():
    from lit_probe.stats import merge_ranks

    a = _rows([[1.0, 2.0]], {0: np.array([1.0, 2.0], np.float32)})
    b = _rows([[3.0, 0.0]], {0: np.array([0.0, 2.0], np.float32)}, nan_at=(0, 0))
    host, units, ranks = merge_ranks([a, b])
    assert host.numel[0, 0] == 4 and host.calls[0, 0] == 2  # other samples: elements add
    assert units[0].tolist() == [1.0, 2.0]  # the same units: a unit fired if it fired on any rank
    assert ranks.ranks(0, 0, "nonfinite") == [1]


def test_figure_titles_say_whose_tensor_they_show():
    from lit_probe.compose import Drawer

    drawer = Drawer(dpi=50, bins=10, max_channels=8)
    act = np.random.default_rng(0).random((2, 4, 6, 6)).astype(np.float32)
    made = list(drawer.layer(3, "net.1", act, None, None, "channels_first", (2, 8, 6, 6), ["activations"],
                             "rank 0's shard of the units"))
    fig = made[0][3]()
    assert fig.get_suptitle().endswith("· rank 0's shard of the units"), fig.get_suptitle()


@pytest.mark.ddp
def test_fabric_fsdp2_loop_names_the_rank(tmp_path):
    """The same run core under a Fabric loop: Fabric's ModelParallelStrategy with fully_shard."""
    pytest.importorskip("lightning.fabric.strategies").ModelParallelStrategy  # noqa: B018
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK",
                                                             "LOCAL_RANK", "NODE_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(TESTS / "sharded_fabric.py"), str(tmp_path)], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["hooks_left"] == 0 for r in ranks)
    first = ranks[0]["findings"][0]
    # the NaN enters at the input: the first probed module's output is the first non-finite stream
    assert (first["step"], first["layer"], first["signal"], first["kind"]) == (5, "0", "activation", "nonfinite")
    assert first["ranks"] == [1] and first["batch"] == 5 and first["epoch"] == 0
