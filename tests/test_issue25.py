"""Issue #25: findings that claim no more than was measured.

Each case trains a real model (a plain PyTorch loop driving :class:`~lit_probe.ProbeRun`) and checks the probe
against a plain-PyTorch oracle: its own hooks, every element, every step.

* An exploding LSTM / GRU (SGD, no clipping): parameter gradients reach 1e19-1e33, finite, before the first
  non-finite element. Their float32 norm overflows to inf; that is an explosion (reported, with the largest
  element), never ``nonfinite`` before the oracle sees a NaN/Inf element.
* A ReLU stream whose units fire on alternate steps only is not dead, whatever ``full_stats_every_n_steps`` is
  (unit activity is measured on every step); a truly dead one is found at the oracle's step with the oracle's
  fraction.
* A module that owns only a zero-initialised bias: its update ratio is about 1 by construction on its first
  steps (``||W_before||`` is the first update); ``lr_too_high`` stays silent under Adam and SGD.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lit_probe import ProbeRun
from lit_probe.diagnose import FLOAT32_NORM_MAX, ZERO_START_STEPS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _run(model, probes, opt, tmp_path, **kw):
    kw.setdefault("figure_every_n_steps", None)
    kw.setdefault("log_to_wandb", False)
    kw.setdefault("log_every_n_steps", 5)
    return ProbeRun(model, probes, optimizers=[opt], save_dir=str(tmp_path / "probe"), **kw)


# ----------------------------------------------------------------------------------- exploding recurrent nets
class Recurrent(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(8, 32, batch_first=True)
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        return self.head(h[:, -1])


class ElementOracle:
    """Plain PyTorch, every element of every step: whether the probed modules' outputs, the gradients of those
    outputs, the weights (before the update) and the parameter gradients are all finite, and per module the
    largest |element| and the float64 norm of its weights and of its parameter gradients."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.model, self.names = model, names
        self.step = -1
        self.stream_bad: dict[int, bool] = {}
        self.param_bad: dict[int, bool] = {}
        self.absmax: dict[int, dict[tuple[str, str], float]] = {}  # (module, "weights"/"grads")
        self.norm: dict[int, dict[tuple[str, str], float]] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._fwd) for n in names]

    def _tensors(self, out):
        return [t for t in (out if isinstance(out, (tuple, list)) else [out])
                for t in (self._tensors(t) if isinstance(t, (tuple, list)) else [t])
                if isinstance(t, torch.Tensor) and t.is_floating_point()]

    def _fwd(self, mod, inp, out):
        for t in self._tensors(out):
            bad = not bool(torch.isfinite(t).all())
            self.stream_bad[self.step] = self.stream_bad.get(self.step, False) or bad
            if t.requires_grad:
                t.register_hook(self._grad)

    def _grad(self, g):
        self.stream_bad[self.step] = self.stream_bad.get(self.step, False) or not bool(torch.isfinite(g).all())

    def before_update(self) -> None:
        bad = False
        amax, norm = self.absmax.setdefault(self.step, {}), self.norm.setdefault(self.step, {})
        for n in self.names:
            ps = [p.detach() for p in self.model.get_submodule(n).parameters(recurse=False)]
            for what, ts in (("weights", ps), ("grads", [p.grad for p in self.model.get_submodule(n).parameters(
                    recurse=False) if p.grad is not None])):
                bad |= any(not bool(torch.isfinite(t).all()) for t in ts)
                amax[n, what] = max(float(t.abs().max()) for t in ts)
                norm[n, what] = math.sqrt(sum(float(t.double().square().sum()) for t in ts))
        self.param_bad[self.step] = bad

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("kind, lr", [("lstm", 3.0), ("gru", 10.0)])
def test_exploding_rnn_is_an_explosion_not_nonfinite_until_an_element_is(tmp_path, kind, lr):
    torch.manual_seed(0)
    model = Recurrent(kind)
    opt = torch.optim.SGD(model.parameters(), lr=lr)  # no clipping
    x, y = torch.randn(16, 20, 8), torch.randn(16, 1) * 10
    names = ["rnn", "head"]
    oracle = ElementOracle(model, names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _run(model, names, opt, tmp_path, full_stats_every_n_steps=1) as run:
            for step in range(16):
                oracle.step = step
                with run.step():
                    opt.zero_grad()
                    nn.functional.mse_loss(model(x), y).backward()
                    oracle.before_update()
                    opt.step()
                if sum(oracle.param_bad.values()) >= 2:  # two steps past the first non-finite element
                    break
    oracle.remove()
    first_param_bad = min(s for s, b in oracle.param_bad.items() if b)
    first_stream_bad = min((s for s, b in oracle.stream_bad.items() if b), default=math.inf)
    # the case the issue measured: finite elements whose float32 norm overflows (a norm beyond 1.8e19), and
    # gradient elements beyond 1e19, before any element is NaN/Inf
    overflow = [s for s in range(first_param_bad) if max(oracle.norm[s].values()) > FLOAT32_NORM_MAX]
    assert overflow, oracle.norm
    assert max(v for (n, what), v in oracle.absmax[first_param_bad - 1].items() if what == "grads") > 1e19
    found = run.findings
    for f in found:
        if f.kind == "nonfinite":
            first = first_param_bad if f.signal == "parameter" else first_stream_bad
            assert f.step >= first, (f, first_param_bad, first_stream_bad)
    param_nf = [f for f in found if f.kind == "nonfinite" and f.signal == "parameter"]
    assert param_nf and param_nf[0].step == first_param_bad  # judged by elements: exact, not early
    # an explosion before the first non-finite element; the overflowed norm is reported as one, at the oracle's
    # first overflowing step, with the oracle's largest element of that module's weights or gradients
    assert any(f.kind == "exploding" and f.step < first_param_bad for f in found)
    par = [f for f in found if f.kind == "exploding" and f.signal == "parameter"]
    assert par, [(f.step, f.layer, f.signal, f.kind) for f in found]
    p = par[0]
    assert p.step == overflow[0] and not oracle.param_bad[p.step]
    what = "weights" if p.stat == "weight_absmax" else "grads"
    assert oracle.norm[p.step][p.layer, what] > FLOAT32_NORM_MAX
    assert p.value == pytest.approx(oracle.absmax[p.step][p.layer, what], rel=1e-6)
    assert "finite" in p.message and "overflow" in p.message


def test_stream_norm_overflow_is_not_nonfinite(tmp_path):
    """The same for an activation stream: elements of 1e25 are finite though their float32 sum of squares is
    inf; ``nonfinite`` is judged by min/max (elements), the stream is exploding."""
    torch.manual_seed(0)

    class Big(nn.Module):
        def forward(self, x):
            return x * 1e25

    model = nn.Sequential(nn.Linear(8, 8), Big(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _run(model, ["0", "1"], opt, tmp_path, signals=("activation",)) as run:
            for _ in range(3):
                with run.step():
                    out = model[1](model[0](torch.randn(4, 8)))
                    assert bool(torch.isfinite(out).all()) and not math.isfinite(float(out.float().norm()))
                    opt.zero_grad()
    kinds = {(f.layer, f.kind) for f in run.findings}
    assert ("1", "exploding") in kinds and not any(k == "nonfinite" for _, k in kinds)


# --------------------------------------------------------------------------------------------------- dead units
class Bottleneck(nn.Module):
    """Linear(16, 16) (identity at init, trained at a tiny learning rate) -> ReLU -> head; the data decide which of
    the 16 ReLU units fire at each step."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(16))
        self.act = nn.ReLU()
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.act(self.fc(x)))


def _train_units(tmp_path, sign_of, steps, every, **kw):
    """Train the bottleneck; ``sign_of(step)`` gives each unit's input sign at that step. Returns the run and the
    oracle's per-step "ever positive" mask of the ReLU's 16 units (its own forward hook, every element)."""
    torch.manual_seed(0)
    model = Bottleneck()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    fired: list[np.ndarray] = []
    h = model.act.register_forward_hook(lambda m, i, o: fired.append((o > 0).any(0).numpy()))
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _run(model, ["act"], opt, tmp_path, full_stats_every_n_steps=every, **kw) as run:
            for step in range(steps):
                x = torch.rand(32, 16, generator=g) + 0.1
                x = x * torch.as_tensor(sign_of(step), dtype=torch.float32)
                with run.step():
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(x), torch.randint(0, 4, (32,), generator=g)).backward()
                    opt.step()
    h.remove()
    return run, np.array(fired)


def _oracle_dead(fired: np.ndarray, step: int, window: int) -> float:
    """Fraction of units never positive on the ``window`` steps ending at ``step``."""
    return float((~fired[step - window + 1:step + 1].any(0)).mean())


@pytest.mark.parametrize("every", [2, 10])
def test_units_firing_on_alternate_steps_are_not_dead(tmp_path, every):
    # every unit fires on odd steps only: the full-statistics steps (multiples of `every`) never see them fire
    run, fired = _train_units(tmp_path, lambda s: np.full(16, 1.0 if s % 2 else -1.0), 60, every)
    assert fired[1::2].all() and not fired[0::2].any()  # the oracle: alternate steps, every unit
    assert _oracle_dead(fired, 59, 20) == 0.0
    assert not [f for f in run.findings if f.kind == "dead"]
    assert run.session.dead_fractions()["act"] == 0.0


@pytest.mark.parametrize("every", [1, 10])
def test_a_truly_dead_stream_is_found_with_the_oracles_fraction(tmp_path, every):
    # units 0-8 fire on steps 0-5 only, then never again; units 9-15 fire on every fourth step (sparse, alive),
    # never on a full-statistics step after the first ten
    def sign_of(step):
        s = np.empty(16)
        s[:9] = 1.0 if step <= 5 else -1.0
        s[9:] = 1.0 if step % 4 == 1 else -1.0
        return s

    W = 20
    run, fired = _train_units(tmp_path, sign_of, 42, every)
    fractions = [_oracle_dead(fired, s, W) for s in range(W - 1, 42)]
    first = W - 1 + next(i for i, v in enumerate(fractions) if v >= 0.5)
    dead = [f for f in run.findings if f.kind == "dead"]
    assert len(dead) == 1 and dead[0].layer == "act"
    assert dead[0].step == first == 25  # units 0-8 last fired at step 5: never positive on steps 6-25
    assert dead[0].value == pytest.approx(_oracle_dead(fired, 29, W))  # the fraction at the read that found it
    assert dead[0].value == pytest.approx(9 / 16)
    assert run.session.dead_fractions()["act"] == pytest.approx(_oracle_dead(fired, 41, W))


# -------------------------------------------------------------------------------- zero-initialised parameters
class ZeroBias(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return x + self.bias


@pytest.mark.parametrize("optimizer, lr", [("adam", 1e-2), ("sgd", 0.5)])
@pytest.mark.parametrize("thresholds", [{}, {"lr_too_high_ratio": 0.5, "update_window": 1}])
def test_a_zero_initialised_bias_is_not_lr_too_high(tmp_path, optimizer, lr, thresholds):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32, bias=False), ZeroBias(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(30, 32, 16, generator=g), torch.randint(0, 4, (30, 32), generator=g)
    ratios = []  # the oracle: ||W_after - W_before|| / ||W_before|| of the bias, every step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _run(model, ["0", "1", "3", "5"], opt, tmp_path, full_stats_every_n_steps=1,
                  thresholds=thresholds) as run:
            for step in range(30):
                with run.step():
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(xs[step]), ys[step]).backward()
                    before = model[1].bias.detach().clone()
                    opt.step()
                    after = model[1].bias.detach()
                    ratios.append(float((after - before).norm() / before.norm()) if before.norm() > 0 else math.nan)
    # the case: on its first steps the ratio is about 1 by construction (its weights are its first update)
    assert ratios[1] > 0.5 and math.isnan(ratios[0])
    limit = thresholds.get("lr_too_high_ratio", 1.0)
    assert all(r < limit for r in ratios[ZERO_START_STEPS:]), ratios  # and later it is not too high at all
    flagged = [f for f in run.findings if f.layer == "1" and f.kind in ("lr_too_high", "not_learning")]
    assert flagged == [], [f.message for f in flagged]
    assert run.session.latest_scalars()["1/update_ratio"] == pytest.approx(ratios[-1], rel=1e-4)
