"""BranchPGD: PGD whose gradient flows through one chosen sub-module only; documented on
:class:`BranchPGD`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from ..bench.core import AttackResult, Threat, check_inputs, margin, model_mode
from .base import PLAIN, GradientOracle, register_attack
from .branching import detach_outputs, resolve_modules, zero_outputs
from .pgd import PGD

__all__ = ["BranchPGD", "BranchAttackResult"]


@dataclass
class BranchAttackResult(AttackResult):
    """:class:`AttackResult` plus the ablation: ``success`` is the full model's verdict;
    ``fooled_without_branch`` (bool ``N``) whether ``x_adv`` reaches the attack goal on the
    model with ``branch`` disabled, ``clean_without_branch`` (bool ``N``) whether that model
    still classifies the clean input correctly (untargeted) / avoids the target."""

    branch: str = ""
    fooled_without_branch: Tensor | None = None
    clean_without_branch: Tensor | None = None


@register_attack("branch-pgd")
class BranchPGD(PGD):
    """BranchPGD: PGD (Madry et al., ICLR 2018) whose gradient flows through one chosen
    sub-module only.

    Threat model: white-box, ``Linf`` or ``L2`` ball of radius ``eps`` intersected with
    [0, 1], with the gradient restricted to one branch of the model.

    For models with parallel branches (Inception-style blocks, two-stream texture/shape models),
    every other listed branch is detached on the backward pass only: the forward pass, and so
    the model's prediction, is unchanged, but the perturbation is steered by one branch's gradient
    alone. The result then says whether that perturbation fools the full model (``success``) and
    a copy of the model with the chosen branch disabled (its output set to zero,
    ``fooled_without_branch``): the experiment that shows how adversarial vulnerability is shared
    between a network's parts (cf. Ilyas, Santurkar, Tsipras, Engstrom, Tran & Madry,
    "Adversarial Examples Are Not Bugs, They Are Features", NeurIPS 2019, for features shared
    across parts of the input).

    Args:
        threat: ``Threat("linf" | "l2", eps)``.
        branch: qualified name (as in ``model.named_modules()``) of the branch the gradient flows
            through.
        branches: qualified names of all parallel branches (``branch`` among them); the others
            are detached.
        steps, step_size, restarts, loss, random_start: as :class:`~unmask.attacks.PGD`
            (defaults 40, ``2.5 * eps / steps``, 1, ``"ce"``, True).

    Shapes: ``x`` N x C x H x W in [0, 1], ``y`` int64 N -> :class:`BranchAttackResult`.

    Usage: ``BranchPGD(Threat("linf", 0.1), branch="shape", branches=["shape", "texture"])(model, x, y)``
    """

    name = "branch-pgd"

    def __init__(self, threat: Threat, branch: str, branches: Sequence[str], steps: int = 40,
                 step_size: float | None = None, restarts: int = 1, loss: str = "ce",
                 random_start: bool = True) -> None:
        super().__init__(threat, steps=steps, step_size=step_size, restarts=restarts, loss=loss,
                         random_start=random_start)
        if isinstance(branches, str) or not all(isinstance(b, str) for b in branches):
            raise TypeError("branches must be a list of qualified module names")
        if branch not in branches:
            raise ValueError(f"branch {branch!r} must be one of branches "
                             f"({', '.join(map(repr, branches))})")
        self.branch = branch
        self.branches = tuple(branches)

    @property
    def label(self) -> str:
        return f"branch-pgd[{self.branch}]"

    def config(self):
        return {**super().config(), "branch": self.branch, "branches": [*self.branches]}

    def run(self, model: nn.Module, x: Tensor, y: Tensor, *, targets: Tensor | None = None,
            generator: torch.Generator | int | None = None,
            oracle: GradientOracle = PLAIN) -> BranchAttackResult:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        modules = resolve_modules(model, self.branches)
        others = [m for n, m in modules.items() if n != self.branch]
        with detach_outputs(others):
            result = super().run(model, x, y, targets=targets, generator=generator,
                                 oracle=oracle)
        x, y = check_inputs(x, y, model=model)
        tgt = targets.to(x.device).long() if targets is not None else None
        with model_mode(model), torch.no_grad(), zero_outputs([modules[self.branch]]):
            clean = margin(model(x), y, tgt) >= 0
            fooled = margin(model(result.x_adv), y, tgt) < 0
        base = {f.name: getattr(result, f.name) for f in fields(AttackResult)}
        return BranchAttackResult(**base, branch=self.branch, fooled_without_branch=fooled,
                                  clean_without_branch=clean)
