"""Attack comparisons and sanity checks: a weaker attack (one step, black box, transfer, random
noise) must not break what PGD could not; an unbounded attack must reach every sample; success
must not fall as eps grows. Each breaks samples of its own, recorded on the context so that
the row's robust accuracy counts them (the per-sample worst case)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ...attacks import FGSM, PGD, Square, Transfer
from ...bench.core import Norm, Threat, margin, model_mode, uniform
from .registry import Context, Outcome, check
from .report import MaskingKind, Verdict
from .stats import BEATS_ALPHA, exceeds_share

# Heuristic attack comparisons flag a defense when the weaker attack breaks significantly more
# than this share of the attacked samples that the stronger one left standing (AutoAttack's
# checks flag any such sample; a 1% floor absorbs single samples at the decision boundary, and
# the binomial test of .stats keeps one or two samples from firing it).
BEATS_SHARE = 0.01
# An attack with eps large enough to reach any image (Linf 1, L2 sqrt(d)) must succeed on
# essentially every sample (Carlini et al. 2019, Sec. 5.2); we allow 1% for budget limits.
UNBOUNDED_SUCCESS = 0.99
# Success may not fall by more than this when eps grows (binomial noise on the sample sizes
# used here is ~2 points).
MONOTONE_SLACK = 0.02
# The eps multiples the monotonicity check attacks at.
EPS_FACTORS = (0.25, 0.5, 1.0, 2.0)


def comparison(count: int, of: int, share: float, what: str, evidence: dict[str, Any],
               value: float) -> Outcome:
    """Fails when ``count`` of ``of`` samples (``what``) is significantly above ``share``
    (:func:`~.stats.exceeds_share`); the test's numbers join the evidence."""
    fires, p = exceeds_share(count, of, share)
    return Outcome(value, not fires, {**evidence, "count": count, "of": of, "p_value": p},
                   rule=f"{what} significantly > {share} (p < {BEATS_ALPHA})")


_RULE = f"share broken by it but not PGD significantly > {BEATS_SHARE} (p < {BEATS_ALPHA})"


@check("one-step beats iterative", family="attacks", kind=MaskingKind.SHATTERED,
       severity=Verdict.SUSPICIOUS, source="Carlini et al. 2019 (Sec. 5.2); AutoAttack checks.py",
       rule=_RULE, thresholds=("BEATS_SHARE",),
       evidence=("samples", "count", "of", "p_value", "fgsm_success", "pgd_success"),
       cost="FGSM: one forward and backward pass per attacked sample, plus the shared PGD")
def one_step(ctx: Context) -> Outcome:
    """Check "one-step beats iterative": FGSM on the attacked samples must not break
    significantly more of them than PGD left standing (a one-step attack beating the iterative
    one means the loss surface is shattered). Records FGSM's breaks on the context.
    """
    r_fgsm = ctx.adapt(FGSM(ctx.threat))(ctx.view, ctx.xc, ctx.yc, generator=ctx.g)
    ctx.record("fgsm", r_fgsm.success)
    only = r_fgsm.success & ~ctx.pgd_broken
    return comparison(int(only.sum()), ctx.n_att, BEATS_SHARE,
                      "share broken by FGSM but not PGD",
                      {"samples": ctx.idx[only][:20], "fgsm_success": r_fgsm.success_rate,
                       "pgd_success": ctx.pgd.success_rate}, float(only.float().mean()))


@check("black-box beats white-box", family="attacks", kind=MaskingKind.SHATTERED,
       severity=Verdict.SUSPICIOUS,
       source="Athalye et al. 2018; AutoAttack checks.py (Square vs white-box)",
       rule=_RULE, thresholds=("BEATS_SHARE",),
       evidence=("samples", "count", "of", "p_value", "square_attacked"),
       cost="Square: up to `queries` forward passes on up to `square_samples` PGD survivors")
def black_box(ctx: Context) -> Outcome:
    """Check "black-box beats white-box": Square on a subsample of PGD's survivors must not break
    significantly more than :data:`BEATS_SHARE` of the attacked samples (gradient-free search
    beating gradients means the gradients are useless). Records Square's breaks.
    """
    rob = ctx.survivors
    q, steps = ctx.budget.queries, ctx.steps
    what = f"share of the Square-{q} subsample broken by Square but not PGD-{steps}"
    if not rob.numel():
        return comparison(0, 0, BEATS_SHARE, what, {"samples": [], "square_attacked": 0}, 0.0)
    # Square is the expensive check; a fixed-size subsample of the survivors estimates the
    # share as well as all of them would, within binomial noise.
    sub = rob[: ctx.budget.square_samples]
    r_sq = Square(ctx.threat, queries=q)(ctx.model, ctx.xc[sub], ctx.yc[sub], generator=ctx.g)
    broken = torch.zeros_like(ctx.pgd_broken)
    broken[sub] = r_sq.success
    ctx.record("square", broken)
    # Tested on the subsample Square ran on: BEATS_SHARE of all attacked samples is this
    # share of the PGD survivors.
    share = float(r_sq.success.float().mean()) * rob.numel() / ctx.n_att
    return comparison(int(r_sq.success.sum()), int(sub.numel()),
                      BEATS_SHARE * ctx.n_att / rob.numel(), what,
                      {"samples": ctx.idx[broken][:20], "square_attacked": int(sub.numel())},
                      share)


@check("transfer beats white-box", family="attacks", kind=MaskingKind.SHATTERED,
       severity=Verdict.SUSPICIOUS, source="Papernot et al. 2017; Athalye et al. 2018",
       rule=_RULE, thresholds=("BEATS_SHARE",),
       evidence=("samples", "count", "of", "p_value"),
       cost="PGD on the surrogate, one forward pass of the model per PGD survivor")
def transfer(ctx: Context) -> Outcome:
    """Check "transfer beats white-box": PGD examples crafted on the surrogate model must not
    break significantly more of PGD's survivors than :data:`BEATS_SHARE`; skipped without a
    surrogate. Records the transferred breaks.
    """
    if ctx.surrogate is None:
        return Outcome(None, True, skipped="no surrogate model given")
    rob = ctx.survivors
    broken = torch.zeros_like(ctx.pgd_broken)
    if rob.numel():
        r_tr = Transfer(PGD(ctx.threat, steps=ctx.steps), surrogate=ctx.surrogate)(
            ctx.model, ctx.xc[rob], ctx.yc[rob], generator=ctx.g)
        broken[rob] = r_tr.success
    ctx.record("transfer", broken)
    return comparison(int(broken.sum()), ctx.n_att, BEATS_SHARE,
                      "share broken by transfer but not PGD", {"samples": ctx.idx[broken][:20]},
                      float(broken.float().mean()))


@check("unbounded attack", family="attacks", kind=MaskingKind.SHATTERED,
       severity=Verdict.MASKED, source="Carlini et al. 2019 (Sec. 5.2: unbounded attacks must "
       "reach 100%)", rule=f"success at eps=1 (Linf) or sqrt(d) (L2) < {UNBOUNDED_SUCCESS}",
       thresholds=("UNBOUNDED_SUCCESS",), evidence=("eps", "attacked"),
       cost="PGD-`steps` (margin loss) on the PGD survivors")
def unbounded(ctx: Context) -> Outcome:
    """Check "unbounded attack": PGD (margin loss) with eps large enough to reach any image (1
    for Linf, sqrt(d) for L2) must succeed on at least :data:`UNBOUNDED_SUCCESS` of the attacked
    samples; anything less means the attack cannot follow the gradient.
    """
    t = ctx.threat
    big = Threat(t.norm, 1.0 if t.norm is Norm.LINF else math.sqrt(ctx.xc[0].numel()))
    rob = ctx.survivors
    rule = f"success at eps={big.eps:g} < {UNBOUNDED_SUCCESS}"
    if not rob.numel():
        return Outcome(1.0, True, {"eps": big.eps, "attacked": 0}, rule=rule)
    r = ctx.adapt(PGD(big, steps=ctx.steps, loss="margin"))(
        ctx.view, ctx.xc[rob], ctx.yc[rob], generator=ctx.g)
    success = float((r.success.sum() + (ctx.n_att - rob.numel())) / ctx.n_att)
    return Outcome(success, success >= UNBOUNDED_SUCCESS,
                   {"eps": big.eps, "attacked": int(rob.numel())}, rule=rule)


@check("monotone in eps", family="attacks", kind=MaskingKind.SHATTERED,
       severity=Verdict.SUSPICIOUS, source="Carlini et al. 2019 (Sec. 5.2)",
       rule=f"success falls by > {MONOTONE_SLACK} as eps grows",
       thresholds=("MONOTONE_SLACK",), evidence=("eps_factors", "success"),
       cost="four PGD-`steps` runs on up to `monotone_samples` attacked samples")
def monotone(ctx: Context) -> Outcome:
    """Check "monotone in eps": PGD's success at 0.25, 0.5, 1 and 2 times eps must not fall by
    more than :data:`MONOTONE_SLACK` as eps grows (on up to ``monotone_samples`` samples).
    """
    sub = torch.arange(min(ctx.n_att, ctx.budget.monotone_samples), device=ctx.x.device)
    rates = []
    for factor in EPS_FACTORS:
        t = ctx.threat.scaled(factor)
        rates.append(ctx.adapt(PGD(t, steps=ctx.steps))(ctx.view, ctx.xc[sub], ctx.yc[sub],
                                                         generator=ctx.g).success_rate)
    worst = max(rates[i] - rates[i + 1] for i in range(len(rates) - 1))
    return Outcome(worst, worst <= MONOTONE_SLACK,
                   {"eps_factors": list(EPS_FACTORS), "success": rates})


@check("noise beats attack", family="attacks", kind=MaskingKind.SHATTERED,
       severity=Verdict.SUSPICIOUS,
       source="Carlini et al. 2019 (Sec. 5.2: brute-force random search)",
       rule=_RULE, thresholds=("BEATS_SHARE",), evidence=("samples", "count", "of", "p_value"),
       cost="`noise_draws` forward passes per PGD survivor")
def noise(ctx: Context) -> Outcome:
    """Check "noise beats attack": ``noise_draws`` random points of the ball (corners for Linf)
    must not break significantly more of PGD's survivors than :data:`BEATS_SHARE`. Records the
    breaks found.
    """
    rob = ctx.survivors
    draws = ctx.budget.noise_draws
    broken = torch.zeros_like(ctx.pgd_broken)
    if rob.numel():
        xr, yr = ctx.xc[rob], ctx.yc[rob]
        found = torch.zeros(rob.numel(), dtype=torch.bool, device=ctx.x.device)
        with model_mode(ctx.model), torch.no_grad():
            for _ in range(draws):
                if ctx.threat.norm is Norm.LINF:
                    corner = torch.where(uniform(xr.shape, ctx.g, xr.device) < 0.5, -1.0, 1.0)
                    cand = ctx.threat.project(xr + ctx.threat.eps * corner, xr)
                else:
                    cand = ctx.threat.random_point(xr, ctx.g)
                found |= ~(margin(ctx.model(cand), yr) >= 0)  # NaN counts as broken
        broken[rob] = found
    ctx.record("noise", broken)
    return comparison(int(broken.sum()), ctx.n_att, BEATS_SHARE,
                      f"share found by {draws} random draws but not PGD",
                      {"samples": ctx.idx[broken][:20]}, float(broken.float().mean()))
