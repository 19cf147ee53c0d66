#!/usr/bin/env python
"""What lit_probe costs: whole training loops, scaling, kernels per tensor, and short interleaved ratios.

One command, four sections (``--section``, default ``all``); each prints a Markdown table and PASS/MISS
against its targets, ``--json PATH`` writes every raw number:

* ``long``: the whole training loop of a real ``Trainer.fit`` longer than the default history (1,100 steps;
  ``history_size`` is 1000), FeatureProbe in its DEFAULT configuration (figures on, every 500 steps; log
  step = the Trainer's ``log_every_n_steps``, 50), torchvision resnet18 64x64 batch 32, probed on the 8
  residual blocks and on every leaf; fits interleaved with no-probe fits (A B A C A). Per fit: median and
  mean step (start of a batch to the start of the next, so every callback, logging and figure hand-off is
  inside; the mean is the whole loop / steps), log steps early vs late, figure steps, the time fit end
  takes (``on_train_end`` to ``fit`` returning: the probe's ``on_fit_end`` / ``teardown``, waiting for
  figures), peak RSS.
* ``scaling``: the same whole-loop ratio for ~50, ~200 and ~1,000 probed modules (a deep residual MLP,
  ``net.**``) and for efficientnet_b0 128x128 batch 16 (``net.**``: 336 modules); 300 steps per fit.
* ``kernels``: host time (us) and aten ops per observed tensor on a sentinel (min/max only) step and on a
  full-statistics step, a module called twice per forward, bf16 autocast, and resnet18's leaves; ops
  counted with a ``TorchDispatchMode`` (one forward + backward with the probe minus the same without).
* ``short``: the short interleaved ratios (probe on blocks / leaves / every step, the floor, naive hooks,
  ``wandb.watch(log="all")`` with ``log_freq=1`` and ``100``, ``detect_anomaly``) with peak memory.

Only the public API is used: ``from lit_probe import FeatureProbe, ProbeSession``, ``FeatureProbe(probes=...,
save_dir=..., figure_every_n_steps=...)``, and Lightning (the package FeatureProbe's ``Callback`` comes from:
``lightning.pytorch`` or ``pytorch_lightning``).

Usage::

    python benchmarks/overhead.py --quick                        # every section, tiny settings (seconds)
    python benchmarks/overhead.py --json overhead.json           # the real run (about 1 h on 2 idle cores)
    python benchmarks/overhead.py --section long --json long.json
    python benchmarks/overhead.py --section short --list-variants
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import importlib
import inspect
import json
import logging
import math
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
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SCHEMA_VERSION = 2
SECTIONS = ("long", "scaling", "kernels", "short")
#: Sections run only when named (not part of "all"): "small" is the short step on one core and on every core.
EXTRA_SECTIONS = ("small",)
ALL_SECTIONS = SECTIONS + EXTRA_SECTIONS


def _import_lightning() -> Any:
    """The Lightning package FeatureProbe is built on (a Trainer of the other one rejects its callbacks)."""
    with contextlib.suppress(Exception):
        from lit_probe import FeatureProbe  # type: ignore[attr-defined]

        for base in FeatureProbe.__mro__:
            if base.__module__.startswith("lightning.pytorch"):
                return importlib.import_module("lightning.pytorch")
            if base.__module__.startswith("pytorch_lightning"):
                return importlib.import_module("pytorch_lightning")
    try:
        return importlib.import_module("lightning.pytorch")
    except ImportError:
        return importlib.import_module("pytorch_lightning")


pl = _import_lightning()


class Unavailable(Exception):
    """Something a measurement needs is missing here (e.g. ``lit_probe.FeatureProbe`` not importable)."""


def _feature_probe_cls() -> Any:
    try:
        from lit_probe import FeatureProbe  # type: ignore[attr-defined]
    except Exception as err:  # noqa: BLE001 - broken or missing: the probe variants are "unavailable"
        raise Unavailable(f"{type(err).__name__}: {err}") from None
    return FeatureProbe


# ==============================================================================================================
# Models and data
# ==============================================================================================================


class BenchModule(pl.LightningModule):
    """Any classifier ``net`` as a LightningModule: module paths are ``net.<torchvision path>``."""

    def __init__(self, net: nn.Module, lr: float = 0.01) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class ResBlock(nn.Module):
    """``x + relu(linear(x))``: three modules (the block, its Linear, its ReLU)."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.relu = nn.ReLU()
        # each block adds ~1/depth of the variance: the signal neither explodes nor vanishes over the depth
        nn.init.normal_(self.linear.weight, std=math.sqrt(2.0 / width / depth))
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.relu(self.linear(x))


def deep_mlp(n_modules: int, width: int = 64, num_classes: int = 10) -> nn.Sequential:
    """A residual MLP with about ``n_modules`` modules under it: ``round((n - 1) / 3)`` blocks and a head."""
    blocks = max(1, round((n_modules - 1) / 3))
    return nn.Sequential(*[ResBlock(width, blocks) for _ in range(blocks)], nn.Linear(width, num_classes))


def make_net(arch: str, num_classes: int = 10) -> nn.Module:
    if arch.startswith("mlp"):  # "mlp1000": about 1000 modules
        return deep_mlp(int(arch[3:]), num_classes=num_classes)
    return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)


def n_modules_under(net: nn.Module) -> int:
    """What ``net.**`` resolves to: every module under ``net`` (not ``net`` itself)."""
    return sum(1 for _ in net.modules()) - 1


def make_data(n_samples: int, shape: tuple[int, ...], num_classes: int = 10, seed: int = 1234) -> TensorDataset:
    """A fixed, seeded random classification data set (no download)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, *shape, generator=g)
    y = torch.randint(0, num_classes, (n_samples,), generator=g)
    return TensorDataset(x, y)


def input_shape(arch: str, size: int) -> tuple[int, ...]:
    return (64,) if arch.startswith("mlp") else (3, size, size)


def block_names(model: nn.Module) -> list[str]:
    """The residual blocks of a torchvision ResNet under ``net``: ``net.layer1.0 ... net.layer4.<last>``."""
    net = model.net
    return [f"net.{layer}.{i}" for layer in ("layer1", "layer2", "layer3", "layer4")
            for i in range(len(getattr(net, layer)))]


def leaf_names(model: nn.Module) -> list[str]:
    """Every module without children under ``net``."""
    return [f"net.{n}" for n, m in model.net.named_modules() if n and not any(True for _ in m.children())]


BLOCKS_GLOB = "net.layer?.*"


# ==============================================================================================================
# Instruments
# ==============================================================================================================


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> Optional[float]:
    with contextlib.suppress(OSError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


class Clock:
    """What the two timing callbacks stamp."""

    def __init__(self, device: str, rss_every: int = 0) -> None:
        self.device = device
        self.rss_every = rss_every
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.train_end: Optional[float] = None
        self.rss_by_step: dict[int, float] = {}


class FirstCallback(pl.Callback):
    """First in the callback list: stamps every ``on_train_batch_start`` and ``on_train_end``."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        c = self.clock
        _sync(c.device)
        c.starts.append(time.perf_counter())
        i = len(c.starts) - 1
        if c.rss_every and i % c.rss_every == 0:
            c.rss_by_step[i] = _rss_mb()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        _sync(self.clock.device)
        self.clock.train_end = time.perf_counter()


class LastCallback(pl.Callback):
    """Last in the callback list: stamps ``on_train_batch_end``."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
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
# behind (+-15 MB on a ResNet-18 fit). mallopt() inside a process that has already trained does not help, so the
# short section's memory pass runs in a fresh subprocess started with them.
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
            self.peak_rss = max(self.peak_rss, rss)
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


# ==============================================================================================================
# What a fit adds: probes and the alternatives
# ==============================================================================================================


@dataclass
class Setup:
    """What a variant adds to a fit: callbacks, a logger, Trainer arguments, and a cleanup."""

    callbacks: list[Any] = field(default_factory=list)
    logger: Any = False
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    cleanup: Callable[[], None] = lambda: None
    probe: Any = None  # the FeatureProbe, if any (its findings are counted)
    n_probed: Optional[int] = None


@dataclass
class Context:
    """Per-process resources shared by the fits."""

    tmp: str
    device: str
    wandb_log: str = "all"
    _wandb_run: Any = None
    _n: int = 0

    def new_dir(self, name: str) -> str:
        self._n += 1
        return os.path.join(self.tmp, "probe", f"{self._n:03d}_{name}")

    def wandb_run(self) -> Any:
        """One offline wandb run for the whole process (``wandb.init`` costs seconds; fits reuse it)."""
        if self._wandb_run is None:
            os.environ["WANDB_MODE"] = "offline"
            os.environ["WANDB_DIR"] = os.path.join(self.tmp, "wandb")
            os.environ.setdefault("WANDB_SILENT", "true")
            os.environ.setdefault("WANDB_CONSOLE", "off")
            os.makedirs(os.environ["WANDB_DIR"], exist_ok=True)
            try:
                import wandb
            except ImportError as err:
                raise Unavailable(f"{type(err).__name__}: {err}") from None
            self._wandb_run = wandb.init(project="lit-probe-overhead", mode="offline", dir=os.environ["WANDB_DIR"])
        return self._wandb_run

    def close(self) -> None:
        if self._wandb_run is not None:
            with contextlib.suppress(Exception):
                self._wandb_run.finish(quiet=True)
            self._wandb_run = None


def feature_probe(ctx: Context, probes: list[str], name: str, n_probed: Optional[int] = None,
                  figures: Optional[int] | str = "default", **kwargs: Any) -> Setup:
    """``FeatureProbe(probes=..., save_dir=<tmp>, **kwargs)``.

    ``figures="default"`` leaves ``figure_every_n_steps`` at its default; ``None`` turns figures off and an
    int sets it (both only where the argument exists). Any other argument FeatureProbe does not take makes the
    variant unavailable.
    """
    cls = _feature_probe_cls()
    params = inspect.signature(cls).parameters
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        raise Unavailable(f"FeatureProbe takes no {', '.join(unknown)}")
    if figures != "default" and "figure_every_n_steps" in params:
        kwargs["figure_every_n_steps"] = figures
    if "save_dir" in params:
        kwargs["save_dir"] = ctx.new_dir(name)
    probe = cls(probes=probes, **kwargs)
    return Setup(callbacks=[probe], probe=probe, n_probed=n_probed)


def naive_hooks(model: nn.Module, names: list[str]) -> Setup:
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

    return Setup(cleanup=cleanup, n_probed=len(names))


def floor_hooks(model: nn.Module, names: list[str]) -> Setup:
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

    return Setup(cleanup=cleanup, n_probed=len(names))


def wandb_watch(model: nn.Module, ctx: Context, log_freq: int) -> Setup:
    try:
        WandbLogger = importlib.import_module(pl.__name__ + ".loggers").WandbLogger
    except (ImportError, AttributeError) as err:  # pragma: no cover - wandb missing
        raise Unavailable(f"{type(err).__name__}: {err}") from None
    run = ctx.wandb_run()
    logger = WandbLogger(experiment=run, save_dir=os.path.join(ctx.tmp, "wandb"))
    logger.watch(model, log=ctx.wandb_log, log_freq=log_freq, log_graph=False)

    def cleanup() -> None:
        with contextlib.suppress(Exception):
            run.unwatch(model)

    return Setup(logger=logger, cleanup=cleanup)


# ==============================================================================================================
# One fit
# ==============================================================================================================


@dataclass
class FitSpec:
    arch: str
    size: int
    batch: int
    steps: int
    device: str
    precision: str = "32"
    log_every: int = 50  # Trainer(log_every_n_steps=...): Lightning's default
    rss_every: int = 0  # RSS read at every this many batch starts (0: never)
    sample_rss_ms: float = 0.0  # > 0: a thread samples the RSS during the fit (memory pass)
    seed: int = 0


@dataclass
class Fit:
    """One fit: every stamp, relative to the first batch start."""

    section: str
    variant: str
    round: int
    arch: str
    steps: int
    phase: str = "timing"  # "timing" | "memory"
    status: str = "ok"  # "ok" | "crashes" | "unavailable" | "error"
    error: Optional[str] = None
    n_probed: Optional[int] = None
    step_s: list[float] = field(default_factory=list)  # batch start -> batch end
    period_s: list[float] = field(default_factory=list)  # batch start -> next batch start (last: -> train end)
    train_s: Optional[float] = None  # first batch start -> on_train_end
    fit_start_s: Optional[float] = None  # trainer.fit called -> first batch start
    fit_end_s: Optional[float] = None  # on_train_end -> trainer.fit returned
    fit_wall_s: float = 0.0  # trainer.fit, all of it
    peak_rss_mb: Optional[float] = None  # VmHWM during the fit (reset before it)
    rss_start_mb: Optional[float] = None
    rss_by_step: dict[int, float] = field(default_factory=dict)
    rss_peak_delta_mb: Optional[float] = None  # sampled (memory pass)
    cuda_peak_mb: Optional[float] = None
    cuda_peak_delta_mb: Optional[float] = None
    findings: Optional[int] = None

    @property
    def mean_step_s(self) -> Optional[float]:
        return self.train_s / len(self.period_s) if self.train_s and self.period_s else None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def resolve_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return choice


_DATA: dict[tuple, TensorDataset] = {}


def _data_for(spec: FitSpec) -> TensorDataset:
    key = (input_shape(spec.arch, spec.size), spec.batch, min(spec.steps, 64))
    if key not in _DATA:
        _DATA[key] = make_data(min(spec.steps, 64) * spec.batch, key[0])
    return _DATA[key]


def run_fit(section: str, variant: str, rnd: int, spec: FitSpec, build: Callable[[nn.Module, Context], Setup],
            ctx: Context, phase: str = "timing") -> Fit:
    """A fresh model (same seed) and a fresh Trainer: ``spec.steps`` steps of what ``build`` adds."""
    res = Fit(section=section, variant=variant, round=rnd, arch=spec.arch, steps=spec.steps, phase=phase)
    torch.manual_seed(spec.seed)
    model = BenchModule(make_net(spec.arch))
    clock = Clock(spec.device, spec.rss_every)
    setup: Optional[Setup] = None
    try:
        try:
            setup = build(model, ctx)
        except Unavailable as err:
            res.status, res.error = "unavailable", str(err)
            return res
        res.n_probed = setup.n_probed
        loader = DataLoader(_data_for(spec), batch_size=spec.batch, shuffle=False, num_workers=0, drop_last=True)
        trainer = pl.Trainer(
            accelerator="gpu" if spec.device == "cuda" else "cpu",
            devices=1,
            precision=spec.precision,
            max_steps=spec.steps,
            max_epochs=-1,
            logger=setup.logger,
            log_every_n_steps=spec.log_every,
            callbacks=[FirstCallback(clock), *setup.callbacks, LastCallback(clock)],
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=os.path.join(ctx.tmp, "trainer"),
            **setup.trainer_kwargs,
        )
        gc.collect()
        _malloc_trim()
        if spec.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            cuda_start = torch.cuda.memory_allocated()
        res.rss_start_mb = _rss_mb()
        hwm = _reset_peak_rss()
        sampler = RssSampler(spec.sample_rss_ms / 1000.0)
        t0 = time.perf_counter()
        with sampler if spec.sample_rss_ms > 0 else contextlib.nullcontext():
            try:
                trainer.fit(model, loader)
            except Exception as err:  # noqa: BLE001 - a crash is a result (naive hooks on in-place ReLU)
                res.status, res.error = "crashes", _first_line(err)
        t1 = time.perf_counter()
        res.fit_wall_s = t1 - t0
        if hwm:
            res.peak_rss_mb = _peak_rss_mb()
        if spec.sample_rss_ms > 0:
            res.rss_peak_delta_mb = sampler.delta_mb
        if spec.device == "cuda":
            res.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20
            res.cuda_peak_delta_mb = (torch.cuda.max_memory_allocated() - cuda_start) / 2**20
        s, e = clock.starts, clock.ends
        if s:
            n = min(len(s), len(e))
            res.step_s = [b - a for a, b in zip(s[:n], e[:n])]
            end = clock.train_end if clock.train_end is not None else (e[-1] if e else s[-1])
            res.period_s = [b - a for a, b in zip(s, s[1:])] + [end - s[-1]]
            res.train_s = end - s[0]
            res.fit_start_s = s[0] - t0
            res.fit_end_s = t1 - end
            res.rss_by_step = dict(clock.rss_by_step)
        if setup.probe is not None:
            with contextlib.suppress(Exception):
                res.findings = len(getattr(setup.probe, "findings", []) or [])
            pts = getattr(setup.probe, "points", None)
            if isinstance(pts, (list, tuple)) and pts:
                res.n_probed = len(pts)
    except Exception as err:  # noqa: BLE001 - a broken variant must not stop the benchmark
        res.status, res.error = "error", _first_line(err)
    finally:
        if setup is not None:
            with contextlib.suppress(Exception):
                setup.cleanup()
        del model, setup
        gc.collect()
        if spec.device == "cuda":
            torch.cuda.empty_cache()
    return res


def _median(xs: Sequence[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def _mean(xs: Sequence[float]) -> Optional[float]:
    return statistics.fmean(xs) if xs else None


def _ms(x: Optional[float]) -> Optional[float]:
    return None if x is None else x * 1e3


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fit_line(f: Fit) -> str:
    if f.status != "ok":
        return f"{f.variant:28s} {f.status}: {f.error}"
    return (f"{f.variant:28s} {f.steps:5d} steps  median {_fmt(_ms(_median(f.period_s)))} ms  "
            f"mean {_fmt(_ms(f.mean_step_s))} ms  fit end {_fmt(f.fit_end_s, 2)} s  ({f.fit_wall_s:.1f} s)")


def _fmt(x: Optional[float], nd: int = 1, suffix: str = "") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}{suffix}"


def _md(s: Any) -> str:
    return str(s).replace("|", "\\|")[:160]


def interleaved(section: str, arch: str, variants: list[tuple[str, Callable[[nn.Module, Context], Setup]]],
                rounds: int, spec: FitSpec, ctx: Context, base_name: str = "no_probe") -> list[Fit]:
    """A B A C ... A: each probe fit between two no-probe fits, ``rounds`` times."""
    fits: list[Fit] = []

    def base(r: int) -> None:
        f = run_fit(section, base_name, r, spec, lambda m, c: Setup(), ctx)
        fits.append(f)
        _log(f"[{section} {arch} round {r + 1}/{rounds}] {_fit_line(f)}")

    dead: set[str] = set()
    for r in range(rounds):
        for name, build in variants:
            if name in dead:
                continue
            base(r)
            f = run_fit(section, name, r, spec, build, ctx)
            fits.append(f)
            _log(f"[{section} {arch} round {r + 1}/{rounds}] {_fit_line(f)}")
            if f.status != "ok":
                dead.add(name)
    base(rounds - 1)
    return fits


def flanked_ratios(fits: list[Fit], name: str, metric: Callable[[Fit], Optional[float]],
                   base_name: str = "no_probe") -> list[float]:
    """Per fit of ``name``: its metric over the mean of the no-probe fits just before and after it."""
    out = []
    for i, f in enumerate(fits):
        if f.variant != name or f.status != "ok":
            continue
        flank = [g for g in (fits[i - 1] if i > 0 else None, fits[i + 1] if i + 1 < len(fits) else None)
                 if g is not None and g.variant == base_name and g.status == "ok"]
        m = metric(f)
        bm = _mean([v for v in (metric(g) for g in flank) if v is not None])
        if m is not None and bm:
            out.append(m / bm)
    return out


# ==============================================================================================================
# Section "long": the whole loop over more steps than the history holds
# ==============================================================================================================


def _pick(period: list[float], idx: Sequence[int]) -> list[float]:
    return [period[i] for i in idx if 0 <= i < len(period)]


def long_fit_summary(f: Fit, log_every: int, fig_every: Optional[int], window: int) -> dict[str, Any]:
    n = len(f.period_s)
    log_steps = [i for i in range(n - 1) if (i + 1) % log_every == 0]
    fig_steps = [i for i in range(1, n) if fig_every and i % fig_every == 0]
    early = [i for i in log_steps if i < window and i not in fig_steps]
    late = [i for i in log_steps if i >= n - window and i not in fig_steps]
    plain = [i for i in range(n) if i not in log_steps and i not in fig_steps and i != 0]
    e, l_ = _median(_pick(f.period_s, early)), _median(_pick(f.period_s, late))
    rss = f.rss_by_step
    rss_late = [rss[k] for k in sorted(rss) if k >= window]
    return {
        "steps": n,
        "median_step_ms": _ms(_median(f.period_s)),
        "median_plain_step_ms": _ms(_median(_pick(f.period_s, plain))),
        "mean_step_ms": _ms(f.mean_step_s),
        "log_steps_early": early,
        "log_steps_late": late,
        "log_step_early_ms": _ms(e),
        "log_step_late_ms": _ms(l_),
        "log_late_over_early": l_ / e if e and l_ else None,
        "figure_steps": fig_steps,
        "figure_step_ms": [p * 1e3 for p in _pick(f.period_s, fig_steps)],
        "step0_ms": _ms(f.period_s[0]) if f.period_s else None,
        "fit_end_s": f.fit_end_s,
        "fit_wall_s": f.fit_wall_s,
        "peak_rss_mb": f.peak_rss_mb,
        "rss_growth_late_mb": (rss_late[-1] - rss_late[0]) if len(rss_late) >= 2 else None,
        "findings": f.findings,
        "n_probed": f.n_probed,
    }


def _figures_arg(value: Optional[int]) -> Optional[int] | str:
    """``--*-figure-every``: None = FeatureProbe's default, 0 = figures off, N = every N steps."""
    return "default" if value is None else (None if value == 0 else value)


def section_long(args: argparse.Namespace, ctx: Context) -> dict[str, Any]:
    spec = FitSpec(arch=args.long_model, size=args.long_size, batch=args.long_batch, steps=args.long_steps,
                   device=ctx.device, precision=args.precision, log_every=args.long_log_every,
                   rss_every=args.long_rss_every, seed=args.seed)
    figs = _figures_arg(args.long_figure_every)
    probe_model = BenchModule(make_net(args.long_model))
    variants: list[tuple[str, Callable[[nn.Module, Context], Setup]]] = []
    for v in args.long_variants:
        if v == "blocks":
            n = len(block_names(probe_model))
            variants.append(("probe_blocks", lambda m, c, n=n: feature_probe(c, [BLOCKS_GLOB], "long_blocks", n,
                                                                              figures=figs)))
        elif v == "leaves":
            variants.append(("probe_leaves", lambda m, c: feature_probe(c, leaf_names(m), "long_leaves",
                                                                        len(leaf_names(m)), figures=figs)))
        else:
            raise SystemExit(f"--long-variants: unknown {v!r} (blocks, leaves)")
    t0 = time.perf_counter()
    fits = interleaved("long", args.long_model, variants, args.long_rounds, spec, ctx)
    fig_every = 500 if figs == "default" else figs
    with contextlib.suppress(Exception):
        if figs == "default":
            fig_every = inspect.signature(_feature_probe_cls()).parameters["figure_every_n_steps"].default
    window = min(args.long_window, max(1, spec.steps // 2))
    rows: dict[str, dict[str, Any]] = {}
    for name in ["no_probe"] + [n for n, _ in variants]:
        ok = [f for f in fits if f.variant == name and f.status == "ok"]
        bad = [f for f in fits if f.variant == name and f.status != "ok"]
        if not ok:
            rows[name] = {"status": bad[0].status if bad else "not run", "error": bad[0].error if bad else None}
            continue
        per_fit = [long_fit_summary(f, spec.log_every, fig_every, window) for f in ok]
        row: dict[str, Any] = {"status": "ok", "fits": per_fit}
        for key in ("median_step_ms", "mean_step_ms", "log_step_early_ms", "log_step_late_ms",
                    "log_late_over_early", "fit_end_s", "fit_wall_s", "peak_rss_mb", "rss_growth_late_mb",
                    "step0_ms", "median_plain_step_ms"):
            row[key] = _median([p[key] for p in per_fit if p[key] is not None])
        row["figure_steps"] = per_fit[0]["figure_steps"]
        # per figure step: the median over this variant's fits
        row["figure_step_ms"] = [_median([p["figure_step_ms"][k] for p in per_fit if k < len(p["figure_step_ms"])])
                                 for k in range(len(row["figure_steps"]))]
        row["findings"] = per_fit[0]["findings"]
        row["n_probed"] = per_fit[0]["n_probed"]
        if name != "no_probe":
            for key, metric in (("ratio_mean", lambda f: f.mean_step_s), ("ratio_median",
                                lambda f: _median(f.period_s)), ("ratio_fit_wall", lambda f: f.fit_wall_s)):
                rs = flanked_ratios(fits, name, metric)
                row[key] = _median(rs)
                row[key + "_per_fit"] = rs
        rows[name] = row
    targets = []
    for name, row in rows.items():
        if name == "no_probe" or row.get("status") != "ok":
            continue
        r = row.get("log_late_over_early")
        targets.append(_target(f"long {name}: log step late / early <= 1.20x", r, 1.20))
    config = {"model": args.long_model, "size": args.long_size, "batch": args.long_batch, "steps": spec.steps,
              "rounds": args.long_rounds, "log_every_n_steps": spec.log_every,
              "figure_every_n_steps": fig_every, "early_late_window": window, "order": [f.variant for f in fits],
              "feature_probe": "default configuration" + ("" if figs == "default" else
                                                          f", figure_every_n_steps={figs}")}
    if fig_every is None:
        config["feature_probe"] = "default configuration but figures off (figure_every_n_steps=None)"
    return {"config": config, "rows": rows, "targets": targets, "fits": [asdict(f) for f in fits],
            "wall_s": time.perf_counter() - t0}


def markdown_long(res: dict[str, Any]) -> str:
    c = res["config"]
    lines = [(f"**Whole training loop**: {c['model']} {c['size']}x{c['size']} batch {c['batch']}, {c['steps']} steps "
              f"per fit, FeatureProbe {c['feature_probe']} ("
              + (f"figures every {c['figure_every_n_steps']} steps, " if c["figure_every_n_steps"] else "")
              + f"log step every {c['log_every_n_steps']}), fits in the order {' '.join(_abbrev(c['order']))}; step = one "
              f"on_train_batch_start to the next; early / late = log steps in the first / last "
              f"{c['early_late_window']} steps (figure steps excluded); fit end = on_train_end -> fit returns; RSS "
              f"growth late = RSS at the last sample - at step {c['early_late_window']}; ratios against the mean of "
              f"the no-probe fits on either side."),
             "",
             ("| variant | modules | median step ms | mean step ms (loop / steps) | ratio mean | ratio median "
              "| log step early ms | log step late ms | late / early | figure steps ms | fit end s "
              "| fit wall s (ratio) | peak RSS MB | RSS growth late MB | findings |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for name, r in res["rows"].items():
        if r.get("status") != "ok":
            lines.append(f"| {name} | {r.get('status')}: {_md(r.get('error'))} |" + " |" * 13)
            continue
        figs = ", ".join(f"{_fmt(x, 0)} (step {k})" for k, x in zip(r["figure_steps"], r["figure_step_ms"])) or "n/a"
        wall_ratio = "" if name == "no_probe" else f" ({_fmt(r.get('ratio_fit_wall'), 2, 'x')})"
        def ratio(k: str, name: str = name, r: dict[str, Any] = r) -> str:
            return "1.00x" if name == "no_probe" else _fmt(r.get(k), 3, "x")

        lines.append(
            f"| {name} | {r['n_probed'] or ''} | {_fmt(r['median_step_ms'])} | {_fmt(r['mean_step_ms'])} | "
            f"{ratio('ratio_mean')} | {ratio('ratio_median')} | {_fmt(r['log_step_early_ms'])} | "
            f"{_fmt(r['log_step_late_ms'])} | {_fmt(r['log_late_over_early'], 2, 'x')} | {figs} | "
            f"{_fmt(r['fit_end_s'], 2)} | {_fmt(r['fit_wall_s'])}{wall_ratio} | {_fmt(r['peak_rss_mb'], 0)} | "
            f"{_fmt(r['rss_growth_late_mb'])} | {'' if r['findings'] is None else r['findings']} |")
    return "\n".join(lines)


def _abbrev(order: list[str]) -> list[str]:
    return ["A" if o == "no_probe" else o for o in order]


def _target(what: str, value: Optional[float], limit: float) -> dict[str, Any]:
    return {"target": what, "value": value,
            "result": "n/a" if value is None else ("PASS" if value <= limit else "MISS")}


# ==============================================================================================================
# Section "scaling": whole-loop ratio against the number of probed modules
# ==============================================================================================================


def section_scaling(args: argparse.Namespace, ctx: Context) -> dict[str, Any]:
    t0 = time.perf_counter()
    groups: list[tuple[str, int, int]] = [(f"mlp{n}", 0, args.scaling_mlp_batch) for n in args.scaling_sizes]
    groups += [(arch, args.scaling_size, args.scaling_batch) for arch in args.scaling_models]
    rows = []
    all_fits: list[Fit] = []
    for arch, size, batch in groups:
        spec = FitSpec(arch=arch, size=size, batch=batch, steps=args.scaling_steps, device=ctx.device,
                       precision=args.precision, log_every=args.scaling_log_every, seed=args.seed)
        n = n_modules_under(make_net(arch))
        figs = _figures_arg(args.scaling_figure_every)
        build = (lambda m, c, n=n, arch=arch, figs=figs:
                 feature_probe(c, ["net.**"], f"scaling_{arch}", n, figures=figs))
        fits = interleaved("scaling", arch, [("probe", build)], args.scaling_rounds, spec, ctx)
        all_fits += fits
        ok_p = [f for f in fits if f.variant == "probe" and f.status == "ok"]
        ok_b = [f for f in fits if f.variant == "no_probe" and f.status == "ok"]
        bad = [f for f in fits if f.status != "ok"]
        row: dict[str, Any] = {"model": arch, "input": "64" if arch.startswith("mlp") else f"3x{size}x{size}",
                               "batch": batch, "steps": spec.steps, "n_probed": n}
        if not ok_p or not ok_b:
            row.update(status=bad[0].status if bad else "not run", error=bad[0].error if bad else None)
            rows.append(row)
            continue
        row["status"] = "ok"
        row["n_probed"] = ok_p[0].n_probed or n
        row["no_probe_mean_step_ms"] = _ms(_median([f.mean_step_s for f in ok_b if f.mean_step_s]))
        row["probe_mean_step_ms"] = _ms(_median([f.mean_step_s for f in ok_p if f.mean_step_s]))
        row["ratio_mean"] = _median(flanked_ratios(fits, "probe", lambda f: f.mean_step_s))
        row["ratio_median"] = _median(flanked_ratios(fits, "probe", lambda f: _median(f.period_s)))
        row["ratio_fit_wall"] = _median(flanked_ratios(fits, "probe", lambda f: f.fit_wall_s))
        row["probe_fit_end_s"] = _median([f.fit_end_s for f in ok_p if f.fit_end_s is not None])
        row["no_probe_fit_end_s"] = _median([f.fit_end_s for f in ok_b if f.fit_end_s is not None])
        row["per_tensor_us"] = (((row["probe_mean_step_ms"] - row["no_probe_mean_step_ms"]) * 1e3
                                 / (2 * row["n_probed"])) if row["n_probed"] else None)
        row["findings"] = ok_p[0].findings
        rows.append(row)
    targets = []
    for row in rows:
        if not row["model"].startswith("mlp") and row.get("status") == "ok":
            targets.append(_target(f"scaling {row['model']} ({row['n_probed']} modules): whole-loop ratio <= 1.25x",
                                   row.get("ratio_mean"), 1.25))
            targets.append(_target(f"scaling {row['model']}: fit end <= 10 s", row.get("probe_fit_end_s"), 10.0))
    config = {"steps": args.scaling_steps, "rounds": args.scaling_rounds, "mlp_sizes": args.scaling_sizes,
              "mlp": "residual blocks x + relu(linear(x)), width 64, + a Linear head; probes ['net.**']",
              "mlp_batch": args.scaling_mlp_batch, "models": args.scaling_models, "size": args.scaling_size,
              "batch": args.scaling_batch, "log_every_n_steps": args.scaling_log_every,
              "figure_every_n_steps": _figures_arg(args.scaling_figure_every)}
    return {"config": config, "rows": rows, "targets": targets, "fits": [asdict(f) for f in all_fits],
            "wall_s": time.perf_counter() - t0}


def markdown_scaling(res: dict[str, Any]) -> str:
    c = res["config"]
    lines = [(f"**Scaling**: {c['steps']} steps per fit (fewer than the long section), FeatureProbe default "
              f"configuration on `net.**`, fits A B A; MLP = {c['mlp']}, batch {c['mlp_batch']}; whole-loop mean "
              f"step = loop / steps; us / tensor = (probe - no probe) mean step / (2 x modules)."),
             "",
             ("| model | input, batch | probed modules | no probe mean step ms | probe mean step ms | ratio mean "
              "| ratio median | us / tensor | fit end s (probe / no probe) | findings |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | {r['input']}, {r['batch']} | {r['n_probed']} | "
                         f"{r.get('status')}: {_md(r.get('error'))} |" + " |" * 6)
            continue
        lines.append(f"| {r['model']} | {r['input']}, {r['batch']} | {r['n_probed']} | "
                     f"{_fmt(r['no_probe_mean_step_ms'])} | {_fmt(r['probe_mean_step_ms'])} | "
                     f"{_fmt(r['ratio_mean'], 3, 'x')} | {_fmt(r['ratio_median'], 3, 'x')} | "
                     f"{_fmt(r['per_tensor_us'])} | {_fmt(r['probe_fit_end_s'], 2)} / "
                     f"{_fmt(r['no_probe_fit_end_s'], 2)} | {'' if r['findings'] is None else r['findings']} |")
    return "\n".join(lines)


# ==============================================================================================================
# Section "small": the short step on one core and on every core (issue 22), one table
# ==============================================================================================================


def section_small(args: argparse.Namespace, ctx: Context) -> dict[str, Any]:
    """The long section's method at a small step (resnet18 32x32 batch 16, default configuration with figures):
    blocks and every leaf with ``--threads`` (A B A C A), the blocks again with threads = cores (A B A); mlp50 (the
    scaling section's residual MLP, 49 modules) with ``--threads``; the kernels section's host time per tensor."""
    t0 = time.perf_counter()
    base = dict(vars(args))

    def sub(**kw: Any) -> argparse.Namespace:
        return argparse.Namespace(**{**base, "long_size": args.small_size, "long_batch": args.small_batch,
                                     "long_steps": args.small_steps, "long_rounds": 1, **kw})

    parts: dict[str, Any] = {}
    parts["one"] = section_long(sub(long_variants=["blocks", "leaves"]), ctx)
    cores = args.small_cores or os.cpu_count() or 1
    threads = torch.get_num_threads()
    torch.set_num_threads(cores)
    try:
        parts["every"] = section_long(sub(long_variants=["blocks"]), ctx)
    finally:
        torch.set_num_threads(threads)
    parts["mlp"] = section_scaling(sub(scaling_sizes=[50], scaling_models=[], scaling_steps=args.small_mlp_steps), ctx)
    parts["kernels"] = section_kernels(args, ctx)
    rows: list[dict[str, Any]] = []
    targets = []
    limits = {("one", "probe_blocks"): 1.04, ("one", "probe_leaves"): 1.08, ("every", "probe_blocks"): 1.10}
    for part, nthreads in (("one", threads), ("every", cores)):
        long_rows = parts[part]["rows"]
        base_row = long_rows.get("no_probe", {})
        for name, r in long_rows.items():
            if name == "no_probe":
                continue
            row = {"run": f"resnet18 {args.small_size}x{args.small_size} batch {args.small_batch}", "threads": nthreads,
                   "variant": name, "status": r.get("status"), "error": r.get("error"),
                   "modules": r.get("n_probed"), "no_probe_mean_step_ms": base_row.get("mean_step_ms"),
                   "mean_step_ms": r.get("mean_step_ms"), "ratio_mean": r.get("ratio_mean"),
                   "ratio_median": r.get("ratio_median"), "fit_end_s": r.get("fit_end_s"),
                   "findings": r.get("findings"), "limit": limits.get((part, name))}
            rows.append(row)
            if row["limit"] is not None:
                targets.append(_target(f"small {name} ({nthreads} thread{'s' if nthreads > 1 else ''}): whole-loop "
                                       f"ratio <= {row['limit']:.2f}x", row["ratio_mean"], row["limit"]))
    for r in parts["mlp"]["rows"]:
        rows.append({"run": f"{r['model']} (residual MLP)", "threads": threads, "variant": "net.**",
                     "status": r.get("status"), "error": r.get("error"), "modules": r.get("n_probed"),
                     "no_probe_mean_step_ms": r.get("no_probe_mean_step_ms"), "mean_step_ms": r.get("probe_mean_step_ms"),
                     "ratio_mean": r.get("ratio_mean"), "ratio_median": r.get("ratio_median"),
                     "fit_end_s": r.get("probe_fit_end_s"), "findings": r.get("findings"), "limit": 2.0})
        targets.append(_target(f"small {r['model']}: whole-loop ratio <= 2.00x", r.get("ratio_mean"), 2.0))
    kernel = [r for r in parts["kernels"]["rows"] if "sentinel" in r.get("case", "") and r.get("host_us_per_tensor")
              is not None and "bf16" not in r["case"]]
    targets += parts["kernels"]["targets"]
    config = {"size": args.small_size, "batch": args.small_batch, "steps": args.small_steps, "threads": threads,
              "cores": cores, "mlp_steps": args.small_mlp_steps,
              "figure_every_n_steps": parts["one"]["config"]["figure_every_n_steps"],
              "log_every_n_steps": parts["one"]["config"]["log_every_n_steps"]}
    return {"config": config, "rows": rows, "kernel_rows": kernel, "parts": parts, "targets": targets,
            "wall_s": time.perf_counter() - t0}


def markdown_small(res: dict[str, Any]) -> str:
    c = res["config"]
    fig = f"figures every {c['figure_every_n_steps']} steps" if c["figure_every_n_steps"] else "figures off"
    lines = [(f"**The short step, on one core and on every core**: resnet18 {c['size']}x{c['size']} batch {c['batch']}, "
              f"{c['steps']} steps per fit, FeatureProbe default configuration ({fig}, parameters, flight recorder, "
              f"log step every {c['log_every_n_steps']}), fits A B A C A with {c['threads']} torch thread(s) and A B A "
              f"with {c['cores']} (every core); mlp50: the residual MLP of the scaling section, {c['mlp_steps']} steps, "
              "A B A; ratios: the whole loop's mean step over the mean of the no-probe fits on either side."),
             "",
             ("| run | torch threads | probes | modules | no probe mean step ms | probe mean step ms | ratio mean "
              "| ratio median | fit end s | findings | target |"),
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        lim = f"<= {r['limit']:.2f}x" if r.get("limit") else ""
        if r.get("status") != "ok":
            lines.append(f"| {r['run']} | {r['threads']} | {r['variant']} | {r.get('status')}: {_md(r.get('error'))} |"
                         + " |" * 6 + f" {lim} |")
            continue
        lines.append(f"| {r['run']} | {r['threads']} | {r['variant']} | {r.get('modules') or ''} | "
                     f"{_fmt(r.get('no_probe_mean_step_ms'))} | {_fmt(r.get('mean_step_ms'))} | "
                     f"{_fmt(r.get('ratio_mean'), 3, 'x')} | {_fmt(r.get('ratio_median'), 3, 'x')} | "
                     f"{_fmt(r.get('fit_end_s'), 2)} | {'' if r.get('findings') is None else r['findings']} | {lim} |")
    for k in res.get("kernel_rows", []):
        lines.append(f"| {k['case']} (host us / observed tensor) | {res['config']['threads']} | | | | | "
                     f"{_fmt(k.get('host_us_per_tensor'), 2)} us | | | | <= 10 us |")
    return "\n".join(lines)


# ==============================================================================================================
# Section "kernels": host time and aten ops per observed tensor
# ==============================================================================================================


def _lit_probe_dir() -> str:
    import lit_probe

    return os.path.dirname(os.path.abspath(lit_probe.__file__))


def _op_counter_cls() -> Any:
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        """Every aten op dispatched while active (forward and backward): name, view or not, from lit_probe or
        not (a frame of the lit_probe package on the Python stack), and whether it made a float32 copy as
        large as a bf16/fp16 input."""

        def __init__(self, probe_dir: str) -> None:
            super().__init__()
            self.probe_dir = probe_dir
            self.ops: list[tuple[str, bool, bool, bool]] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            tin, tout = _first_tensor(args), _first_tensor(out)
            upcast = (tin is not None and tout is not None and tin.dtype in (torch.bfloat16, torch.float16)
                      and tout.dtype == torch.float32 and tout.numel() == tin.numel() and tin.numel() > 1)
            f = sys._getframe(1)
            probe = False
            while f is not None:
                if f.f_code.co_filename.startswith(self.probe_dir):
                    probe = True
                    break
                f = f.f_back
            self.ops.append((str(func), bool(getattr(func, "is_view", False)), probe, upcast))
            return out

    return OpCounter


def _first_tensor(obj: Any) -> Optional[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (list, tuple)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


class Driver:
    """The one place that drives ``lit_probe.ProbeSession`` without Lightning (its API may change)."""

    def __init__(self, model: nn.Module, probes: list[str]) -> None:
        try:
            from lit_probe import ProbeSession
        except Exception as err:  # noqa: BLE001
            raise Unavailable(f"{type(err).__name__}: {err}") from None
        kwargs: dict[str, Any] = {"every_n_steps": 10}
        if "full_warmup_steps" in inspect.signature(ProbeSession.__init__).parameters:
            kwargs["full_warmup_steps"] = 0
        self.session = ProbeSession.from_model(model, probes, **kwargs)
        self.session.open()
        self._has_full = "full" in inspect.signature(self.session.begin_step).parameters
        self.step = 0

    @property
    def names(self) -> list[str]:
        return list(self.session.names)

    def begin(self, full: bool) -> None:
        self.step += 1
        if self._has_full:
            self.session.begin_step(self.step, full=full)
        else:  # multiples of every_n_steps (10) take full statistics
            self.session.begin_step(self.step * 10 if full else self.step * 10 + 1)

    def end(self) -> None:
        self.session.end_step()

    def flush(self) -> None:
        self.session.flush()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.session.flush()
        self.session.close()


class _Net(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Reused(nn.Module):
    """``shared`` (a Linear) runs twice per forward."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.shared = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.shared(torch.relu(self.shared(self.inp(x))))))


def flat_mlp(n_modules: int, width: int = 64) -> _Net:
    """``n_modules / 2`` (Linear, ReLU) pairs, kaiming-initialised, under ``net``."""
    layers: list[nn.Module] = []
    for _ in range(max(1, n_modules // 2)):
        lin = nn.Linear(width, width)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
    return _Net(nn.Sequential(*layers))


def _step_fn(model: nn.Module, x: torch.Tensor, bf16: bool) -> Callable[[], None]:
    dev = x.device.type

    def run() -> None:
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            y = model(x)
        y.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    return run


def _count_observed(model: nn.Module, names: list[str], run: Callable[[], None]) -> int:
    """Tensors a probe on ``names`` observes in one ``run()``: floating outputs, plus their gradients."""
    n = [0]

    def fwd(mod: nn.Module, inp: Any, out: Any) -> None:
        for t in (out if isinstance(out, (list, tuple)) else [out]):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                n[0] += 1 + int(t.requires_grad)

    handles = [model.get_submodule(name).register_forward_hook(fwd) for name in names]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return n[0]


def kernel_case(name: str, model: nn.Module, probes: list[str], x: torch.Tensor, full: bool, bf16: bool,
                reps: int, inner: int, device: str, timed: bool) -> dict[str, Any]:
    """Ops (and, if ``timed``, host time) per observed tensor: the probe's step minus the same step without."""
    OpCounter = _op_counter_cls()
    probe_dir = _lit_probe_dir()
    base = copy.deepcopy(model)
    drv = Driver(model, probes)
    run_p, run_b = _step_fn(model, x, bf16), _step_fn(base, x, bf16)
    row: dict[str, Any] = {"case": name, "full": full, "bf16": bf16, "n_probed": len(drv.names)}
    try:
        observed = _count_observed(model, drv.names, run_p)  # the session is not collecting: no probe work
        row["tensors"] = observed
        for f in (True, False, full):  # warm-up: buffers, unit windows
            drv.begin(f)
            run_p()
            drv.end()
        run_b()
        drv.flush()
        cb, cp = OpCounter(probe_dir), OpCounter(probe_dir)
        with cb:
            run_b()
        drv.begin(full)
        with cp:
            run_p()
        drv.end()
        drv.flush()
        diff_all = len(cp.ops) - len(cb.ops)
        diff_compute = sum(not v for _, v, _, _ in cp.ops) - sum(not v for _, v, _, _ in cb.ops)
        mine = [o for o in cp.ops if o[2]]
        row["ops_per_tensor"] = diff_all / observed if observed else None
        row["compute_ops_per_tensor"] = diff_compute / observed if observed else None
        row["attributed_ops_per_tensor"] = len(mine) / observed if observed else None
        row["upcasts_per_tensor"] = sum(o[3] for o in mine) / observed if observed else None
        counts: dict[str, int] = {}
        for o in mine:
            counts[o[0]] = counts.get(o[0], 0) + 1
        row["probe_ops"] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
        if timed:
            times: dict[str, list[float]] = {"base": [], "probe": []}
            rng = random.Random(0)
            for _ in range(reps):
                for which in rng.sample(["base", "probe"], 2):
                    _sync(device)
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        if which == "probe":
                            drv.begin(full)
                            run_p()
                            drv.end()
                        else:
                            run_b()
                    _sync(device)
                    times[which].append((time.perf_counter() - t0) / inner)
                    if which == "probe":
                        drv.flush()
            tb, tp = _median(times["base"]), _median(times["probe"])
            row["step_us_no_probe"] = tb * 1e6 if tb else None
            row["step_us_probe"] = tp * 1e6 if tp else None
            row["host_us_per_tensor"] = (tp - tb) * 1e6 / observed if tb and tp and observed else None
            row["times_s"] = times
    finally:
        drv.close()
    return row


def section_kernels(args: argparse.Namespace, ctx: Context) -> dict[str, Any]:
    t0 = time.perf_counter()
    dev = ctx.device
    g = torch.Generator().manual_seed(args.seed)
    n = args.kernel_modules
    x_mlp = torch.randn(args.kernel_batch, 64, generator=g).to(dev)
    rows: list[dict[str, Any]] = []
    cases: list[tuple[str, Callable[[], nn.Module], list[str], torch.Tensor, bool, bool, bool]] = [
        (f"MLP {n} modules, sentinel (min/max)", lambda: flat_mlp(n), ["net.**"], x_mlp, False, False, True),
        (f"MLP {n} modules, full statistics", lambda: flat_mlp(n), ["net.**"], x_mlp, True, False, True),
        ("module called twice per forward, sentinel", lambda: Reused(), ["shared"], x_mlp, False, False, False),
        (f"MLP {n} modules, bf16 autocast, sentinel", lambda: flat_mlp(n), ["net.**"], x_mlp, False, True, True),
        (f"MLP {n} modules, bf16 autocast, full", lambda: flat_mlp(n), ["net.**"], x_mlp, True, True, False),
    ]
    if not args.quick:
        x_img = torch.randn(2, 3, 32, 32, generator=g).to(dev)
        cases += [(f"resnet18 leaves, {'sentinel' if not f else 'full'}", lambda: _Net(make_net("resnet18")),
                   ["net.**"], x_img, f, False, False) for f in (False, True)]
    for name, mk, probes, x, full, bf16, timed in cases:
        torch.manual_seed(args.seed)
        try:
            model = mk().to(dev)
            rows.append(kernel_case(name, model, probes, x, full, bf16, args.kernel_reps, args.kernel_inner, dev,
                                    timed))
        except Unavailable as err:
            rows.append({"case": name, "status": "unavailable", "error": str(err)})
        except Exception as err:  # noqa: BLE001
            rows.append({"case": name, "status": "error", "error": _first_line(err)})
        _log(f"[kernels] {name}: {_kernel_line(rows[-1])}")
    targets = []
    for r in rows:
        if "sentinel" in r["case"] and not r.get("bf16") and r.get("host_us_per_tensor") is not None:
            targets.append(_target(f"kernels {r['case']}: host time <= 10 us / tensor", r["host_us_per_tensor"], 10.0))
    config = {"modules": n, "batch": args.kernel_batch, "width": 64, "reps": args.kernel_reps,
              "inner": args.kernel_inner, "device": dev}
    return {"config": config, "rows": rows, "targets": targets, "wall_s": time.perf_counter() - t0}


def _kernel_line(r: dict[str, Any]) -> str:
    if "ops_per_tensor" not in r:
        return f"{r.get('status')}: {r.get('error')}"
    return (f"{r['tensors']} tensors, {_fmt(r['ops_per_tensor'], 2)} ops / tensor "
            f"({_fmt(r['compute_ops_per_tensor'], 2)} compute), host {_fmt(r.get('host_us_per_tensor'), 2)} us / tensor")


def markdown_kernels(res: dict[str, Any]) -> str:
    c = res["config"]
    lines = [(f"**Per observed tensor** (one forward + backward driven by `ProbeSession`, no Lightning; MLP = "
              f"(Linear, ReLU) x {c['modules'] // 2}, width {c['width']}, batch {c['batch']}, {c['device']}): aten ops "
              f"= ops dispatched with the probe minus without (TorchDispatchMode), compute = not views; host us = "
              f"(median step with - without) / tensors, {c['reps']} x {c['inner']} steps each, interleaved."),
             "",
             ("| case | tensors / step | aten ops / tensor | compute ops / tensor | full-size fp32 copies / tensor "
              "| host us / tensor | step us (no probe / probe) |"),
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if "ops_per_tensor" not in r:
            lines.append(f"| {r['case']} | {r.get('status')}: {_md(r.get('error'))} | | | | | |")
            continue
        steps = (f"{_fmt(r.get('step_us_no_probe'), 0)} / {_fmt(r.get('step_us_probe'), 0)}"
                 if r.get("step_us_probe") is not None else "")
        lines.append(f"| {r['case']} | {r['tensors']} | {_fmt(r['ops_per_tensor'], 2)} | "
                     f"{_fmt(r['compute_ops_per_tensor'], 2)} | {_fmt(r['upcasts_per_tensor'], 2)} | "
                     f"{_fmt(r.get('host_us_per_tensor'), 2) if r.get('step_us_probe') is not None else ''} | "
                     f"{steps} |")
    first = next((r for r in res["rows"] if r.get("probe_ops")), None)
    if first:
        lines += ["", f"Ops of the probe in `{first['case']}` (per step): "
                  + ", ".join(f"`{k}` x{v}" for k, v in first["probe_ops"].items())]
    return "\n".join(lines)


# ==============================================================================================================
# Section "short": the interleaved short ratios
# ==============================================================================================================


@dataclass(frozen=True)
class Variant:
    """One configuration of the short section."""

    name: str
    description: str
    build: Callable[[nn.Module, Context], Setup]
    target: Optional[float] = None  # ratio target (PASS/MISS), if any
    memory_target: bool = False  # checked against "peak memory <= 5% above no probe"
    min_steps: int = 0  # this variant's fits run at least this many steps


SHORT_VARIANTS: list[Variant] = [
    Variant("baseline", "no probe", lambda m, c: Setup()),
    Variant("probe_blocks", "FeatureProbe, default configuration (figures off), on the residual blocks",
            lambda m, c: feature_probe(c, [BLOCKS_GLOB], "probe_blocks", len(block_names(m)), figures=None),
            1.03, True),
    Variant("probe_leaves", "FeatureProbe, default configuration (figures off; activation, gradient and parameter "
            "signals), on every leaf module",
            lambda m, c: feature_probe(c, leaf_names(m), "probe_leaves", len(leaf_names(m)), figures=None),
            1.10, True),
    Variant("probe_leaves_no_params", "FeatureProbe, signals=(activation, gradient) (figures off), on every leaf "
            "module",
            lambda m, c: feature_probe(c, leaf_names(m), "probe_leaves_no_params", len(leaf_names(m)), figures=None,
                                       signals=("activation", "gradient")), 1.05, True),
    Variant("probe_leaves_params_only", "FeatureProbe, signals=(parameter,) (figures off), on every leaf module",
            lambda m, c: feature_probe(c, leaf_names(m), "probe_leaves_params_only", len(leaf_names(m)),
                                       figures=None, signals=("parameter",))),
    Variant("probe_leaves_every_step", "FeatureProbe, every_n_steps=1 (figures off), on every leaf module",
            lambda m, c: feature_probe(c, leaf_names(m), "probe_leaves_every_step", len(leaf_names(m)),
                                       figures=None, full_stats_every_n_steps=1), 1.20, True),
    Variant("floor_blocks", "one torch.aminmax per output and per output grad, on the blocks",
            lambda m, c: floor_hooks(m, block_names(m))),
    Variant("floor_leaves", "one torch.aminmax per output and per output grad, on every leaf module",
            lambda m, c: floor_hooks(m, leaf_names(m))),
    Variant("naive_blocks", "forward + full-backward hooks keeping outputs and grads, on the blocks",
            lambda m, c: naive_hooks(m, block_names(m))),
    Variant("naive_leaves", "forward + full-backward hooks keeping outputs and grads, on every leaf module",
            lambda m, c: naive_hooks(m, leaf_names(m))),
    Variant("wandb_watch_1", "wandb.watch(log=<--wandb-log>, log_freq=1), offline",
            lambda m, c: wandb_watch(m, c, 1)),
    Variant("wandb_watch_100", "wandb.watch(log=<--wandb-log>, log_freq=100), offline; >= 120 steps per fit, so "
            "one log step falls in the window (compare its mean step)",
            lambda m, c: wandb_watch(m, c, 100), min_steps=120),
    Variant("detect_anomaly", "Trainer(detect_anomaly=True) (torch.autograd.set_detect_anomaly)",
            lambda m, c: Setup(trainer_kwargs={"detect_anomaly": True})),
]
VARIANT_BY_NAME = {v.name: v for v in SHORT_VARIANTS}
MEMORY_TOLERANCE = 0.05


def _short_spec(args: argparse.Namespace, v: Variant, device: str, memory: bool = False) -> FitSpec:
    return FitSpec(arch=args.model, size=args.size, batch=args.batch, steps=max(args.steps, v.min_steps),
                   device=device, precision=args.precision, log_every=50,
                   sample_rss_ms=args.rss_interval_ms if memory else 0.0, seed=args.seed)


def _mem(f: Fit, device: str) -> float:
    v = f.cuda_peak_delta_mb if device == "cuda" else f.rss_peak_delta_mb
    return float(v or 0.0)


def _mem_fits(fits: list[Fit], name: str, device: str) -> list[Fit]:
    """The fits a variant's memory figure comes from: the memory pass on CPU, the timing fits on a GPU."""
    phase = "timing" if device == "cuda" else "memory"
    return [f for f in fits if f.variant == name and f.phase == phase and f.status == "ok"]


def summarize_short(fits: list[Fit], names: list[str], device: str, warmup: int) -> dict[str, dict[str, Any]]:
    """Per variant: medians (warm-up dropped), ratios to the baseline and their per-round range, memory."""
    def steps_of(f: Fit) -> list[float]:
        return f.step_s[warmup:]

    by = {n: [f for f in fits if f.variant == n and f.phase == "timing"] for n in names}
    base_ok = [f for f in by.get("baseline", []) if f.status == "ok"]
    base_rounds = {f.round: _median(steps_of(f)) for f in base_ok if steps_of(f)}
    base_med = _median([t for f in base_ok for t in steps_of(f)])
    base_mean = _median([_mean(f.period_s[warmup:]) for f in base_ok if f.period_s[warmup:]])
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
        steps = [t for f in ok for t in steps_of(f)]
        med = _median(steps)
        entry["median_step_ms"] = _ms(med)
        entry["mean_period_ms"] = _ms(_median([_mean(f.period_s[warmup:]) for f in ok if f.period_s[warmup:]]))
        entry["n_steps"] = len(steps)
        entry["ratio"] = med / base_med if med is not None and base_med else None
        entry["ratio_mean_period"] = (entry["mean_period_ms"] / 1e3 / base_mean
                                      if entry["mean_period_ms"] and base_mean else None)
        per_round = [(_median(steps_of(f)) or 0.0) / base_rounds[f.round] for f in ok
                     if steps_of(f) and base_rounds.get(f.round)]
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


def short_targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for v in SHORT_VARIANTS:
        if v.name not in summary:
            continue
        e = summary[v.name]
        if v.target is not None:
            rows.append(_target(f"short {v.name}: ratio <= {v.target:.2f}x", e.get("ratio"), v.target))
        if v.memory_target:
            rows.append(_target(f"short {v.name}: peak mem <= {1 + MEMORY_TOLERANCE:.2f}x no probe",
                                e.get("peak_mem_vs_baseline"), 1 + MEMORY_TOLERANCE))
    return rows


def short_names(args: argparse.Namespace) -> list[str]:
    if args.variants:
        names = [n.strip() for n in args.variants.split(",") if n.strip()]
        unknown = [n for n in names if n not in VARIANT_BY_NAME]
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANT_BY_NAME)}")
        if "baseline" not in names:
            names.insert(0, "baseline")
        return names
    return [v.name for v in SHORT_VARIANTS if not (args.quick and v.name in QUICK_SKIP)]


def _memory_method(device: str, args: argparse.Namespace) -> str:
    if device == "cuda":
        return ("torch.cuda.max_memory_allocated() - memory_allocated() at fit start (after "
                "reset_peak_memory_stats), in the timing fits")
    if args.memory_rounds <= 0:
        return "not measured (--memory-rounds 0)"
    return (f"peak of (RSS - RSS at fit start), psutil sampled every {args.rss_interval_ms} ms in a thread, in a "
            f"separate memory pass: a fresh subprocess started with {MALLOC_ENV} runs one discarded warm-up fit, "
            f"then {args.memory_rounds} fit(s) per variant; gc.collect() + malloc_trim(0) before each fit")


def memory_pass_subprocess(args: argparse.Namespace, names: list[str], tmp: str) -> list[Fit]:
    """Run the CPU memory pass in a fresh interpreter with fixed glibc thresholds; return its fits."""
    out = os.path.join(tmp, "memory_fits.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--section", "short", "--device", "cpu",
           "--memory-worker", out, "--variants", ",".join(names)]
    for opt in ("model", "size", "batch", "steps", "warmup", "precision", "threads", "seed", "wandb_log",
                "rss_interval_ms", "memory_rounds"):
        cmd += ["--" + opt.replace("_", "-"), str(getattr(args, opt))]
    env = {**os.environ, **MALLOC_ENV}
    proc = subprocess.run(cmd, env=env, check=False)
    if proc.returncode != 0 or not os.path.exists(out):
        _log(f"memory pass failed (exit {proc.returncode}): no memory figures")
        return []
    with open(out) as fh:
        return [Fit(**f) for f in json.load(fh)]


def memory_worker(args: argparse.Namespace, names: list[str], device: str) -> None:
    """The memory pass (``--memory-worker PATH``): a warm-up fit, then the sampled fits, written to PATH."""
    fits: list[Fit] = []
    rng = random.Random(args.seed + 1)
    with tempfile.TemporaryDirectory(prefix="lit_probe_overhead_mem_") as tmp, _quiet():
        ctx = Context(tmp=tmp, device=device, wandb_log=args.wandb_log)
        try:
            # the first fit of a process grows the RSS by one-time allocations (thread pools, kernels): discard
            base = VARIANT_BY_NAME["baseline"]
            run_fit("short", "baseline", -1, _short_spec(args, base, device, True), base.build, ctx, "memory")
            for rnd in range(args.memory_rounds):
                order = list(names)
                rng.shuffle(order)
                for name in order:
                    v = VARIANT_BY_NAME[name]
                    res = run_fit("short", name, rnd, _short_spec(args, v, device, True), v.build, ctx, "memory")
                    fits.append(res)
                    _log(f"[short memory {rnd + 1}/{args.memory_rounds}] {name:26s} {res.status:11s} "
                         f"peak RSS delta {_fmt(res.rss_peak_delta_mb)} MB")
        finally:
            ctx.close()
    with open(args.memory_worker, "w") as fh:
        json.dump([asdict(f) for f in fits], fh)


def section_short(args: argparse.Namespace, ctx: Context) -> dict[str, Any]:
    t0 = time.perf_counter()
    names = short_names(args)
    device = ctx.device
    fits: list[Fit] = []
    dead: set[str] = set()  # variants that crashed or are unavailable: not re-run
    order_rng = random.Random(args.seed)
    for rnd in range(args.rounds):
        order = list(names)
        order_rng.shuffle(order)
        for name in order:
            if name in dead:
                continue
            v = VARIANT_BY_NAME[name]
            res = run_fit("short", name, rnd, _short_spec(args, v, device), v.build, ctx)
            fits.append(res)
            if res.status != "ok" and name != "baseline":
                dead.add(name)
            _log(f"[short round {rnd + 1}/{args.rounds}] {name:26s} {res.status:11s} "
                 f"median {_fmt(_ms(_median(res.step_s[args.warmup:])))} ms ({res.fit_wall_s:.1f} s)")
    if device == "cpu" and args.memory_rounds > 0:
        fits += memory_pass_subprocess(args, [n for n in names if n not in dead], ctx.tmp)
    summary = summarize_short(fits, names, device, args.warmup)
    config = {k: getattr(args, k) for k in ("model", "size", "batch", "rounds", "steps", "warmup", "precision",
                                            "wandb_log", "rss_interval_ms", "memory_rounds")}
    config["variants"] = names
    m = BenchModule(make_net(args.model))
    config["block_probes"] = [BLOCKS_GLOB]
    config["n_blocks"] = len(block_names(m))
    config["n_leaf_modules"] = len(leaf_names(m))
    return {"config": config, "memory_method": _memory_method(device, args), "summary": summary,
            "targets": short_targets(summary), "fits": [asdict(f) for f in fits],
            "wall_s": time.perf_counter() - t0}


def markdown_short(res: dict[str, Any], device: str) -> str:
    c = res["config"]
    mem_col = "peak CUDA mem delta MB" if device == "cuda" else "peak RSS delta MB"
    lines = [(f"**Short interleaved ratios**: {c['model']} {c['size']}x{c['size']} batch {c['batch']}, {c['rounds']} "
              f"rounds x {c['steps']} steps ({c['warmup']} warm-up steps dropped per fit), variants in a seeded random "
              f"order per round; step = on_train_batch_start -> on_train_batch_end (median), mean = start -> next "
              f"start; blocks = `{BLOCKS_GLOB}` ({c['n_blocks']}), {c['n_leaf_modules']} leaves; figures off."),
             "",
             (f"| variant | median step ms | ratio | ratio range | mean step ms | ratio mean | {mem_col} |"),
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, e in res["summary"].items():
        if e.get("median_step_ms") is None:
            err = e.get("error")
            lines.append(f"| {name} | {e.get('status', '?')}{': ' + _md(err) if err else ''} | | | | | |")
            continue
        rng = f"{e['ratio_min']:.2f}-{e['ratio_max']:.2f}" if e.get("ratio_min") is not None else ""
        lines.append(f"| {name} | {e['median_step_ms']:.1f} | {_fmt(e.get('ratio'), 2, 'x')} | {rng} | "
                     f"{_fmt(e.get('mean_period_ms'))} | {_fmt(e.get('ratio_mean_period'), 2, 'x')} | "
                     f"{_fmt(e.get('peak_mem_delta_mb'))} |")
    lines += ["", f"Memory: {res['memory_method']}."]
    return "\n".join(lines)


# ==============================================================================================================
# Command line
# ==============================================================================================================

# the real run; --quick replaces every value it names (an option given explicitly wins over both)
FULL: dict[str, Any] = {
    "size": 64, "batch": 32, "rounds": 5, "steps": 30, "warmup": 3,
    "long_model": "resnet18", "long_size": 64, "long_batch": 32, "long_steps": 1100, "long_rounds": 1,
    "long_variants": "blocks,leaves", "long_log_every": 50, "long_window": 200, "long_rss_every": 50,
    "scaling_steps": 300, "scaling_rounds": 1, "scaling_sizes": "50,200,1000", "scaling_models": "efficientnet_b0",
    "scaling_size": 128, "scaling_batch": 16, "scaling_mlp_batch": 32, "scaling_log_every": 50,
    "kernel_modules": 200, "kernel_batch": 32, "kernel_reps": 15, "kernel_inner": 10,
    "memory_rounds": 1, "long_figure_every": None, "scaling_figure_every": None,  # None: FeatureProbe's default
    "small_size": 32, "small_batch": 16, "small_steps": 1100, "small_cores": 0, "small_mlp_steps": 300,
}
QUICK: dict[str, Any] = {
    "size": 32, "batch": 4, "rounds": 1, "steps": 6, "warmup": 1, "memory_rounds": 1,
    "long_size": 32, "long_batch": 2, "long_steps": 16, "long_rounds": 1, "long_variants": "blocks",
    "long_log_every": 4, "long_window": 8, "long_rss_every": 4, "long_figure_every": 0,
    "scaling_steps": 6, "scaling_sizes": "50", "scaling_models": "", "scaling_figure_every": 0,
    "scaling_log_every": 3, "kernel_modules": 20, "kernel_batch": 8, "kernel_reps": 2, "kernel_inner": 2,
    "small_batch": 2, "small_steps": 8, "small_mlp_steps": 4,
}
QUICK_SKIP = ("wandb_watch_100", "probe_leaves_every_step", "probe_leaves_params_only", "floor_leaves", "naive_blocks", "detect_anomaly",
              "wandb_watch_1")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--section", default="all", help=f"comma-separated: {', '.join(ALL_SECTIONS)}, or all (= "
                   f"{', '.join(SECTIONS)})")
    p.add_argument("--quick", action="store_true", help="smoke run of every section: tiny models and steps")
    p.add_argument("--json", dest="json_path", default=None, help="write every raw number to this file")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["32", "bf16-mixed"], default="32")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("long (defaults: " + ", ".join(f"{k}={FULL[k]}" for k in FULL if k.startswith("long")) + ")")
    g.add_argument("--long-model", default=None, choices=["resnet18", "resnet50"])
    g.add_argument("--long-size", type=int, default=None)
    g.add_argument("--long-batch", type=int, default=None)
    g.add_argument("--long-steps", type=int, default=None, help="steps per fit (>= 1,100 to pass the history)")
    g.add_argument("--long-rounds", type=int, default=None, help="A B A C A, this many times")
    g.add_argument("--long-variants", default=None, help="blocks, leaves")
    g.add_argument("--long-log-every", type=int, default=None, help="Trainer(log_every_n_steps=...)")
    g.add_argument("--long-window", type=int, default=None, help="early / late window in steps")
    g.add_argument("--long-rss-every", type=int, default=None, help="read the RSS every this many steps")
    g.add_argument("--long-figure-every", type=int, default=None,
                   help="figure_every_n_steps (default: FeatureProbe's own default; 0 = off)")
    g = p.add_argument_group("scaling (defaults: " + ", ".join(f"{k}={FULL[k]}" for k in FULL
                                                                 if k.startswith("scaling")) + ")")
    g.add_argument("--scaling-steps", type=int, default=None)
    g.add_argument("--scaling-rounds", type=int, default=None)
    g.add_argument("--scaling-sizes", default=None, help="MLP module counts, comma-separated")
    g.add_argument("--scaling-models", default=None, help="torchvision models, comma-separated ('' for none)")
    g.add_argument("--scaling-size", type=int, default=None)
    g.add_argument("--scaling-batch", type=int, default=None)
    g.add_argument("--scaling-mlp-batch", type=int, default=None)
    g.add_argument("--scaling-log-every", type=int, default=None)
    g.add_argument("--scaling-figure-every", type=int, default=None,
                   help="figure_every_n_steps (default: FeatureProbe's own default; 0 = off)")
    g = p.add_argument_group("small (only when named: --section small; defaults: " + ", ".join(
        f"{k}={FULL[k]}" for k in FULL if k.startswith("small")) + ")")
    g.add_argument("--small-size", type=int, default=None)
    g.add_argument("--small-batch", type=int, default=None)
    g.add_argument("--small-steps", type=int, default=None, help="steps per resnet18 fit")
    g.add_argument("--small-cores", type=int, default=None, help="threads of the every-core run (0: os.cpu_count())")
    g.add_argument("--small-mlp-steps", type=int, default=None, help="steps per mlp50 fit")
    g = p.add_argument_group("kernels (defaults: " + ", ".join(f"{k}={FULL[k]}" for k in FULL
                                                                 if k.startswith("kernel")) + ")")
    g.add_argument("--kernel-modules", type=int, default=None, help="probed modules of the MLP")
    g.add_argument("--kernel-batch", type=int, default=None)
    g.add_argument("--kernel-reps", type=int, default=None, help="interleaved timing blocks per variant")
    g.add_argument("--kernel-inner", type=int, default=None, help="steps per timing block")
    g = p.add_argument_group("short (defaults: size=64, batch=32, rounds=5, steps=30, warmup=3)")
    g.add_argument("--model", choices=["resnet18", "resnet50"], default="resnet18")
    g.add_argument("--size", type=int, default=None, help="input height=width")
    g.add_argument("--batch", type=int, default=None)
    g.add_argument("--rounds", type=int, default=None)
    g.add_argument("--steps", type=int, default=None, help="training steps per fit, warm-up included")
    g.add_argument("--warmup", type=int, default=None, help="steps discarded at the start of each fit")
    g.add_argument("--variants", default=None,
                   help="comma-separated subset (baseline is always added); see --list-variants")
    g.add_argument("--list-variants", action="store_true", help="print the short section's variants and exit")
    g.add_argument("--wandb-log", choices=["gradients", "parameters", "all"], default="all",
                   help="what wandb.watch logs")
    g.add_argument("--rss-interval-ms", type=float, default=2.0, help="RSS sampling period (CPU memory pass)")
    g.add_argument("--memory-rounds", type=int, default=None,
                   help="CPU: fits per variant in the memory pass after the timing rounds (0: none; default 1)")
    g.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    return p


def _csv(s: str) -> list[str]:
    return [x.strip() for x in str(s).split(",") if x.strip()]


def configure(args: argparse.Namespace) -> list[str]:
    """Fill the defaults (``--quick`` or the real run); return the sections to run."""
    for key in list(FULL) + [k for k in QUICK if k not in FULL]:
        if getattr(args, key, None) is None:
            setattr(args, key, QUICK.get(key, FULL.get(key)) if args.quick else FULL.get(key))
    args.long_variants = _csv(args.long_variants)
    args.scaling_sizes = [int(x) for x in _csv(args.scaling_sizes)]
    args.scaling_models = _csv(args.scaling_models)
    if args.warmup >= args.steps:
        raise SystemExit(f"--warmup ({args.warmup}) must be smaller than --steps ({args.steps})")
    sections = list(SECTIONS) if args.section == "all" else _csv(args.section)
    unknown = [s for s in sections if s not in ALL_SECTIONS]
    if unknown:
        raise SystemExit(f"--section: unknown {unknown}; known: {', '.join(ALL_SECTIONS)}, all")
    if "short" in sections:
        short_names(args)  # fail early on an unknown variant
    return sections


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Lightning's per-Trainer banners and the warnings a tiny synthetic run triggers."""
    levels = {}
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "wandb", "lit_probe"):
        lg = logging.getLogger(name)
        levels[name] = lg.level
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        for msg in (".*does not have many workers.*", ".*number of training batches.*", ".*detect_anomaly.*",
                    ".*Anomaly Detection has been enabled.*", ".*LeafSpec.*", "lit_probe: (?!probing `)",
                    ".*log_every_n_steps.*"):
            warnings.filterwarnings("ignore", message=msg)
        try:
            yield
        finally:
            for name, lvl in levels.items():
                logging.getLogger(name).setLevel(lvl)


def machine_info(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
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
        "lightning": f"{pl.__name__} {pl.__version__}",
        "device": device,
        "total_ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }
    with contextlib.suppress(Exception):
        import lit_probe

        info["lit_probe"] = getattr(lit_probe, "__version__", "?")
    with contextlib.suppress(Exception):
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5,
                               check=False)
        if rev.returncode == 0:
            info["git"] = rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = os.getloadavg()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the sections; print their Markdown tables; return (and with ``--json`` write) every number."""
    args = build_parser().parse_args(argv)
    if args.list_variants:
        for v in SHORT_VARIANTS:
            print(f"{v.name:26s} {v.description}")
        return {}
    sections = configure(args)
    device = resolve_device(args.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.memory_worker:
            memory_worker(args, short_names(args), device)
            return {}
        return _run(args, sections, device)
    finally:
        torch.set_num_threads(threads)  # for callers in the same process (tests)


def _run(args: argparse.Namespace, sections: list[str], device: str) -> dict[str, Any]:
    info = machine_info(device)
    t_start = time.perf_counter()
    results: dict[str, Any] = {}
    runners = {"long": section_long, "scaling": section_scaling, "kernels": section_kernels, "short": section_short,
               "small": section_small}
    with tempfile.TemporaryDirectory(prefix="lit_probe_overhead_") as tmp, _quiet():
        ctx = Context(tmp=tmp, device=device, wandb_log=args.wandb_log)
        try:
            for name in ALL_SECTIONS:
                if name in sections:
                    _log(f"== section {name}")
                    try:
                        results[name] = runners[name](args, ctx)
                    except Unavailable as err:
                        results[name] = {"status": "unavailable", "error": str(err), "targets": []}
        finally:
            ctx.close()
    with contextlib.suppress(OSError):
        info["loadavg_at_end"] = os.getloadavg()
    targets = [t for name in ALL_SECTIONS if name in results for t in results[name].get("targets", [])]
    result: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "machine": info,
                              "config": {"sections": sections, "quick": args.quick, "threads": args.threads,
                                         "device": device, "precision": args.precision, "seed": args.seed},
                              "sections": results, "targets": targets,
                              "total_wall_s": time.perf_counter() - t_start}
    print(f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch threads {info['torch_threads']}, "
          f"torch {info['torch']}, {info['lightning']}, lit_probe {info.get('lit_probe')} ({info.get('git', '?')}), "
          f"device {device}" + (f" ({info['gpu']})" if device == "cuda" else "")
          + f"; load average {info.get('loadavg_at_start')} -> {info.get('loadavg_at_end')}"
          + ("; --quick: smoke settings, not measurements" if args.quick else ""))
    printers = {"long": markdown_long, "scaling": markdown_scaling, "kernels": markdown_kernels,
                "short": lambda r: markdown_short(r, device), "small": markdown_small}
    for name in ALL_SECTIONS:
        if name not in results:
            continue
        r = results[name]
        print()
        if r.get("status") == "unavailable":
            print(f"**{name}**: unavailable ({r['error']})")
            continue
        print(printers[name](r))
        print(f"\n({name}: {r.get('wall_s', 0):.0f} s)")
    print("\nTargets:")
    for t in targets:
        print(f"- {t['result']}: {t['target']} ({_fmt(t['value'], 3)})")
    print(f"\nTotal {result['total_wall_s']:.0f} s.")
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
        print(f"Wrote {args.json_path}")
    return result


if __name__ == "__main__":
    main()
