"""Figure inputs: turn a (possibly device-resident) tensor into the small numpy array a figure needs.

Runs only on figure steps (and, for the flight recorder, on every step while figures are on), on the training
thread, inside a hook: it slices the few samples and units a figure shows *on the tensor's device*, upcasts to
float32 and copies to the CPU exactly once. The result is a fresh numpy array that shares no memory with the
tensor (so a later in-place op on the tensor, e.g. ``ReLU(inplace=True)``, cannot change it) and holds no
reference to it. The flight recorder (:class:`RecentParts`) keeps parts on the device for the last steps, and holds
small CPU tensors that nothing writes to after their hook by reference instead (:func:`held_part`).

Which dimension holds the units is not decided here: :func:`lit_probe.vocab.unit_dim` says it for the
layout the session derived with :func:`lit_probe.vocab.unit_layouts` (the same axis its statistics and
dead-unit masks use). Samples are always dim 0; a 1-D tensor is one sample ``[1, F]``.

Imports torch and numpy only (and the vocabulary).
"""

from __future__ import annotations

import numpy as np
import torch

from .vocab import LAYOUTS, layout_for_module, unit_dim

__all__ = ["LAYOUTS", "RecentParts", "device_part", "held_part", "layout_for_module", "snapshot_tensor",
           "to_host"]


def snapshot_tensor(
    t: torch.Tensor, num_samples: int, max_channels: int, *, layout: str = "auto"
) -> np.ndarray | None:
    """Copy the few samples and units a figure shows to a float32 numpy array.

    Detaches, keeps the first ``num_samples`` samples (dim 0) and at most ``max_channels`` units (on
    :func:`~lit_probe.vocab.unit_dim` of ``layout``: dim 1 of a channels-first ``[N, C, ...]``, the last dim
    of ``[N, F]`` and of a sequence ``[N, T, F]``), upcasts to float32 and copies to the CPU once. Slicing
    happens before the copy, on the tensor's device, so only the shown part crosses to the host.

    Args:
        t: the activation or gradient (any device, any floating dtype). 1-D tensors are treated as one
            sample ``[1, F]``.
        num_samples: how many samples to keep (>= 1).
        max_channels: how many units (channels / features) to keep (>= 1).
        layout: ``"auto"``, ``"channels_first"`` or ``"channels_last"`` (:data:`~lit_probe.vocab.LAYOUTS`).

    Returns:
        A new C-contiguous float32 array sharing no memory with ``t`` (``[n, C, ...]``, ``[n, F]`` or
        ``[n, T, F]``), or ``None`` when ``t`` is not a tensor, not floating point, sparse/quantized/meta,
        0-D or empty.

    Raises:
        ValueError: when ``num_samples`` or ``max_channels`` is below 1 or ``layout`` is unknown.
    """
    if num_samples < 1 or max_channels < 1:
        raise ValueError(f"num_samples and max_channels must be >= 1, got {num_samples}, {max_channels}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not _drawable(t) or t.is_quantized:
        return None
    with torch.no_grad():
        return to_host(_figure_part(t.detach(), num_samples, max_channels, layout))


def to_host(part: torch.Tensor | None) -> np.ndarray | None:
    """A float32 host copy of ``part`` (a :func:`device_part`, already sliced): one copy, no shared memory."""
    if part is None:
        return None
    # copy=True: a CPU float32 input would otherwise come back as a view of its storage.
    return np.ascontiguousarray(part.detach().to(device="cpu", dtype=torch.float32, copy=True).numpy())


def device_part(
    t: torch.Tensor, num_samples: int, max_channels: int, *, layout: str = "auto"
) -> torch.Tensor | None:
    """A copy, on ``t``'s device and in its dtype, of the part a figure shows: one small kernel, no host
    transfer, no reference to ``t`` (an in-place op after the hook cannot change it). The flight recorder
    keeps these for the last steps, so that a finding's figures show the step that fired (:func:`to_host`
    turns one into the figure's array when needed, the same array :func:`snapshot_tensor` gives). ``None``
    where :func:`snapshot_tensor` would give ``None``. Runs in a hook on every step while figures are on: as
    few operations as the slicing needs (a slice is left out when it would keep everything).
    """
    if not _drawable(t):
        return None
    return _figure_part(t.detach(), num_samples, max_channels, layout).clone()


def _drawable(t: object) -> bool:
    return (isinstance(t, torch.Tensor) and t.is_floating_point() and t.layout == torch.strided
            and not t.is_meta and t.dim() > 0 and t.numel() > 0)


def _figure_part(x: torch.Tensor, num_samples: int, max_channels: int, layout: str) -> torch.Tensor:
    """The view of ``x`` a figure shows: the first samples, the first units on the unit axis."""
    if x.dim() == 1:
        return x[:max_channels].unsqueeze(0)
    if x.shape[0] > num_samples:
        x = x[:num_samples]
    u = unit_dim(layout, x.dim())
    if x.shape[u] > max_channels:
        x = x.narrow(u, 0, max_channels)
    return x


def held_part(entry: tuple, num_samples: int, max_channels: int, layout: str) -> torch.Tensor | None:
    """The part a figure shows of a flight-recorder entry held by reference (``(tensor, None, version at the hook)``,
    see :class:`RecentParts`), or ``None`` when something wrote to the tensor after its hook."""
    t, _, version = entry
    try:
        same = t._version == version
    except RuntimeError:  # pragma: no cover - an inference tensor has no version counter (never held)
        same = False
    return device_part(t, num_samples, max_channels, layout=layout) if same else None


class RecentParts:
    """The flight recorder's parts, per stream, for the last :attr:`DEPTH` steps, so that a finding's figures show
    the step that fired. An entry is ``(part, tensor's shape)``: a copy, in a ring of :attr:`DEPTH` device buffers
    per stream of what a figure shows, so that every step costs one copy per stream into memory that already exists
    (no allocation, no slicing logic: the index of a stream's part is worked out once per shape).

    Small tensors are held by reference instead (no kernel at all: a copy of 64 floats costs what a kernel launch
    costs, a few us, on every step and stream): the session's hooks store ``(tensor, None, its version counter)`` for
    the streams in :attr:`held`, tensors of at most :attr:`HELD_NUMEL` elements, at most :attr:`HELD_PER_STEP`
    elements a step (the last four steps hold at most 16 Mi elements alive). A stream is held only after a step on
    probation: :meth:`keep` copies its part and keeps the tensor's version counter, and :meth:`settle` reads it again
    at the step's end. A stream written to after its hook (``ReLU(inplace=True)``, ``out += identity``, a custom
    backward that scales its gradient in place) stays copied. A held tensor written to later anyway gives no part
    (:func:`held_part`), never a wrong one, and the session copies that stream from then on (:meth:`copy_from_now`).

    The session keeps the last three steps (:meth:`ProbeSession.end_step`) and turns a step's parts into host arrays
    the moment it claims them, so a ring of four (those three and the step being written) never overwrites a part
    still in use. Call :meth:`advance` when a new step begins, :meth:`settle` when one ends; :meth:`keep` from a hook,
    with ``t`` detached or under grad mode off."""

    DEPTH = 4
    HELD_NUMEL = 1 << 16
    HELD_PER_STEP = 1 << 22

    def __init__(self, samples: int, channels: int) -> None:
        self.samples = max(1, int(samples))
        self.channels = max(1, int(channels))
        self.pos = 0
        # slot -> [shape, dtype, device, index (None: the whole tensor; False: not drawable), ring of buffers, the
        # part's size, the samples one narrow_copy takes (0: not that case), on probation]
        self._plans: dict[int, list] = {}
        #: the streams held by reference (the session's hooks read it); :attr:`_copied`: judged to be copied
        self.held: set[int] = set()
        self._copied: set[int] = set()
        self._probation: list[tuple[int, torch.Tensor, int]] = []

    def advance(self) -> None:
        self.pos = (self.pos + 1) % self.DEPTH

    def settle(self) -> None:
        """At a step's end: each stream on probation is held from now on when nothing wrote to its tensor since its
        hook, else copied."""
        for slot, t, version in self._probation:
            (self.held if t._version == version else self._copied).add(slot)
            plan = self._plans.get(slot)
            if plan is not None:
                plan[7] = False
        self._probation.clear()

    def copy_from_now(self, slot: int) -> None:
        """A held tensor of ``slot`` was written to after its hook: copy that stream from now on."""
        self.held.discard(slot)
        self._copied.add(slot)

    def keep(self, slot: int, t: torch.Tensor, layout: str) -> tuple[torch.Tensor | None, tuple[int, ...]]:
        """``(copy of the part of t a figure shows, t's shape)``; the copy is ``None`` where :func:`device_part`
        gives ``None``. The copy stays valid until this slot's ring comes round again (:attr:`DEPTH` steps)."""
        shape = t.shape
        plan = self._plans.get(slot)
        if plan is None or plan[0] != shape or plan[1] is not t.dtype or plan[2] != t.device:
            plan = self._plan(slot, t, layout)
        if plan[7] and type(t) is torch.Tensor and not t.is_inference():
            h = t.detach() if t.requires_grad else t
            self._probation.append((slot, h, h._version))
        index = plan[3]
        if plan[6] and type(t) is torch.Tensor:
            buf = plan[4][self.pos]
            if buf is not None:
                torch.narrow_copy(t, 0, 0, plan[6], out=buf)
                return buf, shape
        if index is False:
            return None, shape
        if isinstance(index, str):  # a 1-D tensor: one sample of its first units
            return device_part(t, self.samples, self.channels, layout=layout), shape
        if index is None:
            part = t
        elif type(t) is torch.Tensor:  # a leading corner of every dimension: the same strides and offset
            part = torch.as_strided(t, plan[5], t.stride(), t.storage_offset())
        else:  # subclasses (DTensor, ...): their own indexing
            part = t[index]
        ring = plan[4]
        buf = ring[self.pos]
        if buf is None:
            ring[self.pos] = part.clone(memory_format=torch.contiguous_format)
        else:
            buf.copy_(part)
        return ring[self.pos], shape

    def _plan(self, slot: int, t: torch.Tensor, layout: str) -> list:
        shape = t.shape
        index = self._index(t, layout)
        size = tuple(min(n, i.stop) if isinstance(i, slice) and i.stop is not None else n
                     for n, i in zip(shape, index + (slice(None),) * (len(shape) - len(index)))) \
            if isinstance(index, tuple) else None
        # the first samples only, on the CPU: one kernel (narrow_copy into the ring buffer)
        head = index[0].stop if isinstance(index, tuple) and len(index) == 1 and t.device.type == "cpu" else 0
        # a small CPU tensor of a stream not judged yet: on probation for being held by reference
        probation = slot not in self.held and slot not in self._copied and index is not False and \
            t.device.type == "cpu" and type(t) is torch.Tensor and t.numel() <= self.HELD_NUMEL
        plan = self._plans[slot] = [shape, t.dtype, t.device, index, [None] * self.DEPTH, size, head, probation]
        return plan

    def _index(self, t: torch.Tensor, layout: str) -> tuple | str | None | bool:
        if not _drawable(t) or t.is_quantized:
            return False
        if t.dim() == 1:
            return "1d"
        index = [slice(None)] * t.dim()
        if t.shape[0] > self.samples:
            index[0] = slice(0, self.samples)
        u = unit_dim(layout, t.dim())
        if t.shape[u] > self.channels:
            index[u] = slice(0, self.channels)
        while index and index[-1] == slice(None):
            index.pop()
        return tuple(index) if index else None
