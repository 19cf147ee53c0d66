"""Real training set-ups: precision, torch.compile, activation checkpointing, Lightning loops, faults, memory.

Every test runs a real ``Trainer.fit`` on CPU with tiny models and checks three things: training is
unharmed, no probe hook is left on the model afterwards, and the probe's statistics/findings are right.
"""

from __future__ import annotations

import csv
import gc
import logging
import math
import os
import time

import numpy as np
import pytest
import torch
from pytorch_lightning import Callback
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.checkpoint import checkpoint

from lit_probe import FeatureProbe
from lit_probe.diagnose import Diagnosis, Thresholds, diagnose
from lit_probe.history import STATS, derive
from lit_probe.hooks import hook_snapshot
from lit_probe.stats import COLUMNS, HostRows
from models import Classifier, TinyCNN, make_loader, mlp, trainer

S = {name: i for i, name in enumerate(STATS)}


def _probe(tmp_path, probes, **kw):
    kw.setdefault("figure_every_n_steps", None)
    kw.setdefault("save_dir", str(tmp_path / "probe"))
    return FeatureProbe(probes=probes, **kw)


def _window(probe):
    steps, values = probe.session.history.window()
    return steps, values


def _slot(probe, layer, signal="activation"):
    return probe.session.slot_of(layer, signal)


def _finite_rows(values, slot, stat):
    col = values[:, slot, S[stat]]
    return col[~np.isnan(col)]


class Net(Classifier):
    def __init__(self, **kw):
        super().__init__(mlp(), **kw)


# ================================================================================ 1. bf16-mixed
class DtypeSpy(Callback):
    """Records the dtype of ``net.0``'s output during training (to prove autocast really ran)."""

    def __init__(self):
        self.dtypes = set()
        self.buffer_dtypes = set()
        self._h = None

    def on_fit_start(self, trainer, pl_module):
        self._h = pl_module.net[0].register_forward_hook(lambda m, i, o: self.dtypes.add(o.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        probe = next(c for c in trainer.callbacks if isinstance(c, FeatureProbe))
        buf = probe.session.buffer._buf
        if buf is not None:
            self.buffer_dtypes.add(buf.dtype)

    def on_fit_end(self, trainer, pl_module):
        self._h.remove()


def test_bf16_mixed_statistics_are_finite_float32(tmp_path):
    model = Net()
    before = hook_snapshot(model)
    probe = _probe(tmp_path, ["net.0", "net.1", "net.2"])
    spy = DtypeSpy()
    t = trainer(tmp_path, precision="bf16-mixed", callbacks=[probe, spy], max_steps=15)
    t.fit(model, make_loader(n=256))
    assert t.global_step == 15 and all(math.isfinite(x) for x in model.losses)
    assert hook_snapshot(model) == before
    assert torch.bfloat16 in spy.dtypes  # autocast really produced bf16 activations
    assert spy.buffer_dtypes == {torch.float32}  # ... and the statistics were accumulated in float32
    steps, values = _window(probe)
    assert list(steps) == list(range(15)) and values.dtype == np.float32
    for layer in ("net.0", "net.1", "net.2"):
        for sig in ("activation", "gradient"):
            for stat in ("rms", "absmax", "mean"):
                col = _finite_rows(values, _slot(probe, layer, sig), stat)
                assert col.size >= 10 and np.isfinite(col).all(), (layer, sig, stat)
                if stat != "mean":
                    assert (col > 0).all()
    assert not [f for f in probe.findings if f.kind in ("nonfinite", "exploding")], probe.findings


# ================================================================================ 2. fp16 + GradScaler
class InfAtStep(Net):
    """Multiplies the loss by inf once at ``step``: the GradScaler must skip that optimizer step."""

    def __init__(self, step):
        super().__init__()
        self.bad_step = step
        self.fired = False

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step == self.bad_step and not self.fired:
            self.fired = True
            loss = loss * float("inf")
        return loss


@pytest.mark.parametrize("inject", [None, 5], ids=["healthy", "inf-at-step-5"])
def test_fp16_gradscaler_real_run(tmp_path, inject):
    # Lightning maps precision="16-mixed" on CPU to bf16 (no scaler); an explicit plugin with a CPU GradScaler
    # exercises the real scaler path: fp16 autocast, scaled backward, unscale, skipped steps, backoff
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    model = InfAtStep(inject if inject is not None else -1)
    before = hook_snapshot(model)
    probe = _probe(tmp_path, ["net.0", "net.2"])
    t = trainer(tmp_path, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], callbacks=[probe],
                max_steps=12, log_every_n_steps=1)
    t.fit(model, make_loader(n=256))
    assert t.global_step == 12
    assert hook_snapshot(model) == before
    steps, values = _window(probe)
    assert list(steps) == list(range(12))
    if inject is None:
        assert scaler.get_scale() == 2.0 ** 10 and probe.skipped_steps == []
    else:
        assert scaler.get_scale() == 2.0 ** 9  # backed off once
        assert probe.skipped_steps == [inject]
        assert values[inject, 0, S["skipped"]] == 1 and np.nansum(values[:, 0, S["skipped"]]) == 1
    bad = [f for f in probe.findings if f.kind in ("nonfinite", "exploding")]
    assert bad == [], bad  # an AMP overflow the scaler skipped is not a finding
    # gradient statistics are in unscaled units at every step (incl. step 0, before the scaler's first update)
    g = values[:, _slot(probe, "net.2", "gradient"), S["absmax"]]
    ok = [s for s in range(12) if s != inject]
    ref = np.median(g[ok])
    assert 1e-4 < ref < 1.0  # cross-entropy gradients of a batch of 16: O(1/16), not O(1/16 * 1024)
    assert np.all(g[ok] < 20 * ref) and np.all(g[ok] > ref / 20), g


def _rows(scales, grad_inf_step, n_slots=2):
    """HostRows of 6 steps, slot 0 activation (finite), slot 1 gradient (scaled by ``scales``)."""
    n = len(scales)
    dev = np.zeros((n, n_slots, len(COLUMNS)), np.float32)
    c = {k: i for i, k in enumerate(COLUMNS)}
    for i in range(n):
        dev[i, 0, [c["min"], c["max"], c["l2"], c["sum"]]] = [-1.0, 2.0, 4.0, 8.0]
        k = scales[i][0] if math.isfinite(scales[i][0]) else 1.0  # gradients arrive scaled by the scale
        dev[i, 1, [c["min"], c["max"], c["l2"], c["sum"]]] = np.array([-0.5, 0.25, 1.0, 0.5]) * k
        dev[i, :, c["nonzero"]] = 16
    dev[grad_inf_step, 1, [c["min"], c["max"]]] = [-np.inf, np.inf]
    dev[grad_inf_step, 1, c["nonfinite"]] = 3
    ones = np.ones((n, n_slots), np.int64)
    return HostRows(steps=np.arange(n, dtype=np.int64), dev=dev, calls=ones, numel=16 * ones, full=ones,
                    order=[[0, 1] for _ in range(n)], counted=16 * ones, scale=np.array(scales, np.float32))


def test_scaler_skipped_step_is_not_a_finding_and_gradients_are_unscaled():
    s0 = 2.0 ** 16
    # the scale halves at step 3 (inf gradients), the step is skipped; stays at s0/2 afterwards
    scales = [(s0, s0)] * 3 + [(s0, s0 / 2)] + [(s0 / 2, s0 / 2)] * 2
    d = derive(_rows(scales, 3), np.array([False, True]), np.array([True, False]))
    dg, found = diagnose(Diagnosis(), d, None, None, ["a", "a"], ["activation", "gradient"], [True, False],
                         Thresholds())
    assert dg.skipped_steps == [3]
    assert found == []  # neither nonfinite nor exploding
    for i in (0, 1, 2, 4, 5):  # unscaled: identical whatever the scale in force
        assert d.get("max")[i, 1] == pytest.approx(0.25) and d.get("min")[i, 1] == pytest.approx(-0.5)
        assert d.get("l2")[i, 1] == pytest.approx(1.0) and d.get("mean")[i, 1] == pytest.approx(0.5 / 16)
        assert d.get("max")[i, 0] == 2.0  # activations are never divided
    # the same inf gradient with no scaler (scale NaN): a real non-finite finding
    nan = float("nan")
    d2 = derive(_rows([(nan, nan)] * 6, 3), np.array([False, True]), np.array([True, False]))
    dg2, found2 = diagnose(Diagnosis(), d2, None, None, ["a", "a"], ["activation", "gradient"], [True, False],
                           Thresholds())
    assert dg2.skipped_steps == []
    assert [(f.kind, f.signal, f.step) for f in found2] == [("nonfinite", "gradient", 3)]


# ================================================================================ 3. torch.compile
class CompiledNet(Classifier):
    def __init__(self, backend):
        torch.manual_seed(0)
        net = mlp()
        super().__init__(torch.compile(net, backend=backend) if backend else net)


def _compiled_fit(tmp_path, backend, warm):
    model = CompiledNet(backend)
    if warm:  # compiled (and cached) before the probe attaches its hooks
        model(torch.randn(4, 16))
    before = hook_snapshot(model)
    probe = _probe(tmp_path / str(backend), ["net.0", "net.2"])
    t = trainer(tmp_path / str(backend), callbacks=[probe], max_steps=8)
    t.fit(model, make_loader(n=128))
    return model, probe, t, before


@pytest.mark.parametrize("backend, warm", [("eager", True), ("aot_eager", False)])
def test_compiled_submodule_is_probed(tmp_path, backend, warm):
    """README (compatibility): a ``torch.compile``d submodule works — every step is measured under the user's
    names, the probe's own code is not traced, no hook is left, the statistics are the eager run's. Any error
    (a refusal included) fails the test."""
    dynamo = pytest.importorskip("torch._dynamo")
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()
    try:
        model, probe, t, before = _compiled_fit(tmp_path, backend, warm)
    finally:
        frames = counters["frames"]["total"]
        dynamo.reset()
    assert t.global_step == 8 and all(math.isfinite(x) for x in model.losses)
    assert hook_snapshot(model) == before
    assert probe.points == ["net.0", "net.2"]  # the user's names, no `_orig_mod`
    assert probe.session.never_fired() == []
    assert frames < 12, f"dynamo compiled {frames} frames: it is tracing the probe's own code"
    steps, values = _window(probe)
    assert list(steps) == list(range(8))
    for layer in ("net.0", "net.2"):
        for sig in ("activation", "gradient"):
            calls = values[:, _slot(probe, layer, sig), S["calls"]]
            assert (calls == 1).all(), (layer, sig, calls)
    # the same statistics as an eager run of the same model
    ref_model, ref, _, _ = _compiled_fit(tmp_path, None, False)
    assert model.losses == pytest.approx(ref_model.losses, rel=1e-4)
    _, ref_values = _window(ref)
    for stat in ("rms", "absmax", "mean"):
        np.testing.assert_allclose(values[:, :, S[stat]], ref_values[:, :, S[stat]], rtol=1e-3, atol=1e-6,
                                   err_msg=stat)


# ================================================================================ 4. checkpointing
class Checkpointed(Classifier):
    def __init__(self, reentrant):
        super().__init__(mlp())
        self.reentrant = reentrant

    def forward(self, x):
        net = self.net
        h = net[1](net[0](x))  # h requires grad: the reentrant variant needs an input that does
        h = checkpoint(lambda z: net[3](net[2](z)), h, use_reentrant=self.reentrant)
        return net[4](h)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_activation_checkpointing_counts_one_call_and_captures_gradients(tmp_path, reentrant):
    model = Checkpointed(reentrant)
    before = hook_snapshot(model)
    probe = _probe(tmp_path, ["net.0", "net.2", "net.3"])
    t = trainer(tmp_path, callbacks=[probe], max_steps=6)
    w0 = model.net[2].weight.detach().clone()
    t.fit(model, make_loader(n=128))
    assert t.global_step == 6
    assert not torch.equal(w0, model.net[2].weight)  # the checkpointed segment trained
    assert hook_snapshot(model) == before
    steps, values = _window(probe)
    assert list(steps) == list(range(6))
    for layer in ("net.0", "net.2", "net.3"):
        a = values[:, _slot(probe, layer), S["calls"]]
        g = values[:, _slot(probe, layer, "gradient"), S["calls"]]
        assert (a == 1).all(), (layer, a)  # the recomputation forward is not a second sample
        assert (g == 1).all(), (layer, g)
        assert (_finite_rows(values, _slot(probe, layer, "gradient"), "rms") > 0).all()


# ================================================================================ 5. loops
def test_gradient_accumulation_one_row_per_optimizer_step(tmp_path):
    model = Net()
    before = hook_snapshot(model)
    probe = _probe(tmp_path, ["net.0", "net.2"])
    t = trainer(tmp_path, callbacks=[probe], max_steps=5, accumulate_grad_batches=4)
    t.fit(model, make_loader(n=512))  # 32 batches per epoch: 8 optimizer steps available
    assert t.global_step == 5 and len(model.losses) == 20
    assert hook_snapshot(model) == before
    steps, values = _window(probe)
    assert list(steps) == [0, 1, 2, 3, 4]
    for layer in ("net.0", "net.2"):
        for sig in ("activation", "gradient"):
            assert (values[:, _slot(probe, layer, sig), S["calls"]] == 4).all(), (layer, sig)
            assert (values[:, _slot(probe, layer, sig), S["count"]] == 4 * 16 * 32).all()


class GAN(Classifier):
    """GAN-style manual optimisation: a generator and a discriminator, two optimisers, two steps per batch."""

    def __init__(self):
        super().__init__(mlp())
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16))
        self.disc = nn.Sequential(nn.Linear(16, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], 8)
        bce = nn.functional.binary_cross_entropy_with_logits
        # generator
        fake = self.gen(z)
        g_loss = bce(self.disc(fake), torch.ones(real.shape[0], 1))
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        # discriminator
        d_loss = bce(self.disc(real), torch.ones(real.shape[0], 1)) + \
            bce(self.disc(fake.detach()), torch.zeros(real.shape[0], 1))
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        self.losses.append(float(g_loss.detach() + d_loss.detach()))

    def configure_optimizers(self):
        return [torch.optim.Adam(self.gen.parameters(), 1e-3), torch.optim.Adam(self.disc.parameters(), 1e-3)]


@pytest.mark.parametrize("nan_batch", [None, 2], ids=["healthy", "nan"])
def test_manual_optimisation_two_optimisers(tmp_path, nan_batch):
    model = GAN()
    if nan_batch is not None:
        orig = model.training_step

        def training_step(batch, batch_idx):
            if batch_idx == nan_batch:  # global_step 4: two optimizer steps per batch
                with torch.no_grad():
                    model.gen[0].weight[0, 0] = float("nan")
            return orig(batch, batch_idx)

        model.training_step = training_step
    before = hook_snapshot(model)
    # an even log interval: global_step advances by 2 per batch, so `(step + 1) % 4` never holds
    probe = _probe(tmp_path, ["gen.0", "gen.2", "disc.0", "disc.1"], log_every_n_steps=4)
    t = trainer(tmp_path, callbacks=[probe], max_steps=40, logger=CSVLogger(str(tmp_path), name="logs"))
    t.fit(model, make_loader(n=512))  # 20 batches, more than the probe's device ring holds between logs
    assert len(model.losses) == 20
    assert hook_snapshot(model) == before
    steps, values = _window(probe)
    assert list(steps) == list(range(0, 40, 2))  # one row per batch
    rows = list(csv.DictReader(open(os.path.join(t.logger.log_dir, "metrics.csv"))))
    logged = sorted({int(r["step"]) for r in rows if r.get("probe/gen.0/act_rms")})
    assert len(logged) >= 8, logged  # logged every 4 steps during training, not only at the end
    if nan_batch is not None:
        first = [(f.layer, f.signal, f.step) for f in probe.findings if f.kind == "nonfinite"][:1]
        assert first == [("gen.0", "activation", 4)], probe.findings
        assert '"nonfinite"' in (tmp_path / "probe" / "findings.jsonl").read_text()
        return
    assert all(math.isfinite(x) for x in model.losses)
    assert (values[:, _slot(probe, "gen.0"), S["calls"]] == 1).all()
    for call in ("disc.0", "disc.0#1", "disc.0#2"):  # fake (G step), real, fake (D step): a stream per call
        assert (values[:, _slot(probe, call), S["calls"]] == 1).all(), call
        assert (values[:, _slot(probe, call, "gradient"), S["calls"]] == 1).all(), call
    assert (values[:, _slot(probe, "gen.2", "gradient"), S["calls"]] == 1).all()  # d_loss uses fake.detach()
    assert probe.session.never_fired() == []
    assert not [f for f in probe.findings if f.kind in ("nonfinite", "exploding")], probe.findings


def test_findings_survive_a_full_device_ring(tmp_path):
    # log interval > ring size (256 + 2): the session reads the ring itself when it fills; its findings must
    # still reach `probe.findings` and findings.jsonl
    model = NaNAt()
    probe = _probe(tmp_path, ["net.0", "net.2"], log_every_n_steps=1000)
    t = trainer(tmp_path, callbacks=[probe], max_steps=300)
    t.fit(model, make_loader(n=256, batch_size=4))
    assert t.global_step == 300
    first = [(f.layer, f.signal, f.step) for f in probe.findings if f.kind == "nonfinite"][:1]
    assert first == [("net.2", "activation", 6)], probe.findings
    assert '"nonfinite"' in (tmp_path / "probe" / "findings.jsonl").read_text()


def test_gradient_clipping_and_max_steps_mid_epoch(tmp_path):
    model = Net(lr=0.5)
    before = hook_snapshot(model)
    probe = _probe(tmp_path, ["net.0", "net.2", "net.4"])
    t = trainer(tmp_path, callbacks=[probe], max_steps=7, gradient_clip_val=1.0)  # 16 batches per epoch
    t.fit(model, make_loader(n=256))
    assert t.global_step == 7 and len(model.losses) == 7
    assert hook_snapshot(model) == before
    steps, values = _window(probe)
    assert list(steps) == list(range(7))  # the last steps (after the last log step, 4) are flushed at the end
    assert (values[:, _slot(probe, "net.4", "gradient"), S["calls"]] == 1).all()
    assert not [f for f in probe.findings if f.kind in ("nonfinite", "exploding")]


def test_fast_dev_run(tmp_path):
    model = Net()
    before = hook_snapshot(model)
    probe = _probe(tmp_path, ["net.0", "net.2"], figure_every_n_steps=1)
    t = trainer(tmp_path, callbacks=[probe], max_steps=-1, fast_dev_run=True)
    t.fit(model, make_loader(), make_loader())
    assert t.global_step == 1
    assert hook_snapshot(model) == before
    steps, values = _window(probe)
    assert list(steps) == [0] and values[0, _slot(probe, "net.0"), S["calls"]] == 1


class Eval(Net):
    def __init__(self):
        super().__init__()
        self.val_calls = 0

    def validation_step(self, batch, batch_idx):
        self.val_calls += 1
        return super().validation_step(batch, batch_idx)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(batch[0]).argmax(-1)


def _val_session(probe):
    return probe.run.validation_session if probe.run is not None else None


@pytest.mark.parametrize("probe_validation", [False, True])
def test_sanity_check_is_not_counted(tmp_path, probe_validation):
    model = Eval()
    probe = _probe(tmp_path, ["net.0", "net.2"], probe_validation=probe_validation)
    t = trainer(tmp_path, callbacks=[probe], max_steps=3, num_sanity_val_steps=2, limit_val_batches=2,
                val_check_interval=3)
    t.fit(model, make_loader(n=64), make_loader(n=64))
    assert model.val_calls == 4  # 2 sanity + 2 at step 3
    steps, values = _window(probe)
    assert list(steps) == [0, 1, 2]
    for sig in ("activation", "gradient"):
        assert (values[:, _slot(probe, "net.0", sig), S["calls"]] == 1).all()
    if not probe_validation:
        assert _val_session(probe) is None and not probe.findings
        return
    vsteps, vvalues = _val_session(probe).history.window()
    assert list(vsteps) == [3]  # only the real validation, not the sanity check
    assert vvalues[0, _slot(probe, "net.0"), S["calls"]] == 2
    assert not probe.findings


def test_validate_test_predict_before_and_after_fit(tmp_path):
    model = Eval()
    before = hook_snapshot(model)
    probe = _probe(tmp_path, ["net.0", "net.2"], probe_validation=True)
    t = trainer(tmp_path, callbacks=[probe], max_steps=4, limit_val_batches=2)
    loader = make_loader(n=64)

    def evaluate():
        t.validate(model, loader, verbose=False)
        assert hook_snapshot(model) == before
        t.test(model, loader, verbose=False)
        assert hook_snapshot(model) == before
        preds = t.predict(model, loader)
        assert hook_snapshot(model) == before
        assert torch.cat(preds).shape == (64,)

    evaluate()
    t.fit(model, loader, loader)
    assert t.global_step == 4 and hook_snapshot(model) == before
    fit_steps = list(_window(probe)[0])
    evaluate()
    assert list(_window(probe)[0]) == fit_steps  # evaluation after fit does not touch the training history


def test_fit_twice_on_one_trainer(tmp_path):
    model = Net()
    before = hook_snapshot(model)
    probe = _probe(tmp_path, ["net.0", "net.2"])
    t = trainer(tmp_path, callbacks=[probe], max_steps=4)
    t.fit(model, make_loader(n=256))
    assert hook_snapshot(model) == before
    assert list(_window(probe)[0]) == [0, 1, 2, 3]
    t.fit_loop.epoch_loop.max_steps = 8
    t.fit(model, make_loader(n=256))
    assert t.global_step == 8
    assert hook_snapshot(model) == before
    assert list(_window(probe)[0]) == [4, 5, 6, 7]  # the second fit has its own session


def test_two_probes_on_one_trainer(tmp_path):
    model = Net()
    before = hook_snapshot(model)
    a = FeatureProbe(probes=["net.0", "net.1"], figure_every_n_steps=None, save_dir=str(tmp_path / "a"),
                     thresholds={"dead_window": 3})
    b = FeatureProbe(probes=["net.1", "net.2"], signals=("activation",), every_n_steps=1,
                     figure_every_n_steps=None, save_dir=str(tmp_path / "b"), thresholds={"dead_window": 3})
    assert a.state_key != b.state_key
    with torch.no_grad():
        model.net[0].bias.fill_(-100.0)  # net.1 (the ReLU after net.0) dead: both probes must say so
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=8)
    t = trainer(tmp_path, callbacks=[a, b, ckpt], max_steps=8, enable_checkpointing=True)
    t.fit(model, make_loader(n=256))
    assert hook_snapshot(model) == before
    for p in (a, b):
        want = ["net.1"]  # net.0 is a Linear: never positive is not death there, it is not judged
        assert sorted(f.layer for f in p.findings if f.kind == "dead") == want, p.findings
        assert list(_window(p)[0]) == list(range(8))
        jsonl = (tmp_path / ("a" if p is a else "b") / "findings.jsonl").read_text()
        assert jsonl.count('"dead"') == len(want)
    state = torch.load(next((tmp_path / "ckpt").glob("*.ckpt")), weights_only=True)["callbacks"]
    assert a.state_key in state and b.state_key in state


def test_probe_validation_logs_val_metrics_to_csv(tmp_path):
    model = Eval()
    probe = _probe(tmp_path, ["net.0", "net.2"], probe_validation=True)
    t = trainer(tmp_path, callbacks=[probe], max_steps=6, limit_val_batches=2, val_check_interval=3,
                logger=CSVLogger(str(tmp_path), name="logs"), num_sanity_val_steps=2)
    t.fit(model, make_loader(n=256), make_loader(n=64))
    rows = list(csv.DictReader(open(os.path.join(t.logger.log_dir, "metrics.csv"))))
    val = [r for r in rows if r.get("probe/net.0/val_act_rms")]
    assert [int(r["step"]) for r in val] == [3, 6]  # two real validations, none for the sanity check
    assert all(float(r["probe/net.0/val_act_rms"]) > 0 for r in val)
    assert any(r.get("probe/net.2/act_rms") for r in rows)  # training statistics logged too


class DeadNet(Net):
    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.net[0].bias.fill_(-100.0)  # net.0 never positive, net.1 (ReLU) never fires: no way back


def test_resume_from_checkpoint_keeps_dead_unit_windows(tmp_path):
    kw = dict(thresholds={"dead_window": 5})
    probe = _probe(tmp_path, ["net.0", "net.1", "net.2"], **kw)
    model = DeadNet()
    ckdir = tmp_path / "ckpt"
    t = trainer(tmp_path, callbacks=[probe, ModelCheckpoint(dirpath=str(ckdir), every_n_train_steps=10)],
                max_steps=10, enable_checkpointing=True)
    t.fit(model, make_loader(n=512))
    dead = [f for f in probe.findings if f.kind == "dead"]
    assert sorted((f.layer, f.step) for f in dead) == [("net.1", 5)]
    (ckpt,) = list(ckdir.glob("*.ckpt"))
    loaded = torch.load(ckpt, weights_only=True)  # plain types only
    state = loaded["callbacks"][probe.state_key]
    assert sorted(f["layer"] for f in state["findings"] if f["kind"] == "dead") == ["net.1"]
    # state round-trip without a Trainer
    clone = _probe(tmp_path, ["net.0", "net.1", "net.2"], **kw)
    clone.load_state_dict(probe.state_dict())
    assert clone._pending_state["findings"] == state["findings"]

    model2 = DeadNet()
    before = hook_snapshot(model2)
    probe2 = _probe(tmp_path, ["net.0", "net.1", "net.2"], **kw)
    t2 = trainer(tmp_path, callbacks=[probe2], max_steps=20)
    t2.fit(model2, make_loader(n=512), ckpt_path=str(ckpt))
    assert t2.global_step == 20 and hook_snapshot(model2) == before
    assert list(_window(probe2)[0]) == list(range(10, 20))
    dead2 = [f for f in probe2.findings if f.kind == "dead"]
    # the layer is known dead from the first run (step 5), not rediscovered 5 steps after the resume
    assert sorted((f.layer, f.step) for f in dead2) == [("net.1", 5)]
    assert len(probe2.findings) == len({(f.layer, f.signal, f.kind) for f in probe2.findings})  # no repeats
    assert probe2.session.dead_fractions()["net.1"] == 1.0


# ================================================================================ 6. faults
class Boom(RuntimeError):
    pass


class FailAt(Net):
    def __init__(self, step, exc):
        super().__init__()
        self.fail_step = step
        self.exc = exc

    def training_step(self, batch, batch_idx):
        if self.global_step == self.fail_step:
            raise self.exc
        return super().training_step(batch, batch_idx)


def test_exception_in_training_step_propagates_and_cleans_up(tmp_path):
    model = FailAt(7, Boom("user bug at step 7"))
    before = hook_snapshot(model)
    probe = _probe(tmp_path, ["net.0", "net.2"])
    t = trainer(tmp_path, callbacks=[probe], max_steps=20)
    with pytest.raises(Boom, match="^user bug at step 7$"):
        t.fit(model, make_loader(n=512))
    assert hook_snapshot(model) == before
    out = tmp_path / "probe"
    assert (out / "findings.jsonl").exists()
    assert "exception" in (out / "summary.md").read_text()
    # the completed steps are in the history; the failing one (no statistics) does not break anything
    assert list(_window(probe)[0])[:7] == list(range(7))


def test_keyboard_interrupt_is_graceful_and_cleans_up(tmp_path):
    import signal

    model = FailAt(3, KeyboardInterrupt())
    before = hook_snapshot(model)
    probe = _probe(tmp_path, ["net.0", "net.2"])
    t = trainer(tmp_path, callbacks=[probe], max_steps=20)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning: graceful shutdown, then sys.exit(1)
            t.fit(model, make_loader(n=512))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT during its shutdown
    assert t.interrupted
    assert hook_snapshot(model) == before
    assert (tmp_path / "probe" / "findings.jsonl").exists() and (tmp_path / "probe" / "summary.md").exists()


class NaNAt(Net):
    def forward(self, x):
        h = self.net[0](x)
        if self.training and self.global_step == 6:
            h = h / 0  # inf/NaN from here on (this step)
        return self.net[4](self.net[3](self.net[2](self.net[1](h))))


def test_unwritable_save_dir_does_not_stop_training(tmp_path, caplog):
    (tmp_path / "f").write_text("a file, not a directory")
    save_dir = tmp_path / "f" / "sub"
    model = NaNAt()
    before = hook_snapshot(model)
    probe = FeatureProbe(probes=["net.0", "net.2"], save_dir=str(save_dir), figure_every_n_steps=5,
                         figures=("activations",))
    t = trainer(tmp_path, callbacks=[probe], max_steps=10)
    with caplog.at_level(logging.WARNING, logger="lit_probe"), pytest.warns(Warning):
        t.fit(model, make_loader(n=256))
    assert t.global_step == 10 and len(model.losses) == 10
    assert hook_snapshot(model) == before
    # net.0's output is finite; the first probed layer that sees the NaN is net.2
    assert [(f.layer, f.step) for f in probe.findings if f.kind == "nonfinite"][:1] == [("net.2", 6)]
    text = caplog.text
    assert "cannot write" in text and str(save_dir) in text, text
    assert not save_dir.exists()


# ================================================================================ 7. memory
class CNN(Classifier):
    def __init__(self):
        super().__init__(TinyCNN(), lr=0.01)


class RSS(Callback):
    def __init__(self, at):
        self.at = at
        self.rss_at = None
        self.rss_end = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import psutil

        if trainer.global_step == self.at:
            gc.collect()
            self.rss_at = psutil.Process().memory_info().rss

    def on_train_end(self, trainer, pl_module):
        import psutil

        gc.collect()
        self.rss_end = psutil.Process().memory_info().rss


def test_memory_is_flat_over_many_steps(tmp_path):
    pytest.importorskip("psutil")
    steps = 2000
    model = CNN()
    model.losses = None  # keep the model's own bookkeeping out of the measurement

    def training_step(batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    model.training_step = training_step
    leaves = [n for n, m in model.named_modules() if n and not list(m.children())]
    before = hook_snapshot(model)
    probe = _probe(tmp_path, leaves, history_size=100, every_n_steps=5, figure_every_n_steps=None)
    rss = RSS(200)
    loader = make_loader(n=64, batch_size=8, image=(3, 8, 8))
    t = trainer(tmp_path, callbacks=[probe, rss], max_steps=steps, log_every_n_steps=25)
    t0 = time.perf_counter()
    t.fit(model, loader)
    elapsed = time.perf_counter() - t0
    assert t.global_step == steps
    assert hook_snapshot(model) == before
    assert len(probe.session.history) <= 100
    assert list(_window(probe)[0]) == list(range(steps - 100, steps))
    grown = (rss.rss_end - rss.rss_at) / 2 ** 20
    print(f"RSS growth step 200 -> {steps}: {grown:.2f} MiB, {elapsed:.1f} s")
    assert grown < 30, f"RSS grew by {grown:.1f} MiB between step 200 and step {steps} ({elapsed:.1f} s)"
