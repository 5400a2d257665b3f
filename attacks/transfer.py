"""Transfer attack: craft adversarial examples on a surrogate model and evaluate them on the
target (Papernot et al. 2017, "Practical black-box attacks"): the black-box setting in which
the attacker trains a proxy model. Needs one query of the target per sample.

A defense that is robust to white-box attacks but not to transferred examples masks its
gradients: the masking diagnosis compares the two per sample.

Args:
    attack: any attack, run on the surrogate.
    surrogate: a model following the input convention, for the same classes.

Usage: ``Transfer(PGD(threat), surrogate=zoo.load("mnist-cnn"))(target, x, y)``
"""

from __future__ import annotations

import torch
from torch import nn

from ..bench.core import margin
from .base import Attack, register_attack

__all__ = ["Transfer"]


@register_attack("transfer")
class Transfer(Attack):
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
