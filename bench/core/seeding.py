"""Randomness only from an explicit seed or ``torch.Generator`` (DESIGN rule 5): generators and
the draws every stochastic function uses.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ['make_generator', 'uniform', 'normal']


def make_generator(seed: int | torch.Generator | None = 0, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded with ``seed`` (an existing generator is passed through).

    unmask never touches the global RNG: every stochastic function takes one of these.
    """
    if isinstance(seed, torch.Generator):
        return seed
    if seed is None:
        seed = 0
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _draw(fn, shape, generator, device, dtype) -> Tensor:
    # A CPU generator drives sampling for tensors on any device, so a seed gives the same
    # numbers on CPU and GPU; a generator on the tensor's device samples in place.
    device = torch.device(device)
    if generator is None:
        return fn(shape, device=device, dtype=dtype)
    if generator.device.type == device.type:
        return fn(shape, generator=generator, device=device, dtype=dtype)
    return fn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def uniform(shape, generator: torch.Generator | None, device="cpu", dtype=torch.float32) -> Tensor:
    """``U[0, 1)`` samples of ``shape`` from ``generator``, placed on ``device``."""
    return _draw(torch.rand, tuple(shape), generator, device, dtype)


def normal(shape, generator: torch.Generator | None, device="cpu", dtype=torch.float32) -> Tensor:
    """Standard normal samples of ``shape`` from ``generator``, placed on ``device``."""
    return _draw(torch.randn, tuple(shape), generator, device, dtype)
