"""Grad-CAM
========

:func:`gradcam` computes Grad-CAM maps (Selvaraju et al., 2017) for one layer given by a probe path,
with the conventions of the ``grad-cam`` package (``pytorch_grad_cam.GradCAM``) so the maps agree with
it numerically:

1. ``A`` = the layer's output ``[N, C, h, w]``; ``dY/dA`` for the score ``Y`` of the target class
   (the logit, as ``ClassifierOutputTarget``);
2. ``w_c`` = mean of ``dY/dA_c`` over the spatial dims; ``cam = relu(sum_c w_c * A_c)``;
3. per image ``cam = (cam - min) / (max - min + 1e-7)``, then bilinear resize to the input's ``H x W``
   (``F.interpolate(..., align_corners=False)``, the half-pixel convention of ``cv2.resize`` with
   ``INTER_LINEAR`` that the package uses), then ``relu`` and the same min-max normalisation once more
   (the package's ``aggregate_multi_layers``).

Unlike the package it does not call ``model.eval()`` (call it yourself: a model in training mode
gives dropout noise and updates BatchNorm statistics), leaves the parameters' ``.grad`` untouched
(``torch.autograd.grad`` w.r.t. the layer's output, not ``backward()`` / ``zero_grad()``), and removes
its hook on every way out. If the layer's output does not require grad (the layers up to it are
frozen), the forward is run once more on a copy of ``images`` that requires grad.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ProbeSelectionError
from .selection import resolve

__all__ = ["gradcam", "overlay", "gradcam_overlays"]

_EPS = 1e-7  # pytorch_grad_cam.utils.image.scale_cam_image

Target = Union[int, Sequence[int], torch.Tensor, None]


def _minmax(cam: torch.Tensor) -> torch.Tensor:
    """Per image ``x -= min; x /= max + 1e-7``, as ``scale_cam_image``; ``cam`` is [N, H, W]."""
    cam = cam - cam.amin(dim=(1, 2), keepdim=True)
    return cam / (_EPS + cam.amax(dim=(1, 2), keepdim=True))


def _targets(target: Target, logits: torch.Tensor) -> torch.Tensor:
    n = logits.shape[0]
    if target is None:
        return logits.detach().argmax(dim=-1)
    if isinstance(target, int):
        t = torch.full((n,), target, dtype=torch.long)
    else:
        t = torch.as_tensor(target, dtype=torch.long).reshape(-1)
        if t.numel() == 1:
            t = t.expand(n)
        elif t.numel() != n:
            raise ValueError(f"`target` has {t.numel()} classes for {n} images; "
                             "give one int, or one per image.")
    t = t.to(logits.device)
    if (t < 0).any() or (t >= logits.shape[-1]).any():
        raise ValueError(f"`target` {t.tolist()} out of range for {logits.shape[-1]} classes.")
    return t


def _run(model: nn.Module, module: nn.Module, x: torch.Tensor, hook: Any) -> Any:
    handle = module.register_forward_hook(hook)
    try:
        return model(x)
    finally:
        handle.remove()


def gradcam(model: nn.Module, layer: str, images: torch.Tensor, target: Target = None) -> torch.Tensor:
    """Grad-CAM maps of ``layer`` for ``images``.

    Args:
        model: a classifier returning logits ``[N, num_classes]``, called as it is: put it in eval mode
            first (this function does not change its mode).
        layer: a probe path resolving to exactly one module whose output is ``[N, C, h, w]``, e.g.
            ``"layer4"`` or ``"layer4.1"`` for a torchvision ResNet. If the module runs several times per
            forward, the last call is used.
        images: ``[N, 3, H, W]`` input batch.
        target: class per image (a sequence or tensor of N ints), one class for all (an int), or ``None``
            for each image's predicted class.

    Returns:
        ``[N, H, W]`` float32 maps in ``[0, 1]`` at the input resolution, on ``images.device``, detached.

    Raises:
        ProbeSelectionError: ``layer`` matches no module, or more than one.
        ValueError: bad ``target``, or the model output / layer output has an unexpected shape.
        RuntimeError: the layer did not run during the forward, or its output cannot get a gradient.
    """
    resolved = resolve(model, [layer])
    if len(resolved) != 1:
        raise ProbeSelectionError(f"Grad-CAM needs one layer; {layer!r} matches {len(resolved)}: "
                                  f"{[n for n, _ in resolved][:10]}. Give an exact path such as 'layer4'.")
    module = resolved[0][1]
    if images.dim() != 4:
        raise ValueError(f"`images` must be [N, C, H, W], got shape {tuple(images.shape)}.")

    seen: dict[str, Any] = {}

    def hook(mod: nn.Module, inputs: Any, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"Grad-CAM layer {layer!r} must return a tensor, got {type(output).__name__}.")
        # the value and the autograd edge as the module returns them: a later in-place op changes neither
        seen["activation"] = output.detach().clone()
        seen["edge"] = (torch.autograd.graph.get_gradient_edge(output) if output.requires_grad else None)
        return None

    with torch.enable_grad():
        logits = _run(model, module, images, hook)
        if "activation" in seen and seen["edge"] is None and images.is_floating_point():
            # frozen layers up to `layer`: run again on a leaf input that requires grad (a fresh tensor;
            # the caller's `images` is not changed)
            seen.clear()
            logits = _run(model, module, images.detach().requires_grad_(True), hook)
        if "activation" not in seen:
            raise RuntimeError(f"Layer {layer!r} did not run during model(images).")
        if seen["edge"] is None:
            raise RuntimeError(f"The output of {layer!r} does not require grad; Grad-CAM needs its gradient "
                               "(was the model called under torch.inference_mode()?).")
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"Grad-CAM needs a model returning logits [N, num_classes], got {got}.")
        cls = _targets(target, logits)
        score = logits.gather(1, cls[:, None]).sum()
        (grads,) = torch.autograd.grad(score, [seen["edge"]])

    acts = seen["activation"]
    if acts.dim() != 4 or grads.shape != acts.shape:
        raise ValueError(f"Grad-CAM layer {layer!r} must output [N, C, h, w], got {tuple(acts.shape)}.")
    acts, grads = acts.float(), grads.detach().float()
    weights = grads.mean(dim=(2, 3))
    cam = (weights[:, :, None, None] * acts).sum(dim=1).clamp_min(0)
    cam = _minmax(cam)
    size = tuple(images.shape[-2:])
    cam = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    cam = _minmax(cam.clamp_min(0))
    return cam.to(images.device)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a colour-mapped CAM over an image (for figures; no pyplot).

    Args:
        image: ``[H, W, 3]`` float RGB in ``[0, 1]``.
        cam: ``[H, W]`` map in ``[0, 1]`` (e.g. ``gradcam(...)[i].cpu().numpy()``).
        alpha: weight of the heat map.
        cmap: a matplotlib colormap name.

    Returns:
        ``[H, W, 3]`` float32 RGB in ``[0, 1]``: ``(1 - alpha) * image + alpha * cmap(cam)``.

    Raises:
        ValueError: shapes do not match, or ``alpha`` is outside ``[0, 1]``.
    """
    import matplotlib  # local: the torch part of this module does not need it

    image = np.asarray(image, dtype=np.float32)
    cam = np.asarray(cam, dtype=np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"`image` must be [H, W, 3], got {image.shape}.")
    if cam.shape != image.shape[:2]:
        raise ValueError(f"`cam` must be [H, W] = {image.shape[:2]}, got {cam.shape}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha}.")
    heat = matplotlib.colormaps[cmap](np.clip(cam, 0.0, 1.0))[..., :3].astype(np.float32)
    return np.clip((1.0 - alpha) * np.clip(image, 0.0, 1.0) + alpha * heat, 0.0, 1.0).astype(np.float32)


def gradcam_overlays(model: nn.Module, layers: Sequence[str], images: torch.Tensor
                     ) -> list[tuple[str, np.ndarray, list[str]]]:
    """Grad-CAM of the predicted class at each of ``layers``, overlaid on ``images``, for figures.

    The model's modules are put in eval mode for the extra pass (no BatchNorm update, no dropout) and their
    modes restored exactly; the RNG state is restored too, and nothing accumulates into ``.grad``.

    Returns:
        ``(layer, overlays [n, H, W, 3] in [0, 1], labels)`` per layer; labels read ``"sample i · class k"``.
    """
    modes = [(m, m.training) for m in model.modules()]
    devices = [images.device] if images.device.type == "cuda" else []
    out = []
    try:
        model.eval()
        with torch.random.fork_rng(devices=devices):
            shown = images.detach().float()
            lo = shown.amin(dim=(1, 2, 3), keepdim=True)
            hi = shown.amax(dim=(1, 2, 3), keepdim=True)
            shown = ((shown - lo) / (hi - lo).clamp_min(1e-12)).permute(0, 2, 3, 1).cpu().numpy()
            if shown.shape[-1] == 1:
                shown = np.repeat(shown, 3, axis=-1)
            with torch.no_grad():
                logits = model(images)
            classes = logits.argmax(dim=-1).tolist() if isinstance(logits, torch.Tensor) else []
            for name in layers:
                cams = gradcam(model, name, images).detach().cpu().numpy()
                ov = np.stack([overlay(shown[i, :, :, :3], cams[i]) for i in range(len(cams))])
                out.append((name, ov, [f"sample {i} \u00b7 class {classes[i]}" if i < len(classes) else f"sample {i}"
                                      for i in range(len(ov))]))
    finally:
        for m, training in modes:
            m.training = training
    return out


class _CallableModule(type(sys.modules[__name__])):  # type: ignore[misc]
    """``lit_probe.gradcam`` is both this module and its main function: importing the module (``from
    lit_probe.gradcam import overlay``) rebinds the package attribute to the module, so the module is callable
    and calls :func:`gradcam`."""

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return gradcam(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
