"""Backdoor triggers: what a poisoned input carries so that the model outputs the target.

* :class:`BadNets` (Gu et al. 2017, "BadNets: Identifying Vulnerabilities in the Machine
  Learning Model Supply Chain"): a small solid patch stamped at a fixed position; by default a
  3 x 3 white patch one pixel in from the bottom-right corner.
* :class:`Blend` (Chen et al. 2017, "Targeted Backdoor Attacks on Deep Learning Systems Using
  Data Poisoning"): ``(1 - alpha) * x + alpha * pattern`` with a fixed full-image pattern,
  uniform noise drawn from ``seed`` unless one is given.
* :class:`WaNet` (Nguyen & Tran 2021, "WaNet - Imperceptible Warping-based Backdoor Attack"):
  a smooth, fixed warping field (a random ``k x k`` control grid upsampled bicubically, scaled
  by ``strength``) applied with ``grid_sample``; nearly invisible.

A trigger is configured once and applied to any batch: ``x_triggered = trigger(x)`` with
``x`` of shape ``N x C x H x W`` in [0, 1]; the result has the same shape, dtype and device and
stays in [0, 1]. Triggers are deterministic: random patterns come from the trigger's ``seed``
through a ``torch.Generator``, so ``config()`` is enough to rebuild one
(:func:`make_trigger`).

Usage: ``BadNets()(x)``, ``Blend(alpha=0.2, seed=1)(x)``, ``make_trigger("wanet", k=4)``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..bench.core import check_images, make_generator, uniform
from ..bench.core.registry import Registry

__all__ = ["Trigger", "BadNets", "Blend", "WaNet", "TRIGGERS", "register_trigger",
           "make_trigger"]

_CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")


class Trigger:
    """Base class: validates the batch and leaves the input untouched (a new tensor is returned).

    Subclasses implement :meth:`apply` on a validated batch and :meth:`config`.
    """

    name: ClassVar[str] = "trigger"

    def __call__(self, x: Tensor) -> Tensor:
        return self.apply(check_images(x))

    def apply(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Stamp the trigger on a validated batch ``N x C x H x W`` in [0, 1]; returns a new tensor
        of the same shape, in [0, 1].
        """
        raise NotImplementedError

    def config(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """The trigger's settings as a JSON-ready dict (for provenance and the zoo recipe)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


# Backdoor triggers by name: ``make_trigger`` and ``Backdoor(trigger="...")`` read it.
TRIGGERS: Registry[type[Trigger]] = Registry("backdoor trigger")


def register_trigger(cls: type[Trigger]) -> type[Trigger]:
    """Class decorator: register a :class:`Trigger` subclass under its ``name``."""
    TRIGGERS.add(cls.name, cls)
    return cls


@register_trigger
class BadNets(Trigger):
    """A ``size x size`` patch of constant ``value`` stamped onto every image (Gu et al. 2017).

    Args:
        size: side of the square patch in pixels (default 3).
        position: a corner, one of ``"bottom-right"`` (default), ``"bottom-left"``,
            ``"top-right"``, ``"top-left"``, or an explicit ``(row, col)`` of the patch's
            top-left pixel.
        value: the patch intensity in [0, 1], the same in every channel (default 1.0, white).
        margin: distance in pixels between the patch and the image border when ``position``
            is a corner (default 1).
    """

    name = "badnets"

    def __init__(self, size: int = 3, position: str | tuple[int, int] = "bottom-right",
                 value: float = 1.0, margin: int = 1) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if isinstance(position, str):
            if position not in _CORNERS:
                raise ValueError(f"unknown position {position!r}; expected one of "
                                 f"{', '.join(map(repr, _CORNERS))} or a (row, col) pair")
        elif not (isinstance(position, tuple | list) and len(position) == 2
                  and all(isinstance(p, int) and p >= 0 for p in position)):
            raise ValueError(f"position must be a corner name or a (row, col) pair of ints >= 0, "
                             f"got {position!r}")
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"value must lie in [0, 1], got {value}")
        if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
            raise ValueError(f"margin must be an int >= 0, got {margin!r}")
        self.size = size
        self.position = position if isinstance(position, str) else tuple(position)
        self.value = float(value)
        self.margin = margin

    def region(self, height: int, width: int) -> tuple[slice, slice]:
        """The (rows, cols) slices the patch covers in a ``height x width`` image."""
        s, m = self.size, self.margin
        if isinstance(self.position, str):
            row = m if self.position.startswith("top") else height - m - s
            col = m if self.position.endswith("left") else width - m - s
        else:
            row, col = self.position
        if row < 0 or col < 0 or row + s > height or col + s > width:
            raise ValueError(f"a {s}x{s} patch at {self.position!r} (margin {m}) does not fit "
                             f"in a {height}x{width} image")
        return slice(row, row + s), slice(col, col + s)

    def apply(self, x: Tensor) -> Tensor:
        rows, cols = self.region(x.shape[-2], x.shape[-1])
        out = x.clone()
        out[..., rows, cols] = self.value
        return out

    def config(self) -> dict[str, Any]:
        position = self.position if isinstance(self.position, str) else list(self.position)
        return {"size": self.size, "position": position, "value": self.value,
                "margin": self.margin}


@register_trigger
class Blend(Trigger):
    """Alpha-blend a fixed full-image pattern: ``(1 - alpha) * x + alpha * pattern`` (Chen et al.
    2017).

    Args:
        alpha: blend weight of the pattern in (0, 1] (default 0.2).
        seed: seeds the uniform-noise pattern (one per image shape) when ``pattern`` is None.
        pattern: an explicit pattern in [0, 1] of shape ``C x H x W`` or ``H x W`` (broadcast
            over channels), e.g. the Hello Kitty image of the paper.
    """

    name = "blend"

    def __init__(self, alpha: float = 0.2, seed: int = 0, pattern: Tensor | None = None) -> None:
        if not 0.0 < float(alpha) <= 1.0:
            raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
        make_generator(seed)  # validates the seed
        if pattern is not None:
            if not isinstance(pattern, Tensor) or pattern.dim() not in (2, 3):
                raise ValueError("pattern must be a tensor of shape C x H x W or H x W")
            if (not pattern.is_floating_point() or float(pattern.min()) < 0
                    or float(pattern.max()) > 1):
                raise ValueError("pattern must be a floating-point tensor with values in [0, 1]")
            pattern = pattern.detach().clone()
        self.alpha = float(alpha)
        self.seed = seed
        self._pattern = pattern
        self._cache: dict[tuple[int, int, int], Tensor] = {}

    def pattern(self, shape: tuple[int, int, int]) -> Tensor:
        """The ``C x H x W`` pattern blended into images of that shape (on the CPU)."""
        shape = tuple(int(s) for s in shape)
        if self._pattern is not None:
            p = self._pattern if self._pattern.dim() == 3 else self._pattern.unsqueeze(0)
            if p.shape[-2:] != shape[-2:] or p.shape[0] not in (1, shape[0]):
                raise ValueError(f"pattern of shape {tuple(self._pattern.shape)} does not match "
                                 f"images of shape {shape}")
            return p.expand(shape)
        if shape not in self._cache:
            self._cache[shape] = uniform(shape, make_generator(self.seed))
        return self._cache[shape]

    def apply(self, x: Tensor) -> Tensor:
        p = self.pattern(tuple(x.shape[1:])).to(device=x.device, dtype=x.dtype)
        return ((1.0 - self.alpha) * x + self.alpha * p).clamp_(0.0, 1.0)

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"alpha": self.alpha, "seed": self.seed}
        if self._pattern is not None:
            cfg["pattern"] = f"tensor{tuple(self._pattern.shape)}"
        return cfg


@register_trigger
class WaNet(Trigger):
    """Warp every image with one fixed smooth field (Nguyen & Tran 2021).

    The field is a ``k x k`` grid of uniform offsets in [-1, 1] (normalised to mean absolute
    value 1), upsampled bicubically to ``H x W``; pixel ``p`` is resampled from
    ``p + strength * field(p) / H`` in normalised coordinates. Only the warping ("attack
    mode") is implemented; the paper's "noise mode" (randomly warped samples that keep their
    label) is a training-time add-on left out here.

    Args:
        k: control-grid size (default 4).
        strength: warping strength ``s`` (default 0.5, the paper's value).
        grid_rescale: scale of the warped grid before clamping to [-1, 1] (default 1.0).
        seed: seeds the control grid.
    """

    name = "wanet"

    def __init__(self, k: int = 4, strength: float = 0.5, grid_rescale: float = 1.0,
                 seed: int = 0) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"k must be an int >= 2, got {k!r}")
        if not float(strength) > 0:
            raise ValueError(f"strength must be > 0, got {strength}")
        if not float(grid_rescale) > 0:
            raise ValueError(f"grid_rescale must be > 0, got {grid_rescale}")
        make_generator(seed)
        self.k = k
        self.strength = float(strength)
        self.grid_rescale = float(grid_rescale)
        self.seed = seed
        self._cache: dict[tuple[int, int], Tensor] = {}

    def grid(self, height: int, width: int) -> Tensor:
        """The ``1 x H x W x 2`` sampling grid for ``grid_sample`` (on the CPU)."""
        key = (int(height), int(width))
        if key not in self._cache:
            control = uniform((1, 2, self.k, self.k), make_generator(self.seed)) * 2 - 1
            control = control / control.abs().mean()
            field = F.interpolate(control, size=key, mode="bicubic", align_corners=True)
            field = field.permute(0, 2, 3, 1)
            ys = torch.linspace(-1, 1, key[0])
            xs = torch.linspace(-1, 1, key[1])
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            identity = torch.stack((gx, gy), dim=-1).unsqueeze(0)  # grid_sample wants (x, y)
            grid = (identity + self.strength * field / key[0]) * self.grid_rescale
            self._cache[key] = grid.clamp(-1, 1)
        return self._cache[key]

    def apply(self, x: Tensor) -> Tensor:
        grid = self.grid(x.shape[-2], x.shape[-1]).to(device=x.device, dtype=x.dtype)
        out = F.grid_sample(x, grid.expand(x.shape[0], -1, -1, -1), mode="bilinear",
                            padding_mode="border", align_corners=True)
        return out.clamp_(0.0, 1.0)

    def config(self) -> dict[str, Any]:
        return {"k": self.k, "strength": self.strength, "grid_rescale": self.grid_rescale,
                "seed": self.seed}


def make_trigger(name: str | Trigger, **options: Any) -> Trigger:
    """Build a trigger by name (``"badnets"``, ``"blend"``, ``"wanet"``) with its options; a
    :class:`Trigger` instance is passed through (then ``options`` must be empty)."""
    if isinstance(name, Trigger):
        if options:
            raise ValueError("options can only be given with a trigger name, not an instance")
        return name
    key = str(name).lower()
    if key not in TRIGGERS:
        raise ValueError(f"unknown trigger {name!r}; expected one of "
                         f"{', '.join(map(repr, TRIGGERS))}")
    try:
        return TRIGGERS.get(key)(**options)
    except TypeError as err:
        raise ValueError(f"bad options for trigger {key!r}: {err}") from None
