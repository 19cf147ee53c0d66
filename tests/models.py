"""Small models and LightningModules shared by the tests (BoringModel style: real training, tiny sizes)."""

from __future__ import annotations

from typing import Any

import importlib
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_probe import ProbeMixin

#: The Lightning package these models are built on: ``pytorch_lightning`` by default, ``lightning.pytorch`` when a
#: subprocess (the DDP and package tests) sets LIT_PROBE_TEST_PACKAGE.
pl = importlib.import_module(os.environ.get("LIT_PROBE_TEST_PACKAGE", "pytorch_lightning"))


def make_loader(n: int = 64, in_dim: int = 16, classes: int = 4, batch_size: int = 16, seed: int = 0,
                image: tuple[int, int, int] | None = None) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *image, generator=g) if image else torch.randn(n, in_dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class Classifier(pl.LightningModule):
    """Wraps ``net`` in a classification LightningModule; optional bug injection hooks by subclasses."""

    def __init__(self, net: nn.Module, lr: float = 0.05, optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.optimizer = optimizer
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def mlp(in_dim: int = 16, hidden: int = 32, classes: int = 4, depth: int = 2, act: type = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), act()]
        d = hidden
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers)


class TinyCNN(nn.Module):
    """Conv-BN-ReLU(inplace) blocks with a residual add: the in-place patterns of torchvision ResNets."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        identity = out
        out = self.bn2(self.conv2(out))
        out += identity  # in place, right after a probed module
        out = self.relu(out)  # the shared ReLU is called twice
        return self.fc(self.pool(out).flatten(1))


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> dict:
        h = self.lin(x)
        return {"h": h, "pair": (h * 2, None), "n": 3}


class Mixed(nn.Module):
    """Tuple/dict outputs, a module reused twice, a frozen module whose input needs no grad."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.dict_out = DictOut()
        self.shared = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.frozen(x)
        d = self.dict_out(x)
        h = torch.relu(self.shared(torch.relu(self.shared(d["h"] + d["pair"][0]))))
        return self.head(h)


class MixinNet(ProbeMixin, Classifier):
    probe_points = ["net.0", "net.2"]

    def __init__(self) -> None:
        super().__init__(mlp())


def trainer(tmp_path: Any, **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(default_root_dir=str(tmp_path), accelerator="cpu", devices=1, max_steps=10,
                                    logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=5)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)
