"""The "never ran" notice tells why (issue 21): a module whose weights are used functionally (Hugging Face
Mamba's slow path: ``F.conv1d(x, conv1d.weight)``, ``dt_proj.weight @ x``) gets a notice that says so; a module
that is really never called keeps the plain notice; a container (``ModuleList``) gets none.

Ground truth from plain PyTorch on the same model: forward hooks on every module (which ones never fire) and the
gradients after a backward pass (whose weights were used).
"""

from __future__ import annotations

import pytest
import torch

import zoo
from lit_probe import FeatureProbe
from lit_probe.record import read_record
from models import make_trainer, zoo_module

transformers = pytest.importorskip("transformers")


def _mamba() -> torch.nn.Module:
    cfg = transformers.MambaConfig(vocab_size=zoo.VOCAB, hidden_size=32, state_size=4, num_hidden_layers=2,
                                   expand=2, conv_kernel=4, use_mambapy=False)
    return transformers.MambaForCausalLM(cfg)


def _plain_truth() -> tuple[set[str], set[str]]:
    """(modules never called, modules whose own weights got a gradient) in one plain training step."""
    torch.manual_seed(0)
    net = _mamba()
    fired: set[str] = set()
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: fired.add(n)) for n, m in net.named_modules()]
    x = torch.randint(0, zoo.VOCAB, (2, 16))
    net(input_ids=x, labels=x).loss.backward()
    for h in handles:
        h.remove()
    never = {"net." + n for n, _ in net.named_modules() if n and n not in fired}
    grads = {"net." + n for n, m in net.named_modules()
             if any(p.grad is not None for p in m.parameters(recurse=False))}
    return never, grads


def test_functionally_used_weights_get_their_own_notice(tmp_path):
    torch.set_num_threads(1)
    never, grads = _plain_truth()
    functional = never & grads
    assert functional and any(n.endswith("mixer.conv1d") for n in functional) and \
        any(n.endswith("mixer.dt_proj") for n in functional), sorted(never)
    uncalled = {n for n in never - grads if not n.endswith(".layers")}  # SiLU `act`: no weights, never called
    assert uncalled, sorted(never)

    entry = zoo.ZooEntry("mamba", _mamba, task="lm", input_shape=(16,), source="transformers")
    module = zoo_module(entry, "lightning")
    probe = FeatureProbe(probes=["net.**"], figure_every_n_steps=None, log_every_n_steps=5,
                         save_dir=str(tmp_path / "probe"))
    make_trainer(tmp_path, "lightning", max_steps=3, callbacks=[probe], limit_val_batches=0).fit(
        module, zoo.make_loader(entry))

    notes = read_record(tmp_path / "probe").notes
    used = [n for n in notes if "used functionally" in n]
    plain = [n for n in notes if "never ran during training" in n]
    assert len(used) == 1 and len(plain) == 1, notes
    listed_used = set(used[0].rsplit(": ", 1)[1].rstrip(".").split(", "))
    listed_plain = set(plain[0].rsplit(": ", 1)[1].rstrip(".").split(", "))
    assert listed_used == functional, (sorted(listed_used), sorted(functional))
    assert listed_plain == uncalled, (sorted(listed_plain), sorted(uncalled))  # no container, no used weights
