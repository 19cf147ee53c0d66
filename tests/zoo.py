"""A zoo of small REAL architectures (torchvision, timm, transformers) with random weights, and a plain-PyTorch
oracle that says what happened inside them, call by call.

Nothing here imports lit_probe or Lightning: the oracle is the independent ground truth the probe is checked against.

* :data:`ZOO` — name -> :class:`ZooEntry` (builder, seeded batches, loss, optimiser, measured time for 40 steps).
* ``models.zoo_module`` (tests/models.py) wraps an entry's model in a LightningModule; this module needs no
  Lightning, so the research scripts import it as ``tests.zoo`` (``python -m benchmarks.zoo_research``).
* :class:`Oracle` — forward hooks on every module that record each CALL (a module called twice per step gives
  two records, named ``path`` then ``path#1``, ``path#2``...) in execution order, with tensor hooks on the
  outputs for d loss / d output in backward order. It answers "first non-finite activation call in forward
  order at step k", "first non-finite gradient in backward order", "units never positive over a window".
* ``Oracle(merge_after=4)`` merges a module's calls from the 4th on into one record ``path#3``, the way the
  probe keeps at most 4 streams per module (README); ``tests/zoo_families.py`` uses it for a cell called per
  time step.
* Bugs with known answers: :func:`inject_nan` (one NaN in a chosen module's output at step k),
  :func:`kill_block` (a BatchNorm bias at -10 before a ReLU), :data:`BUG_MODELS` (a 30-layer tanh MLP and a
  deep sigmoid stack: vanishing gradients; resnet18 with SGD lr=50: explosion then NaN).

No network: weights are random (``weights=None``, ``pretrained=False``, HF configs built in code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["ZooEntry", "ZOO", "ZOO_FAST", "BUG_MODELS", "make_batches", "make_loader", "compute_loss",
           "make_optimizer", "Oracle", "CallRecord", "StepRecord", "StepClock",
           "inject_nan", "kill_block", "train_plain", "deep_tanh_mlp", "deep_sigmoid_stack", "RELU_LIKE",
           "RELU_LIKE_NAMES", "proposed_dead_rule", "NAN_AT", "NAN_STEP", "KILL_AT", "unit_dim", "vanishing_oracle"]

CLASSES = 10
VOCAB = 100


# ----------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class ZooEntry:
    """One real model, small enough to train 40 steps in seconds on one core.

    Attributes:
        name: registry key.
        build: returns the ``nn.Module`` with random weights (seed it before calling).
        task: ``"image"`` (CE on random labels), ``"seqcls"`` (HF sequence classification, CE on random labels),
            ``"lm"`` (HF causal LM, next-token CE), ``"seq"`` (float sequences ``[B, T, F]``, one label each),
            ``"seg"`` (per-pixel CE), ``"graph"`` (node classification: ``batch_size`` nodes of the model's fixed
            graph) or ``"denoise"`` (a diffusion UNet's noise-prediction MSE; batches from ``make_batch``).
        input_shape: ``(C, H, W)`` for images, ``(T,)`` for token sequences, ``(T, F)`` for float sequences,
            ``(F,)`` for node features.
        batch_size: samples per step.
        optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9).
        lr: learning rate.
        seconds_40: measured seconds for 40 plain training steps on one core (``benchmarks/zoo_research.py``).
        source: where the architecture comes from.
    """

    name: str
    build: Callable[[], nn.Module]
    task: str = "image"
    input_shape: tuple = (3, 32, 32)
    batch_size: int = 8
    optimizer: str = "adam"
    lr: float = 1e-3
    seconds_40: float = math.nan
    source: str = "torchvision"
    notes: str = ""
    #: ``make_batch(i, generator) -> (inputs, targets)`` for a task whose batches the generic tasks do not make
    #: (inputs may be a dict of keyword arguments for the model: a diffusion UNet's sample and timestep, an LM's
    #: input ids and attention mask)
    make_batch: Callable[[int, torch.Generator], tuple[Any, torch.Tensor]] | None = field(default=None, compare=False)


def _tv(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=CLASSES, **kw)

    return build


def _tv_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=CLASSES)


def _tv_swin() -> nn.Module:
    from torchvision.models import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           stochastic_depth_prob=0.1, num_classes=CLASSES)


def _tv_maxvit() -> nn.Module:
    from torchvision.models import MaxVit

    return MaxVit(input_size=(32, 32), stem_channels=16, partition_size=2, block_channels=[32, 64],
                  block_layers=[1, 1], head_dim=16, stochastic_depth_prob=0.1, num_classes=CLASSES)


def _tv_convnext_small_cfg() -> nn.Module:
    """torchvision's ConvNeXt class (LayerScale 1e-6, stochastic depth) with a 2-stage, 2-block config."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    cfg = [CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)]
    return ConvNeXt(cfg, stochastic_depth_prob=0.1, num_classes=CLASSES)


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kw)

    return build


def _hf_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=CLASSES)
    return BertForSequenceClassification(cfg)


def _hf_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg)


_ENTRIES = [
    ZooEntry("resnet18", _tv("resnet18")),
    ZooEntry("mobilenet_v3_small", _tv("mobilenet_v3_small")),
    ZooEntry("efficientnet_b0", _tv("efficientnet_b0")),
    ZooEntry("convnext_tiny", _tv("convnext_tiny"), batch_size=4),
    ZooEntry("convnext_2stage", _tv_convnext_small_cfg, notes="torchvision ConvNeXt class, small config"),
    ZooEntry("squeezenet1_1", _tv("squeezenet1_1"), lr=1e-4,
             notes="Adam 1e-4: at 1e-3 or with SGD its ReLU over the class maps dies (see squeezenet_dying)"),
    ZooEntry("shufflenet_v2_x0_5", _tv("shufflenet_v2_x0_5")),
    ZooEntry("regnet_y_400mf", _tv("regnet_y_400mf")),
    ZooEntry("tv_vit", _tv_vit, notes="VisionTransformer(32px, patch 8, 2 layers, 2 heads, dim 32)"),
    ZooEntry("tv_swin", _tv_swin, notes="SwinTransformer(patch 4, dim 32, depths [2,2], window 4)"),
    ZooEntry("tv_maxvit", _tv_maxvit, notes="MaxVit(32px, stem 16, partition 2, channels [32,64])"),
    ZooEntry("googlenet", _tv("googlenet", aux_logits=False, init_weights=True)),
    ZooEntry("inception_v3", _tv("inception_v3", aux_logits=False, init_weights=True), input_shape=(3, 75, 75),
             batch_size=4),
    ZooEntry("timm_vit_qknorm", _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, qk_norm=True),
             source="timm", notes="vit_tiny_patch16_224(img 32, patch 8, depth 2, qk_norm)"),
    ZooEntry("timm_convnext_atto", _timm("convnext_atto"), source="timm"),
    ZooEntry("timm_efficientnet_b0", _timm("efficientnet_b0"), source="timm"),
    ZooEntry("hf_bert", _hf_bert, task="seqcls", input_shape=(16,), source="transformers",
             notes="BertConfig(hidden 32, 2 layers, 2 heads, vocab 100)"),
    ZooEntry("hf_gpt2", _hf_gpt2, task="lm", input_shape=(16,), source="transformers",
             notes="GPT2Config(n_embd 32, 2 layers, 2 heads, vocab 100)"),
]

#: name -> entry; `seconds_40` is filled from MEASURED below.
ZOO: dict[str, ZooEntry] = {}

#: seconds for 40 plain training steps (no probe, no oracle), one thread, on the 2-core CPU machine while other
#: jobs ran (``python -m benchmarks.zoo_research time``); refreshed by hand. With the probe on every module inside
#: ``Trainer.fit`` add ~0-100% (mostly Python per hooked call: mobilenet/efficientnet/regnet have 200-340 calls).
MEASURED: dict[str, float] = {
    "resnet18": 9.1, "mobilenet_v3_small": 2.2, "efficientnet_b0": 10.9, "convnext_tiny": 12.6,
    "convnext_2stage": 0.2, "squeezenet1_1": 0.6, "shufflenet_v2_x0_5": 1.3, "regnet_y_400mf": 5.3, "tv_vit": 0.1,
    "tv_swin": 0.6, "tv_maxvit": 1.1, "googlenet": 7.1, "inception_v3": 11.5, "timm_vit_qknorm": 1.4,
    "timm_convnext_atto": 2.3, "timm_efficientnet_b0": 6.5, "hf_bert": 0.2, "hf_gpt2": 0.2,
}

#: a quick subset that still covers a reused ReLU, LayerScale, SE + SiLU, attention (torchvision, timm, HF)
ZOO_FAST = ["resnet18", "mobilenet_v3_small", "tv_vit", "timm_vit_qknorm", "hf_bert", "hf_gpt2"]


def _register() -> None:
    from dataclasses import replace

    for e in _ENTRIES:
        ZOO[e.name] = replace(e, seconds_40=MEASURED.get(e.name, math.nan))


_register()


# ---------------------------------------------------------------------------------------- bug models
def deep_tanh_mlp(depth: int = 30, width: int = 64, in_dim: int = 32, init_std: float | None = None) -> nn.Sequential:
    """A plain ``depth``-layer Linear+Tanh stack (no normalisation, no residuals): gradients vanish toward the
    input. ``init_std`` overrides PyTorch's default Linear init (U(+-1/sqrt(fan_in)), i.e. std 1/sqrt(3 fan_in))."""
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        lin = nn.Linear(d, width)
        if init_std is not None:
            nn.init.normal_(lin.weight, std=init_std)
            nn.init.zeros_(lin.bias)
        layers += [lin, nn.Tanh()]
        d = width
    layers.append(nn.Linear(d, CLASSES))
    return nn.Sequential(*layers)


def deep_sigmoid_stack(depth: int = 15, width: int = 64, in_dim: int = 32) -> nn.Sequential:
    """``depth`` Linear+Sigmoid pairs with default init: each sigmoid passes at most 1/4 of the gradient."""
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.Sigmoid()]
        d = width
    layers.append(nn.Linear(d, CLASSES))
    return nn.Sequential(*layers)


#: models of the bug cases (not healthy): trained with SGD so that a tiny gradient means a tiny update
BUG_MODELS: dict[str, ZooEntry] = {
    "tanh_mlp30": ZooEntry("tanh_mlp30", deep_tanh_mlp, input_shape=(32,), batch_size=16, optimizer="sgd",
                           lr=0.01, source="plain", notes="30 x (Linear 64 + Tanh), default init"),
    "tanh_mlp30_small_init": ZooEntry("tanh_mlp30_small_init", lambda: deep_tanh_mlp(init_std=0.05),
                                      input_shape=(32,), batch_size=16, optimizer="sgd", lr=0.01, source="plain",
                                      notes="30 x (Linear 64 + Tanh), N(0, 0.05) init"),
    "sigmoid15": ZooEntry("sigmoid15", deep_sigmoid_stack, input_shape=(32,), batch_size=16, optimizer="sgd",
                          lr=0.01, source="plain", notes="15 x (Linear 64 + Sigmoid), default init"),
    "squeezenet_dying": ZooEntry("squeezenet_dying", _tv("squeezenet1_1", dropout=0.0), optimizer="sgd", lr=0.01,
                                 notes="real dying, nothing injected (dropout 0: no RNG after init): the final ReLU "
                                       "(over the class maps) stops firing, loss -> log(10)"),
    "resnet18_lr50": ZooEntry("resnet18_lr50", _tv("resnet18"), optimizer="sgd", lr=50.0,
                              notes="SGD lr=50 momentum 0.9: explodes, then NaN"),
}


# -------------------------------------------------------------------------------------------- data / loss
def make_batches(entry: ZooEntry, n_batches: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_batches`` seeded batches ``(inputs, targets)``; training cycles through them."""
    g = torch.Generator().manual_seed(seed)
    if entry.make_batch is not None:
        return [entry.make_batch(i, g) for i in range(n_batches)]
    out = []
    for _ in range(n_batches):
        b = entry.batch_size
        if entry.task == "image":
            x = torch.randn(b, *entry.input_shape, generator=g)
            y = torch.randint(0, CLASSES, (b,), generator=g)
        elif entry.task == "seqcls":
            x = torch.randint(0, VOCAB, (b, *entry.input_shape), generator=g)
            y = torch.randint(0, CLASSES, (b,), generator=g)
        elif entry.task == "lm":
            x = torch.randint(0, VOCAB, (b, *entry.input_shape), generator=g)
            y = x.clone()
        elif entry.task == "seq":  # float sequences [B, T, F], one label per sequence
            x = torch.randn(b, *entry.input_shape, generator=g)
            y = torch.randint(0, CLASSES, (b,), generator=g)
        elif entry.task == "seg":  # images [B, C, H, W], one label per pixel
            x = torch.randn(b, *entry.input_shape, generator=g)
            y = torch.randint(0, CLASSES, (b, *entry.input_shape[1:]), generator=g)
        elif entry.task == "graph":  # node features [N, F] of the model's fixed graph, one label per node
            x = torch.randn(b, *entry.input_shape, generator=g)
            y = torch.randint(0, CLASSES, (b,), generator=g)
        else:
            raise ValueError(entry.task)
        out.append((x, y))
    return out


def compute_loss(entry: ZooEntry, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Classification CE on random labels, or next-token CE for a causal LM (logits from ``ModelOutput``)."""
    if entry.task in ("image", "seq", "seg", "graph"):
        out = net(x)
        logits = out if isinstance(out, torch.Tensor) else out[0]  # googlenet/inception namedtuples
        return nn.functional.cross_entropy(logits, y)
    if entry.task == "denoise":  # a diffusion UNet predicts the noise of (sample, timestep)
        out = net(**x)
        return nn.functional.mse_loss(out if isinstance(out, torch.Tensor) else out.sample, y)
    logits = (net(**x) if isinstance(x, dict) else net(input_ids=x)).logits
    if entry.task == "seqcls":
        return nn.functional.cross_entropy(logits, y)
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))


def make_optimizer(entry: ZooEntry, params: Any) -> torch.optim.Optimizer:
    if entry.optimizer == "adam":
        return torch.optim.Adam(params, lr=entry.lr)
    return torch.optim.SGD(params, lr=entry.lr, momentum=0.9)


class _ListDataset(Dataset):
    def __init__(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches[i]


def make_loader(entry: ZooEntry, n_batches: int = 8, seed: int = 0) -> DataLoader:
    """One whole pre-made batch per item (``batch_size=None``): the same batches as :func:`make_batches`."""
    return DataLoader(_ListDataset(make_batches(entry, n_batches, seed)), batch_size=None, shuffle=False)


# --------------------------------------------------------------------------------------------- oracle
#: module types whose output is >= 0 and whose gradient is zero exactly where the output is 0 ("never positive"
#: means "never passes a gradient"): the only ones the proposed dead rule judges.
RELU_LIKE: tuple[type, ...] = (nn.ReLU, nn.ReLU6)
RELU_LIKE_NAMES = tuple(t.__name__ for t in RELU_LIKE)


def proposed_dead_rule(n_units: int, fraction: float) -> bool:
    """The dead rule proposed from the zoo (``benchmarks/zoo_research.py evaluate``), for ReLU-like outputs only: more than half
    of the units never positive over the window in a layer of >= 16 units; >= 90% in a layer of 4-15 units
    (RegNet-Y's 8-unit squeeze-excitation bottleneck has 4-5 of 8 units dead in healthy runs)."""
    if n_units < 4:
        return False
    return fraction > 0.5 if n_units >= 16 else fraction >= 0.9


def unit_dim(t: torch.Tensor) -> int | None:
    """Which dimension holds the units: channels (dim 1) of a 4-D (or 5-D) conv output, the last dim of
    ``[N, F]`` and ``[N, T, F]``; ``None`` for scalars and 1-D tensors."""
    if t.dim() >= 4:
        return 1
    if t.dim() in (2, 3):
        return t.dim() - 1
    return None


def _tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Floating tensors inside an output (tensor, tuple/list, dict, ``ModelOutput``, namedtuple, dataclass)."""
    if depth > 4 or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield obj
    elif isinstance(obj, dict):  # also HF ModelOutput (an OrderedDict without the None fields)
        for v in obj.values():
            yield from _tensors(v, depth + 1)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v, depth + 1)
    elif hasattr(obj, "__dataclass_fields__"):
        for k in obj.__dataclass_fields__:
            yield from _tensors(getattr(obj, k, None), depth + 1)


@dataclass
class CallRecord:
    """One call of one module in one training step."""

    name: str  # "path" for the first call in the step, "path#1", "path#2" for later ones
    path: str
    call: int
    type: str
    fwd_index: int
    nonfinite: bool
    absmax: float
    rms: float
    numel: int
    unit_max: torch.Tensor | None = None  # per unit, over the batch (and positions)
    unit_min: torch.Tensor | None = None
    unit_spread: torch.Tensor | None = None  # per unit, max - min over the batch within this step
    # gradient d loss / d output (all float outputs of the call together)
    grad_index: int | None = None  # position of the first gradient arrival in backward order
    grad_group: int | None = None  # calls whose hooks got the SAME gradient tensor (a Sequential and its last
    #                                child return one tensor) share a group: they are tied in backward order
    grad_nonfinite: bool = False
    grad_sq: float = 0.0
    grad_numel: int = 0
    grad_absmax: float = 0.0
    grad_parts: int = 0

    @property
    def grad_l2(self) -> float:
        return math.sqrt(self.grad_sq)

    @property
    def grad_rms(self) -> float:
        return math.sqrt(self.grad_sq / self.grad_numel) if self.grad_numel else math.nan


def _merge_call(into: CallRecord, c: CallRecord) -> None:
    """Fold call ``c``'s forward statistics into ``into`` (one stream for several calls)."""
    sq = into.rms ** 2 * into.numel + c.rms ** 2 * c.numel
    into.numel += c.numel
    into.rms = math.sqrt(sq / into.numel) if into.numel else math.nan
    into.nonfinite = into.nonfinite or c.nonfinite
    into.absmax = max(into.absmax, c.absmax) if math.isfinite(c.absmax) else c.absmax
    for attr, fn in (("unit_max", torch.maximum), ("unit_min", torch.minimum), ("unit_spread", torch.maximum)):
        a, b = getattr(into, attr), getattr(c, attr)
        if a is not None and b is not None and a.shape == b.shape:
            setattr(into, attr, fn(a, b))


@dataclass
class StepRecord:
    step: int
    calls: list[CallRecord] = field(default_factory=list)
    grad_order: list[str] = field(default_factory=list)  # call names in order of first gradient arrival
    params: dict[str, dict[str, float]] = field(default_factory=dict)  # module path -> param stats
    loss: float = math.nan

    def by_name(self) -> dict[str, CallRecord]:
        cache = self.__dict__.get("_by_name")
        if cache is None or len(cache) != len(self.calls):
            cache = self.__dict__["_by_name"] = {c.name: c for c in self.calls}
        return cache


class Oracle:
    """Plain-PyTorch ground truth: hooks on EVERY module under ``root`` (``root`` itself excluded).

    Names are ``named_modules()`` paths relative to ``root`` (a LightningModule root gives ``net.layer1``);
    a module's k-th call within a step (k >= 1) is named ``path#k``. Call :meth:`begin_step` before each
    step's forward; the gradients of a step arrive during its backward and are kept with it.

    Args:
        root: the module whose descendants are hooked.
        units: keep per-unit max/min/spread of every call (for dead-unit questions).
        include: a predicate on the path; only matching modules are hooked.
        merge_after: when given (README: "up to 4 calls, later calls merge into ``#3``"), the calls ``k >=
            merge_after - 1`` of a module in one step are ONE record named ``path#<merge_after - 1>``: non-finite
            if any of them was, absmax the largest, RMS and units over all of them, its gradients accumulated,
            its place in forward/backward order that of its first call. ``None``: one record per call.
    """

    def __init__(self, root: nn.Module, units: bool = True, include: Callable[[str], bool] | None = None,
                 merge_after: int | None = None) -> None:
        self.root = root
        self.units = units
        self.include = include
        self.merge_after = merge_after
        self.steps: dict[int, StepRecord] = {}
        self.current: StepRecord | None = None
        self._handles: list[Any] = []
        self._counts: dict[str, int] = {}
        self._grad_counter = 0
        self._last_grad: Any = None
        self._group = -1
        self._paths: dict[nn.Module, str] = {}

    # -- lifecycle
    def attach(self) -> "Oracle":
        for path, mod in self.root.named_modules(remove_duplicate=False):
            if not path or (self.include and not self.include(path)):
                continue
            if mod in self._paths:
                continue  # a module registered under two names keeps its first name
            self._paths[mod] = path
            self._handles.append(mod.register_forward_hook(self._make_hook(path)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "Oracle":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def begin_step(self, step: int) -> None:
        self.current = StepRecord(step)
        self.steps[step] = self.current
        self._counts = {}
        self._grad_counter = 0
        self._last_grad = None
        self._group = -1

    # -- hooks
    def _make_hook(self, path: str) -> Callable:
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            rec = self.current
            if rec is None or not torch.is_grad_enabled():
                return None
            tensors = list(_tensors(out))
            if not tensors:
                return None
            k = self._counts.get(path, 0)
            self._counts[path] = k + 1
            if self.merge_after is not None and k >= self.merge_after - 1:
                k = self.merge_after - 1
            name = path if k == 0 else f"{path}#{k}"
            merged = rec.by_name().get(name) if self.merge_after is not None else None
            with torch.no_grad():
                flat = [t.detach().float() for t in tensors]
                nonfinite = any(bool((~torch.isfinite(t)).any()) for t in flat)
                absmax = max(float(t.abs().max()) if t.numel() else 0.0 for t in flat)
                numel = sum(t.numel() for t in flat)
                sq = sum(float((t * t).sum()) for t in flat)
                c = CallRecord(name, path, k, type(mod).__name__, len(rec.calls), nonfinite, absmax,
                               math.sqrt(sq / numel) if numel else math.nan, numel)
                first = flat[0]
                d = unit_dim(first)
                if self.units and d is not None and first.numel():
                    moved = first.movedim(d, -1).reshape(-1, first.shape[d])
                    c.unit_max = moved.amax(0).cpu()
                    c.unit_min = moved.amin(0).cpu()
                    if first.shape[0] > 1:  # spread across SAMPLES (dim 0) within this step, max over positions
                        per_sample = first.movedim(d, -1).reshape(first.shape[0], -1, first.shape[d])
                        c.unit_spread = (per_sample.amax(0) - per_sample.amin(0)).amax(0).cpu()
            if merged is not None:  # a later call folded into the record of call ``merge_after - 1``
                _merge_call(merged, c)
                c = merged
            else:
                rec.calls.append(c)
            for t in tensors:
                if t.requires_grad:
                    c.grad_parts += 1
                    t.register_hook(self._make_grad_hook(rec, c))
            return None

        return hook

    def _make_grad_hook(self, rec: StepRecord, c: CallRecord) -> Callable:
        def ghook(g: torch.Tensor) -> None:
            if g is not self._last_grad:
                self._last_grad = g
                self._group += 1
            if c.grad_index is None:
                c.grad_group = self._group
                c.grad_index = self._grad_counter
                self._grad_counter += 1
                rec.grad_order.append(c.name)
            with torch.no_grad():
                gf = g.detach().float()
                c.grad_nonfinite = c.grad_nonfinite or bool((~torch.isfinite(gf)).any())
                c.grad_sq += float((gf * gf).sum())
                c.grad_numel += gf.numel()
                c.grad_absmax = max(c.grad_absmax, float(gf.abs().max()) if gf.numel() else 0.0)
            return None

        return ghook

    # -- parameter statistics (called by a plain training loop around optimizer.step())
    def param_grads(self) -> None:
        """Before ``optimizer.step()``: per module that owns parameters, ||grad|| and ||param||; snapshot."""
        rec = self.current
        assert rec is not None
        self._snap: dict[str, list[torch.Tensor]] = {}
        for mod, path in self._paths.items():
            ps = [p for p in mod.parameters(recurse=False) if p.requires_grad]
            if not ps:
                continue
            gsq = sum(float((p.grad.float() ** 2).sum()) for p in ps if p.grad is not None)
            psq = sum(float((p.detach().float() ** 2).sum()) for p in ps)
            rec.params[path] = {"grad_norm": math.sqrt(gsq), "param_norm": math.sqrt(psq),
                                "numel": float(sum(p.numel() for p in ps))}
            self._snap[path] = [p.detach().clone() for p in ps]

    def param_updates(self) -> None:
        """After ``optimizer.step()``: ||W_new - W_old|| / ||W_old|| per module."""
        rec = self.current
        assert rec is not None
        for mod, path in self._paths.items():
            if path not in self._snap:
                continue
            ps = [p for p in mod.parameters(recurse=False) if p.requires_grad]
            dsq = sum(float(((p.detach() - s) ** 2).sum()) for p, s in zip(ps, self._snap[path]))
            st = rec.params[path]
            st["update_ratio"] = math.sqrt(dsq) / st["param_norm"] if st["param_norm"] > 0 else math.nan
        self._snap = {}

    # -- questions
    def first_nonfinite_activation(self) -> tuple[int, str] | None:
        """(step, call name) of the first call, in forward order of the first step that had one, whose output
        held a NaN/Inf."""
        for s in sorted(self.steps):
            for c in self.steps[s].calls:
                if c.nonfinite:
                    return s, c.name
        return None

    def first_nonfinite_gradient(self) -> tuple[int, str] | None:
        """(step, call name) of the first call, in backward (arrival) order, whose d loss / d output held a
        NaN/Inf."""
        for s in sorted(self.steps):
            rec = self.steps[s]
            byname = rec.by_name()
            for name in rec.grad_order:
                if byname[name].grad_nonfinite:
                    return s, name
        return None

    def tied_in_backward(self, step: int, name: str) -> list[str]:
        """``name`` and every call of ``step`` whose first gradient was the very same tensor (ties in backward
        order: ``net.fc`` and ``net`` both return the logits)."""
        byname = self.steps[step].by_name()
        grp = byname[name].grad_group
        return [n for n in self.steps[step].grad_order if byname[n].grad_group == grp]

    def first_exploding(self, signal: str = "activation", absmax: float = 1e6, growth: float = 1e3,
                        window: int = 50, min_history: int = 5) -> tuple[int, str] | None:
        """(step, call) of the first explosion by README's documented rule, per call stream: max |value| above
        ``absmax``, or above ``growth`` x the stream's median max |value| over the previous ``window`` steps
        (once it has ``min_history`` of them; exploded steps do not enter the median). Forward order within a
        step for activations, backward order for gradients. Non-finite values are not explosions."""
        hist: dict[str, list[float]] = {}
        for s in sorted(self.steps):
            rec = self.steps[s]
            byname = rec.by_name()
            order = [c.name for c in rec.calls] if signal == "activation" else list(rec.grad_order)
            first = None
            for n in order:
                c = byname[n]
                a = c.absmax if signal == "activation" else c.grad_absmax
                if not math.isfinite(a):
                    continue
                h = hist.setdefault(n, [])
                past = h[-window:]
                med = float(torch.tensor(past).median()) if len(past) >= min_history else math.nan
                # torch.median of an even count is the lower middle value; use the mean of the two middles
                if len(past) >= min_history and len(past) % 2 == 0:
                    srt = sorted(past)
                    med = (srt[len(srt) // 2 - 1] + srt[len(srt) // 2]) / 2
                if a > absmax or (med == med and med > 0 and a > growth * med):
                    if first is None:
                        first = n
                    continue
                h.append(a)
            if first is not None:
                return s, first
        return None

    def names(self) -> list[str]:
        """Every call name seen, in forward order of its first appearance."""
        seen: dict[str, None] = {}
        for s in sorted(self.steps):
            for c in self.steps[s].calls:
                seen.setdefault(c.name, None)
        return list(seen)

    def types(self) -> dict[str, str]:
        return {c.name: c.type for s in self.steps.values() for c in s.calls}

    def never_positive(self, name: str, start: int, window: int) -> torch.Tensor | None:
        """Per unit of call ``name``: True when its max stayed <= 0 (NaN counts as not positive... and not
        dead: see :meth:`dead_fraction`) on every step in ``[start, start + window)`` where it ran."""
        acc = None
        for s in range(start, start + window):
            rec = self.steps.get(s)
            c = rec.by_name().get(name) if rec else None
            if c is None or c.unit_max is None:
                continue
            pos = c.unit_max > 0
            acc = pos if acc is None else (acc | pos)
        return None if acc is None else ~acc

    def dead_fraction(self, name: str, start: int, window: int) -> float:
        npos = self.never_positive(name, start, window)
        return math.nan if npos is None or npos.numel() == 0 else float(npos.float().mean())

    def constant_fraction(self, name: str, start: int, window: int, across_steps: bool = True,
                          rtol: float = 1e-6) -> float:
        """Fraction of units whose value did not vary: across samples within every step (``across_steps=False``)
        or, in addition, across the steps of the window (``max over window - min over window`` is tiny)."""
        hi = lo = spread = None
        for s in range(start, start + window):
            rec = self.steps.get(s)
            c = rec.by_name().get(name) if rec else None
            if c is None or c.unit_max is None or c.unit_spread is None:
                continue
            hi = c.unit_max if hi is None else torch.maximum(hi, c.unit_max)
            lo = c.unit_min if lo is None else torch.minimum(lo, c.unit_min)
            spread = c.unit_spread if spread is None else torch.maximum(spread, c.unit_spread)
        if hi is None:
            return math.nan
        scale = rtol * torch.maximum(hi.abs(), lo.abs()).clamp_min(1.0)
        const = (hi - lo) <= scale if across_steps else spread <= scale
        return float(const.float().mean())

    def first_dead(self, window: int = 20, rule: Callable[[int, float], bool] | None = None,
                   types: tuple[str, ...] | None = RELU_LIKE_NAMES, min_units: int = 4) -> tuple[int, str, float] | None:
        """(step, call, dead fraction): the first step ``s`` at which a call of one of ``types`` has its units
        dead by ``rule(n_units, fraction never positive over [s - window + 1, s])`` (default
        :func:`proposed_dead_rule`); the first such call in forward order."""
        rule = rule or proposed_dead_rule
        t = self.types()
        names = [n for n in self.names() if types is None or t[n] in types]
        last = max(self.steps) if self.steps else -1
        for s in range(window - 1, last + 1):
            for n in names:
                npos = self.never_positive(n, s - window + 1, window)
                if npos is None or npos.numel() < min_units:
                    continue
                frac = float(npos.float().mean())
                if rule(int(npos.numel()), frac):
                    return s, n, frac
        return None

    def dead_calls(self, start: int, window: int, fraction: float = 0.5, types: tuple[str, ...] | None = None,
                   min_units: int = 4) -> list[tuple[str, float]]:
        """Calls (forward order) with at least ``fraction`` of their units never positive over the window."""
        t = self.types()
        out = []
        for name in self.names():
            if types is not None and t[name] not in types:
                continue
            npos = self.never_positive(name, start, window)
            if npos is None or npos.numel() < min_units:
                continue
            frac = float(npos.float().mean())
            if frac >= fraction:
                out.append((name, frac))
        return out


def vanishing_oracle(steps: dict[int, StepRecord], first: str, last: str, start: int, stop: int,
                     rms_ratio: float = 1e-3, update_ratio: float = 1e-5) -> dict[str, Any]:
    """Ground truth for "the gradient vanished toward the input" in a plain stack.

    Vanishing when, on every step of ``[start, stop)``: the per-element RMS of d loss / d output at the bottom
    call ``first`` is below ``rms_ratio`` x that at the top call ``last``, AND the bottom module's parameter
    update ``||dW|| / ||W||`` is below ``update_ratio`` (when parameter statistics were taken). The second
    condition is what makes it a bug: the bottom layer does not learn.
    """
    ratios, updates = [], []
    for s in range(start, stop):
        rec = steps.get(s)
        if rec is None:
            continue
        byname = rec.by_name()
        if first not in byname or last not in byname:
            continue
        ratios.append(byname[first].grad_rms / byname[last].grad_rms)
        p = rec.params.get(byname[first].path)
        if p and "update_ratio" in p:
            updates.append(p["update_ratio"])
    worst_ratio = max(ratios) if ratios else math.nan
    worst_update = max(updates) if updates else math.nan
    vanishing = bool(ratios) and worst_ratio < rms_ratio and (not updates or worst_update < update_ratio)
    return {"vanishing": vanishing, "max_rms_ratio": worst_ratio, "max_update_ratio": worst_update,
            "steps": len(ratios)}


# ---------------------------------------------------------------------------------------------- bugs
#: where the NaN is injected per model (a mid-network module; resnet18's downsample BN is the hard case:
#: the NaN reaches the block's SECOND relu call)
NAN_AT = {"resnet18": "layer2.0.downsample.1", "mobilenet_v3_small": "features.4.block.1.0",
          "efficientnet_b0": "features.3.0.block.1.0", "convnext_tiny": "features.3.0.block.3",
          "convnext_2stage": "features.3.0.block.3", "squeezenet1_1": "features.6.expand3x3",
          "shufflenet_v2_x0_5": "stage3.0.branch2.1", "regnet_y_400mf": "trunk_output.block2.block2-0.f.a",
          "tv_vit": "encoder.layers.encoder_layer_1.mlp.0", "tv_swin": "features.1.0.mlp.0",
          "tv_maxvit": "blocks.0.layers.0.layers.MBconv.layers.conv_b", "googlenet": "inception4a.branch2.0.conv",
          "inception_v3": "Mixed_5b.branch5x5_1.conv", "timm_vit_qknorm": "blocks.1.mlp.fc1",
          "timm_convnext_atto": "stages.2.blocks.0.mlp.fc1", "timm_efficientnet_b0": "blocks.3.0.conv_pw",
          "hf_bert": "bert.encoder.layer.1.intermediate.dense", "hf_gpt2": "transformer.h.1.mlp.c_fc"}
NAN_STEP = 5

#: where a block is killed (a BatchNorm bias at -10 right before a ReLU)
KILL_AT = {"resnet18": "layer2.0.bn1", "shufflenet_v2_x0_5": "stage3.0.branch2.1",
           "regnet_y_400mf": "trunk_output.block2.block2-0.f.a.1", "mobilenet_v3_small": "features.1.block.0.1"}


class StepClock:
    """The step the current forward belongs to (set by a step listener or a plain loop)."""

    def __init__(self) -> None:
        self.step = -1

    def __call__(self, step: int) -> None:
        self.step = step


def inject_nan(module: nn.Module, step: int, clock: StepClock | None = None, index: int = 0) -> StepClock:
    """Make ``module``'s output hold one NaN (element ``index`` of its flattened output, via multiplication by
    a tensor with one NaN) on every call at training step ``step`` only.

    Done by wrapping the instance's ``forward`` (not a hook), so every forward hook (the probe's, the
    oracle's) sees the NaN whatever order they were registered in. Returns the clock to feed with
    ``global_step`` (e.g. ``module.step_listeners.append(clock)``)."""
    clock = clock or StepClock()
    orig = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = orig(*args, **kwargs)
        if clock.step != step:
            return out
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"inject_nan: {type(module).__name__} returns {type(out).__name__}, not a tensor")
        mask = torch.ones(out.shape, dtype=out.dtype, device=out.device)  # contiguous, whatever out's strides
        mask.view(-1)[index] = float("nan")
        return out * mask

    module.forward = forward  # type: ignore[method-assign]
    return clock


def kill_block(net: nn.Module, bn_path: str = "layer2.0.bn1", value: float = -10.0) -> None:
    """Fill a BatchNorm's bias with ``value``: the ReLU after it never fires (BN output ~ N(0,1) + value)."""
    bn = net.get_submodule(bn_path)
    with torch.no_grad():
        bn.bias.fill_(value)


# ------------------------------------------------------------------------------------------ plain loop
def train_plain(entry: ZooEntry, steps: int = 40, seed: int = 0, oracle: bool = True, units: bool = True,
                params: bool = True, net: nn.Module | None = None,
                before_step: Callable[[int, nn.Module], None] | None = None) -> tuple[nn.Module, Oracle | None, list[float]]:
    """``steps`` plain-PyTorch training steps of ``entry`` (seeded), with the oracle hooked on ``net``
    (names relative to the net, no ``net.`` prefix). Stops early once the loss is non-finite for 2 steps."""
    torch.manual_seed(seed)
    net = net if net is not None else entry.build()
    net.train()
    opt = make_optimizer(entry, net.parameters())
    batches = make_batches(entry)
    orc = Oracle(net, units=units).attach() if oracle else None
    losses: list[float] = []
    bad = 0
    try:
        for step in range(steps):
            if before_step:
                before_step(step, net)
            if orc:
                orc.begin_step(step)
            x, y = batches[step % len(batches)]
            opt.zero_grad(set_to_none=True)
            loss = compute_loss(entry, net, x, y)
            loss.backward()
            if orc and params:
                orc.param_grads()
            opt.step()
            if orc and params:
                orc.param_updates()
            losses.append(float(loss.detach()))
            if orc:
                orc.current.loss = losses[-1]
            bad = bad + 1 if not math.isfinite(losses[-1]) else 0
            if bad >= 2:
                break
    finally:
        if orc:
            orc.detach()
    return net, orc, losses
