"""Checks that the attack, not the model, ran out: the loss still rising at the last step, and
more steps and restarts breaking what the reference PGD could not (Carlini et al. 2019, Sec.
5.3; Pintor et al. 2022's "non-converging attack" indicator)."""

from __future__ import annotations

import torch

from ...attacks import PGD
from ...bench.core import margin
from .comparisons import comparison
from .registry import Context, Outcome, check
from .report import MaskingKind, Verdict

# The attack loss still rising: improvement over the last quarter of the steps is more than
# this share of the total improvement.
RISING_SHARE = 0.10
# Doubling steps and restarts changes success by more than this share of samples (tested for
# significance like the attack comparisons).
CONVERGENCE_DELTA = 0.02


class _LossRecorder:
    """Wraps a loss to record its mean per call."""

    def __init__(self, fn):
        self.fn, self.means = fn, []

    def __call__(self, logits, y, targets=None):
        values = self.fn(logits, y, targets)
        self.means.append(values.detach().mean())
        return values


@check("incomplete optimisation", family="optimisation", kind=MaskingKind.WEAK_ATTACK,
       severity=Verdict.SUSPICIOUS, source="Carlini et al. 2019 (Sec. 5.3)",
       rule=f"loss gain in the last quarter of steps > {RISING_SHARE} of the total",
       thresholds=("RISING_SHARE",), evidence=("first", "last", "late_gain", "total_gain"),
       cost="PGD-2x`steps` (margin loss) on the PGD survivors")
def incomplete_optimisation(ctx: Context) -> Outcome:
    """Check "incomplete optimisation": PGD with twice the steps (margin loss) on PGD's
    survivors, recording the mean loss per step; fails when the last quarter of the steps still
    gains more than :data:`RISING_SHARE` of the total gain (the attack had not converged).
    """
    rob = ctx.survivors
    if not rob.numel():
        return Outcome(None, True, skipped="PGD broke every sample")
    recorder = _LossRecorder(lambda z, yy, t=None: -margin(z, yy, t))
    # The recorder wraps the margin loss and goes in through PGD's public loss_fn.
    ctx.adapt(PGD(ctx.threat, steps=2 * ctx.steps, loss="margin", loss_fn=recorder))(
        ctx.view, ctx.xc[rob], ctx.yc[rob], generator=ctx.g)
    means = torch.stack(recorder.means).float() if recorder.means else torch.zeros(1)
    total = float(means.max() - means[0])
    q = max(1, len(means) // 4)
    late = float(means[-1] - means[-q - 1]) if len(means) > q else 0.0
    rising = total > 1e-6 and late > RISING_SHARE * total
    return Outcome(late, not rising, {"first": float(means[0]), "last": float(means[-1]),
                                      "late_gain": late, "total_gain": total})


@check("convergence", family="optimisation", kind=MaskingKind.WEAK_ATTACK,
       severity=Verdict.SUSPICIOUS, source="Carlini et al. 2019 (Sec. 5.3); Madry et al. 2018",
       rule=f"share newly broken by doubling steps and restarts significantly > "
            f"{CONVERGENCE_DELTA}", thresholds=("CONVERGENCE_DELTA",),
       evidence=("success", "success_doubled", "count", "of", "p_value"),
       cost="PGD-2x`steps` with 2 restarts on the PGD survivors")
def convergence(ctx: Context) -> Outcome:
    """Check "convergence": PGD with twice the steps and two restarts on PGD's survivors must not
    break significantly more than :data:`CONVERGENCE_DELTA` of the attacked samples. Records the
    newly broken samples.
    """
    # Samples PGD already broke stay broken, so only the survivors are attacked again.
    base = float(ctx.pgd_broken.float().mean())
    rob = ctx.survivors
    newly = 0
    if rob.numel():
        more = ctx.adapt(PGD(ctx.threat, steps=2 * ctx.steps, restarts=2))(
            ctx.view, ctx.xc[rob], ctx.yc[rob], generator=ctx.g)
        broken = torch.zeros_like(ctx.pgd_broken)
        broken[rob] = more.success
        ctx.record("pgd", broken)
        newly = int(more.success.sum())
    delta = newly / ctx.n_att
    return comparison(newly, ctx.n_att, CONVERGENCE_DELTA,
                      "share newly broken by doubling steps and restarts",
                      {"success": base, "success_doubled": base + delta}, delta)
