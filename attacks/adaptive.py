"""The budget-adaptive ensemble: AutoAttack's strength at a fraction of its cost.

AutoAttack's standard suite spends a fixed budget on every sample: APGD-CE (100 steps),
APGD-T against 9 target classes (100 steps each), FAB-T (9 targets) and Square (5,000
queries) on whatever survives. On an adversarially trained model most of that budget goes to
samples no attack will break: the targeted stages try 9 classes where one to three matter,
and Square's 5,000 queries per survivor are the largest single item although on a model with
trustworthy gradients it almost never breaks a sample the gradient attacks left.

The ``adaptive`` preset (:func:`adaptive_attacks`) spends the budget where the evidence says
it can pay:

1. **APGD-CE** (100 steps) on every sample; broken samples leave at the compaction points.
2. **APGD-T on the most promising classes** (:class:`APGDTMalt`): the target classes are
   ranked per sample by MALT's almost-linear estimate of the distance to each class's
   decision boundary (Melamed, Yehudai & Shamir, NeurIPS 2023),
   ``(z_y - z_t) / ||grad(z_y - z_t)||_*`` with ``||.||_*`` the dual norm of the threat's,
   instead of by clean logit; only the top ``n_targets`` (3) are attacked, in that order, each
   on the samples still robust. Ranking costs one forward and one backward pass per candidate
   class. Then the budget moves to where it can pay (A3's idea, Liu et al., CVPR 2022): the
   quarter of the survivors closest to the decision boundary (lowest margin) get eight more
   APGD-CE random restarts; the rest, whose margins all these runs left large, get none.
3. **Square only where gradients cannot be trusted** (:class:`AdaptiveSquare`): a cheap
   black-box check on the survivors (a randomness test, a gradient sanity test and a short
   Square probe). If the model is randomised, a survivor's input gradient is zero or not
   finite, or the probe breaks a sample every gradient attack left standing (black-box beats
   white-box: the signature of gradient masking), Square's full 5,000 queries run on the
   survivors after the probe; otherwise it stops at the probe.

Hopeless samples are not dropped early: every survivor gets the targeted stage. The
measurement in ``docs/performance.md`` (``results/perf/hopeless.json``) suggests a margin rule
could send only the closest survivors there; that change needs the comparison re-measured.

The budget can be given in forward+backward passes per sample (``budget=``): the step
counts and the probe scale down together, never below 10 steps per run.

Usage::

    result = Ensemble.preset("adaptive", Threat("linf", 0.3))(model, x, y, generator=0)
    result = Ensemble(adaptive_attacks(threat, budget=500))(model, x, y)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..bench.core import Norm, Threat, margin
from .apgd import APGD, APGDT, _apgd
from .base import Attack, register_attack, resolve_loss
from .ensemble import is_stochastic, register_preset
from .pgd import _positive_int
from .square import Square

__all__ = ["APGDTMalt", "AdaptiveSquare", "malt_order", "adaptive_attacks", "nominal_passes",
           "DEFAULT_STEPS", "DEFAULT_TARGETS", "DEFAULT_PROBE", "FULL_QUERIES"]

DEFAULT_STEPS = 100     # APGD-CE and each APGD-T run, as AutoAttack
DEFAULT_TARGETS = 3     # MALT-ranked target classes attacked per sample
DEFAULT_CANDIDATES = 9  # classes MALT ranks (AutoAttack's 9 targets), by clean logit first
DEFAULT_REFINE_SHARE = 0.25   # survivors (lowest margins) given extra restarts
DEFAULT_REFINE_RESTARTS = 8    # APGD-CE random restarts for each of them
DEFAULT_PROBE = 250     # Square queries of the black-box check
FULL_QUERIES = 5000     # Square's budget once gradients are distrusted, as AutoAttack
MIN_STEPS = 10
MIN_PROBE = 50


def malt_order(model, x: Tensor, y: Tensor, norm: Norm, candidates: int) -> tuple[Tensor, int]:
    """MALT's target ranking (Melamed, Yehudai & Shamir, "MALT Powers Up Adversarial
    Attacks", NeurIPS 2023): for each of the ``candidates`` classes with the highest clean
    logits after the true one, the almost-linear estimate of the distance to that class's
    decision boundary, ``(z_y - z_t) / ||grad_x (z_y - z_t)||_*`` (``*``: L1 for Linf, L2 for
    L2); classes in increasing estimate, the true class first.

    Returns ``(order, backwards)``: ``order`` int64 ``N x (candidates + 1)`` with column 0 the
    true class, and the number of backward passes spent per sample (one forward is spent too).
    """
    xr = x.detach().requires_grad_(True)
    logits = model(xr)
    c = logits.shape[1]
    k = min(candidates, c - 1)
    with torch.no_grad():
        others = logits.detach().scatter(1, y[:, None], float("-inf"))
        cand = others.argsort(dim=1, descending=True)[:, :k]
    true = logits.gather(1, y[:, None]).squeeze(1)
    scores = []
    for r in range(k):
        diff = true - logits.gather(1, cand[:, r:r + 1]).squeeze(1)
        (g,) = torch.autograd.grad(diff.sum(), xr, retain_graph=r < k - 1)
        dual = g.flatten(1).abs().sum(1) if norm is Norm.LINF else g.flatten(1).norm(dim=1)
        # A zero or non-finite gradient carries no direction: rank that class last.
        est = diff.detach() / dual
        scores.append(torch.where(torch.isfinite(est) & (dual > 0), est,
                                  torch.full_like(est, float("inf"))))
    rank = torch.stack(scores, 1).argsort(dim=1, stable=True)
    return torch.cat([y[:, None], cand.gather(1, rank)], 1), k


@register_attack("apgd-t-malt")
class APGDTMalt(APGDT):
    """APGD-T on the classes MALT ranks most promising (Melamed et al., NeurIPS 2023).

    Threat model: white-box, ``Linf`` or ``L2`` ball of radius ``eps`` intersected with
    [0, 1]; untargeted success criterion (the attack picks its targets).

    As :class:`APGDT`, except the order of the target classes: among the ``candidates``
    classes with the highest clean logits, each sample's classes are ranked by the
    almost-linear distance estimate of :func:`malt_order`, and the first ``n_targets`` are
    attacked (one APGD run each, on the samples still robust). The ranking costs one forward
    and ``candidates`` backward passes per sample, counted in the result. Then the
    ``refine_share`` of the survivors with the lowest margins get ``refine_restarts`` more
    APGD-CE runs from random starts (budget reallocation: samples left near the boundary are
    the ones more restarts break).

    Args:
        threat: ``Threat("linf" | "l2", eps)``.
        steps: iterations per run (default 100).
        n_targets: classes attacked per sample (default 3).
        candidates: classes ranked (default 9; at most K - 1).
        refine_share: share of the survivors, lowest margins first, refined (default 0.25).
        refine_restarts: APGD-CE restarts for each of them (default 8; 0 disables).
        restarts, rho, momentum: as :class:`APGDT`.

    Shapes: ``x`` N x C x H x W in [0, 1], ``y`` int64 N ->
    :class:`~unmask.bench.core.AttackResult`.

    Usage: ``APGDTMalt(Threat("linf", 0.3), n_targets=3)(model, x, y, generator=0)``
    """

    name = "apgd-t-malt"

    def __init__(self, threat: Threat, steps: int = DEFAULT_STEPS,
                 n_targets: int = DEFAULT_TARGETS, candidates: int = DEFAULT_CANDIDATES,
                 refine_share: float = DEFAULT_REFINE_SHARE,
                 refine_restarts: int = DEFAULT_REFINE_RESTARTS,
                 restarts: int = 1, rho: float = 0.75, momentum: float = 0.75) -> None:
        super().__init__(threat, steps=steps, n_targets=n_targets, restarts=restarts, rho=rho,
                         momentum=momentum)
        self.candidates = _positive_int(candidates, "candidates")
        if not 0 <= refine_share <= 1:
            raise ValueError(f"refine_share must be in [0, 1], got {refine_share}")
        if isinstance(refine_restarts, bool) or not isinstance(refine_restarts, int) \
                or refine_restarts < 0:
            raise ValueError(f"refine_restarts must be an int >= 0, got {refine_restarts!r}")
        self.refine_share, self.refine_restarts = float(refine_share), refine_restarts
        self._ce = resolve_loss("ce")[1]
        if self.n_targets > self.candidates:
            raise ValueError(f"n_targets ({self.n_targets}) must be at most candidates "
                             f"({self.candidates})")

    @property
    def label(self) -> str:
        return "apgd-t-malt"

    def config(self):
        return {**super().config(), "candidates": self.candidates, "ranking": "malt",
                "refine_share": self.refine_share, "refine_restarts": self.refine_restarts}

    def _attack(self, model, x, y, targets, generator, tracker, idx, oracle) -> None:
        super()._attack(model, x, y, targets, generator, tracker, idx, oracle)
        if not self.refine_restarts or not self.refine_share:
            return
        idx = idx[tracker.robust(idx)]  # host read: once, between the phases
        if not idx.numel():
            return
        k = math.ceil(self.refine_share * idx.numel())
        promising = idx[tracker.margin[idx].argsort(stable=True)[:k]]
        for _, active in tracker.runs(promising, range(self.refine_restarts)):
            _apgd(self, model, x, y, None, None, generator, tracker, active, oracle, self._ce)

    def _target_order(self, model, x, y, generator, tracker, idx, oracle) -> Tensor:
        if oracle.samples != 1 or oracle.transform is not None:  # EOT: rank by mean logits
            return super()._target_order(model, x, y, generator, tracker, idx, oracle)
        order, backwards = malt_order(model, x[idx], y[idx], self.threat.norm, self.candidates)
        tracker.cost(idx, 1, backwards)
        return order


@register_attack("square-adaptive")
class AdaptiveSquare(Attack):
    """Square whose budget grows only where gradients cannot be trusted.

    Threat model: black-box score-based search (Square) after a white-box check, ``Linf`` or
    ``L2`` ball of radius ``eps`` intersected with [0, 1]; untargeted or targeted.

    Meant to run last in a cascade, on the samples every gradient attack left robust. It
    first collects evidence on those samples:

    * **randomness**: two forward passes on the same inputs differ (1 forward per sample);
    * **gradient sanity**: the margin loss's input gradient is zero or not finite for some
      sample (1 forward + 1 backward per sample);
    * **black-box check**: a Square probe of ``probe`` queries; a sample it breaks is one the
      gradient attacks missed (black-box beats white-box).

    Any of the three distrusts the gradients: Square then runs its full ``queries`` on the
    samples still robust, starting from the probe's best points (so an escalated run never
    spends fewer queries than plain Square). With none, the attack stops after the probe.
    ``result.config["escalated"]`` and ``["reasons"]`` record the decision.

    Args:
        threat: ``Threat("linf" | "l2", eps)``.
        probe: queries of the black-box check (default 250).
        queries: Square's budget once escalated, on top of the probe (default 5,000,
            AutoAttack's).
        p_init: Square's initial square size share (default 0.8).

    Shapes: ``x`` N x C x H x W in [0, 1], ``y`` int64 N ->
    :class:`~unmask.bench.core.AttackResult`.

    Usage: ``AdaptiveSquare(Threat("linf", 0.3))(model, x, y, generator=0)``
    """

    name = "square-adaptive"
    gradient_free = True  # its search is score-based: autocast never applies to it

    def __init__(self, threat: Threat, probe: int = DEFAULT_PROBE, queries: int = FULL_QUERIES,
                 p_init: float = 0.8) -> None:
        super().__init__(threat)
        self.probe = _positive_int(probe, "probe")
        self.queries = _positive_int(queries, "queries")
        self.p_init = float(p_init)
        Square(threat, queries=self.queries, p_init=p_init)  # validates p_init

    def config(self):
        return {**super().config(), "probe": self.probe, "queries": self.queries,
                "p_init": self.p_init}

    def _distrust(self, model, x, y, targets, tracker, idx) -> list[str]:
        """The reasons (possibly none) to distrust the gradients on the samples ``idx``."""
        reasons = []
        xa, ya = x[idx], y[idx]
        ta = targets[idx] if targets is not None else None
        xr = xa.detach().requires_grad_(True)
        logits = model(xr)
        with torch.no_grad():
            stochastic = is_stochastic(model, xa, logits.detach())
        tracker.cost(idx, 2, 1)
        if stochastic:
            reasons.append("randomised model")
        (g,) = torch.autograd.grad(margin(logits, ya, ta).sum(), xr)
        flat = g.flatten(1)
        dead = ~torch.isfinite(flat).all(1) | (flat.abs().amax(1) == 0)
        if bool(dead.any()):
            reasons.append(f"zero or non-finite gradient on {int(dead.sum())} sample(s)")
        return reasons

    def _attack(self, model, x, y, targets, generator, tracker, idx, oracle) -> None:
        reasons = self._distrust(model, x, y, targets, tracker, idx)
        probe = Square(self.threat, queries=self.probe, p_init=self.p_init)
        probe._attack(model, x, y, targets, generator, tracker, idx, oracle)
        broken = int((~tracker.robust(idx)).sum())
        if broken:
            reasons.append(f"the {self.probe}-query probe broke {broken} sample(s) the "
                           "gradient attacks left (black-box beats white-box)")
        escalate = bool(reasons)
        tracker.extra.update({"escalated": escalate, "reasons": reasons})
        if not escalate:
            return
        idx = idx[tracker.robust(idx)]
        if idx.numel():  # the full budget on top of the probe: never less than plain Square
            full = Square(self.threat, queries=self.queries, p_init=self.p_init)
            full._attack(model, x, y, targets, generator, tracker, idx, oracle)


def nominal_passes(steps: int = DEFAULT_STEPS, n_targets: int = DEFAULT_TARGETS,
                   candidates: int = DEFAULT_CANDIDATES, probe: int = DEFAULT_PROBE,
                   refine_share: float = DEFAULT_REFINE_SHARE,
                   refine_restarts: int = DEFAULT_REFINE_RESTARTS) -> int:
    """Forward+backward passes per sample of the preset, for a sample that survives every
    stage without escalation (the clean pass of each stage included), the refinement counted
    at its average (``refine_share`` of the survivors get ``refine_restarts`` runs): APGD-CE
    ``2 (steps + 1)``, ranking ``1 + candidates``, APGD-T ``n_targets x 2 (steps + 1)``, the
    refinement, the check ``3`` and the probe."""
    run = 2 * (steps + 1)
    return (1 + run) + (1 + 1 + candidates + n_targets * run) \
        + round(refine_share * refine_restarts * run) + (1 + 3 + probe)


def adaptive_attacks(threat: Threat, budget: int | None = None) -> list[Attack]:
    """The ``adaptive`` cascade for ``threat``: APGD-CE, :class:`APGDTMalt`,
    :class:`AdaptiveSquare` (module docstring). ``budget``: forward+backward passes per
    surviving sample for the non-escalated cascade (:func:`nominal_passes`, 1,478 by default);
    the steps and the probe scale down with it (never below 10 steps, 50 probe queries)."""
    steps, probe = DEFAULT_STEPS, DEFAULT_PROBE
    if budget is not None:
        budget = _positive_int(budget, "budget")
        floor = nominal_passes(MIN_STEPS, probe=MIN_PROBE)
        if budget < floor:
            raise ValueError(f"budget must be at least {floor} passes per sample "
                             f"({MIN_STEPS} steps per run, a {MIN_PROBE}-query probe), "
                             f"got {budget}")
        if budget < nominal_passes():
            probe = max(MIN_PROBE, DEFAULT_PROBE * budget // nominal_passes())
            steps = MIN_STEPS
            while nominal_passes(steps + 1, probe=probe) <= budget:
                steps += 1
    return [APGD(threat, steps=steps, loss="ce"), APGDTMalt(threat, steps=steps),
            AdaptiveSquare(threat, probe=probe)]


@register_preset("adaptive")
def adaptive(threat: Threat, budget: int | None = None) -> list[Attack]:
    """Budget-adaptive AutoAttack: APGD-CE (100 steps), APGD-T on the 3 MALT-ranked classes
    (100 steps each), Square probe of 250 queries growing to 5,000 only where gradients are
    distrusted (:mod:`unmask.attacks.adaptive`)."""
    return adaptive_attacks(threat, budget)
