#!/usr/bin/env python
"""Whole-loop ratios on a GPU (issue 22): resnet50 under bf16 autocast at batch 256 and GPT-2 small, each probed on
its blocks and on every leaf, lit-probe in its default configuration (activations, gradients, parameters, figures
on, hence the flight recorder's per-step device copies and the per-step alarm's pinned copy).

A plain PyTorch loop drives :class:`lit_probe.ProbeRun` (the same core the Lightning callback drives). Per model:
one discarded warm-up fit, then fits in the order A B A C A (A: no probe, B: blocks, C: every leaf), each a fresh
model (same seed) and optimizer; a fit's time is its whole loop (every step, its log steps, the figure step 0),
synchronised at both ends; a probe fit's ratio is its mean step over the mean of the two no-probe fits beside it.
Fit end (``run.close()``: last read, figures still queued, files) is given apart.

Prints one line per figure. Without a CUDA device every figure is skipped, saying why, and a CPU smoke run at a
tiny size checks that the script itself works (not a measurement)::

    python benchmarks/device_ratio.py                 # on a GPU machine: ~3 min on an H100
    python benchmarks/device_ratio.py --models gpt2 --steps 60
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn


def _resnet50(size: int, batch: int, device: str, tiny: bool) -> tuple[nn.Module, Callable[[nn.Module], Any]]:
    import torchvision

    torch.manual_seed(0)
    net = (torchvision.models.resnet18 if tiny else torchvision.models.resnet50)(num_classes=1000).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    return net, lambda m: nn.functional.cross_entropy(m(x), y)


def _gpt2(seq: int, batch: int, device: str, tiny: bool) -> tuple[nn.Module, Callable[[nn.Module], Any]]:
    import logging

    from transformers import GPT2Config, GPT2LMHeadModel

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=seq) if tiny else GPT2Config()
    net = GPT2LMHeadModel(cfg).to(device)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    return net, lambda m: m(input_ids=ids, labels=ids).loss


def _blocks(arch: str) -> list[str]:
    return ["transformer.h.*"] if arch == "gpt2" else ["layer?.*"]


def _leaves(net: nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if n and not list(m.children())]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fit(make: Callable[[], tuple[nn.Module, Callable[[nn.Module], Any]]], probes: list[str] | None, steps: int,
        device: str, bf16: bool, tmp: str) -> dict[str, float]:
    """One fit: ``steps`` steps of a fresh model; the probe in its default configuration when ``probes``."""
    from lit_probe import ProbeRun

    net, loss_of = make()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    run = None
    if probes is not None:
        run = ProbeRun(net, probes, optimizers=[opt], save_dir=tempfile.mkdtemp(dir=tmp), log_to_wandb=False,
                       log_every_n_steps=50)
        run.open()
    cast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    _sync(device)
    t0 = time.perf_counter()
    for step in range(steps):
        if run is not None:
            run.begin_step(step)
        with cast:
            loss = loss_of(net)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if run is not None:
            run.end_step()
    _sync(device)
    loop = time.perf_counter() - t0
    end = 0.0
    if run is not None:
        t1 = time.perf_counter()
        run.close()
        end = time.perf_counter() - t1
        findings = len(run.findings)
    else:
        findings = 0
    del net, opt, run
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"mean_step_ms": loop / steps * 1e3, "fit_end_s": end, "findings": findings}


def measure(arch: str, device: str, steps: int, tiny: bool, tmp: str) -> list[str]:
    """A B A C A for one model; one line per probe variant."""
    if arch == "resnet50":
        size, batch = (32, 4) if tiny else (224, 256)

        def make() -> tuple[nn.Module, Callable[[nn.Module], Any]]:
            return _resnet50(size, batch, device, tiny)

        what = f"resnet50 bf16-mixed batch {batch} {size}x{size}" if not tiny else f"resnet18 (smoke) batch {batch}"
    else:
        seq, batch = (32, 2) if tiny else (1024, 8)

        def make() -> tuple[nn.Module, Callable[[nn.Module], Any]]:
            return _gpt2(seq, batch, device, tiny)

        what = f"gpt2-small bf16-mixed batch {batch} x {seq} tokens" if not tiny else f"gpt2 (smoke) batch {batch}"
    net, _ = make()
    variants = [("blocks", _blocks(arch)), ("leaves", _leaves(net))]
    from lit_probe.selection import resolve

    n_modules = {name: len(resolve(net, probes)) for name, probes in variants}
    del net
    fit(make, None, max(2, steps // 5), device, True, tmp)  # warm-up: kernels, allocator, cudnn autotuning
    a = [fit(make, None, steps, device, True, tmp)]
    rows = []
    for name, probes in variants:
        p = fit(make, probes, steps, device, True, tmp)
        a.append(fit(make, None, steps, device, True, tmp))
        base = statistics.mean([a[-2]["mean_step_ms"], a[-1]["mean_step_ms"]])
        rows.append(f"{what}, {name} ({n_modules[name]} modules), {steps} steps: whole-loop ratio "
                    f"{p['mean_step_ms'] / base:.3f}x (mean step {p['mean_step_ms']:.1f} ms, no probe {base:.1f} ms); "
                    f"fit end {p['fit_end_s']:.1f} s; findings {p['findings']}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet50,gpt2")
    ap.add_argument("--steps", type=int, default=120, help="steps per fit (5 fits and a short warm-up per model)")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if any(m not in ("resnet50", "gpt2") for m in models):
        raise SystemExit(f"--models: resnet50, gpt2 (got {models})")
    warnings.filterwarnings("ignore")
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="lit_probe_device_") as tmp:
        if cuda:
            print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
            for arch in models:
                t0 = time.perf_counter()
                for line in measure(arch, "cuda", args.steps, False, tmp):
                    print(line, flush=True)
                print(f"({arch}: {time.perf_counter() - t0:.0f} s)", flush=True)
            return 0
        for arch in models:
            what = "resnet50 bf16-mixed batch 256" if arch == "resnet50" else "gpt2-small bf16-mixed"
            for name in ("blocks", "leaves"):
                print(f"{what}, {name}: skipped: no CUDA device (torch.cuda.is_available() is False); GPU figures "
                      "unmeasured")
        print("CPU smoke run of this script at a tiny size (checks that it runs; not a measurement):")
        for arch in models:
            for line in measure(arch, "cpu", 4, True, tmp):
                print("  smoke: " + line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
