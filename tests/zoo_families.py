"""More families for the zoo (issue 21): recurrent nets, an encoder-decoder U-Net with skip concatenations, a
diffusion UNet (``diffusers``), a decoder-only LM of today's shape (Llama: RMSNorm, SwiGLU, rotary, GQA), a
state-space model (Mamba, its slow path on CPU) and a graph net (GCN), each small enough for a few seconds of
``Trainer.fit`` on one core, with the bugs that family really has.

Like :mod:`zoo`, nothing here imports lit_probe or Lightning: the ground truth is the plain-PyTorch
:class:`zoo.Oracle`. The entries are :class:`zoo.ZooEntry` objects, so ``models.zoo_module`` and
``zoo.train_plain`` take them as they are.

* :data:`FAMILIES` — healthy entries; :data:`FAMILY_BUGS` — the bug entries (an exploding vanilla RNN, a
  GCN whose degree normalisation divides by a zero degree, Llama with eager attention and a hand-made additive
  ``-inf`` mask that masks one query row fully, Llama with HF's own 2-D padding mask of all zeros for one
  sample, which HF handles: no NaN).
* :data:`NAN_AT` — where :func:`zoo.inject_nan` puts a NaN per family (``path`` and call index for modules
  called once per time step); :data:`KILL_AT` — the U-Net's decoder BatchNorm whose bias is set to -10.
* :data:`PROBE_LISTS` — the probe lists each healthy family is checked under.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import zoo
from torch import nn
from zoo import CLASSES, VOCAB, ZooEntry

__all__ = [
    "FAMILIES",
    "FAMILY_BUGS",
    "GCN",
    "KILL_AT",
    "NAN_AT",
    "NAN_STEP",
    "PROBE_LISTS",
    "CellLoop",
    "SeqNet",
    "UNet",
    "gcn_norm",
    "random_graph",
]

NAN_STEP = 5


# ------------------------------------------------------------------------------------------ recurrent
class SeqNet(nn.Module):
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (2 layers, batch first) over ``[B, T, F]``; a Linear head on the
    last time step. The recurrent module returns a tuple ``(output, h_n)`` (LSTM: ``(output, (h_n, c_n))``)."""

    def __init__(self, kind: str = "lstm", in_dim: int = 8, hidden: int = 32, layers: int = 2) -> None:
        super().__init__()
        cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
        self.proj = nn.Linear(in_dim, hidden)
        self.rnn = cls(hidden, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.proj(x))
        return self.head(out[:, -1])


class CellLoop(nn.Module):
    """One cell (``nn.LSTMCell``, or ``nn.RNNCell`` for a vanilla RNN) called once per time step, as people
    write custom recurrences: ``T`` calls of ``cell`` per step (more than the probe's 4 call streams)."""

    def __init__(self, kind: str = "lstm", in_dim: int = 8, hidden: int = 32, nonlinearity: str = "tanh",
                 recurrent_scale: float | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.hidden = hidden
        self.inp = nn.Linear(in_dim, hidden)
        if kind == "lstm":
            self.cell: nn.Module = nn.LSTMCell(hidden, hidden)
        else:
            self.cell = nn.RNNCell(hidden, hidden, nonlinearity=nonlinearity)
            if recurrent_scale is not None:  # W_hh = scale * I (the "IRNN" initialisation, here too large)
                with torch.no_grad():
                    self.cell.weight_hh.copy_(recurrent_scale * torch.eye(hidden))
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.inp(x)  # one call over all time steps
        b = x.shape[0]
        h = u.new_zeros(b, self.hidden)
        c = u.new_zeros(b, self.hidden)
        for t in range(x.shape[1]):
            if self.kind == "lstm":
                h, c = self.cell(u[:, t], (h, c))
            else:
                h = self.cell(u[:, t], h)
        return self.head(h)


# ------------------------------------------------------------------------------------------ U-Net
def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """A 2-level segmentation U-Net (Ronneberger et al.) in plain torch: double 3x3 conv + BN + ReLU blocks, max
    pooling down, transposed convolutions up, skip connections by concatenation, a 1x1 conv to class maps."""

    def __init__(self, in_ch: int = 3, classes: int = CLASSES, base: int = 8) -> None:
        super().__init__()
        self.enc1 = _double_conv(in_ch, base)
        self.enc2 = _double_conv(base, 2 * base)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _double_conv(2 * base, 4 * base)
        self.up2 = nn.ConvTranspose2d(4 * base, 2 * base, 2, stride=2)
        self.dec2 = _double_conv(4 * base, 2 * base)
        self.up1 = nn.ConvTranspose2d(2 * base, base, 2, stride=2)
        self.dec1 = _double_conv(2 * base, base)
        self.out = nn.Conv2d(base, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))  # pool: called twice per step (two streams)
        b = self.bottleneck(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)


# ------------------------------------------------------------------------------------------ diffusion UNet
def _diffusion_unet() -> nn.Module:
    """``diffusers.UNet2DModel`` from a tiny config (no download): ResNet blocks with GroupNorm + SiLU, a
    self-attention down and up block, a sinusoidal timestep embedding through an MLP."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)


def _denoise_batch(batch: int = 4, size: int = 16, steps: int = 1000) -> Any:
    """DDPM training batches: ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (linear betas), target ``eps``."""
    betas = torch.linspace(1e-4, 0.02, steps)
    abar = torch.cumprod(1 - betas, 0)

    def make(i: int, g: torch.Generator) -> tuple[dict, torch.Tensor]:
        x0 = torch.randn(batch, 3, size, size, generator=g).clamp(-1, 1)
        eps = torch.randn(batch, 3, size, size, generator=g)
        t = torch.randint(0, steps, (batch,), generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        return {"sample": a.sqrt() * x0 + (1 - a).sqrt() * eps, "timestep": t}, eps

    return make


# ------------------------------------------------------------------------------------------ LMs
def _llama(attn: str = "sdpa") -> nn.Module:
    """``LlamaForCausalLM`` from a tiny config: RMSNorm, SwiGLU MLP, rotary positions, grouped-query attention
    (4 query heads, 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg)


def _mamba() -> nn.Module:
    """``MambaForCausalLM`` from a tiny config; without the CUDA kernels it runs its slow (pure torch) path."""
    from transformers import MambaConfig, MambaForCausalLM

    cfg = MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, use_cache=False)
    return MambaForCausalLM(cfg)


#: the batch (index into the 8 cycled batches) whose attention mask masks one query row fully
MASKED_BATCH = 3
MASKED_SAMPLE, MASKED_ROW = 2, 5


def _lm_with_additive_mask(batch: int = 8, seq: int = 16) -> Any:
    """Batches of ``input_ids`` with a hand-made 4-D additive causal mask (``0`` allowed, ``-inf`` masked), as
    people build them; in batch :data:`MASKED_BATCH` one query row (sample 2, position 5) is masked fully
    (e.g. a packing bug): softmax over a row of ``-inf`` is NaN."""
    causal = torch.full((seq, seq), float("-inf")).triu(1)

    def make(i: int, g: torch.Generator) -> tuple[dict, torch.Tensor]:
        x = torch.randint(0, VOCAB, (batch, seq), generator=g)
        mask = causal[None, None].repeat(batch, 1, 1, 1)
        if i == MASKED_BATCH:
            mask[MASKED_SAMPLE, 0, MASKED_ROW, :] = float("-inf")
        return {"input_ids": x, "attention_mask": mask}, x.clone()

    return make


def _lm_with_padding_mask(batch: int = 8, seq: int = 16) -> Any:
    """Batches with HF's own 2-D padding mask; in batch :data:`MASKED_BATCH` sample 2 is all padding (mask all
    zeros: every query row of that sample masked)."""

    def make(i: int, g: torch.Generator) -> tuple[dict, torch.Tensor]:
        x = torch.randint(0, VOCAB, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if i == MASKED_BATCH:
            mask[MASKED_SAMPLE] = 0
        return {"input_ids": x, "attention_mask": mask}, x.clone()

    return make


# ------------------------------------------------------------------------------------------ graph
GRAPH_NODES = 64


def random_graph(n: int = GRAPH_NODES, p: float = 0.08, seed: int = 0, isolated: int = 0) -> torch.Tensor:
    """A symmetric 0/1 adjacency matrix (Erdos-Renyi, no self loops) from a fixed seed; the last ``isolated``
    nodes get no edges."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(n, n, generator=g) < p).float().triu(1)
    a = a + a.T
    if isolated:
        a[-isolated:, :] = 0
        a[:, -isolated:] = 0
    return a


def gcn_norm(a: torch.Tensor, self_loops: bool = True) -> torch.Tensor:
    """``D^-1/2 (A + I) D^-1/2`` (Kipf & Welling). Without the self loops, an isolated node has degree 0 and
    ``0 ** -0.5 = inf``: its row and column become ``inf * 0 = NaN`` (the bug)."""
    if self_loops:
        a = a + torch.eye(a.shape[0])
    d = a.sum(1).pow(-0.5)
    return d[:, None] * a * d[None, :]


class GCNLayer(nn.Module):
    """``A_hat @ (X W)``: a Linear, then aggregation over the neighbours (functional, inside this module)."""

    def __init__(self, a_hat: torch.Tensor, cin: int, cout: int) -> None:
        super().__init__()
        self.register_buffer("a_hat", a_hat)
        self.lin = nn.Linear(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a_hat @ self.lin(x)


class GCN(nn.Module):
    """A 2-layer GCN for node classification on one fixed graph (full batch: every node every step)."""

    def __init__(self, a_hat: torch.Tensor, in_dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.conv1 = GCNLayer(a_hat, in_dim, hidden)
        self.act = nn.ReLU()
        self.conv2 = GCNLayer(a_hat, hidden, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))


# ------------------------------------------------------------------------------------------ registry
_SEQ: dict[str, Any] = {"task": "seq", "input_shape": (12, 8), "batch_size": 8, "source": "plain torch"}

FAMILIES: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry("lstm", lambda: SeqNet("lstm"), **_SEQ, notes="nn.LSTM(32, 32, 2 layers) over 12 steps"),
    ZooEntry("gru", lambda: SeqNet("gru"), **_SEQ, notes="nn.GRU(32, 32, 2 layers) over 12 steps"),
    ZooEntry("lstm_cell_loop", lambda: CellLoop("lstm"), **_SEQ,
             notes="nn.LSTMCell(32, 32) called once per time step: 12 calls a step"),
    ZooEntry("unet_seg", UNet, task="seg", input_shape=(3, 32, 32), batch_size=4, source="plain torch",
             notes="2-level U-Net, skip concatenations, BN + ReLU"),
    ZooEntry("diffusion_unet", _diffusion_unet, task="denoise", input_shape=(3, 16, 16), batch_size=4,
             source="diffusers", make_batch=_denoise_batch(),
             notes="UNet2DModel(16px, channels (16, 32), GroupNorm 8, attention down/up block), DDPM loss"),
    ZooEntry("hf_llama", _llama, task="lm", input_shape=(16,), source="transformers",
             notes="LlamaConfig(hidden 32, 2 layers, 4 heads, 2 kv heads, vocab 100), sdpa attention"),
    ZooEntry("hf_mamba", _mamba, task="lm", input_shape=(16,), source="transformers",
             notes="MambaConfig(hidden 32, state 8, 2 layers), slow path"),
    ZooEntry("gcn", lambda: GCN(gcn_norm(random_graph())), task="graph", input_shape=(16,), batch_size=GRAPH_NODES,
             source="plain torch", notes="2-layer GCN, 64-node random graph, D^-1/2 (A+I) D^-1/2"),
]}

FAMILY_BUGS: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry("rnn_exploding", lambda: CellLoop("rnn", nonlinearity="relu", recurrent_scale=1.05), task="seq",
             input_shape=(24, 8), batch_size=8, optimizer="sgd", lr=0.01, source="plain torch",
             notes="nn.RNNCell(relu) loop over 24 steps, W_hh = 1.05 I, SGD 0.01"),
    ZooEntry("gcn_isolated_no_self_loops", lambda: GCN(gcn_norm(random_graph(isolated=2), self_loops=False)),
             task="graph", input_shape=(16,), batch_size=GRAPH_NODES, source="plain torch",
             notes="D^-1/2 A D^-1/2 without self loops on a graph with 2 isolated nodes"),
    ZooEntry("llama_masked_row", lambda: _llama("eager"), task="lm", input_shape=(16,), source="transformers",
             make_batch=_lm_with_additive_mask(),
             notes="eager attention, 4-D additive -inf mask with one query row fully masked in batch 3"),
    ZooEntry("diffusion_unet_sgd5", _diffusion_unet, task="denoise", input_shape=(3, 16, 16), batch_size=4,
             optimizer="sgd", lr=5.0, source="diffusers", make_batch=_denoise_batch(),
             notes="the diffusion UNet with SGD lr=5 (momentum 0.9): explodes, then a GroupNorm's variance "
                   "overflows to NaN"),
    ZooEntry("mamba_sgd20", _mamba, task="lm", input_shape=(16,), optimizer="sgd", lr=20.0, source="transformers",
             notes="the Mamba LM with SGD lr=20 (momentum 0.9): explodes, then NaN"),
    ZooEntry("llama_padded_sample", _llama, task="lm", input_shape=(16,), source="transformers",
             make_batch=_lm_with_padding_mask(), notes="HF 2-D padding mask, one sample all padding in batch 3"),
]}

#: (module path, call index) where the NaN goes at :data:`NAN_STEP` per family
NAN_AT: dict[str, tuple[str, int]] = {
    "lstm": ("rnn", 0), "gru": ("rnn", 0), "lstm_cell_loop": ("cell", 6), "unet_seg": ("dec2.3", 0),
    "diffusion_unet": ("down_blocks.1.resnets.0.conv1", 0), "hf_llama": ("model.layers.1.mlp.gate_proj", 0),
    "hf_mamba": ("backbone.layers.1.mixer.in_proj", 0), "gcn": ("conv1.lin", 0),
}

#: the U-Net decoder block killed: the first BatchNorm of ``dec2`` (its ReLU ``dec2.2`` never fires)
KILL_AT = {"unet_seg": "dec2.1"}

#: probe lists per healthy family (every one must stay silent)
PROBE_LISTS: dict[str, list[list[str]]] = {
    "lstm": [["net.**"], ["type:Linear"], ["net.rnn"]],
    "gru": [["net.**"], ["type:Linear"], ["net.rnn"]],
    "lstm_cell_loop": [["net.**"], ["type:LSTMCell"], ["type:Linear"]],
    "unet_seg": [["net.**"], ["type:Conv2d"], ["net.enc?", "net.bottleneck", "net.dec?"], ["net.enc1.0"]],
    "diffusion_unet": [["net.**"], ["type:Conv2d"], ["net.down_blocks.*", "net.mid_block", "net.up_blocks.*"],
                       ["net.mid_block.attentions.0.to_k"]],
    "hf_llama": [["net.**"], ["type:Linear"], ["net.model.layers.*"], ["net.model.layers.0.self_attn.k_proj"]],
    "hf_mamba": [["net.**"], ["type:Linear"], ["net.backbone.layers.*"], ["net.backbone.layers.0.mixer.x_proj"]],
    "gcn": [["net.**"], ["type:Linear"], ["net.conv1", "net.conv2"], ["net.conv1.lin"]],
}


def inject_nan_at_call(module: nn.Module, step: int, call: int, clock: zoo.StepClock) -> zoo.StepClock:
    """Like :func:`zoo.inject_nan`, but only into the ``call``-th call of ``module`` within step ``step`` (a cell
    called once per time step)."""
    orig = module.forward
    count = {"step": None, "n": 0}

    def forward(*args: Any, **kwargs: Any) -> Any:
        if count["step"] != clock.step:
            count["step"], count["n"] = clock.step, 0
        k = count["n"]
        count["n"] += 1
        out = orig(*args, **kwargs)
        if clock.step != step or k != call:
            return out
        first = out[0] if isinstance(out, tuple) else out
        mask = torch.ones(first.shape, dtype=first.dtype, device=first.device)
        mask.view(-1)[0] = float("nan")
        return (first * mask, *out[1:]) if isinstance(out, tuple) else out * mask

    module.forward = forward  # type: ignore[method-assign]
    return clock


def _check() -> None:  # pragma: no cover - a quick manual smoke: python tests/zoo_families.py
    torch.set_num_threads(1)
    import time

    for e in [*FAMILIES.values(), *FAMILY_BUGS.values()]:
        t0 = time.perf_counter()
        _, orc, losses = zoo.train_plain(e, steps=10)
        print(f"{e.name:28s} {time.perf_counter() - t0:5.2f}s loss {losses[0]:.3f} -> {losses[-1]:.3f} "
              f"calls {len(orc.steps[0].calls)} nan {orc.first_nonfinite_activation()} "
              f"boom {orc.first_exploding('activation')} {orc.first_exploding('gradient')}"
              f" {math.isfinite(losses[-1])}")


if __name__ == "__main__":
    _check()
