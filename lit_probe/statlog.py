"""Statistics log
==============

The per-step statistics a run measured, kept on disk: ``<save_dir>/stats.bin``, part of the run record (the
record, ``run.json``, says what the run concluded; this file says what it measured, step by step). Written by
one owner (:class:`~lit_probe.output.ProbeOutput`, rank zero) at each log step, read by
:func:`read_stats` (``lit-probe diff``, :mod:`lit_probe.diff`). Nothing here imports torch or Lightning.

Format (little-endian), chosen to be appendable while training runs, columnar, and readable with numpy alone:

* a magic line ``LPSTATS1\\n``;
* then one *chunk* per host read (log step): ``b"CHNK"``, ``uint32`` header length, ``uint32`` payload length,
  a JSON header, and the payload: ``zlib`` (level 1) of ``steps int64[n]``, ``values float32[n, slots, stats]``
  and, with the parameter signal, ``params float32[n, modules, param_stats]`` (C order). NaN means "not
  measured at that step" (full statistics are measured every ``full_stats_every_n_steps`` steps; min/max and
  the parameter norms every step).
* the header names the columns (``stats``, ``param_stats``: a reader never guesses them) and, whenever they
  changed since the previous chunk (new streams appear in the first steps only), the streams: ``names`` and
  ``signals`` per slot, ``order`` (the slots in execution order) and ``param_names``. ``partial``: steps the
  run began but never finished (it failed inside them).

A chunk is written with one ``write`` and flushed: a run killed at any moment leaves a file whose complete
chunks are every log step up to the last one; a torn last chunk is detected (short, or its payload does not
decompress) and dropped (:attr:`StatLog.torn`). A resumed run appends; the last row of a step wins.

Size: ``8 + 4 * (slots * len(STATS) + modules * len(PARAM_STATS))`` bytes per step before compression; the
NaN of the steps without full statistics compress away. :class:`StatWriter` stops at ``max_bytes`` (the
``stats_file_mb`` option) and says at which step.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

__all__ = ["STATS_NAME", "StatWriter", "StatLog", "read_stats"]

#: The statistics log's file name in the save directory.
STATS_NAME = "stats.bin"
_MAGIC = b"LPSTATS1\n"
_CHUNK = struct.Struct("<4sII")
_TAG = b"CHNK"


class StatWriter:
    """Appends chunks to ``path`` (see the module docstring).

    Args:
        path: the file.
        fresh: start a new file (``False``: append to an existing one, e.g. a resumed run).
        max_bytes: stop writing once the file is this large (``None``: no limit).
    """

    def __init__(self, path: str | os.PathLike[str], fresh: bool = True, max_bytes: Optional[int] = None) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.stopped_at: Optional[int] = None  # the first step not written, once max_bytes was reached
        self._last: dict[str, Any] = {}
        exists = self.path.is_file() and self.path.stat().st_size >= len(_MAGIC)
        if fresh or not exists:
            with open(self.path, "wb") as fh:
                fh.write(_MAGIC)
        self.size = self.path.stat().st_size

    def append(self, steps: np.ndarray, values: np.ndarray, stats: Sequence[str], *, names: Sequence[str],
               signals: Sequence[str], order: Sequence[int], params: Optional[np.ndarray] = None,
               param_stats: Sequence[str] = (), param_names: Sequence[str] = (),
               partial: Sequence[int] = ()) -> int:
        """One chunk: ``values[n, slots, len(stats)]`` of ``steps``, ``params[n, modules, len(param_stats)]``.
        Returns the bytes written (0 when stopped by ``max_bytes``)."""
        n = len(steps)
        if n == 0 or self.stopped_at is not None:
            return 0
        vals = np.ascontiguousarray(values, dtype="<f4")
        head: dict[str, Any] = {"n": n, "slots": int(vals.shape[1]), "stats": list(stats), "codec": "zlib"}
        meta = {"names": list(names[:vals.shape[1]]), "signals": list(signals[:vals.shape[1]]),
                "order": [int(k) for k in order if k < vals.shape[1]], "param_names": list(param_names)}
        for key, value in meta.items():
            if self._last.get(key) != value:
                head[key] = value
                self._last[key] = value
        parts = [np.ascontiguousarray(steps, dtype="<i8").tobytes(), vals.tobytes()]
        if params is not None and params.size:
            p = np.ascontiguousarray(params, dtype="<f4")
            head.update(modules=int(p.shape[1]), param_stats=list(param_stats))
            parts.append(p.tobytes())
        if partial:
            head["partial"] = [int(s) for s in partial]
        payload = zlib.compress(b"".join(parts), 1)
        header = json.dumps(head, separators=(",", ":")).encode("utf-8")
        blob = _CHUNK.pack(_TAG, len(header), len(payload)) + header + payload
        if self.max_bytes is not None and self.size + len(blob) > self.max_bytes:
            self.stopped_at = int(steps[0])
            return 0
        with open(self.path, "ab") as fh:  # one write: a reader sees whole chunks, or a torn last one
            fh.write(blob)
        self.size += len(blob)
        return len(blob)


@dataclass
class StatLog:
    """A run's per-step statistics (:func:`read_stats`): one row per step, ascending, each step once.

    Attributes:
        steps: ``int64[n]``.
        values: ``float32[n, slots, len(stats)]`` (NaN: not measured).
        stats: the column names of ``values``.
        names, signals: per slot, its stream name and signal.
        order: the slots in execution order (forward activations, then backward gradients).
        params: ``float32[n, modules, len(param_stats)]`` or ``None``.
        param_stats, param_names: its columns, and the module of each row.
        partial: steps the run began and never finished.
        torn: the file ended inside a chunk (a killed run): that chunk was dropped.
        chunks: complete chunks read.
    """

    steps: np.ndarray
    values: np.ndarray
    stats: list[str]
    names: list[str]
    signals: list[str]
    order: list[int]
    params: Optional[np.ndarray] = None
    param_stats: list[str] = field(default_factory=list)
    param_names: list[str] = field(default_factory=list)
    partial: list[int] = field(default_factory=list)
    torn: bool = False
    chunks: int = 0

    def slot(self, name: str, signal: str) -> Optional[int]:
        for k, (n, s) in enumerate(zip(self.names, self.signals)):
            if n == name and s == signal:
                return k
        return None


def read_stats(path: str | os.PathLike[str]) -> StatLog:
    """The statistics log at ``path`` (a file, or a save directory holding :data:`STATS_NAME`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a statistics log.
    """
    p = Path(path)
    if p.is_dir():
        p = p / STATS_NAME
    data = p.read_bytes()
    if not data.startswith(_MAGIC):
        raise ValueError(f"{p} is not a lit-probe statistics log")
    pos, torn = len(_MAGIC), False
    meta: dict[str, Any] = {"names": [], "signals": [], "order": [], "param_names": []}
    stats: list[str] = []
    param_stats: list[str] = []
    blocks: list[tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]] = []
    partial: dict[int, bool] = {}  # step -> whether its last row is of a step the run never finished
    while pos < len(data):
        try:
            tag, hlen, plen = _CHUNK.unpack_from(data, pos)
            if tag != _TAG or pos + _CHUNK.size + hlen + plen > len(data):
                raise ValueError("short chunk")
            start = pos + _CHUNK.size
            head = json.loads(data[start:start + hlen].decode("utf-8"))
            raw = zlib.decompress(data[start + hlen:start + hlen + plen])
            n, slots, k = int(head["n"]), int(head["slots"]), len(head["stats"])
            steps = np.frombuffer(raw, "<i8", n, 0).astype(np.int64)
            off = 8 * n
            vals = np.frombuffer(raw, "<f4", n * slots * k, off).reshape(n, slots, k)
            off += 4 * n * slots * k
            prm = None
            if head.get("modules"):
                m, kp = int(head["modules"]), len(head["param_stats"])
                prm = np.frombuffer(raw, "<f4", n * m * kp, off).reshape(n, m, kp)
                param_stats = list(head["param_stats"])
        except (struct.error, ValueError, KeyError, zlib.error, UnicodeDecodeError):
            torn = True  # a killed run's last chunk: everything before it is whole
            break
        for key in meta:
            if key in head:
                meta[key] = head[key]
        stats = list(head["stats"])
        marked = {int(s) for s in head.get("partial", [])}
        partial.update((int(s), int(s) in marked) for s in steps)
        blocks.append((steps, vals, prm))
        pos = start + hlen + plen
    width = max((b[1].shape[1] for b in blocks), default=0)
    kk = len(stats)
    mods = max((b[2].shape[1] for b in blocks if b[2] is not None), default=0)
    kp = len(param_stats)
    all_steps = np.concatenate([b[0] for b in blocks]) if blocks else np.zeros(0, np.int64)
    values = np.full((len(all_steps), width, kk), np.nan, dtype=np.float32)
    params = np.full((len(all_steps), mods, kp), np.nan, dtype=np.float32) if mods else None
    row = 0
    for steps, vals, prm in blocks:  # streams only ever grow: pad older chunks
        n = len(steps)
        values[row:row + n, :vals.shape[1], :vals.shape[2]] = vals[:, :, :kk]
        if params is not None and prm is not None:
            params[row:row + n, :prm.shape[1], :min(prm.shape[2], kp)] = prm[:, :, :kp]
        row += n
    # each step once, the last row of it winning (a resumed run re-runs the steps after its checkpoint)
    rev = all_steps[::-1]
    uniq, idx = np.unique(rev, return_index=True)
    keep = len(all_steps) - 1 - idx
    return StatLog(uniq.astype(np.int64), values[keep], stats, list(meta["names"]), list(meta["signals"]),
                   [int(k) for k in meta["order"]], params[keep] if params is not None else None, param_stats,
                   list(meta["param_names"]), sorted(s for s, p in partial.items() if p), torn, len(blocks))
