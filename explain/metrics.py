"""Metrics that score explanations, so that attributions are measured, not only drawn.

* :func:`deletion_insertion`   faithfulness: deletion and insertion curves and their AUC (Petsiuk
  et al. 2018, "RISE: Randomized Input Sampling for Explanation of Black-box Models"), with a
  random-attribution baseline computed in the same run;
* :func:`model_randomisation`  sanity check: cascading model-parameter randomisation from the
  top layer down, with the Spearman rank correlation per layer (Adebayo et al. 2018, "Sanity
  Checks for Saliency Maps"); a method that passes decorrelates;
* :func:`max_sensitivity`      robustness: Captum ``sensitivity_max`` (Yeh et al. 2019, "On the
  (In)fidelity and Sensitivity of Explanations"), with seeded perturbations;
* :func:`attribution_change`   robustness: top-k intersection and rank correlation between the
  maps of a clean input and its adversarial example (Ghorbani et al. 2019, "Interpretation of
  Neural Networks is Fragile"); ``x_adv`` comes from the caller, so this module does not
  depend on any attack;
* :func:`completeness`         IG's completeness error ``|sum IG - (f(x) - f(b))|``
  (Sundararajan et al. 2017);
* :func:`trigger_localisation` the share of attribution mass inside a backdoor trigger.

The registry :data:`METRICS` names each of them for a suite (``[explain] metrics``): an
:class:`ExplanationMetric` turns :class:`MetricInputs` (model, samples, one method's maps) into
the stored numbers (:class:`MetricScore`), each with its declared range.

Maps are compared at pixel level: channels are summed (after the absolute value where a
function says so). Every result is a dataclass with ``to_dict()`` (plain floats and lists).

Usage::

    ig = attribute(model, x, y, "ig")
    res = deletion_insertion(model, x, ig, y, generator=0)
    res.deletion_auc.mean() < res.random_deletion_auc.mean()
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bench.core import check_images, make_generator, model_mode, normal, uniform
from ..bench.core.registry import Registry
from .attribution import (
    DEFAULT_INTERNAL_BATCH_SIZE,
    _chunks,
    _prepare,
    attribute,
    blur,
    integrated_gradients,
    method_options,
    parse_method,
)

__all__ = [
    "DeletionInsertionResult",
    "RandomisationResult",
    "SensitivityResult",
    "AttributionChangeResult",
    "CompletenessResult",
    "TriggerLocalisationResult",
    "deletion_insertion",
    "model_randomisation",
    "max_sensitivity",
    "attribution_change",
    "completeness",
    "trigger_localisation",
    "spearman",
    "topk_intersection",
    "pixel_map",
    "METRICS",
    "register_metric",
    "ExplanationMetric",
    "ScoreInfo",
    "score_infos",
    "MetricInputs",
    "MetricScore",
]

log = logging.getLogger(__name__)


# --- helpers -----------------------------------------------------------------------------------


def pixel_map(attributions: Tensor, absolute: bool = False) -> Tensor:
    """``N x C x H x W`` (or ``N x H x W``) -> ``N x (H*W)``: channels summed, optionally of
    absolute values."""
    a = attributions.abs() if absolute else attributions
    if a.dim() == 4:
        a = a.sum(dim=1)
    return a.flatten(1)


def _average_ranks(v: Tensor) -> Tensor:
    # Ties share their average rank: maps with large constant regions (IG is exactly 0 where
    # the input equals the baseline) must not correlate through an arbitrary tie order.
    v = v.contiguous()
    s = v.sort(dim=1).values
    left = torch.searchsorted(s, v, right=False)
    right = torch.searchsorted(s, v, right=True)
    return (left + right - 1).to(torch.float64) / 2


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Per-row Spearman rank correlation of two ``N x ...`` tensors (flattened), ties averaged.

    A row that is constant in either tensor has no ranking to share and gets 0.
    """
    if a.shape != b.shape:
        raise ValueError(f"spearman needs tensors of one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    ra, rb = _average_ranks(a.flatten(1)), _average_ranks(b.flatten(1))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    denom = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    corr = (ra * rb).sum(1) / denom.clamp_min(1e-300)
    return torch.where(denom > 0, corr, torch.zeros_like(corr)).to(a.dtype)


def _resolve_k(k: int | float, p: int) -> int:
    if isinstance(k, bool):
        raise ValueError(f"k must be an int >= 1 or a float fraction in (0, 1], got {k!r}")
    if isinstance(k, int):
        if k < 1:
            raise ValueError(f"k must be an int >= 1 or a float fraction in (0, 1], got {k}")
        return min(k, p)
    k = float(k)
    if not 0 < k <= 1:
        raise ValueError(f"k must be an int >= 1 or a float fraction in (0, 1], got {k}")
    return max(1, round(k * p))


def topk_intersection(a: Tensor, b: Tensor, k: int | float) -> Tensor:
    """Per row, the share of the ``k`` largest entries of ``a`` that are also among the ``k``
    largest of ``b`` (``N x ...`` tensors, flattened). ``k``: a count or a fraction."""
    a, b = a.flatten(1), b.flatten(1)
    kk = _resolve_k(k, a.shape[1])
    top_a = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(kk, dim=1).indices, True)
    top_b = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(kk, dim=1).indices, True)
    return (top_a & top_b).sum(1).to(a.dtype) / kk


def _check_attributions(attributions: Tensor, x: Tensor, name: str = "attributions") -> Tensor:
    if not isinstance(attributions, Tensor):
        raise TypeError(f"{name} must be a tensor of shape {tuple(x.shape)}, got "
                        f"{type(attributions).__name__}")
    if attributions.shape != x.shape:
        raise ValueError(f"{name} must have the shape of x {tuple(x.shape)}, got "
                         f"{tuple(attributions.shape)}")
    return attributions.to(x.device)


def _seed_from(generator: torch.Generator | int | None) -> int:
    """An int seed drawn from ``generator``, so that repeated calls see the same noise."""
    g = make_generator(generator)
    return int(torch.randint(0, 2**62, (1,), generator=g, device=g.device))


def _fixed_noise(method, options: dict[str, Any], generator) -> dict[str, Any]:
    # A stochastic method gets one fixed seed, so every call (perturbed input, randomised
    # model) sees the same noise and only the intended change differs.
    opts = dict(options)
    if "generator" in method_options(method):
        opts["generator"] = _seed_from(opts.get("generator", generator))
    return opts


# --- faithfulness: deletion / insertion --------------------------------------------------------


@dataclass
class DeletionInsertionResult:
    """Deletion and insertion curves (Petsiuk et al. 2018) of a map and of a random map.

    Attributes:
        fractions: ``S+1`` share of pixels deleted (inserted), 0 to 1.
        deletion, insertion: ``N x (S+1)`` softmax probability of the target class as the
            most-attributed pixels are replaced by the substrate (deletion; lower AUC is
            better) or revealed on it (insertion; higher AUC is better).
        random_deletion, random_insertion: the same for a uniformly random ranking, computed in
            the same run: the baseline a faithful map must beat.
    """

    fractions: Tensor
    deletion: Tensor
    insertion: Tensor
    random_deletion: Tensor
    random_insertion: Tensor
    substrate: str = "zeros"

    @staticmethod
    def _auc(curve: Tensor, fractions: Tensor) -> Tensor:
        return torch.trapezoid(curve, fractions.to(curve), dim=-1)

    @property
    def deletion_auc(self) -> Tensor:
        """``N``; area under the deletion curve (trapezoid over ``fractions``; lower is better)."""
        return self._auc(self.deletion, self.fractions)

    @property
    def insertion_auc(self) -> Tensor:
        """``N``; area under the insertion curve (higher is better)."""
        return self._auc(self.insertion, self.fractions)

    @property
    def random_deletion_auc(self) -> Tensor:
        """``N``; deletion AUC of the random ranking (the baseline)."""
        return self._auc(self.random_deletion, self.fractions)

    @property
    def random_insertion_auc(self) -> Tensor:
        """``N``; insertion AUC of the random ranking (the baseline)."""
        return self._auc(self.random_insertion, self.fractions)

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict: mean AUCs and the mean curves over the samples."""
        return {
            "n": int(self.deletion.shape[0]),
            "steps": int(self.fractions.numel() - 1),
            "substrate": self.substrate,
            "deletion_auc": float(self.deletion_auc.mean()),
            "insertion_auc": float(self.insertion_auc.mean()),
            "random_deletion_auc": float(self.random_deletion_auc.mean()),
            "random_insertion_auc": float(self.random_insertion_auc.mean()),
            "fractions": self.fractions.tolist(),
            "deletion_curve": self.deletion.mean(0).tolist(),
            "insertion_curve": self.insertion.mean(0).tolist(),
            "random_deletion_curve": self.random_deletion.mean(0).tolist(),
            "random_insertion_curve": self.random_insertion.mean(0).tolist(),
        }


def _substrate(x: Tensor, substrate: str | float) -> tuple[Tensor, str]:
    if isinstance(substrate, (int, float)) and not isinstance(substrate, bool):
        value = float(substrate)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"a constant substrate must lie in [0, 1], got {value}")
        return torch.full_like(x, value), f"{value:g}"
    if substrate == "zeros":
        return torch.zeros_like(x), "zeros"
    if substrate == "blur":
        return blur(x), "blur"
    raise ValueError(f"unknown substrate {substrate!r}; expected 'zeros', 'blur' or a float in "
                     "[0, 1]")


@torch.no_grad()
def _curves(model: nn.Module, x: Tensor, sub: Tensor, scores: Tensor, target: Tensor,
            counts: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    n, c, h, w = x.shape
    p = h * w
    steps = counts.numel()
    order = scores.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(p, device=x.device).expand(n, p).contiguous())
    deletion = torch.empty(n, steps, device=x.device, dtype=x.dtype)
    insertion = torch.empty_like(deletion)
    per_chunk = max(1, batch_size // steps)
    for sl in _chunks(n, per_chunk):
        m = (rank[sl, None, :] < counts[None, :, None]).view(-1, steps, 1, h, w)
        xb, sb = x[sl, None], sub[sl, None]
        tb = target[sl].repeat_interleave(steps)
        for curve, images in ((deletion, torch.where(m, sb, xb)),
                              (insertion, torch.where(m, xb, sb))):
            probs = F.softmax(model(images.flatten(0, 1)), dim=1)
            curve[sl] = probs.gather(1, tb[:, None]).view(-1, steps)
    return deletion, insertion


def deletion_insertion(model: nn.Module, x: Tensor, attributions: Tensor,
                       target: Tensor | int | None = None, *, steps: int = 28,
                       substrate: str | float = "zeros",
                       generator: torch.Generator | int | None = None,
                       batch_size: int = DEFAULT_INTERNAL_BATCH_SIZE) -> DeletionInsertionResult:
    """Deletion and insertion curves and AUCs (Petsiuk et al. 2018), with a random baseline.

    Pixels are ranked by the channel-summed attribution, highest first (ties keep pixel order).
    Deletion replaces the top ``k`` pixels of ``x`` by the substrate, insertion reveals them on
    the substrate, for ``k = 0, P/steps, ..., P``; the curve is the softmax probability of the
    target. A uniformly random ranking (drawn from ``generator``) goes through the same steps.

    Args:
        model: logits model; eval mode with frozen parameters, restored afterwards.
        x: ``N x C x H x W`` in [0, 1].
        attributions: ``N x C x H x W`` map to score.
        target: int64 ``N``, one int, or None for the predicted class.
        steps: points of the curve after the start (``steps + 1`` in all).
        substrate: what deleted pixels become and insertion starts from: ``"zeros"``,
            ``"blur"`` (Gaussian blur of ``x``, Petsiuk's insertion canvas) or a float.
        generator: seeds the random ranking.
        batch_size: most images per forward pass.

    Returns :class:`DeletionInsertionResult`.
    Usage: ``deletion_insertion(model, x, attribute(model, x, y, "ig"), y).to_dict()``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    g = make_generator(generator)
    with model_mode(model):
        x, target = _prepare(model, x, target, batch_size)
        attributions = _check_attributions(attributions, x)
        sub, sub_name = _substrate(x, substrate)
        p = x.shape[-2] * x.shape[-1]
        counts = torch.round(torch.linspace(0, p, steps + 1, device=x.device)).long()
        random_scores = uniform((x.shape[0], p), g, x.device, x.dtype)
        deletion, insertion = _curves(model, x, sub, pixel_map(attributions), target, counts,
                                      batch_size)
        r_del, r_ins = _curves(model, x, sub, random_scores, target, counts, batch_size)
    fractions = (counts.to(torch.float64) / p).to(x.dtype)
    return DeletionInsertionResult(fractions=fractions, deletion=deletion, insertion=insertion,
                                   random_deletion=r_del, random_insertion=r_ins,
                                   substrate=sub_name)


# --- sanity check: cascading model-parameter randomisation --------------------------------------


@dataclass
class RandomisationResult:
    """Cascading randomisation (Adebayo et al. 2018).

    Attributes:
        method: the attribution method checked.
        layers: parameterised layers, top (output) first; stage ``i`` has ``layers[: i + 1]``
            randomised.
        correlation: ``L x N`` Spearman rank correlation between the original map and the map
            of stage ``i``, per sample.
        absolute: whether maps were compared by absolute value.
    """

    method: str
    layers: list[str]
    correlation: Tensor
    absolute: bool = True

    @property
    def mean_correlation(self) -> Tensor:
        """``L``: mean rank correlation per stage."""
        return self.correlation.mean(dim=1)

    @property
    def final_correlation(self) -> float:
        """Mean rank correlation with every layer randomised."""
        return float(self.mean_correlation[-1])

    def decorrelated(self, threshold: float = 0.5) -> bool:
        """True when the fully randomised model's maps correlate below ``threshold``."""
        return self.final_correlation < threshold

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict: layers, mean correlation per layer, final, verdict."""
        return {
            "method": self.method,
            "absolute": self.absolute,
            "layers": list(self.layers),
            "mean_correlation": self.mean_correlation.tolist(),
            "final_correlation": self.final_correlation,
            "decorrelated": self.decorrelated(),
        }


def _parameterised_layers(model: nn.Module) -> list[str]:
    # Registration order follows the forward pass in the zoo's architectures; reversed, it
    # starts at the output.
    names = [name for name, m in model.named_modules()
             if any(True for _ in m.parameters(recurse=False))]
    return names[::-1]


@torch.no_grad()
def _randomise(module: nn.Module, g: torch.Generator) -> None:
    """Re-draw ``module``'s own parameters from ``g``: PyTorch's default Linear/Conv init
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for layers with a weight matrix, otherwise a
    Gaussian with each parameter's own mean and standard deviation (normalisation layers)."""
    weight = getattr(module, "weight", None)
    fan_in = weight[0].numel() if isinstance(weight, Tensor) and weight.dim() >= 2 else None
    for p in module.parameters(recurse=False):
        if fan_in is not None:
            bound = 1.0 / math.sqrt(fan_in)
            p.copy_((uniform(p.shape, g, p.device, p.dtype) * 2 - 1) * bound)
        else:
            std = float(p.std()) if p.numel() > 1 else 1.0
            p.copy_(normal(p.shape, g, p.device, p.dtype) * std + p.mean())


def model_randomisation(model: nn.Module, x: Tensor, target: Tensor | int | None = None,
                        method: str = "saliency", *, layers: list[str] | None = None,
                        absolute: bool = True, generator: torch.Generator | int | None = None,
                        **options: Any) -> RandomisationResult:
    """Cascading model-parameter randomisation sanity check (Adebayo et al. 2018).

    A copy of ``model`` has its parameterised layers re-drawn one after another from the top
    (logits) down; after each, the maps of ``method`` are recomputed for the same inputs and
    targets and compared with the original maps by Spearman rank correlation. A method whose
    maps depend on the learned parameters decorrelates; one that stays correlated shows the
    input (or the architecture), not the model. ``model`` itself is not changed.

    Args:
        model: logits model.
        x: ``N x C x H x W`` in [0, 1].
        target: int64 ``N``, one int, or None for the original model's predicted class (kept
            for every stage).
        method: an attribution method (see :func:`~unmask.explain.attribution.attribute`).
        layers: module names to randomise, in cascade order; default all modules with their own
            parameters, last registered first.
        absolute: compare absolute values (Adebayo's "ABS" rank correlation); False keeps signs.
        generator: seeds the re-drawn parameters (and a stochastic method's noise, fixed across
            stages).
        **options: options of ``method``.

    Returns :class:`RandomisationResult`. Usage:
    ``model_randomisation(model, x, y, "saliency").decorrelated()``.
    """
    m = parse_method(method)
    g = make_generator(generator)
    opts = _fixed_noise(m, options, g)
    names = dict(model.named_modules())
    cascade = _parameterised_layers(model) if layers is None else list(layers)
    unknown = [n for n in cascade if n not in names]
    if unknown:
        raise ValueError(f"unknown layer(s) {', '.join(map(repr, unknown))}; parameterised "
                         f"layers: {', '.join(_parameterised_layers(model))}")
    if not cascade:
        raise ValueError("the model has no parameterised layers to randomise")
    with model_mode(model):
        x, target = _prepare(model, x, target, DEFAULT_INTERNAL_BATCH_SIZE)
    original = pixel_map(attribute(model, x, target, m, **opts), absolute)
    shadow = copy.deepcopy(model)
    shadow_modules = dict(shadow.named_modules())
    rows = []
    for name in cascade:
        _randomise(shadow_modules[name], g)
        randomised = pixel_map(attribute(shadow, x, target, m, **opts), absolute)
        rows.append(spearman(original, randomised))
        log.debug("randomised %s: mean rank correlation %.3f", name, float(rows[-1].mean()))
    return RandomisationResult(method=m, layers=cascade, correlation=torch.stack(rows),
                               absolute=absolute)


# --- robustness of explanations -----------------------------------------------------------------


@dataclass
class SensitivityResult:
    """Max-sensitivity (Yeh et al. 2019): ``max ||Phi(x') - Phi(x)|| / ||Phi(x)||`` over
    ``samples`` random ``x'`` with ``||x' - x||_inf <= radius``.

    Attributes: method; sensitivity ``N``; radius; samples.
    """

    method: str
    sensitivity: Tensor
    radius: float
    samples: int

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict: method, radius, samples, mean and max sensitivity."""
        return {"method": self.method, "radius": self.radius, "samples": self.samples,
                "mean_sensitivity": float(self.sensitivity.mean()),
                "max_sensitivity": float(self.sensitivity.max())}


def max_sensitivity(model: nn.Module, x: Tensor, target: Tensor | int | None = None,
                    method: str = "saliency", *, radius: float = 0.02, samples: int = 10,
                    generator: torch.Generator | int | None = None,
                    **options: Any) -> SensitivityResult:
    """Max-sensitivity of ``method``'s maps, Captum ``sensitivity_max``.

    Perturbations are uniform in the L-inf ball of ``radius`` (Captum's default), clipped to
    [0, 1], and drawn from ``generator`` instead of the global RNG.

    Args:
        model, x, target, method, **options: as in :func:`model_randomisation`.
        radius: L-inf radius of the perturbations, >= 0.
        samples: perturbations per input.
        generator: seeds the perturbations (and a stochastic method's noise, fixed).

    Returns :class:`SensitivityResult`. Usage: ``max_sensitivity(model, x, y, "ig").to_dict()``.
    """
    # Deferred: captum takes about 1.5 s to import; only attribution calls need it.
    from captum.metrics import sensitivity_max

    m = parse_method(method)
    radius = float(radius)
    if not math.isfinite(radius) or radius < 0:
        raise ValueError(f"radius must be a finite float >= 0, got {radius}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    g = make_generator(generator)
    opts = _fixed_noise(m, options, g)
    with model_mode(model):
        x, target = _prepare(model, x, target, DEFAULT_INTERNAL_BATCH_SIZE)

    def explain(inputs, target):
        # Captum's convention: tuple in, tuple out (sensitivity_max relies on it).
        if isinstance(inputs, tuple):
            return (attribute(model, inputs[0], target, m, **opts),)
        return attribute(model, inputs, target, m, **opts)

    def perturb(inputs, perturb_radius):
        inputs = inputs[0] if isinstance(inputs, tuple) else inputs
        noise = (uniform(inputs.shape, g, inputs.device, inputs.dtype) * 2 - 1) * perturb_radius
        return (inputs + noise).clamp(0.0, 1.0)

    sens = sensitivity_max(explain, x, perturb_func=perturb, perturb_radius=radius,
                           n_perturb_samples=samples, target=target)
    return SensitivityResult(method=m, sensitivity=sens.detach(), radius=radius,
                             samples=samples)


@dataclass
class AttributionChangeResult:
    """How much a map changes from a clean input to its adversarial example.

    Attributes:
        method: the attribution method.
        topk_intersection: ``N``; share of the clean map's top-``k`` pixels still in the
            adversarial map's top ``k`` (1 = unchanged).
        rank_correlation: ``N``; Spearman rank correlation of the two pixel maps.
        k: the number of pixels compared.
    """

    method: str
    topk_intersection: Tensor
    rank_correlation: Tensor
    k: int

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict: method, k, mean top-k intersection and rank
        correlation.
        """
        return {"method": self.method, "k": self.k,
                "mean_topk_intersection": float(self.topk_intersection.mean()),
                "mean_rank_correlation": float(self.rank_correlation.mean())}


def attribution_change(model: nn.Module, x: Tensor, x_adv: Tensor,
                       target: Tensor | int | None = None, method: str = "saliency", *,
                       k: int | float = 0.1, absolute: bool = True,
                       **options: Any) -> AttributionChangeResult:
    """Clean-vs-adversarial change of attributions (Ghorbani et al. 2019).

    Both maps explain the same target (default: the predicted class on the clean input), so
    the change shows how far the explanation moves when the input is attacked.

    Args:
        model: logits model.
        x: clean ``N x C x H x W`` in [0, 1].
        x_adv: adversarial examples of ``x``, same shape (from any attack).
        target: int64 ``N``, one int, or None for the predicted class on ``x``.
        method, **options: an attribution method and its options.
        k: pixels compared for the top-k intersection: a count or a fraction of the pixels.
        absolute: compare absolute values.

    Returns :class:`AttributionChangeResult`.
    Usage: ``attribution_change(model, x, pgd(model, x, y).x_adv, y, "ig").to_dict()``.
    """
    m = parse_method(method)
    check_images(x_adv, "x_adv")
    if x_adv.shape != x.shape:
        raise ValueError(f"x_adv must have the shape of x {tuple(x.shape)}, got "
                         f"{tuple(x_adv.shape)}")
    opts = _fixed_noise(m, options, None)
    with model_mode(model):
        x, target = _prepare(model, x, target, DEFAULT_INTERNAL_BATCH_SIZE)
    clean = pixel_map(attribute(model, x, target, m, **opts), absolute)
    adv = pixel_map(attribute(model, x_adv.to(x.device), target, m, **opts), absolute)
    kk = _resolve_k(k, clean.shape[1])
    return AttributionChangeResult(method=m, topk_intersection=topk_intersection(clean, adv, kk),
                                   rank_correlation=spearman(clean, adv), k=kk)


# --- IG completeness ----------------------------------------------------------------------------


@dataclass
class CompletenessResult:
    """IG completeness: ``delta = sum(IG) - (f(x) - f(baseline))`` per sample.

    Attributes: delta ``N``; output_change ``N``; n_steps; baseline (its name).
    """

    delta: Tensor
    output_change: Tensor
    n_steps: int
    baseline: str

    @property
    def relative_error(self) -> Tensor:
        """``|delta| / |f(x) - f(baseline)|`` per sample."""
        return self.delta.abs() / self.output_change.abs().clamp_min(1e-12)

    def passed(self, tolerance: float = 0.01) -> bool:
        """True when every sample's relative error is below ``tolerance``."""
        return bool((self.relative_error < tolerance).all())

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict: n_steps, baseline, mean/max absolute and relative
        error.
        """
        rel = self.relative_error
        return {"n_steps": self.n_steps, "baseline": self.baseline,
                "mean_abs_delta": float(self.delta.abs().mean()),
                "max_abs_delta": float(self.delta.abs().max()),
                "mean_relative_error": float(rel.mean()),
                "max_relative_error": float(rel.max())}


def completeness(model: nn.Module, x: Tensor, target: Tensor | int | None = None, *,
                 n_steps: int = 50, baseline: str | float | Tensor = "zeros",
                 **options: Any) -> CompletenessResult:
    """IG's completeness error (Sundararajan et al. 2017): how far ``sum(IG)`` is from
    ``f(x) - f(baseline)`` at ``n_steps``.

    Args:
        model, x, target: as in :func:`~unmask.explain.attribution.integrated_gradients`.
        n_steps, baseline, **options: IG's options.

    Returns :class:`CompletenessResult`. Usage: ``completeness(model, x, y, n_steps=64).passed()``.
    """
    res = integrated_gradients(model, x, target, n_steps=n_steps, baseline=baseline, **options)
    name = baseline if isinstance(baseline, str) else type(baseline).__name__
    return CompletenessResult(delta=res.delta, output_change=res.output_change, n_steps=n_steps,
                              baseline=str(name))


# --- backdoor trigger localisation --------------------------------------------------------------


@dataclass
class TriggerLocalisationResult:
    """Share of attribution mass inside a backdoor trigger.

    Attributes:
        mass_in_trigger: ``N``; ``sum |a| over the trigger / sum |a|`` (0 for an all-zero map).
        trigger_area: share of the pixels the trigger covers (what a uniform map would get).
    """

    mass_in_trigger: Tensor
    trigger_area: float

    @property
    def lift(self) -> float:
        """Mean mass in the trigger over its area: 1 is chance, higher is localised."""
        return float(self.mass_in_trigger.mean()) / max(self.trigger_area, 1e-12)

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict: mean attribution mass inside the trigger, its area,
        lift.
        """
        return {"mean_mass_in_trigger": float(self.mass_in_trigger.mean()),
                "trigger_area": self.trigger_area, "lift": self.lift}


def trigger_localisation(attributions: Tensor, trigger_mask: Tensor) -> TriggerLocalisationResult:
    """How much of each map's absolute mass falls inside the trigger region.

    Args:
        attributions: ``N x C x H x W`` maps of triggered inputs (for the backdoor target).
        trigger_mask: bool (or 0/1) mask of the trigger: ``H x W``, ``C x H x W``,
            ``1 x C x H x W`` or ``N x C x H x W``; a pixel counts if any channel is set.

    Returns :class:`TriggerLocalisationResult`.
    Usage: ``trigger_localisation(attribute(model, x_trig, t, "ig"), mask).lift``.
    """
    if not isinstance(attributions, Tensor) or attributions.dim() != 4:
        raise ValueError("attributions must be a tensor of shape N x C x H x W")
    n, _, h, w = attributions.shape
    mask = torch.as_tensor(trigger_mask, device=attributions.device)
    if mask.dim() == 2:
        mask = mask[None, None]
    elif mask.dim() == 3:
        mask = mask[None]
    if mask.dim() != 4 or mask.shape[-2:] != (h, w) or mask.shape[0] not in (1, n):
        raise ValueError(f"trigger_mask must have shape H x W, C x H x W, 1 x C x H x W or "
                         f"N x C x H x W with H x W = {h} x {w}, got {tuple(mask.shape)}")
    pixels = (mask != 0).any(dim=1).flatten(1).expand(n, h * w)
    mass = pixel_map(attributions, absolute=True)
    total = mass.sum(1)
    inside = (mass * pixels).sum(1)
    share = torch.where(total > 0, inside / total.clamp_min(1e-30), torch.zeros_like(total))
    area = float(pixels.float().mean())
    if area == 0:
        raise ValueError("trigger_mask is empty")
    return TriggerLocalisationResult(mass_in_trigger=share, trigger_area=area)


# --- the registry: one entry per metric a suite can name ---------------------------------------


@dataclass(frozen=True)
class MetricInputs:
    """What a registered metric is computed from: ``model``, samples ``x`` (``N x C x H x W`` in
    [0, 1]) with labels ``y`` (int64 ``N``), one ``method``'s ``attributions`` of them (same
    shape as ``x``) and the ``options`` they were made with; ``seed`` for every random draw.
    Optional: ``ig_steps`` (IG's steps for completeness), ``x_adv`` (adversarial examples of
    ``x``), ``trigger`` (a backdoor trigger, ``x -> triggered x``) and its ``trigger_target``."""

    model: nn.Module
    x: Tensor
    y: Tensor
    method: str
    attributions: Tensor
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    ig_steps: int = 32
    x_adv: Tensor | None = None
    trigger: Callable[[Tensor], Tensor] | None = None
    trigger_target: int | None = None


@dataclass(frozen=True)
class MetricScore:
    """One stored number of a metric: its ``key`` (the store's metric name, e.g.
    ``deletion_auc``), the mean ``value`` over the samples, and the full result as ``details``."""

    key: str
    value: float
    details: dict[str, Any]


@dataclass(frozen=True)
class ScoreInfo:
    """What one stored number of a metric means: its declared range ``low`` .. ``high``
    (inclusive; ``math.inf`` for unbounded) and ``range_text`` saying it in words, which way
    is ``better`` (``"higher"`` or ``"lower"``), the column ``label`` of the report tables and
    the ``short`` one of the leaderboard, and its ``meaning`` with the reference."""

    low: float
    high: float
    better: str
    label: str
    short: str
    range_text: str
    meaning: str

    def __post_init__(self) -> None:
        if not self.low <= self.high:
            raise ValueError(f"a score range needs low <= high, got [{self.low}, {self.high}]")
        if self.better not in ("higher", "lower"):
            raise ValueError(f"better must be 'higher' or 'lower', got {self.better!r}")


@dataclass(frozen=True)
class ExplanationMetric:
    """A registered explanation metric.

    Attributes:
        name: the suite's name (``[explain] metrics``).
        compute: ``MetricInputs -> list[MetricScore]`` (empty when nothing applies, e.g. no
            sample outside the backdoor target).
        scores: per stored key, its :class:`ScoreInfo` (range, direction, labels); the
            contract tests hold every score to its declared range.
        methods: the attribution methods it applies to (None: all).
        needs: the optional :class:`MetricInputs` fields it needs (``"x_adv"``, ``"trigger"``);
            without them it does not apply.
    """

    name: str
    compute: Callable[[MetricInputs], list[MetricScore]]
    scores: dict[str, ScoreInfo]
    methods: tuple[str, ...] | None = None
    needs: tuple[str, ...] = ()

    @property
    def ranges(self) -> dict[str, tuple[float, float]]:
        """Per stored key, the declared ``(low, high)``."""
        return {k: (s.low, s.high) for k, s in self.scores.items()}

    def applies(self, inputs: MetricInputs) -> bool:
        """True when ``inputs`` has what the metric needs (its method, the optional fields)."""
        if self.methods is not None and inputs.method not in self.methods:
            return False
        return all(getattr(inputs, n) is not None for n in self.needs)

    def __call__(self, inputs: MetricInputs) -> list[MetricScore]:
        """The metric's scores on ``inputs``; ``ValueError`` when it does not apply."""
        if not self.applies(inputs):
            raise ValueError(f"explanation metric {self.name!r} does not apply: it needs "
                             f"method in {self.methods} and {list(self.needs) or 'nothing'} "
                             f"set, got method {inputs.method!r}")
        return self.compute(inputs)


# Listed in registration order: the order of the report's columns.
METRICS: Registry[ExplanationMetric] = Registry("explanation metric", order=lambda _: 0)


def register_metric(name: str, *, scores: dict[str, ScoreInfo],
                    methods: tuple[str, ...] | None = None, needs: tuple[str, ...] = ()
                    ) -> Callable:
    """Register ``fn(inputs: MetricInputs) -> list[MetricScore]`` as metric ``name``, whose
    stored numbers are ``scores``.

    Usage::

        @register_metric("my_metric", scores={"my_score": ScoreInfo(0.0, 1.0, "higher", ...)})
        def _my_metric(inputs: MetricInputs) -> list[MetricScore]: ...
    """
    for key, info in scores.items():
        if not isinstance(info, ScoreInfo):
            raise TypeError(f"metric {name!r}: score {key!r} needs a ScoreInfo, got "
                            f"{type(info).__name__}")

    def deco(fn: Callable[[MetricInputs], list[MetricScore]]):
        METRICS.add(name, ExplanationMetric(name, fn, dict(scores),
                                            None if methods is None else tuple(methods),
                                            tuple(needs)))
        return fn

    return deco


def score_infos() -> dict[str, ScoreInfo]:
    """Every stored key of every registered metric, in registry order, with its
    :class:`ScoreInfo` (what the report tables and the leaderboard label and sort by)."""
    return {k: info for m in METRICS.values() for k, info in m.scores.items()}


def _options_without_generator(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k != "generator"}


@register_metric("deletion_insertion", scores={
    "deletion_auc": ScoreInfo(
        0.0, 1.0, "lower", "deletion AUC", "del", "[0, 1]",
        "class probability as the most-attributed pixels are removed first, area under the "
        "curve (Petsiuk et al. 2018); a faithful map makes it fall fast"),
    "insertion_auc": ScoreInfo(
        0.0, 1.0, "higher", "insertion AUC", "ins", "[0, 1]",
        "class probability as the most-attributed pixels are inserted first into a blurred "
        "input, area under the curve (Petsiuk et al. 2018)")})
def _deletion_insertion_scores(inp: MetricInputs) -> list[MetricScore]:
    d = deletion_insertion(inp.model, inp.x, inp.attributions, inp.y, generator=inp.seed).to_dict()
    scalars = {k: v for k, v in d.items() if not k.endswith("curve")}
    return [MetricScore(key, d[key], scalars | {
        "curve": d[key.replace("_auc", "_curve")],
        "random_curve": d["random_" + key.replace("_auc", "_curve")],
        "fractions": d["fractions"]}) for key in ("deletion_auc", "insertion_auc")]


@register_metric("randomisation", scores={"randomisation_correlation": ScoreInfo(
    -1.0, 1.0, "lower", "randomisation corr.", "rand-corr", "[-1, 1]",
    "Spearman correlation between the map and the map of the model with every layer "
    "randomised (Adebayo et al. 2018); a map that depends on the weights decorrelates")})
def _randomisation_scores(inp: MetricInputs) -> list[MetricScore]:
    d = model_randomisation(inp.model, inp.x, inp.y, inp.method, generator=inp.seed,
                            **_options_without_generator(inp.options)).to_dict()
    return [MetricScore("randomisation_correlation", d["final_correlation"], d)]


@register_metric("completeness", methods=("integrated_gradients",), scores={
    "completeness_error": ScoreInfo(
        0.0, math.inf, "lower", "IG completeness error", "ig-err", "[0, inf), 0 = exact",
        "|sum of IG - (f(x) - f(baseline))| / |f(x) - f(baseline)| (Sundararajan et al. "
        "2017); 1 with a zero input gradient")})
def _completeness_scores(inp: MetricInputs) -> list[MetricScore]:
    d = completeness(inp.model, inp.x, inp.y, n_steps=inp.ig_steps).to_dict()
    return [MetricScore("completeness_error", d["mean_relative_error"], d)]


@register_metric("attribution_change", needs=("x_adv",), scores={
    "adversarial_rank_correlation": ScoreInfo(
        -1.0, 1.0, "higher", "clean-vs-adversarial corr.", "adv-corr", "[-1, 1]",
        "Spearman correlation between the maps of a clean input and its PGD example "
        "(Ghorbani et al. 2019); low means the explanation is fragile")})
def _attribution_change_scores(inp: MetricInputs) -> list[MetricScore]:
    d = attribution_change(inp.model, inp.x, inp.x_adv, inp.y, inp.method,
                           **inp.options).to_dict()
    return [MetricScore("adversarial_rank_correlation", d["mean_rank_correlation"], d)]


@register_metric("trigger_localisation", needs=("trigger", "trigger_target"), scores={
    "trigger_lift": ScoreInfo(
        0.0, math.inf, "higher", "trigger lift", "trig-lift", "[0, 1/trigger area], 1 = chance",
        "attribution mass inside the backdoor trigger over the trigger's share of the "
        "pixels, on triggered inputs; a map that finds the trigger is far above 1")})
def _trigger_localisation_scores(inp: MetricInputs) -> list[MetricScore]:
    keep = inp.y != inp.trigger_target
    if not bool(keep.any()):
        return []
    xs = inp.x[keep]
    x_trig = inp.trigger(xs)
    with torch.no_grad():  # the pixels the trigger changes, whatever it is (patch, blend, warp)
        mask = (x_trig - xs).abs() > 1e-6
    target = torch.full_like(inp.y[keep], inp.trigger_target)
    a_trig = attribute(inp.model, x_trig, target, inp.method, **inp.options)
    d = trigger_localisation(a_trig, mask).to_dict()
    return [MetricScore("trigger_lift", d["lift"], d)]


@register_metric("max_sensitivity", scores={"max_sensitivity": ScoreInfo(
    0.0, math.inf, "lower", "max sensitivity", "sens", "[0, inf)",
    "largest change of the map under small input perturbations (Yeh et al. 2019)")})
def _max_sensitivity_scores(inp: MetricInputs) -> list[MetricScore]:
    d = max_sensitivity(inp.model, inp.x, inp.y, inp.method, generator=inp.seed,
                        **_options_without_generator(inp.options)).to_dict()
    return [MetricScore("max_sensitivity", d["mean_sensitivity"], d)]
