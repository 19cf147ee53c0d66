#!/usr/bin/env python
"""Overhead benchmark for ``lit_probe.FeatureProbe`` and the usual alternatives.

Every variant trains the same LightningModule (a torchvision ResNet whose children are registered directly on
the LightningModule, so probe paths are ``layer1.0``, ``layer4.1.conv2``, ...) on the same seeded synthetic
data for the same number of steps, inside a real ``pl.Trainer.fit``, all in one process. Variants are
interleaved over several rounds (a seeded shuffle per round), each fit with a fresh model (same seed) and a
fresh Trainer. A step's time is ``on_train_batch_start`` -> ``on_train_batch_end`` measured by two tiny
callbacks, the first and the last in the callback list (so every other callback's batch hooks are inside
the window); on a GPU both ends call ``torch.cuda.synchronize()``. The first ``--warmup`` steps of each fit
are discarded.

Reported per variant: the median step time over all (round, step) samples, its ratio to the no-probe
baseline, the range of the per-round ratios (per-round median / per-round baseline median), and the peak
memory growth during the fit (see ``README.md``: sampled RSS on CPU, ``torch.cuda.max_memory_allocated`` on
a GPU).

Usage::

    python benchmarks/overhead.py --quick
    python benchmarks/overhead.py --json results.json
    python benchmarks/overhead.py --device cuda --precision bf16-mixed --model resnet50 --size 224
    python benchmarks/overhead.py --list-variants
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import inspect
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import psutil
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SCHEMA_VERSION = 1

# --------------------------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------------------------


class BenchResNet(pl.LightningModule):
    """A torchvision ResNet as a LightningModule, its children registered directly on the module.

    The module names are exactly torchvision's (``conv1``, ``layer1.0``, ``layer1.0.conv1``, ``fc``...), so a
    probe path means the same thing here as on a bare ``torchvision.models.resnet18()``.
    """

    def __init__(self, arch: str = "resnet18", num_classes: int = 10, lr: float = 0.01) -> None:
        super().__init__()
        net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        for name, child in net.named_children():
            self.add_module(name, child)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the body of torchvision.models.ResNet._forward_impl
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def make_data(n_samples: int, size: int, num_classes: int = 10, seed: int = 1234) -> TensorDataset:
    """A fixed, seeded random image-classification data set (no download)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, 3, size, size, generator=g)
    y = torch.randint(0, num_classes, (n_samples,), generator=g)
    return TensorDataset(x, y)


def block_names(model: nn.Module) -> list[str]:
    """The residual blocks: ``layer1.0, layer1.1, ..., layer4.<last>``."""
    out = []
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        seq = getattr(model, layer)
        out += [f"{layer}.{i}" for i in range(len(seq))]
    return out


def leaf_names(model: nn.Module) -> list[str]:
    """Every module without children (the root excluded)."""
    return [n for n, m in model.named_modules() if n and not any(True for _ in m.children())]


def block_patterns(model: nn.Module) -> list[str]:
    """The probe declaration for the blocks: the glob ``layer?.*`` when it resolves to exactly the blocks."""
    blocks = block_names(model)
    try:
        from lit_probe.selection import resolve

        if [n for n, _ in resolve(model, ["layer?.*"])] == blocks:
            return ["layer?.*"]
    except Exception:  # noqa: BLE001 - selection module missing or changed: fall back to the explicit list
        pass
    return blocks


# --------------------------------------------------------------------------------------------------------------
# Timing and memory instruments
# --------------------------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _StepClock:
    """Shared state of the two timing callbacks."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.starts: list[float] = []
        self.ends: list[float] = []


class StepStart(pl.Callback):
    """First callback in the list: stamps ``on_train_batch_start``."""

    def __init__(self, clock: _StepClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        _sync(self.clock.device)
        self.clock.starts.append(time.perf_counter())


class StepEnd(pl.Callback):
    """Last callback in the list: stamps ``on_train_batch_end``."""

    def __init__(self, clock: _StepClock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        _sync(self.clock.device)
        self.clock.ends.append(time.perf_counter())


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl...)
        return None


def _malloc_trim() -> None:
    """Give glibc's free heap pages back to the OS, so the next fit starts from a comparable RSS."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(Exception):
            libc.malloc_trim(0)


# glibc reads these at start-up: every allocation >= 128 KiB is served by mmap and given back to the OS when freed.
# Without them glibc's *dynamic* mmap threshold grows to 32 MB after the first large free(); tensors then come
# from the heap, freed memory stays in the process and a fit's RSS growth depends on what earlier fits left
# behind (+-15 MB on a ResNet-18 fit). mallopt() inside a process that has already trained does not help (the
# heap is already fragmented), so the memory pass runs in a fresh subprocess started with them.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


class RssSampler:
    """Samples the process RSS every ``interval_s`` in a thread; ``peak - start`` is the fit's growth."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.proc = psutil.Process()
        self.start_rss = 0
        self.peak_rss = 0
        self.n_samples = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.proc.memory_info().rss
            self.n_samples += 1
            if rss > self.peak_rss:
                self.peak_rss = rss
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.start_rss = self.peak_rss = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)

    @property
    def delta_mb(self) -> float:
        return (self.peak_rss - self.start_rss) / 2**20


# --------------------------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------------------------


class Unavailable(Exception):
    """A variant cannot run in this environment (e.g. ``lit_probe.FeatureProbe`` not importable)."""


@dataclass
class Setup:
    """What a variant adds to a fit: callbacks, a logger, Trainer arguments, and a cleanup."""

    callbacks: list[pl.Callback] = field(default_factory=list)
    logger: Any = False
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    cleanup: Callable[[], None] = lambda: None


@dataclass
class Context:
    """Per-process resources shared by the variants."""

    tmp: str
    device: str
    wandb_log: str
    _wandb_run: Any = None

    def wandb_run(self) -> Any:
        """One offline wandb run for the whole process (``wandb.init`` costs seconds; fits reuse it)."""
        if self._wandb_run is None:
            os.environ["WANDB_MODE"] = "offline"
            os.environ["WANDB_DIR"] = os.path.join(self.tmp, "wandb")
            os.environ.setdefault("WANDB_SILENT", "true")
            os.environ.setdefault("WANDB_CONSOLE", "off")
            os.makedirs(os.environ["WANDB_DIR"], exist_ok=True)
            import wandb

            self._wandb_run = wandb.init(project="lit-probe-overhead", mode="offline",
                                         dir=os.environ["WANDB_DIR"])
        return self._wandb_run

    def close(self) -> None:
        if self._wandb_run is not None:
            with contextlib.suppress(Exception):
                self._wandb_run.finish(quiet=True)
            self._wandb_run = None


def _feature_probe(model: BenchResNet, ctx: Context, probes: list[str], name: str, **kwargs: Any) -> Setup:
    try:
        from lit_probe import FeatureProbe  # type: ignore[attr-defined]
    except ImportError as err:
        raise Unavailable(f"{type(err).__name__}: {err}") from None
    params = inspect.signature(FeatureProbe).parameters
    if "figure_every_n_steps" in params:
        kwargs["figure_every_n_steps"] = None  # figures off: they are not what is measured here
    if "save_dir" in params:
        kwargs["save_dir"] = os.path.join(ctx.tmp, "probe", name)
    return Setup(callbacks=[FeatureProbe(probes=probes, **kwargs)])


def _naive_hooks(model: BenchResNet, names: list[str]) -> Setup:
    """Forward + full-backward hooks keeping (a copy of) the last output and output gradient per module."""
    kept: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def fwd(mod: nn.Module, inp: Any, out: Any, _n: str = name) -> None:
            if isinstance(out, torch.Tensor):
                kept[_n + ":out"] = out.detach().clone()

        def bwd(mod: nn.Module, grad_in: Any, grad_out: Any, _n: str = name) -> None:
            if grad_out and isinstance(grad_out[0], torch.Tensor):
                kept[_n + ":grad"] = grad_out[0].detach().clone()

        handles.append(module.register_forward_hook(fwd))
        handles.append(module.register_full_backward_hook(bwd))

    def cleanup() -> None:
        for h in handles:
            h.remove()
        kept.clear()

    return Setup(cleanup=cleanup)


def _floor_hooks(model: BenchResNet, names: list[str]) -> Setup:
    """The least a probe can do: one ``torch.aminmax`` per module output and per output gradient."""
    stats: dict[str, Any] = {}
    handles = []

    for name in names:
        module = model.get_submodule(name)

        def fwd(mod: nn.Module, inp: Any, out: Any, _n: str = name) -> None:
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                stats[_n] = torch.aminmax(out.detach())
                if out.requires_grad:
                    def grad_hook(g: torch.Tensor, _k: str = _n + ":grad") -> None:
                        stats[_k] = torch.aminmax(g)

                    out.register_hook(grad_hook)

        handles.append(module.register_forward_hook(fwd))

    def cleanup() -> None:
        for h in handles:
            h.remove()
        stats.clear()

    return Setup(cleanup=cleanup)


def _wandb_watch(model: BenchResNet, ctx: Context, log_freq: int) -> Setup:
    try:
        from pytorch_lightning.loggers import WandbLogger
    except ImportError as err:  # pragma: no cover - wandb missing
        raise Unavailable(f"{type(err).__name__}: {err}") from None
    run = ctx.wandb_run()
    logger = WandbLogger(experiment=run, save_dir=os.path.join(ctx.tmp, "wandb"))
    logger.watch(model, log=ctx.wandb_log, log_freq=log_freq, log_graph=False)

    def cleanup() -> None:
        with contextlib.suppress(Exception):
            run.unwatch(model)

    return Setup(logger=logger, cleanup=cleanup)


@dataclass(frozen=True)
class Variant:
    """One benchmarked configuration."""

    name: str
    description: str
    build: Callable[[BenchResNet, Context], Setup]
    target: Optional[float] = None  # ratio target (PASS/MISS), if any
    memory_target: bool = False  # checked against "peak memory <= 5% above no probe"


VARIANTS: list[Variant] = [
    Variant("baseline", "no probe", lambda m, c: Setup()),
    Variant("probe_blocks", "FeatureProbe, default configuration, on the residual blocks",
            lambda m, c: _feature_probe(m, c, block_patterns(m), "probe_blocks"), 1.03, True),
    Variant("probe_leaves", "FeatureProbe, default configuration, on every leaf module",
            lambda m, c: _feature_probe(m, c, leaf_names(m), "probe_leaves"), 1.05, True),
    Variant("probe_leaves_every_step", "FeatureProbe, every_n_steps=1, on every leaf module",
            lambda m, c: _feature_probe(m, c, leaf_names(m), "probe_leaves_every_step", every_n_steps=1),
            1.20, True),
    Variant("floor_blocks", "one torch.aminmax per output and per output grad, on the blocks",
            lambda m, c: _floor_hooks(m, block_names(m))),
    Variant("floor_leaves", "one torch.aminmax per output and per output grad, on every leaf module",
            lambda m, c: _floor_hooks(m, leaf_names(m))),
    Variant("naive_blocks", "forward + full-backward hooks keeping outputs and grads, on the blocks",
            lambda m, c: _naive_hooks(m, block_names(m))),
    Variant("naive_leaves", "forward + full-backward hooks keeping outputs and grads, on every leaf module",
            lambda m, c: _naive_hooks(m, leaf_names(m))),
    Variant("wandb_watch_1", "wandb.watch(log=<--wandb-log>, log_freq=1), offline",
            lambda m, c: _wandb_watch(m, c, 1)),
    Variant("wandb_watch_100", "wandb.watch(log=<--wandb-log>, log_freq=100), offline",
            lambda m, c: _wandb_watch(m, c, 100)),
    Variant("detect_anomaly", "Trainer(detect_anomaly=True) (torch.autograd.set_detect_anomaly)",
            lambda m, c: Setup(trainer_kwargs={"detect_anomaly": True})),
]
VARIANT_BY_NAME = {v.name: v for v in VARIANTS}
MEMORY_TOLERANCE = 0.05


# --------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    """One fit of one variant in one round."""

    variant: str
    round: int
    phase: str  # "timing" | "memory"
    status: str  # "ok" | "crashes" | "unavailable" | "error"
    error: Optional[str] = None
    step_s: list[float] = field(default_factory=list)  # batch start -> batch end, warm-up excluded
    period_s: list[float] = field(default_factory=list)  # batch start -> next batch start, warm-up excluded
    rss_start_mb: Optional[float] = None
    rss_peak_delta_mb: Optional[float] = None
    rss_samples: int = 0
    cuda_peak_delta_mb: Optional[float] = None
    cuda_peak_mb: Optional[float] = None
    fit_wall_s: float = 0.0


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def resolve_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return choice


def run_fit(variant: Variant, rnd: int, args: argparse.Namespace, device: str, data: TensorDataset,
            ctx: Context, phase: str = "timing") -> FitResult:
    """A fresh model (same seed) and a fresh Trainer, ``--steps`` steps of ``variant``.

    ``phase="timing"``: step times (and CUDA peak memory on a GPU). ``phase="memory"`` (CPU): the RSS is
    sampled in a thread during the fit; the sampler is off in the timing fits so it cannot disturb them.
    """
    res = FitResult(variant=variant.name, round=rnd, phase=phase, status="ok")
    torch.manual_seed(args.seed)
    model = BenchResNet(args.model, num_classes=10)
    clock = _StepClock(device)
    setup: Optional[Setup] = None
    try:
        try:
            setup = variant.build(model, ctx)
        except Unavailable as err:
            res.status, res.error = "unavailable", str(err)
            return res
        loader = DataLoader(data, batch_size=args.batch, shuffle=False, num_workers=0, drop_last=True)
        trainer = pl.Trainer(
            accelerator="gpu" if device == "cuda" else "cpu",
            devices=1,
            precision=args.precision,
            max_steps=args.steps,
            max_epochs=-1,
            logger=setup.logger,
            callbacks=[StepStart(clock), *setup.callbacks, StepEnd(clock)],
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            **setup.trainer_kwargs,
        )
        gc.collect()
        _malloc_trim()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            cuda_start = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        sampler = RssSampler(args.rss_interval_ms / 1000.0)
        with sampler if phase == "memory" else contextlib.nullcontext():
            try:
                trainer.fit(model, loader)
            except Exception as err:  # noqa: BLE001 - a crash is a result (naive hooks on in-place ReLU)
                res.status, res.error = "crashes", _first_line(err)
        res.fit_wall_s = time.perf_counter() - t0
        if phase == "memory":
            res.rss_start_mb = sampler.start_rss / 2**20
            res.rss_peak_delta_mb = sampler.delta_mb
            res.rss_samples = sampler.n_samples
        if device == "cuda":
            res.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20
            res.cuda_peak_delta_mb = (torch.cuda.max_memory_allocated() - cuda_start) / 2**20
        n = min(len(clock.starts), len(clock.ends))
        res.step_s = [e - s for s, e in zip(clock.starts[:n], clock.ends[:n])][args.warmup:]
        res.period_s = [b - a for a, b in zip(clock.starts, clock.starts[1:])][args.warmup:]
    except Exception as err:  # noqa: BLE001 - a broken variant must not stop the benchmark
        res.status, res.error = "error", _first_line(err)
    finally:
        if setup is not None:
            with contextlib.suppress(Exception):
                setup.cleanup()
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return res


def _median(xs: Sequence[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def _mem_fits(fits: list[FitResult], name: str, device: str) -> list[FitResult]:
    """The fits a variant's memory figure comes from: the memory pass on CPU, the timing fits on a GPU."""
    phase = "timing" if device == "cuda" else "memory"
    return [f for f in fits if f.variant == name and f.phase == phase and f.status == "ok"]


def summarize(fits: list[FitResult], names: list[str], device: str) -> dict[str, dict[str, Any]]:
    """Per variant: medians, ratios to the baseline and their per-round range, memory."""
    by: dict[str, list[FitResult]] = {n: [f for f in fits if f.variant == n and f.phase == "timing"]
                                      for n in names}
    base_rounds = {f.round: _median(f.step_s) for f in by.get("baseline", []) if f.status == "ok" and f.step_s}
    base_all = [t for f in by.get("baseline", []) if f.status == "ok" for t in f.step_s]
    base_med = _median(base_all)
    base_mem = _median([_mem(f, device) for f in _mem_fits(fits, "baseline", device)])
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        runs = by[name]
        ok = [f for f in runs if f.status == "ok"]
        bad = [f for f in runs if f.status != "ok"]
        entry: dict[str, Any] = {"description": VARIANT_BY_NAME[name].description, "n_fits": len(runs)}
        if not ok:
            entry["status"] = bad[0].status if bad else "not run"
            entry["error"] = bad[0].error if bad else None
            out[name] = entry
            continue
        entry["status"] = "ok" if not bad else f"ok ({len(bad)} fits failed: {bad[0].error})"
        steps = [t for f in ok for t in f.step_s]
        med = _median(steps)
        entry["median_step_ms"] = med * 1e3 if med is not None else None
        entry["median_period_ms"] = (lambda p: p * 1e3 if p is not None else None)(
            _median([t for f in ok for t in f.period_s]))
        entry["n_steps"] = len(steps)
        entry["ratio"] = med / base_med if med is not None and base_med else None
        per_round = [(_median(f.step_s) or 0.0) / base_rounds[f.round] for f in ok
                     if f.step_s and base_rounds.get(f.round)]
        entry["ratio_per_round"] = per_round
        entry["ratio_min"] = min(per_round) if per_round else None
        entry["ratio_max"] = max(per_round) if per_round else None
        mems = [_mem(f, device) for f in _mem_fits(fits, name, device)]
        entry["peak_mem_delta_mb"] = _median(mems)
        entry["peak_mem_delta_mb_per_round"] = mems
        entry["peak_mem_vs_baseline"] = (entry["peak_mem_delta_mb"] / base_mem
                                         if base_mem and entry["peak_mem_delta_mb"] is not None else None)
        out[name] = entry
    return out


def _mem(f: FitResult, device: str) -> float:
    v = f.cuda_peak_delta_mb if device == "cuda" else f.rss_peak_delta_mb
    return float(v or 0.0)


def targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """PASS/MISS (or n/a) of each target."""
    rows: list[dict[str, Any]] = []
    for v in VARIANTS:
        if v.name not in summary:
            continue
        e = summary[v.name]
        if v.target is not None:
            r = e.get("ratio")
            rows.append({"target": f"{v.name}: ratio <= {v.target:.2f}x", "value": r,
                         "result": "n/a" if r is None else ("PASS" if r <= v.target else "MISS")})
        if v.memory_target:
            m = e.get("peak_mem_vs_baseline")
            rows.append({"target": f"{v.name}: peak mem <= {1 + MEMORY_TOLERANCE:.2f}x no probe", "value": m,
                         "result": "n/a" if m is None else ("PASS" if m <= 1 + MEMORY_TOLERANCE else "MISS")})
    return rows


def machine_info(device: str, args: argparse.Namespace) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pytorch_lightning": pl.__version__,
        "device": device,
        "total_ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = os.getloadavg()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def markdown(summary: dict[str, dict[str, Any]], device: str) -> str:
    mem_col = "peak CUDA mem delta MB" if device == "cuda" else "peak RSS delta MB"
    lines = [f"| variant | median step ms | ratio | ratio range | {mem_col} |", "|---|---:|---:|---:|---:|"]
    for name, e in summary.items():
        if e.get("median_step_ms") is None:
            what = e.get("status", "?")
            err = e.get("error")
            lines.append(f"| {name} | {what}{': ' + _md(err) if err else ''} | | | |")
            continue
        rng = (f"{e['ratio_min']:.2f}-{e['ratio_max']:.2f}" if e.get("ratio_min") is not None else "")
        ratio = f"{e['ratio']:.2f}x" if e.get("ratio") is not None else ""
        mem = "" if e.get("peak_mem_delta_mb") is None else f"{e['peak_mem_delta_mb']:.1f}"
        lines.append(f"| {name} | {e['median_step_ms']:.1f} | {ratio} | {rng} | {mem} |")
    return "\n".join(lines)


def _md(s: str) -> str:
    return s.replace("|", "\\|")[:160]


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------

QUICK = {"size": 32, "batch": 16, "rounds": 3, "steps": 12, "warmup": 2}
FULL = {"size": 64, "batch": 32, "rounds": 5, "steps": 30, "warmup": 3}
QUICK_SKIP = ("wandb_watch_100",)  # with --quick's few steps log_freq=100 never fires: the baseline again


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"a run under two minutes on a 2-core CPU: {QUICK}, without {', '.join(QUICK_SKIP)}")
    p.add_argument("--model", choices=["resnet18", "resnet50"], default="resnet18")
    p.add_argument("--size", type=int, default=None, help=f"input height=width (default {FULL['size']})")
    p.add_argument("--batch", type=int, default=None, help=f"batch size (default {FULL['batch']})")
    p.add_argument("--rounds", type=int, default=None, help=f"rounds (default {FULL['rounds']})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps per fit, warm-up included (default {FULL['steps']})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"steps discarded at the start of each fit (default {FULL['warmup']})")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["32", "bf16-mixed"], default="32")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset (baseline is always added); see --list-variants")
    p.add_argument("--list-variants", action="store_true", help="print the variants and exit")
    p.add_argument("--wandb-log", choices=["gradients", "parameters", "all"], default="all",
                   help="what wandb.watch logs")
    p.add_argument("--rss-interval-ms", type=float, default=2.0, help="RSS sampling period (CPU memory)")
    p.add_argument("--memory-rounds", type=int, default=1,
                   help="CPU: fits per variant in the memory pass after the timing rounds (0: no memory pass)")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", default=None, help="write every raw number to this file")
    return p


def _configure(args: argparse.Namespace) -> list[str]:
    defaults = QUICK if args.quick else FULL
    for key, val in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    if args.warmup >= args.steps:
        raise SystemExit(f"--warmup ({args.warmup}) must be smaller than --steps ({args.steps})")
    if args.variants:
        names = [n.strip() for n in args.variants.split(",") if n.strip()]
        unknown = [n for n in names if n not in VARIANT_BY_NAME]
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANT_BY_NAME)}")
        if "baseline" not in names:
            names.insert(0, "baseline")
    else:
        names = [v.name for v in VARIANTS if not (args.quick and v.name in QUICK_SKIP)]
    return names


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Lightning's per-Trainer banners and the warnings a tiny synthetic run triggers."""
    levels = {}
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "wandb"):
        lg = logging.getLogger(name)
        levels[name] = lg.level
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        warnings.filterwarnings("ignore", message=".*detect_anomaly.*")
        warnings.filterwarnings("ignore", message=".*Anomaly Detection has been enabled.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        try:
            yield
        finally:
            for name, lvl in levels.items():
                logging.getLogger(name).setLevel(lvl)


def _memory_method(device: str, args: argparse.Namespace) -> str:
    if device == "cuda":
        return ("torch.cuda.max_memory_allocated() - memory_allocated() at fit start (after "
                "reset_peak_memory_stats), in the timing fits")
    if args.memory_rounds <= 0:
        return "not measured (--memory-rounds 0)"
    return (f"peak of (RSS - RSS at fit start), psutil sampled every {args.rss_interval_ms} ms in a thread, in a "
            f"separate memory pass: a fresh subprocess started with {MALLOC_ENV} runs one discarded warm-up fit, "
            f"then {args.memory_rounds} fit(s) per variant; gc.collect() + malloc_trim(0) before each fit")


def memory_pass_subprocess(args: argparse.Namespace, names: list[str], tmp: str) -> list[FitResult]:
    """Run the CPU memory pass in a fresh interpreter with fixed glibc thresholds; return its fits."""
    out = os.path.join(tmp, "memory_fits.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--device", "cpu", "--memory-worker", out,
           "--variants", ",".join(names)]
    for opt in ("model", "size", "batch", "steps", "warmup", "precision", "threads", "seed", "wandb_log",
                "rss_interval_ms", "memory_rounds"):
        cmd += ["--" + opt.replace("_", "-"), str(getattr(args, opt))]
    env = {**os.environ, **MALLOC_ENV}
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0 or not os.path.exists(out):
        print(f"memory pass failed (exit {proc.returncode}): no memory figures", file=sys.stderr)
        return []
    with open(out) as fh:
        return [FitResult(**f) for f in json.load(fh)]


def memory_worker(args: argparse.Namespace, names: list[str], device: str, data: TensorDataset) -> None:
    """The memory pass (``--memory-worker PATH``): a warm-up fit, then the sampled fits, written to PATH."""
    fits: list[FitResult] = []
    rng = random.Random(args.seed + 1)
    with tempfile.TemporaryDirectory(prefix="lit_probe_overhead_mem_") as tmp, _quiet():
        ctx = Context(tmp=tmp, device=device, wandb_log=args.wandb_log)
        try:
            # the first fit of a process grows the RSS by one-time allocations (thread pools, kernels): discard
            run_fit(VARIANT_BY_NAME["baseline"], -1, args, device, data, ctx, phase="memory")
            for rnd in range(args.memory_rounds):
                order = list(names)
                rng.shuffle(order)
                for name in order:
                    res = run_fit(VARIANT_BY_NAME[name], rnd, args, device, data, ctx, phase="memory")
                    fits.append(res)
                    print(f"[memory {rnd + 1}/{args.memory_rounds}] {name:26s} {res.status:11s} "
                          f"peak RSS delta {res.rss_peak_delta_mb or float('nan'):7.1f} MB",
                          file=sys.stderr, flush=True)
        finally:
            ctx.close()
    with open(args.memory_worker, "w") as fh:
        json.dump([asdict(f) for f in fits], fh)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the benchmark; print the Markdown table; return (and with ``--json`` write) every number."""
    args = build_parser().parse_args(argv)
    if args.list_variants:
        for v in VARIANTS:
            print(f"{v.name:26s} {v.description}")
        return {}
    names = _configure(args)
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    n_batches = min(args.steps, 64)
    data = make_data(n_batches * args.batch, args.size)
    if args.memory_worker:
        memory_worker(args, names, device, data)
        return {}
    info = machine_info(device, args)
    t_start = time.perf_counter()
    fits: list[FitResult] = []
    dead: dict[str, FitResult] = {}  # variants that crashed or are unavailable: not re-run
    order_rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="lit_probe_overhead_") as tmp, _quiet():
        ctx = Context(tmp=tmp, device=device, wandb_log=args.wandb_log)
        try:
            for rnd in range(args.rounds):
                order = list(names)
                order_rng.shuffle(order)
                for name in order:
                    if name in dead:
                        continue
                    res = run_fit(VARIANT_BY_NAME[name], rnd, args, device, data, ctx)
                    fits.append(res)
                    if res.status != "ok" and name != "baseline":
                        dead[name] = res
                    print(f"[round {rnd + 1}/{args.rounds}] {name:26s} {res.status:11s} "
                          f"median {(_median(res.step_s) or float('nan')) * 1e3:8.1f} ms  "
                          f"({res.fit_wall_s:.1f} s)", file=sys.stderr, flush=True)
        finally:
            ctx.close()
        if device == "cpu" and args.memory_rounds > 0:
            fits += memory_pass_subprocess(args, [n for n in names if n not in dead], tmp)
    with contextlib.suppress(OSError):
        info["loadavg_at_end"] = os.getloadavg()
    summary = summarize(fits, names, device)
    tgts = targets(summary)
    config = {k: getattr(args, k) for k in ("model", "size", "batch", "rounds", "steps", "warmup", "precision",
                                            "threads", "seed", "quick", "wandb_log", "rss_interval_ms",
                                            "memory_rounds")}
    config["variants"] = names
    config["block_probes"] = block_patterns(BenchResNet(args.model))
    config["n_leaf_modules"] = len(leaf_names(BenchResNet(args.model)))
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "machine": info,
        "config": config,
        "memory_method": _memory_method(device, args),
        "summary": summary,
        "targets": tgts,
        "fits": [asdict(f) for f in fits],
        "total_wall_s": time.perf_counter() - t_start,
    }
    print(f"\nMachine: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch threads {info['torch_threads']}, "
          f"torch {info['torch']}, Lightning {info['pytorch_lightning']}, device {device}"
          + (f" ({info['gpu']})" if device == "cuda" else "")
          + f"; load average {info.get('loadavg_at_start')}")
    print(f"Model {args.model}, {args.size}x{args.size}, batch {args.batch}, precision {args.precision}, "
          f"{args.rounds} rounds x {args.steps} steps ({args.warmup} warm-up steps discarded per fit); "
          f"blocks = {config['block_probes']}, {config['n_leaf_modules']} leaf modules\n")
    print(markdown(summary, device))
    print("\nTargets:")
    for t in tgts:
        val = "" if t["value"] is None else f" ({t['value']:.3f})"
        print(f"- {t['result']}: {t['target']}{val}")
    print(f"\nMemory: {result['memory_method']}. Total {result['total_wall_s']:.0f} s.")
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(result, fh, indent=2, default=str)
        print(f"Wrote {args.json_path}")
    return result


if __name__ == "__main__":
    main()
