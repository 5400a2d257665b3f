"""Soundness and tightness of the certified bounds (IBP <= CROWN <= MILP <= attack)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unmask.bench.core import Normalize, Threat
from unmask.defenses.certified import (
    NotSupportedError,
    SoundnessError,
    assert_sound,
    certify,
    margin_lower_bound,
)
from unmask.defenses.certified.bounds import margin_spec


def _mlp(seed: int, hidden: int = 12, n_in: int = 6, k: int = 3) -> nn.Module:
    torch.manual_seed(seed)  # noqa: test-only weight init, tests are seeded
    return nn.Sequential(Normalize((0.5,), (0.5,)), nn.Flatten(), nn.Linear(n_in, hidden),
                         nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, k)).eval()


def _cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(3)
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 1.5)
    return nn.Sequential(Normalize((0.3,), (0.4,)), nn.Conv2d(1, 3, 3, padding=1), bn, nn.ReLU(),
                         nn.AvgPool2d(2), nn.Sequential(nn.Flatten(), nn.Linear(3 * 3 * 3, 8)),
                         nn.ReLU(), nn.Linear(8, 4)).eval()


def _data(shape, n=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n,) + shape, generator=g), torch.randint(0, k, (n,), generator=g)


def _sampled_margin_min(model, x, y, threat, n_points=4000, seed=1):
    """Min over random points in the ball (and its corners for Linf) of each margin."""
    g = torch.Generator().manual_seed(seed)
    mins = []
    for i in range(x.shape[0]):
        if threat.norm.value == "linf":
            d = (torch.rand((n_points,) + x.shape[1:], generator=g) * 2 - 1) * threat.eps
            d[: n_points // 2] = d[: n_points // 2].sign() * threat.eps
        else:
            d = torch.randn((n_points,) + x.shape[1:], generator=g)
            d = d / d.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
            r = torch.rand(n_points, generator=g).view(-1, *[1] * (x.dim() - 1)) ** (1 / x[0].numel())
            d = d * r * threat.eps
        pts = (x[i : i + 1] + d).clamp(0, 1)
        z = model(pts)
        spec = margin_spec(y[i : i + 1].expand(n_points), z.shape[1])
        mins.append((spec @ z.unsqueeze(-1)).squeeze(-1).min(0).values)
    return torch.stack(mins)


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("linf", 0.2), ("l2", 0.3)])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_bounds_contain_sampled_outputs_and_ibp_below_crown(kind, norm, eps):
    model = _mlp(0) if kind == "mlp" else _cnn(0)
    shape = (1, 2, 3) if kind == "mlp" else (1, 6, 6)
    k = 3 if kind == "mlp" else 4
    x, y = _data(shape, k=k)
    threat = Threat(norm, eps)
    with torch.no_grad():
        sampled = _sampled_margin_min(model, x, y, threat)
    ibp = margin_lower_bound(model, x, y, threat, method="ibp")
    crown = margin_lower_bound(model, x, y, threat, method="crown")
    assert (crown <= sampled + 1e-5).all(), (crown - sampled).max()
    assert (ibp <= sampled + 1e-5).all()
    assert (ibp <= crown + 1e-5).all()
    assert (crown > ibp + 1e-4).any()  # CROWN is strictly tighter somewhere


def test_crown_is_exact_on_a_single_linear_layer():
    torch.manual_seed(3)
    lin = nn.Linear(8, 4)
    model = nn.Sequential(nn.Flatten(), lin).eval()
    g = torch.Generator().manual_seed(0)
    x = 0.3 + 0.4 * torch.rand(5, 1, 2, 4, generator=g)  # ball stays inside [0, 1]
    y = torch.tensor([0, 1, 2, 3, 0])
    eps = 0.1
    got = margin_lower_bound(model, x, y, Threat("linf", eps), method="crown")
    with torch.no_grad():
        z = model(x)
    w = lin.weight.detach()
    for i in range(5):
        others = [j for j in range(4) if j != int(y[i])]
        for c, j in enumerate(others):
            dw = w[int(y[i])] - w[j]
            exact = z[i, int(y[i])] - z[i, j] - eps * dw.abs().sum()
            assert abs(float(got[i, c]) - float(exact)) < 1e-5
    # L2: margin - eps * ||w_y - w_j||_2
    got2 = margin_lower_bound(model, x, y, Threat("l2", eps), method="crown")
    dw = w[int(y[0])] - w[1]
    assert abs(float(got2[0, 0]) - float(z[0, 0] - z[0, 1] - eps * dw.norm())) < 1e-5


def test_milp_is_between_crown_and_attack_and_counterexamples_are_real():
    model = _mlp(1, hidden=8)
    x, y = _data((1, 2, 3), n=8, seed=2)
    with torch.no_grad():
        y = model(x).argmax(1)  # all clean-correct
    threat = Threat("linf", 0.15)
    crown = margin_lower_bound(model, x, y, threat, method="crown").min(1).values
    with torch.no_grad():
        sampled = _sampled_margin_min(model, x, y, threat).min(1).values
    res = certify(model, x, y, threat, method="milp", time_limit=20)
    assert "unknown" not in res.status
    assert {"certified", "broken"} <= set(res.status) or len(set(res.status)) == 1
    for i in range(x.shape[0]):
        assert crown[i] <= res.lower[i] + 1e-5
        assert res.lower[i] <= float(sampled[i]) + 1e-4
        if res.status[i] == "broken":
            xa = torch.tensor(res.x_adv[i]).view_as(x[i])
            assert float((xa - x[i]).abs().max()) <= threat.eps + 1e-6
            assert int(model(xa.unsqueeze(0)).argmax(1)) != int(y[i])
        else:
            assert res.lower[i] > 0
    # the exact answer: every sample the sampling broke is broken, none certified
    for i in range(x.shape[0]):
        if float(sampled[i]) < 0:
            assert res.status[i] == "broken"


def test_not_supported_layer_is_named():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 2))
    x, y = _data((1, 6, 6), k=2)
    with pytest.raises(NotSupportedError, match="not supported: MaxPool2d"):
        certify(model, x, y, Threat("linf", 0.1))


def test_soundness_stop_names_the_sample():
    model = _mlp(0)
    x, y = _data((1, 2, 3))
    with torch.no_grad():
        y = model(x).argmax(1)
    res = certify(model, x, y, Threat("linf", 0.001), method="crown")
    assert all(res.certified)
    assert_sound(res, [False] * x.shape[0])
    with pytest.raises(SoundnessError, match="sample 42"):
        assert_sound(res, [False, True] + [False] * (x.shape[0] - 2), sample_ids=list(range(41, 47)))


def test_bad_method_and_milp_l2_are_rejected():
    model = _mlp(0)
    x, y = _data((1, 2, 3))
    with pytest.raises(ValueError, match="method"):
        certify(model, x, y, Threat("linf", 0.1), method="foo")
    with pytest.raises(ValueError, match="linf"):
        certify(model, x, y, Threat("l2", 0.1), method="milp")
