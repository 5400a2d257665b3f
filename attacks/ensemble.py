"""The worst-case ensemble: run attacks in order, each only on the samples still robust, and
report per sample whether it survived all of them and which attack broke it (the cascade of
AutoAttack, Croce & Hein 2020). Robust accuracy is the per-sample worst case, never an
average over attacks or restarts.

Presets (the registry :data:`PRESETS`; ``register_preset`` adds one):

* ``quick``     FGSM, PGD-20;
* ``standard``  APGD-CE (100 steps), APGD-T (9 targets, 100 steps), Square (5,000 queries):
  AutoAttack's standard suite;
* ``adaptive``  APGD-CE, APGD-T on the 3 MALT-ranked classes plus restarts near the boundary,
  and Square that grows past a 250-query probe only where gradients are distrusted
  (:mod:`unmask.attacks.adaptive`); takes a ``budget`` in passes per sample.

Randomised models: the ensemble detects a model whose outputs change between two forward
passes on the same input. Then every candidate example is judged over ``draws`` (default
:data:`unmask.bench.core.DRAWS`) fresh forward passes, and a sample is robust iff
:func:`unmask.bench.core.robust_by_majority` holds for the best candidate's fooled rate (correct
on a strict majority of the draws; a tie or NaN is broken): the one definition the runner, the
pytest helper and the leaderboard share. Robust accuracy is the share of robust samples (its
uncertainty: the Wilson interval over samples); the spread of the per-draw accuracy is kept as
secondary evidence (``robust_accuracy_draws``, ``robust_accuracy_std``).

Reduced-precision search: ``precision="bf16"`` (or ``"fp16"``) runs the gradient attacks on
the model under autocast, about 2x faster where the hardware has bf16 units, and judges each
candidate with the fp32 model: a sample counts as broken only when the fp32 model misclassifies
its ``x_adv``. A candidate that fools the bf16 model only is attacked again in fp32
(``costs[label].rejected`` counts them). Score-based attacks (Square) always run in fp32: they
compare margins between queries, and bf16 rounding of the logits swamps those differences
(measured in docs/performance.md). Off by default: results are not bit-identical to fp32's.

Usage::

    result = Ensemble.preset("standard", Threat("linf", 0.3))(model, x, y, generator=g)
    result.robust_accuracy, result.broken_by
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..bench.core import (
    DRAWS,
    AttackResult,
    Autocast,
    Precision,
    Threat,
    check_inputs,
    check_logits,
    make_generator,
    margin,
    model_mode,
    parse_enum,
    robust_by_majority,
    warn_if_train_mode,
)
from ..bench.core.registry import Registry
from .apgd import APGD, APGDT
from .base import Attack
from .eot import success_rate
from .fgsm import FGSM
from .pgd import PGD, _positive_int
from .square import Square

__all__ = ["Ensemble", "EnsembleResult", "PRESETS", "register_preset", "is_stochastic",
           "attack_in_precision"]

# Ensemble presets: name -> a function of the threat returning the attacks of the cascade, in
# order. ``Ensemble.preset(name, threat)``, the CLI's ``--attack`` and the suite's
# ``[attacks] preset`` all read this registry.
PRESETS: Registry[Callable[[Threat], list[Attack]]] = Registry("ensemble preset")
register_preset = PRESETS.register
CLEAN = "clean"  # broken_by value of samples the model misclassifies without any attack


@dataclass
class AttackCost:
    """What one attack of the cascade cost and achieved."""

    attacked: int
    broken: int
    forwards: int
    backwards: int
    seconds: float
    rejected: int = 0  # candidates that fooled the reduced-precision search model only

    def to_dict(self) -> dict[str, Any]:
        """The cost record as a JSON-ready dict."""
        return dict(vars(self))


@dataclass
class EnsembleResult:
    """Per-sample outcome of the worst-case ensemble.

    Attributes:
        x_adv: per sample the adversarial example that broke it, else the clean input.
        robust: bool ``N``; survived every attack (and was classified correctly).
        clean_correct: bool ``N``.
        broken_by: per sample the label of the attack that broke it, ``"clean"`` when it was
            misclassified to begin with, or None when robust.
        margin: float ``N``; the lowest margin found (negative = broken).
        costs: per attack label, an :class:`AttackCost`.
        stochastic: the model's outputs were random; then ``success_rate`` holds each sample's
            fooled rate over ``draws`` fresh passes (robust iff
            :func:`~unmask.bench.core.robust_by_majority`), ``robust_accuracy_draws`` the
            accuracy of each draw and ``robust_accuracy_std`` their spread (secondary
            evidence; the robust accuracy is the share of ``robust`` samples).
    """

    x_adv: Tensor
    robust: Tensor
    clean_correct: Tensor
    broken_by: list[str | None]
    margin: Tensor
    costs: dict[str, AttackCost]
    threat: Threat
    stochastic: bool = False
    success_rate: Tensor | None = None
    robust_accuracy_draws: Tensor | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """The number of samples evaluated."""
        return int(self.robust.numel())

    @property
    def robust_accuracy(self) -> float:
        """Share of samples robust (for a randomised model: by majority over the draws)."""
        return float(self.robust.float().mean())

    @property
    def robust_accuracy_std(self) -> float:
        """Spread (std) of the per-draw robust accuracy for a randomised model; 0.0 for a
        deterministic one.
        """
        if self.robust_accuracy_draws is None:
            return 0.0
        return float(self.robust_accuracy_draws.std(unbiased=False))

    @property
    def clean_accuracy(self) -> float:
        """Share of samples classified correctly before any attack."""
        return float(self.clean_correct.float().mean())

    def to_dict(self) -> dict[str, Any]:
        """The summary as a JSON-ready dict: threat, n, clean and robust accuracy, counts of samples
        broken per attack, costs per attack, config (the per-sample tensors are not included).
        """
        return {
            "threat": self.threat.to_dict(),
            "n": self.n,
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": self.robust_accuracy,
            "robust_accuracy_std": self.robust_accuracy_std,
            "stochastic": self.stochastic,
            "broken_by": {k: sum(1 for b in self.broken_by if b == k)
                          for k in sorted({b for b in self.broken_by if b is not None})},
            "costs": {k: v.to_dict() for k, v in self.costs.items()},
            "config": self.config,
        }


@torch.no_grad()
def is_stochastic(model: nn.Module, x: Tensor, logits: Tensor | None = None) -> bool:
    """True when two forward passes on the same inputs differ (a randomised model)."""
    first = model(x) if logits is None else logits
    return not torch.equal(first, model(x))


def _search_model(attack: Attack, model: nn.Module, precision: Precision) -> nn.Module:
    """The model ``attack`` searches on: under autocast for gradient attacks in reduced
    precision; score-based attacks compare margins between queries and keep fp32."""
    if precision is Precision.FP32 or attack.gradient_free:
        return model
    return Autocast(model, precision)


def attack_in_precision(attack: Attack, model: nn.Module, x: Tensor, y: Tensor, *,
                        precision: str | Precision,
                        generator: torch.Generator | int | None = None
                        ) -> tuple[AttackResult, int]:
    """Run ``attack``'s search in ``precision`` and judge its result with ``model`` (fp32).

    Gradient attacks search on ``Autocast(model, precision)``; the returned
    :class:`AttackResult`'s ``margin`` and ``success`` are the fp32 model's on ``x_adv``. Samples
    whose reduced-precision candidate fools only the reduced-precision model are attacked again
    in fp32, so a rounding artefact never costs a break. Score-based attacks and ``"fp32"`` run
    as they are. Returns ``(result, rejected)``, the number of candidates the fp32 model
    rejected. For deterministic models (a randomised model is judged by the ensemble's draws).
    """
    search = _search_model(attack, model, parse_enum(Precision, precision, "precision"))
    res = attack(search, x, y, generator=generator)
    if search is model:
        return res, 0
    with model_mode(model), torch.no_grad():  # the verdict is the fp32 model's
        judged = margin(model(res.x_adv), y)
    res.forwards = res.forwards + 1
    rejected = res.success & (judged >= 0)
    res.margin, res.success = judged, judged < 0
    count = int(rejected.sum())
    if count:
        idx = rejected.nonzero().flatten()
        again = attack(model, x[idx], y[idx], generator=generator)
        better = again.margin < res.margin[idx]
        res.margin[idx] = torch.where(better, again.margin, res.margin[idx])
        res.x_adv[idx] = torch.where(better.view(-1, *[1] * (x.dim() - 1)), again.x_adv,
                                     res.x_adv[idx])
        res.success[idx] = res.margin[idx] < 0
        res.forwards[idx] += again.forwards
        res.backwards[idx] += again.backwards
    return res, count


class Ensemble:
    """Run ``attacks`` in order on the samples still robust; the per-sample worst case."""

    def __init__(self, attacks: Sequence[Attack], *, draws: int = DRAWS,
                 precision: str | Precision = "fp32", progress: bool = False) -> None:
        attacks = list(attacks)
        if not attacks:
            raise ValueError("an ensemble needs at least one attack")
        for a in attacks:
            if not isinstance(a, Attack):
                raise TypeError(f"ensemble members must be unmask attacks, got {type(a).__name__}")
        threats = {a.threat for a in attacks}
        if len(threats) > 1:
            raise ValueError("all attacks of an ensemble must share one threat model, got "
                             + ", ".join(sorted(map(str, threats))))
        self.attacks = attacks
        self.threat = attacks[0].threat
        self.draws = _positive_int(draws, "draws")
        self.precision = parse_enum(Precision, precision, "precision")
        self.progress = progress
        labels, seen = [], {}
        for a in attacks:  # unique labels for the table, in order
            seen[a.label] = seen.get(a.label, 0) + 1
            labels.append(a.label if seen[a.label] == 1 else f"{a.label}#{seen[a.label]}")
        self.labels = labels

    @classmethod
    def preset(cls, name: str, threat: Threat, *, budget: int | None = None,
               **kwargs) -> Ensemble:
        """A registered ensemble (:data:`PRESETS`): ``quick`` (FGSM, PGD-20), ``standard``
        (APGD-CE, APGD-T, Square-5000) or ``adaptive`` (:mod:`unmask.attacks.adaptive`); an
        unknown name raises ``ValueError`` naming them. ``budget``: forward+backward passes
        per sample, for the presets whose factory takes one (``adaptive``)."""
        factory = PRESETS.get(name)
        if budget is None:
            return cls(factory(threat), **kwargs)
        if "budget" not in inspect.signature(factory).parameters:
            takes = [n for n in PRESETS.names()
                     if "budget" in inspect.signature(PRESETS.get(n)).parameters]
            raise ValueError(f"preset {name!r} has a fixed budget; a budget in passes per "
                             f"sample works with: {', '.join(takes) or 'none'}")
        return cls(factory(threat, budget=budget), **kwargs)

    def config(self) -> dict[str, Any]:
        """The ensemble's settings (attacks' configs, draws, threat, precision) for provenance."""
        out = {"attacks": [a.config() for a in self.attacks], "draws": self.draws,
               **self.threat.to_dict()}
        if self.precision is not Precision.FP32:  # absent for fp32: older records stay equal
            out["precision"] = self.precision.value
        return out

    def __repr__(self) -> str:
        return f"Ensemble([{', '.join(map(repr, self.attacks))}])"

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, *,
                 generator: torch.Generator | int | None = None) -> EnsembleResult:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        x, y = check_inputs(x, y, model=model)
        self.threat.check_for(x)
        generator = make_generator(0 if generator is None else generator)
        warn_if_train_mode(model, stacklevel=3)
        n = x.shape[0]
        with model_mode(model), torch.no_grad():
            logits = check_logits(model(x), n, model=model, labels=y)
            stochastic = is_stochastic(model, x, logits)
            if stochastic:
                rates = success_rate(model, x, y, draws=self.draws, generator=generator)
                clean_correct = robust_by_majority(rates)
            else:
                rates = None
                clean_correct = margin(logits, y) >= 0
        best_margin = margin(logits, y)
        robust = clean_correct.clone()
        x_adv = x.detach().clone()
        broken_by: list[str | None] = [None if c else CLEAN for c in clean_correct.tolist()]
        best_rate = rates.clone() if rates is not None else None
        costs: dict[str, AttackCost] = {}
        bar = tqdm(list(zip(self.labels, self.attacks)), desc=f"ensemble {self.threat}",
                   disable=None if self.progress else True, leave=False)
        for label, attack in bar:
            idx = robust.nonzero().flatten()
            if not idx.numel():
                costs[label] = AttackCost(0, 0, 0, 0, 0.0)
                continue
            bar.set_postfix(attack=label, robust=f"{idx.numel()}/{n}")
            start = time.perf_counter()
            if stochastic:  # judged below by the fp32 model's success rate over draws
                res = attack(_search_model(attack, model, self.precision), x[idx], y[idx],
                             generator=generator)
                rejected = 0
            else:
                res, rejected = attack_in_precision(attack, model, x[idx], y[idx],
                                                    precision=self.precision, generator=generator)
            # Every candidate counts only once re-checked here: inside the threat ball and
            # [0, 1], and misclassified by the fp32 model (an attack's own bookkeeping, a
            # reduced-precision search or a bug in a new attack never breaks a sample).
            inside = self.threat.contains(res.x_adv, x[idx])
            if stochastic:
                cand_rate = success_rate(model, res.x_adv, y[idx], draws=self.draws,
                                         generator=generator)
                cand_rate = torch.where(inside, cand_rate, torch.zeros_like(cand_rate))
                better = (cand_rate > best_rate[idx]) | cand_rate.isnan()
                best_rate[idx] = torch.where(better, cand_rate, best_rate[idx])
                x_adv[idx] = torch.where(better.view(-1, 1, 1, 1), res.x_adv, x_adv[idx])
                broke = ~robust_by_majority(cand_rate)
                extra_forwards = self.draws * idx.numel()
            else:
                with model_mode(model), torch.no_grad():
                    judged = margin(model(res.x_adv), y[idx])
                # Outside the ball: never a candidate. NaN on a perturbed input: broken (NaN is
                # never robustness).
                res.margin = torch.where(inside, judged, torch.full_like(judged, float("inf")))
                better = res.margin < best_margin[idx]
                x_adv[idx] = torch.where(better.view(-1, 1, 1, 1), res.x_adv, x_adv[idx])
                broke = inside & ~(judged >= 0)
                extra_forwards = int(idx.numel())
            best_margin[idx] = torch.minimum(best_margin[idx], res.margin)
            robust[idx[broke]] = False
            for i in idx[broke].tolist():
                broken_by[i] = label
            costs[label] = AttackCost(attacked=int(idx.numel()), broken=int(broke.sum()),
                                      forwards=res.n_forward + extra_forwards,
                                      backwards=res.n_backward,
                                      seconds=time.perf_counter() - start, rejected=rejected)
        bar.close()
        draws_acc = None
        if stochastic:
            with model_mode(model), torch.no_grad():
                per_draw = []
                for _ in range(self.draws):
                    per_draw.append((margin(model(x_adv), y) >= 0).float().mean())
                draws_acc = torch.stack(per_draw)
        return EnsembleResult(x_adv=x_adv, robust=robust, clean_correct=clean_correct,
                              broken_by=broken_by, margin=best_margin, costs=costs,
                              threat=self.threat, stochastic=stochastic,
                              success_rate=best_rate, robust_accuracy_draws=draws_acc,
                              config=self.config())


@register_preset("quick")
def quick(threat: Threat) -> list[Attack]:
    """FGSM then PGD-20: a cheap first look (CI, smoke tests)."""
    return [FGSM(threat), PGD(threat, steps=20)]


@register_preset("standard")
def standard(threat: Threat) -> list[Attack]:
    """AutoAttack's standard suite (Croce & Hein 2020): APGD-CE (100 steps), APGD-T (9 targets,
    100 steps), Square (5,000 queries)."""
    return [APGD(threat, steps=100, loss="ce"), APGDT(threat, steps=100, n_targets=9),
            Square(threat, queries=5000)]
