"""lit_probe.extract: capture() / extract_features() against torchvision's feature extractors and
explicit autograd references."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.feature_extraction import create_feature_extractor

from lit_probe.errors import ProbeSelectionError
from lit_probe.extract import Captured, capture, extract_features
from lit_probe.hooks import hook_snapshot


@pytest.fixture()
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return resnet18(weights=None).eval()


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


class SkipNet(nn.Module):
    """Not sequential: a skip connection, a data-dependent branch (symbolic tracing fails on it), and
    an optional explicit return of the intermediate ``block`` output as a gradient reference."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, return_hidden: bool = False):
        s = torch.relu(self.stem(x))
        h = self.block(s)
        out = h + s  # skip connection
        if out.sum() > 0:  # data-dependent control flow
            out = out * 2
        y = self.head(out)
        return (y, h) if return_hidden else y


class DictEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> dict:
        h = self.lin(x)
        return {"h": h, "pair": (h * 2, None), "n": 3}


class DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = DictEncoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.enc(x)
        return d["h"].sum() + d["pair"][0].pow(2).sum()


def test_matches_torchvision_extractors(resnet: nn.Module, images: torch.Tensor) -> None:
    names = ["layer1", "layer2", "layer4"]
    with torch.no_grad():
        fx = create_feature_extractor(resnet, return_nodes={n: n for n in names})(images)
        ilg = IntermediateLayerGetter(resnet, return_layers={n: n for n in names})(images)
        with capture(resnet, names) as cap:
            resnet(images)
    assert isinstance(cap, Captured)
    assert list(cap) == names
    for n in names:
        assert torch.equal(cap[n], fx[n]), n
        assert torch.equal(cap[n], ilg[n]), n
        assert len(cap.calls(n)) == 1


def test_nested_path_intermediate_layer_getter_cannot_do(resnet: nn.Module, images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="return_layers are not present"):
        IntermediateLayerGetter(resnet, return_layers={"layer2.0.conv1": "x"})
    with torch.no_grad():
        fx = create_feature_extractor(resnet, return_nodes={"layer2.0.conv1": "x", "layer1": "l1"})(images)
        with capture(resnet, ["layer2.0.conv1", "layer1"]) as cap:
            resnet(images)
        manual = resnet.layer2[0].conv1(cap["layer1"])
    assert torch.equal(cap["layer2.0.conv1"], fx["x"])
    assert torch.equal(cap["layer2.0.conv1"], manual)


def test_reused_module_keeps_every_call(resnet: nn.Module, images: torch.Tensor) -> None:
    block = resnet.layer1[0]
    with torch.no_grad():
        with capture(resnet, ["layer1.0.relu", "maxpool", "layer1.0"]) as cap:
            resnet(images)
        first = torch.relu(block.bn1(block.conv1(cap["maxpool"])))
    calls = cap.calls("layer1.0.relu")
    assert len(calls) == 2  # BasicBlock calls self.relu twice
    assert torch.equal(calls[0], first)
    assert torch.equal(calls[1], cap["layer1.0"])  # the second relu is the block's output
    assert cap["layer1.0.relu"] is calls[-1]


def test_value_is_taken_before_later_in_place_ops(resnet: nn.Module, images: torch.Tensor) -> None:
    # layer1.0.bn2's output is modified by `out += identity` and an in-place ReLU right after
    block = resnet.layer1[0]
    with torch.no_grad():
        with capture(resnet, ["layer1.0.bn2", "maxpool"], to="cpu") as cap:
            resnet(images)
        ref = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(cap["maxpool"])))))
    assert torch.equal(cap["layer1.0.bn2"], ref)
    assert (cap["layer1.0.bn2"] < 0).any()  # not the post-ReLU value


def test_dict_outputs_keep_structure_detached() -> None:
    torch.manual_seed(0)
    net = DictNet()
    x = torch.randn(5, 4)
    with capture(net, "enc", gradients=True) as cap:
        net(x).backward()
    out = cap["enc"]
    assert set(out) == {"h", "pair", "n"} and out["n"] == 3 and out["pair"][1] is None
    h_ref = net.enc.lin(x)
    assert torch.equal(out["h"], h_ref.detach()) and torch.equal(out["pair"][0], (h_ref * 2).detach())
    assert not out["h"].requires_grad and out["h"].grad_fn is None
    g = cap.gradients["enc"]
    # loss = sum(h) + sum(p**2), p = 2h: dL/dp = 2p = 4h; dL/dh (total, through p too) = 1 + 8h
    h = h_ref.detach()
    assert torch.allclose(g["pair"][0], 4 * h, atol=1e-6)
    assert torch.allclose(g["h"], 1 + 8 * h, atol=1e-6)
    assert g["pair"][1] is None and g["n"] == 3


def test_skip_connections_and_control_flow_where_tracing_fails() -> None:
    torch.manual_seed(0)
    net = SkipNet()
    x = torch.randn(4, 8)
    with pytest.raises(Exception):  # symbolic tracing cannot follow `if out.sum() > 0`
        create_feature_extractor(net, return_nodes={"block": "b"})
    with torch.no_grad():
        out, feats = extract_features(net, ["block", "block.*", "head"], x)
        ref_y, ref_h = net(x, return_hidden=True)
    assert torch.equal(out, ref_y)
    assert list(feats) == ["block", "block.0", "block.1", "block.2", "head"]
    assert torch.equal(feats["block"], ref_h) and torch.equal(feats["block.2"], ref_h)
    assert torch.equal(feats["head"], ref_y)


def test_gradients_equal_autograd_reference() -> None:
    torch.manual_seed(0)
    net = SkipNet()
    x = torch.randn(4, 8)
    y, h = net(x, return_hidden=True)
    (ref,) = torch.autograd.grad(y.pow(2).sum(), h)
    with capture(net, ["block", "stem"], gradients=True) as cap:
        net(x).pow(2).sum().backward()
    assert torch.allclose(cap.gradients["block"], ref, rtol=1e-6, atol=1e-7)
    assert cap.gradients["stem"].shape == cap["stem"].shape
    assert len(cap.gradients.calls("block")) == len(cap.calls("block")) == 1


def test_gradients_with_in_place_ops_after_module(resnet: nn.Module, images: torch.Tensor) -> None:
    # a full backward hook on layer1.0.bn2 raises "BackwardHookFunction is a view and is being modified
    # inplace"; the tensor hook does not, and changes nothing in the backward
    resnet(images).sum().backward()
    ref = [p.grad.clone() for p in resnet.parameters()]
    resnet.zero_grad(set_to_none=True)
    with capture(resnet, ["layer1.0.bn2", "layer1.0.relu", "layer4"], gradients=True) as cap:
        resnet(images).sum().backward()
    for p, r in zip(resnet.parameters(), ref):
        assert torch.equal(p.grad, r)
    assert cap.gradients["layer1.0.bn2"].shape == cap["layer1.0.bn2"].shape
    assert len(cap.gradients.calls("layer1.0.relu")) == 2
    assert all(g is not None for g in cap.gradients.calls("layer1.0.relu"))
    assert cap.gradients["layer4"].abs().sum() > 0


def test_no_grad_means_no_gradients(resnet: nn.Module, images: torch.Tensor) -> None:
    with capture(resnet, "layer4", gradients=True) as cap:
        with torch.no_grad():
            resnet(images)
    assert "layer4" in cap and "layer4" not in cap.gradients and len(cap.gradients) == 0
    assert cap.gradients.calls("layer4") == [None]
    with pytest.raises(KeyError, match="No gradient reached 'layer4'"):
        cap.gradients["layer4"]


def test_hooks_removed_on_exit_and_on_exception(resnet: nn.Module, images: torch.Tensor) -> None:
    seen = []
    user = resnet.layer2.register_forward_hook(lambda m, i, o: seen.append(1))
    before = hook_snapshot(resnet)
    with capture(resnet, ["layer2", "**.conv1", "type:BatchNorm2d"], gradients=True) as cap:
        resnet(images).sum().backward()
    assert hook_snapshot(resnet) == before
    with pytest.raises(ZeroDivisionError):
        with capture(resnet, ["layer2", "re:^layer3\\.0"], gradients=True):
            resnet(images)
            1 / 0
    assert hook_snapshot(resnet) == before
    assert len(seen) == 2  # the user's hook stayed and kept firing
    user.remove()
    n = len(cap.calls("layer2"))
    resnet(images)  # after exit nothing is recorded
    assert len(cap.calls("layer2")) == n == 1


def test_model_not_changed(resnet: nn.Module, images: torch.Tensor) -> None:
    resnet.train()
    state = {k: v.clone() for k, v in resnet.state_dict().items()}
    attrs = {n: set(vars(m)) for n, m in resnet.named_modules()}
    with torch.no_grad(), capture(resnet, "layer1") as cap:
        out_in_block = resnet(images)
    assert all(m.training for m in resnet.modules())
    assert {n: set(vars(m)) for n, m in resnet.named_modules()} == attrs
    resnet.load_state_dict(state)
    resnet.eval()
    with torch.no_grad(), capture(resnet, "layer1") as cap:
        resnet(images)
    assert not any(m.training for m in resnet.modules())
    assert out_in_block.shape == (2, 1000) and cap["layer1"].shape == (2, 64, 16, 16)


def test_several_forwards_accumulate_and_clear(resnet: nn.Module, images: torch.Tensor) -> None:
    with torch.no_grad(), capture(resnet, "layer3") as cap:
        resnet(images)
        resnet(images[:1])
        assert [c.shape[0] for c in cap.calls("layer3")] == [2, 1]
        cap.clear()
        assert "layer3" not in cap and len(cap) == 0
    with pytest.raises(KeyError, match="was not called"):
        cap["layer3"]


def test_unknown_path_raises_with_closest_matches(resnet: nn.Module) -> None:
    with pytest.raises(ProbeSelectionError, match="layer2.0.conv1"):
        capture(resnet, "layer2.0.conv")
    before = hook_snapshot(resnet)
    with pytest.raises(ProbeSelectionError):
        with capture(resnet, ["layer1", "nope"]):
            pass
    assert hook_snapshot(resnet) == before


def test_detach_false_keeps_graph() -> None:
    torch.manual_seed(0)
    net = SkipNet()
    x = torch.randn(4, 8)
    with capture(net, "block", detach=False) as cap:
        y = net(x)
    (g,) = torch.autograd.grad(y.sum(), cap["block"])
    assert g.shape == (4, 16)
