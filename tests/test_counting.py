"""The attacks' own per-sample cost accounting equals the passes the model actually served."""

import pytest
import torch
from torch import nn

from unmask.attacks.apgd import APGD, APGDT
from unmask.attacks.fgsm import FGSM
from unmask.attacks.pgd import PGD
from unmask.attacks.square import Square
from unmask.bench import Threat
from unmask.bench.core.counting import CountingModel


def _tiny():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x = torch.rand(12, 1, 4, 4, generator=g)
    y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 4  # a few clean-misclassified samples
    return model.eval(), x, y


ATTACKS = {
    "pgd": lambda t: PGD(t, steps=7),
    "fgsm": lambda t: FGSM(t),
    "apgd": lambda t: APGD(t, steps=12),
    "apgd-t": lambda t: APGDT(t, steps=8, n_targets=3),
    "square": lambda t: Square(t, queries=40),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_cost_is_exact(name):
    model, x, y = _tiny()
    counted = CountingModel(model)
    result = ATTACKS[name](Threat("linf", 0.2))(counted, x, y, generator=0)
    assert counted.forwards == int(result.forwards.sum())
    assert counted.backwards == int(result.backwards.sum())
    assert counted.forwards > x.shape[0]


def test_counting_model_rejects_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        CountingModel(lambda x: x)


def test_ensemble_cost_is_exact_up_to_its_own_two_clean_passes():
    """The cascade's per-attack costs are exact; the ensemble's own clean pass and its
    stochasticity check (one forward of every sample each) are not in ``costs``."""
    from unmask.attacks.ensemble import Ensemble

    model, x, y = _tiny()
    counted = CountingModel(model)
    threat = Threat("linf", 0.05)
    ens = Ensemble([APGD(threat, steps=12), APGDT(threat, steps=8, n_targets=3),
                    Square(threat, queries=40)])
    res = ens(counted, x, y, generator=0)
    assert counted.forwards == sum(c.forwards for c in res.costs.values()) + 2 * x.shape[0]
    assert counted.backwards == sum(c.backwards for c in res.costs.values())
