"""Tests for drawing off the training process (lit_probe.render's queue, lit_probe.drawing's process,
issue 13) and the titles lit_probe.compose builds (issue 14).

Each FigureRenderer with the default backend starts a real drawing process (~0.5 s on an idle core).
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from lit_probe import drawing, render
from lit_probe.compose import Drawer, Job, coverage_text
from lit_probe.render import SKIP_REASONS, FigureRenderer, SkippedFigure

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses /proc and POSIX process semantics")


def _probe_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "lit-probe" in t.name]


@pytest.fixture(autouse=True)
def _nothing_left_running():
    yield
    assert _probe_threads() == [], "a lit-probe thread (daemon or not) outlived its test"


class Sink:
    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[tuple[str, str, int, bytes, str]] = []
        self.gate = gate
        self.entered = threading.Event()  # set when the first write_png begins
        self.lock = threading.Lock()

    def write_png(self, layer, figure, png, step):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(20)
        with self.lock:
            self.calls.append((layer, figure, step, png, threading.current_thread().name))


def _snap(shape, seed=0):
    return np.maximum(np.random.default_rng(seed).normal(size=shape), 0).astype(np.float32)


def _wait_ready(r: FigureRenderer, timeout: float = 60.0) -> int:
    t0 = time.monotonic()
    while not r._child_ready:
        assert time.monotonic() - t0 < timeout, "the drawing process never became ready"
        time.sleep(0.01)
    pid = r.child_pid
    assert pid is not None
    return pid


def _gone(pid: int) -> bool:
    """True when ``pid`` no longer exists (exited AND reaped: a zombie would still be found)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _maps_of(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


# ---------------------------------------------------------------------------------------------------
# the process backend
# ---------------------------------------------------------------------------------------------------
def test_figures_are_drawn_in_a_child_without_torch_and_written_by_the_parent():
    sink = Sink()
    r = FigureRenderer([sink], max_queue=4)
    assert r.backend_in_use == "process" and r.child_pid is None  # started lazily
    assert r.submit_layer(5, "conv", _snap((2, 8, 6, 6)), _snap((2, 8, 6, 6), 1), shape=(32, 8, 6, 6))
    pid = _wait_ready(r)
    assert pid != os.getpid()
    if os.path.exists(f"/proc/{pid}/maps"):
        maps = _maps_of(pid)
        assert "libtorch" not in maps and "_multiarray_umath" in maps  # numpy, never torch
    assert r.drain(60)
    assert {(c[0], c[1], c[2]) for c in sink.calls} == {("conv", k, 5) for k in ("activations", "gradients",
                                                                                 "histograms")}
    assert {c[4] for c in sink.calls} == {"lit-probe-render"}  # in this process, off the training thread
    img = Image.open(io.BytesIO(sink.calls[0][3]))
    img.load()
    assert img.format == "PNG" and 800 <= img.size[0] <= 1000
    assert r.close()
    assert _gone(pid)
    assert r.errors == [] and r.skipped == [] and r.skipped_summary() == []


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="Linux scheduling policies")
def test_the_child_draws_at_the_lowest_priority_and_the_parent_keeps_its_own():
    policy, nice = os.sched_getscheduler(0), os.nice(0)
    r = FigureRenderer([Sink()], figures=("activations",))
    assert r.submit_layer(1, "a", _snap((1, 2, 4, 4)), None)
    pid = _wait_ready(r)
    assert r.drain(60)  # the first job is answered after the child lowered itself
    # SCHED_BATCH, not SCHED_IDLE: under SCHED_IDLE a training on every core left it so few cycles that the
    # step-1,000 figures of benchmarks/paired.py --threads 2 were not finished within figure_wait_s
    assert os.sched_getscheduler(pid) == getattr(os, "SCHED_BATCH", os.sched_getscheduler(pid))
    with open(f"/proc/{pid}/stat") as f:
        assert int(f.read().rsplit(")", 1)[1].split()[16]) == 19  # nice 19
    assert os.sched_getscheduler(0) == policy and os.nice(0) == nice  # the training process is untouched
    assert r.close()


def test_close_is_idempotent_and_a_later_submit_starts_a_new_child():
    sink = Sink()
    r = FigureRenderer([sink], figures=("activations",))
    r.close()  # never started
    pids = []
    for step in range(2):  # two "fits"
        r.submit_layer(step, "a", _snap((1, 4, 5, 5), step), None)
        pids.append(_wait_ready(r))
        assert r.close() and r.close()
        assert _gone(pids[-1]) and _probe_threads() == []
    assert pids[0] != pids[1]
    assert [(c[0], c[2]) for c in sink.calls] == [("a", 0), ("a", 1)]


def test_colour_scales_stay_the_same_across_steps_and_children():
    r = FigureRenderer([Sink()], figures=("activations", "gradients"))
    r.submit_layer(0, "x", _snap((1, 4, 6, 6)) * 10, _snap((1, 4, 6, 6)) - 0.5)
    r.close()
    first = r._scales[("x", "activations")].range
    assert first is not None and first[1] > 5
    r.submit_layer(1, "x", _snap((1, 4, 6, 6), 1), _snap((1, 4, 6, 6)) - 0.5)  # smaller: the scale is kept
    r.close()
    assert r._scales[("x", "activations")].range == first
    g = r._scales[("x", "gradients")].range
    assert g is not None and g[0] == -g[1]


def test_submit_is_cheap_while_the_child_draws():
    sink = Sink()
    r = FigureRenderer([sink], figures=("activations",), max_queue=64)
    big = _snap((4, 128, 16, 16))
    r.submit_layer(0, "warm", big, None)
    _wait_ready(r)
    times = []
    for i in range(8):
        t0 = time.perf_counter()
        assert r.submit_layer(1, f"l{i}", big, None)
        times.append(time.perf_counter() - t0)
    assert sorted(times)[len(times) // 2] < 0.05  # a copy and a queue append (~1 ms), never a drawing
    assert r.close(timeout=120)
    assert len(sink.calls) == 9


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_a_paced_renderer_draws_its_share_while_training_and_the_rest_at_full_speed_on_drain(backend):
    sink = Sink()
    r = FigureRenderer([sink], figures=("activations", "histograms"), max_queue=64, backend=backend, share=0.05,
                       burst_s=0.3)
    big = _snap((2, 64, 16, 16))
    assert r.submit_layer(0, "warm", big, None)  # the child's start and matplotlib's first figure
    assert r.drain(60)
    busy0 = time.monotonic()
    for i in range(12):
        assert r.submit_layer(1, f"l{i}", big, None)
    time.sleep(2.0)
    drawn = len(sink.calls) // 2 - 1
    # about (burst 0.3 s + 5 % of 2 s) of drawing: a few of the 12 jobs (each ~0.2 s), never all of them
    assert drawn < 12 and r.paced_s > 0, (drawn, r.paced_s)
    t0 = time.monotonic()
    assert r.drain(60)  # whoever waits for the figures gets them at full speed
    assert len(sink.calls) == 26 and time.monotonic() - t0 < 30
    assert time.monotonic() - busy0 > 2.0
    assert r.close(timeout=10) and r.skipped == []


def test_a_paced_renderer_never_holds_back_a_priority_job():
    sink = Sink()
    r = FigureRenderer([sink], figures=("activations",), max_queue=64, share=0.001, burst_s=0.0)
    big = _snap((2, 64, 16, 16))
    assert r.submit_layer(0, "first", big, None)  # drawn at once; then the drawing owes ~100 s of time
    deadline = time.monotonic() + 60
    while not sink.calls:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert r.submit_layer(1, "routine", big, None)
    assert r.submit_layer(1, "cause", big, None, priority=True)
    deadline = time.monotonic() + 30
    while len(sink.calls) < 2:
        assert time.monotonic() < deadline, "a priority job waited for the drawing's share"
        time.sleep(0.05)
    time.sleep(0.5)
    assert [c[0] for c in sink.calls] == ["first", "cause"]  # the routine job still waits its turn
    assert r.close(timeout=30)
    assert [c[0] for c in sink.calls] == ["first", "cause", "routine"]  # close draws it at full speed


def test_a_full_queue_of_a_paced_renderer_says_why():
    sink = Sink()
    r = FigureRenderer([sink], figures=("activations",), max_queue=2, share=0.001, burst_s=0.0)
    big = _snap((2, 64, 16, 16))
    for i in range(3):
        r.submit_layer(0, f"l{i}", big, None)
    deadline = time.monotonic() + 30
    while r.paced_s == 0:  # the second job waits for the drawing's share
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert r.close(timeout=30)
    assert r.skipped_summary() == ["1 figure of 1 layer at step 0 not drawn: queue full (the drawing is busy at most "
                                   "0.1% of the time while training runs: figure_share)"]


def test_close_bounds_the_wait_cancels_the_rest_and_lists_them():
    sink = Sink()
    r = FigureRenderer([sink], figures=("activations", "gradients", "histograms"), max_queue=40)
    big = _snap((2, 512, 16, 16))
    for i in range(30):
        assert r.submit_layer(500, f"layer{i}", big, big)
    pid = _wait_ready(r)
    t0 = time.monotonic()
    assert r.close(timeout=0.5)
    assert time.monotonic() - t0 < 4.0
    assert _gone(pid)
    skipped = r.skipped
    assert skipped and all(s.reason == "fit end timeout" and s.step == 500 for s in skipped)
    assert len(skipped) + len(sink.calls) == 90  # every figure either written or listed
    assert r.dropped == len({s.layer for s in skipped})
    (line,) = r.skipped_summary()
    n_layers = len({s.layer for s in skipped})
    assert line == f"{len(skipped)} figures of {n_layers} layers at step 500 not drawn: fit end timeout"


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_an_urgent_timeline_jumps_the_queue_and_survives_a_bounded_close(backend):
    sink = Sink()
    r = FigureRenderer([sink], figures=("activations", "timeline"), max_queue=12, backend=backend)
    big = _snap((1, 256, 16, 16))
    for i in range(12):
        assert r.submit_layer(50, f"l{i}", big, None)
    ones = np.ones((2, 3))
    assert not r.submit_timeline(50, ["l0", "l1"], np.arange(3), ones, ones, ones * 0, [])  # queue full
    assert r.submit_timeline(60, ["l0", "l1"], np.arange(3), ones, ones, ones * 0, [], urgent=True)
    assert r.close(timeout=6)
    written = [(c[0], c[1], c[2]) for c in sink.calls]
    assert ("_all", "timeline", 60) in written
    assert written.index(("_all", "timeline", 60)) <= 3  # after at most the jobs already being drawn
    assert SkippedFigure("_all", "timeline", 50, "queue full") in r.skipped


def test_a_full_queue_is_listed_with_its_reason():
    gate = threading.Event()
    sink = Sink(gate)
    r = FigureRenderer([sink], figures=("activations", "histograms"), max_queue=2)
    assert r.submit_layer(100, "a", _snap((1, 2, 4, 4)), None)
    assert r.submit_layer(100, "b", _snap((1, 2, 4, 4)), None)
    refused = [r.submit_layer(100, f"c{i}", _snap((1, 2, 4, 4)), None) for i in range(9)]
    assert refused == [False] * 9 and r.dropped == 9
    gate.set()
    assert r.close(timeout=60)
    assert r.skipped[0] == SkippedFigure("c0", "activations", 100, "queue full")
    assert r.skipped_count == 18
    assert r.skipped_summary() == ["18 figures of 9 layers at step 100 not drawn: queue full"]


def test_skipped_summary_over_many_steps_is_one_line_per_reason():
    r = FigureRenderer([Sink()])
    with r._lock:
        for step in (10, 20, 30, 40):
            r._skip_locked([(f"l{i}", "activations", step) for i in range(3)], "queue full")
        r._skip_locked([("l0", "timeline", 40)], "error")
    assert r.skipped_summary() == ["12 figures of 3 layers at 4 steps (10 to 40) not drawn: queue full",
                                   "1 figure of 1 layer at step 40 not drawn: error"]
    assert set(SKIP_REASONS) == {"queue full", "fit end timeout", "error"}


def test_a_failing_figure_is_listed_as_error_and_the_rest_is_drawn():
    sink = Sink()
    r = FigureRenderer([sink], figures=("timeline", "activations"))
    ok = np.ones((1, 3))
    # a findings entry whose step is not a number is ignored; a wrong array shape makes the timeline fail
    assert r.submit_timeline(3, ["a"], np.arange(3), ok, ok, np.ones((1, 4)), [])
    assert r.submit_layer(3, "a", _snap((1, 2, 4, 4)), None)
    assert r.close(timeout=60)
    assert [(c[0], c[1]) for c in sink.calls] == [("a", "activations")]
    assert r.skipped == [SkippedFigure("_all", "timeline", 3, "error")]
    assert any("ValueError" in e and "layers x steps" in e for e in r.errors)


def test_a_child_that_dies_loses_only_its_jobs_and_the_next_submit_restarts_it(monkeypatch):
    sent = threading.Event()

    def write_frame(f, obj):  # the sender's writes, with an event once the slow job is in the child's pipe
        drawing.write_frame(f, obj)
        if getattr(obj, "figures", None) == [("slow", "activations", 1)]:
            sent.set()

    monkeypatch.setattr(render, "write_frame", write_frame)
    sink = Sink()
    r = FigureRenderer([sink], figures=("activations",))
    r.submit_layer(0, "a", _snap((1, 2, 4, 4)), None)
    assert r.drain(60)
    pid = _wait_ready(r)
    r.submit_layer(1, "slow", _snap((1, 512, 16, 16)), None)  # ~1 s to draw
    assert sent.wait(30)
    os.kill(pid, 9)  # dies while reading or drawing it
    assert r.drain(30)  # the receiver notices the end, reaps the child, then retires its jobs
    assert _gone(pid)
    assert r.submit_layer(2, "a", _snap((1, 2, 4, 4)), None)  # a new child
    assert r.drain(60)
    assert r.child_pid != pid
    assert r.close()
    drawn = [(c[0], c[2]) for c in sink.calls]
    assert drawn[0] == ("a", 0) and drawn[-1] == ("a", 2)
    if ("slow", 1) not in drawn:  # (unless this thread was held off the CPU for the ~1 s the child draws it)
        assert r.skipped == [SkippedFigure("slow", "activations", 1, "error")]
        assert any("exited unexpectedly (code -9)" in e for e in r.errors)
    assert r.backend_in_use == "process"


def test_a_job_that_raises_in_the_child_does_not_kill_it():
    sink = Sink()
    r = FigureRenderer([sink], figures=("activations",))
    assert r._submit("no-such-kind", (), [("x", "activations", 0)])
    assert r.submit_layer(1, "a", _snap((1, 2, 4, 4)), None)
    assert r.drain(60)
    pid = r.child_pid
    assert r.close() and _gone(pid)
    assert r.skipped == [SkippedFigure("x", "activations", 0, "error")]
    assert [(c[0], c[2]) for c in sink.calls] == [("a", 1)]


def test_renderer_pickles_while_its_child_runs():
    sink = Sink()
    r = FigureRenderer([], figures=("activations",))
    r.submit_layer(0, "a", _snap((1, 2, 4, 4)), None)
    _wait_ready(r)
    assert r.drain(60)
    r2 = pickle.loads(pickle.dumps(r))
    assert r2.child_pid is None and r2.pending == 0
    assert r2._scales[("a", "activations")].range == r._scales[("a", "activations")].range
    r2.sinks.append(sink)
    r2.submit_layer(1, "a", _snap((1, 2, 4, 4)), None)
    assert r2.close() and r.close()
    assert [(c[0], c[2]) for c in sink.calls] == [("a", 1)]


# ---------------------------------------------------------------------------------------------------
# fallback and the thread backend
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["/nonexistent/python"],
                                     [sys.executable, "-c", "import sys; sys.exit(3)"]],
                         ids=["cannot-exec", "exits-before-ready"])
def test_no_process_falls_back_to_a_thread_with_one_warning(monkeypatch, caplog, command):
    monkeypatch.setattr(drawing, "child_command", lambda: list(command))
    sink = Sink()
    r = FigureRenderer([sink], figures=("activations",))
    with caplog.at_level(logging.WARNING, logger="lit_probe.render"):
        for step in range(3):
            assert r.submit_layer(step, "a", _snap((1, 2, 4, 4)), None)
        assert r.drain(60)
        r.submit_layer(3, "a", _snap((1, 2, 4, 4)), None)
        assert r.close(timeout=60)
    assert r.backend_in_use == "thread"
    assert sorted(c[2] for c in sink.calls) == [0, 1, 2, 3]
    assert {c[4] for c in sink.calls} == {"lit-probe-render"}
    warnings = [rec for rec in caplog.records if "could not start the drawing process" in rec.getMessage()]
    assert len(warnings) == 1
    assert r.errors == [] and r.skipped == []


def test_thread_backend_draws_the_same_figures():
    sink = Sink()
    r = FigureRenderer([sink], backend="thread")
    r.submit_layer(2, "a", _snap((2, 4, 5, 5)), _snap((2, 4, 5, 5), 1))
    assert r.close()
    assert r.backend_in_use == "thread" and r.child_pid is None
    assert {c[1] for c in sink.calls} == {"activations", "gradients", "histograms"}
    with pytest.raises(ValueError, match="backend"):
        FigureRenderer([sink], backend="gpu")


def test_thread_backend_close_timeout_cancels_the_queue():
    gate = threading.Event()
    sink = Sink(gate)
    r = FigureRenderer([sink], figures=("activations",), max_queue=10, backend="thread")
    for i in range(6):
        r.submit_layer(9, f"l{i}", _snap((1, 2, 4, 4)), None)
    assert sink.entered.wait(30)  # the first figure is in the sink, the other five queued
    timer = threading.Timer(1.0, gate.set)  # the sink is stuck for 1 s in the first write
    timer.start()
    assert r.close(timeout=0.2)
    timer.join(5)
    assert len(sink.calls) == 1
    assert [s.reason for s in r.skipped] == ["fit end timeout"] * 5 and r.dropped == 5


# ---------------------------------------------------------------------------------------------------
# titles: what each figure covers (issue 14)
# ---------------------------------------------------------------------------------------------------
def test_coverage_text():
    assert coverage_text((2, 64, 8, 8), (32, 512, 8, 8)) == \
        "2 samples of 32, first 64 of 512 channels (tensor 32x512x8x8)"
    assert coverage_text((2, 64, 8, 8), (32, 512, 8, 8), part="grid") == \
        "first sample of 32, first 64 of 512 channels (tensor 32x512x8x8)"
    assert coverage_text((1, 64, 8, 8), (32, 512, 8, 8), part="grid", max_channels=16) == \
        "first sample of 32, first 16 of 512 channels (tensor 32x512x8x8)"
    assert coverage_text((1, 10), (1, 10)) == "1 sample of 1, all 10 features (tensor 1x10)"
    assert coverage_text((4, 16), (4, 16)) == "all 4 samples, all 16 features (tensor 4x16)"
    assert coverage_text((2, 12, 16), (8, 12, 300), "channels_last", part="grid") == \
        "first sample of 8, first 16 of 300 features (tensor 8x12x300)"
    assert coverage_text((1, 7), (7,)) == "1 sample of 1, all 7 features (tensor 7)"
    assert coverage_text((1, 2, 4, 5, 6), (3, 2, 4, 5, 6), part="grid") == \
        "first sample of 3, all 2 channels, middle slice of depth 4 (tensor 3x2x4x5x6)"
    assert coverage_text((2, 8), None) == "all 2 samples, all 8 features (tensor 2x8)"


def _figures_of(job: Job, drawer: Drawer) -> dict[str, object]:
    makers = {"layer": drawer.layer, "timeline": drawer.timeline, "gradcam": drawer.gradcam}[job.kind]
    return {figure: make() for _, figure, _, make in makers(*job.args)}


def _all_text(fig) -> str:
    return "\n".join(t.get_text() for t in fig.findobj(match=lambda a: hasattr(a, "get_text")))


def test_layer_titles_say_what_the_data_covers_and_the_step():
    drawer = Drawer(dpi=100, bins=30, max_channels=64)
    act = _snap((1, 64, 6, 6))
    job = Job(0, "layer", (500, "layer3", act, act - 0.5, None, "auto", (32, 512, 6, 6),
                            ["activations", "gradients", "histograms"]), [])
    figs = _figures_of(job, drawer)
    assert figs["activations"].get_suptitle() == \
        "layer3 · activations · step 500 · first sample of 32, first 64 of 512 channels (tensor 32x512x6x6)"
    assert "step 500" in figs["gradients"].get_suptitle()
    hist = _all_text(figs["histograms"])
    assert "step 500" in figs["histograms"].get_suptitle()
    assert "activation: 1 sample of 32, first 64 of 512 channels (tensor 32x512x6x6) · 2,304 values" in hist
    assert "32x512x6x6" not in figs["histograms"].get_suptitle()


def test_an_exploded_step_gets_its_own_range_and_leaves_the_layer_scale():
    drawer = Drawer(dpi=100, bins=30, max_channels=64)
    healthy = _snap((1, 4, 8, 8))
    exploded = healthy * 1e19
    for step, act in ((0, healthy), (1, exploded), (2, healthy)):
        job = Job(step, "layer", (step, "x", act, None, None, "auto", None, ["activations"]), [])
        fig = _figures_of(job, drawer)["activations"]
        text = _all_text(fig)
        if step == 1:
            assert "own range: far off this layer's scale" in text
        else:
            assert "fixed range [0, " in text and "own range" not in text
    lo, hi = drawer.scales[("x", "activations")].range
    assert hi < 10


def test_gradcam_job_uses_the_callers_labels():
    drawer = Drawer(dpi=100, bins=30, max_channels=64)
    ov = np.random.default_rng(0).random((2, 8, 8, 3)).astype(np.float32)
    job = Job(0, "gradcam", (4, "layer4", ov, ["sample 0 · class 3", "sample 1 · class 1"]), [])
    fig = _figures_of(job, drawer)["gradcam"]
    assert fig.get_suptitle() == "layer4 · Grad-CAM · step 4"
    assert [a.get_title() for a in fig.axes if a.images] == ["sample 0 · class 3", "sample 1 · class 1"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_copy_starts_its_own_child_and_leaves_the_parents_alone(tmp_path):
    import warnings

    sink = Sink()
    r = FigureRenderer([sink], figures=("activations",))
    r.submit_layer(0, "a", _snap((1, 2, 4, 4)), None)
    assert r.drain(60)
    parent_child = r.child_pid
    out = tmp_path / "forked.txt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "fork() with threads": exactly what we test
        pid = os.fork()
    if pid == 0:  # the forked copy: draw one figure with its own child, then leave without cleanup
        code = 1
        try:
            ok = r.submit_layer(1, "b", _snap((1, 2, 4, 4)), None) and r.drain(60)
            mine = r.child_pid
            ok = ok and r.close() and mine is not None and mine != parent_child
            out.write_text(f"{ok} {[c[:3] for c in sink.calls]}")
            code = 0 if ok else 1
        finally:
            os._exit(code)
    t0 = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        assert time.monotonic() - t0 < 120, "the forked copy hung"
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0, out.read_text() if out.exists() else "no output"
    assert "('b', 'activations', 1)" in out.read_text()
    assert r.child_pid == parent_child  # the parent's child is untouched
    r.submit_layer(2, "a", _snap((1, 2, 4, 4)), None)
    assert r.drain(60) and r.close()
    assert [c[:3] for c in sink.calls] == [("a", "activations", 0), ("a", "activations", 2)]
