"""TRADES (Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, ICML 2019, "Theoretically Principled
Trade-off between Robustness and Accuracy").

The loss is ``CE(f(x), y) + beta * KL(p(x) || p(x'))`` where ``x'`` maximises the KL term in
the threat ball: ``steps`` signed-gradient steps of ``step_size`` (default ``2.5 * eps /
steps``) from ``x`` plus ``0.001 * N(0, 1)`` noise, as in the authors' code. ``beta = 6`` is
the paper's choice for MNIST and CIFAR-10: larger trades clean accuracy for robustness.
The inner maximisation runs in eval mode with frozen parameters; eps warms up linearly over
``warmup_epochs`` (see :class:`~unmask.defenses.adversarial.AdversarialLoss`).

Shapes: ``x`` N x C x H x W in [0, 1], ``y`` int64 N -> scalar loss.

Usage: ``adversarial_training(model, x, y, threat=Threat("linf", 0.3), method="trades")``
or ``fit(model, x, y, TradesLoss(Threat("linf", 0.3)), epochs=10)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks.base import steepest_step
from ..bench.core import Threat, normal
from ..bench.core.training import register_recipe
from .adversarial import LOSSES, AdversarialLoss, TrainingMethod, _input_gradient, _recipe

__all__ = ["TradesLoss", "trades"]

# Zhang et al.'s start: a tiny Gaussian step off x, where the KL term and its gradient are
# exactly zero.
START_STD = 0.001


class TradesLoss(AdversarialLoss):
    """The TRADES loss with ``beta`` (default 6) and a ``steps``-step KL inner maximisation."""

    desc = "trades"

    def __init__(self, threat: Threat, beta: float = 6.0, steps: int = 10,
                 step_size: float | None = None, warmup_epochs: float = 0.0) -> None:
        super().__init__(threat, warmup_epochs)
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if step_size is not None and not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size!r}")
        self.beta = float(beta)
        self.steps = steps
        self.step_size = float(step_size) if step_size is not None else 2.5 * threat.eps / steps

    def _perturb(self, model, x, y, threat, generator) -> Tensor:
        step = self.step_size * self.eps_scale
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)
        x_adv = threat.project(x + START_STD * normal(x.shape, generator, x.device, x.dtype), x)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction="sum")
            grad = _input_gradient(kl, x_adv)
            x_adv = threat.project(steepest_step(threat, x_adv.detach(), grad, step), x)
        return x_adv

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor,
                 generator: torch.Generator | None = None) -> Tensor:
        x_adv = self.perturb(model, x, y, generator)
        logits = model(x)
        natural = F.cross_entropy(logits, y)
        robust = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1),
                          reduction="batchmean")
        return natural + self.beta * robust

    def config(self) -> dict[str, Any]:
        """The loss's settings (the base's plus ``beta``, steps, step size) for provenance."""
        return {**super().config(), "beta": self.beta, "steps": self.steps,
                "step_size": self.step_size}


@LOSSES.register(TrainingMethod.TRADES.value)
def _trades_loss(threat: Threat, *, steps: int | None, step_size: float | None, beta: float,
                 warmup_epochs: float) -> TradesLoss:
    return TradesLoss(threat, beta=beta, steps=10 if steps is None else steps,
                      step_size=step_size, warmup_epochs=warmup_epochs)


@register_recipe("trades", label="TRADES")
def trades(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, batch_size: int = 128,
           lr: float = 1e-3, generator=0, progress: bool = True, checkpoint_dir=None,
           norm: str = "linf", eps: float = 0.3, beta: float = 6.0, steps: int = 10,
           step_size: float | None = None, warmup_epochs: float = 0.0,
           eval_dataset: str | None = None, eval_samples: int = 500, eval_steps: int = 20,
           **options: Any) -> tuple[nn.Module, dict[str, Any]]:
    """TRADES as a zoo recipe; options as for ``pgd-at`` plus ``beta``. Returns
    ``(model, metrics)``."""
    return _recipe(TrainingMethod.TRADES, model, x, y, epochs=epochs, batch_size=batch_size, lr=lr,
                   generator=generator, progress=progress, checkpoint_dir=checkpoint_dir,
                   norm=norm, eps=eps, steps=steps, step_size=step_size, beta=beta,
                   warmup_epochs=warmup_epochs, eval_dataset=eval_dataset,
                   eval_samples=eval_samples, eval_steps=eval_steps, **options)
