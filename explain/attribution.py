"""Attributions on Captum with one signature for every method.

``attribute(model, x, target, method, **options) -> Tensor`` returns a map of the same shape as
``x`` (``N x C x H x W``) for any of:

* ``saliency``               the input gradient (Simonyan et al. 2014, "Deep Inside
  Convolutional Networks"), Captum ``Saliency``;
* ``smoothgrad``             the saliency averaged over noisy copies of the input (Smilkov et
  al. 2017, "SmoothGrad: removing noise by adding noise"), Captum ``Saliency`` on a batch of
  noisy inputs; the noise comes from a ``torch.Generator``, so it is seeded and never touches
  the global RNG (Captum's ``NoiseTunnel`` draws from it);
* ``integrated_gradients``   (alias ``ig``) the path integral of gradients from a baseline
  (Sundararajan et al. 2017, "Axiomatic Attribution for Deep Networks"), Captum
  ``IntegratedGradients``; :func:`integrated_gradients` also gives the convergence delta;
* ``input_x_gradient``       (alias ``ixg``) input times gradient (Shrikumar et al. 2016), Captum
  ``InputXGradient``, a cheap reference.

Every method explains ``output`` of the class ``target``: the logit (default), its softmax
probability or its log-probability (minus the cross-entropy loss; what gradient-masking
diagnosis looks at). The model is evaluated in eval mode with frozen parameters, and both are
restored afterwards. The device follows ``x``; ``internal_batch_size`` bounds the number of
input rows in one forward/backward pass (Captum's name for it), so memory stays bounded.

Usage::

    sal = attribute(model, x, y, "saliency")
    ig = integrated_gradients(model, x, y, n_steps=64)   # IGResult(attributions, delta, ...)
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bench.core import (
    StrEnum,
    check_images,
    check_labels,
    check_logits,
    make_generator,
    model_mode,
    normal,
    parse_enum,
    uniform,
)
from ..bench.core.registry import Registry

__all__ = [
    "Output",
    "Baseline",
    "IGResult",
    "attribute",
    "saliency",
    "smoothgrad",
    "integrated_gradients",
    "input_x_gradient",
    "make_baseline",
    "blur",
    "METHODS",
    "AttributionMethod",
    "register_method",
    "parse_method",
    "method_options",
]

log = logging.getLogger(__name__)

DEFAULT_INTERNAL_BATCH_SIZE = 256


@dataclass(frozen=True)
class AttributionMethod:
    """A registered attribution method: ``fn(model, x, target, **options)`` returning
    ``N x C x H x W`` maps (or an :class:`IGResult`), its display ``title`` and the ``short``
    label of the leaderboard's columns."""

    name: str
    fn: Callable[..., Any]
    title: str
    short: str


# The attribution methods; ``attribute``, the CLI's ``--method``, the suite's ``[explain]
# methods`` and the report's labels read this registry. Listed in registration order (saliency
# first); aliases (``ig``) resolve to the names.
METHODS: Registry[AttributionMethod] = Registry("attribution method", order=lambda _: 0)


def register_method(name: str, *, title: str, short: str, aliases: tuple[str, ...] = ()
                    ) -> Callable:
    """Register ``fn(model, x, target, **options)`` as attribution method ``name``.

    Usage: ``@register_method("my_map", title="My map", short="my")`` above the function.
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        METHODS.add(name, AttributionMethod(name, fn, title, short), aliases=aliases)
        return fn

    return deco


class Output(StrEnum):
    """What is explained: the target's logit, its softmax probability or its log-probability."""

    LOGIT = "logit"
    PROBABILITY = "probability"
    LOG_PROBABILITY = "log_probability"


class Baseline(StrEnum):
    """Named IG baselines: black, uniform noise (seeded), a Gaussian blur of the input."""

    ZEROS = "zeros"
    UNIFORM = "uniform"
    BLUR = "blur"


def parse_method(method: str) -> str:
    """The registered name of ``method`` (a name or an alias, any case); a bad value raises
    ``ValueError`` naming the valid ones."""
    if isinstance(method, str) and method.lower() in {*METHODS, *METHODS.aliases()}:
        return METHODS.resolve(method.lower())
    valid = ", ".join(repr(m) for m in METHODS.names())
    raise ValueError(f"unknown attribution method {method!r}; expected one of {valid} "
                     f"(aliases: {', '.join(METHODS.aliases())})")


@dataclass
class IGResult:
    """Integrated Gradients with its completeness check.

    Attributes:
        attributions: ``N x C x H x W``.
        delta: ``N``; ``sum(attributions) - (f(x) - f(baseline))``, the convergence delta
            (completeness error) of the Riemann/Gauss-Legendre approximation.
        output_change: ``N``; ``f(x) - f(baseline)`` of the explained output.
    """

    attributions: Tensor
    delta: Tensor
    output_change: Tensor

    @property
    def relative_error(self) -> Tensor:
        """``|delta| / |f(x) - f(baseline)|`` per sample."""
        return self.delta.abs() / self.output_change.abs().clamp_min(1e-12)

    def to_dict(self) -> dict[str, Any]:
        """The completeness check as a JSON-ready dict: n, mean/max absolute delta and relative
        error.
        """
        rel = self.relative_error
        return {
            "n": int(self.delta.numel()),
            "mean_abs_delta": float(self.delta.abs().mean()),
            "max_abs_delta": float(self.delta.abs().max()),
            "mean_relative_error": float(rel.mean()),
            "max_relative_error": float(rel.max()),
        }


# --- shared plumbing ---------------------------------------------------------------------------


def _head(model: nn.Module, output: Output) -> Callable[[Tensor], Tensor]:
    if output is Output.LOGIT:
        return model
    if output is Output.PROBABILITY:
        return lambda inp: F.softmax(model(inp), dim=1)
    return lambda inp: F.log_softmax(model(inp), dim=1)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


def _leaf(t: Tensor) -> Tensor:
    # Captum warns when the input does not require grad yet; hand it a fresh leaf that does.
    return t.detach().requires_grad_(True)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    return torch.cat([model(x[sl]).argmax(dim=1) for sl in _chunks(x.shape[0], batch_size)])


def _prepare(model: nn.Module, x: Tensor, target: Any, batch_size: int) -> tuple[Tensor, Tensor]:
    """Validate ``x`` and ``target``; a None target means the model's predicted class.

    Called inside ``model_mode``. ``target`` may be an int (same class for every sample) or an
    int tensor of shape ``N``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    x = check_images(x)
    with torch.no_grad():
        num_classes = check_logits(model(x[:1]), 1).shape[1]
    if target is None:
        return x, _predict(model, x, batch_size)
    if isinstance(target, int) and not isinstance(target, bool):
        target = torch.full((x.shape[0],), target, dtype=torch.long)
    target = check_labels(target, x.shape[0], num_classes, name="target")
    return x, target.to(x.device)


# --- the methods -------------------------------------------------------------------------------


@register_method("saliency", aliases=("gradient",), title="saliency", short="sal")
def saliency(model: nn.Module, x: Tensor, target: Tensor | int | None = None, *,
             abs: bool = True, output: str | Output = "logit",
             internal_batch_size: int = DEFAULT_INTERNAL_BATCH_SIZE) -> Tensor:
    """Saliency: ``|d output_target / d x|`` (Simonyan et al. 2014), Captum ``Saliency``.

    Args:
        model: logits model (``N x C x H x W`` in [0, 1] -> ``N x K``).
        x: ``N x C x H x W`` in [0, 1].
        target: int64 ``N`` class indices, one int for all, or None for the predicted class.
        abs: absolute value of the gradient (the paper's map); False gives the signed gradient.
        output: ``"logit"``, ``"probability"`` or ``"log_probability"``.
        internal_batch_size: most input rows per forward/backward pass.

    Returns ``N x C x H x W``. Usage: ``saliency(model, x, y)``.
    """
    # Deferred: captum takes about 1.5 s to import; only attribution calls need it.
    from captum.attr import Saliency

    return _gradient_attribution(Saliency, model, x, target, output, internal_batch_size,
                                 abs=abs)


def _gradient_attribution(explainer_cls, model: nn.Module, x: Tensor,
                          target: Tensor | int | None, output: str | Output,
                          internal_batch_size: int, **options) -> Tensor:
    """A one-pass Captum gradient explainer (``Saliency``, ``InputXGradient``) over ``x`` in
    chunks of ``internal_batch_size`` rows, on the model's ``output`` head."""
    bs = _positive_int(internal_batch_size, "internal_batch_size")
    head = parse_enum(Output, output, "output")
    with model_mode(model):
        x, target = _prepare(model, x, target, bs)
        explainer = explainer_cls(_head(model, head))
        out = torch.empty_like(x)
        for sl in _chunks(x.shape[0], bs):
            out[sl] = explainer.attribute(_leaf(x[sl]), target=target[sl], **options).detach()
    return out


@register_method("smoothgrad", aliases=("sg",), title="SmoothGrad", short="sg")
def smoothgrad(model: nn.Module, x: Tensor, target: Tensor | int | None = None, *,
               noise_level: float = 0.15, samples: int = 25, abs: bool = True,
               output: str | Output = "logit",
               generator: torch.Generator | int | None = None,
               internal_batch_size: int = DEFAULT_INTERNAL_BATCH_SIZE) -> Tensor:
    """SmoothGrad (Smilkov et al. 2017): saliency averaged over ``x + N(0, sigma^2)``.

    ``sigma = noise_level * (max - min)`` of the input range, which is [0, 1] here, so
    ``sigma = noise_level`` (the paper recommends 10-20 %). The noise comes from ``generator``
    (a ``torch.Generator`` or a seed; default seed 0): same seed and same
    ``internal_batch_size``, same map, on any device. The global RNG is never used.

    Args:
        model, x, target, abs, output: as in :func:`saliency`.
        noise_level: noise standard deviation as a fraction of the input range, >= 0.
        samples: noisy copies per input (the paper uses about 50).
        generator: seeds the noise.
        internal_batch_size: most noisy rows per forward/backward pass.

    Returns ``N x C x H x W``. Usage: ``smoothgrad(model, x, y, noise_level=0.15, samples=25)``.
    """
    # Deferred: captum takes about 1.5 s to import; only attribution calls need it.
    from captum.attr import Saliency

    bs = _positive_int(internal_batch_size, "internal_batch_size")
    samples = _positive_int(samples, "samples")
    noise_level = float(noise_level)
    if not math.isfinite(noise_level) or noise_level < 0:
        raise ValueError(f"noise_level must be a finite float >= 0, got {noise_level}")
    head = parse_enum(Output, output, "output")
    g = make_generator(generator)
    with model_mode(model):
        x, target = _prepare(model, x, target, bs)
        explainer = Saliency(_head(model, head))
        out = torch.empty_like(x)
        # Inputs per chunk so that all their noisy copies fit in one pass, else one input and
        # its copies in passes of ``bs`` rows.
        per_chunk = max(1, bs // samples)
        draws_per_pass = min(samples, bs)
        for sl in _chunks(x.shape[0], per_chunk):
            xb, tb = x[sl], target[sl]
            n = xb.shape[0]
            total = torch.zeros_like(xb)
            done = 0
            while done < samples:
                k = min(draws_per_pass, samples - done)
                noise = normal((n, k, *xb.shape[1:]), g, x.device, x.dtype) * noise_level
                noisy = (xb.unsqueeze(1) + noise).flatten(0, 1)
                grads = explainer.attribute(_leaf(noisy), target=tb.repeat_interleave(k), abs=abs)
                total += grads.detach().view(n, k, *xb.shape[1:]).sum(dim=1)
                done += k
            out[sl] = total / samples
    return out


def blur(x: Tensor, sigma: float | None = None) -> Tensor:
    """Gaussian blur of ``N x C x H x W`` images (reflect padding); default
    ``sigma = max(H, W) / 8``. A baseline for IG and a substrate for deletion/insertion."""
    if sigma is None:
        sigma = max(x.shape[-2:]) / 8
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"blur sigma must be a finite float > 0, got {sigma}")
    radius = max(1, int(math.ceil(3 * sigma)))
    coords = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    out = x
    for dim in (2, 3):
        size = out.shape[dim]
        pad = min(radius, size - 1)
        k = kernel[radius - pad: radius + pad + 1]
        k = k / k.sum()
        view = (1, 1, k.numel(), 1) if dim == 2 else (1, 1, 1, k.numel())
        padding = (0, 0, pad, pad) if dim == 2 else (pad, pad, 0, 0)
        if pad > 0:
            out = F.pad(out, padding, mode="reflect")
        out = F.conv2d(out, k.view(view).expand(c, -1, -1, -1), groups=c)
    return out


def make_baseline(x: Tensor, baseline: str | Baseline | float | Tensor = "zeros",
                  generator: torch.Generator | int | None = None) -> Tensor:
    """The IG baseline for ``x``, ``N x C x H x W``.

    ``"zeros"`` (black), ``"uniform"`` (``U[0, 1)`` noise from ``generator``; Sturmfels et al.
    2020, "Visualizing the Impact of Feature Attribution Baselines"), ``"blur"`` (Gaussian blur
    of ``x``), a float constant in [0, 1], or a tensor broadcastable to ``x``.
    """
    if isinstance(baseline, Tensor):
        try:
            return torch.broadcast_to(baseline.to(device=x.device, dtype=x.dtype), x.shape).clone()
        except RuntimeError:
            raise ValueError(f"baseline of shape {tuple(baseline.shape)} does not broadcast to "
                             f"x of shape {tuple(x.shape)}") from None
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        value = float(baseline)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"a constant baseline must lie in [0, 1], got {value}")
        return torch.full_like(x, value)
    kind = parse_enum(Baseline, baseline, "baseline")
    if kind is Baseline.ZEROS:
        return torch.zeros_like(x)
    if kind is Baseline.UNIFORM:
        return uniform(x.shape, make_generator(generator), x.device, x.dtype)
    return blur(x)


@register_method("integrated_gradients", aliases=("ig",), title="Integrated Gradients", short="ig")
def integrated_gradients(model: nn.Module, x: Tensor, target: Tensor | int | None = None, *,
                         baseline: str | Baseline | float | Tensor = "zeros", n_steps: int = 50,
                         integration: str = "gausslegendre", output: str | Output = "logit",
                         generator: torch.Generator | int | None = None,
                         internal_batch_size: int = DEFAULT_INTERNAL_BATCH_SIZE) -> IGResult:
    """Integrated Gradients (Sundararajan et al. 2017) with its convergence delta.

    ``IG_i(x) = (x_i - b_i) * integral_0^1 d f(b + a (x - b)) / d x_i da``; completeness says
    ``sum_i IG_i = f(x) - f(b)``, and ``delta`` measures how far the ``n_steps``-point
    approximation is from it.

    Args:
        model, x, target, output: as in :func:`saliency`.
        baseline: ``"zeros"``, ``"uniform"``, ``"blur"``, a float or a tensor (see
            :func:`make_baseline`).
        n_steps: integration points.
        integration: Captum's rule: ``"gausslegendre"`` (default), ``"riemann_trapezoid"``,
            ``"riemann_left"``, ``"riemann_right"``, ``"riemann_middle"``.
        generator: seeds a ``"uniform"`` baseline.
        internal_batch_size: most input rows (samples x steps) per forward/backward pass;
            passed to Captum, so memory stays bounded for any ``n_steps``.

    Returns :class:`IGResult` (attributions ``N x C x H x W``, delta ``N``, output_change ``N``).
    Usage: ``res = integrated_gradients(model, x, y, n_steps=64); res.relative_error.max()``.
    """
    # Deferred: captum takes about 1.5 s to import; only attribution calls need it.
    from captum.attr import IntegratedGradients

    bs = _positive_int(internal_batch_size, "internal_batch_size")
    n_steps = _positive_int(n_steps, "n_steps")
    rules = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right",
             "riemann_middle")
    if integration not in rules:
        raise ValueError(f"unknown integration {integration!r}; expected one of "
                         f"{', '.join(map(repr, rules))}")
    head_kind = parse_enum(Output, output, "output")
    with model_mode(model):
        x, target = _prepare(model, x, target, bs)
        base = make_baseline(x, baseline, generator)
        head = _head(model, head_kind)
        explainer = IntegratedGradients(head)
        out = torch.empty_like(x)
        change = torch.empty(x.shape[0], device=x.device, dtype=x.dtype)
        # Captum splits the steps into passes of internal_batch_size // n rows, so n (samples
        # per call) is kept at most internal_batch_size: every pass has <= bs rows.
        per_chunk = max(1, min(bs, bs // n_steps))
        for sl in _chunks(x.shape[0], per_chunk):
            xb, bb, tb = x[sl], base[sl], target[sl]
            out[sl] = explainer.attribute(xb, baselines=bb, target=tb, n_steps=n_steps,
                                          method=integration, internal_batch_size=bs).detach()
            with torch.no_grad():
                both = head(torch.cat([xb, bb]))
                picked = both.gather(1, torch.cat([tb, tb])[:, None]).squeeze(1)
                change[sl] = picked[: xb.shape[0]] - picked[xb.shape[0]:]
    delta = out.flatten(1).sum(dim=1) - change
    return IGResult(attributions=out, delta=delta, output_change=change)


@register_method("input_x_gradient", aliases=("ixg",), title="input x gradient", short="ixg")
def input_x_gradient(model: nn.Module, x: Tensor, target: Tensor | int | None = None, *,
                     output: str | Output = "logit",
                     internal_batch_size: int = DEFAULT_INTERNAL_BATCH_SIZE) -> Tensor:
    """Input x gradient (Shrikumar et al. 2016), Captum ``InputXGradient``: IG with a zero
    baseline and one step, a cheap reference.

    Args: as in :func:`saliency`. Returns ``N x C x H x W``.
    Usage: ``input_x_gradient(model, x, y)``.
    """
    # Deferred: captum takes about 1.5 s to import; only attribution calls need it.
    from captum.attr import InputXGradient

    return _gradient_attribution(InputXGradient, model, x, target, output, internal_batch_size)


def method_options(method: str) -> list[str]:
    """The keyword options ``method`` accepts (its function's keyword-only parameters)."""
    fn = METHODS.get(parse_method(method)).fn
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY]


def attribute(model: nn.Module, x: Tensor, target: Tensor | int | None = None,
              method: str = "saliency", **options: Any) -> Tensor:
    """Attributions of ``method`` for ``x``: one signature for every method.

    Args:
        model: logits model (``N x C x H x W`` in [0, 1] -> ``N x K``); mode and
            ``requires_grad`` are restored afterwards.
        x: ``N x C x H x W`` in [0, 1]; the device follows it.
        target: int64 ``N``, one int, or None for the model's predicted class.
        method: a name of :data:`METHODS` or an alias: ``"saliency"``, ``"smoothgrad"``
            (``"sg"``), ``"integrated_gradients"`` (``"ig"``), ``"input_x_gradient"``
            (``"ixg"``).
        **options: the method's keyword options (see :func:`method_options`); an option the
            method does not take raises ``ValueError`` naming the ones it does.

    Returns ``N x C x H x W``. For IG's convergence delta call :func:`integrated_gradients`.
    Usage: ``attribute(model, x, y, "ig", n_steps=32, baseline="blur")``.
    """
    m = parse_method(method)
    valid = method_options(m)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"{m} does not take option(s) {', '.join(unknown)}; "
                         f"valid options: {', '.join(valid)}")
    result = METHODS.get(m).fn(model, x, target, **options)
    return result.attributions if isinstance(result, IGResult) else result
