"""Smoke tests of the benchmarks: ``benchmarks/overhead.py`` (tiny in-process runs of every section, checking the
JSON's shape and the Markdown it prints, never timings) and the zoo research scripts ``zoo_research`` and
``param_research`` (the smallest runs, as ``python -m benchmarks.<name>``, a few seconds each)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"

pytest.importorskip("psutil")
pytest.importorskip("torchvision")

TINY = ["--quick", "--device", "cpu", "--long-steps", "8", "--long-log-every", "2", "--long-window", "4",
        "--scaling-steps", "4", "--kernel-modules", "10", "--steps", "3", "--warmup", "1", "--batch", "2"]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lit_probe_bench_overhead", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look the module up by name
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load()


def test_every_section(bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "overhead.json"
    variants = "baseline,probe_blocks,naive_leaves"
    result = bench.main([*TINY, "--section", "all", "--variants", variants, "--memory-rounds", "0",
                         "--json", str(out)])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["sections"].keys() == result["sections"].keys() == {"long", "scaling", "kernels", "short"}
    for key in ("schema_version", "machine", "config", "sections", "targets", "total_wall_s"):
        assert key in data, key
    for key in ("cpu", "logical_cpus", "torch_threads", "torch", "lightning", "device"):
        assert key in data["machine"], key
    assert data["machine"]["torch_threads"] == 1
    assert {t["result"] for t in data["targets"]} <= {"PASS", "MISS", "n/a"}
    for title in ("**Whole training loop**", "**Scaling**", "**Per observed tensor**", "**Short interleaved"):
        assert title in printed, title
    assert "Targets:" in printed

    # long: A B A, every step stamped, the whole loop and the fit end measured
    long = data["sections"]["long"]
    assert long["config"]["order"] == ["no_probe", "probe_blocks", "no_probe"]
    base = long["rows"]["no_probe"]
    assert base["status"] == "ok", base
    for key in ("median_step_ms", "mean_step_ms", "fit_end_s", "fit_wall_s", "log_step_early_ms",
                "log_step_late_ms"):
        assert base[key] is not None, key
    for fit in long["fits"]:
        if fit["status"] == "ok":
            assert len(fit["period_s"]) == 8 and len(fit["step_s"]) == 8
            assert fit["train_s"] > 0 and fit["fit_end_s"] >= 0
            assert abs(sum(fit["period_s"]) - fit["train_s"]) < 1e-6
    blocks = long["rows"]["probe_blocks"]
    assert blocks.get("status") in ("ok", "unavailable", "error"), blocks  # FeatureProbe may be mid-rewrite
    if blocks["status"] == "ok":
        assert blocks["n_probed"] == 8
        assert blocks["ratio_mean"] is not None and blocks["log_late_over_early"] is not None
        assert blocks["fits"][0]["log_steps_early"] == [1, 3] and blocks["fits"][0]["log_steps_late"] == [5]

    # scaling: one MLP size
    (row,) = data["sections"]["scaling"]["rows"]
    assert row["model"] == "mlp50" and row["n_probed"] == 49
    assert row["status"] in ("ok", "unavailable", "error"), row
    if row["status"] == "ok":
        assert row["ratio_mean"] is not None and row["probe_fit_end_s"] is not None

    # kernels: ops per tensor from the dispatch mode; the sentinel takes fewer ops than full statistics
    rows = {r["case"].split(",")[-1].strip() + (" bf16" if r.get("bf16") else ""): r
            for r in data["sections"]["kernels"]["rows"]}
    sentinel, full = rows["sentinel (min/max)"], rows["full statistics"]
    if "ops_per_tensor" in sentinel:
        assert sentinel["tensors"] == 20  # 10 modules, an output and a gradient each
        assert 0 < sentinel["ops_per_tensor"] < full["ops_per_tensor"]
        assert sentinel["compute_ops_per_tensor"] >= 1  # at least the min/max
        assert sentinel["host_us_per_tensor"] is not None
        assert any("aminmax" in k for k in sentinel["probe_ops"])

    # short: the old interleaved table; full-backward hooks on an in-place ReLU crash, with the first line
    short = data["sections"]["short"]
    assert set(short["summary"]) == set(variants.split(","))
    assert short["summary"]["baseline"]["ratio"] == pytest.approx(1.0)
    assert short["summary"]["baseline"]["n_steps"] == 2  # 3 steps, 1 warm-up step dropped
    naive = short["summary"]["naive_leaves"]
    assert naive["status"] == "crashes" and naive["error"] and "\n" not in naive["error"]
    assert short["summary"]["probe_blocks"]["status"] in ("ok", "unavailable", "error")
    assert short["config"]["n_leaf_modules"] >= 52 and short["config"]["n_blocks"] == 8


def test_small_section_prints_one_table_with_its_targets(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    """``--section small`` (issue 22): blocks and leaves on one thread, the blocks on every core, mlp50 and the host
    time per tensor, in one table and one list of targets; not part of ``all``."""
    result = bench.main([*TINY, "--section", "small", "--small-steps", "4", "--small-mlp-steps", "3",
                         "--kernel-reps", "1", "--kernel-inner", "1"])
    printed = capsys.readouterr().out
    assert set(result["sections"]) == {"small"}
    small = result["sections"]["small"]
    runs = [(r["threads"], r["variant"]) for r in small["rows"]]
    cores = small["config"]["cores"]
    assert runs == [(1, "probe_blocks"), (1, "probe_leaves"), (cores, "probe_blocks"), (1, "net.**")], runs
    assert "**The short step, on one core and on every core**" in printed and "<= 1.08x" in printed
    targets = [t["target"] for t in small["targets"]]
    for what in ("probe_leaves (1 thread): whole-loop ratio <= 1.08x", "probe_blocks (1 thread): whole-loop ratio "
                 "<= 1.04x", "whole-loop ratio <= 1.10x", "mlp50: whole-loop ratio <= 2.00x", "<= 10 us / tensor"):
        assert any(what in t for t in targets), (what, targets)
    assert {t["result"] for t in small["targets"]} <= {"PASS", "MISS", "n/a"}


def test_short_memory_pass(bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU memory pass: a subprocess with fixed glibc thresholds (run in-process here: an interpreter
    start with torch and Lightning costs seconds)."""
    calls = []

    def run_in_process(cmd: list[str], env: dict[str, str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append((cmd, env))
        assert cmd[1] == str(SCRIPT)
        bench.main(cmd[2:])
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bench.subprocess, "run", run_in_process)
    out = tmp_path / "short.json"
    bench.main([*TINY, "--section", "short", "--variants", "baseline", "--json", str(out)])
    (cmd, env), = calls
    assert env["MALLOC_MMAP_THRESHOLD_"] == "131072" and "--memory-worker" in cmd
    short = json.loads(out.read_text())["sections"]["short"]
    assert {f["phase"] for f in short["fits"]} == {"timing", "memory"}
    assert short["summary"]["baseline"]["peak_mem_delta_mb"] is not None


def test_bad_arguments_are_rejected(bench: ModuleType) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--variants", "baseline,nope"])
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--section", "nope"])
    assert bench.main(["--list-variants"]) == {}


# ------------------------------------------------------------------ the zoo research scripts (plain PyTorch)
REPO = SCRIPT.parents[1]


def _run_module(module: str, *args: str, tmpdir: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m benchmarks.<module> ARGS`` from the repository root (how the scripts are documented to run);
    ``tmpdir`` becomes TMPDIR, where the default ``tempfile.mkdtemp()`` output goes."""
    env = dict(os.environ)
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240, check=False)


def test_zoo_research_collects_and_evaluates_into_the_given_directory(tmp_path: Path) -> None:
    out = tmp_path / "zr"
    res = _run_module("zoo_research", "all", "--models", "tv_vit", "--steps", "3", "--parts", "nan,vanishing",
                      "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert {p.name for p in out.glob("*.pkl")} == {"healthy_tv_vit.pkl", "bug_nan_tv_vit.pkl",
                                                  "bug_vanish_tanh_mlp30.pkl", "bug_vanish_sigmoid15.pkl",
                                                  "bug_vanish_tanh_mlp30_small_init.pkl"}
    report = (out / "zoo_report.md").read_text()
    assert "### Models (healthy runs)" in report and "| tv_vit | torchvision |" in report
    # the oracle's answer for the injected NaN: the module it was injected into, at the injection step
    assert "| tv_vit | `encoder.layers.encoder_layer_1.mlp.0` | `encoder.layers.encoder_layer_1.mlp.0` (5) |" in report


def test_zoo_research_needs_the_directory_to_evaluate(tmp_path: Path) -> None:
    res = _run_module("zoo_research", "evaluate")
    assert res.returncode == 2 and "--out DIR" in res.stderr


def test_param_research_writes_to_a_fresh_temporary_directory_by_default(tmp_path: Path) -> None:
    res = _run_module("param_research", "--models", "tv_vit", "--sgd-models", "", "--no-bugs", "--steps", "4",
                      tmpdir=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    (cache,) = tmp_path.glob("param_research_*/param_research.pkl")
    assert f"(cache {cache})" in res.stdout
    assert "## healthy runs (4 steps" in res.stdout and "tv_vit|adam 0.001" in res.stdout
    # evaluated again from the cache, without training
    again = _run_module("param_research", "--models", "tv_vit", "--sgd-models", "", "--no-bugs", "--steps", "4",
                        "--out", str(cache.parent), "--reuse")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "tv_vit|adam 0.001" in again.stdout and "  tv_vit:" not in again.stderr  # nothing trained


def test_paired_processes_take_turns_and_count_every_block(tmp_path: Path) -> None:
    """``benchmarks/paired.py``: per round one process per variant, the baton passed every ``--block`` steps; every
    process reports one time per block (so the loop is counted whole), who starts rotates between rounds, and the
    table names each variant's ratio per round and their median."""
    out = tmp_path / "paired.json"
    script = SCRIPT.parent / "paired.py"
    proc = subprocess.run([sys.executable, str(script), "--model", "mlp50", "--steps", "12", "--block", "4",
                           "--batch", "8", "--variants", "none2,net", "--rounds", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rounds = json.loads(out.read_text())["rounds"]
    assert len(rounds) == 2
    for res in rounds:
        assert set(res) == {"none", "none2", "net"}
        for r in res.values():
            assert len(r["blocks"]) == 3 and all(b > 0 for b in r["blocks"])
        assert res["net"]["modules"] == 49 and res["none"]["modules"] == 0 and res["none2"]["modules"] == 0
        assert res["net"]["pngs"] > 0 and res["none"]["pngs"] == 0  # the probe drew its step-0 figures
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| net | 49 |"))
    per_round = [float(x) for x in row.split("|")[4].split(",")]
    # against the mean of the round's two no-probe processes
    net = [2 * sum(r["net"]["blocks"]) / (sum(r["none"]["blocks"]) + sum(r["none2"]["blocks"])) for r in rounds]
    assert per_round == pytest.approx(net, abs=1e-3)
    assert "Targets:" in proc.stdout and "net (1 thread(s)) <= 2.00x (median of 2:" in proc.stdout
