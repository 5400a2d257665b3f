"""Branch attribution: the share of the input gradient that flows through each parallel branch.

For Inception-style blocks or two-stream (texture/shape) models: the input gradient is a sum
over paths, so letting the gradient through one branch at a time (the other branches detached
on the backward pass only, the forward unchanged) splits it exactly:

    grad = through_none + sum_b contribution_b + interaction

``contribution_b = grad(only b open) - grad(all closed)``; ``through_none`` flows around every
branch (a skip connection); ``interaction`` is what flows through two or more listed branches
in series (zero for truly parallel branches). Shares are projections on the full gradient,
``<part, grad> / |grad|^2`` per sample, so they sum to 1.

Usage: ``ba = branch_attribution(model, x, y, branches=[model.shape, model.texture])``;
``ba.median_share()`` -> ``{"shape": 0.7, "texture": 0.3}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks.branching import detach_outputs, resolve_modules
from ..bench.core import check_inputs, check_logits, model_mode, parse_enum
from .gradflow import AuditLoss, audit_loss

__all__ = ["BranchAttribution", "branch_attribution"]


@dataclass
class BranchAttribution:
    """Result of :func:`branch_attribution`; per-sample tensors are ``N`` or ``N x B``."""

    names: list[str]
    share: Tensor = field(repr=False)  # N x B, projection share of each branch
    magnitude: Tensor = field(repr=False)  # N x B, |contribution_b|
    through_none: Tensor = field(repr=False)  # N, share flowing around every branch
    interaction: Tensor = field(repr=False)  # N, share through two or more branches
    grad_norm: Tensor = field(repr=False)  # N, |full input gradient|

    def median_share(self) -> dict[str, float]:
        """Median share per branch (samples with a zero gradient ignored)."""
        return {n: float(torch.nanmedian(self.share[:, i])) for i, n in enumerate(self.names)}

    def to_dict(self) -> dict[str, Any]:
        """The medians as a JSON-ready dict: branch names, median share and magnitude per branch,
        median share through no branch and through several.
        """
        return {"branches": self.names, "median_share": self.median_share(),
                "median_through_none": float(torch.nanmedian(self.through_none)),
                "median_interaction": float(torch.nanmedian(self.interaction)),
                "median_magnitude": {n: float(self.magnitude[:, i].median())
                                     for i, n in enumerate(self.names)}}


def _input_grad(model: nn.Module, x: Tensor, y: Tensor, loss: AuditLoss) -> Tensor:
    xg = x.detach().requires_grad_(True)
    logits = check_logits(model(xg), x.shape[0])
    if not logits.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(audit_loss(logits, y, loss), xg, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def branch_attribution(model: nn.Module, x: Tensor, y: Tensor,
                       branches: Sequence[nn.Module | str], *,
                       loss: str | AuditLoss = "ce") -> BranchAttribution:
    """Split the input gradient of ``loss`` among ``branches`` (sub-modules or their names).

    Runs ``len(branches) + 2`` forward/backward passes in eval mode with frozen parameters.
    ``x`` ``N x C x H x W`` in [0, 1], ``y`` int64 ``N``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    loss_kind = parse_enum(AuditLoss, loss, "loss")
    x, y = check_inputs(x, y)
    modules = resolve_modules(model, branches)
    mods = list(modules.values())
    with model_mode(model):
        full = _input_grad(model, x, y, loss_kind)
        with detach_outputs(mods):
            none = _input_grad(model, x, y, loss_kind)
        contribs = []
        for i in range(len(mods)):
            with detach_outputs(mods[:i] + mods[i + 1:]):
                contribs.append(_input_grad(model, x, y, loss_kind) - none)
    n = x.shape[0]
    g = full.reshape(n, -1).double()
    denom = (g * g).sum(1)
    denom = torch.where(denom > 0, denom, torch.full_like(denom, float("nan")))

    def share(part: Tensor) -> Tensor:
        return ((part.reshape(n, -1).double() * g).sum(1) / denom).float()

    rest = full - none - sum(contribs)
    return BranchAttribution(
        names=list(modules),
        share=torch.stack([share(c) for c in contribs], 1),
        magnitude=torch.stack([c.reshape(n, -1).norm(dim=1) for c in contribs], 1),
        through_none=share(none),
        interaction=share(rest),
        grad_norm=g.norm(dim=1).float(),
    )
