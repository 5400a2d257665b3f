"""Golden agreement: unmask's APGD-CE and APGD-T end within 1 point of the official
AutoAttack implementation (Croce and Hein, ``pyautoattack``) at the same budget."""

import pytest
import torch

from unmask.attacks.apgd import APGD, APGDT
from unmask.bench import Threat

pyautoattack = pytest.importorskip(
    "pyautoattack.autopgd_base",
    reason="pyautoattack (the official AutoAttack) is not installed: pip install -e .[dev]")

EPS, N, STEPS = 0.1, 200, 20


def _robust(model, x_adv, x, y):
    """The one shared judge: inside the eps ball and [0,1], misclassified in fp32."""
    ok = ((x_adv - x).abs().flatten(1).amax(1) <= EPS + 1e-6) & (x_adv.min() >= 0) & (x_adv.max() <= 1)
    with torch.no_grad():
        correct = model(x_adv.float()).argmax(1) == y
    return float((correct | ~ok).float().mean())


@pytest.mark.parametrize("kind", ["ce", "t"])
def test_apgd_matches_official(kind, digits_mlp, digits_test):
    x, y = digits_test[0][:N], digits_test[1][:N]
    model = digits_mlp.eval()
    threat = Threat("linf", EPS)
    if kind == "ce":
        ours = APGD(threat, steps=STEPS, loss="ce")(model, x, y, generator=0).x_adv
        official = pyautoattack.APGDAttack(model, n_iter=STEPS, eps=EPS, loss="ce", seed=0,
                                           device="cpu").perturb(x, y)
    else:
        ours = APGDT(threat, steps=STEPS, n_targets=3)(model, x, y, generator=0).x_adv
        att = pyautoattack.APGDAttack_targeted(model, n_iter=STEPS, eps=EPS, seed=0,
                                               n_target_classes=3, device="cpu")
        official = att.perturb(x, y)
    ra_ours, ra_official = _robust(model, ours, x, y), _robust(model, official, x, y)
    assert ra_ours <= ra_official + 0.01, (ra_ours, ra_official)
    assert abs(ra_ours - ra_official) <= 0.01, (ra_ours, ra_official)
