"""Figure inputs: turn a (possibly device-resident) tensor into the small numpy array a figure needs.

Runs only on figure steps, on the training thread, inside a hook: it slices the few samples and
channels a figure shows *on the tensor's device*, upcasts to float32 and copies to the CPU exactly once.
The result is a fresh numpy array that shares no memory with the tensor (so a later in-place op on the
tensor, e.g. ``ReLU(inplace=True)``, cannot change it) and holds no reference to it.

Layouts (which dimension holds the channels):

* ``"channels_first"`` -- conv-like ``[N, C, ...]``: samples on dim 0, channels on dim 1.
* ``"channels_last"`` -- ``[N, F]`` or sequence ``[N, T, F]``: features on the last dim.
* ``"auto"`` -- 2-D: ``channels_last``; >= 3-D: ``channels_first``. A 3-D tensor is ambiguous
  (``[N, C, L]`` from ``Conv1d`` vs ``[N, T, F]`` from a transformer); pass the layout the session
  derived with :func:`lit_probe.vocab.unit_layouts` (the same one its statistics use).

Imports torch and numpy only.
"""

from __future__ import annotations


import numpy as np
import torch
from .vocab import layout_for_module

__all__ = ["LAYOUTS", "layout_for_module", "snapshot_tensor", "device_part"]

LAYOUTS = ("auto", "channels_first", "channels_last")

def snapshot_tensor(
    t: torch.Tensor, num_samples: int, max_channels: int, *, layout: str = "auto"
) -> np.ndarray | None:
    """Copy the few samples and channels a figure shows to a float32 numpy array.

    Detaches, keeps the first ``num_samples`` samples (dim 0) and at most ``max_channels`` channels
    (dim 1 for channels-first tensors with >= 3 dims, the last dim for 2-D ``[N, F]`` and for
    channels-last ``[N, T, F]``), upcasts to float32 and copies to the CPU once. Slicing happens before
    the copy, on the tensor's device, so only the shown part crosses to the host.

    Args:
        t: the activation or gradient (any device, any floating dtype). 1-D tensors are treated as one
            sample ``[1, F]``.
        num_samples: how many samples to keep (>= 1).
        max_channels: how many channels / features to keep (>= 1).
        layout: ``"auto"``, ``"channels_first"`` or ``"channels_last"`` (see the module docstring).

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
    if not isinstance(t, torch.Tensor):
        return None
    if t.layout != torch.strided or t.is_quantized or t.is_meta or not t.is_floating_point():
        return None
    if t.dim() == 0 or t.numel() == 0:
        return None
    with torch.no_grad():
        # copy=True: a CPU float32 input would otherwise come back as a view of t's storage.
        x = _figure_part(t, num_samples, max_channels, layout).to(device="cpu", dtype=torch.float32, copy=True)
    out = np.ascontiguousarray(x.numpy())
    del x
    return out


def _figure_part(t: torch.Tensor, num_samples: int, max_channels: int, layout: str) -> torch.Tensor:
    """The view of ``t`` a figure shows: the first samples and channels (see :func:`snapshot_tensor`)."""
    x = t.detach()
    if x.dim() == 1:
        x = x.unsqueeze(0)
    x = x[:num_samples]
    if x.dim() == 2 or layout == "channels_last":
        return x[..., :max_channels]
    return x[:, :max_channels]


def device_part(t: torch.Tensor, num_samples: int, max_channels: int, *, layout: str = "auto") -> torch.Tensor | None:
    """A copy, on ``t``'s device and in its dtype, of the part a figure shows: one small kernel, no host
    transfer, no reference to ``t`` (an in-place op after the hook cannot change it). The flight recorder keeps
    these for the last steps, so that a finding's figures show the step that fired (:func:`snapshot_tensor`
    turns one into the figure's array when needed). ``None`` where :func:`snapshot_tensor` would give ``None``.
    Runs in a hook on every step while figures are on: as few operations as the slicing needs (a slice is left
    out when it would keep everything).
    """
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.layout != torch.strided or t.is_meta:
        return None
    d = t.dim()
    if d == 0 or t.numel() == 0:
        return None
    x = t.detach()
    if d == 1:
        return x[:max_channels].unsqueeze(0).clone()
    if x.shape[0] > num_samples:
        x = x[:num_samples]
    if d == 2 or layout == "channels_last":
        if x.shape[-1] > max_channels:
            x = x[..., :max_channels]
    elif x.shape[1] > max_channels:
        x = x[:, :max_channels]
    return x.clone()
