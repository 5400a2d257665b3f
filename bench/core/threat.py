"""Threat models: ``Threat(norm, eps)`` and the one projection onto the eps-ball intersected
with ``[0, 1]`` that every attack uses (:meth:`Threat.project`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .enums import StrEnum, parse_enum
from .seeding import normal, uniform

__all__ = ['Norm', 'Threat', 'LargeEpsWarning', "threat_key"]



def threat_key(norm: str | Norm, eps: float) -> str:
    """The one text form of a threat, ``"<norm>:<eps>"`` (``"linf:0.3"``): the store's cell
    and unit keys, the leaderboard's threat column and ``str(Threat(...))`` all use it."""
    return f"{Norm(norm).value}:{float(eps):g}"

class Norm(StrEnum):
    """The norm of a threat model's perturbation ball."""

    LINF = "linf"
    L2 = "l2"


def _per_sample_l2(t: Tensor) -> Tensor:
    return t.flatten(1).norm(p=2, dim=1)


@dataclass(frozen=True)
class Threat:
    """A threat model: perturbations with ``||delta||_norm <= eps`` that keep the input in [0, 1].

    ``Threat("linf", 8 / 255)`` or ``Threat(Norm.L2, 0.5)``. eps is a finite float >= 0; an
    Linf eps above 1 (the diameter of [0, 1]) is refused, it is a typo for a radius in pixel
    units (``8`` for ``8/255``). :meth:`check_for` judges eps against an input's size.
    """

    norm: Norm
    eps: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", parse_enum(Norm, self.norm, "norm"))
        try:
            eps = float(self.eps)
        except (TypeError, ValueError):
            raise ValueError(f"eps must be a number, got {self.eps!r}") from None
        if math.isnan(eps) or math.isinf(eps):
            raise ValueError(f"eps must be finite, got {eps}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if self.norm is Norm.LINF and eps > 1.0:
            raise ValueError(
                f"Linf eps {eps:g} is larger than 1, the diameter of the [0, 1] input range: "
                f"every image is inside the ball. Radii are in [0, 1] units "
                f"(8/255 = {8 / 255:.4f}, not 8)")
        object.__setattr__(self, "eps", eps)

    def scaled(self, factor: float) -> Threat:
        """This threat with eps times ``factor``; an Linf radius is capped at 1 (the ball of
        radius 1 already holds the whole [0, 1] box)."""
        eps = self.eps * factor
        return Threat(self.norm, min(eps, 1.0) if self.norm is Norm.LINF else eps)

    def diameter(self, x: Tensor) -> float:
        """The diameter of the [0, 1] box of ``x``'s per-sample shape in this norm."""
        return 1.0 if self.norm is Norm.LINF else math.sqrt(x[0].numel())

    def check_for(self, x: Tensor, stacklevel: int = 3) -> None:
        """Judge eps against the inputs ``x`` (``N x C x H x W``).

        Raises ``ValueError`` when eps exceeds the box's diameter (L2 above sqrt(C*H*W)), and
        warns (:class:`LargeEpsWarning`) from half the diameter on: every input is then within
        eps of the constant 0.5 image, so no classifier that uses its input can be robust on
        two differently-labelled samples and robust accuracy says nothing about the model.
        """
        diameter = self.diameter(x)
        if self.eps > diameter + 1e-9:
            raise ValueError(
                f"{self.norm.value} eps {self.eps:g} is larger than {diameter:.4g}, the diameter "
                f"of the [0, 1] box of inputs of shape {tuple(x.shape[1:])}")
        if self.eps >= 0.5 * diameter:
            warnings.warn(
                f"{self.norm.value} eps {self.eps:g} is at least half the input box's diameter "
                f"({0.5 * diameter:.4g}): every input is within eps of the constant 0.5 image, "
                "so robust accuracy at this radius cannot separate classes", LargeEpsWarning,
                stacklevel=stacklevel)

    def __str__(self) -> str:
        return threat_key(self.norm, self.eps)

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Project ``x_adv`` onto the eps-ball around ``x`` intersected with [0, 1].

        Linf: clamping each coordinate is the exact projection onto the intersection (a box).
        L2: clip to the box first, then scale the perturbation into the ball; scaling a
        perturbation that keeps ``x + delta`` in the box towards 0 stays in the box (the box is
        convex and contains ``x``), so the result is in both sets.
        """
        if self.norm is Norm.LINF:
            return torch.minimum(torch.maximum(x_adv, x - self.eps), x + self.eps).clamp_(0.0, 1.0)
        delta = x_adv.clamp(0.0, 1.0) - x
        norms = _per_sample_l2(delta).clamp_min(1e-12)
        factor = (self.eps / norms).clamp(max=1.0).view(-1, *([1] * (x.dim() - 1)))
        return (x + delta * factor).clamp_(0.0, 1.0)

    def distance(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Per-sample size of the perturbation in this threat's norm."""
        delta = (x_adv - x).flatten(1)
        if self.norm is Norm.LINF:
            return delta.abs().amax(dim=1)
        return delta.norm(p=2, dim=1)

    def contains(self, x_adv: Tensor, x: Tensor, atol: float = 1e-5) -> Tensor:
        """Per-sample bool: inside the ball (up to ``atol``) and inside [0, 1]."""
        in_box = (x_adv >= -atol).flatten(1).all(1) & (x_adv <= 1 + atol).flatten(1).all(1)
        return in_box & (self.distance(x_adv, x) <= self.eps + atol)

    def random_point(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A uniformly random point of the eps-ball around ``x`` (then clipped to [0, 1])."""
        if self.norm is Norm.LINF:
            delta = (uniform(x.shape, generator, x.device, x.dtype) * 2 - 1) * self.eps
        else:
            # Uniform in the L2 ball: a Gaussian direction and radius eps * U^(1/d).
            direction = normal(x.shape, generator, x.device, x.dtype)
            direction = direction / _per_sample_l2(direction).clamp_min(1e-12).view(
                -1, *([1] * (x.dim() - 1))
            )
            d = x[0].numel()
            radius = uniform((x.shape[0],), generator, x.device, x.dtype) ** (1.0 / d) * self.eps
            delta = direction * radius.view(-1, *([1] * (x.dim() - 1)))
        return self.project(x + delta, x)

    def to_dict(self) -> dict[str, Any]:
        """``{"norm": "linf" | "l2", "eps": float}``."""
        return {"norm": self.norm.value, "eps": self.eps}


class LargeEpsWarning(UserWarning):
    """eps is at least half the input box's diameter: robustness there is meaningless."""
