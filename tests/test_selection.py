"""Probe path grammar and the errors people see (selection.py)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lit_probe import ProbeConfigError, ProbeSelectionError, list_probe_points
from lit_probe.selection import canonical_name, resolve, validate_patterns


@pytest.fixture(scope="module")
def resnet():
    return torchvision.models.resnet18(weights=None, num_classes=4)


def names(model, patterns):
    return [n for n, _ in resolve(model, patterns)]


def test_exact_paths_and_registration_order(resnet):
    assert names(resnet, ["layer2.0.conv1", "layer1"]) == ["layer1", "layer2.0.conv1"]


def test_glob_is_whole_segment(resnet):
    assert names(resnet, ["layer3.*"]) == ["layer3.0", "layer3.1"]  # direct children only
    assert names(resnet, ["layer?.*"]) == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    deep = names(resnet, ["**.conv1"])
    assert "conv1" in deep and "layer4.1.conv1" in deep and all(n.endswith("conv1") for n in deep)
    assert names(resnet, ["layer4.**"])[0] == "layer4.0" and "layer4" not in names(resnet, ["layer4.**"])
    assert names(resnet, ["layer1.**.conv1"]) == ["layer1.0.conv1", "layer1.1.conv1"]
    assert names(resnet, ["layer1.*.bn?"]) == ["layer1.0.bn1", "layer1.0.bn2", "layer1.1.bn1", "layer1.1.bn2"]


def test_type_and_regex(resnet):
    relus = names(resnet, ["type:ReLU"])
    assert relus[0] == "relu" and len(relus) == 9
    assert names(resnet, ["type:torch.nn.modules.linear.Linear"]) == ["fc"]
    assert names(resnet, [r"re:^layer4\.\d$"]) == ["layer4.0", "layer4.1"]


def test_union_is_deduplicated(resnet):
    got = names(resnet, ["layer1", "layer1", "re:^layer1$", "type:Linear", "fc"])
    assert got == ["layer1", "fc"]


def test_unknown_path_names_closest(resnet):
    with pytest.raises(ProbeSelectionError, match=r"'layer2\.0\.conv1'") as err:
        resolve(resnet, ["layer2.0.cnv1"])
    assert isinstance(err.value, ValueError)
    assert "Top-level modules" in str(err.value)


def test_glob_and_type_that_match_nothing(resnet):
    with pytest.raises(ProbeSelectionError, match="matches no module.*Closest real paths: 'layer3"):
        resolve(resnet, ["layer33.*"])
    with pytest.raises(ProbeSelectionError, match="type:Conv2d"):
        resolve(resnet, ["type:Conv2"])


@pytest.mark.parametrize("bad", ["", "  ", "re:(", "type:", "layer1.", ".layer1", "a..b", 3])
def test_bad_patterns_fail_without_a_model(bad):
    with pytest.raises(ProbeConfigError):
        validate_patterns([bad])


def test_wrapper_segments_are_removed():
    assert canonical_name("net._orig_mod.layer1") == "net.layer1"
    assert canonical_name("a._checkpoint_wrapped_module.b") == "a.b"
    inner = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    outer = nn.Module()
    outer.net = torch.compile(inner, backend="eager")
    got = resolve(outer, ["net", "net.0"])
    assert [n for n, _ in got] == ["net", "net.0"]
    assert got[0][1] is inner  # the module whose forward runs, not the wrapper


def test_list_probe_points(resnet):
    pts = list_probe_points(resnet, max_depth=1)
    assert ("layer1", "Sequential") in pts and ("fc", "Linear") in pts
    assert all("." not in p for p, _ in pts)
