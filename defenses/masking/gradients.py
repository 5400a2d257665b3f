"""Checks on the input gradient at the clean samples: a cut graph, exactly-zero gradients, a
saturated softmax, and loss changes the gradient does not predict."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...bench.core import model_mode
from .registry import Context, Outcome, check
from .report import MaskingKind, Verdict

# Exactly-zero input gradients never happen for a differentiable classifier on natural
# inputs except by masking; a few samples can sit on flat ReLU regions, 10% cannot.
ZERO_GRAD_SHARE = 0.10
# ||grad CE|| / ||grad margin|| ~ 1 - p_y for a confident prediction. Below 1e-6 the true-class
# probability is 1 to within a few float32 ulps, so the CE gradient is rounding noise.
SATURATION_RATIO = 1e-6
# Share of the loss change under a tiny perturbation that the gradient fails to predict
# (|dL - g.d| / (|dL| + |g.d|)): ~0 for a smooth model, 1 when the gradient says nothing.
UNPREDICTED_CHANGE = 0.5
# A perturbation of 1% of eps is "tiny": well inside the region where a ReLU network is linear.
TINY_FRACTION = 0.01

_GRAD_COST = "one forward and two backward passes per attacked sample, shared by the gradient checks"


@check("broken graph", family="gradients", kind=MaskingKind.SHATTERED, severity=Verdict.MASKED,
       source="Athalye et al. 2018 (shattered gradients)", rule="no input gradient -> fail",
       cost=_GRAD_COST)
def broken_graph(ctx: Context) -> Outcome:
    """Check "broken graph": the loss must have an input gradient at all (a detached or
    non-differentiable forward fails).
    """
    broken = ctx.grads[2]
    return Outcome(float(broken), not broken)


@check("zero gradients", family="gradients", kind=MaskingKind.SHATTERED,
       severity=Verdict.MASKED, source="Athalye et al. 2018; AutoAttack checks.py",
       rule=f"share of samples with grad CE == 0 > {ZERO_GRAD_SHARE}",
       thresholds=("ZERO_GRAD_SHARE",), evidence=("zero_samples",), cost=_GRAD_COST)
def zero_gradients(ctx: Context) -> Outcome:
    """Check "zero gradients": at most :data:`ZERO_GRAD_SHARE` of the attacked samples may have
    an exactly-zero cross-entropy input gradient.
    """
    zero = ctx.grads[0].flatten(1).norm(dim=1) == 0
    share = float(zero.float().mean())
    return Outcome(share, share <= ZERO_GRAD_SHARE, {"zero_samples": ctx.idx[zero][:20]})


@check("saturation ratio", family="gradients", kind=MaskingKind.VANISHING,
       severity=Verdict.MASKED,
       source="Carlini & Wagner 2017 (logit margin loss); Croce & Hein 2020 (DLR)",
       rule=f"median ||grad CE|| / ||grad margin|| < {SATURATION_RATIO:g} -> fail",
       thresholds=("SATURATION_RATIO",), evidence=("margin_grad_zero_share",), cost=_GRAD_COST)
def saturation_ratio(ctx: Context) -> Outcome:
    """Check "saturation ratio": the median ratio ||grad CE|| / ||grad margin|| must not fall
    below :data:`SATURATION_RATIO` (a saturated softmax leaves the CE gradient as rounding noise
    while the logit margin still has a slope).
    """
    g_ce, g_m, _ = ctx.grads
    ce_norm, m_norm = g_ce.flatten(1).norm(dim=1), g_m.flatten(1).norm(dim=1)
    ratio = ce_norm / m_norm.clamp_min(1e-30)
    has_slope = m_norm > 0
    med = float(ratio[has_slope].median()) if has_slope.any() else float("nan")
    saturated = bool(has_slope.any()) and med < SATURATION_RATIO
    return Outcome(med, not saturated,
                   {"margin_grad_zero_share": float((~has_slope).float().mean())})


@check("unstable loss", family="gradients", kind=MaskingKind.SHATTERED,
       # Suspicious, not masked, on its own: curvature also leaves most of the change
       # unpredicted where the gradient is small, as on adversarially trained models
       # (TRADES on mnist5k measured 0.51). The mechanism checks carry "masked".
       severity=Verdict.SUSPICIOUS, source="Athalye et al. 2018; Carlini et al. 2019 (Sec. 5)",
       rule=f"median unpredicted share of the loss change at {TINY_FRACTION:g} eps > "
            f"{UNPREDICTED_CHANGE}",
       thresholds=("UNPREDICTED_CHANGE", "TINY_FRACTION"), evidence=("samples_changed",),
       cost="two forward passes per attacked sample, plus the shared gradient")
def unstable_loss(ctx: Context) -> Outcome:
    """Check "unstable loss": under a random perturbation of :data:`TINY_FRACTION` eps, the
    median share of the CE loss change that the first-order prediction ``grad . delta`` misses
    must not exceed :data:`UNPREDICTED_CHANGE`.
    """
    g_ce, _, broken = ctx.grads
    xc, yc = ctx.xc, ctx.yc
    with model_mode(ctx.model), torch.no_grad():
        ce0 = F.cross_entropy(ctx.model(xc), yc, reduction="none")
        delta = (ctx.threat.random_point(xc, ctx.g) - xc) * TINY_FRACTION
        ce1 = F.cross_entropy(ctx.model((xc + delta).clamp(0, 1)), yc, reduction="none")
    actual = ce1 - ce0
    predicted = (g_ce * delta).flatten(1).sum(1) if not broken else torch.zeros_like(actual)
    changed = (actual.abs() + predicted.abs()) > 1e-7
    unpredicted = (actual - predicted).abs() / (actual.abs() + predicted.abs() + 1e-12)
    share = float(unpredicted[changed].median()) if changed.any() else 0.0
    return Outcome(share, share <= UNPREDICTED_CHANGE, {"samples_changed": int(changed.sum())})
