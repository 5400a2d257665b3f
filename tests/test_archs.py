"""Architectures of the zoo: every registered one takes [0, 1] inputs (normalisation inside),
returns finite logits N x K and has input gradients."""

from __future__ import annotations

import pytest
import torch

from unmask.bench.core import Normalize
from unmask.bench.core.training import seeded_init
from unmask.bench.zoo import archs

# Small settings for the big networks keep the forward passes cheap on the CPU.
CASES = {
    "small-cnn": ({}, (1, 28, 28)),
    "mlp": ({"in_features": 64, "hidden": 16}, (1, 8, 8)),
    "preact-resnet18": ({"width": 8}, (3, 32, 32)),
    "wide-resnet-28-10": ({"depth": 10, "widen_factor": 1}, (3, 32, 32)),
}


def test_every_registered_architecture_has_a_case():
    assert set(archs.ARCHS.names()) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_backward(name):
    kwargs, shape = CASES[name]
    with seeded_init(0):
        model = archs.build(name, num_classes=7, **kwargs).eval()
    assert any(isinstance(m, Normalize) for m in model.modules())
    x = torch.rand(2, *shape, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 7) and bool(torch.isfinite(out).all())
    out.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0


def test_default_sizes():
    with seeded_init(0):
        wrn = archs.build("wide-resnet-28-10")
        resnet = archs.build("preact-resnet18")
    n_wrn = sum(p.numel() for p in wrn.parameters())
    n_resnet = sum(p.numel() for p in resnet.parameters())
    assert 36.0e6 < n_wrn < 37.0e6  # WRN-28-10: 36.5M parameters
    assert 11.0e6 < n_resnet < 11.3e6  # PreAct ResNet-18: 11.2M parameters


def test_wide_resnet_depth_is_validated():
    with pytest.raises(ValueError, match="6n \\+ 4"):
        archs.WideResNet(depth=27)


def test_unknown_architecture_names_the_known_ones():
    with pytest.raises(ValueError) as err:
        archs.build("resnet-9000")
    assert "small-cnn" in str(err.value) and "tv:NAME" in str(err.value)
    with pytest.raises(ValueError, match="unknown torchvision model"):
        archs.build("tv:no_such_net")


def test_torchvision_model_from_a_local_state_dict(tmp_path):
    with seeded_init(0):
        reference = archs.build("tv:mobilenet_v3_small", num_classes=5).eval()
    path = tmp_path / "mnv3.pt"
    torch.save(reference[1].state_dict(), path)
    with seeded_init(1):
        loaded = archs.build("tv:mobilenet_v3_small", num_classes=5, weights_path=path).eval()
    assert isinstance(loaded[0], Normalize)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))
