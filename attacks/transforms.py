"""Random input transformations for EOT (Athalye et al., ICML 2018), applied batched and
differentiably: every sample draws its own parameters from the caller's generator.

``RandomAffine`` (rotation, scale, translation through ``affine_grid``/``grid_sample``),
``Brightness``, ``GaussianNoise`` and ``Compose``. Each is a callable
``t(x, generator) -> x'`` on ``N x C x H x W`` tensors in [0, 1], and the result stays in [0, 1].

Usage: ``EOT(PGD(threat), transform=Compose([Rotation(20), Brightness(0.1)]), samples=8)``
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..bench.core import normal, uniform

__all__ = ["Transform", "RandomAffine", "Rotation", "Scale", "Translation", "Brightness",
           "GaussianNoise", "Compose"]


class Transform:
    """A random transformation ``t(x, generator) -> x'``."""

    def __call__(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def config(self) -> dict:
        """The transform's name and settings as a dict (recorded in the attack's config)."""
        return {"transform": type(self).__name__, **{k: v for k, v in vars(self).items()}}


def _range(value, name: str, default_center: float = 0.0) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
        return default_center - float(value), default_center + float(value)
    lo, hi = (float(v) for v in value)
    if lo > hi:
        raise ValueError(f"{name} range must be (low, high) with low <= high, got {value}")
    return lo, hi


class RandomAffine(Transform):
    """Rotation by U(-degrees, degrees), isotropic scale U(scale), translation by
    U(-translate, translate) of the image size; bilinear, zero padding."""

    def __init__(self, degrees: float = 20.0, scale: Sequence[float] = (0.9, 1.1),
                 translate: float = 0.0) -> None:
        self.degrees = _range(degrees, "degrees")
        self.scale = _range(scale, "scale")
        if self.scale[0] <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.translate = _range(translate, "translate")

    def __call__(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        n = x.shape[0]

        def draw(lo_hi):
            lo, hi = lo_hi
            return lo + (hi - lo) * uniform((n,), generator, x.device, x.dtype)

        angle = draw(self.degrees) * (math.pi / 180)
        scale = draw(self.scale)
        tx, ty = draw(self.translate) * 2, draw(self.translate) * 2  # grid coords span 2
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False).clamp(0, 1)


def Rotation(degrees: float = 20.0) -> RandomAffine:  # noqa: N802 - a transform constructor
    """Rotation by U(-degrees, degrees)."""
    return RandomAffine(degrees=degrees, scale=(1.0, 1.0), translate=0.0)


def Scale(low: float = 0.9, high: float = 1.1) -> RandomAffine:  # noqa: N802
    """Isotropic scaling by U(low, high)."""
    return RandomAffine(degrees=0.0, scale=(low, high), translate=0.0)


def Translation(fraction: float = 0.1) -> RandomAffine:  # noqa: N802
    """Shift by U(-fraction, fraction) of the image size along each axis."""
    return RandomAffine(degrees=0.0, scale=(1.0, 1.0), translate=fraction)


class Brightness(Transform):
    """Add U(-delta, delta) to every pixel of a sample."""

    def __init__(self, delta: float = 0.1) -> None:
        self.delta = _range(delta, "delta")

    def __call__(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        lo, hi = self.delta
        shift = lo + (hi - lo) * uniform((x.shape[0], 1, 1, 1), generator, x.device, x.dtype)
        return (x + shift).clamp(0, 1)


class GaussianNoise(Transform):
    """Add N(0, std^2) noise per pixel."""

    def __init__(self, std: float = 0.1) -> None:
        if std < 0:
            raise ValueError(f"std must be >= 0, got {std}")
        self.std = float(std)

    def __call__(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return (x + self.std * normal(x.shape, generator, x.device, x.dtype)).clamp(0, 1)


class Compose(Transform):
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        for t in self.transforms:
            x = t(x, generator)
        return x

    def config(self) -> dict:
        return {"transform": "Compose", "transforms": [t.config() for t in self.transforms]}
