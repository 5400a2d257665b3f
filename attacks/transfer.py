"""Transfer attack from a surrogate model (Papernot et al., AsiaCCS 2017); documented on
:class:`Transfer`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..bench.core import margin
from .base import Attack, register_attack

__all__ = ["Transfer"]


@register_attack("transfer")
class Transfer(Attack):
    """Transfer attack: craft adversarial examples on a surrogate model and evaluate them on the
    target (Papernot, McDaniel, Goodfellow, Jha, Celik & Swami, "Practical Black-Box Attacks
    against Machine Learning", AsiaCCS 2017).

    Threat model: black-box, no gradient of the target: the attacker holds a proxy model for the
    same classes; the ball is the wrapped attack's ``threat``. One query of the target per sample
    (the verdict on the crafted example). The surrogate's cost is recorded in the result's
    ``config`` (``surrogate_forwards``, ``surrogate_backwards``, ``surrogate_success_rate``).

    A defense that is robust to white-box attacks but not to transferred examples masks its
    gradients: the masking diagnosis compares the two per sample.

    Args:
        attack: any :class:`~unmask.attacks.Attack`, run on the surrogate (its threat is used).
        surrogate: an ``nn.Module`` following the input convention, for the same classes.

    Shapes: ``x`` N x C x H x W in [0, 1], ``y`` int64 N, ``targets`` int64 N or None ->
    :class:`~unmask.bench.core.AttackResult` (``forwards`` counts target queries only).

    Usage: ``Transfer(PGD(threat), surrogate=zoo.load("mnist-cnn"))(target, x, y, generator=g)``
    """

    name = "transfer"
    gradient_free = True  # needs no gradient of the target

    def __init__(self, attack: Attack, surrogate: nn.Module) -> None:
        if not isinstance(attack, Attack):
            raise TypeError(f"attack must be an unmask Attack, got {type(attack).__name__}")
        if not isinstance(surrogate, nn.Module):
            raise TypeError(f"surrogate must be a torch.nn.Module, got {type(surrogate).__name__}")
        super().__init__(attack.threat)
        self.attack, self.surrogate = attack, surrogate

    @property
    def label(self) -> str:
        return f"transfer-{self.attack.label}"

    def config(self):
        return {**self.attack.config(), "attack": self.label,
                "surrogate": type(self.surrogate).__name__}

    def _attack(self, model, x, y, targets, generator, tracker, idx, oracle) -> None:
        ta = targets[idx] if targets is not None else None
        crafted = self.attack(self.surrogate, x[idx], y[idx], targets=ta, generator=generator)
        with torch.no_grad():
            tracker.update(idx, crafted.x_adv, margin(oracle.logits(model, crafted.x_adv, generator),
                                                      y[idx], ta))
        tracker.cost(idx, oracle.samples)
        tracker.extra.update(surrogate_forwards=crafted.n_forward,
                             surrogate_backwards=crafted.n_backward,
                             surrogate_success_rate=crafted.success_rate)
