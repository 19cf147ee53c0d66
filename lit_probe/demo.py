"""Demo
====

The bundled demo: a procedurally generated image data set (:class:`ShapesDataset`), a small CNN
(:class:`DemoCNN`) and five variants of it, four of which carry a real, named training bug:

``"none"``
    healthy: trains to well above chance (25 %) within ~200 steps.
``"dead-relu"``
    a bad initialisation: the shift (``beta``) of ``block2.bn`` starts at a large negative value, so the
    ReLU ``block2.act`` never fires. A ReLU that never fires passes no gradient, so nothing can revive it;
    ``block2`` is a residual block, so the rest of the network keeps training around the dead block.
``"exploding"``
    a learning rate far too high (plain SGD at ``exploding_lr=3.0``, ~100x what this network tolerates) and
    no BatchNorm in ``block3``: the weights of ``block3`` and ``head`` feed each other's growth, so
    ``block3.conv``'s output and the logits grow by orders of magnitude per step and pass 1e6 several steps
    before anything overflows to Inf/NaN (default seeds, batch 64, under ``Trainer.fit``: past 1e6 at step
    6, ``block3.conv`` no later than ``head``; first non-finite value at step 11). The first symptom, one step
    earlier (step 5), is the gradient flowing into ``block3`` (d loss / d ``block2.act``, driven by ``block3``'s
    growing weights) passing 1000x its running median: the probe's first incident.
``"nan"``
    ``block3.norm_div`` divides its input by ``std(x) * mask``; the mask comes from a step schedule that
    drops to 0 at ``bug_step`` (there is no epsilon), so the first non-finite values appear in the
    activation of ``block3.norm_div`` at exactly ``trainer.global_step == bug_step``.
``"vanishing"``
    the small ``deep`` branch (``Linear`` + ``Sigmoid``, a projection of the pooled features that the head
    reads next to the pooled features themselves) is replaced by a deep plain stack of 8 ``Linear`` +
    ``Sigmoid`` pairs (``deep.0`` .. ``deep.15``) that the head reads alone: the gradient reaching ``deep.1``
    (the first Sigmoid) is about six orders of magnitude smaller than the one at ``deep.15``, and every layer
    below the stack (``stem`` .. ``block3``) gets that tiny gradient too: nothing below the stack learns.

:data:`EXPECTED` documents, per bug, the ``(layer, signal, kind)`` that
:class:`~lit_probe.FeatureProbe` with :data:`DEFAULT_PROBES` should report first.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

try:  # the unified package first; `pytorch_lightning` where only it is installed
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    import pytorch_lightning as pl  # type: ignore[no-redef]

if TYPE_CHECKING:
    from .findings import Finding

__all__ = ["BUGS", "CHANGES", "CLASSES", "DEFAULT_PROBES", "EXPECTED", "DemoCNN", "NormDiv", "ShapesDataModule",
           "ShapesDataset", "DEMO_STEPS", "run_demo"]

Bug = Literal["none", "dead-relu", "exploding", "nan", "vanishing"]

#: Every value of ``DemoCNN(bug=...)``.
BUGS: tuple[str, ...] = ("none", "dead-relu", "exploding", "nan", "vanishing")

#: Changes ``run_demo(change=...)`` makes to a run, so that two demo runs differ (``lit-probe diff``): ``"gelu"``
#: (``block2.act`` becomes a GELU: the first difference is that activation at step 0), ``"lr"`` (the head's
#: parameter group learns at 10x the rate: the head's parameter statistics first, at step 0), ``"data-order"``
#: (another shuffle of the same data: the first probed layer, ``stem``, at step 0).
CHANGES: tuple[str, ...] = ("none", "gelu", "lr", "data-order")

#: The four classes of :class:`ShapesDataset`, in label order.
CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

#: Per bug, the ``(layer, signal, kind)`` the probe should report first (with :data:`DEFAULT_PROBES`).
EXPECTED: dict[str, tuple[str, str, str]] = {
    "dead-relu": ("block2.act", "activation", "dead"),
    "exploding": ("block2.act", "gradient", "exploding"),  # the gradient into block3, a step before its output
    "nan": ("block3.norm_div", "activation", "nonfinite"),
    "vanishing": ("deep.5", "gradient", "vanishing"),  # the highest Sigmoid whose gradient envelope vanished
}

#: The probe declarations the demo uses; they match modules in every variant and cover each
#: :data:`EXPECTED` layer. Only ``block2.act`` is probed inside ``block2``: the layers that feed a dead ReLU
#: get an exactly-zero gradient, which is a consequence of the dead ReLU, not a second bug. In ``deep`` only
#: the Sigmoid outputs are probed (``type:Sigmoid``): a Linear reading the non-negative pooled features keeps
#: about half of its outputs negative for good (the healthy ``deep.0`` reaches a 53% 'dead' fraction over
#: 20 steps), which the dead-unit rule would flag.
DEFAULT_PROBES: list[str] = ["stem", "block1", "block2.act", "block3.*", "type:Sigmoid", "head"]

# measured over 2048 images of ShapesDataset (before normalisation), per RGB channel
_MEAN = (0.4992, 0.4969, 0.5008)
_STD = (0.2545, 0.2584, 0.2563)


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------
class ShapesDataset(Dataset):
    """Coloured shapes (circle, square, triangle, cross) on noisy backgrounds, generated on the fly.

    Item ``i`` depends only on ``(seed, i)``: nothing is downloaded or cached, any index is cheap to
    generate, and two data sets with the same seed are identical. Labels cycle through the classes
    (``label = i % 4``), so every split is balanced.

    Args:
        length: number of items.
        seed: the data set's seed; use different seeds for different splits.
        size: image side in pixels.
        noise: standard deviation of the per-pixel background noise (in [0, 1] colour units).
        normalize: standardise each channel to roughly zero mean and unit standard deviation.

    Returns (per item):
        ``(image, label)``: a ``float32`` tensor of shape ``(3, size, size)`` and an ``int64`` scalar.
    """

    num_classes = len(CLASSES)

    def __init__(self, length: int = 4096, seed: int = 0, size: int = 32, noise: float = 0.1,
                 normalize: bool = True) -> None:
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if size < 8:
            raise ValueError(f"size must be >= 8, got {size}")
        self.length = int(length)
        self.seed = int(seed)
        self.size = int(size)
        self.noise = float(noise)
        self.normalize = bool(normalize)
        ys, xs = torch.meshgrid(torch.arange(self.size, dtype=torch.float32),
                                torch.arange(self.size, dtype=torch.float32), indexing="ij")
        self._ys, self._xs = ys + 0.5, xs + 0.5
        self._mean = torch.tensor(_MEAN).view(3, 1, 1)
        self._std = torch.tensor(_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return self.length

    def _mask(self, label: int, cx: float, cy: float, r: float, angle: float) -> torch.Tensor:
        dx, dy = self._xs - cx, self._ys - cy
        if label in (1, 3):  # rotate squares and crosses a little
            c, s = math.cos(angle), math.sin(angle)
            dx, dy = c * dx + s * dy, -s * dx + c * dy
        if label == 0:  # circle
            return dx * dx + dy * dy <= r * r
        if label == 1:  # square (same area as the circle, roughly)
            h = 0.85 * r
            return (dx.abs() <= h) & (dy.abs() <= h)
        if label == 2:  # triangle pointing up
            return (dy <= 0.8 * r) & (dy >= -1.1 * r) & (dx.abs() <= 0.6 * (dy + 1.1 * r))
        t = 0.32 * r  # cross
        return ((dx.abs() <= r) & (dy.abs() <= t)) | ((dy.abs() <= r) & (dx.abs() <= t))

    def render(self, index: int) -> tuple[torch.Tensor, int]:
        """The un-normalised image (values in [0, 1]) and the label of item ``index``."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a data set of length {self.length}")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = index % self.num_classes
        u = torch.rand(9, generator=g)
        lo, hi = 0.35 * self.size, 0.65 * self.size
        cx, cy = lo + (hi - lo) * float(u[0]), lo + (hi - lo) * float(u[1])
        r = self.size * (0.22 + 0.1 * float(u[2]))
        angle = (float(u[3]) - 0.5) * 0.8
        bg = torch.rand(3, generator=g) * 0.8 + 0.1
        fg = torch.rand(3, generator=g)
        # keep the shape visible: push its colour away from the background's where they are too close
        if float((fg - bg).abs().sum()) < 0.6:
            fg = torch.where(bg > 0.5, bg - 0.45, bg + 0.45)
        img = bg.view(3, 1, 1) + self.noise * torch.randn(3, self.size, self.size, generator=g)
        # a soft background gradient so the background is not flat
        img = img + 0.1 * (float(u[4]) - 0.5) * (self._xs / self.size - 0.5) \
            + 0.1 * (float(u[5]) - 0.5) * (self._ys / self.size - 0.5)
        m = self._mask(label, cx, cy, r, angle)
        shape = fg.view(3, 1, 1) + 0.5 * self.noise * torch.randn(3, self.size, self.size, generator=g)
        img = torch.where(m, shape, img)
        return img.clamp_(0.0, 1.0), label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, label = self.render(int(index))
        if self.normalize:
            img = (img - self._mean) / self._std
        return img, torch.tensor(label, dtype=torch.long)


class ShapesDataModule(pl.LightningDataModule):
    """Train/validation splits of :class:`ShapesDataset` (different seeds, so no overlap).

    Args:
        batch_size: batch size of both loaders.
        train_size: number of training images.
        val_size: number of validation images.
        seed: seed of the training split (the validation split uses ``seed + 1``).
        num_workers: ``DataLoader`` workers (0: generate in the main process; the images are cheap).
        shuffle_seed: seed of the training loader's shuffle (``None``: ``seed``).
    """

    def __init__(self, batch_size: int = 64, train_size: int = 25600, val_size: int = 512, seed: int = 0,
                 num_workers: int = 0, shuffle_seed: Optional[int] = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = int(batch_size)
        self.train_size = int(train_size)
        self.val_size = int(val_size)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.shuffle_seed = self.seed if shuffle_seed is None else int(shuffle_seed)
        self.train_set: Optional[ShapesDataset] = None
        self.val_set: Optional[ShapesDataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        self.train_set = ShapesDataset(self.train_size, seed=self.seed)
        self.val_set = ShapesDataset(self.val_size, seed=self.seed + 1)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        g = torch.Generator().manual_seed(self.shuffle_seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=g,
                          num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)


# ----------------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------------
class NormDiv(nn.Module):
    """Divides its input by ``std(x) * mask`` (per sample, over channels and pixels) -- with no epsilon.

    With ``fail_at_step=None`` it is the identity (the healthy variants). Otherwise ``mask`` is 1 while
    ``step < fail_at_step`` and 0 from then on (in training mode), so the division produces Inf/NaN from
    step ``fail_at_step``. The owning LightningModule sets ``step`` to ``trainer.global_step`` before each
    training forward.
    """

    def __init__(self, fail_at_step: Optional[int] = None) -> None:
        super().__init__()
        self.fail_at_step = fail_at_step
        self.step = 0

    def mask(self) -> float:
        """1.0 while healthy, 0.0 from ``fail_at_step`` on (training mode only)."""
        if self.fail_at_step is None or not self.training:
            return 1.0
        return 0.0 if self.step >= self.fail_at_step else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_at_step is None:
            return x
        dims = tuple(range(1, x.dim()))
        return x / (x.std(dim=dims, keepdim=True) * self.mask())

    def extra_repr(self) -> str:
        return f"fail_at_step={self.fail_at_step}"


def _conv_block(cin: int, cout: int, stride: int, bn: bool = True, norm_div: bool = False,
                fail_at_step: Optional[int] = None) -> nn.Sequential:
    layers: dict[str, nn.Module] = {
        "conv": nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=not bn),
        "bn": nn.BatchNorm2d(cout) if bn else nn.Identity(),
    }
    if norm_div:
        layers["norm_div"] = NormDiv(fail_at_step)
    layers["act"] = nn.ReLU()
    return nn.Sequential(OrderedDict(layers))


class DemoCNN(pl.LightningModule):
    """A small CNN for :class:`ShapesDataset`, with clearly named modules and an optional injected bug.

    Layout (``x + block2(x)`` is a residual connection)::

        stem     Conv(3->32, stride 2)-BN-ReLU             32x32 -> 16x16    children conv, bn, act
        block1   Conv(32->64, stride 2)-BN-ReLU            16x16 -> 8x8      children conv, bn, act
        block2   Conv(64->64)-BN-ReLU, residual            8x8               children conv, bn, act
        block3   Conv(64->128, stride 2)-BN-NormDiv-ReLU   8x8 -> 4x4        children conv, bn, norm_div, act
        pool     global max pool + flatten                 128

    About 135k parameters (142k with the ``"vanishing"`` stack). ``block3.bn`` is an ``nn.Identity`` in the
    ``"exploding"`` variant; ``block3.norm_div`` is the identity except in the ``"nan"`` variant.
        deep     Linear(128->32)-Sigmoid ("vanishing": 8 x Linear+Sigmoid, deep.0 .. deep.15)
        head     Linear(128 + 32 -> 4) on [pool, deep]

    Args:
        bug: which bug to inject (see the module docstring): ``"none"``, ``"dead-relu"``, ``"exploding"``,
            ``"nan"`` or ``"vanishing"``.
        lr: learning rate of Adam (all variants but ``"exploding"``).
        bug_step: ``"nan"``: the training step (``trainer.global_step``) at which the division fails.
        dead_bias: ``"dead-relu"``: the initial shift of ``block2.bn``.
        exploding_lr: ``"exploding"``: the far-too-high learning rate of the plain SGD it trains with.
        deep_layers: ``"vanishing"``: number of Linear+Sigmoid pairs in ``deep``.
        weight_decay: Adam's (L2) weight decay.
        seed: seed of the weight initialisation (``None``: the global RNG).
        head_lr: the learning rate of the head's parameter group (``None``: ``lr``, one group).
    """

    def __init__(self, bug: Bug = "none", lr: float = 3e-3, bug_step: int = 30, dead_bias: float = -20.0,
                 exploding_lr: float = 3.0, deep_layers: int = 8, weight_decay: float = 0.0,
                 seed: Optional[int] = 0, head_lr: Optional[float] = None) -> None:
        super().__init__()
        if bug not in BUGS:
            raise ValueError(f"bug must be one of {', '.join(BUGS)}; got {bug!r}")
        if bug_step < 1:
            raise ValueError(f"bug_step must be >= 1, got {bug_step}")
        if deep_layers < 2:
            raise ValueError(f"deep_layers must be >= 2, got {deep_layers}")
        self.save_hyperparameters()
        self.bug = bug
        gen_state = torch.random.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)
        try:
            self.stem = _conv_block(3, 32, 2)
            self.block1 = _conv_block(32, 64, 2)
            self.block2 = _conv_block(64, 64, 1)
            self.block3 = _conv_block(64, 128, 2, bn=bug != "exploding", norm_div=True,
                                      fail_at_step=bug_step if bug == "nan" else None)
            self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
            if bug == "vanishing":
                layers: list[nn.Module] = []
                for i in range(deep_layers):
                    layers += [nn.Linear(128 if i == 0 else 32, 32), nn.Sigmoid()]
                self.deep = nn.Sequential(*layers)
            else:
                self.deep = nn.Sequential(nn.Linear(128, 32), nn.Sigmoid())
            # "vanishing": the head reads the deep stack only, so everything below the stack gets its tiny gradient
            self.head = nn.Linear(32 if bug == "vanishing" else 128 + 32, ShapesDataset.num_classes)
        finally:
            if seed is not None:
                torch.random.set_rng_state(gen_state)
        if bug == "dead-relu":
            with torch.no_grad():
                self.block2.bn.bias.fill_(dead_bias)
        self.example_input_array = torch.zeros(2, 3, 32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, 4)`` for images of shape ``(batch, 3, 32, 32)``."""
        x = self.stem(x)
        x = self.block1(x)
        x = x + self.block2(x)
        x = self.block3(x)
        f = self.pool(x)
        if self.bug == "vanishing":
            return self.head(self.deep(f))
        return self.head(torch.cat([f, self.deep(f)], dim=1))

    def set_step(self, step: int) -> None:
        """Tell the step-scheduled parts (``block3.norm_div``) the current training step."""
        self.block3.norm_div.step = int(step)

    def _shared(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train", on_step=stage == "train",
                 on_epoch=stage != "train")
        self.log(f"{stage}/acc", acc, prog_bar=True, on_step=stage == "train", on_epoch=stage != "train")
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.set_step(self.global_step)
        return self._shared(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam at ``lr``; the ``"exploding"`` variant uses plain SGD at the far-too-high ``exploding_lr``."""
        if self.bug == "exploding":
            return torch.optim.SGD(self.parameters(), lr=self.hparams.exploding_lr,
                                   weight_decay=self.hparams.weight_decay)
        head_lr = self.hparams.get("head_lr")
        if head_lr is None:
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        head = {id(p) for p in self.head.parameters()}
        groups = [{"params": [p for p in self.parameters() if id(p) not in head]},
                  {"params": list(self.head.parameters()), "lr": float(head_lr)}]
        return torch.optim.Adam(groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


# ----------------------------------------------------------------------------------------------------------
# the demo run (``lit-probe demo``)
# ----------------------------------------------------------------------------------------------------------
#: Training steps of ``lit-probe demo`` by default: past every bug's first finding (dead needs its 20-step
#: window, the ``"nan"`` bug fires at step 30) with room to see the aftermath; about a minute on 2 CPU cores.
DEMO_STEPS = 60
#: ``Trainer(log_every_n_steps=...)`` of the demo: the probe reads its statistics (and runs the detectors)
#: this often, so findings show within a few steps of the problem.
DEMO_LOG_EVERY_N_STEPS = 5
WANDB_MODES: tuple[str, ...] = ("offline", "online", "disabled")


def demo_figure_every(steps: int) -> int:
    """The demo's ``figure_every_n_steps``: about three figure steps per run (steps 0, ~1/3, ~2/3)."""
    return max(1, -(-int(steps) // 3))


def demo_bug_step(steps: int) -> int:
    """The ``"nan"`` variant's ``bug_step``: ``DemoCNN``'s default 30, or half the run when it is shorter."""
    return 30 if steps > 30 else max(1, int(steps) // 2)


def run_demo(out: "str | os.PathLike[str]", steps: int = DEMO_STEPS, bug: str = "none", wandb: str = "offline",
             mode: str = "overwrite", seed: int = 0, *, figure_every_n_steps: Optional[int] = None,
             progress_bar: bool = True, change: str = "none") -> "list[Finding]":
    """Train :class:`DemoCNN` (with ``bug`` injected) on :class:`ShapesDataModule` under a
    :class:`~lit_probe.FeatureProbe` and return its findings.

    Everything goes under ``out``: the probe's figures, ``findings.jsonl`` and ``summary.md`` in
    ``out/probe``, the CSV (and, when ``tensorboard`` is installed, TensorBoard) logs, and with
    ``wandb="offline"`` the offline W&B run in ``out/wandb/offline-run-*``. The environment variables the run
    sets (``WANDB_MODE``, W&B's and Lightning's own) are restored when it returns.

    Args:
        out: output directory (created).
        steps: training steps (``Trainer(max_steps=...)``), >= 1.
        bug: one of :data:`BUGS`.
        wandb: ``"offline"`` (no network needed), ``"online"`` or ``"disabled"`` (no W&B at all).
        mode: the probe's figure ``mode``: ``"overwrite"`` or ``"versioned"``.
        seed: seed of the weights, the data and the shuffling.
        figure_every_n_steps: the probe's ``figure_every_n_steps``; ``None``: about three figure steps per run
            (:func:`demo_figure_every`); ``0``: no figures.
        progress_bar: show Lightning's progress bar.
        change: one of :data:`CHANGES`: makes this run differ from the default one (for ``lit-probe diff``).

    Returns:
        ``FeatureProbe.findings``: every finding of the run, in the order they were reported.
    """
    if bug not in BUGS:
        raise ValueError(f"bug must be one of {', '.join(BUGS)}; got {bug!r}")
    if wandb not in WANDB_MODES:
        raise ValueError(f"wandb must be one of {', '.join(WANDB_MODES)}; got {wandb!r}")
    if change not in CHANGES:
        raise ValueError(f"change must be one of {', '.join(CHANGES)}; got {change!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if figure_every_n_steps is None:
        fig_every: Optional[int] = demo_figure_every(steps)
    else:
        fig_every = None if figure_every_n_steps == 0 else int(figure_every_n_steps)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env_before = dict(os.environ)
    # the caller's global RNG state and environment are left as they were
    with torch.random.fork_rng(devices=[]):
        try:
            torch.manual_seed(seed)
            return _fit_demo(out, steps, bug, wandb, mode, seed, fig_every, progress_bar, change)
        finally:
            if wandb != "disabled":
                try:
                    import wandb as _wandb

                    if _wandb.run is not None:
                        _wandb.finish()
                except Exception:  # pragma: no cover - W&B must never fail the demo at the end
                    pass
            os.environ.clear()
            os.environ.update(env_before)


def _fit_demo(out: Path, steps: int, bug: str, wandb: str, mode: str, seed: int, fig_every: Optional[int],
              progress_bar: bool, change: str = "none") -> "list[Finding]":
    import warnings

    CSVLogger = pl.loggers.CSVLogger

    from .packages import FeatureProbe

    loggers: list = [CSVLogger(save_dir=str(out), name="csv")]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        TensorBoardLogger = pl.loggers.TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(out), name="tensorboard"))
    if wandb != "disabled":
        WandbLogger = pl.loggers.WandbLogger

        os.environ["WANDB_MODE"] = wandb
        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(WandbLogger(save_dir=str(out), offline=wandb == "offline", project="lit-probe-demo",
                                   name=f"demo-{bug}"))
    model = DemoCNN(bug=bug, seed=seed, bug_step=demo_bug_step(steps),  # type: ignore[arg-type]
                    head_lr=10 * 3e-3 if change == "lr" else None)
    if change == "gelu":
        model.block2.act = nn.GELU()
    data = ShapesDataModule(seed=seed, shuffle_seed=seed + 1 if change == "data-order" else None)
    probe = FeatureProbe(probes=DEFAULT_PROBES, save_dir=str(out / "probe"), mode=mode,  # type: ignore[arg-type]
                         figure_every_n_steps=fig_every, log_to_wandb=wandb != "disabled",
                         figure_wait_s=120.0)  # the demo shows every figure it made
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=loggers, callbacks=[probe],
                         default_root_dir=str(out), log_every_n_steps=DEMO_LOG_EVERY_N_STEPS,
                         limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
                         enable_progress_bar=progress_bar, enable_model_summary=False)
    with warnings.catch_warnings():
        # the table at the end says it all; Lightning's hints about workers and val loops are noise here
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*(val_dataloader|validation_step|num_training_batches).*")
        trainer.fit(model, datamodule=data)
    return list(probe.findings)
