"""``diagnose``: run the registered checks under a budget, combine them into a verdict and the
next attack, run the follow-up, re-run the attack checks against the adaptive attack, and
record per sample who broke what."""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ...bench.core import SampleOutcomes, Threat, robust_by_majority, warnings_once
from ...explain import audit
from .follow_up import adaptation, bpda_wrap
from .follow_up import follow_up as run_follow_up
from .registry import CHECKS, Budget, Context, run_checks
from .report import CheckResult, MaskingKind, MaskingReport, Verdict

__all__ = ["diagnose", "ADAPTIVE_FAMILIES"]

# The checks re-run against the adaptive attack: those whose subject is the white-box attack
# (the mechanism checks on outputs and gradients describe the model, which the adaptive
# attack does not change; it addresses them).
ADAPTIVE_FAMILIES = ("attacks", "optimisation", "binarization")

_NEXT = {
    MaskingKind.STOCHASTIC: "EOT-APGD (CE and DLR, 16 draws per gradient), judged in expectation",
    MaskingKind.SHATTERED: "BPDA-PGD (identity on the module where the gradient dies) and Square",
    MaskingKind.VANISHING: "APGD-DLR (scale-invariant loss) and Square",
    MaskingKind.WEAK_ATTACK: "APGD with more steps and restarts, then Square",
}


def diagnose(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, *, follow_up: bool = False,
             fast: bool = False, generator: torch.Generator | int | None = None,
             surrogate: nn.Module | None = None, audit_flow: bool = True,
             checks: Iterable[str] | None = None, budget: Budget | None = None,
             recheck: bool = True) -> MaskingReport:
    """Run the masking checks on ``model`` for samples ``(x, y)`` under ``threat``.

    Args:
        fast: the CI budget (fewer steps, queries and samples); ``budget`` sets it exactly.
        follow_up: run the recommended adaptive attack and report robust accuracy before
            (plain PGD) and after (worst case with the adaptive attack).
        surrogate: a model for the transfer check (skipped when None).
        audit_flow: localise where the gradient dies with :func:`unmask.explain.audit`.
        checks: names of registered checks to run (default: all, see ``CHECKS``).
        recheck: with ``follow_up`` on a masked model, re-run the attack checks against the
            adaptive attack; when they all pass the report is ``rankable`` (``adaptive``).
    Returns:
        a :class:`MaskingReport`; ``outcomes`` holds, per sample, the first attack that broke
        it (``diagnosis:*``, ``follow-up:*``, ``adaptive:*``) or None when none did.
    """
    with warnings_once():  # a model warning (probabilities, train mode) once, not per attack
        return _diagnose(model, x, y, threat, follow_up=follow_up, fast=fast,
                         generator=generator, surrogate=surrogate, audit_flow=audit_flow,
                         checks=checks, budget=budget, recheck=recheck)


def _diagnose(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, *, follow_up: bool,
              fast: bool, generator: torch.Generator | int | None, surrogate: nn.Module | None,
              audit_flow: bool, checks: Iterable[str] | None, budget: Budget | None,
              recheck: bool) -> MaskingReport:
    start = time.perf_counter()
    ctx = Context(model, x, y, threat, budget=budget or Budget.for_mode(fast),
                  generator=generator, surrogate=surrogate)
    threat.check_for(ctx.x, stacklevel=4)
    results = run_checks(ctx, checks)
    random_model = not float((ctx.logits - ctx.logits2).abs().max()) <= 0.0
    if not ctx.n_att:
        report = _report(results, threat, ctx.x.shape[0], start, None, None)
        report.outcomes = _outcomes(ctx.correct, ctx.idx, [], None)
        return report

    flow_summary = collapse_at = None
    if audit_flow:
        try:
            m = min(ctx.n_att, 64)
            flow = audit(model, ctx.xc[:m], ctx.yc[:m], loss="ce")
            flow_summary, collapse_at = flow.summary, flow.collapse_at
        except Exception as err:  # the audit is evidence, not a precondition
            flow_summary = f"gradient-flow audit failed: {type(err).__name__}: {err}"

    report = _report(results, threat, ctx.x.shape[0], start, flow_summary, collapse_at,
                     bpda_target=bpda_wrap(model, ctx.xc, collapse_at) is not None)
    labels: list[str | None] = [None] * ctx.n_att
    if not random_model:  # a randomised model is judged by the follow-up's draws only
        if follow_up or "pgd" in ctx.__dict__:
            _label(labels, "diagnosis:pgd", ctx.pgd.success)
        for name, hit in ctx.hits.items():
            _label(labels, f"diagnosis:{name}", hit)
    rate = None
    if follow_up:
        report.follow_up = run_follow_up(model, ctx.xc, ctx.yc, threat, report, ctx.g,
                                         ctx.steps, ctx.budget.queries, ctx.pgd, ctx.x.shape[0])
        who = report.follow_up.pop("_who")
        rate = report.follow_up.pop("_rate")
        for i, w in enumerate(who):
            if w is not None and labels[i] is None:
                labels[i] = f"follow-up:{w}"
        if recheck and report.verdict is Verdict.MASKED:
            report.adaptive = _recheck(ctx, report, labels, checks)
        report.seconds = time.perf_counter() - start
    report.outcomes = _outcomes(ctx.correct, ctx.idx, labels, rate)
    return report


def _label(labels: list[str | None], name: str, hit: Tensor) -> None:
    for i in hit.nonzero().flatten().tolist():
        labels[i] = labels[i] or name


def _recheck(ctx: Context, report: MaskingReport, labels: list[str | None],
             names: Iterable[str] | None) -> dict:
    """Re-run the attack checks with every white-box attack adapted to the fired mechanism
    (BPDA, scale-free logits). Passing them all makes a masked report rankable."""
    found = adaptation(ctx.model, ctx.xc, report)
    if found is None:
        kinds = sorted({c.kind.value for c in report.failed})
        return {"attack": None, "passed": False, "failed": [],
                "reason": f"no adaptation re-checks the fired mechanism(s) {kinds} here",
                "checks": []}
    label, adapt, view = found
    wanted = [n for n, c in CHECKS.items() if c.family in ADAPTIVE_FAMILIES
              and (names is None or n in set(names))]
    actx = Context(ctx.model, ctx.x, ctx.y, ctx.threat, budget=ctx.budget, generator=ctx.g,
                   surrogate=ctx.surrogate, adapt=adapt, view=view, adaptive=label)
    results = run_checks(actx, wanted)
    # Every sample the adapted attacks broke counts against the row, like any other attack.
    by_id = {int(i): j for j, i in enumerate(ctx.idx.tolist())}
    if "pgd" in actx.__dict__:
        _merge_labels(labels, by_id, actx.idx, "adaptive:pgd", actx.pgd.success)
    for name, hit in actx.hits.items():
        _merge_labels(labels, by_id, actx.idx, f"adaptive:{name}", hit)
    failed = [c.name for c in results if not c.passed and c.skipped is None]
    return {"attack": label, "passed": not failed, "failed": failed,
            "checks": [c.to_dict() for c in results]}


def _merge_labels(labels, by_id, idx, name, hit) -> None:
    for j in hit.nonzero().flatten().tolist():
        k = by_id.get(int(idx[j]))
        if k is not None and labels[k] is None:
            labels[k] = name


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


def _report(checks: list[CheckResult], threat, n, start, flow_summary, collapse_at, *,
            bpda_target: bool = False) -> MaskingReport:
    """The verdict and the next attack; ``bpda_target``: something BPDA can approximate is
    known (a module where the gradient dies, a declared approximation, rounding ops)."""
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
            # Nothing to approximate with BPDA: a different loss surface and Square are left.
            recommended = ("Square (gradient-free) and APGD-DLR; BPDA once the "
                           "non-differentiable step is found")
    return MaskingReport(verdict, checks, recommended, threat, n, time.perf_counter() - start,
                         flow_summary, collapse_at)
