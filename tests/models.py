"""Small models and LightningModules shared by the tests (BoringModel style: real training, tiny sizes)."""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable

import torch
import zoo
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_probe import ProbeMixin

#: The two Lightning packages, by the names tests use for them.
PACKAGES = {"lightning": "lightning.pytorch", "pytorch_lightning": "pytorch_lightning"}

#: The Lightning package these models are built on: ``pytorch_lightning`` by default, ``lightning.pytorch`` when a
#: subprocess (the DDP and package tests) sets LIT_PROBE_TEST_PACKAGE.
pl = importlib.import_module(os.environ.get("LIT_PROBE_TEST_PACKAGE", "pytorch_lightning"))


def lightning(package: str | None = None) -> Any:
    """The Lightning package module: ``"lightning"`` (``lightning.pytorch``), ``"pytorch_lightning"``, or the
    module path itself; ``None``: :data:`pl`, the one these models are built on."""
    if package is None:
        return pl
    if package not in PACKAGES and package not in PACKAGES.values():
        raise ValueError(f"package must be one of {sorted(PACKAGES)}, not {package!r}")
    return importlib.import_module(PACKAGES.get(package, package))


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


def make_trainer(tmp_path: Any, package: str | None = None, **overrides: Any) -> Any:
    """THE test Trainer: CPU, one device, 10 steps, no logger, checkpoints, progress bar, model summary or sanity
    validation, ``log_every_n_steps=5``; ``overrides`` are any ``Trainer`` arguments. ``package``: ``"lightning"``
    or ``"pytorch_lightning"`` (default: the package of :data:`pl`)."""
    args: dict[str, Any] = dict(default_root_dir=str(tmp_path), accelerator="cpu", devices=1, max_steps=10,
                                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=5)
    args.update(overrides)
    return lightning(package).Trainer(**args)


#: The name the older tests import.
trainer = make_trainer


# ----------------------------------------------------------------------------------- zoo models in Lightning
_ZOO_CLASSES: dict[str, type] = {}


def _zoo_class(package: str) -> type:
    if package in _ZOO_CLASSES:
        return _ZOO_CLASSES[package]
    lpl = lightning(package)

    class ZooModule(lpl.LightningModule):
        """A zoo model (:mod:`zoo`) as ``self.net``; ``step_listeners`` are called with ``global_step`` at the
        start of each training step (the oracle and the bug injections use them)."""

        def __init__(self, entry: zoo.ZooEntry, net: nn.Module | None = None) -> None:
            super().__init__()
            self.entry = entry
            self.net = net if net is not None else entry.build()
            self.losses: list[float] = []
            self.step_listeners: list[Callable[[int], None]] = []

        def forward(self, x: torch.Tensor) -> Any:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            for fn in self.step_listeners:
                fn(int(self.global_step))
            x, y = batch
            loss = zoo.compute_loss(self.entry, self.net, x, y)
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return zoo.make_optimizer(self.entry, self.parameters())

    ZooModule.__name__ = ZooModule.__qualname__ = f"ZooModule_{package}"
    _ZOO_CLASSES[package] = ZooModule
    return ZooModule


def zoo_module(entry: zoo.ZooEntry, package: str = "lightning", net: nn.Module | None = None, seed: int = 0) -> Any:
    """The entry's model (built under ``torch.manual_seed(seed)`` unless ``net`` is given) as ``self.net`` of a
    LightningModule of ``package`` (probe paths are ``net.**``)."""
    if net is None:
        torch.manual_seed(seed)
        net = entry.build()
    return _zoo_class(package)(entry, net)
