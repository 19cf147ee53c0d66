"""The verdict does not depend on the probe list (issue 21).

Healthy real models (torchvision ResNet-18 and MobileNet-V3, Hugging Face BERT and GPT-2 from small configs, random
weights) are silent under every probe list a user starts with: every module, one layer type, the blocks, one layer
alone. The vanishing stacks of ``tests/zoo.py`` (a 30-layer tanh MLP, a 15-layer sigmoid stack) are still found
under those lists, first, and only at streams the plain-PyTorch oracle says vanished (per-element gradient RMS
below 1e-3 of the top Linear's on every step from step 10). Real ``Trainer.fit`` throughout.

Before the fix, BERT with ``["type:Linear"]`` reported ``vanishing`` on layer 0's attention key and query at step
4: with Linear layers alone, nothing normal was probed below them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import zoo
from lit_probe import FeatureProbe
from lit_probe.diagnose import Diagnosis, Streams, Thresholds, find_vanishing
from lit_probe.history import STATS, Derived
from models import make_trainer, zoo_module

HEALTHY_STEPS = 30
VANISHING_STEPS = 60


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _describe(findings: list) -> str:
    return "\n".join(f"  step {f.step} {f.kind} {f.signal} {f.layer} value={f.value:.3g}: {f.message}"
                     for f in findings) or "  (none)"


def _fit(entry: zoo.ZooEntry, tmp_path, steps: int, probes: list[str], oracle: bool = False):
    module = zoo_module(entry, "lightning")
    probe = FeatureProbe(probes=probes, figure_every_n_steps=None, log_every_n_steps=10)
    orc = None
    if oracle:
        orc = zoo.Oracle(module, units=False, include=lambda path: path.startswith("net.")).attach()
        module.step_listeners.append(orc.begin_step)
    trainer = make_trainer(tmp_path, "lightning", max_steps=steps, callbacks=[probe], limit_val_batches=0,
                           log_every_n_steps=10)
    try:
        trainer.fit(module, zoo.make_loader(entry))
    finally:
        if orc is not None:
            orc.detach()
    return module, probe, orc


HEALTHY = [
    ("hf_bert", ["net.**"]),
    ("hf_bert", ["type:Linear"]),  # the case of the issue: vanishing on layer 0's key and query at step 4
    ("hf_bert", ["net.bert.encoder.layer.*"]),
    ("hf_bert", ["net.bert.encoder.layer.0.attention.self.key"]),
    ("hf_bert", ["net.bert.encoder.layer.0.attention.self.query", "net.bert.encoder.layer.0.attention.self.key",
                 "net.bert.encoder.layer.0.attention.self.value"]),
    ("hf_gpt2", ["net.**"]),
    ("hf_gpt2", ["type:Conv1D"]),
    ("hf_gpt2", ["net.transformer.h.*"]),
    ("hf_gpt2", ["net.transformer.h.0.attn.c_attn"]),
    ("mobilenet_v3_small", ["type:Conv2d"]),
    ("mobilenet_v3_small", ["net.features.*"]),
    ("mobilenet_v3_small", ["net.features.1.block.1.fc1"]),  # a squeeze-excitation conv alone
    ("resnet18", ["type:Conv2d"]),
    ("resnet18", ["net.layer1.0.conv1"]),
]


@pytest.mark.zoo  # real models under several probe lists: the zoo step of CI
@pytest.mark.parametrize("name,probes", HEALTHY, ids=[f"{n}-{'+'.join(p)}" for n, p in HEALTHY])
def test_healthy_model_is_silent_under_any_probe_list(name, probes, tmp_path):
    module, probe, _ = _fit(zoo.ZOO[name], tmp_path, HEALTHY_STEPS, probes)
    assert len(module.losses) == HEALTHY_STEPS and all(math.isfinite(x) for x in module.losses)
    assert probe.points, probes
    assert probe.findings == [], f"{name} {probes}: a healthy run produced findings:\n{_describe(probe.findings)}"


def _vanished(orc: zoo.Oracle, top: str, start: int, stop: int) -> set[str]:
    """Streams whose per-element gradient RMS stays below 1e-3 x the top Linear's on every step (the oracle)."""
    out = set()
    for n in orc.names():
        r = [orc.steps[s].by_name()[n].grad_rms / orc.steps[s].by_name()[top].grad_rms for s in range(start, stop)
             if n in orc.steps[s].by_name()]
        if r and max(r) < 1e-3:
            out.add(n)
    return out


VANISHING = [
    ("tanh_mlp30", ["net.**"]),
    ("tanh_mlp30", ["type:Linear"]),
    ("tanh_mlp30", ["type:Tanh"]),  # no parameters probed: the stream envelope, floored by the input end
    ("tanh_mlp30", ["net.0"]),  # one layer alone: its parameter gradient against the whole model's
    ("tanh_mlp30", ["net.0", "net.1", "net.2", "net.3"]),  # the first layers only: no top of their own
    ("sigmoid15", ["type:Linear"]),
    ("sigmoid15", ["type:Sigmoid"]),
    ("sigmoid15", ["net.2"]),
]


@pytest.mark.zoo  # real models under several probe lists: the zoo step of CI
@pytest.mark.parametrize("name,probes", VANISHING, ids=[f"{n}-{'+'.join(p)}" for n, p in VANISHING])
def test_vanishing_stack_is_found_under_any_probe_list(name, probes, tmp_path):
    entry = zoo.BUG_MODELS[name]
    _, plain, _ = zoo.train_plain(entry, steps=VANISHING_STEPS, units=False)
    linear = [n for n in plain.names() if plain.types()[n] == "Linear"]
    truth = zoo.vanishing_oracle(plain.steps, linear[0], linear[-1], 10, VANISHING_STEPS)
    assert truth["vanishing"], truth
    _, probe, orc = _fit(entry, tmp_path, VANISHING_STEPS, probes, oracle=True)
    vanished = _vanished(orc, "net." + linear[-1], 10, VANISHING_STEPS)
    assert "net." + linear[0] in vanished, sorted(vanished)
    assert probe.incidents, f"{name} {probes}: no finding for a vanishing stack ({truth})"
    inc = probe.incidents[0]
    assert (inc.kind, inc.signal) == ("vanishing", "gradient") and inc.layer in vanished, \
        (sorted(vanished), _describe(probe.findings))
    wrong = [f for f in probe.findings if f.kind == "vanishing" and f.layer not in vanished]
    assert not wrong, _describe(wrong)
    probed = [p for p in probe.points if p in vanished]
    found = {f.layer for f in probe.findings if f.kind == "vanishing"}
    assert found & set(probed), (probed, _describe(probe.findings))


# ------------------------------------------------------------------------------------------ the rule itself
def _derived(l2: list[float], steps: int, params: list[float] | None = None) -> Derived:
    """``steps`` rows of gradient streams with these L2 norms (backward order: as listed) and, optionally, one
    probed module per stream with these parameter-gradient norms."""
    n = len(l2)
    values = np.full((steps, n, len(STATS)), np.nan)
    values[:, :, STATS.index("l2")] = l2
    values[:, :, STATS.index("calls")] = 1
    values[:, :, STATS.index("skipped")] = 0
    p = None
    if params is not None:
        p = np.full((steps, n, 5), np.nan)
        p[:, :, 1] = params
    return Derived(np.arange(steps), values, [list(range(n))] * steps, p)


def test_a_small_branch_at_the_bottom_is_vanishing_only_when_the_input_end_is_small():
    """q/k-like streams last in backward order, nothing normal probed below them: the stream envelope alone says
    vanishing; a normal input-end reference (0.2 of the model's largest parameter gradient) says no; a tiny one
    (1e-7) says yes."""
    streams = Streams(["head", "mid", "k", "q"], ["gradient"] * 4, [False] * 4)
    t = Thresholds()
    d = _derived([1.0, 0.5, 1e-6, 1e-6], 8)

    def run(reference):
        st, out = Diagnosis(), []
        for i in range(len(d)):
            st, f = find_vanishing(st, d, i, streams, t, None, reference)
            out += f
        return out

    assert {f.layer for f in run(None)} == {"k", "q"}  # the old rule: the probe list decides
    assert run({s: (0.2, 1.0) for s in range(8)}) == []
    tiny = run({s: (1e-7, 1.0) for s in range(8)})
    assert {f.layer for f in tiny} == {"k", "q"}
    assert tiny[0].extra["input_end_ratio"] == pytest.approx(1e-7)


def test_one_probed_layer_is_judged_by_its_parameter_gradient():
    """A single probed stream has no stream envelope; its module's parameter gradient against the model's largest
    is the measure: tiny with a tiny input end -> vanishing; normal (the top layer of the same stack) -> not."""
    from lit_probe.diagnose import ParamModules

    streams = Streams(["layer"], ["gradient"], [False])
    pm = ParamModules(["layer"], np.zeros(1, np.int64), np.full(1, 0.01))
    t = Thresholds()
    ref = {s: (1e-9, 1.0) for s in range(8)}
    for own, expect in ((1e-8, True), (0.5, False)):
        d = _derived([1e-3], 8, [own])
        st, out = Diagnosis(), []
        for i in range(len(d)):
            st, f = find_vanishing(st, d, i, streams, t, pm, ref)
            out += f
        assert bool(out) is expect, (own, out)
