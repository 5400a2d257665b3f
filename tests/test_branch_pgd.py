"""BranchPGD: PGD through one branch, the other branches detached on the backward pass only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unmask.attacks import PGD, BranchPGD
from unmask.attacks.branch_pgd import BranchAttackResult
from unmask.bench import Threat
from unmask.bench.core.training import seeded_init


class Halves(nn.Module):
    """Two parallel branches: ``left`` sees only the left half of the image, ``right`` only
    the right half; their logits are summed."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Sequential(nn.Flatten(), nn.Linear(32, 10))
        self.right = nn.Sequential(nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        return self.left(x[..., :4]) + self.right(x[..., 4:])


def _model() -> Halves:
    with seeded_init(0):
        return Halves().eval()


def _batch(n: int = 24):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g)


def _labels(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


@pytest.mark.parametrize("threat", [Threat("linf", 0.1), Threat("l2", 1.0)], ids=str)
def test_contract(threat):
    model, x = _model(), _batch()
    y = _labels(model, x)
    attack = BranchPGD(threat, branch="left", branches=["left", "right"], steps=8)
    r1 = attack(model, x, y, generator=torch.Generator().manual_seed(1))
    r2 = attack(model, x, y, generator=torch.Generator().manual_seed(1))
    assert isinstance(r1, BranchAttackResult)
    assert bool(threat.contains(r1.x_adv, x).all())
    assert torch.equal(r1.x_adv, r2.x_adv) and torch.equal(r1.success, r2.success)
    with torch.no_grad():  # success is the full model's verdict on the returned iterate
        assert torch.equal(model(r1.x_adv).argmax(1) != y, r1.success)
    assert r1.fooled_without_branch.dtype == torch.bool and r1.fooled_without_branch.shape == y.shape
    assert r1.config["branch"] == "left" and r1.config["branches"] == ["left", "right"]
    assert attack.label == "branch-pgd[left]"
    assert all(not m._forward_hooks for m in model.modules())


def test_gradient_flows_through_the_chosen_branch_only():
    model, x = _model(), _batch()
    y = _labels(model, x)
    threat = Threat("linf", 0.2)
    r = BranchPGD(threat, branch="left", branches=["left", "right"], steps=10,
                  random_start=False)(model, x, y)
    delta = r.x_adv - x
    assert float(delta[..., 4:].abs().max()) == 0.0  # the right branch's pixels never move
    assert float(delta[..., :4].abs().max()) > 0.0
    # With `left` disabled, the model sees only the untouched right half: the perturbation
    # fools it exactly where the clean input already did.
    assert torch.equal(r.fooled_without_branch, ~r.clean_without_branch)
    # Both branches open is plain PGD.
    both = BranchPGD(threat, branch="left", branches=["left"], steps=10, random_start=False)
    plain = PGD(threat, steps=10, random_start=False)
    torch.testing.assert_close(both(model, x, y).x_adv, plain(model, x, y).x_adv, rtol=0, atol=0)


def test_bad_configuration():
    threat = Threat("linf", 0.1)
    with pytest.raises(ValueError, match="must be one of branches"):
        BranchPGD(threat, branch="top", branches=["left", "right"])
    with pytest.raises(TypeError, match="qualified module names"):
        BranchPGD(threat, branch="left", branches="left")
    model, x = _model(), _batch(4)
    with pytest.raises(ValueError, match="no sub-module named 'middle'"):
        BranchPGD(threat, branch="middle", branches=["middle"])(model, x, _labels(model, x))
