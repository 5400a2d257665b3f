"""The significance test the attack-comparison checks share."""

from __future__ import annotations

import math

__all__ = ["BEATS_ALPHA", "exceeds_share"]

# The attack comparisons (one-step, black-box, transfer and noise beating PGD; doubling the
# budget) fire only when the count is significantly above their share: a one-sided exact
# binomial test at this level. One or two samples at the decision boundary never fire it
# (at n = 100 and a 1% share it takes 4 samples), and on a model where the weaker attack truly
# finds at most that share the false-alarm rate is at most 5%, whatever n is, so a verdict does
# not flip between n = 100 and n = 1000 on noise alone.
BEATS_ALPHA = 0.05


def exceeds_share(k: int, n: int, share: float, alpha: float = BEATS_ALPHA
                  ) -> tuple[bool, float]:
    """One-sided exact binomial test of "the rate is at most ``share``" after ``k`` hits in
    ``n`` trials: ``(rejected at level alpha, p-value)``. Computed in log space (any n)."""
    if n <= 0 or k <= 0:
        return False, 1.0
    share = min(max(float(share), 0.0), 1.0)
    if share <= 0.0:
        return True, 0.0
    if share >= 1.0:
        return False, 1.0
    log_s, log_f = math.log(share), math.log1p(-share)
    lg = math.lgamma
    terms = [lg(n + 1) - lg(i + 1) - lg(n - i + 1) + i * log_s + (n - i) * log_f
             for i in range(k, n + 1)]
    top = max(terms)
    p = min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))
    return p < alpha, p
