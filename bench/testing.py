"""Robustness numbers under regression tests in your own CI.

:func:`assert_robust_accuracy` runs an attack ensemble on the first ``n`` samples and fails
the test when the measured worst-case robust accuracy is below ``at_least`` (its 95% Wilson
interval is reported in the message, never used to excuse a shortfall). By default it also
runs the masking diagnosis and fails when ``unmask.defenses.diagnose`` calls the model
``masked``: a robust accuracy that is a masking artefact is no evidence (``allow_masked=True``
or ``diagnose=False`` turn this off, and the result then says the number is unprotected)::

    from unmask.bench import Threat, data, zoo
    from unmask.bench.testing import assert_robust_accuracy

    def test_my_model_is_robust():
        model = build_my_model()
        assert_robust_accuracy(model, data.load("mnist5k", "test"), Threat("linf", 0.1),
                               attacks="quick", at_least=0.80, n=200)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .core import Threat, make_generator
from .store import wilson

__all__ = ["assert_robust_accuracy", "RobustAccuracy"]


@dataclass
class RobustAccuracy:
    """What :func:`assert_robust_accuracy` measured."""

    robust_accuracy: float
    clean_accuracy: float
    ci_low: float
    ci_high: float
    n: int
    broken_by: dict[str, int]
    verdict: str | None = None

    def __str__(self) -> str:
        broken = ", ".join(f"{k} {v}" for k, v in self.broken_by.items()) or "none"
        verdict = (f"; masking verdict {self.verdict}" if self.verdict else
                   "; no masking diagnosis: the number is not protected against masking")
        return (f"robust accuracy {self.robust_accuracy:.4f} (95% CI [{self.ci_low:.4f}, "
                f"{self.ci_high:.4f}], n={self.n}), clean accuracy {self.clean_accuracy:.4f}; "
                f"broken by: {broken}{verdict}")


def _data(data: Any, n: int) -> tuple[Tensor, Tensor]:
    if isinstance(data, str):
        from . import data as data_mod

        return data_mod.load(data, "test", n=n)
    if isinstance(data, tuple | list) and len(data) == 2:
        x, y = data
        return x[:n], y[:n]
    raise TypeError("data must be (x, y) tensors or the name of a registered dataset, got "
                    f"{type(data).__name__}")


def assert_robust_accuracy(model: nn.Module, data: Any, threat: Threat,
                           attacks: str | Sequence[Any] = "quick", *, at_least: float,
                           n: int = 500, batch_size: int = 250, seed: int = 0,
                           strict: bool = False, diagnose: bool = True,
                           allow_masked: bool = False) -> RobustAccuracy:
    """Fail (``AssertionError``) unless ``model``'s worst-case robust accuracy is ``at_least``.

    Args:
        model: logits model on inputs in [0, 1].
        data: ``(x, y)`` or a registered dataset name (its test split).
        threat: the threat model, e.g. ``Threat("linf", 0.1)``.
        attacks: an ensemble preset (``"quick"``, ``"standard"``), or a list of configured
            unmask attacks.
        at_least: the robust accuracy required, in [0, 1].
        n: samples evaluated (the first ``n``).
        batch_size, seed: batches are seeded from ``(seed, batch index)`` as in suite runs.
            A randomised model's sample is robust iff it is classified correctly on a strict
            majority of :data:`~unmask.bench.core.DRAWS` fresh draws
            (:func:`~unmask.bench.core.robust_by_majority`), as in suites and the leaderboard.
        strict: kept for compatibility; the point estimate is always what is compared.
        diagnose: run the masking diagnosis (default) and fail on a ``masked`` verdict.
        allow_masked: with ``diagnose``, record a ``masked`` verdict instead of failing.

    Returns the measured :class:`RobustAccuracy` (when the assertion holds).
    """
    from ..attacks import Ensemble
    from .runner import batch_seed

    if not 0.0 <= float(at_least) <= 1.0:
        raise ValueError(f"at_least must be in [0, 1], got {at_least}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    x, y = _data(data, n)
    device = next(model.parameters(), torch.empty(0)).device
    x, y = x.to(device), y.to(device)
    ensemble = (Ensemble.preset(attacks, threat) if isinstance(attacks, str)
                else Ensemble(list(attacks)))
    robust = clean = 0
    broken: dict[str, int] = {}
    for b, start in enumerate(range(0, x.shape[0], batch_size)):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        res = ensemble(model, xb, yb, generator=make_generator(batch_seed(seed, b)))
        robust += int(res.robust.sum())
        clean += int(res.clean_correct.sum())
        for k in res.broken_by:
            if k is not None:
                broken[k] = broken.get(k, 0) + 1
    total = int(x.shape[0])
    lo, hi = wilson(robust, total)
    out = RobustAccuracy(robust_accuracy=robust / total, clean_accuracy=clean / total,
                         ci_low=lo, ci_high=hi, n=total, broken_by=broken)
    if diagnose:
        from .integrations import diagnose_masking

        report = diagnose_masking(model, x, y, threat, follow_up=False, fast=True,
                                  generator=make_generator(seed))
        out.verdict = report["verdict"]
        if out.verdict == "masked" and not allow_masked:
            raise AssertionError(f"the masking diagnosis calls the model masked (failing "
                                 f"checks: {', '.join(report['failing'])}); its {out}")
    if out.robust_accuracy < at_least:
        raise AssertionError(f"robust accuracy ({out.robust_accuracy:.4f}) is below the "
                             f"required {at_least:.4f} at {threat}: {out}")
    return out
