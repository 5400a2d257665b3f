"""Gradient-masking diagnosis: ``diagnose(model, x, y, threat) -> MaskingReport``.

A robustness number measured with gradient attacks is only as good as the gradient. This
package runs a registry of checks on any model that follows the input convention (it never
asks how the model was made) and returns, for each, the measured value, the decision rule,
pass/fail, the evidence, the kind of masking it points to, its source in the literature and
the forward/backward passes it cost. The report ends in a verdict and names the adaptive
attack to run next; with ``follow_up=True`` it runs that attack, reports robust accuracy
before and after, and re-runs the attack checks against the adaptive attack: a masked model
whose re-checks pass is ranked on the adaptive number.

Layout (one module per family of checks, each check registered with ``@check``):

* ``registry``      ``Check``, ``CHECKS``, ``Context`` (the shared work), ``Budget``, ``run_check``
* ``outputs``       probability outputs, randomness, autograd in forward
* ``gradients``     broken graph, zero gradients, saturation ratio, unstable loss
* ``comparisons``   one-step / black-box / transfer / noise beating PGD, unbounded attack,
                    monotone in eps
* ``optimisation``  incomplete optimisation, convergence
* ``binarization``  the binarization test (Zimmermann et al. 2022)
* ``diagnose``      the verdict, the follow-up, the adaptive re-checks, per-sample outcomes
* ``follow_up``     the adaptive attacks and adaptations (BPDA, EOT, scale-free logits)

Sources: Athalye, Carlini & Wagner, ICML 2018 ("Obfuscated gradients give a false sense of
security"), Carlini et al. 2019 ("On evaluating adversarial robustness"), Croce & Hein 2020
(AutoAttack ``checks.py``), Tramèr et al., NeurIPS 2020 ("On adaptive attacks to adversarial
example defenses"), Pintor et al., NeurIPS 2022 ("Indicators of attack failure"), Zimmermann
et al., NeurIPS 2022 ("Increasing confidence in adversarial robustness evaluations").

Usage::

    report = diagnose(model, x, y, Threat("linf", 0.3))
    print(report.table()); report.verdict, report.recommended_attack
    run_check("zero gradients", model, x, y, Threat("linf", 0.3))   # one check alone
"""

from __future__ import annotations

# Importing the check modules registers their checks (ordered by family, see FAMILIES).
from . import binarization, comparisons, gradients, optimisation, outputs  # noqa: F401, I001
from .binarization import BINARIZATION_MASKED, BINARIZATION_SUSPICIOUS
from .comparisons import BEATS_SHARE, EPS_FACTORS, MONOTONE_SLACK, UNBOUNDED_SUCCESS
from .diagnose import ADAPTIVE_FAMILIES, _report, diagnose
from .follow_up import EOT_SAMPLES, EOT_STEPS, FOLLOW_UP_DRAWS, ScaleFree, adaptation
from .gradients import SATURATION_RATIO, TINY_FRACTION, UNPREDICTED_CHANGE, ZERO_GRAD_SHARE
from .optimisation import CONVERGENCE_DELTA, RISING_SHARE
from .outputs import RANDOM_TOLERANCE
from .registry import (
    CHECKS,
    FAMILIES,
    Budget,
    Check,
    Context,
    Outcome,
    check,
    run_check,
    run_checks,
)
from .report import VERDICT_MEANING, CheckResult, MaskingKind, MaskingReport, Verdict
from .stats import BEATS_ALPHA, exceeds_share

__all__ = ["diagnose", "MaskingReport", "CheckResult", "Verdict", "MaskingKind",
           "VERDICT_MEANING", "CHECKS", "FAMILIES", "Check", "Context", "Budget", "Outcome",
           "check", "run_check", "run_checks", "exceeds_share", "adaptation", "ScaleFree",
           "ADAPTIVE_FAMILIES", "BEATS_ALPHA", "BEATS_SHARE", "BINARIZATION_MASKED",
           "BINARIZATION_SUSPICIOUS", "CONVERGENCE_DELTA", "EOT_SAMPLES", "EOT_STEPS",
           "EPS_FACTORS", "FOLLOW_UP_DRAWS", "MONOTONE_SLACK", "RANDOM_TOLERANCE",
           "RISING_SHARE", "SATURATION_RATIO", "TINY_FRACTION", "UNBOUNDED_SUCCESS",
           "UNPREDICTED_CHANGE", "ZERO_GRAD_SHARE", "_report"]
