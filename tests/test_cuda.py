"""The CUDA paths (issue 22): no host sync on the steps that do not log, the first layer and step of a NaN exact on
the device, and no device memory growth over 500 steps.

Marked ``cuda`` and skipped without a device (``benchmarks/device_check.sh`` runs them on a GPU machine). Each runs a
plain PyTorch loop driving :class:`~lit_probe.ProbeRun` in the default configuration (activations, gradients,
parameters, figures on and with them the flight recorder's per-step device copies and the per-step alarm's pinned
non-blocking copy), in float32 and under bf16 autocast. Untimed.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch import nn

from lit_probe import ProbeRun

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() "
                                                                          "is False)")]

LOG_EVERY = 10


class NaNAt(nn.Module):
    """A Linear whose output is NaN in one sample at step ``k`` (``step`` set by the loop)."""

    def __init__(self, width: int, k: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.k, self.step = k, -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if self.step == self.k:
            y = y.clone()
            y[0, 0] = float("nan")
        return y


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                         nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10)).cuda()


def _autocast(bf16: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _train(run: ProbeRun, model: nn.Module, opt: torch.optim.Optimizer, steps: range, bf16: bool,
           check: bool = False, before=None) -> None:
    x = torch.randn(16, 3, 16, 16, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    for step in steps:
        if before is not None:
            before(step)
        # the steps that neither log nor draw: any host sync made there raises
        quiet = check and (step + 1) % LOG_EVERY != 0
        if quiet:
            torch.cuda.set_sync_debug_mode("error")
        try:
            run.begin_step(step)
            with _autocast(bf16):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            run.end_step()
        finally:
            torch.cuda.set_sync_debug_mode(0)


def _cnn_run(tmp_path, **options):
    """The CNN, its optimizer, and a ProbeRun on every module of it (not open yet)."""
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    probes = [n for n, m in model.named_modules() if n]
    return model, opt, ProbeRun(model, probes, optimizers=[opt], save_dir=str(tmp_path / "probe"),
                                log_to_wandb=False, **options)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_no_host_sync_on_steps_that_do_not_log(tmp_path, bf16):
    model, opt, run = _cnn_run(tmp_path, log_every_n_steps=LOG_EVERY, full_stats_every_n_steps=5,
                               figure_every_n_steps=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with run:
            _train(run, model, opt, range(0, 11), bf16)  # step 0 draws; warm-up: full statistics, caches made
            _train(run, model, opt, range(11, 40), bf16, check=True)  # sentinel and full steps, no figure step
    assert run.findings == [], [f.message for f in run.findings]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_a_nan_is_found_at_its_first_layer_and_step_on_cuda(tmp_path, bf16):
    k = 23  # past the warm-up, not a full-statistics step, not a log step: the per-step sentinel's case
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.ReLU(), NaNAt(32, k), nn.ReLU(),
                          nn.Linear(32, 10)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def before(step: int) -> None:
        model[3].step = step

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ProbeRun(model, ["1", "2", "3", "4", "5"], optimizers=[opt], save_dir=str(tmp_path / "probe"),
                      log_to_wandb=False, log_every_n_steps=LOG_EVERY) as run:
            _train(run, model, opt, range(0, 32), bf16, before=before)
    nonfinite = [f for f in run.findings if f.kind == "nonfinite" and f.signal != "parameter"]
    assert nonfinite, [f.message for f in run.findings]
    first = min(nonfinite, key=lambda f: (f.step, f.signal != "activation"))
    assert (first.layer, first.step, first.signal) == ("3", k, "activation")
    cause = [f for f in run.findings if f.cause][0]
    assert (cause.layer, cause.step, cause.kind) == ("3", k, "nonfinite")


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_no_device_memory_growth_over_500_steps(tmp_path, bf16):
    model, opt, run = _cnn_run(tmp_path, log_every_n_steps=50, figure_every_n_steps=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with run:
            _train(run, model, opt, range(0, 60), bf16)
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            _train(run, model, opt, range(60, 560), bf16)
            torch.cuda.synchronize()
            end = torch.cuda.memory_allocated()
    assert end - start <= 256 * 1024, f"device memory grew by {(end - start) / 1024:.0f} KiB over 500 steps"
    assert torch.cuda.memory_allocated() <= start  # what the probe held on the device is freed at close
