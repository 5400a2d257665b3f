"""BPDA through functional non-differentiable ops called inside ``forward`` (issue 16, point 10).

The models here call ``torch.round`` / ``Tensor.round`` / ``torch.sign`` directly in their
forward, with no module BPDA could hook: only the ``functional=True`` mode
(``StraightThroughMode``) sees them.
"""

import pytest
import torch
from torch import nn

from unmask.attacks import BPDA, PGD
from unmask.attacks.bpda import STRAIGHT_THROUGH_OPS, StraightThroughMode
from unmask.bench.core import Threat


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class RoundInForward(nn.Module):
    """2-bit input quantisation written as a plain ``torch.round`` call inside forward."""

    def __init__(self, model: nn.Module, levels: int = 3) -> None:
        super().__init__()
        self.model = model
        self.levels = levels

    def forward(self, x):
        return self.model(torch.round(x * self.levels) / self.levels)


class RoundMethodInForward(nn.Module):
    """Quantisation through the Tensor method ``.round()`` (not the torch function)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model((x * 3).round() / 3)


@pytest.fixture(scope="module")
def batch(mnist_test):
    x, y = mnist_test
    idx = torch.linspace(0, len(y) - 1, 48).round().long()  # the split is sorted by class
    return x[idx], y[idx]


@pytest.mark.parametrize("wrapper", [RoundInForward, RoundMethodInForward])
def test_bpda_functional_breaks_round_in_forward_where_pgd_fails(wrapper, mnist_cnn, batch):
    x, y = batch
    model = wrapper(mnist_cnn).eval()
    threat = Threat("linf", 0.3)
    # No module to hook: the module-only BPDA refuses, it does not fall back silently.
    with pytest.raises(ValueError, match="functional=True"):
        BPDA(PGD(threat, steps=10))(model, x, y, generator=_gen())
    plain = PGD(threat, steps=10)(model, x, y, generator=_gen())
    bpda = BPDA(PGD(threat, steps=10), functional=True)(model, x, y, generator=_gen())
    # Measured on these 48 images: plain PGD 0.98 (zero gradient), BPDA 0.00.
    assert plain.robust_accuracy >= 0.75, plain.robust_accuracy
    assert bpda.robust_accuracy <= 0.1, bpda.robust_accuracy
    assert bpda.config["functional"] is True and bpda.config["straight_through_calls"] > 0
    # Success is the true model's verdict, and x_adv stays in the ball and in [0, 1].
    with torch.no_grad():
        pred = model(bpda.x_adv).argmax(1)
    assert torch.equal(bpda.success, pred != y)
    assert float((bpda.x_adv - x).abs().max()) <= 0.3 + 1e-6
    assert float(bpda.x_adv.min()) >= 0.0 and float(bpda.x_adv.max()) <= 1.0


def test_mode_keeps_forward_values_and_gives_identity_gradient(mnist_cnn, batch):
    x, _ = batch
    model = RoundInForward(mnist_cnn).eval()
    xg = x.clone().requires_grad_(True)
    with torch.no_grad():
        reference = model(x)
    with StraightThroughMode() as mode:
        out = model(xg)
        (grad,) = torch.autograd.grad(out.sum(), xg)
    assert mode.calls == 1
    assert torch.equal(out.detach(), reference)  # bit for bit, not approximately
    assert bool(grad.abs().sum() > 0)
    # Without the mode the same graph has a zero gradient (the reason BPDA is needed).
    (grad0,) = torch.autograd.grad(model(xg).sum(), xg)
    assert not bool(grad0.any())
    # Identity gradient on the op itself: d round(t)/dt = 1, d sign(t)/dt = 1.
    for fn in (torch.round, torch.sign, torch.floor, torch.ceil, torch.trunc):
        t = torch.linspace(-2, 2, 9, requires_grad=True)
        with StraightThroughMode():
            y = fn(t)
        assert torch.equal(y.detach(), fn(t.detach()))
        (g,) = torch.autograd.grad(y.sum(), t)
        assert torch.equal(g, torch.ones_like(t)), fn
    assert torch.round in STRAIGHT_THROUGH_OPS and torch.Tensor.sign in STRAIGHT_THROUGH_OPS


def test_mode_leaves_no_grad_and_non_listed_ops_alone():
    t = torch.linspace(-2, 2, 9, requires_grad=True)
    with StraightThroughMode() as mode:
        with torch.no_grad():
            torch.round(t)
        (torch.relu(t) * 2).sum()
    assert mode.calls == 0
    # The mode is gone after the block: round has its true (zero) gradient again.
    (g,) = torch.autograd.grad(torch.round(t).sum(), t)
    assert not bool(g.any())


def test_bpda_functional_validates_its_flag():
    with pytest.raises(TypeError, match="functional must be a bool"):
        BPDA(PGD(Threat("linf", 0.1)), functional="yes")
