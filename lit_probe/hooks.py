"""Hooks
=====

:class:`HookRegistry` is the one owner of every hook lit_probe puts on a model. It registers a forward
hook per probed module and, from inside it, a gradient hook on each output that requires grad (a pre-hook on
the output's autograd node, :class:`_GradPreHook`; a tensor hook where there is no node or the output is a
tensor subclass); it removes
every module handle on :meth:`HookRegistry.remove` (idempotent), which the session calls on every way
out of a run.

Why tensor hooks on the outputs, not ``register_full_backward_hook``: the gradient a full backward hook
reports as ``grad_output`` is exactly the gradient of the loss with respect to the module's output,
which a hook on the output tensor receives too. The full backward hook wraps outputs in a
``BackwardHookFunction`` view, which breaks real models (torchvision ResNet: ``ReLU(inplace=True)`` and
``out += identity`` after a probed module raise "Output 0 of BackwardHookFunction is a view and is being
modified inplace", pytorch#61519), is silently never called for dict outputs, warns when no input
requires grad, and changes tensor identity. A tensor hook registered before a later in-place op
receives the gradient with respect to the value before that op — the module's own output — which is the
documented meaning (PyTorch autograd notes, "Behavior of Tensor hooks when Tensor is modified in-place").

Every hook body is guarded: the hooks return ``None`` (they never change a value), do nothing once
the session is closed (a compiled graph may still call a removed hook), and a hook that fails disables
itself with one warning naming the layer instead of stopping training.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


try:  # which frame evaluator is installed: None unless torch.compile'd code is running (TorchDynamo)
    from torch._C._dynamo.eval_frame import get_eval_frame_callback as _frame_callback
except Exception:  # pragma: no cover - torch without dynamo: always take the wrapped entry
    def _frame_callback() -> Any:
        return True

_is_compiling = torch.compiler.is_compiling


class Observer(Protocol):
    """What the hooks report to (a :class:`~lit_probe.session.ProbeSession`): hooks sit below the session.
    ``_on_*`` are the entries wrapped in ``torch.compiler.disable`` (never traced); ``_observe_*`` the same
    bodies unwrapped, which a hook calls when no TorchDynamo frame evaluator is installed (plain eager code:
    nothing could trace them, and the wrapper's cost, a few us per call, is saved)."""

    collecting: bool

    def _on_output(self, index: int, output: Any) -> None: ...

    def _on_grad(self, slot: int, grad: torch.Tensor) -> None: ...

    def _observe_output(self, index: int, output: Any) -> None: ...

    def _observe_grad(self, slot: int, grad: torch.Tensor) -> None: ...

    def _hook_failed(self, index: int, where: str, err: BaseException) -> None: ...

__all__ = ["HookRegistry", "iter_tensors", "hook_snapshot"]

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
               "_state_dict_hooks", "_load_state_dict_pre_hooks")


def iter_tensors(obj: Any, _depth: int = 0) -> Iterator[torch.Tensor]:
    """Floating-point tensors in a module output: tensors, tuples, lists, dicts, namedtuples, dataclasses."""
    if _depth > 8:
        return
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.numel() > 0:
            yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from iter_tensors(o, _depth + 1)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from iter_tensors(o, _depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from iter_tensors(getattr(obj, f.name, None), _depth + 1)


def hook_snapshot(model: nn.Module) -> dict[str, dict[str, tuple]]:
    """Every hook dict of every module of ``model``, as keys: to check that a run left none behind."""
    snap = {}
    for name, m in model.named_modules():
        snap[name] = {d: tuple(getattr(m, d, {}).keys()) for d in _HOOK_DICTS}
    return snap


class _NoopHook:
    """What a lit_probe hook becomes when a model is pickled or deep-copied while probed."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


class _ForwardHook:
    def __init__(self, session: Observer, index: int) -> None:
        self.session = session
        self.index = index
        self.failed = False

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        s = self.session
        if not s.collecting or self.failed:
            return None
        try:
            # is_compiling first: while TorchDynamo traces this hook it is constant True (the wrapped entry,
            # a graph break); in eager code, the frame evaluator says whether compiled code is running
            if not _is_compiling() and _frame_callback() is None:
                s._observe_output(self.index, output)
            else:
                s._on_output(self.index, output)
        except Exception as err:  # never break the user's training
            self.failed = True
            s._hook_failed(self.index, "forward", err)
        return None

    def __reduce__(self):  # pickling/deep-copying a probed model must neither fail nor copy the session
        return (_NoopHook, ())


class _GradHook:
    """A tensor hook on a module output (``Tensor.register_hook``): called with the gradient of the loss with
    respect to that output."""

    __slots__ = ("session", "index")

    def __init__(self, session: Observer, index: int) -> None:
        self.session = session
        self.index = index

    def __call__(self, grad: torch.Tensor) -> None:
        s = self.session
        if not s.collecting:
            return None
        try:
            if not _is_compiling() and _frame_callback() is None:
                s._observe_grad(self.index, grad)
            else:
                s._on_grad(self.index, grad)
        except Exception as err:
            s._hook_failed(self.index, "gradient", err)
        return None

    def __reduce__(self):
        return (_NoopHook, ())


class _GradPreHook(_GradHook):
    """The same observation as :class:`_GradHook`, registered on the output's autograd node instead
    (``output.grad_fn.register_prehook``): called with the gradients of all of the node's outputs and reads its
    own (``output_nr``). The node at registration time is the one a tensor hook sits on too (a later in-place
    op moves the tensor to a new node, the hook stays: the gradient with respect to the module's own output),
    so the values are the same; registering it costs less (no per-tensor hook dict made in Python). Plain
    tensors with a ``grad_fn`` only; the rest keep tensor hooks."""

    __slots__ = ("nr",)

    def __init__(self, session: Observer, index: int, nr: int) -> None:
        super().__init__(session, index)
        self.nr = nr

    def __call__(self, grads: tuple) -> None:  # type: ignore[override]
        s = self.session
        if not s.collecting:
            return None
        nr = self.nr
        grad = grads[nr] if nr < len(grads) else None
        if grad is not None:
            _GradHook.__call__(self, grad)
        return None


class HookRegistry:
    """Owns the module hook handles of one session."""

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []
        #: tensor hooks on leaf outputs (a module that returns a parameter): a leaf outlives the step, so its hook
        #: is removed when the next batch begins (:meth:`drop_leaf_hooks`) and on :meth:`remove`
        self.leaf_handles: list[RemovableHandle] = []

    def attach(self, session: Observer, modules: list[tuple[str, nn.Module]]) -> None:
        """Register a forward hook on every module; on any failure, remove what was registered."""
        if self.handles:
            return  # idempotent: attached already
        try:
            for i, (_, module) in enumerate(modules):
                self.handles.append(module.register_forward_hook(_ForwardHook(session, i)))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove every handle (idempotent)."""
        handles, self.handles = self.handles, []
        for h in handles:
            h.remove()
        self.drop_leaf_hooks()

    def drop_leaf_hooks(self) -> None:
        """Remove the gradient hooks put on leaf outputs during the last batch."""
        handles, self.leaf_handles = self.leaf_handles, []
        for h in handles:
            h.remove()

    def grad_hook(self, session: Observer, index: int) -> _GradHook:
        return _GradHook(session, index)

    def grad_prehook(self, session: Observer, index: int, nr: int) -> _GradPreHook:
        return _GradPreHook(session, index, nr)


def warn_once(cache: set, key: Any, message: str, category: type[Warning] = UserWarning) -> None:
    if key in cache:
        return
    cache.add(key)
    warnings.warn(message, category, stacklevel=3)
