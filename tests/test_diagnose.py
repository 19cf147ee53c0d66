"""Detectors as functions of statistics: table-driven, no Lightning, no hooks (but one real ProbeSession run on a
bare model, the last test, checks that the dead-unit thresholds a user sets take effect)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lit_probe import ProbeConfigError, ProbeSession
from lit_probe.diagnose import Diagnosis, Thresholds, diagnose as run_detectors
from lit_probe.findings import Finding, group_incidents, incidents_of
from lit_probe.history import derive
from lit_probe.stats import COLUMNS, HostRows

NAMES = ["a", "a", "b", "b", "c", "c"]
SIGNALS = ["activation", "gradient"] * 3


def rows(steps, absmax=None, l2=None, nonfinite_at=None, order=None, scale=None):
    """HostRows for 3 layers x 2 signals, every slot seen once per step with numel 100, full stats."""
    n, slots = len(steps), 6
    dev = np.zeros((n, slots, len(COLUMNS)), np.float32)
    am = np.ones((n, slots)) if absmax is None else np.asarray(absmax, float)
    dev[:, :, COLUMNS.index("max")] = am
    dev[:, :, COLUMNS.index("min")] = -am
    dev[:, :, COLUMNS.index("l2")] = 1.0 if l2 is None else np.asarray(l2, float)
    dev[:, :, COLUMNS.index("nonzero")] = 100
    for (i, s) in nonfinite_at or []:
        dev[i, s, COLUMNS.index("max")] = np.nan
        dev[i, s, COLUMNS.index("nonfinite")] = 5
    ones = np.ones((n, slots), np.int64)
    sc = np.full((n, 2), np.nan, np.float32) if scale is None else np.asarray(scale, np.float32)
    return HostRows(np.array(steps), dev, ones, ones * 100, ones, order or [list(range(slots))] * n, ones * 100, sc)


JUDGED = [True, False, True, False, True, False]  # activation streams of ReLU-like layers


def diagnose(host, units=None, first_seen=None, state=None, **thr):
    d = derive(host, np.array([s == "gradient" for s in SIGNALS]), np.array([s == "activation" for s in SIGNALS]))
    return run_detectors(state or Diagnosis(), d, units, first_seen, NAMES, SIGNALS, JUDGED,
                         Thresholds.from_dict(thr))


def test_nonfinite_first_in_forward_and_backward_order():
    host = rows(range(3), nonfinite_at=[(1, 2), (1, 4), (1, 5), (1, 1)],
                order=[[0, 2, 4, 5, 3, 1]] * 3)
    _, f = diagnose(host)
    assert [(x.layer, x.signal, x.step) for x in f] == [("b", "activation", 1), ("c", "gradient", 1)]
    assert f[0].extra["downstream"] == ["c"]


def test_nonfinite_reported_once_until_it_clears():
    host = rows(range(5), nonfinite_at=[(1, 0), (2, 0), (4, 0)])
    _, f = diagnose(host)
    assert [x.step for x in f] == [1, 4]


def test_exploding_absolute_and_growth():
    am = np.ones((10, 6))
    am[6:, 2] = 5000.0  # growth over the running median of 1
    am[8, 4] = 2e6  # absolute bound
    _, f = diagnose(rows(range(10), absmax=am))
    got = [(x.layer, x.signal, x.kind, x.step) for x in f]
    assert ("b", "activation", "exploding", 6) in got and ("c", "activation", "exploding", 8) in got
    assert len([x for x in got if x[0] == "b"]) == 1  # once, while it lasts


@pytest.mark.parametrize("seed", range(4))
def test_the_bulk_exploding_rule_is_the_row_loop(seed, monkeypatch):
    """The exploding rule over a read's rows all at once (:func:`lit_probe.diagnose._exploding_in_bulk`, the
    streams without an explosion in the read) gives the very findings and state of the row-by-row rule: 12 reads of
    50 rows with spikes, growth, NaN, unmeasured rows and GradScaler-skipped steps."""
    import lit_probe.diagnose as D

    rng = np.random.default_rng(seed)

    def reads():
        step, prev = 0, np.ones((20, 6))
        for r in range(12):
            # a drifting scale, so that which values are in a window decides its median
            am = np.exp(rng.normal(0, 0.2, size=(50, 6)) + np.linspace(0, 0.6, 50)[:, None] * (r % 2 * 2 - 1))
            for _ in range(6):  # a value just under (or over) 3x the median of the 20 values before it
                i, s = int(rng.integers(1, 50)), int(rng.integers(0, 6))
                am[i, s] = 3.0 * np.median(np.r_[am[:i, s], prev[:, s]][-20:]) * rng.choice([0.999, 1.001], p=[0.9, 0.1])
            if rng.random() < 0.3:
                am[rng.integers(0, 50), rng.integers(0, 6)] = 3e6  # over the absolute bound
            if r == 7:
                am[20:, 3] *= 50.0  # a lasting explosion, then back
                am[40:, 3] /= 50.0
            nan = [(int(rng.integers(0, 50)), int(rng.integers(0, 6)))] if r % 4 == 1 else None
            scale = np.full((50, 2), 1024.0, np.float32)
            if r % 3 == 2:
                scale[10, 1] = 512.0  # the scaler skipped this step
            host = rows(range(step, step + 50), absmax=am, nonfinite_at=nan, scale=scale)
            if r % 2:
                host.calls[rng.random((50, 6)) < 0.05] = 0  # not measured on that row
            prev = am
            yield host
            step += 50

    def run():
        st, found = Diagnosis(), []
        for host in reads():
            st, f = diagnose(host, state=st, growth_window=20, exploding_growth=3.0)
            found += f
        return st.state_dict(), [(x.step, x.layer, x.signal, x.kind, x.value, x.threshold, x.message) for x in found]

    bulk = run()
    rng = np.random.default_rng(seed)
    monkeypatch.setattr(D, "_exploding_in_bulk", lambda *a, **k: set())
    rows_only = run()
    assert bulk == rows_only
    assert sum(k == "exploding" for _, _, _, k, *_ in bulk[1]) >= 10


def test_growth_needs_history():
    am = np.ones((3, 6))
    am[1, 0] = 5000.0
    _, f = diagnose(rows(range(3), absmax=am))
    assert f == []


def test_vanishing_envelope_along_the_backward_path():
    l2 = np.ones((6, 6))
    l2[:, 1] = 1e-7  # layer a (the input end: last in backward order) gets a tiny gradient
    backward = [[0, 2, 4, 5, 3, 1]] * 6  # activations a, b, c; then gradients c, b, a
    _, f = diagnose(rows(range(6), l2=l2, order=backward))
    assert [(x.layer, x.signal, x.kind, x.step) for x in f] == [("a", "gradient", "vanishing", 4)]
    # a branch: b's gradient is tiny, but the path below it (a) carries a normal one -> not vanishing
    l2 = np.ones((6, 6))
    l2[:, 3] = 1e-7
    _, f = diagnose(rows(range(6), l2=l2, order=backward))
    assert f == []
    # a tiny gradient that recovers within the window is not vanishing; an exact zero is blocked, not vanishing
    l2 = np.ones((6, 6))
    l2[:, 1] = 1e-7
    l2[3, 1] = 1.0
    _, f = diagnose(rows(range(6), l2=l2, order=backward))
    assert f == []
    l2[:, 1] = 0.0
    _, f = diagnose(rows(range(6), l2=l2, order=backward))
    assert f == []


def test_detectors_are_pure_functions_of_state_and_statistics():
    host = rows(range(3), nonfinite_at=[(1, 2), (2, 2)])
    state = Diagnosis()
    before = state.state_dict()
    s1, f1 = diagnose(host, state=state)
    assert state.state_dict() == before  # the given state is never changed
    s2, f2 = diagnose(host, state=state)
    assert f1 == f2 and s1.state_dict() == s2.state_dict()
    # the returned state carries on: the same rows again report nothing new (still active)
    _, f3 = diagnose(rows([3], nonfinite_at=[(0, 2)]), state=s1)
    assert f3 == []


def test_skipped_gradscaler_step_is_not_a_finding():
    scale = np.array([[65536, 65536], [65536, 32768], [32768, 32768]], np.float32)
    host = rows(range(3), nonfinite_at=[(1, 1), (1, 3)], scale=scale)
    st, f = diagnose(host)
    assert f == [] and st.skipped_steps == [1]


def test_dead_window():
    last = np.array([0, 0, 0, 0, 0, 0, 0, 0], np.float32)
    alive = np.full(8, 29.0, np.float32)
    st, f = diagnose(rows([29]), {0: last, 2: alive, 4: last}, {0: 0, 2: 0, 4: 25})
    assert [(x.layer, x.kind, x.value, x.step) for x in f] == [("a", "dead", 1.0, 20)]
    assert math.isclose(st.dead_latest[2], 0.0)
    assert 4 not in st.dead_latest  # its window (from step 25) is not complete: no dead fraction yet


def test_only_relu_like_streams_are_judged_dead():
    never_positive = np.zeros(8, np.float32)
    _, f = diagnose(rows([29]), {1: never_positive, 3: never_positive}, {1: 0, 3: 0})
    assert f == []  # gradient slots / non-judged streams


def _f(step, layer, kind, signal="activation"):
    return Finding(step=step, layer=layer, signal=signal, kind=kind, value=1.0, threshold=1.0)


def test_incidents_group_one_root_cause_and_drop_contradictions():
    dead_before = Finding(step=20, layer="z", signal="activation", kind="dead", value=1.0, threshold=0.5,
                          extra={"since": 0})  # dead from step 0, before the explosion: a possible cause, kept
    new = [_f(2, "b", "exploding"), _f(2, "c", "exploding"), _f(2, "c", "vanishing", "gradient"),
           _f(3, "d", "nonfinite"), dead_before, _f(30, "e", "dead"), _f(400, "a", "exploding")]
    kept, dropped = group_incidents([], new)
    assert [(f.layer, f.kind, f.incident, f.cause) for f in kept] == [
        ("b", "exploding", 0, True), ("c", "exploding", 0, False), ("d", "nonfinite", 0, False),
        ("z", "dead", 1, True), ("a", "exploding", 2, True)]
    assert {(f.layer, f.kind) for f in dropped} == {("c", "vanishing"), ("e", "dead")}
    inc = incidents_of(kept)
    assert [(i.id, i.layer, i.step, i.layers) for i in inc] == [(0, "b", 2, ("c", "d")), (1, "z", 20, ()),
                                                               (2, "a", 400, ())]
    # later findings join the open incident across flushes
    more, _ = group_incidents(kept, [_f(420, "f", "exploding")])
    assert [(f.incident, f.cause) for f in more] == [(2, False)]


@pytest.mark.parametrize("bad", [{"dead_fraction": 0}, {"dead_window": 2.5}, {"exploding_growth": 0.5},
                                 {"vanishing_ratio": 2}, {"nope": 1}, {"min_history": True}])
def test_threshold_validation(bad):
    with pytest.raises(ProbeConfigError):
        Thresholds.from_dict(bad)


def test_gradient_findings_of_one_step_come_in_backward_order():
    am = np.ones((1, 6))
    am[0, [1, 3, 5]] = 2e6  # every gradient explodes at step 0
    backward = [[0, 2, 4, 5, 3, 1]]  # forward a, b, c; backward c, b, a
    _, f = diagnose(rows([0], absmax=am, order=backward))
    assert [(x.layer, x.signal) for x in f] == [("c", "gradient"), ("b", "gradient"), ("a", "gradient")]


# ------------------------------------------------------------------------ dead-unit thresholds that apply
def _units(n_units: int, n_dead: int) -> np.ndarray:
    """Last-fired step per unit at step 29: ``n_dead`` never fired (step 0), the rest fired at step 29."""
    last = np.full(n_units, 29.0, np.float32)
    last[:n_dead] = 0
    return last


@pytest.mark.parametrize("n_units, n_dead, thr, found", [
    (8, 3, {}, False),  # 4-15 units: the small-layer default 0.9 applies
    (8, 7, {}, False),  # 0.875 < 0.9
    (8, 8, {}, True),
    (8, 3, {"dead_fraction": 0.25}, True),  # the user's fraction applies to small layers too
    (8, 1, {"dead_fraction": 0.25}, False),  # 0.125 < 0.25
    (8, 3, {"dead_fraction": 0.25, "dead_fraction_small": 0.9}, False),  # ... unless the small one is set too
    (8, 4, {"dead_fraction_small": 0.5}, True),
    (8, 8, {"dead_fraction": 0.95}, True),
    (15, 7, {"dead_fraction": 0.45}, True),
    (16, 8, {}, True),  # from 16 units: dead_fraction (0.5)
    (16, 7, {}, False),
    (32, 8, {"dead_fraction": 0.25}, True),
    (32, 8, {"dead_fraction_small": 0.1}, False),  # the small-layer fraction never applies to large layers
    (3, 3, {}, False),  # fewer than dead_min_units (4): not judged
    (3, 3, {"dead_fraction": 0.25}, False),
    (3, 3, {"dead_min_units": 2}, True),
    (3, 1, {"dead_min_units": 1, "dead_fraction": 0.3}, True),
])
def test_dead_fraction_thresholds_apply(n_units, n_dead, thr, found):
    _, f = diagnose(rows([29]), {0: _units(n_units, n_dead)}, {0: 0}, **thr)
    assert [x.kind for x in f] == (["dead"] if found else [])
    if found:
        t = Thresholds.from_dict(thr)
        expected = t.dead_fraction_small if n_units < 16 else t.dead_fraction
        assert f[0].threshold == pytest.approx(expected) and f[0].value == pytest.approx(n_dead / n_units)
        assert f[0].extra["units"] == n_units and f[0].extra["dead_units"] == n_dead


@pytest.mark.parametrize("given, small", [
    ({}, 0.9),
    ({"dead_fraction": 0.25}, 0.25),
    ({"dead_fraction": 0.5}, 0.5),  # given explicitly: the user's fraction, even at its default value
    ({"dead_fraction": 0.95}, 0.95),  # the old max(dead_fraction, 0.9)
    ({"dead_fraction": 0.25, "dead_fraction_small": 0.8}, 0.8),
    ({"dead_fraction_small": 0.7}, 0.7),
])
def test_small_layer_fraction_follows_an_overridden_dead_fraction(given, small):
    t = Thresholds.from_dict(given)
    assert t.dead_fraction_small == small
    assert Thresholds.from_dict(t.to_dict()) == t  # a saved configuration reads back the same
    direct = Thresholds(**given)
    if given != {"dead_fraction": 0.5}:  # the dataclass cannot tell 0.5 given from the default
        assert direct == t


def test_defaults_are_unchanged():
    t = Thresholds()
    assert (t.dead_fraction, t.dead_fraction_small, t.dead_min_units) == (0.5, 0.9, 4)
    assert Thresholds.from_dict(None) == t


@pytest.mark.parametrize("bad", [{"dead_fraction_small": 0}, {"dead_fraction_small": 1.5},
                                 {"dead_fraction_small": "0.5"}, {"dead_min_units": 0},
                                 {"dead_min_units": 2.5}])
def test_small_layer_threshold_validation(bad):
    with pytest.raises(ProbeConfigError):
        Thresholds.from_dict(bad)


@pytest.mark.parametrize("thr, found", [({}, False), ({"dead_fraction": 0.25}, True),
                                        ({"dead_fraction": 0.25, "dead_fraction_small": 0.9}, False)])
def test_a_real_run_finds_3_of_8_dead_units_with_dead_fraction_025(thr, found):
    """A real ProbeSession over a bare model: 3 of the 8 ReLU units never fire (zero weights, bias -1)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        net[0].weight[:3] = 0.0
        net[0].bias[:3] = -1.0
        net[0].bias[3:] = 1.0  # the other 5 fire on (nearly) every sample
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    session = ProbeSession.from_model(net, ["1"], thresholds=thr)
    found_now = []
    with session:
        for step in range(25):
            session.begin_step(step)
            opt.zero_grad()
            nn.functional.cross_entropy(net(torch.randn(16, 16)), torch.randint(0, 4, (16,))).backward()
            opt.step()
            session.end_step()
            if step % 5 == 4:
                found_now += session.flush()
    dead = [f for f in found_now if f.kind == "dead"]
    assert [(f.layer, f.value) for f in dead] == ([("1", 3 / 8)] if found else [])
    if found:
        assert dead[0].threshold == 0.25 and dead[0].extra["dead_units"] == 3
    assert session.dead_fractions()["1"] == pytest.approx(3 / 8)
