"""The probe on more model families (issue 21, ``tests/zoo_families.py``): recurrent nets (LSTM, GRU, an
``LSTMCell`` loop called once per time step, an exploding vanilla RNN), a segmentation U-Net with skip
concatenations, a diffusion UNet (``diffusers``), Llama, Mamba (slow path) and a GCN, each checked against the
plain-PyTorch oracle of ``tests/zoo.py`` computed in the same ``Trainer.fit``:

* healthy: every family silent under several probe lists (``net.**``, ``type:Linear`` / ``type:Conv2d``, the
  blocks); with ``net.**`` the oracle confirms nothing was non-finite, exploding or dead;
* a NaN injected into one call at step 5: the first finding is that call's stream at that step, the
  gradient's NaN at the oracle's first stream in backward order;
* a real bug of the family: the first incident's cause is the oracle's first event (kind, signal, stream,
  step).

A module called more than 4 times in a step (a cell per time step) has 4 streams (README: "later calls merge
into ``#3``"); the oracle here merges the same calls (``zoo.Oracle(merge_after=4)``), so both name ``cell#3``.
"""

from __future__ import annotations

import math
import os
import re

import pytest
import zoo
import zoo_families as zf
from test_zoo import DEAD_WINDOW, _check_dead, _check_first_incident_dead, _describe, _first_finding, _record
from test_zoo import _fit as zoo_fit
from torch import nn

from lit_probe import FeatureProbe

pytestmark = [pytest.mark.zoo, pytest.mark.usefixtures("one_torch_thread")]

HEALTHY_STEPS = 30  # > dead_window + 1 (21 measured steps) and 6 vanishing windows of 5
MERGE_AFTER = 4  # README: "up to 4 calls (later calls merge into #3)"


def _probe(probes: list[str]) -> FeatureProbe:
    """Figures off (no test here looks at them): only the diagnosis runs."""
    return FeatureProbe(probes=probes, figure_every_n_steps=None, log_every_n_steps=10)


def _fit(entry: zoo.ZooEntry, backend: str, tmp_path, steps: int, probe: FeatureProbe, prepare=None,
         oracle: bool = True, units: bool = True, include=None):
    """:func:`test_zoo._fit` with calls merged after :data:`MERGE_AFTER`, as the probe merges them.
    ``include(path, module)``: the modules the oracle hooks, written here for the probe list (default: every
    module under ``net``, what ``net.**`` selects)."""
    return zoo_fit(entry, backend, tmp_path, steps, probe, prepare=prepare, oracle=oracle, units=units,
                   include=include, merge_after=MERGE_AFTER)


def _stream(path: str, call: int) -> str:
    call = min(call, MERGE_AFTER - 1)
    return path if call == 0 else f"{path}#{call}"


def _oracle_first_event(orc: zoo.Oracle):
    """The oracle's first event: (step, signal, kind, names that count as that stream). Explosions by README's
    rule (per stream), non-finite values; at one step activations (forward) come before gradients."""
    events = []
    for signal in ("activation", "gradient"):
        e = orc.first_exploding(signal)
        if e is not None:
            events.append((e[0], signal, "exploding", e[1]))
    a, g = orc.first_nonfinite_activation(), orc.first_nonfinite_gradient()
    if a is not None:
        events.append((a[0], "activation", "nonfinite", a[1]))
    if g is not None:
        events.append((g[0], "gradient", "nonfinite", g[1]))
    if not events:
        return None
    step, signal, kind, call = min(events, key=lambda e: (e[0], e[1] != "activation"))
    return step, signal, kind, (orc.tied_in_backward(step, call) if signal == "gradient" else [call])


def _backend(i: int) -> str:
    return "lightning" if i % 2 == 0 else "pytorch_lightning"


#: ``LIT_PROBE_ZOO_FAST=1``: each family's first probe list only (``net.**``)
FAST = os.environ.get("LIT_PROBE_ZOO_FAST", "") not in ("", "0")
HEALTHY = [pytest.param(name, probes, _backend(i + j), id=f"{name}-{'+'.join(probes)}")
           for i, name in enumerate(zf.FAMILIES) for j, probes in enumerate(zf.PROBE_LISTS[name][:1 if FAST else None])]

#: healthy runs the probe gets wrong because of a diagnosis rule being changed in lit_probe (issue 21, first
#: part): (family, probe list) -> reason. Strict: the fix turns them into failures to remove from here.
KNOWN_PROBE_LIST_DEPENDENT: dict[tuple[str, str], str] = {}


# ------------------------------------------------------------------------------------------ healthy
@pytest.mark.parametrize("name,probes,backend", HEALTHY)
def test_healthy_family_is_silent_under_each_probe_list(name, probes, backend, tmp_path, request):
    reason = KNOWN_PROBE_LIST_DEPENDENT.get((name, "+".join(probes)))
    if reason:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    entry = zf.FAMILIES[name]
    probe = _probe(probes)
    everything = probes == ["net.**"]
    module, orc = _fit(entry, backend, tmp_path, HEALTHY_STEPS, probe, oracle=everything)
    assert len(module.losses) == HEALTHY_STEPS and all(math.isfinite(x) for x in module.losses)
    assert module.losses[-1] < module.losses[0] + 0.5, module.losses  # it trains (random labels: barely)
    assert probe.points, f"{name}: {probes} selected nothing"
    if orc is not None:  # the oracle's side: nothing non-finite, no explosion, no dead ReLU call
        assert _oracle_first_event(orc) is None, _oracle_first_event(orc)
        assert orc.first_dead(DEAD_WINDOW) is None, orc.first_dead(DEAD_WINDOW)
    assert probe.findings == [], f"{name} {probes}: a healthy run produced findings:\n{_describe(probe.findings)}"
    _record(name, f"healthy, {HEALTHY_STEPS} steps, `{', '.join(probes)}` ({len(probe.points)} modules)", "-",
            "no finding")


# ------------------------------------------------------------------------------------------ NaN
@pytest.mark.parametrize("name", list(zf.NAN_AT))
def test_injected_nan_in_a_family_is_found_at_the_oracles_stream_and_step(name, tmp_path):
    path, call = zf.NAN_AT[name]
    clock = zoo.StepClock()

    def prepare(module):
        zf.inject_nan_at_call(module.net.get_submodule(path), zf.NAN_STEP, call, clock)
        module.step_listeners.append(clock)

    probe = _probe(["net.**"])
    backend = _backend(list(zf.NAN_AT).index(name))
    _, orc = _fit(zf.FAMILIES[name], backend, tmp_path, zf.NAN_STEP + 3, probe, prepare, units=False)
    want_act = orc.first_nonfinite_activation()
    want_grad = orc.first_nonfinite_gradient()
    # the oracle's own sanity: the injected call is the first non-finite output, at that step
    assert want_act == (zf.NAN_STEP, "net." + _stream(path, call)), want_act
    assert want_grad is not None and want_grad[0] == zf.NAN_STEP, want_grad
    tied = orc.tied_in_backward(*want_grad)
    first = _first_finding(probe)
    assert first is not None, f"{name}: no finding for a NaN injected at step {zf.NAN_STEP}"
    assert (first.kind, first.signal, first.layer, first.step) == ("nonfinite", "activation", want_act[1],
                                                                   want_act[0]), _describe(probe.findings)
    grad = [f for f in probe.findings if f.kind == "nonfinite" and f.signal == "gradient"]
    assert grad and grad[0].step == want_grad[0] and grad[0].layer in tied, (tied, _describe(probe.findings))
    where = path if call == 0 else f"{path}` call {call}"
    _record(name, f"NaN in `{where.rstrip('`')}{'`' if call == 0 else ''} at step {zf.NAN_STEP}",
            f"`{want_act[1]}` step {want_act[0]}", f"nonfinite `{first.layer}` step {first.step}")


# ------------------------------------------------------------------------------------------ real bugs
def _check_first_incident(probe: FeatureProbe, orc: zoo.Oracle, label: str, case: str, nan: bool = False) -> None:
    """The probe's first finding (its first incident's cause) is the oracle's first event; with ``nan`` the
    probe's first non-finite activation is also the oracle's (a divergence: explosion, then NaN)."""
    want = _oracle_first_event(orc)
    assert want is not None, f"{label}: the oracle saw nothing go wrong"
    step, signal, kind, ok = want
    first = _first_finding(probe)
    assert first is not None, f"{label}: no finding; the oracle: {kind} {signal} {ok[0]} step {step}"
    assert (first.kind, first.signal, first.step) == (kind, signal, step) and first.layer in ok, \
        (want, _describe(probe.findings))
    said, seen = f"{kind} {signal} `{ok[0]}` step {step}", (f"{first.kind} {first.signal} `{first.layer}` step "
                                                            f"{first.step} (first incident's cause)")
    if nan:
        a = orc.first_nonfinite_activation()
        got = [f for f in probe.findings if f.kind == "nonfinite" and f.signal == "activation"]
        assert a is not None and got and (got[0].layer, got[0].step) == (a[1], a[0]), (a, _describe(got))
        said += f"; then NaN `{a[1]}` step {a[0]}"
        seen += f"; nonfinite `{got[0].layer}` step {got[0].step}"
    _record(label, case, said, seen)


#: probe lists for the bug runs, with what each selects written out for the oracle (not asked of the probe)
EVERY = (["net.**"], None)
ONLY_CELL = (["type:RNNCell"], lambda p, m: isinstance(m, nn.RNNCell))
ONLY_LINEAR = (["type:Linear"], lambda p, m: isinstance(m, nn.Linear))
LLAMA_BLOCKS = (["net.model.layers.*"], lambda p, m: re.fullmatch(r"net\.model\.layers\.\d+", p) is not None)
UNET_RELUS = (["type:ReLU"], lambda p, m: isinstance(m, nn.ReLU))


def _ids(cases):
    return ["+".join(c[0]) for c in cases]


@pytest.mark.parametrize("probes,include", [EVERY, ONLY_CELL], ids=_ids([EVERY, ONLY_CELL]))
def test_exploding_vanilla_rnn_is_found_first_where_the_oracle_says(probes, include, tmp_path):
    """A ReLU ``RNNCell`` loop over 24 steps with W_hh = 1.05 I (SGD 0.01): it trains for a while, then the
    gradient through time blows up (backward order: the late time steps' calls first), then the activations,
    then NaN. The first incident's cause is the oracle's first event."""
    entry = zf.FAMILY_BUGS["rnn_exploding"]
    probe = _probe(probes)
    module, orc = _fit(entry, "lightning", tmp_path, 20, probe, units=False, include=include)
    assert not math.isfinite(module.losses[-1]), module.losses  # the oracle's ground truth: it really diverges
    want = _oracle_first_event(orc)
    assert want is not None and want[2] == "exploding", want
    _check_first_incident(probe, orc, "rnn_exploding", f"vanilla ReLU RNN, W_hh = 1.05 I, SGD 0.01; `{probes[0]}`",
                          nan=True)


@pytest.mark.parametrize("probes,include", [EVERY, UNET_RELUS], ids=_ids([EVERY, UNET_RELUS]))
def test_dead_unet_decoder_block_is_found_at_the_oracles_relu_call(probes, include, tmp_path):
    """The U-Net's first decoder BatchNorm (``dec2.1``) with bias -10: its ReLU ``dec2.2`` never fires; the skip
    concatenation above (``dec1`` sees ``up1(dec2)`` and ``enc1``) keeps the rest training."""
    entry = zf.FAMILIES["unet_seg"]
    probe = _probe(probes)
    _, orc = _fit(entry, "pytorch_lightning", tmp_path, DEAD_WINDOW + 10, probe,
                  lambda m: zoo.kill_block(m.net, zf.KILL_AT["unet_seg"]), include=include)
    assert orc.first_dead(DEAD_WINDOW) == (DEAD_WINDOW - 1, "net.dec2.2", 1.0), orc.first_dead(DEAD_WINDOW)
    _check_dead(probe, orc, "unet_seg", case=f"dead decoder block (`dec2.1` bias -10); `{probes[0]}`")
    _check_first_incident_dead(probe, orc, "unet_seg")


def test_dead_unet_decoder_block_with_the_blocks_probed_names_the_block_and_the_starved_blocks(tmp_path):
    """The same dead decoder block with only the blocks probed (``Sequential`` containers ending in a ReLU, so
    their output is a ReLU's): ``dec2`` is dead (the oracle: none of its units positive over the window), and
    the streams it starves of gradient are exactly the probed blocks whose d loss / d output the oracle saw as
    exactly zero (``enc2`` and ``bottleneck`` feed ``dec2`` only; ``enc1`` also feeds ``dec1`` by its skip)."""
    probes = ["net.enc?", "net.bottleneck", "net.dec?"]
    probe = _probe(probes)
    _, orc = _fit(zf.FAMILIES["unet_seg"], "lightning", tmp_path, DEAD_WINDOW + 10, probe,
                  lambda m: zoo.kill_block(m.net, zf.KILL_AT["unet_seg"]),
                  include=lambda p, m: re.fullmatch(r"net\.(enc\d|bottleneck|dec\d)", p) is not None)
    last = max(orc.steps)
    dead = {n: orc.dead_fraction(n, last - DEAD_WINDOW + 1, DEAD_WINDOW) for n in orc.names()}
    assert dead == {"net.enc1": 0.0, "net.enc2": 0.0, "net.bottleneck": 0.0, "net.dec2": 1.0, "net.dec1": 0.0}, dead
    assert _oracle_first_event(orc) is None
    first = _first_finding(probe)
    assert first is not None and (first.kind, first.layer, first.value) == ("dead", "net.dec2", 1.0), \
        _describe(probe.findings)
    assert DEAD_WINDOW - 1 <= first.step <= DEAD_WINDOW, first  # the window of 20 measured steps completes
    assert [f.layer for f in probe.findings if f.kind == "dead"] == ["net.dec2"], _describe(probe.findings)
    at = orc.steps[first.step].by_name()
    zero = sorted(n for n, c in at.items() if n != "net.dec2" and c.grad_numel and c.grad_sq == 0.0)
    assert zero == ["net.bottleneck", "net.enc2"], zero
    assert sorted(first.extra.get("blocked", [])) == zero, first.extra
    _record("unet_seg", "dead decoder block (`dec2.1` bias -10); blocks probed", f"`net.dec2` 100% never positive; "
            f"zero gradient at {', '.join(f'`{z}`' for z in zero)}",
            f"dead `{first.layer}` step {first.step} ({first.value:.0%}), blocking {', '.join(first.extra['blocked'])}")


@pytest.mark.parametrize("probes,include", [EVERY, ONLY_LINEAR], ids=_ids([EVERY, ONLY_LINEAR]))
def test_gcn_degree_normalisation_without_self_loops_is_found_where_the_oracle_says(probes, include, tmp_path):
    """``D^-1/2 A D^-1/2`` without self loops on a graph with isolated nodes: ``0 ** -0.5 = inf`` and
    ``inf * 0 = NaN`` in the normalised adjacency, so the first aggregation's output is NaN from step 0 (its
    Linear is finite). With ``type:Linear`` the first probed stream that holds the NaN is the second layer's
    Linear (its input is the NaN aggregation)."""
    entry = zf.FAMILY_BUGS["gcn_isolated_no_self_loops"]
    probe = _probe(probes)
    _, orc = _fit(entry, "lightning", tmp_path, 4, probe, units=False, include=include)
    want = {"net.**": "net.conv1", "type:Linear": "net.conv2.lin"}[probes[0]]
    assert orc.first_nonfinite_activation() == (0, want), orc.first_nonfinite_activation()
    assert not orc.steps[0].by_name()["net.conv1.lin"].nonfinite
    _check_first_incident(probe, orc, "gcn_isolated_no_self_loops",
                          f"no self loops, 2 isolated nodes: deg^-1/2 = inf; `{probes[0]}`")


@pytest.mark.parametrize("probes,include", [EVERY, LLAMA_BLOCKS], ids=_ids([EVERY, LLAMA_BLOCKS]))
def test_llama_fully_masked_attention_row_is_found_where_the_oracle_says(probes, include, tmp_path):
    """Llama with eager attention and a hand-made 4-D additive mask (``-inf`` where masked): in batch 3 one query
    row is masked fully. Softmax over a row of ``-inf`` is NaN inside the attention (functional), so the first
    non-finite call is the attention's ``o_proj`` of layer 0 at step 3 (with the blocks probed: block 0)."""
    entry = zf.FAMILY_BUGS["llama_masked_row"]
    probe = _probe(probes)
    _, orc = _fit(entry, "pytorch_lightning", tmp_path, zf.MASKED_BATCH + 3, probe, units=False, include=include)
    want = {"net.**": "net.model.layers.0.self_attn.o_proj", "net.model.layers.*": "net.model.layers.0"}[probes[0]]
    assert orc.first_nonfinite_activation() == (zf.MASKED_BATCH, want), orc.first_nonfinite_activation()
    _check_first_incident(probe, orc, "llama_masked_row", "eager attention, additive `-inf` mask, one query row "
                          f"fully masked at step 3; `{probes[0]}`")


def test_llama_all_padding_sample_through_hf_mask_gives_no_nan_and_no_finding(tmp_path):
    """What actually happens with HF's own 2-D padding mask when one sample is all padding: HF's mask does not
    produce NaN (sdpa), the oracle sees nothing non-finite, and the probe must stay silent."""
    entry = zf.FAMILY_BUGS["llama_padded_sample"]
    probe = _probe(["net.**"])
    module, orc = _fit(entry, "lightning", tmp_path, zf.MASKED_BATCH + 3, probe, units=False)
    assert all(math.isfinite(x) for x in module.losses), module.losses
    assert _oracle_first_event(orc) is None, _oracle_first_event(orc)
    assert probe.findings == [], _describe(probe.findings)
    _record("llama_padded_sample", "one sample all padding (HF 2-D mask, sdpa)", "no non-finite value",
            "no finding")


@pytest.mark.parametrize("name,steps", [("diffusion_unet_sgd5", 6), ("mamba_sgd20", 7)])
def test_learning_rate_too_high_is_found_first_where_the_oracle_says(name, steps, tmp_path):
    """The diffusion UNet (SGD lr=5) and Mamba (SGD lr=20) diverge within a few steps. In the UNet a finite but
    huge activation turns into NaN inside a GroupNorm (its variance overflows float32). The first incident's
    cause is the oracle's first event; the first non-finite activation is the oracle's, at its step."""
    entry = zf.FAMILY_BUGS[name]
    probe = _probe(["net.**"])
    module, orc = _fit(entry, "pytorch_lightning", tmp_path, steps, probe, units=False)
    assert not math.isfinite(module.losses[-1]), module.losses
    want = _oracle_first_event(orc)
    assert want is not None and want[2] == "exploding", want
    _check_first_incident(probe, orc, name, entry.notes.split(":")[0].replace("the ", "", 1), nan=True)
