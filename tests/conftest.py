"""Autouse fixtures that turn leaks into failures (after Lightning's and FTS's conftest)."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
_ENV_ALLOW = {"WANDB_MODE", "WANDB_SERVICE", "WANDB_DIR", "PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUDA_MODULE_LOADING",
              "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK", "PL_TRAINER_GPUS",
              "KMP_DUPLICATE_LIB_OK", "TORCHINDUCTOR_CACHE_DIR", "TORCH_COMPILE_DEBUG_DIR", "WANDB__SERVICE_WAIT",
              "GROUP_RANK", "PYTORCH_NVML_BASED_CUDA_CHECK", "ROLE_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "PYTHONWARNINGS"}


@pytest.fixture(autouse=True)
def restore_env_variables():
    before = dict(os.environ)
    yield
    leaked = {k for k in set(os.environ) - set(before) if k not in _ENV_ALLOW and not k.startswith("WANDB")}
    os.environ.clear()
    os.environ.update(before)
    assert not leaked, f"test leaked environment variables: {sorted(leaked)}"


@pytest.fixture(autouse=True)
def teardown_process_group():
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(autouse=True)
def no_zombie_threads():
    before = set(threading.enumerate())
    yield
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon
                and "lit-probe" in t.name]
    assert not leftover, f"lit_probe left threads running: {leftover}"


def _repo_status() -> str:
    try:
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO,
                              capture_output=True, text=True, timeout=20).stdout
    except Exception:
        return ""


@pytest.fixture(autouse=True, scope="session")
def leave_no_artifacts_behind():
    before = set(_repo_status().splitlines())
    yield
    after = set(_repo_status().splitlines())
    # run outputs only (a developer may edit sources while the suite runs)
    artifacts = (".png", ".jsonl", ".ckpt", ".pt", ".csv", ".md", "wandb/", "lightning_logs/", "probe/", ".tfevents")
    new = sorted(line for line in after - before if line.startswith("??") and
                 any(a in line for a in artifacts) and "__pycache__" not in line)
    assert not new, f"tests left files in the repository: {new}"


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """A real offline W&B environment under tmp_path; the run is finished and the service stopped after."""
    pytest.importorskip("wandb")
    env_before = dict(os.environ)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield tmp_path
    import wandb

    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()  # stop the wandb service and its threads
    for k in set(os.environ) - set(env_before):
        if k.startswith("WANDB"):
            monkeypatch.delenv(k, raising=False)


#: Files whose tests each take several seconds (whole demo runs, examples, subprocess installs, benchmarks).
_SLOW_FILES = {"test_demo_cli.py", "test_examples.py", "test_benchmark_smoke.py", "test_packages.py"}
#: Single tests of several seconds in otherwise fast files (hundreds of training steps).
_SLOW_TESTS = ("saturating_mlp", "memory_is_flat", "versioned_mode_and_max_versions", "documented_cli_command",
               "composed_demo_and_probe", "versioned_wandb_config_runs", "weight_scaled_by_1e6")


def pytest_collection_modifyitems(config, items):
    # `pytest -m "not slow"` is the everyday subset: DDP processes, the real-model zoo and the tests above
    for item in items:
        if item.get_closest_marker("ddp") or item.get_closest_marker("zoo") or item.path.name in _SLOW_FILES \
                or any(word in item.name for word in _SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
