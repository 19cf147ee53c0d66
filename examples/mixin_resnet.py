"""``ProbeMixin``: a LightningModule declares its own probe points, next to the layers it defines.

To run: python examples/mixin_resnet.py --out lit_probe_runs/mixin_resnet --steps 20

A torchvision ``resnet18(weights=None, num_classes=4)`` (in-place ReLUs, one ReLU module shared within each
block) trained on the demo's synthetic shapes; ``Trainer(callbacks=[FeatureProbe()])`` probes the points the
module declares. Everything is written under ``--out``.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchvision.models import resnet18

from lit_probe import FeatureProbe, ProbeMixin
from lit_probe.demo import ShapesDataModule


class ResNetClassifier(ProbeMixin, pl.LightningModule):
    # paths relative to this LightningModule; `lit-probe paths resnet18` lists what the backbone has
    probe_points = ["backbone.layer1", "backbone.layer4.*"]

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.backbone = resnet18(weights=None, num_classes=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> FeatureProbe:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="lit_probe_runs/mixin_resnet", help="output directory")
    parser.add_argument("--steps", type=int, default=20, help="training steps")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    probe = FeatureProbe(figure_every_n_steps=max(1, args.steps))  # no `probes`: the module's declaration
    trainer = pl.Trainer(max_steps=args.steps, callbacks=[probe], default_root_dir=args.out, logger=False,
                         enable_checkpointing=False, log_every_n_steps=5,
                         enable_progress_bar=False, enable_model_summary=False)
    data = ShapesDataModule(batch_size=args.batch_size)
    trainer.fit(ResNetClassifier(), train_dataloaders=data.train_dataloader())

    print("probed:", ", ".join(probe.points))
    for f in probe.findings:
        print(f"step {f.step:>4}  {f.layer:<22} {f.signal:<10} {f.kind}")
    print(f"{len(probe.findings)} finding(s); figures and summary.md in {probe.out_dir}")
    return probe


if __name__ == "__main__":
    main()
