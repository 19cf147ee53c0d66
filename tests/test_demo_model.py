"""Fast tests of the demo's data, model and injected bugs, measured with plain forward hooks (no lit_probe
callback involved)."""

from __future__ import annotations

from collections import Counter

import pytest
import numpy as np
import torch
import torch.nn.functional as F

from lit_probe.demo import (BUGS, CLASSES, DEFAULT_PROBES, EXPECTED, DemoCNN, ShapesDataModule,
                            ShapesDataset)
from lit_probe.selection import resolve

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ helpers
def _batches(batch_size: int = 64, seed: int = 0):
    dm = ShapesDataModule(batch_size=batch_size, seed=seed)  # the demo's own batches (order depends on size)
    dm.setup("fit")
    return iter(dm.train_dataloader())


def _train(model: DemoCNN, steps: int, layers: list[str], batch_size: int = 64, grads: bool = False):
    """Train ``steps`` steps with the model's own optimizer; per step, per layer: the output's absmax,
    non-finite count, per-channel 'ever positive' flags, gradient L2 norm; plus the forward order."""
    mods = dict(model.named_modules())
    cur: dict = {}
    order: list[str] = []

    def make(name: str):
        def hook(mod, inp, out):
            o = out.detach()
            flat = o.transpose(0, 1).reshape(o.shape[1], -1)
            cur[name] = {"absmax": float(o.abs().max()), "nonfinite": int((~torch.isfinite(o)).sum()),
                         "fired": (flat > 0).any(1)}
            order.append(name)
            if grads and out.requires_grad:
                def keep(g, name=name):
                    cur[name]["grad_l2"] = float(g.norm())
                    cur[name]["grad_absmax"] = float(g.abs().max())

                out.register_hook(keep)
        return hook

    handles = [mods[n].register_forward_hook(make(n)) for n in layers]
    opt = model.configure_optimizers()
    model.train()
    it = _batches(batch_size)
    history = []
    try:
        for step in range(steps):
            x, y = next(it)
            cur.clear()
            order.clear()
            model.set_step(step)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(({k: dict(v) for k, v in cur.items()}, list(order)))
    finally:
        for h in handles:
            h.remove()
    return history


# ------------------------------------------------------------------------------------------------ data
def test_dataset_shapes_dtype_and_determinism():
    ds = ShapesDataset(16, seed=3)
    x, y = ds[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.long and 0 <= int(y) < len(CLASSES)
    x2, y2 = ShapesDataset(16, seed=3)[5]
    assert torch.equal(x, x2) and int(y) == int(y2)
    x3, _ = ShapesDataset(16, seed=4)[5]
    assert not torch.equal(x, x3)
    assert not torch.equal(ds[4][0], ds[8][0])  # same class, different image
    with pytest.raises(IndexError):
        ds[16]


def test_dataset_balanced_and_normalised():
    ds = ShapesDataset(256, seed=0)
    counts = Counter(int(ds[i][1]) for i in range(len(ds)))
    assert set(counts) == set(range(4)) and max(counts.values()) - min(counts.values()) <= 1
    x = torch.stack([ds[i][0] for i in range(128)])
    assert abs(float(x.mean())) < 0.3
    assert 0.6 < float(x.std()) < 1.4
    raw, _ = ds.render(0)
    assert float(raw.min()) >= 0.0 and float(raw.max()) <= 1.0


def test_datamodule_loaders():
    dm = ShapesDataModule(batch_size=8, train_size=32, val_size=16)
    dm.setup("fit")
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (8, 3, 32, 32) and yb.shape == (8,)
    assert len(dm.val_dataloader().dataset) == 16
    # train and validation splits are different images
    assert not torch.equal(dm.train_set[0][0], dm.val_set[0][0])


# ------------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("bug", BUGS)
def test_forward_shapes_and_hparams(bug):
    m = DemoCNN(bug=bug)
    out = m(m.example_input_array)
    assert out.shape == (2, len(CLASSES))
    assert m.hparams.bug == bug
    n = sum(p.numel() for p in m.parameters())
    assert 50_000 <= n <= 150_000
    # the probe list resolves in every variant and covers the expected layer
    names = [name for name, _ in resolve(m, DEFAULT_PROBES)]
    if bug in EXPECTED:
        assert EXPECTED[bug][0] in names


def test_bad_arguments():
    with pytest.raises(ValueError, match="bug must be one of"):
        DemoCNN(bug="typo")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DemoCNN(bug_step=0)


def test_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = DemoCNN(seed=0)
    after = torch.rand(1)
    b = DemoCNN(seed=0)
    assert torch.equal(before, after)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_expected_table():
    assert set(EXPECTED) == set(BUGS) - {"none"}
    for layer, signal, kind in EXPECTED.values():
        assert signal in ("activation", "gradient")
        assert kind in ("dead", "exploding", "vanishing", "nonfinite")


# ------------------------------------------------------------------------------------------------ bugs
def test_dead_relu_never_fires_but_healthy_does():
    hist = _train(DemoCNN(bug="dead-relu"), 4, ["block2.act", "block3.act"])
    for rec, _ in hist:
        assert rec["block2.act"]["absmax"] == 0.0  # all zeros: every unit dead
        assert rec["block3.act"]["fired"].float().mean() > 0.9  # the rest of the net is alive
    hist = _train(DemoCNN(bug="none"), 2, ["block2.act"])
    assert all(bool(rec["block2.act"]["fired"].all()) for rec, _ in hist)


def test_nan_first_nonfinite_at_bug_step_in_norm_div():
    layers = ["stem", "block2.act", "block3.conv", "block3.bn", "block3.norm_div", "block3.act", "head"]
    hist = _train(DemoCNN(bug="nan", bug_step=3), 5, layers)
    for step in range(3):
        assert all(r["nonfinite"] == 0 for r in hist[step][0].values()), step
    rec, order = hist[3]
    bad = [n for n in order if rec[n]["nonfinite"] > 0]
    assert bad and bad[0] == EXPECTED["nan"][0] == "block3.norm_div"
    assert rec["block3.bn"]["nonfinite"] == 0


def test_exploding_grows_before_nonfinite():
    hist = _train(DemoCNN(bug="exploding"), 8, ["block3.conv", "head"])
    first_nonfinite = next((s for s, (rec, _) in enumerate(hist)
                            if any(r["nonfinite"] for r in rec.values())), len(hist))
    over = [s for s, (rec, _) in enumerate(hist) if rec["block3.conv"]["absmax"] > 1e6]
    assert over, "block3.conv never exceeded 1e6"
    assert over[0] + 2 <= first_nonfinite  # visible for at least two steps before anything is NaN/Inf
    assert hist[over[0]][0]["block3.conv"]["absmax"] > 1e4 * hist[0][0]["block3.conv"]["absmax"]
    head_over = [s for s, (rec, _) in enumerate(hist) if rec["head"]["absmax"] > 1e6]
    assert head_over and over[0] <= head_over[0]  # block3.conv crosses no later than the logits


def test_exploding_first_symptom_is_the_gradient_into_block3():
    """EXPECTED["exploding"] from plain hooks and the README's rule (max |value| > 1e6, or > 1000x the stream's
    running median of the earlier steps once 5 are known): the first stream to cross, in time, is the gradient
    flowing into block3 (d loss / d block2.act, driven by block3's growing weights), one step before
    block3.conv's output passes 1e6."""
    from lit_probe.demo import DEFAULT_PROBES, EXPECTED

    layers = ["stem", "block1", "block2.act", "block3.conv", "block3.act", "head"]
    hist = _train(DemoCNN(bug="exploding"), 8, layers, grads=True)

    def first_crossing(series: list[float]) -> int:
        for s, v in enumerate(series):
            past = series[:s]
            if v > 1e6 or (len(past) >= 5 and v > 1000 * float(np.median(past))):
                return s
        return 10 ** 9

    crossing = {}
    for name in layers:
        crossing[(name, "activation")] = first_crossing([rec[name]["absmax"] for rec, _ in hist])
        crossing[(name, "gradient")] = first_crossing([rec[name].get("grad_absmax", 0.0) for rec, _ in hist])
    first = min(crossing.values())
    assert crossing[("block2.act", "gradient")] == first, crossing
    assert crossing[("block3.conv", "activation")] == first + 1, crossing
    assert EXPECTED["exploding"] == ("block2.act", "gradient", "exploding") and "block2.act" in DEFAULT_PROBES


def test_vanishing_gradient_at_first_sigmoid():
    hist = _train(DemoCNN(bug="vanishing"), 3, ["stem", "deep.1", "deep.15", "head"], grads=True)
    for rec, _ in hist:
        assert rec["deep.1"]["grad_l2"] < 1e-3 * rec["deep.15"]["grad_l2"]
        assert rec["stem"]["grad_l2"] < 1e-3 * rec["deep.15"]["grad_l2"]  # nothing below the stack learns
    hist = _train(DemoCNN(bug="none"), 3, ["stem", "deep.1", "head"], grads=True)
    for rec, _ in hist:
        assert rec["deep.1"]["grad_l2"] > 1e-2 * rec["head"]["grad_l2"]


def test_vanishing_cause_is_the_highest_sigmoid_whose_gradient_envelope_vanished():
    """EXPECTED["vanishing"] from plain hooks: the gradient envelope of a Sigmoid (its own norm and every
    gradient below it: the lower Sigmoids and the conv body) is < 1e-4 x the step's largest at deep.5, and not at
    deep.7: the highest vanished stream, where the probe's vanishing incident starts."""
    from lit_probe.demo import EXPECTED

    sig = [f"deep.{k}" for k in range(1, 16, 2)]
    below = ["stem", "block1", "block2.act", "block3.act"]
    hist = _train(DemoCNN(bug="vanishing"), 5, below + sig + ["head"], grads=True)
    for rec, _ in hist[1:]:
        top = max(r["grad_l2"] for r in rec.values())

        def envelope(k: int) -> float:
            return max(rec[n]["grad_l2"] for n in below + sig[:k + 1]) / top

        assert envelope(sig.index("deep.5")) < 1e-4 <= envelope(sig.index("deep.7"))
    assert EXPECTED["vanishing"] == ("deep.5", "gradient", "vanishing")


def test_healthy_has_no_symptom():
    layers = ["stem", "block1", "block2.act", "block3.conv", "block3.act", "deep.1", "head"]
    hist = _train(DemoCNN(bug="none"), 6, layers)
    for rec, _ in hist:
        for name, r in rec.items():
            assert r["nonfinite"] == 0
            assert r["absmax"] < 1e3, name
        assert bool(rec["block2.act"]["fired"].all())


def test_lightning_step_drives_the_nan_bug():
    """Under a real Trainer, the first non-finite activation is block3.norm_div at global_step == bug_step."""
    from lit_probe.demo import pl

    m = DemoCNN(bug="nan", bug_step=2)
    seen: list[tuple[int, str]] = []
    for name in ["block3.conv", "block3.norm_div", "head"]:
        mod = dict(m.named_modules())[name]

        def hook(mod, inp, out, name=name):
            if m.training and not torch.isfinite(out).all():
                seen.append((m.global_step, name))
        mod.register_forward_hook(hook)
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         accelerator="cpu", devices=1)
    trainer.fit(m, ShapesDataModule(batch_size=16, train_size=64, val_size=16))
    assert seen and seen[0] == (2, "block3.norm_div")
