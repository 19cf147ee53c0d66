"""lit_probe.gradcam against the reference implementation, pytorch-grad-cam (`pip install grad-cam`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from lit_probe.errors import ProbeSelectionError
from lit_probe.gradcam import gradcam, overlay
from lit_probe.hooks import hook_snapshot

try:  # import at collection: its import (cv2 / scikit-learn) sets KMP_INIT_AT_FORK and LD_LIBRARY_PATH,
    import pytorch_grad_cam  # noqa: F401  which conftest's env-leak fixture would blame on the first test
except ImportError:  # the comparisons below then skip through pytest.importorskip
    pass

# Our maps and pytorch-grad-cam's follow the same steps (mean-gradient weights, relu, min-max with
# eps 1e-7, bilinear resize with half-pixel centres, relu, min-max again). The only differences are
# float32 summation order (torch vs numpy) and cv2.resize's float INTER_LINEAR vs F.interpolate:
# observed max |diff| <= 1e-6 (also at non-integer scales, 57x70 inputs) on [0, 1] maps; ATOL leaves a margin.
ATOL = 1e-5


@pytest.fixture()
def model() -> nn.Module:
    torch.manual_seed(0)
    return resnet18(weights=None, num_classes=10).eval()


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _reference(model: nn.Module, images: torch.Tensor, targets: list[int] | None) -> np.ndarray:
    gc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with gc.GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
        return cam(input_tensor=images,
                   targets=None if targets is None else [ClassifierOutputTarget(c) for c in targets])


@pytest.mark.parametrize("target", [[1, 5, 7, 2], 3, None], ids=["per-image", "one-int", "predicted"])
def test_matches_pytorch_grad_cam(model: nn.Module, images: torch.Tensor, target) -> None:
    pytest.importorskip("pytorch_grad_cam")
    ours = gradcam(model, "layer4.1", images, target=target)
    assert ours.shape == (4, 64, 64) and ours.dtype == torch.float32
    assert ours.min() >= 0 and ours.max() <= 1
    targets = [target] * 4 if isinstance(target, int) else target
    ref = _reference(model, images, targets)
    assert ref.shape == (4, 64, 64)
    assert np.abs(ours.numpy() - ref).max() < ATOL
    assert (ours.amax(dim=(1, 2)) > 0.99).sum() >= 2  # non-trivial maps were compared


def test_predicted_class_is_argmax(model: nn.Module, images: torch.Tensor) -> None:
    with torch.no_grad():
        pred = model(images).argmax(1)
    default = gradcam(model, "layer4", images)
    assert torch.equal(default, gradcam(model, "layer4", images, target=pred))
    assert torch.equal(default, gradcam(model, "layer4", images, target=pred.tolist()))


def test_no_side_effects(model: nn.Module, images: torch.Tensor) -> None:
    torch.manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in model.parameters()]
    before = hook_snapshot(model)
    images_before = images.clone()
    gradcam(model, "layer4.1", images, target=[0, 1, 2, 3])
    assert hook_snapshot(model) == before
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert not any(m.training for m in model.modules())
    assert torch.equal(images, images_before) and not images.requires_grad
    model.train()
    gradcam(model, "layer4.1", images)
    assert all(m.training for m in model.modules())  # not switched to eval either
    assert hook_snapshot(model) == before


def test_hook_removed_on_error(model: nn.Module, images: torch.Tensor) -> None:
    before = hook_snapshot(model)
    with pytest.raises(ValueError, match="out of range"):
        gradcam(model, "layer4", images, target=10)
    with pytest.raises(RuntimeError):
        gradcam(model, "layer4", images[:, :2])  # the model itself fails: the error is not swallowed
    assert hook_snapshot(model) == before


def test_frozen_model_and_no_grad_context(model: nn.Module, images: torch.Tensor) -> None:
    ref = gradcam(model, "layer4", images, target=[1, 2, 3, 4])
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        frozen = gradcam(model, "layer4", images, target=[1, 2, 3, 4])
    assert torch.allclose(frozen, ref, atol=1e-6)


def test_bad_layer(model: nn.Module, images: torch.Tensor) -> None:
    with pytest.raises(ProbeSelectionError, match="layer4"):
        gradcam(model, "layer5", images)
    with pytest.raises(ProbeSelectionError, match="one layer"):
        gradcam(model, "layer*", images)


def test_overlay() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((16, 20, 3))
    cam = rng.random((16, 20))
    out = overlay(img, cam)
    assert out.shape == (16, 20, 3) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    assert np.allclose(overlay(img, cam, alpha=0.0), img, atol=1e-6)
    with pytest.raises(ValueError, match="cam"):
        overlay(img, cam[:8])
