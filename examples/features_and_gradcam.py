"""Feature extraction by path and Grad-CAM, outside training, on a torchvision ResNet.

To run: python examples/features_and_gradcam.py --out lit_probe_runs/gradcam

``lit_probe.capture`` records the outputs (and gradients) of modules named with the probe path syntax — nested
paths, globs, ``type:`` — on any model; ``lit_probe.gradcam`` gives Grad-CAM maps of a layer. Writes an overlay
image to ``<out>/gradcam.png``. (Weights are random here: nothing is downloaded.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torchvision

import lit_probe
from lit_probe.figures import figure_to_png, gradcam_grid
from lit_probe.gradcam import overlay


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="lit_probe_runs/gradcam", help="output directory")
    parser.add_argument("--images", type=int, default=3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.rand(args.images, 3, 64, 64)

    # every residual block's output, a nested conv, and every ReLU call (the shared relu runs twice per block)
    with lit_probe.capture(model, ["layer?.*", "layer2.0.conv1", "type:ReLU"], gradients=True) as cap:
        model(x).logsumexp(1).sum().backward()
    for path in ("layer1.0", "layer2.0.conv1", "layer4.1"):
        print(f"{path:<16} output {tuple(cap[path].shape)}  grad rms {cap.gradients[path].pow(2).mean().sqrt():.3g}")
    print(f"layer1.0.relu ran {len(cap.calls('layer1.0.relu'))} times in one forward")

    out, feats = lit_probe.extract_features(model, ["layer3", "fc"], x)
    print("extract_features:", {k: tuple(v.shape) for k, v in feats.items()})

    cams = lit_probe.gradcam(model, "layer4", x)  # [N, 64, 64], predicted class
    images = x.permute(0, 2, 3, 1).numpy()
    overlays = np.stack([overlay(images[i], cams[i].numpy()) for i in range(len(cams))])
    path = Path(args.out) / "gradcam.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(figure_to_png(gradcam_grid(overlays, title="resnet18 layer4 Grad-CAM")))
    print(f"Grad-CAM overlays: {path}")
    return {"features": feats, "cams": cams}


if __name__ == "__main__":
    main()
