"""The follow-up: the adaptive attacks the failed checks point to, and the adaptation the
checks are re-run against (:func:`adaptation`) to decide whether a masked model's number can
be ranked."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ...attacks import APGD, BPDA, EOT, PGD, Square, success_rate
from ...attacks.base import Attack
from ...attacks.bpda import StraightThroughMode, find_preprocessing
from ...bench.core import looks_like_probabilities, model_mode, robust_by_majority
from .report import MaskingKind

# Follow-up on a randomised model: EOT over 16 draws per gradient brings the gradient's noise
# below its signal for the noise levels defenses use (the variance falls as 1/samples; 10 was
# Athalye et al.'s minimum), APGD's step-size schedule copes with what remains, and 32 fresh
# draws judge success in expectation (standard error <= 9 points per sample, so a majority
# call errs only near a 50% rate).
EOT_SAMPLES, EOT_STEPS, FOLLOW_UP_DRAWS = 16, 50, 32


def follow_up(model, x, y, threat, report, g, steps, queries, r_pgd, n_total):
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
        # Then the margin loss through the same approximation, with five times the steps: a
        # defense that saturates or pulls points back (a detector answering at x100
        # confidence, a purifier) stops CE-PGD short of the boundary; the logit margin keeps
        # pushing past it (Carlini & Wagner 2017).
        label, _ = bpda
        long_steps = max(5 * steps, 50)
        attacks.append((label.replace("BPDA-PGD", f"BPDA-PGD-margin-{long_steps}"),
                        _bpda_for(model, x, report, threat, steps,
                                  attack=PGD(threat, steps=long_steps, loss="margin"))[1]))
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


def uses_rounding(model: nn.Module, x: Tensor) -> bool:
    """Whether ``model``'s forward calls a non-differentiable torch function (``torch.round``,
    ``floor``, ``sign``, ...) on a tensor that carries the input's gradient."""
    mode = StraightThroughMode()
    xr = x[:1].detach().clone().requires_grad_(True)
    with model_mode(model), torch.enable_grad(), mode:
        model(xr)
    return mode.calls > 0


def bpda_wrap(model: nn.Module, x: Tensor, collapse_at: str | None
              ) -> tuple[str, Callable[[Attack], Attack]] | None:
    """How to BPDA-wrap a gradient attack on ``model``: declared approximations, else the
    identity at the module where the gradient dies (``collapse_at``, when it keeps its input's
    shape), else straight-through torch functions called inside forward. None when nothing
    is found to approximate. Returns ``(label suffix, wrap)``."""
    if find_preprocessing(model):
        return "", lambda attack: BPDA(attack)
    modules = dict(model.named_modules())
    name = collapse_at
    if name and name in modules:
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
            # By module, not name: the same module hooked inside a wrapper (the binarization
            # test's feature head, the scale-free view) has another qualified name.
            return f"@{name}", lambda attack: BPDA(attack, approximations=[module])
    if uses_rounding(model, x):
        return "(straight-through ops)", lambda attack: BPDA(attack, functional=True)
    return None


class ScaleFree(nn.Module):
    """A view of ``model`` for gradient attacks on saturated outputs: log-probabilities when
    the model returns probabilities, then every row divided by its (detached) standard
    deviation. The argmax, hence every attack's success, is the model's; the CE gradient no
    longer underflows (Carlini & Wagner 2017's remedy, as a model transformation)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        z = self.model(x)
        if looks_like_probabilities(z.detach()):
            z = z.clamp_min(1e-30).log()
        scale = z.detach().std(dim=1, keepdim=True).clamp_min(1e-12)
        return z / scale


def adaptation(model: nn.Module, x: Tensor, report) -> tuple[str, Callable, nn.Module] | None:
    """The adaptation the masking checks are re-run against when ``report`` is masked:
    ``(label, adapt, view)`` with every gradient attack run as ``adapt(attack)(view, ...)``.
    BPDA addresses shattered gradients, the scale-free view vanishing ones. None when a fired
    mechanism has no adaptation here: randomness (a randomised model is judged in expectation
    by the follow-up; Square and noise would count lucky draws in the re-checks), or a
    shattered gradient with nothing for BPDA to approximate."""
    kinds = {c.kind for c in report.failed}
    if MaskingKind.STOCHASTIC in kinds:
        return None
    labels, adapt, view = [], (lambda attack: attack), model
    if MaskingKind.SHATTERED in kinds:
        found = bpda_wrap(model, x, report.collapse_at)
        if found is None:
            return None
        labels.append(f"BPDA{found[0]}")
        adapt = found[1]
    if MaskingKind.VANISHING in kinds:
        labels.append("scale-free logits")
        view = ScaleFree(model)
    if not labels:
        return None
    return " + ".join(labels), adapt, view


def _bpda_for(model, x, report, threat, steps, attack=None):
    """The follow-up's BPDA-PGD (or BPDA around ``attack``), or None (see
    :func:`bpda_wrap`)."""
    found = bpda_wrap(model, x, report.collapse_at)
    if found is None:
        return None
    return f"BPDA-PGD{found[0]}", found[1](attack or PGD(threat, steps=steps))
