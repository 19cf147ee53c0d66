"""One unit axis (issue 19): the statistics, the figure snapshots, the flight recorder, the dead-unit masks
and the dead marks on a drawn figure all use the dimension :func:`lit_probe.vocab.unit_dim` names, for every
layout.

The bug: for a 3-D output whose layout no module before it tells (``auto``), the statistics counted units on
the last dimension while the figures and the flight recorder sliced dimension 1, so tokens were drawn as
channels, and a sequence heatmap marked no dead features.

Each case is a real small module followed by a ReLU whose units ``DEAD`` never fire (their pre-activation is a
large negative constant), run through :class:`~lit_probe.session.ProbeSession` in a plain loop. The unit
count ``C`` differs from every other dimension, and the figure cap ``CAP`` lies between them, so slicing the
wrong axis shows in the shapes.
"""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lit_probe.compose import Drawer, sample_view
from lit_probe.figures import DEAD_GID
from lit_probe.render import FigureRenderer
from lit_probe.session import ProbeSession
from lit_probe.snapshots import device_part, snapshot_tensor
from lit_probe.vocab import unit_count, unit_dim

C = 10  # units
CAP = 8  # units a figure shows (capture channels): below C, above every other dimension
DEAD = [2, 5]  # dead units (both shown: < CAP)
N, T, L, HW = 4, 6, 7, 5


def _kill(weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Units DEAD of a layer never fire after a ReLU: no weight, a large negative bias."""
    with torch.no_grad():
        weight[DEAD] = 0.0
        bias[DEAD] = -100.0


class Mix(nn.Module):
    """A custom token mixer whose type tells nothing about its layout (a leaf, no telling name):
    ``[B, T, F_in]`` -> ``[B, T, C]``."""

    def __init__(self, f_in: int, f_out: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(f_out, f_in) / f_in ** 0.5)
        self.b = nn.Parameter(torch.zeros(f_out))
        _kill(self.w, self.b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.t() + self.b


def _sequence_linear() -> tuple[nn.Module, torch.Tensor]:
    lin = nn.Linear(3, C)
    _kill(lin.weight, lin.bias)
    return nn.Sequential(lin, nn.ReLU()), torch.randn(N, T, 3)


def _sequence_custom() -> tuple[nn.Module, torch.Tensor]:
    return nn.Sequential(Mix(3, C), nn.ReLU()), torch.randn(N, T, 3)


def _conv1d() -> tuple[nn.Module, torch.Tensor]:
    conv = nn.Conv1d(3, C, 3, padding=1)
    _kill(conv.weight, conv.bias)
    return nn.Sequential(conv, nn.ReLU()), torch.randn(N, 3, L)


def _cnn() -> tuple[nn.Module, torch.Tensor]:
    conv = nn.Conv2d(3, C, 3, padding=1)
    _kill(conv.weight, conv.bias)
    return nn.Sequential(conv, nn.ReLU()), torch.randn(N, 3, HW, HW)


# name: (model, expected layout of the probed ReLU, expected unit axis of its output)
CASES = {
    "sequence-after-linear": (_sequence_linear, "channels_last", 2),
    "sequence-after-custom-module": (_sequence_custom, "auto", 2),
    "conv1d": (_conv1d, "channels_first", 1),
    "image-cnn": (_cnn, "channels_first", 1),
}


def _run(make, steps: int = 6):
    """Probe the ReLU ("1") for ``steps`` steps; snapshots requested on the last step, flight recorder on."""
    torch.manual_seed(0)
    net, x = make()
    seen: dict[int, torch.Tensor] = {}
    net[1].register_forward_hook(lambda m, i, o: seen.__setitem__(0, o.detach().clone()))
    session = ProbeSession.from_model(net, ["1"], every_n_steps=1, thresholds={"dead_window": 2})
    session.record_recent(True, samples=2, channels=CAP)
    with session:
        for step in range(steps):
            session.begin_step(step)
            if step == steps - 1:
                session.request_snapshots(samples=2, channels=CAP)
            net(x).square().mean().backward()
            net.zero_grad()
            session.end_step()
            session.flush()
        (snap,) = session.take_snapshots()
        (recorded,) = session._snapshots(session._kept[steps - 1], steps - 1, device=True)
    return session, snap, recorded, seen[0]


@pytest.mark.parametrize("case", list(CASES))
def test_statistics_snapshots_recorder_and_dead_masks_use_one_axis(case):
    make, layout, axis = CASES[case]
    session, snap, recorded, out = _run(make)
    assert session.layouts == [layout]
    assert unit_dim(layout, out.dim()) == axis
    slot = session.slot_of("1", "activation")
    # statistics: one unit window per unit on that axis
    assert len(session.units[slot]) == unit_count(layout, out.shape) == out.shape[axis] == C
    # dead masks: per unit, the dead ones
    mask = session.dead_masks()[slot]
    assert mask.shape == (C,) and list(np.flatnonzero(mask)) == DEAD
    assert snap.dead is not None and list(np.flatnonzero(snap.dead)) == DEAD and snap.layout == layout
    # the figure snapshot: the first samples, the first CAP units of that axis, every other dimension whole
    want = out[:2].narrow(axis, 0, CAP).numpy()
    assert snap.activation.shape == want.shape and snap.shape == tuple(out.shape)
    np.testing.assert_array_equal(snap.activation, want)
    np.testing.assert_array_equal(snapshot_tensor(out, 2, CAP, layout=layout), want)
    # the flight recorder keeps the same part on the device, and gives the same figure input
    np.testing.assert_array_equal(device_part(out, 2, CAP, layout=layout).numpy(), want)
    np.testing.assert_array_equal(recorded.activation, want)
    assert recorded.gradient is not None and recorded.gradient.shape == want.shape
    # unit k of the snapshot is unit k of the mask: the dead ones are zero everywhere, the others fire
    for k in range(CAP):
        fired = np.take(snap.activation, k, axis=axis).max() > 0
        assert fired != (k in DEAD), k


def _dead_marks(fig) -> list:
    return [c for ax in fig.axes for c in ax.collections if c.get_gid() == DEAD_GID]


@pytest.mark.parametrize("case", list(CASES))
def test_the_drawn_activation_figure_marks_the_dead_units_on_that_axis(case):
    make, layout, axis = CASES[case]
    _, snap, _, _ = _run(make)
    view, channel_axis = sample_view(snap.activation, layout)
    drawer = Drawer(dpi=100, bins=30, max_channels=64)
    ((_, figure, _, draw),) = drawer.layer(5, "1", snap.activation, None, snap.dead, snap.layout, snap.shape,
                                           ["activations"])
    fig = draw()
    assert figure == "activations"
    title = fig.get_suptitle()
    unit = "features" if axis == 2 else "channels"
    assert f"first {CAP} of {C} {unit}" in title, title
    (ax,) = [a for a in fig.axes if a.images and a.get_label() != "<colorbar>"]
    assert f"dead (red): {len(DEAD)}/{CAP}" in ax.get_title()
    (marks,) = _dead_marks(fig)
    if snap.activation.ndim == 4:  # tiles: each dead channel framed and crossed (4 + 2 segments)
        assert view.shape == (CAP, HW, HW) and channel_axis is None
        assert len(marks.get_segments()) == 6 * len(DEAD)
    else:  # a heatmap: each dead unit's whole column (features) or row (channels) hatched
        rows, cols = view.shape
        assert view.shape == ((T, CAP) if axis == 2 else (CAP, L)) and channel_axis == (1 if axis == 2 else 0)
        assert marks.get_hatch() == "xx"
        boxes = sorted(tuple(np.round(p.get_extents().bounds, 3)) for p in marks.get_paths())
        if axis == 2:
            assert boxes == [(k - 0.5, -0.5, 1.0, float(rows)) for k in DEAD]  # every token of the feature
        else:
            assert boxes == [(-0.5, k - 0.5, float(cols), 1.0) for k in DEAD]


class _Sink:
    def __init__(self) -> None:
        self.pngs: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def write_png(self, layer, figure, png, step):
        with self.lock:
            self.pngs[layer] = png


def _red_columns(png: bytes) -> np.ndarray:
    """Per pixel column of the PNG, how many pixels are the dead-mark red."""
    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return ((a[..., 0] > 200) & (a[..., 1] < 80) & (a[..., 2] < 80)).sum(axis=0)


@pytest.mark.parametrize("case", ["sequence-after-linear", "sequence-after-custom-module"])
def test_a_sequence_png_crosses_out_its_dead_features(case):
    make, _, _ = CASES[case]
    _, snap, _, _ = _run(make)
    sink = _Sink()
    r = FigureRenderer([sink], figures=("activations",), max_channels=64, backend="thread")
    assert r.submit_layer(5, "dead", snap.activation, None, snap.dead, layout=snap.layout, shape=snap.shape)
    assert r.submit_layer(5, "alive", snap.activation, None, np.zeros(C, bool), layout=snap.layout,
                          shape=snap.shape)
    assert r.close(timeout=60) and r.errors == []
    dead, alive = _red_columns(sink.pngs["dead"]), _red_columns(sink.pngs["alive"])
    assert alive.sum() == 0  # viridis has no red: nothing marked without dead units
    # two hatched columns: each framed (two pixel columns red down the height of the map, one feature apart:
    # the map is ~800 px wide for CAP features) and hatched (red in every pixel column between),
    # DEAD[1] - DEAD[0] features apart
    edges = np.flatnonzero(dead > 0.8 * dead.max())
    runs = np.split(edges, np.flatnonzero(np.diff(edges) > 3) + 1)
    assert dead.max() > 100 and len(runs) == 2 * len(DEAD), edges
    (left0, right0), (left1, right1) = [(runs[k][0], runs[k + 1][-1]) for k in (0, 2)]
    width = right0 - left0
    assert 900 / CAP / 2 < width < 900 / CAP and right1 - left1 == pytest.approx(width, abs=2)
    assert left1 - left0 == pytest.approx((DEAD[1] - DEAD[0]) * width, rel=0.05)
    assert (dead[left0:right0] > 0).all() and (dead[left1:right1] > 0).all()
    assert not (dead[right0 + 2:left1 - 1] > 0.8 * dead.max()).any()
