"""Input-gradient regularisation trained with double backpropagation (Drucker & LeCun 1992,
"Improving Generalization Performance Using Double Backpropagation"; Ross & Doshi-Velez, AAAI
2018, "Improving the Adversarial Robustness and Interpretability of Deep Neural Networks by
Regularizing their Input Gradients").

The loss is ``CE(f(x), y) + lam * mean_i ||d CE_i / d x_i||``: the penalty's own gradient
with respect to the parameters runs through the input gradient (``create_graph=True``), which
costs about one more backward pass per batch. To first order, ``CE(x + delta) <= CE(x) +
eps * ||grad||_*`` over the ball ``||delta|| <= eps``, with ``||.||_*`` the dual norm: the L1
norm of the gradient (the default) matches a Linf threat, the L2 norm an L2 threat, and
``lam = eps`` penalises exactly the linearised worst-case loss increase.

A flat loss surface around the data is also what gradient masking looks like to an attacker,
so a model trained this way is a natural test case for the masking diagnosis.

Shapes: ``x`` N x C x H x W in [0, 1], ``y`` int64 N -> scalar loss.

Usage: ``gradient_regularization(model, x, y, lam=0.3, norm="l1", epochs=10)``
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bench.core import StrEnum, Threat, parse_enum
from ..bench.core.training import register_recipe
from .adversarial import evaluate_for_card, train_with_loss

__all__ = ["PenaltyNorm", "GradientPenaltyLoss", "gradient_regularization", "grad_reg"]


class PenaltyNorm(StrEnum):
    """Norm of the input gradient that is penalised."""

    L1 = "l1"
    L2 = "l2"


class GradientPenaltyLoss:
    """``CE + lam * mean ||d CE / d x||_norm``, differentiable in the parameters."""

    desc = "grad-reg"

    def __init__(self, lam: float = 0.3, norm: str | PenaltyNorm = "l1") -> None:
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam!r}")
        self.lam = float(lam)
        self.norm = parse_enum(PenaltyNorm, norm, "penalty norm")

    def terms(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean cross-entropy, mean gradient norm)``, both in the graph of the parameters."""
        x = x.detach().requires_grad_(True)
        ce = F.cross_entropy(model(x), y, reduction="none")
        # The summed loss gives every sample its own gradient (samples do not interact
        # without batch statistics).
        (grad,) = torch.autograd.grad(ce.sum(), x, create_graph=True)
        flat = grad.flatten(1)
        if self.norm is PenaltyNorm.L1:
            penalty = flat.abs().sum(1)
        else:
            # sqrt(. + tiny) keeps the second derivative finite where the gradient is 0.
            penalty = (flat.pow(2).sum(1) + 1e-12).sqrt()
        return ce.mean(), penalty.mean()

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor,
                 generator: torch.Generator | None = None) -> Tensor:
        ce, penalty = self.terms(model, x, y)
        return ce + self.lam * penalty

    def config(self) -> dict[str, Any]:
        """The loss's settings (method, ``lam``, penalty norm) for the model card's provenance."""
        return {"method": self.desc, "lam": self.lam, "penalty_norm": self.norm.value}


def gradient_regularization(model: nn.Module, x: Tensor, y: Tensor, *, lam: float = 0.3,
                            norm: str = "l1", epochs: int = 10, batch_size: int = 128,
                            lr: float = 1e-3, generator: torch.Generator | int | None = 0,
                            progress: bool = True, checkpoint_dir=None,
                            **fit_options: Any) -> nn.Module:
    """Train ``model`` (in place) with the input-gradient penalty ``lam * ||grad||_norm``.

    Other arguments as for :func:`unmask.bench.core.training.fit`. Returns the model in eval mode.
    """
    return train_with_loss(model, x, y, GradientPenaltyLoss(lam, norm), epochs=epochs,
                           batch_size=batch_size, lr=lr, generator=generator, progress=progress,
                           checkpoint_dir=checkpoint_dir, **fit_options)


@register_recipe("grad-reg", label="input-gradient penalty")
def grad_reg(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, batch_size: int = 128,
             lr: float = 1e-3, generator=0, progress: bool = True, checkpoint_dir=None,
             lam: float = 0.3, penalty_norm: str = "l1", norm: str = "linf", eps: float = 0.3,
             eval_dataset: str | None = None, eval_samples: int = 500, eval_steps: int = 20,
             eval_other_eps: Sequence[float] = (),
             **options: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Gradient regularisation as a zoo recipe. ``norm``/``eps`` (and ``eval_other_eps``) only
    set the threats of the card's robust accuracy (with ``eval_dataset``). Returns
    ``(model, metrics)``."""
    loss = GradientPenaltyLoss(lam, penalty_norm)
    start = time.perf_counter()
    model = train_with_loss(model, x, y, loss, epochs=epochs, batch_size=batch_size, lr=lr,
                            generator=generator, progress=progress,
                            checkpoint_dir=checkpoint_dir, **options)
    return model, evaluate_for_card(model, loss.config(), Threat(norm, eps),
                                    eval_dataset=eval_dataset, eval_samples=eval_samples,
                                    eval_steps=eval_steps,
                                    train_seconds=time.perf_counter() - start,
                                    eval_other_eps=eval_other_eps)
