"""Tests for lit_probe.render (the figure queue, both backends) and lit_probe.snapshots."""

from __future__ import annotations

import gc
import io
import pickle
import threading
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from lit_probe.render import FIGURE_KINDS, TIMELINE_LAYER, FigureRenderer
from lit_probe.snapshots import layout_for_module, snapshot_tensor


def _render_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("lit-probe-render")]


@pytest.fixture(autouse=True)
def _no_render_thread_left():
    yield
    assert _render_threads() == [], "a render thread outlived its test"


class RecordingSink:
    def __init__(self):
        self.calls: list[tuple[str, str, bytes, int, str]] = []
        self.lock = threading.Lock()

    def write_png(self, layer, figure, png, step):
        with self.lock:
            self.calls.append((layer, figure, png, step, threading.current_thread().name))


class BrokenSink:
    def write_png(self, layer, figure, png, step):
        raise RuntimeError("sink is broken")


def _open(png: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(png))
    img.load()
    return img


# ---------------------------------------------------------------------------------------------------
# the drawing thread (backend="thread", and the fallback when no process can be started)
# ---------------------------------------------------------------------------------------------------
def test_thread_backend_starts_lazily_draws_in_one_non_daemon_thread_and_ends_when_idle():
    sink = RecordingSink()
    r = FigureRenderer([sink], figures=("activations",), backend="thread")
    assert _render_threads() == []  # nothing before the first submit
    gate = threading.Event()
    sink.write_png = lambda *a, _w=sink.write_png: (gate.wait(10), _w(*a))
    assert r.submit_layer(0, "a", _snap((1, 2, 4, 4)), None)
    (t,) = _render_threads()
    assert t.name == "lit-probe-render" and not t.daemon  # joined, never abandoned
    gate.set()
    assert r.drain(30)
    t.join(10)  # the queue is empty: the thread ends by itself
    assert not t.is_alive()
    assert r.submit_layer(1, "a", _snap((1, 2, 4, 4)), None)  # and a new one starts for the next job
    assert r.close()
    assert [(c[0], c[3], c[4]) for c in sink.calls] == [("a", step, "lit-probe-render") for step in (0, 1)]
    assert r.completed == 2 and r.errors == []


def test_thread_backend_close_is_idempotent_and_the_renderer_reusable():
    sink = RecordingSink()
    r = FigureRenderer([sink], figures=("activations",), backend="thread")
    assert r.close()  # never started
    for step in range(3):  # three "fits"
        r.submit_layer(step, "a", _snap((1, 2, 4, 4)), None)
        assert r.close() and r.close()
        assert _render_threads() == []
    assert [c[3] for c in sink.calls] == [0, 1, 2]


def test_thread_backend_close_times_out_on_a_hung_sink_and_cancels_the_queue():
    entered, gate = threading.Event(), threading.Event()

    class HungSink(RecordingSink):
        def write_png(self, *a):
            entered.set()
            gate.wait(20)
            super().write_png(*a)

    r = FigureRenderer([HungSink()], figures=("activations",), backend="thread")
    for i in range(3):
        assert r.submit_layer(0, f"l{i}", _snap((1, 2, 4, 4)), None)
    assert entered.wait(30)  # the first job is in the sink, the other two queued
    assert r.drain(0.05) is False
    assert r.close(timeout=0.1) is False
    assert any("did not stop" in e for e in r.errors)
    assert r.dropped == 2 and [(s.layer, s.reason) for s in r.skipped] == [("l1", "fit end timeout"),
                                                                             ("l2", "fit end timeout")]
    gate.set()
    assert r.close(timeout=10)
    assert _render_threads() == []


def test_bad_max_queue():
    with pytest.raises(ValueError):
        FigureRenderer([], max_queue=0)


# ---------------------------------------------------------------------------------------------------
# FigureRenderer
# ---------------------------------------------------------------------------------------------------
def _snap(shape, seed=0, relu=True):
    v = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return np.maximum(v, 0) if relu else v


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_renderer_draws_every_kind_and_feeds_every_sink(backend):
    a, b = RecordingSink(), RecordingSink()
    r = FigureRenderer([a, b], max_queue=8, backend=backend)
    dead = np.zeros(8, dtype=bool)
    dead[1] = True
    assert r.submit_layer(3, "layer1", _snap((2, 8, 6, 6)), _snap((2, 8, 6, 6), 1, relu=False), dead=dead,
                          shape=(32, 8, 6, 6))
    assert r.submit_layer(3, "layer2", _snap((2, 8, 6, 6), 2), _snap((2, 8, 6, 6), 3, relu=False))
    r.drain()
    r.close()
    assert r.errors == [] and r.dropped == 0
    for sink in (a, b):
        got = {(layer, fig) for layer, fig, *_ in sink.calls}
        assert got == {(layer, fig) for layer in ("layer1", "layer2")
                       for fig in ("activations", "gradients", "histograms")}
        assert {c[3] for c in sink.calls} == {3}
        assert all(c[4] == "lit-probe-render" for c in sink.calls)  # drawn off the training thread
    imgs = {(layer, fig): _open(png) for layer, fig, png, *_ in a.calls}
    assert all(800 <= im.size[0] <= 1000 for im in imgs.values())
    x1 = np.asarray(imgs[("layer1", "activations")].convert("RGB"))
    x2 = np.asarray(imgs[("layer2", "activations")].convert("RGB"))
    assert x1.shape == x2.shape and np.mean(x1 != x2) > 0.02


@pytest.mark.parametrize(
    "shape, layout",
    [((4, 16), "auto"), ((2, 8, 50), "auto"), ((2, 12, 16), "channels_last"), ((1, 4, 3, 5, 5), "auto"),
     ((5,), "auto")],
)
def test_renderer_layouts(shape, layout):
    sink = RecordingSink()
    r = FigureRenderer([sink], figures=("activations", "gradients", "histograms"))
    r.submit_layer(0, "x", _snap(shape), _snap(shape, 1, relu=False), layout=layout)
    r.close()
    assert r.errors == []
    assert {c[1] for c in sink.calls} == {"activations", "gradients", "histograms"}


def test_renderer_respects_requested_figures_and_missing_inputs():
    sink = RecordingSink()
    r = FigureRenderer([sink], figures=("histograms",))
    r.submit_layer(1, "x", _snap((2, 4, 5, 5)), None)
    assert r.submit_layer(1, "y", None, None) is False
    ones = np.ones((1, 2))
    assert r.submit_timeline(1, ["x"], np.arange(2), ones, ones, ones * 0, []) is False
    r.close()
    assert [(c[0], c[1]) for c in sink.calls] == [("x", "histograms")]
    with pytest.raises(ValueError, match="unknown figure"):
        FigureRenderer([sink], figures=("activations", "heatmap"))


def test_renderer_timeline():
    sink = RecordingSink()
    r = FigureRenderer([sink])
    act = np.ones((2, 5))
    assert r.submit_timeline(7, ["a", "b"], np.arange(5), act, act * 1e-3, act * 0, [("a", 2, "dead")])
    act[:] = np.nan  # the renderer copied its inputs
    r.close()
    assert [(c[0], c[1], c[3]) for c in sink.calls] == [(TIMELINE_LAYER, "timeline", 7)]
    assert "timeline" in FIGURE_KINDS


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_renderer_uses_one_color_scale_per_layer_and_figure(backend):
    sink = RecordingSink()
    r = FigureRenderer([sink], backend=backend)
    r.submit_layer(0, "x", _snap((1, 4, 6, 6)), _snap((1, 4, 6, 6), relu=False))
    r.submit_layer(1, "x", _snap((1, 4, 6, 6)) * 0.1, _snap((1, 4, 6, 6), relu=False) * 10)
    r.close()
    act = r._scales[("x", "activations")].range
    grad = r._scales[("x", "gradients")].range
    assert act is not None and act[0] <= 0.0
    assert grad is not None and grad[0] == -grad[1] and grad[1] > 5  # widened by the larger gradient


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_a_broken_sink_is_recorded_and_others_still_get_images(backend):
    good = RecordingSink()
    r = FigureRenderer([BrokenSink(), good], figures=("activations",), backend=backend)
    r.submit_layer(0, "x", _snap((1, 4, 6, 6)), None)
    r.close()
    assert len(good.calls) == 1
    assert any("sink is broken" in e for e in r.errors)


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_renderer_drops_when_full_and_counts(backend):
    gate = threading.Event()

    class SlowSink(RecordingSink):
        def write_png(self, *a):
            gate.wait(10)
            super().write_png(*a)

    sink = SlowSink()
    r = FigureRenderer([sink], figures=("activations",), max_queue=1, backend=backend)
    assert r.submit_layer(0, "a", _snap((1, 2, 4, 4)), None)
    results = [r.submit_layer(i, "a", _snap((1, 2, 4, 4)), None) for i in range(1, 4)]
    gate.set()
    r.close()
    assert results == [False, False, False] and r.dropped == 3
    assert [(s.step, s.reason) for s in r.skipped] == [(1, "queue full"), (2, "queue full"), (3, "queue full")]


def test_figures_that_explain_a_finding_are_never_dropped_and_go_first():
    """A full queue: a priority job is accepted, the newest routine job not yet drawn makes room (listed as not
    drawn), and priority jobs are drawn before the routine ones still waiting."""
    entered, gate = threading.Event(), threading.Event()

    class GatedSink(RecordingSink):
        def write_png(self, *a):
            entered.set()
            gate.wait(20)
            super().write_png(*a)

    sink = GatedSink()
    r = FigureRenderer([sink], figures=("activations",), max_queue=3, backend="thread")
    assert r.submit_layer(0, "busy", _snap((1, 2, 4, 4)), None)
    assert entered.wait(30)  # the first job is in the sink; the next two wait in the queue
    assert r.submit_layer(1, "r1", _snap((1, 2, 4, 4)), None) and r.submit_layer(1, "r2", _snap((1, 2, 4, 4)), None)
    assert not r.submit_layer(1, "r3", _snap((1, 2, 4, 4)), None)  # routine: refused, the queue is full
    assert r.submit_layer(2, "cause", _snap((1, 2, 4, 4)), None, priority=True)
    assert r.submit_layer(2, "other", _snap((1, 2, 4, 4)), None, priority=True)  # nothing routine left to evict
    gate.set()
    assert r.close(timeout=30)
    assert [c[0] for c in sink.calls] == ["busy", "cause", "other"]
    assert sorted((s.layer, s.reason) for s in r.skipped) == [("r1", "queue full"), ("r2", "queue full"),
                                                              ("r3", "queue full")]


def test_wait_when_full_drops_nothing():
    """``figure_wait_s=None``: the submitter waits for room instead of dropping."""
    gate = threading.Event()

    class SlowSink(RecordingSink):
        def write_png(self, *a):
            gate.wait(0.05)
            super().write_png(*a)

    sink = SlowSink()
    r = FigureRenderer([sink], figures=("activations",), max_queue=1, backend="thread", wait_when_full=True)
    assert all(r.submit_layer(i, "a", _snap((1, 2, 4, 4)), None) for i in range(6))
    assert r.submit_layer(6, "cause", _snap((1, 2, 4, 4)), None, priority=True)
    assert r.close(timeout=30)
    assert r.dropped == 0 and not r.skipped and sorted(c[3] for c in sink.calls) == list(range(7))


class ListSink:
    def __init__(self):
        self.figures = []

    def write_png(self, layer, figure, png, step):
        self.figures.append((layer, figure, step))


def test_renderer_pickles_after_close():
    r = FigureRenderer([ListSink()])
    r.submit_layer(0, "a", _snap((1, 2, 4, 4)), None)
    r.close()
    r2 = pickle.loads(pickle.dumps(r))
    r2.submit_layer(1, "a", _snap((1, 2, 4, 4)), None)
    r2.close()
    assert r2.errors == []
    assert r2.sinks[0].figures == [("a", "activations", 0), ("a", "histograms", 0),
                                   ("a", "activations", 1), ("a", "histograms", 1)]


# ---------------------------------------------------------------------------------------------------
# snapshots
# ---------------------------------------------------------------------------------------------------
def test_snapshot_conv_caps_samples_and_channels_and_copies():
    t = torch.randn(8, 100, 5, 5, requires_grad=True)
    out = snapshot_tensor(t, num_samples=2, max_channels=64)
    assert out.shape == (2, 64, 5, 5) and out.dtype == np.float32
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, t.detach()[:2, :64].numpy())
    x = torch.randn(4, 3, 2, 2)
    snap = snapshot_tensor(x, 1, 2)
    x.relu_()  # in-place change after the snapshot
    x.fill_(7.0)
    assert not np.all(snap == 7.0)
    assert not np.shares_memory(snap, x.numpy())


def test_snapshot_layouts():
    assert snapshot_tensor(torch.randn(10, 300), 4, 64).shape == (4, 64)
    assert snapshot_tensor(torch.randn(3, 50, 200), 2, 16).shape == (2, 50, 16)  # auto: [N, T, F] (unit_dim)
    assert snapshot_tensor(torch.randn(3, 50, 200), 2, 16, layout="channels_first").shape == (2, 16, 200)
    assert snapshot_tensor(torch.randn(3, 50, 200), 2, 16, layout="channels_last").shape == (2, 50, 16)
    assert snapshot_tensor(torch.randn(7), 2, 4).shape == (1, 4)
    assert snapshot_tensor(torch.randn(2, 3, 4, 5, 6), 1, 2).shape == (1, 2, 4, 5, 6)
    with pytest.raises(ValueError):
        snapshot_tensor(torch.randn(2, 2), 0, 4)
    with pytest.raises(ValueError):
        snapshot_tensor(torch.randn(2, 2), 1, 4, layout="nchw")


def test_snapshot_dtypes_and_rejections():
    assert snapshot_tensor(torch.randn(2, 3, dtype=torch.bfloat16), 1, 3).dtype == np.float32
    assert snapshot_tensor(torch.randn(2, 3, dtype=torch.float16), 1, 3).dtype == np.float32
    assert snapshot_tensor(torch.randn(2, 3, dtype=torch.float64), 1, 3).dtype == np.float32
    assert snapshot_tensor(torch.ones(2, 3, dtype=torch.int64), 1, 3) is None
    assert snapshot_tensor(torch.ones(2, 3, dtype=torch.bool), 1, 3) is None
    assert snapshot_tensor(torch.empty(0, 3), 1, 3) is None
    assert snapshot_tensor(torch.tensor(1.0), 1, 3) is None
    assert snapshot_tensor(torch.randn(2, 3).to_sparse(), 1, 3) is None
    assert snapshot_tensor("not a tensor", 1, 3) is None  # type: ignore[arg-type]
    nan = torch.tensor([[float("nan"), float("inf")]])
    out = snapshot_tensor(nan, 1, 2)
    assert np.isnan(out[0, 0]) and np.isinf(out[0, 1])


def test_snapshot_keeps_no_reference_to_the_tensor():
    t = torch.randn(4, 8, 3, 3)
    ref = weakref.ref(t)
    out = snapshot_tensor(t, 2, 4)
    del t
    gc.collect()
    assert ref() is None
    assert out.shape == (2, 4, 3, 3)


def test_layout_for_module():
    assert layout_for_module(torch.nn.Conv1d(2, 3, 3)) == "channels_first"
    assert layout_for_module(torch.nn.BatchNorm2d(3)) == "channels_first"
    assert layout_for_module(torch.nn.Linear(2, 3)) == "channels_last"
    assert layout_for_module(torch.nn.LayerNorm(3)) == "channels_last"
    assert layout_for_module(torch.nn.Dropout(0.1)) == "auto"
    assert layout_for_module(torch.nn.ReLU()) == "auto"
    assert layout_for_module(object()) == "auto"
