"""Gradient-masking diagnosis: ``diagnose(model, x, y, threat) -> MaskingReport``.

A robustness number measured with gradient attacks is only as good as the gradient. This
module runs a catalogue of checks on any model that follows the input convention (it never
asks how the model was made) and returns, for each, the measured value, the decision rule,
pass/fail, the evidence, the kind of masking it points to and its source in the literature.
The report ends in a verdict and names the adaptive attack to run next; with
``follow_up=True`` it runs that attack and reports robust accuracy before and after.

Sources: Athalye, Carlini & Wagner, ICML 2018 ("Obfuscated gradients give a false sense of
security"), Carlini et al. 2019 ("On evaluating adversarial robustness"), Croce & Hein 2020
(AutoAttack ``checks.py``), Tramèr et al., NeurIPS 2020 ("On adaptive attacks to adversarial
example defenses"), Zimmermann et al., NeurIPS 2022 ("Increasing confidence in adversarial
robustness evaluations").

Usage::

    report = diagnose(model, x, y, Threat("linf", 0.3))
    print(report.table()); report.verdict, report.recommended_attack
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import APGD, BPDA, EOT, FGSM, PGD, Square, Transfer, success_rate
from ..bench.core import (
    Norm,
    SampleOutcomes,
    Threat,
    check_inputs,
    check_logits,
    looks_like_probabilities,
    make_generator,
    margin,
    model_mode,
    normal,
    robust_by_majority,
    uniform,
)
from ..bench.fileio import json_safe

__all__ = ["diagnose", "MaskingReport", "CheckResult", "Verdict", "MaskingKind",
           "VERDICT_MEANING"]


class Verdict(str, enum.Enum):
    CLEAN = "clean"
    SUSPICIOUS = "suspicious"
    MASKED = "masked"


# One line per verdict, for the leaderboard's legend (provisional in the runner's branch; the
# masking package owns the wording).
VERDICT_MEANING = {
    "clean": "no check fired: the robust accuracy is a measurement; rank on it",
    "suspicious": "a heuristic check fired: the number may be optimistic; read the failing "
                  "checks and the follow-up before trusting the rank",
    "masked": "a mechanism check fired: the number is not evidence of robustness and is not "
              "ranked; run the named adaptive attack",
}


class MaskingKind(str, enum.Enum):
    SHATTERED = "shattered"  # non-differentiable or broken gradients
    STOCHASTIC = "stochastic"  # randomised gradients
    VANISHING = "vanishing/exploding"  # gradients that exist but carry no slope
    WEAK_ATTACK = "weak attack"  # the optimisation, not the model, falls short


# --- decision rules: each threshold and why ------------------------------------------------

# Exactly-zero input gradients never happen for a differentiable classifier on natural
# inputs except by masking; a few samples can sit on flat ReLU regions, 10% cannot.
ZERO_GRAD_SHARE = 0.10
# ||grad CE|| / ||grad margin|| ~ 1 - p_y for a confident prediction. Below 1e-6 the true-class
# probability is 1 to within a few float32 ulps, so the CE gradient is rounding noise.
SATURATION_RATIO = 1e-6
# Outputs differing across two passes on the same input: any difference is randomness.
RANDOM_TOLERANCE = 0.0
# Share of the loss change under a tiny perturbation that the gradient fails to predict
# (|dL - g.d| / (|dL| + |g.d|)): ~0 for a smooth model, 1 when the gradient says nothing.
UNPREDICTED_CHANGE = 0.5
# A perturbation of 1% of eps is "tiny": well inside the region where a ReLU network is linear.
TINY_FRACTION = 0.01
# Heuristic attack comparisons flag a defense when the weaker attack breaks more than this
# share of the attacked samples that the stronger one left standing (AutoAttack's checks flag
# any such sample; a 1% floor absorbs single samples at the decision boundary).
BEATS_SHARE = 0.01
# An attack with eps large enough to reach any image (Linf 1, L2 sqrt(d)) must succeed on
# essentially every sample (Carlini et al. 2019, Sec. 5.2); we allow 1% for budget limits.
UNBOUNDED_SUCCESS = 0.99
# Success may not fall by more than this when eps grows (binomial noise on the sample sizes
# used here is ~2 points).
MONOTONE_SLACK = 0.02
# The attack loss still rising: improvement over the last quarter of the steps is more than
# this share of the total improvement.
RISING_SHARE = 0.10
# Doubling steps and restarts changes success by more than this share of samples.
CONVERGENCE_DELTA = 0.02
# The attack comparisons above (one-step, black-box, transfer and noise beating PGD; doubling
# the budget) fire only when the count is significantly above their share: a one-sided exact
# binomial test at this level. One or two samples at the decision boundary never fire it
# (at n = 100 and a 1% share it takes 4 samples), and on a model where the weaker attack truly
# finds at most that share the false-alarm rate is at most 5%, whatever n is, so a verdict does
# not flip between n = 100 and n = 1000 on noise alone.
BEATS_ALPHA = 0.05
# The black-box check runs Square on at most this many PGD survivors: the share it estimates
# has a standard error below 5 points at 100 samples, enough for a 1% flag on real gaps.
SQUARE_SAMPLES, SQUARE_SAMPLES_FAST = 100, 40
# Binarization test (Zimmermann et al. 2022): the share of guaranteed-breakable tasks the
# attack may fail before it is declared defeated; the paper treats any failure as a warning
# and high failure rates as a sign of masking.
BINARIZATION_SUSPICIOUS, BINARIZATION_MASKED = 0.10, 0.5
# Follow-up on a randomised model: EOT over 16 draws per gradient brings the gradient's noise
# below its signal for the noise levels defenses use (the variance falls as 1/samples; 10 was
# Athalye et al.'s minimum), APGD's step-size schedule copes with what remains, and 32 fresh
# draws judge success in expectation (standard error <= 9 points per sample, so a majority
# call errs only near a 50% rate).
EOT_SAMPLES, EOT_STEPS, FOLLOW_UP_DRAWS = 16, 50, 32


@dataclass
class CheckResult:
    name: str
    value: float | None
    rule: str
    passed: bool
    severity: Verdict  # the verdict a failure implies
    kind: MaskingKind
    source: str
    evidence: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "rule": self.rule,
                "passed": self.passed, "severity": self.severity.value, "kind": self.kind.value,
                "source": self.source, "evidence": json_safe(self.evidence),
                "skipped": self.skipped}


@dataclass
class MaskingReport:
    verdict: Verdict
    checks: list[CheckResult]
    recommended_attack: str
    threat: Threat
    n: int
    seconds: float
    gradient_flow: str | None = None
    collapse_at: str | None = None
    follow_up: dict[str, Any] | None = None
    outcomes: SampleOutcomes | None = None
    adaptive: dict[str, Any] | None = None

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed and c.skipped is None]

    @property
    def rankable(self) -> bool:
        """Not masked, or masked but the adaptive re-checks passed."""
        return self.verdict is not Verdict.MASKED or bool(self.adaptive
                                                          and self.adaptive.get("passed"))

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict.value, "recommended_attack": self.recommended_attack,
                "threat": self.threat.to_dict(), "n": self.n, "seconds": round(self.seconds, 3),
                "gradient_flow": self.gradient_flow, "collapse_at": self.collapse_at,
                "checks": [c.to_dict() for c in self.checks],
                "follow_up": json_safe(self.follow_up),
                "outcomes": None if self.outcomes is None else self.outcomes.to_dict(),
                "adaptive": json_safe(self.adaptive)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MaskingReport:
        checks = [CheckResult(c["name"], c["value"], c["rule"], c["passed"],
                              Verdict(c["severity"]), MaskingKind(c["kind"]), c["source"],
                              c.get("evidence") or {}, c.get("skipped"))
                  for c in d.get("checks", [])]
        t = d["threat"]
        outcomes = d.get("outcomes")
        return cls(Verdict(d["verdict"]), checks, d.get("recommended_attack", ""),
                   Threat(t["norm"], t["eps"]), d["n"], d.get("seconds", 0.0),
                   d.get("gradient_flow"), d.get("collapse_at"), d.get("follow_up"),
                   None if outcomes is None else SampleOutcomes.from_dict(outcomes),
                   d.get("adaptive"))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        rows = [("check", "value", "rule", "result", "kind")]
        for c in self.checks:
            result = "skip" if c.skipped else ("pass" if c.passed else f"FAIL->{c.severity.value}")
            value = "-" if c.value is None else (f"{c.value:.3g}" if isinstance(c.value, float)
                                                 else str(c.value))
            rows.append((c.name, value, c.rule, result, c.kind.value))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append("")
        lines.append(f"verdict: {self.verdict.value}   next: {self.recommended_attack}")
        if self.gradient_flow:
            lines.append(f"gradient flow: {self.gradient_flow}")
        if self.follow_up:
            f = self.follow_up
            lines.append(f"follow-up ({f['attack']}): robust accuracy {f['before']:.3f} -> "
                         f"{f['after']:.3f} on {f['n']} samples")
            if "after_expected" in f:
                lines.append(f"  in expectation over {f['draws']} draws of the model's "
                             f"randomness: {f['before_expected']:.3f} -> "
                             f"{f['after_expected']:.3f}")
        return "\n".join(lines)


# --- helpers ---------------------------------------------------------------------------------


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


def _comparison(name: str, value: float, count: int, of: int, share: float, what: str,
                kind: MaskingKind, source: str, evidence: dict[str, Any]) -> CheckResult:
    """A suspicious-level check that fires when ``count`` of ``of`` samples (``what``) is
    significantly above ``share`` (:func:`exceeds_share`); the test's numbers join the
    evidence."""
    fires, p = exceeds_share(count, of, share)
    return CheckResult(name, value, f"{what} significantly > {share} (p < {BEATS_ALPHA})",
                       not fires, Verdict.SUSPICIOUS, kind, source,
                       {**evidence, "count": count, "of": of, "p_value": p})


def _grads(model: nn.Module, x: Tensor, y: Tensor):
    """Per-sample CE and margin input gradients; None where the graph is broken."""
    xr = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xr)
        if not logits.requires_grad:
            return None, None, logits.detach()
        ce = F.cross_entropy(logits, y, reduction="sum")
        g_ce = torch.autograd.grad(ce, xr, retain_graph=True, allow_unused=True)[0]
        g_m = torch.autograd.grad(-margin(logits, y).sum(), xr, allow_unused=True)[0]
    return g_ce, g_m, logits.detach()


@contextlib.contextmanager
def _count_autograd_calls():
    """Count autograd.grad/backward calls made while the block runs (e.g. inside forward)."""
    counts = {"calls": 0}
    orig_grad, orig_backward = torch.autograd.grad, torch.autograd.backward

    def grad(*a, **k):
        counts["calls"] += 1
        return orig_grad(*a, **k)

    def backward(*a, **k):
        counts["calls"] += 1
        return orig_backward(*a, **k)

    torch.autograd.grad, torch.autograd.backward = grad, backward
    try:
        yield counts
    finally:
        torch.autograd.grad, torch.autograd.backward = orig_grad, orig_backward


class _LossRecorder:
    """Wraps a loss to record its mean per call (for the 'still rising' check)."""

    def __init__(self, fn):
        self.fn, self.means = fn, []

    def __call__(self, logits, y, targets=None):
        values = self.fn(logits, y, targets)
        self.means.append(values.detach().mean())
        return values


def _features(model: nn.Module, x: Tensor) -> tuple[Tensor, nn.Module | None]:
    """The input of the model's last nn.Linear (the penultimate representation)."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        return model(x), None
    store = {}
    handle = last.register_forward_hook(lambda m, i, o: store.__setitem__("f", i[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return store["f"].flatten(1), last


class _FeatureHead(nn.Module):
    """Binary classifier w . phi(x) + b on the model's features; logits (0, w.phi + b)."""

    def __init__(self, model: nn.Module, last: nn.Linear | None, w: Tensor, b: Tensor) -> None:
        super().__init__()
        self.model, self.last = model, last
        self.register_buffer("w", w)
        self.register_buffer("b", b)

    def forward(self, x: Tensor) -> Tensor:
        if self.last is None:
            feats = self.model(x).flatten(1)
        else:
            store = {}
            handle = self.last.register_forward_hook(lambda m, i, o: store.__setitem__("f", i[0]))
            try:
                self.model(x)
            finally:
                handle.remove()
            feats = store["f"].flatten(1)
        score = feats @ self.w + self.b
        return torch.stack([torch.zeros_like(score), score], dim=1)


# --- the diagnosis ---------------------------------------------------------------------------


def diagnose(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, *, follow_up: bool = False,
             fast: bool = False, generator: torch.Generator | int | None = None,
             surrogate: nn.Module | None = None, audit_flow: bool = True) -> MaskingReport:
    """Run the masking checks on ``model`` for samples ``(x, y)`` under ``threat``.

    Args:
        fast: smaller budgets (fewer steps, queries and samples) for CI.
        follow_up: run the recommended adaptive attack and report robust accuracy before
            (plain PGD) and after (worst case with the adaptive attack).
        surrogate: a model for the transfer check (skipped when None).
        audit_flow: localise where the gradient dies with :func:`unmask.explain.audit`.
    """
    if not isinstance(threat, Threat):
        raise TypeError(f"threat must be a Threat, got {type(threat).__name__}")
    x, y = check_inputs(x, y)
    g = make_generator(0 if generator is None else generator)
    start = time.perf_counter()
    steps = 10 if fast else 20
    queries = 300 if fast else 1000
    checks: list[CheckResult] = []

    with model_mode(model):
        with torch.no_grad(), _count_autograd_calls() as autograd_calls:
            logits = model(x)
            logits2 = model(x)
        # NaN or Inf logits are an error, never robustness (a NaN margin is "not broken").
        for out in (logits, logits2):
            check_logits(out, x.shape[0], probabilities="ignore", model=model)
        if int(y.max()) >= logits.shape[1]:
            raise ValueError(f"y holds class index {int(y.max())} but the model returns "
                             f"{logits.shape[1]} logits")
        correct = margin(logits, y) >= 0
        idx = correct.nonzero().flatten()
        xc, yc = x[idx], y[idx]

        # 4. probability outputs
        probs = looks_like_probabilities(logits)
        checks.append(CheckResult(
            "probability outputs", float(probs), "rows in [0, 1] summing to 1 -> fail", not probs,
            Verdict.MASKED, MaskingKind.VANISHING, "Carlini & Wagner 2017; AutoAttack checks.py",
            {"row_sums": logits.sum(1)[:5]}))

        # 5. randomness
        diff = float((logits - logits2).abs().max())
        random_model = not diff <= RANDOM_TOLERANCE  # NaN would fail this check, not pass
        checks.append(CheckResult(
            "randomness", diff, "max |z(x) - z'(x)| over two passes > 0 -> fail",
            not random_model, Verdict.MASKED, MaskingKind.STOCHASTIC,
            "Athalye et al. 2018 (EOT); AutoAttack checks.py",
            {"pred_changes": int((logits.argmax(1) != logits2.argmax(1)).sum())}))

        # 6. optimisation inside the forward pass
        calls = autograd_calls["calls"]
        checks.append(CheckResult(
            "autograd in forward", float(calls), "autograd called during inference -> fail",
            calls == 0, Verdict.MASKED, MaskingKind.SHATTERED,
            "Athalye et al. 2018 (Sec. 4.1, implicit layers); AutoAttack checks.py",
            {"calls": calls}))

        if not idx.numel():
            report = _report(checks, threat, x.shape[0], start, None, None)
            report.outcomes = _outcomes(correct, idx, [], None)
            return report

        # 1-3. gradients
        g_ce, g_m, _ = _grads(model, xc, yc)
        broken_graph = g_ce is None or g_m is None
        checks.append(CheckResult(
            "broken graph", float(broken_graph), "no input gradient -> fail", not broken_graph,
            Verdict.MASKED, MaskingKind.SHATTERED, "Athalye et al. 2018 (shattered gradients)"))
        if broken_graph:
            g_ce = g_m = torch.zeros_like(xc)
        ce_norm = g_ce.flatten(1).norm(dim=1)
        m_norm = g_m.flatten(1).norm(dim=1)
        zero = ce_norm == 0
        zero_share = float(zero.float().mean())
        checks.append(CheckResult(
            "zero gradients", zero_share, f"share of samples with grad CE == 0 > {ZERO_GRAD_SHARE}",
            zero_share <= ZERO_GRAD_SHARE, Verdict.MASKED, MaskingKind.SHATTERED,
            "Athalye et al. 2018; AutoAttack checks.py",
            {"zero_samples": idx[zero][:20]}))
        ratio = ce_norm / m_norm.clamp_min(1e-30)
        has_slope = m_norm > 0
        med_ratio = float(ratio[has_slope].median()) if has_slope.any() else float("nan")
        saturated = has_slope.any() and med_ratio < SATURATION_RATIO
        checks.append(CheckResult(
            "saturation ratio", med_ratio,
            f"median ||grad CE|| / ||grad margin|| < {SATURATION_RATIO:g} -> fail",
            not saturated, Verdict.MASKED, MaskingKind.VANISHING,
            "Carlini & Wagner 2017 (logit margin loss); Croce & Hein 2020 (DLR)",
            {"margin_grad_zero_share": float((~has_slope).float().mean())}))

        # 7. loss changes the gradient does not predict
        with torch.no_grad():
            ce0 = F.cross_entropy(model(xc), yc, reduction="none")
            delta = threat.random_point(xc, g) - xc
            delta = delta * TINY_FRACTION
            ce1 = F.cross_entropy(model((xc + delta).clamp(0, 1)), yc, reduction="none")
        actual = ce1 - ce0
        predicted = (g_ce * delta).flatten(1).sum(1) if not broken_graph else torch.zeros_like(actual)
        changed = (actual.abs() + predicted.abs()) > 1e-7
        unpredicted = ((actual - predicted).abs() / (actual.abs() + predicted.abs() + 1e-12))
        share = float(unpredicted[changed].median()) if changed.any() else 0.0
        checks.append(CheckResult(
            "unstable loss", share,
            f"median unpredicted share of the loss change at {TINY_FRACTION:g} eps > {UNPREDICTED_CHANGE}",
            # Suspicious, not masked, on its own: curvature also leaves most of the change
            # unpredicted where the gradient is small, as on adversarially trained models
            # (TRADES on mnist5k measured 0.51). The mechanism checks carry "masked".
            share <= UNPREDICTED_CHANGE, Verdict.SUSPICIOUS, MaskingKind.SHATTERED,
            "Athalye et al. 2018; Carlini et al. 2019 (Sec. 5)",
            {"samples_changed": int(changed.sum())}))

    # Attacks. PGD is the reference white-box attack.
    pgd_loss_recorder = None
    pgd = PGD(threat, steps=steps)
    r_pgd = pgd(model, xc, yc, generator=g)
    r_fgsm = FGSM(threat)(model, xc, yc, generator=g)
    pgd_broken, fgsm_broken = r_pgd.success, r_fgsm.success
    robust_after_pgd = ~pgd_broken
    n_att = int(idx.numel())

    # 9. one-step beats iterative
    only_fgsm = fgsm_broken & ~pgd_broken
    share = float(only_fgsm.float().mean())
    checks.append(_comparison(
        "one-step beats iterative", share, int(only_fgsm.sum()), n_att, BEATS_SHARE,
        "share broken by FGSM but not PGD", MaskingKind.SHATTERED,
        "Carlini et al. 2019 (Sec. 5.2); AutoAttack checks.py",
        {"samples": idx[only_fgsm][:20], "fgsm_success": r_fgsm.success_rate,
         "pgd_success": r_pgd.success_rate}))

    # 10. black-box beats white-box
    rob_idx = robust_after_pgd.nonzero().flatten()
    square_broken = torch.zeros_like(pgd_broken)
    share = 0.0
    sq_count, sq_of, sq_share = 0, 0, BEATS_SHARE
    if rob_idx.numel():
        # Square is the expensive check; a fixed-size subsample of the survivors estimates
        # the share as well as all of them would, within binomial noise.
        sq_idx = rob_idx[: (SQUARE_SAMPLES_FAST if fast else SQUARE_SAMPLES)]
        r_sq = Square(threat, queries=queries)(model, xc[sq_idx], yc[sq_idx], generator=g)
        square_broken[sq_idx] = r_sq.success
        share = float(r_sq.success.float().mean()) * rob_idx.numel() / n_att
        # Tested on the subsample Square ran on: BEATS_SHARE of all attacked samples is this
        # share of the PGD survivors.
        sq_count, sq_of = int(r_sq.success.sum()), int(sq_idx.numel())
        sq_share = BEATS_SHARE * n_att / rob_idx.numel()
    checks.append(_comparison(
        "black-box beats white-box", share, sq_count, sq_of, sq_share,
        f"share of the Square-{queries} subsample broken by Square but not PGD-{steps}",
        MaskingKind.SHATTERED, "Athalye et al. 2018; AutoAttack checks.py (Square vs white-box)",
        {"samples": idx[square_broken][:20], "square_attacked": sq_of}))

    # 11. transfer beats white-box
    if surrogate is None:
        checks.append(CheckResult(
            "transfer beats white-box", None, f"share broken by transfer but not PGD > {BEATS_SHARE}",
            True, Verdict.SUSPICIOUS, MaskingKind.SHATTERED, "Papernot et al. 2017; Athalye et al. 2018",
            skipped="no surrogate model given"))
    else:
        tr_broken = torch.zeros_like(pgd_broken)
        if rob_idx.numel():
            r_tr = Transfer(PGD(threat, steps=steps), surrogate=surrogate)(
                model, xc[rob_idx], yc[rob_idx], generator=g)
            tr_broken[rob_idx] = r_tr.success
        share = float(tr_broken.float().mean())
        checks.append(_comparison(
            "transfer beats white-box", share, int(tr_broken.sum()), n_att, BEATS_SHARE,
            "share broken by transfer but not PGD", MaskingKind.SHATTERED,
            "Papernot et al. 2017; Athalye et al. 2018", {"samples": idx[tr_broken][:20]}))

    # 12. unbounded attack
    big = Threat(threat.norm, 1.0 if threat.norm is Norm.LINF else math.sqrt(xc[0].numel()))
    unb_idx = rob_idx if rob_idx.numel() else None
    if unb_idx is not None:
        r_unb = PGD(big, steps=steps, loss="margin")(model, xc[unb_idx], yc[unb_idx], generator=g)
        unb_success = (r_unb.success.sum() + (n_att - unb_idx.numel())) / n_att
        unb_success = float(unb_success)
    else:
        unb_success = 1.0
    checks.append(CheckResult(
        "unbounded attack", unb_success, f"success at eps={big.eps:g} < {UNBOUNDED_SUCCESS}",
        unb_success >= UNBOUNDED_SUCCESS, Verdict.MASKED, MaskingKind.SHATTERED,
        "Carlini et al. 2019 (Sec. 5.2: unbounded attacks must reach 100%)"))

    # 13. success monotone in eps
    sub = torch.arange(min(n_att, 100 if fast else 200), device=x.device)
    rates = []
    for factor in (0.25, 0.5, 1.0, 2.0):
        t = Threat(threat.norm, threat.eps * factor)
        rates.append(PGD(t, steps=steps)(model, xc[sub], yc[sub], generator=g).success_rate)
    drops = [rates[i] - rates[i + 1] for i in range(len(rates) - 1)]
    worst_drop = max(drops)
    checks.append(CheckResult(
        "monotone in eps", worst_drop, f"success falls by > {MONOTONE_SLACK} as eps grows",
        worst_drop <= MONOTONE_SLACK, Verdict.SUSPICIOUS, MaskingKind.SHATTERED,
        "Carlini et al. 2019 (Sec. 5.2)",
        {"eps_factors": [0.25, 0.5, 1.0, 2.0], "success": rates}))

    # 14. random-noise search
    noise_broken = torch.zeros_like(pgd_broken)
    draws = 10 if fast else 20
    if rob_idx.numel():
        xr, yr = xc[rob_idx], yc[rob_idx]
        found = torch.zeros(rob_idx.numel(), dtype=torch.bool, device=x.device)
        with model_mode(model), torch.no_grad():
            for _ in range(draws):
                if threat.norm is Norm.LINF:
                    corner = torch.where(uniform(xr.shape, g, x.device) < 0.5, -1.0, 1.0)
                    cand = threat.project(xr + threat.eps * corner, xr)
                else:
                    cand = threat.random_point(xr, g)
                found |= ~(margin(model(cand), yr) >= 0)  # NaN counts as broken
        noise_broken[rob_idx] = found
    share = float(noise_broken.float().mean())
    checks.append(_comparison(
        "noise beats attack", share, int(noise_broken.sum()), n_att, BEATS_SHARE,
        f"share found by {draws} random draws but not PGD", MaskingKind.SHATTERED,
        "Carlini et al. 2019 (Sec. 5.2: brute-force random search)",
        {"samples": idx[noise_broken][:20]}))

    # 8. incomplete optimisation: is the attack loss still rising at the end?
    if rob_idx.numel():
        recorder = _LossRecorder(lambda z, yy, t=None: -margin(z, yy, t))
        # The recorder wraps the same margin loss, passed through PGD's public loss_fn.
        long_pgd = PGD(threat, steps=2 * steps, loss="margin", loss_fn=recorder)
        long_pgd(model, xc[rob_idx], yc[rob_idx], generator=g)
        means = torch.stack(recorder.means).float() if recorder.means else torch.zeros(1)
        total = float(means.max() - means[0])
        q = max(1, len(means) // 4)
        late = float(means[-1] - means[-q - 1]) if len(means) > q else 0.0
        rising = total > 1e-6 and late > RISING_SHARE * total
        pgd_loss_recorder = {"first": float(means[0]), "last": float(means[-1]),
                             "late_gain": late, "total_gain": total}
    else:
        rising = False
    checks.append(CheckResult(
        "incomplete optimisation", pgd_loss_recorder["late_gain"] if pgd_loss_recorder else None,
        f"loss gain in the last quarter of steps > {RISING_SHARE} of the total", not rising,
        Verdict.SUSPICIOUS, MaskingKind.WEAK_ATTACK, "Carlini et al. 2019 (Sec. 5.3)",
        pgd_loss_recorder or {}, skipped=None if rob_idx.numel() else "PGD broke every sample"))

    # 15. convergence: doubling steps and restarts
    # Samples PGD already broke stay broken, so only the survivors are attacked again.
    base_rate = float(pgd_broken.float().mean())
    newly = 0
    if rob_idx.numel():
        more = PGD(threat, steps=2 * steps, restarts=2)(model, xc[rob_idx], yc[rob_idx],
                                                        generator=g)
        newly = int(more.success.sum())
    delta_rate = newly / n_att
    checks.append(_comparison(
        "convergence", delta_rate, newly, n_att, CONVERGENCE_DELTA,
        "share newly broken by doubling steps and restarts", MaskingKind.WEAK_ATTACK,
        "Carlini et al. 2019 (Sec. 5.3); Madry et al. 2018",
        {"success": base_rate, "success_doubled": base_rate + delta_rate}))

    # 16. binarization test
    checks.append(_binarization_test(model, xc, yc, threat, g, steps=steps,
                                     n=min(n_att, 8 if fast else 16)))

    flow_summary = collapse_at = None
    if audit_flow:
        try:
            from ..explain import audit

            flow = audit(model, xc[: min(n_att, 64)], yc[: min(n_att, 64)], loss="ce")
            flow_summary, collapse_at = flow.summary, flow.collapse_at
        except Exception as err:  # the audit is evidence, not a precondition
            flow_summary = f"gradient-flow audit failed: {type(err).__name__}: {err}"

    from ..attacks.bpda import find_preprocessing

    report = _report(checks, threat, x.shape[0], start, flow_summary, collapse_at,
                     bpda_target=bool(collapse_at or find_preprocessing(model)))
    labels: list[str | None] = [None] * n_att
    if not random_model:  # a randomised model is judged by the follow-up's draws only
        for name, hit in (("pgd", pgd_broken), ("fgsm", fgsm_broken),
                          ("square", square_broken), ("noise", noise_broken)):
            for i in hit.nonzero().flatten().tolist():
                labels[i] = labels[i] or f"diagnosis:{name}"
    rate = None
    if follow_up:
        report.follow_up = _follow_up(model, xc, yc, threat, report, g, steps, queries,
                                      r_pgd, x.shape[0])
        who = report.follow_up.pop("_who")
        rate = report.follow_up.pop("_rate")
        for i, w in enumerate(who):
            if w is not None and labels[i] is None:
                labels[i] = f"follow-up:{w}"
        report.seconds = time.perf_counter() - start
    report.outcomes = _outcomes(correct, idx, labels, rate)
    return report


def _outcomes(correct, idx, labels, rate) -> SampleOutcomes:
    broken_by: list[str | None] = ["clean" if not c else None for c in correct.tolist()]
    fooled = [1.0 if b else 0.0 for b in broken_by] if rate is not None else None
    for j, i in enumerate(idx.tolist()):
        broken_by[i] = labels[j]
        if fooled is not None:
            fooled[i] = float(rate[j])
            # A randomised model's sample is broken when most draws are fooled by its best
            # x_adv (the one definition); plain PGD's x_adv is one of the candidates.
            if broken_by[i] is None and not bool(robust_by_majority(torch.tensor(rate[j]))):
                broken_by[i] = "diagnosis:pgd"
    return SampleOutcomes(tuple(broken_by), None if fooled is None else tuple(fooled))


def _binarization_test(model, x, y, threat, g, *, steps, n) -> CheckResult:
    """Zimmermann et al. 2022: per sample, a binary task on the model's own features with a
    known adversarial example inside the ball; the attack must find one."""
    source = "Zimmermann et al., NeurIPS 2022 (binarization test)"
    rule = (f"share of guaranteed-breakable tasks PGD fails > {BINARIZATION_SUSPICIOUS} "
            f"(suspicious), > {BINARIZATION_MASKED} (masked)")
    failures, built = 0, 0
    inner = 16
    with model_mode(model):
        for i in range(n):
            xi = x[i:i + 1]
            with torch.no_grad():
                # Inner points: a small ball (a tenth of eps) around x, labelled 0; one
                # boundary point of the full ball (a random corner / sphere point), labelled 1.
                small = Threat(threat.norm, threat.eps * 0.1)
                pts = small.random_point(xi.repeat(inner, 1, 1, 1), g)
                pts = torch.cat([xi, pts])
                if threat.norm is Norm.LINF:
                    corner = torch.where(uniform(xi.shape, g, x.device) < 0.5, -1.0, 1.0)
                    boundary = threat.project(xi + threat.eps * corner, xi)
                else:
                    direction = normal(xi.shape, g, x.device)
                    boundary = threat.project(xi + threat.eps * direction / direction.norm(), xi)
                feats, last = _features(model, torch.cat([pts, boundary]))
            feats = feats.detach().float()
            labels = torch.zeros(feats.shape[0], device=feats.device)
            labels[-1] = 1.0
            mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
            w = torch.zeros(feats.shape[1], device=feats.device, requires_grad=True)
            b = torch.zeros((), device=feats.device, requires_grad=True)
            opt = torch.optim.Adam([w, b], lr=0.1)
            weights = torch.ones_like(labels)
            weights[-1] = float(inner)  # balance the single boundary point
            with torch.enable_grad():
                for _ in range(200):
                    opt.zero_grad()
                    z = ((feats - mu) / sd) @ w + b
                    F.binary_cross_entropy_with_logits(z, labels, weight=weights).backward()
                    opt.step()
            with torch.no_grad():
                w_eff, b_eff = w / sd, b - (mu / sd) @ w
                z = feats @ w_eff + b_eff
            if not (bool((z[:-1] < 0).all()) and bool(z[-1] > 0)):
                continue  # the features cannot separate the boundary point: no task
            built += 1
            head = _FeatureHead(model, last, w_eff.detach(), b_eff.detach()).eval()
            r = PGD(threat, steps=steps)(head, xi, torch.zeros(1, dtype=torch.long, device=x.device),
                                         generator=g)
            failures += int(not bool(r.success.all()))
    if not built:
        return CheckResult("binarization test", None, rule, True, Verdict.SUSPICIOUS,
                           MaskingKind.SHATTERED, source,
                           skipped="no sample gave a separable binary task")
    share = failures / built
    severity = Verdict.MASKED if share > BINARIZATION_MASKED else Verdict.SUSPICIOUS
    return CheckResult("binarization test", share, rule, share <= BINARIZATION_SUSPICIOUS,
                       severity, MaskingKind.SHATTERED, source,
                       {"tasks": built, "attack_failures": failures})


_NEXT = {
    MaskingKind.STOCHASTIC: "EOT-APGD (CE and DLR, 16 draws per gradient), judged in expectation",
    MaskingKind.SHATTERED: "BPDA-PGD (identity on the module where the gradient dies) and Square",
    MaskingKind.VANISHING: "APGD-DLR (scale-invariant loss) and Square",
    MaskingKind.WEAK_ATTACK: "APGD with more steps and restarts, then Square",
}


def _report(checks, threat, n, start, flow_summary, collapse_at, *,
            bpda_target: bool = False) -> MaskingReport:
    """The verdict and the next attack; ``bpda_target``: a module BPDA can approximate is
    known (one where the gradient dies, or a declared approximation)."""
    failed = [c for c in checks if not c.passed and c.skipped is None]
    if any(c.severity is Verdict.MASKED for c in failed):
        verdict = Verdict.MASKED
    elif failed:
        verdict = Verdict.SUSPICIOUS
    else:
        verdict = Verdict.CLEAN
    kinds = [c.kind for c in failed if c.severity is Verdict.MASKED] or [c.kind for c in failed]
    if not kinds:
        recommended = "none needed; the standard ensemble (APGD-CE, APGD-T, Square) is reliable"
    else:
        # The most specific mechanism first: a saturated softmax also zeroes the CE gradient,
        # so "vanishing" explains a zero-gradient failure better than "shattered" does.
        order = [MaskingKind.STOCHASTIC, MaskingKind.VANISHING, MaskingKind.SHATTERED,
                 MaskingKind.WEAK_ATTACK]
        kind = min(kinds, key=order.index)
        recommended = _NEXT[kind]
        if kind is MaskingKind.SHATTERED and not bpda_target:
            # No module where the gradient dies: nothing to approximate with BPDA (yet).
            recommended = ("Square (gradient-free) and APGD-DLR; BPDA once the "
                           "non-differentiable step is found")
    return MaskingReport(verdict, checks, recommended, threat, n, time.perf_counter() - start,
                         flow_summary, collapse_at)


def _follow_up(model, x, y, threat, report, g, steps, queries, r_pgd, n_total):
    """Run the adaptive attacks the failed checks point to on the samples PGD (``r_pgd``, on
    the clean-correct ``x``) left standing; robust accuracy before (PGD) and after (per-sample
    worst case over PGD and the adaptive attacks), over all ``n_total`` samples.

    On a randomised model every result is judged in expectation, PGD's included (its own
    bookkeeping counts a lucky draw as a success): each ``x_adv`` is re-scored over
    :data:`FOLLOW_UP_DRAWS` fresh draws of the model's randomness, a sample counts as broken
    when most draws are fooled, and ``*_expected`` is the robust accuracy averaged over draws
    (the number a randomised defense must be credited with).
    """
    start = time.perf_counter()
    kinds = {c.kind for c in report.failed}
    stochastic = MaskingKind.STOCHASTIC in kinds
    attacks: list[tuple[str, Any]] = []
    if stochastic:
        attacks.append((f"EOT{EOT_SAMPLES}-APGD-CE",
                        EOT(APGD(threat, steps=EOT_STEPS), samples=EOT_SAMPLES,
                            eval_draws=FOLLOW_UP_DRAWS)))
        attacks.append((f"EOT{EOT_SAMPLES}-APGD-DLR",
                        EOT(APGD(threat, steps=EOT_STEPS, loss="dlr"), samples=EOT_SAMPLES,
                            eval_draws=FOLLOW_UP_DRAWS)))
    bpda = _bpda_for(model, x, report, threat, steps) if MaskingKind.SHATTERED in kinds else None
    if bpda is not None:
        attacks.append(bpda)
    # A shattered gradient with nothing for BPDA to approximate: a different loss surface
    # (DLR) and the gradient-free Square are what is left.
    shattered_only = MaskingKind.SHATTERED in kinds and bpda is None
    if not stochastic and (MaskingKind.VANISHING in kinds or MaskingKind.WEAK_ATTACK in kinds
                           or shattered_only or not kinds):
        attacks.append(("APGD-DLR", APGD(threat, steps=max(steps, 50), loss="dlr")))
    attacks.append((f"Square-{queries}", Square(threat, queries=queries)))
    # Per sample, the best (highest) success rate found so far: 0/1 for a deterministic model.
    if stochastic:
        rate = success_rate(model, r_pgd.x_adv, y, draws=FOLLOW_UP_DRAWS, generator=g)
    else:
        rate = r_pgd.success.float()
    before = float((rate < 0.5).sum()) / n_total
    before_expected = float((1 - rate).sum()) / n_total
    broken_by: dict[str, int] = {}
    who: list[str | None] = [None] * int(rate.numel())
    # A randomised model's samples stay in play until every draw is fooled: the expected
    # robust accuracy still counts a sample broken in most draws as partly robust.
    done_at = 1.0 if stochastic else 0.5
    for name, attack in attacks:
        idx = (rate < done_at).nonzero().flatten()
        if not idx.numel():
            break
        res = attack(model, x[idx], y[idx], generator=g)
        if stochastic:
            r = (res.expected_success if res.expected_success is not None else
                 success_rate(model, res.x_adv, y[idx], draws=FOLLOW_UP_DRAWS, generator=g))
        else:
            r = res.success.float()
        newly = (~robust_by_majority(r)) & robust_by_majority(rate[idx])
        broken_by[name] = int(newly.sum())
        for i in idx[newly].tolist():
            who[i] = name
        rate[idx] = torch.maximum(rate[idx], r.to(rate.dtype))
    after = float((rate < 0.5).sum()) / n_total
    out = {"attack": " + ".join(label for label, _ in attacks), "before": before,
           "after": after, "n": n_total, "broken_by": broken_by,
           "seconds": time.perf_counter() - start, "_who": who,
           "_rate": rate.tolist() if stochastic else None}
    if stochastic:
        # Samples misclassified on the clean pass count as broken in every draw.
        out.update(before_expected=before_expected,
                   after_expected=float((1 - rate).sum()) / n_total, draws=FOLLOW_UP_DRAWS)
    return out


def _bpda_for(model, x, report, threat, steps):
    """BPDA on declared approximations, else identity at the module where the gradient dies."""
    from ..attacks.bpda import find_preprocessing

    if find_preprocessing(model):
        return ("BPDA-PGD", BPDA(PGD(threat, steps=steps)))
    name = report.collapse_at
    modules = dict(model.named_modules())
    if name and name in modules and name != "":
        module = modules[name]
        shapes = {}
        handle = module.register_forward_hook(
            lambda m, i, o: shapes.update(i=tuple(i[0].shape), o=tuple(o.shape)))
        try:
            with torch.no_grad():
                model(x[:1])
        finally:
            handle.remove()
        if shapes.get("i") == shapes.get("o"):
            return (f"BPDA-PGD@{name}", BPDA(PGD(threat, steps=steps), approximations=[name]))
    return None
