"""Vocabulary
==========

The words every stage shares, defined once: signals, streams (one module call, one signal), figure kinds,
statistic names, metric keys, and "which dimension of an output holds the units".

Stats, detectors, figures, the flight recorder and reports import these; none of them guesses on its own.
In particular :func:`unit_dim` is the ONE place that says which dimension of an output holds its units: the
statistics' per-unit windows (dead units), the figure snapshots, the dead marks on the figures and the titles
all ask it. Importing this module imports nothing but the standard library: the drawing process (which
never imports torch) uses :func:`unit_dim` too; torch's ``nn`` is imported on the first call that needs
module types.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "local_tensor",
    "ACTIVATION", "GRADIENT", "PARAMETER", "SIGNALS", "FIGURE_KINDS", "TIMELINE_LAYER", "LOGGED_STATS", "CALL_SEP",
    "MAX_CALLS",
    "LAYOUTS", "stream_name", "metric_key", "layout_for_module", "unit_layouts", "unit_dim", "unit_count",
    "is_relu_like",
]

#: A module's output.
ACTIVATION = "activation"
#: d loss / d output of a module.
GRADIENT = "gradient"
#: The weights a module owns, their gradients and the optimizer's update of them (:mod:`lit_probe.params`).
PARAMETER = "parameter"
SIGNALS = (ACTIVATION, GRADIENT, PARAMETER)

#: The "layer" of figures of the whole model (the health timeline): its directory and its rows in the figure index.
TIMELINE_LAYER = "_all"
#: Figure kinds ``FeatureProbe(figures=...)`` accepts; also file names (``<layer>/<kind>.png``) and W&B keys.
FIGURE_KINDS = ("activations", "gradients", "histograms", "timeline", "parameters")

#: Statistics logged per stream at log steps, as ``probe/<stream>/<prefix>_<stat>`` (prefix ``act`` or ``grad``).
LOGGED_STATS = {ACTIVATION: ("rms", "mean", "absmax", "zero_fraction", "nonfinite"),
                GRADIENT: ("rms", "mean", "absmax", "nonfinite")}
_PREFIX = {ACTIVATION: "act", GRADIENT: "grad"}

#: Separator between a module path and its call index: the second call of ``layer1.0.relu`` in a step is the
#: stream ``layer1.0.relu#1`` (the first call keeps the plain path). ``#`` is valid in file names on every
#: platform and never appears in a ``named_modules()`` path.
CALL_SEP = "#"
#: Calls of one module per step that get a stream of their own; later calls are merged into the last one.
MAX_CALLS = 4


def stream_name(path: str, call: int) -> str:
    """The stream name of call ``call`` (0-based, within one step) of the module at ``path``."""
    return path if call == 0 else f"{path}{CALL_SEP}{call}"


def metric_key(stream: str, signal: str, stat: str) -> str:
    """The logger key (without the ``probe/`` prefix) of one statistic of one stream."""
    return f"{stream}/{_PREFIX[signal]}_{stat}"


# ---------------------------------------------------------------------------------------------------- units
#: Where a module's output keeps its units (:func:`layout_for_module`, :func:`unit_dim`).
LAYOUTS = ("auto", "channels_first", "channels_last")


@functools.cache
def _module_types() -> tuple[type, tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """``(nn.Module, channels-first types, channels-last types, ReLU-like types)``, on first use."""
    from torch import nn

    first: tuple[type, ...] = (
        nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
        nn.GroupNorm, nn.LocalResponseNorm, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
        nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.Dropout1d, nn.Dropout2d,
        nn.Dropout3d, nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle,
    )
    last: tuple[type, ...] = (
        nn.Linear, nn.Bilinear, nn.LayerNorm, nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention,
        nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder, nn.TransformerDecoder,
        nn.RNNBase,
    ) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
    # Activations whose output is never positive exactly when the unit passes no gradient: "dead" means
    # "never positive over the window" only for these.
    relu_like: tuple[type, ...] = (nn.ReLU, nn.ReLU6)
    return nn.Module, first, last, relu_like


# classes outside torch.nn, matched by name (transformers' Conv1D is a Linear with transposed weights)
_CHANNELS_LAST_NAMES = ("Conv1D", "Linear", "LayerNorm", "RMSNorm", "Attention", "Embedding")
_CHANNELS_FIRST_NAMES = ("Conv2d", "Conv1d", "Conv3d", "BatchNorm", "GroupNorm")


def layout_for_module(module: object) -> str:
    """Where a module's own output keeps its units, from its type alone.

    Returns:
        ``"channels_first"`` (``[N, C, ...]``: convolutions, batch/instance/group norms, pooling),
        ``"channels_last"`` (``[N, F]`` / ``[N, T, F]`` / ``[N, H, W, C]``: linear, layer norm, embeddings,
        attention, RNNs) or ``"auto"`` (element-wise activations, containers, custom blocks): decided by
        :func:`unit_layouts` from the modules around it, or by :func:`unit_dim`'s shape rule.
    """
    module_type, channels_first, channels_last, _ = _module_types()
    if isinstance(module, channels_last):
        return "channels_last"
    if isinstance(module, channels_first):
        return "channels_first"
    name = type(module).__name__
    if isinstance(module, module_type) and not any(True for _ in module.children()):
        if any(w in name for w in _CHANNELS_FIRST_NAMES):
            return "channels_first"
        if any(w in name for w in _CHANNELS_LAST_NAMES):
            return "channels_last"
    return "auto"


def unit_layouts(root: nn.Module | None, names: Sequence[str], modules: Sequence[nn.Module]) -> list[str]:
    """The unit layout of each probed module, one rule for statistics and figures alike.

    A module whose type tells (:func:`layout_for_module`) uses it. An element-wise module (a ReLU, GELU,
    dropout, identity) keeps the layout of what feeds it: the nearest leaf before it in definition order
    whose type tells (a ``GELU`` after a ``Conv1d`` is channels-first, after a ``Linear`` channels-last). A
    container uses the layout of its last leaf that tells (what it returns).
    """
    leaves: list[tuple[str, str]] = []  # (path, layout) of every leaf of root in definition order
    if root is not None:
        for path, m in root.named_modules():
            if not any(True for _ in m.children()):
                leaves.append((path, layout_for_module(m)))
    position = {p: k for k, (p, _) in enumerate(leaves)}
    out = []
    for name, module in zip(names, modules):
        own = layout_for_module(module)
        if own != "auto":
            out.append(own)
            continue
        inner = [layout_for_module(m) for m in module.modules() if not any(True for _ in m.children())]
        told = [x for x in inner if x != "auto"]
        if told and any(True for _ in module.children()):
            out.append(told[-1])  # a container returns what its last telling leaf produced
            continue
        k = _leaf_position(position, name)
        found = "auto"
        while k is not None and k > 0:
            k -= 1
            if leaves[k][1] != "auto":
                found = leaves[k][1]
                break
        out.append(found)
    return out


def _leaf_position(position: dict[str, int], name: str) -> int | None:
    if name in position:
        return position[name]
    for path, k in position.items():  # canonical names drop wrapper segments: match by suffix
        if path.endswith("." + name) or path.replace("._orig_mod", "") == name:
            return k
    return None


def unit_dim(layout: str, ndim: int) -> int:
    """The dimension that holds units in an ``ndim``-dimensional output of the given layout.

    The one rule for every stage: the statistics count units (and dead units) on it, the figure snapshots keep
    the first units of it, the figures draw it as channels / features and mark dead units along it.

    ``channels_first``: 1 (``[N, C, ...]``); ``channels_last``: the last; ``auto`` (no module before it
    tells): 1 for 4-D and larger (images), the last for 2-D and 3-D (features, sequences ``[N, T, F]``). A
    0-D or 1-D output is one unit axis: 0. Where a 1-D output is shown as one sample ``[1, F]``, ask with
    ``ndim=2``.
    """
    if ndim <= 1:
        return 0
    if layout == "channels_first":
        return 1
    if layout == "channels_last":
        return ndim - 1
    return 1 if ndim >= 4 else ndim - 1


def unit_count(layout: str, shape: Sequence[int]) -> int:
    """How many units an output of ``shape`` has (the length of its dead-unit mask): ``shape[unit_dim]``."""
    return int(shape[unit_dim(layout, len(shape))]) if len(shape) else 1


# ---------------------------------------------------------------------------------------------------- death


def local_tensor(t: Any) -> Any:
    """A ``DTensor``'s local shard (FSDP2, tensor parallelism: a view, no copy, no collective); any other tensor
    itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None and hasattr(t, "placements") else t


def is_relu_like(module: object) -> bool:
    """Whether "never positive over the window" means the module's units are dead.

    True for ReLU and ReLU6 (and classes outside ``torch.nn`` named so), whose negative side is flat. False
    for everything else: SiLU/GELU/LeakyReLU pass gradient for negative inputs; an ``Identity``, a ``Linear``
    or a normalisation returns pre-activations. A container is judged by what it returns (its last leaf).
    """
    module_type, _, _, relu_like = _module_types()
    if isinstance(module, module_type) and any(True for _ in module.children()):
        leaves = [m for m in module.modules() if not any(True for _ in m.children())]
        return bool(leaves) and is_relu_like(leaves[-1])
    return isinstance(module, relu_like) or type(module).__name__ in ("ReLU", "ReLU6")
