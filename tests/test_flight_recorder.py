"""The flight recorder draws a finding's figures from the very step that fired (issue 14), not the next one.

The bug: at step 7 only, one layer's output gets a huge value in every odd channel (beyond the explosion bound);
the learning rate is 0, so every other step is healthy and identical in kind (the parameter signal is off: it
would rightly say that nothing learns). The figures at the finding must
show step 7's values (the oracle: the injected tensor, kept by a plain forward hook), not step 8's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lit_probe import FeatureProbe
from lit_probe.session import SIGNAL_ACT, ProbeSession
from models import Classifier, make_loader, mlp, trainer
from test_bugs import NaNAt, StepAware

K = 7
BIG = 1e8


class SpikeAt(NaNAt):
    """test_bugs' step-aware Linear, with ``BIG`` added to every odd feature at step ``k`` instead of a NaN
    (``StepAware`` sets its step)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if self.step == self.k:
            spike = torch.zeros_like(y)
            spike[:, 1::2] = BIG
            y = y + spike
        return y


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = mlp(depth=3)
    net[2] = SpikeAt(32, K)
    net[2].step = -1
    return net


def test_session_pins_the_figure_inputs_of_the_step_that_fired():
    net = _net()
    seen: dict[int, torch.Tensor] = {}  # the oracle: what net.2 returned, per step
    net[2].register_forward_hook(lambda m, i, o: seen.__setitem__(m.step, o.detach().clone()))
    session = ProbeSession.from_model(net, ["2", "3"], every_n_steps=1)
    session.record_recent(True, samples=1, channels=64)
    alarms = []
    with session:
        for step in range(10):
            net[2].step = step
            session.begin_step(step)
            x = torch.randn(8, 16)
            net(x).square().mean().backward()
            session.end_step()
            alarms.append(session.sentinel_alarm(1e6))
            assert len(session._kept) <= 3  # the device copies of the last three steps only (alarm, late read, before)
    assert [s for s in alarms if s is not None] == [K]  # CPU: the alarm is for the step itself
    snaps = {s.name: s for s in session.claim_pinned(K)}
    assert set(snaps) == {"2", "3"} and all(s.step == K for s in snaps.values())
    np.testing.assert_allclose(snaps["2"].activation, seen[K][:1].numpy(), rtol=1e-6)
    assert snaps["2"].activation[0, 1::2].min() > BIG / 2  # the spike, not a healthy step
    assert snaps["2"].gradient is not None and snaps["2"].shape == (8, 32)
    assert session.pinned == {}
    step, before = session.claim_pinned_before()  # the step before, the `_before` of a layer never drawn
    assert step == K - 1 and {s.name for s in before} == {"2", "3"}
    np.testing.assert_allclose({s.name: s for s in before}["2"].activation, seen[K - 1][:1].numpy(), rtol=1e-6)
    assert session.claim_pinned_before() is None


def test_no_copies_without_the_recorder_and_none_kept_after_close():
    net = _net()
    session = ProbeSession.from_model(net, ["2"], every_n_steps=1)
    with session:
        session.begin_step(0)
        net(torch.randn(4, 16)).sum().backward()
        session.end_step()
        assert session.recent is None and session._kept == {}
    session.record_recent(True)
    with session:
        session.begin_step(1)
        net(torch.randn(4, 16)).sum().backward()
        session.end_step()
        assert list(session._kept) == [1]
    assert session._kept == {}  # closed: no device memory held


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("on_finding", ["warn", "stop"])
def test_fit_draws_the_step_that_fired_beside_the_last_one_before(tmp_path, on_finding):
    net = _net()
    p = FeatureProbe(probes=["net.*"], every_n_steps=1, figure_every_n_steps=5, figures=("activations",),
                     save_dir=str(tmp_path / "probe"), log_every_n_steps=4, max_figure_layers=None,
                     on_finding=on_finding, figure_wait_s=None, signals=("activation", "gradient"))
    with pytest.warns(Warning):
        trainer(tmp_path, callbacks=[p], max_steps=12).fit(StepAware(net, lr=0.0), make_loader(n=192))
    cause = [f for f in p.findings if f.cause][0]
    assert (cause.layer, cause.step, cause.kind) == ("net.2", K, "exploding")
    d = tmp_path / "probe" / "net.2"
    at, before, latest = _png(d / "activations_at.png"), _png(d / "activations_before.png"), \
        _png(d / "activations.png")
    assert not np.array_equal(at, before)
    if on_finding == "warn":  # training went on: the newest figure (step 10) is not the step that fired
        assert not np.array_equal(at, latest)
    assert not (tmp_path / "probe" / "net.0" / "activations_at.png").exists()  # no finding there
    html = (tmp_path / "probe" / "report.html").read_text()
    assert f"at the step that fired · step {K}" in html


def test_a_healthy_run_pins_nothing(tmp_path):
    torch.manual_seed(0)
    p = FeatureProbe(probes=["net.*"], every_n_steps=1, figure_every_n_steps=5, figures=("activations",),
                     save_dir=str(tmp_path / "probe"), log_every_n_steps=4)
    trainer(tmp_path, callbacks=[p], max_steps=8).fit(Classifier(mlp(depth=3)), make_loader(n=128))
    assert p.findings == [] and p.session.pinned == {}
    assert not list((tmp_path / "probe").glob("*/*_at.png"))


def test_a_relative_explosion_alarms_at_its_step_once_the_median_is_known():
    """x1e4 at step 9 stays below the absolute bound (1e6) but is beyond 1000x the stream's running median:
    the growth rule's bound is used by the per-step alarm once a flush has seen 5 steps."""
    global BIG
    net = _net()
    net[2].k = 9
    session = ProbeSession.from_model(net, ["2", "3"], every_n_steps=1)
    session.record_recent(True)
    alarms, found = [], []
    old, BIG = BIG, 1e4
    try:
        with session:
            for step in range(12):
                net[2].step = step
                session.begin_step(step)
                with torch.no_grad():
                    x = torch.randn(8, 16)
                net(x).square().mean().backward()
                net.zero_grad()
                session.end_step()
                alarms.append(session.sentinel_alarm(1e6))
                if step % 4 == 3:
                    found += session.flush()
    finally:
        BIG = old
    assert [s for s in alarms if s is not None] == [9]
    spike = [f for f in found if f.kind == "exploding" and f.signal == "activation"]
    assert spike and (spike[0].layer, spike[0].step) == ("2", 9) and spike[0].value < 1e6
    assert session.claim_pinned(9)[0].step == 9


@pytest.mark.parametrize("shape,layout", [((5, 100), "auto"), ((3, 70, 4, 4), "auto"), ((2, 7, 90), "channels_last"),
                                          ((80,), "auto"), ((1, 3, 4, 4), "auto"), ((4, 3, 10), "channels_first")])
def test_device_part_is_what_the_figure_shows_and_owns_its_memory(shape, layout):
    from lit_probe.snapshots import device_part, snapshot_tensor

    x = torch.randn(*shape, requires_grad=True)
    part = device_part(x, 1, 64, layout=layout)
    want = snapshot_tensor(x, 1, 64, layout=layout)
    assert not part.requires_grad and part.untyped_storage().nbytes() < x.untyped_storage().nbytes() or x.numel() <= 64
    np.testing.assert_array_equal(snapshot_tensor(part, 1, 64, layout=layout), want)
    with torch.no_grad():
        x.mul_(0)  # an in-place op after the hook (ReLU(inplace=True)) does not reach the copy
    np.testing.assert_array_equal(snapshot_tensor(part, 1, 64, layout=layout), want)
    assert device_part(torch.ones(3, dtype=torch.int64), 1, 64) is None and device_part(torch.tensor(1.0), 1, 64) is None


@pytest.mark.parametrize("shape,layout", [((5, 100), "auto"), ((6, 8), "auto"), ((3, 70, 4, 4), "auto"),
                                          ((4, 3, 4, 4), "auto"), ((2, 7, 90), "channels_last")])
def test_the_recorders_ring_keeps_each_steps_part_in_its_own_buffer(shape, layout):
    """RecentParts.keep over more steps than its ring: every step's part is what the figure shows of that step's
    tensor (the oracle: snapshot_tensor), a later in-place op does not reach it, and a part stays as it was until
    its buffer comes round again (the first samples alone, on the CPU, take one narrow_copy into the buffer;
    other parts a strided copy)."""
    from lit_probe.snapshots import RecentParts, snapshot_tensor

    ring = RecentParts(1, 64)
    torch.manual_seed(0)
    kept, want = [], []
    for step in range(2 * RecentParts.DEPTH + 1):
        ring.advance()
        x = torch.randn(*shape, requires_grad=True)
        if step % 2:  # a non-contiguous tensor of the same shape (a transposed view), the same plan
            x = torch.randn(*reversed(shape)).permute(*reversed(range(len(shape)))).requires_grad_()
        with torch.no_grad():
            part, seen = ring.keep(0, x.detach(), layout)
        assert seen == x.shape and part is not None and not part.requires_grad
        want.append(snapshot_tensor(x, 1, 64, layout=layout))
        with torch.no_grad():
            x.mul_(0)  # an in-place op after the hook
        kept.append(part)
        for back in range(min(RecentParts.DEPTH, len(kept))):  # the parts still in the ring are intact
            np.testing.assert_array_equal(snapshot_tensor(kept[-1 - back], 1, 64, layout=layout), want[-1 - back])


class _WritesAfterItsHook(nn.Module):
    """A Linear whose output a later module changes in place at step ``at`` only (``ReLU(inplace=True)`` on one
    step): what a stream held by reference must never show."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.lin = nn.Linear(32, 32)
        self.at, self.step = at, -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        z = y.tanh()
        if self.step == self.at:
            with torch.no_grad():
                y.mul_(0)  # written to after `lin`'s hook (tanh has read it; its backward needs only its result)
        return z


def test_the_recorder_holds_small_streams_nothing_writes_to_and_copies_the_rest():
    """Small CPU tensors are held by reference (no copy) once a step showed that nothing writes to them after their
    hook; a stream written to in place after its hook (ReLU(inplace=True) on a Linear's output) stays copied; a held
    tensor written to later anyway gives no part, never a wrong one, and is copied from then on. The oracle: clones
    taken by plain forward hooks, registered before the probe's."""
    from lit_probe.snapshots import snapshot_tensor

    torch.manual_seed(0)
    at = 6
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(inplace=True), _WritesAfterItsHook(at), nn.Linear(32, 4))
    seen: dict[str, torch.Tensor] = {}
    for name in ("0", "2.lin", "3"):
        net.get_submodule(name).register_forward_hook(
            lambda m, i, o, _n=name: seen.__setitem__(_n, o.detach().clone()))
    session = ProbeSession.from_model(net, ["0", "2.lin", "3"], every_n_steps=1)
    session.record_recent(True, samples=1, channels=64)
    act = {n: session._slots[(session.names.index(n), 0, SIGNAL_ACT)] for n in ("0", "2.lin", "3")}
    with session:
        for step in range(at + 3):
            net[2].step = step
            session.begin_step(step)
            net(torch.randn(8, 16)).square().mean().backward()
            session.end_step()
            held = {n for n, slot in act.items() if len(session.recent[slot]) == 3}
            if step == 0:
                assert held == set()  # the first step: every stream on probation, copied
            elif step < at:
                assert held == {"2.lin", "3"}  # `0` is written to by ReLU(inplace=True): copied
            want = {n: snapshot_tensor(seen[n], 1, 64) for n in act}
            at_step, snaps = session.claim_recent(step)
            assert at_step == step
            got = {s.name: s.activation for s in snaps}
            for n in act:
                if step == at and n == "2.lin":  # held, then written to after its hook: no part rather than a wrong one
                    assert got.get(n) is None
                else:
                    np.testing.assert_array_equal(got[n], want[n])
            assert snaps[0].gradient is not None
        assert act["2.lin"] not in session._ring.held and act["3"] in session._ring.held  # copied since step `at`
        assert len(session.recent[act["2.lin"]]) == 2
    assert session._ring._probation == [] and session._kept == {}  # closed: nothing held


def test_the_recorder_holds_no_more_than_its_budget_per_step(monkeypatch):
    """At most HELD_PER_STEP elements are held per step (the rest copied, every part still right), so the last steps
    keep a bounded amount of memory alive."""
    from lit_probe.snapshots import RecentParts, snapshot_tensor

    monkeypatch.setattr(RecentParts, "HELD_PER_STEP", 2 * 8 * 32)  # two [8, 32] tensors a step
    torch.manual_seed(0)
    net = mlp(depth=4)  # Linear, ReLU pairs and a head: every stream [8, 32] but the head's [8, 4]
    seen: dict[int, torch.Tensor] = {}
    session = ProbeSession.from_model(net, ["0", "2", "4", "6"], every_n_steps=1)
    for k, name in enumerate(["0", "2", "4", "6"]):
        net.get_submodule(name).register_forward_hook(lambda m, i, o, _k=k: seen.__setitem__(_k, o.detach().clone()))
    session.record_recent(True, samples=1, channels=64)
    with session:
        for step in range(4):
            session.begin_step(step)
            net(torch.randn(8, 16)).sum().backward()
            session.end_step()
            held = [e for e in session.recent.values() if len(e) == 3]
            assert sum(e[0].numel() for e in held) <= RecentParts.HELD_PER_STEP
            if step:
                assert len(held) == 2
            snaps = {s.name: s for s in session.claim_recent(step)[1]}
            for k, name in enumerate(["0", "2", "4", "6"]):
                np.testing.assert_array_equal(snaps[name].activation, snapshot_tensor(seen[k], 1, 64))
