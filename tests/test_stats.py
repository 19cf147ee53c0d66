"""The on-device reductions against a plain-torch reference (stats.py + history.derive)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lit_probe.history import STATS, derive, nonfinite_flags
from lit_probe.stats import StatBuffer


def reference(ts: list[torch.Tensor]) -> dict[str, float]:
    x = torch.cat([t.detach().double().reshape(-1) for t in ts])
    finite = torch.isfinite(x)
    return {"count": x.numel(), "nonfinite": int((~finite).sum()), "zero_fraction": float((x == 0).double().mean()),
            "mean": float(x.mean()), "rms": float(x.pow(2).mean().sqrt()), "absmax": float(x.abs().max()),
            "min": float(x.min()), "max": float(x.max())}


def run(ts: list[torch.Tensor], full: bool = True, cdim: int | None = 1):
    buf = StatBuffer(slots=2, rows=4)
    buf.begin_step(7)
    for t in ts:
        buf.observe(0, t, full, cdim)
    host, units = buf.read()
    d = derive(host, np.array([False, True]), np.array([True, False]))
    return {s: float(d.values[0, 0, i]) for i, s in enumerate(STATS)}, d, units, buf


CASES = {
    "conv": [torch.randn(4, 8, 5, 5)],
    "relu-like": [torch.relu(torch.randn(4, 8, 5, 5))],
    "linear": [torch.randn(6, 10)],
    "two-calls": [torch.randn(3, 4, 2, 2), torch.randn(5, 4, 2, 2) * 3],
    "bf16": [torch.randn(4, 8, 3, 3).to(torch.bfloat16)],
    "fp16-large": [torch.full((4, 8), 300.0, dtype=torch.float16)],  # (x*x).mean() overflows in fp16
    # each call's sum of squares (2e38) fits float32, both together do not: the calls add up in float64
    "fp32-large": [torch.full((4, 8), 2.5e18), torch.full((4, 8), -2.5e18)],
    "float64": [torch.randn(5, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)],
    "three-calls": [torch.randn(2, 4), torch.zeros(3, 4), torch.randn(1, 4) * 10],
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_full_statistics_match_reference(case):
    ts = CASES[case]
    got, _, _, _ = run(ts, cdim=1 if ts[0].dim() == 4 else ts[0].dim() - 1)
    ref = reference(ts)
    assert got["calls"] == len(ts) and got["count"] == ref["count"]
    for k in ("mean", "rms", "absmax", "min", "max", "zero_fraction"):
        assert math.isclose(got[k], ref[k], rel_tol=1e-4, abs_tol=1e-6), (k, got[k], ref[k])
    assert got["nonfinite"] == 0
    assert all(math.isfinite(got[k]) for k in ("mean", "rms", "absmax"))


def test_a_step_read_between_its_calls_adds_up_like_one():
    """Gradient accumulation: the per-step alarm reads (commits) the row between a step's batches; the sums, norms
    and counts of the calls before and after it add up to the reference of all of them."""
    ts = [torch.randn(3, 4, 2, 2), torch.relu(torch.randn(5, 4, 2, 2)) * 3, torch.randn(2, 4, 2, 2)]
    buf = StatBuffer(slots=2, rows=4)
    buf.begin_step(7)
    for t in ts:
        buf.observe(0, t, True, 1)
        assert buf.peek() is not None
    host, _ = buf.read()
    d = derive(host, np.array([False, True]), np.array([True, False]))
    got = {s: float(d.values[0, 0, i]) for i, s in enumerate(STATS)}
    ref = reference(ts)
    for k in ("mean", "rms", "absmax", "min", "max", "zero_fraction"):
        assert math.isclose(got[k], ref[k], rel_tol=1e-5, abs_tol=1e-7), (k, got[k], ref[k])


def test_nonfinite_count_and_flag():
    t = torch.randn(2, 3, 4, 4)
    t[0, 1, 2, 2] = float("nan")
    t[1, 0, 0, 0] = float("inf")
    t[1, 2, 3, 3] = -float("inf")
    got, d, _, _ = run([t])
    assert got["nonfinite"] == 3
    assert nonfinite_flags(d)[0, 0]


def test_sentinel_step_has_min_max_only():
    t = torch.randn(4, 8)
    t[0, 0] = float("nan")
    got, d, _, _ = run([t], full=False)
    assert math.isnan(got["rms"]) and math.isnan(got["zero_fraction"])  # not measured
    assert nonfinite_flags(d)[0, 0]  # but the NaN is seen


def test_unit_activity_tracks_positive_units():
    t = torch.randn(4, 6, 3, 3).abs() + 0.1
    t[:, 2] = 0.0  # channel 2 never fires
    t[:, 4] = -1.0  # channel 4 never positive
    _, _, units, buf = run([t], cdim=1)
    last = units[0]
    assert last.shape == (6,)
    assert last[2] == 7 and last[4] == 7  # first seen at step 7, never fired since
    buf.begin_step(30)
    t2 = t.clone()
    buf.observe(0, t2, True, 1)
    _, units = buf.read()
    np.testing.assert_array_equal(units[0], [30, 30, 7, 30, 7, 30])


def test_gradient_slots_are_unscaled():
    buf = StatBuffer(slots=2, rows=4)
    buf.begin_step(0)
    g = torch.randn(8, 8)
    buf.observe(1, g * 1024.0, True, None)
    buf.record_scale(torch.tensor(1024.0), end=False)
    buf.record_scale(torch.tensor(1024.0), end=True)
    host, _ = buf.read()
    d = derive(host, np.array([False, True]), np.array([True, False]))
    rms = d.values[0, 1, STATS.index("rms")]
    assert math.isclose(rms, float(g.pow(2).mean().sqrt()), rel_tol=1e-4)
    assert d.values[0, 1, STATS.index("skipped")] == 0


def test_skipped_step_is_marked():
    buf = StatBuffer(slots=2, rows=4)
    buf.begin_step(3)
    buf.observe(1, torch.full((4,), float("inf")), False, None)
    buf.record_scale(torch.tensor(65536.0), end=False)
    buf.record_scale(torch.tensor(32768.0), end=True)  # the scaler backed off: the step was skipped
    host, _ = buf.read()
    d = derive(host, np.array([False, True]), np.array([True, False]))
    assert d.values[0, 1, STATS.index("skipped")] == 1


def test_ring_reads_every_pending_row_once():
    buf = StatBuffer(slots=1, rows=5)
    for step in range(4):
        buf.begin_step(step)
        buf.observe(0, torch.full((3,), float(step + 1)), True, None)
    host, _ = buf.read()
    assert list(host.steps) == [0, 1, 2, 3]
    assert list(host.dev[:, 0, 5]) == [1, 2, 3, 4]  # max column
    host, _ = buf.read()
    assert len(host.steps) == 0
    buf.begin_step(4)  # gradient accumulation: the same step twice is one row
    buf.observe(0, torch.ones(2), True, None)
    buf.begin_step(4)
    buf.observe(0, torch.ones(2) * 5, True, None)
    host, _ = buf.read()
    assert list(host.steps) == [4] and host.calls[0, 0] == 2 and host.dev[0, 0, 5] == 5


def test_counts_on_large_tensors_are_sampled_but_the_flag_is_exact():
    torch.manual_seed(0)
    t = torch.relu(torch.randn(64, 32, 16, 16))  # 524k elements: counts over the first samples
    t[40, 3, 2, 2] = float("nan")  # outside the counted samples
    got, d, _, _ = run([t])
    x = t[:40]
    assert abs(got["zero_fraction"] - float((x == 0).double().mean())) < 0.01
    assert nonfinite_flags(d)[0, 0] and got["nonfinite"] >= 1


def test_nan_steps_do_not_count_as_dead_units():
    t = torch.full((2, 3, 2, 2), float("nan"))
    _, _, units, _ = run([t], cdim=1)
    np.testing.assert_array_equal(units[0], [7, 7, 7])  # "fired" (unknown), not left behind


def test_sentinel_peek_flags_nonfinite_and_the_bound_but_not_untouched_slots():
    from lit_probe.stats import StatBuffer

    buf = StatBuffer(4, 4)
    buf.begin_step(0)
    buf.observe(0, torch.randn(8, 3), full=False)
    buf.observe(1, torch.full((2, 2), 5.0), full=False)
    peeked = buf.peek()
    assert peeked is not None and peeked[0] == 0 and peeked[2] is None  # CPU: a plain copy, no event
    assert not StatBuffer.alarm(peeked, bound=1e6)  # slots 2 and 3 never observed: not an alarm
    assert StatBuffer.alarm(peeked, bound=4.0)  # 5 > 4
    buf.observe(2, torch.tensor([1.0, float("nan")]), full=False)
    assert StatBuffer.alarm(buf.peek(), bound=1e6)  # NaN, exactly as min/max see it
    buf.begin_step(1)
    buf.observe(3, torch.tensor([float("-inf"), 0.0]), full=False)
    assert StatBuffer.alarm(buf.peek(), bound=1e6)  # -Inf, in the new row
    assert StatBuffer.alarm(buf.peek(), bound=math.inf)  # an infinite bound still flags -Inf
    assert StatBuffer.alarm(buf.peek(), bound=np.array([1e6, 1e6, 1e6, math.inf]))  # one per slot
    peeked = buf.peek()
    assert peeked is not None and not np.shares_memory(peeked[1].numpy(), buf._buf.numpy())  # a copy of the row
    host, _ = buf.read()
    assert np.isnan(host.dev[0, 2, 4:]).all() and host.dev[1, 3, 4] == -np.inf  # the rows kept their values


def test_statistics_and_figures_agree_on_the_units_of_a_relu_after_a_conv1d():
    """One rule for "which dimension holds the units" (lit_probe.vocab): a ReLU after a Conv1d has the Conv1d's
    channels as units, for the dead-unit windows and for the figure's layout alike."""
    from torch import nn

    from lit_probe import ProbeSession

    model = nn.Sequential(nn.Conv1d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 14, 5), nn.GELU())
    with ProbeSession.from_model(model, ["0", "1", "3", "4"], every_n_steps=1) as s:
        s.begin_step(0)
        s.request_snapshots(1, 64)
        model(torch.randn(4, 3, 16)).sum().backward()
        s.end_step()
        snaps = {x.name: x for x in s.take_snapshots()}
        s.flush()
    assert s.layouts == ["channels_first", "channels_first", "channels_last", "channels_last"]
    relu = s.slot_of("1", "activation")
    assert s.units[relu].size == 6  # the Conv1d's channels, not the 14 positions
    assert snaps["1"].layout == "channels_first" and snaps["1"].activation.shape == (1, 6, 14)
    assert s.dead_judged[relu] and not s.dead_judged[s.slot_of("4", "activation")]  # ReLU yes, GELU no
