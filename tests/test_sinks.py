"""Tests for lit_probe.sinks: disk (atomic, overwrite/versioned, hostile names, failures), real offline
W&B runs and TensorBoard event files. Everything is written under tmp_path."""

from __future__ import annotations

import glob
import io
import os
import struct
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lit_probe.sinks import (
    DiskSink,
    TensorBoardSink,
    WandbSink,
    atomic_write_bytes,
    atomic_write_text,
    image_sinks_for,
    safe_name,
)


def _png(color=(255, 0, 0), size=(40, 30), noise: int = 0) -> bytes:
    img = Image.new("RGB", size, color)
    if noise:
        arr = np.random.default_rng(noise).integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
        img = Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------
# safe_name / atomic writes
# ---------------------------------------------------------------------------------------------------
HOSTILE = ["../x", "a/b", "a_b", "..", ".", "", "\x00", "a\x00b", "/etc/passwd", "x" * 5000, "a\\b",
           "Conv", "conv", "layer1.0.conv1", "con", "a.", ".hidden", "-rf", "名前", "a b", "_all"]


def test_safe_name_is_safe_and_collision_free():
    names = [safe_name(n) for n in HOSTILE]
    assert len(set(names)) == len(HOSTILE)
    assert len({n.lower() for n in names}) == len(HOSTILE)  # case-insensitive file systems too
    for raw, n in zip(HOSTILE, names):
        assert n and n not in (".", "..")
        assert "/" not in n and "\\" not in n and "\x00" not in n
        assert not n.startswith((".", "-"))
        assert len(n) <= 100
        assert safe_name(raw) == n  # deterministic
    assert safe_name("layer1.0.conv1") == "layer1.0.conv1"  # ordinary names stay readable
    assert safe_name("a/b") != safe_name("a_b")


def test_hostile_layer_names_stay_inside_root(tmp_path):
    root = tmp_path / "out"
    sink = DiskSink(root)
    paths = [sink.write_png(name, "activations", _png(), 0) for name in HOSTILE]
    assert all(p is not None for p in paths)
    assert len(set(paths)) == len(HOSTILE)
    root_r = root.resolve()
    for p in paths:
        assert p.resolve().parent.parent == root_r
    assert {p.name for p in tmp_path.iterdir()} == {"out"}  # nothing escaped next to root
    assert not sink.disabled


def test_symlinked_layer_dir_pointing_outside_is_refused(tmp_path):
    root, outside = tmp_path / "out", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / safe_name("evil"), target_is_directory=True)
    sink = DiskSink(root)
    with pytest.warns(RuntimeWarning, match="outside"):
        assert sink.write_png("evil", "activations", _png(), 0) is None
    assert list(outside.iterdir()) == []
    assert sink.write_png("good", "activations", _png(), 0) is not None  # other layers still written


def test_atomic_write_leaves_no_temp_files(tmp_path):
    p = tmp_path / "f.png"
    atomic_write_bytes(p, b"one")
    atomic_write_bytes(p, b"two")
    atomic_write_text(tmp_path / "t.txt", "héllo")
    assert p.read_bytes() == b"two"
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.png", "t.txt"]
    assert (p.stat().st_mode & 0o777) == 0o644


def test_atomic_write_failure_removes_temp_and_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "f.png"
    atomic_write_bytes(p, b"old")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(p, b"new")
    monkeypatch.undo()
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.png"]


def test_atomic_overwrite_reader_always_sees_a_valid_png(tmp_path):
    sink = DiskSink(tmp_path)
    images = [_png(size=(300, 200), noise=i + 1) for i in range(4)]
    path = sink.write_png("layer", "activations", images[0], 0)
    stop = threading.Event()
    problems: list[str] = []
    reads = [0]

    def reader():
        while not stop.is_set():
            try:
                data = path.read_bytes()
                img = Image.open(io.BytesIO(data))
                img.load()
                assert img.size == (300, 200)
                reads[0] += 1
            except Exception as exc:  # noqa: BLE001 - any failure is a torn read
                problems.append(repr(exc))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(60):
            assert sink.write_png("layer", "activations", images[i % 4], i) == path
    finally:
        stop.set()
        t.join(10)
    assert problems == []
    assert reads[0] > 0
    assert _files(tmp_path) == ["layer/activations.png"]


# ---------------------------------------------------------------------------------------------------
# DiskSink modes and failures
# ---------------------------------------------------------------------------------------------------
def test_overwrite_mode(tmp_path):
    sink = DiskSink(tmp_path)
    sink.write_png("layer1", "activations", _png((255, 0, 0)), 1)
    sink.write_png("layer1", "activations", _png((0, 255, 0)), 2)
    sink.write_png("layer1", "histograms", _png(), 2)
    sink.write_png("_all", "timeline", _png(), 2)
    assert _files(tmp_path) == ["_all/timeline.png", "layer1/activations.png", "layer1/histograms.png"]
    img = Image.open(tmp_path / "layer1" / "activations.png").convert("RGB")
    assert img.getpixel((0, 0)) == (0, 255, 0)


def test_versioned_mode_zero_padded(tmp_path):
    sink = DiskSink(tmp_path, mode="versioned")
    for step in (0, 5, 123, 1234567):
        sink.write_png("layer1", "activations", _png(), step)
    assert _files(tmp_path) == [
        "layer1/activations_step000000.png",
        "layer1/activations_step000005.png",
        "layer1/activations_step000123.png",
        "layer1/activations_step1234567.png",
    ]


def test_versioned_max_versions_keeps_newest_by_step(tmp_path):
    sink = DiskSink(tmp_path, mode="versioned", max_versions=3)
    for step in (10, 20, 30, 40, 50):
        sink.write_png("l", "activations", _png(), step)
        sink.write_png("l", "gradients", _png(), step)
    assert _files(tmp_path / "l") == [
        "activations_step000030.png", "activations_step000040.png", "activations_step000050.png",
        "gradients_step000030.png", "gradients_step000040.png", "gradients_step000050.png",
    ]
    # after a resume from an earlier step, the newest files by step survive
    sink.write_png("l", "activations", _png(), 35)
    assert sorted(p.name for p in (tmp_path / "l").glob("activations_*")) == [
        "activations_step000035.png", "activations_step000040.png", "activations_step000050.png"]


def test_bad_arguments():
    with pytest.raises(ValueError):
        DiskSink("x", mode="append")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DiskSink("x", mode="versioned", max_versions=0)


def test_unwritable_root_warns_once_and_disables(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_bytes(b"not a directory")
    sink = DiskSink(blocker / "sub")  # mkdir under a regular file raises OSError, even as root
    with pytest.warns(RuntimeWarning, match="disabled") as rec:
        assert sink.write_png("layer", "activations", _png(), 0) is None
        assert sink.write_png("layer", "gradients", _png(), 0) is None
        assert sink.write_png("other", "activations", _png(), 1) is None
    assert len([w for w in rec if "lit_probe" in str(w.message)]) == 1
    assert sink.disabled and sink.last_error
    assert _files(tmp_path) == ["afile"]


def test_disk_full_during_write_is_handled(tmp_path, monkeypatch):
    sink = DiskSink(tmp_path)
    real_fdopen = os.fdopen

    class FullFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, data):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullFile(real_fdopen(fd, mode)))
    with pytest.warns(RuntimeWarning, match="No space left"):
        assert sink.write_png("layer", "activations", _png(), 0) is None
    monkeypatch.undo()
    assert sink.disabled
    assert [p for p in (tmp_path / "layer").iterdir()] == []  # temp file removed


def test_disk_sink_pickles(tmp_path):
    import pickle

    sink = pickle.loads(pickle.dumps(DiskSink(tmp_path, mode="versioned", max_versions=2)))
    assert sink.write_png("a", "activations", _png(), 1) is not None


# ---------------------------------------------------------------------------------------------------
# W&B (real offline runs, no mocks)
# ---------------------------------------------------------------------------------------------------
def _settled_bytes(path: Path, timeout: float = 15.0) -> bytes:
    """The file once it stopped growing: on a loaded machine wandb's service process may still be appending
    the last records for a moment after ``run.finish()`` returned."""
    import time

    data, deadline = path.read_bytes(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.3)
        again = path.read_bytes()
        if again == data:
            return data
        data = again
    return data


def _wandb_records(run_file: str):
    """Yield protobuf records of a .wandb file (LevelDB-log framing: 7-byte header, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = _settled_bytes(Path(run_file))
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, typ = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if pos + length > len(data):
            break  # a record still being written (the file's tail): not a record yet
        chunk = data[pos:pos + length]
        pos += length
        if typ == 1:
            full = chunk
        elif typ == 2:
            buf = chunk
            continue
        elif typ == 3:
            buf += chunk
            continue
        elif typ == 4:
            full, buf = buf + chunk, b""
        else:
            continue
        rec = pb.Record()
        try:
            rec.ParseFromString(full)
        except Exception:  # a record this hand-written reader frames wrongly: the asserts judge what is left
            continue
        yield rec


def _history_rows(run_dir: str) -> list[dict]:
    rows = []
    for f in glob.glob(os.path.join(run_dir, "run-*.wandb")):
        for rec in _wandb_records(f):
            if rec.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): i.value_json for i in rec.history.item})
    return rows


def _only_run_dir(root: Path) -> str:
    runs = glob.glob(str(root / "wandb" / "offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def test_wandb_sink_with_lightning_logger_offline(wandb_offline):
    from pytorch_lightning.loggers import WandbLogger

    tmp_path = wandb_offline
    logger = WandbLogger(project="t", save_dir=str(tmp_path), offline=True)
    sink = WandbSink(logger)
    sink.write_png("layer1.0", "activations", _png((255, 0, 0)), 0)
    sink.write_png("layer1.0", "activations", _png((0, 0, 255)), 5)
    sink.write_png("_all", "timeline", _png(), 5)
    sink.write_findings([{"layer": "layer1.0", "kind": "dead", "step": 5, "value": 0.9}], step=5)
    logger.experiment.finish()

    run_dir = _only_run_dir(tmp_path)
    media = sorted(glob.glob(os.path.join(run_dir, "files", "media", "images", "probe", "**", "*.png"),
                             recursive=True))
    assert len([m for m in media if "layer1.0" in m and "activations" in m]) == 2
    assert any("timeline" in m for m in media)
    for m in media:
        Image.open(m).load()
    assert glob.glob(os.path.join(run_dir, "files", "media", "table", "probe", "findings*.table.json"))

    rows = _history_rows(run_dir)
    img_rows = [r for r in rows if any(k.startswith("probe/layer1.0/activations") for k in r)]
    assert [r["trainer/global_step"] for r in img_rows] == ["0", "5"]  # at the trainer's step, none dropped
    assert any(k.startswith("probe/findings") for r in rows for k in r)


def test_wandb_sink_with_bare_run_and_defer(wandb_offline):
    import wandb

    tmp_path = wandb_offline
    run = wandb.init(project="t", dir=str(tmp_path), mode="offline")
    sink = WandbSink(run, defer=True)
    sink.write_png("fc", "activations", _png(), 3)
    sink.write_png("fc", "gradients", _png(), 3)
    sink.write_png("fc", "activations", _png(), 7)
    assert not glob.glob(os.path.join(run.dir, "media", "images", "probe", "**", "*.png"), recursive=True)
    sink.flush()
    sink.flush()  # nothing left: no-op
    run.finish()
    run_dir = _only_run_dir(tmp_path)
    rows = _history_rows(run_dir)
    probe_rows = [r for r in rows if any(k.startswith("probe/") for k in r)]
    assert [r["trainer/global_step"] for r in probe_rows] == ["3", "7"]  # one row per step
    assert any(k.startswith("probe/fc/gradients") for k in probe_rows[0])
    media = glob.glob(os.path.join(run_dir, "files", "media", "images", "probe", "**", "*.png"),
                      recursive=True)
    assert len(media) == 3


def test_image_sinks_for(wandb_offline, tmp_path):
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    csv = CSVLogger(str(tmp_path / "csv"))
    sinks, info = image_sinks_for([csv])
    assert sinks == [] and any("no W&B run" in m for m in info)

    tb = TensorBoardLogger(str(tmp_path / "tb"))
    wl = WandbLogger(project="t", save_dir=str(tmp_path), offline=True)
    sinks, info = image_sinks_for([csv, tb, wl])
    assert sorted(type(s).__name__ for s in sinks) == ["TensorBoardSink", "WandbSink"]
    sinks, _ = image_sinks_for([wl], defer_wandb=True)
    assert sinks[0].defer
    sinks, info = image_sinks_for([wl], log_to_wandb=False)
    assert sinks == [] and info

    import wandb

    run = wandb.init(project="t", dir=str(tmp_path), mode="offline")
    sinks, info = image_sinks_for([csv])
    assert len(sinks) == 1 and sinks[0].target is run and not sinks[0].is_logger
    run.finish()
    tb.experiment.close()


def test_image_sinks_for_never_imports_wandb(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # "import wandb" would raise
    sinks, info = image_sinks_for([object()])
    assert sinks == [] and any("no W&B run" in m for m in info)


# ---------------------------------------------------------------------------------------------------
# TensorBoard
# ---------------------------------------------------------------------------------------------------
def test_tensorboard_sink_writes_image_events(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path))
    sink = TensorBoardSink(logger)
    sink.write_png("layer1", "activations", _png(size=(64, 48)), 0)
    sink.write_png("layer1", "activations", _png(size=(64, 48)), 5)
    sink.write_png("_all", "timeline", _png(), 5)
    sink.flush()
    logger.experiment.close()

    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()["images"]
    assert "probe/layer1/activations" in tags and "probe/_all/timeline" in tags
    events = acc.Images("probe/layer1/activations")
    assert [e.step for e in events] == [0, 5]
    assert (events[0].width, events[0].height) == (64, 48)
    img = Image.open(io.BytesIO(events[0].encoded_image_string))
    assert img.size == (64, 48)


def test_findings_reach_wandb_with_figures_off_at_the_log_step_that_found_them(wandb_offline):
    """Figures off (`figure_every_n_steps=None`): the findings table still goes to W&B, while training runs, at
    the log step that found the finding (not only at fit end)."""
    from pytorch_lightning.loggers import WandbLogger

    from lit_probe import FeatureProbe
    from models import make_loader, trainer
    from test_bugs import NaNAt, StepAware
    from models import mlp

    tmp_path = wandb_offline
    net = mlp(depth=3)
    net[2] = NaNAt(32, k=6)  # a NaN in net.2 at step 6
    logger = WandbLogger(project="t", save_dir=str(tmp_path), offline=True)
    probe = FeatureProbe(probes=["net.*"], figure_every_n_steps=None, save_dir=str(tmp_path / "p"),
                         log_every_n_steps=4)
    with pytest.warns(Warning):
        trainer(tmp_path, callbacks=[probe], max_steps=20, logger=logger).fit(StepAware(net),
                                                                              make_loader(n=320))
    logger.experiment.finish()
    rows = _history_rows(_only_run_dir(tmp_path))
    steps = [int(r["trainer/global_step"]) for r in rows if any(k.startswith("probe/findings") for k in r)]
    assert steps and steps[0] == 7, steps  # the log step after step 6 (steps 4..7 are read at step 7)
    assert probe.findings[0].layer == "net.2" and probe.findings[0].step == 6
