"""Checks on the model's outputs: probabilities instead of logits, randomness, optimisation
inside the forward pass. They read the two clean passes the context makes; no attack runs."""

from __future__ import annotations

from ...bench.core import looks_like_probabilities
from .registry import Context, Outcome, check
from .report import MaskingKind, Verdict

# Outputs differing across two passes on the same input: any difference is randomness.
RANDOM_TOLERANCE = 0.0


@check("probability outputs", family="outputs", kind=MaskingKind.VANISHING,
       severity=Verdict.MASKED, source="Carlini & Wagner 2017; AutoAttack checks.py",
       rule="rows in [0, 1] summing to 1 -> fail", evidence=("row_sums",),
       cost="none: reads the clean pass", needs_correct=False)
def probability_outputs(ctx: Context) -> Outcome:
    """Check "probability outputs": the model must return logits, not rows in [0, 1] that sum to
    1 (probabilities flatten the cross-entropy gradient).
    """
    probs = looks_like_probabilities(ctx.logits)
    return Outcome(float(probs), not probs, {"row_sums": ctx.logits.sum(1)[:5]})


@check("randomness", family="outputs", kind=MaskingKind.STOCHASTIC, severity=Verdict.MASKED,
       source="Athalye et al. 2018 (EOT); AutoAttack checks.py",
       rule="max |z(x) - z'(x)| over two passes > 0 -> fail", thresholds=("RANDOM_TOLERANCE",),
       evidence=("pred_changes",), cost="none: compares the two clean passes",
       needs_correct=False)
def randomness(ctx: Context) -> Outcome:
    """Check "randomness": two clean forward passes on the same inputs must give the same logits
    (a randomised model needs EOT).
    """
    diff = float((ctx.logits - ctx.logits2).abs().max())
    random_model = not diff <= RANDOM_TOLERANCE  # NaN would fail this check, not pass
    return Outcome(diff, not random_model,
                   {"pred_changes": int((ctx.logits.argmax(1) != ctx.logits2.argmax(1)).sum())})


@check("autograd in forward", family="outputs", kind=MaskingKind.SHATTERED,
       severity=Verdict.MASKED,
       source="Athalye et al. 2018 (Sec. 4.1, implicit layers); AutoAttack checks.py",
       rule="autograd called during inference -> fail", evidence=("calls",),
       cost="none: counted during the clean passes", needs_correct=False)
def autograd_in_forward(ctx: Context) -> Outcome:
    """Check "autograd in forward": the forward pass must not call autograd (an optimisation
    inside the model, an implicit layer, hides the gradient).
    """
    calls = ctx.autograd_calls
    return Outcome(float(calls), calls == 0, {"calls": calls})
