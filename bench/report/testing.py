"""Robustness numbers under regression tests in your own CI.

:func:`assert_robust_accuracy` evaluates the model exactly as a suite run does (the suite's
own per-batch evaluation, :func:`unmask.bench.suite.runner.evaluate_cell`, so the suite, ``unmask
attack`` and this helper give the same number on the same samples and settings) and fails
the test when

* the measured worst-case robust accuracy is below ``at_least`` (its 95% Wilson interval is
  reported in the message, never used to excuse a shortfall);
* the masking diagnosis, which runs by default, calls the model ``masked``: a robust accuracy
  that is a masking artefact is no evidence (``allow_masked=True`` or ``diagnose=False`` turn
  this off, and the result then says the number is not protected);
* with ``baseline=PATH``: the per-sample outcomes dropped against the baseline's on the same
  samples (paired, exact McNemar test, or a drop beyond ``tolerance``), or the model's
  fingerprint or the evaluation settings changed (unless ``allow_changed``). A missing
  baseline is written and the test fails once, asking to commit it; set
  ``UNMASK_UPDATE_BASELINES=1`` to rewrite baselines on purpose::

    from unmask.bench import Threat, data
    from unmask.bench.report.testing import assert_robust_accuracy

    def test_my_model_is_robust():
        model = build_my_model()
        assert_robust_accuracy(model, data.load("mnist5k", "test"), Threat("linf", 0.1),
                               attacks="quick", at_least=0.80, n=200,
                               baseline="tests/baselines/my_model.json")

With diagnosis (the default) the robust accuracy is the per-sample worst case over the
ensemble AND the diagnosis's own attacks, as the leaderboard row of a suite whose
``[masking]`` section has ``fast = true``, ``follow_up = false``, ``surrogate = "none"``;
``ensemble_robust_accuracy`` is the ensemble's alone (a suite's ``worst-case`` cell, ``unmask
attack``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...attacks import Ensemble
from ...defenses import masking
from .. import data as data_mod
from ..core import SampleOutcomes, Threat, make_generator
from ..suite.runner import evaluate_cell, merge_cell
from ..suite.store import wilson
from ..zoo.registry import fingerprint, versions
from . import check
from .leaderboard import row_outcomes

__all__ = ["assert_robust_accuracy", "RobustAccuracy", "UPDATE_BASELINES_ENV"]

# Set to 1 to (re)write every baseline the helper is given instead of comparing with it.
UPDATE_BASELINES_ENV = "UNMASK_UPDATE_BASELINES"
_DIAGNOSIS = {"fast": True, "follow_up": False, "surrogate": "none"}


@dataclass
class RobustAccuracy:
    """What :func:`assert_robust_accuracy` measured.

    Attributes:
        robust_accuracy: the share of samples robust to every attack that ran (the ensemble,
            and the diagnosis's attacks when it ran): the number compared with ``at_least``.
        clean_accuracy: the share classified correctly without attack.
        ci_low, ci_high: the 95% Wilson interval of ``robust_accuracy`` (reported only).
        n: samples evaluated (ids ``0 .. n-1``: the first ``n`` of the data).
        broken_by: samples broken per attack label (``"clean"``: misclassified unattacked).
        verdict: the masking verdict, or None without diagnosis (the number is unprotected).
        ensemble_robust_accuracy: the ensemble's alone, as a suite's ``worst-case`` cell and
            ``unmask attack`` report it.
        fingerprint: :func:`unmask.bench.zoo.fingerprint` of the model, taken before evaluation.
        outcomes: per sample who broke it (None = robust), in sample order.
        clean_correct: per sample 1 when classified correctly unattacked.
        comparison: the paired comparison with ``baseline`` (a
            :class:`~unmask.bench.report.check.RegressionResult`), when one was given and existed.
        baseline_written: the baseline file written by this call, if any.
    """

    robust_accuracy: float
    clean_accuracy: float
    ci_low: float
    ci_high: float
    n: int
    broken_by: dict[str, int]
    verdict: str | None = None
    ensemble_robust_accuracy: float | None = None
    fingerprint: str = ""
    outcomes: SampleOutcomes | None = field(default=None, repr=False)
    clean_correct: list[int] = field(default_factory=list, repr=False)
    comparison: Any = field(default=None, repr=False)
    baseline_written: str | None = None

    def __str__(self) -> str:
        broken = ", ".join(f"{k} {v}" for k, v in self.broken_by.items()) or "none"
        word = getattr(self.verdict, "value", self.verdict)
        verdict = (f"; masking verdict {word}" if word else
                   "; no masking diagnosis: the number is not protected against masking")
        if word == "masked":
            verdict += ": the number is not protected against masking"
        ensemble = ""
        if self.ensemble_robust_accuracy is not None \
                and self.ensemble_robust_accuracy != self.robust_accuracy:
            ensemble = f" (the ensemble alone: {self.ensemble_robust_accuracy:.4f})"
        return (f"robust accuracy {self.robust_accuracy:.4f}{ensemble} (95% CI "
                f"[{self.ci_low:.4f}, {self.ci_high:.4f}], n={self.n}), clean accuracy "
                f"{self.clean_accuracy:.4f}; broken by: {broken}{verdict}; model "
                f"{self.fingerprint[:12]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the numbers, the verdict, the fingerprint and per-sample outcomes."""
        return {"robust_accuracy": self.robust_accuracy, "clean_accuracy": self.clean_accuracy,
                "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n,
                "broken_by": dict(self.broken_by),
                "verdict": getattr(self.verdict, "value", self.verdict),
                "ensemble_robust_accuracy": self.ensemble_robust_accuracy,
                "fingerprint": self.fingerprint,
                "outcomes": None if self.outcomes is None else list(self.outcomes.broken_by),
                "passed_baseline": None if self.comparison is None else self.comparison.passed,
                "baseline_written": self.baseline_written}


DATASET_N = 500  # samples taken from a named dataset when n is not given


def _data(data: Any, n: int | None) -> tuple[Tensor, Tensor]:
    if isinstance(data, str):

        if n is None:
            x, y = data_mod.load(data, "test")
            return x[:DATASET_N], y[:DATASET_N]
        return data_mod.load(data, "test", n=n)
    if isinstance(data, tuple | list) and len(data) == 2:
        x, y = data
        if n is None:
            return x, y
        if n > len(x):
            raise ValueError(f"n={n} but the data holds {len(x)} samples; ask for at most "
                             f"{len(x)}")
        return x[:n], y[:n]
    raise TypeError("data must be (x, y) tensors or the name of a registered dataset, got "
                    f"{type(data).__name__}")


def _data_digest(x: Tensor, y: Tensor) -> str:
    """A digest of the evaluated samples: a baseline is compared on the same samples only."""
    h = hashlib.sha256()
    for t in (x, y):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def assert_robust_accuracy(model: nn.Module, data: Any, threat: Threat,
                           attacks: str | Sequence[Any] = "quick", *, at_least: float,
                           n: int | None = None, batch_size: int = 250, seed: int = 0,
                           strict: bool = False, diagnose: bool = True,
                           allow_masked: bool = False, baseline: str | os.PathLike | None = None,
                           tolerance: float | None = None,
                           allow_changed: bool = False) -> RobustAccuracy:
    """Fail (``AssertionError``) unless ``model``'s worst-case robust accuracy is ``at_least``
    (and, with ``baseline``, unless it holds its ground against the baseline sample by sample).

    Every failure found is reported in one message: the shortfall, a ``masked`` verdict, and
    the baseline comparison (newly broken sample ids, McNemar p, changed fingerprint or
    settings).

    Args:
        model: logits model on inputs in [0, 1] (``N x C x H x W`` -> ``N x K``).
        data: ``(x, y)`` or a registered dataset name (its test split).
        threat: the threat model, e.g. ``Threat("linf", 0.1)``.
        attacks: an ensemble preset (``"quick"``, ``"standard"``), or a list of configured
            unmask attacks.
        at_least: the robust accuracy required, in [0, 1]; the measured value is compared.
        n: samples evaluated (the first ``n``; an ``n`` larger than the data is an error).
            Default: all of ``(x, y)``, or the first 500 of a named dataset.
        batch_size, seed: the suite's evaluation: fixed batches of ``batch_size`` (a suite's
            default is 250), batch ``b`` seeded from ``(seed, b)``. Same samples, batch size,
            seed and attacks give the suite's and ``unmask attack``'s numbers, per sample.
            A randomised model's sample is robust iff it is classified correctly on a strict
            majority of :data:`~unmask.bench.core.DRAWS` fresh draws
            (:func:`~unmask.bench.core.robust_by_majority`), as in suites and the leaderboard.
        strict: kept for compatibility; the point estimate is always what is compared.
        diagnose: run the masking diagnosis (default; fast, no follow-up, no transfer
            surrogate) on the same samples, merge its attacks' breaks into the number, and
            fail on a ``masked`` verdict.
        allow_masked: with ``diagnose``, record a ``masked`` verdict instead of failing.
        baseline: a baseline JSON (the format of ``unmask check``): compare per sample, paired.
            Missing, it is written from this run and the test fails once (commit the file);
            with ``UNMASK_UPDATE_BASELINES=1`` it is rewritten and the comparison skipped.
        tolerance: with ``baseline``, fail on a drop larger than this share even when not
            significant (default :data:`unmask.bench.report.check.TOLERANCE`, 5 points).
        allow_changed: with ``baseline``, compare even when the model's fingerprint, the
            samples or the settings changed (the change is still reported).

    Returns the measured :class:`RobustAccuracy` (when every assertion holds).

    Usage::

        assert_robust_accuracy(model, (x, y), Threat("linf", 0.1), at_least=0.8, n=200,
                               baseline="tests/baselines/model.json")
    """

    if not 0.0 <= float(at_least) <= 1.0:
        raise ValueError(f"at_least must be in [0, 1], got {at_least}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    tolerance = check.TOLERANCE if tolerance is None else float(tolerance)
    if not 0.0 <= tolerance <= 1.0:
        raise ValueError(f"tolerance must be a share in [0, 1] (0.05 = 5 points), got "
                         f"{tolerance}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    x, y = _data(data, n)
    device = next(model.parameters(), torch.empty(0)).device
    x, y = x.to(device), y.to(device)
    model_fp = fingerprint(model)  # before any forward: a module may count its calls
    ensemble = (Ensemble.preset(attacks, threat) if isinstance(attacks, str)
                else Ensemble(list(attacks)))
    norm = ensemble.threat.norm.value
    parts = evaluate_cell(ensemble, model, x, y, seed=seed, batch_size=batch_size,
                          raise_errors=True)
    cells, samples = merge_cell(parts, ensemble.labels, y, model="model", norm=norm,
                                eps=ensemble.threat.eps, sha256=model_fp, source="user")
    worst = cells[-1]
    total = worst["n"]
    outcomes = SampleOutcomes(tuple(None if r["robust"] else (r["broken_by"] or "ensemble")
                                    for r in samples))
    report = None
    if diagnose:

        report = masking.diagnose(model, x, y, threat, follow_up=False, fast=True,
                                  generator=make_generator(seed))
        outcomes, _ = row_outcomes(samples, report)
    robust = sum(b is None for b in outcomes.broken_by)
    lo, hi = wilson(robust, total)
    broken = outcomes.counts()  # "clean" included: misclassified without attack
    out = RobustAccuracy(robust_accuracy=robust / total,
                         clean_accuracy=worst["clean_accuracy"], ci_low=lo, ci_high=hi,
                         n=total, broken_by=broken,
                         verdict=None if report is None else report.verdict.value,
                         ensemble_robust_accuracy=worst["robust_accuracy"],
                         fingerprint=model_fp, outcomes=outcomes,
                         clean_correct=[int(r["clean_correct"]) for r in samples])
    failures = []
    if report is not None and out.verdict == "masked" and not allow_masked:
        failures.append("the masking diagnosis calls the model masked (failing checks: "
                        f"{', '.join(c.name for c in report.failed)}): the number is no "
                        "evidence of robustness (allow_masked=True to record it anyway)")
    if out.robust_accuracy < at_least:
        failures.append(f"robust accuracy ({out.robust_accuracy:.4f}) is below the required "
                        f"{at_least:.4f} at {threat}")
    if baseline is not None:
        settings = {"seed": seed, "batch_size": batch_size, "n": total,
                    "data": _data_digest(x, y), "attacks": ensemble.config(),
                    "diagnosis": dict(_DIAGNOSIS) if diagnose else None}
        current = check.helper_baseline(out, ensemble.threat, settings=settings,
                                        versions=versions())
        path = Path(baseline)
        if not path.exists() or os.environ.get(UPDATE_BASELINES_ENV) == "1":
            missing = not path.exists()
            check.write_baseline(current, path)
            out.baseline_written = str(path)
            if missing:
                failures.append(f"no baseline at {path}: wrote this run's per-sample outcomes "
                                "there; commit the file and rerun (set "
                                f"{UPDATE_BASELINES_ENV}=1 to rewrite baselines on purpose)")
        else:
            out.comparison = check.compare(check.read_baseline(path), current,
                                           tolerance=tolerance, allow_changed=allow_changed)
            if not out.comparison.passed:
                failures.append(f"against the baseline {path}:\n"
                                + check.format_result(out.comparison))
    if failures:
        body = failures[0] if len(failures) == 1 else "\n".join(f"- {f}" for f in failures)
        raise AssertionError(f"{body}\nmeasured: {out}")
    return out
