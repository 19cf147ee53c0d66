"""The probe on a zoo of REAL architectures (torchvision, timm, transformers; random weights), checked against
the plain-PyTorch oracle of ``tests/zoo.py`` computed in the same run.

* healthy: 40 steps, every module probed (``net.**``) -> no finding at all;
* injected bugs (one NaN at a chosen module and step, a dead block, an exploding learning rate, vanishing
  stacks) -> the first finding has the oracle's kind, first call (per-call names: ``net.layer2.0.relu#1``
  is the second call of ``relu`` in a step) and step.

The expected answers are never taken from the probe: each test computes them with the oracle, whose hooks
see the same tensors as the probe's during the same ``Trainer.fit``.

``LIT_PROBE_ZOO_FAST=1 pytest -m zoo tests/test_zoo.py`` runs the ``ZOO_FAST`` subset only.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import zoo
from lit_probe import FeatureProbe
from models import make_trainer, zoo_module

pytestmark = pytest.mark.zoo

FAST = os.environ.get("LIT_PROBE_ZOO_FAST", "") not in ("", "0")
#: the slowest healthy fits (> ~10 s with the probe on one core) run only in the full zoo
SLOW = {"convnext_tiny", "inception_v3", "efficientnet_b0"}
MODELS = list(zoo.ZOO_FAST) if FAST else list(zoo.ZOO)
HEALTHY_STEPS = 40
DEAD_STEPS = 30
DEAD_WINDOW = 20  # README's dead_window


def _backend(i: int) -> str:
    """Alternate between the two Lightning packages, so both are covered."""
    return "lightning" if i % 2 == 0 else "pytorch_lightning"


def _params(names: list[str]) -> list:
    return [pytest.param(n, _backend(i), id=f"{n}-{_backend(i)}",
                         marks=[pytest.mark.slow] if n in SLOW else []) for i, n in enumerate(names)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; a second thread next to a busy process is 26x slower
    yield
    torch.set_num_threads(before)


def _describe(findings: list) -> str:
    return "\n".join(f"  step {f.step} {f.kind} {f.signal} {f.layer} value={f.value:.3g}: {f.message}"
                     for f in findings) or "  (none)"


def _fit(entry: zoo.ZooEntry, backend: str, tmp_path, steps: int, probe: FeatureProbe | None = None,
         prepare=None, oracle: bool = True, units: bool = True, include=None, **oracle_options):
    """A real ``Trainer.fit`` of ``entry`` with the probe and the oracle (hooked on the LightningModule, so its
    names are the probe's: ``net.layer1``). ``prepare(module)`` injects a bug before fit. ``include(path, module)``:
    the modules the oracle hooks (default: every module under ``net``, exactly what ``net.**`` selects);
    ``oracle_options`` go to :class:`zoo.Oracle` (``merge_after``)."""
    module = zoo_module(entry, backend)
    if prepare is not None:
        prepare(module)
    orc = None
    if oracle:
        mods = dict(module.named_modules())
        keep = (lambda p: p.startswith("net.")) if include is None else (lambda p: include(p, mods[p]))
        orc = zoo.Oracle(module, units=units, include=keep, **oracle_options).attach()
        module.step_listeners.append(orc.begin_step)
    trainer = make_trainer(tmp_path, backend, max_steps=steps, callbacks=[probe] if probe is not None else [],
                           limit_val_batches=0, log_every_n_steps=10)
    try:
        trainer.fit(module, zoo.make_loader(entry))
    finally:
        if orc is not None:
            orc.detach()
    return module, orc


def _first_finding(probe: FeatureProbe):
    """The finding the probe reports first: the cause of its first incident where it groups findings into
    incidents (``probe.incidents``, ``Finding.cause``), else the first of ``probe.findings``."""
    incidents = getattr(probe, "incidents", None)
    if incidents:
        inc = incidents[0]
        for f in probe.findings:
            if (f.kind, f.signal, f.step, f.layer) == (inc.kind, inc.signal, inc.step, inc.layer):
                return f
        return inc
    return probe.findings[0] if probe.findings else None


def _record(model: str, bug: str, oracle: str, probe: str) -> None:
    """With LIT_PROBE_ZOO_TABLE=<file>: one JSON line per checked case (the README's zoo table is made from it)."""
    path = os.environ.get("LIT_PROBE_ZOO_TABLE")
    if path:
        import json

        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"model": model, "bug": bug, "oracle": oracle, "probe": probe}) + "\n")


def _probe() -> FeatureProbe:
    return FeatureProbe(probes=["net.**"], figure_every_n_steps=None, log_every_n_steps=10)


# ------------------------------------------------------------------------------------------ the oracle
def test_oracle_names_each_call_and_sees_the_downsample_nan_first():
    """The oracle itself (no lit_probe): BasicBlock's relu gives two call streams per step, and a NaN born in
    ``layer2.0.downsample.1`` is first in forward order although ``layer2.0.relu`` was called before it."""
    entry = zoo.ZOO["resnet18"]
    torch.manual_seed(0)
    net = entry.build()
    clock = zoo.inject_nan(net.get_submodule("layer2.0.downsample.1"), step=1)
    _, orc, losses = zoo.train_plain(entry, steps=2, net=net, params=False, before_step=lambda s, _n: clock(s))
    names = [c.name for c in orc.steps[0].calls]
    assert "layer1.0.relu" in names and "layer1.0.relu#1" in names and "layer1.0.relu#2" not in names
    assert names.index("layer2.0.relu") < names.index("layer2.0.downsample.1") < names.index("layer2.0.relu#1")
    assert orc.first_nonfinite_activation() == (1, "layer2.0.downsample.1")
    bad = [c.name for c in orc.steps[1].calls if c.nonfinite]
    assert bad[:3] == ["layer2.0.downsample.1", "layer2.0.downsample", "layer2.0.relu#1"], bad[:5]
    assert not orc.steps[1].by_name()["layer2.0.relu"].nonfinite
    s, g = orc.first_nonfinite_gradient()
    assert s == 1 and g == "fc"  # d loss / d logits is the first gradient of the backward pass
    assert math.isfinite(losses[0]) and not math.isfinite(losses[1])


# ------------------------------------------------------------------------------------------ healthy
@pytest.mark.parametrize("name,backend", _params(MODELS))
def test_healthy_real_model_has_no_findings(name, backend, tmp_path):
    probe = _probe()
    module, _ = _fit(zoo.ZOO[name], backend, tmp_path, HEALTHY_STEPS, probe, oracle=False)
    assert len(module.losses) == HEALTHY_STEPS and all(math.isfinite(x) for x in module.losses)
    assert probe.findings == [], f"{name}: a healthy run produced findings:\n{_describe(probe.findings)}"
    _record(name, f"healthy, {HEALTHY_STEPS} steps, {len(probe.points)} modules", "-", "no finding")


# ------------------------------------------------------------------------------------------ bugs: NaN


@pytest.mark.parametrize("name,backend", _params([n for n in MODELS if n in zoo.NAN_AT]))
def test_injected_nan_is_found_at_the_oracles_first_call_and_step(name, backend, tmp_path):
    clock = zoo.StepClock()

    def prepare(module):
        zoo.inject_nan(module.net.get_submodule(zoo.NAN_AT[name]), zoo.NAN_STEP, clock)
        module.step_listeners.append(clock)

    probe = _probe()
    _, orc = _fit(zoo.ZOO[name], backend, tmp_path, zoo.NAN_STEP + 3, probe, prepare, units=False)
    want_act = orc.first_nonfinite_activation()
    want_grad = orc.first_nonfinite_gradient()
    # the oracle's own sanity: the injected module's call is the first non-finite output, at that step
    assert want_act == (zoo.NAN_STEP, "net." + zoo.NAN_AT[name]), want_act
    assert want_grad is not None and want_grad[0] == zoo.NAN_STEP
    tied = orc.tied_in_backward(*want_grad)

    first = _first_finding(probe)
    assert first is not None, f"{name}: no finding for a NaN injected at step {zoo.NAN_STEP}"
    assert (first.kind, first.signal, first.layer, first.step) == ("nonfinite", "activation", want_act[1],
                                                                   want_act[0]), _describe(probe.findings)
    grad = [f for f in probe.findings if f.kind == "nonfinite" and f.signal == "gradient"]
    assert grad, _describe(probe.findings)
    assert grad[0].step == want_grad[0] and grad[0].layer in tied, (tied, _describe(probe.findings))
    _record(name, f"NaN in `{zoo.NAN_AT[name]}` at step {zoo.NAN_STEP}", f"`{want_act[1]}` step {want_act[0]}",
            f"nonfinite `{first.layer}` step {first.step}")


# ------------------------------------------------------------------------------------------ bugs: dead


CLEARLY_DEAD, CLEARLY_ALIVE = 0.9, 0.3


def _worst_dead(orc: zoo.Oracle, name: str) -> float:
    """The call's largest never-positive fraction over every full window of the run."""
    last = max(orc.steps)
    fr = [orc.dead_fraction(name, s - DEAD_WINDOW + 1, DEAD_WINDOW) for s in range(DEAD_WINDOW - 1, last + 1)]
    return max((f for f in fr if f == f), default=0.0)


def _check_dead(probe: FeatureProbe, orc: zoo.Oracle, label: str, case: str | None = None) -> None:
    """Dead findings against the oracle, robust to borderline layers: the oracle's first CLEARLY dead ReLU call
    (>= 90% of its units never positive over a 20-step window; window end ``step``) is reported dead, from
    that window, with the oracle's fraction; no dead finding comes earlier unless for a borderline call
    (30-90%); no clearly alive ReLU call (< 30% in every window) is reported dead. The probe measures unit
    activity on fewer steps than the oracle, so borderline calls may go either way."""
    want = orc.first_dead(DEAD_WINDOW, rule=lambda n, f: f >= CLEARLY_DEAD)
    assert want is not None, f"{label}: oracle: no ReLU call is clearly dead"
    step, call, frac = want
    relu = [n for n in orc.names() if orc.types()[n] in zoo.RELU_LIKE_NAMES]
    worst = {n: _worst_dead(orc, n) for n in relu}
    alive = {n for n, w in worst.items() if w < CLEARLY_ALIVE}
    borderline = {n for n, w in worst.items() if CLEARLY_ALIVE <= w < CLEARLY_DEAD}
    dead = [f for f in probe.findings if f.kind == "dead"]
    assert dead, f"{label}: no dead finding; the oracle says {call} is dead at step {step} ({frac:.2f})"
    mine = [f for f in dead if f.layer == call]
    assert mine, (want, _describe(probe.findings))
    f = mine[0]
    assert f.signal == "activation", f
    # any sane rule fires between the first window in which most units were never positive and the first in
    # which (nearly) all were; the step may name the window's start, its end or the step after
    lo = next(s for s in range(DEAD_WINDOW - 1, step + 1)
              if orc.dead_fraction(call, s - DEAD_WINDOW + 1, DEAD_WINDOW) > 0.5)
    assert lo - DEAD_WINDOW + 1 <= f.step <= step + 1, (want, lo, _describe(probe.findings))
    assert 0.5 <= f.value <= 1.0, f
    if frac == 1.0 and step == DEAD_WINDOW - 1:  # dead from the first step on (a killed block)
        assert f.value == 1.0 and f.step in (0, DEAD_WINDOW - 1, DEAD_WINDOW), (want, f)
    before = [g for g in dead[:dead.index(f)] if g.layer not in borderline]
    assert not before, (f"{label}: dead findings before the oracle's first dead call {call}", _describe(before))
    wrong = [g for g in dead if g.layer in alive]
    assert not wrong, (f"{label}: reported dead, but firing in every window per the oracle", _describe(wrong))
    case = case or ("dead block" if label in zoo.KILL_AT else "real dying")
    _record(label, case, f"`{call}` window to step {step}",
            f"dead `{f.layer}` step {f.step} ({f.value:.0%})")


def _check_first_incident_dead(probe: FeatureProbe, orc: zoo.Oracle, label: str) -> None:
    """The run's first incident: the dead ReLU, unless the oracle saw an explosion or NaN first (README's
    exploding rule per call stream), in which case that explosion, at the oracle's call and step."""
    first = _first_finding(probe)
    assert first is not None
    events = []
    for signal in ("activation", "gradient"):
        e = orc.first_exploding(signal)
        if e is not None:
            events.append((e[0], signal, "exploding", e[1]))
    nan = orc.first_nonfinite_activation()
    if nan is not None:
        events.append((nan[0], "activation", "nonfinite", nan[1]))
    nan = orc.first_nonfinite_gradient()
    if nan is not None:
        events.append((nan[0], "gradient", "nonfinite", nan[1]))
    if not events:
        assert first.kind == "dead", (label, _describe(probe.findings))
        return
    step, signal, kind, call = min(events, key=lambda e: (e[0], e[1] != "activation"))
    ok = orc.tied_in_backward(step, call) if signal == "gradient" else [call]
    assert (first.kind, first.signal, first.step) == (kind, signal, step) and first.layer in ok, \
        ((step, signal, kind, ok), _describe(probe.findings))


@pytest.mark.parametrize("name,backend", _params([n for n in MODELS if n in zoo.KILL_AT] or ["resnet18"]))
def test_dead_block_is_found_at_the_oracles_relu_call(name, backend, tmp_path):
    """A BatchNorm bias at -10: the ReLU call right after it never fires. In resnet18 that is the block's FIRST
    ``relu`` call (``net.layer2.0.relu``); its second call (``net.layer2.0.relu#1``, after the residual add)
    fires and must not be reported dead."""
    probe = _probe()
    _, orc = _fit(zoo.ZOO[name], backend, tmp_path, DEAD_STEPS, probe,
                  lambda m: zoo.kill_block(m.net, zoo.KILL_AT[name]))
    want = orc.first_dead(DEAD_WINDOW)
    if name == "resnet18":  # the oracle's own sanity
        assert want == (DEAD_WINDOW - 1, "net.layer2.0.relu", 1.0), want
        assert orc.dead_fraction("net.layer2.0.relu#1", 0, DEAD_WINDOW) < 0.5
    _check_dead(probe, orc, name)
    # mobilenet_v3_small (no residual around features.1): the BatchNorms after the dead block see constant
    # channels and their backward multiplies the gradient by ~1/sqrt(eps) each: an explosion at step 0
    _check_first_incident_dead(probe, orc, name)


def test_real_dying_squeezenet_is_found_at_the_oracles_relu_call(tmp_path):
    """Nothing injected: squeezenet1_1 (dropout 0) with SGD 0.01 collapses (loss -> log 10); its final ReLU,
    over the class maps, stops firing. The oracle says which ReLU call dies first, and when."""
    probe = _probe()
    module, orc = _fit(zoo.BUG_MODELS["squeezenet_dying"], "lightning", tmp_path, 40, probe)
    assert abs(module.losses[-1] - math.log(10)) < 1e-3, module.losses[-5:]  # collapsed: uniform logits
    _check_dead(probe, orc, "squeezenet_dying")
    _check_first_incident_dead(probe, orc, "squeezenet_dying")


# ------------------------------------------------------------------------------------------ bugs: lr
def test_exploding_learning_rate_is_found_first_where_the_oracle_says(tmp_path):
    """resnet18, SGD lr=50: activations explode within a few steps, then NaN. The first finding is the
    oracle's first explosion (README's rule: max |value| > 1e6, or > 1000x the stream's running median after 5
    steps) in forward order; the NaN is reported at the oracle's first non-finite call and step."""
    probe = _probe()
    _, orc = _fit(zoo.BUG_MODELS["resnet18_lr50"], "pytorch_lightning", tmp_path, 12, probe, units=False)
    boom = orc.first_exploding("activation")
    nan = orc.first_nonfinite_activation()
    assert boom is not None and nan is not None and boom[0] < nan[0], (boom, nan)
    first = _first_finding(probe)
    assert first is not None
    assert (first.kind, first.signal, first.layer, first.step) == ("exploding", "activation", boom[1], boom[0]), \
        _describe(probe.findings)
    nonfinite = [f for f in probe.findings if f.kind == "nonfinite" and f.signal == "activation"]
    assert nonfinite and (nonfinite[0].layer, nonfinite[0].step) == (nan[1], nan[0]), (nan, _describe(nonfinite))
    # the gradient goes non-finite one step BEFORE any activation (inside a BatchNorm's backward)
    gnan = orc.first_nonfinite_gradient()
    assert gnan is not None
    tied = orc.tied_in_backward(*gnan)
    gfind = [f for f in probe.findings if f.kind == "nonfinite" and f.signal == "gradient"]
    assert gfind and gfind[0].step == gnan[0] and gfind[0].layer in tied, (gnan, tied, _describe(gfind))
    _record("resnet18", "SGD lr=50", f"explodes `{boom[1]}` step {boom[0]}; NaN `{nan[1]}` step {nan[0]}",
            f"exploding `{first.layer}` step {first.step}; nonfinite `{nonfinite[0].layer}` step "
            f"{nonfinite[0].step}")


# ------------------------------------------------------------------------------------------ bugs: vanishing
@pytest.mark.parametrize("name,backend", [("tanh_mlp30", "lightning"), ("sigmoid15", "pytorch_lightning")])
def test_vanishing_stack_is_found_within_the_oracles_vanished_layers(name, backend, tmp_path):
    """A plain 30-layer tanh MLP / 15-layer sigmoid stack (SGD): by the oracle's definition the gradient
    vanishes toward the input (bottom per-element gradient RMS < 1e-3 x the top's and the bottom Linear's
    update ratio < 1e-5 on every step). The probe must say "vanishing" first, at a layer whose gradient is
    < 1e-3 x the top's, and at nothing healthy."""
    entry = zoo.BUG_MODELS[name]
    steps = 60  # room for a rule with a longer window (>= 50 steps) after a warm-up; ~3 s
    probe = _probe()
    # plain run for the parameter-update half of the oracle (the probe does not see parameters) ...
    _, plain, _ = zoo.train_plain(entry, steps=steps, units=False)
    linear = [n for n in plain.names() if plain.types()[n] == "Linear"]
    truth = zoo.vanishing_oracle(plain.steps, linear[0], linear[-1], 10, steps)
    assert truth["vanishing"], truth
    # ... and the same seeded run under Lightning with the probe and the oracle
    _, orc = _fit(entry, backend, tmp_path, steps, probe, units=False)
    top = "net." + linear[-1]
    vanished = set()
    for n in orc.names():
        r = [orc.steps[s].by_name()[n].grad_rms / orc.steps[s].by_name()[top].grad_rms for s in range(10, steps)
             if n in orc.steps[s].by_name()]
        if r and max(r) < 1e-3:
            vanished.add(n)
    assert "net." + linear[0] in vanished, sorted(vanished)

    first = _first_finding(probe)
    assert first is not None, f"{name}: no finding for a vanishing stack ({truth})"
    assert (first.kind, first.signal) == ("vanishing", "gradient") and first.layer in vanished, \
        (sorted(vanished), _describe(probe.findings))
    wrong = [f for f in probe.findings if f.kind == "vanishing" and f.layer not in vanished]
    assert not wrong, _describe(wrong)
    _record(name, "vanishing stack", f"{len(vanished)} vanished streams, from `net.{linear[0]}`",
            f"vanishing `{first.layer}` step {first.step} (+{len(probe.findings) - 1} more)")
