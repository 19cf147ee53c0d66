"""Autouse fixtures that turn leaks into failures (after Lightning's and FTS's conftest)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
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


#: Threads lit-probe starts are named after it ("lit-probe-render", "lit-probe-render-send", ...).
_OUR_THREADS = ("lit-probe", "lit_probe")
#: How long a lit-probe thread that is finishing may take to end after the test.
_THREAD_JOIN_S = 5.0


@pytest.fixture(autouse=True)
def no_zombie_threads():
    """Every thread lit-probe started during the test has ended (daemon or not), within a short join."""
    before = set(threading.enumerate())
    yield
    ours = [t for t in threading.enumerate() if t not in before and t.name.startswith(_OUR_THREADS)]
    deadline = time.monotonic() + _THREAD_JOIN_S
    for t in ours:
        t.join(max(0.0, deadline - time.monotonic()))
    leftover = [t for t in ours if t.is_alive()]
    assert not leftover, f"lit_probe left threads running {_THREAD_JOIN_S:.0f} s after the test: {leftover}"


# ------------------------------------------------------------------------------------------- hook leaks
#: Module methods that add hooks, and the per-module dicts that hold them.
_MODULE_REGISTRARS = ("register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
                      "register_full_backward_pre_hook", "register_backward_hook")
_MODULE_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_OPTIM_REGISTRARS = {"register_step_pre_hook": "_optimizer_step_pre_hooks",
                     "register_step_post_hook": "_optimizer_step_post_hooks"}
_TESTS_DIR = Path(__file__).resolve().parent


def _global_hook_dicts() -> dict[str, dict]:
    """Process-wide hook dicts (``register_module_forward_hook``, ``register_optimizer_step_post_hook``...)."""
    import torch.nn.modules.module as mm
    import torch.optim.optimizer as oo

    out = {}
    for mod, names in ((mm, ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                             "_global_backward_pre_hooks")),
                       (oo, ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks"))):
        for n in names:
            d = getattr(mod, n, None)
            if isinstance(d, dict):
                out[f"{mod.__name__}.{n}"] = d
    return out


def _registered_by_the_test(frame) -> bool:
    """A hook registered directly from a test file (``tests/test_*.py``) is the test's own, left on purpose."""
    f = Path(frame.f_code.co_filename)
    return f.parent == _TESTS_DIR and f.name.startswith("test_")


def _describe_hook(fn) -> str:
    fn = getattr(fn, "__func__", fn)
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', None) or type(fn).__module__}.{name}"


class _HookTracker:
    """Records, while a test runs, every module/optimizer a hook was registered on, with the hook ids it already
    had and where each new hook was registered from. Holds the hook dicts, never the modules (a test may check
    that its model is freed)."""

    def __init__(self) -> None:
        # id(hook dict) -> (owner type name, dict attr, the dict, ids present before the test's first registration
        # on it); keyed by the dict, which is held, so an id is never reused while the test runs
        self.dicts: dict[int, tuple[str, str, dict, set]] = {}
        self.sites: dict[int, str] = {}  # hook id -> "file:line" of the registration
        self.own: set[int] = set()  # hook ids the test registered itself

    def note(self, owner, attrs, handle, frame) -> None:
        for a in attrs:
            d = getattr(owner, a, None)
            if isinstance(d, dict) and id(d) not in self.dicts:
                self.dicts[id(d)] = (type(owner).__qualname__, a, d, set(d) - {handle.id})
        self.sites[handle.id] = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
        if _registered_by_the_test(frame):
            self.own.add(handle.id)

    def leftovers(self) -> list[str]:
        out = []
        for kind, attr, d, before in self.dicts.values():
            for k in list(d):
                if k not in before and k not in self.own:
                    out.append(f"{kind}.{attr}: {_describe_hook(d[k])} (registered at {self.sites.get(k, '?')})")
        return out


@pytest.fixture(autouse=True)
def no_leftover_hooks(request):
    """Fail a test that leaves a hook on a module or optimizer, or a global module/optimizer hook, behind.

    The hook-adding methods of ``nn.Module`` and ``torch.optim.Optimizer`` are wrapped while the test runs to
    record what they were called on; after the test, those modules' and optimizers' hook dicts must hold only
    the hooks they had before, or hooks the test registered itself (from a ``tests/test_*.py`` line). A test
    that keeps a model probed on purpose is marked ``@pytest.mark.allow_hooks``."""
    tracker = _HookTracker()
    patch = pytest.MonkeyPatch()  # its own: undoing it never undoes the test's monkeypatches
    globals_before = {k: set(d) for k, d in _global_hook_dicts().items()}

    def wrap(cls, name, attrs):
        orig = getattr(cls, name)

        def registrar(self, *args, **kwargs):
            handle = orig(self, *args, **kwargs)
            tracker.note(self, attrs, handle, sys._getframe(1))
            return handle

        registrar.__wrapped__ = orig
        patch.setattr(cls, name, registrar)

    for name in _MODULE_REGISTRARS:
        wrap(torch.nn.Module, name, _MODULE_HOOK_DICTS)
    for name, attr in _OPTIM_REGISTRARS.items():
        wrap(torch.optim.Optimizer, name, (attr,))
    try:
        yield
    finally:
        patch.undo()
    if request.node.get_closest_marker("allow_hooks"):
        return
    leaks = tracker.leftovers()
    for k, d in _global_hook_dicts().items():
        leaks += [f"{k}: {_describe_hook(d[h])}" for h in set(d) - globals_before.get(k, set())]
    assert not leaks, "hooks left behind after the test:\n  " + "\n  ".join(leaks)


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
    # run outputs only (a developer may edit sources while the suite runs): by suffix, or under a run directory
    suffixes = (".png", ".jsonl", ".ckpt", ".pt", ".csv", ".md", ".tfevents")
    run_dirs = {"wandb", "lightning_logs", "probe"}

    def is_artifact(line: str) -> bool:
        path = line[3:].strip().strip('"')
        parts = path.rstrip("/").split("/")
        return "__pycache__" not in parts and (path.endswith(suffixes) or ".tfevents" in parts[-1]
                                               or bool(run_dirs & set(parts)))

    new = sorted(line for line in after - before if line.startswith("??") and is_artifact(line))
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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (real models on a shared machine), the previous count after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
