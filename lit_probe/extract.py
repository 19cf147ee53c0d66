"""Extract
=======

One-off feature extraction with the probe path grammar of :mod:`lit_probe.selection`, outside any
training loop::

    with lit_probe.capture(model, ["layer2.0.conv1", "layer4"], gradients=True) as cap:
        loss = model(x).logsumexp(1).sum()
        loss.backward()
    cap["layer4"]               # the output of model.layer4 (a detached clone)
    cap.gradients["layer4"]     # d loss / d output of model.layer4

    out, feats = lit_probe.extract_features(model, "layer*", x)

Unlike torchvision's ``IntermediateLayerGetter`` (top-level children only) and
``create_feature_extractor`` (symbolic tracing: fails on data-dependent control flow, and names nodes,
not module calls), :func:`capture` uses forward hooks, so it works on any module at any depth, on
modules called several times per forward, and on modules returning tuples, dicts or dataclasses.

Semantics worth knowing:

* **Several calls.** A module called more than once per forward (ResNet's shared ``relu``, a weight-tied
  layer, an RNN cell), or a model called several times inside the block, has every call kept, in call
  order: ``cap.calls(path)`` is the list, ``cap[path]`` the last one.
* **Values.** Every floating tensor of an output is stored as a detached clone taken when the module
  returns, so a later in-place op (``ReLU(inplace=True)``, ``out += identity``) does not change it and
  nothing references the autograd graph. Structure (tuple, list, dict, namedtuple, dataclass) is kept;
  non-tensor leaves are kept as they are.
* **Gradients.** With ``gradients=True`` a tensor hook is registered on each output tensor that requires
  grad, from inside the forward hook (not ``register_full_backward_hook``, which breaks with in-place ops
  after the module: ``shared/PITFALLS.md`` items 1-2). It receives d loss / d output of the module's own
  output (the value before any later in-place op, PITFALLS item 4). Outputs computed under
  ``torch.no_grad()`` / ``inference_mode`` or that do not require grad get no gradient: the path is
  simply absent from ``cap.gradients``. Call ``backward()`` inside the block: the tensor hooks are removed
  on exit too.
* **The model is not changed**: no ``eval()``/``train()``, no attribute set; hooks it had before stay.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .selection import resolve

__all__ = ["capture", "Captured", "CapturedGradients", "extract_features"]

_MAX_DEPTH = 8


def _map_structure(obj: Any, fn: Callable[[Any], Any], is_leaf: Callable[[Any], bool],
                   _depth: int = 0) -> Any:
    """Rebuild ``obj`` (tuple, list, dict, namedtuple, dataclass) with ``fn`` applied to every leaf
    for which ``is_leaf`` is true; other leaves are returned unchanged."""
    if is_leaf(obj):
        return fn(obj)
    if _depth > _MAX_DEPTH:
        return obj
    rec = lambda o: _map_structure(o, fn, is_leaf, _depth + 1)  # noqa: E731
    if isinstance(obj, tuple):
        items = [rec(o) for o in obj]
        if hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*items)
        try:
            return type(obj)(items)
        except Exception:  # a tuple subclass with another constructor: a plain tuple keeps the values
            return tuple(items)
    if isinstance(obj, list):
        return [rec(o) for o in obj]
    if isinstance(obj, dict):
        items = {k: rec(v) for k, v in obj.items()}
        try:
            return type(obj)(items)
        except Exception:
            return items
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        new = copy.copy(obj)
        for f in dataclasses.fields(obj):
            if hasattr(obj, f.name):
                object.__setattr__(new, f.name, rec(getattr(obj, f.name)))
        return new
    return obj


def _is_tensor(obj: Any) -> bool:
    return isinstance(obj, torch.Tensor)


class _Slot:
    """Placeholder for one output tensor's gradient, filled by its tensor hook."""

    __slots__ = ("grad",)

    def __init__(self) -> None:
        self.grad: torch.Tensor | None = None


def _is_slot(obj: Any) -> bool:
    return isinstance(obj, _Slot)


class _GradRecord:
    """The gradients of one call of one module, in the structure of its output."""

    __slots__ = ("template", "slots")

    def __init__(self, template: Any, slots: list[_Slot]) -> None:
        self.template = template
        self.slots = slots

    @property
    def received(self) -> bool:
        return any(s.grad is not None for s in self.slots)

    def value(self) -> Any:
        return _map_structure(self.template, lambda s: s.grad, _is_slot)


class CapturedGradients(Mapping):
    """Gradients captured by :func:`capture` with ``gradients=True``, keyed by resolved path.

    ``grads[path]`` is the gradient w.r.t. the output of the latest call of that module that received
    one (same structure as the output; ``None`` for output tensors that got no gradient). A path is
    present only once some gradient arrived: outputs computed without grad never appear.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        self._records: dict[str, list[_GradRecord | None]] = {p: [] for p in paths}

    def calls(self, path: str) -> list[Any]:
        """Gradients of every call of ``path``, aligned with :meth:`Captured.calls` (``None`` where
        that call received no gradient).

        Raises:
            KeyError: ``path`` is not one of the captured paths.
        """
        if path not in self._records:
            raise KeyError(f"{path!r} is not a captured path; captured: {list(self._records)}")
        return [r.value() if r is not None and r.received else None for r in self._records[path]]

    def __getitem__(self, path: str) -> Any:
        for r in reversed(self._records.get(path, [])):
            if r is not None and r.received:
                return r.value()
        if path in self._records:
            raise KeyError(f"No gradient reached {path!r}: the output did not require grad (torch.no_grad(), "
                           "inference_mode, frozen layers), backward() was not called inside the block, or "
                           "the output is not on the loss's path.")
        raise KeyError(f"{path!r} is not a captured path; captured: {list(self._records)}")

    def __iter__(self) -> Iterator[str]:
        return (p for p, rs in self._records.items() if any(r is not None and r.received for r in rs))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"CapturedGradients({list(self)})"


class Captured(Mapping):
    """What :func:`capture` recorded, keyed by resolved probe path (a read-only dict).

    ``captured[path]`` is the output of the last call of that module (detached clone, structure kept);
    :meth:`calls` lists every call in order; :attr:`gradients` holds the gradients when requested. Only
    paths whose module ran at least once are keys; :attr:`paths` lists every resolved path.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths: list[str] = list(paths)
        self._calls: dict[str, list[Any]] = {p: [] for p in self.paths}
        self.gradients = CapturedGradients(self.paths)

    def calls(self, path: str) -> list[Any]:
        """Every recorded output of ``path``, in call order (several per forward for a reused module).

        Raises:
            KeyError: ``path`` is not one of the captured paths.
        """
        if path not in self._calls:
            raise KeyError(f"{path!r} is not a captured path; captured: {self.paths}")
        return list(self._calls[path])

    def clear(self) -> None:
        """Forget every recorded output and gradient (e.g. between batches of a long loop)."""
        for p in self.paths:
            self._calls[p].clear()
            self.gradients._records[p].clear()

    def __getitem__(self, path: str) -> Any:
        calls = self._calls.get(path)
        if calls:
            return calls[-1]
        if calls is not None:
            raise KeyError(f"{path!r} was not called: run the model inside the `with capture(...)` block "
                           "(and check that this module is used by forward).")
        raise KeyError(f"{path!r} is not a captured path; captured: {self.paths}")

    def __iter__(self) -> Iterator[str]:
        return (p for p in self.paths if self._calls[p])

    def __len__(self) -> int:
        return sum(1 for p in self.paths if self._calls[p])

    def __repr__(self) -> str:
        return f"Captured({{{', '.join(f'{p!r}: {len(self._calls[p])} call(s)' for p in self.paths)}}})"


Device = Union[str, torch.device, None]


class capture:  # noqa: N801 - used like a function: `with capture(model, paths) as cap:`
    """Record the outputs (and optionally gradients) of modules of ``model`` while the block runs.

    Args:
        model: any ``nn.Module``.
        paths: one probe declaration or a list (exact dotted paths, globs with ``*``/``**``,
            ``type:Name``, ``re:...``; see :mod:`lit_probe.selection`).
        gradients: also record d loss / d output of every module through tensor hooks (see the module
            docstring); call ``backward()`` (or ``torch.autograd.grad``) inside the block.
        to: move the stored tensors to this device (e.g. ``"cpu"``); ``None`` keeps them where they are.
        detach: ``True`` (default) stores detached clones. ``False`` stores the output tensors themselves,
            still attached to the graph (e.g. to differentiate through them); a later in-place op on them
            changes the stored value.

    Returns:
        ``with capture(...) as cap`` gives a :class:`Captured`.

    Raises:
        ProbeSelectionError: a declaration matches no module (the message names the closest paths).
        RuntimeError: the same ``capture`` object is entered twice.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str] | str, gradients: bool = False,
                 to: Device = None, detach: bool = True) -> None:
        if isinstance(paths, str):
            paths = [paths]
        self.model = model
        self.modules = resolve(model, list(paths))
        self.gradients = gradients
        self.to = torch.device(to) if to is not None else None
        self.detach = detach
        self.captured = Captured([n for n, _ in self.modules])
        self._handles: list[RemovableHandle] = []
        self._entered = False

    def _store(self, t: torch.Tensor) -> torch.Tensor:
        if not self.detach:
            return t.to(self.to) if self.to is not None else t
        d = t.detach()
        return d.to(self.to, copy=True) if self.to is not None else d.clone()

    def _make_hook(self, path: str) -> Callable[[nn.Module, Any, Any], None]:
        calls = self.captured._calls[path]
        records = self.captured.gradients._records[path]

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            calls.append(_map_structure(output, self._store, _is_tensor))
            if not self.gradients:
                return None
            if not torch.is_grad_enabled():
                records.append(None)
                return None
            slots: list[_Slot] = []

            def hook_tensor(t: torch.Tensor) -> Any:
                if not (t.is_floating_point() or t.is_complex()) or not t.requires_grad:
                    return None  # stays None in the gradient structure
                slot = _Slot()
                slots.append(slot)

                def store_grad(grad: torch.Tensor) -> None:
                    g = grad.detach()
                    slot.grad = g.to(self.to, copy=True) if self.to is not None else g.clone()
                    return None

                self._handles.append(t.register_hook(store_grad))
                return slot

            template = _map_structure(output, hook_tensor, _is_tensor)
            records.append(_GradRecord(template, slots) if slots else None)
            return None

        return hook

    def __enter__(self) -> Captured:
        if self._entered:
            raise RuntimeError("This capture(...) was entered already; "
                               "create a new one for each `with` block.")
        self._entered = True
        try:
            for name, module in self.modules:
                self._handles.append(module.register_forward_hook(self._make_hook(name)))
        except BaseException:
            self._remove()
            raise
        return self.captured

    def _remove(self) -> None:
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._remove()  # returns None: an exception raised in the block propagates
        return None


def extract_features(model: nn.Module, paths: Sequence[str] | str, *args: Any,
                     **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """Run ``model(*args, **kwargs)`` once and return its output with the outputs of ``paths``.

    Args:
        model: any ``nn.Module``; called as it is (its train/eval mode and grad mode are the caller's).
        paths: probe declarations, as for :func:`capture`.
        *args: positional arguments of the forward.
        **kwargs: keyword arguments of the forward.

    Returns:
        ``(output, features)``: the model's output unchanged, and ``{path: detached clone of the module's
        output}`` for every resolved path whose module ran (the last call for a module called several
        times; use :func:`capture` and ``Captured.calls`` for all of them).

    Raises:
        ProbeSelectionError: a declaration matches no module.
    """
    with capture(model, paths) as cap:
        output = model(*args, **kwargs)
    return output, dict(cap)
