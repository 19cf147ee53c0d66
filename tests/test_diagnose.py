"""Detectors as functions of statistics: table-driven, no Lightning, no hooks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lit_probe import ProbeConfigError
from lit_probe.diagnose import Diagnoser, Thresholds
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


def diagnose(host, **thr):
    dg = Diagnoser(NAMES, SIGNALS, Thresholds.from_dict(thr), dead_slots=[0, 2, 4])
    d = derive(host, np.array([s == "gradient" for s in SIGNALS]), np.array([s == "activation" for s in SIGNALS]))
    return dg, dg.update(d)


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


def test_growth_needs_history():
    am = np.ones((3, 6))
    am[1, 0] = 5000.0
    _, f = diagnose(rows(range(3), absmax=am))
    assert f == []


def test_vanishing_relative_to_largest_gradient():
    l2 = np.ones((6, 6))
    l2[:, 1] = 1e-7
    _, f = diagnose(rows(range(6), l2=l2))
    assert [(x.layer, x.signal, x.kind, x.step) for x in f] == [("a", "gradient", "vanishing", 4)]


def test_skipped_gradscaler_step_is_not_a_finding():
    scale = np.array([[65536, 65536], [65536, 32768], [32768, 32768]], np.float32)
    host = rows(range(3), nonfinite_at=[(1, 1), (1, 3)], scale=scale)
    dg, f = diagnose(host)
    assert f == [] and dg.skipped_steps == [1]


def test_dead_window():
    dg = Diagnoser(NAMES, SIGNALS, Thresholds(), dead_slots=[0, 2, 4])
    last = np.array([0, 0, 0, 0, 0, 0, 0, 0], np.float32)
    alive = np.full(8, 29.0, np.float32)
    d = derive(rows([29]), np.array([s == "gradient" for s in SIGNALS]), np.ones(6, bool))
    f = dg.update(d, {0: last, 2: alive}, {0: 0, 2: 0})
    assert [(x.layer, x.kind, x.value, x.step) for x in f] == [("a", "dead", 1.0, 20)]
    assert math.isclose(dg.dead_fraction_latest[2], 0.0)


@pytest.mark.parametrize("bad", [{"dead_fraction": 0}, {"dead_window": 2.5}, {"exploding_growth": 0.5},
                                 {"vanishing_ratio": 2}, {"nope": 1}, {"min_history": True}])
def test_threshold_validation(bad):
    with pytest.raises(ProbeConfigError):
        Thresholds.from_dict(bad)
