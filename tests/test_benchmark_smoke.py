"""Smoke test of ``benchmarks/overhead.py``: a tiny in-process run, checking the JSON's shape (never timings)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"

pytest.importorskip("psutil")
pytest.importorskip("torchvision")


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lit_probe_bench_overhead", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look the module up by name
    spec.loader.exec_module(mod)
    return mod


def test_overhead_smoke(tmp_path: Path) -> None:
    bench = _load()
    out = tmp_path / "overhead.json"
    variants = "baseline,probe_blocks,naive_blocks,naive_leaves"
    result = bench.main(["--quick", "--device", "cpu", "--steps", "3", "--warmup", "1", "--rounds", "1",
                         "--batch", "2", "--variants", variants, "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["summary"].keys() == result["summary"].keys()
    for key in ("schema_version", "machine", "config", "memory_method", "summary", "targets", "fits",
                "total_wall_s"):
        assert key in data, key
    for key in ("cpu", "logical_cpus", "torch_threads", "torch", "device"):
        assert key in data["machine"], key
    assert set(data["summary"]) == set(variants.split(","))
    assert data["config"]["n_leaf_modules"] >= 52
    assert data["config"]["block_probes"] in (["layer?.*"], [f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)])

    for name in ("baseline", "naive_blocks"):  # peak memory: from the memory-pass subprocess
        entry = data["summary"][name]
        assert entry["status"] == "ok", entry
        for key in ("median_step_ms", "ratio", "ratio_min", "ratio_max", "peak_mem_delta_mb", "n_steps"):
            assert entry[key] is not None, (name, key)
        assert entry["n_steps"] == 2  # 3 steps, 1 warm-up step discarded
    assert data["summary"]["baseline"]["ratio"] == pytest.approx(1.0)

    # full-backward hooks on an in-place ReLU: recorded as a crash, with the error's first line
    naive_leaves = data["summary"]["naive_leaves"]
    assert naive_leaves["status"] == "crashes"
    assert naive_leaves["error"] and "\n" not in naive_leaves["error"]

    # FeatureProbe runs once it exists, and is reported unavailable before that
    assert data["summary"]["probe_blocks"]["status"] in ("ok", "unavailable")
    assert {t["result"] for t in data["targets"]} <= {"PASS", "MISS", "n/a"}
    for fit in data["fits"]:
        for key in ("variant", "round", "phase", "status", "step_s", "period_s", "rss_peak_delta_mb"):
            assert key in fit, key
    assert {f["phase"] for f in data["fits"]} == {"timing", "memory"}


def test_unknown_variant_is_rejected() -> None:
    bench = _load()
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--variants", "baseline,nope"])
